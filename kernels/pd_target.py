"""Progressive-distillation target: the student's v for one step t -> t'' (DESIGN §2).

Expanded form, with ``D1 = phi_mid - phi_t``, ``D2 = phi_end - phi_mid``,
``D = phi_end - phi_t`` (all differences in float64):

    v~ = c_z z_t + c_1 v_1 + c_2 v_2,
    c_z = sin D1 sin D2 / sin D,   c_1 = cos D2 sin D1 / sin D,   c_2 = sin D2 / sin D.

The textbook route (materialise z_t'', subtract cos D z_t, divide by sin D) cancels
catastrophically in float32 for small steps; it is kept only as the float64 reference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _checks
from ._metrics import weight_from_sincos
from ._register import launch_elementwise, per_sample, register_linear_op
from .ddim_step import _per_sample, ddim_step_reference
from .dispatch import sample_block, tl, triton

# ---------------------------------------------------------------- 1. Triton kernel
if triton is not None:

    @triton.jit
    def pd_target_value(z_ptr, v1_ptr, v2_ptr, coef_ptr, batch, row, offs, mask):
        """``c_z z + c_1 v_1 + c_2 v_2`` in float32 for one block of one sample (``coef``
        rows 0-2: c_z, c_1, c_2)."""
        cz = tl.load(coef_ptr + row)
        c1 = tl.load(coef_ptr + batch + row)
        c2 = tl.load(coef_ptr + 2 * batch + row)
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v1 = tl.load(v1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v2 = tl.load(v2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        return cz * z + c1 * v1 + c2 * v2

    @triton.jit
    def _pd_target_kernel(z_ptr, v1_ptr, v2_ptr, coef_ptr, out_ptr, n_per_sample, batch,
                          row_start, BLOCK: tl.constexpr):
        row, offs, mask = sample_block(n_per_sample, row_start, BLOCK)
        out = pd_target_value(z_ptr, v1_ptr, v2_ptr, coef_ptr, batch, row, offs, mask)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _pd_target_triton(z: Tensor, v1: Tensor, v2: Tensor, coef: Tensor) -> Tensor:
    return launch_elementwise(_pd_target_kernel, (z, v1, v2), coef)


# ---------------------------------------------------------------- 2. torch implementation
def _pd_target_torch_f32(z: Tensor, v1: Tensor, v2: Tensor, cz: Tensor, c1: Tensor,
                         c2: Tensor) -> Tensor:
    """The target in float32 whatever the input dtype (a fresh tensor); ``cz, c1, c2``:
    float32 per-sample coefficients shaped to broadcast (``per_sample``)."""
    out = z * cz  # float32: the coefficients promote
    out.addcmul_(v1, c1)
    out.addcmul_(v2, c2)
    return out


def _pd_target_torch(z: Tensor, v1: Tensor, v2: Tensor, coef: Tensor) -> Tensor:
    return _pd_target_torch_f32(z, v1, v2, *per_sample(coef, z)).to(z.dtype)


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
_pd_target_op = register_linear_op("pd_target", _pd_target_torch, _pd_target_triton)


# ---------------------------------------------------------------- 5. public function
#: The arguments whose sines give every coefficient, as ``M @ (phi_t, phi_mid, phi_end)
#: + shift``: D2 = phi_end - phi_mid, D2 + pi/2 (sin = cos D2), D1 = phi_mid - phi_t,
#: D = phi_end - phi_t, phi_t, phi_t + pi/2 (sin = cos phi_t). One matmul and one sin for
#: all of them: the differences are single roundings of float64 differences (matrix
#: entries 0 and +-1), and a cosine taken as the sine of x + pi/2 is off by ~1e-16
#: absolute, far below the float32 rounding of every coefficient that uses it (cos D2 ~ 1
#: in c_1; cos^2 phi enters the weight only where it is the larger of cos^2 and sin^2).
_ROWS = ((0.0, -1.0, 1.0), (0.0, -1.0, 1.0), (-1.0, 1.0, 0.0), (-1.0, 0.0, 1.0),
         (1.0, 0.0, 0.0), (1.0, 0.0, 0.0))
_SHIFT = (0.0, math.pi / 2, 0.0, 0.0, 0.0, math.pi / 2)
_ROW_MATRIX: dict = {}  # device -> (_SHIFT as a column, _ROWS) as float64 tensors there


def _row_matrix(device: torch.device) -> tuple[Tensor, Tensor]:
    pair = _ROW_MATRIX.get(device)
    if pair is None:
        pair = (torch.tensor(_SHIFT, dtype=torch.float64, device=device).view(-1, 1),
                torch.tensor(_ROWS, dtype=torch.float64, device=device))
        if not torch.compiler.is_compiling():  # a traced constant is not cached
            _ROW_MATRIX[device] = pair
    return pair


def pd_coefficients64(phi_t: Tensor, phi_mid: Tensor, phi_end: Tensor,
                      check: bool = True, weighting: str | None = None,
                      n_per_sample: int = 1) -> Tensor:
    """``(3, B)`` float64 rows ``c_z, c_1, c_2`` from float64 ``(B,)`` angles; with a
    ``weighting``, ``(4, B)``: the loss scale ``weight_b / (B * n_per_sample)`` first (the
    layout of ``fused_pd_loss``'s ``coef``), its sines and cosines formed with the target's.

    Raises ValueError where ``phi_end == phi_t`` (sin D = 0) unless ``check`` is False
    or the call is being traced by torch.compile (a data-dependent check cannot be). The
    check runs only on CPU angles: on a GPU it would cost a device sync on every call.
    This is a small batch's largest fixed host cost, hence the few calls (about ten, each
    a few microseconds whatever B is).
    """
    shift, matrix = _row_matrix(phi_t.device)
    # (mm, then add: addmm with a broadcast bias takes a slower BLAS path here; unbind and
    # stack/cat rather than tensor indexing, whose Python-side cost is several calls')
    sin = torch.mm(matrix, torch.stack((phi_t, phi_mid, phi_end))).add_(shift).sin_()
    sin_d2, cos_d2, sin_d1, sin_d, sin_phi, cos_phi = sin.unbind(0)
    if check and sin_d.device.type == "cpu" and not torch.compiler.is_compiling() \
            and not bool(sin_d.all()):
        raise zero_step_error(torch.nonzero(sin_d == 0).flatten().tolist())
    target = torch.stack((sin_d1 * sin_d2, cos_d2 * sin_d1, sin_d2)).div_(sin_d)
    if weighting is None:
        return target
    weight = weight_from_sincos(sin_phi, cos_phi, weighting,
                                1.0 / (sin.shape[1] * n_per_sample))
    return torch.cat((weight.unsqueeze(0), target))


def zero_step_error(bad: list) -> ValueError:
    return ValueError(
        f"phi_end equals phi_t for sample(s) {bad[:8]}: a zero-length step has no "
        "v target (sin(phi_end - phi_t) = 0)"
    )


def pd_coefficients(phi_t: Tensor, phi_mid: Tensor, phi_end: Tensor,
                    check: bool = True) -> Tensor:
    """``(3, B)`` float32 rows ``c_z, c_1, c_2`` (formed in float64, see
    :func:`pd_coefficients64`, rounded once)."""
    return pd_coefficients64(phi_t, phi_mid, phi_end, check).to(torch.float32)


def pd_coefficient_rows(like: Tensor, phi_t, phi_mid, phi_end, weighting: str | None = None
                        ) -> Tensor:
    """The float32 ``coef`` of ``pd_target`` (``(3, B)``) or, with a ``weighting``, of
    ``fused_pd_loss`` (``(4, B)``, the loss scale ``weight_b / (B * n)`` first) for data
    ``like``, on its device (:func:`pd_coefficients64`, rounded once)."""
    batch = like.shape[0]
    return pd_coefficients64(*pd_angles(like, phi_t, phi_mid, phi_end), weighting=weighting,
                             n_per_sample=like.numel() // batch).to(torch.float32)


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
    return _pd_target_op(z_t, v_1, v_2, pd_coefficient_rows(z_t, phi_t, phi_mid, phi_end))
