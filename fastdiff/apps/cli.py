"""The `fastdiff` command line: train-teacher, distill (pd, guided, sfd), export and encode
(diffusers pipelines), sample, eval, demo, profile, compare.

`distill --teacher` takes a fastdiff checkpoint or a diffusers pipeline folder; with a
Stable-Diffusion-style (text-conditional) teacher, `--data` is the latents/prompt_embeds
`.npz` that `encode` builds, and `export` writes the student back as a pipeline folder.

Errors in what the user asked for (bad flags, a missing or corrupt checkpoint, any OSError,
an `--out` that cannot be written, a run that diverged) are printed as one line,
`fastdiff: error: …` naming the path where there is one, exit 2, not as a traceback;
`--debug` shows the traceback.

The same command runs as every rank of a torchrun job (`torchrun --nproc-per-node=K -m
fastdiff distill ...`): `main` sees torchrun's environment and runs train-teacher / distill
data-parallel (`fastdiff.apps.torchrun`); rank 0 alone prints and writes.
"""

from __future__ import annotations

import argparse
import math
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path

from fastdiff.apps.torchrun import ONE_PROCESS, Ranks, run_rank, under_torchrun

USER_ERRORS = (ValueError, TypeError, KeyError, OSError)
TORCHRUN_COMMANDS = ("distill", "train-teacher")
MAX_STEPS = 100_000  # sampling steps: more is a typo, and would allocate a grid that long


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (and where to read more)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _policy(text: str):
    """--policy: "auto", "off", or choices such as "teacher_compile=on,student_bf16=off"
    (the fields of fastdiff.training.policy.Policy; on/off/auto each)."""
    from fastdiff.training.policy import FIELDS

    if text in ("auto", "off"):
        return text
    values = {"on": True, "off": False, "auto": None}
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in FIELDS or value not in values:
            raise argparse.ArgumentTypeError(
                f"expected auto, off or NAME=on|off|auto,... with NAME one of "
                f"{', '.join(FIELDS)}; got {part!r}")
        out[name] = values[value]
    return out


def _positive_int(text: str, *, most: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1 or (most is not None and value > most):
        bound = f" at most {most}" if most is not None else ""
        raise argparse.ArgumentTypeError(f"expected a positive integer{bound}, got {text!r}")
    return value


def _steps(text: str) -> int:
    return _positive_int(text, most=MAX_STEPS)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text!r}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}")
    return value


