"""GPU day one: prove the Triton kernels and measure the GPU path, in one command.

    python -m benchmarks.gpu_check [--out DIR] [--dry]        (make gpu-check)

On a CUDA machine (under 8 minutes) it records, in DIR/report.md and DIR/results.json, one
verdict per line:

1. environment: GPU, driver, CUDA, torch and Triton versions; the copy ceiling (GB/s of a
   large device copy) and the bf16 / fp32 matmul rates (TFLOP/s);
2. accuracy of every public kernel op (ddim_step, pd_target, distill_loss, fused_pd_loss,
   guided_distill_loss, sfd_loss), forward and backward (autograd through the op against
   autograd through its float64 reference), on the Triton path (compiled, CUDA tensors)
   and the torch path, in float32 / bfloat16 / float16: odd sizes, the edges t = 1
   (phi = pi/2) and t'' = 0 (phi_end = 0), student step counts N up to 8192 (steps of
   1/N), a launch with more than 65,535 rows and, where device memory allows, a tensor of
   more than 2^31 elements;
3. speed of each op against eager torch and torch.compile of the same math at 1M, 16M and
   64M elements: GB/s of the fewest bytes the op must move and the fraction of the copy
   ceiling; providers interleaved A B C A B C, min / median and spread (max / min) kept, a
   spread above 1.3 labelled "noisy" (DESIGN §5);
4. one PD update of the demo U-Net and of a 3x32x32 U-Net: the plain eager loop of
   benchmarks/naive_pd.py against fastdiff's defaults (distill_round as shipped);
5. one short PD round end to end (distill_round with few updates and a checkpoint);
6. the CUDA defaults, observed: bf16 autocast and fused AdamW inside distill_round, CUDA
   graphs for sampling (torch.compile mode "reduce-overhead" around the model given to
   fastdiff.sample: same samples, the speed-up), NCCL (a one-rank all_reduce);
7. NVTX: the ``fastdiff/*`` range names seen by a listener and, when ``nsys`` is on PATH, in
   ``nsys stats`` of a short capture of a few PD updates.

Exit status 1 when any line is FAIL (an accuracy check above its tolerance, a section that
raised), else 0.

Without CUDA (or with ``--dry``) it says so and runs the same code paths on CPU at small
sizes: Triton under its interpreter (``TRITON_INTERPRET=1``; the process re-executes itself
when Triton was already imported without it) and the torch path; timings there are CPU
figures of the torch path (the interpreter is never timed). tests/test_gpu_check.py runs
this mode, so the script cannot rot.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

# the one interleaved timing helper of the suite (torch is imported, Triton is not)
from benchmarks.common import (  # noqa: E402
    NOISY_SPREAD,
    Clock,
    interleaved,
    loadavg,
    summarise,
)

ROOT = Path(__file__).resolve().parents[1]
_REEXEC_FLAG = "_FASTDIFF_GPU_CHECK_REEXEC"

OPS = ("ddim_step", "pd_target", "distill_loss", "fused_pd_loss", "guided_distill_loss",
       "sfd_loss")
DTYPE_NAMES = ("float32", "bfloat16", "float16")

# ---------------------------------------------------------------- tolerances
# float32: the kernel contract, within 1e-5 relative of float64 (DESIGN §4).
# bfloat16 / float16: the math is float32 inside, so an output or gradient tensor is the
# float32 result rounded once to the input dtype; the references see the same rounded inputs.
# Rounding to nearest (the GPU's cast) moves each element by at most u = eps / 2 relative
# (u = 2^-8 for bfloat16, 2^-11 for float16), so the norm-relative error is at most u plus
# float32-level terms (~1e-6). The tolerance is eps itself (2^-7 = 7.8e-3, 2^-10 = 9.8e-4):
# a 2x margin on the GPU, and room for the Triton interpreter, whose float32 -> bfloat16
# cast truncates toward zero (measured here: error up to 7.5e-3 < eps on one element).
# A loss *value* is a float32 scalar computed in float32 from those same inputs: no
# half-precision rounding enters it, so it is held to the float32 1e-5 in every dtype.
EPS = {"float32": 2.0**-23, "bfloat16": 2.0**-7, "float16": 2.0**-10}
TOL = {
    "float32": {"tensor": 1e-5, "loss": 1e-5},
    "bfloat16": {"tensor": EPS["bfloat16"], "loss": 1e-5},
    "float16": {"tensor": EPS["float16"], "loss": 1e-5},
}
STEP_COUNTS = (1, 2, 3, 4, 7, 64, 1000, 4096, 8192)
HALF_PI = math.pi / 2

# U-Nets (as fastdiff/apps/profile.py's MODELS: the demo's digits model and a CIFAR-sized one)
UNETS = {
    "demo": dict(in_channels=1, image_size=8, channels=32, channel_mults=(1, 2),
                 num_res_blocks=2, num_classes=10),
    "unet-3x32x32": dict(in_channels=3, image_size=32, channels=64, channel_mults=(1, 2, 2),
                         num_res_blocks=2, num_classes=10),
}
NVTX_REQUIRED = ("teacher_forward", "student_forward", "target", "backward", "optimizer_step")


# ---------------------------------------------------------------- mode and Triton set-up
def _prepare_triton(dry: bool, argv: list) -> None:
    """Make the Triton kernels be defined in the mode asked for: interpreted (dry) or
    compiled (CUDA). Triton decides when a kernel is defined (when fastdiff.kernels is first
    imported); if that already happened the other way, re-execute this module."""
    want = "1" if dry else "0"
    kernels = sys.modules.get("fastdiff.kernels.dispatch")
    wrong = kernels is not None and bool(getattr(kernels, "TRITON_INTERPRETED", False)) != dry
    if dry and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        wrong = True  # Triton came in before the variable: re-exec to be sure
    if wrong and os.environ.get(_REEXEC_FLAG) != "1":
        path = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)
        env = dict(os.environ, TRITON_INTERPRET=want, PYTHONPATH=path, **{_REEXEC_FLAG: "1"})
        print("gpu_check: Triton was set up the other way before this module ran: "
              "re-executing with TRITON_INTERPRET=" + want, flush=True)
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.gpu_check", *argv], env)
    os.environ["TRITON_INTERPRET"] = want


# ---------------------------------------------------------------- small helpers
class Budget:
    """Wall-clock budget: optional measurements are skipped (with the reason) when late."""

    def __init__(self, total_s: float):
        self.t0 = time.perf_counter()
        self.total = total_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.total - self.elapsed()


def fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return str(x)
    return f"{x:.{digits}g}"


def short_error(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".replace("\n", " ").replace("|", "/")
    return text if len(text) < 200 else text[:197] + "..."


# ---------------------------------------------------------------- the report
class Report:
    """Lines with verdicts, grouped in sections; written as report.md and results.json."""

    def __init__(self, mode: str):
        self.mode = mode
        self.sections: list = []  # (title, header, rows, notes)
        self.lines: list = []     # {"section", "name", "verdict", ...} for the JSON
        self.data: dict = {"mode": mode}

    def section(self, title: str, header: list, notes: str = ""):
        rows: list = []
        self.sections.append((title, header, rows, notes))
        return rows

    def line(self, rows: list, section: str, name: str, cells: list, verdict: str, **info):
        rows.append([name, *cells, verdict])
        self.lines.append({"section": section, "name": name, "verdict": verdict, **info})
        print(f"  [{verdict}] {section}: {name} {' '.join(str(c) for c in cells)}", flush=True)

    @property
    def failed(self) -> list:
        return [x for x in self.lines if x["verdict"].startswith("FAIL")]

    def write(self, out: Path, elapsed: float) -> None:
        out.mkdir(parents=True, exist_ok=True)
        verdict = "FAIL" if self.failed else "PASS"
        self.data.update(verdict=verdict, elapsed_s=round(elapsed, 1), lines=self.lines,
                         loadavg_end=loadavg())
        (out / "results.json").write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        md = [f"# fastdiff gpu-check: {verdict}", "",
              f"Mode: **{self.mode}**. {self.data.get('when', '')}; {elapsed:.0f} s; "
              f"{len(self.failed)} FAIL of {len(self.lines)} lines. "
              "Verdicts: PASS / FAIL (an accuracy error above its tolerance, or a check that "
              "raised; the exit status is 1) / WARN (outside tolerance on a path no check "
              "here promises: read, not failed) / SKIP(reason) / OK (a timing with spread "
              "< 1.3) / noisy (a timing with spread >= 1.3: not to be quoted) / INFO.", ""]
        for title, header, rows, notes in self.sections:
            md += [f"## {title}", ""]
            if notes:
                md += [notes, ""]
            md.append("| " + " | ".join(header) + " |")
            md.append("|" + "---|" * len(header))
            md += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
            md.append("")
        (out / "report.md").write_text("\n".join(md))


# ---------------------------------------------------------------- 1. environment
def _driver_version() -> str:
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=30)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return "unknown (nvidia-smi not available)"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or "cpu"


def check_environment(rep: Report, cfg: dict) -> dict:
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = "not installed"
    rows = rep.section("Environment", ["item", "value", "verdict"])
    cuda = cfg["cuda"]
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "triton": triton_version, "cuda_runtime": torch.version.cuda,
           "loadavg_start": loadavg(), "torch_threads": torch.get_num_threads()}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        env.update(device=torch.cuda.get_device_name(0), driver=_driver_version(),
                   capability=f"sm_{props.major}{props.minor}",
                   memory_total_GiB=round(total / 2**30, 1),
                   memory_free_GiB=round(free / 2**30, 1),
                   multiprocessors=props.multi_processor_count,
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    else:
        env.update(device=f"{_cpu_name()} ({os.cpu_count()} logical CPUs), no CUDA device",
                   driver="n/a", capability="n/a")
    for key in ("device", "driver", "cuda_runtime", "capability", "memory_total_GiB",
                "memory_free_GiB", "torch", "triton", "python", "torch_threads",
                "loadavg_start"):
        if key in env:
            rep.line(rows, "environment", key, [env[key]], "INFO")
    rep.data["environment"] = env

    clock = Clock(cuda)
    dev = cfg["device"]
    ceilings: dict = {}
    # copy ceiling: bytes read + written per second by dst.copy_(src)
    n_bytes = cfg["copy_bytes"]
    src = torch.ones(n_bytes // 4, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    t = interleaved(clock=clock, providers={"copy": lambda s=src, d=dst: d.copy_(s)},
                    reps=cfg["ceiling_reps"], target_s=cfg["target_s"], max_iters=50)["copy"]
    ceilings["copy_GBps"] = 2 * n_bytes / t["min_s"] / 1e9
    ceilings["copy_spread"] = t["spread"]
    del src, dst
    rep.line(rows, "environment", "copy ceiling",
             [f"{ceilings['copy_GBps']:.1f} GB/s ({n_bytes / 2**20:.0f} MiB copy, "
              f"spread {t['spread']:.2f})"], _timing_verdict(t["spread"]))
    n = cfg["matmul_n"]
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).split(".")[-1]
        a = torch.randn(n, n, device=dev).to(dtype)
        b = torch.randn(n, n, device=dev).to(dtype)
        t = interleaved(clock=clock, providers={"mm": lambda a=a, b=b: a @ b},
                        reps=cfg["ceiling_reps"], target_s=cfg["target_s"], max_iters=20)["mm"]
        rate = 2 * n**3 / t["min_s"] / 1e12
        ceilings[f"matmul_{name}_TFLOPs"] = rate
        ceilings[f"matmul_{name}_spread"] = t["spread"]
        note = ""
        if cuda and dtype == torch.float32:
            note = f" (TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'})"
        rep.line(rows, "environment", f"matmul {name}",
                 [f"{fmt(rate)} TFLOP/s ({n}x{n}, spread {t['spread']:.2f}){note}"],
                 _timing_verdict(t["spread"]))
        del a, b
    rep.data["ceilings"] = ceilings
    return ceilings


def _timing_verdict(spread: float) -> str:
    return "OK" if spread < NOISY_SPREAD else "noisy"


# ---------------------------------------------------------------- 2. accuracy
class OpCase:
    """One op's public call, float64 reference and float64 difference (losses)."""

    def __init__(self, name: str):
        import importlib

        from fastdiff import kernels

        def module(name):  # the op modules (the package re-exports the functions' names)
            return importlib.import_module(f"fastdiff.kernels.{name}")

        ddim_mod, dl_mod, fused_mod, guided_mod, pd_mod, sfd_mod = (
            module(m) for m in ("ddim_step", "distill_loss", "fused_pd_loss", "guided_loss",
                                "pd_target", "sfd_loss"))

        self.name = name
        self.loss = name not in ("ddim_step", "pd_target")
        self.n_tensors = {"ddim_step": 2, "pd_target": 3, "distill_loss": 2,
                          "fused_pd_loss": 4, "guided_distill_loss": 3, "sfd_loss": 3}[name]
        ddim_ref = ddim_mod.ddim_step_reference
        pd_ref = pd_mod.pd_target_reference
        if name == "ddim_step":
            self.op = lambda x, a, o: kernels.ddim_step(x[0], x[1], a["t"], a["end"])
            self.ref = lambda x, a, o: ddim_ref(x[0], x[1], a["t"], a["end"])
        elif name == "pd_target":
            self.op = lambda x, a, o: kernels.pd_target(*x, a["t"], a["mid"], a["end"])
            self.ref = lambda x, a, o: pd_ref(*x, a["t"], a["mid"], a["end"])
        elif name == "distill_loss":
            self.op = lambda x, a, o: kernels.distill_loss(x[0], x[1], a["t"], o["weighting"],
                                                           o["metric"])
            self.ref = lambda x, a, o: dl_mod.distill_loss_reference(
                x[0], x[1], a["t"], o["weighting"], o["metric"])
            self.diff = lambda x, a: x[0] - x[1]
        elif name == "fused_pd_loss":
            self.op = lambda x, a, o: kernels.fused_pd_loss(
                *x, a["t"], a["mid"], a["end"], o["weighting"], o["metric"])
            self.ref = lambda x, a, o: fused_mod.fused_pd_loss_reference(
                *x, a["t"], a["mid"], a["end"], o["weighting"], o["metric"])
            self.diff = lambda x, a: x[0] - pd_ref(x[1], x[2], x[3], a["t"], a["mid"],
                                                   a["end"])
        elif name == "guided_distill_loss":
            self.op = lambda x, a, o: kernels.guided_distill_loss(
                *x, a["w"], a["t"], o["weighting"], o["metric"])
            self.ref = lambda x, a, o: guided_mod.guided_distill_loss_reference(
                *x, a["w"], a["t"], o["weighting"], o["metric"])
            self.diff = lambda x, a: x[0] - guided_mod.guided_target_reference(x[1], x[2],
                                                                              a["w"])
        elif name == "sfd_loss":
            self.op = lambda x, a, o: kernels.sfd_loss(*x, a["t"], a["end"], o["metric"])
            self.ref = lambda x, a, o: sfd_mod.sfd_loss_reference(*x, a["t"], a["end"],
                                                                  o["metric"])
            self.diff = lambda x, a: ddim_ref(x[1], x[0], a["t"], a["end"]) - x[2]
        else:  # pragma: no cover
            raise ValueError(name)


