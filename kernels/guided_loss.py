"""Guided distillation loss (Meng et al. stage 1), the guidance combination fused in.

    L = mean_b  weight_b · mean_i metric(v_student − v̂^w)_bi,
    v̂^w = (1 + w_b) v_cond − w_b v_uncond          (w = 0: the plain conditional model)

``v_cond`` / ``v_uncond`` are the teacher's outputs with the class label and with the null
label; ``w_b`` is the per-sample guidance weight. The guided target is never written to
memory: the kernels read the three tensors once and form ``d = v_s − (1+w) v_c + w v_u`` in
float32 registers. ``1 + w_b``, ``w_b`` and ``weight_b / (B·n)`` are formed in float64 on the
host (B numbers) and reach the kernels as float32 ``(B,)`` tensors, never as Python floats
(torch.compile would specialise on them, DESIGN §6).

Forward: one float32 partial sum per program, added up on the host in a fixed order
(deterministic, no atomics). Backward: its own kernel / custom op,
``grad = upstream · weight_b / (B·n) · metric'(d)``. Differentiable in ``v_student`` only.
Weightings (v-space, DESIGN §2): ``"snr+1"`` (1, the default: the teacher's own v-MSE),
``"snr_trunc"`` (max(α², σ²)), ``"const"`` (σ²).
"""

from __future__ import annotations

import math
from numbers import Real

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
from .dispatch import BLOCK, backend_for, blocks_per_row, row_chunks, tl, triton
from .distill_loss import distill_loss_reference

if triton is not None:
    from ._metrics import metric_grad, metric_value


