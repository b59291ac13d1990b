"""Teacher training on the runner: continuous t ~ U(0, 1), v-prediction, v-MSE.

    x, c ~ data;  t ~ U(0, 1);  ε ~ N(0, I);  z_t = α_t x + σ_t ε;  v = α_t ε − σ_t x
    L = mean (v̂_θ(z_t, t, c) − v)²          (the "snr+1" weighting of the PD paper)

with c replaced by the null label −1 with probability `label_dropout`, so that the model
also learns the unconditional v̂ for classifier-free guidance. A data set with per-example
condition tensors (`Dataset.train_conds`, e.g. prompt embeddings for a diffusers
UNet2DConditionModel) passes them as model keywords instead, a dropped example getting the
data set's null condition (`Dataset.null_conds`, e.g. the negative prompt's embedding).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fastdiff.engine.data import as_dataset
from fastdiff.engine.schedules import CosineSchedule, Schedule, per_sample
from fastdiff.training.parts import model_device
from fastdiff.training.runner import History, Method, RunConfig, fingerprint_tensors, run

STATE_FILE = "teacher.state"


def teacher_draw(examples: torch.Tensor, labels: torch.Tensor | None, label_dropout: float,
                 conds: dict | None = None, null_conds: dict | None = None):
    """`draw(generator, n)` of one teacher update: example indices, t (float64), ε, labels,
    and `cond` {keyword: (n, ...)}: the rows of `conds` {keyword: (N, ...)} of the drawn
    examples, a dropped one's replaced by `null_conds[keyword]` (...) (zeros if absent).
    The conditions take no random draws of their own (the same stream as without them)."""

    def draw(gen: torch.Generator, n: int) -> dict:
        idx = torch.randint(0, examples.shape[0], (n,), generator=gen)
        t = torch.rand(n, generator=gen, dtype=torch.float64)
        eps = torch.randn((n, *examples.shape[1:]), generator=gen)
        drop = torch.rand(n, generator=gen) < label_dropout
        y = None
        if labels is not None:
            y = torch.where(drop, torch.full_like(labels[idx], -1), labels[idx])
        cond = {}
        for k, table in (conds or {}).items():
            c = table[idx]
            null = (null_conds or {}).get(k)
            null = torch.zeros(c.shape[1:], dtype=c.dtype) if null is None else null
            keep = (~drop).reshape(-1, *([1] * (c.ndim - 1)))
            cond[k] = torch.where(keep, c, null.to(c.dtype).expand_as(c))
        return {"x": examples[idx], "t": t, "eps": eps.to(examples.dtype), "y": y,
                "cond": cond}

    return draw


def teacher_loss(model, batch: dict, schedule: Schedule) -> torch.Tensor:
    """v-MSE of one batch ({"x", "t", "eps", "y", "cond"}: (B, ...), (B,) float64, (B, ...),
    (B,) int64 or None, {keyword: (B, ...)} further model keywords, optional)."""
    x, t, eps, y = batch["x"], batch["t"], batch["eps"], batch["y"]
    a, s = per_sample(schedule.alpha(t), x), per_sample(schedule.sigma(t), x)
    z = a * x + s * eps
    v = a * eps - s * x
    cond = {k: c.to(x.device) for k, c in (batch.get("cond") or {}).items()}
    v_hat = model(z, t.to(torch.float32), **({} if y is None else {"y": y}), **cond)
    return torch.mean((v_hat.float() - v.float()) ** 2)


def train_teacher(model: nn.Module, data, *, updates: int, batch_size: int, lr: float,
                  weight_decay: float = 0.0, ema_decay: float = 0.999, grad_clip: float = 1.0,
                  label_dropout: float = 0.1, schedule: Schedule | None = None,
                  warmup: int = 100, autocast=None, compile: bool = False, policy=None,
                  seed: int = 0,
                  progress: bool = True, device=None, rank: int = 0, world_size: int = 1,
                  wrap_model=None, checkpoint_dir=None, checkpoint_every: int = 500,
                  max_skips: int = 20) -> nn.Module:
    """Train a v-prediction diffusion model on `data`; returns its EMA copy (eval mode).

    Args:
        model: the network `model(z, t, y=labels)` to train (in place).
        data: a tensor (N, ...), an (examples, labels) pair, a `Dataset` or a data set name.
        updates, batch_size, lr: AdamW updates, the global batch, the peak learning rate
            (linear warm-up over `warmup` updates, then linear decay to 0).
        label_dropout: probability of the null label −1 (labels are used when the data has
            them and the model has `num_classes > 0`), or of the null condition for a data
            set with condition tensors (`Dataset.train_conds` / `null_conds`, passed to the
            model as keywords, e.g. `encoder_hidden_states` (B, L, D)).
        checkpoint_dir: write the training state to `checkpoint_dir/teacher.state` every
            `checkpoint_every` updates and at the end; a rerun with the same settings and
            data resumes from it bit-exactly, one with others is refused.
        rank, world_size, wrap_model: data parallelism (batch_size is the global batch;
            `wrap_model`, e.g. `fastdiff.engine.parallel.ddp_wrapper(device)`).
        max_skips: consecutive non-finite updates (skipped) before `NonFiniteError`.

    The returned model carries `.schedule` and `.train_history` (`runner.History`: loss per
    update, skipped updates, wall time in s, samples/s).
    """
    if not 0.0 <= label_dropout < 1.0:
        raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
    schedule = schedule or getattr(model, "schedule", None) or CosineSchedule()
    dataset = as_dataset(data)
    use_labels = dataset.num_classes > 0 and getattr(model, "num_classes", 0) > 0
    labels = dataset.train_labels if use_labels else None
    conds, nulls = dataset.train_conds, dataset.null_conds
    data_print = fingerprint_tensors(dataset.train, labels)
    if conds:  # the conditions are part of the data (unchanged fingerprint without them)
        data_print = fingerprint_tensors(dataset.train, labels, *conds.values(),
                                         *nulls.values())
    method = Method(
        name="teacher", student=model,
        draw=teacher_draw(dataset.train, labels, label_dropout, conds, nulls),
        loss=lambda m, batch: teacher_loss(m, batch, schedule),
        settings={"label_dropout": label_dropout, "schedule": schedule.config,
                  "model": getattr(model, "config", type(model).__name__),
                  "data": data_print})
    config = RunConfig(
        updates=updates, batch_size=batch_size, lr=lr, warmup=warmup,
        weight_decay=weight_decay, ema_decay=ema_decay, grad_clip=grad_clip, seed=seed,
        checkpoint=Path(checkpoint_dir) / STATE_FILE if checkpoint_dir is not None else None,
        checkpoint_every=checkpoint_every, max_skips=max_skips, autocast=autocast,
        compile=compile, policy=policy, progress=progress, rank=rank, world_size=world_size,
        wrap_student=wrap_model,
        device=torch.device(device) if device is not None else model_device(model))
    result = run(method, config, history=History())
    out = result.student
    out.schedule = schedule
    out.train_history = result.history
    return out
