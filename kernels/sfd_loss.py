"""SFD loss: ``mean_b mean_i metric(cos Δ_b · z_t + sin Δ_b · v_student − z_target)``.

The student's one DDIM step from its own (detached) trajectory point ``z_t`` at angle
``phi_from`` to ``phi_to`` is the rotation ``cos Δ z_t + sin Δ v̂`` (DESIGN §2); SFD (Zhou et
al. 2024) compares it with the teacher's multi-step solution ``z_target`` at ``phi_to``.
Rotation and metric run in one pass: the student's state is never written to memory.

``Δ = φ_to − φ_from`` is formed in float64 on the host from float64 angles (never in float32
near π/2, DESIGN §2), and ``cos Δ``, ``sin Δ`` and ``1 / (B·n)`` reach the kernels as
float32 ``(B,)`` tensors. Forward: one float32 partial sum per program, added up on the
host in a fixed order (deterministic). Backward: its own kernel / custom op,
``grad = upstream · sin Δ_b / (B·n) · metric'(d)``. Differentiable in ``v_student`` only.
Metrics and their derivatives are shared with the other losses (``_metrics``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks
from ._metrics import METRIC_CODES, metric_grad_torch_, metric_reference, metric_torch_
from .dispatch import BLOCK, backend_for, blocks_per_row, row_chunks, tl, triton

if triton is not None:
    from ._metrics import metric_grad, metric_value


# ---------------------------------------------------------------- 1. Triton kernels
if triton is not None:

    @triton.jit
    def _sfd_loss_fwd_kernel(
        vs_ptr, z_ptr, zt_ptr, cos_ptr, sin_ptr, scale_ptr, partial_ptr,
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
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        zt = tl.load(zt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + row)
        s = tl.load(sin_ptr + row)
        d = c * z + s * vs - zt
        m = tl.where(mask, metric_value(d, METRIC, HUBER_C), 0.0)
        scale = tl.load(scale_ptr + row)
        tl.store(partial_ptr + row.to(tl.int64) * n_blocks + block, scale * tl.sum(m, axis=0))

    @triton.jit
    def _sfd_loss_bwd_kernel(
        vs_ptr, z_ptr, zt_ptr, cos_ptr, sin_ptr, gscale_ptr, grad_ptr,
        n_per_sample, row_start,
        METRIC: tl.constexpr, HUBER_C: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = row_start + tl.program_id(1)
        cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_per_sample
        offs = row.to(tl.int64) * n_per_sample + cols
        vs = tl.load(vs_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        zt = tl.load(zt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + row)
        s = tl.load(sin_ptr + row)
        gscale = tl.load(gscale_ptr + row)  # upstream · sin Δ / (B·n)
        g = gscale * metric_grad(c * z + s * vs - zt, METRIC, HUBER_C)
        tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


def _sfd_loss_triton(vs: Tensor, z: Tensor, zt: Tensor, cos_d: Tensor, sin_d: Tensor,
                     scale: Tensor, metric: str, huber_c: float) -> Tensor:
    vs, z, zt = vs.contiguous(), z.contiguous(), zt.contiguous()
    batch = vs.shape[0]
    n = vs.numel() // batch
    n_blocks = blocks_per_row(n)
    partial = torch.empty(batch * n_blocks, dtype=torch.float32, device=vs.device)
    for start, rows in row_chunks(batch):
        _sfd_loss_fwd_kernel[(n_blocks, rows)](
            vs, z, zt, cos_d, sin_d, scale, partial, n, n_blocks, start,
            METRIC=METRIC_CODES[metric], HUBER_C=huber_c, BLOCK=BLOCK,
        )
    return partial.sum(dtype=torch.float64).to(torch.float32)


def _sfd_loss_backward_triton(vs: Tensor, z: Tensor, zt: Tensor, cos_d: Tensor,
                              sin_d: Tensor, gscale: Tensor, metric: str,
                              huber_c: float) -> Tensor:
    vs, z, zt = vs.contiguous(), z.contiguous(), zt.contiguous()
    grad = torch.empty_like(vs)
    batch = vs.shape[0]
    n = vs.numel() // batch
    for start, rows in row_chunks(batch):
        _sfd_loss_bwd_kernel[(blocks_per_row(n), rows)](
            vs, z, zt, cos_d, sin_d, gscale, grad, n, start,
            METRIC=METRIC_CODES[metric], HUBER_C=huber_c, BLOCK=BLOCK,
        )
    return grad


# ---------------------------------------------------------------- 2. torch implementation
def _col(x: Tensor, ndim: int) -> Tensor:
    return x.view((-1,) + (1,) * (ndim - 1))


def _difference(vs: Tensor, z: Tensor, zt: Tensor, cos_d: Tensor, sin_d: Tensor) -> Tensor:
    """d = cos Δ z + sin Δ v − z_target in float32 (fresh tensor, safe to overwrite)."""
    nd = vs.dim()
    d = torch.mul(z.float(), _col(cos_d, nd))
    d.addcmul_(vs.float(), _col(sin_d, nd))
    return d.sub_(zt.float())


def _sfd_loss_torch(vs: Tensor, z: Tensor, zt: Tensor, cos_d: Tensor, sin_d: Tensor,
                    scale: Tensor, metric: str, huber_c: float) -> Tensor:
    d = _difference(vs, z, zt, cos_d, sin_d)
    per_sample = metric_torch_(d, metric, huber_c).reshape(vs.shape[0], -1).sum(dim=1)
    return torch.dot(per_sample, scale)


def _sfd_loss_backward_torch(vs: Tensor, z: Tensor, zt: Tensor, cos_d: Tensor,
                             sin_d: Tensor, gscale: Tensor, metric: str,
                             huber_c: float) -> Tensor:
    g = metric_grad_torch_(_difference(vs, z, zt, cos_d, sin_d), metric, huber_c)
    return g.mul_(_col(gscale, g.dim())).to(vs.dtype)


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
@torch.library.custom_op("fastdiff::sfd_loss", mutates_args=())
def _sfd_loss_op(v_student: Tensor, z_t: Tensor, z_target: Tensor, cos_d: Tensor,
                 sin_d: Tensor, scale: Tensor, metric: str, huber_c: float) -> Tensor:
    """Default kernel (devices other than CPU/CUDA): the torch implementation."""
    return _sfd_loss_torch(v_student, z_t, z_target, cos_d, sin_d, scale, metric, huber_c)


@_sfd_loss_op.register_kernel(("cpu", "cuda"))
def _(v_student: Tensor, z_t: Tensor, z_target: Tensor, cos_d: Tensor, sin_d: Tensor,
      scale: Tensor, metric: str, huber_c: float) -> Tensor:
    if backend_for(v_student) == "triton":
        return _sfd_loss_triton(v_student, z_t, z_target, cos_d, sin_d, scale, metric, huber_c)
    return _sfd_loss_torch(v_student, z_t, z_target, cos_d, sin_d, scale, metric, huber_c)


@_sfd_loss_op.register_fake
def _(v_student, z_t, z_target, cos_d, sin_d, scale, metric, huber_c):
    return v_student.new_empty((), dtype=torch.float32)


@torch.library.custom_op("fastdiff::sfd_loss_backward", mutates_args=())
def _sfd_loss_backward_op(v_student: Tensor, z_t: Tensor, z_target: Tensor, cos_d: Tensor,
                          sin_d: Tensor, gscale: Tensor, metric: str,
                          huber_c: float) -> Tensor:
    """Gradient wrt ``v_student``; ``gscale`` = upstream · sin Δ / (B·n)."""
    return _sfd_loss_backward_torch(v_student, z_t, z_target, cos_d, sin_d, gscale, metric,
                                    huber_c)


@_sfd_loss_backward_op.register_kernel(("cpu", "cuda"))
def _(v_student: Tensor, z_t: Tensor, z_target: Tensor, cos_d: Tensor, sin_d: Tensor,
      gscale: Tensor, metric: str, huber_c: float) -> Tensor:
    if backend_for(v_student) == "triton":
        return _sfd_loss_backward_triton(v_student, z_t, z_target, cos_d, sin_d, gscale,
                                         metric, huber_c)
    return _sfd_loss_backward_torch(v_student, z_t, z_target, cos_d, sin_d, gscale, metric,
                                    huber_c)


@_sfd_loss_backward_op.register_fake
def _(v_student, z_t, z_target, cos_d, sin_d, gscale, metric, huber_c):
    return torch.empty_like(v_student, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    v_student, z_t, z_target, cos_d, sin_d, scale, metric, huber_c = inputs
    ctx.save_for_backward(v_student, z_t, z_target, cos_d, sin_d, scale)
    ctx.metric, ctx.huber_c = metric, huber_c


def _backward(ctx, grad):
    v_student, z_t, z_target, cos_d, sin_d, scale = ctx.saved_tensors
    gscale = scale * sin_d * grad.to(torch.float32)
    grad_vs = _sfd_loss_backward_op(v_student, z_t, z_target, cos_d, sin_d, gscale,
                                    ctx.metric, ctx.huber_c)
    return grad_vs, None, None, None, None, None, None, None


_sfd_loss_op.register_autograd(_backward, setup_context=_setup)


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
    cos_d = torch.cos(delta).to(torch.float32).contiguous()
    sin_d = torch.sin(delta).to(torch.float32).contiguous()
    n = v_student.numel() // batch
    scale = torch.full((batch,), 1.0 / (batch * n), dtype=torch.float64,
                       device=v_student.device).to(torch.float32)
    return _sfd_loss_op(v_student, z_t.detach(), z_target.detach(), cos_d, sin_d, scale,
                        metric, huber_c)
