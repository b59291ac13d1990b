"""Training pieces shared by teacher training and every distillation method.

EMA of weights, the optimizer, the autocast policy, optional torch.compile, the progress
bar, and `train_teacher` itself (continuous t ~ U(0, 1), v-prediction, v-MSE).
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from fastdiff.engine.nvtx import phase
from fastdiff.engine.schedules import CosineSchedule, Schedule, per_sample


class EMA:
    """Exponential moving average of a model's parameters (buffers copied as they are).

    `shadow` is a frozen deep copy in eval mode; `update()` does
    θ_ema ← decay·θ_ema + (1 − decay)·θ in one fused foreach call.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = copy.deepcopy(_unwrap(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = _unwrap(model)
        ema_p = [p for p in self.shadow.parameters()]
        cur_p = [p.detach() for p in src.parameters()]
        torch._foreach_lerp_(ema_p, cur_p, 1.0 - self.decay)
        for b_ema, b in zip(self.shadow.buffers(), src.buffers()):
            b_ema.copy_(b)


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind torch.compile / DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def optimizer_update(loss: torch.Tensor, model: nn.Module, opt: torch.optim.Optimizer,
                     ema: EMA | None, grad_clip: float | None) -> None:
    """One update from a loss: backward, gradient-norm clipping, optimizer step, EMA.

    `model` is the plain module (not a compile/DDP wrapper), so clipping and the EMA see the
    gradients after any all-reduce. Each part is an NVTX phase.
    """
    with phase("backward"):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    with phase("optimizer_step"):
        opt.step()
    if ema is not None:
        with phase("ema"):
            ema.update(model)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                             betas=(0.9, 0.99), fused=fused or None)


def autocast_for(device: torch.device, autocast: str | None | bool):
    """bf16 autocast where asked ("bf16", or None = on for CUDA devices that support bf16)."""
    if autocast is None:
        autocast = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else False
    if autocast in (False, "none", "fp32"):
        return contextlib.nullcontext()
    if autocast not in (True, "bf16"):
        raise ValueError(f"autocast must be 'bf16', 'fp32' or None, got {autocast!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def maybe_compile(model: nn.Module, compile: bool | str):
    """torch.compile the model when asked; returns the callable to train with."""
    if not compile:
        return model
    mode = compile if isinstance(compile, str) else None
    return torch.compile(model, mode=mode)


def model_device(model) -> torch.device:
    try:
        return next(_unwrap(model).parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cpu")


class Progress:
    """A tqdm bar with loss and samples/s (silent when `enabled` is False)."""

    def __init__(self, total: int, desc: str, enabled: bool = True, initial: int = 0):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True,
                            leave=True)
        self.t0 = time.perf_counter()
        self.seen = 0

    def update(self, n_samples: int, **fields) -> None:
        self.seen += n_samples
        if self.bar is not None:
            rate = self.seen / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix({**{k: f"{v:.4g}" for k, v in fields.items()},
                                  "samples/s": f"{rate:.0f}"}, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def linear_lr(step: int, total: int, warmup: int = 0) -> float:
    """LR multiplier: linear warm-up over `warmup` steps, then linear decay to 0 at `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    return max(0.0, 1.0 - step / max(total, 1))


LOG_EVERY = 10  # updates between loss read-backs (each one a device sync on CUDA)


def check_global_batch(batch_size: int, world_size: int) -> None:
    """batch_size is the global batch across ranks: each of `world_size` ranks takes an equal
    slice of it, so it must divide evenly."""
    if batch_size % world_size:
        raise ValueError(f"batch_size ({batch_size}) must be divisible by the world size "
                         f"({world_size}): it is the global batch")


def flush_losses(pending: list, into: list, world_size: int = 1) -> None:
    """Move pending per-update losses (device scalars, averaged over ranks) into `into` as
    floats. Training loops collect `loss.detach()` and call this every LOG_EVERY updates, so
    that reading losses back does not sync a GPU every update."""
    if not pending:
        return
    losses = torch.stack(pending).float()
    if world_size > 1:
        from fastdiff.engine.parallel import all_reduce_mean

        losses = all_reduce_mean(losses)
    into.extend(losses.tolist())
    pending.clear()


@dataclass
class TeacherHistory:
    loss: list = field(default_factory=list)
    wall_time: float = 0.0
    samples_per_s: float = 0.0


def teacher_loss(model, x: torch.Tensor, y, schedule: Schedule, generator=None, *,
                 rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """v-MSE at t ~ U(0, 1): the "snr+1" weighting of the PD paper.

    With world_size K, x is this rank's slice of a global batch of K·B examples: t and ε
    are drawn for the global batch and sliced alike, so K ranks draw what one process does.
    """
    b = x.shape[0]
    sl = slice(rank * b, (rank + 1) * b)
    t = torch.rand(b * world_size, generator=generator, dtype=torch.float64)[sl].to(x.device)
    eps = torch.randn((b * world_size, *x.shape[1:]), generator=generator)[sl]
    eps = eps.to(x.device, x.dtype)
    a, s = schedule.alpha(t), schedule.sigma(t)
    z = per_sample(a, x) * x + per_sample(s, x) * eps
    v = per_sample(a, x) * eps - per_sample(s, x) * x
    cond = {} if y is None else {"y": y}
    v_hat = model(z, t.to(torch.float32), **cond)
    return torch.mean((v_hat.float() - v.float()) ** 2)


def train_teacher(model: nn.Module, data, *, updates: int, batch_size: int, lr: float,
                  weight_decay: float = 0.0, ema_decay: float = 0.999, grad_clip: float = 1.0,
                  label_dropout: float = 0.1, schedule: Schedule | None = None,
                  warmup: int = 100, autocast=None, compile: bool = False, seed: int = 0,
                  progress: bool = True, device=None, rank: int = 0, world_size: int = 1,
                  wrap_model=None) -> nn.Module:
    """Train a v-prediction diffusion model on `data`; returns its EMA copy (eval mode).

    data: a tensor (N, ...), an (examples, labels) pair, a `fastdiff.engine.data.Dataset` or a
    dataset name. Class labels (if any, and if the model has `num_classes > 0`) are replaced by
    the null label −1 with probability `label_dropout`, so the model also learns the
    unconditional v̂ for classifier-free guidance. The returned model carries `.schedule` and
    `.train_history` (loss per update, wall time in s, samples/s).

    Data parallel (under torchrun, see fastdiff.engine.parallel): batch_size is the global batch;
    rank r of world_size trains on its slice of every global batch (same draws as one
    process), `wrap_model` wraps the training module (e.g. `ddp_wrapper(device)`), the
    logged loss is averaged over ranks and only rank 0 shows progress.
    """
    from fastdiff.engine.data import as_dataset

    if updates < 1 or batch_size < 1:
        raise ValueError(f"updates and batch_size must be >= 1, got {updates}, {batch_size}")
    if not 0.0 <= label_dropout < 1.0:
        raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
    check_global_batch(batch_size, world_size)
    per = slice(rank * (batch_size // world_size), (rank + 1) * (batch_size // world_size))
    schedule = schedule or getattr(model, "schedule", None) or CosineSchedule()
    device = torch.device(device) if device is not None else model_device(model)
    model = model.to(device).train()
    dataset = as_dataset(data)
    use_labels = dataset.num_classes > 0 and getattr(model, "num_classes", 0) > 0
    gen = torch.Generator().manual_seed(seed)
    batches = dataset.batches(batch_size, generator=torch.Generator().manual_seed(seed + 1))
    opt = make_optimizer(model, lr, weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: linear_lr(k, updates, warmup))
    ema = EMA(model, ema_decay)
    step_fn = maybe_compile(model, compile)
    if wrap_model is not None:  # e.g. DistributedDataParallel
        step_fn = wrap_model(step_fn)
    history = TeacherHistory()
    bar = Progress(updates, "teacher", progress and rank == 0)
    t0 = time.perf_counter()
    pending: list = []
    for _ in range(updates):
        with phase("data"):
            x, y = next(batches)
            x = x[per].to(device, non_blocking=True)
            if use_labels and y is not None:
                drop = torch.rand(y.shape, generator=gen) < label_dropout
                y = torch.where(drop, torch.full_like(y, -1), y)[per].to(device)
            else:
                y = None
        with phase("student_forward"), autocast_for(device, autocast):
            loss = teacher_loss(step_fn, x, y, schedule, gen, rank=rank, world_size=world_size)
        optimizer_update(loss, model, opt, ema, grad_clip)
        sched.step()
        pending.append(loss.detach())
        if len(pending) == LOG_EVERY:  # a loss read-back syncs a GPU: batch them
            flush_losses(pending, history.loss, world_size)
        bar.update(batch_size, **({"loss": history.loss[-1]} if history.loss else {}))
    flush_losses(pending, history.loss, world_size)
    bar.close()
    history.wall_time = time.perf_counter() - t0
    history.samples_per_s = updates * batch_size / history.wall_time
    out = ema.shadow
    out.schedule = schedule
    out.train_history = history
    return out
