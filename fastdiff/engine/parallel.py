"""Data-parallel training on many GPUs / machines with torch.distributed (run under torchrun).

The engine is PyTorch's own: a process group from torchrun's environment (NCCL on CUDA, gloo
on CPU), the student in DistributedDataParallel, the teacher replicated and frozen (plain
module: no DDP wrapper, no gradient buckets, it never sees a collective). The training
runner (`fastdiff.training.runner`) does the rest, for every method (`distill_round`,
`progressive_distill`, `train_teacher`, `distill_guidance`, `distill_stochastic`,
`distill_sfd` take `rank`, `world_size` and `wrap_student` (`wrap_model` in train_teacher)):

- every update's randomness is drawn for the GLOBAL batch from a hash of (seed, round,
  update) and each rank keeps its slice `[rank·B/K, (rank+1)·B/K)`, so K ranks with global
  batch B see exactly the examples, times and noise one process with batch B sees; DDP
  averages the per-rank gradients of the per-rank mean loss, which is the gradient of the
  global mean. Results equal a single-process run up to float summation order;
- only rank 0 writes checkpoints and shows progress; losses and held-out metrics are
  averaged across ranks; every rank resumes from the same checkpoint file (the checkpoint
  folder must be on a file system every node sees) and the ranks check that they agree on
  where they resume;
- every collective has a timeout (`init_from_env(timeout_s=...)`): a rank that dies closes
  its sockets, so the others fail at their next collective ("Connection closed by peer" on
  gloo, a NCCL error); a rank that hangs makes the others fail after `timeout_s`. With
  NCCL, `TORCH_NCCL_ASYNC_ERROR_HANDLING=3` (set here unless the user set it) lets the
  watchdog abort the communicator and tear the process down instead of hanging in a CUDA
  kernel. torchrun then stops the remaining workers; rerunning the same command resumes.

Entry point: the `fastdiff` command itself, which detects torchrun's environment::

    torchrun --nproc-per-node=8 -m fastdiff distill --teacher T --data D --out O
    torchrun --nproc-per-node=8 -m fastdiff distill --method guided --teacher T ...
    torchrun --nproc-per-node=8 -m fastdiff train-teacher --data D --out T
"""

from __future__ import annotations

import datetime
import hashlib
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank in [0, world_size), GPU index on its node, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool          # rank == 0: the one process that writes files and prints
    backend: str | None    # "nccl", "gloo" or None (single process, no process group)


