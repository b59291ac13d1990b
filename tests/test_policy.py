"""fastdiff.training.policy: the "auto" precision / compile choices, decided from a short
measurement (here a fake timer on a tiny model: no real timing) and the round length."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
from fastdiff.kernels import fused_pd_loss
from torch import nn

from fastdiff.training import policy as pol
from fastdiff.training.policy import Policy, decide, teacher_forward


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.out = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, z, t, y=None):
        h = torch.relu(self.conv(z)) * t.view(-1, 1, 1, 1).to(z.dtype)
        return self.out(h)


def _example(batch=8):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(batch, 1, 8, 8, generator=g)
    t = torch.rand(batch, generator=g)
    return (z, t), {}


class FakeTimer:
    """Scripted seconds per "<role> <variant>"; a list cycles through repeats. Also counts
    which variants were timed and calls each fn (so the real code paths run)."""

    def __init__(self, times: dict):
        self.times = times
        self.seen: list = []

    def __call__(self, name, fn):
        fn()
        self.seen.append(name)
        value = self.times[name]
        if isinstance(value, list):
            return value[self.seen.count(name) % len(value)]
        return value


def _times(teacher=None, student=None):
    base = {"fp32": 10e-3, "bf16": 10e-3, "fp32+channels_last": 11e-3,
            "bf16+channels_last": 12e-3}
    out = {}
    for role, over in (("teacher", teacher or {}), ("student", student or {})):
        for k, v in (base | over).items():
            out[f"{role} {k}"] = v
    return out


def _decide(timer, updates=300, **kw):
    kw.setdefault("allow_emulated_bf16", True)   # this CPU may have no native bf16
    return decide(kw.pop("request", None), teacher=Tiny().eval(), student=Tiny(),
                  example=_example(), updates=updates, timer=timer, **kw)


def test_bf16_teacher_taken_when_faster_and_accurate_short_round_not_compiled():
    timer = FakeTimer(_times(teacher={"bf16": 8e-3}))
    policy, record = _decide(timer, updates=300)
    assert policy.resolved
    assert policy.teacher_bf16 and not policy.teacher_channels_last
    assert not policy.teacher_compile          # 600 calls save ~1.7 s < a 25 s compile
    assert not policy.student_bf16 and not policy.student_compile  # bf16 not faster
    assert record["decided"] == policy.as_dict()
    assert record["measured"]["teacher"]["bf16"]["median_s"] == 8e-3
    assert record["measured"]["teacher_rel_rms_vs_fp32"]["bf16"] < pol.BF16_TOLERANCE
    # interleaved: the variants alternate within a repeat
    first = [n for n in timer.seen if n.startswith("teacher")][:4]
    assert len(set(first)) == 4
    json.dumps(record)  # the record goes into the run's history as JSON


def test_long_round_compiles_the_teacher_when_the_saving_covers_the_compile():
    timer = FakeTimer(_times(teacher={"bf16": 8e-3}))
    policy, record = _decide(timer, updates=40000)
    # eager bf16: 80000 x 8 ms = 640 s; compiled fp32: 40 s + 80000 x 10 ms / 1.4 = 611 s
    seconds, speed = pol.COMPILE_SECONDS["cpu"]["teacher"], pol.COMPILE_PRIORS["cpu"]["teacher"]
    assert (seconds, speed["fp32"]) == (40.0, 1.4)   # the engine's priors for `frozen`
    assert policy.teacher_compile and not policy.teacher_bf16
    assert record["expected_round_s"]["teacher"]["compile fp32"] == pytest.approx(
        seconds + 80000 * 10e-3 / speed["fp32"])
    assert not policy.student_compile  # 1.04x prior: 40000 x 0.4 ms < 51 s


def test_a_variant_within_the_margin_is_not_taken():
    timer = FakeTimer(_times(teacher={"bf16": 9.7e-3}))   # 3% faster < 5% margin
    policy, _ = _decide(timer)
    assert not policy.teacher_bf16


def test_noisy_measurement_keeps_the_safe_defaults():
    timer = FakeTimer(_times(teacher={"bf16": [5e-3, 20e-3, 6e-3]}))
    policy, record = _decide(timer)
    assert not policy.teacher_bf16 and not policy.teacher_compile
    assert "noisy" in record["reasons"]["teacher"]


def test_inaccurate_bf16_is_refused_even_when_faster():
    timer = FakeTimer(_times(teacher={"bf16": 5e-3}))
    policy, record = _decide(timer, bf16_tolerance=1e-12)
    assert not policy.teacher_bf16
    assert any(k.startswith("teacher bf16") for k in record["reasons"])


def test_forced_choices_are_kept_and_not_measured():
    timer = FakeTimer(_times(teacher={"bf16": 5e-3}, student={"bf16": 5e-3}))
    forced = {"teacher_bf16": False, "teacher_compile": False,
              "teacher_channels_last": False, "student_compile": True}
    policy, record = _decide(timer, request=forced)
    assert not any(n.startswith("teacher") for n in timer.seen)
    assert not policy.teacher_bf16 and policy.student_compile
    assert record["forced"] == forced
    assert policy.student_bf16  # decided: faster and not forced


def test_no_native_bf16_means_bf16_is_not_measured(monkeypatch):
    monkeypatch.setattr(pol, "native_bf16", lambda device: False)
    timer = FakeTimer(_times(teacher={"bf16": 1e-3}))
    policy, record = _decide(timer, allow_emulated_bf16=False)
    assert not any("bf16" in n for n in timer.seen)
    assert not policy.teacher_bf16 and record["native_bf16"] is False


def test_measuring_leaves_the_student_untouched():
    student = Tiny()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    decide(None, teacher=Tiny().eval(), student=student, example=_example(), updates=10,
           timer=FakeTimer(_times()), allow_emulated_bf16=True)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert all(p.grad is None for p in student.parameters())


def test_real_timer_measures_within_its_budget():
    """The default timer on the tiny model: a decision comes back, with what it measured."""
    policy, record = decide(None, teacher=Tiny().eval(), student=Tiny(), example=_example(),
                            updates=5, budget_s=0.5)
    assert policy.resolved and not policy.teacher_compile   # 10 calls never pay a compile
    assert record["measure_s"] < 30 and set(record["measured"]) >= {"teacher", "student"}


def test_parse():
    assert Policy.parse(None) == Policy() == Policy.parse("auto")
    assert Policy.parse({"teacher_bf16": True}).teacher_bf16 is True
    with pytest.raises(ValueError, match="unknown policy choices"):
        Policy.parse({"teacher_fp8": True})
    with pytest.raises(ValueError, match="True, False or None"):
        Policy.parse({"teacher_bf16": "yes"})
    with pytest.raises(TypeError):
        Policy.parse(3)


@pytest.mark.parametrize("bf16,cl", [(False, False), (True, False), (False, True)])
def test_teacher_forward_feeds_the_fused_loss(bf16, cl):
    """The prepared teacher returns float32 contiguous outputs without autograd history that
    the student's loss can save for backward (inference_mode outputs could not)."""
    teacher = Tiny()
    (z, t), _ = _example()
    ref = teacher(z, t).detach()
    f = teacher_forward(teacher, Policy(teacher_bf16=bf16, teacher_channels_last=cl,
                                        teacher_compile=False))
    v1, v2 = f(z, t), f(z, t)
    assert v1.dtype == torch.float32 and v1.is_contiguous() and not v1.requires_grad
    assert float((v1 - ref).norm() / ref.norm()) < (2e-2 if bf16 else 1e-5)
    vs = torch.randn_like(z, requires_grad=True)
    phi = math.pi / 2 * t.double()
    loss = fused_pd_loss(vs, z, v1, v2, phi, phi - 0.01, phi - 0.02)
    loss.backward()
    assert vs.grad is not None and torch.isfinite(vs.grad).all()


