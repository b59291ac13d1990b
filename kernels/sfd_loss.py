"""SFD loss: ``mean_b mean_i metric(cos Δ_b · z_t + sin Δ_b · v_student − z_target)``.

The student's one DDIM step from its own (detached) trajectory point ``z_t`` at angle
``phi_from`` to ``phi_to`` is the rotation ``cos Δ z_t + sin Δ v̂`` (DESIGN §2); SFD (Zhou et
al. 2024) compares it with the teacher's multi-step solution ``z_target`` at ``phi_to``.
Rotation and metric run in one pass: the student's state is never written to memory.

``Δ = φ_to − φ_from`` is formed in float64 on the host from float64 angles (never in float32
near π/2, DESIGN §2), and ``cos Δ``, ``sin Δ`` and ``1 / (B·n)`` reach the kernels as the
rows of one float32 ``(3, B)`` tensor. Forward: one float32 partial sum per program, added up on the
host in a fixed order (deterministic). Backward: its own kernel / custom op,
``grad = upstream · sin Δ_b / (B·n) · metric'(d)``. Differentiable in ``v_student`` only.
Metrics and their derivatives are shared with the other losses (``_metrics``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks
from ._metrics import loss_grad_torch, loss_torch, metric_reference
from ._register import launch_loss, launch_loss_backward, per_sample, register_loss_op
from .dispatch import sample_block, tl, triton

if triton is not None:
    from ._metrics import store_loss_grad, store_loss_partial
    from .ddim_step import ddim_rotation


# ---------------------------------------------------------------- 1. Triton kernels
# coef rows: the loss scale 1 / (B·n), then cos Δ, sin Δ (as in ddim_step)
if triton is not None:

    @triton.jit
    def _sfd_difference(vs_ptr, z_ptr, zt_ptr, coef_ptr, batch, row, offs, mask):
        """d = cos Δ z + sin Δ v_s − z_target for one block of one sample, in float32."""
        zt = tl.load(zt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        return ddim_rotation(z_ptr, vs_ptr, coef_ptr + batch, batch, row, offs, mask) - zt

    @triton.jit
    def _sfd_loss_fwd_kernel(vs_ptr, z_ptr, zt_ptr, coef_ptr, partial_ptr,
                             n_per_sample, batch, row_start,
                             METRIC: tl.constexpr, HUBER_C: tl.constexpr, BLOCK: tl.constexpr):
        row, offs, mask = sample_block(n_per_sample, row_start, BLOCK)
        d = _sfd_difference(vs_ptr, z_ptr, zt_ptr, coef_ptr, batch, row, offs, mask)
        store_loss_partial(partial_ptr, row, d, mask, tl.load(coef_ptr + row), METRIC, HUBER_C)

    @triton.jit
    def _sfd_loss_bwd_kernel(vs_ptr, z_ptr, zt_ptr, coef_ptr, upstream_ptr, grad_ptr,
                             n_per_sample, batch, row_start,
                             METRIC: tl.constexpr, HUBER_C: tl.constexpr, BLOCK: tl.constexpr):
        row, offs, mask = sample_block(n_per_sample, row_start, BLOCK)
        d = _sfd_difference(vs_ptr, z_ptr, zt_ptr, coef_ptr, batch, row, offs, mask)
        # d(d)/d(v_s) = sin Δ: upstream · sin Δ / (B·n)
        gscale = tl.load(coef_ptr + row) * tl.load(coef_ptr + 2 * batch + row)
        gscale = gscale * tl.load(upstream_ptr).to(tl.float32)
        store_loss_grad(grad_ptr, offs, mask, d, gscale, METRIC, HUBER_C)


def _sfd_loss_triton(vs: Tensor, z: Tensor, zt: Tensor, coef: Tensor, metric: str,
                     huber_c: float) -> Tensor:
    return launch_loss(_sfd_loss_fwd_kernel, (vs, z, zt), coef, metric, huber_c)


def _sfd_loss_backward_triton(vs: Tensor, z: Tensor, zt: Tensor, coef: Tensor,
                              upstream: Tensor, metric: str, huber_c: float) -> Tensor:
    return launch_loss_backward(_sfd_loss_bwd_kernel, (vs, z, zt), coef, upstream, metric,
                                huber_c)


# ---------------------------------------------------------------- 2. torch implementation
def _difference(vs: Tensor, z: Tensor, zt: Tensor, coef: Tensor) -> Tensor:
    """d = cos Δ z + sin Δ v − z_target in float32 (fresh tensor, safe to overwrite)."""
    _, cos_d, sin_d = per_sample(coef, vs)
    d = torch.mul(z.float(), cos_d)
    d.addcmul_(vs.float(), sin_d)
    return d.sub_(zt.float())


def _sfd_loss_torch(vs: Tensor, z: Tensor, zt: Tensor, coef: Tensor, metric: str,
                    huber_c: float) -> Tensor:
    return loss_torch(_difference(vs, z, zt, coef), coef[0], metric, huber_c)


def _sfd_loss_backward_torch(vs: Tensor, z: Tensor, zt: Tensor, coef: Tensor,
                             upstream: Tensor, metric: str, huber_c: float) -> Tensor:
    gscale = coef[0] * coef[2] * upstream  # upstream · sin Δ / (B·n)
    return loss_grad_torch(_difference(vs, z, zt, coef), gscale, metric, huber_c, vs.dtype)


# ---------------------------------------------------------------- 3. float64 reference
def sfd_loss_reference(v_student: Tensor, z_t: Tensor, z_target: Tensor, phi_from, phi_to,
                       metric: str = "l1", *, huber_c: float = 0.03) -> Tensor:
    """Textbook float64 math: rotate, subtract, metric, mean (tests take its autograd)."""
    batch = v_student.shape[0]
    p0 = _checks.angles("phi_from", phi_from, batch, v_student.device)
    p1 = _checks.angles("phi_to", phi_to, batch, v_student.device)
    delta = (p1 - p0).view((-1,) + (1,) * (v_student.dim() - 1))
    z_student = torch.cos(delta) * z_t.double() + torch.sin(delta) * v_student.double()
    d = z_student - z_target.double()
    return metric_reference(d, metric, huber_c).reshape(batch, -1).mean(dim=1).mean()


# ---------------------------------------------------------------- 4. custom ops
_sfd_loss_op = register_loss_op("sfd_loss", _sfd_loss_torch, _sfd_loss_triton,
                                _sfd_loss_backward_torch, _sfd_loss_backward_triton)


# ---------------------------------------------------------------- 5. public function
def sfd_loss(v_student: Tensor, z_t: Tensor, z_target: Tensor, phi_from, phi_to,
             metric: str = "l1", *, huber_c: float = 0.03) -> Tensor:
    """SFD's loss (float32 scalar), differentiable in ``v_student``.

    ``v_student``: the student's v̂ at ``(z_t, t_from)``, ``(B, ...)``; ``z_t``: the student's
    own (detached) trajectory point at ``phi_from``; ``z_target``: the teacher's solution at
    ``phi_to``; all of one shape and device (dtypes may differ: float32, bfloat16, float16).
    ``phi_from``, ``phi_to``: angles ``(B,)``, 0-d or floats (float64 preferred; the
    difference is taken in float64). ``metric``: ``"l1"`` (SFD's default), ``"l2"`` or
    ``"pseudo_huber"`` (per element ``sqrt(d^2 + huber_c^2) - huber_c``). Returns
    ``mean_b mean_i metric(cos Δ z_t + sin Δ v_student − z_target)``, ``Δ = φ_to − φ_from``.
    No gradient flows to ``z_t`` or ``z_target``.
    """
    _checks.check_data("v_student", v_student)
    _checks.check_like("v_student", v_student, "z_t", z_t)
    _checks.check_like("v_student", v_student, "z_target", z_target)
    _checks.check_nonempty("v_student", v_student)
    _checks.check_choice("metric", metric, _checks.METRICS)
    huber_c = _checks.check_huber_c(huber_c)
    batch = v_student.shape[0]
    p0 = _checks.angles("phi_from", phi_from, batch, v_student.device)
    p1 = _checks.angles("phi_to", phi_to, batch, v_student.device)
    delta = p1 - p0  # float64
    n = v_student.numel() // batch
    coef = torch.stack((delta.new_full((batch,), 1.0 / (batch * n)), torch.cos(delta),
                        torch.sin(delta))).to(torch.float32)
    return _sfd_loss_op(v_student, z_t.detach(), z_target.detach(), coef, metric, huber_c)
