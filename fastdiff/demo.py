"""The main job on built-in data: a digits teacher, progressive distillation 64 → 1, a report.

`make demo` runs `fastdiff demo`, which calls `run_demo`. The teacher and the FID-digits
classifier are cached (`fastdiff.metrics.cache_dir()`); finished rounds are kept under the
run folder, so a second run only re-evaluates.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastdiff.checkpoint import CheckpointError, load, save
from fastdiff.data import load_dataset
from fastdiff.metrics import DigitsFID, cache_dir
from fastdiff.models import UNet
from fastdiff.pd import progressive_distill
from fastdiff.report import markdown_table, save_curves, save_grid, write_text
from fastdiff.samplers import sample
from fastdiff.training import train_teacher


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

    def key(self) -> str:
        import hashlib

        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def digits_teacher(cache: str | Path | None = None, *, recipe: TeacherRecipe = TeacherRecipe(),
                   progress: bool = True, retrain: bool = False, log=print):
    """The class-conditional digits teacher (v-prediction UNet, label dropout for guidance).

    Trained once with `recipe` and cached as a fastdiff checkpoint under
    `cache/digits-teacher-<key>`; later calls load it (a few ms).
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
                            seed=recipe.seed, progress=progress)
    seconds = time.perf_counter() - t0
    n_params = sum(p.numel() for p in teacher.parameters())
    save(teacher, path, metadata={"recipe": asdict(recipe), "train_seconds": seconds,
                                  "parameters": n_params})
    log(f"fastdiff: trained the digits teacher in {seconds:.0f} s ({n_params:,} parameters), "
        f"cached at {path}")
    return load(path)


def eval_batch(n: int, seed: int = 1234, num_classes: int = 10):
    """Fixed noise (n, 1, 8, 8) and labels (n,) so every model is scored on the same draw."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 1, 8, 8, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return noise, labels


def digits_fid(model, steps: int, metric: DigitsFID, *, sampler: str = "ddim", seed=1234,
               n: int | None = None) -> tuple[float, torch.Tensor]:
    """FID-digits of `model` sampled class-conditionally (uniform labels, no guidance)."""
    noise, labels = eval_batch(n or metric.n_reference, seed)
    x = sample(model, noise, steps, sampler=sampler, cond={"y": labels})
    return metric.score(x), x


def run_demo(out: str | Path = "runs/demo", *, start_steps: int = 64, updates: int = 800,
             batch_size: int = 128, lr: float = 5e-4,
             teacher_recipe: TeacherRecipe = TeacherRecipe(),
             progress: bool = True, log=print) -> Path:
    """Train/reuse the digits teacher, distil start_steps → 1, write `out/report.md`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    metric = DigitsFID.load(verbose=True)
    log(f"FID-digits classifier: held-out accuracy {metric.accuracy:.3f}, "
        f"floor {metric.floor:.3f} ({metric.n_reference} samples)")
    teacher = digits_teacher(recipe=teacher_recipe, progress=progress, log=log)
    data = load_dataset("digits", seed=0)

    teacher_steps = [2**k for k in range(0, 9)]  # 1 … 256
    teacher_fid = {}
    for n in teacher_steps:
        teacher_fid[n], x = digits_fid(teacher, n, metric)
        if n in (4, start_steps, 256):
            save_grid(x[:100], out / f"teacher-{n:03d}-steps.png", nrow=10)
        log(f"teacher DDIM {n:4d} steps: FID-digits {teacher_fid[n]:.3f}")

    student_fid, round_time, stopped = {}, {}, {}

    def on_round(result):
        s = result.steps
        student_fid[s], x = digits_fid(result.student, s, metric)
        round_time[s] = result.history.wall_time
        stopped[s] = result.history.stopped_by or "updates"
        save_grid(x[:100], out / f"student-{s:03d}-steps.png", nrow=10)
        log(f"student {s:3d} steps: FID-digits {student_fid[s]:.3f} "
            f"(teacher DDIM {teacher_fid.get(s, float('nan')):.3f}), "
            f"round took {round_time[s]:.0f} s")

    progressive_distill(teacher, data, start_steps=start_steps, end_steps=1, updates=updates,
                        batch_size=batch_size, lr=lr, checkpoint_dir=out / "checkpoints",
                        progress=progress, on_round=on_round)

    rows = []
    for n in teacher_steps:
        rows.append([n, teacher_fid[n], student_fid.get(n), metric.floor,
                     f"{round_time[n]:.0f}" if n in round_time else None])
    table = markdown_table(["steps", "teacher DDIM", "distilled student", "floor (held-out)",
                            "round wall time (s)"], rows)
    s_steps = sorted(student_fid)
    save_curves(out / "fid_vs_steps.png",
                {"teacher (DDIM)": (teacher_steps, [teacher_fid[n] for n in teacher_steps]),
                 "distilled student": (s_steps, [student_fid[n] for n in s_steps])},
                xlabel="sampling steps", ylabel="FID-digits", logx=True, logy=True,
                hlines={"floor (held-out vs train)": metric.floor},
                title="FID-digits vs steps (lower is better)")
    total = time.perf_counter() - t_start
    four = student_fid.get(4), teacher_fid[4], teacher_fid[start_steps]
    text = f"""# fastdiff demo: progressive distillation on digits

Teacher: class-conditional UNet (v-prediction, cosine schedule) trained on scikit-learn's 8×8
digits; distilled from {start_steps} DDIM steps down to 1 with progressive distillation
(Salimans & Ho 2022), {updates} updates per halving, batch {batch_size}, lr {lr}.

**FID-digits** is the Fréchet distance on the features of a small CNN digit classifier
(held-out accuracy {metric.accuracy:.3f}) between {metric.n_reference} samples and the
training split. It is *not* Inception FID and is not comparable with published FIDs. The
floor is the held-out split scored the same way. Samples are class-conditional (uniform
labels, no guidance), the same noise for every model.

{table}

At 4 steps: student {four[0]:.3f} vs teacher DDIM {four[1]:.3f}
(ratio {four[0] / four[1]:.2f}); teacher at {start_steps} steps: {four[2]:.3f}
(student / teacher-{start_steps} = {four[0] / four[2]:.2f}).

![FID-digits vs steps](fid_vs_steps.png)

Sample grids (rows: 10 samples each): {", ".join(f"[student {n}](student-{n:03d}-steps.png)"
                                                  for n in s_steps)},
[teacher 4](teacher-004-steps.png), [teacher {start_steps}](teacher-{start_steps:03d}-steps.png),
[teacher 256](teacher-256-steps.png).

Distillation wall time: {sum(round_time.values()):.0f} s over {len(round_time)} rounds
(rounds reloaded from `checkpoints/` count their original time); whole demo run
{total:.0f} s.
"""
    report = write_text(out / "report.md", text)
    (out / "results.json").write_text(json.dumps(
        {"teacher_fid": teacher_fid, "student_fid": student_fid, "round_time": round_time,
         "floor": metric.floor, "stopped_by": stopped}, indent=1))
    log(f"report: {report}")
    return report
