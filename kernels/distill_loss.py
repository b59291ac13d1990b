"""Distillation loss: ``mean_b[ w_b * mean_i metric(v_student - v_target) ]`` (DESIGN §2).

``w_b`` is the per-sample v-space weight of ``weighting`` (see ``_metrics``), formed in
float64 and folded with ``1 / (B * n_per_sample)`` before it reaches a kernel as float32.
The forward kernel writes one float32 partial sum per program; the host adds them up in a
fixed order (deterministic, no atomics). The backward is its own kernel (and custom op):
``grad = upstream * w_b / (B * n) * metric'(d)``. Differentiable in ``v_student`` only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks
from ._metrics import (
    METRIC_CODES,
    huber_constexpr,
    metric_grad_torch_,
    metric_reference,
    metric_torch_,
    row_scale,
)
from .dispatch import BLOCK, backend_for, blocks_per_row, row_chunks, tl, triton

if triton is not None:
    from ._metrics import metric_grad, metric_value


# ---------------------------------------------------------------- 1. Triton kernels
if triton is not None:

    @triton.jit
    def _distill_loss_fwd_kernel(
        vs_ptr, vt_ptr, scale_ptr, partial_ptr,
        n_per_sample, n_blocks, row_start,
        METRIC: tl.constexpr, HUBER_C: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # grid: (blocks of one sample's elements, samples); one partial sum per program
        block = tl.program_id(0)
        row = row_start + tl.program_id(1)
        cols = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_per_sample
        offs = row.to(tl.int64) * n_per_sample + cols
        vs = tl.load(vs_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        vt = tl.load(vt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.where(mask, metric_value(vs - vt, METRIC, HUBER_C), 0.0)
        scale = tl.load(scale_ptr + row)
        tl.store(partial_ptr + row.to(tl.int64) * n_blocks + block, scale * tl.sum(m, axis=0))

    @triton.jit
    def _distill_loss_bwd_kernel(
        vs_ptr, vt_ptr, scale_ptr, grad_ptr,
        n_per_sample, row_start,
        METRIC: tl.constexpr, HUBER_C: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = row_start + tl.program_id(1)
        cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_per_sample
        offs = row.to(tl.int64) * n_per_sample + cols
        vs = tl.load(vs_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        vt = tl.load(vt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + row)  # upstream * w_b / (B * n)
        g = scale * metric_grad(vs - vt, METRIC, HUBER_C)
        tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


def _distill_loss_triton(vs: Tensor, vt: Tensor, scale: Tensor, metric: str,
                         huber_c: float) -> Tensor:
    vs, vt = vs.contiguous(), vt.contiguous()
    batch = vs.shape[0]
    n = vs.numel() // batch
    n_blocks = blocks_per_row(n)
    partial = torch.empty(batch * n_blocks, dtype=torch.float32, device=vs.device)
    for start, rows in row_chunks(batch):
        _distill_loss_fwd_kernel[(n_blocks, rows)](
            vs, vt, scale, partial, n, n_blocks, start,
            METRIC=METRIC_CODES[metric], HUBER_C=huber_constexpr(metric, huber_c), BLOCK=BLOCK,
        )
    return partial.sum(dtype=torch.float64).to(torch.float32)


def _distill_loss_backward_triton(vs: Tensor, vt: Tensor, scale: Tensor, metric: str,
                                  huber_c: float) -> Tensor:
    vs, vt = vs.contiguous(), vt.contiguous()
    grad = torch.empty_like(vs)
    batch = vs.shape[0]
    n = vs.numel() // batch
    for start, rows in row_chunks(batch):
        _distill_loss_bwd_kernel[(blocks_per_row(n), rows)](
            vs, vt, scale, grad, n, start,
            METRIC=METRIC_CODES[metric], HUBER_C=huber_constexpr(metric, huber_c), BLOCK=BLOCK,
        )
    return grad


# ---------------------------------------------------------------- 2. torch implementation
def _rows(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _distill_loss_torch(vs: Tensor, vt: Tensor, scale: Tensor, metric: str,
                        huber_c: float) -> Tensor:
    d = torch.sub(vs.float(), vt.float())
    per_sample = _rows(metric_torch_(d, metric, huber_c)).sum(dim=1)
    return torch.dot(per_sample, scale)


def _distill_loss_backward_torch(vs: Tensor, vt: Tensor, scale: Tensor, metric: str,
                                 huber_c: float) -> Tensor:
    d = torch.sub(vs.float(), vt.float())
    g = metric_grad_torch_(d, metric, huber_c)
    return g.mul_(scale.view((-1,) + (1,) * (g.dim() - 1))).to(vs.dtype)


# ---------------------------------------------------------------- 3. float64 reference
def distill_loss_reference(v_student: Tensor, v_target: Tensor, phi_t,
                           weighting: str = "snr_trunc", metric: str = "l2", *,
                           huber_c: float = 0.03, sample_weight=None) -> Tensor:
    """Plain float64 math (differentiable; tests take its autograd as the reference).
    ``sample_weight``: optional ``(B,)`` extra per-example factor on the weighting."""
    batch = v_student.shape[0]
    phi = _checks.angles("phi_t", phi_t, batch, v_student.device)
    alpha2, sigma2 = torch.cos(phi) ** 2, torch.sin(phi) ** 2
    weight = {
        "snr_trunc": torch.maximum(alpha2, sigma2),
        "snr+1": torch.ones_like(phi),
        "const": sigma2,
    }[weighting]
    if sample_weight is not None:
        weight = weight * torch.as_tensor(sample_weight, dtype=torch.float64,
                                          device=weight.device)
    d = v_student.double() - v_target.double()
    per_sample = metric_reference(d, metric, huber_c).reshape(batch, -1).mean(dim=1)
    return (weight * per_sample).mean()


# ---------------------------------------------------------------- 4. custom ops
@torch.library.custom_op("fastdiff::distill_loss", mutates_args=())
def _distill_loss_op(v_student: Tensor, v_target: Tensor, scale: Tensor, metric: str,
                     huber_c: float) -> Tensor:
    """Default kernel (devices other than CPU/CUDA): the torch implementation."""
    return _distill_loss_torch(v_student, v_target, scale, metric, huber_c)


@_distill_loss_op.register_kernel(("cpu", "cuda"))
def _(v_student: Tensor, v_target: Tensor, scale: Tensor, metric: str,
      huber_c: float) -> Tensor:
    if backend_for(v_student) == "triton":
        return _distill_loss_triton(v_student, v_target, scale, metric, huber_c)
    return _distill_loss_torch(v_student, v_target, scale, metric, huber_c)


@_distill_loss_op.register_fake
def _(v_student, v_target, scale, metric, huber_c):
    return v_student.new_empty((), dtype=torch.float32)


@torch.library.custom_op("fastdiff::distill_loss_backward", mutates_args=())
def _distill_loss_backward_op(v_student: Tensor, v_target: Tensor, scale: Tensor,
                              metric: str, huber_c: float) -> Tensor:
    """Gradient wrt ``v_student``; ``scale`` = upstream grad * w_b / (B * n)."""
    return _distill_loss_backward_torch(v_student, v_target, scale, metric, huber_c)


@_distill_loss_backward_op.register_kernel(("cpu", "cuda"))
def _(v_student: Tensor, v_target: Tensor, scale: Tensor, metric: str,
      huber_c: float) -> Tensor:
    if backend_for(v_student) == "triton":
        return _distill_loss_backward_triton(v_student, v_target, scale, metric, huber_c)
    return _distill_loss_backward_torch(v_student, v_target, scale, metric, huber_c)


@_distill_loss_backward_op.register_fake
def _(v_student, v_target, scale, metric, huber_c):
    return torch.empty_like(v_student, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    v_student, v_target, scale, metric, huber_c = inputs
    ctx.save_for_backward(v_student, v_target, scale)
    ctx.metric, ctx.huber_c = metric, huber_c


def _backward(ctx, grad):
    v_student, v_target, scale = ctx.saved_tensors
    grad_vs = _distill_loss_backward_op(
        v_student, v_target, scale * grad.to(torch.float32), ctx.metric, ctx.huber_c
    )
    return grad_vs, None, None, None, None


_distill_loss_op.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------- 5. public function
def distill_loss(v_student: Tensor, v_target: Tensor, phi_t, weighting: str = "snr_trunc",
                 metric: str = "l2", *, huber_c: float = 0.03) -> Tensor:
    """Weighted distillation loss (float32 scalar), differentiable in ``v_student``.

    ``v_student``, ``v_target``: ``(B, ...)`` of one shape and device (dtypes may differ);
    ``phi_t``: the angle of the student's start time, ``(B,)``, 0-d or a float.
    ``weighting``: ``"snr_trunc"``, ``"snr+1"`` or ``"const"``; ``metric``: ``"l2"``,
    ``"l1"`` or ``"pseudo_huber"`` (per element ``sqrt(d^2 + huber_c^2) - huber_c``).
    No gradient flows to ``v_target``.
    """
    _checks.check_data("v_student", v_student)
    _checks.check_like("v_student", v_student, "v_target", v_target)
    _checks.check_nonempty("v_student", v_student)
    _checks.check_choice("weighting", weighting, _checks.WEIGHTINGS)
    _checks.check_choice("metric", metric, _checks.METRICS)
    huber_c = _checks.check_huber_c(huber_c)
    batch = v_student.shape[0]
    phi = _checks.angles("phi_t", phi_t, batch, v_student.device)
    scale = row_scale(phi, weighting, v_student.numel() // batch)
    return _distill_loss_op(v_student, v_target, scale, metric, huber_c)
