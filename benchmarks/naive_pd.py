"""The baseline: progressive distillation written the way a user would from the paper.

Salimans & Ho (ICLR 2022), Algorithm 2, in plain eager PyTorch, float32, cosine schedule
(α = cos(π t / 2), σ = sin(π t / 2)), teacher and student predicting v:

    z_t   = α_t x + σ_t ε
    x̂     = α z − σ v̂(z)                                   (v-prediction → x)
    z_t'  = α_t' x̂(z_t)  + (σ_t'/σ_t)   (z_t  − α_t  x̂(z_t))     (DDIM, teacher)
    z_t'' = α_t'' x̂(z_t') + (σ_t''/σ_t') (z_t' − α_t' x̂(z_t'))    (DDIM, teacher)
    x̃     = (z_t'' − (σ_t''/σ_t) z_t) / (α_t'' − (σ_t''/σ_t) α_t)
    L     = mean_b w(λ_t) · mean (x̃ − x̂_θ(z_t))²,   w = max(α²/σ², 1)   (truncated SNR)

Every intermediate is materialised (z_t', z_t'', x̂'s, x̃), the target lives in x-space and
the loss is a plain weighted MSE. DESIGN §2: x̃ − x̂_θ = σ_t (v̂_θ − ṽ), so this loss equals
fastdiff's v-space ``snr_trunc`` loss (weight max(α², σ²)) on the same inputs and weights,
up to the float32 cancellation of the textbook target (tests/test_benchmarks_smoke.py).
"""

from __future__ import annotations

import math

import torch


