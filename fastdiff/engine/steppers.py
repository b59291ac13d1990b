"""The fixed-grid sampling loops, one function each: `f(z, t) -> v̂` (conditioning bound),
the start state z, the decreasing float64 `grid`, the schedule and an optional generator;
each returns (z at the grid's end, network evaluations per sample).

- `ddim`: the deterministic rotation step (`fastdiff.kernels.ddim_step`);
- `ddpm`: ancestral sampling from the VP posterior q(z_s | z_t, x̂);
- `euler`: Euler on dz/dφ = v̂ (first order in φ; k-diffusion's "euler" is DDIM instead);
- `heun`: EDM's Heun in the variance-exploding variables;
- `stochastic_sample`: Meng et al.'s N-step sampler for distilled models (its own grid).
"""

from __future__ import annotations

import math

import torch

from fastdiff.engine.schedules import CosineSchedule, Schedule
from fastdiff.kernels import ddim_step


def model_t(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return t.to(device=z.device, dtype=torch.float32).expand(z.shape[0]).contiguous()


def angles(phi: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return phi.to(device=z.device, dtype=torch.float64).expand(z.shape[0]).contiguous()


def ddim(f, z, grid, schedule, generator):
    phis = schedule.phi(grid)
    for i in range(len(grid) - 1):
        v = f(z, model_t(grid[i], z))
        z = ddim_step(z, v, angles(phis[i], z), angles(phis[i + 1], z))
    return z, len(grid) - 1


def ddpm(f, z, grid, schedule, generator):
    """Ancestral step t → s: z_s ~ N(μ, c²) with the VP posterior given x̂ (σ_s = 0 at the end)."""
    for i in range(len(grid) - 1):
        t, s = grid[i], grid[i + 1]
        a_t, s_t = schedule.alpha(t), schedule.sigma(t)
        a_s, s_s = schedule.alpha(s), schedule.sigma(s)
        v = f(z, model_t(t, z))
        x_hat = (a_t * z.double() - s_t * v.double())
        a_ts = a_t / a_s  # α_{t|s}
        var_ts = s_t**2 - a_ts**2 * s_s**2  # σ²_{t|s}
        mean = (a_ts * s_s**2 / s_t**2) * z.double() + (a_s * var_ts / s_t**2) * x_hat
        std = torch.sqrt(torch.clamp(var_ts * s_s**2 / s_t**2, min=0.0))
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=torch.float64)
        z = (mean + std * noise).to(z.dtype)
    return z, len(grid) - 1


def euler(f, z, grid, schedule, generator):
    phis = schedule.phi(grid)
    for i in range(len(grid) - 1):
        v = f(z, model_t(grid[i], z))
        z = (z.double() + (phis[i + 1] - phis[i]) * v.double()).to(z.dtype)
    return z, len(grid) - 1


def heun(f, z, grid, schedule, generator):
    """EDM's Heun in VE variables x_ve = z/α, σ_ve = tan φ: d x_ve/dσ_ve = (x_ve − x̂)/σ_ve.

    The step from t = 1 (σ_ve = ∞) and the step to t = 0 are taken as DDIM steps (first order),
    as EDM does for its last step.
    """
    phis = schedule.phi(grid)
    nfe = 0
    for i in range(len(grid) - 1):
        p_t, p_s = phis[i], phis[i + 1]
        v = f(z, model_t(grid[i], z))
        nfe += 1
        z_euler = ddim_step(z, v, angles(p_t, z), angles(p_s, z))
        if p_s <= 0 or p_t >= math.pi / 2:
            z = z_euler
            continue
        v2 = f(z_euler, model_t(grid[i + 1], z))
        nfe += 1
        # Derivatives in VE space: d = (x_ve − x̂)/σ_ve = ε̂ / α ... expressed through v.
        a_t, s_t, a_s, s_s = torch.cos(p_t), torch.sin(p_t), torch.cos(p_s), torch.sin(p_s)
        eps1 = s_t * z.double() + a_t * v.double()
        eps2 = s_s * z_euler.double() + a_s * v2.double()
        x_ve = z.double() / a_t + (torch.tan(p_s) - torch.tan(p_t)) * 0.5 * (eps1 + eps2)
        z = (a_s * x_ve).to(z.dtype)
    return z, nfe


def _angle(schedule: Schedule, t: float, z: torch.Tensor) -> torch.Tensor:
    return schedule.phi(torch.full((z.shape[0],), float(t), dtype=torch.float64,
                                   device=z.device))


@torch.no_grad()
def stochastic_sample(f, noise: torch.Tensor, steps: int, *, schedule: Schedule | None = None,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """Meng et al.'s stochastic N-step sampler for distilled models.

    f: `f(z, t) -> v̂` with the conditioning bound (t float32 (B,)); noise: z₁ (B, ...);
    steps: N ≥ 1; generator: RNG of the fresh noise (same state → same samples).
    On the grid t_i = i/N, from t = i/N with i ≥ 2:

        z_u = rot(z_t, v̂(z_t, t), φ_u − φ_t)                u = (i − 2)/N  (DDIM, 2/N long)
        z_s = (α_s/α_u) z_u + sqrt(σ_s² − (α_s/α_u)² σ_u²) ξ  s = (i − 1)/N, ξ ~ N(0, I)

    (the VP forward process from u to s), and from t = 1/N one plain DDIM step to 0. One
    network pass per step: returns (x₀ in noise's dtype, N). The renoising coefficients are
    formed in float64 (α_u > 0 since u ≤ 1 − 2/N).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not torch.is_tensor(noise) or not noise.is_floating_point():
        raise TypeError("noise must be a floating tensor of shape (B, ...)")
    schedule = schedule or CosineSchedule()
    z = noise
    n = steps
    for i in range(n, 0, -1):
        t = i / n
        tt = torch.full((z.shape[0],), t, dtype=torch.float32, device=z.device)
        v = f(z, tt)
        phi_t = _angle(schedule, t, z)
        if i == 1:
            z = ddim_step(z, v, phi_t, _angle(schedule, 0.0, z))
            break
        u, s = (i - 2) / n, (i - 1) / n
        z_u = ddim_step(z, v, phi_t, _angle(schedule, u, z))
        phi_u, phi_s = (float(schedule.phi(torch.tensor(x, dtype=torch.float64))) for x in (u, s))
        ratio = math.cos(phi_s) / math.cos(phi_u)                     # α_{s|u} = α_s / α_u
        std = math.sqrt(max(math.sin(phi_s) ** 2 - ratio**2 * math.sin(phi_u) ** 2, 0.0))
        xi = torch.randn(z.shape, generator=generator, dtype=torch.float32,
                         device="cpu" if generator is None else generator.device)
        z = (ratio * z_u.float() + std * xi.to(z.device)).to(noise.dtype)
    return z, n
