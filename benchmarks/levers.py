"""Which levers can speed up a PD round here: the teacher forward's variants, the student
step, and sampling, each timed interleaved in one process (benchmarks.common.interleaved).

    python -m benchmarks.levers [--threads 1] [--batch 128] [--sample-batch 512]
                                [--model digits|demo] [--no-compile] [--json F]

1. teacher forward at `batch`: eager fp32 under no_grad, bf16 autocast, inference_mode,
   channels_last, and torch.compile with Inductor weight freezing (first call = compile
   time, reported); all providers interleaved after that;
2. the student's training step at `batch` (forward, backward, fused AdamW) in fp32, the
   other term of an update (about 2 teacher forwards + 1 student step);
3. sampling a 4-step model (the same network) at `sample_batch`: ``fastdiff.sample``
   against a plain eager DDIM loop, samples compared (relative RMS);
4. what each lever would give a PD update, projected from (1) and (2) by
   update = 2 x teacher + student step (a projection, labelled as one).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from benchmarks import common


def _model(name: str):
    if name == "digits":
        from benchmarks.quality import demo_teacher_and_data

        teacher, _, desc = demo_teacher_and_data()
        return teacher, desc
    from fastdiff.apps.profile import build_pair

    teacher, _ = build_pair("demo", "cpu")
    return teacher, "random-init demo U-Net (apps.profile 'demo', 32 channels)"


def _inputs(teacher, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = teacher._kwargs["image_size"]
    z = torch.randn(batch, teacher.in_channels, size, size, generator=g)
    t = torch.randint(1, 33, (batch,), generator=g).float() / 32
    y = torch.randint(0, 10, (batch,), generator=g)
    return z, t, y


def teacher_variants(teacher, batch: int, compile_: bool, log=print) -> tuple[dict, dict]:
    """{name: fn} for the teacher forward variants and {name: info} (compile time)."""
    import copy

    z, t, y = _inputs(teacher, batch)
    teacher = teacher.eval().requires_grad_(False)
    cl = copy.deepcopy(teacher).to(memory_format=torch.channels_last)
    z_cl = z.contiguous(memory_format=torch.channels_last)

    def eager():
        with torch.no_grad():
            return teacher(z, t, y=y)

    def bf16():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return teacher(z, t, y=y)

    def inference():
        with torch.inference_mode():
            return teacher(z, t, y=y)

    def channels_last():
        with torch.no_grad():
            return cl(z_cl, t, y=y)

    fns = {"eager fp32 (no_grad)": eager, "bf16 autocast": bf16,
           "inference_mode": inference, "channels_last": channels_last}
    info: dict = {}
    ref = eager()
    for name, fn in fns.items():
        out = fn().float()
        info[name] = {"rel_rms_vs_fp32": float((out - ref).norm() / ref.norm())}
    if compile_:
        frozen = torch.compile(copy.deepcopy(teacher), options={"freezing": True})

        def compiled():
            with torch.no_grad():
                return frozen(z, t, y=y)

        t0 = time.perf_counter()
        out = compiled()
        first = time.perf_counter() - t0
        log(f"torch.compile (freezing) first call: {first:.1f} s")
        fns["compile+freezing fp32"] = compiled
        info["compile+freezing fp32"] = {"compile_s": first, "rel_rms_vs_fp32": float(
            (out.float() - ref).norm() / ref.norm())}
    return fns, info


def student_step(teacher, batch: int):
    """One student training step (forward, loss, backward, clip, fused AdamW), fp32."""
    import copy

    from fastdiff.training.parts import make_optimizer

    student = copy.deepcopy(teacher).train().requires_grad_(True)
    opt = make_optimizer(student, 1e-5)
    z, t, y = _inputs(teacher, batch, seed=1)
    target = torch.randn_like(z)

    def step():
        loss = (student(z, t, y=y) - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0, foreach=True)
        opt.step()

    return step


def plain_ddim(model, noise, steps: int, y):
    """DDIM on the cosine schedule with uniform t, as a user writes it (v-prediction)."""
    z = noise
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    b = noise.shape[0]
    with torch.no_grad():
        for i in range(steps):
            t, s = ts[i], ts[i + 1]
            a_t, s_t = math.cos(math.pi / 2 * t), math.sin(math.pi / 2 * t)
            a_s, s_s = math.cos(math.pi / 2 * s), math.sin(math.pi / 2 * s)
            v = model(z, torch.full((b,), float(t)), y=y)
            x = a_t * z - s_t * v
            eps = s_t * z + a_t * v
            z = a_s * x + s_s * eps
    return z


def sampling(model, batch: int, steps: int = 4):
    from fastdiff import sample

    g = torch.Generator().manual_seed(3)
    size = model._kwargs["image_size"]
    noise = torch.randn(batch, model.in_channels, size, size, generator=g)
    y = torch.arange(batch) % 10
    model = model.eval().requires_grad_(False)

    def fast():
        return sample(model, noise, steps, cond={"y": y})

    def plain():
        return plain_ddim(model, noise, steps, y)

    a, b = fast(), plain()
    rel = float((a - b).norm() / b.norm())
    return {"fastdiff.sample": fast, "plain DDIM loop": plain}, rel


def _fig_line(name: str, f: dict) -> str:
    return (f"  {name:<24} min {f['min_s'] * 1e3:8.2f} ms  median {f['median_s'] * 1e3:8.2f} ms"
            f"  spread {f['spread']:.2f}  reps {f['reps']} x {f['iters']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.levers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--sample-batch", type=int, default=512)
    p.add_argument("--model", choices=("digits", "demo"), default="digits")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher, desc = _model(args.model)
    out: dict = {"model": desc, "threads": torch.get_num_threads(), "batch": args.batch,
                 "device": common.device_name()}
    print(f"{desc}; {out['device']}; {out['threads']} thread(s); load {common.loadavg()}")

    fns, info = teacher_variants(teacher, args.batch, not args.no_compile)
    fns["student step fp32"] = student_step(teacher, args.batch)
    figs = common.interleaved(fns, reps=args.reps, target_s=0.2, warmup=2)
    base = figs["eager fp32 (no_grad)"]["median_s"]
    print(f"teacher forward and student step at batch {args.batch} (interleaved; load "
          f"{base and figs['eager fp32 (no_grad)']['loadavg_before']} -> "
          f"{figs['eager fp32 (no_grad)']['loadavg_after']}):")
    for name, f in figs.items():
        extra = info.get(name, {})
        note = f"  {base / f['median_s']:.2f}x eager fp32" if name in info else ""
        note += f", {extra['rel_rms_vs_fp32']:.1e} rel RMS" if "rel_rms_vs_fp32" in extra \
            else ""
        note += f", compile {extra['compile_s']:.1f} s" if "compile_s" in extra else ""
        print(_fig_line(name, f) + note + ("" if common.trusted(f) else "  NOISY"))
    out["teacher_and_student"] = {k: figs[k] | info.get(k, {}) for k in figs}

    sfns, rel = sampling(teacher, args.sample_batch)
    sfigs = common.interleaved(sfns, reps=args.reps, target_s=0.3, warmup=1)
    ratio = sfigs["plain DDIM loop"]["median_s"] / sfigs["fastdiff.sample"]["median_s"]
    print(f"sampling, 4 steps, batch {args.sample_batch} (interleaved; load "
          f"{sfigs['plain DDIM loop']['loadavg_before']} -> "
          f"{sfigs['plain DDIM loop']['loadavg_after']}):")
    for name, f in sfigs.items():
        print(_fig_line(name, f) + ("" if common.trusted(f) else "  NOISY"))
    print(f"  fastdiff.sample / plain: {ratio:.2f}x the plain loop's speed; samples differ by "
          f"{rel:.1e} relative RMS; target >= 1.5x: "
          f"{common.verdict(sfigs, ratio >= 1.5)}")
    out["sampling"] = sfigs | {"speedup": ratio, "rel_rms": rel}

    # projection: update = 2 teacher forwards + one student step
    tf, ss = base, figs["student step fp32"]["median_s"]
    naive = 2 * tf + ss
    proj = {"bf16 teacher": 2 * figs["bf16 autocast"]["median_s"] + ss,
            "inference_mode teacher": 2 * figs["inference_mode"]["median_s"] + ss}
    if "compile+freezing fp32" in figs:
        proj["compiled frozen teacher"] = 2 * figs["compile+freezing fp32"]["median_s"] + ss
    best_t = min(figs[k]["median_s"] for k in info)
    for r in (2, 4):
        proj[f"target reuse x{r} (+ best teacher variant)"] = 2 * best_t / r + ss
    proj["teacher free (bound)"] = ss
    print(f"projected PD update (2 x teacher + student step = {naive * 1e3:.1f} ms eager; a "
          f"projection from the medians above, not a measurement):")
    for k, v in proj.items():
        print(f"  {k:<44} {v * 1e3:7.1f} ms  {naive / v:.2f}x")
    out["projection_update_s"] = proj | {"eager": naive}
    if args.json:
        common.write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
