"""Samplers: from noise z₁ to data x₀ with a v-prediction model.

Every sampler walks a decreasing time grid 1 = t₀ > t₁ > … > t_N = 0 and calls the model
once per step (twice for Heun, ×2 batch for classifier-free guidance). The DDIM step is the
rotation `fastdiff.kernels.ddim_step`, written once there; the fixed-grid loops are in
`fastdiff.engine.steppers`, the grids in `fastdiff.engine.grids`.

    sample(model, noise, steps, *, sampler="ddim", schedule=None, cond=None,
           guidance=None, generator=None) -> x

- "ddim": deterministic, exact for a model whose x̂ is constant along the step.
- "ddpm": ancestral sampling (the posterior q(z_s | z_t, x̂)), stochastic.
- "euler": Euler on the probability-flow ODE in φ, dz/dφ = v̂ (first order).
- "heun": Heun's method (EDM's 2nd order) on the ODE in the variance-exploding variables
  (z/α, σ/α), whose first-order step is DDIM; the last step is a plain DDIM step.
- "dpmpp_2m", "dpmpp_3m": DPM-Solver++ multistep (data prediction), in `fastdiff.engine.solvers`.
- "stochastic": the N-step sampler of Meng et al. for distilled models
  (`fastdiff.engine.steppers`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastdiff.engine import steppers
from fastdiff.engine.grids import time_grid
from fastdiff.engine.models import checked_output
from fastdiff.engine.nvtx import phase
from fastdiff.engine.schedules import CosineSchedule, Schedule, per_sample
from fastdiff.engine.solvers import dpmpp_sample

SAMPLERS = ("ddim", "ddpm", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "stochastic")




def guidance_inputs(model, cond: dict | None, guidance, batch: int) -> tuple[dict, object]:
    """How to sample `model` at guidance weight w: `(cond, guidance)` for `sample`.

    A guidance-distilled model (one with the scalar condition "w", `fastdiff.methods.guided`)
    takes w as an input, cond["w"] = w for each of the `batch` examples: one pass per step.
    Any other model gets classifier-free guidance from `sample` (two passes per step).
    guidance None: unchanged.
    """
    cond = dict(cond or {})
    if guidance is not None and "w" in getattr(model, "scalar_conds", ()):
        cond["w"] = torch.full((batch,), float(guidance))
        return cond, None
    return cond, guidance


def guided_model(model: Callable, cond: dict | None, guidance) -> Callable:
    """Return f(z, t) -> v̂ with conditioning bound and classifier-free guidance applied.

    Guidance convention (Meng et al.): v̂^w = (1 + w) v̂(z, c) − w v̂(z, ∅), so w = 0 is the
    plain conditional model. The null condition is the label −1. Both passes run as one
    batch of 2B.
    """
    cond = dict(cond or {})
    if guidance is None:
        return lambda z, t: model(z, t, **cond)
    if "y" not in cond:
        raise ValueError("guidance needs class labels: pass cond={'y': labels}")

    # the doubled conditioning is the same at every step: build it once
    both = {k: torch.cat([v, v]) if torch.is_tensor(v) and v.ndim > 0 else v
            for k, v in cond.items()}
    both["y"] = torch.cat([cond["y"], torch.full_like(cond["y"], -1)])
    w = torch.as_tensor(guidance, dtype=torch.float64)

    def f(z, t):
        out = model(torch.cat([z, z]), torch.cat([t, t]), **both)
        v_c, v_u = out.chunk(2)
        w_z = per_sample(w, z)
        return (1 + w_z) * v_c - w_z * v_u

    return f






@torch.no_grad()
def sample(model: Callable, noise: torch.Tensor, steps: int, *, sampler: str = "ddim",
           schedule: Schedule | None = None, cond: dict | None = None, guidance=None,
           generator: torch.Generator | None = None, spacing: str = "uniform_t",
           return_nfe: bool = False, **options):
    """Draw samples x₀ of `noise`'s shape from z₁ = `noise` in `steps` steps.

    model: v-prediction model `model(z, t, **cond)`; noise: float (B, ...), the state at t = 1;
    cond: conditioning keywords (e.g. {"y": labels (B,) int64}); guidance: classifier-free
    guidance weight w (float or (B,) tensor; None = off); generator: the RNG for stochastic
    samplers (same generator state → same samples). Returns x (B, ...) in noise's dtype, and
    with `return_nfe=True` the pair (x, number of network evaluations per sample; a guided
    pass counts as 2).
    """
    if not torch.is_tensor(noise) or not noise.is_floating_point():
        raise TypeError("noise must be a floating tensor of shape (B, ...)")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    schedule = schedule or getattr(model, "schedule", None) or CosineSchedule()
    f = guided_model(checked_output(model), cond, guidance)
    passes = 1 if guidance is None else 2
    with phase("sample"):
        if sampler in ("dpmpp_2m", "dpmpp_3m"):
            x, nfe = dpmpp_sample(f, noise, steps, order=int(sampler[-2]), schedule=schedule,
                                  spacing=spacing, **options)
        elif sampler == "stochastic":
            x, nfe = steppers.stochastic_sample(f, noise, steps, schedule=schedule,
                                                generator=generator)
        else:
            grid = time_grid(steps, schedule, spacing=spacing, **options)
            step = {"ddim": steppers.ddim, "ddpm": steppers.ddpm, "euler": steppers.euler,
                    "heun": steppers.heun}[sampler]
            x, nfe = step(f, noise, grid, schedule, generator)
    return (x, nfe * passes) if return_nfe else x