def _steps_list(text: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1 or max(values) > MAX_STEPS:
        raise argparse.ArgumentTypeError(
            f"step counts must be integers from 1 to {MAX_STEPS}, got {text!r}")
    return values


def _load_model(path):
    from fastdiff.engine.checkpoint import load

    return load(path)


def _is_diffusers_folder(path) -> bool:
    """A diffusers pipeline or UNet folder (not a fastdiff checkpoint)."""
    from fastdiff.engine.checkpoint import is_checkpoint

    p = Path(path)
    if not p.is_dir() or is_checkpoint(p):
        return False
    return (p / "model_index.json").is_file() or (p / "unet").is_dir() or \
        (p / "diffusion_pytorch_model.safetensors").is_file()


def _load_teacher(path):
    """A fastdiff checkpoint (`fastdiff.load`), or a diffusers pipeline folder
    (`load_diffusers_teacher`: model_index.json with unet/ and scheduler/)."""
    if _is_diffusers_folder(path):
        from fastdiff.integrations.diffusers import load_diffusers_teacher

        return load_diffusers_teacher(path)
    return _load_model(path)


def _check_data_fits(teacher, data) -> None:
    """One clear line when the data's examples or conditions cannot go into the teacher."""
    shape = getattr(teacher, "example_shape", None)
    if shape is not None and data is not None and tuple(data.shape) != tuple(shape):
        raise ValueError(f"--data {data.name}: examples have shape {tuple(data.shape)} but the "
                         f"teacher's UNet takes {tuple(shape)} (latents (C, H, W) of its "
                         "sample_size)")
    if data is not None and getattr(teacher, "is_conditional_unet", False) \
            and not data.conditioned:
        raise ValueError(f"--data {data.name}: a text-conditional (UNet2DConditionModel) "
                         "teacher needs a .npz with latents and prompt_embeds (see fastdiff "
                         "encode)")
    if data is not None and data.conditioned:
        dim = getattr(getattr(teacher, "unet", None), "config", {}).get("cross_attention_dim")
        emb = data.train_conds.get("encoder_hidden_states")
        if isinstance(dim, int) and emb is not None and emb.shape[-1] != dim:
            raise ValueError(f"--data {data.name}: prompt_embeds have width {emb.shape[-1]} "
                             f"but the teacher's cross_attention_dim is {dim}")


def _is_digits(dataset) -> bool:
    return dataset.name == "digits"


# --- train-teacher ----------------------------------------------------------------------------


@contextmanager
def _claimed(args, ranks: Ranks, owned):
    """Hold `--out` for this command (`fastdiff.apps.outdir.claim_out`, on rank 0); every
    rank stops with one line when rank 0 cannot claim it."""
    from fastdiff.apps.outdir import claim_out

    with ExitStack() as stack:
        failed = None
        try:
            stack.enter_context(claim_out(args.out, owned=owned,
                                          overwrite=getattr(args, "overwrite", False),
                                          writer=ranks.is_main, say=ranks.say))
        except Exception as e:  # every rank must hear of it before anyone trains
            failed = e
        if not ranks.agree(failed is None):
            raise failed or ValueError(f"rank 0 cannot write to --out {args.out} (see its "
                                       "error)")
        yield Path(args.out)


def cmd_train_teacher(args, ranks: Ranks = ONE_PROCESS) -> None:
    """`fastdiff train-teacher`: train into `--out` (model.safetensors, config.json; its
    training state in `--out/checkpoints/teacher.state`, so a rerun resumes), as one process
    or as rank `ranks` of a torchrun job."""
    import torch

    from fastdiff.apps.outdir import TEACHER_FILES
    from fastdiff.engine.checkpoint import save
    from fastdiff.engine.data import load_dataset
    from fastdiff.engine.models import UNet, default_model_for
    from fastdiff.training import train_teacher

    with _claimed(args, ranks, TEACHER_FILES) as out:
        data = load_dataset(args.data, seed=args.seed)
        torch.manual_seed(args.seed)  # the same initial weights on every rank
        if data.is_image and args.channels:
            c, h, _ = data.shape
            model = UNet(in_channels=c, image_size=h, channels=args.channels,
                         num_classes=data.num_classes)
        else:
            model = default_model_for(data.shape, num_classes=data.num_classes)
        teacher = train_teacher(
            model, data, updates=args.updates, batch_size=args.batch_size, lr=args.lr,
            label_dropout=args.label_dropout, seed=args.seed, compile=args.compile,
            policy=args.policy,
            progress=not args.quiet and ranks.is_main, device=ranks.device, rank=ranks.rank,
            world_size=ranks.world_size, wrap_model=ranks.wrap,
            checkpoint_dir=out / "checkpoints", checkpoint_every=args.checkpoint_every)
        h = teacher.train_history
        if ranks.is_main:
            save(teacher, out, metadata={"data": args.data, "updates": args.updates,
                                         "train_seconds": h.wall_time,
                                         "world_size": ranks.world_size})
        on = f" on {ranks.world_size} ranks" if ranks.world_size > 1 else ""
        ranks.say(f"teacher saved to {out} ({h.wall_time:.0f} s, {h.samples_per_s:.0f} "
                  f"samples/s{on}, final loss {h.loss[-1]:.4f})")


# --- distill ------------------------------------------------------------------------------------


def cmd_distill(args, ranks: Ranks = ONE_PROCESS) -> None:
    """`fastdiff distill --method pd|guided|sfd`: claim `--out`, load the teacher (and the
    data, except for the data-free sfd), then `run_distill`."""
    from fastdiff.apps.distill import distill_method, run_distill
    from fastdiff.apps.outdir import DISTILL_FILES
    from fastdiff.engine.data import load_dataset

    method = distill_method(args)
    with _claimed(args, ranks, DISTILL_FILES):
        teacher = _load_teacher(args.teacher)
        if ranks.device is not None:
            teacher = teacher.to(ranks.device)
        text = getattr(teacher, "is_conditional_unet", False)
        # sfd is data-free: a text-conditional teacher takes only the prompt embeddings
        data = None if method == "sfd" and not text else load_dataset(args.data,
                                                                       seed=args.seed)
        if method != "sfd":
            _check_data_fits(teacher, data)
        elif data is not None and not data.conditioned:
            raise ValueError(f"--data {data.name}: --method sfd with a text-conditional "
                             "teacher needs a .npz with prompt_embeds (see fastdiff encode)")
        run_distill(teacher, data, args, rank=ranks.rank, world_size=ranks.world_size,
                    wrap_student=ranks.wrap, device=ranks.device)


def run_distill(teacher, data, args, *, rank: int = 0, world_size: int = 1, wrap_student=None,
                device=None) -> None:
    """`distill`'s work, in one process or as one rank under torchrun; only rank 0 prints and
    writes (`fastdiff.apps.distill.run_distill`, imported on use: `fastdiff --help` stays
    quick)."""
    from fastdiff.apps.distill import run_distill as run

    run(teacher, data, args, rank=rank, world_size=world_size, wrap_student=wrap_student,
        device=device)


# --- export / encode ----------------------------------------------------------------------------


def cmd_export(args) -> None:
    """`fastdiff export`: a distilled diffusers student as a stock diffusers pipeline folder
    (`fastdiff.integrations.diffusers.export_pipeline`)."""
    from fastdiff.engine.checkpoint import load_config
    from fastdiff.integrations.diffusers import export_pipeline

    model = _load_model(args.model)
    meta = load_config(args.model).get("metadata", {})
    steps = args.steps if args.steps is not None else meta.get("steps")
    if steps is None:
        raise ValueError(f"--steps: {args.model} records no step count; say how many steps "
                         "the student takes")
    if meta.get("steps") is not None and args.steps is not None and args.steps != meta["steps"]:
        raise ValueError(f"--steps {args.steps}: {args.model} was distilled for "
                         f"{meta['steps']} steps")
    out = export_pipeline(model, args.out, steps=int(steps), teacher_folder=args.teacher,
                          overwrite=args.overwrite, times=meta.get("times"),
                          afs=bool(meta.get("afs")), sampler=meta.get("sampler", "ddim"))
    guided = " (guidance_scale = 1 + w)" if "w" in getattr(model, "scalar_conds", ()) else ""
    print(f"wrote {out}: load it with StableDiffusionPipeline.from_pretrained (or "
          f"DDIMPipeline) and run num_inference_steps={steps}{guided}")


def cmd_encode(args) -> None:
    """`fastdiff encode`: an image folder with captions as the latents/prompt_embeds .npz."""
    from fastdiff.integrations.diffusers import encode_folder

    out = encode_folder(args.pipeline, args.images, args.out,
                        negative_prompt=args.negative_prompt, batch_size=args.batch_size)
    print(f"wrote {out}")


# --- sample ------------------------------------------------------------------------------------


def cmd_sample(args) -> None:
    import torch

    from fastdiff.engine.samplers import guidance_inputs, sample
    from fastdiff.eval.report import save_grid, save_scatter

    model = _load_model(args.model)
    shape = _example_shape(model)
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.n, *shape, generator=g)
    cond = _text_cond(model, args.data, args.n)
    if getattr(model, "num_classes", 0):
        labels = (torch.full((args.n,), args.label, dtype=torch.long) if args.label is not None
                  else torch.arange(args.n) % model.num_classes)
        cond["y"] = labels
    if args.guidance is not None and "encoder_hidden_states" in cond \
            and "w" not in getattr(model, "scalar_conds", ()):
        raise ValueError("--guidance of a text-conditional model needs a guidance-distilled "
                         "student (w as an input); for the teacher itself use the exported "
                         "pipeline's guidance_scale = 1 + w")
    cond, guidance = guidance_inputs(model, cond, args.guidance, args.n)
    x = sample(model, noise, args.steps, sampler=args.sampler, cond=cond, guidance=guidance,
               generator=g)
    out = Path(args.out)
    if out.suffix == ".npz":   # latents as they are (e.g. for the pipeline's VAE)
        import numpy as np

        from fastdiff.engine.checkpoint import atomic_write

        def write(tmp):
            with open(tmp, "wb") as f:   # a file object: np.savez would append ".npz"
                np.savez(f, latents=x.float().numpy())

        atomic_write(out, write)
    elif len(shape) == 1:
        save_scatter(x, out, title=f"{args.steps} steps, {args.sampler}")
    else:
        save_grid(x if x.shape[1] in (1, 3) else x[:, :3] if x.shape[1] > 3 else x[:, :1], out,
                  nrow=10 if "y" in cond or "encoder_hidden_states" in cond else None)
    print(f"wrote {out}")


