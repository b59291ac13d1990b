"""torch.compile(fullgraph=True) traces through the kernel custom ops (CPU); every op takes
the compiled CPU path for large tensors; every custom op passes torch.library.opcheck.

One fullgraph compile (they are slow on this machine); the compiled function is then also
run with FASTDIFF_KERNELS=triton: the backend is chosen inside the opaque custom op at run
time.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from fastdiff.kernels import (  # noqa: E402
    _register,
    ddim_step,
    dispatch,
    distill_loss,
    fused_pd_loss,
    guided_distill_loss,
    pd_target,
    sfd_loss,
)
from fastdiff.kernels.ddim_step import ddim_step_reference  # noqa: E402
from fastdiff.kernels.dispatch import TRITON_INTERPRETED, triton  # noqa: E402
from fastdiff.kernels.distill_loss import distill_loss_reference  # noqa: E402
from fastdiff.kernels.fused_pd_loss import fused_pd_loss_reference  # noqa: E402
from fastdiff.kernels.guided_loss import guided_distill_loss_reference  # noqa: E402
from fastdiff.kernels.pd_target import pd_target_reference  # noqa: E402
from fastdiff.kernels.sfd_loss import sfd_loss_reference  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

DEVICE = torch.device(os.environ.get("FASTDIFF_TEST_DEVICE", "cpu"))  # set by conftest.py


def pd_step(v_student, z_t, v_1, v_2, phi_t, phi_mid, phi_end):
    z_mid = ddim_step(z_t, v_1, phi_t, phi_mid)
    target = pd_target(z_t, v_1, v_2, phi_t, phi_mid, phi_end)
    loss = distill_loss(v_student, target, phi_t, "snr_trunc", "l2")
    loss = loss + fused_pd_loss(v_student, z_t, v_1, v_2, phi_t, phi_mid, phi_end,
                                "const", "pseudo_huber")
    return loss, z_mid


def run(fn, inputs):
    v_student = inputs[0].clone().requires_grad_()
    loss, z_mid = fn(v_student, *inputs[1:])
    loss.backward()
    return loss.detach(), z_mid, v_student.grad


def test_compile_fullgraph_matches_eager(monkeypatch):
    g = torch.Generator().manual_seed(0)
    shape = (3, 2, 5, 7)
    tensors = [torch.randn(shape, generator=g).to(DEVICE) for _ in range(4)]
    phi_t = torch.tensor([math.pi / 2, 0.8, 0.1], dtype=torch.float64)
    angles = [phi_t, phi_t - 0.05, (phi_t - 0.1).clamp_min(0.0)]
    inputs = (*tensors, *angles)

    monkeypatch.setenv("FASTDIFF_KERNELS", "torch")
    eager = run(pd_step, inputs)
    compiled_fn = torch.compile(pd_step, fullgraph=True)
    backends = ["torch"] + (["triton"] if triton is not None and (
        TRITON_INTERPRETED or DEVICE.type == "cuda") else [])
    for backend in backends:
        monkeypatch.setenv("FASTDIFF_KERNELS", backend)
        compiled = run(compiled_fn, inputs)
        for ours, ref in zip(compiled, eager):
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


# name: (public call, its float64 reference, is it a loss); tensors t, angles a. l2 and a
# small guidance weight throughout: the gradient checks below are elementwise, with an
# absolute tolerance sized for float32 rounding of O(1) terms
HALF_PI = math.pi / 2
CASES = {
    "ddim_step": (lambda t, a: ddim_step(t[0], t[1], a[0], a[1]),
                  lambda t, a: ddim_step_reference(t[0], t[1], a[0], a[1]), False),
    "pd_target": (lambda t, a: pd_target(t[0], t[1], t[2], *a),
                  lambda t, a: pd_target_reference(t[0], t[1], t[2], *a), False),
    "distill_loss": (lambda t, a: distill_loss(t[0], t[1], a[0]),
                     lambda t, a: distill_loss_reference(t[0], t[1], a[0]), True),
    "fused_pd_loss": (lambda t, a: fused_pd_loss(*t, *a),
                      lambda t, a: fused_pd_loss_reference(*t, *a), True),
    "guided_distill_loss": (
        lambda t, a: guided_distill_loss(t[0], t[1], t[2], 0.5, a[0]),
        lambda t, a: guided_distill_loss_reference(t[0], t[1], t[2], 0.5, a[0]), True),
    "sfd_loss": (lambda t, a: sfd_loss(t[0], t[1], t[2], a[0], a[1], "l2"),
                 lambda t, a: sfd_loss_reference(t[0], t[1], t[2], a[0], a[1], "l2"), True),
}


#: losses with a one-pass (loss and gradient together) torch implementation
ONE_PASS = {"fused_pd_loss"}


def torch_impls(name, one_pass=False):
    """The torch implementations a forward and backward call of the op runs (forward and
    backward for a loss; the one-pass one where that route is taken)."""
    short = {"guided_distill_loss": "guided_loss"}.get(name, name)  # module, function prefix
    module = importlib.import_module(f"fastdiff.kernels.{short}")
    if one_pass:
        return [getattr(module, f"_{short}_and_grad_torch")]
    impls = [getattr(module, f"_{short}_torch")]
    if CASES[name][2]:
        impls.append(getattr(module, f"_{short}_backward_torch"))
    return impls


@pytest.mark.parametrize("name,one_pass", [(name, False) for name in CASES]
                         + [(name, True) for name in sorted(ONE_PASS)])
def test_large_cpu_tensors_take_the_compiled_torch_path(monkeypatch, name, one_pass):
    """Above CPU_COMPILE_MIN_ELEMENTS every op's torch path (and a loss's backward op, or
    its one-pass implementation) runs torch.compile'd; it must compute what the eager path
    and the float64 reference compute (output, and the gradient of a loss)."""
    call, reference, is_loss = CASES[name]
    monkeypatch.setenv("FASTDIFF_KERNELS", "torch")
    monkeypatch.setattr(_register, "ONE_PASS", one_pass)
    g = torch.Generator().manual_seed(3)
    batch, n = 4, dispatch.CPU_COMPILE_MIN_ELEMENTS // 4 + 3  # not a multiple of anything
    tensors = [torch.randn(batch, n, generator=g) for _ in range(4)]
    phi_t = torch.tensor([HALF_PI, 1.0, 0.3, 0.02], dtype=torch.float64)
    angles = (phi_t, phi_t - 0.01, phi_t - 0.02)

    def out_and_grad(compiled: bool):
        monkeypatch.setenv("FASTDIFF_CPU_COMPILE", "1" if compiled else "0")
        first = tensors[0].clone().requires_grad_(is_loss)
        out = call([first, *tensors[1:]], angles)
        if is_loss:
            out.backward()
        return out.detach(), first.grad

    fast, fast_grad = out_and_grad(True)
    for impl in torch_impls(name, one_pass):
        assert impl in dispatch._compiled, f"{impl.__name__}: the compiled path was not taken"
    eager, eager_grad = out_and_grad(False)
    first64 = tensors[0].double().requires_grad_(is_loss)
    ref = reference([first64, *(t.double() for t in tensors[1:])], angles)
    if not is_loss:
        assert fast.dtype == torch.float32 and fast.is_contiguous()
        torch.testing.assert_close(fast.double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast, eager, rtol=1e-5, atol=1e-6)
        return
    ref.backward()
    assert torch.allclose(fast.double(), ref.detach(), rtol=1e-5)
    assert torch.allclose(fast, eager, rtol=1e-5)
    assert torch.allclose(fast_grad.double(), first64.grad, rtol=1e-4, atol=1e-12)
    assert torch.allclose(fast_grad, eager_grad, rtol=1e-5, atol=1e-12)


class _RecordOps(TorchDispatchMode):
    """Records every call of a fastdiff custom op (forward and backward ops)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastdiff":
            self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", list(CASES))
