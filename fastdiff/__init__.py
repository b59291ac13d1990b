"""fastdiff: distil slow diffusion models into few-step samplers.

Public API (names and argument order are a promise, DESIGN.md §4b)::

    from fastdiff import (CosineSchedule, sample, train_teacher, distill_round,
                          progressive_distill, save, load)
"""

__version__ = "0.1.0"

from fastdiff.checkpoint import load, save
from fastdiff.pd import distill_round, progressive_distill
from fastdiff.samplers import sample
from fastdiff.schedules import CosineSchedule, LinearLogSNRSchedule
from fastdiff.training import train_teacher

__all__ = [
    "CosineSchedule",
    "LinearLogSNRSchedule",
    "sample",
    "train_teacher",
    "distill_round",
    "progressive_distill",
    "save",
    "load",
]