def _example_shape(model):
    cfg = getattr(model, "config", {})
    if cfg.get("kind") == "unet":
        return (cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    if cfg.get("kind") == "mlp":
        return (cfg["dim"],)
    unet_cfg = getattr(getattr(model, "unet", None), "config", None)
    if unet_cfg is not None:   # a diffusers UNet (fastdiff.integrations.diffusers)
        size = unet_cfg.get("sample_size")
        if size is None:
            raise ValueError("this diffusers UNet's config has no sample_size: cannot tell "
                             "the sample shape")
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (unet_cfg["in_channels"], h, w)
    raise ValueError("cannot tell the sample shape of this model: expected a fastdiff UNet/MLP "
                     "or a diffusers UNet")


def _text_cond(model, data, n: int) -> dict:
    """{"encoder_hidden_states": (n, L, D)} for a text-conditional diffusers model: the
    prompt embeddings of `data` (an .npz with prompt_embeds, as `fastdiff encode` writes),
    example i taking prompt i mod N; {} for other models."""
    if not getattr(model, "is_conditional_unet", False) \
            or getattr(model, "default_encoder_hidden_states", None) is not None:
        return {}
    if not data:
        raise ValueError("this model is text-conditional: give --data FILE.npz with "
                         "prompt_embeds (N, L, D) (fastdiff encode writes one)")
    import numpy as np
    import torch

    try:
        with np.load(data) as f:
            e = torch.from_numpy(np.asarray(f["prompt_embeds"], dtype=np.float32))
    except KeyError:
        raise ValueError(f"{data} has no prompt_embeds for this text-conditional model") \
            from None
    if e.ndim != 3 or not len(e):
        raise ValueError(f"{data}: prompt_embeds must be (N, L, D), got {tuple(e.shape)}")
    return {"encoder_hidden_states": e[torch.arange(n) % len(e)]}


# --- eval ----------------------------------------------------------------------------------


def cmd_eval(args) -> None:
    import torch

    from fastdiff.engine.data import load_dataset
    from fastdiff.engine.samplers import sample
    from fastdiff.eval.metrics import DigitsFID, energy_distance, sliced_wasserstein
    from fastdiff.eval.report import markdown_table

    model = _load_model(args.model)
    data = load_dataset(args.data, seed=0)
    rows = []
    if _is_digits(data):
        metric = DigitsFID.load()
        from fastdiff.apps.demo import digits_fid, eval_batch

        if args.guidance is not None and not getattr(model, "num_classes", 0):
            raise ValueError("--guidance needs a class-conditional model")
        for n in args.steps:
            fid, x = digits_fid(model, n, metric, sampler=args.sampler, guidance=args.guidance)
            labels = eval_batch(len(x))[1]
            accuracy = (metric.class_accuracy(x, labels) if getattr(model, "num_classes", 0)
                        else None)
            rows.append([n, args.sampler, fid, accuracy, metric.floor])
        print(markdown_table(["steps", "sampler", "FID-digits", "class accuracy", "floor"],
                             rows))
        return
    if data.shape != (2,):
        raise ValueError(f"eval knows FID-digits (digits) and 2-D metrics; got {data.name!r}")
    if args.guidance is not None:
        raise ValueError("--guidance is for class-conditional digits models")
    g = torch.Generator().manual_seed(args.seed)
    true = data.sample_true(args.n, generator=g) if data.has_true_sampler else data.held_out
    noise = torch.randn(args.n, 2, generator=g)
    for n in args.steps:
        x = sample(model, noise, n, sampler=args.sampler, generator=g)
        rows.append([n, args.sampler, float(sliced_wasserstein(x, true)),
                     float(energy_distance(x, true))])
    print(markdown_table(["steps", "sampler", "sliced Wasserstein", "energy distance"], rows))


# --- demo ------------------------------------------------------------------------------------


def cmd_demo(args) -> None:
    if args.guided and args.diffusers:
        raise ValueError("--guided and --diffusers are two demos; choose one")
    if args.diffusers:
        from fastdiff.apps.diffusers_demo import run_diffusers_demo

        out = args.out if args.out != "runs/demo" else "runs/diffusers-demo"
        run_diffusers_demo(out, quick=args.quick, progress=not args.quiet)
        return
    if args.guided:
        from fastdiff.apps.guided_demo import run_guided_demo

        run_guided_demo(args.out, progress=not args.quiet)
        return
    from fastdiff.apps.demo import DEMO_UPDATES, run_demo

    run_demo(args.out, start_steps=args.start_steps,
             updates=args.updates if args.updates else DEMO_UPDATES, progress=not args.quiet)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="fastdiff",
        description="Distil slow diffusion models into few-step samplers "
                    "(progressive distillation, guided distillation, SFD). Under torchrun "
                    "(torchrun --nproc-per-node=K -m fastdiff COMMAND ...), train-teacher and "
                    "distill run data-parallel.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    timeout = {"type": _positive_float, "metavar": "S",
               "help": "under torchrun: seconds a collective waits for the other ranks before "
                       "the job stops (default: fastdiff.engine.parallel.DEFAULT_TIMEOUT_S)"}
    p.add_argument("--timeout-s", default=None, **timeout)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp):
        sp.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")

    def policy_flag(sp):
        sp.add_argument("--policy", type=_policy, default="auto",
                        help="speed levers for the frozen teacher and the student: auto "
                             "(default: decided from the device and a short measurement "
                             "against the round's length, recorded in the history), off "
                             "(plain eager fp32), or e.g. teacher_compile=on,student_bf16=off")

    def writes(sp, what):
        sp.add_argument("--overwrite", action="store_true",
                        help=f"start over: remove the {what} of an earlier run in --out "
                             "(fastdiff's own files only) instead of resuming or reusing it")
        # also after the command (as `-m fastdiff.apps.distributed` always took it)
        sp.add_argument("--timeout-s", default=argparse.SUPPRESS, **timeout)

    t = sub.add_parser("train-teacher", help="train a v-prediction teacher on a data set",
                       description="Train a diffusion teacher (v-prediction, cosine schedule, "
                                   "EMA, label dropout for guidance) and save it into --out "
                                   "(model.safetensors, config.json; other files there are "
                                   "kept); resumable: rerun the same command after a crash.")
    t.add_argument("--data", default="digits",
                   help="built-in name (digits, photo-patches, eight_gaussians, two_moons, "
                        "checkerboard) or a path to an image folder / .npy / .npz")
    t.add_argument("--out", required=True, help="checkpoint folder to write")
    t.add_argument("--updates", type=_positive_int, default=6000, help="optimizer updates")
    t.add_argument("--batch-size", type=_positive_int, default=128,
                   help="examples per update (all ranks together)")
    t.add_argument("--lr", type=_positive_float, default=2e-3, help="peak AdamW learning rate")
    t.add_argument("--label-dropout", type=_probability, default=0.1,
                   help="probability of the null label, for classifier-free guidance")
    t.add_argument("--channels", type=int, default=0,
                   help="UNet base width (0: the default model for the data)")
    t.add_argument("--checkpoint-every", type=_positive_int, default=500,
                   help="updates between crash-safe checkpoints (in --out/checkpoints)")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    policy_flag(t)
    writes(t, "teacher and its training state")
    common(t)
    t.set_defaults(func=cmd_train_teacher)

    d = sub.add_parser("distill", help="distil a teacher: pd, guided or sfd",
                       description="Distil a teacher into a few-step student. pd (default): "
                                   "halve the teacher's DDIM step count round by round "
                                   "(Salimans & Ho 2022); guided: a w-conditioned one-pass "
                                   "model, then halving (Meng et al. 2023); sfd: train the "
                                   "--student-steps student along the teacher's trajectories, "
                                   "data-free (Zhou et al. 2024). Resumable: rerun the same "
                                   "command after a crash.")
    d.add_argument("--teacher", required=True, help="teacher checkpoint folder (fastdiff.save)")
    d.add_argument("--method", choices=["pd", "guided", "sfd"], default=None,
                   help="distillation method (default pd)")
    d.add_argument("--data", default="digits",
                   help="the data the teacher was trained on (pd, guided; sfd needs none)")
    d.add_argument("--out", required=True, help="run folder (checkpoints and the student)")
    d.add_argument("--start-steps", type=_steps, default=64,
                   help="teacher steps (power of two; pd, guided)")
    d.add_argument("--end-steps", type=_steps, default=1,
                   help="final student steps (power of two; pd, guided)")
    d.add_argument("--updates", type=_positive_int, default=800,
                   help="most updates per round (pd, guided); updates in all (sfd)")
    d.add_argument("--batch-size", type=_positive_int, default=128,
                   help="examples per update (all ranks together)")
    d.add_argument("--lr", type=_positive_float, default=None,
                   help="AdamW learning rate (pd, guided: annealed linearly to 0 in each round, "
                        "default 5e-4; sfd: constant, default fastdiff.distill_sfd's)")
    d.add_argument("--weighting", default="snr_trunc", choices=["snr_trunc", "snr+1", "const"],
                   help="loss weighting (DESIGN.md §2; pd, guided)")
    d.add_argument("--tolerance", type=float, default=None,
                   help="end a round early when the held-out mismatch improves by less than "
                        "this relative amount for --patience evaluations")
    d.add_argument("--patience", type=_positive_int, default=3,
                   help="evaluations without improvement")
    d.add_argument("--eval-every", type=_positive_int, default=100,
                   help="updates between evaluations")
    d.add_argument("--checkpoint-every", type=_positive_int, default=200,
                   help="updates between crash-safe checkpoints")
    d.add_argument("--compile", action="store_true", help="torch.compile the student")
    policy_flag(d)
    d.add_argument("--guided", action="store_true",
                   help="the same as --method guided (Meng et al.): w-conditioned student, "
                        "then halving")
    d.add_argument("--w-min", type=float, default=0.0, help="smallest guidance weight (guided)")
    d.add_argument("--w-max", type=float, default=4.0, help="largest guidance weight (guided)")
    d.add_argument("--stage1-updates", type=_positive_int, default=4000,
                   help="updates of guided stage 1 (the one-pass w-conditioned model)")
    d.add_argument("--stage1-lr", type=_positive_float, default=1e-3,
                   help="peak AdamW learning rate of guided stage 1")
    d.add_argument("--student-steps", type=_steps, default=4,
                   help="network calls per sample of the SFD student (sfd)")
    d.add_argument("--teacher-substeps", type=_positive_int, default=4,
                   help="teacher solver steps per student interval (sfd)")
    d.add_argument("--solver", default="dpmpp_3m",
                   help="the teacher's ODE solver (sfd; fastdiff.engine.solvers.METHODS)")
    d.add_argument("--afs", action="store_true",
                   help="analytical first step: the student's first step costs no network "
                        "call (sfd)")
    d.add_argument("--stochastic-steps", type=_steps, default=None,
                   help="guided: also train the N-step stochastic-sampler student from the "
                        "2N-step stage-2 student (written to --out/stochastic)")
    d.add_argument("--stochastic-updates", type=_positive_int, default=None,
                   help="guided: updates of the stochastic-sampler student (default: "
                        "--updates)")
    d.add_argument("--gradient-checkpointing", action="store_true",
                   help="diffusers teachers: recompute the student UNet's activations in the "
                        "backward pass (diffusers' own checkpointing; less memory)")
    d.add_argument("--teacher-dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="guided stage 1: the frozen pretrained teacher's weights (auto: bf16 "
                        "on CUDA devices that have it, else fp32); the student stays fp32")
    writes(d, "students and checkpoints")
    common(d)
    d.set_defaults(func=cmd_distill)

    x = sub.add_parser("export", help="a distilled diffusers student as a diffusers pipeline",
                       description="Write a distilled diffusers student (fastdiff checkpoint) "
                                   "as a folder StableDiffusionPipeline.from_pretrained loads: "
                                   "the student UNet, a DDIMScheduler (trailing spacing), the "
                                   "teacher's VAE, text encoder and tokenizer.")
    x.add_argument("--model", required=True, help="the student (fastdiff checkpoint folder)")
    x.add_argument("--steps", type=_steps, default=None,
                   help="the student's step count (default: the one it was distilled for)")
    x.add_argument("--out", required=True, help="pipeline folder to write")
    x.add_argument("--teacher", default=None,
                   help="the teacher's pipeline folder to copy vae/, text_encoder/, tokenizer/ "
                        "from (default: the folder the teacher was loaded from)")
    x.add_argument("--overwrite", action="store_true",
                   help="replace a pipeline folder an earlier export wrote")
    x.set_defaults(func=cmd_export)

    n = sub.add_parser("encode", help="images + captions -> latents/prompt_embeds .npz",
                       description="Encode an image folder (each image with a caption in a "
                                   ".txt file of the same name) with a pipeline's VAE (x its "
                                   "scaling_factor) and text encoder into the .npz that "
                                   "distill --data takes.")
    n.add_argument("--pipeline", required=True, help="diffusers pipeline folder")
    n.add_argument("--images", required=True, help="folder of images with .txt captions")
    n.add_argument("--out", required=True, help=".npz file to write")
    n.add_argument("--negative-prompt", default="",
                   help="the null prompt of classifier-free guidance (default: empty)")
    n.add_argument("--batch-size", type=_positive_int, default=16, help="images per batch")
    n.set_defaults(func=cmd_encode)

    s = sub.add_parser("sample", help="write a PNG grid (images) or scatter plot (2-D)")
    s.add_argument("--model", required=True, help="checkpoint folder")
    s.add_argument("--steps", type=_steps, default=8, help="sampling steps")
    s.add_argument("--n", type=_positive_int, default=100, help="number of samples")
    s.add_argument("--sampler", default="ddim",
                   choices=["ddim", "ddpm", "euler", "heun", "dpmpp_2m", "dpmpp_3m",
                            "stochastic"], help="sampler")
    s.add_argument("--label", type=int, default=None,
                   help="class label for every sample (default: 0..9 cycling)")
    s.add_argument("--guidance", type=float, default=None, help="classifier-free guidance w")
    s.add_argument("--data", default=None,
                   help="a text-conditional diffusers model: .npz with prompt_embeds (sample i "
                        "takes prompt i mod N)")
    s.add_argument("--out", default="samples.png",
                   help="PNG to write (or .npz: the samples/latents as an array)")
    common(s)
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("eval", help="quality table at several step counts")
    e.add_argument("--model", required=True, help="checkpoint folder")
    e.add_argument("--data", default="digits", help="data set to compare with")
    e.add_argument("--steps", type=_steps_list, default=[1, 2, 4, 8, 16, 32, 64],
                   help="comma-separated step counts")
    e.add_argument("--sampler", default="ddim", help="sampler")
    e.add_argument("--guidance", type=float, default=None,
                   help="guidance weight w (digits): classifier-free guidance for a teacher, "
                        "the w input of a guidance-distilled student")
    e.add_argument("--n", type=_positive_int, default=2000, help="samples (2-D data)")
    common(e)
    e.set_defaults(func=cmd_eval)

    m = sub.add_parser("demo", help="the whole pipeline on the digits, with a report",
                       description="Train (or reuse) the digits teacher, distil 64 -> 1 steps, "
                                   "write runs/demo/report.md.")
    m.add_argument("--out", default="runs/demo", help="run folder")
    m.add_argument("--start-steps", type=_steps, default=64,
                   help="teacher steps to start from")
    m.add_argument("--updates", type=_positive_int, default=None,
                   help="updates per halving (default: 300, 300, 400, 600, 800, 1000 for "
                        "64->32 ... 2->1; later rounds get more)")
    m.add_argument("--guided", action="store_true", help="the guided-distillation demo")
    m.add_argument("--diffusers", action="store_true",
                   help="guided distillation of a tiny text-conditional diffusers "
                        "UNet2DConditionModel teacher (issue 16's quality report; default "
                        "--out runs/diffusers-demo)")
    m.add_argument("--quick", action="store_true",
                   help="with --diffusers: a tiny teacher and a few updates (a plumbing "
                        "test; the numbers mean nothing)")
    common(m)
    m.set_defaults(func=cmd_demo)

    for module in ("fastdiff.apps.profile", "fastdiff.apps.compare"):
        try:
            mod = __import__(module, fromlist=["add_parser"])
        except ImportError:
            continue
        mod.add_parser(sub)
    return p