def test_custom_ops_pass_opcheck_on_channels_last_inputs(backend, name):
    """torch.library.opcheck on every custom op: the schema, the autograd registration and
    the fake agree with the real kernel (shapes, dtypes, strides) on both backends. Inputs
    are channels-last, whose torch-path outputs would otherwise not be contiguous, and the
    teacher side is bfloat16."""
    call, _, is_loss = CASES[name]
    g = torch.Generator().manual_seed(5)

    def data(dtype):
        x = torch.randn(2, 3, 4, 5, generator=g).to(dtype)
        return x.to(memory_format=torch.channels_last)

    tensors = [data(torch.float32)] + [data(torch.bfloat16 if is_loss else torch.float32)
                                       for _ in range(3)]
    phi_t = torch.tensor([1.2, 0.4], dtype=torch.float64)
    first = tensors[0].clone().requires_grad_()
    with _RecordOps() as record:
        out = call([first, *tensors[1:]], (phi_t, phi_t - 0.1, phi_t - 0.2))
        out.sum().backward()
    ops = {str(func) for func, _ in record.calls}
    assert f"fastdiff.{name}.default" in ops, ops
    if is_loss:
        assert f"fastdiff.{name}_backward.default" in ops, ops
    for func, args in record.calls:
        args = [a.detach().clone(memory_format=torch.preserve_format)
                if isinstance(a, torch.Tensor) else a for a in args]
        if not str(func).endswith("_backward.default"):
            args[0].requires_grad_()
        torch.library.opcheck(func, tuple(args))
