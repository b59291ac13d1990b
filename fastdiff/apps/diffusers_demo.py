"""The diffusers demo: `fastdiff demo --diffusers`, guided distillation of a text-conditional
diffusers UNet2DConditionModel, measured like the native guided demo.

The user path of issue 16, end to end, on data small enough for a CPU:

1. A tiny `diffusers.UNet2DConditionModel` (1 channel, 8×8, cross-attention) is built from a
   config and written, with a DDPMScheduler (v-prediction, cosine betas, 1024 timesteps), as
   a diffusers pipeline folder (model_index.json, unet/, scheduler/).
2. Its "prompts" are eleven fixed random embedding sequences (L, D) from a fixed seed: rows
   0–9 are the prompts of the digit classes, row 10 the negative prompt (the null of
   classifier-free guidance, a random sequence like the others, as Stable Diffusion's empty
   prompt is an embedding, not zeros). The data is the `.npz` that `--data` takes:
   `latents` = the digits' training split (N, 1, 8, 8) in [−1, 1], `prompt_embeds` (N, L, D)
   each example's class prompt, `negative_prompt_embeds` (L, D).
3. The teacher is `load_diffusers_teacher(folder)` trained by `fastdiff.train_teacher` on
   that `.npz` with prompt dropout 0.1 to the negative prompt, then written back as a
   pipeline folder, cached under `fastdiff.eval.metrics.cache_dir()` by a key of its recipe.
4. Stage 1, stage 2 (16 → 8 → 4 steps) and the 4-step stochastic-sampler student are
   trained by the command line itself, `fastdiff distill --method guided --teacher FOLDER
   --data FILE.npz --stochastic-steps 4 ...`, resumable: a rerun
   reuses finished stages. The command runs as a child process, `python -m fastdiff`.
5. Every model is scored as `fastdiff demo --guided` scores (`guided_demo.score_guided`):
   FID-digits (the Fréchet distance in a small digit classifier's features, not Inception
   FID) and class accuracy over fixed class-balanced noise draws, a class's prompt standing
   for its label (`PromptLabels`). `out/report.md` and `out/results.json` state each
   measure of issue 16 against its target.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from fastdiff.apps.demo import recipe_key
from fastdiff.apps.guided_demo import _grid_batch, fid_ratio, format_score, score_guided

__all__ = ["DiffusersDigitsRecipe", "PromptLabels", "diffusers_digits_teacher", "prompt_table",
           "run_diffusers_demo", "write_digits_npz", "write_pipeline"]

NEGATIVE_ROW = 10   # the negative prompt's row of `prompt_table`
NUM_CLASSES = 10


@dataclass(frozen=True)
class DiffusersDigitsRecipe:
    """The tiny text-conditional teacher: its UNet and scheduler configs, its prompts and how
    it is trained (the cache key hashes all of it)."""

    block_out_channels: tuple = (16, 32)
    layers_per_block: int = 1
    # cross-attention in the 4×4 mid block (diffusers' default UNetMidBlock2DCrossAttn);
    # at 8×8 it costs ~3x the time on a CPU (diffusers' attention at 64 tokens)
    down_block_types: tuple = ("DownBlock2D", "DownBlock2D")
    up_block_types: tuple = ("UpBlock2D", "UpBlock2D")
    cross_attention_dim: int = 32       # D, the prompt embedding's width
    prompt_tokens: int = 8              # L
    attention_head_dim: int = 16
    norm_num_groups: int = 8
    num_train_timesteps: int = 1024     # a multiple of every step count used (64, 16, 8, 4)
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "v_prediction"
    prompt_seed: int = 1234
    updates: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    warmup: int = 200
    seed: int = 0
    trainer: str = "runner-1-conds"     # what train_teacher draws (conditions: no draws)

    def key(self) -> str:
        return recipe_key(self)

    def unet_config(self) -> dict:
        """The UNet2DConditionModel keywords (1 channel, 8×8)."""
        return {"sample_size": 8, "in_channels": 1, "out_channels": 1,
                "block_out_channels": tuple(self.block_out_channels),
                "layers_per_block": self.layers_per_block,
                "down_block_types": tuple(self.down_block_types),
                "up_block_types": tuple(self.up_block_types),
                "cross_attention_dim": self.cross_attention_dim,
                "attention_head_dim": self.attention_head_dim,
                "norm_num_groups": self.norm_num_groups}


QUICK_RECIPE = DiffusersDigitsRecipe(block_out_channels=(8, 16), attention_head_dim=8,
                                     prompt_tokens=4, cross_attention_dim=16, updates=20,
                                     batch_size=32, warmup=5)


def prompt_table(recipe: DiffusersDigitsRecipe) -> torch.Tensor:
    """The fixed prompt embeddings, float32 (11, L, D), standard normal from
    `recipe.prompt_seed`: row c < 10 is digit c's prompt, row 10 the negative prompt."""
    g = torch.Generator().manual_seed(recipe.prompt_seed)
    return torch.randn(NUM_CLASSES + 1, recipe.prompt_tokens, recipe.cross_attention_dim,
                       generator=g)


