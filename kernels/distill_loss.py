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
from ._metrics import loss_grad_torch, loss_torch, metric_reference, row_scale
from ._register import launch_loss, launch_loss_backward, register_loss_op
from .dispatch import sample_block, tl, triton

if triton is not None:
    from ._metrics import store_loss_grad, store_loss_partial


# ---------------------------------------------------------------- 1. Triton kernels
if triton is not None:

    @triton.jit
    def _distill_difference(vs_ptr, vt_ptr, offs, mask):
        vs = tl.load(vs_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        vt = tl.load(vt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        return vs - vt

    @triton.jit
    def _distill_loss_fwd_kernel(vs_ptr, vt_ptr, scale_ptr, partial_ptr,
                                 n_per_sample, batch, row_start,
                                 METRIC: tl.constexpr, HUBER_C: tl.constexpr,
                                 BLOCK: tl.constexpr):
        row, offs, mask = sample_block(n_per_sample, row_start, BLOCK)
        d = _distill_difference(vs_ptr, vt_ptr, offs, mask)
        store_loss_partial(partial_ptr, row, d, mask, tl.load(scale_ptr + row), METRIC, HUBER_C)

    @triton.jit
    def _distill_loss_bwd_kernel(vs_ptr, vt_ptr, scale_ptr, upstream_ptr, grad_ptr,
                                 n_per_sample, batch, row_start,
                                 METRIC: tl.constexpr, HUBER_C: tl.constexpr,
                                 BLOCK: tl.constexpr):
        row, offs, mask = sample_block(n_per_sample, row_start, BLOCK)
        d = _distill_difference(vs_ptr, vt_ptr, offs, mask)
        gscale = tl.load(scale_ptr + row) * tl.load(upstream_ptr).to(tl.float32)
        store_loss_grad(grad_ptr, offs, mask, d, gscale, METRIC, HUBER_C)


def _distill_loss_triton(vs: Tensor, vt: Tensor, scale: Tensor, metric: str,
                         huber_c: float) -> Tensor:
    return launch_loss(_distill_loss_fwd_kernel, (vs, vt), scale, metric, huber_c)


def _distill_loss_backward_triton(vs: Tensor, vt: Tensor, scale: Tensor, upstream: Tensor,
                                  metric: str, huber_c: float) -> Tensor:
    return launch_loss_backward(_distill_loss_bwd_kernel, (vs, vt), scale, upstream, metric,
                                huber_c)


# ---------------------------------------------------------------- 2. torch implementation
def _distill_loss_torch(vs: Tensor, vt: Tensor, scale: Tensor, metric: str,
                        huber_c: float) -> Tensor:
    return loss_torch(torch.sub(vs.float(), vt.float()), scale, metric, huber_c)


def _distill_loss_backward_torch(vs: Tensor, vt: Tensor, scale: Tensor, upstream: Tensor,
                                 metric: str, huber_c: float) -> Tensor:
    return loss_grad_torch(torch.sub(vs.float(), vt.float()), scale * upstream, metric,
                           huber_c, vs.dtype)


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
_distill_loss_op = register_loss_op("distill_loss", _distill_loss_torch, _distill_loss_triton,
                                    _distill_loss_backward_torch, _distill_loss_backward_triton)


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
