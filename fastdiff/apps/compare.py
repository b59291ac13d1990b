"""Time to quality: SFD against progressive distillation on digits (`fastdiff compare`).

From one digits teacher: PD halves 64 (16 in quick mode) → … → 4 → 2 steps; SFD distils
straight to 4 and to 2 NFE (DPM-Solver++(3M) teacher, AFS, L1). FID-digits is measured as
training proceeds (PD after each round, SFD every `eval_every` updates) against the
distillation wall time (evaluation excluded, teacher training excluded), and DPM-Solver++
(3M) on the teacher without distillation is scored at the same NFE. Writes
`out_dir/compare.md`, `out_dir/compare.png` and `out_dir/compare.json`.

    run_compare(out_dir, *, teacher=None, quick=False, progress=True) -> dict
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from fastdiff.engine.grids import sfd_grid
from fastdiff.engine.solvers import dpmpp_sample
from fastdiff.methods.sfd import distill_sfd, sample_sfd


def _scorer(metric, n: int, teacher, seed: int = 1234):
    """(FID-digits, MSE to the teacher's 64-step DPM-Solver++(3M) sample) of a sampler, on a
    fixed draw of noise and uniform labels. The MSE is the quantity distillation optimises
    and is far less noisy than FID-digits at this size."""
    from fastdiff.apps.demo import eval_batch

    noise, labels = eval_batch(n, seed)
    cond = {"y": labels}
    with torch.no_grad():
        f = lambda z, t: teacher(z, t, **cond)  # noqa: E731
        ref = dpmpp_sample(f, noise, 64, order=3, times=sfd_grid(64))[0]

    def score(draw) -> tuple[float, float]:
        with torch.no_grad():
            x = draw(noise, cond)
            return float(metric.score(x)), float((x.double() - ref.double()).pow(2).mean())

    return score


def _first_reaching(curve, target, index=1):
    """The first wall time on `curve` [(seconds, fid, mse), ...] with value ≤ target."""
    for point in curve:
        if point[index] <= target:
            return point[0]
    return None


def run_compare(out_dir, *, teacher=None, quick: bool = False, progress: bool = True,
                pd_start: int | None = None, pd_updates: int | None = None,
                sfd_updates: dict | None = None, eval_every: int | None = None,
                teacher_substeps: int = 3, sfd_lr: float = 5e-5, pd_lr: float = 5e-4,
                batch_size: int = 128, seed: int = 0, log=print) -> dict:
    """Run PD and SFD from one digits teacher and write the time-to-quality report.

    teacher: a digits v-model (default `fastdiff.apps.demo.digits_teacher()`, trained once and
    cached); quick: PD from 16 steps with fewer updates (minutes on a CPU); pd_start /
    pd_updates (per round) / sfd_updates ({nfe: updates}) / eval_every override the mode's
    defaults. Returns the numbers written to compare.json.
    """
    from fastdiff.apps.demo import digits_teacher
    from fastdiff.engine.data import load_dataset
    from fastdiff.eval.metrics import DigitsFID
    from fastdiff.eval.report import save_curves, write_text
    from fastdiff.methods.pd import progressive_distill

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pd_start = pd_start or (16 if quick else 64)
    pd_updates = pd_updates or (250 if quick else 800)
    sfd_updates = sfd_updates or ({4: 160, 2: 200} if quick else {4: 600, 2: 600})
    eval_every = eval_every or (10 if quick else 40)
    if not isinstance(pd_start, int) or pd_start < 8 or pd_start & (pd_start - 1):
        raise ValueError(f"pd_start must be a power of two >= 8 (PD passes 4 on its way to 2), "
                         f"got {pd_start!r}")
    metric = DigitsFID.load(verbose=progress)
    teacher = teacher if teacher is not None else digits_teacher(progress=progress, log=log)
    teacher.eval()
    data = load_dataset("digits", seed=0)
    score = _scorer(metric, metric.n_reference, teacher)
    grid = dict(spacing="edm", sigma_min=0.006, sigma_max=80.0, rho=7.0)
    res: dict = {"quick": quick, "pd_start": pd_start, "pd_updates_per_round": pd_updates,
                 "sfd_updates": sfd_updates, "floor": metric.floor, "batch_size": batch_size,
                 "teacher_substeps": teacher_substeps}

    # ---- no distillation: DPM-Solver++(3M) on the teacher at the same NFE
    def dpm(nfe, afs):
        def draw(noise, cond):
            f = lambda z, t: teacher(z, t, **cond)  # noqa: E731
            times = sfd_grid(nfe, afs=afs, **grid)
            return dpmpp_sample(f, noise, nfe, order=3, times=times, afs=afs)[0]
        return draw

    base = {f"{nfe}{'+afs' if afs else ''}": score(dpm(nfe, afs))
            for nfe in (2, 4, 8) for afs in (False, True)}
    res["dpmpp_3m"] = {k: v[0] for k, v in base.items()}
    res["dpmpp_3m_mse"] = {k: v[1] for k, v in base.items()}
    res["teacher_dpmpp_3m_32"] = score(dpm(32, False))[0]
    log(f"DPM-Solver++(3M), no distillation: {res['dpmpp_3m']}; 32 NFE "
        f"{res['teacher_dpmpp_3m_32']:.3f}; floor {metric.floor:.3f}")

    # ---- progressive distillation
    from fastdiff.engine.samplers import sample

    pd_curve, elapsed = [], 0.0

    def on_round(r):
        nonlocal elapsed
        elapsed += r.history.wall_time
        fid, mse = score(lambda noise, cond: sample(r.student, noise, r.steps, cond=cond))
        pd_curve.append((elapsed, fid, r.steps, mse))
        log(f"PD {r.teacher_steps} → {r.steps} steps: FID-digits {fid:.3f}, MSE to teacher "
            f"{mse:.4f} at {elapsed:.0f} s of PD")

    progressive_distill(teacher, data, start_steps=pd_start, end_steps=2, updates=pd_updates,
                        batch_size=batch_size, lr=pd_lr, progress=progress, seed=seed,
                        on_round=on_round)
    res["pd"] = [{"seconds": s, "fid": f, "steps": n, "mse": e} for s, f, n, e in pd_curve]
    pd4 = next(p for p in pd_curve if p[2] == 4)
    pd2 = next(p for p in pd_curve if p[2] == 2)

    # ---- SFD straight to 4 and 2 NFE
    sfd_curves, sfd_results = {}, {}
    for nfe in (4, 2):
        curve = []

        def on_eval(result, k, secs, curve=curve, nfe=nfe):
            fid, mse = score(lambda noise, cond: sample_sfd(result, noise, cond=cond))
            curve.append((secs, fid, mse))
            log(f"SFD {nfe} NFE, update {k}: FID-digits {fid:.3f}, MSE to teacher {mse:.4f} "
                f"at {secs:.0f} s")
            return fid

        r = distill_sfd(teacher, student_steps=nfe, teacher_substeps=teacher_substeps,
                        updates=sfd_updates[nfe], batch_size=batch_size, lr=sfd_lr,
                        afs=True, metric="l1", progress=progress, seed=seed,
                        eval_every=eval_every, on_eval=on_eval, **grid)
        sfd_curves[nfe], sfd_results[nfe] = curve, r
        res[f"sfd_{nfe}"] = {"curve": [{"seconds": s, "fid": f, "mse": e} for s, f, e in curve],
                             "wall_time": r.history.wall_time,
                             "teacher_nfe_per_trajectory": r.history.teacher_nfe}

    # ---- the measures
    pd4_time = pd4[0]
    t4 = _first_reaching(sfd_curves[4], pd4[1])
    res["pd_final_4_step_fid"], res["pd_wall_time_to_4_steps"] = pd4[1], pd4_time
    res["sfd4_time_to_pd4_fid"] = t4
    res["sfd4_time_ratio_percent"] = None if t4 is None else 100.0 * t4 / pd4_time
    sfd2_final = sfd_curves[2][-1][1]
    res["sfd2_final_fid"], res["pd_final_2_step_fid"] = sfd2_final, pd2[1]
    res["sfd2_beats_dpmpp3m_2nfe"] = sfd2_final < min(res["dpmpp_3m"]["2"],
                                                       res["dpmpp_3m"]["2+afs"])
    t4m = _first_reaching(sfd_curves[4], pd4[3], index=2)
    res["pd_final_4_step_mse"], res["sfd4_time_to_pd4_mse"] = pd4[3], t4m
    res["sfd4_mse_time_ratio_percent"] = None if t4m is None else 100.0 * t4m / pd4_time
    ratio = res["sfd4_time_ratio_percent"]
    ratio_text = (f"SFD reaches PD's final 4-step FID-digits ({pd4[1]:.3f}) in "
                  f"{ratio:.1f}% of PD's wall time ({t4:.0f} s vs {pd4_time:.0f} s)"
                  if ratio is not None else
                  f"SFD did not reach PD's final 4-step FID-digits ({pd4[1]:.3f}) within "
                  f"{sfd_results[4].history.wall_time:.0f} s (PD: {pd4_time:.0f} s)")
    if t4m is not None:
        ratio_text += (f"; on MSE to the teacher's 64-step sample ({pd4[3]:.4f}) in "
                       f"{res['sfd4_mse_time_ratio_percent']:.1f}% ({t4m:.0f} s)")
    res["summary"] = ratio_text
    log(ratio_text)

    # ---- plot and report
    curves = {
        "PD (student at its step count)": ([p[0] for p in pd_curve], [p[1] for p in pd_curve]),
        "SFD 4 NFE (AFS)": ([c[0] for c in sfd_curves[4]], [c[1] for c in sfd_curves[4]]),
        "SFD 2 NFE (AFS)": ([c[0] for c in sfd_curves[2]], [c[1] for c in sfd_curves[2]]),
    }
    hlines = {"DPM-Solver++(3M) 4 NFE": min(res["dpmpp_3m"]["4"], res["dpmpp_3m"]["4+afs"]),
              "DPM-Solver++(3M) 2 NFE": min(res["dpmpp_3m"]["2"], res["dpmpp_3m"]["2+afs"])}
    save_curves(out / "compare.png", curves, xlabel="distillation wall time (s)",
                ylabel="FID-digits", title="Time to quality on digits", logx=True, logy=True,
                hlines=hlines)
    save_curves(out / "compare_mse.png", {k: (v[0], [c[3] if len(c) > 3 else c[2]
                                                    for c in src])
                                          for (k, v), src in zip(curves.items(),
                                                                 (pd_curve, sfd_curves[4],
                                                                  sfd_curves[2]))},
                xlabel="distillation wall time (s)", ylabel="MSE to teacher (64-step DPM++)",
                title="Time to quality on digits (MSE)", logx=True, logy=True,
                hlines={"DPM-Solver++(3M) 4 NFE": min(res["dpmpp_3m_mse"]["4"],
                                                      res["dpmpp_3m_mse"]["4+afs"]),
                        "DPM-Solver++(3M) 2 NFE": min(res["dpmpp_3m_mse"]["2"],
                                                      res["dpmpp_3m_mse"]["2+afs"])})
    rows = "\n".join(f"| PD {p[2]} steps | {p[0]:.0f} | {p[1]:.3f} | {p[3]:.4f} |"
                     for p in pd_curve)
    for nfe in (4, 2):
        s, f, e = sfd_curves[nfe][-1]
        best = min(c[1] for c in sfd_curves[nfe])
        rows += (f"\n| SFD {nfe} NFE (AFS), final (best FID {best:.3f}) | {s:.0f} | {f:.3f} "
                 f"| {e:.4f} |")
    dpm_rows = "\n".join(f"| {k} | {v:.3f} | {res['dpmpp_3m_mse'][k]:.4f} |"
                         for k, v in res["dpmpp_3m"].items())
    text = f"""# Time to quality: SFD vs progressive distillation (digits)

{ratio_text}.

2-NFE SFD student (AFS): FID-digits {sfd2_final:.3f}; DPM-Solver++(3M) at 2 NFE without
distillation: {res['dpmpp_3m']['2']:.3f} (with AFS {res['dpmpp_3m']['2+afs']:.3f}) →
{'beats it' if res['sfd2_beats_dpmpp3m_2nfe'] else 'does not beat it'}.
PD's final 2-step student: {pd2[1]:.3f}. Floor (held-out vs itself): {metric.floor:.3f}.
Teacher with DPM-Solver++(3M) at 32 NFE: {res['teacher_dpmpp_3m_32']:.3f}.

![FID-digits against distillation wall time](compare.png)

| model | distillation wall time (s) | FID-digits | MSE to teacher |
|---|---|---|---|
{rows}

![MSE to the teacher's 64-step sample against wall time](compare_mse.png)

| DPM-Solver++(3M), no distillation (NFE) | FID-digits | MSE to teacher |
|---|---|---|
{dpm_rows}

Settings: PD {pd_start} → 2 steps, {pd_updates} updates per halving, lr {pd_lr}; SFD
DPM-Solver++(3M) teacher with {teacher_substeps} sub-steps per interval, EDM grid
σ ∈ [0.006, 80] (ρ = 7), AFS, L1, lr {sfd_lr}, updates {sfd_updates}; batch {batch_size}.
Wall times exclude evaluation and teacher training, measured on this machine in one process
({'quick mode' if quick else 'full mode'}); CPU shared with other jobs, so they are noisy.
"""
    write_text(out / "compare.md", text)
    (out / "compare.json").write_text(json.dumps(res, indent=1, default=float))
    return res


def add_parser(subparsers):
    """Register `compare` on an argparse subparsers object; the handler is set as `func`."""
    p = subparsers.add_parser("compare", help="time to quality: SFD vs PD on digits")
    p.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    p.add_argument("--quick", action="store_true", help="PD from 16 steps, fewer updates")
    p.add_argument("--teacher", default=None, help="a saved teacher (default: cached digits)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(args):
        teacher = None
        if args.teacher:
            from fastdiff.engine.checkpoint import load

            teacher = load(args.teacher)
        t0 = time.perf_counter()
        res = run_compare(args.out, teacher=teacher, quick=args.quick,
                          progress=not args.no_progress)
        print(f"{res['summary']}; wrote {Path(args.out) / 'compare.md'} in "
              f"{time.perf_counter() - t0:.0f} s")
        return 0

    p.set_defaults(func=run)
    return p
