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
over N + 1 intervals; the teacher still solves that interval, within the trajectory's first
update), `steps_range` (SFD-v: a `steps` scalar condition, zero-initialised, with N drawn
per trajectory), and `stage2` (1 NFE, with a first-stage student as the teacher).

Training runs on the shared runner (`fastdiff.training.runner`): it owns the optimizer
(AdamW, constant LR), clipping, the EMA, the non-finite guard, checkpoints and resume, the
evaluation clock and data parallelism. SFD's part is `_SFDMethod`: a trajectory spans N
updates, so the trajectory in progress (both states, the teacher's multistep history, the
interval, stage 2's target) is state the method carries across updates and into
checkpoints (`Method.carry`/`restore`): a run killed mid-trajectory resumes bit-exactly. A
trajectory's randomness (N for SFD-v, noise, labels) is drawn for the global batch from the
generator of the update that starts it (`runner.update_generator(seed, name, k)`); under
torchrun each rank solves the teacher on its slice of the trajectory batch.

Sample a student with `sample_sfd(result, noise, cond=...)` (it knows the grid and AFS) or
`solvers.dpmpp_sample(f, noise, steps, order=1, times=result.times, afs=result.afs)`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fastdiff.engine.grids import sfd_grid
from fastdiff.engine.models import add_scalar_condition, checked_output
from fastdiff.engine.nvtx import phase
from fastdiff.engine.parallel import all_gather_cat
from fastdiff.engine.schedules import CosineSchedule, Schedule
from fastdiff.engine.solvers import METHODS, afs_x_hat, dpmpp_update, solve_interval
from fastdiff.kernels import ddim_step
from fastdiff.kernels.sfd_loss import sfd_loss
from fastdiff.training.parts import _unwrap, model_device
from fastdiff.training.runner import (
    History,
    Method,
    RunConfig,
    fingerprint_tensors,
    frozen_teacher_and_student,
    run,
)

STEPS_COND = "steps"
METRICS = ("l1", "l2", "pseudo_huber")


@dataclass
class SFDHistory(History):
    """A run's history (`runner.History`: loss per update, None where skipped; skipped;
    eval_updates / eval_times / heldout; wall_time, evaluations excluded; samples_per_s in
    trajectories × intervals per second; resumed_from; ...). `eval_values` are the values
    `on_eval` returned (`heldout`); `initial` stays None (on_eval never sees the untrained
    student); teacher_nfe: teacher network calls per trajectory (the most of any)."""

    teacher_nfe: int = 0

    @property
    def eval_values(self) -> list:
        return self.heldout


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


@dataclass
class SFDBatch:
    """One update's inputs. At a trajectory's first update: its noise (B, ...) at σ_max and
    labels (B,) int64 (−1 = null label; None without classes), for the global batch (the
    runner keeps this rank's slice); None on its later updates, whose inputs are the carried
    trajectory. steps: the trajectory's N."""

    noise: torch.Tensor | None
    y: torch.Tensor | None
    steps: int


def _bind(model, cond: dict) -> Callable:
    return lambda z, t: model(z, t, **cond)


def _model_t(t: float, z: torch.Tensor) -> torch.Tensor:
    return torch.full((z.shape[0],), float(t), dtype=torch.float32, device=z.device)


def _afs_step(z: torch.Tensor, phi_from: float, phi_to: float) -> torch.Tensor:
    return dpmpp_update(z, phi_from, phi_to, [(math.nan, afs_x_hat(z, phi_from))], 1)


def _infer_shape(teacher, data_shape):
    if data_shape is not None:
        return tuple(int(s) for s in data_shape)
    shape = getattr(_unwrap(teacher), "example_shape", None)  # e.g. a diffusers UNet's
    if shape is not None:
        return tuple(int(s) for s in shape)
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


class _Trajectory:
    """This rank's trajectory in progress: its N and grid, the next interval `i`, the
    teacher's state and DPM-Solver++ history (ℓ, x̂ float64), the student's state, the
    labels and (stage 2) the final target; nfe: teacher calls so far."""

    def __init__(self, n: int, times: torch.Tensor, phis: list, z: torch.Tensor,
                 y: torch.Tensor | None, final: torch.Tensor | None):
        self.n, self.times, self.phis = n, times, phis
        self.i, self.nfe = 0, 0
        self.z_teacher = z if final is None else None
        self.z_student = z
        self.hist: list = []
        self.y, self.final = y, final

    @property
    def done(self) -> bool:
        return self.i >= len(self.phis) - 1


class _SFDMethod:
    """SFD as the runner's method: `draw`, `loss`, `measure`, `carry` and `restore` over
    one trajectory in progress (see the module docstring)."""

    def __init__(self, teacher, student, *, shape, num_classes, label_dropout, student_steps,
                 steps_range, teacher_substeps, solver, schedule, grid_kw, afs, metric,
                 huber_c, loss_space, teacher_final, device, rank, world_size,
                 gather_at: Callable[[int], bool], on_eval, history: SFDHistory,
                 conds: dict | None = None, null_conds: dict | None = None):
        self.teacher, self.student = teacher, student
        # a table of conditions {keyword: (P, ...)}: a trajectory's "label" y indexes it
        self.table = {k: v.to(device) for k, v in (conds or {}).items()}
        self.nulls = {k: null_conds[k].to(device) for k in self.table}
        self.shape, self.num_classes, self.label_dropout = shape, num_classes, label_dropout
        self.student_steps, self.steps_range = student_steps, steps_range
        self.substeps, self.solver, self.schedule = teacher_substeps, solver, schedule
        self.grid_kw, self.afs, self.metric, self.huber_c = grid_kw, afs, metric, huber_c
        self.loss_space, self.teacher_final = loss_space, teacher_final
        self.device, self.rank, self.world = device, rank, world_size
        self.gather_at, self.on_eval, self.history = gather_at, on_eval, history
        self.k = 0                    # the next update
        self.teacher_nfe = 0          # the most teacher calls of any trajectory
        self.traj: _Trajectory | None = None
        self.t0: float | None = None  # this process's training clock (evaluations excluded)
        self.offset = 0.0             # training time before a resume
        self.saved: dict | None = None  # the gathered state for rank 0's checkpoint

    # -- the runner's hooks -------------------------------------------------------------
    def draw(self, gen: torch.Generator, n: int) -> SFDBatch:
        if self.t0 is None:
            self.t0 = time.perf_counter() - self.offset
        if self.traj is not None and not self.traj.done:
            return SFDBatch(noise=None, y=None, steps=self.traj.n)
        steps = self.student_steps if self.steps_range is None else int(
            torch.randint(self.steps_range[0], self.steps_range[1] + 1, (1,), generator=gen))
        noise = torch.randn((n, *self.shape), generator=gen)
        y = None
        if self.num_classes > 0:
            y = torch.randint(0, self.num_classes, (n,), generator=gen)
            drop = torch.rand(n, generator=gen) < self.label_dropout
            y = torch.where(drop, torch.full_like(y, -1), y)
        return SFDBatch(noise=noise, y=y, steps=steps)

    def loss(self, model, batch: SFDBatch, teacher=None) -> torch.Tensor:
        if teacher is not None:   # the teacher as the runner's policy prepared it
            self.teacher = teacher
        if batch.noise is not None:
            self._start(batch)
        tr = self.traj
        if self.afs and tr.i == 0:  # the analytical first step: no student call, no update
            self._teacher_interval(tr, 0)
            tr.z_student = _afs_step(tr.z_student, tr.phis[0], tr.phis[1])
            tr.i = 1
        i, z, phis = tr.i, tr.z_student, tr.phis
        self._teacher_interval(tr, i)
        target = tr.final if tr.final is not None else tr.z_teacher
        with phase("student_forward"):
            v = model(z, _model_t(tr.times[i], z), **self._student_cond(tr)).to(z.dtype)
        with phase("target"):
            # VE space: the rotation is linear, so scaling all three inputs by 1/α_to
            # gives the metric of (z_student − z_target)/α_to exactly.
            k_ve = 1.0 / math.cos(phis[i + 1]) if self.loss_space == "ve" else 1.0
            loss = sfd_loss(v * k_ve, z * k_ve, target * k_ve, phis[i], phis[i + 1],
                            self.metric, huber_c=self.huber_c)
        tr.z_student = ddim_step(z, v.detach(), phis[i], phis[i + 1])
        tr.i = i + 1
        self.k += 1
        if self.gather_at(self.k):  # rank 0's checkpoint after this update holds every slice
            self.saved = self._state(gather=True)
        return loss

    def inputs(self, batch: SFDBatch):
        """One teacher / student call at a trajectory's start (for the runner's policy);
        None mid-trajectory (a resumed run)."""
        if batch.noise is None:
            return None
        t = torch.ones(batch.noise.shape[0], device=batch.noise.device)
        call = ((batch.noise, t), self._teacher_cond(batch.y))
        student_cond = dict(call[1])
        if self.steps_range is not None:
            student_cond[STEPS_COND] = torch.full_like(t, float(batch.steps))
        return call, (call[0], student_cond)

    def measure(self, model) -> float:
        if self.t0 is None:  # the runner's measure of the untrained student: SFD takes none
            return math.nan
        t_eval = time.perf_counter()
        snapshot = copy.deepcopy(model) if model is self.student else model
        value = self.on_eval(self.result(snapshot), self.k, t_eval - self.t0)
        self.t0 += time.perf_counter() - t_eval
        return math.nan if value is None else float(value)

    def carry(self) -> dict:
        state = self.saved if self.world > 1 else self._state(gather=False)
        if state is None or int(state["k"]) != self.k:
            raise RuntimeError(f"sfd: no gathered trajectory state for update {self.k}")
        clock = time.perf_counter() - self.t0 if self.t0 is not None else self.offset
        return {**state, "clock": torch.tensor(clock, dtype=torch.float64)}

    def restore(self, state: dict) -> None:
        self.k, self.teacher_nfe = int(state["k"]), int(state["teacher_nfe"])
        self.offset = float(state["clock"])
        self.traj = None
        if "n" not in state:
            return

        def part(x):  # this rank's slice of the global trajectory batch
            per = x.shape[0] // self.world
            return x[self.rank * per:(self.rank + 1) * per].to(self.device)

        n = int(state["n"])
        tr = _Trajectory(n, *self._grid(n), part(state["z_student"]),
                         part(state["y"]) if "y" in state else None,
                         part(state["final"]) if "final" in state else None)
        tr.i, tr.nfe = int(state["i"]), int(state["nfe"])
        if "z_teacher" in state:
            tr.z_teacher = part(state["z_teacher"])
        tr.hist = [(ell, part(x)) for ell, x in zip(state["hist_ell"].tolist(),
                                                    state["hist_x"])]
        self.traj = tr

    # -- helpers ------------------------------------------------------------------------
    def result(self, model: nn.Module) -> SFDResult:
        model.schedule = self.schedule
        return SFDResult(student=model, steps=self.student_steps,
                         times=sfd_grid(self.student_steps, self.schedule, afs=self.afs,
                                        **self.grid_kw),
                         afs=self.afs, history=self.history, steps_range=self.steps_range,
                         grid=self.grid_kw)

    def _grid(self, n: int):
        times = sfd_grid(n, self.schedule, afs=self.afs, **self.grid_kw)
        return times, [float(p) for p in self.schedule.phi(times)]

    def _start(self, batch: SFDBatch) -> None:
        final = None
        if self.teacher_final is not None:
            with torch.no_grad(), phase("teacher_forward"):
                final = self.teacher_final(batch.noise, self._teacher_cond(batch.y))
        self.traj = _Trajectory(batch.steps, *self._grid(batch.steps), batch.noise, batch.y,
                                final)

    def _teacher_cond(self, y) -> dict:
        if y is None:
            return {}
        if not self.table:
            return {"y": y}
        out = {}
        for k, table in self.table.items():   # y = −1: the null condition
            rows = table[y.clamp(min=0)]
            keep = (y >= 0).reshape(-1, *([1] * (rows.ndim - 1)))
            out[k] = torch.where(keep, rows, self.nulls[k].expand_as(rows))
        return out

    def _student_cond(self, tr: _Trajectory) -> dict:
        cond = self._teacher_cond(tr.y)
        if self.steps_range is not None:
            z = tr.z_student
            cond[STEPS_COND] = torch.full((z.shape[0],), float(tr.n), device=z.device)
        return cond

    def _teacher_interval(self, tr: _Trajectory, i: int) -> None:
        if tr.final is not None:
            return
        with torch.no_grad(), phase("teacher_forward"):
            tr.z_teacher, used = solve_interval(
                _bind(self.teacher, self._teacher_cond(tr.y)), tr.z_teacher,
                float(tr.times[i]), float(tr.times[i + 1]), self.substeps, self.solver,
                schedule=self.schedule, history=tr.hist)
        tr.nfe += used
        self.teacher_nfe = max(self.teacher_nfe, tr.nfe)

    def _state(self, *, gather: bool) -> dict:
        """What resumes the run: the update, the NFE count and, mid-trajectory, the
        trajectory (its batch tensors gathered over ranks when `gather`)."""
        g = all_gather_cat if gather and self.world > 1 else (lambda x: x)
        state = {"k": torch.tensor(self.k), "teacher_nfe": torch.tensor(self.teacher_nfe)}
        tr = self.traj
        if tr is None or tr.done:
            return state
        state.update(n=torch.tensor(tr.n), i=torch.tensor(tr.i), nfe=torch.tensor(tr.nfe),
                     z_student=g(tr.z_student),
                     hist_ell=torch.tensor([e for e, _ in tr.hist], dtype=torch.float64),
                     hist_x=[g(x) for _, x in tr.hist])
        for name in ("z_teacher", "y", "final"):
            if getattr(tr, name) is not None:
                state[name] = g(getattr(tr, name))
        return state


def _state_path(checkpoint_dir, student_steps: int, stage2: bool) -> Path:
    return Path(checkpoint_dir) / f"sfd-{student_steps}{'-stage2' if stage2 else ''}.state"


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
                teacher_final: Callable | None = None, checkpoint_every: int = 200,
                autocast="fp32", compile: bool | str = False, policy=None, rank: int = 0,
                world_size: int = 1, wrap_student=None, max_skips: int = 20,
                extra_settings: dict | None = None, conds: dict | None = None,
                null_conds: dict | None = None) -> SFDResult:
    """Distil `teacher` into a `student_steps`-NFE sampler with SFD (data-free).

    teacher: v-prediction model `teacher(z, t, **cond)` (frozen). student_steps: network
    calls per sample N (≥ 1); teacher_substeps: K solver steps per student interval (the
    teacher's multistep history carries across intervals, so K counts NFE exactly for the
    DPM-Solver++ methods); data_shape: one example's shape (inferred from a fastdiff model's
    config, or a diffusers teacher's `example_shape`); num_classes: class labels to condition
    on (default: the teacher's), drawn uniformly, replaced by the null label −1 with
    probability `label_dropout`. conds / null_conds: instead of labels, a table of
    conditions {keyword: float (P, ...)} and their null {keyword: (...)} (e.g. prompt
    embeddings `encoder_hidden_states` (P, L, D) and the negative prompt's (L, D), from a
    Dataset's `train_conds` / `null_conds`): each trajectory draws one row uniformly (the
    null with probability `label_dropout`) and passes it to teacher and student; SFD needs
    no examples, only these.
    updates: optimizer updates in total (one per interval); batch_size: trajectories per
    update (the global batch across ranks); lr: AdamW learning rate (constant); solver: the
    teacher's method (`solvers.METHODS`); spacing/sigma_max/sigma_min/rho: the student grid
    (`grids.sfd_grid`); afs: analytical first step; metric: "l1" (default), "l2",
    "pseudo_huber" (with huber_c); loss_space: "ve" (default, the paper's: the metric on
    x = z/α, i.e. the VP difference divided by α at the interval's end, which up-weights the
    high-noise intervals where the sample's layout is decided) or "vp" (on z);
    steps_range: (lo, hi) for SFD-v (a `steps` condition is added to the student with
    `models.add_scalar_condition` and N ~ U{lo..hi} per trajectory); ema_decay: EMA of
    the student (None: the raw weights); eval_every/on_eval:
    `on_eval(result_so_far, update, wall_time_s)` every `eval_every` updates and at the
    end, its return value (a float) recorded in `history.eval_values`, its time excluded
    from the wall time (`history.eval_times` holds the training time of each);
    checkpoint_dir: the training state (student, EMA, optimizer, RNG and the trajectory in
    progress) is written atomically to `checkpoint_dir/sfd-<N>.state` (`sfd-1-stage2.state`
    for the second stage) every `checkpoint_every` updates and at the end, and a rerun with
    the same settings (teacher weights included) resumes from it, bit-exactly, or returns
    the finished result; the student is also saved as `checkpoint_dir/sfd-<N>-nfe`
    (`fastdiff.engine.checkpoint.save`) at the end;
    teacher_final: for second-stage distillation, `teacher_final(noise, cond) -> z` at σ_min
    replaces the teacher solve (only with one network step, see `stage2`); extra_settings:
    what defines it, for the checkpoint's fingerprint.
    autocast: "fp32" (default: the trajectories are solved in full precision), "bf16" or
    None (bf16 where CUDA has it); compile: torch.compile the student; policy: the
    teacher / student precision and compile policy (`RunConfig.policy`); rank, world_size,
    wrap_student: data parallelism (`fastdiff.training.runner`); max_skips: consecutive
    non-finite updates (each skipped) before `NonFiniteError`. A non-finite teacher output
    spoils the rest of its trajectory: those updates are skipped too, and the next
    trajectory starts clean.

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
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is not valid; expected one of {METRICS}")
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
    conds = {k: torch.as_tensor(v).float() for k, v in (conds or {}).items()}
    if conds:
        sizes = {len(v) for v in conds.values()}
        if len(sizes) != 1 or not min(sizes):
            raise ValueError(f"conds must hold one non-empty table per keyword, all with the "
                             f"same number of rows; got {sorted(sizes)}")
        if num_classes is not None:
            raise ValueError("give num_classes (labels) or conds (a table of conditions), "
                             "not both")
        null_conds = {k: torch.as_tensor(null_conds[k]).float() if null_conds and
                      k in null_conds else torch.zeros(v.shape[1:]) for k, v in conds.items()}
        num_classes = sizes.pop()   # trajectories draw a row index like a label
    if num_classes is None:
        num_classes = int(getattr(teacher, "num_classes", 0) or 0)
    teacher_module, student, start_from = frozen_teacher_and_student(teacher, student)
    if steps_range is not None and STEPS_COND not in getattr(student, "scalar_conds", ()):
        add_scalar_condition(student, STEPS_COND, scale=1.0 / steps_range[1])
    student.schedule = schedule
    grid_kw = dict(spacing=spacing, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    stage_two = teacher_final is not None
    state_path = _state_path(checkpoint_dir, student_steps, stage_two) \
        if checkpoint_dir is not None else None
    evaluate = on_eval is not None and bool(eval_every)

    def gather_at(k: int) -> bool:
        return state_path is not None and world_size > 1 and (
            k % checkpoint_every == 0 or k == updates)

    history = SFDHistory()
    teacher = checked_output(teacher, "teacher")
    sfd = _SFDMethod(teacher, student, shape=shape, num_classes=num_classes,
                     label_dropout=label_dropout, student_steps=student_steps,
                     steps_range=steps_range, teacher_substeps=teacher_substeps, solver=solver,
                     schedule=schedule, grid_kw=grid_kw, afs=afs, metric=metric,
                     huber_c=huber_c, loss_space=loss_space, teacher_final=teacher_final,
                     device=device, rank=rank, world_size=world_size, gather_at=gather_at,
                     on_eval=on_eval, history=history, conds=conds, null_conds=null_conds)
    settings = {"student_steps": student_steps, "teacher_substeps": teacher_substeps,
                "data_shape": list(shape), "num_classes": num_classes,
                "label_dropout": label_dropout, "solver": solver, "grid": grid_kw, "afs": afs,
                "metric": metric, "huber_c": huber_c, "loss_space": loss_space,
                "steps_range": list(steps_range) if steps_range else None,
                "schedule": schedule.config, "teacher_final": stage_two,
                "extra": extra_settings or {},
                "teacher": fingerprint_tensors(teacher_module) if teacher_module is not None
                else type(teacher).__name__,
                "student": start_from}
    if conds:
        settings["conds"] = fingerprint_tensors(*conds.values(), *null_conds.values())
    name = f"sfd{student_steps}" + ("v" if steps_range else "") + ("-stage2" if stage_two
                                                                    else "")
    method = Method(name=name, student=student, draw=sfd.draw, loss=sfd.loss,
                    settings=settings, measure=sfd.measure if evaluate else None,
                    carry=sfd.carry, restore=sfd.restore,
                    teacher=teacher_module if teacher_module is not None and not stage_two
                    else None, teacher_calls=teacher_substeps, inputs=sfd.inputs)
    config = RunConfig(
        updates=updates, batch_size=batch_size, lr=lr, decay="constant",
        ema_decay=ema_decay or None, grad_clip=grad_clip, seed=seed,
        eval_every=eval_every if evaluate else updates, checkpoint=state_path,
        checkpoint_every=checkpoint_every, max_skips=max_skips, autocast=autocast,
        compile=compile, policy=policy, progress=progress, rank=rank, world_size=world_size,
        wrap_student=wrap_student, device=device)
    done = run(method, config, history=history)
    h = done.history
    h.initial, h.teacher_nfe = None, sfd.teacher_nfe
    result = sfd.result(done.student)
    result.history = h
    if checkpoint_dir is not None and rank == 0:
        from fastdiff.engine.checkpoint import save

        with phase("checkpoint"):
            save(result.student, Path(checkpoint_dir) / f"sfd-{student_steps}-nfe",
                 metadata={"times": [float(t) for t in result.times], "afs": afs,
                           "steps_range": list(steps_range) if steps_range else None,
                           **grid_kw})
    return result


def stage2(stage1: SFDResult, *, afs: bool | None = None, stage1_steps: int | None = None,
           **kwargs) -> SFDResult:
    """Second-stage SFD for 1 NFE: the first-stage student (sampled on its own grid) is the
    teacher; the one-step student starts from its weights. `afs` defaults to stage 1's;
    other keywords go to `distill_sfd` (updates, batch_size, lr, metric, checkpoint_dir,
    ...)."""
    afs = stage1.afs if afs is None else afs

    def teacher_final(noise, cond):
        schedule = getattr(stage1.student, "schedule", None) or CosineSchedule()
        x = sample_sfd(stage1, noise, steps=stage1_steps, cond=cond)
        # back to the state z at σ_min (sample_sfd returns x = z/α there)
        return x * math.cos(float(schedule.phi(stage1.times[-1])))

    grid = {k: v for k, v in stage1.grid.items() if k not in kwargs}
    extra = {"stage1_steps": stage1_steps, "stage1_afs": stage1.afs,
             "stage1_times": [float(t) for t in stage1.times],
             "stage1_steps_range": list(stage1.steps_range) if stage1.steps_range else None,
             "stage1_grid": stage1.grid, **(kwargs.pop("extra_settings", None) or {})}
    return distill_sfd(stage1.student, student_steps=1, afs=afs, teacher_final=teacher_final,
                       student=copy.deepcopy(stage1.student), extra_settings=extra,
                       **grid, **kwargs)
