"""Samplers: from noise z₁ to data x₀ with a v-prediction model.

Every sampler walks a decreasing time grid 1 = t₀ > t₁ > … > t_N = 0 and calls the model
once per step (twice for Heun, ×2 batch for classifier-free guidance). The DDIM step is the
rotation `fastdiff.kernels.ddim_step`, written once there; the fixed-grid loops are in
`fastdiff.engine.steppers`, the grids in `fastdiff.engine.grids`.

    sample(model, noise, steps, *, sampler="ddim", schedule=None, cond=None,
           guidance=None, generator=None, compile=None, repeat=None) -> x

The network runs eagerly or compiled and frozen (`fastdiff.engine.inference`), by a rule
that compiles once it pays (see `sample`).

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
from fastdiff.engine.inference import use_compiled
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






def network_calls(sampler: str, steps: int) -> int:
    """Network calls per sample (a guided call counts once) that `sample` expects of `sampler`
    over `steps` steps, for the compile rule: Heun takes two per step but a plain DDIM step
    from t = 1 and to t = 0; the others one per step."""
    return max(2 * steps - 2, 1) if sampler == "heun" else steps


def sample(model: Callable, noise: torch.Tensor, steps: int, *, sampler: str = "ddim",
           schedule: Schedule | None = None, cond: dict | None = None, guidance=None,
           generator: torch.Generator | None = None, spacing: str = "uniform_t",
           return_nfe: bool = False, compile: bool | None = None, repeat: int | None = None,
           **options):
    """Draw samples x₀ of `noise`'s shape from z₁ = `noise` in `steps` steps.

    model: v-prediction model `model(z, t, **cond)`; noise: float (B, ...), the state at t = 1;
    cond: conditioning keywords (e.g. {"y": labels (B,) int64}); guidance: classifier-free
    guidance weight w (float or (B,) tensor; None = off); generator: the RNG for stochastic
    samplers (same generator state → same samples). Returns x (B, ...) in noise's dtype, and
    with `return_nfe=True` the pair (x, number of network evaluations per sample; a guided
    pass counts as 2).

    compile: run the network as `fastdiff.engine.inference.frozen(model, eval=False)`
    (torch.compile with Inductor weight freezing; CUDA graphs on CUDA), True / False to force;
    None (default) decides by the rule of `fastdiff.engine.inference.use_compiled`: compile
    an nn.Module once the calls expected of it, times its measured seconds per call, would
    save more than a compile costs. repeat: how many times the caller will make this same
    call (same model and shapes: an FID evaluation's batches, a demo's draws); None: judged
    from the model's calls so far. The compiled graph is cached per model and rebuilt when
    its weights change; the model's train/eval mode is left as it is. What was decided:
    `fastdiff.engine.inference.usage(model)["decision"]`. The compiled samples equal the
    eager ones to float32 rounding (about 1e-6 relative RMS).

    The loop runs under torch.inference_mode; x is returned as an ordinary tensor (usable in
    autograd and in-place).
    """
    if not torch.is_tensor(noise) or not noise.is_floating_point():
        raise TypeError("noise must be a floating tensor of shape (B, ...)")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    if compile is not None and not isinstance(compile, bool):
        raise TypeError(f"compile must be True, False or None (decide), got {compile!r}")
    if repeat is not None and (isinstance(repeat, bool) or not isinstance(repeat, int)
                               or repeat < 1):
        raise ValueError(f"repeat must be a positive integer or None, got {repeat!r}")
    schedule = schedule or getattr(model, "schedule", None) or CosineSchedule()
    passes = 1 if guidance is None else 2
    with torch.inference_mode():
        # inputs as inference tensors, like every z after the first step: a compiled graph
        # is guarded on that (a normal tensor at step 1 would cost a second compile)
        noise = noise.clone()
        cond = {k: v.clone() if torch.is_tensor(v) else v for k, v in (cond or {}).items()}
        net = use_compiled(model, compile=compile, device=noise.device,
                           batch=noise.shape[0] * passes,
                           calls=network_calls(sampler, steps) if isinstance(steps, int) else 1,
                           repeat=repeat)
        f = guided_model(checked_output(net), cond, guidance)
        with phase("sample"):
            if sampler in ("dpmpp_2m", "dpmpp_3m"):
                x, nfe = dpmpp_sample(f, noise, steps, order=int(sampler[-2]),
                                      schedule=schedule, spacing=spacing, **options)
            elif sampler == "stochastic":
                x, nfe = steppers.stochastic_sample(f, noise, steps, schedule=schedule,
                                                    generator=generator)
            else:
                grid = time_grid(steps, schedule, spacing=spacing, **options)
                step = {"ddim": steppers.ddim, "ddpm": steppers.ddpm, "euler": steppers.euler,
                        "heun": steppers.heun}[sampler]
                x, nfe = step(f, noise, grid, schedule, generator)
    # outside inference mode a copy is an ordinary tensor (an inference tensor could not be
    # saved for a backward pass or updated in place by the caller); one copy of x
    x = x.clone()
    return (x, nfe * passes) if return_nfe else x
