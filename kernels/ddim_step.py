"""DDIM step as a rotation: ``z_to = cos(phi_to - phi_from) z + sin(phi_to - phi_from) v``.

Side by side: the Triton kernel, the torch implementation, the float64 reference (tests
only), the custom-op registration and the public function. The two per-sample
coefficients are formed in float64 from float64 angles on the host side and reach the
kernels as float32 tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks
from .dispatch import BLOCK, backend_for, blocks_per_row, row_chunks, tl, triton

# ---------------------------------------------------------------- 1. Triton kernel
if triton is not None:

    @triton.jit
    def _ddim_step_kernel(
        z_ptr, v_ptr, cos_ptr, sin_ptr, out_ptr,
        n_per_sample, row_start,
        BLOCK: tl.constexpr,
    ):
        # grid: (blocks of one sample's elements, samples)
        row = row_start + tl.program_id(1)
        cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_per_sample
        offs = row.to(tl.int64) * n_per_sample + cols
        c = tl.load(cos_ptr + row)
        s = tl.load(sin_ptr + row)
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out = c * z + s * v
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _ddim_step_triton(z: Tensor, v: Tensor, cos_d: Tensor, sin_d: Tensor) -> Tensor:
    z, v = z.contiguous(), v.contiguous()
    out = torch.empty_like(z)
    batch = z.shape[0]
    n = z.numel() // batch if batch else 0
    if n == 0:
        return out
    for start, rows in row_chunks(batch):
        _ddim_step_kernel[(blocks_per_row(n), rows)](
            z, v, cos_d, sin_d, out, n, start, BLOCK=BLOCK
        )
    return out


# ---------------------------------------------------------------- 2. torch implementation
def _per_sample(c: Tensor, like: Tensor) -> Tensor:
    return c.view((-1,) + (1,) * (like.dim() - 1))


def _ddim_step_torch(z: Tensor, v: Tensor, cos_d: Tensor, sin_d: Tensor) -> Tensor:
    # the float32 coefficients promote any input dtype to float32 math
    out = torch.addcmul(z * _per_sample(cos_d, z), v, _per_sample(sin_d, v))
    return out.to(z.dtype)


# ---------------------------------------------------------------- 3. float64 reference
def ddim_step_reference(z: Tensor, v: Tensor, phi_from, phi_to) -> Tensor:
    """Textbook DDIM in float64: predict x and eps at ``phi_from``, re-noise at ``phi_to``."""
    z, v = z.double(), v.double()
    batch = z.shape[0]
    a = _per_sample(_checks.angles("phi_from", phi_from, batch, z.device), z)
    b = _per_sample(_checks.angles("phi_to", phi_to, batch, z.device), z)
    x_hat = torch.cos(a) * z - torch.sin(a) * v
    eps_hat = torch.sin(a) * z + torch.cos(a) * v
    return torch.cos(b) * x_hat + torch.sin(b) * eps_hat


# ---------------------------------------------------------------- 4. custom op
@torch.library.custom_op("fastdiff::ddim_step", mutates_args=())
def _ddim_step_op(z: Tensor, v: Tensor, cos_d: Tensor, sin_d: Tensor) -> Tensor:
    """Default kernel (devices other than CPU/CUDA): the torch implementation."""
    return _ddim_step_torch(z, v, cos_d, sin_d)


@_ddim_step_op.register_kernel(("cpu", "cuda"))
def _(z: Tensor, v: Tensor, cos_d: Tensor, sin_d: Tensor) -> Tensor:
    if backend_for(z) == "triton":
        return _ddim_step_triton(z, v, cos_d, sin_d)
    return _ddim_step_torch(z, v, cos_d, sin_d)


@_ddim_step_op.register_fake
def _(z: Tensor, v: Tensor, cos_d: Tensor, sin_d: Tensor) -> Tensor:
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _ddim_setup(ctx, inputs, output):
    z, v, cos_d, sin_d = inputs
    ctx.save_for_backward(cos_d, sin_d)
    ctx.dtypes = (z.dtype, v.dtype)


def _ddim_backward(ctx, grad):
    cos_d, sin_d = ctx.saved_tensors
    grad_z = (grad * _per_sample(cos_d, grad)).to(ctx.dtypes[0])
    grad_v = (grad * _per_sample(sin_d, grad)).to(ctx.dtypes[1])
    return grad_z, grad_v, None, None


_ddim_step_op.register_autograd(_ddim_backward, setup_context=_ddim_setup)


# ---------------------------------------------------------------- 5. public function
def ddim_coefficients(phi_from: Tensor, phi_to: Tensor) -> tuple[Tensor, Tensor]:
    """``cos`` and ``sin`` of ``phi_to - phi_from``, differences in float64, as float32."""
    delta = phi_to - phi_from
    return torch.cos(delta).to(torch.float32), torch.sin(delta).to(torch.float32)


def ddim_step(z: Tensor, v: Tensor, phi_from, phi_to) -> Tensor:
    """One deterministic DDIM step from angle ``phi_from`` to ``phi_to`` (either direction).

    ``z``, ``v``: ``(B, ...)`` float32/bfloat16/float16 of one shape, device and dtype;
    angles: ``(B,)``, 0-d or a float (float64 preferred). Returns ``z``'s dtype.
    """
    _checks.check_data("z", z)
    _checks.check_like("z", z, "v", v)
    _checks.check_same_dtype("z", z, "v", v)
    batch = z.shape[0]
    a = _checks.angles("phi_from", phi_from, batch, z.device)
    b = _checks.angles("phi_to", phi_to, batch, z.device)
    cos_d, sin_d = ddim_coefficients(a, b)
    return _ddim_step_op(z, v, cos_d, sin_d)
