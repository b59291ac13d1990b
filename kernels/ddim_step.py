"""DDIM step as a rotation: ``z_to = cos(phi_to - phi_from) z + sin(phi_to - phi_from) v``.

Side by side: the Triton kernel, the torch implementation, the float64 reference (tests
only), the custom-op registration (``_register``) and the public function. The two
per-sample coefficients are formed in float64 from float64 angles on the host side and reach
the kernels as one float32 ``(2, B)`` tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks
from ._register import launch_elementwise, per_sample, register_linear_op
from .dispatch import sample_block, tl, triton

# ---------------------------------------------------------------- 1. Triton kernel
if triton is not None:

    @triton.jit
    def ddim_rotation(z_ptr, v_ptr, coef_ptr, batch, row, offs, mask):
        """``cos Δ z + sin Δ v`` in float32 for one block of one sample (``coef`` rows 0, 1:
        cos Δ, sin Δ)."""
        c = tl.load(coef_ptr + row)
        s = tl.load(coef_ptr + batch + row)
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        return c * z + s * v

    @triton.jit
    def _ddim_step_kernel(z_ptr, v_ptr, coef_ptr, out_ptr, n_per_sample, batch, row_start,
                          BLOCK: tl.constexpr):
        row, offs, mask = sample_block(n_per_sample, row_start, BLOCK)
        out = ddim_rotation(z_ptr, v_ptr, coef_ptr, batch, row, offs, mask)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _ddim_step_triton(z: Tensor, v: Tensor, coef: Tensor) -> Tensor:
    return launch_elementwise(_ddim_step_kernel, (z, v), coef)


# ---------------------------------------------------------------- 2. torch implementation
def _ddim_step_torch(z: Tensor, v: Tensor, coef: Tensor) -> Tensor:
    cos_d, sin_d = per_sample(coef, z)
    # the float32 coefficients promote any input dtype to float32 math
    return torch.addcmul(z * cos_d, v, sin_d).to(z.dtype)


# ---------------------------------------------------------------- 3. float64 reference
def _per_sample(c: Tensor, like: Tensor) -> Tensor:
    """A ``(B,)`` tensor shaped to broadcast against ``like``."""
    return c.view((-1,) + (1,) * (like.dim() - 1))


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
_ddim_step_op = register_linear_op("ddim_step", _ddim_step_torch, _ddim_step_triton)


# ---------------------------------------------------------------- 5. public function
def ddim_coefficients(phi_from: Tensor, phi_to: Tensor) -> Tensor:
    """``(2, B)`` float32: ``cos`` and ``sin`` of ``phi_to - phi_from``, the difference and
    both functions taken in float64, rounded to float32 in one call."""
    delta = phi_to - phi_from
    return torch.stack((torch.cos(delta), torch.sin(delta))).to(torch.float32)


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
    return _ddim_step_op(z, v, ddim_coefficients(a, b))
