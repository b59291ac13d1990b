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

import copy
import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from fastdiff.engine.nvtx import phase
from fastdiff.engine.schedules import CosineSchedule, Schedule, per_sample
from fastdiff.kernels import ddim_step, distill_loss, fused_pd_loss, pd_target
from fastdiff.training import (
    EMA,
    LOG_EVERY,
    Progress,
    _unwrap,
    autocast_for,
    check_global_batch,
    flush_losses,
    linear_lr,
    make_optimizer,
    maybe_compile,
    model_device,
    optimizer_update,
)

WEIGHTINGS = ("snr_trunc", "snr+1", "const")


@dataclass
class RoundHistory:
    """What one round cost and what it reached (times in seconds)."""

    loss: list = field(default_factory=list)           # training loss per update
    eval_updates: list = field(default_factory=list)   # update index of each held-out eval
    heldout_mismatch: list = field(default_factory=list)  # EMA student vs two teacher steps
    initial_mismatch: float = float("nan")             # the untrained copy of the teacher
    wall_time: float = 0.0
    samples_per_s: float = 0.0
    updates_done: int = 0
    stopped_by: str = ""                               # "updates" or "converged"
    resumed_from: int = 0                              # update index a resume started at


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
    return line + (f" (resumed from update {h.resumed_from})" if h.resumed_from else "")


def _is_pow2(n) -> bool:
    return isinstance(n, int) and n >= 1 and (n & (n - 1)) == 0


