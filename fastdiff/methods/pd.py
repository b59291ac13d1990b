"""Progressive distillation (Salimans & Ho, ICLR 2022).

One round (`distill_round`) trains a student that takes N = teacher_steps / 2 DDIM steps to
match 2N steps of the teacher: for t = i/N, t' = t − ½/N, t'' = t − 1/N,

    z_t  = α_t x + σ_t ε
    v̂₁   = teacher(z_t, t);        z_t' = rot(z_t, v̂₁, φ_t' − φ_t)
    v̂₂   = teacher(z_t', t')
    ṽ    = (sin Δ₁ sin Δ₂ z_t + cos Δ₂ sin Δ₁ v̂₁ + sin Δ₂ v̂₂) / sin Δ    (fastdiff.kernels)
    L    = mean_b w_b · mean (v̂_θ(z_t, t) − ṽ)²

and `progressive_distill` repeats rounds, each student becoming the next teacher.

Every update's randomness (batch indices, i, ε, label dropout) is a pure function of
(seed, round, update index), drawn for the global batch and sliced per rank. Resuming from a
checkpoint therefore needs no iterator state, and a job on K ranks sees the same examples as
one process with the same global batch.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from fastdiff.engine.models import checked_output
from fastdiff.engine.nvtx import phase
from fastdiff.engine.schedules import CosineSchedule, Schedule, per_sample
from fastdiff.kernels import ddim_step, distill_loss, fused_pd_loss, pd_target
from fastdiff.training.parts import autocast_for, model_device
from fastdiff.training.policy import describe
from fastdiff.training.runner import (
    History,
    Method,
    RunConfig,
    check_fingerprint,
    fingerprint_tensors,
    frozen_teacher_and_student,
    json_safe,
    run,
    update_generator,
)

WEIGHTINGS = ("snr_trunc", "snr+1", "const")




@dataclass
class RoundHistory(History):
    """A round's history (`runner.History`); `heldout` is the EMA student's weighted
    mismatch against two teacher steps on held-out z_t, `initial` the untrained copy's."""

    @property
    def heldout_mismatch(self) -> list:
        return self.heldout

    @property
    def initial_mismatch(self) -> float:
        return float("nan") if self.initial is None else self.initial


@dataclass
class RoundResult:
    student: nn.Module      # EMA weights, eval mode
    steps: int              # the DDIM step count the student samples with
    teacher_steps: int
    history: RoundHistory


def round_summary(result: RoundResult) -> str:
    """One line on a finished round: updates, wall time, held-out mismatch, why it ended."""
    h = result.history
    line = (f"round {result.teacher_steps} -> {result.steps} steps: {h.updates_done} updates, "
            f"{h.wall_time:.0f} s, held-out mismatch {h.initial_mismatch:.4g} -> "
            f"{(h.heldout_mismatch or [float('nan')])[-1]:.4g}, ended by {h.stopped_by}")
    line += f" (resumed from update {h.resumed_from})" if h.resumed_from else ""
    return line + f"; {describe(h.policy)}" if h.policy.get("decided") else line


def _is_pow2(n) -> bool:
    return isinstance(n, int) and n >= 1 and (n & (n - 1)) == 0




@dataclass
class PDBatch:
    """One update's inputs. z_t, x: (B, ...); t: (B,) float64; y: (B,) int64 or None."""

    z_t: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor | None
    extra: dict = field(default_factory=dict)  # further conditions, e.g. {"w": (B,)}

    @property
    def cond(self) -> dict:
        return self.extra if self.y is None else {"y": self.y, **self.extra}


