"""Progressive-distillation target: the student's v for one step t -> t'' (DESIGN §2).

Expanded form, with ``D1 = phi_mid - phi_t``, ``D2 = phi_end - phi_mid``,
``D = phi_end - phi_t`` (all differences in float64):

    v~ = c_z z_t + c_1 v_1 + c_2 v_2,
    c_z = sin D1 sin D2 / sin D,   c_1 = cos D2 sin D1 / sin D,   c_2 = sin D2 / sin D.

The textbook route (materialise z_t'', subtract cos D z_t, divide by sin D) cancels
catastrophically in float32 for small steps; it is kept only as the float64 reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks
from .ddim_step import _per_sample, ddim_step_reference
from .dispatch import BLOCK, backend_for, blocks_per_row, row_chunks, tl, triton

# ---------------------------------------------------------------- 1. Triton kernel
if triton is not None:

    @triton.jit
    def _pd_target_kernel(
        z_ptr, v1_ptr, v2_ptr, cz_ptr, c1_ptr, c2_ptr, out_ptr,
        n_per_sample, row_start,
        BLOCK: tl.constexpr,
    ):
        # grid: (blocks of one sample's elements, samples)
        row = row_start + tl.program_id(1)
        cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_per_sample
        offs = row.to(tl.int64) * n_per_sample + cols
        cz = tl.load(cz_ptr + row)
        c1 = tl.load(c1_ptr + row)
        c2 = tl.load(c2_ptr + row)
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v1 = tl.load(v1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v2 = tl.load(v2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out = cz * z + c1 * v1 + c2 * v2
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _pd_target_triton(z: Tensor, v1: Tensor, v2: Tensor, cz: Tensor, c1: Tensor,
                      c2: Tensor) -> Tensor:
    z, v1, v2 = z.contiguous(), v1.contiguous(), v2.contiguous()
    out = torch.empty_like(z)
    batch = z.shape[0]
    n = z.numel() // batch if batch else 0
    if n == 0:
        return out
    for start, rows in row_chunks(batch):
        _pd_target_kernel[(blocks_per_row(n), rows)](
            z, v1, v2, cz, c1, c2, out, n, start, BLOCK=BLOCK
        )
    return out


# ---------------------------------------------------------------- 2. torch implementation
def _pd_target_torch_f32(z: Tensor, v1: Tensor, v2: Tensor, cz: Tensor, c1: Tensor,
                         c2: Tensor) -> Tensor:
    """The target in float32 whatever the input dtype (a fresh tensor)."""
    out = z * _per_sample(cz, z)  # float32: the coefficients promote
    out.addcmul_(v1, _per_sample(c1, v1))
    out.addcmul_(v2, _per_sample(c2, v2))
    return out


def _pd_target_torch(z: Tensor, v1: Tensor, v2: Tensor, cz: Tensor, c1: Tensor,
                     c2: Tensor) -> Tensor:
    return _pd_target_torch_f32(z, v1, v2, cz, c1, c2).to(z.dtype)


# ---------------------------------------------------------------- 3. float64 reference
def pd_target_reference(z_t: Tensor, v_1: Tensor, v_2: Tensor, phi_t, phi_mid,
                        phi_end) -> Tensor:
    """Two float64 DDIM steps, then the textbook ``(z_t'' - cos D z_t) / sin D``."""
    batch = z_t.shape[0]
    a = _checks.angles("phi_t", phi_t, batch, z_t.device)
    m = _checks.angles("phi_mid", phi_mid, batch, z_t.device)
    e = _checks.angles("phi_end", phi_end, batch, z_t.device)
    z_mid = ddim_step_reference(z_t, v_1, a, m)
    z_end = ddim_step_reference(z_mid, v_2, m, e)
    delta = _per_sample(e - a, z_end)
    return (z_end - torch.cos(delta) * z_t.double()) / torch.sin(delta)


# ---------------------------------------------------------------- 4. custom op
@torch.library.custom_op("fastdiff::pd_target", mutates_args=())
def _pd_target_op(z: Tensor, v1: Tensor, v2: Tensor, cz: Tensor, c1: Tensor,
                  c2: Tensor) -> Tensor:
    """Default kernel (devices other than CPU/CUDA): the torch implementation."""
    return _pd_target_torch(z, v1, v2, cz, c1, c2)


@_pd_target_op.register_kernel(("cpu", "cuda"))
def _(z: Tensor, v1: Tensor, v2: Tensor, cz: Tensor, c1: Tensor, c2: Tensor) -> Tensor:
    if backend_for(z) == "triton":
        return _pd_target_triton(z, v1, v2, cz, c1, c2)
    return _pd_target_torch(z, v1, v2, cz, c1, c2)


@_pd_target_op.register_fake
def _(z: Tensor, v1: Tensor, v2: Tensor, cz: Tensor, c1: Tensor, c2: Tensor) -> Tensor:
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _pd_setup(ctx, inputs, output):
    z, v1, v2, cz, c1, c2 = inputs
    ctx.save_for_backward(cz, c1, c2)
    ctx.dtypes = (z.dtype, v1.dtype, v2.dtype)


def _pd_backward(ctx, grad):
    coefficients = ctx.saved_tensors
    grads = tuple(
        (grad * _per_sample(c, grad)).to(dtype) for c, dtype in zip(coefficients, ctx.dtypes)
    )
    return (*grads, None, None, None)


_pd_target_op.register_autograd(_pd_backward, setup_context=_pd_setup)


# ---------------------------------------------------------------- 5. public function
def pd_coefficients(phi_t: Tensor, phi_mid: Tensor, phi_end: Tensor,
                    check: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``(c_z, c_1, c_2)`` from float64 angles, formed in float64, returned as float32.

    Raises ValueError where ``phi_end == phi_t`` (sin D = 0) unless ``check`` is False
    or the call is being traced by torch.compile (a data-dependent check cannot be). The
    check runs only on CPU angles: on a GPU it would cost a device sync on every call.
    """
    d1 = phi_mid - phi_t
    d2 = phi_end - phi_mid
    sin_d = torch.sin(phi_end - phi_t)
    if check and sin_d.device.type == "cpu" and not torch.compiler.is_compiling() \
            and bool((sin_d == 0).any()):
        bad = torch.nonzero(sin_d == 0).flatten().tolist()
        raise ValueError(
            f"phi_end equals phi_t for sample(s) {bad[:8]}: a zero-length step has no "
            "v target (sin(phi_end - phi_t) = 0)"
        )
    sin_d1, sin_d2 = torch.sin(d1), torch.sin(d2)
    c_z = sin_d1 * sin_d2 / sin_d
    c_1 = torch.cos(d2) * sin_d1 / sin_d
    c_2 = sin_d2 / sin_d
    return tuple(c.to(torch.float32) for c in (c_z, c_1, c_2))