def write_digits_npz(path, table: torch.Tensor) -> Path:
    """The `--data` file of the demo: the digits' training split (`load_dataset("digits",
    seed=0).train`, so the FID's held-out split stays unseen) as `latents` float32
    (N, 1, 8, 8), `prompt_embeds` float32 (N, L, D) = table[label], `negative_prompt_embeds`
    float32 (L, D) = table[10]. Written atomically; returns the path."""
    import numpy as np

    from fastdiff.engine.checkpoint import atomic_write
    from fastdiff.engine.data import load_dataset

    digits = load_dataset("digits", seed=0)
    arrays = {"latents": digits.train.numpy().astype(np.float32),
              "prompt_embeds": table[digits.train_labels].numpy().astype(np.float32),
              "negative_prompt_embeds": table[NEGATIVE_ROW].numpy().astype(np.float32)}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return atomic_write(Path(path), write)


def write_pipeline(folder, unet, scheduler, *, extra: dict | None = None) -> Path:
    """Write `unet` (UNet2DConditionModel) and `scheduler` as a diffusers pipeline folder
    (model_index.json naming StableDiffusionPipeline with only unet/ and scheduler/,
    safetensors weights), atomically; `extra` goes to `demo.json` beside them."""
    import diffusers

    from fastdiff.engine.checkpoint import atomic_dir

    index = {"_class_name": "StableDiffusionPipeline",
             "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", type(unet).__name__],
             "scheduler": ["diffusers", type(scheduler).__name__],
             "vae": [None, None], "text_encoder": [None, None], "tokenizer": [None, None],
             "safety_checker": [None, None], "feature_extractor": [None, None],
             "requires_safety_checker": False}

    def fill(tmp: Path) -> None:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        if extra is not None:
            (tmp / "demo.json").write_text(json.dumps(extra, indent=2))

    return atomic_dir(Path(folder), fill)


def _scheduler(recipe: DiffusersDigitsRecipe):
    import diffusers

    return diffusers.DDPMScheduler(num_train_timesteps=recipe.num_train_timesteps,
                                   beta_schedule=recipe.beta_schedule,
                                   prediction_type=recipe.prediction_type)