def draw_batch(examples, labels, student_steps: int, global_batch: int, gen, schedule,
               *, label_dropout: float, use_labels: bool, rank: int = 0, world: int = 1,
               device=None, extra_cond=None, conds=None, null_conds=None) -> PDBatch:
    """Draw the global batch's randomness from `gen` and keep this rank's slice.

    extra_cond: optional `f(generator, n) -> {name: tensor (n,)}` drawing further conditions
    for the global batch (e.g. a guidance weight w per example), passed to teacher and student.
    conds: optional per-example condition tensors {keyword: (N, ...)} (a Dataset's
    `train_conds`, e.g. text embeddings), indexed like `examples`; a dropped example
    (label_dropout) gets `null_conds[keyword]` (...) instead. No extra random draws.
    """
    n = examples.shape[0]
    idx = torch.randint(0, n, (global_batch,), generator=gen)
    i = torch.randint(1, student_steps + 1, (global_batch,), generator=gen)
    eps = torch.randn((global_batch, *examples.shape[1:]), generator=gen)
    drop = torch.rand(global_batch, generator=gen) < label_dropout
    per = global_batch // world
    sl = slice(rank * per, (rank + 1) * per)
    x = examples[idx[sl]].to(device)
    t = (i[sl].to(torch.float64) / student_steps).to(device)
    e = eps[sl].to(device=device, dtype=x.dtype)
    z_t = per_sample(schedule.alpha(t), x) * x + per_sample(schedule.sigma(t), x) * e
    y = None
    if use_labels and labels is not None:
        y = torch.where(drop[sl], torch.full_like(labels[idx[sl]], -1), labels[idx[sl]]).to(device)
    extra = {}
    for k, v in (conds or {}).items():
        c = v[idx[sl]]
        if null_conds and k in null_conds:
            keep = per_sample(~drop[sl], c).bool()
            c = torch.where(keep, c, null_conds[k].to(c.dtype).expand_as(c))
        extra[k] = c.to(device)
    if extra_cond is not None:
        extra.update({k: v[sl].to(device) for k, v in extra_cond(gen, global_batch).items()})
    return PDBatch(z_t=z_t, t=t, y=y, extra=extra)


def student_times(t: torch.Tensor, student_steps: int):
    """t' = t − ½/N and t'' = t − 1/N (N = student steps): the teacher's two half steps."""
    return t - 0.5 / student_steps, t - 1.0 / student_steps


@torch.no_grad()
def teacher_velocities(teacher, batch: PDBatch, student_steps: int, schedule: Schedule, autocast):
    """Two DDIM steps of the teacher from z_t: returns (v̂₁, v̂₂, φ_t, φ_t', φ_t'')."""
    t_mid, t_end = student_times(batch.t, student_steps)
    phi_t, phi_mid, phi_end = schedule.phi(batch.t), schedule.phi(t_mid), schedule.phi(t_end)
    cond = batch.cond
    with phase("teacher_forward"), autocast:
        v1 = teacher(batch.z_t, batch.t.float(), **cond).to(batch.z_t.dtype)
    z_mid = ddim_step(batch.z_t, v1, phi_t, phi_mid)
    with phase("teacher_forward"), autocast:
        v2 = teacher(z_mid, t_mid.float(), **cond).to(batch.z_t.dtype)
    return v1, v2, phi_t, phi_mid, phi_end


def pd_update(student, teacher, batch: PDBatch, student_steps: int, schedule: Schedule, *,
              weighting: str, autocast) -> torch.Tensor:
    """The loss of one PD update (forward only; the caller runs backward)."""
    v1, v2, phi_t, phi_mid, phi_end = teacher_velocities(teacher, batch, student_steps,
                                                         schedule, autocast)
    cond = batch.cond
    with phase("student_forward"), autocast:
        v_student = student(batch.z_t, batch.t.float(), **cond)
    with phase("target"):
        return fused_pd_loss(v_student.to(batch.z_t.dtype), batch.z_t, v1, v2, phi_t, phi_mid,
                             phi_end, weighting=weighting)


class HeldOut:
    """Fixed held-out z_t with the teacher's two-step target ṽ computed once.

    `mismatch(model)` is the weighted v-space error of one student step against two teacher
    steps (the training loss on data the student never sees).
    """

    def __init__(self, teacher, dataset, student_steps: int, schedule: Schedule, *, size: int,
                 seed: int, weighting: str, device, use_labels: bool, extra_cond=None):
        x, y = dataset.held_out, dataset.held_out_labels
        size = min(size, len(x))
        gen = update_generator(seed, "heldout", student_steps)
        conds = {k: v[:size] for k, v in getattr(dataset, "held_out_conds", {}).items()}
        batch = draw_batch(x[:size], None if y is None else y[:size], student_steps, size, gen,
                           schedule, label_dropout=0.0, use_labels=use_labels, device=device,
                           extra_cond=extra_cond, conds=conds)
        self.batch = batch
        self.weighting = weighting
        v1, v2, phi_t, phi_mid, phi_end = teacher_velocities(
            teacher, batch, student_steps, schedule, autocast_for(torch.device(device), False))
        self.phi_t = phi_t
        self.target = pd_target(batch.z_t, v1, v2, phi_t, phi_mid, phi_end)

    @torch.no_grad()
    def mismatch(self, model) -> float:
        cond = self.batch.cond
        v = model(self.batch.z_t, self.batch.t.float(), **cond)
        return float(distill_loss(v.to(self.target.dtype), self.target, self.phi_t,
                                  weighting=self.weighting))


