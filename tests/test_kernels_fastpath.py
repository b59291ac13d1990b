"""fastdiff.kernels' routes (kernels/_register.py) and the torch path's loss reduction.

An eager call takes the lean route (the implementations called directly, a small
autograd.Function where a gradient is needed, the one-pass loss+gradient variant where
there is one); anything that traces or intercepts takes the torch.library custom op. Both
run the same implementations: tests/test_kernels.py compares every route with float64;
here, that the right route is taken, that the routes agree with each other, and how the
one-pass route hands its saved gradient to autograd.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from fastdiff.kernels import (  # noqa: E402
    WEIGHTINGS,
    _register,
    distill_loss,
    fused_pd_loss,
    guided_distill_loss,
    pd_target,
    sfd_loss,
)
from fastdiff.kernels.distill_loss import distill_loss_reference  # noqa: E402
from fastdiff.kernels.guided_loss import guided_distill_loss_reference  # noqa: E402
from fastdiff.kernels.pd_target import pd_coefficients64  # noqa: E402
from fastdiff.kernels.sfd_loss import sfd_loss_reference  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

DEVICE = torch.device(os.environ.get("FASTDIFF_TEST_DEVICE", "cpu"))  # set by conftest.py
HALF_PI = math.pi / 2
FUSED_OP = fused_pd_loss.__globals__["_fused_pd_loss_op"]  # the module's KernelOp


def randn(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=DEVICE, dtype=dtype)


def pd_inputs(shape=(3, 1100), dtype=torch.float32, seed=0):
    tensors = [randn(shape, seed + k, dtype) for k in range(4)]
    phi_t = torch.tensor([HALF_PI, 0.7, 0.01], dtype=torch.float64)[:shape[0]]
    return tensors, (phi_t, phi_t / 2, phi_t / 4)


class _CountCustomOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastdiff":
            self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def count_op_calls(monkeypatch):
    """Counts calls of fused_pd_loss's custom op (not of the lean route)."""
    calls = []
    real = FUSED_OP.op

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(FUSED_OP, "op", counting)
    return calls


def test_eager_calls_take_the_lean_route(count_op_calls):
    (vs, z, v1, v2), angles = pd_inputs()
    x = vs.clone().requires_grad_()
    fused_pd_loss(x, z, v1, v2, *angles).backward()
    with torch.no_grad():
        fused_pd_loss(vs, z, v1, v2, *angles)
    assert count_op_calls == []


def test_dispatch_modes_and_the_switch_take_the_custom_op(count_op_calls, monkeypatch):
    """A dispatch mode (what opcheck, FakeTensorMode and recorders use) sees the custom
    ops, forward and backward, as it did before the lean route existed."""
    (vs, z, v1, v2), angles = pd_inputs()
    x = vs.clone().requires_grad_()
    with _CountCustomOps() as mode:
        fused_pd_loss(x, z, v1, v2, *angles).backward()
    assert "fastdiff.fused_pd_loss.default" in mode.names
    assert "fastdiff.fused_pd_loss_backward.default" in mode.names
    monkeypatch.setattr(_register, "EAGER_ROUTE", False)
    fused_pd_loss(vs, z, v1, v2, *angles)
    assert len(count_op_calls) == 2