def _norm_rel(out, ref, keep=None) -> float:
    import torch

    out, ref = out.double(), ref.double()
    if not bool(torch.isfinite(out).all()):
        return math.inf
    if keep is not None:
        out, ref = out[keep], ref[keep]
    den = float(ref.norm())
    num = float((out - ref).norm())
    return num / den if den > 0 else num


def _pow2_scale(numel: int) -> float:
    """An upstream gradient near the element count, a power of two (exact in every dtype),
    as a loss scaler would apply: gradient elements O(1) instead of O(1 / numel), so half
    precision gradients of large means do not underflow and the error measured is the
    kernel's, not the format's range."""
    return float(2 ** max(0, round(math.log2(max(numel, 1)))))


def l1_keep(case: OpCase, x64, angles):
    """Elements whose float64 difference d is clear of 0: sign(d), the l1 gradient, flips at
    d = 0, where a float32 rounding of d decides it. Excluded: |d| < 1e-5 rms(d)."""
    d = case.diff(x64, angles)
    rms = float(d.square().mean().sqrt())
    return d.abs() > 1e-5 * rms


def measure_case(case: OpCase, tensors: list, angles: dict, opts: dict) -> dict:
    """Forward and backward errors of one op on one input set (tensors in the test dtype)."""
    import torch

    dtype = tensors[0].dtype
    x64 = [t.double() for t in tensors]
    out: dict = {}
    if not case.loss:
        y = case.op(tensors, angles, opts)
        y64 = case.ref(x64, angles, opts)
        out["forward"] = _norm_rel(y, y64) if y.dtype == dtype else math.inf
        xs = [t.clone().requires_grad_() for t in tensors]
        y = case.op(xs, angles, opts)
        gen = torch.Generator().manual_seed(tensors[0].numel())
        g64 = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.device)
        g = g64.to(dtype)
        grads = torch.autograd.grad(y, xs, g)
        xs64 = [t.clone().requires_grad_() for t in x64]
        grads64 = torch.autograd.grad(case.ref(xs64, angles, opts), xs64, g.double())
        errs = [(_norm_rel(a, b) if a.dtype == dtype else math.inf)
                for a, b in zip(grads, grads64)]
        out["backward"] = max(errs)
        return out
    scale = _pow2_scale(tensors[0].numel())
    x = tensors[0].clone().requires_grad_()
    loss = case.op([x, *tensors[1:]], angles, opts)
    (grad,) = torch.autograd.grad(loss * scale, x)
    x_ref = x64[0].clone().requires_grad_()
    loss64 = case.ref([x_ref, *x64[1:]], angles, opts)
    (grad64,) = torch.autograd.grad(loss64 * scale, x_ref)
    value, ref = float(loss.detach()), float(loss64.detach())
    ok_type = loss.dtype == torch.float32 and loss.shape == () and grad.dtype == dtype
    out["forward"] = (abs(value - ref) / abs(ref) if ref != 0 else abs(value)) \
        if ok_type and math.isfinite(value) else math.inf
    keep = l1_keep(case, x64, angles) if opts["metric"] == "l1" else None
    out["backward"] = _norm_rel(grad, grad64, keep) if ok_type else math.inf
    return out


