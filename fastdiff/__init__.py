"""fastdiff: distil slow diffusion models into few-step samplers.

Public API (names and argument order are a promise, DESIGN.md §4b)::

    from fastdiff import (CosineSchedule, sample, train_teacher, distill_round,
                          progressive_distill, save, load)

Everything else a user needs is importable from here too; the layers underneath
(DESIGN.md §3) are `fastdiff.kernels` (fused ops), `fastdiff.engine` (schedules, grids,
samplers, solvers, models, data, checkpoints, parallel primitives, NVTX),
`fastdiff.training` (the runner), `fastdiff.methods` (pd, guided, sfd), `fastdiff.eval`,
`fastdiff.integrations` and `fastdiff.apps` (CLI, demos).
"""

__version__ = "0.1.0"

from fastdiff.engine.checkpoint import CheckpointError, load, save
from fastdiff.engine.data import DataError, Dataset, as_dataset, load_dataset
from fastdiff.engine.grids import sfd_grid, time_grid
from fastdiff.engine.inference import frozen
from fastdiff.engine.models import MLP, UNet, add_scalar_condition, as_v_model
from fastdiff.engine.samplers import SAMPLERS, sample
from fastdiff.engine.schedules import CosineSchedule, LinearLogSNRSchedule
from fastdiff.engine.solvers import dpmpp_sample, solve_interval
from fastdiff.eval.metrics import DigitsFID, energy_distance, sliced_wasserstein
from fastdiff.integrations.diffusers import (
    export_diffusers,
    from_diffusers,
    load_diffusers_teacher,
)
from fastdiff.methods.guided import (
    distill_guidance,
    distill_guided_steps,
    distill_stochastic,
    guidance_error,
)
from fastdiff.methods.pd import distill_round, progressive_distill
from fastdiff.methods.sfd import distill_sfd, sample_sfd
from fastdiff.methods.sfd import stage2 as distill_sfd_stage2
from fastdiff.training import train_teacher

__all__ = [
    "CosineSchedule",
    "LinearLogSNRSchedule",
    "sample",
    "frozen",
    "train_teacher",
    "distill_round",
    "progressive_distill",
    "save",
    "load",
    "CheckpointError",
    "DataError",
    "Dataset",
    "as_dataset",
    "load_dataset",
    "time_grid",
    "sfd_grid",
    "SAMPLERS",
    "dpmpp_sample",
    "solve_interval",
    "UNet",
    "MLP",
    "add_scalar_condition",
    "as_v_model",
    "distill_guidance",
    "distill_guided_steps",
    "distill_stochastic",
    "guidance_error",
    "distill_sfd",
    "distill_sfd_stage2",
    "sample_sfd",
    "DigitsFID",
    "sliced_wasserstein",
    "energy_distance",
    "from_diffusers",
    "load_diffusers_teacher",
    "export_diffusers",
]
