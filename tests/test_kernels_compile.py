"""torch.compile(fullgraph=True) traces through all four kernel custom ops (CPU).

One compile (they are slow on this machine); the compiled function is then also run with
FASTDIFF_KERNELS=triton: the backend is chosen inside the opaque custom op at run time.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import torch  # noqa: E402
from fastdiff.kernels import ddim_step, distill_loss, fused_pd_loss, pd_target  # noqa: E402
from fastdiff.kernels.dispatch import TRITON_INTERPRETED, triton  # noqa: E402


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
    tensors = [torch.randn(shape, generator=g) for _ in range(4)]
    phi_t = torch.tensor([math.pi / 2, 0.8, 0.1], dtype=torch.float64)
    angles = [phi_t, phi_t - 0.05, (phi_t - 0.1).clamp_min(0.0)]
    inputs = (*tensors, *angles)

    monkeypatch.setenv("FASTDIFF_KERNELS", "torch")
    eager = run(pd_step, inputs)
    compiled_fn = torch.compile(pd_step, fullgraph=True)
    backends = ["torch"] + (["triton"] if triton is not None and TRITON_INTERPRETED else [])
    for backend in backends:
        monkeypatch.setenv("FASTDIFF_KERNELS", backend)
        compiled = run(compiled_fn, inputs)
        for ours, ref in zip(compiled, eager):
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_large_cpu_tensors_take_the_compiled_torch_path(monkeypatch):
    """Above CPU_COMPILE_MIN_ELEMENTS, fused_pd_loss's torch path runs torch.compile'd; it
    must compute what the eager path and the float64 reference compute (loss and grad)."""
    from fastdiff.kernels import dispatch
    from fastdiff.kernels.fused_pd_loss import _fused_pd_loss_torch, fused_pd_loss_reference

    monkeypatch.setenv("FASTDIFF_KERNELS", "torch")
    g = torch.Generator().manual_seed(3)
    batch, n = 4, dispatch.CPU_COMPILE_MIN_ELEMENTS // 4 + 3  # not a multiple of anything
    tensors = [torch.randn(batch, n, generator=g) for _ in range(4)]
    phi_t = torch.tensor([math.pi / 2, 1.0, 0.3, 0.02], dtype=torch.float64)
    angles = (phi_t, phi_t - 0.01, phi_t - 0.02)

    def loss_and_grad(compiled: bool):
        monkeypatch.setenv("FASTDIFF_CPU_COMPILE", "1" if compiled else "0")
        v = tensors[0].clone().requires_grad_()
        loss = fused_pd_loss(v, *tensors[1:], *angles)
        loss.backward()
        return loss.detach(), v.grad

    fast, fast_grad = loss_and_grad(True)
    assert _fused_pd_loss_torch in dispatch._compiled, "the compiled path was not taken"
    eager, eager_grad = loss_and_grad(False)
    v64 = tensors[0].double().requires_grad_()
    ref = fused_pd_loss_reference(v64, *(t.double() for t in tensors[1:]), *angles)
    ref.backward()
    assert torch.allclose(fast.double(), ref.detach(), rtol=1e-5)
    assert torch.allclose(fast, eager, rtol=1e-5)
    assert torch.allclose(fast_grad.double(), v64.grad, rtol=1e-4, atol=1e-12)
    assert torch.allclose(fast_grad, eager_grad, rtol=1e-5, atol=1e-12)
