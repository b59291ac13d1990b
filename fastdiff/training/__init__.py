"""fastdiff.training: the machinery every method trains with, and teacher training."""

from fastdiff.training.loop import (
    EMA,
    LOG_EVERY,
    Progress,
    TeacherHistory,
    _unwrap,
    autocast_for,
    check_global_batch,
    flush_losses,
    linear_lr,
    make_optimizer,
    maybe_compile,
    model_device,
    optimizer_update,
    teacher_loss,
    train_teacher,
)

__all__ = ["EMA", "LOG_EVERY", "Progress", "TeacherHistory", "_unwrap", "autocast_for",
           "check_global_batch", "flush_losses", "linear_lr", "make_optimizer", "maybe_compile",
           "model_device", "optimizer_update", "teacher_loss", "train_teacher"]
