"""SFD on a closed-form Gaussian teacher: data N(μ, s²I) in 2-D, exact flow known."""

from __future__ import annotations

import math

import pytest
import torch

from fastdiff.engine.grids import sfd_grid
from fastdiff.engine.models import MLP
from fastdiff.engine.solvers import dpmpp_sample
from fastdiff.methods.sfd import distill_sfd, sample_sfd, stage2

MU = torch.tensor([0.5, -0.3], dtype=torch.float64)
S = 0.4
NOISE = torch.randn(1000, 2, generator=torch.Generator().manual_seed(5))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class GaussianTeacher(torch.nn.Module):
    """The ideal v-prediction for N(μ, s²I) data; linear in z."""

    num_classes = 0

    def forward(self, z, t, **cond):
        phi = (math.pi / 2) * t.double().view(-1, 1)
        a, sg = torch.cos(phi), torch.sin(phi)
        var = a**2 * S**2 + sg**2
        return (sg * (a * (1 - S**2) / var * (z.double() - a * MU) - MU)).float()


def exact_x(noise, times):
    """The exact flow from times[0] to times[-1], read as x = z/α."""
    t0, t1 = float(times[0]), float(times[-1])
    a0, s0 = math.cos(math.pi / 2 * t0), math.sin(math.pi / 2 * t0)
    a1, s1 = math.cos(math.pi / 2 * t1), math.sin(math.pi / 2 * t1)
    v0, v1 = a0**2 * S**2 + s0**2, a1**2 * S**2 + s1**2
    z1 = a1 * MU + math.sqrt(v1 / v0) * (noise.double() - a0 * MU)
    return z1 / a1


def err(x, ref):
    return float((x.double() - ref).norm(dim=1).mean())


def run(**kw):
    torch.manual_seed(0)
    opts = dict(student_steps=2, data_shape=(2,), updates=240, batch_size=256, lr=2e-3,
                progress=False, student=MLP(dim=2, hidden=64, depth=2))
    opts.update(kw)
    return distill_sfd(GaussianTeacher(), **opts)


@pytest.fixture(scope="module")
def afs_result():
    evals = []
    result = run(afs=True, eval_every=80,
                 on_eval=lambda res, k, secs: evals.append((k, secs)) or err(
                     sample_sfd(res, NOISE), exact_x(NOISE, res.times)))
    return result, evals


def test_sfd_with_afs_beats_dpmpp_3m_at_two_nfe(afs_result):
    result, _ = afs_result
    ref = exact_x(NOISE, result.times)
    x, nfe = sample_sfd(result, NOISE, return_nfe=True)
    assert nfe == 2 and result.steps == 2 and len(result.times) == 4  # AFS interval is free
    x_dpm, nfe_dpm = dpmpp_sample(GaussianTeacher(), NOISE, 2, order=3, times=result.times,
                                  afs=True)
    assert nfe_dpm == 2
    e_sfd, e_dpm = err(x, ref), err(x_dpm, ref)
    print(f"\nGaussian 2 NFE + AFS: SFD student {e_sfd:.3f}, DPM-Solver++(3M) {e_dpm:.3f}")
    assert e_sfd < 0.6 * e_dpm, (e_sfd, e_dpm)


def test_history_and_eval_hook(afs_result):
    result, evals = afs_result
    h = result.history
    assert h.updates_done == 240 and len(h.loss) == 240
    assert [k for k, _ in evals] == [80, 160, 240] == h.eval_updates
    assert h.eval_values[-1] < h.eval_values[0]
    assert all(b > a for a, b in zip(h.eval_times, h.eval_times[1:]))
    assert h.wall_time > 0 and h.samples_per_s > 0
    # teacher: 4 substeps on each of the 3 intervals (the AFS interval too)
    assert h.teacher_nfe == 12
    early, late = sum(h.loss[:30]) / 30, sum(h.loss[-30:]) / 30
    assert late < 0.5 * early


def test_without_afs_heun_teacher_pseudo_huber_learns():
    # (Heun needs more substeps than DPM-Solver++ from σ_max = 80: with 2 its own
    # trajectory is off by ~1.2 here, and the student faithfully learns that)
    result = run(afs=False, metric="pseudo_huber", updates=200, solver="heun",
                 teacher_substeps=8)
    ref = exact_x(NOISE, result.times)
    assert len(result.times) == 3 and result.history.teacher_nfe == 32  # Heun: 2 NFE/substep
    x_ddim, _ = dpmpp_sample(GaussianTeacher(), NOISE, 2, order=1, times=result.times)
    assert err(sample_sfd(result, NOISE), ref) < err(x_ddim, ref)


def test_stage2_one_nfe(afs_result):
    result, _ = afs_result
    one = stage2(result, updates=120, batch_size=256, lr=1e-3, progress=False)
    x, nfe = sample_sfd(one, NOISE, return_nfe=True)
    assert nfe == 1 and one.steps == 1
    ref = exact_x(NOISE, result.times)
    e1, e2 = err(x, ref), err(sample_sfd(result, NOISE), ref)
    x_dpm, _ = dpmpp_sample(GaussianTeacher(), NOISE, 1, order=3, times=one.times, afs=True)
    assert e1 < 2 * e2 + 0.05 and e1 < err(x_dpm, ref), (e1, e2)


def test_step_conditioned_student_sfd_v():
    result = run(student=MLP(dim=2, hidden=64, depth=2), steps_range=(2, 3), updates=300,
                 afs=True)
    assert "steps" in result.student.scalar_conds
    for n in (2, 3):
        x, nfe = sample_sfd(result, NOISE, steps=n, return_nfe=True)
        assert nfe == n
        times = sfd_grid(n, afs=True)
        x_dpm, _ = dpmpp_sample(GaussianTeacher(), NOISE, n, order=3, times=times, afs=True)
        assert err(x, exact_x(NOISE, times)) < err(x_dpm, exact_x(NOISE, times))


def test_add_steps_condition_keeps_outputs():
    from fastdiff.engine.models import add_scalar_condition

    m = MLP(dim=2, hidden=16, depth=1)
    with torch.no_grad():  # nonzero outputs (the fresh output layer is zero)
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    z, t = NOISE[:4], torch.full((4,), 0.3)
    y0 = m(z, t).detach().clone()
    assert y0.abs().min() > 0
    add_scalar_condition(m, "steps")
    torch.testing.assert_close(m(z, t, steps=torch.full((4,), 3.0)), y0)


@pytest.mark.parametrize("kw,match", [
    (dict(student_steps=0), "student_steps"),
    (dict(teacher_substeps=0), "teacher_substeps"),
    (dict(solver="rk45"), "solver"),
    (dict(steps_range=(3, 2)), "steps_range"),
    (dict(sigma_min=1.0, sigma_max=0.5), "sigma_min"),
    (dict(metric="l3"), "metric"),
])
def test_bad_arguments_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        run(updates=1, **kw)


def test_compare_subcommand_registers():
    import argparse

    from fastdiff.apps.compare import add_parser, run_compare

    parser = argparse.ArgumentParser(prog="fastdiff")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", "--quick", "--out", "somewhere"])
    assert args.quick and args.out == "somewhere" and callable(args.func)
    with pytest.raises(ValueError, match="pd_start"):
        run_compare("unused", teacher=GaussianTeacher(), pd_start=4)