def _env_int(name: str, default=None) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S, *, backend: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT); a single process (rank 0 of 1, no group) when those are not set.

    backend: None picks NCCL when CUDA is available, gloo otherwise. timeout_s (seconds):
    how long any collective, and the initial rendezvous, waits for the other ranks before
    raising; keep it above the longest stretch one rank spends alone (rank 0 writing a
    checkpoint, a slow first torch.compile). Calling it again returns the same answer.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    cuda = torch.cuda.is_available()
    local_rank = _env_int("LOCAL_RANK", 0)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device,
                        dist.get_rank() == 0, dist.get_backend())
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if world <= 1:
        if cuda:
            torch.cuda.set_device(device)
        return DistInfo(0, 1, local_rank, device, True, None)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with "
                         "torchrun (it sets them) or set them yourself")
    backend = backend or ("nccl" if cuda else "gloo")
    if backend == "nccl":
        # 3 = abort the communicator and the process on a failed/timed-out collective
        # (1 = abort, 2 = cleanup only, 0 = hang); see docs of ProcessGroupNCCL.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if backend == "nccl" else None)
    return DistInfo(rank, world, local_rank, device, rank == 0, backend)


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(x):
    """Mean over ranks of a float or a tensor (any shape; returned on x's device, x's dtype).

    The identity outside a process group. Every rank must call it, in the same order.
    """
    if not is_distributed():
        return x
    is_tensor = torch.is_tensor(x)
    t = (x.detach() if is_tensor else torch.tensor(float(x), dtype=torch.float64))
    buf = t.to(_comm_device(), torch.float64 if not t.is_floating_point() else t.dtype,
               copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    buf /= dist.get_world_size()
    return buf.to(t.device, t.dtype) if is_tensor else float(buf)


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` (the same shape on each) concatenated along dim 0 in rank order,
    on x's device, x's dtype: the global batch from the per-rank slices.

    The identity outside a process group. Every rank must call it, in the same order.
    """
    if not is_distributed():
        return x
    buf = x.detach().to(_comm_device()).contiguous()
    parts = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, buf)
    return torch.cat(parts).to(x.device)


class RankMismatchError(RuntimeError):
    """The ranks disagree on something they must share (e.g. where to resume)."""


def _comparable(v) -> int:
    """An int for check_same: ints as they are, strings (e.g. a stage's name) by a hash."""
    if isinstance(v, str):
        return int.from_bytes(hashlib.blake2b(v.encode(), digest_size=7).digest(), "little")
    return int(v)


def check_same(values, what: str):
    """Raise unless every rank passes the same int, str or tuple of them (e.g. the stage and
    the update a resume starts at; strings are compared by a hash). A collective: also a
    barrier. Returns values.
    """
    if not is_distributed():
        return values
    vals = [_comparable(v) for v in (values if isinstance(values, (tuple, list)) else (values,))]
    t = torch.tensor(vals + [-v for v in vals], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    hi, lo = t[:len(vals)].tolist(), (-t[len(vals):]).tolist()
    if hi != lo:
        raise RankMismatchError(
            f"ranks disagree on {what}: values range from {lo} to {hi} (this rank: {values!r}). "
            "Every rank must see the same checkpoint folder: put it on a file system shared "
            "by all nodes")
    return values


def barrier() -> None:
    """Wait for every rank (subject to the process group's timeout). No-op without a group."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def cleanup(sync: bool = True) -> None:
    """Leave the process group (call once at the end of every rank).

    sync: meet the other ranks at a barrier first. Tearing gloo down while a peer is still
    communicating can abort the process ("terminate called without an active exception");
    pass False on an error path, where a dead peer would make the barrier wait for the
    timeout.
    """
    if dist.is_available() and dist.is_initialized():
        if sync:
            dist.barrier()
        dist.destroy_process_group()


def ddp_wrapper(device, *, find_unused_parameters: bool = False,
                broadcast_buffers: bool = False, bucket_cap_mb: float = 25.0):
    """`wrap_student` for fastdiff's loops: `module -> DistributedDataParallel(module)`.

    The wrapper averages gradients across ranks during backward (bucketed all-reduce,
    overlapped with the backward pass), so gradient clipping and the optimizer step, which
    run after backward on the plain module, see the global gradient. At construction DDP
    broadcasts rank 0's parameters and buffers. broadcast_buffers=False: fastdiff's models
    have only constant buffers, so no per-forward broadcast is needed (set True for models
    with running statistics). find_unused_parameters: set True only for a model with
    parameters that get no gradient in some updates (it costs a graph traversal each
    update). Only the student is wrapped; the teacher is used as a plain module.
    """
    device = torch.device(device)
    if not is_distributed():
        raise RuntimeError("ddp_wrapper needs a process group of >1 rank: call "
                           "init_from_env() under torchrun first")
    from torch.nn.parallel import DistributedDataParallel as DDP

    _DDP_ARGS = inspect.signature(DDP.__init__).parameters

    def wrap(module: nn.Module) -> nn.Module:
        kw = dict(device_ids=[device.index] if device.type == "cuda" else None,
                  bucket_cap_mb=bucket_cap_mb, find_unused_parameters=find_unused_parameters,
                  gradient_as_bucket_view=True)
        if "forward_sync_buffers" in _DDP_ARGS:  # torch >= 2.13 renamed broadcast_buffers
            kw["forward_sync_buffers"] = broadcast_buffers
        else:
            kw["broadcast_buffers"] = broadcast_buffers
        return DDP(module, **kw)

    return wrap


def fsdp_wrapper(*, min_params: int = 1_000_000, reshard_after_forward: bool = True,
                 param_dtype: torch.dtype | None = None,
                 reduce_dtype: torch.dtype | None = None):
    """A sharding wrapper (FSDP2 `fully_shard`) for a model too large to replicate.

    Bottom-up, every submodule (with a forward) holding at least `min_params` parameters
    not already in a sharded descendant becomes one FSDP unit, then the root takes the
    rest. Each rank then holds
    1/K of the parameters, gradients and AdamW state (16 bytes/param → 16/K in fp32), and
    all-gathers one block's parameters at a time in forward and backward (reduce-scatter of
    gradients). param_dtype/reduce_dtype: FSDP mixed precision (e.g. torch.bfloat16 /
    torch.float32).

    Limits (see the README section): fully_shard replaces the module's parameters IN PLACE
    by sharded DTensors, so (1) build the optimizer after wrapping; (2) code that reads
    parameters as plain tensors must gather them: `full_state_dict(module)` (a collective:
    every rank calls it) for checkpoints, `p.full_tensor()` for an EMA; (3) a sharded
    module's forward is a collective: every rank must call it, the same number of times.
    fastdiff's `distill_round` builds its optimizer, EMA and rank-0 checkpoints on the
    plain student, so it refuses a sharding `wrap_student` (NotImplementedError); what it
    does accept is an FSDP-sharded frozen TEACHER (with an explicit plain `student`), which
    cuts the teacher's memory to 1/K (tested on gloo). Use fsdp_wrapper for the student in
    your own loop.
    """
    if not is_distributed():
        raise RuntimeError("fsdp_wrapper needs a process group of >1 rank: call "
                           "init_from_env() under torchrun first")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)

    def visit(m: nn.Module) -> int:
        """Shard m's submodules bottom-up; return m's parameter count not yet sharded."""
        left = sum(p.numel() for p in m.parameters(recurse=False))
        for child in m.children():
            n = visit(child)
            has_forward = type(child).forward is not nn.Module.forward  # not a ModuleList
            if n >= min_params and has_forward:
                fully_shard(child, reshard_after_forward=reshard_after_forward, mp_policy=mp)
            else:
                left += n
        return left

    def wrap(module: nn.Module) -> nn.Module:
        visit(module)
        return fully_shard(module, reshard_after_forward=reshard_after_forward, mp_policy=mp)

    return wrap


def full_state_dict(module: nn.Module, *, cpu: bool = True) -> dict:
    """The full (unsharded) state dict of a module, FSDP-sharded or not.

    A collective when the module holds DTensors (every rank must call it); every rank gets
    the full tensors (on CPU unless cpu=False).
    """
    out = {}
    for k, v in module.state_dict().items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k] = v.detach().cpu() if cpu else v.detach()
    return out
