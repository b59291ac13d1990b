"""The guided-distillation demo: `fastdiff demo --guided` on class-conditional digits.

Trains (or reloads) stage 1, stage 2 and the stochastic-sampler student of
`fastdiff.methods.guided`, scores every model with FID-digits and class accuracy next to the
two-pass guided teacher, and writes `runs/guided/report.md` with each measure of the method
stated against its target.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from fastdiff.engine.samplers import sample
from fastdiff.engine.schedules import CosineSchedule
from fastdiff.methods.guided import (
    check_w_range,
    distill_guidance,
    distill_guided_steps,
    distill_stochastic,
)
from fastdiff.methods.pd import round_summary

__all__ = ["fid_ratio", "format_score", "run_guided_demo", "score_guided", "w_cond"]


def _grid_batch(per_class: int = 10, seed: int = 4321, num_classes: int = 10):
    """Noise (C·k, 1, 8, 8) and labels 0,0,…,1,1,… so a grid's rows are the digit classes."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return torch.randn(len(labels), 1, 8, 8, generator=g), labels


def _throughput_ratio(student, teacher, noise, labels, steps: int, w: float,
                      repeats: int = 5) -> dict:
    """Samples/s of the one-pass student vs the two-pass guided teacher, same steps and batch,
    timed alternately (median of `repeats`) so that machine load hits both alike."""
    wt = torch.full((len(labels),), float(w))
    t_s, t_t = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sample(student, noise, steps, cond={"y": labels, "w": wt})
        t_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sample(teacher, noise, steps, cond={"y": labels}, guidance=float(w))
        t_t.append(time.perf_counter() - t0)
    med_s, med_t = sorted(t_s)[len(t_s) // 2], sorted(t_t)[len(t_t) // 2]
    n = len(labels)
    return {"student_samples_per_s": n / med_s, "teacher_samples_per_s": n / med_t,
            "ratio": med_t / med_s, "steps": steps, "batch": n, "repeats": repeats,
            "device": str(noise.device)}


def w_cond(y: torch.Tensor, w: float) -> dict:
    """The condition of a w-conditioned student: labels y int64 (B,) and w float32 (B,)."""
    return {"y": y, "w": torch.full((len(y),), float(w))}


def score_guided(model, batches, metric, N: int, w: float, *, guided_teacher: bool = False,
                 stochastic: bool = False) -> tuple[float, float, float]:
    """(FID mean, accuracy mean, FID sd; sd NaN for one draw) of `model` at N steps and
    guidance w over `batches`, a list of (noise float (n, 1, 8, 8), labels int64 (n,)):
    the teacher with two-pass classifier-free guidance (`guided_teacher`), or a w-conditioned
    student, DDIM or the stochastic sampler (`stochastic`; its renoising draws are fixed per
    noise set, seed 99 + k, so every model sees the same). `metric`: a `DigitsFID` (score,
    class_accuracy: the fraction read as the requested digit)."""
    fids, accs = [], []
    for k, (z, y) in enumerate(batches):
        if guided_teacher:
            x = sample(model, z, N, cond={"y": y}, guidance=float(w))
        elif stochastic:
            x = sample(model, z, N, sampler="stochastic", cond=w_cond(y, w),
                       generator=torch.Generator().manual_seed(99 + k))
        else:
            x = sample(model, z, N, cond=w_cond(y, w))
        fids.append(metric.score(x))
        accs.append(metric.class_accuracy(x, y))
    draws = len(batches)
    sd = float(torch.tensor(fids, dtype=torch.float64).std()) if draws > 1 else float("nan")
    return sum(fids) / draws, sum(accs) / draws, sd


def format_score(r) -> str:
    """"mean ± sd" of a `score_guided` triple ("mean" when sd is NaN, "—" for None)."""
    return "—" if r is None else (f"{r[0]:.3f}" if r[2] != r[2] else
                                  f"{r[0]:.3f} ± {r[2]:.3f}")


def fid_ratio(a, b) -> float:
    """FID of score triple `a` over that of `b` (NaN when either is None)."""
    return float("nan") if a is None or b is None else a[0] / b[0]


def run_guided_demo(out="runs/guided", *, ws=(0.0, 1.0, 2.0, 4.0), steps=(1, 2, 4, 8),
                    reference_steps: int = 64, start_steps: int = 16, w_min: float = 0.0,
                    w_max: float = 4.0, stage1_updates: int = 4000, stage1_lr: float = 2e-3,
                    stage1_ema_decay: float = 0.998, updates: int = 400,
                    stochastic_steps=(4,), stochastic_updates: int = 300,
                    batch_size: int = 128, lr: float = 5e-4,
                    n_samples: int | None = None, draws: int = 4, teacher=None,
                    teacher_recipe=None, quick: bool = False, progress: bool = True,
                    log=print) -> Path:
    """Guided distillation on class-conditional digits; writes `out/report.md`.

    teacher: a class-conditional digits model (default: `fastdiff.apps.demo.digits_teacher(recipe=
    teacher_recipe)`, the cached teacher trained with label dropout 0.1). Stage 1
    (`stage1_updates`), then stage 2 from `start_steps` DDIM steps down to 1 (`updates` per
    round), then the stochastic-sampler student for each N in `stochastic_steps`. Every model
    is scored with FID-digits and class accuracy (the FID classifier reads the requested
    digit) on the same noise and labels, for each w in `ws` and N in `steps`, next to the
    two-pass guided teacher (DDIM at the same N and at `reference_steps`). Also written: the
    stage-1 relative error per w, the measured sampling throughput ratio (one pass vs two per
    step), per-class sample grids, `results.json`. Every score is the mean over `draws` fixed
    noise sets of `n_samples` (default: the FID reference size), the FID's standard deviation
    over the draws next to it. Finished stages are kept under
    `out/checkpoints/` and reloaded by a rerun. `quick=True`: a tiny teacher and a few
    updates (seconds to minutes; for tests, numbers meaningless).
    """
    from fastdiff.apps.demo import TeacherRecipe, digits_teacher, eval_batch
    from fastdiff.engine.checkpoint import CheckpointError, load, load_config, save
    from fastdiff.engine.data import load_dataset
    from fastdiff.eval.metrics import DigitsFID
    from fastdiff.eval.report import markdown_table, save_grid, write_text

    if quick:
        teacher_recipe = teacher_recipe or TeacherRecipe(channels=8, num_res_blocks=1,
                                                         updates=60, warmup=10)
        ws, steps, reference_steps, start_steps = (0.0, 2.0), (1, 2), 4, 4
        stage1_updates, updates, stochastic_steps, stochastic_updates = 4, 3, (2,), 3
        batch_size, n_samples, draws = 32, n_samples or 64, 1
    w_min, w_max = check_w_range(w_min, w_max)
    out = Path(out)
    ckpt = out / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    metric = DigitsFID.load(verbose=progress)
    if teacher is None:
        teacher = digits_teacher(cache=(out / "cache") if quick else None,
                                 recipe=teacher_recipe or TeacherRecipe(), progress=progress,
                                 log=log)
    teacher.eval()
    schedule = getattr(teacher, "schedule", None) or CosineSchedule()
    data = load_dataset("digits", seed=0)
    n = n_samples or metric.n_reference
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive integer, got {draws!r}")
    batches = [eval_batch(n, seed=1234 + k) for k in range(draws)]
    noise, labels = batches[0]
    grid_noise, grid_labels = _grid_batch()
    timings = {}

    def score(model, N: int, w: float, *, guided_teacher=False, stochastic=False):
        return score_guided(model, batches, metric, N, w, guided_teacher=guided_teacher,
                            stochastic=stochastic)

    def reuse(path, settings: dict):
        """(model, metadata) of a finished stage at `path` saved with these `settings`, else
        (None, {}); the weights are read only when the settings match."""
        if path.exists():
            try:
                meta = load_config(path).get("metadata", {})
                if meta.get("settings") == json.loads(json.dumps(settings)):
                    m = load(path)
                    m.schedule = schedule
                    return m, meta
            except CheckpointError as e:
                log(f"retraining {path.name}: {e}")
        return None, {}

    # -- the guided teacher (2 passes per step) ------------------------------------------
    t0 = time.perf_counter()
    teacher_res = {}
    for w in ws:
        for N in sorted(set(steps) | {reference_steps}):
            teacher_res[(w, N)] = score(teacher, N, w, guided_teacher=True)
        log(f"teacher w={w:g}: " + ", ".join(f"{N} steps FID {teacher_res[(w, N)][0]:.3f} "
                                             f"acc {teacher_res[(w, N)][1]:.3f}"
                                             for N in sorted(set(steps) | {reference_steps})))
        g = sample(teacher, grid_noise, reference_steps, cond={"y": grid_labels},
                   guidance=float(w))
        save_grid(g, out / f"teacher-{reference_steps}steps-w{w:g}.png", nrow=10)
    timings["teacher_eval"] = time.perf_counter() - t0

    # -- stage 1 -------------------------------------------------------------------------
    settings = {"w_min": w_min, "w_max": w_max, "updates": stage1_updates, "lr": stage1_lr,
                "ema_decay": stage1_ema_decay, "balance_w": True,
                "batch_size": batch_size, "eval_ws": list(ws),
                "teacher": getattr(teacher, "config", None)}
    stage1, meta = reuse(ckpt / "stage1", settings)
    if stage1 is not None:
        s1_hist = meta.get("history", {})
        log("stage 1: reloaded")
    else:
        import shutil

        if ckpt.exists():  # later stages were distilled from another stage-1 model
            shutil.rmtree(ckpt)
        # stage 1's own training state (resumable after a crash) lives beside `ckpt`
        state_dir = out / "stage1-state"
        options = dict(w_min=w_min, w_max=w_max, updates=stage1_updates, batch_size=batch_size,
                       lr=stage1_lr, ema_decay=stage1_ema_decay, eval_ws=ws,
                       progress=progress, checkpoint_dir=state_dir)
        try:
            res = distill_guidance(teacher, data, **options)
        except CheckpointError as e:  # a state of other settings: start over
            log(f"stage 1: not resuming ({e})")
            shutil.rmtree(state_dir)
            res = distill_guidance(teacher, data, **options)
        stage1 = res.student
        s1_hist = asdict(res.history)
        save(stage1, ckpt / "stage1", metadata={"history": s1_hist, "settings": settings})
        shutil.rmtree(state_dir, ignore_errors=True)
    s1_err = {float(k): v for k, v in s1_hist.get("final_error", {}).items()}
    s1_init = {float(k): v for k, v in s1_hist.get("initial_error", {}).items()}
    timings["stage1_train"] = s1_hist.get("wall_time", float("nan"))
    s1_res = {}
    for w in ws:
        s1_res[w] = score(stage1, reference_steps, w)
        log(f"stage 1 w={w:g}: rel. error {s1_err.get(w, float('nan')):.4f}, "
            f"{reference_steps}-step FID {s1_res[w][0]:.3f} acc {s1_res[w][1]:.3f}")

    # -- stage 2 -------------------------------------------------------------------------
    students = {}

    def on_round(result):
        students[result.steps] = result.student
        log(f"stage 2 {round_summary(result)}")

    rounds = distill_guided_steps(stage1, data, w_min=w_min, w_max=w_max,
                                  start_steps=start_steps, end_steps=1, updates=updates,
                                  batch_size=batch_size, lr=lr, checkpoint_dir=ckpt,
                                  progress=progress, on_round=on_round)
    timings["stage2_train"] = sum(r.history.wall_time for r in rounds)

    # -- the stochastic-sampler students (the paper's stage-2 variant) ---------------------
    stoch_students = {}
    t_stoch = 0.0
    for N in stochastic_steps:
        # the paper's variant: distilled from the 2N-step student (the N-step one if absent)
        k = 2 if 2 * N in students else 1
        if N not in students or N < 2:
            continue
        path = ckpt / f"stochastic-{N:05d}"
        wanted = {"teacher_steps": k * N, "updates": stochastic_updates, "lr": lr}
        m, meta = reuse(path, wanted)
        # reloaded: count its original training time, as for stages 1 and 2
        t_stoch += meta.get("history", {}).get("wall_time", 0.0)
        if m is None:
            r = distill_stochastic(students[k * N], data, steps=N, teacher_steps=k * N,
                                   w_min=w_min, w_max=w_max, updates=stochastic_updates,
                                   batch_size=batch_size, lr=lr, progress=progress)
            m = r.student
            t_stoch += r.history.wall_time
            save(m, path, metadata={"steps": N, "settings": wanted,
                                    "history": asdict(r.history)})
        stoch_students[N] = m
    timings["stochastic_train"] = t_stoch

    # -- score the students ------------------------------------------------------------------
    det, sto, sto_t = {}, {}, {}
    grid_n = 4 if 4 in students else max(students)  # the step count of the sample grids
    for w in ws:
        for N in steps:
            if N not in students:
                continue
            det[(w, N)] = score(students[N], N, w)
            if N >= 2:
                sto[(w, N)] = score(students[N], N, w, stochastic=True)
            if N in stoch_students:
                sto_t[(w, N)] = score(stoch_students[N], N, w, stochastic=True)
        gw = torch.full((len(grid_labels),), float(w))
        g = sample(students[grid_n], grid_noise, grid_n, cond={"y": grid_labels, "w": gw})
        save_grid(g, out / f"student-{grid_n}steps-w{w:g}.png", nrow=10)
        g = sample(teacher, grid_noise, grid_n, cond={"y": grid_labels}, guidance=float(w))
        save_grid(g, out / f"teacher-{grid_n}steps-w{w:g}.png", nrow=10)
        if grid_n in stoch_students:
            g = sample(stoch_students[grid_n], grid_noise, grid_n, sampler="stochastic",
                       cond={"y": grid_labels, "w": gw},
                       generator=torch.Generator().manual_seed(99))
            save_grid(g, out / f"stochastic-{grid_n}steps-w{w:g}.png", nrow=10)

    # -- throughput: one pass per step vs two ------------------------------------------------
    N_t = 4 if 4 in students else min(students)
    thr = _throughput_ratio(students[N_t], teacher, noise, labels, N_t, ws[-1],
                            repeats=2 if quick else 5)

    # -- report ---------------------------------------------------------------------------------
    def fa(r):
        return (None, None) if r is None else (r[0], r[1])

    rows = []
    for w in ws:
        for N in steps:
            rows.append([w, N, *fa(teacher_res.get((w, N))), *fa(det.get((w, N))),
                         *fa(sto.get((w, N))), *fa(sto_t.get((w, N)))])
        rows.append([w, f"{reference_steps} (ref.)", *fa(teacher_res[(w, reference_steps)]),
                     *fa(s1_res[w]), None, None, None, None])
    table = markdown_table(
        ["w", "steps", "teacher DDIM FID (2 passes/step)", "teacher acc",
         "student DDIM FID", "student acc", "student stochastic FID", "acc",
         "stochastic-trained student FID", "acc"], rows)

    pm, ratio = format_score, fid_ratio

    s1_rows = [[w, s1_init.get(w), s1_err.get(w), pm(teacher_res[(w, reference_steps)]),
                pm(s1_res[w]), ratio(s1_res[w], teacher_res[(w, reference_steps)]) - 1.0,
                teacher_res[(w, reference_steps)][1], s1_res[w][1]] for w in ws]
    s1_table = markdown_table(
        ["w", "rel. error before", "rel. error after", f"teacher {reference_steps}-step FID",
         f"stage-1 {reference_steps}-step FID", "relative FID change", "teacher acc",
         "stage-1 acc"], s1_rows)
    w_chk = 2.0 if 2.0 in ws else ws[-1]
    four = 4 if 4 in steps else steps[-1]
    t4, t_ref = teacher_res[(w_chk, four)], teacher_res[(w_chk, reference_steps)]
    worst_s1 = max(abs(ratio(s1_res[w], teacher_res[(w, reference_steps)]) - 1.0) for w in ws)
    measures = []
    for label, r in (("deterministic student (DDIM)", det.get((w_chk, four))),
                     ("deterministic student, stochastic sampler", sto.get((w_chk, four))),
                     ("stochastic-trained student, stochastic sampler",
                      sto_t.get((w_chk, four)))):
        if r is not None:
            measures.append(f"- {label}: FID {pm(r)}, **{ratio(r, t4):.2f}×** the teacher's "
                            f"DDIM-{four} ({pm(t4)}); class accuracy {r[1]:.3f} vs the "
                            f"teacher's {t_ref[1]:.3f} at {reference_steps} steps "
                            f"({100 * (r[1] - t_ref[1]):+.1f} points)")
    measures = "\n".join(measures)
    total = time.perf_counter() - t_start
    recipe = getattr(teacher, "config", {})
    text = f"""# fastdiff: guided distillation (Meng et al.) on class-conditional digits

Teacher: class-conditional UNet (v-prediction, cosine schedule, label dropout 0.1; config
`{json.dumps(recipe)}`). Guidance convention v̂^w = (1+w) v̂(z,c) − w v̂(z,∅) (w = 0: plain
conditional). Stage 1: {stage1_updates} updates, w ~ U[{w_min:g}, {w_max:g}], lr {stage1_lr},
EMA {stage1_ema_decay}, loss balanced across w (`balance_w`);
stage 2: progressive distillation {start_steps} → 1 steps, {updates} updates per halving, lr
{lr}, batch {batch_size}; stochastic-sampler students for N ∈ {list(stochastic_steps)}
({stochastic_updates} updates each; teacher: the deterministic 2N-step student, four of its
steps per 2/N as in the paper, or the N-step one where there is no 2N-step student; see
`fastdiff.methods.guided.distill_stochastic`).

FID-digits: Fréchet distance in the features of a small digit classifier between {n} samples
and the training split (floor, held-out vs train: {metric.floor:.3f}); not Inception FID;
averaged over {draws} fixed noise draws. Accuracy: the fraction of samples the same
classifier reads as the requested digit. Every model uses the same noise and labels;
stochastic samplers use fixed generators.

## Stage 1: one pass predicts the guided output

Relative error ‖v̂_student(w) − v̂^w‖ / ‖v̂^w‖ on held-out z_t (t ~ U(0,1)), and
{reference_steps}-step DDIM samples of the stage-1 student (1 pass/step) vs the guided
teacher (2 passes/step):

{s1_table}

## Few-step students vs the guided teacher

{table}

FID columns are means over the {draws} noise draws (the stage-1 table gives their sd).

## Measures

Stage 1: the largest relative change of the {reference_steps}-step FID against the guided teacher
over w ∈ {{{", ".join(f"{w:g}" for w in ws)}}} is **{100 * worst_s1:.1f}%** (target: within 10%).

Stage 2 at w = {w_chk:g}, {four} steps (target: FID at most half the teacher's DDIM-{four}, class
accuracy within 5 points of the teacher's at {reference_steps} steps):

{measures}

A faithful deterministic student can at best reach the teacher's own converged FID
({pm(t_ref)} at {reference_steps} steps, {ratio(t_ref, t4):.2f}× its DDIM-{four}); the
stochastic sampler, which renoises between steps, is what the paper uses for its few-step
results.

## Cost

Sampling throughput at {thr['steps']} steps, batch {thr['batch']}, w = {ws[-1]:g} (median of
{thr['repeats']}, timed alternately so that machine load hits both alike; {torch.get_num_threads()}
threads on {os.cpu_count()} CPUs, {thr['device']}): distilled student
{thr['student_samples_per_s']:.0f} samples/s (1 pass per step), guided teacher
{thr['teacher_samples_per_s']:.0f} samples/s (2 passes per step, one batch of 2B):
**ratio {thr['ratio']:.2f}×**.

Wall time: teacher evaluation {timings['teacher_eval']:.0f} s, stage 1
{timings['stage1_train']:.0f} s, stage 2 {timings['stage2_train']:.0f} s, stochastic students
{timings['stochastic_train']:.0f} s; whole run {total:.0f} s (reloaded stages count 0 or their
original time).

Grids (rows = digits 0–9): {", ".join(
        f"[student {grid_n} w={w:g}](student-{grid_n}steps-w{w:g}.png)" for w in ws)}; {", ".join(
        f"[stochastic-trained student {grid_n} w={w:g}](stochastic-{grid_n}steps-w{w:g}.png)"
        for w in ws if grid_n in stoch_students)}; {", ".join(
        f"[teacher {reference_steps} w={w:g}](teacher-{reference_steps}steps-w{w:g}.png)"
        for w in ws)}; {", ".join(f"[teacher {grid_n} w={w:g}](teacher-{grid_n}steps-w{w:g}.png)"
                                 for w in ws)}.
"""
    report = write_text(out / "report.md", text)

    def keyed(d):
        return {f"w={w:g},steps={N}": v for (w, N), v in d.items()}

    (out / "results.json").write_text(json.dumps({
        "teacher": keyed(teacher_res), "student_ddim": keyed(det),
        "student_stochastic": keyed(sto), "stochastic_trained": keyed(sto_t),
        "stage1": {f"w={w:g}": v for w, v in s1_res.items()},
        "stage1_rel_error": {f"w={w:g}": v for w, v in s1_err.items()},
        "stage1_rel_error_initial": {f"w={w:g}": v for w, v in s1_init.items()},
        "throughput": thr, "timings": timings, "floor": metric.floor, "n_samples": n,
        "draws": draws, "score_fields": ["fid_mean", "accuracy_mean", "fid_sd"],
        "total_seconds": total}, indent=1))
    log(f"report: {report}")
    return report
