"""The one training runner: the non-finite guard, resume, fingerprints (DESIGN.md §4c)."""

import copy

import pytest
import torch

from fastdiff.engine.checkpoint import CheckpointError, load_state
from fastdiff.engine.data import load_dataset
from fastdiff.engine.models import MLP
from fastdiff.methods.pd import distill_round, progressive_distill
from fastdiff.training import EMA, make_optimizer, train_teacher
from fastdiff.training.runner import NonFiniteError, guarded_update

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def toy():
    data = load_dataset("eight_gaussians", seed=0)
    torch.manual_seed(0)
    teacher = train_teacher(MLP(dim=2, hidden=64), data, updates=60, batch_size=128, lr=2e-3,
                            progress=False)
    return teacher, data


class Flaky(torch.nn.Module):
    """Wraps a model; returns NaN on the calls whose index is in `bad` (or all from `from_`)."""

    def __init__(self, inner, bad=(), from_=None):
        super().__init__()
        self.inner, self.bad, self.from_, self.calls = inner, set(bad), from_, 0

    def forward(self, z, t, **cond):
        out = self.inner(z, t, **cond)
        i, self.calls = self.calls, self.calls + 1
        if i in self.bad or (self.from_ is not None and i >= self.from_):
            return torch.full_like(out, float("nan"))
        return out


def _finite(module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.state_dict().values())


def _state_finite(path) -> bool:
    tensors, _ = load_state(path)
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def test_a_non_finite_update_changes_nothing():
    torch.manual_seed(0)
    model = MLP(dim=2, hidden=16)
    opt = make_optimizer(model, 1e-2)
    ema = EMA(model, 0.9)
    x = torch.randn(8, 2)
    good = (model(x, torch.rand(8)) - 1).square().mean()
    assert bool(guarded_update(good, model, opt, ema, 1.0))
    params = [p.detach().clone() for p in model.parameters()]
    shadow = [p.clone() for p in ema.shadow.parameters()]
    state = {k: {n: v.clone() for n, v in s.items()} for k, s in enumerate(opt.state.values())}
    bad = (model(x, torch.rand(8)) - 1).square().mean() * float("nan")
    ok = guarded_update(bad, model, opt, ema, 1.0)
    assert not bool(ok)
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    for p, q in zip(ema.shadow.parameters(), shadow):
        assert torch.equal(p, q)
    for k, s in enumerate(opt.state.values()):
        for n, v in s.items():
            assert torch.equal(v, state[k][n]), n          # moments and step count kept
    # and a finite update after it moves the weights again
    again = (model(x, torch.rand(8)) - 1).square().mean()
    assert bool(guarded_update(again, model, opt, ema, 1.0))
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), params))


def test_nan_from_the_teacher_is_skipped_and_never_checkpointed(toy, tmp_path):
    teacher, data = toy
    # two held-out passes first, then two per update: updates 1, 5 and 14 get a NaN
    flaky = Flaky(teacher, bad={4, 5, 12, 30})
    r = distill_round(flaky, data, teacher_steps=4, updates=30, batch_size=64, lr=1e-3,
                      policy="off",   # the policy's measurement would call the teacher too
                      eval_every=10, checkpoint_dir=tmp_path, checkpoint_every=5,
                      progress=False, student=copy.deepcopy(teacher))
    h = r.history
    assert h.updates_done == 30 and len(h.skipped) >= 2, h.skipped
    assert all(h.loss[k] is None for k in h.skipped)
    assert sum(x is not None for x in h.loss) == 30 - len(h.skipped)
    assert _finite(r.student)
    assert _state_finite(tmp_path / "round-00004-to-00002.state")


