"""Guided distillation (Meng et al.): stage 1, stage 2, the stochastic sampler and its student.

Small class-conditional MLPs on 2-D data with three labels; the stochastic sampler is checked
against closed-form moments on Gaussian data, where every step is affine in z.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from fastdiff.kernels.ddim_step import ddim_step_reference

from fastdiff.apps.distill import distill_guided_cli
from fastdiff.engine.checkpoint import load, load_config
from fastdiff.engine.data import as_dataset
from fastdiff.engine.models import MLP, add_scalar_condition
from fastdiff.engine.samplers import sample
from fastdiff.engine.schedules import CosineSchedule
from fastdiff.engine.steppers import stochastic_sample
from fastdiff.methods.guided import (
    distill_guidance,
    distill_guided_steps,
    distill_stochastic,
    guidance_error,
    stochastic_target,
    w_sampler,
)

SCHED = CosineSchedule()


pytestmark = pytest.mark.usefixtures("one_thread")


def labelled_data(n=600, seed=0):
    """Three Gaussian blobs in 2-D with their labels (0, 1, 2)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centres = torch.tensor([[1.0, 0.0], [-0.5, 0.8], [-0.5, -0.8]])
    x = centres[y] + 0.15 * torch.randn(n, 2, generator=g)
    return as_dataset((x, y))


def toy_teacher(seed=0):
    """A class-conditional MLP with random (nonzero) output and class embeddings, so that
    v̂(z, c) and v̂(z, ∅) differ and the guided target is far from the plain output."""
    torch.manual_seed(seed)
    m = MLP(dim=2, hidden=32, depth=2, num_classes=3)
    with torch.no_grad():
        m.out.weight.normal_(0, 0.3)
        m.out.bias.normal_(0, 0.1)
        m.cond.classes.weight.normal_(0, 1.0)
    m.schedule = SCHED
    return m.eval()


@pytest.fixture(scope="module")
def data():
    return labelled_data()


@pytest.fixture(scope="module")
def stage1(data):
    return distill_guidance(toy_teacher(), data, w_min=0.0, w_max=4.0, updates=500,
                            batch_size=64, lr=3e-3, eval_every=50, heldout_size=256,
                            progress=False)


# --------------------------------------------------------------------------- stage 1


def test_stage1_learns_the_guided_output(stage1):
    h = stage1.history
    # the untouched copy is exactly the teacher: right at w = 0, wrong by w (v_c − v_u) else
    assert h.initial_error[0.0] == 0.0
    assert h.initial_error[4.0] > 0.5, h.initial_error
    for w in (1.0, 2.0, 4.0):
        assert h.final_error[w] < 0.5 * h.initial_error[w], (w, h.initial_error, h.final_error)
    assert h.final_error[0.0] < 0.2, h.final_error
    assert h.heldout_error[-1] < h.heldout_error[0] or h.heldout_error[0] < 0.2
    assert all(math.isfinite(v) for v in h.loss) and h.loss[-1] > 0