def _state_path(checkpoint_dir, teacher_steps: int) -> Path:
    return Path(checkpoint_dir) / f"round-{teacher_steps:05d}-to-{teacher_steps // 2:05d}.state"


def distill_round(teacher, data, *, teacher_steps: int, updates: int = 2000,
                  batch_size: int = 128, lr: float = 1e-4, weighting: str = "snr_trunc",
                  ema_decay: float = 0.995, grad_clip: float = 1.0, label_dropout: float = 0.1,
                  warmup: int = 0, schedule: Schedule | None = None, autocast=None,
                  compile: bool = False, policy=None, seed: int = 0, tolerance: float | None = None,
                  patience: int = 3, eval_every: int = 100, heldout_size: int = 512,
                  checkpoint_dir=None, checkpoint_every: int = 200, progress: bool = True,
                  device=None, student: nn.Module | None = None, rank: int = 0,
                  world_size: int = 1, wrap_student=None, on_eval=None,
                  extra_cond=None, extra_settings: dict | None = None,
                  max_skips: int = 20, horizon: int | None = None) -> RoundResult:
    """One halving of progressive distillation: a student for teacher_steps / 2 DDIM steps.

    Args:
        teacher: v-prediction model `teacher(z, t, **cond)` (frozen; never gets gradients).
        data: tensor (N, ...), (examples, labels), a Dataset or a dataset name.
        teacher_steps: the teacher's step count 2N (even, ≥ 2).
        updates: the most optimizer updates this round takes; batch_size: examples per
            update (the global batch across ranks); lr: AdamW peak learning rate, annealed
            linearly to 0 over the round (the paper's recipe; the optimizer is fresh each
            round); weighting: "snr_trunc" (default), "snr+1" or "const" (DESIGN.md §2).
        tolerance, patience, eval_every: with `tolerance` set, the held-out mismatch (EMA
            student, every `eval_every` updates) must improve by a relative `tolerance` over
            its best within `patience` evals, or the round stops early
            (`history.stopped_by == "converged"`).
        checkpoint_dir: the round state (student, EMA, optimizer, RNG, position) is written
            atomically there every `checkpoint_every` updates and at the end, and a rerun with
            the same settings (teacher weights and data included) resumes from it.
        extra_cond: optional `f(generator, n) -> {name: tensor (n,)}` drawing further
            per-example conditions each update (guided stage 2 draws w ~ U[w_min, w_max]);
            extra_settings: what defines it, for the fingerprint.
        rank, world_size, wrap_student: data parallelism (`fastdiff.training.runner`).
        max_skips: consecutive non-finite updates (each skipped) before `NonFiniteError`.
        policy: precision / compile choices for the frozen teacher and the student (None or
            "auto": decided from the device and a short measurement, "off": plain eager
            fp32, or a `fastdiff.training.policy.Policy` / dict forcing some; see
            `RunConfig.policy`); what was chosen and why is in `history.policy`.
            autocast ("bf16"/"fp32") and compile (True) force the same choices.
        horizon: the updates this round and the later rounds of the same architecture will
            take in this process (`progressive_distill` passes the rounds left), over which
            the policy may spread a teacher compile that the later rounds reuse
            (`RunConfig.horizon`); None: this round only.

    Returns RoundResult(student = EMA weights, steps = teacher_steps // 2, teacher_steps,
    history).
    """
    plan = _round_plan(teacher, data, teacher_steps=teacher_steps, weighting=weighting,
                       label_dropout=label_dropout, schedule=schedule, seed=seed,
                       heldout_size=heldout_size, device=device, student=student,
                       extra_cond=extra_cond, extra_settings=extra_settings)
    config = RunConfig(
        updates=updates, batch_size=batch_size, lr=lr, warmup=warmup, ema_decay=ema_decay,
        grad_clip=grad_clip, seed=seed, eval_every=eval_every, tolerance=tolerance,
        patience=patience, checkpoint_every=checkpoint_every, max_skips=max_skips,
        checkpoint=_state_path(checkpoint_dir, teacher_steps) if checkpoint_dir else None,
        autocast=autocast, compile=compile, policy=policy, progress=progress, rank=rank,
        world_size=world_size, wrap_student=wrap_student, device=plan.device,
        on_eval=on_eval, horizon=horizon)
    result = run(plan.method, config, history=RoundHistory())
    out = result.student
    out.schedule = plan.schedule
    out.sample_steps = teacher_steps // 2
    return RoundResult(student=out, steps=teacher_steps // 2, teacher_steps=teacher_steps,
                       history=result.history)


