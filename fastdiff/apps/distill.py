"""`fastdiff distill`'s work for every method, in one process or as one rank of a torchrun
job: `run_distill(teacher, data, args, rank=, world_size=, wrap_student=, device=)`.

- pd (`fastdiff.methods.pd.progressive_distill`): halve the teacher's DDIM steps from
  `--start-steps` to `--end-steps`; rounds in `<out>/checkpoints`, the last student in
  `<out>/student`.
- guided (`distill_guided_cli`): stage 1, the w-conditioned one-pass model
  (`<out>/stage1`), then stage 2, PD of it down to `--end-steps`; with
  `--stochastic-steps N` also the N-step stochastic-sampler student (`<out>/stochastic`).

A diffusers teacher (a pipeline folder) runs through the same drivers: its data set
carries the prompt embeddings and the negative prompt's (the null of guidance);
`--gradient-checkpointing` turns on diffusers' own checkpointing in the UNet the students
are copied from, `--teacher-dtype` puts guided stage 1's frozen teacher in bf16.
- sfd (`distill_sfd_cli`, data-free): a `--student-steps`-NFE student trained along the
  teacher's ODE trajectories; its state in `<out>/checkpoints`, the student in
  `<out>/student` with its time grid in the metadata.

Every method resumes when the same command is rerun (the methods keep their training state
in `<out>/checkpoints`). Only rank 0 prints and writes. The methods themselves print and
write nothing of their own: this module does it for the command line.
"""

from __future__ import annotations

import inspect
import shutil
from dataclasses import asdict
from pathlib import Path

from fastdiff.engine.checkpoint import CheckpointError, load, load_config, save
from fastdiff.engine.data import as_dataset
from fastdiff.engine.parallel import check_same
from fastdiff.methods.guided import check_w_range, distill_guidance, distill_guided_steps
from fastdiff.methods.pd import progressive_distill, round_summary
from fastdiff.training.runner import check_fingerprint, fingerprint_tensors

METHODS = ("pd", "guided", "sfd")
def _policy_of(args):
    """--policy (absent from older argument namespaces: "auto")."""
    return getattr(args, "policy", None) or "auto"


PD_LR = 5e-4  # --lr of pd and guided stage 2 (sfd's default is distill_sfd's own)


def distill_method(args) -> str:
    """The method `args` asks for: `--method` (default pd); `--guided` means guided."""
    method = getattr(args, "method", None)
    if getattr(args, "guided", False):
        if method not in (None, "guided"):
            raise ValueError(f"--guided is --method guided; it contradicts --method {method}")
        return "guided"
    method = method or "pd"
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    return method


def run_distill(teacher, data, args, *, rank: int = 0, world_size: int = 1, wrap_student=None,
                device=None) -> None:
    """`distill`'s work, in one process or as one rank under torchrun (`fastdiff.engine.parallel`:
    rank, world_size, wrap_student, device); only rank 0 prints and writes. `data` may be
    None for sfd (data-free)."""
    method = distill_method(args)
    parallel = {"rank": rank, "world_size": world_size, "wrap_student": wrap_student,
                "device": device}
    if getattr(args, "teacher_dtype", "auto") == "bf16" and method != "guided":
        raise ValueError(f"--teacher-dtype bf16 is for --method guided (stage 1's frozen "
                         f"teacher); --method {method} copies its students from the teacher")
    memory_options(teacher, args)
    if method == "guided":
        distill_guided_cli(teacher, data, args, release=True, **parallel)
    elif method == "sfd":
        distill_sfd_cli(teacher, args, data=data, **parallel)
    else:
        distill_pd_cli(teacher, data, args, **parallel)


def memory_options(model, args):
    """--gradient-checkpointing: diffusers' own checkpointing on `model`'s UNet (students
    copied from it inherit it; a frozen teacher under no_grad does not pay for it)."""
    if getattr(args, "gradient_checkpointing", False):
        enable = getattr(model, "enable_gradient_checkpointing", None)
        if enable is None:
            raise ValueError("--gradient-checkpointing is for diffusers teachers (a pipeline "
                             "folder as --teacher)")
        enable()
    return model


def teacher_dtype(args, device) -> str:
    """"bf16" or "fp32": --teacher-dtype, auto = bf16 on a CUDA device that has it."""
    import torch

    choice = getattr(args, "teacher_dtype", "auto") or "auto"
    if choice != "auto":
        return choice
    dev = torch.device(device) if device is not None else None
    cuda = (dev is None or dev.type == "cuda") and torch.cuda.is_available()
    return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"


def _pd_lr(args) -> float:
    """--lr of pd and of guided stage 2 (None: PD_LR)."""
    lr = getattr(args, "lr", None)
    return PD_LR if lr is None else lr


def _say(rank: int):
    def say(msg):
        if rank == 0:
            print(msg, flush=True)
    return say


