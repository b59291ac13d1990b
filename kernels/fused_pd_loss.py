"""``distill_loss(v_student, pd_target(z_t, v_1, v_2, ...))`` in one pass.

The target ``c_z z_t + c_1 v_1 + c_2 v_2`` (coefficients as in ``pd_target``) is formed
in registers and never written to memory; the backward kernel recomputes it rather than
saving it. Same weighting, metrics and reduction as ``distill_loss``. The three target
coefficients and the loss scale reach the kernels as one float32 ``(4, B)`` tensor.

One pass (the default for eager calls that need a gradient): a third kernel and its torch
twin compute the loss and the gradient at upstream 1 together, reading each input once;
the gradient is kept for backward, which only scales it by the upstream gradient (not at
all when that is exactly 1). 5 N elements moved instead of 4 N + 5 N for a forward pass
and a recomputing backward pass. torch.compile traces the two-pass custom ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks
from ._metrics import loss_and_grad_torch, loss_grad_torch, loss_torch
from ._register import (
    launch_loss,
    launch_loss_and_grad,
    launch_loss_backward,
    per_sample,
    register_loss_op,
)
from .dispatch import sample_block, tl, triton
from .distill_loss import distill_loss_reference
from .pd_target import pd_coefficient_rows, pd_target_reference

if triton is not None:
    from ._metrics import store_loss_grad, store_loss_partial
    from .pd_target import pd_target_value


# ---------------------------------------------------------------- 1. Triton kernels
# coef rows: the loss scale w_b / (B * n), then c_z, c_1, c_2 (as in pd_target)
if triton is not None:

    @triton.jit
    def _fused_pd_difference(vs_ptr, z_ptr, v1_ptr, v2_ptr, coef_ptr, batch, row, offs, mask):
        vs = tl.load(vs_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        target = pd_target_value(z_ptr, v1_ptr, v2_ptr, coef_ptr + batch, batch, row, offs,
                                 mask)
        return vs - target

    @triton.jit
    def _fused_pd_loss_fwd_kernel(vs_ptr, z_ptr, v1_ptr, v2_ptr, coef_ptr, partial_ptr,
                                  n_per_sample, batch, row_start,
                                  METRIC: tl.constexpr, HUBER_C: tl.constexpr,
                                  BLOCK: tl.constexpr):
        row, offs, mask = sample_block(n_per_sample, row_start, BLOCK)
        d = _fused_pd_difference(vs_ptr, z_ptr, v1_ptr, v2_ptr, coef_ptr, batch, row, offs, mask)
        store_loss_partial(partial_ptr, row, d, mask, tl.load(coef_ptr + row), METRIC, HUBER_C)

    @triton.jit
    def _fused_pd_loss_bwd_kernel(vs_ptr, z_ptr, v1_ptr, v2_ptr, coef_ptr, upstream_ptr,
                                  grad_ptr, n_per_sample, batch, row_start,
                                  METRIC: tl.constexpr, HUBER_C: tl.constexpr,
                                  BLOCK: tl.constexpr):
        row, offs, mask = sample_block(n_per_sample, row_start, BLOCK)
        d = _fused_pd_difference(vs_ptr, z_ptr, v1_ptr, v2_ptr, coef_ptr, batch, row, offs, mask)
        gscale = tl.load(coef_ptr + row) * tl.load(upstream_ptr).to(tl.float32)
        store_loss_grad(grad_ptr, offs, mask, d, gscale, METRIC, HUBER_C)

    @triton.jit
    def _fused_pd_loss_and_grad_kernel(vs_ptr, z_ptr, v1_ptr, v2_ptr, coef_ptr, partial_ptr,
                                       grad_ptr, n_per_sample, batch, row_start,
                                       METRIC: tl.constexpr, HUBER_C: tl.constexpr,
                                       BLOCK: tl.constexpr):
        """One pass: the forward's partial sum and the backward's gradient at upstream 1."""
        row, offs, mask = sample_block(n_per_sample, row_start, BLOCK)
        d = _fused_pd_difference(vs_ptr, z_ptr, v1_ptr, v2_ptr, coef_ptr, batch, row, offs, mask)
        scale = tl.load(coef_ptr + row)
        store_loss_partial(partial_ptr, row, d, mask, scale, METRIC, HUBER_C)
        store_loss_grad(grad_ptr, offs, mask, d, scale, METRIC, HUBER_C)


def _fused_pd_loss_triton(vs: Tensor, z: Tensor, v1: Tensor, v2: Tensor, coef: Tensor,
                          metric: str, huber_c: float) -> Tensor:
    return launch_loss(_fused_pd_loss_fwd_kernel, (vs, z, v1, v2), coef, metric, huber_c)


def _fused_pd_loss_backward_triton(vs: Tensor, z: Tensor, v1: Tensor, v2: Tensor, coef: Tensor,
                                   upstream: Tensor, metric: str, huber_c: float) -> Tensor:
    return launch_loss_backward(_fused_pd_loss_bwd_kernel, (vs, z, v1, v2), coef, upstream,
                                metric, huber_c)


def _fused_pd_loss_and_grad_triton(vs: Tensor, z: Tensor, v1: Tensor, v2: Tensor,
                                   coef: Tensor, metric: str,
                                   huber_c: float) -> tuple[Tensor, Tensor]:
    return launch_loss_and_grad(_fused_pd_loss_and_grad_kernel, (vs, z, v1, v2), coef, metric,
                                huber_c)


# ---------------------------------------------------------------- 2. torch implementation
def _difference_f32(vs: Tensor, z: Tensor, v1: Tensor, v2: Tensor, coef: Tensor) -> Tensor:
    """``v_student - c_z z - c_1 v_1 - c_2 v_2`` in float32 (the float32 coefficients
    promote any input dtype): three fused multiply-adds into one fresh temporary, two
    calls fewer than forming the target and subtracting it (the rounding differs from the
    Triton kernel's ``vs - target`` by float32 rounding only)."""
    _, cz, c1, c2 = per_sample(coef, vs)
    d = torch.addcmul(vs, z, cz, value=-1.0)
    d.addcmul_(v1, c1, value=-1.0)
    return d.addcmul_(v2, c2, value=-1.0)


def _fused_pd_loss_torch(vs: Tensor, z: Tensor, v1: Tensor, v2: Tensor, coef: Tensor,
                         metric: str, huber_c: float) -> Tensor:
    return loss_torch(_difference_f32(vs, z, v1, v2, coef), coef[0], metric, huber_c)


def _fused_pd_loss_backward_torch(vs: Tensor, z: Tensor, v1: Tensor, v2: Tensor, coef: Tensor,
                                  upstream: Tensor, metric: str, huber_c: float) -> Tensor:
    return loss_grad_torch(_difference_f32(vs, z, v1, v2, coef), coef[0] * upstream, metric,
                           huber_c, vs.dtype)


def _fused_pd_loss_and_grad_torch(vs: Tensor, z: Tensor, v1: Tensor, v2: Tensor,
                                  coef: Tensor, metric: str,
                                  huber_c: float) -> tuple[Tensor, Tensor]:
    return loss_and_grad_torch(_difference_f32(vs, z, v1, v2, coef), coef[0], metric,
                               huber_c, vs.dtype)


# ---------------------------------------------------------------- 3. float64 reference
def fused_pd_loss_reference(v_student, z_t, v_1, v_2, phi_t, phi_mid, phi_end,
                            weighting="snr_trunc", metric="l2", *, huber_c=0.03):
    """float64: the textbook two-step target, then the plain loss (differentiable)."""
    target = pd_target_reference(z_t, v_1, v_2, phi_t, phi_mid, phi_end)
    return distill_loss_reference(v_student, target, phi_t, weighting, metric,
                                  huber_c=huber_c)


# ---------------------------------------------------------------- 4. custom ops
_fused_pd_loss_op = register_loss_op("fused_pd_loss", _fused_pd_loss_torch,
                                     _fused_pd_loss_triton, _fused_pd_loss_backward_torch,
                                     _fused_pd_loss_backward_triton,
                                     _fused_pd_loss_and_grad_torch,
                                     _fused_pd_loss_and_grad_triton)


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
    coef = pd_coefficient_rows(v_student, phi_t, phi_mid, phi_end, weighting)
    return _fused_pd_loss_op(v_student, z_t, v_1, v_2, coef, metric, huber_c)