def test_stage1_resumes_after_a_crash_to_the_uninterrupted_student(tmp_path, data, monkeypatch):
    import fastdiff.methods.guided as guided
    from fastdiff.engine.checkpoint import CheckpointError

    kw = dict(w_min=0.0, w_max=4.0, updates=20, batch_size=32, lr=3e-3, eval_every=5,
              heldout_size=64, progress=False, checkpoint_every=5)
    ref = distill_guidance(toy_teacher(), data, **kw)
    real, calls = guided.guided_distill_loss, [0]   # runs once per update, in the loss

    def crash_at_13(*a, **k):
        if calls[0] == 12:
            raise RuntimeError("simulated crash")
        calls[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(guided, "guided_distill_loss", crash_at_13)
    with pytest.raises(RuntimeError, match="simulated crash"):
        distill_guidance(toy_teacher(), data, checkpoint_dir=tmp_path, **kw)
    assert (tmp_path / "stage1.state").exists()
    monkeypatch.setattr(guided, "guided_distill_loss", real)
    resumed = distill_guidance(toy_teacher(), data, checkpoint_dir=tmp_path, **kw)
    for (name, a), b in zip(resumed.student.state_dict().items(),
                            ref.student.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.history.loss == ref.history.loss  # updates 1-10 from the state, 11-20 anew
    assert resumed.history.initial_error == ref.history.initial_error
    assert resumed.history.final_error == ref.history.final_error
    # finished: a rerun trains nothing; other settings are refused, naming the difference
    monkeypatch.setattr(guided, "guided_distill_loss", crash_at_13)
    calls[0] = 12
    again = distill_guidance(toy_teacher(), data, checkpoint_dir=tmp_path, **kw)
    assert again.history.loss == ref.history.loss
    with pytest.raises(CheckpointError, match="'lr': \\(0.003, 0.001\\)"):
        distill_guidance(toy_teacher(), data, checkpoint_dir=tmp_path, **{**kw, "lr": 1e-3})


def test_balancing_w_keeps_the_w0_output_closer_to_the_teacher(stage1, data):
    """balance_w (default) weighs each w by its relative error; without it the large-w
    examples dominate and the w = 0 output, where the student started exact, drifts more."""
    plain = distill_guidance(toy_teacher(), data, w_min=0.0, w_max=4.0, updates=500,
                             batch_size=64, lr=3e-3, eval_every=50, heldout_size=256,
                             balance_w=False, progress=False)
    assert stage1.history.final_error[0.0] < 0.8 * plain.history.final_error[0.0], (
        stage1.history.final_error, plain.history.final_error)


def test_stage1_student_takes_w_and_guidance_error_agrees(stage1, data):
    student = stage1.student
    assert "w" in student.scalar_conds and not any(p.requires_grad for p in student.parameters())
    errs = guidance_error(student, toy_teacher(), data, ws=(0.0, 4.0), size=256)
    assert errs[4.0] == pytest.approx(stage1.history.final_error[4.0], rel=1e-6)
    z, t = torch.randn(5, 2), torch.full((5,), 0.5)
    y = torch.tensor([0, 1, 2, 0, 1])
    a = student(z, t, y=y, w=torch.zeros(5))
    b = student(z, t, y=y, w=torch.full((5,), 4.0))
    assert float((a - b).abs().max()) > 1e-2  # w changes the output


def test_stage1_is_reproducible_and_does_not_touch_the_teacher(data):
    teacher = toy_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    r1 = distill_guidance(teacher, data, updates=3, batch_size=16, progress=False)
    r2 = distill_guidance(teacher, data, updates=3, batch_size=16, progress=False)
    assert r1.history.loss == r2.history.loss
    assert "w" not in teacher.scalar_conds
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k])


# --------------------------------------------------------------------------- stage 2


