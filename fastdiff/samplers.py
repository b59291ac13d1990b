"""Samplers: from noise z₁ to data x₀ with a v-prediction model.

Every sampler walks a decreasing time grid 1 = t₀ > t₁ > … > t_N = 0 and calls the model
once per step (twice for Heun, ×2 batch for classifier-free guidance). The DDIM step is the
rotation `fastdiff.kernels.ddim_step`, written once there.

    sample(model, noise, steps, *, sampler="ddim", schedule=None, cond=None,
           guidance=None, generator=None) -> x

- "ddim": deterministic, exact for a model whose x̂ is constant along the step.
- "ddpm": ancestral sampling (the posterior q(z_s | z_t, x̂)), stochastic.
- "euler": Euler on the probability-flow ODE in φ, dz/dφ = v̂ (first order).
- "heun": Heun's method (EDM's 2nd order) on the ODE in the variance-exploding variables
  (z/α, σ/α), whose first-order step is DDIM; the last step is a plain DDIM step.
- "dpmpp_2m", "dpmpp_3m": DPM-Solver++ multistep (data prediction), in `fastdiff.solvers`.
- "stochastic": the N-step sampler of Meng et al. for distilled models, in `fastdiff.guided`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fastdiff.kernels import ddim_step
from fastdiff.profiling import phase
from fastdiff.schedules import CosineSchedule, Schedule, per_sample

SAMPLERS = ("ddim", "ddpm", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "stochastic")


def time_grid(steps: int, schedule: Schedule | None = None, *, spacing: str = "uniform_t",
              sigma_min: float = 0.006, sigma_max: float | None = None,
              rho: float = 7.0) -> torch.Tensor:
    """Decreasing times t₀ = 1 > … > t_N = 0, float64, shape (steps + 1,).

    spacing: "uniform_t" (t_i = 1 − i/N, what PD trains on); "uniform_lambda" (uniform in
    log-SNR between the VE levels σ_max and σ_min, then t = 0); "edm" (EDM's polynomial grid
    σ_i = (σ_max^{1/ρ} + i/(N−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ over σ = tan φ, then t = 0).
    With σ_max=None the grid starts at t = 1 exactly (σ = ∞); otherwise at σ_max.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    schedule = schedule or CosineSchedule()
    if spacing == "uniform_t":
        return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if spacing not in ("uniform_lambda", "edm"):
        raise ValueError(f"unknown spacing {spacing!r}; "
                         "expected 'uniform_t', 'uniform_lambda' or 'edm'")
    if sigma_min <= 0:
        raise ValueError(f"sigma_min must be positive, got {sigma_min}")
    hi = sigma_max if sigma_max is not None else 80.0
    if hi <= sigma_min:
        raise ValueError(f"sigma_max ({hi}) must exceed sigma_min ({sigma_min})")
    n = steps  # interior levels: the grid has σ_max … σ_min then 0
    i = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
    if spacing == "uniform_lambda":
        sig = torch.exp(math.log(hi) + i * (math.log(sigma_min) - math.log(hi)))
    else:
        sig = (hi ** (1 / rho) + i * (sigma_min ** (1 / rho) - hi ** (1 / rho))) ** rho
    if n == 1:
        sig = torch.tensor([hi], dtype=torch.float64)
    t = schedule.t_from_phi(torch.atan(sig))
    if sigma_max is None:
        t[0] = 1.0
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def guidance_inputs(model, cond: dict | None, guidance, batch: int) -> tuple[dict, object]:
    """How to sample `model` at guidance weight w: `(cond, guidance)` for `sample`.

    A guidance-distilled model (one with the scalar condition "w", `fastdiff.guided`) takes w
    as an input, cond["w"] = w for each of the `batch` examples: one pass per step. Any other
    model gets classifier-free guidance from `sample` (two passes per step). guidance None:
    unchanged.
    """
    cond = dict(cond or {})
    if guidance is not None and "w" in getattr(model, "scalar_conds", ()):
        cond["w"] = torch.full((batch,), float(guidance))
        return cond, None
    return cond, guidance


def guided_model(model: Callable, cond: dict | None, guidance) -> Callable:
    """Return f(z, t) -> v̂ with conditioning bound and classifier-free guidance applied.

    Guidance convention (Meng et al.): v̂^w = (1 + w) v̂(z, c) − w v̂(z, ∅), so w = 0 is the
    plain conditional model. The null condition is the label −1. Both passes run as one
    batch of 2B.
    """
    cond = dict(cond or {})
    if guidance is None:
        return lambda z, t: model(z, t, **cond)
    if "y" not in cond:
        raise ValueError("guidance needs class labels: pass cond={'y': labels}")

    # the doubled conditioning is the same at every step: build it once
    both = {k: torch.cat([v, v]) if torch.is_tensor(v) and v.ndim > 0 else v
            for k, v in cond.items()}
    both["y"] = torch.cat([cond["y"], torch.full_like(cond["y"], -1)])
    w = torch.as_tensor(guidance, dtype=torch.float64)

    def f(z, t):
        out = model(torch.cat([z, z]), torch.cat([t, t]), **both)
        v_c, v_u = out.chunk(2)
        w_z = per_sample(w, z)
        return (1 + w_z) * v_c - w_z * v_u

    return f


def _model_t(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return t.to(device=z.device, dtype=torch.float32).expand(z.shape[0]).contiguous()


def _angles(phi: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return phi.to(device=z.device, dtype=torch.float64).expand(z.shape[0]).contiguous()


@torch.no_grad()
def sample(model: Callable, noise: torch.Tensor, steps: int, *, sampler: str = "ddim",
           schedule: Schedule | None = None, cond: dict | None = None, guidance=None,
           generator: torch.Generator | None = None, spacing: str = "uniform_t",
           return_nfe: bool = False, **options):
    """Draw samples x₀ of `noise`'s shape from z₁ = `noise` in `steps` steps.

    model: v-prediction model `model(z, t, **cond)`; noise: float (B, ...), the state at t = 1;
    cond: conditioning keywords (e.g. {"y": labels (B,) int64}); guidance: classifier-free
    guidance weight w (float or (B,) tensor; None = off); generator: the RNG for stochastic
    samplers (same generator state → same samples). Returns x (B, ...) in noise's dtype, and
    with `return_nfe=True` the pair (x, number of network evaluations per sample; a guided
    pass counts as 2).
    """
    if not torch.is_tensor(noise) or not noise.is_floating_point():
        raise TypeError("noise must be a floating tensor of shape (B, ...)")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    schedule = schedule or getattr(model, "schedule", None) or CosineSchedule()
    f = guided_model(model, cond, guidance)
    passes = 1 if guidance is None else 2
    with phase("sample"):
        if sampler in ("dpmpp_2m", "dpmpp_3m"):
            from fastdiff.solvers import dpmpp_sample

            x, nfe = dpmpp_sample(f, noise, steps, order=int(sampler[-2]), schedule=schedule,
                                  spacing=spacing, **options)
        elif sampler == "stochastic":
            from fastdiff.guided import stochastic_sample

            x, nfe = stochastic_sample(f, noise, steps, schedule=schedule, generator=generator)
        else:
            grid = time_grid(steps, schedule, spacing=spacing, **options)
            step = {"ddim": _ddim, "ddpm": _ddpm, "euler": _euler, "heun": _heun}[sampler]
            x, nfe = step(f, noise, grid, schedule, generator)
    return (x, nfe * passes) if return_nfe else x


def _ddim(f, z, grid, schedule, generator):
    phis = schedule.phi(grid)
    for i in range(len(grid) - 1):
        v = f(z, _model_t(grid[i], z))
        z = ddim_step(z, v, _angles(phis[i], z), _angles(phis[i + 1], z))
    return z, len(grid) - 1


def _ddpm(f, z, grid, schedule, generator):
    """Ancestral step t → s: z_s ~ N(μ, c²) with the VP posterior given x̂ (σ_s = 0 at the end)."""
    for i in range(len(grid) - 1):
        t, s = grid[i], grid[i + 1]
        a_t, s_t = schedule.alpha(t), schedule.sigma(t)
        a_s, s_s = schedule.alpha(s), schedule.sigma(s)
        v = f(z, _model_t(t, z))
        x_hat = (a_t * z.double() - s_t * v.double())
        a_ts = a_t / a_s  # α_{t|s}
        var_ts = s_t**2 - a_ts**2 * s_s**2  # σ²_{t|s}
        mean = (a_ts * s_s**2 / s_t**2) * z.double() + (a_s * var_ts / s_t**2) * x_hat
        std = torch.sqrt(torch.clamp(var_ts * s_s**2 / s_t**2, min=0.0))
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=torch.float64)
        z = (mean + std * noise).to(z.dtype)
    return z, len(grid) - 1


def _euler(f, z, grid, schedule, generator):
    phis = schedule.phi(grid)
    for i in range(len(grid) - 1):
        v = f(z, _model_t(grid[i], z))
        z = (z.double() + (phis[i + 1] - phis[i]) * v.double()).to(z.dtype)
    return z, len(grid) - 1


def _heun(f, z, grid, schedule, generator):
    """EDM's Heun in VE variables x_ve = z/α, σ_ve = tan φ: d x_ve/dσ_ve = (x_ve − x̂)/σ_ve.

    The step from t = 1 (σ_ve = ∞) and the step to t = 0 are taken as DDIM steps (first order),
    as EDM does for its last step.
    """
    phis = schedule.phi(grid)
    nfe = 0
    for i in range(len(grid) - 1):
        p_t, p_s = phis[i], phis[i + 1]
        v = f(z, _model_t(grid[i], z))
        nfe += 1
        z_euler = ddim_step(z, v, _angles(p_t, z), _angles(p_s, z))
        if p_s <= 0 or p_t >= math.pi / 2:
            z = z_euler
            continue
        v2 = f(z_euler, _model_t(grid[i + 1], z))
        nfe += 1
        # Derivatives in VE space: d = (x_ve − x̂)/σ_ve = ε̂ / α ... expressed through v.
        a_t, s_t, a_s, s_s = torch.cos(p_t), torch.sin(p_t), torch.cos(p_s), torch.sin(p_s)
        eps1 = s_t * z.double() + a_t * v.double()
        eps2 = s_s * z_euler.double() + a_s * v2.double()
        x_ve = z.double() / a_t + (torch.tan(p_s) - torch.tan(p_t)) * 0.5 * (eps1 + eps2)
        z = (a_s * x_ve).to(z.dtype)
    return z, nfe
