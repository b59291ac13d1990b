"""The pieces the runner (`fastdiff.training.runner`) trains with: the EMA of weights, the
optimizer, the autocast policy, optional torch.compile, the progress bar, the LR schedule.
"""

from __future__ import annotations

import contextlib
import copy
import time

import torch
from torch import nn


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
    def update(self, model: nn.Module, ok: torch.Tensor | None = None) -> None:
        """One EMA step; with `ok` (a 0-d bool tensor) the step's weight is (1 − decay)·ok,
        so a skipped update leaves the EMA as it was without a host sync."""
        src = _unwrap(model)
        ema_p = [p for p in self.shadow.parameters()]
        cur_p = [p.detach() for p in src.parameters()]
        if ok is None:
            torch._foreach_lerp_(ema_p, cur_p, 1.0 - self.decay)
        else:
            weight = ok.to(device=ema_p[0].device, dtype=torch.float32) * (1.0 - self.decay)
            torch._foreach_lerp_(ema_p, cur_p, weight)
        for b_ema, b in zip(self.shadow.buffers(), src.buffers()):
            if ok is None:
                b_ema.copy_(b)
            else:
                b_ema.copy_(torch.where(ok, b, b_ema))


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind torch.compile / DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)




def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    params = list(model.parameters())
    # fused AdamW (one kernel for all parameters) exists for CPU and CUDA float tensors; it
    # also takes the runner's non-finite flag as `found_inf`, skipping without a host sync
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99),
                             fused=fused or None)


def autocast_name(device: torch.device, autocast: str | None | bool) -> str:
    """"bf16" or "fp32": what `autocast` means on `device` (None = bf16 on CUDA devices that
    support it, fp32 elsewhere)."""
    if autocast is None:
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if autocast in (False, "none", "fp32"):
        return "fp32"
    if autocast not in (True, "bf16"):
        raise ValueError(f"autocast must be 'bf16', 'fp32' or None, got {autocast!r}")
    return "bf16"


def autocast_for(device: torch.device, autocast: str | None | bool):
    """bf16 autocast where asked (see `autocast_name`), else a no-op context."""
    if autocast_name(device, autocast) == "fp32":
        return contextlib.nullcontext()
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