def test_teacher_decided_fp32_stays_fp32_inside_a_student_autocast():
    teacher = Tiny()
    (z, t), _ = _example()
    f = teacher_forward(teacher, Policy(teacher_bf16=False, teacher_channels_last=False,
                                        teacher_compile=False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = f(z, t)
    assert torch.equal(out, teacher(z, t).detach())


def test_legacy_settings_become_forced_choices():
    assert pol.legacy_request() == {}
    assert pol.legacy_request("bf16", True) == {"teacher_bf16": True, "student_bf16": True,
                                                 "student_compile": True}
    assert pol.legacy_request("fp32") == {"teacher_bf16": False, "student_bf16": False}
    with pytest.raises(ValueError):
        pol.legacy_request("fp16")


def test_apply_puts_the_policy_to_work():
    teacher, student = Tiny(), Tiny()
    p = Policy(teacher_compile=False, teacher_bf16=True, teacher_channels_last=False,
               student_compile=False, student_bf16=True, student_channels_last=False)
    applied = pol.apply(p, teacher=teacher, student=student, device="cpu")
    (z, t), _ = _example()
    assert applied.teacher(z, t).dtype == torch.float32
    assert applied.student is student
    with applied.student_autocast():
        assert applied.student(z, t).dtype == torch.bfloat16


# ---------------------------------------------------------------- wired into the runner
def _toy_round(**kw):
    from fastdiff.methods.pd import distill_round

    torch.manual_seed(0)
    teacher = kw.pop("teacher", None) or Recorder()
    data = torch.randn(64, 2, 4, 4)   # 2 channels: a channels_last layout is visible
    return distill_round(teacher, data, teacher_steps=4, updates=kw.pop("updates", 6),
                         batch_size=16, lr=1e-3, eval_every=3, progress=False, **kw)


class Recorder(nn.Module):
    """A conv "teacher" that notes, per call, whether autocast was on and the input layout."""

    def __init__(self):
        super().__init__()
        self.net = nn.Conv2d(2, 2, 3, padding=1)
        self.calls: list = []

    def forward(self, z, t, **cond):
        self.calls.append((torch.is_autocast_enabled("cpu"),
                           z.is_contiguous(memory_format=torch.channels_last)
                           and not z.is_contiguous()))
        return self.net(z)


def test_a_round_records_its_policy_and_a_short_round_is_not_measured():
    r = _toy_round()
    p = r.history.policy
    assert set(p["decided"]) == set(pol.FIELDS) and not any(p["decided"].values())
    assert "too short" in p["record"]["reasons"]["all"]
    assert p["record"]["eager_round_estimate_s"] < 30
    assert p["fused_adamw"] is True
    json.dumps(p, allow_nan=False)   # strict JSON: it goes into checkpoints and reports


def test_forced_choices_reach_the_teacher_the_loss_calls():
    teacher = Recorder()
    r = _toy_round(teacher=teacher, policy={"teacher_bf16": True,
                                            "teacher_channels_last": True})
    assert r.history.policy["decided"]["teacher_bf16"] is True
    trained = teacher.calls[-2:]           # the last update's two teacher passes
    assert trained == [(True, True), (True, True)], teacher.calls
    off = Recorder()
    _toy_round(teacher=off, policy="off")
    assert off.calls[-1] == (False, False)


def test_a_forced_policy_is_honoured_and_legacy_flags_force_it():
    r = _toy_round(autocast="fp32", policy={"teacher_compile": False,
                                            "teacher_channels_last": False,
                                            "student_compile": False,
                                            "student_channels_last": False})
    assert r.history.policy["record"]["reasons"] == {"teacher": "all forced",
                                                     "student": "all forced"}
    with pytest.raises(ValueError, match="unknown policy choices"):
        _toy_round(policy={"teacher_fast": True})


def test_a_resumed_round_keeps_the_choices_it_made(tmp_path):
    forced = {"student_channels_last": True}
    first = _toy_round(updates=6, checkpoint_dir=tmp_path, checkpoint_every=3, policy=forced)
    state = tmp_path / "round-00004-to-00002.state"
    assert state.exists()
    from fastdiff.engine.checkpoint import load_state

    tensors, meta = load_state(state)
    meta["update"] = 3                 # as if killed after update 3: rerun from there
    meta["history"].update(stopped_by="", loss=meta["history"]["loss"][:3])
    meta["history"]["policy"]["decided"]["teacher_channels_last"] = True
    from fastdiff.engine.checkpoint import save_state

    save_state(state, tensors, meta)
    again = _toy_round(updates=6, checkpoint_dir=tmp_path, checkpoint_every=3, policy=forced)
    p = again.history.policy
    assert p["record"].get("resumed") is True
    assert p["decided"]["teacher_channels_last"] is True      # recorded, not re-decided
    assert p["decided"]["student_channels_last"] is True
    assert first.history.policy["decided"]["teacher_channels_last"] is False


def test_the_cli_takes_a_policy_and_names_a_bad_one(capsys):
    from fastdiff.apps.cli import build_parser

    base = ["distill", "--teacher", "t", "--out", "o"]
    parse = build_parser().parse_args
    assert parse(base).policy == "auto"
    assert parse([*base, "--policy", "off"]).policy == "off"
    assert parse([*base, "--policy", "teacher_compile=on,student_bf16=off"]).policy == {
        "teacher_compile": True, "student_bf16": False}
    with pytest.raises(SystemExit):
        parse([*base, "--policy", "teacher_turbo=on"])
    assert "NAME one of teacher_compile" in capsys.readouterr().err


def test_without_example_inputs_cuda_still_decides_from_the_device(monkeypatch):
    """train_teacher gives no example inputs: on CUDA the device decides (bf16 where the
    GPU has it) rather than switching everything off; on CPU everything stays off."""
    from fastdiff.training import runner

    seen = {}

    def fake_decide(request, **kw):
        seen.update(kw)
        return Policy(**{f: f.endswith("bf16") for f in pol.FIELDS}), {"reasons": {}}

    monkeypatch.setattr(runner, "decide", fake_decide)
    # no CUDA RNG to fork on this machine
    monkeypatch.setattr(torch.random, "fork_rng", lambda *a, **k: contextlib.nullcontext())
    method = runner.Method(name="t", student=Tiny(), draw=None, loss=None)
    config = runner.RunConfig(updates=10, batch_size=4, lr=1e-3)
    policy, _ = runner._decide_policy(method, Policy(), None, method.student,
                                      torch.device("cuda"), config, 0, 1)
    assert policy.student_bf16 and seen["example"] == ((), {})
    policy, record = runner._decide_policy(method, Policy(), None, method.student,
                                           torch.device("cpu"), config, 0, 1)
    assert not any(policy.as_dict().values()) and "no example inputs" in \
        record["reasons"]["all"]


def _student_policy(**kw):
    return Policy(**{f: False for f in pol.FIELDS} | kw)


def test_a_student_compiled_before_in_this_process_is_a_warm_compile(monkeypatch):
    """The next round's student is another module of the same architecture: Dynamo's code
    for the last one serves it, so its compile is priced at WARM_COMPILE_SECONDS, not the
    cold prior; another batch shape is another graph, priced cold."""
    monkeypatch.setattr(pol, "_COMPILED", {"teacher": set(), "student": set()})
    calls = 6000   # saves 6000 x 10 ms x (1 - 1/1.04) = 2.3 s: > 2 s warm, << 51 s cold
    cold, record = _decide(FakeTimer(_times()), updates=calls)
    assert not cold.student_compile and "warm_compile" not in record
    pol.prepare_student(Tiny(), _student_policy(student_compile=True), example=_example())
    warm, record = _decide(FakeTimer(_times()), updates=calls)
    assert warm.student_compile and not warm.student_bf16
    assert record["warm_compile"] == {"student": ["fp32"], "seconds": 2.0}
    assert not record["teacher_compile_shared"]
    assert record["expected_round_s"]["student"]["compile fp32"] == pytest.approx(
        pol.WARM_COMPILE_SECONDS["cpu"] + calls * 10e-3 / pol.COMPILE_PRIORS["cpu"]["student"]
        ["fp32"])
    other, record = decide(None, teacher=Tiny().eval(), student=Tiny(),
                           example=_example(batch=16), updates=calls,
                           timer=FakeTimer(_times()), allow_emulated_bf16=True)
    assert not other.student_compile and "warm_compile" not in record
    # an eager student is not remembered
    pol.prepare_student(Tiny(), _student_policy(), example=_example(batch=32))
    assert len(pol._COMPILED["student"]) == 1
    pol.forget_compiled()                 # what a benchmark's cold start does
    again, record = _decide(FakeTimer(_times()), updates=calls)
    assert not again.student_compile and "warm_compile" not in record


def test_dynamo_serves_a_copy_of_a_compiled_student_without_a_new_graph():
    """What the warm prior rests on: the compiled code of one student runs a deep copy (the
    next round's student) forward and backward with no new Dynamo graph. (aot_eager: the
    cache and its guards are Dynamo's, whatever the backend; Inductor would only add
    minutes of compiling here.)"""
    import copy

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    (z, t), _ = _example()
    first = Tiny()
    torch.compile(first, backend="aot_eager")(z, t).square().mean().backward()
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    second = copy.deepcopy(first)
    with torch.no_grad():
        for p in second.parameters():
            p.mul_(0.5)      # other weights, as a trained round's student has
    out = torch.compile(second, backend="aot_eager")(z, t)
    out.square().mean().backward()
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch.allclose(out, second(z, t)) and second.conv.weight.grad is not None


def test_a_horizon_of_later_rounds_pays_for_a_shared_teacher_compile(monkeypatch):
    """A 3000-update round cannot pay a 40 s frozen teacher compile (6000 calls x 10 ms
    save 17 s at 1.4x); six rounds of it can, when the later rounds' teachers reuse the
    code: its cold compile is charged to this round for its share of the horizon only, and
    the next round's teacher, once compiled that way, is warm."""
    monkeypatch.setattr(pol, "_COMPILED", {"teacher": set(), "student": set()})
    alone, record = _decide(FakeTimer(_times()), updates=3000)
    assert not alone.teacher_compile and not record["teacher_compile_shared"]
    first, record = _decide(FakeTimer(_times()), updates=3000, horizon=18000)
    assert first.teacher_compile and record["teacher_compile_shared"]
    assert "teacher compiled (shared code) fp32" in pol.describe(
        {"decided": first.as_dict(), "record": record})
    plans = record["expected_round_s"]["teacher"]
    speed = pol.SHARED_TEACHER_SPEEDUP["cpu"]
    cold = pol.COMPILE_SECONDS["cpu"]["teacher"]
    assert plans["compile-shared fp32"] == pytest.approx(cold * 3000 / 18000 + 6000 * 10e-3 / speed)
    assert plans["compile fp32"] > plans["eager fp32"] > plans["compile-shared fp32"]
    # the round runs it: the teacher compiled with shared code is remembered ...
    (z, t), _ = _example()
    f = teacher_forward(Tiny().eval(), first, shared=True, example=_example())
    assert f(z, t).shape == z.shape
    assert len(pol._COMPILED["teacher"]) == 1
    # ... so the next round's teacher (another module, same architecture) is warm
    nxt, record = _decide(FakeTimer(_times()), updates=3000, horizon=15000)
    assert nxt.teacher_compile and record["teacher_compile_shared"]
    assert record["warm_compile"]["teacher"] == ["fp32"]
    assert record["expected_round_s"]["teacher"]["compile-shared fp32"] == pytest.approx(
        pol.WARM_COMPILE_SECONDS["cpu"] + 6000 * 10e-3 / speed)
    # a noisy measurement in a later round keeps the code already paid for (measured on
    # the demo's rounds: dropping it lost round 1's compile); a cold teacher stays eager
    noisy = FakeTimer(_times(teacher={"fp32": [5e-3, 20e-3, 6e-3]}))
    kept, record = _decide(noisy, updates=3000, horizon=15000)
    assert kept.teacher_compile and record["teacher_compile_shared"]
    assert "noisy" in record["reasons"]["teacher"]
    assert "already paid for" in record["reasons"]["teacher"]
    forced_off, _ = _decide(noisy, updates=3000, horizon=15000,
                            request={"teacher_compile": False})
    assert not forced_off.teacher_compile
    pol.forget_compiled()
    cold, record = _decide(noisy, updates=3000, horizon=15000)
    assert not cold.teacher_compile and not record.get("teacher_compile_shared")


def test_progressive_distill_gives_each_round_the_updates_left(monkeypatch):
    from fastdiff.methods import pd

    seen = []
    real = pd.distill_round

    def spy(teacher, data, **kw):
        seen.append((kw["updates"], kw["horizon"]))
        return real(teacher, data, **kw)

    monkeypatch.setattr(pd, "distill_round", spy)
    data = torch.randn(32, 2, 4, 4)
    pd.progressive_distill(Recorder(), data, start_steps=8, end_steps=1, updates=[3, 2, 1],
                           batch_size=8, lr=1e-3, eval_every=5, progress=False, policy="off")
    assert seen == [(3, 6), (2, 3), (1, 1)]


class ConvV(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, z, t, **cond):
        return self.net(z) * (1 + t.view(-1, 1, 1, 1).to(z.dtype))


def test_the_next_rounds_teacher_runs_the_shared_compiled_code(monkeypatch):
    """Wired through the runner: a policy that compiles the teacher with shared code gives
    round 2's teacher (round 1's student, other weights) round 1's compiled code, with no
    new Dynamo graph, and trains as the eager rounds do."""
    from torch._dynamo.utils import counters

    from fastdiff.methods.pd import progressive_distill
    from fastdiff.training import runner

    def shared_teacher(request, **kw):
        return (Policy(**{f: f == "teacher_compile" for f in pol.FIELDS}),
                {"teacher_compile_shared": True, "reasons": {}})

    data = torch.randn(64, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    options = dict(start_steps=8, end_steps=2, updates=4, batch_size=16, lr=1e-3,
                   eval_every=2, progress=False)
    eager = progressive_distill(ConvV(), data, policy="off", **options)
    monkeypatch.setattr(runner, "decide", shared_teacher)
    torch._dynamo.reset()
    graphs = []
    results = progressive_distill(ConvV(), data, **options,
                                  on_round=lambda r: graphs.append(
                                      counters["stats"]["unique_graphs"]))
    assert graphs[0] >= 1 and graphs[1] == graphs[0]   # round 2 compiled nothing
    for r, e in zip(results, eager):
        assert r.history.policy["record"]["teacher_compile_shared"]
        assert r.history.heldout[-1] == pytest.approx(e.history.heldout[-1], rel=1e-3)