def _coef(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars (B,) → (B, 1, …, 1) to broadcast against `like`."""
    return a.reshape(-1, *([1] * (like.ndim - 1)))


def alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine schedule in float32: α_t, σ_t for times t (B,) in [0, 1]."""
    t = t.float()
    return torch.cos(math.pi / 2 * t), torch.sin(math.pi / 2 * t)


def noisy(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z_t = α_t x + σ_t ε."""
    a, s = alpha_sigma(t)
    return _coef(a, x) * x + _coef(s, x) * eps


def x_from_v(model, z, t, cond):
    """x̂ = α z − σ v̂(z, t) for a v-prediction model."""
    a, s = alpha_sigma(t)
    return _coef(a, z) * z - _coef(s, z) * model(z, t.float(), **cond)


def ddim(model, z, t, t_next, cond):
    """One DDIM step t → t_next, written as in the paper."""
    x_hat = x_from_v(model, z, t, cond)
    a, s = alpha_sigma(t)
    a_next, s_next = alpha_sigma(t_next)
    return _coef(a_next, z) * x_hat + _coef(s_next / s, z) * (z - _coef(a, z) * x_hat)


def naive_target(teacher, z_t, t, student_steps: int, cond=None):
    """Two teacher DDIM steps from z_t and the x-space target x̃ with its weight
    max(SNR, 1): (x_target, weight), without autograd."""
    cond = cond or {}
    t = t.float()
    t1 = t - 0.5 / student_steps
    t2 = t - 1.0 / student_steps
    with torch.no_grad():
        z1 = ddim(teacher, z_t, t, t1, cond)
        z2 = ddim(teacher, z1, t1, t2, cond)
        a, s = alpha_sigma(t)
        a2, s2 = alpha_sigma(t2)
        ratio = _coef(s2 / s, z_t)
        x_target = (z2 - ratio * z_t) / (_coef(a2, z_t) - ratio * _coef(a, z_t))
        weight = torch.clamp(a**2 / s**2, min=1.0)  # truncated SNR: max(SNR, 1)
    return x_target, weight


def student_loss(student, z_t, t, x_target, weight, cond=None) -> torch.Tensor:
    """The weighted x-space MSE of the student's one step against the target."""
    x_student = x_from_v(student, z_t, t.float(), cond or {})
    per_sample = ((x_target - x_student) ** 2).flatten(1).mean(dim=1)
    return (weight * per_sample).mean()


def naive_pd_loss(student, teacher, z_t, t, student_steps: int, cond=None) -> torch.Tensor:
    """The PD loss of one batch: z_t (B, ...), t (B,) = i / N with N = student_steps."""
    x_target, weight = naive_target(teacher, z_t, t, student_steps, cond)
    return student_loss(student, z_t, t, x_target, weight, cond)


def naive_update(student, teacher, optimizer, z_t, t, student_steps: int, cond=None,
                 grad_clip: float = 1.0, target=None) -> torch.Tensor:
    """One optimizer update: loss, backward, gradient clipping, step. Returns the loss.
    target: a precomputed (x_target, weight) of `naive_target` (the teacher is not run)."""
    if target is None:
        target = naive_target(teacher, z_t, t, student_steps, cond)
    loss = student_loss(student, z_t, t, *target, cond)
    optimizer.zero_grad()
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
    optimizer.step()
    return loss


def naive_round(teacher, examples, labels, *, student_steps: int, updates: int,
                batch_size: int, lr: float, ema_decay: float = 0.995, grad_clip: float = 1.0,
                label_dropout: float = 0.1, seed: int = 0, eval_every: int = 0,
                measure=None, reuse: int = 1, teacher_fn=None):
    """One PD round as a plain eager loop: the student starts as a copy of the teacher,
    AdamW (betas 0.9, 0.99), the LR decayed linearly to 0 over the round (the paper's
    recipe), gradient clipping, an EMA of the weights updated parameter by parameter, every
    batch drawn with torch.randint / torch.randn from one generator (labels dropped to the
    null class -1 with probability `label_dropout`).

    measure: `measure(ema_model) -> float`, taken every `eval_every` updates and at the end,
    outside the training clock. Returns (ema model, curve) with curve a list of
    (updates done, training seconds so far, measured value).

    reuse: teacher-target reuse (issue 14 item 4): a pool of `reuse` batches is drawn with
    their teacher targets, then each is trained on `reuse` times, in a shuffled order, before
    the pool is redrawn: the teacher runs once per `reuse` updates on average.
    teacher_fn: what runs the teacher's forwards (e.g. a compiled copy; default `teacher`,
    whose weights the student starts from either way).
    """
    import copy
    import time

    student = copy.deepcopy(teacher).train().requires_grad_(True)
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: max(0.0, 1.0 - k / updates))
    gen = torch.Generator().manual_seed(seed)
    n = examples.shape[0]
    curve, trained = [], 0.0
    t0 = time.perf_counter()
    pool: list = []
    order: list = []

    def draw():
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        i = torch.randint(1, student_steps + 1, (batch_size,), generator=gen)
        t = i.float() / student_steps
        x = examples[idx]
        z_t = noisy(x, torch.randn(x.shape, generator=gen), t)
        cond = {}
        if labels is not None:
            y = labels[idx].clone()
            y[torch.rand(batch_size, generator=gen) < label_dropout] = -1
            cond = {"y": y}
        return z_t, t, cond

    run_teacher = teacher_fn if teacher_fn is not None else teacher
    for k in range(updates):
        if reuse <= 1:
            z_t, t, cond = draw()
            naive_update(student, run_teacher, opt, z_t, t, student_steps, cond, grad_clip)
        else:
            if not order:
                pool = []
                for _ in range(reuse):
                    z_t, t, cond = draw()
                    pool.append((z_t, t, cond, naive_target(run_teacher, z_t, t,
                                                            student_steps, cond)))
                order = torch.randperm(reuse * reuse, generator=gen).remainder(reuse).tolist()
            z_t, t, cond, target = pool[order.pop()]
            naive_update(student, run_teacher, opt, z_t, t, student_steps, cond, grad_clip,
                         target=target)
        sched.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), student.parameters()):
                p_ema.mul_(ema_decay).add_(p, alpha=1 - ema_decay)
        done = k + 1
        if measure is not None and ((eval_every and done % eval_every == 0)
                                    or done == updates):
            trained += time.perf_counter() - t0
            curve.append((done, trained, float(measure(ema))))
            t0 = time.perf_counter()
    return ema, curve