def update_generator(seed: int, round_tag: str, k: int) -> torch.Generator:
    """The RNG for update k of a round: a hash of (seed, round, k), independent of history."""
    digest = hashlib.blake2b(f"{seed}/{round_tag}/{k}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


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
               device=None, extra_cond=None) -> PDBatch:
    """Draw the global batch's randomness from `gen` and keep this rank's slice.

    extra_cond: optional `f(generator, n) -> {name: tensor (n,)}` drawing further conditions
    for the global batch (e.g. a guidance weight w per example), passed to teacher and student.
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
    if extra_cond is not None:
        extra = {k: v[sl].to(device) for k, v in extra_cond(gen, global_batch).items()}
    return PDBatch(z_t=z_t, t=t, y=y, extra=extra)


def wrap_replicated(train_model, student: nn.Module, wrap_student):
    """`wrap_student(train_model)` (e.g. DistributedDataParallel), or `train_model` if None.

    Refuses a wrapper that shards the student's parameters (FSDP): the training loops build
    their optimizer, EMA and rank-0 checkpoints on full local parameters."""
    if wrap_student is None:
        return train_model
    wrapped = wrap_student(train_model)
    if any(hasattr(p, "placements") for p in student.parameters()):
        raise NotImplementedError(
            "wrap_student sharded the student's parameters (FSDP): fastdiff's distillation "
            "loops build their optimizer, EMA and rank-0 checkpoints on full local parameters, "
            "so use a replicating wrapper (fastdiff.engine.parallel.ddp_wrapper); see "
            "fsdp_wrapper's docstring for what FSDP needs")
    return wrapped


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
        batch = draw_batch(x[:size], None if y is None else y[:size], student_steps, size, gen,
                           schedule, label_dropout=0.0, use_labels=use_labels, device=device,
                           extra_cond=extra_cond)
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


def settings_fingerprint(**kw) -> dict:
    """The settings a training state belongs to, as JSON-safe values (compared on resume)."""
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
            for k, v in kw.items()}


def _state_path(checkpoint_dir, teacher_steps: int) -> Path:
    return Path(checkpoint_dir) / f"round-{teacher_steps:05d}-to-{teacher_steps // 2:05d}.state"


def save_training_state(path, *, student, ema, opt, k, history, fingerprint):
    """Write a loop's whole state atomically (safetensors + JSON, no pickle): the student
    (unwrapped), EMA and optimizer state, the global RNG, the next update `k`, the history
    dataclass and the settings fingerprint."""
    from fastdiff.engine.checkpoint import flatten_state_dict, rng_state, save_state

    tensors, meta = {}, {}
    for name, sd in (("student", _unwrap(student).state_dict()),
                     ("ema", ema.shadow.state_dict()), ("opt", opt.state_dict())):
        t, m = flatten_state_dict(sd)
        tensors.update({f"{name}/{key}": v for key, v in t.items()})
        meta[name] = m
    tensors.update({f"rng/{key}": v for key, v in rng_state().items()})
    meta.update(update=k, history=asdict(history), fingerprint=fingerprint)
    save_state(path, tensors, meta)


def load_training_state(path, *, student, ema, opt, fingerprint, history_type=None):
    """Restore what `save_training_state` wrote into `student`, `ema`, `opt` and the RNG;
    returns (k, history as `history_type`, default RoundHistory). A state written under
    other settings raises CheckpointError listing the differences."""
    from fastdiff.engine.checkpoint import (
        CheckpointError,
        load_state,
        set_rng_state,
        unflatten_state_dict,
    )

    tensors, meta = load_state(path)
    if meta.get("fingerprint") != fingerprint:
        diff = {k: (meta.get("fingerprint", {}).get(k), v) for k, v in fingerprint.items()
                if meta.get("fingerprint", {}).get(k) != v}
        raise CheckpointError(
            f"{path}: this checkpoint belongs to a run with other settings "
            f"(saved vs now: {diff}); use another checkpoint_dir or the original settings")

    def part(name):
        pre = f"{name}/"
        return unflatten_state_dict({k[len(pre):]: v for k, v in tensors.items()
                                     if k.startswith(pre)}, meta[name])

    _unwrap(student).load_state_dict(part("student"))
    ema.shadow.load_state_dict(part("ema"))
    opt.load_state_dict(part("opt"))
    set_rng_state({k[4:]: v for k, v in tensors.items() if k.startswith("rng/")})
    return int(meta["update"]), (history_type or RoundHistory)(**meta["history"])


def distill_round(teacher, data, *, teacher_steps: int, updates: int = 2000,
                  batch_size: int = 128, lr: float = 1e-4, weighting: str = "snr_trunc",
                  ema_decay: float = 0.995, grad_clip: float = 1.0, label_dropout: float = 0.1,
                  warmup: int = 0, schedule: Schedule | None = None, autocast=None,
                  compile: bool = False, seed: int = 0, tolerance: float | None = None,
                  patience: int = 3, eval_every: int = 100, heldout_size: int = 512,
                  checkpoint_dir=None, checkpoint_every: int = 200, progress: bool = True,
                  device=None, student: nn.Module | None = None, rank: int = 0,
                  world_size: int = 1, wrap_student=None, on_eval=None,
                  extra_cond=None) -> RoundResult:
    """One halving of progressive distillation: a student for teacher_steps / 2 DDIM steps.

    teacher: v-prediction model `teacher(z, t, **cond)` (frozen; never gets gradients);
    data: tensor (N, ...), (examples, labels), a Dataset or a dataset name; teacher_steps: the
    teacher's step count 2N (even, ≥ 2); updates: the most optimizer updates this round takes;
    batch_size: examples per update (the global batch across ranks); lr: AdamW peak learning
    rate, annealed linearly to 0 over the round (the paper's recipe; the optimizer is fresh
    each round); weighting: "snr_trunc" (default), "snr+1" or "const" (DESIGN.md §2).

    Convergence: with `tolerance` set, the held-out mismatch (EMA student, every `eval_every`
    updates) must improve by a relative `tolerance` over its best within `patience` evals, or
    the round stops early (`history.stopped_by == "converged"`). Crash safety: with
    `checkpoint_dir`, the round state (student, EMA, optimizer, RNG, position) is written
    atomically every `checkpoint_every` updates, and a rerun with the same settings resumes
    from it.

    Returns RoundResult(student = EMA weights, steps = teacher_steps // 2, teacher_steps,
    history).

    extra_cond: optional `f(generator, n) -> {name: tensor (n,)}` drawing further per-example
    conditions each update (guided distillation draws w ~ U[w_min, w_max] this way).
    """
    from fastdiff.engine.data import as_dataset

    if not isinstance(teacher_steps, int) or teacher_steps < 2 or teacher_steps % 2:
        raise ValueError(f"teacher_steps must be an even integer >= 2, got {teacher_steps!r}")
    for name, value in (("updates", updates), ("batch_size", batch_size),
                        ("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    check_global_batch(batch_size, world_size)
    if tolerance is not None and not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0 or None, got {tolerance!r}")
    if not callable(teacher):
        raise TypeError("teacher must be a callable model(z, t, **cond) -> v_hat")

    schedule = schedule or getattr(teacher, "schedule", None) or CosineSchedule()
    device = torch.device(device) if device is not None else model_device(teacher)
    dataset = as_dataset(data)
    steps = teacher_steps // 2
    teacher_module = _unwrap(teacher) if isinstance(teacher, nn.Module) else None
    if teacher_module is not None:
        teacher_module.eval().requires_grad_(False)
    if student is None:
        if teacher_module is None:
            raise TypeError("a plain-callable teacher needs an explicit `student` module")
        student = copy.deepcopy(teacher_module)
    student = student.to(device).train().requires_grad_(True)
    use_labels = dataset.num_classes > 0 and getattr(student, "num_classes", 0) > 0
    examples = dataset.train
    labels = dataset.train_labels

    opt = make_optimizer(student, lr)
    ema = EMA(student, ema_decay)
    fingerprint = settings_fingerprint(teacher_steps=teacher_steps, updates=updates,
                                     batch_size=batch_size, lr=lr, weighting=weighting,
                                     ema_decay=ema_decay, seed=seed, world_size=world_size,
                                     tolerance=tolerance, label_dropout=label_dropout)
    history = RoundHistory()
    start = 0
    state_path = _state_path(checkpoint_dir, teacher_steps) if checkpoint_dir else None
    if state_path is not None and state_path.exists():
        start, history = load_training_state(state_path, student=student, ema=ema, opt=opt,
                                             fingerprint=fingerprint)
        history.resumed_from = start
    if world_size > 1:  # every rank must resume from the same update (shared checkpoint_dir)
        from fastdiff.engine.parallel import check_same

        check_same((teacher_steps, start), "(the round's teacher steps, the update to resume at)")

    heldout = HeldOut(teacher, dataset, steps, schedule, size=heldout_size, seed=seed,
                      weighting=weighting, device=device, use_labels=use_labels,
                      extra_cond=extra_cond)
    if start == 0:
        history.initial_mismatch = heldout.mismatch(student)

    train_model = wrap_replicated(maybe_compile(student, compile), student, wrap_student)
    amp = autocast_for(device, autocast)
    world = world_size
    bar = Progress(updates, f"distill {teacher_steps}->{steps}", progress and rank == 0,
                   initial=start)
    t0 = time.perf_counter() - history.wall_time
    k = start
    best, since_best = _best_so_far(history, tolerance or 0.0)
    stopped_by = history.stopped_by or "updates"
    pending: list = []
    while k < updates and not history.stopped_by:
        gen = update_generator(seed, f"pd{teacher_steps}", k)
        with phase("data"):
            batch = draw_batch(examples, labels, steps, batch_size, gen, schedule,
                               label_dropout=label_dropout, use_labels=use_labels, rank=rank,
                               world=world, device=device, extra_cond=extra_cond)
        for group in opt.param_groups:
            group["lr"] = lr * linear_lr(k, updates, warmup)
        loss = pd_update(train_model, teacher, batch, steps, schedule, weighting=weighting,
                         autocast=amp)
        optimizer_update(loss, student, opt, ema, grad_clip)
        k += 1
        pending.append(loss.detach())
        # reading a loss back syncs a GPU: do it every LOG_EVERY updates, not every update
        if k % LOG_EVERY == 0 or k % eval_every == 0 or k % checkpoint_every == 0 \
                or k == updates:
            flush_losses(pending, history.loss, world_size)
        bar.update(batch_size, **({"loss": history.loss[-1]} if history.loss else {}))
        if k % eval_every == 0 or k == updates:
            with phase("eval"):
                m = float(_mean_over_ranks(heldout.mismatch(ema.shadow), world_size))
            history.eval_updates.append(k)
            history.heldout_mismatch.append(m)
            if on_eval is not None:
                on_eval(k, m)
            if tolerance is not None:
                if m < best * (1 - tolerance):
                    best, since_best = m, 0
                else:
                    since_best += 1
                    if since_best >= patience:
                        stopped_by = "converged"
                        history.stopped_by = stopped_by
        if state_path is not None and (k % checkpoint_every == 0 or history.stopped_by) \
                and k < updates and rank == 0:
            history.wall_time = time.perf_counter() - t0
            history.updates_done = k
            with phase("checkpoint"):
                save_training_state(state_path, student=student, ema=ema, opt=opt, k=k,
                                    history=history, fingerprint=fingerprint)
    flush_losses(pending, history.loss, world_size)
    bar.close()
    history.stopped_by = stopped_by
    history.updates_done = k
    history.wall_time = time.perf_counter() - t0
    done = k - history.resumed_from
    history.samples_per_s = done * batch_size / max(history.wall_time, 1e-9) if done else 0.0
    out = ema.shadow
    out.schedule = schedule
    out.sample_steps = steps
    return RoundResult(student=out, steps=steps, teacher_steps=teacher_steps, history=history)


def _mean_over_ranks(x, world_size: int):
    """Mean over ranks (identity for one process): metrics, and the ranks' shared decisions."""
    if world_size == 1:
        return x
    from fastdiff.engine.parallel import all_reduce_mean

    return all_reduce_mean(x)


