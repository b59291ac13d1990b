"""Variance-preserving noise schedules, written as an angle φ(t) ∈ [0, π/2].

Conventions (DESIGN.md §2): α = cos φ, σ = sin φ, λ = log(α²/σ²), z_t = α x + σ ε,
v = α ε − σ x. Every schedule maps t ∈ [0, 1] to φ monotonically with φ(0) ≈ 0 and
φ(1) ≈ π/2, and back. All functions accept tensors of any shape (or Python floats) and
compute in float64 unless given another floating dtype; angles handed to the kernels
should stay float64 (DESIGN.md §4).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

HALF_PI = math.pi / 2


def _as_tensor(t) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t if t.is_floating_point() else t.to(torch.float64)
    return torch.as_tensor(t, dtype=torch.float64)


class Schedule:
    """Base class: subclasses define `phi(t)` and `t_from_phi(phi)`; the rest follows."""

    name = "schedule"

    def phi(self, t) -> torch.Tensor:
        raise NotImplementedError

    def t_from_phi(self, phi) -> torch.Tensor:
        raise NotImplementedError

    def alpha(self, t) -> torch.Tensor:
        return torch.cos(self.phi(t))

    def sigma(self, t) -> torch.Tensor:
        return torch.sin(self.phi(t))

    def logsnr(self, t) -> torch.Tensor:
        """λ(t) = log(α²/σ²) = −2 log tan φ; +inf at φ = 0, −inf at φ = π/2."""
        return -2.0 * torch.log(torch.tan(self.phi(t)))

    def t_from_logsnr(self, logsnr) -> torch.Tensor:
        return self.t_from_phi(phi_from_logsnr(logsnr))

    def ve_sigma(self, t) -> torch.Tensor:
        """The variance-exploding noise level σ/α = tan φ (EDM's σ)."""
        return torch.tan(self.phi(t))

    @property
    def config(self) -> dict:
        fields = asdict(self) if hasattr(self, "__dataclass_fields__") else {}
        return {"name": self.name, **fields}

    def __call__(self, t):
        return self.phi(t)


def phi_from_logsnr(logsnr) -> torch.Tensor:
    """φ = atan(exp(−λ/2)), the angle of any VP schedule at log-SNR λ."""
    return torch.atan(torch.exp(-0.5 * _as_tensor(logsnr)))


@dataclass(frozen=True)
class CosineSchedule(Schedule):
    """φ = π t / 2: α₁ = 0 exactly (t = 1 is pure noise)."""

    name = "cosine"

    def phi(self, t) -> torch.Tensor:
        return HALF_PI * _as_tensor(t)

    def t_from_phi(self, phi) -> torch.Tensor:
        return _as_tensor(phi) / HALF_PI


@dataclass(frozen=True)
class LinearLogSNRSchedule(Schedule):
    """λ falls linearly from `logsnr_max` at t = 0 to `logsnr_min` at t = 1."""

    logsnr_min: float = -10.0
    logsnr_max: float = 10.0
    name = "linear_logsnr"

    def __post_init__(self):
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError(
                f"logsnr_min must be below logsnr_max, got {self.logsnr_min} >= {self.logsnr_max}"
            )

    def phi(self, t) -> torch.Tensor:
        lam = self.logsnr_max + _as_tensor(t) * (self.logsnr_min - self.logsnr_max)
        return phi_from_logsnr(lam)

    def t_from_phi(self, phi) -> torch.Tensor:
        lam = -2.0 * torch.log(torch.tan(_as_tensor(phi)))
        return (lam - self.logsnr_max) / (self.logsnr_min - self.logsnr_max)


SCHEDULES = {"cosine": CosineSchedule, "linear_logsnr": LinearLogSNRSchedule}


def register_schedule(name: str, cls) -> None:
    """Let `schedule_from_config` rebuild schedules whose `.config["name"]` is `name`
    (`cls(**config_without_name)`); registered by the layer that defines the schedule
    (fastdiff.integrations.diffusers registers "diffusers")."""
    if SCHEDULES.get(name, cls) is not cls:
        raise ValueError(f"schedule {name!r} is already registered")
    SCHEDULES[name] = cls


def schedule_from_config(config: dict | None) -> Schedule:
    """Rebuild a schedule from its `.config` (None gives the default cosine schedule)."""
    if config is None:
        return CosineSchedule()
    config = dict(config)
    name = config.pop("name", "cosine")
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; expected one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](**config)


# --- conversions between x, ε and v predictions -------------------------------------------
# α, σ are per-sample tensors of shape (B,) (or broadcastable); `per_sample` reshapes them
# against z of shape (B, ...).


def per_sample(a, z: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample value (B,) / 0-d / float to broadcast against z (B, ...)."""
    a = torch.as_tensor(a, device=z.device)
    if a.ndim == 0:
        return a.to(z.dtype)
    return a.to(z.dtype).reshape(a.shape[0], *([1] * (z.ndim - 1)))


def x_from_v(z, v, alpha, sigma):
    """x = α z − σ v."""
    return per_sample(alpha, z) * z - per_sample(sigma, z) * v


def eps_from_v(z, v, alpha, sigma):
    """ε = σ z + α v."""
    return per_sample(sigma, z) * z + per_sample(alpha, z) * v


def v_from_eps(z, eps, alpha, sigma):
    """v = (ε − σ z) / α; undefined at α = 0 (t = 1), where ε carries no information on x."""
    return (eps - per_sample(sigma, z) * z) / per_sample(alpha, z)


def v_from_x(z, x, alpha, sigma):
    """v = (α z − x) / σ; undefined at σ = 0 (t = 0), where z = x."""
    return (per_sample(alpha, z) * z - x) / per_sample(sigma, z)


def v_from_x_eps(x, eps, alpha, sigma):
    """v = α ε − σ x (the training target)."""
    return per_sample(alpha, x) * eps - per_sample(sigma, x) * x


def to_v(prediction: torch.Tensor, z: torch.Tensor, kind: str, alpha, sigma) -> torch.Tensor:
    """Convert a model output of `kind` ∈ {"v", "eps", "x"} to a v prediction."""
    if kind == "v":
        return prediction
    if kind == "eps":
        return v_from_eps(z, prediction, alpha, sigma)
    if kind == "x":
        return v_from_x(z, prediction, alpha, sigma)
    raise ValueError(f"unknown prediction kind {kind!r}; expected 'v', 'eps' or 'x'")
