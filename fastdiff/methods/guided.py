"""Distilling classifier-free-guided models (Meng et al., CVPR 2023).

Guidance convention (DESIGN.md §2, `fastdiff.engine.samplers.guided_model`): for a teacher trained
with label dropout (null label −1),

    v̂^w(z, c) = (1 + w) v̂(z, c) − w v̂(z, ∅)

so **w = 0 is the plain conditional model** and w = −1 the unconditional one. Sampling the
teacher with guidance costs two network passes per step (run as one batch of 2B).

Stage 1 (`distill_guidance`): a copy of the teacher gains a scalar condition w (Fourier
embedded like t, its last layer zero-initialised, so the student starts as the teacher at
w = 0) and learns v̂_η(z, c, w) ≈ v̂^w(z, c) for w ~ U[w_min, w_max]:

    x, c ~ data;  t ~ U(0, 1);  ε ~ N(0, I);  z_t = α_t x + σ_t ε;  w ~ U[w_min, w_max]
    v_c, v_u = teacher(z_t, t, c), teacher(z_t, t, ∅)          (one 2B batch, no grad)
    L = mean_b weight_b / (1 + max(w_b, 0))² · mean (v̂_η(z_t, t, c, w) − ((1+w) v_c − w v_u))²

with the guidance combination fused into the loss kernel (`fastdiff.kernels.guided_loss`).

Stage 2 (`distill_guided_steps`): progressive distillation (`fastdiff.methods.pd`) of the stage-1
model with w drawn per example each update, halving the DDIM step count down to 1. The
student samples with one pass per step: `sample(student, noise, N, cond={"y": y, "w": w})`.

The stochastic N-step sampler (`fastdiff.engine.steppers.stochastic_sample`,
`sample(..., sampler="stochastic")`):
from t = i/N, one deterministic DDIM step of twice the length to u = (i−2)/N, then forward
renoising to s = (i−1)/N with fresh noise, z_s = (α_s/α_u) z_u + σ_{s|u} ξ; the last step
(from 1/N) is a plain DDIM step to 0. Its student (`distill_stochastic`) is trained to take
those 2/N steps: see that function for what was implemented and how it differs from the
paper.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fastdiff.engine.models import add_scalar_condition, checked_output
from fastdiff.engine.nvtx import phase
from fastdiff.engine.schedules import CosineSchedule, Schedule, per_sample
from fastdiff.kernels import ddim_step, distill_loss
from fastdiff.kernels.guided_loss import guided_distill_loss
from fastdiff.methods.pd import (
    WEIGHTINGS,
    RoundHistory,
    RoundResult,
    draw_batch,
    progressive_distill,
)
from fastdiff.training.parts import _unwrap, model_device
from fastdiff.training.runner import (
    History,
    Method,
    RunConfig,
    fingerprint_tensors,
    frozen_teacher_and_student,
    run,
    update_generator,
)

__all__ = [
    "GuidanceHistory",
    "GuidanceResult",
    "w_sampler",
    "teacher_cond_uncond",
    "guidance_error",
    "distill_guidance",
    "distill_guided_steps",
    "distill_stochastic",
    "stochastic_target",
    "stochastic_state_path",
]


# --------------------------------------------------------------------------- helpers


def check_w_range(w_min, w_max) -> tuple[float, float]:
    for name, v in (("w_min", w_min), ("w_max", w_max)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if not w_min <= w_max:
        raise ValueError(f"w_min ({w_min}) must not exceed w_max ({w_max})")
    if w_min < -1:
        raise ValueError(f"w_min must be >= -1 (w = -1 is the unconditional model), got {w_min}")
    return float(w_min), float(w_max)


def w_sampler(w_min: float, w_max: float):
    """`f(generator, n) -> {"w": (n,) float32}` with w ~ U[w_min, w_max]: the per-update
    extra condition of stage 2 (`fastdiff.methods.pd.distill_round(extra_cond=...)`)."""
    w_min, w_max = check_w_range(w_min, w_max)

    def draw(generator: torch.Generator, n: int) -> dict:
        return {"w": w_min + (w_max - w_min) * torch.rand(n, generator=generator)}

    return draw


def _needs_labels(teacher, dataset) -> None:
    """Guidance needs a condition with a null: class labels (null −1) for a class-conditional
    teacher, or per-example condition tensors with their null (`Dataset.null_conds`, e.g.
    text embeddings and the empty / negative prompt's embedding)."""
    if dataset.conditioned:
        return
    if dataset.num_classes == 0 or dataset.train_labels is None:
        raise ValueError("guided distillation needs class-labelled data (the guidance is "
                         "over the class label) or per-example condition tensors (e.g. "
                         "prompt embeddings); got an unconditional data set")
    if getattr(_unwrap(teacher), "num_classes", 0) == 0:
        raise ValueError("guided distillation needs a class-conditional teacher trained with "
                         "label dropout (num_classes > 0, null label -1)")


@torch.no_grad()
def teacher_cond_uncond(teacher, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                        autocast=None, *, cond: dict | None = None,
                        null: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's v̂(z, c) and v̂(z, ∅), as one batch of 2B (no gradient).

    z: (B, ...) float; t: (B,) float in [0, 1]; y: (B,) int64 labels (null −1) or None;
    cond / null: further condition tensors {keyword: (B, ...)} of the conditional branch
    and their null values (e.g. `encoder_hidden_states` and the negative prompt's
    embedding). Returns two tensors of z's shape and dtype.
    """
    import contextlib

    both = {k: torch.cat([v, null[k]]) for k, v in (cond or {}).items()}
    if y is not None:
        both["y"] = torch.cat([y, torch.full_like(y, -1)])
    with phase("teacher_forward"), (autocast or contextlib.nullcontext()):
        out = teacher(torch.cat([z, z]), torch.cat([t, t]).float(), **both)
    v_c, v_u = out.to(z.dtype).chunk(2)
    return v_c, v_u


@dataclass
class _Draw:
    """One stage-1 batch: z_t (B, ...), t (B,) float64, y (B,) int64 or None, w (B,) float32;
    cond / null: condition tensors {keyword: (B, ...)} and their null values (or {})."""

    z_t: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor | None
    w: torch.Tensor
    cond: dict = field(default_factory=dict)
    null: dict = field(default_factory=dict)

    @property
    def student_cond(self) -> dict:
        return {**self.cond, **({"y": self.y} if self.y is not None else {})}


def _draw_stage1(examples, labels, batch: int, gen: torch.Generator, schedule: Schedule,
                 w_min: float, w_max: float, *, label_dropout: float, device=None,
                 conds=None, null_conds=None) -> _Draw:
    """All of one update's randomness for the global `batch` from `gen` (a pure function of
    seed, stage and update index). The runner keeps each rank's slice of it, so K ranks
    see what one process sees. labels may be None when `conds` (per-example condition
    tensors {keyword: (N, ...)}, with `null_conds` {keyword: (...)}) carry the condition;
    a dropped example gets the null label −1 or the null condition."""
    n = examples.shape[0]
    idx = torch.randint(0, n, (batch,), generator=gen)
    t = torch.rand(batch, generator=gen, dtype=torch.float64)
    eps = torch.randn((batch, *examples.shape[1:]), generator=gen)
    w = w_min + (w_max - w_min) * torch.rand(batch, generator=gen)
    drop = torch.rand(batch, generator=gen) < label_dropout
    x = examples[idx].to(device)
    y = None if labels is None else \
        torch.where(drop, torch.full_like(labels[idx], -1), labels[idx]).to(device)
    cond, null = {}, {}
    for k, v in (conds or {}).items():
        c = v[idx]
        nk = null_conds[k].to(c.dtype).expand_as(c)
        cond[k] = torch.where(per_sample(~drop, c).bool(), c, nk).to(device)
        null[k] = nk.to(device)
    t = t.to(device)
    z_t = per_sample(schedule.alpha(t), x) * x + per_sample(schedule.sigma(t), x) * \
        eps.to(device=device, dtype=x.dtype)
    return _Draw(z_t=z_t, t=t, y=y, w=w.to(device), cond=cond, null=null)


def _split_conds(dataset, which: str):
    """(labels, conds, nulls) of a split for guidance: condition tensors when the data set
    has them (labels then unused), else the class labels."""
    if dataset.conditioned:
        conds = dataset.train_conds if which == "train" else dataset.held_out_conds
        return None, conds, dataset.null_conds
    labels = dataset.train_labels if which == "train" else dataset.held_out_labels
    return labels, None, None


# --------------------------------------------------------------------------- stage 1

STAGE1_STATE = "stage1.state"   # the stage-1 training state in `checkpoint_dir`


@dataclass
class GuidanceHistory(History):
    """What stage 1 cost and reached (`fastdiff.training.runner.History`; times in seconds,
    evaluation excluded). `heldout` (alias `heldout_error`) is the EMA student's relative
    error (see `guidance_error`) averaged over `eval_ws`; `initial` the untrained copy's."""

    initial_error: dict = field(default_factory=dict)   # the untrained copy, per w
    final_error: dict = field(default_factory=dict)     # the returned student, per w

    @property
    def heldout_error(self) -> list:
        return self.heldout

    @classmethod
    def from_dict(cls, d: dict):
        h = super().from_dict(d)
        for name in ("initial_error", "final_error"):  # JSON made the w keys strings
            setattr(h, name, {float(w): e for w, e in getattr(h, name).items()})
        return h


@dataclass
class GuidanceResult:
    student: nn.Module          # EMA weights, eval mode; takes w as a scalar condition
    history: GuidanceHistory


class _HeldOutGuidance:
    """Fixed held-out (z_t, t, y) with the teacher's v_c, v_u computed once."""

    def __init__(self, teacher, dataset, schedule: Schedule, *, size: int, seed: int, device):
        x = dataset.held_out
        y, conds, nulls = _split_conds(dataset, "held_out")
        size = min(size, len(x))
        gen = update_generator(seed, "guided-heldout", 0)
        d = _draw_stage1(x[:size], None if y is None else y[:size], size, gen, schedule, 0.0,
                         0.0, label_dropout=0.0, device=device,
                         conds={k: v[:size] for k, v in (conds or {}).items()},
                         null_conds=nulls)
        self.z_t, self.t, self.cond = d.z_t, d.t, d.student_cond
        self.v_c, self.v_u = teacher_cond_uncond(teacher, d.z_t, d.t, d.y, cond=d.cond,
                                                 null=d.null)

    @torch.no_grad()
    def errors(self, student, ws) -> dict:
        out = {}
        for w in ws:
            wt = torch.full((self.z_t.shape[0],), float(w), device=self.z_t.device)
            v_s = student(self.z_t, self.t.float(), w=wt, **self.cond).double()
            target = (1 + w) * self.v_c.double() - w * self.v_u.double()
            out[float(w)] = float((v_s - target).norm() / target.norm())
        return out


def guidance_error(student, teacher, data, ws=(0.0, 1.0, 2.0, 4.0), *, size: int = 512,
                   seed: int = 0, schedule: Schedule | None = None) -> dict:
    """Relative error ‖v̂_student(z_t, c, w) − v̂^w(z_t, c)‖ / ‖v̂^w(z_t, c)‖ per w.

    On `size` held-out examples of `data` at t ~ U(0, 1) (fixed by `seed`), norms over the
    whole batch; v̂^w is the teacher's two-pass guided output. Returns {w: error}.
    """
    from fastdiff.engine.data import as_dataset

    dataset = as_dataset(data)
    _needs_labels(teacher, dataset)
    schedule = schedule or getattr(teacher, "schedule", None) or CosineSchedule()
    held = _HeldOutGuidance(teacher, dataset, schedule, size=size, seed=seed,
                            device=model_device(teacher))
    return held.errors(student, ws)


def distill_guidance(teacher, data, *, w_min: float = 0.0, w_max: float = 4.0,
                     updates: int = 2000, batch_size: int = 128, lr: float = 5e-4,
                     weighting: str = "snr+1", ema_decay: float = 0.995,
                     grad_clip: float = 1.0, warmup: int = 0, label_dropout: float = 0.0,
                     w_scale: float = 1.0, balance_w: bool = True,
                     schedule: Schedule | None = None, autocast=None,
                     compile: bool = False, policy=None, seed: int = 0, eval_every: int = 100,
                     heldout_size: int = 512, eval_ws=(0.0, 1.0, 2.0, 4.0),
                     progress: bool = True, device=None,
                     student: nn.Module | None = None, rank: int = 0, world_size: int = 1,
                     wrap_student=None, checkpoint_dir=None,
                     checkpoint_every: int = 200, max_skips: int = 20) -> GuidanceResult:
    """Stage 1 of Meng et al.: one network that predicts the guided v̂^w in one pass.

    Guidance convention: v̂^w(z, c) = (1 + w) v̂(z, c) − w v̂(z, ∅); w = 0 is the plain
    conditional model, the null class is the label −1.

    teacher: class-conditional v-prediction model `teacher(z, t, y=labels)` trained with label
    dropout (frozen, no gradients); data: (examples, labels), a labelled Dataset or a data set
    name; w_min, w_max: the guidance range, w ~ U[w_min, w_max] per example each update;
    updates: optimizer updates; batch_size: examples per update; lr: AdamW peak learning
    rate, annealed linearly to 0; weighting: v-space loss weight ("snr+1" = 1, the teacher's
    own loss; "snr_trunc"; "const"); label_dropout: probability of training on the null
    label (its target is v̂(z, ∅) for every w); w_scale: multiplies w before the Fourier
    features; balance_w: divide each example's loss by (1 + max(w, 0))², the growth of its
    target's scale with w, so that every w counts by its *relative* error (without it the
    large-w examples dominate the loss and the w = 0 output drifts from the teacher it
    started as); student: start from this module instead of a copy of the teacher; rank,
    world_size, wrap_student: data parallelism as in `fastdiff.methods.pd.distill_round` (batch_size
    is the global batch, each rank trains on its slice, `wrap_student`, e.g.
    `fastdiff.engine.parallel.ddp_wrapper(device)`, averages the gradients, so K ranks train what
    one process trains); checkpoint_dir: if given, the training state (student, EMA,
    optimizer, position, history, a fingerprint of the settings, the teacher's weights and
    the data) is written atomically to `checkpoint_dir/stage1.state` every
    `checkpoint_every` updates and at the end (rank 0), and a rerun with the same settings
    resumes from it and ends with the same student as an uninterrupted run; a state from
    other settings is refused, naming the differences; max_skips: consecutive non-finite
    updates (each skipped: no optimizer step, no EMA update, listed in `history.skipped`)
    before the run stops with `fastdiff.training.NonFiniteError`.

    The student is a deep copy of the teacher with `add_scalar_condition(student, "w")`
    (zero-initialised, so it starts exactly as the teacher). The loop is the shared runner
    (`fastdiff.training.runner.run`): update k's randomness is a pure function of (seed,
    "guided-stage1", k). Every `eval_every` updates the EMA student's relative error against
    v̂^w on fixed held-out z_t is recorded (mean over `eval_ws`); `history.wall_time` is
    training time, the evaluations' time is `history.eval_time`.

    Returns GuidanceResult(student = EMA weights in eval mode with `.schedule`, history).
    """
    from fastdiff.engine.data import as_dataset

    w_min, w_max = check_w_range(w_min, w_max)
    if isinstance(heldout_size, bool) or not isinstance(heldout_size, int) or heldout_size < 1:
        raise ValueError(f"heldout_size must be a positive integer, got {heldout_size!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    if not 0.0 <= label_dropout < 1.0:
        raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
    eval_ws = [float(w) for w in eval_ws]
    if not eval_ws:
        raise ValueError("eval_ws must name at least one guidance weight")
    config = RunConfig(
        updates=updates, batch_size=batch_size, lr=lr, warmup=warmup, ema_decay=ema_decay,
        grad_clip=grad_clip, seed=seed, eval_every=eval_every,
        checkpoint=Path(checkpoint_dir) / STAGE1_STATE if checkpoint_dir is not None else None,
        checkpoint_every=checkpoint_every, max_skips=max_skips, autocast=autocast,
        compile=compile, policy=policy, progress=progress, rank=rank, world_size=world_size,
        wrap_student=wrap_student)
    config.check()
    if not callable(teacher):
        raise TypeError("teacher must be a callable model(z, t, y=labels) -> v_hat")
    dataset = as_dataset(data)
    _needs_labels(teacher, dataset)
    schedule = schedule or getattr(teacher, "schedule", None) or CosineSchedule()
    device = torch.device(device) if device is not None else model_device(teacher)
    config.device = device
    teacher_module, student, start_from = frozen_teacher_and_student(teacher, student)
    if "w" not in getattr(student, "scalar_conds", ()):
        # the new embedding's (non-zero) first layer is drawn from `seed`, not the global
        # RNG, so that a run is a pure function of its arguments
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            add_scalar_condition(student, "w", scale=w_scale)
    teacher = checked_output(teacher, "teacher")

    examples = dataset.train
    labels, conds, nulls = _split_conds(dataset, "train")
    history = GuidanceHistory()
    held: list = []

    def held_out() -> _HeldOutGuidance:  # the teacher's held-out outputs, computed once
        if not held:
            held.append(_HeldOutGuidance(teacher, dataset, schedule, size=heldout_size,
                                         seed=seed, device=device))
        return held[0]

    def draw(gen, n) -> _Draw:
        return _draw_stage1(examples, labels, n, gen, schedule, w_min, w_max,
                            label_dropout=label_dropout, conds=conds, null_conds=nulls)

    def loss(model, d: _Draw, teacher) -> torch.Tensor:   # teacher: the runner's prepared one
        v_c, v_u = teacher_cond_uncond(teacher, d.z_t, d.t, d.y, cond=d.cond, null=d.null)
        with phase("student_forward"):
            v_s = model(d.z_t, d.t.float(), w=d.w, **d.student_cond)
        with phase("target"):
            balance = 1.0 / (1.0 + d.w.clamp(min=0)).square() if balance_w else None
            return guided_distill_loss(v_s.to(d.z_t.dtype), v_c, v_u, d.w, schedule.phi(d.t),
                                       weighting, sample_weight=balance)

    def measure(model) -> float:
        errs = held_out().errors(model, eval_ws)
        # the runner measures the untrained student first (a fresh run only: a resumed one
        # has its initial errors in the restored history)
        if not history.initial_error:
            history.initial_error = errs
        return sum(errs.values()) / len(errs)

    settings = {"w_min": w_min, "w_max": w_max, "weighting": weighting,
                "label_dropout": label_dropout, "w_scale": w_scale, "balance_w": balance_w,
                "heldout_size": heldout_size, "eval_ws": eval_ws,
                "schedule": schedule.config,
                "teacher": fingerprint_tensors(teacher_module) if teacher_module is not None
                else type(teacher).__name__,
                "student": start_from,
                "data": fingerprint_tensors(examples, labels, dataset.held_out,
                                            dataset.held_out_labels, *_cond_tensors(dataset))}
    def inputs(d: _Draw):   # one conditional teacher call (the update makes one of 2B)
        t = d.t.float()
        return (((d.z_t, t), {**({"y": d.y} if d.y is not None else {}), **d.cond}),
                ((d.z_t, t), {"w": d.w, **d.student_cond}))

    method = Method(name="guided-stage1", student=student, draw=draw, loss=loss,
                    settings=settings, measure=measure,
                    teacher=teacher_module if teacher_module is not None else teacher,
                    teacher_calls=2, inputs=inputs)
    result = run(method, config, history=history)
    out, h = result.student, result.history
    h.final_error = held_out().errors(out, eval_ws)
    out.schedule = schedule
    return GuidanceResult(student=out, history=h)


def _cond_tensors(dataset) -> list:
    """A data set's condition tensors (for fingerprints; none for labelled data)."""
    return [*dataset.train_conds.values(), *dataset.held_out_conds.values(),
            *dataset.null_conds.values()]


# --------------------------------------------------------------------------- stage 2


def distill_guided_steps(stage1_student, data, *, w_min: float = 0.0, w_max: float = 4.0,
                         start_steps: int = 64, end_steps: int = 1, updates=800,
                         label_dropout: float = 0.0, **round_options) -> list[RoundResult]:
    """Stage 2 of Meng et al.: progressive distillation of the w-conditioned stage-1 model.

    Each update draws w ~ U[w_min, w_max] per example (from the update's RNG) and passes it to
    teacher and student alike; otherwise this is `fastdiff.methods.pd.progressive_distill` (halving
    `start_steps` → `end_steps`; `updates` per round; other keywords go to `distill_round`).
    label_dropout defaults to 0: the stage-1 model was distilled for real labels. The w range
    is part of each round's settings fingerprint (a round of another range is not reused).
    Returns the rounds' results; each `.student` samples with one pass per step:
    `sample(student, noise, steps, cond={"y": labels, "w": w_tensor})`.
    """
    if "w" not in getattr(_unwrap(stage1_student), "scalar_conds", ()):
        raise ValueError("stage1_student has no scalar condition 'w': run distill_guidance "
                         "first (stage 1)")
    w_min, w_max = check_w_range(w_min, w_max)
    extra_settings = {"w_min": w_min, "w_max": w_max,
                      **(round_options.pop("extra_settings", None) or {})}
    return progressive_distill(stage1_student, data, start_steps=start_steps,
                               end_steps=end_steps, updates=updates,
                               label_dropout=label_dropout, extra_cond=w_sampler(w_min, w_max),
                               extra_settings=extra_settings, **round_options)


# --------------------------------------------------------------------------- stochastic


@torch.no_grad()
def stochastic_target(teacher, z_t: torch.Tensor, t: torch.Tensor, cond: dict, steps: int,
                      schedule: Schedule, autocast=None, *,
                      teacher_steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The v target of the stochastic-sampler student at t = i/N (N = `steps`).

    z_t: (B, ...); t: (B,) float64 on the grid i/N; cond: the teacher's keywords;
    teacher_steps: the teacher's own grid, a multiple k·N of N (default N). The student's step
    from t spans 2/N to u = t − 2/N for i ≥ 2 and 1/N to 0 for i = 1; the teacher covers it
    with DDIM steps of 1/(kN) (2k of them, or k), and ṽ is the v whose single DDIM step lands
    where the teacher did (DESIGN §2, the rotation solved for v):

        z_u^teacher = cos Δ · z_t − sin Δ · ṽ,  Δ = φ_t − φ_u  ⇒  ṽ = (cos Δ · z_t − z_u) / sin Δ

    formed in float64 (sin Δ ≥ sin(φ(1/N)) > 0). A sample whose span is done stays put (steps
    of length 0), so a batch mixing i = 1 and i ≥ 2 takes 2k teacher passes.
    Returns (φ_t float64 (B,), ṽ in z_t's dtype).
    """
    import contextlib

    k = _substeps(steps, teacher_steps)
    amp = autocast or contextlib.nullcontext()
    last = t * steps < 1.5                                  # i = 1: one step of 1/N to 0
    t_end = torch.where(last, torch.zeros_like(t), t - 2.0 / steps)
    z, t_now = z_t, t
    for _ in range(2 * k):
        t_next = torch.maximum(t_now - 1.0 / (k * steps), t_end)
        with phase("teacher_forward"), amp:
            v = teacher(z, t_now.float(), **cond).to(z_t.dtype)
        z = ddim_step(z, v, schedule.phi(t_now), schedule.phi(t_next))
        t_now = t_next
    with phase("target"):
        phi_t, phi_end = schedule.phi(t), schedule.phi(t_end)
        delta = per_sample(phi_t - phi_end, z_t)
        v_tilde = (torch.cos(delta) * z_t.double() - z.double()) / torch.sin(delta)
    return phi_t, v_tilde.to(z_t.dtype)


def _substeps(steps: int, teacher_steps) -> int:
    """k = teacher_steps / steps, the teacher's steps per student step of 1/N."""
    teacher_steps = steps if teacher_steps is None else teacher_steps
    if isinstance(teacher_steps, bool) or not isinstance(teacher_steps, int) \
            or teacher_steps < steps or teacher_steps % steps:
        raise ValueError(f"teacher_steps must be a multiple of steps ({steps}): the teacher's "
                         f"grid has to land on the student's, got {teacher_steps!r}")
    return teacher_steps // steps


def stochastic_state_path(checkpoint_dir, steps: int) -> Path:
    """Where `distill_stochastic` keeps the N-step student's training state (N = `steps`)."""
    return Path(checkpoint_dir) / f"stochastic-{steps:05d}.state"


def distill_stochastic(teacher, data, *, steps: int, teacher_steps: int | None = None,
                       w_min: float = 0.0, w_max: float = 4.0, updates: int = 400,
                       batch_size: int = 128, lr: float = 2e-4, weighting: str = "snr_trunc",
                       ema_decay: float = 0.995, grad_clip: float = 1.0,
                       schedule: Schedule | None = None, autocast=None, seed: int = 0,
                       progress: bool = True, device=None, heldout_size: int = 256,
                       eval_every: int | None = None, compile: bool = False, policy=None,
                       checkpoint_dir=None, checkpoint_every: int = 200, rank: int = 0,
                       world_size: int = 1, wrap_student=None,
                       max_skips: int = 20) -> RoundResult:
    """A student for the stochastic N-step sampler (the paper's variant of stage 2).

    The stochastic sampler evaluates the student at t = i/N but steps 2/N (to (i−2)/N) for
    i ≥ 2, and 1/N (to 0) for i = 1. `teacher` is a w-conditioned stage-2 student on a grid of
    `teacher_steps` = k·N steps (default: its `sample_steps`, the grid it was distilled for);
    as in the paper, pass the 2N-step student (k = 2: four of its steps per 2/N, two for the
    last step). k = 1 (the N-step student itself, two of its steps per 2/N) is cheaper and
    inherits that student's error. The new student starts as a copy of the teacher and learns
    `stochastic_target` (ṽ of the teacher's k- or 2k-step span) with w ~ U[w_min, w_max] per
    example and the PD loss (`distill_loss`, `weighting`); an update costs 2k teacher passes.

    The loop is the shared runner (`fastdiff.training.runner.run`): lr is annealed linearly
    to 0; update k's randomness is a pure function of (seed, "guided-stochastic<N>", k);
    eval_every: updates between held-out measures of the EMA student (default: only at the
    end; the untrained copy is always measured), on `heldout_size` fixed held-out examples;
    checkpoint_dir: the training state is written atomically to
    `checkpoint_dir/stochastic-<N>.state` (N zero-padded to 5 digits) every
    `checkpoint_every` updates and at the end, and a rerun with the same settings (teacher
    weights and data included) resumes from it; rank, world_size, wrap_student: data
    parallelism as in `fastdiff.methods.pd.distill_round` (batch_size is the global batch);
    max_skips: consecutive non-finite updates (each skipped) before `NonFiniteError`.

    Returns RoundResult(student = EMA weights, steps = N, teacher_steps = kN, history with the
    held-out mismatch before and after).
    """
    from fastdiff.engine.data import as_dataset

    w_min, w_max = check_w_range(w_min, w_max)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an integer >= 2 (the stochastic sampler needs at "
                         f"least two steps), got {steps!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    if isinstance(heldout_size, bool) or not isinstance(heldout_size, int) or heldout_size < 1:
        raise ValueError(f"heldout_size must be a positive integer, got {heldout_size!r}")
    config = RunConfig(
        updates=updates, batch_size=batch_size, lr=lr, ema_decay=ema_decay,
        grad_clip=grad_clip, seed=seed, eval_every=updates if eval_every is None else eval_every,
        checkpoint=stochastic_state_path(checkpoint_dir, steps) if checkpoint_dir is not None
        else None, checkpoint_every=checkpoint_every, max_skips=max_skips,
        autocast=autocast, compile=compile, policy=policy, progress=progress, rank=rank,
        world_size=world_size, wrap_student=wrap_student)
    config.check()
    dataset = as_dataset(data)
    _needs_labels(teacher, dataset)
    if "w" not in getattr(_unwrap(teacher), "scalar_conds", ()):
        raise ValueError("teacher has no scalar condition 'w': pass a stage-2 student")
    if teacher_steps is None:
        teacher_steps = getattr(_unwrap(teacher), "sample_steps", None)
        if teacher_steps is None:
            raise ValueError("teacher_steps: the teacher has no `sample_steps`; say which grid "
                             "it was distilled for (2 * steps for the paper's variant)")
    _substeps(steps, teacher_steps)
    schedule = schedule or getattr(teacher, "schedule", None) or CosineSchedule()
    device = torch.device(device) if device is not None else model_device(teacher)
    config.device = device
    teacher_module = _unwrap(teacher)
    teacher_module.eval().requires_grad_(False)
    student = copy.deepcopy(teacher_module)
    teacher = checked_output(teacher, "teacher")
    draw_w = w_sampler(w_min, w_max)
    examples = dataset.train
    labels, conds, _ = _split_conds(dataset, "train")
    held: list = []

    def held_out():
        """A fixed held-out batch with its targets (the teacher's passes, once)."""
        if not held:
            gen = update_generator(seed, f"guided-stochastic-heldout{steps}", 0)
            size = min(heldout_size, len(dataset.held_out))
            y, conds, _ = _split_conds(dataset, "held_out")
            b = draw_batch(dataset.held_out[:size], None if y is None else y[:size], steps,
                           size, gen, schedule, label_dropout=0.0, use_labels=y is not None,
                           device=device, extra_cond=draw_w,
                           conds={k: v[:size] for k, v in (conds or {}).items()})
            held.append((b, *stochastic_target(teacher, b.z_t, b.t, b.cond, steps, schedule,
                                               teacher_steps=teacher_steps)))
        return held[0]

    def draw(gen, n):
        return draw_batch(examples, labels, steps, n, gen, schedule, label_dropout=0.0,
                          use_labels=labels is not None, extra_cond=draw_w, conds=conds)

    def loss(model, b, teacher) -> torch.Tensor:   # teacher: the runner's prepared one
        cond = b.cond
        phi_t, target = stochastic_target(teacher, b.z_t, b.t, cond, steps, schedule,
                                          teacher_steps=teacher_steps)
        with phase("student_forward"):
            v_s = model(b.z_t, b.t.float(), **cond)
        with phase("target"):
            return distill_loss(v_s.to(b.z_t.dtype), target, phi_t, weighting=weighting)

    def measure(model) -> float:  # the weighted mismatch on the held-out batch
        b, phi, target = held_out()
        v = model(b.z_t, b.t.float(), **b.cond)
        return float(distill_loss(v.to(target.dtype), target, phi, weighting=weighting))

    settings = {"steps": steps, "teacher_steps": teacher_steps, "w_min": w_min,
                "w_max": w_max, "weighting": weighting, "heldout_size": heldout_size,
                "schedule": schedule.config, "teacher": fingerprint_tensors(teacher_module),
                "data": fingerprint_tensors(examples, labels, dataset.held_out,
                                            dataset.held_out_labels, *_cond_tensors(dataset))}
    def inputs(b):
        call = ((b.z_t, b.t.float()), b.cond)
        return call, call

    method = Method(name=f"guided-stochastic{steps}", student=student, draw=draw, loss=loss,
                    settings=settings, measure=measure, teacher=teacher_module,
                    teacher_calls=2 * _substeps(steps, teacher_steps), inputs=inputs)
    result = run(method, config, history=RoundHistory())
    out = result.student
    out.schedule = schedule
    out.sample_steps = steps
    return RoundResult(student=out, steps=steps, teacher_steps=teacher_steps,
                       history=result.history)
