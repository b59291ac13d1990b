"""Time-to-quality of a PD round: the plain eager loop against fastdiff's defaults.

    python -m benchmarks.quality [--updates 300] [--batch 128] [--reps 3] [--threads 1]
                                 [--json runs/bench/quality.json]

The figure (issue 14 item 7, DESIGN §5): the training wall time, compile included, until
the EMA student's held-out PD error reaches the value the plain eager loop ends its round
with. Both providers train the same round from the same teacher on the same data
(the demo's digits teacher when it is cached, else the random-init demo U-Net of
``fastdiff.apps.profile``, on digits): teacher 64 -> 32 steps, `updates` updates at
`batch`, the demo's lr 5e-4 decayed linearly to 0, EMA 0.995, clipping 1.0, label dropout
0.1, both measured every `eval_every` updates with the same held-out set
(``fastdiff.methods.pd.HeldOut``, seed 0, 512 examples), outside the training clock.

* ``naive``: ``benchmarks.naive_pd.naive_round`` (the paper's algorithm in plain eager
  float32 PyTorch);
* levers tried on the plain loop (``--reuse R``, ``--compiled-teacher``): teacher-target
  reuse and a frozen, compiled teacher (compile time inside the clock), to see what they
  would give before they are built into the runner;
* ``fastdiff-default``: ``fastdiff.distill_round`` with its defaults (its training clock,
  ``history.eval_times``, is the same: evaluation excluded, compile and any policy
  measurement inside the round included); the setup outside it (fingerprints, the held-out
  targets) is reported as ``overhead_s``.

Runs are interleaved (naive, fastdiff, then fastdiff, naive, ...) in one process; each figure
carries min, median and spread of its time-to-quality over the repeats and the load average
before and after. The speed-up is the ratio of medians; `verdict` says MET only when every
spread is < 1.3 (else "noisy: rerun"), the speed-up is >= 1.5 and the final held-out error
is within 1.10x of the plain loop's.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from benchmarks import common

PROVIDERS = ("naive", "fastdiff-default")
TARGET_SPEEDUP = 1.5
TARGET_ERROR_RATIO = 1.10


def demo_teacher_and_data():
    """(teacher, digits dataset, description): the demo's cached digits teacher when it
    exists (never trained here: that takes minutes), else the random-init demo U-Net."""
    from fastdiff.apps.demo import TeacherRecipe
    from fastdiff.engine.checkpoint import load
    from fastdiff.engine.data import load_dataset
    from fastdiff.eval.metrics import cache_dir

    data = load_dataset("digits", seed=0)
    path = cache_dir() / f"digits-teacher-{TeacherRecipe().key()}"
    if path.exists():
        try:
            teacher = load(path).eval().requires_grad_(False)
            return teacher, data, f"digits teacher ({path.name})"
        except Exception:  # noqa: BLE001 - a half-written cache entry: use the fallback
            pass
    from fastdiff.apps.profile import build_pair

    teacher, _ = build_pair("demo", "cpu")
    return teacher, data, "random-init demo U-Net (apps.profile 'demo')"


def first_time_at(curve: list, reference: float) -> float | None:
    """The training seconds of the first point of `curve` ((updates, seconds, value), in
    order) whose value is <= `reference`; None when none is."""
    for _, seconds, value in curve:
        if value <= reference:
            return seconds
    return None


def figures_from_curves(curves: dict, *, loadavg_before=None, loadavg_after=None) -> dict:
    """{provider: figure} from the held-out curves of interleaved runs, {provider: [curve
    per rep]} with "naive" the reference: rep r of each provider is judged against naive
    rep r's final value. A run that never reaches it counts with its whole training time
    and `reached` False; `error_ratio` is the worst final error over naive's."""
    naive = curves["naive"]
    out = {}
    for provider, runs in curves.items():
        ts, reached, ratios = [], [], []
        for ref_curve, curve in zip(naive, runs):
            reference = ref_curve[-1][2]
            at = first_time_at(curve, reference)
            reached.append(at is not None)
            ts.append(at if at is not None else curve[-1][1])
            ratios.append(curve[-1][2] / reference if reference > 0 else math.inf)
        out[provider] = common.summarise(ts) | {
            "times_s": ts, "loadavg_before": loadavg_before, "loadavg_after": loadavg_after,
            "round_s": common.summarise([c[-1][1] for c in runs]),
            "final_error": [c[-1][2] for c in runs],
            "reached": bool(reached) and all(reached),
            "error_ratio": max(ratios) if ratios else None}
    return out


