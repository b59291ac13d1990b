"""SFD: simple and fast distillation (Zhou et al., NeurIPS 2024), data-free.

The student is trained directly at its final step count N along the teacher's ODE
trajectories (Algorithm 2 of the paper). Per trajectory, from noise z = z̃ at σ_max and for
each interval [t_n, t_{n+1}] of the student grid (EDM's ρ-polynomial over σ = tan φ between
σ_max and σ_min by default, `grids.sfd_grid`):

    z̃_{n+1} = Solver_K(z̃_n, t_n → t_{n+1}; teacher)            (no grad; DPM-Solver++(3M))
    v̂       = student(z_n, t_n)
    L       = mean_b mean_i |cos Δ z_n + sin Δ v̂ − z̃_{n+1}|   (sfd_loss; Δ = φ_{n+1} − φ_n)
    θ ← θ − η ∇L;  z_{n+1} = detach(DDIM step of z_n with v̂)

so each interval is one optimizer update, the teacher follows its own (accurate) trajectory
and the student learns to correct its own accumulated error. By default the metric is taken
in EDM's VE coordinates x = z/α_{n+1} as in the paper (`loss_space="ve"`; "vp" takes it on z).

Options: `afs` (the student's first step is analytical, `solvers.afs_x_hat`: N network calls
over N + 1 intervals; the teacher still solves that interval), `steps_range` (SFD-v: a
`steps` scalar condition, zero-initialised, with N drawn per trajectory), and `stage2`
(1 NFE, with a first-stage student as the teacher).

Sample a student with `sample_sfd(result, noise, cond=...)` (it knows the grid and AFS) or
`solvers.dpmpp_sample(f, noise, steps, order=1, times=result.times, afs=result.afs)`.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fastdiff.engine.grids import sfd_grid
from fastdiff.engine.nvtx import phase
from fastdiff.engine.schedules import CosineSchedule, Schedule
from fastdiff.engine.solvers import METHODS, afs_x_hat, dpmpp_update, solve_interval
from fastdiff.kernels import ddim_step
from fastdiff.kernels.sfd_loss import sfd_loss
from fastdiff.training import (
    EMA,
    LOG_EVERY,
    Progress,
    _unwrap,
    flush_losses,
    make_optimizer,
    model_device,
    optimizer_update,
)

STEPS_COND = "steps"


@dataclass
class SFDHistory:
    """Loss per update; evaluations (update index, wall time s, value); totals."""

    loss: list = field(default_factory=list)
    eval_updates: list = field(default_factory=list)
    eval_times: list = field(default_factory=list)
    eval_values: list = field(default_factory=list)
    wall_time: float = 0.0            # training time in s, evaluations excluded
    samples_per_s: float = 0.0        # trajectories × intervals per second
    updates_done: int = 0
    teacher_nfe: int = 0              # teacher network calls per trajectory


@dataclass
class SFDResult:
    """A distilled student and everything needed to sample it."""

    student: nn.Module                # EMA weights (or the raw weights without EMA), eval mode
    steps: int                        # network calls per sample (the student's NFE)
    times: torch.Tensor               # float64 grid, (steps + 1,) or (steps + 2,) with AFS
    afs: bool
    history: SFDHistory
    steps_range: tuple | None = None  # SFD-v: step counts the student was trained for
    grid: dict = field(default_factory=dict)  # spacing, sigma_min, sigma_max, rho


def _generator(seed: int, k: int) -> torch.Generator:
    digest = hashlib.blake2b(f"sfd/{seed}/{k}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _bind(model, cond: dict) -> Callable:
    return lambda z, t: model(z, t, **cond)


def _model_t(t: float, z: torch.Tensor) -> torch.Tensor:
    return torch.full((z.shape[0],), float(t), dtype=torch.float32, device=z.device)


def _afs_step(z: torch.Tensor, phi_from: float, phi_to: float) -> torch.Tensor:
    return dpmpp_update(z, phi_from, phi_to, [(math.nan, afs_x_hat(z, phi_from))], 1)


def _infer_shape(teacher, data_shape):
    if data_shape is not None:
        return tuple(int(s) for s in data_shape)
    cfg = getattr(_unwrap(teacher), "config", None) or {}
    if cfg.get("kind") == "unet":
        return (cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    if cfg.get("kind") == "mlp":
        return (cfg["dim"],)
    raise ValueError("data_shape is needed: the teacher is not a fastdiff UNet/MLP")


@torch.no_grad()
def sample_sfd(result: SFDResult, noise: torch.Tensor, *, steps: int | None = None,
               cond: dict | None = None, return_nfe: bool = False):
    """Sample an SFD student from `noise` (B, ...), the state at σ_max (≈ standard normal).

    Walks `result.times` (or, for an SFD-v student, the grid for `steps`) with one DDIM
    step per interval; with AFS the first interval costs no network call. Returns x (the
    state at σ_min divided by α there, as EDM reads its sample), and the NFE with
    `return_nfe`.
    """
    student, times, cond = result.student, result.times, dict(cond or {})
    if result.steps_range is not None:
        steps = steps or result.steps
        times = sfd_grid(steps, getattr(student, "schedule", None) or CosineSchedule(),
                         afs=result.afs, **result.grid)
        cond[STEPS_COND] = torch.full((noise.shape[0],), float(steps), device=noise.device)
    elif steps is not None and steps != result.steps:
        raise ValueError(f"steps={steps}: this student was distilled for {result.steps} steps "
                         "(train with steps_range for a step-conditioned student)")
    x, nfe = _walk(student, noise, times, cond, result.afs)
    return (x, nfe) if return_nfe else x


def _walk(student, z, times, cond, afs):
    schedule = getattr(student, "schedule", None) or CosineSchedule()
    phis = [float(p) for p in schedule.phi(times)]
    nfe = 0
    for i in range(len(phis) - 1):
        if afs and i == 0:
            z = _afs_step(z, phis[0], phis[1])
            continue
        v = student(z, _model_t(times[i], z), **cond)
        nfe += 1
        z = ddim_step(z, v.to(z.dtype), phis[i], phis[i + 1])
    return (z.double() / math.cos(phis[-1])).to(z.dtype), nfe


def distill_sfd(teacher, *, student_steps: int, teacher_substeps: int = 4,
                data_shape=None, num_classes: int | None = None, label_dropout: float = 0.0,
                updates: int = 400, batch_size: int = 128, lr: float = 5e-5,
                solver: str = "dpmpp_3m", spacing: str = "edm", sigma_max: float = 80.0,
                sigma_min: float = 0.006, rho: float = 7.0, afs: bool = False,
                metric: str = "l1", huber_c: float = 0.03, loss_space: str = "ve",
                steps_range=None,
                ema_decay: float | None = None, grad_clip: float = 1.0,
                schedule: Schedule | None = None, seed: int = 0, progress: bool = True,
                checkpoint_dir=None, eval_every: int = 0, on_eval: Callable | None = None,
                device=None, student: nn.Module | None = None,
                teacher_final: Callable | None = None) -> SFDResult:
    """Distil `teacher` into a `student_steps`-NFE sampler with SFD (data-free).

    teacher: v-prediction model `teacher(z, t, **cond)` (frozen). student_steps: network
    calls per sample N (≥ 1); teacher_substeps: K solver steps per student interval (the
    teacher's multistep history carries across intervals, so K counts NFE exactly for the
    DPM-Solver++ methods); data_shape: one example's shape (inferred from a fastdiff model's
    config); num_classes: class labels to condition on (default: the teacher's), drawn
    uniformly, replaced by the null label −1 with probability `label_dropout`.
    updates: optimizer updates in total (one per interval); batch_size: trajectories per
    update; lr: AdamW learning rate (constant); solver: the teacher's method
    (`solvers.METHODS`); spacing/sigma_max/sigma_min/rho: the student grid
    (`grids.sfd_grid`); afs: analytical first step; metric: "l1" (default), "l2",
    "pseudo_huber" (with huber_c); loss_space: "ve" (default, the paper's: the metric on
    x = z/α, i.e. the VP difference divided by α at the interval's end, which up-weights the
    high-noise intervals where the sample's layout is decided) or "vp" (on z);
    steps_range: (lo, hi) for SFD-v (a `steps` condition is added to the student with
    `models.add_scalar_condition` and N ~ U{lo..hi} per trajectory); ema_decay: EMA of
    the student (None: the raw weights); eval_every/on_eval:
    `on_eval(result_so_far, update, wall_time_s)` every `eval_every` updates, its return
    value (a float) recorded in `history.eval_values`, its time excluded from the wall time;
    checkpoint_dir: the student is saved there (`fastdiff.engine.checkpoint.save`) at the end;
    teacher_final: for second-stage distillation, `teacher_final(noise, cond) -> z` at σ_min
    replaces the teacher solve (only with one network step, see `stage2`).

    Returns SFDResult(student, steps, times, afs, history, steps_range, grid).
    """
    if not isinstance(student_steps, int) or student_steps < 1:
        raise ValueError(f"student_steps must be a positive integer, got {student_steps!r}")
    if not isinstance(teacher_substeps, int) or teacher_substeps < 1:
        raise ValueError(f"teacher_substeps must be a positive integer, got {teacher_substeps!r}")
    if solver not in METHODS:
        raise ValueError(f"solver={solver!r} is not valid; expected one of {METHODS}")
    if updates < 1 or batch_size < 1:
        raise ValueError(f"updates and batch_size must be >= 1, got {updates}, {batch_size}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if loss_space not in ("ve", "vp"):
        raise ValueError(f"loss_space={loss_space!r} is not valid; expected 've' or 'vp'")
    if teacher_final is not None and student_steps != 1:
        raise ValueError("teacher_final (second stage) needs student_steps=1")
    if steps_range is not None:
        lo, hi = (int(s) for s in steps_range)
        if not 1 <= lo <= hi:
            raise ValueError(f"steps_range must be (lo, hi) with 1 <= lo <= hi, got {steps_range}")
        steps_range = (lo, hi)
    schedule = schedule or getattr(teacher, "schedule", None) or CosineSchedule()
    device = torch.device(device) if device is not None else model_device(teacher)
    shape = _infer_shape(teacher, data_shape)
    if num_classes is None:
        num_classes = int(getattr(teacher, "num_classes", 0) or 0)
    teacher = teacher.eval().requires_grad_(False) if isinstance(teacher, nn.Module) else teacher

    if student is None:
        student = copy.deepcopy(_unwrap(teacher))
    student = student.to(device).train().requires_grad_(True)
    if steps_range is not None and STEPS_COND not in getattr(student, "scalar_conds", ()):
        from fastdiff.engine.models import add_scalar_condition

        add_scalar_condition(student, STEPS_COND, scale=1.0 / steps_range[1])
    student.schedule = schedule
    opt = make_optimizer(student, lr)
    ema = EMA(student, ema_decay) if ema_decay else None
    grid_kw = dict(spacing=spacing, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    history = SFDHistory()

    def snapshot() -> SFDResult:
        model = ema.shadow if ema is not None else copy.deepcopy(student).eval()
        model.schedule = schedule
        return SFDResult(student=model, steps=student_steps,
                         times=sfd_grid(student_steps, schedule, afs=afs, **grid_kw), afs=afs,
                         history=history, steps_range=steps_range, grid=grid_kw)

    bar = Progress(updates, f"sfd {student_steps} NFE", progress)
    k, traj, spent, eval_time = 0, 0, 0.0, 0.0
    pending = []
    t_start = time.perf_counter()
    while k < updates:
        gen = _generator(seed, traj)
        traj += 1
        n = student_steps if steps_range is None else int(
            torch.randint(steps_range[0], steps_range[1] + 1, (1,), generator=gen))
        times = sfd_grid(n, schedule, afs=afs, **grid_kw)
        phis = [float(p) for p in schedule.phi(times)]
        noise = torch.randn((batch_size, *shape), generator=gen).to(device)
        cond_t = {}
        if num_classes > 0:
            y = torch.randint(0, num_classes, (batch_size,), generator=gen)
            drop = torch.rand(batch_size, generator=gen) < label_dropout
            cond_t["y"] = torch.where(drop, torch.full_like(y, -1), y).to(device)
        cond_s = dict(cond_t)
        if steps_range is not None:
            cond_s[STEPS_COND] = torch.full((batch_size,), float(n), device=device)
        f_teacher = _bind(teacher, cond_t)
        z_teacher, z_student, hist, nfe_teacher = noise, noise, [], 0
        final_target = None
        if teacher_final is not None:
            with torch.no_grad(), phase("teacher_forward"):
                final_target = teacher_final(noise, cond_t)
        for i in range(len(phis) - 1):
            if k >= updates:
                break
            if final_target is None:
                with torch.no_grad(), phase("teacher_forward"):
                    z_teacher, used = solve_interval(
                        f_teacher, z_teacher, float(times[i]), float(times[i + 1]),
                        teacher_substeps, solver, schedule=schedule, history=hist)
                nfe_teacher += used
            if afs and i == 0:
                z_student = _afs_step(z_student, phis[0], phis[1])
                continue
            target = final_target if final_target is not None else z_teacher
            with phase("student_forward"):
                v = student(z_student, _model_t(times[i], z_student), **cond_s)
            with phase("target"):
                # VE space: the rotation is linear, so scaling all three inputs by 1/α_to
                # gives the metric of (z_student − z_target)/α_to exactly.
                k_ve = 1.0 / math.cos(phis[i + 1]) if loss_space == "ve" else 1.0
                loss = sfd_loss(v * k_ve, z_student * k_ve, target * k_ve, phis[i],
                                phis[i + 1], metric, huber_c=huber_c)
            optimizer_update(loss, student, opt, ema, grad_clip)
            z_student = ddim_step(z_student, v.detach().to(z_student.dtype), phis[i],
                                  phis[i + 1])
            k += 1
            spent += batch_size
            pending.append(loss.detach())
            if len(pending) == LOG_EVERY:  # a loss read-back syncs a GPU: batch them
                flush_losses(pending, history.loss)
            bar.update(batch_size, **({"loss": history.loss[-1]} if history.loss else {}))
            if on_eval is not None and eval_every and (k % eval_every == 0 or k == updates):
                t0 = time.perf_counter()
                value = on_eval(snapshot(), k, t0 - t_start - eval_time)
                history.eval_updates.append(k)
                history.eval_times.append(t0 - t_start - eval_time)
                history.eval_values.append(value)
                student.train()
                eval_time += time.perf_counter() - t0
        history.teacher_nfe = max(history.teacher_nfe, nfe_teacher)
    flush_losses(pending, history.loss)
    bar.close()
    history.updates_done = k
    history.wall_time = time.perf_counter() - t_start - eval_time
    history.samples_per_s = spent / max(history.wall_time, 1e-9)
    result = snapshot()
    if checkpoint_dir is not None:
        from pathlib import Path

        from fastdiff.engine.checkpoint import save

        save(result.student, Path(checkpoint_dir) / f"sfd-{student_steps}-nfe",
             metadata={"times": [float(t) for t in result.times], "afs": afs,
                       "steps_range": list(steps_range) if steps_range else None, **grid_kw})
    return result


def stage2(stage1: SFDResult, *, afs: bool | None = None, stage1_steps: int | None = None,
           **kwargs) -> SFDResult:
    """Second-stage SFD for 1 NFE: the first-stage student (sampled on its own grid) is the
    teacher; the one-step student starts from its weights. `afs` defaults to stage 1's;
    other keywords go to `distill_sfd` (updates, batch_size, lr, metric, ...)."""
    afs = stage1.afs if afs is None else afs

    def teacher_final(noise, cond):
        schedule = getattr(stage1.student, "schedule", None) or CosineSchedule()
        x = sample_sfd(stage1, noise, steps=stage1_steps, cond=cond)
        # back to the state z at σ_min (sample_sfd returns x = z/α there)
        return x * math.cos(float(schedule.phi(stage1.times[-1])))

    grid = {k: v for k, v in stage1.grid.items() if k not in kwargs}
    return distill_sfd(stage1.student, student_steps=1, afs=afs, teacher_final=teacher_final,
                       student=copy.deepcopy(stage1.student), **grid, **kwargs)