def diffusers_digits_teacher(cache=None, *, recipe: DiffusersDigitsRecipe = DiffusersDigitsRecipe(),
                             progress: bool = True, log=print) -> tuple[Path, Path]:
    """(teacher pipeline folder, data .npz) of the text-conditional digits teacher, trained
    once with `recipe` and cached as `cache/diffusers-digits-<key>/` (default cache:
    `cache_dir()`); later calls return the cached paths at once. An interrupted training
    resumes from `cache/diffusers-digits-<key>.state/`."""
    import shutil

    import diffusers

    from fastdiff.engine.data import load_dataset
    from fastdiff.eval.metrics import cache_dir
    from fastdiff.integrations.diffusers import load_diffusers_teacher
    from fastdiff.training import train_teacher

    root = Path(cache) if cache is not None else cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    stem = f"diffusers-digits-{recipe.key()}"
    folder, npz = root / stem, root / f"{stem}.npz"
    if not npz.is_file():
        write_digits_npz(npz, prompt_table(recipe))
    if (folder / "model_index.json").is_file() and (folder / "demo.json").is_file():
        return folder, npz
    init = root / f"{stem}.init"
    if not (init / "model_index.json").is_file():
        torch.manual_seed(recipe.seed)
        unet = diffusers.UNet2DConditionModel(**recipe.unet_config())
        write_pipeline(init, unet, _scheduler(recipe))
    teacher = load_diffusers_teacher(init)      # the user path: a pipeline folder
    data = load_dataset(npz, seed=0)            # ... and the .npz that --data takes
    t0 = time.perf_counter()
    trained = train_teacher(teacher, data, updates=recipe.updates,
                            batch_size=recipe.batch_size, lr=recipe.lr,
                            ema_decay=recipe.ema_decay, label_dropout=recipe.label_dropout,
                            warmup=recipe.warmup, seed=recipe.seed, progress=progress,
                            checkpoint_dir=root / f"{stem}.state")
    seconds = time.perf_counter() - t0
    n_params = sum(p.numel() for p in trained.unet.parameters())
    h = trained.train_history
    write_pipeline(folder, trained.unet, _scheduler(recipe),
                   extra={"recipe": asdict(recipe), "train_seconds": seconds,
                          "parameters": n_params,
                          "final_loss": h.loss[-1] if h.loss else None})
    log(f"fastdiff: trained the text-conditional digits teacher in {seconds:.0f} s "
        f"({n_params:,} parameters), cached at {folder}")
    shutil.rmtree(root / f"{stem}.state", ignore_errors=True)
    shutil.rmtree(init, ignore_errors=True)
    return folder, npz


