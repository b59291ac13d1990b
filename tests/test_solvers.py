"""DPM-Solver++ and the one-interval solvers against the exact flow of Gaussian data.

For data x ~ N(μ, s²I) the VP marginal is z_t ~ N(α μ, (α² s² + σ²) I), the ideal
v-prediction is linear in z_t, v̂ = σ (α (1 − s²)/V_t (z − α μ) − μ) with V_t = α² s² + σ²,
and the probability-flow map is affine: z_s = α_s μ + √(V_s/V_t) (z_t − α_t μ).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastdiff.engine.grids import interval_grid, sfd_grid, time_grid
from fastdiff.engine.samplers import sample
from fastdiff.engine.schedules import CosineSchedule
from fastdiff.engine.solvers import _ell, dpmpp_sample, solve_interval

SCHED = CosineSchedule()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

MU, S = 0.4, 0.5


def gaussian_v(z, t, mu=MU, s=S):
    phi = (math.pi / 2) * t.double().view(-1, *([1] * (z.ndim - 1)))
    a, sg = torch.cos(phi), torch.sin(phi)
    var = a**2 * s**2 + sg**2
    return (sg * (a * (1 - s**2) / var * (z.double() - a * mu) - mu)).to(z.dtype)


class GaussianModel(torch.nn.Module):
    def forward(self, z, t, **cond):
        return gaussian_v(z, t)


def exact_flow(z, t0, t1, mu=MU, s=S):
    a0, s0 = math.cos(math.pi / 2 * t0), math.sin(math.pi / 2 * t0)
    a1, s1 = math.cos(math.pi / 2 * t1), math.sin(math.pi / 2 * t1)
    v0, v1 = a0**2 * s**2 + s0**2, a1**2 * s**2 + s1**2
    return a1 * mu + math.sqrt(v1 / v0) * (z - a0 * mu)


def t_of_sigma(sig):
    return float(SCHED.t_from_phi(torch.atan(torch.tensor(float(sig), dtype=torch.float64))))


T_FROM, T_TO = t_of_sigma(10.0), t_of_sigma(0.05)
Z0 = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
REF = exact_flow(Z0, T_FROM, T_TO)


def exact_history(method, n):
    """x̂ at the two grid points before T_FROM (same ℓ spacing), from the exact trajectory."""
    g = interval_grid(T_FROM, T_TO, n, SCHED, spacing="uniform_lambda")
    l0, l1 = (_ell(float(SCHED.phi(x))) for x in g[:2])
    hist = []
    for k in (2, 1):
        ell = l0 - k * (l1 - l0)
        phi = math.atan(math.exp(-ell))
        t = phi / (math.pi / 2)
        zk = exact_flow(Z0, T_FROM, t)
        v = gaussian_v(zk, torch.full((zk.shape[0],), t, dtype=torch.float64))
        hist.append((ell, math.cos(phi) * zk - math.sin(phi) * v))
    return hist


def fitted_order(method, steps, *, warm=False):
    errs = []
    for n in steps:
        hist = exact_history(method, n) if warm else None
        z, _ = solve_interval(gaussian_v, Z0, T_FROM, T_TO, n, method,
                              spacing="uniform_lambda", history=hist)
        errs.append(float((z - REF).abs().max()))
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    return slope, errs


@pytest.mark.parametrize("method,warm,lo,hi", [
    ("ddim", False, 0.85, 1.15),
    ("euler", False, 0.8, 1.4),
    ("heun", False, 1.8, 2.25),
    ("dpmpp_2m", False, 1.8, 2.25),
    ("dpmpp_3m", True, 2.8, 4.0),   # exact history: the multistep formula's own order
    ("dpmpp_3m", False, 1.8, 4.0),  # own warm-up (orders 1, 2 first): ≥ 2 globally
])
def test_order_against_exact_gaussian_flow(method, warm, lo, hi):
    steps = [16, 32, 64, 128]
    slope, errs = fitted_order(method, steps, warm=warm)
    print(f"\n{method} (exact warm-up={warm}): errors {[f'{e:.2e}' for e in errs]} "
          f"fitted order {slope:.2f}")
    assert errs[-1] < errs[0]
    assert lo < slope < hi, (method, slope, errs)


def test_dpmpp_beats_ddim_and_agrees_with_heun():
    z3, n3 = solve_interval(gaussian_v, Z0, T_FROM, T_TO, 20, "dpmpp_3m")
    zd, nd = solve_interval(gaussian_v, Z0, T_FROM, T_TO, 20, "ddim")
    zh, nh = solve_interval(gaussian_v, Z0, T_FROM, T_TO, 200, "heun")
    assert n3 == nd == 20 and nh == 400
    e3, ed = float((z3 - REF).abs().max()), float((zd - REF).abs().max())
    assert e3 < ed / 10
    assert float((z3 - zh).abs().max()) < 3e-3


def test_history_carries_across_intervals():
    """Two intervals with a shared history equal one run over the joined grid."""
    t_mid = t_of_sigma(0.7)
    hist = []
    za, na = solve_interval(gaussian_v, Z0, T_FROM, t_mid, 5, "dpmpp_3m", history=hist)
    zb, nb = solve_interval(gaussian_v, za, t_mid, T_TO, 5, "dpmpp_3m", history=hist)
    fresh, _ = solve_interval(gaussian_v, za, t_mid, T_TO, 5, "dpmpp_3m")
    assert na + nb == 10
    err_shared = float((zb - REF).abs().max())
    err_fresh = float((fresh - REF).abs().max())
    assert err_shared < err_fresh


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_3m"])
@pytest.mark.parametrize("spacing", ["uniform_t", "uniform_lambda", "edm"])
def test_sample_dispatch_full_trajectory(sampler, spacing):
    """From t = 1 (σ = ∞) to t = 0 (σ = 0): finite, right NFE, close to the exact map."""
    noise = Z0.float()
    x, nfe = sample(GaussianModel(), noise, 40, sampler=sampler, spacing=spacing,
                    return_nfe=True)
    assert nfe == 40 and torch.isfinite(x).all() and x.dtype == torch.float32
    err = float((x.double() - exact_flow(Z0, 1.0, 0.0)).abs().max())
    assert err < 0.05, err
    x5 = sample(GaussianModel(), noise, 5, sampler=sampler, spacing=spacing)
    assert float((x5.double() - exact_flow(Z0, 1.0, 0.0)).abs().max()) > err


def test_order_one_is_ddim():
    noise = Z0.float()
    x_ddim = sample(GaussianModel(), noise, 7, sampler="ddim")
    x1, _ = dpmpp_sample(gaussian_v, noise, 7, order=1)
    torch.testing.assert_close(x1, x_ddim, atol=2e-6, rtol=1e-5)


def test_afs_saves_one_nfe_and_is_accurate_at_high_noise():
    # Data with mean 0 and small spread: ε̂ = z is nearly exact at σ_max = 80.
    def f(z, t):
        return gaussian_v(z, t, mu=0.0, s=0.3)

    calls = []

    def counted(z, t):
        calls.append(1)
        return f(z, t)

    times = sfd_grid(4, SCHED, sigma_max=80.0, afs=True)
    assert len(times) == 6 and float(times[-1]) > 0
    x_afs, nfe = dpmpp_sample(counted, Z0, 4, times=times, afs=True)
    assert nfe == 4 == len(calls)
    x_net, nfe_net = dpmpp_sample(f, Z0, 5, times=times)
    assert nfe_net == 5
    exact = exact_flow(Z0, float(times[0]), float(times[-1]), mu=0.0, s=0.3)
    exact = exact / math.cos(float(SCHED.phi(times[-1])))
    e_afs = float((x_afs - exact).abs().max())
    e_net = float((x_net - exact).abs().max())
    assert e_afs < 1.1 * e_net + 1e-3, (e_afs, e_net)  # the skipped call costs ~nothing
    # the analytical step alone, over the first interval, against the exact flow
    z1, n1 = dpmpp_sample(counted, Z0, 1, times=times[:2], afs=True, final_x=False)
    assert n1 == 0
    e1 = float((z1 - exact_flow(Z0, float(times[0]), float(times[1]), mu=0.0, s=0.3)).abs().max())
    assert e1 < 0.02, e1


def test_grids():
    g = sfd_grid(3, SCHED, sigma_min=0.006, sigma_max=80.0)
    sig = torch.tan(SCHED.phi(g))
    torch.testing.assert_close(sig[[0, -1]], torch.tensor([80.0, 0.006], dtype=torch.float64))
    assert (g[1:] < g[:-1]).all()
    ig = interval_grid(1.0, 0.0, 4, SCHED, spacing="uniform_lambda")  # falls back at the ends
    assert float(ig[0]) == 1.0 and float(ig[-1]) == 0.0 and (ig[1:] < ig[:-1]).all()
    full = time_grid(5, SCHED, spacing="edm", sigma_max=80.0)
    assert float(full[-1]) == 0.0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="method"):
        solve_interval(gaussian_v, Z0, 0.9, 0.1, 3, "rk4")
    with pytest.raises(ValueError, match="t_from"):
        solve_interval(gaussian_v, Z0, 0.1, 0.9, 3)
    with pytest.raises(ValueError, match="substeps"):
        solve_interval(gaussian_v, Z0, 0.9, 0.1, 0)
    with pytest.raises(ValueError, match="order"):
        dpmpp_sample(gaussian_v, Z0, 4, order=4)
