"""Time grids: where a sampler or a solver evaluates the model (float64, decreasing).

- `time_grid`: 1 = t₀ > … > t_N = 0, uniform in t (what PD trains on), in log-SNR, or EDM's
  ρ-polynomial over σ = tan φ;
- `sfd_grid`: the SFD/EDM student grid from σ_max to σ_min (no step to t = 0);
- `interval_grid`: the sub-steps a solver takes inside one interval.
"""

from __future__ import annotations

import math

import torch

from fastdiff.engine.schedules import CosineSchedule, Schedule

INTERVAL_SPACINGS = ("uniform_lambda", "uniform_t", "edm")


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


def sfd_grid(steps: int, schedule: Schedule | None = None, *, spacing: str = "edm",
             sigma_min: float = 0.006, sigma_max: float = 80.0, rho: float = 7.0,
             afs: bool = False) -> torch.Tensor:
    """The EDM/SFD grid: `steps` (+1 with AFS) intervals from σ_max down to σ_min, float64.

    Unlike `samplers.time_grid` there is no extra step to t = 0: the sample is read at
    σ_min (x = z/α there, as EDM does), so every network call moves the state. Returns
    times of shape (steps + 1,) or (steps + 2,) with `afs` (the first interval is the
    analytical step and costs no NFE). spacing: "edm" (ρ-polynomial in σ = tan φ),
    "uniform_lambda" or "uniform_t" (uniform in t between the two levels).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    schedule = schedule or CosineSchedule()
    intervals = steps + (1 if afs else 0)
    if spacing == "uniform_t":
        ends = torch.tensor([float(sigma_max), float(sigma_min)], dtype=torch.float64)
        t_hi, t_lo = (float(t) for t in schedule.t_from_phi(torch.atan(ends)))
        return torch.linspace(t_hi, t_lo, intervals + 1, dtype=torch.float64)
    # time_grid(n) gives n levels σ_max … σ_min then t = 0; drop the t = 0.
    return time_grid(intervals + 1, schedule, spacing=spacing, sigma_min=sigma_min,
                     sigma_max=sigma_max, rho=rho)[:-1].contiguous()


def interval_grid(t_from: float, t_to: float, substeps: int, schedule: Schedule, *,
                  spacing: str = "uniform_lambda", rho: float = 7.0) -> torch.Tensor:
    """`substeps` + 1 times from t_from down to t_to (float64), spaced by `spacing`.

    "uniform_lambda" needs both ends strictly inside (0, 1); where an end is t = 0 or t = 1
    it falls back to "edm" (ρ-polynomial in σ = tan φ, fine at σ = 0) or, from t = 1
    (σ = ∞), to "uniform_t".
    """
    if spacing not in INTERVAL_SPACINGS:
        raise ValueError(f"spacing={spacing!r} is not valid; expected one of {INTERVAL_SPACINGS}")
    if not isinstance(substeps, int) or substeps < 1:
        raise ValueError(f"substeps must be a positive integer, got {substeps!r}")
    t_from, t_to = float(t_from), float(t_to)
    if not t_from > t_to:
        raise ValueError(f"t_from ({t_from}) must be above t_to ({t_to})")
    s_hi = math.tan(float(schedule.phi(t_from)))
    s_lo = math.tan(float(schedule.phi(t_to)))
    infinite_top = t_from >= 1.0 or not math.isfinite(s_hi) or s_hi > 1e8
    if spacing == "uniform_lambda" and (s_lo <= 0 or infinite_top):
        spacing = "uniform_t" if infinite_top else "edm"
    if spacing == "edm" and infinite_top:
        spacing = "uniform_t"
    i = torch.arange(substeps + 1, dtype=torch.float64) / substeps
    if spacing == "uniform_t":
        t = t_from + i * (t_to - t_from)
    else:
        if spacing == "uniform_lambda":
            sig = torch.exp(math.log(s_hi) + i * (math.log(s_lo) - math.log(s_hi)))
        else:
            sig = (s_hi ** (1 / rho) + i * (s_lo ** (1 / rho) - s_hi ** (1 / rho))) ** rho
        t = schedule.t_from_phi(torch.atan(sig))
    t[0], t[-1] = t_from, t_to  # exact ends (the round trip through tan is not)
    return t