class PromptLabels(nn.Module):
    """A text-conditional model called with class labels: `forward(z, t, y, **cond)` runs
    `model(z, t, encoder_hidden_states=table[y], **cond)`, the null label −1 taking the
    negative prompt (row 10), so the guided demo's scoring (labels, two-pass guidance with
    y = −1 as the null) applies unchanged. z float (B, 1, 8, 8); t float (B,); y int64 (B,);
    table float32 (11, L, D). `schedule` and `scalar_conds` are the model's."""

    def __init__(self, model: nn.Module, table: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("table", table.float())

    @property
    def schedule(self):
        return self.model.schedule

    @property
    def scalar_conds(self):
        return getattr(self.model, "scalar_conds", ())

    def forward(self, z, t, y=None, **cond):
        if y is None:
            raise ValueError("PromptLabels needs y (int64 (B,), -1 = the negative prompt)")
        y = torch.as_tensor(y, device=z.device).long()
        rows = torch.where(y < 0, torch.full_like(y, NEGATIVE_ROW), y)
        return self.model(z, t, encoder_hidden_states=self.table.to(z.device)[rows], **cond)


def _verdict(met: bool, margin: float, noise: float) -> str:
    """MET / MISSED, "(within noise)" when the margin to the threshold is under one sd."""
    v = "MET" if met else "MISSED"
    return f"{v} (within noise)" if noise == noise and abs(margin) < noise else v


def _load_avg() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def run_diffusers_demo(out="runs/diffusers-demo", *, ws=(0.0, 1.0, 2.0, 4.0),
                       reference_steps: int = 64, start_steps: int = 16, steps: int = 4,
                       stage1_updates: int = 5000, stage1_lr: float = 2e-3,
                       updates: int = 300, stochastic_updates: int | None = 1000,
                       lr: float = 5e-4, batch_size: int = 128,
                       w_check: float = 2.0, n_samples: int | None = None, draws: int = 3,
                       recipe: DiffusersDigitsRecipe | None = None, cache=None,
                       quick: bool = False, progress: bool = True, log=print) -> Path:
    """Guided distillation of the text-conditional digits teacher; writes `out/report.md`
    and `out/results.json`, returns the report's path.

    recipe / cache: the teacher (`diffusers_digits_teacher`; quick mode caches under
    `out/cache`). Stage 1 (`stage1_updates` at `stage1_lr`), stage 2 from `start_steps`
    DDIM steps to `steps` (`updates` per halving at `lr`) and the `steps`-step
    stochastic-sampler student (`stochastic_updates`; None: `updates`; from the 2·steps
    student) run as one
    `fastdiff distill --method guided` command into `out/distill/`. Scores: the mean (± sd)
    over `draws` fixed class-balanced noise sets of `n_samples` (default: the FID's
    reference size). Measures: the stage-1 student's `reference_steps`-step FID within 10%
    of the two-pass guided teacher's at every w in `ws`; at w = `w_check`, `steps` steps,
    the stochastic-trained student (stochastic sampler) at most half the teacher's DDIM FID
    with class accuracy within 5 points of the teacher's at `reference_steps`. `quick`:
    tiny teacher and a few updates (a test of the plumbing; numbers meaningless).
    """
    from fastdiff.apps.demo import eval_batch
    from fastdiff.engine.checkpoint import load, load_config
    from fastdiff.engine.samplers import sample
    from fastdiff.eval.metrics import DigitsFID
    from fastdiff.eval.report import markdown_table, save_grid, write_text
    from fastdiff.integrations.diffusers import load_diffusers_teacher

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if quick:
        recipe = recipe or QUICK_RECIPE
        ws, reference_steps, start_steps, steps = (0.0, 2.0), 8, 16, 4
        stage1_updates, updates, stochastic_updates, batch_size = 3, 2, 2, 16
        n_samples, draws = n_samples or 40, 1
        cache = cache if cache is not None else out / "cache"
    recipe = recipe or DiffusersDigitsRecipe()
    stochastic_updates = stochastic_updates or updates
    if w_check not in ws:
        raise ValueError(f"w_check {w_check} must be one of ws {tuple(ws)}")
    load_before = _load_avg()
    t_start = time.perf_counter()
    timings = {}
    metric = DigitsFID.load(verbose=progress)

    # -- the teacher: a pipeline folder and the .npz, trained once and cached ---------------
    t0 = time.perf_counter()
    folder, npz = diffusers_digits_teacher(cache, recipe=recipe, progress=progress, log=log)
    teacher_meta = json.loads((folder / "demo.json").read_text())
    timings["teacher_train"] = teacher_meta.get("train_seconds", float("nan"))
    timings["teacher_ready"] = time.perf_counter() - t0
    table = prompt_table(recipe)

    # -- stage 1, stage 2, the stochastic student: the command line ------------------------
    run_dir = out / "distill"
    argv = ["distill", "--method", "guided", "--teacher", str(folder), "--data", str(npz),
            "--out", str(run_dir), "--start-steps", str(start_steps),
            "--end-steps", str(steps), "--stochastic-steps", str(steps),
            "--updates", str(updates), "--stochastic-updates", str(stochastic_updates),
            "--lr", str(lr), "--stage1-updates",
            str(stage1_updates), "--stage1-lr", str(stage1_lr),
            "--batch-size", str(batch_size), "--seed", "0"]
    if not progress:
        argv.append("--quiet")
    command = "fastdiff " + " ".join(argv)
    log(f"running: {command}")
    t0 = time.perf_counter()
    # the command itself, in a child process (cli imports this module: no import cycle)
    rc = subprocess.run([sys.executable, "-m", "fastdiff", *argv]).returncode
    if rc:
        raise RuntimeError(f"`{command}` failed with exit status {rc}")
    timings["distill_command"] = time.perf_counter() - t0

    teacher = load_diffusers_teacher(folder).eval()
    stage1 = load(run_dir / "stage1").eval()
    s1_hist = load_config(run_dir / "stage1").get("metadata", {}).get("history", {})
    student = load(run_dir / "checkpoints" / f"student-{steps:05d}").eval()
    stoch = load(run_dir / "stochastic").eval()
    for m in (stage1, student, stoch):
        m.schedule = teacher.schedule
    as_labels = {name: PromptLabels(m, table).eval() for name, m in
                 (("teacher", teacher), ("stage1", stage1), ("student", student),
                  ("stochastic", stoch))}
    timings["stage1_train"] = s1_hist.get("wall_time", float("nan"))

    # -- scores --------------------------------------------------------------------------------
    n = n_samples or metric.n_reference
    batches = [eval_batch(n, seed=1234 + k) for k in range(draws)]

    def score(name, N, w, **kind):
        return score_guided(as_labels[name], batches, metric, N, w, **kind)

    t0 = time.perf_counter()
    teacher_ref, s1_ref, teacher_few, det, det_sto, sto_t = {}, {}, {}, {}, {}, {}
    for w in ws:
        teacher_ref[w] = score("teacher", reference_steps, w, guided_teacher=True)
        s1_ref[w] = score("stage1", reference_steps, w)
        teacher_few[w] = score("teacher", steps, w, guided_teacher=True)
        det[w] = score("student", steps, w)
        det_sto[w] = score("student", steps, w, stochastic=True)
        sto_t[w] = score("stochastic", steps, w, stochastic=True)
        log(f"w={w:g}: teacher {reference_steps} steps FID {format_score(teacher_ref[w])} "
            f"acc {teacher_ref[w][1]:.3f}; stage 1 {format_score(s1_ref[w])} acc "
            f"{s1_ref[w][1]:.3f}; {steps} steps: teacher {format_score(teacher_few[w])}, "
            f"stochastic-trained {format_score(sto_t[w])} acc {sto_t[w][1]:.3f}")
    timings["scoring"] = time.perf_counter() - t0

    # -- grids (rows = digits 0-9) -----------------------------------------------------------
    grid_noise, grid_labels = _grid_batch()
    grids = []
    for w in ws:
        wt = torch.full((len(grid_labels),), float(w))
        for name, kind, N in (("teacher", "teacher", reference_steps),
                              ("teacher", "teacher", steps), ("stage1", "w", reference_steps),
                              ("stochastic", "stochastic", steps)):
            m = as_labels[name]
            if kind == "teacher":
                g = sample(m, grid_noise, N, cond={"y": grid_labels}, guidance=float(w))
            elif kind == "stochastic":
                g = sample(m, grid_noise, N, sampler="stochastic",
                           cond={"y": grid_labels, "w": wt},
                           generator=torch.Generator().manual_seed(99))
            else:
                g = sample(m, grid_noise, N, cond={"y": grid_labels, "w": wt})
            file = f"{name}-{N}steps-w{w:g}.png"
            save_grid(g, out / file, nrow=10)
            grids.append((f"{name} {N} steps w={w:g}", file))

    # -- measures -------------------------------------------------------------------------------
    def sd_of(*parts):
        return float(sum(p * p for p in parts) ** 0.5)

    s1_err = {float(k): v for k, v in s1_hist.get("final_error", {}).items()}
    s1_init = {float(k): v for k, v in s1_hist.get("initial_error", {}).items()}
    measures, s1_rows = [], []
    for w in ws:
        t, s = teacher_ref[w], s1_ref[w]
        change = fid_ratio(s, t) - 1.0
        noise = sd_of(t[2], s[2]) / t[0]   # sd of the relative change (first order)
        verdict = _verdict(abs(change) <= 0.10, 0.10 - abs(change), noise)
        measures.append({"measure": f"stage-1 {reference_steps}-step FID vs two-pass teacher, "
                                    f"w={w:g}", "value": change, "target": "|change| <= 0.10",
                         "sd": noise, "verdict": verdict})
        s1_rows.append([w, s1_init.get(w), s1_err.get(w), format_score(t), format_score(s),
                        f"{100 * change:+.1f}% ± {100 * noise:.1f}", verdict, t[1], s[1]])
    s1_table = markdown_table(
        ["w", "rel. error before", "rel. error after", f"teacher {reference_steps}-step FID "
         "(2 passes/step)", f"stage-1 {reference_steps}-step FID (1 pass)",
         "relative FID change", "target |change| ≤ 10%", "teacher acc", "stage-1 acc"],
        s1_rows)

    t4, t_ref, r = teacher_few[w_check], teacher_ref[w_check], sto_t[w_check]
    rat = fid_ratio(r, t4)
    rat_sd = rat * sd_of(r[2] / r[0], t4[2] / t4[0]) if r[0] and t4[0] else float("nan")
    fid_verdict = _verdict(rat <= 0.5, 0.5 - rat, rat_sd)
    acc_gap = r[1] - t_ref[1]
    acc_verdict = "MET" if abs(acc_gap) <= 0.05 else "MISSED"
    measures.append({"measure": f"stochastic-trained {steps}-step student FID / teacher "
                                f"DDIM-{steps} FID, w={w_check:g}", "value": rat,
                     "target": "<= 0.5", "sd": rat_sd, "verdict": fid_verdict})
    measures.append({"measure": f"stochastic-trained {steps}-step student class accuracy - "
                                f"teacher's at {reference_steps} steps, w={w_check:g}",
                     "value": acc_gap, "target": "|gap| <= 0.05", "sd": float("nan"),
                     "verdict": acc_verdict})
    few_rows = []
    for w in ws:
        for label, res in ((f"teacher DDIM-{steps} (2 passes/step)", teacher_few[w]),
                           ("stage-2 student, DDIM", det[w]),
                           ("stage-2 student, stochastic sampler", det_sto[w]),
                           ("stochastic-trained student, stochastic sampler", sto_t[w])):
            few_rows.append([w, label, format_score(res), fid_ratio(res, teacher_few[w]),
                             res[1]])
    few_table = markdown_table(["w", f"{steps}-step model", "FID-digits",
                                f"/ teacher DDIM-{steps}", "class acc"], few_rows)

    total = time.perf_counter() - t_start
    load_after = _load_avg()
    ok = sum(m["verdict"].startswith("MET") for m in measures)
    quick_note = ("\n**Quick mode** (a plumbing test): tiny teacher, a few updates; the "
                  "numbers mean nothing.\n" if quick else "")
    text = f"""# fastdiff demo --diffusers: guided distillation of a text-conditional diffusers UNet
{quick_note}
Issue 16's quality measure: the measures of the native guided demo (`fastdiff demo --guided`)
on a tiny `diffusers.UNet2DConditionModel` teacher trained here on the 8×8 digits.

**Teacher**: UNet2DConditionModel `{json.dumps(recipe.unet_config())}`
({teacher_meta.get("parameters", 0):,} parameters), DDPMScheduler
({recipe.num_train_timesteps} timesteps, `{recipe.beta_schedule}` betas,
`{recipe.prediction_type}`), written as a pipeline folder (`{folder}`) and loaded with
`load_diffusers_teacher`; trained by `fastdiff.train_teacher` for {recipe.updates} updates
(batch {recipe.batch_size}, lr {recipe.lr}, EMA {recipe.ema_decay}) with prompt dropout
{recipe.label_dropout} to the negative prompt ({timings['teacher_train']:.0f} s when it was
trained; cached). **Prompts**: eleven fixed random sequences (L = {recipe.prompt_tokens},
D = {recipe.cross_attention_dim}; standard normal, seed {recipe.prompt_seed}): digit c's prompt
is row c, the negative prompt (guidance's null) row 10, a random sequence like the others.
**Data**: `{npz}` (latents = the digits' training split, prompt_embeds per example,
negative_prompt_embeds).

**Distillation** (the command line, one command):

    {command}

Stage 1: {stage1_updates} updates, lr {stage1_lr}, w ~ U[0, 4] through diffusers'
guidance embedding (`time_cond_proj_dim`, zero-initialised `cond_proj`); stage 2: PD
{start_steps} → {steps} steps, {updates} updates per halving, lr {lr}, batch {batch_size};
the {steps}-step stochastic-sampler student from the {2 * steps}-step one
({stochastic_updates} updates).

**Scores**: FID-digits, the Fréchet distance in the features of a small digit classifier
between {n} samples and the digits' training split (floor, held-out vs train:
{metric.floor:.3f}); **not Inception FID**. Mean ± sd over {draws} fixed class-balanced noise
draws; accuracy: the fraction the classifier reads as the prompted digit. Same noise for
every model; stochastic samplers use fixed generators. "Within noise": the margin to the
threshold is smaller than one sd of the measured quantity.

## Stage 1: one pass predicts the guided output

{s1_table}

Relative error ‖v̂_student(w) − v̂^w‖ / ‖v̂^w‖ on held-out z_t, before and after stage 1.

## {steps} steps

{few_table}

## Measures ({ok} of {len(measures)} met)

""" + "\n".join(f"- {m['measure']}: **{m['value']:.3f}**"
                + (f" ± {m['sd']:.3f}" if m['sd'] == m['sd'] else "")
                + f" (target {m['target']}): **{m['verdict']}**" for m in measures) + f"""

Stochastic-trained student at w = {w_check:g}: FID {format_score(r)} vs the teacher's
DDIM-{steps} {format_score(t4)} and {reference_steps}-step {format_score(t_ref)}; accuracy
{r[1]:.3f} vs {t_ref[1]:.3f} ({100 * acc_gap:+.1f} points).

## Cost

Distillation command {timings['distill_command']:.0f} s (stage 1
{timings['stage1_train']:.0f} s; reused stages count ~0), scoring {timings['scoring']:.0f} s,
whole run {total:.0f} s; {torch.get_num_threads()} thread(s) on {os.cpu_count()} CPUs; load
average {load_before} before, {load_after} after.

Grids (rows = digits 0–9): {", ".join(f"[{a}]({b})" for a, b in grids)}.
"""
    report = write_text(out / "report.md", text)

    def keyed(d):
        return {f"w={w:g}": list(v) for w, v in d.items()}

    write_text(out / "results.json", json.dumps({
        "teacher_reference": keyed(teacher_ref), "stage1_reference": keyed(s1_ref),
        "teacher_few_steps": keyed(teacher_few), "student_ddim": keyed(det),
        "student_stochastic_sampler": keyed(det_sto), "stochastic_trained": keyed(sto_t),
        "stage1_rel_error": {f"w={w:g}": v for w, v in s1_err.items()},
        "stage1_rel_error_initial": {f"w={w:g}": v for w, v in s1_init.items()},
        "measures": measures, "reference_steps": reference_steps, "steps": steps,
        "w_check": w_check, "floor": metric.floor, "n_samples": n, "draws": draws,
        "score_fields": ["fid_mean", "accuracy_mean", "fid_sd"], "command": command,
        "recipe": asdict(recipe), "timings": timings, "total_seconds": total,
        "threads": torch.get_num_threads(), "load_average_before": load_before,
        "load_average_after": load_after, "quick": quick}, indent=1, default=str))
    log(f"report: {report}")
    return report