def verdict(figures: dict, provider: str = "fastdiff-default") -> str:
    """MET / MISSED / noisy: rerun for `provider`'s time-to-quality target on `figures`."""
    naive, fast = figures["naive"], figures[provider]
    speedup = naive["median_s"] / fast["median_s"] if fast["median_s"] else 0.0
    ok = (speedup >= TARGET_SPEEDUP and fast["reached"]
          and (fast["error_ratio"] or math.inf) <= TARGET_ERROR_RATIO)
    return common.verdict({"naive": naive, provider: fast}, ok)


def run_naive(teacher, data, held, *, updates, batch_size, lr, eval_every, student_steps,
              seed=0, reuse: int = 1, compile_teacher: bool = False) -> list:
    """The plain loop's held-out curve; `reuse` and `compile_teacher` (a frozen,
    torch.compile'd copy of the teacher, compiled inside the timed loop) are levers tried
    on it."""
    import copy

    from benchmarks.naive_pd import naive_round

    teacher_fn = None
    if compile_teacher:
        teacher_fn = torch.compile(copy.deepcopy(teacher).eval().requires_grad_(False),
                                   options={"freezing": True})
    _, curve = naive_round(teacher, data.train, data.train_labels,
                           student_steps=student_steps, updates=updates,
                           batch_size=batch_size, lr=lr, eval_every=eval_every, seed=seed,
                           measure=held.mismatch, reuse=reuse, teacher_fn=teacher_fn)
    return curve


def run_fastdiff(teacher, data, *, updates, batch_size, lr, eval_every, student_steps,
                 heldout_size, seed=0, **options) -> tuple[list, dict]:
    from fastdiff.methods.pd import distill_round

    t0 = time.perf_counter()
    result = distill_round(teacher, data, teacher_steps=2 * student_steps, updates=updates,
                           batch_size=batch_size, lr=lr, eval_every=eval_every,
                           heldout_size=heldout_size, progress=False, seed=seed, **options)
    call_s = time.perf_counter() - t0
    h = result.history
    # the policy's measurement runs at the first update, inside the training clock
    curve = list(zip(h.eval_updates, h.eval_times, h.heldout))
    info = {"policy": h.policy, "call_s": call_s,
            "overhead_s": call_s - h.wall_time - h.eval_time, "wall_time": h.wall_time}
    return curve, info


