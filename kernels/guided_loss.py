"""Guided distillation loss (Meng et al. stage 1), the guidance combination fused in.

    L = mean_b  weight_b · mean_i metric(v_student − v̂^w)_bi,
    v̂^w = (1 + w_b) v_cond − w_b v_uncond          (w = 0: the plain conditional model)

``v_cond`` / ``v_uncond`` are the teacher's outputs with the class label and with the null
label; ``w_b`` is the per-sample guidance weight. The guided target is never written to
memory: the kernels read the three tensors once and form ``d = v_s − (1+w) v_c + w v_u`` in
float32 registers. ``1 + w_b``, ``w_b`` and ``weight_b / (B·n)`` are formed in float64 on the
host (B numbers) and reach the kernels as the three rows of one float32 ``(3, B)`` tensor,
never as Python floats (torch.compile would specialise on them, DESIGN §6).

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
from ._metrics import loss_grad_torch, loss_torch, row_weight64
from ._register import launch_loss, launch_loss_backward, per_sample, register_loss_op
from .dispatch import sample_block, tl, triton
from .distill_loss import distill_loss_reference

if triton is not None:
    from ._metrics import store_loss_grad, store_loss_partial


# ---------------------------------------------------------------- 1. Triton kernels
# coef rows: the loss scale weight_b / (B·n), 1 + w_b, w_b
if triton is not None:

    @triton.jit
    def _guided_difference(vs_ptr, vc_ptr, vu_ptr, coef_ptr, batch, row, offs, mask):
        """d = v_s − (1+w) v_c + w v_u for one block of one sample, in float32 registers."""
        vs = tl.load(vs_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        vc = tl.load(vc_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        vu = tl.load(vu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        wp1 = tl.load(coef_ptr + batch + row)
        w = tl.load(coef_ptr + 2 * batch + row)
        return vs - wp1 * vc + w * vu

    @triton.jit
    def _guided_loss_fwd_kernel(vs_ptr, vc_ptr, vu_ptr, coef_ptr, partial_ptr,
                                n_per_sample, batch, row_start,
                                METRIC: tl.constexpr, HUBER_C: tl.constexpr,
                                BLOCK: tl.constexpr):
        row, offs, mask = sample_block(n_per_sample, row_start, BLOCK)
        d = _guided_difference(vs_ptr, vc_ptr, vu_ptr, coef_ptr, batch, row, offs, mask)
        store_loss_partial(partial_ptr, row, d, mask, tl.load(coef_ptr + row), METRIC, HUBER_C)

    @triton.jit
    def _guided_loss_bwd_kernel(vs_ptr, vc_ptr, vu_ptr, coef_ptr, upstream_ptr, grad_ptr,
                                n_per_sample, batch, row_start,
                                METRIC: tl.constexpr, HUBER_C: tl.constexpr,
                                BLOCK: tl.constexpr):
        row, offs, mask = sample_block(n_per_sample, row_start, BLOCK)
        d = _guided_difference(vs_ptr, vc_ptr, vu_ptr, coef_ptr, batch, row, offs, mask)
        # upstream · weight_b / (B·n)
        gscale = tl.load(coef_ptr + row) * tl.load(upstream_ptr).to(tl.float32)
        store_loss_grad(grad_ptr, offs, mask, d, gscale, METRIC, HUBER_C)


def _guided_loss_triton(vs: Tensor, vc: Tensor, vu: Tensor, coef: Tensor, metric: str,
                        huber_c: float) -> Tensor:
    return launch_loss(_guided_loss_fwd_kernel, (vs, vc, vu), coef, metric, huber_c)


def _guided_loss_backward_triton(vs: Tensor, vc: Tensor, vu: Tensor, coef: Tensor,
                                 upstream: Tensor, metric: str, huber_c: float) -> Tensor:
    return launch_loss_backward(_guided_loss_bwd_kernel, (vs, vc, vu), coef, upstream, metric,
                                huber_c)


# ---------------------------------------------------------------- 2. torch implementation
def _difference(vs: Tensor, vc: Tensor, vu: Tensor, coef: Tensor) -> Tensor:
    """d = v_s − (1+w) v_c + w v_u in float32 (a fresh tensor, safe to overwrite)."""
    _, wp1, w = per_sample(coef, vs)
    d = torch.mul(vc.float(), wp1).neg_()
    d.addcmul_(vu.float(), w)
    return d.add_(vs.float())


def _guided_loss_torch(vs: Tensor, vc: Tensor, vu: Tensor, coef: Tensor, metric: str,
                       huber_c: float) -> Tensor:
    return loss_torch(_difference(vs, vc, vu, coef), coef[0], metric, huber_c)


def _guided_loss_backward_torch(vs: Tensor, vc: Tensor, vu: Tensor, coef: Tensor,
                                upstream: Tensor, metric: str, huber_c: float) -> Tensor:
    return loss_grad_torch(_difference(vs, vc, vu, coef), coef[0] * upstream, metric, huber_c,
                           vs.dtype)


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
_guided_loss_op = register_loss_op("guided_distill_loss", _guided_loss_torch,
                                   _guided_loss_triton, _guided_loss_backward_torch,
                                   _guided_loss_backward_triton)


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
        return w64 if w64.dim() else w64.expand(batch)
    if isinstance(w, Real) and not isinstance(w, bool):
        if not math.isfinite(float(w)):
            raise ValueError(f"w: expected a finite guidance weight, got {w}")
        return torch.full((batch,), float(w), dtype=torch.float64, device=device)
    raise TypeError(f"w: expected a float or a tensor of guidance weights, "
                    f"got {type(w).__name__}")


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
    factor = None if sample_weight is None else _sample_weights(sample_weight, batch,
                                                                v_student.device)
    weight = row_weight64(phi, weighting, v_student.numel() // batch, factor)
    # 1 + w formed in float64 then rounded once: (1+w) and w are each the nearest float32
    coef = torch.stack((weight, 1.0 + w64, w64)).to(torch.float32)
    return _guided_loss_op(v_student, v_cond.detach(), v_uncond.detach(), coef, metric,
                           huber_c)
