"""fastdiff.training.policy: the "auto" precision / compile choices, decided from a short
measurement (here a fake timer on a tiny model: no real timing) and the round length."""

from __future__ import annotations

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
    policy, record = _decide(timer, updates=20000)
    # eager bf16: 40000 x 8 ms = 320 s; compiled fp32: 25 s + 40000 x 10 ms / 1.41 = 309 s
    assert policy.teacher_compile and not policy.teacher_bf16
    assert record["expected_round_s"]["teacher"]["compile fp32"] == pytest.approx(
        25 + 40000 * 10e-3 / 1.41)
    assert not policy.student_compile  # 1.04x prior: 20000 x 0.4 ms < 51 s


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