def draw_angles(batch: int, rng: random.Random, device, edge: bool = False) -> dict:
    """Per-sample (phi_t, phi_mid, phi_end, w) of student steps t = i/N -> t'' = t - 1/N with
    N from STEP_COUNTS (up to 8192), i = N (t = 1), 1 (t'' = 0) or random; `edge`: the rows
    t = 1 -> t'' = 0 (N = 1), t = 1 at N = 8192, t'' = 0 at N = 8192, then random ones."""
    import torch

    ts, ns = [], []
    for r in range(batch):
        if edge and r < 3:
            n, i = ((1, 1), (8192, 8192), (8192, 1))[r]
        else:
            n = rng.choice(STEP_COUNTS)
            i = rng.choice([n, 1, rng.randint(1, n)])
        ts.append(i / n)
        ns.append(n)
    t = torch.tensor(ts, dtype=torch.float64)
    n = torch.tensor(ns, dtype=torch.float64)
    w = torch.tensor([rng.choice([0.0, -1.0, 4.0, 14.0, rng.uniform(-1.0, 14.0)])
                      for _ in range(batch)], dtype=torch.float64)
    angles = {"t": HALF_PI * t, "mid": HALF_PI * (t - 0.5 / n), "end": HALF_PI * (t - 1.0 / n),
              "w": w}
    angles["end"] = angles["end"].clamp_min(0.0)  # i = 1: exactly 0 already
    return {k: v.to(device) for k, v in angles.items()}


def _random_tensors(k: int, shape, dtype, device, seed: int) -> list:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device,
                                                                    dtype=dtype)
            for _ in range(k)]