@dataclass
class _Plan:
    method: Method
    schedule: Schedule
    device: torch.device


def _round_plan(teacher, data, *, teacher_steps, weighting, label_dropout, schedule, seed,
                heldout_size, device, student, extra_cond, extra_settings) -> _Plan:
    """The round as a runner `Method` (its draw, loss, held-out measure and settings)."""
    from fastdiff.engine.data import as_dataset

    if not isinstance(teacher_steps, int) or teacher_steps < 2 or teacher_steps % 2:
        raise ValueError(f"teacher_steps must be an even integer >= 2, got {teacher_steps!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    if not callable(teacher):
        raise TypeError("teacher must be a callable model(z, t, **cond) -> v_hat")
    schedule = schedule or getattr(teacher, "schedule", None) or CosineSchedule()
    device = torch.device(device) if device is not None else model_device(teacher)
    dataset = as_dataset(data)
    steps = teacher_steps // 2
    teacher_module, student, start_from = frozen_teacher_and_student(teacher, student)
    use_labels = dataset.num_classes > 0 and getattr(student, "num_classes", 0) > 0
    examples, labels = dataset.train, dataset.train_labels
    held: list = []
    teacher = checked_output(teacher, "teacher")

    conds, nulls = dataset.train_conds, dataset.null_conds

    def draw(gen, n):
        return draw_batch(examples, labels, steps, n, gen, schedule,
                          label_dropout=label_dropout, use_labels=use_labels,
                          extra_cond=extra_cond, conds=conds, null_conds=nulls)

    def loss(model, batch, teacher):   # the teacher as the runner's policy prepared it
        return pd_update(model, teacher, batch, steps, schedule, weighting=weighting,
                         autocast=contextlib.nullcontext())

    def inputs(batch):
        call = ((batch.z_t, batch.t.float()), batch.cond)
        return call, call

    def measure(model) -> float:
        if not held:  # two teacher forwards on the held-out set, once
            held.append(HeldOut(teacher, dataset, steps, schedule, size=heldout_size,
                                seed=seed, weighting=weighting, device=device,
                                use_labels=use_labels, extra_cond=extra_cond))
        return held[0].mismatch(checked_output(model, "student"))

    settings = {"teacher_steps": teacher_steps, "weighting": weighting,
                "label_dropout": label_dropout, "heldout_size": heldout_size,
                "schedule": schedule.config, "extra": extra_settings or {},
                "teacher": fingerprint_tensors(teacher_module) if teacher_module is not None
                else type(teacher).__name__,
                "student": start_from,
                "data": fingerprint_tensors(examples, labels, *conds.values(),
                                            *nulls.values())}
    method = Method(name=f"pd{teacher_steps}", student=student, draw=draw, loss=loss,
                    settings=settings, measure=measure,
                    teacher=teacher_module if teacher_module is not None else teacher,
                    teacher_calls=2, inputs=inputs)
    return _Plan(method=method, schedule=schedule, device=device)


def progressive_distill(teacher, data, *, start_steps: int, end_steps: int = 1,
                        updates: int | list = 2000, checkpoint_dir=None, on_round=None,
                        keep_students: bool = True, on_load=None,
                        **round_options) -> list[RoundResult]:
    """Halve the step count from `start_steps` to `end_steps` (powers of two), one round each.

    Each round's student (EMA weights) becomes the next round's teacher. `updates` is one
    number for every round or a list with one entry per round. With `checkpoint_dir`, each
    finished round's student is saved as `student-<steps>` (fastdiff.save) with the
    fingerprint of its settings, and an interrupted job resumes: finished rounds of the same
    settings are loaded, the current round continues from its last state; a finished round
    of other settings (another teacher, data, lr, seed, ...) raises CheckpointError naming
    the differences. `on_round(result)` is called after each round (e.g. to evaluate or
    report). keep_students=False: a round's student is dropped from its result
    (`result.student = None`) once the next round, whose teacher it is, has finished, so
    only two rounds' models are held at a time (the last result keeps its student; with
    `checkpoint_dir` every round's student is on disk as `student-<steps>`): for real
    UNets, where each copy is params × 4 bytes. `on_load(student)` is called on each
    finished round's student reloaded from `checkpoint_dir` (what loading does not restore,
    e.g. diffusers' gradient checkpointing, which the next round's student copies). Other
    keyword arguments go to `distill_round`.
    """
    from fastdiff.engine.checkpoint import load, save

    if not _is_pow2(start_steps) or start_steps < 2:
        raise ValueError(f"start_steps must be a power of two >= 2, got {start_steps!r}")
    if not _is_pow2(end_steps):
        raise ValueError(f"end_steps must be a power of two >= 1, got {end_steps!r}")
    if end_steps >= start_steps:
        raise ValueError(f"end_steps ({end_steps}) must be below start_steps ({start_steps})")
    n_rounds = int(math.log2(start_steps // end_steps))
    per_round = list(updates) if isinstance(updates, (list, tuple)) else [updates] * n_rounds
    if len(per_round) != n_rounds:
        raise ValueError(f"updates lists {len(per_round)} rounds, but {start_steps} -> "
                         f"{end_steps} takes {n_rounds}")
    results = []
    current = teacher
    steps = start_steps
    for r in range(n_rounds):
        options = dict(round_options, teacher_steps=steps, updates=per_round[r],
                       checkpoint_dir=checkpoint_dir)
        horizon = sum(per_round[r:])   # later rounds' teachers reuse a shared compile
        done_path = Path(checkpoint_dir) / f"student-{steps // 2:05d}" if checkpoint_dir else None
        fingerprint = _round_fingerprint(current, data, options) if done_path else None
        meta = _finished_round(done_path, steps, fingerprint) if done_path is not None else None
        if meta is not None:  # load() restores the student's schedule from the checkpoint
            student = load(done_path)
            student.sample_steps = steps // 2  # as a freshly distilled round's student has
            if on_load is not None:
                on_load(student)
            result = RoundResult(student=student, steps=steps // 2, teacher_steps=steps,
                                 history=RoundHistory.from_dict(meta.get("history", {})))
        else:
            result = distill_round(current, data, **options, horizon=horizon)
            if done_path is not None and round_options.get("rank", 0) == 0:
                with phase("checkpoint"):
                    save(result.student, done_path,
                         metadata={"teacher_steps": steps, "fingerprint": fingerprint,
                                   "history": json_safe(asdict(result.history))})
                state = _state_path(checkpoint_dir, steps)
                if state.exists():
                    os.remove(state)
        results.append(result)
        if on_round is not None:
            on_round(result)
        if not keep_students and len(results) > 1:
            results[-2].student = None   # it was this round's teacher: no longer needed
        current = result.student
        steps //= 2
    return results


def _round_fingerprint(teacher, data, options: dict) -> dict:
    """What `distill_round(teacher, data, **options)` would record as its settings."""
    import inspect

    params = inspect.signature(distill_round).parameters
    opts = {k: v.default for k, v in params.items() if v.default is not inspect.Parameter.empty}
    opts.update(options)
    plan = _round_plan(teacher, data, **{k: opts[k] for k in (
        "teacher_steps", "weighting", "label_dropout", "schedule", "seed", "heldout_size",
        "device", "student", "extra_cond", "extra_settings")})
    config = RunConfig(**{k: opts[k] for k in (
        "updates", "batch_size", "lr", "warmup", "ema_decay", "grad_clip", "seed",
        "eval_every", "tolerance", "patience")}, world_size=opts.get("world_size", 1))
    return json_safe({"method": plan.method.name, **config.fingerprint(),
                      **plan.method.settings})


def _finished_round(path: Path, teacher_steps: int, fingerprint: dict | None) -> dict | None:
    """The metadata of the finished round from `teacher_steps` saved at `path`, or None if
    there is none; CheckpointError if it was made with other settings."""
    from fastdiff.engine.checkpoint import CheckpointError, load_config

    try:
        meta = load_config(path).get("metadata", {})
    except CheckpointError:
        return None
    if meta.get("teacher_steps") != teacher_steps:
        return None
    if fingerprint is not None:
        check_fingerprint(path, meta.get("fingerprint") or {}, fingerprint,
                          "is a finished round of another run")
    return meta