def distill_pd_cli(teacher, data, args, *, rank: int = 0, world_size: int = 1,
                   wrap_student=None, device=None) -> None:
    """`fastdiff distill --method pd`: progressive distillation, resumable."""
    say = _say(rank)
    out = Path(args.out)
    results = progressive_distill(
        teacher, data, start_steps=args.start_steps, end_steps=args.end_steps,
        updates=args.updates, batch_size=args.batch_size, lr=_pd_lr(args), weighting=args.weighting,
        tolerance=args.tolerance, patience=args.patience, eval_every=args.eval_every,
        checkpoint_dir=out / "checkpoints", checkpoint_every=args.checkpoint_every,
        seed=args.seed, compile=args.compile, policy=_policy_of(args),
        progress=not args.quiet and rank == 0,
        on_round=lambda result: say(round_summary(result)), rank=rank, world_size=world_size,
        wrap_student=wrap_student, device=device, keep_students=False)
    final = results[-1]
    if rank == 0:
        save(final.student, out / "student",
             metadata={"steps": final.steps, "world_size": world_size})
    ranks = f" ({world_size} ranks, global batch {args.batch_size})" if world_size > 1 else ""
    say(f"student for {final.steps} step(s) saved to {out / 'student'}{ranks}")


def distill_sfd_cli(teacher, args, *, rank: int = 0, world_size: int = 1, wrap_student=None,
                    device=None, data=None) -> None:
    """`fastdiff distill --method sfd`: SFD (data-free) to `--student-steps` network calls
    per sample; its training state in `<out>/checkpoints`, the student in `<out>/student`
    (metadata: the time grid, AFS, the grid's settings), resumable. `data`: a data set
    whose condition tensors (prompt embeddings, for a text-conditional teacher) the
    trajectories draw from; its examples are not used."""
    from fastdiff.methods.sfd import distill_sfd

    say = _say(rank)
    out = Path(args.out)
    options = {"student_steps": args.student_steps, "teacher_substeps": args.teacher_substeps,
               "solver": args.solver, "afs": args.afs, "updates": args.updates,
               "batch_size": args.batch_size, "seed": args.seed,
               "progress": not args.quiet and rank == 0,
               "checkpoint_dir": out / "checkpoints", "policy": _policy_of(args)}
    if args.lr is not None:
        options["lr"] = args.lr
    accepts = inspect.signature(distill_sfd).parameters
    if getattr(args, "checkpoint_every", None) and "checkpoint_every" in accepts:
        options["checkpoint_every"] = args.checkpoint_every
    parallel = {"rank": rank, "world_size": world_size, "wrap_student": wrap_student}
    if world_size > 1 and not all(k in accepts for k in parallel):
        raise ValueError("--method sfd does not run data-parallel in this version: run it as "
                         "one process")
    options.update({k: v for k, v in parallel.items() if k in accepts})
    if device is not None:
        options["device"] = device
    if data is not None and data.conditioned:
        options.update(conds=data.train_conds, null_conds=data.null_conds)
    result = distill_sfd(teacher, **options)
    if rank == 0:
        save(result.student, out / "student",
             metadata={"method": "sfd", "steps": result.steps, "afs": result.afs,
                       "times": [float(t) for t in result.times],
                       "steps_range": list(result.steps_range) if result.steps_range else None,
                       **result.grid, "world_size": world_size})
    h = result.history
    loss = f", final loss {h.loss[-1]:.4g}" if h.loss else ""
    say(f"SFD student for {result.steps} network call(s) per sample saved to "
        f"{out / 'student'} ({h.updates_done} updates, {h.wall_time:.0f} s{loss}); its time "
        "grid is in the checkpoint's metadata")


