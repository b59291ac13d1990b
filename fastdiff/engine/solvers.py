"""ODE solvers for the probability-flow ODE: DPM-Solver++ (2M, 3M) and one-interval solves.

Notation (DESIGN.md §2): α = cos φ, σ = sin φ, data prediction x̂ = α z − σ v̂. DPM-Solver++
(Lu et al., 2022) works in the half log-SNR ℓ = log(α/σ) = −log tan φ (our λ is 2ℓ) and
integrates the exact linear part, so with h = ℓ_s − ℓ_t one step t → s reads

    z_s = (σ_s/σ_t) z_t − α_s·expm1(−h)·D,        e^{−h} = tan φ_s / tan φ_t,

where D is x̂_t (order 1, which is exactly DDIM) or a multistep correction built from the
previous x̂'s (orders 2, 3). e^{−h} is formed as a ratio of tangents so the steps from
t = 1 (tan φ = ∞) and to t = 0 (tan φ = 0) stay finite.

Lower order (as the paper recommends for few steps): the k-th step uses at most k previous
evaluations (warm-up), a step from t = 1 or to t = 0 is first order (h is infinite, the
multistep differences carry no information), and with fewer than 15 steps the last steps
use order min(order, steps left) ("lower_order_final").

Analytical first step (AFS, Zhou et al. 2024): at σ_max the data are negligible next to
the noise, so ε̂ ≈ x_ve/√(1+σ_ve²) in VE terms (x_ve = z/α, σ_ve = tan φ), i.e. ε̂ = z in
VP terms: the first step is a DDIM step with x̂ = (z − σ ε̂)/α = z (1 − σ)/α and no network
call. Its x̂ is not put in the multistep history (it is a guess, not a model output).

NFE counts returned here are per sample and for one pass of `f` (the caller multiplies by
2 under classifier-free guidance).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fastdiff.engine import steppers
from fastdiff.engine.grids import interval_grid, time_grid
from fastdiff.engine.schedules import CosineSchedule, Schedule

METHODS = ("dpmpp_3m", "dpmpp_2m", "heun", "ddim", "euler")






# --------------------------------------------------------------------------- one step
def _tan(phi: float) -> float:
    # tan(π/2) in float64 is 1.6e16, not inf; call it inf so e^{−h} is exactly 0 there.
    return math.inf if phi >= math.pi / 2 else math.tan(phi)


def _ell(phi: float) -> float:
    """ℓ = log(α/σ) = −log tan φ (±inf at the ends)."""
    tn = _tan(phi)
    if tn == 0.0:
        return math.inf
    return -math.log(tn)


def _model_t(t: float, z: torch.Tensor) -> torch.Tensor:
    return torch.full((z.shape[0],), float(t), dtype=torch.float32, device=z.device)


def dpmpp_update(z: torch.Tensor, phi_t: float, phi_s: float, history: list,
                 order: int) -> torch.Tensor:
    """One DPM-Solver++ multistep step φ_t → φ_s (float64 math, output in z's dtype).

    history: list of (ℓ_i, x̂_i) with the newest (at φ_t) last; x̂ float64 (B, ...).
    order: 1, 2 or 3; it is lowered to what the history and the step allow.
    """
    ell_t, ell_s = _ell(phi_t), _ell(phi_s)
    tan_t, tan_s = _tan(phi_t), _tan(phi_s)
    sig_t, sig_s, a_s = math.sin(phi_t), math.sin(phi_s), math.cos(phi_s)
    e_mh = 0.0 if (tan_s == 0.0 or math.isinf(tan_t)) else tan_s / tan_t  # e^{−h}
    h = ell_s - ell_t
    # Usable history: consecutive finite ℓ's ending at φ_t; finite h.
    usable = 1
    while usable < len(history) and math.isfinite(history[-usable - 1][0]):
        usable += 1
    order = 1 if not math.isfinite(h) else min(order, usable)
    m0 = history[-1][1]
    phi1 = e_mh - 1.0  # expm1(−h)
    if order == 1:
        x_part = -a_s * phi1 * m0
    elif order == 2:
        ell_p1, m1 = history[-2]
        r0 = (ell_t - ell_p1) / h
        # The paper's 2M: D = (1 + 1/(2r)) x̂_t − 1/(2r) x̂_{t−1}
        d = m0 + (m0 - m1) / (2.0 * r0)
        x_part = -a_s * phi1 * d
    else:
        (ell_p2, m2), (ell_p1, m1) = history[-3], history[-2]
        h0, h1 = ell_t - ell_p1, ell_p1 - ell_p2
        r0, r1 = h0 / h, h1 / h
        d1_0 = (m0 - m1) / r0
        d1_1 = (m1 - m2) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        expm1 = math.expm1(-h)
        phi2 = expm1 / h + 1.0
        phi3 = phi2 / h - 0.5
        # Taylor x̂(ℓ_t + u) = x̂ + u x̂' + u²/2 x̂'' under σ_s∫e^{ℓ}: the three weights are
        # −α_s·expm1(−h), α_s·h·φ₂ and −α_s·h²·φ₃; D1 ≈ h x̂' and D2 ≈ h² x̂''/2, hence
        # the factor 2 on D2 (without it the step is only second order, checked in tests).
        x_part = -a_s * expm1 * m0 + a_s * phi2 * d1 - 2.0 * a_s * phi3 * d2
    ratio = sig_s / sig_t if sig_t > 0 else 0.0
    return (ratio * z.double() + x_part).to(z.dtype)


def afs_x_hat(z: torch.Tensor, phi: float) -> torch.Tensor:
    """The analytical first step's x̂ = z (1 − σ)/α (ε̂ = z), float64; 0 at t = 1."""
    a, s = math.cos(phi), math.sin(phi)
    if phi >= math.pi / 2 or a <= 0:
        return torch.zeros_like(z, dtype=torch.float64)
    return z.double() * ((1.0 - s) / a)


def dpmpp_run(f: Callable, z: torch.Tensor, times: torch.Tensor, *, order: int = 3,
              schedule: Schedule | None = None, afs: bool = False,
              lower_order_final: bool = True, history: list | None = None):
    """DPM-Solver++ over a decreasing grid `times` (float64, (n+1,)). Returns (z, nfe).

    f(z, t) -> v̂ with t float32 (B,). `history` (a list, optional) is read and extended in
    place, so consecutive calls continue one multistep trajectory (SFD's teacher).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    schedule = schedule or CosineSchedule()
    history = [] if history is None else history
    phis = [float(p) for p in schedule.phi(times.to(torch.float64))]
    n = len(phis) - 1
    nfe = 0
    for i in range(n):
        if afs and i == 0:
            x_hat = afs_x_hat(z, phis[0])
            z = dpmpp_update(z, phis[0], phis[1], [(math.nan, x_hat)], 1)
            continue
        v = f(z, _model_t(float(times[i]), z))
        nfe += 1
        a, s = math.cos(phis[i]), math.sin(phis[i])
        history.append((_ell(phis[i]), a * z.double() - s * v.double()))
        del history[:-3]  # only the last three are ever read
        k = order
        if lower_order_final and n < 15:
            k = min(k, n - i)
        z = dpmpp_update(z, phis[i], phis[i + 1], history, k)
    return z, nfe


def dpmpp_sample(f: Callable, noise: torch.Tensor, steps: int, *, order: int = 3,
                 schedule: Schedule | None = None, spacing: str = "uniform_t",
                 afs: bool = False, lower_order_final: bool = True, times=None,
                 sigma_min: float = 0.006, sigma_max: float | None = None, rho: float = 7.0,
                 final_x: bool = True):
    """DPM-Solver++(2M/3M) sampling from `noise` (B, ...). Returns (x, nfe per sample).

    The grid is `grids.time_grid(steps, schedule, spacing=..., sigma_min, sigma_max, rho)`
    (ends at t = 0; the last step is first order), or `times` (a decreasing float64 grid,
    e.g. `sfd_grid(...)`, which may end at σ_min > 0: then x = z/α is returned when
    `final_x`). With `afs` the first step costs no network call (nfe = steps − 1).
    """
    schedule = schedule or CosineSchedule()
    if times is None:
        times = time_grid(steps, schedule, spacing=spacing, sigma_min=sigma_min,
                          sigma_max=sigma_max, rho=rho)
    times = torch.as_tensor(times, dtype=torch.float64)
    z, nfe = dpmpp_run(f, noise, times, order=order, schedule=schedule, afs=afs,
                       lower_order_final=lower_order_final)
    t_end = float(times[-1])
    if final_x and t_end > 0:
        z = (z.double() / math.cos(float(schedule.phi(t_end)))).to(z.dtype)
    return z, nfe


# --------------------------------------------------------------------------- one interval
def solve_interval(f: Callable, z: torch.Tensor, t_from: float, t_to: float, substeps: int,
                   method: str = "dpmpp_3m", *, schedule: Schedule | None = None,
                   spacing: str = "uniform_lambda", rho: float = 7.0,
                   history: list | None = None, afs: bool = False):
    """Integrate the probability-flow ODE from t_from to t_to in `substeps` steps.

    The SFD teacher: f(z, t) -> v̂ (conditioning bound); z (B, ...) at t_from. method:
    "dpmpp_3m", "dpmpp_2m", "heun" (EDM 2nd order, 2 NFE per step except a step to t = 0),
    "ddim" or "euler". For DPM-Solver++, pass the same `history` list across consecutive
    intervals to continue one multistep trajectory (without it each interval restarts at
    order 1). Returns (z at t_to in z's dtype, nfe).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not valid; expected one of {METHODS}")
    schedule = schedule or CosineSchedule()
    grid = interval_grid(t_from, t_to, substeps, schedule, spacing=spacing, rho=rho)
    if method.startswith("dpmpp"):
        # lower_order_final only at the end of the whole trajectory (t_to = 0 handles itself)
        return dpmpp_run(f, z, grid, order=int(method[-2]), schedule=schedule, afs=afs,
                         lower_order_final=False, history=history)
    if afs:
        raise ValueError("afs is implemented for the dpmpp methods only")
    step = {"ddim": steppers.ddim, "euler": steppers.euler, "heun": steppers.heun}[method]
    return step(f, z, grid, schedule, None)
