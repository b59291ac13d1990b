"""The main job on built-in data: a digits teacher, progressive distillation 64 → 1, a report.

`make demo` runs `fastdiff demo`, which calls `run_demo`. The teacher and the FID-digits
classifier are cached (`fastdiff.eval.metrics.cache_dir()`); finished rounds are kept under the
run folder, so a second run only re-evaluates.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastdiff.engine.checkpoint import CheckpointError, load, save
from fastdiff.engine.data import load_dataset
from fastdiff.engine.models import UNet
from fastdiff.engine.samplers import guidance_inputs, sample
from fastdiff.eval.metrics import DigitsFID, cache_dir
from fastdiff.eval.report import markdown_table, save_curves, save_grid, write_text
from fastdiff.methods.pd import progressive_distill
from fastdiff.training import train_teacher
from fastdiff.training.policy import describe


@dataclass(frozen=True)
class TeacherRecipe:
    """How the default digits teacher is trained (the cache key hashes these)."""

    channels: int = 16
    channel_mults: tuple = (1, 2)
    num_res_blocks: int = 2
    updates: int = 4000
    batch_size: int = 128
    lr: float = 2e-3
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    warmup: int = 200
    seed: int = 0
    # what train_teacher draws per update: a teacher cached by an older loop is not reused
    trainer: str = "runner-1"

    def key(self) -> str:
        return recipe_key(self)


def recipe_key(recipe) -> str:
    """A short hash of a recipe dataclass's fields: the cache key of what it trains."""
    import hashlib

    text = json.dumps(asdict(recipe), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def digits_teacher(cache: str | Path | None = None, *, recipe: TeacherRecipe = TeacherRecipe(),
                   progress: bool = True, retrain: bool = False, log=print):
    """The class-conditional digits teacher (v-prediction UNet, label dropout for guidance).

    Trained once with `recipe` and cached as a fastdiff checkpoint under
    `cache/digits-teacher-<key>`; later calls load it (a few ms). An interrupted training
    resumes from `cache/digits-teacher-<key>.state/`.
    """
    folder = Path(cache) if cache is not None else cache_dir()
    path = folder / f"digits-teacher-{recipe.key()}"
    if path.exists() and not retrain:
        try:
            return load(path)
        except CheckpointError as e:
            log(f"fastdiff: retraining the digits teacher: {e}")
    data = load_dataset("digits", seed=0)
    torch.manual_seed(recipe.seed)
    model = UNet(in_channels=1, image_size=8, channels=recipe.channels,
                 channel_mults=recipe.channel_mults, num_res_blocks=recipe.num_res_blocks,
                 num_classes=10)
    t0 = time.perf_counter()
    teacher = train_teacher(model, data, updates=recipe.updates, batch_size=recipe.batch_size,
                            lr=recipe.lr, ema_decay=recipe.ema_decay,
                            label_dropout=recipe.label_dropout, warmup=recipe.warmup,
                            seed=recipe.seed, progress=progress,
                            checkpoint_dir=folder / f"digits-teacher-{recipe.key()}.state")
    seconds = time.perf_counter() - t0
    n_params = sum(p.numel() for p in teacher.parameters())
    save(teacher, path, metadata={"recipe": asdict(recipe), "train_seconds": seconds,
                                  "parameters": n_params})
    log(f"fastdiff: trained the digits teacher in {seconds:.0f} s ({n_params:,} parameters), "
        f"cached at {path}")
    shutil.rmtree(folder / f"digits-teacher-{recipe.key()}.state", ignore_errors=True)
    return load(path)


def eval_batch(n: int, seed: int = 1234, num_classes: int = 10):
    """Fixed noise (n, 1, 8, 8) and balanced labels 0, 1, …, 9, 0, … (n,), so every model is
    scored on the same draw and a 10-wide grid shows one digit class per column."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 1, 8, 8, generator=g)
    labels = torch.arange(n) % num_classes
    return noise, labels


def digits_fid(model, steps: int, metric: DigitsFID, *, sampler: str = "ddim", seed=1234,
               n: int | None = None, guidance=None) -> tuple[float, torch.Tensor]:
    """FID-digits of `model` sampled class-conditionally (balanced labels, `eval_batch`) at
    guidance weight `guidance` (None: none; see `samplers.guidance_inputs`)."""
    noise, labels = eval_batch(n or metric.n_reference, seed)
    cond, guidance = guidance_inputs(model, {"y": labels}, guidance, len(labels))
    # stochastic samplers draw their fresh noise from a generator seeded like the noise
    x = sample(model, noise, steps, sampler=sampler, cond=cond, guidance=guidance,
               generator=torch.Generator().manual_seed(seed))
    return metric.score(x), x


@dataclass
class Scores:
    """FID-digits averaged over noise draws, and the distance to the teacher's ODE solution."""

    fid: float
    fid_std: float
    rmse: float  # RMS distance to the reference sample from the same noise (draw 0)


def score_model(model, steps: int, metric: DigitsFID, reference: torch.Tensor | None, *,
                draws: int = 2, sampler: str = "ddim") -> tuple[Scores, torch.Tensor]:
    """Sample `draws` fixed noise sets of `metric.n_reference` images; returns scores, draw 0."""
    fids, first = [], None
    for d in range(draws):
        fid, x = digits_fid(model, steps, metric, sampler=sampler, seed=1234 + d)
        fids.append(fid)
        first = x if first is None else first
    rmse = float("nan") if reference is None else float((first - reference).square().mean().sqrt())
    t = torch.tensor(fids, dtype=torch.float64)
    std = float(t.std()) if draws > 1 else float("nan")
    return Scores(float(t.mean()), std, rmse), first


DEMO_UPDATES = (300, 300, 400, 600, 800, 1000)  # per halving, 64→32 … 2→1: later rounds matter


def run_demo(out: str | Path = "runs/demo", *, start_steps: int = 64, updates=DEMO_UPDATES,
             batch_size: int = 128, lr: float = 5e-4,
             teacher_recipe: TeacherRecipe = TeacherRecipe(), draws: int = 2,
             progress: bool = True, log=print) -> Path:
    """Train/reuse the digits teacher, distil start_steps → 1, write `out/report.md`.

    updates: one number per round, or a sequence (one entry per round, the first for
    start_steps → start_steps/2; a longer sequence is cut to the rounds run).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    metric = DigitsFID.load(verbose=True)
    log(f"FID-digits classifier: held-out accuracy {metric.accuracy:.3f}, "
        f"floor {metric.floor:.3f} ({metric.n_reference} samples)")
    teacher = digits_teacher(recipe=teacher_recipe, progress=progress, log=log)
    data = load_dataset("digits", seed=0)
    n_rounds = int(math.log2(start_steps))
    if not isinstance(updates, int):
        updates = list(updates)[-n_rounds:] if len(updates) >= n_rounds else list(updates)

    ref_steps = 256
    teacher_steps = sorted({2**k for k in range(0, n_rounds + 1)} | {ref_steps})
    teacher_scores = {}
    reference = None
    for n in sorted(teacher_steps, reverse=True):  # the reference (most steps) first
        teacher_scores[n], x = score_model(teacher, n, metric, reference, draws=draws)
        if reference is None:  # draw 0 of the 256-step run is the reference: distance 0
            reference = x
            teacher_scores[n].rmse = 0.0
        if n in (1, 4, start_steps, ref_steps):
            save_grid(x[:100], out / f"teacher-{n:03d}-steps.png", nrow=10)
        log(f"teacher DDIM {n:4d} steps: FID-digits {teacher_scores[n].fid:.3f} "
            f"± {teacher_scores[n].fid_std:.3f}, RMSE to teacher-{ref_steps} "
            f"{teacher_scores[n].rmse:.4f}")

    student_scores, round_time, stopped, policies = {}, {}, {}, {}

    def on_round(result):
        s = result.steps
        student_scores[s], x = score_model(result.student, s, metric, reference, draws=draws)
        round_time[s] = result.history.wall_time
        stopped[s] = result.history.stopped_by or "updates"
        policies[s] = describe(result.history.policy)
        save_grid(x[:100], out / f"student-{s:03d}-steps.png", nrow=10)
        log(f"student {s:3d} steps: FID-digits {student_scores[s].fid:.3f} "
            f"(teacher DDIM {teacher_scores[s].fid:.3f}), RMSE {student_scores[s].rmse:.4f} "
            f"(teacher DDIM {teacher_scores[s].rmse:.4f}), round took {round_time[s]:.0f} s")

    progressive_distill(teacher, data, start_steps=start_steps, end_steps=1, updates=updates,
                        batch_size=batch_size, lr=lr, checkpoint_dir=out / "checkpoints",
                        progress=progress, on_round=on_round)

    def fmt(sc):
        return None if sc is None else f"{sc.fid:.3f} ± {sc.fid_std:.3f}"

    rows = []
    for n in teacher_steps:
        t_sc, s_sc = teacher_scores[n], student_scores.get(n)
        rows.append([n, fmt(t_sc), fmt(s_sc), metric.floor, t_sc.rmse,
                     None if s_sc is None else s_sc.rmse,
                     f"{round_time[n]:.0f}" if n in round_time else None])
    table = markdown_table(["steps", "teacher DDIM FID-digits", "student FID-digits",
                            "floor (held-out)", f"teacher RMSE to teacher-{ref_steps}",
                            f"student RMSE to teacher-{ref_steps}",
                            "round wall time (s)"], rows)
    s_steps = sorted(student_scores)
    curves = {"teacher (DDIM)": (teacher_steps, [teacher_scores[n].fid for n in teacher_steps]),
              "distilled student": (s_steps, [student_scores[n].fid for n in s_steps])}
    save_curves(out / "fid_vs_steps.png", curves, xlabel="sampling steps", ylabel="FID-digits",
                logx=True, logy=True, hlines={"floor (held-out vs train)": metric.floor},
                title="FID-digits vs steps (lower is better)")
    save_curves(out / "rmse_vs_steps.png",
                {"teacher (DDIM)": (teacher_steps[:-1],
                                    [teacher_scores[n].rmse for n in teacher_steps[:-1]]),
                 "distilled student": (s_steps, [student_scores[n].rmse for n in s_steps])},
                xlabel="sampling steps", ylabel=f"RMS distance to teacher-{ref_steps} sample",
                logx=True, logy=True, title="Distance to the teacher's ODE solution")
    total = time.perf_counter() - t_start
    four_s, four_t = student_scores.get(4), teacher_scores.get(4)  # absent below 4 steps
    top = teacher_scores[start_steps]
    summary = "" if four_s is None else (
        f"At 4 steps: student FID-digits {four_s.fid:.3f} vs teacher DDIM {four_t.fid:.3f} "
        f"(ratio {four_s.fid / four_t.fid:.2f}); teacher at {start_steps} steps {top.fid:.3f} "
        f"(student-4 / teacher-{start_steps} = {four_s.fid / top.fid:.2f}). RMS distance to the "
        f"teacher's {ref_steps}-step sample from the same noise: student {four_s.rmse:.4f} vs "
        f"teacher DDIM {four_t.rmse:.4f} (ratio {four_s.rmse / four_t.rmse:.2f}).")
    upd = updates if isinstance(updates, int) else ", ".join(map(str, updates))
    policy_lines = "\n".join(f"- {s * 2} → {s} steps: {policies[s]}"
                              for s in sorted(policies, reverse=True))
    text = f"""# fastdiff demo: progressive distillation on digits

Teacher: class-conditional UNet (v-prediction, cosine schedule) trained on scikit-learn's 8×8
digits; distilled from {start_steps} DDIM steps down to 1 with progressive distillation
(Salimans & Ho 2022): updates per halving {upd}, batch {batch_size}, lr {lr}.

**FID-digits** is the Fréchet distance on the features of a small CNN digit classifier
(held-out accuracy {metric.accuracy:.3f}) between {metric.n_reference} samples and the
training split, averaged over {draws} noise draws (± their standard deviation). It is *not*
Inception FID and is not comparable with published FIDs. The floor is the held-out split
scored the same way; a model that reproduces training images can score below it. Samples are
class-conditional (uniform labels, no guidance), the same noise for every model. The RMS
distance to the teacher's {ref_steps}-step DDIM sample from the same noise measures how well
a few-step sampler follows the teacher's ODE (what distillation optimises).

{table}

{summary}

![FID-digits vs steps](fid_vs_steps.png)

![RMS distance to the teacher's ODE solution](rmse_vs_steps.png)

Sample grids (one digit class per column): {", ".join(f"[student {n}](student-{n:03d}-steps.png)"
                                                      for n in s_steps)},
[teacher 1](teacher-001-steps.png), [teacher 4](teacher-004-steps.png),
[teacher {start_steps}](teacher-{start_steps:03d}-steps.png),
[teacher {ref_steps}](teacher-{ref_steps:03d}-steps.png).

Speed policy per round (`history.policy`: what the runner chose for the frozen teacher and
the student, and why):

{policy_lines}

Distillation wall time: {sum(round_time.values()):.0f} s over {len(round_time)} rounds
(rounds reloaded from `checkpoints/` count their original time); whole demo run
{total:.0f} s.
"""
    report = write_text(out / "report.md", text)
    write_text(out / "results.json", json.dumps(
        {"teacher": {n: asdict(v) for n, v in teacher_scores.items()},
         "student": {n: asdict(v) for n, v in student_scores.items()},
         "round_time": round_time, "floor": metric.floor, "stopped_by": stopped,
         "policy": policies,
         "total_seconds": total}, indent=1))
    log(f"report: {report}")
    return report
