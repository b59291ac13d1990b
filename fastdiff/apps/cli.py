"""The `fastdiff` command line: train-teacher, distill, sample, eval, demo, profile, compare.

Errors in what the user asked for are printed as one line (`fastdiff: error: …`, exit 2),
not as a traceback; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, PermissionError, KeyError)


def _steps_list(text: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"step counts must be positive integers, got {text!r}")
    return values


def _load_model(path):
    from fastdiff.engine.checkpoint import load

    return load(path)


def _is_digits(dataset) -> bool:
    return dataset.name == "digits"


# --- train-teacher ----------------------------------------------------------------------------


def cmd_train_teacher(args) -> None:
    import torch

    from fastdiff.engine.checkpoint import save
    from fastdiff.engine.data import load_dataset
    from fastdiff.engine.models import UNet, default_model_for
    from fastdiff.training import train_teacher

    data = load_dataset(args.data, seed=args.seed)
    torch.manual_seed(args.seed)
    if data.is_image and args.channels:
        c, h, _ = data.shape
        model = UNet(in_channels=c, image_size=h, channels=args.channels,
                     num_classes=data.num_classes)
    else:
        model = default_model_for(data.shape, num_classes=data.num_classes)
    teacher = train_teacher(model, data, updates=args.updates, batch_size=args.batch_size,
                            lr=args.lr, label_dropout=args.label_dropout, seed=args.seed,
                            compile=args.compile, progress=not args.quiet)
    h = teacher.train_history
    save(teacher, args.out, metadata={"data": args.data, "updates": args.updates,
                                      "train_seconds": h.wall_time})
    print(f"teacher saved to {args.out} ({h.wall_time:.0f} s, {h.samples_per_s:.0f} samples/s, "
          f"final loss {h.loss[-1]:.4f})")


# --- distill ------------------------------------------------------------------------------------


def cmd_distill(args) -> None:
    from fastdiff.engine.data import load_dataset

    run_distill(_load_model(args.teacher), load_dataset(args.data, seed=args.seed), args)


def run_distill(teacher, data, args, *, rank: int = 0, world_size: int = 1, wrap_student=None,
                device=None) -> None:
    """`distill`'s work, in one process or as one rank under torchrun (`fastdiff.engine.parallel`:
    rank, world_size, wrap_student, device); only rank 0 prints and writes."""
    from fastdiff.engine.checkpoint import save
    from fastdiff.methods.pd import progressive_distill, round_summary

    parallel = {"rank": rank, "world_size": world_size, "wrap_student": wrap_student,
                "device": device}
    if args.guided:
        from fastdiff.methods.guided import distill_guided_cli

        distill_guided_cli(teacher, data, args, **parallel)
        return

    def say(msg):
        if rank == 0:
            print(msg, flush=True)

    out = Path(args.out)
    results = progressive_distill(
        teacher, data, start_steps=args.start_steps, end_steps=args.end_steps,
        updates=args.updates, batch_size=args.batch_size, lr=args.lr, weighting=args.weighting,
        tolerance=args.tolerance, patience=args.patience, eval_every=args.eval_every,
        checkpoint_dir=out / "checkpoints", checkpoint_every=args.checkpoint_every,
        seed=args.seed, compile=args.compile, progress=not args.quiet and rank == 0,
        on_round=lambda result: say(round_summary(result)), **parallel)
    final = results[-1]
    if rank == 0:
        save(final.student, out / "student",
             metadata={"steps": final.steps, "world_size": world_size})
    ranks = f" ({world_size} ranks, global batch {args.batch_size})" if world_size > 1 else ""
    say(f"student for {final.steps} step(s) saved to {out / 'student'}{ranks}")


# --- sample ------------------------------------------------------------------------------------


def cmd_sample(args) -> None:
    import torch

    from fastdiff.engine.samplers import guidance_inputs, sample
    from fastdiff.eval.report import save_grid, save_scatter

    model = _load_model(args.model)
    shape = _example_shape(model)
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.n, *shape, generator=g)
    cond = {}
    if getattr(model, "num_classes", 0):
        labels = (torch.full((args.n,), args.label, dtype=torch.long) if args.label is not None
                  else torch.arange(args.n) % model.num_classes)
        cond = {"y": labels}
    cond, guidance = guidance_inputs(model, cond, args.guidance, args.n)
    x = sample(model, noise, args.steps, sampler=args.sampler, cond=cond, guidance=guidance,
               generator=g)
    out = Path(args.out)
    if len(shape) == 1:
        save_scatter(x, out, title=f"{args.steps} steps, {args.sampler}")
    else:
        save_grid(x, out, nrow=10 if cond else None)
    print(f"wrote {out}")


def _example_shape(model):
    cfg = getattr(model, "config", {})
    if cfg.get("kind") == "unet":
        return (cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    if cfg.get("kind") == "mlp":
        return (cfg["dim"],)
    raise ValueError("cannot tell the sample shape of this model: expected a fastdiff UNet/MLP")


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
    if args.guided:
        from fastdiff.apps.guided_demo import run_guided_demo

        run_guided_demo(args.out, progress=not args.quiet)
        return
    from fastdiff.apps.demo import DEMO_UPDATES, run_demo

    run_demo(args.out, start_steps=args.start_steps,
             updates=args.updates if args.updates else DEMO_UPDATES, progress=not args.quiet)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastdiff",
        description="Distil slow diffusion models into few-step samplers "
                    "(progressive distillation, guided distillation, SFD).")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp):
        sp.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")

    t = sub.add_parser("train-teacher", help="train a v-prediction teacher on a data set",
                       description="Train a diffusion teacher (v-prediction, cosine schedule, "
                                   "EMA, label dropout for guidance) and save it.")
    t.add_argument("--data", default="digits",
                   help="built-in name (digits, photo-patches, eight_gaussians, two_moons, "
                        "checkerboard) or a path to an image folder / .npy / .npz")
    t.add_argument("--out", required=True, help="checkpoint folder to write")
    t.add_argument("--updates", type=int, default=6000, help="optimizer updates")
    t.add_argument("--batch-size", type=int, default=128, help="examples per update")
    t.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    t.add_argument("--label-dropout", type=float, default=0.1,
                   help="probability of the null label, for classifier-free guidance")
    t.add_argument("--channels", type=int, default=0,
                   help="UNet base width (0: the default model for the data)")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    common(t)
    t.set_defaults(func=cmd_train_teacher)

    d = sub.add_parser("distill", help="progressive distillation of a teacher",
                       description="Halve the teacher's DDIM step count round by round "
                                   "(Salimans & Ho 2022); resumable: rerun the same command "
                                   "after a crash.")
    d.add_argument("--teacher", required=True, help="teacher checkpoint folder (fastdiff.save)")
    d.add_argument("--data", default="digits", help="the data the teacher was trained on")
    d.add_argument("--out", required=True, help="run folder (checkpoints and the student)")
    d.add_argument("--start-steps", type=int, default=64, help="teacher steps (power of two)")
    d.add_argument("--end-steps", type=int, default=1, help="final student steps (power of two)")
    d.add_argument("--updates", type=int, default=800, help="most updates per round")
    d.add_argument("--batch-size", type=int, default=128, help="examples per update")
    d.add_argument("--lr", type=float, default=5e-4,
                   help="AdamW learning rate, annealed linearly to 0 in each round")
    d.add_argument("--weighting", default="snr_trunc", choices=["snr_trunc", "snr+1", "const"],
                   help="loss weighting (DESIGN.md §2)")
    d.add_argument("--tolerance", type=float, default=None,
                   help="end a round early when the held-out mismatch improves by less than "
                        "this relative amount for --patience evaluations")
    d.add_argument("--patience", type=int, default=3, help="evaluations without improvement")
    d.add_argument("--eval-every", type=int, default=100, help="updates between evaluations")
    d.add_argument("--checkpoint-every", type=int, default=200,
                   help="updates between crash-safe checkpoints")
    d.add_argument("--compile", action="store_true", help="torch.compile the student")
    d.add_argument("--guided", action="store_true",
                   help="guided distillation (Meng et al.): w-conditioned student, then halving")
    d.add_argument("--w-min", type=float, default=0.0, help="smallest guidance weight (guided)")
    d.add_argument("--w-max", type=float, default=4.0, help="largest guidance weight (guided)")
    d.add_argument("--stage1-updates", type=int, default=4000,
                   help="updates of guided stage 1 (the one-pass w-conditioned model)")
    d.add_argument("--stage1-lr", type=float, default=1e-3,
                   help="peak AdamW learning rate of guided stage 1")
    common(d)
    d.set_defaults(func=cmd_distill)

    s = sub.add_parser("sample", help="write a PNG grid (images) or scatter plot (2-D)")
    s.add_argument("--model", required=True, help="checkpoint folder")
    s.add_argument("--steps", type=int, default=8, help="sampling steps")
    s.add_argument("--n", type=int, default=100, help="number of samples")
    s.add_argument("--sampler", default="ddim",
                   choices=["ddim", "ddpm", "euler", "heun", "dpmpp_2m", "dpmpp_3m",
                            "stochastic"], help="sampler")
    s.add_argument("--label", type=int, default=None,
                   help="class label for every sample (default: 0..9 cycling)")
    s.add_argument("--guidance", type=float, default=None, help="classifier-free guidance w")
    s.add_argument("--out", default="samples.png", help="PNG to write")
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
    e.add_argument("--n", type=int, default=2000, help="samples (2-D data)")
    common(e)
    e.set_defaults(func=cmd_eval)

    m = sub.add_parser("demo", help="the whole pipeline on the digits, with a report",
                       description="Train (or reuse) the digits teacher, distil 64 -> 1 steps, "
                                   "write runs/demo/report.md.")
    m.add_argument("--out", default="runs/demo", help="run folder")
    m.add_argument("--start-steps", type=int, default=64, help="teacher steps to start from")
    m.add_argument("--updates", type=int, default=None,
                   help="updates per halving (default: 300, 300, 400, 600, 800, 1000 for "
                        "64->32 ... 2->1; later rounds get more)")
    m.add_argument("--guided", action="store_true", help="the guided-distillation demo")
    common(m)
    m.set_defaults(func=cmd_demo)

    for module in ("fastdiff.apps.profile", "fastdiff.apps.compare"):
        try:
            mod = __import__(module, fromlist=["add_parser"])
        except ImportError:
            continue
        mod.add_parser(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("fastdiff: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"fastdiff: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
