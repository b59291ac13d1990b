"""Backend selection for the fastdiff kernels, and the guarded Triton import.

``FASTDIFF_KERNELS`` (read at every call, so it can be changed between calls):

* unset / ``auto``: CUDA tensors -> Triton kernels (torch when Triton is missing),
  everything else -> the torch implementations;
* ``torch``: the torch implementations everywhere;
* ``triton``: the Triton kernels everywhere. On CPU tensors this only works under the
  Triton interpreter, and Triton decides that when a kernel is *defined*: set
  ``TRITON_INTERPRET=1`` before ``fastdiff.kernels`` (or anything that imports it) is
  first imported.

Triton is imported here, guarded, so that the package imports where Triton is not
installed (non-Linux); the op modules define their kernels only when it is present.
"""

from __future__ import annotations

import os

import torch

try:  # pragma: no cover - depends on the platform
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None


def _interpreter_on() -> bool:
    if triton is None:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


#: Whether the Triton kernels of this package were defined under the interpreter
#: (decided once, when the op modules were imported right after this one).
TRITON_INTERPRETED: bool = _interpreter_on()

BACKENDS = ("auto", "torch", "triton")

#: Elements per Triton program. Fixed (no autotuning: a re-run kernel corrupts
#: accumulating outputs, and one config keeps the interpreter tests honest).
BLOCK = 1024

#: CUDA limits grid axes 1 and 2 to 65535 programs; rows beyond that are launched in
#: further chunks.
MAX_ROWS_PER_LAUNCH = 65535


def requested_backend() -> str:
    value = os.environ.get("FASTDIFF_KERNELS", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(
            f"FASTDIFF_KERNELS={value!r} is not a known backend; expected one of {BACKENDS}"
        )
    return value


def backend_for(tensor: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"torch"``: which implementation runs on ``tensor``."""
    requested = requested_backend()
    if requested == "torch":
        return "torch"
    device = tensor.device.type
    if requested == "auto":
        return "triton" if device == "cuda" and triton is not None else "torch"
    # requested == "triton"
    if triton is None:
        raise RuntimeError("FASTDIFF_KERNELS=triton, but triton is not installed")
    if device == "cpu" and not TRITON_INTERPRETED:
        raise RuntimeError(
            "FASTDIFF_KERNELS=triton on CPU tensors needs the Triton interpreter: set "
            "TRITON_INTERPRET=1 before fastdiff.kernels is first imported"
        )
    if device not in ("cpu", "cuda"):
        raise RuntimeError(f"FASTDIFF_KERNELS=triton: no Triton kernels for {device} tensors")
    return "triton"


_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_active = torch._C._are_functorch_transforms_active
_is_compiling = torch.compiler.is_compiling


def intercepted() -> bool:
    """Whether something other than plain eager execution sees this call: torch.compile or
    export tracing, a dispatch mode (FakeTensorMode, opcheck, a recording mode) or a
    functorch transform. Such calls take the custom ops and the torch coefficient forms;
    the lean route and the numpy coefficients are for plain eager calls only."""
    return _is_compiling() or bool(_dispatch_modes()) or _functorch_active()


def row_chunks(batch: int):
    """Yield ``(row_start, rows)`` pieces of the batch, each small enough for grid axis 1."""
    for start in range(0, batch, MAX_ROWS_PER_LAUNCH):
        yield start, min(MAX_ROWS_PER_LAUNCH, batch - start)


def blocks_per_row(n_per_sample: int) -> int:
    return max(1, -(-n_per_sample // BLOCK))


if triton is not None:

    @triton.jit
    def sample_block(n_per_sample, row_start, BLOCK: tl.constexpr):
        """This program's piece of the grid ``(blocks of one sample, samples)``: its sample
        ``row`` and the flat offsets and mask of its ``BLOCK`` elements of that sample."""
        row = row_start + tl.program_id(1)
        cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        return row, row.to(tl.int64) * n_per_sample + cols, cols < n_per_sample


# ---------------------------------------------------------------- compiled CPU path
#: Below this many elements the eager torch implementation is used on CPU: a small op is
#: bound by per-call overhead, and compiling for every new small shape would cost more than
#: it saves. Above it, `cpu_fused` runs the same torch implementation through torch.compile
#: (one fused loop over memory instead of one pass per elementwise op).
CPU_COMPILE_MIN_ELEMENTS = 1 << 18

_compiled: dict = {}  # torch implementation -> its torch.compile'd twin
_runners: dict = {}  # torch implementation -> the guarded caller of that twin
_compile_failed: set = set()


def cpu_compiles(tensor: torch.Tensor) -> bool:
    """Whether torch implementations run torch.compile'd on `tensor` (see `cpu_fused`)."""
    return (tensor.device.type == "cpu" and tensor.numel() >= CPU_COMPILE_MIN_ELEMENTS
            and not torch.compiler.is_compiling()
            and os.environ.get("FASTDIFF_CPU_COMPILE", "1") != "0")


def cpu_fused(fn, tensor: torch.Tensor):
    """`fn`, or its torch.compile'd twin for large CPU tensors (`FASTDIFF_CPU_COMPILE=0`
    turns this off). Falls back to `fn` for good if compiling fails on this machine."""
    if not cpu_compiles(tensor) or fn in _compile_failed:
        return fn
    run = _runners.get(fn)
    if run is None:
        run = _runners[fn] = _compiled_runner(fn)
    return run


def _compiled_runner(fn):
    compiled = _compiled[fn] = torch.compile(fn, dynamic=None)

    def run(*args):
        try:
            return compiled(*args)
        except Exception as error:  # a missing C++ compiler, say: the eager path still works
            import warnings

            warnings.warn(f"fastdiff: torch.compile of {fn.__name__} failed ({error!r}); "
                          "using the eager torch path", stacklevel=2)
            _compile_failed.add(fn)
            return fn(*args)

    return run