def user_error(e: BaseException) -> str | None:
    """The one line `main` prints for `e` when it is the user's error (what they asked for
    cannot be done: bad input, a file that is missing, unreadable or unwritable, a run that
    diverged), with the path where there is one; None for anything else (a bug: traceback).
    """
    from safetensors import SafetensorError

    from fastdiff.training.runner import NonFiniteError  # the runner's non-finite guard

    kinds = [*USER_ERRORS, SafetensorError, NonFiniteError]
    if "torch.distributed" in sys.modules:
        from fastdiff.engine.parallel import RankMismatchError

        kinds.append(RankMismatchError)
    if not isinstance(e, tuple(kinds)):
        return None
    if isinstance(e, OSError) and e.strerror:
        text = e.strerror  # "[Errno 13]" says nothing more; the paths go after the reason
        paths = [str(f) for f in (e.filename, e.filename2) if f is not None]
        if paths and paths[0] not in text:
            text += ": " + " -> ".join(paths)
    else:
        text = str(e) if not isinstance(e, KeyError) else f"missing key {e}"
    return " ".join(text.split()) or type(e).__name__


def main(argv=None, *, distributed: bool | None = None) -> int:
    """`fastdiff COMMAND ...`; returns the exit code (0 done, 2 an error, 130 interrupted).

    distributed: run as one rank of a torchrun job (None: when torchrun's environment says
    so, `fastdiff.apps.torchrun.under_torchrun`); train-teacher and distill only.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if distributed is None:
        distributed = under_torchrun()
    if distributed:
        if args.command not in TORCHRUN_COMMANDS:
            parser.error(f"{args.command!r} does not run under torchrun; use one of "
                         f"{', '.join(TORCHRUN_COMMANDS)} (or run it as one process)")
        return run_rank(args.func, args, timeout_s=args.timeout_s, debug=args.debug,
                        user_error=user_error)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("fastdiff: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    except Exception as e:
        line = None if args.debug else user_error(e)
        if line is None:
            raise
        print(f"fastdiff: error: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
