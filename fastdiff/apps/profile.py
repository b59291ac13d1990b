"""`fastdiff profile`: where the time of a progressive-distillation update goes.

Runs N PD updates of a U-Net (the demo one by default) on random data, exactly as
`distill_round` does them (draw_batch, pd_update, backward + clipping, optimizer step, EMA),
and prints

1. a per-phase wall-time breakdown from the `fastdiff.engine.nvtx` listeners (phases are
   the NVTX ranges ``fastdiff/<phase>``; on CUDA each boundary synchronises so device time
   lands in its phase), and
2. the torch profiler's view: the same phases as ``record_function`` ranges (CPU and device
   time) and the top operators by self time.

Any device: ``--device cuda`` / ``cpu`` (default: CUDA when available). For Nsight Systems,
``--cuda-profiler-range`` brackets the measured updates with ``cudaProfilerStart/Stop`` so
``nsys profile --capture-range=cudaProfilerApi`` records only those.

`PDStep` (one shipped update) and `build_pair` are also what the benchmark suite times.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections import defaultdict

import torch
from torch import nn

from fastdiff.engine import nvtx as profiling
from fastdiff.engine.nvtx import phase
from fastdiff.engine.schedules import CosineSchedule
from fastdiff.methods.pd import PDBatch, draw_batch, pd_update
from fastdiff.training import EMA, autocast_for, make_optimizer, maybe_compile

#: The U-Nets benchmarked and profiled: the demo's (digits, 8×8) and a CIFAR-sized one.
MODELS = {
    "demo": dict(in_channels=1, image_size=8, channels=32, channel_mults=(1, 2),
                 num_res_blocks=2, num_classes=10),
    "large": dict(in_channels=3, image_size=32, channels=64, channel_mults=(1, 2, 2),
                  num_res_blocks=2, num_classes=10),
}


def build_pair(model: str = "demo", device=None, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(teacher, student): a random-init U-Net teacher (its zero-initialised output layer
    re-drawn, so that it predicts a non-zero v) and the student as its copy, as in PD."""
    from fastdiff.engine.models import UNet

    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {sorted(MODELS)}")
    torch.manual_seed(seed)
    teacher = UNet(**MODELS[model])
    nn.init.normal_(teacher.conv_out.weight, std=0.05)
    teacher = teacher.to(device).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    return teacher, student


def random_batch(teacher: nn.Module, batch_size: int, student_steps: int, *, seed: int = 0,
                 device=None, schedule=None) -> PDBatch:
    """One PD batch over random images of the teacher's shape (fastdiff.methods.pd.draw_batch)."""
    shape = (teacher.in_channels, teacher._kwargs["image_size"], teacher._kwargs["image_size"])
    gen = torch.Generator().manual_seed(seed)
    examples = torch.rand((max(batch_size, 64), *shape), generator=gen) * 2 - 1
    labels = torch.randint(0, max(teacher.num_classes, 1), (examples.shape[0],), generator=gen)
    return draw_batch(examples, labels, student_steps, batch_size, gen,
                      schedule or CosineSchedule(), label_dropout=0.1,
                      use_labels=teacher.num_classes > 0, device=device)


class PDStep:
    """One PD update as `distill_round` runs it (phases included), on a fixed batch.

    compile: torch.compile the student (what ``distill_round(compile=True)`` does);
    autocast: "bf16", "fp32" or None (fastdiff's device default: bf16 on CUDA with bf16).
    ema: also update the EMA copy (distill_round does; the benchmarks leave it out).
    Calling it returns the (detached) float32 loss.
    """

    def __init__(self, teacher, student, *, student_steps: int = 32, compile=False,
                 autocast=None, lr: float = 1e-4, grad_clip: float = 1.0, ema: bool = False,
                 weighting: str = "snr_trunc"):
        self.teacher, self.student = teacher, student
        self.device = next(student.parameters()).device
        self.steps = student_steps
        self.schedule = CosineSchedule()
        self.model = maybe_compile(student, compile)
        self.amp = autocast_for(self.device, autocast)
        self.opt = make_optimizer(student, lr)
        self.grad_clip = grad_clip
        self.ema = EMA(student, 0.995) if ema else None
        self.weighting = weighting

    def __call__(self, batch: PDBatch) -> torch.Tensor:
        loss = pd_update(self.model, self.teacher, batch, self.steps, self.schedule,
                         weighting=self.weighting, autocast=self.amp)
        with phase("backward"):
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.grad_clip)
        with phase("optimizer_step"):
            self.opt.step()
        if self.ema is not None:
            with phase("ema"):
                self.ema.update(self.student)
        return loss.detach()


