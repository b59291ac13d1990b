"""Shared pytest setup.

Where the Triton kernel tests run follows the hardware, chosen by one switch,
``FASTDIFF_TEST_TRITON`` (read once, here, before anything imports fastdiff.kernels):

* ``auto`` (default): ``cuda`` when torch sees a CUDA device, else ``interpret``. An
  explicit ``TRITON_INTERPRET=1`` in the environment means ``interpret``;
* ``interpret``: ``TRITON_INTERPRET=1``; the Triton kernels run under Triton's interpreter
  on CPU tensors (what a CPU-only machine always does: unchanged from before);
* ``cuda``: ``TRITON_INTERPRET=0``; the kernel tests run the compiled Triton kernels on
  CUDA tensors (an error where there is no CUDA device).

TRITON_INTERPRET must be set before the Triton kernels are defined (when fastdiff.kernels is
first imported, e.g. through fastdiff.engine.samplers by an earlier test module); it is set
explicitly here, so that a test module's own ``os.environ.setdefault("TRITON_INTERPRET",
"1")`` cannot switch the interpreter on in ``cuda`` mode. The chosen device is exported as
``FASTDIFF_TEST_DEVICE`` (``cpu`` / ``cuda``) for module-level code, and as the ``device``
fixture; kernel tests put their tensors there.
"""

import os

import torch

MODES = ("auto", "interpret", "cuda")


def _triton_mode() -> str:
    requested = os.environ.get("FASTDIFF_TEST_TRITON", "auto").strip().lower() or "auto"
    if requested not in MODES:
        raise ValueError(f"FASTDIFF_TEST_TRITON={requested!r} is not a known mode; expected "
                         f"one of {MODES}")
    if requested == "auto":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return "interpret"
        return "cuda" if torch.cuda.is_available() else "interpret"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("FASTDIFF_TEST_TRITON=cuda, but torch sees no CUDA device "
                           f"(torch {torch.__version__}, CUDA {torch.version.cuda})")
    return requested


TRITON_MODE = _triton_mode()
if TRITON_MODE == "cuda":
    os.environ["TRITON_INTERPRET"] = "0"
elif os.environ.get("FASTDIFF_TEST_TRITON", "auto").strip().lower() == "interpret":
    os.environ["TRITON_INTERPRET"] = "1"
else:  # auto on a CPU-only machine: as before, an explicit value wins
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = torch.device("cuda" if TRITON_MODE == "cuda" else "cpu")
os.environ["FASTDIFF_TEST_DEVICE"] = DEVICE.type

import pytest  # noqa: E402


def pytest_report_header(config):
    return (f"fastdiff kernel tests: FASTDIFF_TEST_TRITON={TRITON_MODE} (Triton "
            f"{'compiled, CUDA tensors' if TRITON_MODE == 'cuda' else 'interpreted, CPU tensors'}"
            f"; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')})")


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests put their tensors: CUDA in ``cuda`` mode, else the CPU."""
    return DEVICE


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Run a kernel test once per backend (FASTDIFF_KERNELS). Triton runs compiled on CUDA
    tensors in ``cuda`` mode and interpreted on CPU tensors otherwise; skipped where its
    kernels cannot run that way."""
    from fastdiff.kernels import backend_for
    from fastdiff.kernels.dispatch import TRITON_INTERPRETED, triton

    if request.param == "triton":
        if triton is None:
            pytest.skip("triton is not installed")
        if TRITON_MODE == "interpret" and not TRITON_INTERPRETED:
            pytest.skip("Triton kernels were not defined under TRITON_INTERPRET=1")
        if TRITON_MODE == "cuda" and TRITON_INTERPRETED:
            pytest.fail("FASTDIFF_TEST_TRITON=cuda, but the Triton kernels were defined under "
                        "the interpreter (fastdiff.kernels imported with TRITON_INTERPRET=1)")
    monkeypatch.setenv("FASTDIFF_KERNELS", request.param)
    assert backend_for(torch.empty(1, device=DEVICE)) == request.param
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models (use with `pytestmark =
    pytest.mark.usefixtures("one_thread")`): one is as fast as two here, and on a shared
    2-core machine two threads thrash in OpenMP barriers (measured 20-100× slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
