"""The one training runner every method uses (DESIGN.md §4c).

A method hands `run` a `Method`: its student, `draw(generator, global_batch)` for one
update's inputs, `loss(model, batch)`, an optional held-out `measure(model)` and the
settings that define it. The runner owns the rest, written once here:

- update k's generator is a pure function of (seed, method name, k) (`update_generator`);
  `draw` fills the GLOBAL batch from it and the runner keeps this rank's slice, so K ranks
  see what one process sees and a resumed run needs no iterator state;
- AdamW (fused where torch has it), the LR schedule (warm-up, then linear decay to 0 or
  constant), gradient-norm clipping, the EMA;
- the non-finite guard: an update whose loss or gradient norm is not finite is skipped (no
  optimizer step, optimizer state untouched, no EMA update) without a host sync — fused
  AdamW takes the flag as `found_inf`, the EMA weight is multiplied by it; skips are read
  back with the losses every `LOG_EVERY` updates, counted in the history and the progress
  line, and `max_skips` consecutive ones stop the run with `NonFiniteError`;
- atomic checkpoints (safetensors + JSON, no pickle) every `checkpoint_every` updates and at
  the end, bit-exact resume, and a settings fingerprint that refuses another run's state;
- the held-out measure every `eval_every` updates, the convergence rule and the history;
- DDP wrapping (rank 0 alone writes and shows progress), precision and compile policy, NVTX
  phases.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

import torch
from torch import nn

from fastdiff.engine.checkpoint import (
    CheckpointError,
    flatten_state_dict,
    load_state,
    rng_state,
    save_state,
    set_rng_state,
    unflatten_state_dict,
)
from fastdiff.engine.models import checked_output
from fastdiff.engine.nvtx import phase
from fastdiff.training.parts import (
    EMA,
    LOG_EVERY,
    Progress,
    _unwrap,
    check_global_batch,
    linear_lr,
    make_optimizer,
    model_device,
)
from fastdiff.training.policy import (
    Policy,
    apply,
    decide,
    legacy_request,
    with_forced,
)

#: a round expected to take less than this eager (seconds) is not measured for the policy:
#: no compile (25 s or more here, DESIGN §5) can pay back on it
SHORT_ROUND_S = 30.0


class NonFiniteError(RuntimeError):
    """Too many consecutive updates had a non-finite loss or gradient norm."""


@dataclass
class Method:
    """What a method hands the runner.

    Args:
        name: the stage's tag, e.g. "pd64"; names the RNG stream and the progress bar.
        student: the module to train (the runner moves it to the device, trains it in place).
        draw: `draw(generator, global_batch) -> batch`: one update's inputs for the GLOBAL
            batch, from `generator` alone (CPU tensors are fine). A batch is a tensor, a
            dict or a dataclass of tensors (and other values); the runner slices every
            tensor whose first dimension is `global_batch` to this rank's part and moves
            it to the device.
        loss: `loss(model, batch) -> scalar tensor`: the training loss, differentiable
            through `model` (the student, possibly compiled or DDP-wrapped).
        settings: JSON-able values that define the run (its fingerprint, with the runner's
            own); a checkpoint made under other settings is refused, naming the differences.
        measure: `measure(model) -> float`, a held-out error of a model (lower is better),
            taken on the untrained student and then on the EMA every `eval_every` updates.
        carry / restore: state the method carries across updates (SFD's trajectories), as
            `carry() -> {name: tensor}` and `restore({name: tensor})`, saved in checkpoints.
        teacher: the frozen teacher `teacher(z, t, **cond) -> v`, for a method that has one.
            The runner prepares it under the run's policy (`fastdiff.training.policy`: no
            grad, and compiled, bf16 or channels_last where that pays; outputs in z's dtype)
            and then calls `loss(model, batch, teacher)` with the prepared one. A plain
            callable (not an nn.Module) is passed through as it is.
        teacher_calls: teacher forwards per update at the batch size (for the policy's cost
            model); inputs: `inputs(batch) -> (teacher_call, student_call)`, each `(args,
            kwargs)` of one network call on this update's batch (for the policy's
            measurement; None, or returning None: nothing is measured, undecided choices off).
    """

    name: str
    student: nn.Module
    draw: Callable
    loss: Callable
    settings: dict = field(default_factory=dict)
    measure: Callable | None = None
    carry: Callable | None = None
    restore: Callable | None = None
    teacher: Callable | None = None
    teacher_calls: int = 2
    inputs: Callable | None = None


@dataclass
class RunConfig:
    """The runner's own settings.

    Args:
        updates: optimizer updates in all; batch_size: the global batch (all ranks).
        lr: AdamW peak learning rate; warmup: linear warm-up updates; decay: "linear" (to 0
            at `updates`, the PD recipe) or "constant"; weight_decay, betas of AdamW.
        ema_decay: EMA of the weights (None: the result is the raw weights).
        grad_clip: gradient-norm clipping (None or 0: none).
        seed: the run's seed (every update's generator derives from it).
        eval_every: updates between held-out measures; tolerance, patience: stop when the
            measure has not improved by a relative `tolerance` for `patience` evaluations.
        checkpoint: the training-state file (None: no checkpoints); checkpoint_every:
            updates between checkpoints (one is also written at the end).
        max_skips: consecutive non-finite updates that stop the run.
        policy: precision and compile choices for the teacher and the student
            (`fastdiff.training.policy.Policy`, a dict of some of its fields, or None /
            "auto": decide each from the device and, on CPU, a short measurement on the real
            networks against the round's length). Recorded in `history.policy`; a resumed
            run keeps the choices it made. autocast: "bf16" / "fp32" forces both networks'
            precision (None: decide); compile: True or a mode name forces the student's
            torch.compile (False: decide).
        horizon: the updates networks of this architecture will train for in this process
            from this run on, later rounds included (None: `updates`); the policy spreads a
            reusable teacher compile over them (`policy.decide(horizon=)`). Not part of the
            fingerprint: it changes speed, not what is trained.
        progress: show a bar (rank 0 only); rank, world_size, wrap_student: data
            parallelism (e.g. `fastdiff.engine.parallel.ddp_wrapper(device)`); device.
        on_eval: `on_eval(update, value)` after each held-out measure.
    """

    updates: int
    batch_size: int
    lr: float
    warmup: int = 0
    decay: str = "linear"
    weight_decay: float = 0.0
    ema_decay: float | None = 0.999
    grad_clip: float | None = 1.0
    seed: int = 0
    eval_every: int = 100
    tolerance: float | None = None
    patience: int = 3
    checkpoint: Path | str | None = None
    checkpoint_every: int = 200
    max_skips: int = 20
    policy: object = None
    autocast: object = None
    compile: bool | str = False
    horizon: int | None = None
    progress: bool = True
    rank: int = 0
    world_size: int = 1
    wrap_student: Callable | None = None
    device: object = None
    on_eval: Callable | None = None

    def check(self) -> None:
        for name in ("updates", "batch_size", "eval_every", "checkpoint_every", "max_skips"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) \
                or self.warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite positive number, got {self.lr!r}")
        if self.decay not in ("linear", "constant"):
            raise ValueError(f"decay must be 'linear' or 'constant', got {self.decay!r}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) or None, got {self.ema_decay!r}")
        if self.grad_clip is not None and not self.grad_clip >= 0:
            raise ValueError(f"grad_clip must be >= 0 or None, got {self.grad_clip!r}")
        if self.tolerance is not None and not self.tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0 or None, got {self.tolerance!r}")
        check_global_batch(self.batch_size, self.world_size)
        with_forced(Policy.parse(self.policy), **legacy_request(self.autocast, self.compile))

    def fingerprint(self) -> dict:
        """The settings that change what is trained (not where or how it is shown)."""
        keep = ("updates", "batch_size", "lr", "warmup", "decay", "weight_decay", "ema_decay",
                "grad_clip", "seed", "eval_every", "tolerance", "patience", "world_size")
        return {k: getattr(self, k) for k in keep}


@dataclass
class History:
    """What a run cost and reached (times in seconds, evaluation time excluded).

    loss: the training loss per update (None where the update was skipped);
    skipped: the indices of skipped (non-finite) updates; eval_updates / eval_times /
    heldout: each held-out measure's update, training time and value; initial: the
    measure of the untrained student; stopped_by: "updates" or "converged"; resumed_from:
    the update a rerun resumed at (0: fresh); policy: the precision/compile choices made.
    """

    loss: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    eval_updates: list = field(default_factory=list)
    eval_times: list = field(default_factory=list)
    heldout: list = field(default_factory=list)
    initial: float | None = None
    wall_time: float = 0.0
    eval_time: float = 0.0
    samples_per_s: float = 0.0
    updates_done: int = 0
    stopped_by: str = ""
    resumed_from: int = 0
    policy: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)      # a method's own records

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class RunResult:
    student: nn.Module       # EMA weights (raw weights without EMA), eval mode
    history: History


def update_generator(seed: int, tag: str, k: int) -> torch.Generator:
    """The RNG for update k of stage `tag`: a hash of (seed, tag, k), independent of history."""
    digest = hashlib.blake2b(f"{seed}/{tag}/{k}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def fingerprint_tensors(*objects) -> str:
    """A short hash of modules' state dicts and tensors (teacher weights, data), in order."""
    h = hashlib.blake2b(digest_size=12)
    for obj in objects:
        if isinstance(obj, nn.Module):
            items = sorted(_unwrap(obj).state_dict().items())
        elif torch.is_tensor(obj):
            items = [("", obj)]
        elif obj is None:
            items = [("none", torch.zeros(0))]
        else:
            h.update(json.dumps(obj, sort_keys=True, default=str).encode())
            continue
        for name, t in items:
            if hasattr(t, "full_tensor"):   # a sharded (FSDP) parameter: a collective
                t = t.full_tensor()
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def frozen_teacher_and_student(teacher, student: nn.Module | None = None):
    """What every distillation starts from: the teacher's module frozen (eval mode, no
    gradients; None for a plain callable), the student to train (a deep copy of the teacher
    unless one is given), and what the fingerprint records of the student's start ("teacher",
    or the given student's weights). Returns (teacher_module, student, start_from)."""
    teacher_module = _unwrap(teacher) if isinstance(teacher, nn.Module) else None
    if teacher_module is not None:
        teacher_module.eval().requires_grad_(False)
    start_from = fingerprint_tensors(student) if student is not None else "teacher"
    if student is None:
        if teacher_module is None:
            raise TypeError("a plain-callable teacher needs an explicit `student` module")
        student = copy.deepcopy(teacher_module)
    return teacher_module, student, start_from


def check_fingerprint(path, saved: dict, now: dict, what: str) -> None:
    """Raise CheckpointError naming every setting where `saved` and `now` differ."""
    if saved == now:
        return
    keys = sorted(set(saved) | set(now))
    diff = {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}
    raise CheckpointError(
        f"{path} {what} (saved vs now: {diff}); rerun with the original settings, or start "
        f"over (--overwrite, or another checkpoint folder)")


def json_safe(settings: dict) -> dict:
    """Settings as JSON values (others by str, non-finite floats as None), so that they
    compare equal after a reload and strict JSON writers accept them."""

    def finite(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, list):
            return [finite(v) for v in x]
        return x

    return finite(json.loads(json.dumps(settings, sort_keys=True, default=str)))


def slice_batch(batch, global_batch: int, rank: int, world: int, device):
    """This rank's slice of every tensor of the global batch, moved to `device`."""
    per = global_batch // world
    sl = slice(rank * per, (rank + 1) * per)

    def part(x):
        if torch.is_tensor(x):
            if world > 1 and x.ndim and x.shape[0] == global_batch:
                x = x[sl]
            return x.to(device, non_blocking=True) if device is not None else x
        if isinstance(x, dict):
            return {k: part(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(part(v) for v in x)
        if is_dataclass(x) and not isinstance(x, type):
            return type(x)(**{f.name: part(getattr(x, f.name)) for f in fields(x)})
        return x

    return part(batch)


def _mean_over_ranks(x, world_size: int):
    if world_size == 1:
        return x
    from fastdiff.engine.parallel import all_reduce_mean

    return all_reduce_mean(x)


def _all_ranks_ok(ok: torch.Tensor, world_size: int) -> torch.Tensor:
    """ok on every rank (a collective, no host sync): the ranks skip together."""
    if world_size == 1:
        return ok
    import torch.distributed as dist

    flag = ok.to(torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag.bool()


def guarded_update(loss: torch.Tensor, model: nn.Module, opt: torch.optim.Optimizer,
                   ema: EMA | None, grad_clip: float | None, world_size: int = 1
                   ) -> torch.Tensor:
    """backward, clip, AdamW step and EMA — skipped when the loss or gradient norm is not
    finite. Returns the 0-d bool `ok` on the device (no host sync where AdamW is fused).

    `model` is the plain module (not a compile/DDP wrapper), so clipping and the EMA see
    the gradients after any all-reduce.
    """
    with phase("backward"):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads \
                else torch.zeros((), device=loss.device)
        ok = torch.isfinite(loss.detach()).reshape(()) & torch.isfinite(norm).reshape(())
        ok = _all_ranks_ok(ok, world_size)
    with phase("optimizer_step"):
        if opt.defaults.get("fused"):
            opt.found_inf = (~ok).to(torch.float32)   # fused AdamW skips and keeps its state
            opt.step()
        elif bool(ok):                                # unfused fallback: one sync
            opt.step()
    if ema is not None:
        with phase("ema"):
            ema.update(model, ok)
    return ok


def _finite_module(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in module.state_dict().values()
               if t.is_floating_point())


def save_run_state(path, *, student, ema, opt, k: int, history: History, fingerprint: dict,
                   carry: dict | None = None) -> None:
    """Write the whole state atomically: student, EMA and optimizer state, the global RNG,
    the next update `k`, the history, the fingerprint and the method's carried tensors.
    Refuses non-finite weights (the guard should make that impossible)."""
    if not _finite_module(_unwrap(student)) or (ema is not None and not _finite_module(ema.shadow)):
        raise CheckpointError(f"refusing to write {path}: the weights are not finite")
    tensors, meta = {}, {}
    parts = [("student", _unwrap(student).state_dict()), ("opt", opt.state_dict())]
    if ema is not None:
        parts.append(("ema", ema.shadow.state_dict()))
    if carry:
        parts.append(("carry", carry))
    for name, sd in parts:
        t, m = flatten_state_dict(sd)
        tensors.update({f"{name}/{key}": v for key, v in t.items()})
        meta[name] = m
    tensors.update({f"rng/{key}": v for key, v in rng_state().items()})
    meta.update(update=k, history=asdict(history), fingerprint=fingerprint)
    save_state(path, tensors, meta)


def load_run_state(path, *, student, ema, opt, fingerprint: dict, history_type=History):
    """Restore what `save_run_state` wrote. Returns (k, history, carried tensors or None).
    A state written under other settings raises CheckpointError naming the differences."""
    tensors, meta = load_state(path)
    check_fingerprint(path, meta.get("fingerprint", {}), fingerprint,
                      "belongs to a run with other settings")

    def part(name):
        pre = f"{name}/"
        return unflatten_state_dict({k[len(pre):]: v for k, v in tensors.items()
                                     if k.startswith(pre)}, meta[name])

    _unwrap(student).load_state_dict(part("student"))
    if ema is not None:
        ema.shadow.load_state_dict(part("ema"))
    opt.load_state_dict(part("opt"))
    set_rng_state({k[4:]: v for k, v in tensors.items() if k.startswith("rng/")})
    carry = part("carry") if "carry" in meta else None
    return int(meta["update"]), history_type.from_dict(meta["history"]), carry


def _best_so_far(values: list, tolerance: float):
    """Replay the convergence rule over saved measures (a resumed run decides the same)."""
    best, since = math.inf, 0
    for m in values:
        if m < best * (1 - tolerance):
            best, since = m, 0
        else:
            since += 1
    return best, since


class _Losses:
    """Per-update losses and ok flags kept on the device, read back every LOG_EVERY updates
    (a read-back syncs a GPU). Tracks the skips and the current run of consecutive ones."""

    def __init__(self, history: History, world_size: int, first: int):
        self.history, self.world_size = history, world_size
        self.pending: list = []
        self.next_k = first                       # the update index of pending[0]
        self.run = 0                              # consecutive skips up to now
        skipped = set(history.skipped)
        while first - 1 - self.run in skipped:    # a resumed run continues the count
            self.run += 1

    def add(self, loss: torch.Tensor, ok: torch.Tensor) -> None:
        self.pending.append(torch.stack([loss.detach().float().reshape(()),
                                         ok.float().reshape(())]))

    def flush(self) -> None:
        if not self.pending:
            return
        rows = torch.stack(self.pending)
        rows[:, 0] = _mean_over_ranks(rows[:, 0].contiguous(), self.world_size)
        for loss, ok in rows.tolist():
            if ok:
                self.history.loss.append(loss)
                self.run = 0
            else:
                self.history.loss.append(None)
                self.history.skipped.append(self.next_k)
                self.run += 1
            self.next_k += 1
        self.pending.clear()


def _decide_policy(method: Method, request: Policy, example, student, device, config,
                   rank: int, world: int) -> tuple[Policy, dict]:
    """Rank 0 resolves `request` on this update's example calls (`method.inputs(batch)`, or
    None; `policy.decide`); under DDP the other ranks take its choices, so every rank runs
    the same precision."""
    policy, record = request, {}
    mode = config.compile if isinstance(config.compile, str) else None
    if rank == 0:
        if example is None and device.type == "cuda":   # decided from the device: no calls
            example = (((), {}), ((), {}))
        # a data-parallel CPU run is not measured: rank 0 alone calling a teacher whose
        # forward is a collective (an FSDP-sharded one) would hang the others
        why = "the method gives no example inputs" if example is None else (
            "a data-parallel CPU run is not measured" if world > 1 and device.type == "cpu"
            else None)
        if why is not None:
            policy = Policy(**{k: bool(v) for k, v in request.as_dict().items()})
            record = {"reasons": {"all": f"{why}: undecided choices off"},
                      "decided": policy.as_dict()}
        else:
            teacher = method.teacher if isinstance(method.teacher, nn.Module) else None
            # the measurement runs the networks: keep it off the global RNG (dropout), so
            # that a run trains the same whether or not it measured
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                policy, record = decide(request, teacher=teacher, student=student,
                                        example=example[0], student_example=example[1],
                                        updates=config.updates, device=device,
                                        teacher_calls=method.teacher_calls
                                        if teacher is not None else 0,
                                        min_round_s=SHORT_ROUND_S, mode=mode,
                                        horizon=config.horizon)
            record = json_safe(record)
    if world > 1:
        import torch.distributed as dist

        box = [policy.as_dict(), record]
        dist.broadcast_object_list(box, src=0)
        policy, record = Policy(**box[0]), box[1]
    return policy, record


def run(method: Method, config: RunConfig, *, history: History | None = None) -> RunResult:
    """Train `method.student` for `config.updates` updates; returns the EMA (or raw) student
    in eval mode and the history. See the module docstring for what the runner owns.

    history: an empty instance of a History subclass to fill (a method's own field names).
    """
    config.check()
    device = torch.device(config.device) if config.device is not None \
        else model_device(method.student)
    student = method.student.to(device).train().requires_grad_(True)
    rank, world = config.rank, config.world_size
    opt = make_optimizer(student, config.lr, config.weight_decay)
    ema = EMA(student, config.ema_decay) if config.ema_decay is not None else None
    history_type = type(history) if history is not None else History
    history = history if history is not None else History()
    fingerprint = json_safe({"method": method.name, **config.fingerprint(),
                             **method.settings})
    state_path = Path(config.checkpoint) if config.checkpoint is not None else None
    start = 0
    if state_path is not None and state_path.exists():
        start, history, carried = load_run_state(state_path, student=student, ema=ema,
                                                 opt=opt, fingerprint=fingerprint,
                                                 history_type=history_type)
        history.resumed_from = start
        if carried is not None and method.restore is not None:
            method.restore(carried)
    if world > 1:  # every rank resumes from the same update (a shared checkpoint folder)
        from fastdiff.engine.parallel import check_same

        check_same((method.name, start), f"(the stage, the update to resume {method.name} at)")

    def measure(model) -> float:
        model.eval()
        with phase("eval"), torch.no_grad():
            value = torch.tensor(float(method.measure(model)), dtype=torch.float64)
            value = float(_mean_over_ranks(value, world))
        student.train()
        return value

    if method.measure is not None and start == 0:
        history.initial = measure(student)
    request = with_forced(Policy.parse(config.policy),
                          **legacy_request(config.autocast, config.compile))
    prepared: dict = {}   # the policy put to work, at the first update (it needs a batch)

    def prepare(batch) -> None:
        example = method.inputs(batch) if method.inputs is not None else None
        recorded = history.policy.get("decided") if start > 0 else None
        if recorded is not None:   # a resumed run keeps its choices (forced ones win)
            policy = with_forced(Policy(**recorded), **request.as_dict())
            record = dict(history.policy.get("record") or {}, resumed=True)
        else:
            policy, record = _decide_policy(method, request, example, student, device,
                                            config, rank, world)
        teacher = method.teacher
        module = teacher if isinstance(teacher, nn.Module) else None
        applied = apply(policy, teacher=module, student=student, device=device,
                        mode=config.compile if isinstance(config.compile, str) else None,
                        student_example=example[1] if example is not None else None,
                        teacher_example=example[0] if example is not None else None,
                        teacher_shared=bool(record.get("teacher_compile_shared")))
        if module is not None:
            teacher = checked_output(applied.teacher, "teacher")
        train_model = applied.student
        if config.wrap_student is not None:
            train_model = config.wrap_student(train_model)
            if any(hasattr(p, "placements") for p in student.parameters()):
                raise NotImplementedError(
                    "wrap_student sharded the student's parameters (FSDP): the runner builds "
                    "its optimizer, EMA and rank-0 checkpoints on full local parameters, so "
                    "use a replicating wrapper (fastdiff.engine.parallel.ddp_wrapper)")
        prepared.update(model=checked_output(train_model, "student"), teacher=teacher,
                        autocast=applied.student_autocast)
        history.policy = {"decided": policy.as_dict(), "record": record,
                          "autocast": "bf16" if policy.student_bf16 else "fp32",
                          "compile": bool(policy.student_compile),
                          "fused_adamw": bool(opt.defaults.get("fused"))}

    bar = Progress(config.updates, method.name, config.progress and rank == 0, initial=start)
    losses = _Losses(history, world, start)
    best, since_best = _best_so_far(history.heldout, config.tolerance or 0.0)
    trained = time.perf_counter() - history.wall_time   # t0 of the training clock
    k = start

    def write_state() -> None:
        if state_path is None or rank != 0:
            return
        history.wall_time = time.perf_counter() - trained
        history.updates_done = k
        with phase("checkpoint"):
            save_run_state(state_path, student=student, ema=ema, opt=opt, k=k,
                           history=history, fingerprint=fingerprint,
                           carry=method.carry() if method.carry is not None else None)

    done = bool(history.stopped_by)
    while k < config.updates and not done:
        with phase("data"):
            batch = method.draw(update_generator(config.seed, method.name, k),
                                config.batch_size)
            batch = slice_batch(batch, config.batch_size, rank, world, device)
        scale = linear_lr(k, config.updates, config.warmup) if config.decay == "linear" \
            else (min(1.0, (k + 1) / config.warmup) if config.warmup else 1.0)
        for group in opt.param_groups:
            group["lr"] = config.lr * scale
        if not prepared:
            prepare(batch)
        with prepared["autocast"]():
            if method.teacher is not None:
                loss = method.loss(prepared["model"], batch, prepared["teacher"])
            else:
                loss = method.loss(prepared["model"], batch)
        ok = guarded_update(loss, student, opt, ema, config.grad_clip, world)
        losses.add(loss, ok)
        k += 1
        evaluate = method.measure is not None and (k % config.eval_every == 0
                                                   or k == config.updates)
        checkpoint = state_path is not None and k % config.checkpoint_every == 0
        if k % LOG_EVERY == 0 or evaluate or checkpoint or k == config.updates:
            losses.flush()   # on every rank: it is a collective under DDP
            if losses.run >= config.max_skips:
                bar.close()
                first = history.skipped[-losses.run]
                kept = f"the last good state is in {state_path}" if state_path is not None \
                    and state_path.exists() else "no checkpoint was written"
                raise NonFiniteError(
                    f"{method.name}: updates {first}..{k - 1}: {losses.run} consecutive "
                    f"updates had a non-finite loss or gradient norm and were skipped; "
                    f"{kept}. Lower the learning rate or check the model and data")
        last = [x for x in history.loss[-LOG_EVERY:] if x is not None]
        bar.update(config.batch_size, **({"loss": last[-1]} if last else {}),
                   **({"skipped": len(history.skipped)} if history.skipped else {}))
        if evaluate:
            t_eval = time.perf_counter()
            value = measure(ema.shadow if ema is not None else student)
            history.eval_updates.append(k)
            history.eval_times.append(t_eval - trained)
            history.heldout.append(value)
            if config.on_eval is not None:
                config.on_eval(k, value)
            if config.tolerance is not None:
                if value < best * (1 - config.tolerance):
                    best, since_best = value, 0
                else:
                    since_best += 1
                    if since_best >= config.patience:
                        history.stopped_by = "converged"
                        done = True
            spent = time.perf_counter() - t_eval
            trained += spent            # evaluation is not training time
            history.eval_time += spent
        if checkpoint and k < config.updates and not done:
            write_state()
    losses.flush()
    bar.close()
    history.stopped_by = history.stopped_by or "updates"
    history.updates_done = k
    history.wall_time = time.perf_counter() - trained
    fresh = k - history.resumed_from
    history.samples_per_s = fresh * config.batch_size / max(history.wall_time, 1e-9) \
        if fresh else 0.0
    if k > start:
        write_state()                   # a rerun after this point trains nothing
    out = ema.shadow if ema is not None else copy.deepcopy(student).requires_grad_(False)
    return RunResult(student=out.eval(), history=history)
