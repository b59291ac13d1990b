"""Guided stage 1 and the stochastic-sampler student on the shared runner
(`fastdiff.training.runner`): bit-exact resume, the non-finite guard, the RNG streams,
fingerprints of teacher weights, data and options, training time without evaluation.

(Two gloo ranks equal to one process: tests/test_distributed.py.)
"""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch

import fastdiff.methods.guided as guided
from fastdiff.engine.checkpoint import CheckpointError
from fastdiff.engine.data import as_dataset
from fastdiff.engine.models import MLP, add_scalar_condition
from fastdiff.engine.schedules import CosineSchedule
from fastdiff.methods.guided import distill_guidance, distill_guided_steps, distill_stochastic
from fastdiff.training.runner import update_generator

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def labelled_data(n=400, seed=0):
    """Three Gaussian blobs in 2-D with their labels (0, 1, 2)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.tensor([[1.0, 0.0], [-0.5, 0.8], [-0.5, -0.8]])[y] + 0.15 * torch.randn(
        n, 2, generator=g)
    return as_dataset((x, y))


def toy_teacher(seed=0):
    """A class-conditional MLP whose conditional and null outputs differ."""
    torch.manual_seed(seed)
    m = MLP(dim=2, hidden=16, depth=2, num_classes=3)
    with torch.no_grad():
        m.out.weight.normal_(0, 0.3)
        m.cond.classes.weight.normal_(0, 1.0)
    m.schedule = CosineSchedule()
    return m.eval()


def w_teacher(seed=0):
    """A w-conditioned model (a stand-in for a stage-2 student) whose output depends on w."""
    m = toy_teacher(seed)
    torch.manual_seed(seed + 1)
    add_scalar_condition(m, "w")
    with torch.no_grad():
        for p in m.cond.scalars["w"].parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m.eval()


class Flaky(torch.nn.Module):
    """Wraps a teacher; returns NaN on the calls whose index is in `bad`."""

    def __init__(self, inner, bad=()):
        super().__init__()
        self.inner, self.bad, self.calls = inner, set(bad), 0
        self.num_classes, self.schedule = inner.num_classes, inner.schedule

    def forward(self, z, t, **cond):
        out = self.inner(z, t, **cond)
        i, self.calls = self.calls, self.calls + 1
        return torch.full_like(out, float("nan")) if i in self.bad else out


def _same_weights(a, b) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


@pytest.fixture(scope="module")
def data():
    return labelled_data()


STAGE1 = dict(updates=12, batch_size=32, lr=3e-3, eval_every=4, heldout_size=64,
              progress=False)
STOCH = dict(steps=2, teacher_steps=4, updates=12, batch_size=32, lr=1e-3, eval_every=4,
             heldout_size=64, progress=False)


def _crash_at(monkeypatch, name: str, update: int, batch_size: int):
    """Make guided.<name> raise on the training call of `update` (calls on a batch of
    another size, the held-out ones, are not counted)."""
    real, calls = getattr(guided, name), [0]

    def crashing(*a, **kw):
        if name == "guided_distill_loss" or a[1].shape[0] == batch_size:  # a[1]: z_t
            if calls[0] == update:
                raise RuntimeError("simulated crash")
            calls[0] += 1
        return real(*a, **kw)

    monkeypatch.setattr(guided, name, crashing)


# --------------------------------------------------------------------------- stage 1


def test_stage1_skips_non_finite_teacher_updates_and_ends_finite(data):
    """Guard (DESIGN §4c): the teacher's call 0 is the held-out set, call k + 1 update k;
    updates 3 and 5 get NaN targets and are skipped, counted and left out of the EMA."""
    teacher = Flaky(toy_teacher(), bad={4, 6})
    r = distill_guidance(teacher, data, student=copy.deepcopy(teacher.inner), policy="off",
                         **STAGE1)   # policy off: its measurement would call the teacher
    h = r.history
    assert h.skipped == [3, 5]
    assert h.loss[3] is None and h.loss[5] is None
    assert all(math.isfinite(v) for i, v in enumerate(h.loss) if i not in (3, 5))
    assert all(bool(torch.isfinite(p).all()) for p in r.student.state_dict().values())
    assert all(math.isfinite(e) for e in h.final_error.values())
    assert h.updates_done == 12 and h.stopped_by == "updates"


def test_stage1_draws_update_k_from_its_own_stream(data, monkeypatch):
    """Update k's batch comes from update_generator(seed, "guided-stage1", k), the stream of
    the loop before the runner (same batches), whatever the history."""
    real, seeds = guided._draw_stage1, []

    def recording(examples, labels, batch, gen, *a, **kw):
        if batch == STAGE1["batch_size"]:
            seeds.append(gen.initial_seed())
        return real(examples, labels, batch, gen, *a, **kw)

    monkeypatch.setattr(guided, "_draw_stage1", recording)
    distill_guidance(toy_teacher(), data, seed=5, **STAGE1)
    assert seeds == [update_generator(5, "guided-stage1", k).initial_seed() for k in range(12)]


def test_stage1_wall_time_excludes_the_held_out_evaluations(data, monkeypatch):
    """New with the runner: wall_time (and samples/s) count training only; the held-out
    measures (here slowed to 0.5 s each, 1 + 12/4 of them) go to eval_time."""
    real = guided._HeldOutGuidance.errors

    def slow(self, student, ws):
        time.sleep(0.5)
        return real(self, student, ws)

    monkeypatch.setattr(guided._HeldOutGuidance, "errors", slow)
    h = distill_guidance(toy_teacher(), data, **STAGE1).history
    assert len(h.eval_updates) == 3 and h.initial is not None
    assert h.eval_time >= 1.5       # the three EMA measures during training
    assert h.wall_time < h.eval_time
    assert h.samples_per_s == pytest.approx(12 * 32 / h.wall_time)


def test_stage1_fingerprint_covers_teacher_weights_data_and_options(tmp_path, data):
    distill_guidance(toy_teacher(), data, checkpoint_dir=tmp_path, **{**STAGE1, "updates": 2})
    other = toy_teacher()
    with torch.no_grad():
        other.out.bias.add_(1e-3)   # same config, other weights: the old fingerprint missed it
    for kw, name in (({"teacher": other}, "'teacher'"),
                     ({"data": labelled_data(seed=1)}, "'data'"),
                     ({"balance_w": False}, "'balance_w'"),
                     ({"eval_ws": (0.0, 2.0)}, "'eval_ws'")):
        args = {"teacher": toy_teacher(), "data": data, **STAGE1, "updates": 2, **kw}
        with pytest.raises(CheckpointError, match=name):
            distill_guidance(args.pop("teacher"), args.pop("data"), checkpoint_dir=tmp_path,
                             **args)


def test_stage2_fingerprint_includes_the_w_range(tmp_path, data):
    stage1 = w_teacher()
    kw = dict(start_steps=2, end_steps=1, updates=2, batch_size=16, heldout_size=32,
              progress=False, checkpoint_dir=tmp_path)
    distill_guided_steps(stage1, data, w_min=0.0, w_max=4.0, **kw)
    distill_guided_steps(stage1, data, w_min=0.0, w_max=4.0, **kw)  # reused: same settings
    with pytest.raises(CheckpointError, match="'w_max': 2.0"):
        distill_guided_steps(stage1, data, w_min=0.0, w_max=2.0, **kw)


# --------------------------------------------------------------------------- stochastic student


def test_stochastic_student_resumes_after_a_crash_bit_exactly(tmp_path, data, monkeypatch):
    ref = distill_stochastic(w_teacher(), data, **STOCH)
    _crash_at(monkeypatch, "stochastic_target", 9, STOCH["batch_size"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        distill_stochastic(w_teacher(), data, checkpoint_dir=tmp_path, checkpoint_every=4,
                           **STOCH)
    state = tmp_path / "stochastic-00002.state"
    assert state.exists()
    monkeypatch.undo()
    r = distill_stochastic(w_teacher(), data, checkpoint_dir=tmp_path, checkpoint_every=4,
                           **STOCH)
    assert r.history.resumed_from == 8
    _same_weights(r.student, ref.student)
    assert r.history.loss == ref.history.loss
    assert r.history.heldout_mismatch == ref.history.heldout_mismatch
    assert r.history.initial_mismatch == ref.history.initial_mismatch
    assert r.steps == 2 and r.teacher_steps == 4 and r.student.sample_steps == 2
    # finished: a rerun trains nothing; another teacher's state is refused by name
    again = distill_stochastic(w_teacher(), data, checkpoint_dir=tmp_path, checkpoint_every=4,
                               **STOCH)
    _same_weights(again.student, ref.student)
    with pytest.raises(CheckpointError, match="'teacher'"):
        distill_stochastic(w_teacher(seed=3), data, checkpoint_dir=tmp_path,
                           checkpoint_every=4, **STOCH)
    with pytest.raises(CheckpointError, match="'w_max'"):
        distill_stochastic(w_teacher(), data, checkpoint_dir=tmp_path, checkpoint_every=4,
                           **{**STOCH, "w_max": 2.0})


def test_stochastic_student_streams_and_default_evaluation(data, monkeypatch):
    """Update k draws from update_generator(seed, "guided-stochastic<N>", k), as before the
    runner; by default the EMA is measured at the end only (the untrained copy first)."""
    real, seeds = guided.draw_batch, []

    def recording(examples, labels, steps, n, gen, *a, **kw):
        if n == 16:
            seeds.append(gen.initial_seed())
        return real(examples, labels, steps, n, gen, *a, **kw)

    monkeypatch.setattr(guided, "draw_batch", recording)
    r = distill_stochastic(w_teacher(), data, steps=2, teacher_steps=4, updates=5,
                           batch_size=16, seed=4, progress=False)
    assert seeds == [update_generator(4, "guided-stochastic2", k).initial_seed()
                     for k in range(5)]
    h = r.history
    assert h.eval_updates == [5] and len(h.heldout_mismatch) == 1
    assert math.isfinite(h.initial_mismatch)


def test_stage1_resume_with_a_crash_in_the_loss(tmp_path, data, monkeypatch):
    """The stage-1 twin of the stochastic test above, crashing inside the runner's loss."""
    ref = distill_guidance(toy_teacher(), data, **STAGE1)
    _crash_at(monkeypatch, "guided_distill_loss", 7, STAGE1["batch_size"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        distill_guidance(toy_teacher(), data, checkpoint_dir=tmp_path, checkpoint_every=3,
                         **STAGE1)
    monkeypatch.undo()
    r = distill_guidance(toy_teacher(), data, checkpoint_dir=tmp_path, checkpoint_every=3,
                         **STAGE1)
    assert r.history.resumed_from == 6
    _same_weights(r.student, ref.student)
    assert r.history.loss == ref.history.loss
    assert r.history.heldout_error == ref.history.heldout_error
    assert r.history.initial_error == ref.history.initial_error
    assert r.history.final_error == ref.history.final_error
