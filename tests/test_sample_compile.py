"""`sample(compile=...)` and `fastdiff.engine.inference.frozen`: the rule that decides when
compiling pays (no compile: a fake frozen model and a fake clock), then one small model
compiled for real: compiled samples equal eager ones, a frozen graph really holds the old
weights, and an in-place weight update makes `frozen` compile again instead of reusing it.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from fastdiff.engine import inference
from fastdiff.engine.samplers import sample


class TinyV(nn.Module):
    """A small conv v-model (B, 1, 8, 8): enough for conv weight prepacking under freezing."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, z, t, **cond):
        return self.b(torch.tanh(self.a(z) + t[:, None, None, None]))


def rel_rms(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


class FakeFrozen:
    """Stands in for `frozen(model, eval=False)`: counts its calls, runs the model."""

    made = 0

    def __init__(self, model, **kwargs):
        FakeFrozen.made += 1
        self.model, self.calls = model, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


class FakeClock:
    """perf_counter advancing `tick` seconds per reading: every timed call takes `tick`."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


@pytest.fixture
def fake(monkeypatch):
    """No compiling: a fake frozen model, 1 s per eager call, a 2x speed-up prior and an 8 s
    compile prior, so that compiling pays from 16 expected calls on."""
    FakeFrozen.made = 0
    monkeypatch.setattr(inference, "frozen", FakeFrozen)
    monkeypatch.setattr(inference, "time", FakeClock(1.0))
    monkeypatch.setitem(inference.SPEEDUP, "cpu", 2.0)
    monkeypatch.setitem(inference.COMPILE_SECONDS, "cpu", 8.0)
    return FakeFrozen


NOISE = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_ski_rental_compiles_once_the_calls_so_far_would_have_paid(fake):
    model = TinyV().eval()
    # 4 calls per run, 1 s each, saving 0.5 s a call: compiling (8 s) pays once
    # the expected further calls (= the calls so far, this run's included) reach 16
    for run in range(3):
        sample(model, NOISE, 4)
        assert fake.made == 0, run
        assert inference.usage(model)["decision"]["compile"] is False
    assert inference.usage(model)["calls"] == 12
    sample(model, NOISE, 4)      # 12 so far + 4 in this run = 16: compile from the start
    u = inference.usage(model)
    assert fake.made == 1 and u["compiled"] and u["decision"]["compile"]
    assert "ski rental" in u["decision"]["reason"]
    assert u["calls"] == 12      # no eager call in the compiled run
    sample(model, NOISE, 4)
    assert inference.usage(model)["decision"]["reason"] == "compiled earlier for these weights"


def test_repeat_announces_the_calls_and_switches_mid_run(fake):
    model = TinyV().eval()
    x_fake = sample(model, NOISE, 4, repeat=5)   # 20 calls expected: pays after one timed call
    u = inference.usage(model)
    assert fake.made == 1 and u["calls"] == 1 and u["decision"]["expected_calls"] == 19
    assert "repeat=5" in u["decision"]["reason"]
    torch.testing.assert_close(x_fake, sample(model, NOISE, 4, compile=False))
    # a smaller announcement does not pay: 1 timed call, then 3 expected, 1.5 s < 8 s
    other = TinyV().eval()
    sample(other, NOISE, 4, repeat=1)
    assert not inference.usage(other)["compiled"]


def test_per_call_time_scales_with_the_batch_and_guidance_doubles_it(fake, monkeypatch):
    monkeypatch.setitem(inference.COMPILE_SECONDS, "cpu", 1e9)   # stay eager: keep timing
    model = TinyV().eval()
    sample(model, NOISE, 4)                  # 4 calls at batch 4: 0.25 s per example
    decision = inference.usage(model)["decision"]
    assert decision["per_call_s"] == pytest.approx(1.0)
    labels = torch.zeros(8, dtype=torch.long)
    sample(model, torch.randn(8, 1, 8, 8), 2, cond={"y": labels}, guidance=1.0)
    decision = inference.usage(model)["decision"]
    # 6 s over 48 examples so far, at 16 per call (2 x 8: guidance doubles the batch)
    assert decision["per_call_s"] == pytest.approx(6 / 48 * 16)


def test_forced_choices_and_what_is_never_compiled(fake):
    model = TinyV().eval()
    sample(model, NOISE, 2, compile=False)
    assert fake.made == 0 and inference.usage(model)["decision"]["reason"].startswith("forced")
    sample(model, NOISE, 2, compile=True)
    assert fake.made == 1
    # a plain callable is run as it is; forcing a compile on it is an error
    fn = lambda z, t, **c: model(z, t)  # noqa: E731
    sample(fn, NOISE, 2)
    assert fake.made == 1 and inference.usage(fn) == {}
    with pytest.raises(TypeError, match="nn.Module"):
        sample(fn, NOISE, 2, compile=True)
    with pytest.raises(TypeError, match="compile must be"):
        sample(model, NOISE, 2, compile="yes")
    with pytest.raises(ValueError, match="repeat"):
        sample(model, NOISE, 2, repeat=0)


def test_changed_weights_are_not_recompiled_automatically(fake, monkeypatch):
    model = TinyV().eval()
    monkeypatch.setitem(inference.COMPILE_SECONDS, "cpu", 0.0)   # pays at once
    sample(model, NOISE, 2)
    assert inference.usage(model)["compiled"] and fake.made == 1
    monkeypatch.setitem(inference.COMPILE_SECONDS, "cpu", 8.0)
    with torch.no_grad():
        model.b.bias.add_(1.0)                       # an optimizer step, in effect
    # new weights: counted from zero again, so 4 calls (2 s of saving) do not pay 8 s
    sample(model, NOISE, 4)
    u = inference.usage(model)
    assert fake.made == 1 and not u["compiled"] and u["calls"] == 4


def test_samples_are_ordinary_tensors_and_the_model_keeps_its_mode():
    model = TinyV().train()
    x = sample(model, NOISE, 2, compile=False)
    assert not torch.is_inference(x)
    x.add_(1.0)                                      # in place: allowed
    assert model.training and next(model.parameters()).requires_grad


def test_weights_key_sees_in_place_updates_and_replacements():
    model = TinyV()
    k0 = inference.weights_key(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(NOISE, torch.rand(4)).sum().backward()
    opt.step()
    k1 = inference.weights_key(model)
    assert k1 != k0
    model.load_state_dict(TinyV().state_dict())
    assert inference.weights_key(model) != k1
    assert inference.weights_key(model) == inference.weights_key(model)


# ---------------------------------------------------------------- one real compile (twice)
def test_compiled_sampling_equals_eager_and_stale_weights_recompile():
    model = TinyV().eval()
    eager = sample(model, NOISE, 4, compile=False)
    compiled = sample(model, NOISE, 4, compile=True)               # compile 1
    assert rel_rms(compiled, eager) < 1e-4, rel_rms(compiled, eager)
    net = inference.frozen(model, eval=False)
    assert net.info["state"] == "frozen" and net.info["compiles"] == 1, net.info

    # an in-place update (what an optimizer step does) under the frozen graph
    old_graph = net._core.graph
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    eager2 = sample(model, NOISE, 4, compile=False)
    # the old graph, called past the weights check, still holds the old weights: freezing
    # is real, so reusing it would be wrong ...
    with torch.inference_mode():
        z, t = NOISE.clone(), torch.full((4,), 0.5)
        stale = old_graph.run(model, z, t)
        fresh = model(z, t)
    assert rel_rms(stale, fresh) > 1e-2
    # ... and `frozen` compiles again instead                         # compile 2
    with pytest.warns(RuntimeWarning, match="changed since it was compiled"):
        compiled2 = sample(model, NOISE, 4, compile=True)
    assert rel_rms(compiled2, eager2) < 1e-4, rel_rms(compiled2, eager2)
    assert net.info["compiles"] == 2 and net.info["state"] == "frozen"

    # caching it keeps nothing alive
    ref = weakref.ref(model)
    del model, net, old_graph
    gc.collect()
    assert ref() is None


def test_shared_code_serves_the_next_rounds_teacher_without_a_new_graph():
    """frozen(freeze=False): weights stay graph inputs and the code is shared, so another
    module of the same architecture (the next round's teacher, other weights) runs it with
    no new Dynamo graph, and in-place weight updates are read, not baked in."""
    import copy

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    z, t = NOISE.clone(), torch.full((4,), 0.5)
    first = TinyV()
    a = inference.frozen(first, freeze=False)
    out = a(z, t)
    assert a.info["state"] == "compiled" and not a.info["freezing"], a.info
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1 and rel_rms(out, first(z, t)) < 1e-5
    second = copy.deepcopy(first)
    with torch.no_grad():
        for p in second.parameters():
            p.mul_(0.5)
    b = inference.frozen(second, freeze=False)
    with torch.no_grad():
        assert rel_rms(b(z, t), second(z, t)) < 1e-5
        for p in second.parameters():     # an in-place update: read, never recompiled
            p.add_(0.1)
        assert rel_rms(b(z, t), second(z, t)) < 1e-5
    assert counters["stats"]["unique_graphs"] == graphs
    assert b.info["compiles"] == 1
    # the frozen kind of the same module is its own graph
    assert inference.frozen(second)._core is not b._core


def test_the_benchmarks_plain_loop_is_the_same_ddim():
    from benchmarks.sampling import plain_ddim

    model = TinyV().eval()
    ours = sample(model, NOISE, 4, compile=False)
    torch.testing.assert_close(plain_ddim(model, NOISE, 4), ours, rtol=1e-5, atol=1e-5)
