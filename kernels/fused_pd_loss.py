"""``distill_loss(v_student, pd_target(z_t, v_1, v_2, ...))`` in one pass.

The target ``c_z z_t + c_1 v_1 + c_2 v_2`` (coefficients as in ``pd_target``) is formed
in registers and never written to memory; the backward kernel recomputes it rather than
saving it. Same weighting, metrics and reduction as ``distill_loss``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks
from ._metrics import (
    METRIC_CODES,
    huber_constexpr,
    metric_grad_torch_,
    metric_torch_,
    row_scale,
)
from .dispatch import BLOCK, backend_for, blocks_per_row, cpu_fused, row_chunks, tl, triton
from .distill_loss import distill_loss_reference
from .pd_target import _pd_target_torch_f32, pd_angles, pd_coefficients, pd_target_reference

if triton is not None:
    from ._metrics import metric_grad, metric_value


# ---------------------------------------------------------------- 1. Triton kernels
if triton is not None:

    @triton.jit
    def _fused_pd_loss_fwd_kernel(
        vs_ptr, z_ptr, v1_ptr, v2_ptr, cz_ptr, c1_ptr, c2_ptr, scale_ptr, partial_ptr,
        n_per_sample, n_blocks, row_start,
        METRIC: tl.constexpr, HUBER_C: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # grid: (blocks of one sample's elements, samples); one partial sum per program
        block = tl.program_id(0)
        row = row_start + tl.program_id(1)
        cols = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_per_sample
        offs = row.to(tl.int64) * n_per_sample + cols
        cz = tl.load(cz_ptr + row)
        c1 = tl.load(c1_ptr + row)
        c2 = tl.load(c2_ptr + row)
        vs = tl.load(vs_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v1 = tl.load(v1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v2 = tl.load(v2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = vs - (cz * z + c1 * v1 + c2 * v2)
        m = tl.where(mask, metric_value(d, METRIC, HUBER_C), 0.0)
        scale = tl.load(scale_ptr + row)
        tl.store(partial_ptr + row.to(tl.int64) * n_blocks + block, scale * tl.sum(m, axis=0))

    @triton.jit
    def _fused_pd_loss_bwd_kernel(
        vs_ptr, z_ptr, v1_ptr, v2_ptr, cz_ptr, c1_ptr, c2_ptr, scale_ptr, grad_ptr,
        n_per_sample, row_start,
        METRIC: tl.constexpr, HUBER_C: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = row_start + tl.program_id(1)
        cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_per_sample
        offs = row.to(tl.int64) * n_per_sample + cols
        cz = tl.load(cz_ptr + row)
        c1 = tl.load(c1_ptr + row)
        c2 = tl.load(c2_ptr + row)
        vs = tl.load(vs_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v1 = tl.load(v1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v2 = tl.load(v2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = vs - (cz * z + c1 * v1 + c2 * v2)
        scale = tl.load(scale_ptr + row)  # upstream * w_b / (B * n)
        g = scale * metric_grad(d, METRIC, HUBER_C)
        tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


def _fused_pd_loss_triton(vs, z, v1, v2, cz, c1, c2, scale, metric, huber_c):
    vs, z, v1, v2 = vs.contiguous(), z.contiguous(), v1.contiguous(), v2.contiguous()
    batch = vs.shape[0]
    n = vs.numel() // batch
    n_blocks = blocks_per_row(n)
    partial = torch.empty(batch * n_blocks, dtype=torch.float32, device=vs.device)
    for start, rows in row_chunks(batch):
        _fused_pd_loss_fwd_kernel[(n_blocks, rows)](
            vs, z, v1, v2, cz, c1, c2, scale, partial, n, n_blocks, start,
            METRIC=METRIC_CODES[metric], HUBER_C=huber_constexpr(metric, huber_c), BLOCK=BLOCK,
        )
    return partial.sum(dtype=torch.float64).to(torch.float32)


def _fused_pd_loss_backward_triton(vs, z, v1, v2, cz, c1, c2, scale, metric, huber_c):
    vs, z, v1, v2 = vs.contiguous(), z.contiguous(), v1.contiguous(), v2.contiguous()
    grad = torch.empty_like(vs)
    batch = vs.shape[0]
    n = vs.numel() // batch
    for start, rows in row_chunks(batch):
        _fused_pd_loss_bwd_kernel[(blocks_per_row(n), rows)](
            vs, z, v1, v2, cz, c1, c2, scale, grad, n, start,
            METRIC=METRIC_CODES[metric], HUBER_C=huber_constexpr(metric, huber_c), BLOCK=BLOCK,
        )
    return grad


# ---------------------------------------------------------------- 2. torch implementation
def _difference_f32(vs, z, v1, v2, cz, c1, c2) -> Tensor:
    """``v_student - target`` in float32 (one temporary, reused in place)."""
    d = _pd_target_torch_f32(z, v1, v2, cz, c1, c2)
    return d.neg_().add_(vs)


def _fused_pd_loss_torch(vs, z, v1, v2, cz, c1, c2, scale, metric, huber_c):
    d = _difference_f32(vs, z, v1, v2, cz, c1, c2)
    per_sample = metric_torch_(d, metric, huber_c).reshape(d.shape[0], -1).sum(dim=1)
    return torch.dot(per_sample, scale)


def _fused_pd_loss_backward_torch(vs, z, v1, v2, cz, c1, c2, scale, metric, huber_c):
    d = _difference_f32(vs, z, v1, v2, cz, c1, c2)
    g = metric_grad_torch_(d, metric, huber_c)
    return g.mul_(scale.view((-1,) + (1,) * (g.dim() - 1))).to(vs.dtype)


# ---------------------------------------------------------------- 3. float64 reference
def fused_pd_loss_reference(v_student, z_t, v_1, v_2, phi_t, phi_mid, phi_end,
                            weighting="snr_trunc", metric="l2", *, huber_c=0.03):
    """float64: the textbook two-step target, then the plain loss (differentiable)."""
    target = pd_target_reference(z_t, v_1, v_2, phi_t, phi_mid, phi_end)
    return distill_loss_reference(v_student, target, phi_t, weighting, metric,
                                  huber_c=huber_c)


# ---------------------------------------------------------------- 4. custom ops
@torch.library.custom_op("fastdiff::fused_pd_loss", mutates_args=())
def _fused_pd_loss_op(v_student: Tensor, z_t: Tensor, v_1: Tensor, v_2: Tensor, cz: Tensor,
                      c1: Tensor, c2: Tensor, scale: Tensor, metric: str,
                      huber_c: float) -> Tensor:
    """Default kernel (devices other than CPU/CUDA): the torch implementation."""
    return _fused_pd_loss_torch(v_student, z_t, v_1, v_2, cz, c1, c2, scale, metric, huber_c)


@_fused_pd_loss_op.register_kernel(("cpu", "cuda"))
def _(v_student: Tensor, z_t: Tensor, v_1: Tensor, v_2: Tensor, cz: Tensor, c1: Tensor,
      c2: Tensor, scale: Tensor, metric: str, huber_c: float) -> Tensor:
    args = (v_student, z_t, v_1, v_2, cz, c1, c2, scale, metric, huber_c)
    if backend_for(v_student) == "triton":
        return _fused_pd_loss_triton(*args)
    return cpu_fused(_fused_pd_loss_torch, v_student)(*args)


@_fused_pd_loss_op.register_fake
def _(v_student, z_t, v_1, v_2, cz, c1, c2, scale, metric, huber_c):
    return v_student.new_empty((), dtype=torch.float32)


@torch.library.custom_op("fastdiff::fused_pd_loss_backward", mutates_args=())
def _fused_pd_loss_backward_op(v_student: Tensor, z_t: Tensor, v_1: Tensor, v_2: Tensor,
                               cz: Tensor, c1: Tensor, c2: Tensor, scale: Tensor,
                               metric: str, huber_c: float) -> Tensor:
    """Gradient wrt ``v_student``; ``scale`` = upstream grad * w_b / (B * n)."""
    return _fused_pd_loss_backward_torch(v_student, z_t, v_1, v_2, cz, c1, c2, scale,
                                         metric, huber_c)


@_fused_pd_loss_backward_op.register_kernel(("cpu", "cuda"))
def _(v_student: Tensor, z_t: Tensor, v_1: Tensor, v_2: Tensor, cz: Tensor, c1: Tensor,
      c2: Tensor, scale: Tensor, metric: str, huber_c: float) -> Tensor:
    args = (v_student, z_t, v_1, v_2, cz, c1, c2, scale, metric, huber_c)
    if backend_for(v_student) == "triton":
        return _fused_pd_loss_backward_triton(*args)
    return cpu_fused(_fused_pd_loss_backward_torch, v_student)(*args)


@_fused_pd_loss_backward_op.register_fake
def _(v_student, z_t, v_1, v_2, cz, c1, c2, scale, metric, huber_c):
    return torch.empty_like(v_student, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    v_student, z_t, v_1, v_2, cz, c1, c2, scale, metric, huber_c = inputs
    ctx.save_for_backward(v_student, z_t, v_1, v_2, cz, c1, c2, scale)
    ctx.metric, ctx.huber_c = metric, huber_c


def _backward(ctx, grad):
    v_student, z_t, v_1, v_2, cz, c1, c2, scale = ctx.saved_tensors
    grad_vs = _fused_pd_loss_backward_op(
        v_student, z_t, v_1, v_2, cz, c1, c2, scale * grad.to(torch.float32),
        ctx.metric, ctx.huber_c,
    )
    return (grad_vs,) + (None,) * 9


_fused_pd_loss_op.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------- 5. public function
def fused_pd_loss(v_student: Tensor, z_t: Tensor, v_1: Tensor, v_2: Tensor, phi_t, phi_mid,
                  phi_end, weighting: str = "snr_trunc", metric: str = "l2", *,
                  huber_c: float = 0.03) -> Tensor:
    """``distill_loss(v_student, pd_target(z_t, v_1, v_2, phi_t, phi_mid, phi_end), phi_t,
    weighting, metric)`` in one pass; float32 scalar, differentiable in ``v_student``.

    All four tensors ``(B, ...)`` of one shape and device (dtypes may differ: e.g. a float32
    student against a bfloat16 teacher).
    """
    _checks.check_data("v_student", v_student)
    for name, x in (("z_t", z_t), ("v_1", v_1), ("v_2", v_2)):
        _checks.check_like("v_student", v_student, name, x)
    _checks.check_nonempty("v_student", v_student)
    _checks.check_choice("weighting", weighting, _checks.WEIGHTINGS)
    _checks.check_choice("metric", metric, _checks.METRICS)
    huber_c = _checks.check_huber_c(huber_c)
    phi_t, phi_mid, phi_end = pd_angles(v_student, phi_t, phi_mid, phi_end)
    cz, c1, c2 = pd_coefficients(phi_t, phi_mid, phi_end)
    scale = row_scale(phi_t, weighting, v_student.numel() // v_student.shape[0])
    return _fused_pd_loss_op(v_student, z_t, v_1, v_2, cz, c1, c2, scale, metric, huber_c)