def _options(index: int) -> dict:
    from fastdiff.kernels import METRICS, WEIGHTINGS

    return {"metric": METRICS[index % len(METRICS)],
            "weighting": WEIGHTINGS[(index + index // len(METRICS)) % len(WEIGHTINGS)]}


@contextlib.contextmanager
def kernels_backend(name: str):
    old = os.environ.get("FASTDIFF_KERNELS")
    os.environ["FASTDIFF_KERNELS"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FASTDIFF_KERNELS", None)
        else:
            os.environ["FASTDIFF_KERNELS"] = old


@contextlib.contextmanager
def launch_limit(rows: int | None):
    """Dry mode only: lower the rows-per-launch limit so that a small batch takes the
    multi-launch path (the interpreter cannot run 65,536 programs in a few seconds)."""
    from fastdiff.kernels import dispatch

    if rows is None or not hasattr(dispatch, "MAX_ROWS_PER_LAUNCH"):
        yield False
        return
    old = dispatch.MAX_ROWS_PER_LAUNCH
    dispatch.MAX_ROWS_PER_LAUNCH = rows
    try:
        yield True
    finally:
        dispatch.MAX_ROWS_PER_LAUNCH = old


def _backend_available(backend: str, cfg: dict) -> str | None:
    """None when `backend` can run on cfg's device here, else the reason it cannot."""
    import torch
    from fastdiff.kernels import backend_for

    if backend == "torch":
        return None
    from fastdiff.kernels.dispatch import TRITON_INTERPRETED, triton

    if triton is None:
        return "triton is not installed"
    if cfg["cuda"] and TRITON_INTERPRETED:
        return "the kernels were defined under TRITON_INTERPRET=1"
    if not cfg["cuda"] and not TRITON_INTERPRETED:
        return "the kernels were not defined under TRITON_INTERPRET=1"
    with kernels_backend(backend):
        got = backend_for(torch.empty(1, device=cfg["device"]))
    return None if got == backend else f"backend_for chose {got}"


def check_accuracy(rep: Report, cfg: dict) -> None:
    import torch

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    cases = {name: OpCase(name) for name in OPS}
    results: dict = {}
    special: dict = {}
    for backend in ("triton", "torch"):
        why = _backend_available(backend, cfg)
        results[backend] = {"skipped": why} if why else {}
        if why:
            continue
        with kernels_backend(backend):
            for op in OPS:
                results[backend][op] = {}
                for dname in dtypes:
                    entry = {}
                    for direction in ("forward", "backward"):
                        tol = TOL[dname]["loss" if cases[op].loss and direction == "forward"
                                         else "tensor"]
                        entry[direction] = {"max_rel_err": 0.0, "tol": tol, "cases": 0,
                                            "worst": ""}
                    results[backend][op][dname] = entry
            _run_cases(cases, results[backend], dtypes, cfg, backend)
            special[backend] = _many_rows(cases, results[backend], dtypes, cfg, backend)
        if backend == "triton":  # the torch path's float32 temporaries would not fit
            special.setdefault("huge", {})[backend] = _huge(cases, cfg, backend)
    for per_op in results.values():
        for op, per_dtype in per_op.items():
            if op == "skipped":
                continue
            for per_dir in per_dtype.values():
                for entry in per_dir.values():
                    err = entry["max_rel_err"]
                    entry["verdict"] = "PASS" if math.isfinite(err) and err <= entry["tol"] \
                        else "FAIL"
    rep.data["accuracy"] = results
    rep.data["accuracy_special"] = special
    rep.data["tolerances"] = TOL
    _accuracy_lines(rep, results, special, cfg)


def _record(entry: dict, err: float, label: str) -> None:
    """Keep the largest error seen (a non-finite one counts as infinite) and its case."""
    entry["cases"] += 1
    err = err if math.isfinite(err) else math.inf
    if err > entry["max_rel_err"] or not entry["worst"]:
        entry["max_rel_err"] = max(err, entry["max_rel_err"])
        entry["worst"] = label


def _run_cases(cases: dict, results: dict, dtypes: dict, cfg: dict, backend: str) -> None:
    rng = random.Random(1234)
    shapes = cfg["acc_shapes"]
    seed = 0
    for dname, dtype in dtypes.items():
        plan = [(shape, _options(k), False) for k, shape in enumerate(shapes)]
        # the edge rows (t = 1, t'' = 0, N = 1 and 8192) with every metric
        plan += [((4, 33), _options(k), True) for k in range(3)]
        for shape, opts, edge in plan:
            angles = draw_angles(shape[0], rng, cfg["device"], edge=edge)
            for op, case in cases.items():
                seed += 1
                tensors = _random_tensors(case.n_tensors, shape, dtype, cfg["device"], seed)
                label = f"shape {tuple(shape)}" + (
                    f" {opts['metric']}/{opts['weighting']}" if case.loss else "") + (
                    " edges" if edge else "")
                try:
                    errs = measure_case(case, tensors, angles, opts)
                except Exception as error:  # noqa: BLE001 - reported as a FAIL line
                    errs = {"forward": math.inf, "backward": math.inf}
                    label += f" raised {short_error(error)}"
                for direction, err in errs.items():
                    _record(results[op][dname][direction], err, label)


def _many_rows(cases: dict, results: dict, dtypes: dict, cfg: dict, backend: str) -> dict:
    """A batch of more rows than one launch may have (CUDA grid axis 1: 65,535)."""
    rows, limit = cfg["many_rows"], None
    if backend == "triton" and not cfg["cuda"]:
        rows, limit = cfg["dry_rows"], cfg["dry_row_limit"]
    shape = (rows, 3)
    out: dict = {"shape": list(shape), "errors": {}}
    rng = random.Random(99)
    angles = draw_angles(rows, rng, cfg["device"])
    with launch_limit(limit) as patched:
        if limit is not None:
            from fastdiff.kernels import dispatch

            chunks = len(list(dispatch.row_chunks(rows))) if patched else 1
            out["launch_limit"] = f"{limit}: {chunks} launches" if chunks > 1 else \
                "not lowered: one launch"
        for op, case in cases.items():
            out["errors"][op] = {}
            for dname, dtype in dtypes.items():
                tensors = _random_tensors(case.n_tensors, shape, dtype, cfg["device"], 7)
                opts = _options(OPS.index(op))
                try:
                    errs = measure_case(case, tensors, angles, opts)
                except Exception as error:  # noqa: BLE001
                    errs = {"forward": math.inf, "backward": math.inf,
                            "error": short_error(error)}
                out["errors"][op][dname] = errs
                if backend != "triton":
                    continue  # a launch check: the torch path's line is informative only
                for direction in ("forward", "backward"):
                    _record(results[op][dname][direction], errs[direction],
                            f"{rows} rows x 3")
    return out


def _huge(cases: dict, cfg: dict, backend: str) -> dict:
    """More than 2^31 elements (64-bit offsets in every kernel), bfloat16, where memory
    allows; the float64 references run chunk by chunk (losses recombined exactly)."""
    import torch

    if not cfg["cuda"]:
        return {"skipped": "dry mode: 2^31 elements are ~4 GiB per bfloat16 tensor, and the "
                           "Triton interpreter would take hours over them"}
    per_row = 2**30 + 1029  # odd: a masked tail in every row
    shape = (2, per_row)
    numel = shape[0] * per_row
    tensor_bytes = numel * 2
    need = 7 * tensor_bytes + (4 << 30)  # 4 inputs, output / gradient, temporaries, slack
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        return {"skipped": f"needs ~{need / 2**30:.0f} GiB free on the device, "
                           f"{free / 2**30:.0f} GiB are"}
    if cfg["budget"].left() < 60:
        return {"skipped": "time budget"}
    gen = torch.Generator(device=cfg["device"]).manual_seed(5)
    base = [torch.randn(shape, generator=gen, device=cfg["device"], dtype=torch.bfloat16)
            for _ in range(4)]
    angles = {"t": torch.tensor([HALF_PI, 0.3], dtype=torch.float64),
              "mid": torch.tensor([HALF_PI - 0.5 * HALF_PI / 8192, 0.3 - 0.5 * HALF_PI / 8192],
                                  dtype=torch.float64),
              "end": torch.tensor([HALF_PI - HALF_PI / 8192, 0.3 - HALF_PI / 8192],
                                  dtype=torch.float64),
              "w": torch.tensor([0.0, 4.0], dtype=torch.float64)}
    angles = {k: v.to(cfg["device"]) for k, v in angles.items()}
    out: dict = {"shape": list(shape), "numel": numel, "dtype": "bfloat16", "metric": "l2",
                 "errors": {}}
    chunk = 1 << 25
    with kernels_backend(backend):
        for op, case in cases.items():
            try:
                out["errors"][op] = _huge_op(case, base[:case.n_tensors], angles, chunk)
            except Exception as error:  # noqa: BLE001
                out["errors"][op] = {"forward": math.inf, "backward": math.inf,
                                     "error": short_error(error)}
            torch.cuda.empty_cache()
    del base
    torch.cuda.empty_cache()
    return out


def _huge_op(case: OpCase, tensors: list, angles: dict, chunk: int) -> dict:
    import torch

    rows, n = tensors[0].shape
    opts = {"metric": "l2", "weighting": "snr_trunc"}

    def pieces():
        for r in range(rows):
            row_angles = {k: v[r:r + 1] for k, v in angles.items()}
            for a in range(0, n, chunk):
                b = min(n, a + chunk)
                yield r, a, b, row_angles

    if not case.loss:
        y = case.op(tensors, angles, opts)
        num = den = 0.0
        for r, a, b, ra in pieces():
            ref = case.ref([t[r:r + 1, a:b].double() for t in tensors], ra, opts)
            num += float((y[r:r + 1, a:b].double() - ref).square().sum())
            den += float(ref.square().sum())
        finite = bool(torch.isfinite(y).all())
        del y
        return {"forward": math.sqrt(num / den) if finite else math.inf}
    scale = _pow2_scale(rows * n)
    x = tensors[0].detach().requires_grad_()
    loss = case.op([x, *tensors[1:]], angles, opts)
    (grad,) = torch.autograd.grad(loss * scale, x)
    x.requires_grad_(False)
    value = float(loss.detach())
    ref_value = num = den = 0.0
    for r, a, b, ra in pieces():
        xc = tensors[0][r:r + 1, a:b].double().requires_grad_()
        part = case.ref([xc, *(t[r:r + 1, a:b].double() for t in tensors[1:])], ra, opts)
        # the reference of a (1, b - a) piece is weight_r * mean over the piece: rescale to
        # the piece's share of the whole mean over rows x elements
        share = (b - a) / (n * rows)
        (g,) = torch.autograd.grad(part * (share * scale), xc)
        ref_value += float(part.detach()) * share
        num += float((grad[r:r + 1, a:b].double() - g).square().sum())
        den += float(g.square().sum())
    finite = bool(torch.isfinite(grad).all()) and math.isfinite(value)
    del grad
    return {"forward": abs(value - ref_value) / abs(ref_value) if finite else math.inf,
            "backward": math.sqrt(num / den) if finite else math.inf}


def _accuracy_lines(rep: Report, results: dict, special: dict, cfg: dict) -> None:
    where = "compiled Triton on CUDA tensors" if cfg["cuda"] else \
        "Triton under its interpreter on CPU tensors"
    rows = rep.section(
        "Accuracy against float64",
        ["backend / op / direction", *(f"{d} (tol)" for d in DTYPE_NAMES), "worst case",
         "verdict"],
        notes=f"Backend triton = {where}; torch = the torch implementation on the same "
              "device. Forward: norm-relative error of the output (ddim_step, pd_target) or "
              "relative error of the loss value; backward: norm-relative error of the input "
              "gradients from autograd through the op against autograd through the float64 "
              "reference (losses: wrt v_student, upstream gradient a power of two near the "
              "element count; l1 gradients exclude the ~1e-5 of elements with |d| < 1e-5 "
              "rms(d), where sign(d) flips on float32 rounding). Cases: odd sizes, the edges "
              "t = 1 and t'' = 0, N up to 8192, every metric and weighting, and the "
              "many-rows batch below. Tolerances: float32 1e-5 (DESIGN §4); half types eps "
              "of the dtype for tensors (one output rounding is <= eps/2), 1e-5 for loss "
              "values (float32 math on the same inputs).")
    for backend, per_op in results.items():
        if "skipped" in per_op:
            rep.line(rows, "accuracy", backend, ["", "", "", ""],
                     f"SKIP({per_op['skipped']})")
            continue
        for op in OPS:
            for direction in ("forward", "backward"):
                cells, verdicts, worst = [], [], ("", -1.0)
                for dname in DTYPE_NAMES:
                    e = per_op[op][dname][direction]
                    cells.append(f"{e['max_rel_err']:.2e} ({e['tol']:.0e})")
                    verdicts.append(e["verdict"])
                    ratio = e["max_rel_err"] / e["tol"]
                    if ratio > worst[1]:
                        worst = (f"{dname}: {e['worst']}", ratio)
                verdict = "PASS" if all(v == "PASS" for v in verdicts) else "FAIL"
                rep.line(rows, "accuracy", f"{backend} / {op} / {direction}",
                         [*cells, worst[0]], verdict, backend=backend, op=op,
                         direction=direction)
    rows = rep.section(
        "Accuracy: launch limits", ["case", "detail", "max error / tol", "verdict"],
        notes="Triton launches at most 65,535 rows per launch (grid axis 1) and the kernels "
              "use 64-bit offsets; these cases cross both limits. The torch path has no "
              "launch limit: its many-rows line shows what a very large batch does to its "
              "float32 reductions, as WARN (not FAIL) when above tolerance.")
    for backend, data in special.items():
        if backend == "huge":
            continue
        worst, bad = 0.0, []
        for op, per_dtype in data["errors"].items():
            for dname, errs in per_dtype.items():
                for direction in ("forward", "backward"):
                    tol = TOL[dname]["loss" if op not in ("ddim_step", "pd_target")
                                     and direction == "forward" else "tensor"]
                    ratio = errs[direction] / tol
                    worst = max(worst, ratio)
                    if not ratio <= 1:
                        bad.append(f"{op}/{dname}/{direction}")
        detail = f"{data['shape'][0]} rows x {data['shape'][1]}, 6 ops x 3 dtypes, fwd+bwd"
        if "launch_limit" in data:
            detail += f" (dry: launch limit lowered to {data['launch_limit']})"
        if backend == "triton":
            verdict = "PASS" if not bad else f"FAIL({', '.join(bad[:4])})"
        else:  # no launch limit on this path: what a very large batch does to it
            verdict = "PASS" if not bad else f"WARN({', '.join(bad[:4])})"
        rep.line(rows, "accuracy", f"{backend}: rows > launch limit", [detail, fmt(worst)],
                 verdict)
    for backend, data in special.get("huge", {}).items():
        if "skipped" in data:
            rep.line(rows, "accuracy", f"{backend}: > 2^31 elements", ["", ""],
                     f"SKIP({data['skipped']})")
            continue
        worst, bad = 0.0, []
        for op, errs in data["errors"].items():
            for direction in ("forward", "backward"):
                if direction not in errs:
                    continue
                tol = TOL["bfloat16"]["loss" if op not in ("ddim_step", "pd_target")
                                      and direction == "forward" else "tensor"]
                ratio = errs[direction] / tol
                worst = max(worst, ratio)
                if not ratio <= 1:
                    bad.append(f"{op}/{direction}" + (f" {errs['error']}" if "error" in errs
                                                      else ""))
        detail = (f"shape {tuple(data['shape'])} = {data['numel']:,} elements, bfloat16, "
                  "6 ops (losses fwd+bwd)")
        rep.line(rows, "accuracy", f"{backend}: > 2^31 elements", [detail, fmt(worst)],
                 "PASS" if not bad else f"FAIL({'; '.join(bad[:3])})")


# ---------------------------------------------------------------- 3. kernel speed
def _col(c, like):
    return c.view(-1, *([1] * (like.dim() - 1)))


def eager_ddim_step(z, v, phi_from, phi_to):
    import torch

    d = phi_to - phi_from
    c, s = torch.cos(d).float(), torch.sin(d).float()
    return (_col(c, z) * z.float() + _col(s, z) * v.float()).to(z.dtype)


def _eager_target(z, v1, v2, phi_t, phi_mid, phi_end):
    import torch

    d1, d2, d = phi_mid - phi_t, phi_end - phi_mid, phi_end - phi_t
    sd = torch.sin(d)
    cz = (torch.sin(d1) * torch.sin(d2) / sd).float()
    c1 = (torch.cos(d2) * torch.sin(d1) / sd).float()
    c2 = (torch.sin(d2) / sd).float()
    return _col(cz, z) * z.float() + _col(c1, z) * v1.float() + _col(c2, z) * v2.float()


def eager_pd_target(z, v1, v2, phi_t, phi_mid, phi_end):
    return _eager_target(z, v1, v2, phi_t, phi_mid, phi_end).to(z.dtype)


def _snr_trunc(phi):
    import torch

    return torch.maximum(torch.cos(phi) ** 2, torch.sin(phi) ** 2).float()


def eager_distill_loss(vs, vt, phi_t):
    d = vs.float() - vt.float()
    return (_snr_trunc(phi_t) * d.square().flatten(1).mean(dim=1)).mean()


def eager_fused_pd_loss(vs, z, v1, v2, phi_t, phi_mid, phi_end):
    d = vs.float() - _eager_target(z, v1, v2, phi_t, phi_mid, phi_end)
    return (_snr_trunc(phi_t) * d.square().flatten(1).mean(dim=1)).mean()


def eager_guided_loss(vs, vc, vu, w, phi_t):
    w32 = w.float()
    target = _col(1 + w32, vc) * vc.float() - _col(w32, vu) * vu.float()
    return (vs.float() - target).square().flatten(1).mean(dim=1).mean()  # "snr+1": weight 1


def eager_sfd_loss(vs, z, zt, phi_from, phi_to):
    import torch

    d = phi_to - phi_from
    c, s = torch.cos(d).float(), torch.sin(d).float()
    diff = _col(c, z) * z.float() + _col(s, z) * vs.float() - zt.float()
    return diff.abs().flatten(1).mean(dim=1).mean()  # "l1", SFD's default


def _speed_problem(op: str, tensors: list, angles: dict):
    """(fastdiff call, eager math, its args, tensors read + written per element) of `op`."""
    from fastdiff import kernels

    a = angles
    if op == "ddim_step":
        return (kernels.ddim_step, eager_ddim_step, (*tensors[:2], a["t"], a["end"]), 3)
    if op == "pd_target":
        return (kernels.pd_target, eager_pd_target,
                (*tensors[:3], a["t"], a["mid"], a["end"]), 4)
    if op == "distill_loss":
        return (kernels.distill_loss, eager_distill_loss, (*tensors[:2], a["t"]), 3)
    if op == "fused_pd_loss":
        return (kernels.fused_pd_loss, eager_fused_pd_loss,
                (*tensors[:4], a["t"], a["mid"], a["end"]), 5)
    if op == "guided_distill_loss":
        return (kernels.guided_distill_loss, eager_guided_loss,
                (*tensors[:3], a["w"], a["t"]), 4)
    return (kernels.sfd_loss, eager_sfd_loss, (*tensors[:3], a["t"], a["end"]), 4)


def check_speed(rep: Report, cfg: dict, ceilings: dict) -> None:
    import torch

    dyn = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(dyn, name):
            setattr(dyn, name, 256)
    for name in ("accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(dyn, name):
            setattr(dyn, name, 4096)
    copy_bps = ceilings["copy_GBps"] * 1e9
    rows = rep.section(
        "Kernel speed",
        ["op / dtype / elements", "fastdiff GB/s (of copy)", "eager GB/s", "compile GB/s",
         "fastdiff / compile", "spreads f/e/c", "verdict"],
        notes="GB/s of the fewest bytes the op must move (ddim_step 3 tensors, pd_target 4; "
              "losses timed forward + backward, counting one read of each input and the "
              "gradient written: distill_loss 3, fused_pd_loss 5, guided_distill_loss 4, "
              "sfd_loss 4), divided by the fastest timing; `of copy`: fraction of the copy "
              "ceiling. fastdiff = the public op (Triton on CUDA; the torch path on CPU: the "
              "interpreter is never timed); eager = the same math in plain torch; compile = "
              "torch.compile(eager, dynamic=False), compiled outside the timed region. "
              "fastdiff / compile > 1: fastdiff is faster. Timed with "
              f"{'CUDA events' if cfg['cuda'] else 'perf_counter'}, providers interleaved; "
              "verdict noisy when any provider's max/min >= 1.3.")
    figures = []
    rep.data["speed"] = figures
    clock = Clock(cfg["cuda"])
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    for dname, sizes in cfg["speed_plan"]:
        dtype = dtypes[dname]
        for numel in sizes:
            batch = cfg["speed_batch"]
            shape = (batch, numel // batch)
            label_n = _count_label(numel)
            gen = torch.Generator(device=cfg["device"]).manual_seed(numel)
            tensors = [torch.randn(shape, generator=gen, device=cfg["device"], dtype=dtype)
                       for _ in range(4)]
            angles = draw_angles(batch, random.Random(numel), cfg["device"])
            for op in OPS:
                name = f"{op} / {dname} / {label_n}"
                if cfg["budget"].left() < cfg["speed_reserve_s"]:
                    rep.line(rows, "speed", name, ["", "", "", "", ""], "SKIP(time budget)")
                    continue
                try:
                    fig = _speed_one(op, tensors, angles, cfg, clock, copy_bps)
                except Exception as error:  # noqa: BLE001
                    rep.line(rows, "speed", name, ["", "", "", "", ""],
                             f"FAIL({short_error(error)})")
                    traceback.print_exc()
                    continue
                fig.update(op=op, dtype=dname, numel=numel, shape=list(shape))
                figures.append(fig)
                p = fig["providers"]
                spreads = "/".join(f"{p[k]['spread']:.2f}" for k in ("fastdiff", "eager",
                                                                      "compile"))
                noisy = max(p[k]["spread"] for k in p) >= NOISY_SPREAD
                rep.line(rows, "speed", name,
                         [f"{p['fastdiff']['GBps']:.1f} ({p['fastdiff']['frac_copy']:.2f})",
                          f"{p['eager']['GBps']:.1f}", f"{p['compile']['GBps']:.1f}",
                          f"{fig['fastdiff_over_compile']:.2f}x", spreads],
                         "noisy" if noisy else "OK")
            del tensors
            if cfg["cuda"]:
                torch.cuda.empty_cache()


def _count_label(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1 << 10 and n % (1 << 10) == 0:
        return f"{n >> 10}K"
    return str(n)


def _speed_one(op: str, tensors: list, angles: dict, cfg: dict, clock: Clock,
               copy_bps: float) -> dict:
    import torch

    fast, eager, args, n_tensors = _speed_problem(op, tensors, angles)
    compiled = torch.compile(eager, dynamic=False)
    loss = op not in ("ddim_step", "pd_target")
    leaf = args[0].detach().clone().requires_grad_(loss)
    rest = args[1:]

    def provider(fn):
        if not loss:
            return lambda: fn(args[0], *rest)
        return lambda: torch.autograd.grad(fn(leaf, *rest), leaf)

    t0 = time.perf_counter()
    provider(compiled)()  # compile outside the timed region
    clock.sync()
    compile_s = time.perf_counter() - t0
    timings = interleaved(clock=clock, providers={"fastdiff": provider(fast),
                                                  "eager": provider(eager),
                                                  "compile": provider(compiled)},
                          reps=cfg["speed_reps"], target_s=cfg["target_s"])
    moved = n_tensors * args[0].numel() * args[0].element_size()
    for t in timings.values():
        t["GBps"] = moved / t["min_s"] / 1e9
        t["frac_copy"] = moved / t["min_s"] / copy_bps
    return {"bytes": moved, "providers": timings, "compile_s": round(compile_s, 2),
            "fastdiff_over_compile": timings["compile"]["min_s"] / timings["fastdiff"]["min_s"],
            "fastdiff_over_eager": timings["eager"]["min_s"] / timings["fastdiff"]["min_s"]}


# ---------------------------------------------------------------- 4. one PD update
def _unet_pair(name: str, device):
    import torch
    from torch import nn

    from fastdiff.engine.models import UNet

    torch.manual_seed(0)
    teacher = UNet(**UNETS[name])
    if hasattr(teacher, "conv_out"):  # zero-initialised output: re-draw it, so v != 0
        nn.init.normal_(teacher.conv_out.weight, std=0.05)
    teacher = teacher.to(device).eval().requires_grad_(False)
    return teacher


def _unet_data(name: str, count: int):
    import torch

    kw = UNETS[name]
    gen = torch.Generator().manual_seed(1)
    shape = (count, kw["in_channels"], kw["image_size"], kw["image_size"])
    examples = torch.rand(shape, generator=gen) * 2 - 1
    labels = torch.randint(0, kw["num_classes"], (count,), generator=gen)
    return examples, labels


class PhaseWatch:
    """A fastdiff.engine.nvtx listener: the range names seen, and the wall time spent in
    ``fastdiff/eval`` (synchronising CUDA at its edges)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.names: set = set()
        self.eval_s = 0.0
        self._t = None

    def __call__(self, name: str, entering: bool) -> None:
        self.names.add(name)
        if name != "fastdiff/eval":
            return
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        if entering:
            self._t = time.perf_counter()
        elif self._t is not None:
            self.eval_s += time.perf_counter() - self._t
            self._t = None


@contextlib.contextmanager
def watching(cuda: bool):
    watch = PhaseWatch(cuda)
    try:
        from fastdiff.engine import nvtx
        nvtx.add_listener(watch)
    except (ImportError, AttributeError):
        nvtx = None
    try:
        yield watch
    finally:
        if nvtx is not None:
            nvtx.remove_listener(watch)


def _forward_flops(model, name: str, batch: int, device) -> float | None:
    """FLOPs of one forward pass at `batch` (torch's FlopCounterMode: matmuls and convs)."""
    import torch

    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:  # pragma: no cover
        return None
    kw = UNETS[name]
    size = kw["image_size"]
    z = torch.zeros(batch, kw["in_channels"], size, size, device=device)
    t = torch.full((batch,), 0.5, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(z, t, y=y)
    return float(counter.get_total_flops())


def check_pd_update(rep: Report, cfg: dict, ceilings: dict) -> None:
    rows = rep.section(
        "One PD update",
        ["model / batch", "naive ms", "fastdiff ms", "fastdiff speed-up", "samples/s naive / "
         "fastdiff", "model TFLOP/s (of matmul) naive / fastdiff", "spreads n/f", "verdict"],
        notes="naive = benchmarks/naive_pd.py (the paper's algorithm in plain eager float32 "
              "PyTorch, every intermediate materialised, AdamW, grad clip 1.0), batches drawn "
              "on the device; fastdiff = distill_round with its defaults (bf16 autocast and "
              "fused AdamW on CUDA, the fused kernels, EMA, linear LR; its batches drawn as "
              "shipped), per-update time = the round's wall time minus its one held-out "
              "eval, over the updates. Each timing is a run of consecutive updates; "
              "providers interleaved after a warm-up run each. Model FLOP/s = 5 x forward "
              "FLOPs per update (2 teacher + 1 student forward, backward ~ 2 forwards) over "
              "the median time, as a fraction of the fp32 (naive) or bf16 (fastdiff on CUDA) "
              "matmul ceiling.")
    rep.data["pd_update"] = []
    for name in UNETS:
        batch = cfg["unet_batch"][name]
        label = f"{name} / {batch}"
        if cfg["budget"].left() < cfg["unet_reserve_s"]:
            rep.line(rows, "pd_update", label, [""] * 6, "SKIP(time budget)")
            continue
        try:
            fig = _pd_update_one(name, batch, cfg, ceilings)
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            rep.line(rows, "pd_update", label, [""] * 6, f"FAIL({short_error(error)})")
            continue
        rep.data["pd_update"].append(fig)
        n, f = fig["naive"], fig["fastdiff"]
        noisy = max(n["spread"], f["spread"]) >= NOISY_SPREAD
        rep.line(rows, "pd_update", label,
                 [f"{n['median_s'] * 1e3:.1f}", f"{f['median_s'] * 1e3:.1f}",
                  f"{n['median_s'] / f['median_s']:.2f}x",
                  f"{n['samples_per_s']:.0f} / {f['samples_per_s']:.0f}",
                  f"{fmt(n.get('TFLOPs'))} ({fmt(n.get('frac_matmul'))}) / "
                  f"{fmt(f.get('TFLOPs'))} ({fmt(f.get('frac_matmul'))})",
                  f"{n['spread']:.2f}/{f['spread']:.2f}"],
                 "noisy" if noisy else "OK")
        if "compile" in fig:
            c = fig["compile"]
            if "skipped" in c or "failed" in c:
                rep.line(rows, "pd_update", f"{label} compile=True", [""] * 6,
                         f"SKIP({c['skipped']})" if "skipped" in c else
                         f"FAIL({c['failed']})")
            else:
                rep.line(rows, "pd_update", f"{label} compile=True",
                         ["", f"{c['median_s'] * 1e3:.1f}",
                          f"{n['median_s'] / c['median_s']:.2f}x", f"{c['samples_per_s']:.0f}",
                          f"first run (compiling) {c['first_run_s']:.0f} s",
                          f"{c['spread']:.2f}"],
                         _timing_verdict(c["spread"]))


def _pd_update_one(name: str, batch: int, cfg: dict, ceilings: dict) -> dict:
    import torch

    from benchmarks import naive_pd
    from fastdiff.methods.pd import distill_round

    device, cuda = cfg["device"], cfg["cuda"]
    student_steps = 32
    updates = cfg["unet_updates"][name]
    teacher = _unet_pair(name, device)
    examples, labels = _unet_data(name, max(4 * batch, 64))
    x_dev, y_dev = examples.to(device), labels.to(device)
    naive_student = copy.deepcopy(teacher).train().requires_grad_(True)
    naive_opt = torch.optim.AdamW(naive_student.parameters(), lr=1e-4)
    clock = Clock(cuda)

    def naive_run() -> float:
        clock.sync()
        t0 = time.perf_counter()
        for _ in range(updates):
            idx = torch.randint(0, x_dev.shape[0], (batch,), device=device)
            i = torch.randint(1, student_steps + 1, (batch,), device=device)
            t = i.float() / student_steps
            x = x_dev[idx]
            z_t = naive_pd.noisy(x, torch.randn_like(x), t)
            naive_pd.naive_update(naive_student, teacher, naive_opt, z_t, t, student_steps,
                                  cond={"y": y_dev[idx]})
        clock.sync()
        return (time.perf_counter() - t0) / updates

    def fastdiff_run(compile_: bool = False, seed: int = 0) -> float:
        with watching(cuda) as watch:
            result = distill_round(teacher, (examples, labels), teacher_steps=2 * student_steps,
                                   updates=updates, batch_size=batch, lr=1e-4,
                                   eval_every=updates, heldout_size=min(batch, 64),
                                   progress=False, device=device, seed=seed,
                                   compile=compile_)
        h = result.history
        if h.updates_done != updates or not all(math.isfinite(x) for x in h.loss):
            raise RuntimeError(f"distill_round did {h.updates_done}/{updates} updates, "
                               f"losses {h.loss[:4]}")
        return max(h.wall_time - watch.eval_s, 1e-9) / updates

    naive_run()  # warm-up (cuDNN autotuning, allocator)
    fastdiff_run()
    times: dict = {"naive": [], "fastdiff": []}
    for r in range(cfg["unet_reps"]):
        times["naive"].append(naive_run())
        times["fastdiff"].append(fastdiff_run(seed=r + 1))
    flops = None
    try:
        flops = _forward_flops(teacher, name, batch, device)
    except Exception:  # noqa: BLE001 - the FLOP figure is optional
        traceback.print_exc()
    fig: dict = {"model": name, "batch": batch, "updates_per_timing": updates,
                 "student_steps": student_steps, "forward_flops": flops}
    for key, ts in times.items():
        s = summarise(ts)
        s["samples_per_s"] = batch / s["median_s"]
        if flops:
            ceiling = ceilings.get("matmul_bfloat16_TFLOPs" if cuda and key == "fastdiff"
                                   else "matmul_float32_TFLOPs")
            s["TFLOPs"] = 5 * flops / s["median_s"] / 1e12
            s["frac_matmul"] = s["TFLOPs"] / ceiling if ceiling else None
        fig[key] = s
    if cuda:
        if cfg["budget"].left() < cfg["compile_reserve_s"]:
            fig["compile"] = {"skipped": "time budget"}
        else:
            try:
                t0 = time.perf_counter()
                fastdiff_run(compile_=True)
                first = time.perf_counter() - t0
                ts = [fastdiff_run(compile_=True, seed=r + 1) for r in range(2)]
                fig["compile"] = summarise(ts) | {
                    "first_run_s": first, "samples_per_s": batch / statistics.median(ts)}
            except Exception as error:  # noqa: BLE001 - its own FAIL line
                traceback.print_exc()
                fig["compile"] = {"failed": short_error(error)}
    elif cfg["mode"] == "dry" and name == "demo":
        fig["compile"] = {"skipped": "dry mode: compiling a U-Net on a CPU takes minutes"}
    return fig


# ---------------------------------------------------------------- 5. one short PD round
def check_pd_round(rep: Report, cfg: dict) -> set:
    rows = rep.section("PD round end to end", ["round", "result", "verdict"],
                       notes="distill_round on the demo U-Net and random digits-shaped data: "
                             "few updates, a checkpoint, held-out evals; PASS when every "
                             "update ran with a finite loss and the held-out mismatch is "
                             "finite.")
    from fastdiff.methods.pd import distill_round

    r = cfg["round"]
    label = (f"demo U-Net, teacher 16 -> 8 steps, {r['updates']} updates, batch "
             f"{r['batch']}")
    teacher = _unet_pair("demo", cfg["device"])
    data = _unet_data("demo", 4 * r["batch"])
    names: set = set()
    with tempfile.TemporaryDirectory() as ckpt, watching(cfg["cuda"]) as watch:
        t0 = time.perf_counter()
        result = distill_round(teacher, data, teacher_steps=16, updates=r["updates"],
                               batch_size=r["batch"], lr=1e-4, eval_every=r["eval_every"],
                               checkpoint_dir=ckpt, checkpoint_every=r["eval_every"],
                               heldout_size=r["batch"], progress=False, device=cfg["device"])
        total = time.perf_counter() - t0
        checkpoints = sorted(p.name for p in Path(ckpt).iterdir())
    names |= watch.names
    h = result.history
    finite = all(math.isfinite(x) for x in h.loss) and all(
        math.isfinite(x) for x in h.heldout_mismatch) and bool(h.heldout_mismatch)
    ok = h.updates_done == r["updates"] and finite and result.steps == 8
    info = {"updates_done": h.updates_done, "wall_time_s": h.wall_time, "call_s": total,
            "samples_per_s": h.samples_per_s, "initial_mismatch": h.initial_mismatch,
            "heldout_mismatch": h.heldout_mismatch, "loss_first": h.loss[:3],
            "loss_last": h.loss[-3:], "stopped_by": h.stopped_by, "checkpoints": checkpoints}
    rep.data["pd_round"] = info
    last = h.heldout_mismatch[-1] if h.heldout_mismatch else float("nan")
    rep.line(rows, "pd_round", label,
             [f"{h.updates_done} updates in {h.wall_time:.1f} s ({h.samples_per_s:.0f} "
              f"samples/s); held-out mismatch {fmt(h.initial_mismatch)} -> {fmt(last)}; "
              f"loss {fmt(h.loss[0] if h.loss else math.nan)} -> "
              f"{fmt(h.loss[-1] if h.loss else math.nan)}"],
             "PASS" if ok else "FAIL(incomplete round or non-finite loss)", **info)
    return names


# ---------------------------------------------------------------- 5b. the CUDA defaults
def check_defaults(rep: Report, cfg: dict) -> None:
    """What fastdiff does by default on this device, observed rather than assumed: autocast
    (the dtype a student layer computes in inside distill_round), AdamW (fused or not, from
    the torch profiler's op names), CUDA graphs for sampling (torch.compile mode
    "reduce-overhead" around the model given to fastdiff.sample) and NCCL."""
    import torch

    from fastdiff.methods.pd import distill_round

    cuda = cfg["cuda"]
    rows = rep.section(
        "Defaults on this device", ["default", "observed", "verdict"],
        notes="On CUDA the documented defaults are checked (FAIL when not in effect); on CPU "
              "the lines are INFO: what the same calls do there.")
    device = cfg["device"]
    teacher = _unet_pair("demo", device)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    layer = next(m for m in student.modules() if isinstance(m, torch.nn.Conv2d))
    seen: set = set()
    hook = layer.register_forward_hook(lambda m, i, o: seen.add(str(o.dtype).split(".")[-1]))
    activities = [torch.profiler.ProfilerActivity.CPU]
    try:
        with torch.profiler.profile(activities=activities) as prof:
            distill_round(teacher, _unet_data("demo", 64), teacher_steps=8, updates=2,
                          batch_size=16, eval_every=2, heldout_size=16, progress=False,
                          device=device, student=student)
    finally:
        hook.remove()
    names = {e.key for e in prof.key_averages()}
    fused = any("_fused_adamw" in n for n in names)
    foreach = any("_foreach_" in n for n in names)
    want_bf16 = cuda and torch.cuda.is_bf16_supported()
    ok = ("bfloat16" in seen) if want_bf16 else True
    rep.line(rows, "defaults", "autocast (distill_round autocast=None)",
             [f"a student conv's outputs: {', '.join(sorted(seen)) or 'none seen'} "
              "(updates under the default autocast; held-out evals run without)"
              + ("; bfloat16 expected on CUDA" if want_bf16 else "")],
             ("PASS" if ok else "FAIL(bf16 autocast not in effect)") if cuda else "INFO",
             dtypes=sorted(seen))
    adam = "fused (aten::_fused_adamw_)" if fused else \
        ("foreach (aten::_foreach_*)" if foreach else "per-parameter loop")
    rep.line(rows, "defaults", "AdamW (distill_round)", [adam],
             ("PASS" if fused else "FAIL(AdamW not fused on CUDA)") if cuda else "INFO",
             fused=fused)
    _check_cuda_graph_sampling(rep, rows, cfg, teacher)
    _check_nccl(rep, rows, cfg)


def _check_cuda_graph_sampling(rep: Report, rows: list, cfg: dict, model) -> None:
    import torch

    from fastdiff import sample

    name = "CUDA graphs for sampling (torch.compile mode='reduce-overhead')"
    if not cfg["cuda"]:
        rep.line(rows, "defaults", name, ["fastdiff.sample runs eagerly by default"],
                 "SKIP(CUDA graphs need a CUDA device)")
        return
    if cfg["budget"].left() < 100:
        rep.line(rows, "defaults", name, [""], "SKIP(time budget)")
        return
    gen = torch.Generator(device=cfg["device"]).manual_seed(3)
    noise = torch.randn(256, 1, 8, 8, generator=gen, device=cfg["device"])
    cond = {"y": torch.arange(256, device=cfg["device"]) % 10}
    compiled = torch.compile(model, mode="reduce-overhead")

    def graphed(z, t, **kw):  # clone: the next replay overwrites a graph's output buffers
        return compiled(z, t, **kw).clone()

    clock = Clock(True)
    t0 = time.perf_counter()
    for _ in range(3):  # compile, record the graphs, then replay
        x_graph = sample(graphed, noise, 8, cond=cond)
    clock.sync()
    warm_s = time.perf_counter() - t0
    x_eager = sample(model, noise, 8, cond=cond)
    err = float((x_graph.double() - x_eager.double()).norm() / x_eager.double().norm())
    times = interleaved(clock=clock, providers={"eager": lambda: sample(model, noise, 8, cond=cond),
                                "graphs": lambda: sample(graphed, noise, 8, cond=cond)},
                        reps=5, target_s=0.02, max_iters=20, warmup=1)
    speedup = times["eager"]["min_s"] / times["graphs"]["min_s"]
    noisy = max(t["spread"] for t in times.values()) >= NOISY_SPREAD
    verdict = ("noisy" if noisy else "PASS") if err < 1e-3 else f"FAIL(differs {err:.1e})"
    rep.line(rows, "defaults", name,
             [f"8 DDIM steps, batch 256 demo U-Net: {times['eager']['min_s'] * 1e3:.2f} ms "
              f"eager, {times['graphs']['min_s'] * 1e3:.2f} ms with graphs ({speedup:.2f}x); "
              f"outputs differ {err:.1e} (norm-rel); compile + capture {warm_s:.0f} s"],
             verdict, times=times, rel_diff=err)


def _check_nccl(rep: Report, rows: list, cfg: dict) -> None:
    import torch
    import torch.distributed as dist

    name = "NCCL (the multi-GPU backend)"
    if not cfg["cuda"]:
        rep.line(rows, "defaults", name, ["gloo on CPU"], "SKIP(no CUDA device)")
        return
    if not dist.is_available() or not dist.is_nccl_available():
        rep.line(rows, "defaults", name, ["torch was built without NCCL"],
                 "FAIL(no NCCL in this torch)")
        return
    version = ".".join(str(v) for v in torch.cuda.nccl.version()) \
        if isinstance(torch.cuda.nccl.version(), tuple) else str(torch.cuda.nccl.version())
    if dist.is_initialized():
        rep.line(rows, "defaults", name, [f"NCCL {version}; a process group is already up"],
                 "INFO")
        return
    with tempfile.TemporaryDirectory() as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        dist.init_process_group("nccl", store=store, rank=0, world_size=1,
                                device_id=torch.device("cuda", torch.cuda.current_device()))
        try:
            x = torch.full((1024,), 2.0, device=cfg["device"])
            dist.all_reduce(x)
            torch.cuda.synchronize()
            ok = bool((x == 2.0).all())
        finally:
            dist.destroy_process_group()
    rep.line(rows, "defaults", name,
             [f"NCCL {version}: one-rank process group and all_reduce"
              + ("" if ok else " gave a wrong sum")], "PASS" if ok else "FAIL(all_reduce)")


# ---------------------------------------------------------------- 6. NVTX
def nvtx_workload() -> None:
    """What runs under nsys: a few PD updates (distill_round) of the demo U-Net on CUDA."""
    import torch

    from fastdiff.methods.pd import distill_round

    teacher = _unet_pair("demo", "cuda")
    distill_round(teacher, _unet_data("demo", 256), teacher_steps=16, updates=6,
                  batch_size=64, eval_every=6, heldout_size=64, progress=False,
                  device="cuda")
    torch.cuda.synchronize()


def check_nvtx(rep: Report, cfg: dict, seen: set) -> None:
    rows = rep.section("NVTX ranges", ["check", "detail", "verdict"])
    required = [f"fastdiff/{n}" for n in NVTX_REQUIRED]
    missing = [n for n in required if n not in seen]
    rep.line(rows, "nvtx", "fastdiff.engine.nvtx listener (PD round)",
             [", ".join(sorted(seen)) or "none"],
             "PASS" if not missing else f"FAIL(missing {', '.join(missing)})",
             seen=sorted(seen))
    try:
        import nvtx  # noqa: F401
        has_pkg = True
    except ImportError:
        has_pkg = False
    nsys = shutil.which("nsys")
    if not cfg["cuda"]:
        rep.line(rows, "nvtx", "nsys capture", [""],
                 "SKIP(no CUDA device)" if nsys else "SKIP(no CUDA device; nsys not on PATH)")
        return
    if not nsys:
        rep.line(rows, "nvtx", "nsys capture", [""], "SKIP(nsys not on PATH)")
        return
    if not has_pkg:
        rep.line(rows, "nvtx", "nsys capture", ["the `nvtx` package is not installed: "
                                                 "fastdiff emits no NVTX ranges"],
                 "FAIL(nvtx package missing)")
        return
    if cfg["budget"].left() < 90:
        rep.line(rows, "nvtx", "nsys capture", [""], "SKIP(time budget)")
        return
    out_dir = cfg["out"] / "nsys"
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / "pd_updates"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("FASTDIFF_KERNELS", None)
    cmd = [nsys, "profile", "--trace=cuda,nvtx", "--sample=none", "--cpuctxsw=none",
           "--force-overwrite=true", "-o", str(base), sys.executable, "-m",
           "benchmarks.gpu_check", "--nvtx-workload"]
    try:
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=max(60, min(240, cfg["budget"].left() - 30)))
    except subprocess.TimeoutExpired:
        rep.line(rows, "nvtx", "nsys capture", ["timed out"], "FAIL(nsys profile timed out)")
        return
    report_file = base.with_suffix(".nsys-rep")
    if run.returncode != 0 or not report_file.exists():
        tail = (run.stderr or run.stdout)[-300:].replace("\n", " ").replace("|", "/")
        rep.line(rows, "nvtx", "nsys capture", [tail], f"FAIL(nsys profile rc {run.returncode})")
        return
    text, used = "", ""
    for report in ("nvtx_sum", "nvtxsum", "nvtx_pushpop_sum", "nvtxppsum"):
        stats = subprocess.run([nsys, "stats", "--report", report, "--format", "csv",
                                str(report_file)], capture_output=True, text=True, timeout=120)
        if stats.returncode == 0 and "fastdiff/" in stats.stdout:
            text, used = stats.stdout, report
            break
        text = text or stats.stdout + stats.stderr
    (out_dir / "nvtx_stats.txt").write_text(text)
    found = sorted({n for n in (f"fastdiff/{p}" for p in
                                (*NVTX_REQUIRED, "data", "ema", "eval")) if n in text})
    missing = [n for n in required if n not in text]
    rep.line(rows, "nvtx", f"nsys stats --report {used or 'nvtx_sum'}",
             [", ".join(found) or "no fastdiff/* ranges"],
             "PASS" if not missing else f"FAIL(missing {', '.join(missing)})", found=found)


# ---------------------------------------------------------------- configuration and main
def config(cuda: bool, out: Path, budget: Budget) -> dict:
    import torch

    device = torch.device("cuda" if cuda else "cpu")
    common = {"cuda": cuda, "device": device, "out": out, "budget": budget,
              "mode": "cuda" if cuda else "dry"}
    if cuda:
        return common | {
            "copy_bytes": 2 << 30, "matmul_n": 8192, "ceiling_reps": 5, "target_s": 5e-3,
            "acc_shapes": [(1, 1), (3, 7), (5, 1023), (2, 1025), (7, 3, 17, 19), (4, 2999),
                           (8, 3, 32, 32), (3, 100003), (128, 1, 8, 8)],
            "many_rows": 70001,
            # most telling first: if the budget runs out, bf16 at 1M goes first
            "speed_plan": [("float32", [1 << 20, 1 << 24, 1 << 26]),
                           ("bfloat16", [1 << 24, 1 << 26, 1 << 20])],
            "speed_batch": 128, "speed_reps": 7, "speed_reserve_s": 170,
            "unet_batch": {"demo": 128, "unet-3x32x32": 128},
            "unet_updates": {"demo": 10, "unet-3x32x32": 10},
            "unet_reps": 3, "unet_reserve_s": 100, "compile_reserve_s": 150,
            "round": {"updates": 60, "batch": 128, "eval_every": 30},
        }
    return common | {
        "copy_bytes": 64 << 20, "matmul_n": 256, "ceiling_reps": 3, "target_s": 5e-3,
        "acc_shapes": [(1, 1), (3, 7), (5, 1023), (2, 1025), (3, 3, 5, 7), (2, 2999)],
        "many_rows": 70001, "dry_rows": 11, "dry_row_limit": 4,
        "speed_plan": [("float32", [1 << 16])], "speed_batch": 16, "speed_reps": 3,
        "speed_reserve_s": 30,
        "unet_batch": {"demo": 8, "unet-3x32x32": 2},
        "unet_updates": {"demo": 2, "unet-3x32x32": 1}, "unet_reps": 2,
        "unet_reserve_s": 20, "compile_reserve_s": 10**9,
        "round": {"updates": 4, "batch": 8, "eval_every": 2},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/gpu-check", help="where report.md and "
                        "results.json go (default: runs/gpu-check)")
    parser.add_argument("--dry", action="store_true", help="the CPU dry mode even where "
                        "CUDA is available")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds before optional measurements are skipped (default "
                             "450 on CUDA, 240 dry)")
    parser.add_argument("--nvtx-workload", action="store_true", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    import torch

    if args.nvtx_workload:
        _prepare_triton(False, argv)
        nvtx_workload()
        return 0
    cuda = torch.cuda.is_available() and not args.dry
    if not cuda:
        reason = "--dry given" if args.dry else "no CUDA device"
        print(f"gpu_check: {reason}: running the dry mode (CPU, small sizes, Triton "
              "interpreted, torch path; not GPU figures)", flush=True)
    _prepare_triton(not cuda, argv)
    if os.environ.pop("FASTDIFF_KERNELS", None) is not None:
        print("gpu_check: FASTDIFF_KERNELS unset: the speed and PD figures are fastdiff's "
              "defaults; accuracy sets each backend itself", flush=True)
    if not cuda:
        torch.set_num_threads(1)  # a shared 2-core box: one intra-op thread (DESIGN §5)
    budget = Budget(args.budget if args.budget is not None else (450 if cuda else 240))
    out = Path(args.out)
    cfg = config(cuda, out, budget)
    rep = Report("cuda" if cuda else "dry (no CUDA: CPU, small sizes, Triton interpreted)")
    rep.data["when"] = datetime.datetime.now().isoformat(timespec="seconds")
    rep.data["argv"] = argv
    ceilings = {"copy_GBps": math.nan}
    sections = [
        ("environment", lambda: check_environment(rep, cfg)),
        ("accuracy", lambda: check_accuracy(rep, cfg)),
        ("speed", lambda: check_speed(rep, cfg, ceilings)),
        ("pd_update", lambda: check_pd_update(rep, cfg, ceilings)),
        ("pd_round", lambda: check_pd_round(rep, cfg)),
        ("defaults", lambda: check_defaults(rep, cfg)),
    ]
    seen: set = set()
    for name, run in sections:
        print(f"gpu_check: {name} ({budget.elapsed():.0f} s)", flush=True)
        try:
            got = run()
            if name == "environment":
                ceilings.update(got)
            if name == "pd_round":
                seen = got
        except Exception as error:  # noqa: BLE001 - one FAIL line, then the next section
            traceback.print_exc()
            rows = rep.section(f"{name} (raised)", ["check", "error", "verdict"])
            rep.line(rows, name, name, [short_error(error)], "FAIL(raised)")
    try:
        check_nvtx(rep, cfg, seen)
    except Exception as error:  # noqa: BLE001
        traceback.print_exc()
        rows = rep.section("nvtx (raised)", ["check", "error", "verdict"])
        rep.line(rows, "nvtx", "nvtx", [short_error(error)], "FAIL(raised)")
    rep.write(out, budget.elapsed())
    failed = rep.failed
    print(f"gpu_check: {'FAIL' if failed else 'PASS'} ({len(failed)} failing of "
          f"{len(rep.lines)} lines) in {budget.elapsed():.0f} s; report {out / 'report.md'}",
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