def distill_guided_cli(teacher, data, args, *, rank: int = 0, world_size: int = 1,
                       wrap_student=None, device=None, release: bool = False) -> None:
    """`fastdiff distill --guided`: stage 1, then stage 2 down to `--end-steps`; resumable.

    Writes `<out>/stage1` (the w-conditioned one-pass model), `<out>/checkpoints/` (rounds)
    and `<out>/student` (the final few-step student). Stage 1 trains `--stage1-updates`
    updates at `--stage1-lr` with the teacher's own "snr+1" weighting; stage 2 uses
    `--updates`, `--lr` and `--weighting`. A rerun reloads a finished stage 1 trained with
    the same settings and finished rounds, and resumes an interrupted stage 1 or round from
    its last state (`--checkpoint-every` updates). rank, world_size, wrap_student, device: data
    parallelism under torchrun (`torchrun ... -m fastdiff distill --method guided ...`); only
    rank 0 prints and writes. release: free the weights of models no longer needed, so that
    stage 2 holds two rounds' models and not the pretrained teacher and stage 1 besides
    (the pretrained `teacher` once stage 1 is done, the stage-1 model once the first round
    is; each is left on the meta device): what the `distill` command does, for real UNets.
    """
    def say(msg):
        if rank == 0:
            print(msg, flush=True)

    out = Path(args.out)
    w_min, w_max = check_w_range(args.w_min, args.w_max)
    quiet = bool(getattr(args, "quiet", False)) or rank != 0
    stage1_path = out / "stage1"
    stage1_updates = getattr(args, "stage1_updates", None)
    stage1_updates = args.updates if stage1_updates is None else stage1_updates
    stage1_lr = getattr(args, "stage1_lr", None)
    stage1_lr = _pd_lr(args) if stage1_lr is None else stage1_lr
    if isinstance(stage1_updates, bool) or not isinstance(stage1_updates, int) \
            or stage1_updates < 1:
        raise ValueError(f"--stage1-updates must be a positive integer, got {stage1_updates}")
    if not stage1_lr > 0:
        raise ValueError(f"--stage1-lr must be positive, got {stage1_lr}")
    dataset = as_dataset(data)
    # a finished stage 1 of another teacher or data must not be reused either
    stage1_settings = {"w_min": w_min, "w_max": w_max, "updates": stage1_updates,
                       "lr": stage1_lr, "batch_size": args.batch_size, "seed": args.seed,
                       "teacher": fingerprint_tensors(teacher),
                       "data": fingerprint_tensors(dataset.train, dataset.train_labels)}
    dtype = teacher_dtype(args, device)
    if dtype == "bf16":
        stage1_settings["teacher_dtype"] = "bf16"
    stochastic = getattr(args, "stochastic_steps", None)
    if stochastic is not None:
        reached = [args.start_steps >> k for k in range(1, 64)
                   if args.end_steps <= args.start_steps >> k]
        if stochastic < 2 or 2 * stochastic not in reached:
            raise ValueError(f"--stochastic-steps {stochastic}: the stochastic student learns "
                             f"from the {2 * stochastic}-step stage-2 student, which "
                             f"--start-steps {args.start_steps} --end-steps {args.end_steps} "
                             f"does not make (stage 2 makes {reached})")
    parallel = {"rank": rank, "world_size": world_size, "wrap_student": wrap_student,
                "device": device}
    stage1 = None
    if stage1_path.exists():
        try:
            meta = load_config(stage1_path).get("metadata", {})
            check_fingerprint(stage1_path, {k: meta.get(k) for k in stage1_settings},
                              stage1_settings, "was trained with other settings")
            stage1 = memory_options(load(stage1_path), args)
            say(f"stage 1: reusing {stage1_path}")
        except (CheckpointError, OSError, ValueError) as e:
            say(f"stage 1: retraining ({stage1_path} unusable: {e})")
            stage1 = None
            stale = sorted((out / "checkpoints").glob("student-*")) + sorted(
                (out / "checkpoints").glob("round-*.state"))
            if stale and rank == 0:  # stage 2 of the old stage-1 model must not be reused
                say(f"stage 2: removing {len(stale)} round checkpoint(s) of the old stage 1")
                for path in stale:
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
    if world_size > 1:
        check_same(stage1 is None, "whether stage 1 must be trained")
    if stage1 is None:
        state = {"checkpoint_dir": out / "checkpoints"}
        if getattr(args, "checkpoint_every", None):
            state["checkpoint_every"] = args.checkpoint_every
        options = dict(w_min=w_min, w_max=w_max, updates=stage1_updates,
                       batch_size=args.batch_size, lr=stage1_lr, seed=args.seed,
                       progress=not quiet, policy=_policy_of(args), **state, **parallel)
        if dtype == "bf16":  # the student is an fp32 copy; the frozen teacher runs in bf16
            import copy

            import torch

            options["student"] = copy.deepcopy(teacher).float()
            teacher = teacher.to(torch.bfloat16)
        try:
            res = distill_guidance(teacher, data, **options)
        except CheckpointError as e:  # an interrupted stage 1 of other settings: start over
            say(f"stage 1: not resuming ({e})")
            if rank == 0:
                (out / "checkpoints" / "stage1.state").unlink(missing_ok=True)
            if world_size > 1:  # the others wait here until rank 0 removed it
                check_same(True, "stage 1 restarts")
            res = distill_guidance(teacher, data, **options)
        stage1 = res.student
        h = res.history
        errs = ", ".join(f"w={w:g}: {h.initial_error[w]:.3g} -> {e:.3g}"
                         for w, e in h.final_error.items())
        say(f"stage 1: {h.updates_done} updates, {h.wall_time:.0f} s; relative error vs the "
            f"guided teacher on held-out z_t: {errs}")
        if rank == 0:
            save(stage1, stage1_path, metadata={**stage1_settings, "world_size": world_size,
                                                "history": asdict(h)})
            (out / "checkpoints" / "stage1.state").unlink(missing_ok=True)
    elif device is not None:
        stage1 = stage1.to(device)
    stage1.schedule = getattr(stage1, "schedule", None) or getattr(teacher, "schedule", None)
    if release:
        _release(teacher)   # stage 2 and the stochastic student do not use it

    def on_round(result):
        say(f"stage 2 {round_summary(result)}")
        if release and result.teacher_steps == args.start_steps:
            _release(stage1)   # the first round's teacher; its student teaches the next

    options = {k: getattr(args, k) for k in ("tolerance", "patience", "eval_every",
                                             "checkpoint_every", "compile")
               if getattr(args, k, None) is not None}
    options["policy"] = _policy_of(args)
    results = distill_guided_steps(
        stage1, data, w_min=w_min, w_max=w_max, start_steps=args.start_steps,
        end_steps=args.end_steps, updates=args.updates, batch_size=args.batch_size,
        lr=_pd_lr(args), weighting=getattr(args, "weighting", "snr_trunc"), seed=args.seed,
        checkpoint_dir=out / "checkpoints", progress=not quiet, on_round=on_round,
        keep_students=False, on_load=lambda m: memory_options(m, args), **parallel, **options)
    final = results[-1]
    if rank == 0:
        save(final.student, out / "student",
             metadata={"steps": final.steps, "guided": True, "w_min": w_min, "w_max": w_max,
                       "world_size": world_size})
    cond = "{'encoder_hidden_states': e, 'w': weights}" if data is not None and \
        data.conditioned else "{'y': labels, 'w': weights}"
    say(f"guided student for {final.steps} step(s) saved to {out / 'student'}; sample it "
        f"with cond={cond} (one pass per step)")
    if stochastic is not None:
        if final.steps == 2 * stochastic:
            source = final.student
        else:  # dropped from memory after its round (keep_students=False): read it back
            source = load(out / "checkpoints" / f"student-{2 * stochastic:05d}")
            source.sample_steps = 2 * stochastic
            if device is not None:
                source = source.to(device)
        _stochastic_cli(source, data, args, stochastic, w_min, w_max, say=say, **parallel)


