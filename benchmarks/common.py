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

import os
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


def run_pedantic(benchmark, fn, *, quick: bool, round_s: float = 0.05, rounds: int | None = None):
    """Time `fn` with pytest-benchmark: one warm-up, then `rounds` rounds of as many
    iterations as fit in ~`round_s` seconds. Statistics are seconds per call."""
    fn = synced(fn)
    per_call = time_call(fn, repeat=2)
    iterations = max(1, min(1000, int(round_s / max(per_call, 1e-7))))
    if rounds is None:
        rounds = 3 if quick else (3 if per_call > 0.2 else 7)
    return benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=1)


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