class PhaseTimer:
    """A `fastdiff.engine.nvtx` listener summing wall time per phase (seconds).

    On CUDA it synchronises at each boundary, so queued device work is charged to the
    phase that launched it (this serialises the GPU a little; the totals stay honest).
    """

    def __init__(self, sync_cuda: bool):
        self.sync_cuda = sync_cuda
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._open: list[tuple[str, float]] = []

    def __call__(self, name: str, entering: bool) -> None:
        if self.sync_cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if entering:
            self._open.append((name, now))
            return
        opened, start = self._open.pop()
        if not self._open:  # nested ranges count once, in the outermost phase
            self.totals[opened] += now - start
            self.calls[opened] += 1


class RecordFunctions:
    """A listener that mirrors each phase as a torch.profiler ``record_function`` range."""

    def __init__(self):
        self._stack = []

    def __call__(self, name: str, entering: bool) -> None:
        if entering:
            rf = torch.profiler.record_function(name)
            rf.__enter__()
            self._stack.append(rf)
        else:
            self._stack.pop().__exit__(None, None, None)


@contextlib.contextmanager
def listening(fn):
    profiling.add_listener(fn)
    try:
        yield fn
    finally:
        profiling.remove_listener(fn)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_profile(*, model: str = "demo", batch_size: int = 128, updates: int = 10,
                warmup: int = 3, compile=False, autocast=None, device=None,
                torch_profiler: bool = True, row_limit: int = 15, trace: str | None = None,
                cuda_profiler_range: bool = False, student_steps: int = 32,
                out=print) -> dict:
    """Profile `updates` PD updates after `warmup` ones; print and return the breakdown.

    Returns {"seconds_per_update", "samples_per_s", "phases": {name: seconds per update}}.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher, student = build_pair(model, device)
    step = PDStep(teacher, student, student_steps=student_steps, compile=compile,
                  autocast=autocast, ema=True)
    examples_seed = iter(range(10**9))

    def one_update():
        with phase("data"):
            batch = random_batch(teacher, batch_size, student_steps, seed=next(examples_seed),
                                 device=device)
        return step(batch)

    t0 = time.perf_counter()
    for _ in range(warmup):  # includes torch.compile's compilation when asked
        one_update()
    _sync(device)
    out(f"warm-up: {warmup} updates in {time.perf_counter() - t0:.1f} s "
        f"(model {model}, batch {batch_size}, device {device}, compile {bool(compile)}, "
        f"autocast {autocast or 'device default'}, {torch.get_num_threads()} CPU threads)")

    timer = PhaseTimer(sync_cuda=device.type == "cuda")
    if cuda_profiler_range and device.type == "cuda":
        torch.cuda.profiler.start()
    with listening(timer):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(updates):
            one_update()
        _sync(device)
        total = time.perf_counter() - t0
    if cuda_profiler_range and device.type == "cuda":
        torch.cuda.profiler.stop()

    per_update = total / updates
    phases = {name: s / updates for name, s in timer.totals.items()}
    out(f"\n{updates} updates: {per_update * 1e3:.1f} ms/update, "
        f"{batch_size / per_update:.1f} samples/s\n")
    out(f"{'phase':<28}{'ms/update':>12}{'share':>9}")
    for name, s in sorted(phases.items(), key=lambda kv: -kv[1]):
        out(f"{name:<28}{s * 1e3:>12.2f}{s / per_update:>9.1%}")
    rest = per_update - sum(phases.values())
    out(f"{'(outside any phase)':<28}{rest * 1e3:>12.2f}{rest / per_update:>9.1%}")

    if torch_profiler:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        n_prof = max(1, min(updates, 5))
        with torch.profiler.profile(activities=activities) as prof, listening(RecordFunctions()):
            for _ in range(n_prof):
                one_update()
            _sync(device)
        events = prof.key_averages()
        dev_attr = "device_time_total" if hasattr(events[0], "device_time_total") \
            else "cuda_time_total"
        out(f"\ntorch profiler, {n_prof} updates: phases (record_function ranges)")
        cuda = device.type == "cuda"
        out(f"{'range':<28}{'CPU ms/update':>15}" + (f"{'device ms/update':>18}" if cuda else ""))
        for ev in sorted(events, key=lambda e: -e.cpu_time_total):
            if ev.key.startswith("fastdiff/"):
                row = f"{ev.key:<28}{ev.cpu_time_total / 1e3 / n_prof:>15.2f}"
                if cuda:
                    row += f"{getattr(ev, dev_attr, 0) / 1e3 / n_prof:>18.2f}"
                out(row)
        sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        out(f"\ntop operators by {sort_by.replace('_', ' ')}:")
        out(events.table(sort_by=sort_by, row_limit=row_limit))
        if trace:
            prof.export_chrome_trace(trace)
            out(f"chrome trace written to {trace} (open in https://ui.perfetto.dev)")
    return {"seconds_per_update": per_update, "samples_per_s": batch_size / per_update,
            "phases": phases}


def cmd_profile(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    compile_arg = args.compile_mode or args.compile
    autocast = None if args.autocast == "default" else args.autocast
    run_profile(model=args.model, batch_size=args.batch_size, updates=args.updates,
                warmup=args.warmup, compile=compile_arg, autocast=autocast, device=args.device,
                torch_profiler=not args.no_torch_profiler, row_limit=args.row_limit,
                trace=args.trace, cuda_profiler_range=args.cuda_profiler_range)


def add_parser(subparsers) -> None:
    """Register ``fastdiff profile`` on the CLI's subcommand parsers."""
    p = subparsers.add_parser(
        "profile", help="per-phase time breakdown of PD updates",
        description="Run PD updates of a random-init U-Net (as distill_round does) and print "
                    "where the time goes: per-phase wall time (NVTX phases) and the torch "
                    "profiler's operator table. For Nsight Systems see README "
                    "(--cuda-profiler-range).")
    p.add_argument("--model", choices=sorted(MODELS), default="demo",
                   help="demo: 1x8x8 digits U-Net; large: 3x32x32, 64 channels")
    p.add_argument("--batch-size", type=int, default=128, help="examples per update")
    p.add_argument("--updates", type=int, default=10, help="measured updates")
    p.add_argument("--warmup", type=int, default=3, help="updates before measuring")
    p.add_argument("--compile", action="store_true", help="torch.compile the student")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (implies --compile)")
    p.add_argument("--autocast", choices=("default", "bf16", "fp32"), default="default",
                   help="autocast dtype (default: bf16 on CUDA with bf16, else fp32)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: torch's)")
    p.add_argument("--no-torch-profiler", action="store_true",
                   help="only the listener phase table")
    p.add_argument("--row-limit", type=int, default=15, help="rows of the operator table")
    p.add_argument("--trace", default=None, help="write a Chrome trace JSON here")
    p.add_argument("--cuda-profiler-range", action="store_true",
                   help="cudaProfilerStart/Stop around the measured updates (nsys "
                        "--capture-range=cudaProfilerApi)")
    p.set_defaults(func=cmd_profile)
