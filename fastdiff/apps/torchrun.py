"""The `fastdiff` command as one rank of a torchrun job (primitives in
`fastdiff.engine.parallel`).

`under_torchrun()` recognises torchrun's environment; `run_rank` joins the process group,
runs one command with this rank's `Ranks` and maps what can go wrong to an exit code:
0 done, 2 a usage error (one line), 130 interrupted, 1 a failed collective (another rank
died or timed out), after which the process leaves at once without tearing the broken
process group down (`_exit_without_teardown`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Ranks:
    """Where one process stands in the job: `rank` of `world_size`, its `device` (None:
    the model's own) and `wrap` (None, or the DDP wrapper for the student / the teacher in
    training). Rank 0 alone prints and writes."""

    rank: int = 0
    world_size: int = 1
    device: object = None
    wrap: Callable | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def say(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    def agree(self, ok: bool) -> bool:
        """Whether every rank passes ok=True (a collective: also a barrier)."""
        if self.world_size == 1:
            return ok
        import torch
        import torch.distributed as dist

        flag = torch.tensor([int(ok)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())


ONE_PROCESS = Ranks()


def under_torchrun() -> bool:
    """Whether this process is one of several ranks torchrun started (it sets RANK,
    LOCAL_RANK and WORLD_SIZE; a WORLD_SIZE of 1 runs as a plain process)."""
    env = os.environ
    if not all(env.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return False
    try:
        return int(env["WORLD_SIZE"]) > 1
    except ValueError:
        return False


def run_rank(command: Callable, args, *, timeout_s: float | None, debug: bool,
             user_error: Callable) -> int:
    """Run `command(args, ranks)` as this rank; returns the exit code (or leaves the process
    with 1 after a failed collective). user_error(e): the one line for a user's error, None
    for anything else."""
    import torch
    import torch.distributed as dist

    from fastdiff.engine.parallel import (
        DEFAULT_TIMEOUT_S,
        _env_int,
        cleanup,
        ddp_wrapper,
        init_from_env,
    )

    timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    torch.set_num_threads(max(1, torch.get_num_threads() // max(1, _env_int(
        "LOCAL_WORLD_SIZE", 1))))
    rank = _env_int("RANK", 0)
    ok = False
    try:
        info = init_from_env(timeout_s)
        ranks = Ranks(info.rank, info.world_size, info.device,
                      ddp_wrapper(info.device) if info.world_size > 1 else None)
        command(args, ranks)
        ok = True
    except KeyboardInterrupt:
        print(f"fastdiff: rank {rank}: interrupted (rerun the same command to resume)",
              file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        line = None if isinstance(e, dist.DistError) else user_error(e)
        if line is not None:
            print(f"fastdiff: rank {rank}: error: {line}", file=sys.stderr)
            return 2
        if not _is_comm_error(e):
            raise
        print(f"fastdiff: rank {rank}: error: a collective failed, so another rank died or "
              f"stalled for more than {timeout_s:g} s ({_first_line(e)}). Rerun the same "
              "command to resume from the last checkpoint.", file=sys.stderr)
        _exit_without_teardown(1)
    finally:
        cleanup(sync=ok)
    return 0


def _exit_without_teardown(code: int) -> None:
    """Leave the process at once with `code`, skipping the process group's teardown.

    After a failed collective the group is broken: destroying it, or letting the interpreter
    destroy it at exit, can abort the process from gloo's threads (SIGABRT, "terminate called
    without an active exception", seen in the killed-rank test), which would hide the exit
    code and the message. Checkpoints are already whole on disk (atomic writes), so nothing
    is lost by not running destructors; output is flushed first.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _is_comm_error(e: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(e, dist.DistError):
        return True
    if not isinstance(e, RuntimeError):
        return False
    text = str(e).lower()
    return any(s in text for s in ("gloo", "nccl", "connection closed", "timed out",
                                   "connection reset", "broken pipe", "timeout"))