def time_to_quality(teacher, data, *, reps: int = 3, updates: int = 300,
                    batch_size: int = 128, lr: float = 5e-4, eval_every: int = 25,
                    student_steps: int = 32, heldout_size: int = 512, log=print,
                    levers: dict | None = None, **fastdiff_options) -> dict:
    """Interleaved runs: naive, fastdiff-default, then each of `levers` ({name: run_naive
    options, e.g. {"reuse": 4}}), `reps` times; {provider: figure, "runs": [...], ...}."""
    from fastdiff.engine.schedules import CosineSchedule
    from fastdiff.methods.pd import HeldOut

    schedule = getattr(teacher, "schedule", None) or CosineSchedule()
    use_labels = data.num_classes > 0 and getattr(teacher, "num_classes", 0) > 0
    held = HeldOut(teacher, data, student_steps, schedule, size=heldout_size, seed=0,
                   weighting="snr_trunc", device="cpu", use_labels=use_labels)
    common_args = dict(updates=updates, batch_size=batch_size, lr=lr, eval_every=eval_every,
                       student_steps=student_steps)
    levers = dict(levers or {})
    before = common.loadavg()
    curves: dict = {"naive": [], "fastdiff-default": [], **{name: [] for name in levers}}
    runs = []
    for r in range(reps):
        def naive():
            curves["naive"].append(run_naive(teacher, data, held, **common_args))

        def fastdiff():
            curve, info = run_fastdiff(teacher, data, heldout_size=heldout_size,
                                       **common_args, **fastdiff_options)
            curves["fastdiff-default"].append(curve)
            return info

        # naive first on even reps, fastdiff first on odd ones: a drifting load (here it
        # often falls over a run) must not favour whoever runs second
        if r % 2 == 0:
            naive()
            info = fastdiff()
        else:
            info = fastdiff()
            naive()
        for name, options in levers.items():
            curves[name].append(run_naive(teacher, data, held, **common_args, **options))
        runs.append(info | {name: c[-1] for name, c in curves.items()}
                    | {"loadavg": common.loadavg()})
        log(f"rep {r}: " + ", ".join(f"{name} {c[-1][-1][1]:.1f} s -> {c[-1][-1][2]:.5g}"
                                     for name, c in curves.items())
            + f" (load {common.loadavg()})")
    figures = figures_from_curves(curves, loadavg_before=before,
                                  loadavg_after=common.loadavg())
    return figures | {"curves": curves, "runs": runs, "levers": levers,
                      "settings": dict(common_args, reps=reps, heldout_size=heldout_size,
                                       threads=torch.get_num_threads())}


def format_report(result: dict, teacher_name: str) -> str:
    n = result["naive"]
    s = result["settings"]
    names = ["naive", "fastdiff-default", *result.get("levers", {})]
    lines = [f"time-to-quality, {teacher_name}, digits, {s['updates']} updates at batch "
             f"{s['batch_size']}, {s['threads']} thread(s), {s['reps']} interleaved reps; load "
             f"{n['loadavg_before']} -> {n['loadavg_after']}"]
    for name in names:
        fig = result[name]
        lines.append(f"  {name:<26} time-to-quality min {fig['min_s']:.2f} s, median "
                     f"{fig['median_s']:.2f} s, spread {fig['spread']:.2f}; round median "
                     f"{fig['round_s']['median_s']:.2f} s (spread "
                     f"{fig['round_s']['spread']:.2f}); final held-out error "
                     f"{', '.join(f'{e:.5g}' for e in fig['final_error'])}")
    for name in names[1:]:
        f = result[name]
        speedup = n["median_s"] / f["median_s"] if f["median_s"] else float("nan")
        round_speedup = n["round_s"]["median_s"] / f["round_s"]["median_s"]
        lines.append(f"  {name}: time-to-quality {speedup:.2f}x naive, whole round "
                     f"{round_speedup:.2f}x (medians); final error {f['error_ratio']:.3f}x "
                     f"naive's; naive's final error reached: {f['reached']}; target (>= "
                     f"{TARGET_SPEEDUP}x, error <= {TARGET_ERROR_RATIO}x): "
                     f"{verdict(result, name)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=int, default=300)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    p.add_argument("--reuse", type=int, action="append", default=[],
                   help="also the plain loop with teacher-target reuse R (repeatable)")
    p.add_argument("--compiled-teacher", action="store_true",
                   help="also the plain loop with a frozen torch.compile'd teacher")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher, data, name = demo_teacher_and_data()
    levers = {f"naive+reuse{r}": {"reuse": r} for r in args.reuse}
    if args.compiled_teacher:
        levers["naive+frozen-compiled-teacher"] = {"compile_teacher": True}
        for r in args.reuse:
            levers[f"naive+compiled-teacher+reuse{r}"] = {"compile_teacher": True, "reuse": r}
    result = time_to_quality(teacher, data, reps=args.reps, updates=args.updates,
                             batch_size=args.batch, eval_every=args.eval_every, levers=levers)
    result["teacher"] = name
    print(format_report(result, name))
    if args.json:
        common.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
