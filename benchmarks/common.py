"""Shared pieces of the benchmark suite: device, threads, ceilings, timing helpers.

Units: times in seconds, bandwidth in bytes/s (reported as GB/s = 1e9 bytes/s), matmul
rate in FLOP/s (reported as TFLOP/s = 1e12 FLOP/s), sizes in elements.

Environment knobs (all optional):

* ``FASTDIFF_BENCH_THREADS``: intra-op threads on CPU (default: torch's default). On a
  shared, loaded box use 1: OpenMP barriers stall whenever a sibling thread is descheduled.
* ``FASTDIFF_BENCH_FULL=1``: also run the slow-to-compile cases on CPU (torch.compile of
  the larger U-Net; minutes of compile time per case on a 2-core CPU).
"""

from __future__ import annotations

import math
import os
import statistics
import time

import torch

GB = 1e9
TFLOP = 1e12


def device() -> torch.device:
    """CUDA when available, else CPU (the suite runs unchanged on both)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def is_cuda() -> bool:
    return device().type == "cuda"


def bf16_supported() -> bool:
    """bf16 is benchmarked on CPU (AVX512-BF16/AMX where present) and on CUDA GPUs with bf16."""
    if is_cuda():
        return torch.cuda.is_bf16_supported()
    return True


def dtypes() -> list[torch.dtype]:
    return [torch.float32] + ([torch.bfloat16] if bf16_supported() else [])


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def full_suite() -> bool:
    return os.environ.get("FASTDIFF_BENCH_FULL", "0") == "1"


def setup_threads() -> int:
    """Apply ``FASTDIFF_BENCH_THREADS`` (CPU only); return the intra-op thread count."""
    value = os.environ.get("FASTDIFF_BENCH_THREADS", "").strip()
    if value and not is_cuda():
        torch.set_num_threads(int(value))
    return torch.get_num_threads()


def sync() -> None:
    if is_cuda():
        torch.cuda.synchronize()


def write_json(path, obj) -> None:
    """Write a benchmark's results to `path` as indented JSON (parent folders made; values
    JSON cannot hold written as text)."""
    import json
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1, default=str))


def loadavg() -> list[float]:
    """1/5/15-minute load averages (noise indicator for CPU timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        return []


def time_call(fn, repeat: int = 3) -> float:
    """Fastest of `repeat` synchronised calls of `fn`, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def synced(fn):
    """`fn` followed by a device synchronise (so a timed call covers the device work)."""
    if not is_cuda():
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize()
        return out

    return call


# ---------------------------------------------------------------- interleaved timing
#: DESIGN §5: a figure is trusted only when its max/min over repeats is below this ...
NOISY_SPREAD = 1.3
#: ... and it has at least this many repeats (two repeats cannot show their own noise).
MIN_REPS = 3


class Clock:
    """Seconds per call of `fn` over `iters` back-to-back calls: CUDA events on a GPU,
    perf_counter (after the call returns) on CPU. Tests hand `interleaved` a fake one."""

    def __init__(self, cuda: bool | None = None):
        self.cuda = is_cuda() if cuda is None else cuda

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def per_call(self, fn, iters: int = 1) -> float:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters


def summarise(ts: list) -> dict:
    """min, median, max and spread (max / min) of repeated timings (seconds)."""
    if not ts:
        return {"min_s": math.nan, "median_s": math.nan, "max_s": math.nan,
                "spread": math.inf, "reps": 0}
    lo, hi = min(ts), max(ts)
    return {"min_s": lo, "median_s": statistics.median(ts), "max_s": hi,
            "spread": hi / lo if lo > 0 else math.inf, "reps": len(ts)}


def interleaved(providers: dict, *, reps: int, target_s: float = 0.0, max_iters: int = 1000,
                warmup: int = 2, clock=None, iters: dict | None = None) -> dict:
    """Time providers A B C, C B A, A B C ... for `reps` rounds in this process (DESIGN §5;
    the order turns every round, so that a drifting load cancels rather than favouring
    whoever runs second).

    providers: {name: fn()}. Each provider is first called `warmup` times (all of A, then
    all of B, ...); each timing then averages as many back-to-back calls as fill about
    `target_s` seconds (at least one; `iters` fixes the count per name). clock: an object
    with ``per_call(fn, iters)`` and ``sync()`` (default: `Clock()`).

    Returns {name: {min_s, median_s, max_s, spread, reps, iters, times_s, loadavg_before,
    loadavg_after}}: seconds per call; the load averages bracket the whole measurement.
    """
    clock = clock or Clock()
    before = loadavg()
    for fn in providers.values():
        for _ in range(warmup):
            fn()
    clock.sync()
    counts = dict(iters or {})
    for name, fn in providers.items():
        if name in counts:
            continue
        if target_s > 0:
            one = max(clock.per_call(fn, 1), 1e-7)
            counts[name] = int(min(max_iters, max(1, target_s / one)))
        else:
            counts[name] = 1
    times: dict = {name: [] for name in providers}
    order = list(providers.items())
    for r in range(reps):
        # A B, B A, A B, ...: a load that drifts over the run favours no provider
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            times[name].append(clock.per_call(fn, counts[name]))
    after = loadavg()
    return {name: summarise(ts) | {"iters": counts[name], "times_s": list(ts),
                                   "loadavg_before": before, "loadavg_after": after}
            for name, ts in times.items()}


def trusted(figure: dict) -> bool:
    """A timing may be quoted: enough repeats and a spread (max/min) under NOISY_SPREAD."""
    spread = figure.get("spread", math.inf)
    return (figure.get("reps", 0) >= MIN_REPS and spread is not None
            and math.isfinite(spread) and spread < NOISY_SPREAD)


def verdict(figures: dict, ok: bool) -> str:
    """"MET" / "MISSED" for a target judged on `figures` ({provider: timing summary}), but
    only when every one of them is `trusted`; otherwise "noisy: rerun (...)" naming them."""
    bad = [f"{name} spread {_spread_text(f)} over {f.get('reps', 0)} reps"
           for name, f in figures.items() if not trusted(f)]
    if bad:
        return "noisy: rerun (" + "; ".join(bad) + ")"
    return "MET" if ok else "MISSED"


def _spread_text(figure: dict) -> str:
    spread = figure.get("spread")
    return "?" if spread is None else f"{spread:.2f}"


def feed_benchmark(benchmark, times_s: list) -> None:
    """Give pytest-benchmark the interleaved per-call timings of one provider, so that the
    JSON's ``stats`` (min, median, max, rounds) are these very repeats. Uses the fixture's
    `_make_stats` (pytest-benchmark 4-5: the one way to add measured rounds)."""
    if getattr(benchmark, "disabled", False):
        return
    stats = benchmark._make_stats(1)
    for t in times_s:
        stats.update(t)


def selected_params(request, function: str) -> list[dict]:
    """The parameters of this session's selected, not skip-marked items of bench function
    `function` (after -m/-k deselection): the providers to interleave in one group."""
    out = []
    for item in request.session.items:
        if getattr(item, "originalname", None) != function or not hasattr(item, "callspec"):
            continue
        if item.get_closest_marker("skip") is not None:
            continue
        out.append(dict(item.callspec.params))
    return out


# ---------------------------------------------------------------- ceilings
def copy_bandwidth(n_bytes: int | None = None) -> float:
    """Bytes read + written per second by a large ``dst.copy_(src)`` (best of several)."""
    if n_bytes is None:
        n_bytes = (1 << 30) if is_cuda() else (256 << 20)
    src = torch.ones(n_bytes // 4, dtype=torch.float32, device=device())
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = time_call(lambda: dst.copy_(src), repeat=5 if is_cuda() else 3)
    return 2 * n_bytes / best


def matmul_rate(dtype: torch.dtype, n: int | None = None) -> float:
    """FLOP/s of an n×n by n×n matrix product in `dtype` (2 n³ FLOP; best of several)."""
    if n is None:
        n = 8192 if is_cuda() else 1024
    a = torch.randn(n, n, device=device()).to(dtype)
    b = torch.randn(n, n, device=device()).to(dtype)
    a @ b
    best = time_call(lambda: a @ b, repeat=5 if is_cuda() else 3)
    return 2 * n**3 / best


def measure_ceilings() -> dict:
    """The machine's own limits, measured now on the device in use (see DESIGN §5)."""
    out = {
        "device": device_name(),
        "threads": setup_threads(),
        "loadavg_start": loadavg(),
        "copy_GBps": copy_bandwidth() / GB,
        "matmul_fp32_TFLOPs": matmul_rate(torch.float32) / TFLOP,
    }
    if bf16_supported():
        out["matmul_bf16_TFLOPs"] = matmul_rate(torch.bfloat16) / TFLOP
    return out


def device_name() -> str:
    if is_cuda():
        return torch.cuda.get_device_name()
    name = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:  # pragma: no cover
        pass
    return f"{name} ({os.cpu_count()} logical CPUs)"


# ---------------------------------------------------------------- peak memory
def peak_memory(fn) -> tuple[float | None, str]:
    """Peak memory growth while running `fn` once, in MiB, and what was measured.

    CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before (tensor bytes).
    CPU (no allocator statistics there): the peak of live tensor bytes allocated during the
    call, from the torch profiler's memory events (``profile_memory=True``) summed in time
    order at operator granularity (a temporary allocated and freed inside one operator is
    not seen). Freed-before-the-call memory that the call reuses is not counted either way.
    """
    if is_cuda():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20, "cuda_max_allocated"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20, "cpu_profiler_live_tensors"