def _value_and_grad(route, monkeypatch, metric, dtype, upstream=1.0):
    monkeypatch.setattr(_register, "ONE_PASS", route == "one_pass")
    monkeypatch.setattr(_register, "EAGER_ROUTE", route != "custom_op")
    (vs, z, v1, v2), angles = pd_inputs(dtype=dtype)
    x = vs.clone().requires_grad_()
    loss = fused_pd_loss(x, z, v1, v2, *angles, "snr_trunc", metric)
    (loss * upstream).backward() if upstream != 1.0 else loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("metric", ["l2", "l1", "pseudo_huber"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routes_compute_the_same_numbers(backend, monkeypatch, metric, dtype):
    """At upstream 1 the one-pass variant does the two-pass float32 arithmetic (the same
    operations on the same difference), so value and gradient agree to the bit."""
    monkeypatch.setattr(_register, "ONE_PASS_DTYPES", (dtype,))
    loss, grad = _value_and_grad("custom_op", monkeypatch, metric, dtype)
    for route in ("one_pass", "two_pass"):
        other_loss, other_grad = _value_and_grad(route, monkeypatch, metric, dtype)
        assert torch.equal(other_loss, loss), route
        assert torch.equal(other_grad, grad), route


def test_which_students_take_one_pass(monkeypatch):
    """float32: one pass. float16: two passes (its gradient at upstream 1 would underflow
    before a loss scaler multiplies it). bfloat16: one pass where the torch path runs
    eager, two where it runs compiled on large CPU tensors (measured faster there)."""
    seen = []
    real = _register.scaled_saved_grad
    monkeypatch.setattr(_register, "scaled_saved_grad",
                        lambda g, u: seen.append(g.dtype) or real(g, u))
    _value_and_grad("one_pass", monkeypatch, "l2", torch.float16, upstream=2.0**16)
    assert seen == []
    for dtype in (torch.float32, torch.bfloat16):
        _value_and_grad("one_pass", monkeypatch, "l2", dtype, upstream=2.0**16)
    assert seen == [torch.float32, torch.bfloat16]
    monkeypatch.setenv("FASTDIFF_KERNELS", "torch")
    monkeypatch.setattr(_register, "cpu_compiles", lambda tensor: True)
    seen.clear()
    _value_and_grad("one_pass", monkeypatch, "l2", torch.bfloat16)
    assert seen == []


def test_one_pass_gradient_with_a_retained_graph():
    """The saved gradient is handed out as it is at upstream 1: a second backward through a
    retained graph gives the same gradient, and one after the caller modified the first in
    place fails loudly (autograd's saved-tensor check) instead of returning garbage."""
    (vs, z, v1, v2), angles = pd_inputs()
    x = vs.clone().requires_grad_()
    loss = fused_pd_loss(x, z, v1, v2, *angles)
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x, retain_graph=True)
    (doubled,) = torch.autograd.grad(loss * 2.0, x, retain_graph=True)
    assert torch.equal(first, second)
    assert torch.equal(doubled, 2 * first)
    first.mul_(3.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, x)


def test_no_gradient_needed_runs_the_forward_only(monkeypatch):
    """Without a gradient to form (no_grad, or a student that does not require one) no
    autograd node is made and the one-pass variant does not run."""
    (vs, z, v1, v2), angles = pd_inputs()
    assert fused_pd_loss(vs, z, v1, v2, *angles).grad_fn is None
    x = vs.clone().requires_grad_()
    with torch.no_grad():
        assert fused_pd_loss(x, z, v1, v2, *angles).grad_fn is None
    assert fused_pd_loss(x, z, v1, v2, *angles).grad_fn is not None


def test_linear_ops_route_gradients_like_the_custom_op(monkeypatch):
    (z, v1, v2, _), angles = pd_inputs()
    grads = {}
    for route in ("lean", "custom_op"):
        monkeypatch.setattr(_register, "EAGER_ROUTE", route == "lean")
        xs = [t.clone().requires_grad_() for t in (z, v1, v2)]
        out = pd_target(*xs, *angles)
        out.backward(torch.ones_like(out))
        grads[route] = [x.grad for x in xs]
    for a, b in zip(grads["lean"], grads["custom_op"]):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- the loss reduction
def test_loss_sum_over_many_rows_is_float64(monkeypatch):
    """More rows than one CUDA launch may hold (65,535) on the torch path: the per-row sums
    are added in float64, so the float32 loss is within float32 rounding of the result
    (2^-24 = 6e-8) of the float64 reference. Chosen so that the float32 per-row scales are
    exact (2^17 rows of 1 element, weight 1, guidance 0.5, a zero-length SFD step): the
    float32 dot over the rows used before was off by up to ~8e-7 here on a CPU (1e-5 on a
    GPU at 70,001 rows, benchmarks/gpu_check.py's WARN)."""
    monkeypatch.setenv("FASTDIFF_KERNELS", "torch")
    rows = 1 << 17
    vs, vt, vu = (randn((rows, 1), 40 + k) for k in range(3))
    phi = torch.rand(rows, generator=torch.Generator().manual_seed(4),
                     dtype=torch.float64) * HALF_PI
    for metric in ("l2", "l1", "pseudo_huber"):
        cases = {
            "distill_loss": (distill_loss(vs, vt, phi, "snr+1", metric),
                             distill_loss_reference(vs, vt, phi, "snr+1", metric)),
            "guided_distill_loss": (
                guided_distill_loss(vs, vt, vu, 0.5, phi, "snr+1", metric),
                guided_distill_loss_reference(vs, vt, vu, 0.5, phi, "snr+1", metric)),
            "sfd_loss": (sfd_loss(vs, vt, vu, phi, phi, metric),
                         sfd_loss_reference(vs, vt, vu, phi, phi, metric)),
        }
        for name, (loss, ref) in cases.items():
            err = abs(float(loss) - float(ref)) / abs(float(ref))
            assert err < 1e-7, (name, metric, err)


# ---------------------------------------------------------------- coefficients
def _direct_rows(t, m, e, weighting, n):
    """fused_pd_loss's coef rows straight from their formulas (float64, then float32)."""
    d1, d2, d = m - t, e - m, e - t
    weight = {"snr_trunc": torch.maximum(torch.cos(t) ** 2, torch.sin(t) ** 2),
              "snr+1": torch.ones_like(t), "const": torch.sin(t) ** 2}[weighting]
    rows = (weight / (t.shape[0] * n), torch.sin(d1) * torch.sin(d2) / torch.sin(d),
            torch.cos(d2) * torch.sin(d1) / torch.sin(d), torch.sin(d2) / torch.sin(d))
    return torch.stack(rows).float()


@settings(deadline=None, max_examples=60)
@given(data=st.data(), batch=st.integers(1, 9), weighting=st.sampled_from(WEIGHTINGS),
       n=st.sampled_from([1, 7, 1025]))
def test_coefficient_rows_match_their_formulas(data, batch, weighting, n):
    """One matmul of angle differences and one sin (cosines as sines of x + pi/2) give the
    float32 rows the formulas give, to a float32 rounding, including t = 1 and t'' = 0."""
    ts, mids, ends = [], [], []
    for _ in range(batch):
        phi_t = data.draw(st.one_of(st.just(HALF_PI), st.floats(1e-4, HALF_PI)))
        phi_end = data.draw(st.one_of(st.just(0.0), st.floats(0.0, phi_t - 1e-4)))
        ts.append(phi_t)
        ends.append(phi_end)
        mids.append(data.draw(st.one_of(st.just(0.5 * (phi_t + phi_end)),
                                        st.floats(phi_end, phi_t))))
    t, m, e = (torch.tensor(x, dtype=torch.float64) for x in (ts, mids, ends))
    close = {"rtol": 2.0**-23, "atol": 1e-30}
    direct = _direct_rows(t, m, e, weighting, n)
    torch.testing.assert_close(
        pd_coefficients64(t, m, e, weighting=weighting, n_per_sample=n).float(), direct,
        **close)
    torch.testing.assert_close(pd_coefficients64(t, m, e).float(), direct[1:], **close)


def test_zero_step_is_rejected_naming_the_sample():
    phi = torch.tensor([0.5, 0.3], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"phi_end equals phi_t for sample\(s\) \[1\]"):
        pd_coefficients64(phi, phi - 0.1, torch.tensor([0.2, 0.3], dtype=torch.float64))
