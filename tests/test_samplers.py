"""Samplers on a closed-form teacher, and a real teacher on eight Gaussians."""

import math

import pytest
import torch

from fastdiff.engine.data import load_dataset
from fastdiff.engine.grids import time_grid
from fastdiff.engine.models import MLP
from fastdiff.engine.samplers import SAMPLERS, sample
from fastdiff.engine.schedules import CosineSchedule
from fastdiff.eval.metrics import sliced_wasserstein, true_spread
from fastdiff.training import train_teacher

SCHED = CosineSchedule()


class GaussianTeacher(torch.nn.Module):
    """Exact v̂ for data x ~ N(μ, s² I): E[x | z_t] = μ + α s² (z − α μ) / (α² s² + σ²)."""

    def __init__(self, mu: torch.Tensor, s: float):
        super().__init__()
        self.mu, self.s = mu.double(), s

    def forward(self, z, t, **cond):
        phi = SCHED.phi(t.double())[:, None]
        a, sg = torch.cos(phi), torch.sin(phi)
        zd = z.double()
        x_hat = self.mu + a * self.s**2 * (zd - a * self.mu) / (a**2 * self.s**2 + sg**2)
        eps_hat = (zd - a * x_hat) / sg.clamp_min(1e-300)
        v = a * eps_hat - sg * x_hat
        return v.to(z.dtype)


def exact_flow(z1: torch.Tensor, mu: torch.Tensor, s: float) -> torch.Tensor:
    """The probability-flow ODE from t = 1 to t = 0 for Gaussian data, in closed form.

    For x ~ N(μ, s²), z_t − α μ has std sqrt(α² s² + σ²) and the flow maps quantiles to
    quantiles: at t = 1 (α = 0, σ = 1) the standardized value is z₁, so x = μ + s z₁.
    """
    return mu + s * z1


@pytest.mark.parametrize("sampler", ["ddim", "euler", "heun"])
def test_error_falls_with_steps_on_gaussian_data(sampler):
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(6, generator=g, dtype=torch.float64)
    s = 0.3
    teacher = GaussianTeacher(mu, s)
    z1 = torch.randn(64, 6, generator=g, dtype=torch.float64)
    exact = exact_flow(z1, mu, s)
    errors = []
    for n in (2, 4, 8, 16, 32):
        x = sample(teacher, z1, n, sampler=sampler)
        errors.append(float((x - exact).abs().max()))
    assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.25 * errors[0], errors


def test_ddim_is_exact_for_a_point_mass():
    # x̂ constant along the path (s → 0): DDIM lands exactly on μ from any z₁ in one step.
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(5, generator=g, dtype=torch.float64)
    teacher = GaussianTeacher(mu, 1e-12)
    z1 = torch.randn(8, 5, generator=g, dtype=torch.float64)
    for n in (1, 3):
        assert torch.allclose(sample(teacher, z1, n), mu.expand(8, 5), atol=1e-9)


