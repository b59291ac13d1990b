"""Fused kernels (Triton on CUDA, torch on CPU) for fastdiff.

Public functions (DESIGN §4); each lives in its own module next to its Triton kernel,
torch implementation, float64 reference and ``torch.library`` custom op (registered and
dispatched by the one helper in ``_register.py``):

* ``ddim_step(z, v, phi_from, phi_to)`` (``ddim_step.py``)
* ``pd_target(z_t, v_1, v_2, phi_t, phi_mid, phi_end)`` (``pd_target.py``)
* ``distill_loss(v_student, v_target, phi_t, weighting="snr_trunc", metric="l2", *,
  huber_c=0.03)`` (``distill_loss.py``)
* ``fused_pd_loss(v_student, z_t, v_1, v_2, phi_t, phi_mid, phi_end,
  weighting="snr_trunc", metric="l2", *, huber_c=0.03)`` (``fused_pd_loss.py``)
* ``guided_distill_loss(v_student, v_cond, v_uncond, w, phi_t, ...)`` (``guided_loss.py``):
  the classifier-free-guided target (1 + w) v_cond − w v_uncond and the loss in one pass
* ``sfd_loss(v_student, z_t, z_target, phi_from, phi_to, metric="l1", ...)``
  (``sfd_loss.py``): the student's DDIM step and the SFD metric in one pass

Backend: ``FASTDIFF_KERNELS=auto|torch|triton``, see :func:`backend_for` in
``dispatch.py``. Valid names: ``WEIGHTINGS``, ``METRICS``.
"""

from ._checks import METRICS, WEIGHTINGS
from .ddim_step import ddim_step
from .dispatch import backend_for
from .distill_loss import distill_loss
from .fused_pd_loss import fused_pd_loss
from .guided_loss import guided_distill_loss
from .pd_target import pd_target
from .sfd_loss import sfd_loss

__all__ = [
    "METRICS",
    "WEIGHTINGS",
    "backend_for",
    "ddim_step",
    "distill_loss",
    "fused_pd_loss",
    "guided_distill_loss",
    "pd_target",
    "sfd_loss",
]
