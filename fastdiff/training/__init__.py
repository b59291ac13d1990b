"""fastdiff.training: the one runner every method uses, its parts, and teacher training."""

from fastdiff.training.parts import (
    EMA,
    LOG_EVERY,
    Progress,
    _unwrap,
    autocast_for,
    check_global_batch,
    linear_lr,
    make_optimizer,
    maybe_compile,
    model_device,
)
from fastdiff.training.runner import (
    History,
    Method,
    NonFiniteError,
    RunConfig,
    RunResult,
    fingerprint_tensors,
    run,
    update_generator,
)
from fastdiff.training.teacher import train_teacher

__all__ = ["EMA", "LOG_EVERY", "Progress", "_unwrap", "autocast_for", "check_global_batch",
           "linear_lr", "make_optimizer", "maybe_compile", "model_device",
           "History", "Method", "NonFiniteError", "RunConfig", "RunResult",
           "fingerprint_tensors", "run", "update_generator", "train_teacher"]
