"""`torchrun ... -m fastdiff.apps.distributed COMMAND ...`: the CLI's distill and
train-teacher commands as ranks of a data-parallel job (primitives in
`fastdiff.engine.parallel`)."""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from fastdiff.engine.parallel import (
    DEFAULT_TIMEOUT_S,
    DistInfo,
    RankMismatchError,
    _env_int,
    cleanup,
    ddp_wrapper,
    init_from_env,
)

# --- entry point ---------------------------------------------------------------------------


def _say(info: DistInfo, msg: str) -> None:
    if info.is_main:
        print(msg, flush=True)


def _cmd_distill(args, info: DistInfo) -> None:
    from fastdiff.apps.cli import run_distill
    from fastdiff.engine.checkpoint import load
    from fastdiff.engine.data import load_dataset

    run_distill(load(args.teacher).to(info.device), load_dataset(args.data, seed=args.seed),
                args, rank=info.rank, world_size=info.world_size, device=info.device,
                wrap_student=ddp_wrapper(info.device) if info.world_size > 1 else None)


def _cmd_train_teacher(args, info: DistInfo) -> None:
    from fastdiff.engine.checkpoint import save
    from fastdiff.engine.data import load_dataset
    from fastdiff.engine.models import UNet, default_model_for
    from fastdiff.training import train_teacher

    data = load_dataset(args.data, seed=args.seed)
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts)
    if data.is_image and args.channels:
        c, h, _ = data.shape
        model = UNet(in_channels=c, image_size=h, channels=args.channels,
                     num_classes=data.num_classes)
    else:
        model = default_model_for(data.shape, num_classes=data.num_classes)
    wrap = ddp_wrapper(info.device) if info.world_size > 1 else None
    teacher = train_teacher(model, data, updates=args.updates, batch_size=args.batch_size,
                            lr=args.lr, label_dropout=args.label_dropout, seed=args.seed,
                            compile=args.compile, progress=not args.quiet and info.is_main,
                            device=info.device, rank=info.rank, world_size=info.world_size,
                            wrap_model=wrap)
    h = teacher.train_history
    if info.is_main:
        save(teacher, args.out, metadata={"data": args.data, "updates": args.updates,
                                          "train_seconds": h.wall_time,
                                          "world_size": info.world_size})
    _say(info, f"teacher saved to {args.out} ({h.wall_time:.0f} s, {h.samples_per_s:.0f} "
               f"samples/s on {info.world_size} rank(s), final loss {h.loss[-1]:.4f})")


COMMANDS = {"distill": _cmd_distill, "train-teacher": _cmd_train_teacher}


def main(argv=None) -> int:
    """`python -m fastdiff.apps.distributed [--timeout-s S] COMMAND ...` (under torchrun).

    COMMAND is `distill` or `train-teacher` with the flags of the `fastdiff` CLI. Exit codes:
    0 done, 2 a usage error, 1 a failed collective (another rank died or timed out): the
    process then exits at once, without tearing down the broken process group
    (`_exit_without_teardown`).
    """
    from fastdiff.apps.cli import USER_ERRORS, build_parser

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S,
                     help="seconds a collective waits for the other ranks before failing")
    own, rest = pre.parse_known_args(argv)
    parser = build_parser()
    parser.prog = "torchrun ... -m fastdiff.engine.parallel"
    parser.epilog = ("commands under torchrun: distill, train-teacher; option --timeout-s S "
                     f"(default {DEFAULT_TIMEOUT_S:.0f})")
    args = parser.parse_args(rest)
    if args.command not in COMMANDS:
        parser.error(f"{args.command!r} does not run under torchrun; use one of "
                     f"{sorted(COMMANDS)} (or the plain `fastdiff` command)")
    torch.set_num_threads(max(1, torch.get_num_threads() // max(1, _env_int(
        "LOCAL_WORLD_SIZE", 1))))
    rank = _env_int("RANK", 0)
    ok = False
    try:
        info = init_from_env(own.timeout_s)
        COMMANDS[args.command](args, info)
        ok = True
    except KeyboardInterrupt:
        print(f"fastdiff.apps.distributed: rank {rank}: interrupted (rerun the same command to "
              "resume)", file=sys.stderr)
        return 130
    except (*USER_ERRORS, RankMismatchError) as e:
        if args.debug:
            raise
        print(f"fastdiff.apps.distributed: rank {rank}: error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, dist.DistError) as e:
        if args.debug or not _is_comm_error(e):
            raise
        print(f"fastdiff.apps.distributed: rank {rank}: error: a collective failed, so another "
              f"rank died or stalled for more than {own.timeout_s:g} s ({_first_line(e)}). "
              "Rerun the same command to resume from the last checkpoint.", file=sys.stderr)
        _exit_without_teardown(1)
    finally:
        cleanup(sync=ok)
    return 0


def _exit_without_teardown(code: int) -> None:
    """Leave the process at once with `code`, skipping the process group's teardown.

    After a failed collective the group is broken: destroying it, or letting the interpreter
    destroy it at exit, can abort the process from gloo's threads (SIGABRT, "terminate called
    without an active exception", seen in the killed-rank test), which
    would hide the exit code and the message. Checkpoints are already whole on disk (atomic
    writes), so nothing is lost by not running destructors; output is flushed first.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _is_comm_error(e: BaseException) -> bool:
    if isinstance(e, dist.DistError):
        return True
    text = str(e).lower()
    return any(s in text for s in ("gloo", "nccl", "connection closed", "timed out",
                                   "connection reset", "broken pipe", "timeout"))


if __name__ == "__main__":
    sys.exit(main())
