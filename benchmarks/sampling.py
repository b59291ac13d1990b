"""Few-step sampling speed: `fastdiff.sample` with its defaults against the loops a user would
otherwise run, steady state, interleaved in one process (benchmarks.common.interleaved).

    python -m benchmarks.sampling [--quick] [--threads 1] [--batch 512] [--steps 4]
                                  [--reps 7] [--announce] [--no-demo] [--no-diffusers]
                                  [--json F]

1. The demo U-Net (the cached digits teacher when there is one, else the random-init demo
   U-Net of apps.profile), class-conditional, `steps` DDIM steps at `batch`:
   - "fastdiff.sample": `sample(model, noise, steps, cond={"y": y})`, defaults only. Its
     warm-up (untimed) repeats that call until the default rule has compiled the model
     (`fastdiff.engine.inference`: after about COMPILE_SECONDS / (1 - 1/SPEEDUP) seconds of
     eager sampling, the ski-rental rule), then one more call; the calls, eager seconds and
     first-compiled-call seconds are reported. `--announce` passes `repeat=1000` instead
     (what an evaluation that knows its call count passes): compiled after one timed call.
   - "plain DDIM loop": the loop a user writes, eager, under torch.no_grad, the cos/sin
     rotation in torch (v-prediction, cosine schedule, uniform t).
   Samples: rel RMS of the steady-state samples against `sample(..., compile=False)`
   (float32 eager) and against the plain loop.
2. diffusers (skipped without it, or with --no-diffusers): the demo U-Net is not a diffusers
   model and `export_diffusers` takes only a DiffusersTeacher, so a tiny random-init
   UNet2DModel of about the demo's size (32/64 channels, 8x8, attention at 4x4, v-prediction,
   T = 1000) is wrapped with `from_diffusers`, exported with `export_diffusers(steps=steps)`
   and loaded as `DDIMPipeline`; timed: "fastdiff.sample" (defaults, warmed up as above) of
   the wrapped model against "DDIMPipeline" (`pipe(batch_size, generator, steps,
   output_type="pt")`, eager as diffusers runs it), on the same noise; samples compared after
   the pipeline's own post-processing ((x / 2 + 0.5).clamp(0, 1)).

Each provider is called once more before timing (warm-up, untimed), then A B A B ... for
`reps` rounds, one call per timing; min / median / spread and the load average before and
after are reported, and a target is judged only when every spread is < 1.3
(benchmarks.common.verdict). Target (issue 14 item 5): fastdiff.sample >= 1.5x the plain
loop, samples within 2e-2 rel RMS of float32.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import common

TARGET = 1.5
REL_TOL = 2e-2


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def plain_ddim(model, noise: torch.Tensor, steps: int, **cond) -> torch.Tensor:
    """DDIM on the cosine schedule (φ = πt/2) with uniform t, written the way a user would:
    eager, torch.no_grad, x̂ and ε̂ from v̂, then z_s = α_s x̂ + σ_s ε̂ (cos / sin in torch)."""
    z = noise
    b = noise.shape[0]
    ts = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            phi_t, phi_s = ts[i] * math.pi / 2, ts[i + 1] * math.pi / 2
            v = model(z, ts[i].expand(b), **cond)
            x = torch.cos(phi_t) * z - torch.sin(phi_t) * v
            eps = torch.sin(phi_t) * z + torch.cos(phi_t) * v
            z = torch.cos(phi_s) * x + torch.sin(phi_s) * eps
    return z


def warm_defaults(call, model, *, max_s: float, log=print) -> dict:
    """Repeat `call()` (a `fastdiff.sample` with defaults on `model`) until the default rule
    has compiled `model` and one compiled call has run; returns what it took."""
    from fastdiff.engine import inference

    t0 = time.perf_counter()
    runs = 0
    while True:
        call()
        runs += 1
        u = inference.usage(model)
        decision = u.get("decision", {}).get("reason", "")   # the one that chose
        if u.get("compiled") or time.perf_counter() - t0 > max_s:
            break
        if runs % 10 == 0:
            log(f"    warm-up: {runs} eager runs, {u['eager_s']:.0f} s eager so far")
    eager_runs_s = time.perf_counter() - t0
    call()                       # the first call that runs compiled from its first step
    net = inference.frozen(model, eval=False)
    info = net.info
    u = inference.usage(model)
    return {"runs_until_compiled": runs, "eager_calls": u.get("calls", 0),
            "eager_s": u.get("eager_s", 0.0), "warmup_wall_s": time.perf_counter() - t0,
            "wall_until_decision_s": eager_runs_s, "compiled": bool(u.get("compiled")),
            "first_compiled_call_s": info.get("first_call_s"), "state": info.get("state"),
            "decision": decision}


def _fig_line(name: str, f: dict) -> str:
    return (f"  {name:<22} min {f['min_s'] * 1e3:9.1f} ms  median {f['median_s'] * 1e3:9.1f} ms"
            f"  spread {f['spread']:.2f}  reps {f['reps']}"
            + ("" if common.trusted(f) else "  NOISY"))


def _model():
    from benchmarks.quality import demo_teacher_and_data

    teacher, _, desc = demo_teacher_and_data()
    return teacher.eval().requires_grad_(False), desc


def demo_part(args, log=print) -> dict:
    from fastdiff import sample

    model, desc = _model()
    size = model._kwargs["image_size"]
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(args.batch, model.in_channels, size, size, generator=g)
    y = torch.arange(args.batch) % 10
    extra = {"repeat": 1000} if args.announce else {}
    name = "fastdiff.sample" + (" (repeat=1000)" if args.announce else "")
    log(f"1. {desc}, {args.steps} steps, batch {args.batch}; {name} warming up "
        f"(load {common.loadavg()})")

    def fast():
        return sample(model, noise, args.steps, cond={"y": y}, **extra)

    def plain():
        return plain_ddim(model, noise, args.steps, y=y)

    reference = sample(model, noise, args.steps, cond={"y": y}, compile=False)
    warm = warm_defaults(fast, model, max_s=args.max_warmup_s, log=log)
    log(f"   warm-up: {warm['runs_until_compiled']} runs ({warm['eager_calls']} eager network "
        f"calls, {warm['eager_s']:.1f} s eager) until compiled; first compiled call "
        f"{warm['first_compiled_call_s'] or float('nan'):.1f} s; state {warm['state']}")
    log(f"   decision: {warm['decision']}")
    x_fast, x_plain = fast(), plain()
    rel_f32 = rel_rms(x_fast, reference)
    rel_plain = rel_rms(x_fast, x_plain)
    figs = common.interleaved({name: fast, "plain DDIM loop": plain}, reps=args.reps,
                              warmup=1)
    ratio = figs["plain DDIM loop"]["median_s"] / figs[name]["median_s"]
    f0 = figs[name]
    log(f"   interleaved, {torch.get_num_threads()} thread(s), load {f0['loadavg_before']} -> "
        f"{f0['loadavg_after']}:")
    for n, f in figs.items():
        log(_fig_line(n, f))
    ok = ratio >= TARGET and rel_f32 <= REL_TOL
    log(f"   {name} / plain loop: {ratio:.2f}x (min-based "
        f"{figs['plain DDIM loop']['min_s'] / f0['min_s']:.2f}x); rel RMS vs float32 eager "
        f"{rel_f32:.1e}, vs the plain loop {rel_plain:.1e}; target >= {TARGET}x within "
        f"{REL_TOL:g}: {common.verdict(figs, ok)}")
    return {"model": desc, "warmup": warm, "figures": figs, "speedup_median": ratio,
            "rel_rms_vs_fp32_eager": rel_f32, "rel_rms_vs_plain": rel_plain,
            "verdict": common.verdict(figs, ok)}


def tiny_diffusers_unet():
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64),
        layers_per_block=2, norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000,
                                        prediction_type="v_prediction")
    return unet.eval().requires_grad_(False), scheduler


def diffusers_part(args, log=print) -> dict:
    import diffusers

    from fastdiff import sample
    from fastdiff.integrations.diffusers import export_diffusers, from_diffusers

    unet, scheduler = tiny_diffusers_unet()
    student = from_diffusers(unet, scheduler).eval().requires_grad_(False)
    folder = Path(tempfile.mkdtemp(prefix="fastdiff-bench-")) / "student"
    export_diffusers(student, folder, steps=args.steps)
    pipe = diffusers.DDIMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.eval().requires_grad_(False)
    n_params = sum(p.numel() for p in unet.parameters())
    extra = {"repeat": 1000} if args.announce else {}
    name = "fastdiff.sample" + (" (repeat=1000)" if args.announce else "")
    log(f"2. tiny random-init diffusers UNet2DModel ({n_params:,} parameters; the demo U-Net "
        f"cannot be exported to diffusers), exported with export_diffusers, {args.steps} "
        f"steps, batch {args.batch}")
    shape = (args.batch, 1, 8, 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(5))

    def fast():
        return sample(student, noise, args.steps, **extra)

    def pipeline():
        # DDIMPipeline draws its noise with randn_tensor from the generator: the same draw
        out = pipe(batch_size=args.batch, generator=torch.Generator().manual_seed(5),
                   num_inference_steps=args.steps, output_type="pt")
        return out.images

    reference = sample(student, noise, args.steps, compile=False)
    warm = warm_defaults(fast, student, max_s=args.max_warmup_s, log=log)
    log(f"   warm-up: {warm['runs_until_compiled']} runs ({warm['eager_calls']} eager network "
        f"calls) until compiled; first compiled call "
        f"{warm['first_compiled_call_s'] or float('nan'):.1f} s; state {warm['state']}")
    log(f"   decision: {warm['decision']}")
    x_fast = fast()
    post = (x_fast / 2 + 0.5).clamp(0, 1)
    images = pipeline()
    rel_f32 = rel_rms(x_fast, reference)
    rel_pipe = rel_rms(post, images)
    figs = common.interleaved({name: fast, "DDIMPipeline": pipeline}, reps=args.reps,
                              warmup=1)
    ratio = figs["DDIMPipeline"]["median_s"] / figs[name]["median_s"]
    f0 = figs[name]
    log(f"   interleaved, {torch.get_num_threads()} thread(s), load {f0['loadavg_before']} -> "
        f"{f0['loadavg_after']}:")
    for n, f in figs.items():
        log(_fig_line(n, f))
    log(f"   {name} / DDIMPipeline: {ratio:.2f}x (min-based "
        f"{figs['DDIMPipeline']['min_s'] / f0['min_s']:.2f}x); rel RMS vs float32 eager "
        f"{rel_f32:.1e}; vs the pipeline's images (both post-processed) {rel_pipe:.1e}"
        f"{'' if all(common.trusted(f) for f in figs.values()) else '  (noisy: rerun)'}")
    return {"parameters": n_params, "warmup": warm, "figures": figs, "speedup_median": ratio,
            "rel_rms_vs_fp32_eager": rel_f32, "rel_rms_vs_pipeline": rel_pipe,
            "trusted": all(common.trusted(f) for f in figs.values())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sampling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="batch 128, 3 reps, --announce (a smoke run, not the target figure)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--announce", action="store_true",
                   help="pass repeat=1000 to fastdiff.sample (compile after one timed call)")
    p.add_argument("--max-warmup-s", type=float, default=900.0,
                   help="give up waiting for the default rule to compile after this long")
    p.add_argument("--no-diffusers", action="store_true", help="skip part 2")
    p.add_argument("--no-demo", action="store_true", help="skip part 1")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.reps, args.announce = 128, 3, True
    torch.set_num_threads(args.threads)
    out: dict = {"device": common.device_name(), "threads": torch.get_num_threads(),
                 "batch": args.batch, "steps": args.steps, "torch": torch.__version__,
                 "command": " ".join(["python -m benchmarks.sampling", *(argv or sys.argv[1:])])}
    print(f"{out['device']}; torch {torch.__version__}; {out['threads']} thread(s); "
          f"load {common.loadavg()}")
    if not args.no_demo:
        out["demo"] = demo_part(args)
    if not args.no_diffusers:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            print("2. diffusers is not installed: DDIMPipeline comparison skipped")
        else:
            out["diffusers"] = diffusers_part(args)
    if args.json:
        common.write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
