"""Loss weightings, per-element metrics and the loss reductions shared by the four losses.

Per-element metrics of the difference ``d = v_student - v_target``:

* ``"l2"``: ``d**2`` (derivative ``2 d``);
* ``"l1"``: ``|d|`` (derivative ``sign(d)``, 0 at 0);
* ``"pseudo_huber"``: ``sqrt(d**2 + c**2) - c`` per element with ``c = huber_c``, i.e.
  ``d**2 / (2c)`` for ``|d| << c`` and ``|d| - c`` for ``|d| >> c``. It is evaluated as
  ``d**2 / (sqrt(d**2 + c**2) + c)`` (same value, no cancellation for small ``d``);
  derivative ``d / sqrt(d**2 + c**2)``. Unlike the consistency-model version it is taken
  per element, not over the norm of the whole sample, so it composes with the same
  "mean over elements" as the other metrics.

Each metric is one small branch, selected by a ``tl.constexpr`` in the Triton kernels
(``METRIC_CODES``) and by a string in the torch implementations.

Per-sample weight on the v-space metric (DESIGN §2), with ``phi`` the angle of ``t``:
``snr_trunc`` -> ``max(cos^2 phi, sin^2 phi)``, ``snr+1`` -> 1, ``const`` -> ``sin^2 phi``.
"""

from __future__ import annotations

import torch

from ._checks import METRICS, WEIGHTINGS
from .dispatch import tl, triton

METRIC_CODES = {name: code for code, name in enumerate(METRICS)}


def huber_constexpr(metric: str, huber_c: float) -> float:
    """The ``HUBER_C`` constexpr for a launch: 0 unless used, so that l2/l1 kernels are
    compiled once whatever ``huber_c`` the caller passed."""
    return huber_c if metric == "pseudo_huber" else 0.0