def test_stage2_halves_with_w_and_samples_one_pass_per_step(stage1, data):
    results = distill_guided_steps(stage1.student, data, w_min=0.0, w_max=4.0, start_steps=4,
                                   end_steps=2, updates=40, batch_size=64, lr=1e-3,
                                   eval_every=20, heldout_size=128, progress=False)
    (r,) = results
    assert r.steps == 2 and "w" in r.student.scalar_conds
    assert r.history.heldout_mismatch[-1] < r.history.initial_mismatch
    noise = torch.randn(6, 2, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    x0, nfe = sample(r.student, noise, 2, cond={"y": y, "w": torch.zeros(6)}, return_nfe=True)
    x4 = sample(r.student, noise, 2, cond={"y": y, "w": torch.full((6,), 4.0)})
    assert nfe == 2 and torch.isfinite(x0).all()
    assert float((x0 - x4).abs().max()) > 1e-3


def test_w_sampler_draws_in_range_from_the_generator():
    draw = w_sampler(1.0, 3.0)
    a = draw(torch.Generator().manual_seed(0), 1000)["w"]
    b = draw(torch.Generator().manual_seed(0), 1000)["w"]
    assert torch.equal(a, b) and a.shape == (1000,)
    assert float(a.min()) >= 1.0 and float(a.max()) <= 3.0 and float(a.std()) > 0.4


# --------------------------------------------------------------------------- stochastic sampler


def test_stochastic_sampler_visits_the_paper_grid():
    seen = []

    def f(z, t):
        seen.append(round(float(t[0]), 6))
        return torch.zeros_like(z)

    noise = torch.randn(3, 2)
    for n, expect in ((1, [1.0]), (2, [1.0, 0.5]), (4, [1.0, 0.75, 0.5, 0.25])):
        seen.clear()
        x, nfe = stochastic_sample(f, noise, n, generator=torch.Generator().manual_seed(0))
        assert seen == expect and nfe == n and x.shape == noise.shape


def _affine_model(mu, s):
    """Exact v̂ for 1-D data N(mu, s²) (affine in z)."""
    def f(z, t):
        phi = SCHED.phi(t.double())[:, None]
        a, sg = torch.cos(phi), torch.sin(phi)
        x_hat = mu + a * s**2 * (z.double() - a * mu) / (a**2 * s**2 + sg**2)
        return ((a * z.double() - x_hat) / sg).to(z.dtype)   # v = (α z − x) / σ
    return f


def _closed_form_moments(f, n):
    """Mean and variance of the stochastic sampler's output, propagated exactly in float64
    (each DDIM step is affine in z; renoising adds independent Gaussian noise)."""
    mean, var = 0.0, 1.0
    grid = [i / n for i in range(n, -1, -1)]
    for i in range(n, 0, -1):
        t = i / n
        tt = torch.tensor([t], dtype=torch.float32)
        v0 = float(f(torch.zeros(1, 1, dtype=torch.float64), tt))
        v1 = float(f(torch.ones(1, 1, dtype=torch.float64), tt))
        to = 0.0 if i == 1 else (i - 2) / n
        d = float(SCHED.phi(torch.tensor(to, dtype=torch.float64))
                  - SCHED.phi(torch.tensor(t, dtype=torch.float64)))
        a = math.cos(d) + math.sin(d) * (v1 - v0)   # z_to = a z + b
        b = math.sin(d) * v0
        mean, var = a * mean + b, a * a * var
        if i > 1:
            pu = float(SCHED.phi(torch.tensor((i - 2) / n, dtype=torch.float64)))
            ps = float(SCHED.phi(torch.tensor((i - 1) / n, dtype=torch.float64)))
            r = math.cos(ps) / math.cos(pu)
            mean, var = r * mean, r * r * var + math.sin(ps) ** 2 - r * r * math.sin(pu) ** 2
    assert grid[0] == 1.0
    return mean, var


@pytest.mark.parametrize("n", [2, 3, 8])
def test_stochastic_sampler_matches_closed_form_moments(n):
    mu, s = 0.7, 0.3
    f = _affine_model(mu, s)
    noise = torch.randn(40000, 1, generator=torch.Generator().manual_seed(n),
                        dtype=torch.float64)
    x, _ = stochastic_sample(f, noise, n, generator=torch.Generator().manual_seed(10 + n))
    mean, var = _closed_form_moments(f, n)
    se_mean, se_var = math.sqrt(var / 40000), var * math.sqrt(2 / 40000)
    assert abs(float(x.mean()) - mean) < 5 * se_mean, (float(x.mean()), mean)
    assert abs(float(x.var()) - var) < 5 * se_var, (float(x.var()), var)
    assert abs(mean - mu) < 1e-6


def test_stochastic_sampler_converges_to_the_data_with_an_exact_model():
    """With the exact (not distilled) v̂, each 2/N DDIM step under-disperses and renoising
    restores only the forward noise, so the spread approaches the data's at O(1/N)."""
    mu, s = 0.7, 0.3
    f = _affine_model(mu, s)
    stds = [math.sqrt(_closed_form_moments(f, n)[1]) for n in (8, 32, 128, 512)]
    assert all(a < b for a, b in zip(stds, stds[1:])), stds
    assert abs(stds[-1] - s) < 0.01, stds


def test_stochastic_sampler_is_seeded_and_uses_fresh_noise():
    f = _affine_model(0.0, 0.5)
    noise = torch.randn(100, 1, generator=torch.Generator().manual_seed(0))
    a, _ = stochastic_sample(f, noise, 4, generator=torch.Generator().manual_seed(1))
    b, _ = stochastic_sample(f, noise, 4, generator=torch.Generator().manual_seed(1))
    c, _ = stochastic_sample(f, noise, 4, generator=torch.Generator().manual_seed(2))
    d, _ = stochastic_sample(f, noise, 1, generator=torch.Generator().manual_seed(1))
    e, _ = stochastic_sample(f, noise, 1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and float((a - c).abs().max()) > 1e-2
    assert torch.equal(d, e)  # one step: the plain deterministic step, no noise


def test_sample_dispatches_to_the_stochastic_sampler(stage1):
    noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    cond = {"y": torch.tensor([0, 1, 2, 0]), "w": torch.full((4,), 2.0)}
    x, nfe = sample(stage1.student, noise, 4, sampler="stochastic", cond=cond,
                    generator=torch.Generator().manual_seed(0), return_nfe=True)
    assert nfe == 4 and torch.isfinite(x).all()


# --------------------------------------------------------------------------- stochastic student


def test_stochastic_target_is_two_teacher_steps_then_the_last_step(stage1):
    teacher = stage1.student
    n = 4
    t = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(3))
    cond = {"y": torch.tensor([0, 1, 2, 0]), "w": torch.tensor([0.0, 1.0, 2.0, 4.0])}
    phi_t, target = stochastic_target(teacher, z, t, cond, n, SCHED)
    # float64 reference: rotate twice with the teacher, read the one-step v off the end point
    with torch.no_grad():
        v1 = teacher(z, t.float(), **cond)
        ends, ref = [], []
        for b in range(3):
            p0, p1, p2 = (SCHED.phi(torch.tensor([t[b] - k / n], dtype=torch.float64))
                          for k in range(3))
            zm = ddim_step_reference(z[b:b + 1], v1[b:b + 1], p0, p1)
            v2 = teacher(zm.float(), (t[b:b + 1] - 1 / n).float(),
                         **{k: v[b:b + 1] for k, v in cond.items()})
            ze = ddim_step_reference(zm, v2, p1, p2)
            dd = p2 - p0
            ref.append(((ze - torch.cos(dd) * z[b:b + 1].double()) / torch.sin(dd)).float())
            ends.append(ze)
    torch.testing.assert_close(target[:3], torch.cat(ref), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(target[3], v1[3], atol=1e-6, rtol=0)  # i = 1: the last step
    assert float((target[:3] - v1[:3]).abs().max()) > 1e-3  # a 2/N step is not the 1/N step


def test_stochastic_target_from_the_2n_step_teacher_is_four_of_its_steps(stage1):
    """The paper's variant: teacher on the 2N grid, four 1/(2N) steps per 2/N, two at i = 1;
    ṽ is the one-step v that lands on the teacher's end point."""
    teacher = stage1.student
    n = 4
    t = torch.tensor([1.0, 0.5, 0.25, 0.75], dtype=torch.float64)
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(5))
    cond = {"y": torch.tensor([2, 1, 0, 1]), "w": torch.tensor([3.0, 0.0, 2.0, 1.0])}
    phi_t, target = stochastic_target(teacher, z, t, cond, n, SCHED, teacher_steps=2 * n)
    with torch.no_grad():
        for b in range(4):
            hops = 2 if b == 2 else 4                   # t = 1/N: two steps of 1/(2N) to 0
            zb = z[b:b + 1].double()
            cb = {k: v[b:b + 1] for k, v in cond.items()}
            for j in range(hops):
                s0, s1 = float(t[b]) - j / (2 * n), float(t[b]) - (j + 1) / (2 * n)
                p0, p1 = (SCHED.phi(torch.tensor([x], dtype=torch.float64)) for x in (s0, s1))
                v = teacher(zb.float(), torch.tensor([s0], dtype=torch.float32), **cb)
                zb = ddim_step_reference(zb, v, p0, p1)
            pe = SCHED.phi(torch.tensor([float(t[b]) - hops / (2 * n)], dtype=torch.float64))
            dd = phi_t[b] - pe
            ref = (torch.cos(dd) * z[b:b + 1].double() - zb) / torch.sin(dd)
            torch.testing.assert_close(target[b:b + 1], ref.float(), atol=2e-5, rtol=1e-4)
    # and it is not the N-step teacher's two-step target
    _, two = stochastic_target(teacher, z, t, cond, n, SCHED, teacher_steps=n)
    assert float((two - target).abs().max()) > 1e-4


def test_distill_stochastic_trains_a_student_for_the_sampler(stage1, data):
    with pytest.raises(ValueError, match="teacher_steps: the teacher has no `sample_steps`"):
        distill_stochastic(stage1.student, data, steps=4, updates=1)
    with pytest.raises(ValueError, match="teacher_steps must be a multiple of steps"):
        distill_stochastic(stage1.student, data, steps=4, teacher_steps=6, updates=1)
    r = distill_stochastic(stage1.student, data, steps=4, teacher_steps=8, updates=30,
                           batch_size=64, lr=1e-3, progress=False)
    assert r.steps == 4 and r.teacher_steps == 8 and "w" in r.student.scalar_conds
    losses = r.history.loss
    assert all(math.isfinite(v) for v in losses) and losses[0] > 0
    assert sum(losses[-10:]) < sum(losses[:10])
    assert r.history.heldout_mismatch[-1] < r.history.initial_mismatch


# --------------------------------------------------------------------------- errors, CLI


def test_bad_arguments_raise_naming_them(data):
    teacher = toy_teacher()
    with pytest.raises(ValueError, match="w_min"):
        distill_guidance(teacher, data, w_min=3.0, w_max=1.0, updates=1)
    with pytest.raises(ValueError, match="w_min must be >= -1"):
        distill_guidance(teacher, data, w_min=-2.0, updates=1)
    with pytest.raises(ValueError, match="updates"):
        distill_guidance(teacher, data, updates=0)
    with pytest.raises(ValueError, match=r"batch_size \(63\) must be divisible by the world"):
        distill_guidance(teacher, data, batch_size=63, world_size=2, updates=1)
    with pytest.raises(ValueError, match="class-labelled"):
        distill_guidance(teacher, data.train, updates=1)
    with pytest.raises(ValueError, match="class-conditional teacher"):
        distill_guidance(MLP(dim=2, hidden=16, depth=1), data, updates=1)
    with pytest.raises(ValueError, match="scalar condition 'w'"):
        distill_guided_steps(teacher, data, start_steps=2, updates=1)
    with pytest.raises(ValueError, match="steps"):
        stochastic_sample(lambda z, t: z, torch.zeros(2, 2), 0)
    with pytest.raises(ValueError, match="steps must be an integer >= 2"):
        w_model = add_scalar_condition(toy_teacher(), "w")
        distill_stochastic(w_model, data, steps=1, updates=1)


def test_cli_runs_both_stages_and_resumes(tmp_path, data, capsys):
    args = argparse.Namespace(w_min=0.0, w_max=2.0, out=str(tmp_path / "run"), start_steps=2,
                              end_steps=1, updates=6, batch_size=16, lr=1e-3, seed=0,
                              quiet=True, weighting="snr_trunc")
    distill_guided_cli(toy_teacher(), data, args)
    student = load(tmp_path / "run" / "student")
    assert "w" in student.scalar_conds
    assert (tmp_path / "run" / "stage1").exists()
    distill_guided_cli(toy_teacher(), data, args)
    assert "stage 1: reusing" in capsys.readouterr().out
    args.stage1_updates = 7  # other stage-1 settings: not reused, nor are its rounds
    distill_guided_cli(toy_teacher(), data, args)
    printed = capsys.readouterr().out
    assert "stage 1: retraining" in printed
    assert "stage 2: removing 1 round checkpoint(s) of the old stage 1" in printed
    assert (tmp_path / "run" / "checkpoints" / "student-00001").is_dir()  # distilled again

    # an interrupted stage 1 of other settings is not resumed but started over
    fresh = tmp_path / "fresh"
    distill_guidance(toy_teacher(), data, updates=3, batch_size=16, lr=5e-3,
                     checkpoint_dir=fresh / "checkpoints", progress=False)
    args.out, args.stage1_updates = str(fresh), 5
    distill_guided_cli(toy_teacher(), data, args)
    printed = capsys.readouterr().out
    assert "stage 1: not resuming" in printed and "'lr': (0.005, 0.001)" in printed
    assert load_config(fresh / "stage1")["metadata"]["history"]["updates_done"] == 5
    assert not (fresh / "checkpoints" / "stage1.state").exists()
    args.stage1_updates = 0
    with pytest.raises(ValueError, match="--stage1-updates must be a positive integer"):
        distill_guided_cli(toy_teacher(), data, args)
    meta = json.loads((tmp_path / "run" / "stage1" / "config.json").read_text())["metadata"]
    assert meta["updates"] == 7 and meta["history"]["updates_done"] == 7


def test_cli_release_frees_the_teacher_and_stage1_and_trains_the_same(tmp_path, data,
                                                                       monkeypatch):
    from fastdiff.apps import distill as driver

    released, real = [], driver._release
    monkeypatch.setattr(driver, "_release", lambda m: (released.append(m), real(m)))

    def args(out):
        return argparse.Namespace(w_min=0.0, w_max=2.0, out=str(tmp_path / out),
                                  start_steps=4, end_steps=1, updates=4, batch_size=16,
                                  lr=1e-3, seed=0, quiet=True, weighting="snr_trunc",
                                  stage1_updates=4)

    distill_guided_cli(toy_teacher(), data, args("kept"))
    teacher = toy_teacher()
    distill_guided_cli(teacher, data, args("freed"), release=True)
    assert all(t.device.type == "meta" for t in teacher.state_dict().values())
    assert released[0] is teacher and len(released) == 2
    assert "w" in released[1].scalar_conds     # stage 1, after the first round
    kept, freed = (load(tmp_path / d / "student").state_dict() for d in ("kept", "freed"))
    for k in kept:
        assert torch.equal(kept[k], freed[k]), k


@pytest.mark.slow
def test_guided_demo_quick_mode_writes_the_report(tmp_path):
    import json

    from fastdiff.apps.guided_demo import run_guided_demo

    report = run_guided_demo(tmp_path / "demo", quick=True, progress=False, log=lambda *a: None)
    text = report.read_text()
    assert "Stage 1" in text and "ratio" in text and "stochastic" in text
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert res["throughput"]["ratio"] > 0
    assert {"w=0,steps=1", "w=2,steps=2"} <= set(res["student_ddim"])
    assert "w=2,steps=2" in res["stochastic_trained"]
    assert (tmp_path / "demo" / "student-2steps-w2.png").exists()