def test_same_generator_gives_same_samples_and_any_step_count_works():
    teacher = GaussianTeacher(torch.zeros(3) + 0.5, 0.7)
    noise = torch.randn(16, 3)
    a = sample(teacher, noise, 7, sampler="ddpm", generator=torch.Generator().manual_seed(3))
    b = sample(teacher, noise, 7, sampler="ddpm", generator=torch.Generator().manual_seed(3))
    c = sample(teacher, noise, 7, sampler="ddpm", generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    for n in (1, 2, 5):
        for name in ("ddim", "ddpm", "euler", "heun"):
            assert torch.isfinite(sample(teacher, noise, n, sampler=name)).all()


def test_ddpm_matches_the_data_distribution():
    g = torch.Generator().manual_seed(5)
    mu, s = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.5
    x = sample(GaussianTeacher(mu, s), torch.randn(4000, 2, generator=g, dtype=torch.float64),
               50, sampler="ddpm", generator=g)
    assert torch.allclose(x.mean(0), mu, atol=0.05)
    assert torch.allclose(x.std(0), torch.full((2,), s, dtype=torch.float64), atol=0.05)


def test_guidance_combines_conditional_and_unconditional():
    calls = []

    def model(z, t, y):
        calls.append(y.clone())
        return torch.where((y >= 0)[:, None], torch.ones_like(z), torch.zeros_like(z))

    z = torch.randn(4, 2)
    from fastdiff.engine.samplers import guided_model

    f = guided_model(model, {"y": torch.tensor([0, 1, 2, 3])}, 2.0)
    v = f(z, torch.ones(4))
    assert torch.allclose(v, torch.full_like(z, 3.0))  # (1 + w)·1 − w·0
    assert (calls[0][4:] == -1).all()


def test_guidance_goes_to_the_w_input_of_a_distilled_student_and_cfg_otherwise():
    """`guidance_inputs`: one pass with cond w for a w-conditioned model, CFG for others."""
    from fastdiff.apps.demo import digits_fid
    from fastdiff.engine.models import add_scalar_condition
    from fastdiff.engine.samplers import guidance_inputs

    teacher = MLP(dim=2, hidden=8, depth=1, num_classes=3)
    student = add_scalar_condition(MLP(dim=2, hidden=8, depth=1, num_classes=3), "w")
    y = torch.tensor([0, 1, 2])
    cond, g = guidance_inputs(student, {"y": y}, 2.5, 3)
    assert g is None and torch.equal(cond["w"], torch.full((3,), 2.5)) and cond["y"] is y
    assert guidance_inputs(teacher, {"y": y}, 2.5, 3) == ({"y": y}, 2.5)
    assert guidance_inputs(student, {"y": y}, None, 3) == ({"y": y}, None)

    class Metric:  # FID-digits stand-in: records what it scores
        n_reference = 20

        def score(self, x):
            return float(x.abs().mean())

    seen = []

    class Recorder(torch.nn.Module):
        scalar_conds, num_classes = {"w": 1.0}, 10

        def forward(self, z, t, y=None, w=None):
            seen.append((z.shape[0], None if w is None else float(w[0])))
            return torch.zeros_like(z)

    digits_fid(Recorder(), 2, Metric(), n=20, guidance=3.0)
    assert seen == [(20, 3.0), (20, 3.0)]  # one pass of 20 per step, w = 3 as an input


def test_time_grids_are_decreasing_and_hit_the_ends():
    for spacing in ("uniform_t", "uniform_lambda", "edm"):
        for n in (1, 2, 7):
            g = time_grid(n, SCHED, spacing=spacing)
            assert len(g) == n + 1 and g[0] == 1.0 and g[-1] == 0.0
            assert (g[1:] < g[:-1]).all()
    g = time_grid(4, SCHED, spacing="edm", sigma_max=80.0, sigma_min=0.006)
    assert math.isclose(float(SCHED.ve_sigma(g[0])), 80.0, rel_tol=1e-9)
    assert math.isclose(float(SCHED.ve_sigma(g[-2])), 0.006, rel_tol=1e-9)


def test_bad_sampler_arguments():
    teacher = GaussianTeacher(torch.zeros(2), 1.0)
    with pytest.raises(ValueError, match="sampler"):
        sample(teacher, torch.randn(2, 2), 4, sampler="nope")
    with pytest.raises(ValueError, match="steps"):
        sample(teacher, torch.randn(2, 2), 0)
    with pytest.raises(TypeError, match="noise"):
        sample(teacher, torch.ones(2, 2, dtype=torch.long), 4)
    assert set(SAMPLERS) >= {"ddim", "ddpm", "euler", "heun", "dpmpp_2m", "dpmpp_3m"}


@pytest.mark.slow
def test_teacher_on_eight_gaussians_reaches_the_data():
    """64-step DDIM samples of a briefly trained teacher are close to the data.

    Threshold: 3 × the sliced Wasserstein distance between two independent true sample sets
    of the same size (the metric's own noise floor), measured here, not hard-coded.
    """
    torch.manual_seed(0)
    data = load_dataset("eight_gaussians", seed=0)
    teacher = train_teacher(MLP(dim=2, hidden=128, depth=3), data, updates=1200,
                            batch_size=256, lr=2e-3, progress=False)
    n = 2000
    g = torch.Generator().manual_seed(11)
    x = sample(teacher, torch.randn(n, 2, generator=g), 64)
    true = data.sample_true(n, generator=g)
    spread = true_spread(data, n, repeats=3, metric=sliced_wasserstein)
    sw = float(sliced_wasserstein(x, true))
    sw_1 = float(sliced_wasserstein(sample(teacher, torch.randn(n, 2, generator=g), 1), true))
    print(f"teacher 64-step SW {sw:.4f}, 1-step {sw_1:.4f}, true-vs-true {spread.tolist()}")
    assert sw < 3 * float(spread.max()), (sw, spread)
    assert sw < 0.5 * sw_1