def _release(model) -> None:
    """Free `model`'s parameters and buffers (moved to the meta device: the object stays,
    its storage goes); for models the CLI holds but will not call again."""
    model.to("meta")


def _stochastic_cli(teacher, data, args, steps: int, w_min: float, w_max: float, *, say,
                    rank: int = 0, world_size: int = 1, wrap_student=None,
                    device=None) -> None:
    """--stochastic-steps N: the N-step stochastic-sampler student of the 2N-step stage-2
    student, into `<out>/stochastic` (resumable; reused when finished with the same
    settings)."""
    from fastdiff.methods.guided import distill_stochastic, stochastic_state_path

    out = Path(args.out)
    path = out / "stochastic"
    updates = getattr(args, "stochastic_updates", None) or args.updates
    settings = {"steps": steps, "w_min": w_min, "w_max": w_max, "updates": updates,
                "batch_size": args.batch_size, "seed": args.seed, "lr": args.lr}
    if path.exists():
        try:
            meta = load_config(path).get("metadata", {})
            if all(meta.get(k) == v for k, v in settings.items()):
                say(f"stochastic student: reusing {path}")
                return
            say(f"stochastic student: retraining ({path} was trained with other settings)")
        except CheckpointError:
            pass
    options = {"lr": args.lr} if args.lr is not None else {}
    if getattr(args, "checkpoint_every", None):
        options["checkpoint_every"] = args.checkpoint_every
    options["policy"] = _policy_of(args)
    state = stochastic_state_path(out / "checkpoints", steps)

    def train():
        return distill_stochastic(
            memory_options(teacher, args), data, steps=steps, w_min=w_min, w_max=w_max,
            updates=updates, batch_size=args.batch_size, seed=args.seed,
            checkpoint_dir=out / "checkpoints", progress=not getattr(args, "quiet", False)
            and rank == 0, rank=rank, world_size=world_size, wrap_student=wrap_student,
            device=device, **options)

    try:
        result = train()
    except CheckpointError as e:  # an interrupted student of other settings: start over
        say(f"stochastic student: not resuming ({e})")
        if rank == 0:
            state.unlink(missing_ok=True)
        if world_size > 1:  # the others wait here until rank 0 removed it
            check_same(True, "stochastic student restarts")
        result = train()
    if rank == 0:
        save(result.student, path, metadata={**settings, "sampler": "stochastic",
                                             "guided": True, "world_size": world_size})
        state.unlink(missing_ok=True)   # finished: its settings live in the saved metadata
    say(f"stochastic-sampler student for {steps} step(s) saved to {path}; sample it with "
        f"sampler='stochastic' (one pass per step)")