def pd_angles(z_t: Tensor, phi_t, phi_mid, phi_end) -> tuple[Tensor, Tensor, Tensor]:
    batch = z_t.shape[0]
    return (
        _checks.angles("phi_t", phi_t, batch, z_t.device),
        _checks.angles("phi_mid", phi_mid, batch, z_t.device),
        _checks.angles("phi_end", phi_end, batch, z_t.device),
    )


def pd_target(z_t: Tensor, v_1: Tensor, v_2: Tensor, phi_t, phi_mid, phi_end) -> Tensor:
    """The student's v target for one step ``phi_t -> phi_end`` through ``phi_mid``.

    ``v_1`` is the teacher's v at ``z_t``, ``v_2`` its v at
    ``ddim_step(z_t, v_1, phi_t, phi_mid)``. Tensors ``(B, ...)`` of one shape, device and
    dtype; angles ``(B,)``, 0-d or floats. Returns ``z_t``'s dtype.
    """
    _checks.check_data("z_t", z_t)
    _checks.check_like("z_t", z_t, "v_1", v_1)
    _checks.check_like("z_t", z_t, "v_2", v_2)
    _checks.check_same_dtype("z_t", z_t, "v_1", v_1)
    _checks.check_same_dtype("z_t", z_t, "v_2", v_2)
    cz, c1, c2 = pd_coefficients(*pd_angles(z_t, phi_t, phi_mid, phi_end))
    return _pd_target_op(z_t, v_1, v_2, cz, c1, c2)