# ---------------------------------------------------------------- 1. Triton kernels
if triton is not None:

    @triton.jit
    def _guided_difference(vs_ptr, vc_ptr, vu_ptr, wp1_ptr, w_ptr, row, offs, mask):
        """d = v_s − (1+w) v_c + w v_u for one block of one sample, in float32 registers."""
        vs = tl.load(vs_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        vc = tl.load(vc_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        vu = tl.load(vu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        wp1 = tl.load(wp1_ptr + row)
        w = tl.load(w_ptr + row)
        return vs - wp1 * vc + w * vu

    @triton.jit
    def _guided_loss_fwd_kernel(
        vs_ptr, vc_ptr, vu_ptr, wp1_ptr, w_ptr, scale_ptr, partial_ptr,
        n_per_sample, n_blocks, row_start,
        METRIC: tl.constexpr, HUBER_C: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # grid: (blocks of one sample's elements, samples); one partial sum per program
        block = tl.program_id(0)
        row = row_start + tl.program_id(1)
        cols = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_per_sample
        offs = row.to(tl.int64) * n_per_sample + cols
        d = _guided_difference(vs_ptr, vc_ptr, vu_ptr, wp1_ptr, w_ptr, row, offs, mask)
        m = tl.where(mask, metric_value(d, METRIC, HUBER_C), 0.0)
        scale = tl.load(scale_ptr + row)
        tl.store(partial_ptr + row.to(tl.int64) * n_blocks + block, scale * tl.sum(m, axis=0))

    @triton.jit
    def _guided_loss_bwd_kernel(
        vs_ptr, vc_ptr, vu_ptr, wp1_ptr, w_ptr, gscale_ptr, grad_ptr,
        n_per_sample, row_start,
        METRIC: tl.constexpr, HUBER_C: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = row_start + tl.program_id(1)
        cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_per_sample
        offs = row.to(tl.int64) * n_per_sample + cols
        d = _guided_difference(vs_ptr, vc_ptr, vu_ptr, wp1_ptr, w_ptr, row, offs, mask)
        gscale = tl.load(gscale_ptr + row)  # upstream · weight_b / (B·n)
        g = gscale * metric_grad(d, METRIC, HUBER_C)
        tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


def _guided_loss_triton(vs: Tensor, vc: Tensor, vu: Tensor, wp1: Tensor, w: Tensor,
                        scale: Tensor, metric: str, huber_c: float) -> Tensor:
    vs, vc, vu = vs.contiguous(), vc.contiguous(), vu.contiguous()
    batch = vs.shape[0]
    n = vs.numel() // batch
    n_blocks = blocks_per_row(n)
    partial = torch.empty(batch * n_blocks, dtype=torch.float32, device=vs.device)
    for start, rows in row_chunks(batch):
        _guided_loss_fwd_kernel[(n_blocks, rows)](
            vs, vc, vu, wp1, w, scale, partial, n, n_blocks, start,
            METRIC=METRIC_CODES[metric], HUBER_C=huber_constexpr(metric, huber_c), BLOCK=BLOCK,
        )
    return partial.sum(dtype=torch.float64).to(torch.float32)


def _guided_loss_backward_triton(vs: Tensor, vc: Tensor, vu: Tensor, wp1: Tensor, w: Tensor,
                                 gscale: Tensor, metric: str, huber_c: float) -> Tensor:
    vs, vc, vu = vs.contiguous(), vc.contiguous(), vu.contiguous()
    grad = torch.empty_like(vs)
    batch = vs.shape[0]
    n = vs.numel() // batch
    for start, rows in row_chunks(batch):
        _guided_loss_bwd_kernel[(blocks_per_row(n), rows)](
            vs, vc, vu, wp1, w, gscale, grad, n, start,
            METRIC=METRIC_CODES[metric], HUBER_C=huber_constexpr(metric, huber_c), BLOCK=BLOCK,
        )
    return grad


# ---------------------------------------------------------------- 2. torch implementation
def _col(x: Tensor, ndim: int) -> Tensor:
    return x.view((-1,) + (1,) * (ndim - 1))


def _difference(vs: Tensor, vc: Tensor, vu: Tensor, wp1: Tensor, w: Tensor) -> Tensor:
    """d = v_s − (1+w) v_c + w v_u in float32 (a fresh tensor, safe to overwrite)."""
    nd = vs.dim()
    d = torch.mul(vc.float(), _col(wp1, nd)).neg_()
    d.addcmul_(vu.float(), _col(w, nd))
    return d.add_(vs.float())


def _guided_loss_torch(vs: Tensor, vc: Tensor, vu: Tensor, wp1: Tensor, w: Tensor,
                       scale: Tensor, metric: str, huber_c: float) -> Tensor:
    d = _difference(vs, vc, vu, wp1, w)
    per_sample = metric_torch_(d, metric, huber_c).reshape(vs.shape[0], -1).sum(dim=1)
    return torch.dot(per_sample, scale)


def _guided_loss_backward_torch(vs: Tensor, vc: Tensor, vu: Tensor, wp1: Tensor, w: Tensor,
                                gscale: Tensor, metric: str, huber_c: float) -> Tensor:
    g = metric_grad_torch_(_difference(vs, vc, vu, wp1, w), metric, huber_c)
    return g.mul_(_col(gscale, g.dim())).to(vs.dtype)


# ---------------------------------------------------------------- 3. float64 reference
def guided_target_reference(v_cond: Tensor, v_uncond: Tensor, w) -> Tensor:
    """v̂^w = (1 + w) v_cond − w v_uncond in float64 (textbook form, tests only)."""
    batch = v_cond.shape[0]
    w64 = _weights(w, batch, v_cond.device).view((-1,) + (1,) * (v_cond.dim() - 1))
    return (1 + w64) * v_cond.double() - w64 * v_uncond.double()


def guided_distill_loss_reference(v_student: Tensor, v_cond: Tensor, v_uncond: Tensor, w,
                                  phi_t, weighting: str = "snr+1", metric: str = "l2", *,
                                  huber_c: float = 0.03, sample_weight=None) -> Tensor:
    """Plain float64 math (differentiable; tests take its autograd as the reference)."""
    target = guided_target_reference(v_cond, v_uncond, w)
    return distill_loss_reference(v_student, target, phi_t, weighting, metric, huber_c=huber_c,
                                  sample_weight=sample_weight)


# ---------------------------------------------------------------- 4. custom ops
@torch.library.custom_op("fastdiff::guided_distill_loss", mutates_args=())
def _guided_loss_op(v_student: Tensor, v_cond: Tensor, v_uncond: Tensor, wp1: Tensor,
                    w: Tensor, scale: Tensor, metric: str, huber_c: float) -> Tensor:
    """Default kernel (devices other than CPU/CUDA): the torch implementation."""
    return _guided_loss_torch(v_student, v_cond, v_uncond, wp1, w, scale, metric, huber_c)


@_guided_loss_op.register_kernel(("cpu", "cuda"))
def _(v_student: Tensor, v_cond: Tensor, v_uncond: Tensor, wp1: Tensor, w: Tensor,
      scale: Tensor, metric: str, huber_c: float) -> Tensor:
    if backend_for(v_student) == "triton":
        return _guided_loss_triton(v_student, v_cond, v_uncond, wp1, w, scale, metric, huber_c)
    return _guided_loss_torch(v_student, v_cond, v_uncond, wp1, w, scale, metric, huber_c)


@_guided_loss_op.register_fake
def _(v_student, v_cond, v_uncond, wp1, w, scale, metric, huber_c):
    return v_student.new_empty((), dtype=torch.float32)


@torch.library.custom_op("fastdiff::guided_distill_loss_backward", mutates_args=())
def _guided_loss_backward_op(v_student: Tensor, v_cond: Tensor, v_uncond: Tensor, wp1: Tensor,
                             w: Tensor, gscale: Tensor, metric: str, huber_c: float) -> Tensor:
    """Gradient wrt ``v_student``; ``gscale`` = upstream · weight_b / (B·n)."""
    return _guided_loss_backward_torch(v_student, v_cond, v_uncond, wp1, w, gscale, metric,
                                       huber_c)


@_guided_loss_backward_op.register_kernel(("cpu", "cuda"))
def _(v_student: Tensor, v_cond: Tensor, v_uncond: Tensor, wp1: Tensor, w: Tensor,
      gscale: Tensor, metric: str, huber_c: float) -> Tensor:
    if backend_for(v_student) == "triton":
        return _guided_loss_backward_triton(v_student, v_cond, v_uncond, wp1, w, gscale,
                                            metric, huber_c)
    return _guided_loss_backward_torch(v_student, v_cond, v_uncond, wp1, w, gscale, metric,
                                       huber_c)


@_guided_loss_backward_op.register_fake
def _(v_student, v_cond, v_uncond, wp1, w, gscale, metric, huber_c):
    return torch.empty_like(v_student, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    v_student, v_cond, v_uncond, wp1, w, scale, metric, huber_c = inputs
    ctx.save_for_backward(v_student, v_cond, v_uncond, wp1, w, scale)
    ctx.metric, ctx.huber_c = metric, huber_c


def _backward(ctx, grad):
    v_student, v_cond, v_uncond, wp1, w, scale = ctx.saved_tensors
    grad_vs = _guided_loss_backward_op(v_student, v_cond, v_uncond, wp1, w,
                                       scale * grad.to(torch.float32), ctx.metric, ctx.huber_c)
    return grad_vs, None, None, None, None, None, None, None


_guided_loss_op.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------- 5. public function
def _weights(w, batch: int, device: torch.device) -> Tensor:
    """Guidance weights as float64 ``(batch,)`` on ``device`` (float, 0-d or ``(batch,)``)."""
    if isinstance(w, Tensor):
        if not (w.is_floating_point() or w.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"w: expected a float or a real tensor of guidance weights, "
                            f"got dtype {w.dtype}")
        if w.dim() != 0 and tuple(w.shape) != (batch,):
            raise ValueError(f"w: expected a 0-d tensor or shape ({batch},) for a batch of "
                             f"{batch}, got shape {tuple(w.shape)}")
        if w.device != device and w.device.type != "cpu":
            raise ValueError(f"w is on {w.device} but the data is on {device}; expected the "
                             "same device (or CPU weights)")
        # a NaN/Inf weight would poison the whole loss silently. Checked on CPU tensors only
        # (on a GPU the check would sync every call) and not while torch.compile traces.
        if (w.device.type == "cpu" and not torch.compiler.is_compiling()
                and not bool(torch.isfinite(w).all())):
            raise ValueError("w: guidance weights must be finite")
        w64 = w.detach().to(device=device, dtype=torch.float64)
    elif isinstance(w, Real) and not isinstance(w, bool):
        if not math.isfinite(float(w)):
            raise ValueError(f"w: expected a finite guidance weight, got {w}")
        w64 = torch.tensor(float(w), dtype=torch.float64, device=device)
    else:
        raise TypeError(f"w: expected a float or a tensor of guidance weights, "
                        f"got {type(w).__name__}")
    return w64.expand(batch)


def _sample_weights(sample_weight, batch: int, device: torch.device) -> Tensor:
    """Per-example loss factors as float64 ``(batch,)`` on ``device``: finite and ≥ 0."""
    if not isinstance(sample_weight, Tensor) or not sample_weight.is_floating_point():
        raise TypeError("sample_weight: expected a float tensor of shape (B,), got "
                        f"{type(sample_weight).__name__}")
    if tuple(sample_weight.shape) != (batch,):
        raise ValueError(f"sample_weight: expected shape ({batch},) for a batch of {batch}, "
                         f"got {tuple(sample_weight.shape)}")
    if sample_weight.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(
            (torch.isfinite(sample_weight) & (sample_weight >= 0)).all()):
        raise ValueError("sample_weight: every factor must be finite and >= 0")
    return sample_weight.detach().to(device=device, dtype=torch.float64)


def guided_distill_loss(v_student: Tensor, v_cond: Tensor, v_uncond: Tensor, w, phi_t,
                        weighting: str = "snr+1", metric: str = "l2", *,
                        huber_c: float = 0.03, sample_weight: Tensor | None = None) -> Tensor:
    """Stage-1 guided distillation loss (float32 scalar), differentiable in ``v_student``.

    ``mean_b weight_b · mean_i metric(v_student − ((1 + w_b) v_cond − w_b v_uncond))``.

    ``v_student``: the w-conditioned student's v̂ ``(B, ...)``; ``v_cond``, ``v_uncond``: the
    teacher's v̂ with the class label and with the null label −1, same shape and device
    (dtypes may differ: float32, bfloat16, float16; the math is float32 inside).
    ``w``: guidance weight per sample, ``(B,)``, 0-d or a float (w = 0: plain conditional;
    w = −1: unconditional). ``phi_t``: the angle of t, ``(B,)``, 0-d or a float (float64
    preferred), used only by the weighting. ``weighting``: ``"snr+1"`` (default, weight 1),
    ``"snr_trunc"`` or ``"const"``; ``metric``: ``"l2"``, ``"l1"`` or ``"pseudo_huber"``.
    ``sample_weight``: optional ``(B,)`` float factors (finite, ≥ 0) multiplying each
    example's weight, e.g. ``1 / (1 + w)²`` to balance the loss across guidance weights
    (`fastdiff.guided.distill_guidance`); they join the per-row scale on the host, so the
    kernels are the same. No gradient flows to ``v_cond``, ``v_uncond``, ``w`` or
    ``sample_weight``.
    """
    _checks.check_data("v_student", v_student)
    _checks.check_like("v_student", v_student, "v_cond", v_cond)
    _checks.check_like("v_student", v_student, "v_uncond", v_uncond)
    _checks.check_nonempty("v_student", v_student)
    _checks.check_choice("weighting", weighting, _checks.WEIGHTINGS)
    _checks.check_choice("metric", metric, _checks.METRICS)
    huber_c = _checks.check_huber_c(huber_c)
    batch = v_student.shape[0]
    w64 = _weights(w, batch, v_student.device)
    phi = _checks.angles("phi_t", phi_t, batch, v_student.device)
    # 1 + w formed in float64 then rounded once: (1+w) and w are each the nearest float32
    wp1 = (1.0 + w64).to(torch.float32).contiguous()
    w32 = w64.to(torch.float32).contiguous()
    factor = None if sample_weight is None else _sample_weights(sample_weight, batch,
                                                                v_student.device)
    scale = row_scale(phi, weighting, v_student.numel() // batch, factor)
    return _guided_loss_op(v_student, v_cond.detach(), v_uncond.detach(), wp1, w32, scale,
                           metric, huber_c)