def test_persistent_nan_stops_with_one_error_and_keeps_the_last_good_state(toy, tmp_path):
    teacher, data = toy
    good = distill_round(teacher, data, teacher_steps=4, updates=40, batch_size=64, lr=1e-3,
                         checkpoint_dir=tmp_path / "ref", checkpoint_every=10,
                         progress=False, max_skips=5)
    assert not good.history.skipped
    # two held-out passes, then two per update: every pass from update 12 on is NaN. Skips
    # are read back with the losses (every 10 updates), so the run stops at update 20
    flaky = Flaky(teacher, from_=2 + 2 * 12)
    with pytest.raises(NonFiniteError, match=r"updates 12\.\.19: 8 consecutive") as err:
        distill_round(flaky, data, teacher_steps=4, updates=40, batch_size=64, lr=1e-3,
                      policy="off",   # the policy's measurement would call the teacher too
                      checkpoint_dir=tmp_path / "bad", checkpoint_every=10, progress=False,
                      max_skips=5, student=copy.deepcopy(teacher))
    assert "last good state" in str(err.value)
    state = tmp_path / "bad" / "round-00004-to-00002.state"
    assert _state_finite(state) and load_state(state)[1]["update"] == 10


def test_lr_that_blows_up_the_weights_is_caught(toy):
    _, data = toy
    with pytest.raises(NonFiniteError):
        train_teacher(MLP(dim=2, hidden=16), data, updates=200, batch_size=64, lr=1e30,
                      warmup=0, progress=False, max_skips=5)


def test_teacher_training_resumes_bit_exactly(toy, tmp_path):
    _, data = toy

    def fresh():
        torch.manual_seed(3)
        return MLP(dim=2, hidden=32)

    kw = dict(updates=40, batch_size=32, lr=1e-3, progress=False, checkpoint_every=10,
              seed=5)
    ref = train_teacher(fresh(), data, checkpoint_dir=tmp_path / "ref", **kw)

    class Crash(Exception):
        pass

    model = fresh()
    calls = [0]
    real = model.forward

    def forward(*a, **k):
        calls[0] += 1
        if calls[0] == 25:   # during update 24: the last state is the one after update 20
            raise Crash
        return real(*a, **k)

    model.forward = forward
    with pytest.raises(Crash):
        train_teacher(model, data, checkpoint_dir=tmp_path / "run", **kw)
    again = train_teacher(fresh(), data, checkpoint_dir=tmp_path / "run", **kw)
    assert again.train_history.resumed_from == 20
    for p, q in zip(ref.parameters(), again.parameters()):
        assert torch.equal(p, q)
    assert again.train_history.loss == ref.train_history.loss


def test_a_checkpoint_of_other_settings_is_refused_naming_them(toy, tmp_path):
    teacher, data = toy
    kw = dict(teacher_steps=4, updates=20, batch_size=32, progress=False,
              checkpoint_dir=tmp_path, checkpoint_every=10)
    distill_round(teacher, data, lr=1e-3, **kw)
    with pytest.raises(CheckpointError, match="'lr': \\(0.001, 0.002\\)"):
        distill_round(teacher, data, lr=2e-3, **kw)


def test_a_finished_round_of_another_teacher_is_not_reused(toy, tmp_path):
    teacher, data = toy
    kw = dict(start_steps=4, end_steps=2, updates=10, batch_size=32, lr=1e-3,
              progress=False, checkpoint_dir=tmp_path)
    progressive_distill(teacher, data, **kw)
    other = train_teacher(MLP(dim=2, hidden=64), data, updates=5, batch_size=32, lr=1e-3,
                          progress=False, seed=9)
    with pytest.raises(CheckpointError, match="another run.*'teacher'"):
        progressive_distill(other, data, **kw)
    again = progressive_distill(teacher, data, **kw)     # the same settings: reused
    assert again[0].history.updates_done == 10


def test_a_model_that_returns_a_tuple_is_one_clear_error(toy):
    teacher, data = toy

    class Tupled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, z, t, **cond):
            return (self.inner(z, t, **cond),)

    with pytest.raises(TypeError, match="the teacher returned a tuple, not a tensor"):
        distill_round(Tupled(teacher), data, teacher_steps=4, updates=2, batch_size=8,
                      progress=False, student=copy.deepcopy(teacher))
    with pytest.raises(TypeError, match="the student returned a tuple"):
        distill_round(teacher, data, teacher_steps=4, updates=2, batch_size=8,
                      progress=False, student=Tupled(copy.deepcopy(teacher)))