def _best_so_far(history: RoundHistory, tolerance: float):
    """Replay the convergence rule over saved evals (so a resumed round decides the same)."""
    best, since = math.inf, 0
    for m in history.heldout_mismatch:
        if m < best * (1 - tolerance):
            best, since = m, 0
        else:
            since += 1
    return best, since


def progressive_distill(teacher, data, *, start_steps: int, end_steps: int = 1,
                        updates: int | list = 2000, checkpoint_dir=None, on_round=None,
                        **round_options) -> list[RoundResult]:
    """Halve the step count from `start_steps` to `end_steps` (powers of two), one round each.

    Each round's student (EMA weights) becomes the next round's teacher. `updates` is one
    number for every round or a list with one entry per round. With `checkpoint_dir`, each
    finished round's student is saved as `student-<steps>` (fastdiff.save) and an interrupted
    job resumes: finished rounds are loaded, the current round continues from its last state.
    `on_round(result)` is called after each round (e.g. to evaluate or report). Other keyword
    arguments go to `distill_round`.
    """
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
    from fastdiff.engine.checkpoint import load, save

    results = []
    current = teacher
    steps = start_steps
    for r in range(n_rounds):
        done_path = Path(checkpoint_dir) / f"student-{steps // 2:05d}" if checkpoint_dir else None
        meta = _finished_round(done_path, steps) if done_path is not None else None
        if meta is not None:  # load() restores the student's schedule from the checkpoint
            student = load(done_path)
            student.sample_steps = steps // 2  # as a freshly distilled round's student has
            result = RoundResult(student=student, steps=steps // 2, teacher_steps=steps,
                                 history=RoundHistory(**meta.get("history", {})))
        else:
            result = distill_round(current, data, teacher_steps=steps, updates=per_round[r],
                                   checkpoint_dir=checkpoint_dir, **round_options)
            if done_path is not None and round_options.get("rank", 0) == 0:
                with phase("checkpoint"):
                    save(result.student, done_path,
                         metadata={"teacher_steps": steps, "history": asdict(result.history)})
                state = _state_path(checkpoint_dir, steps)
                if state.exists():
                    os.remove(state)
        results.append(result)
        if on_round is not None:
            on_round(result)
        current = result.student
        steps //= 2
    return results


def _finished_round(path: Path, teacher_steps: int) -> dict | None:
    """The metadata saved with a finished round's student at `path`, or None if there is no
    readable checkpoint of the round from `teacher_steps` there."""
    from fastdiff.engine.checkpoint import CheckpointError, load_config

    try:
        meta = load_config(path).get("metadata", {})
    except CheckpointError:
        return None
    return meta if meta.get("teacher_steps") == teacher_steps else None
