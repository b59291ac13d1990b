"""Input validation for the public kernel functions.

Everything here runs on the host before any kernel is launched, and every message names
the offending argument and what was expected.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

WEIGHTINGS = ("snr_trunc", "snr+1", "const")
METRICS = ("l2", "l1", "pseudo_huber")


def check_data(name: str, x) -> torch.Tensor:
    """A batched floating tensor ``(B, ...)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name}: expected a floating tensor (float32, bfloat16 or float16), got {x.dtype}"
        )
    if x.dim() == 0:
        raise ValueError(f"{name}: expected a batched tensor of shape (B, ...), got a 0-d tensor")
    return x


def check_like(ref_name: str, ref: torch.Tensor, name: str, x) -> torch.Tensor:
    """``x`` is a floating tensor with the shape and device of ``ref``."""
    check_data(name, x)
    if x.shape != ref.shape:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)} but {ref_name} has shape {tuple(ref.shape)}; "
            "expected the same shape"
        )
    if x.device != ref.device:
        raise ValueError(
            f"{name} is on {x.device} but {ref_name} is on {ref.device}; "
            "expected the same device"
        )
    return x


def check_same_dtype(ref_name: str, ref: torch.Tensor, name: str, x: torch.Tensor) -> None:
    if x.dtype != ref.dtype:
        raise TypeError(
            f"{name} has dtype {x.dtype} but {ref_name} has dtype {ref.dtype}; "
            "expected the same dtype"
        )


def check_choice(name: str, value, valid: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; expected one of {valid}")
    return value


def check_huber_c(huber_c) -> float:
    if isinstance(huber_c, bool) or not isinstance(huber_c, Real):
        raise TypeError(f"huber_c: expected a positive float, got {type(huber_c).__name__}")
    value = float(huber_c)
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"huber_c: expected a positive finite float, got {value}")
    return value


def check_nonempty(name: str, x: torch.Tensor) -> None:
    if x.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(x.shape)}")


def angles(name: str, phi, batch: int, device: torch.device) -> torch.Tensor:
    """Per-sample angles as a float64 tensor of shape ``(batch,)`` on ``device``.

    Accepts a Python number, a 0-d tensor or a ``(batch,)`` tensor; float32 is upcast
    to float64 *before* any difference is taken. Angles carry no gradient.
    """
    if isinstance(phi, torch.Tensor):
        if not phi.is_floating_point():
            raise TypeError(
                f"{name}: expected a floating tensor of angles (float64 preferred), "
                f"got {phi.dtype}"
            )
        if phi.dim() != 0 and tuple(phi.shape) != (batch,):
            raise ValueError(
                f"{name}: expected a 0-d tensor or shape ({batch},) for a batch of {batch}, "
                f"got shape {tuple(phi.shape)}"
            )
        if phi.device != device and phi.device.type != "cpu":
            raise ValueError(
                f"{name} is on {phi.device} but the data is on {device}; "
                "expected the same device (or CPU angles)"
            )
        if phi.requires_grad:
            phi = phi.detach()
        if phi.dtype != torch.float64 or phi.device != device:  # no call where none is due
            phi = phi.to(device=device, dtype=torch.float64)
        return phi if phi.dim() else phi.expand(batch)
    if isinstance(phi, Real) and not isinstance(phi, bool):
        return torch.full((batch,), float(phi), dtype=torch.float64, device=device)
    raise TypeError(
        f"{name}: expected a float or a floating tensor of angles, got {type(phi).__name__}"
    )