def loss_weight(phi: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-sample v-space weight (float64, same shape as ``phi``)."""
    if weighting == "snr_trunc":
        return torch.maximum(torch.cos(phi).square(), torch.sin(phi).square())
    if weighting == "snr+1":
        return torch.ones_like(phi)
    if weighting == "const":
        return torch.sin(phi).square()
    raise ValueError(f"weighting={weighting!r} is not valid; expected one of {WEIGHTINGS}")


def weight_from_sincos(sin_phi: torch.Tensor, cos_phi: torch.Tensor, weighting: str,
                       scale: float) -> torch.Tensor:
    """:func:`loss_weight` times ``scale`` (float64), from the angle's sine and cosine
    where an op has them already (no second sin/cos of the angles)."""
    if weighting == "snr_trunc":
        return torch.maximum(cos_phi.square(), sin_phi.square()).mul_(scale)
    if weighting == "snr+1":
        return torch.full_like(sin_phi, scale)  # weight 1
    if weighting == "const":
        return sin_phi.square().mul_(scale)
    raise ValueError(f"weighting={weighting!r} is not valid; expected one of {WEIGHTINGS}")


def row_weight64(phi: torch.Tensor, weighting: str, n_per_sample: int,
                 factor: torch.Tensor | None = None) -> torch.Tensor:
    """``factor_b · weight_b / (B * n_per_sample)`` in float64, ``(B,)``; ``factor``:
    optional float64 ``(B,)`` per-example factors. Ops stack it with their other per-sample
    coefficients and round them all to float32 at once."""
    weight = loss_weight(phi, weighting)
    if factor is not None:
        weight = weight * factor
    return weight / (phi.shape[0] * n_per_sample)


def row_scale(phi: torch.Tensor, weighting: str, n_per_sample: int,
              factor: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`row_weight64` handed over as a contiguous float32 ``(B,)``."""
    return row_weight64(phi, weighting, n_per_sample, factor).to(torch.float32).contiguous()


# ---------------------------------------------------------------- torch versions
def metric_torch_(d: torch.Tensor, metric: str, huber_c: float) -> torch.Tensor:
    """Per-element metric of ``d`` (float32); may overwrite ``d``."""
    if metric == "l2":
        return d.square_()
    if metric == "l1":
        return d.abs_()
    sq = d.square_()
    return sq / (sq + huber_c * huber_c).sqrt_().add_(huber_c)


def metric_grad_torch_(d: torch.Tensor, metric: str, huber_c: float) -> torch.Tensor:
    """Derivative of the per-element metric at ``d`` (float32); may overwrite ``d``."""
    if metric == "l2":
        return d.mul_(2.0)
    if metric == "l1":
        return d.sign_()
    return d / (d.square() + huber_c * huber_c).sqrt_()


def weighted_sum(per_sample: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``sum_b scale_b per_sample_b`` as a float32 scalar, the sum over rows taken in float64
    (overwrites ``per_sample``). The products are float32, as the Triton kernels' partial
    sums are; a float32 dot over the rows instead loses ~1e-5 relative at 70,001 rows (a
    BLAS/cuBLAS dot accumulates serially in float32)."""
    return per_sample.mul_(scale).sum(dtype=torch.float64).to(torch.float32)


def loss_torch(d: torch.Tensor, scale: torch.Tensor, metric: str, huber_c: float):
    """``sum_b scale_b sum_i metric(d_bi)`` (float32 scalar); may overwrite ``d``."""
    per_sample = metric_torch_(d, metric, huber_c).reshape(d.shape[0], -1).sum(dim=1)
    return weighted_sum(per_sample, scale)


def loss_and_grad_torch(d: torch.Tensor, scale: torch.Tensor, metric: str, huber_c: float,
                        dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over ``d``: the loss of :func:`loss_torch` and its gradient wrt ``d`` (that
    of :func:`loss_grad_torch` with ``gscale = scale``), in ``dtype``; overwrites ``d``.
    The gradient is formed before ``d`` is overwritten; pseudo-Huber shares its root."""
    col = scale.view((-1,) + (1,) * (d.dim() - 1))
    if metric == "l2":
        grad = d * (2.0 * col)
        value = d.square_()
    elif metric == "l1":
        grad = d.sign() * col
        value = d.abs_()
    else:
        root = (d * d).add_(huber_c * huber_c).sqrt_()
        grad = d / root * col
        value = d.square_().div_(root.add_(huber_c))
    per_sample = value.reshape(d.shape[0], -1).sum(dim=1)
    return weighted_sum(per_sample, scale), grad if grad.dtype == dtype else grad.to(dtype)


def loss_grad_torch(d: torch.Tensor, gscale: torch.Tensor, metric: str, huber_c: float,
                    dtype: torch.dtype) -> torch.Tensor:
    """``gscale_b metric'(d_bi)`` in ``dtype``; may overwrite ``d``."""
    g = metric_grad_torch_(d, metric, huber_c)
    return g.mul_(gscale.view((-1,) + (1,) * (g.dim() - 1))).to(dtype)


def metric_reference(d: torch.Tensor, metric: str, huber_c: float) -> torch.Tensor:
    """Textbook forms, for the float64 references (tests only)."""
    if metric == "l2":
        return d * d
    if metric == "l1":
        return d.abs()
    return torch.sqrt(d * d + huber_c * huber_c) - huber_c


# ---------------------------------------------------------------- Triton versions
if triton is not None:

    @triton.jit
    def metric_value(d, METRIC: tl.constexpr, HUBER_C: tl.constexpr):
        if METRIC == 0:  # l2
            out = d * d
        elif METRIC == 1:  # l1
            out = tl.abs(d)
        else:  # pseudo_huber, cancellation-free form
            sq = d * d
            out = sq / (tl.sqrt(sq + HUBER_C * HUBER_C) + HUBER_C)
        return out

    @triton.jit
    def metric_grad(d, METRIC: tl.constexpr, HUBER_C: tl.constexpr):
        if METRIC == 0:  # l2
            out = 2.0 * d
        elif METRIC == 1:  # l1
            out = tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, 0.0))
        else:  # pseudo_huber
            out = d / tl.sqrt(d * d + HUBER_C * HUBER_C)
        return out

    @triton.jit
    def store_loss_partial(partial_ptr, row, d, mask, scale,
                           METRIC: tl.constexpr, HUBER_C: tl.constexpr):
        """``partial[row, block] = scale * sum(metric(d))`` over this program's block (grid
        ``(blocks of one sample, samples)``; one partial per program, no atomics)."""
        m = tl.where(mask, metric_value(d, METRIC, HUBER_C), 0.0)
        slot = row.to(tl.int64) * tl.num_programs(0) + tl.program_id(0)
        tl.store(partial_ptr + slot, scale * tl.sum(m, axis=0))

    @triton.jit
    def store_loss_grad(grad_ptr, offs, mask, d, gscale,
                        METRIC: tl.constexpr, HUBER_C: tl.constexpr):
        """``grad = gscale * metric'(d)`` for this program's block, in the grad's dtype."""
        g = gscale * metric_grad(d, METRIC, HUBER_C)
        tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
