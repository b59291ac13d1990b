"""Shared pytest setup.

TRITON_INTERPRET must be set before Triton kernels are defined (when fastdiff.kernels is
first imported, e.g. through fastdiff.engine.samplers by an earlier test module), so that the
kernel tests can run the Triton path on CPU tensors. setdefault: an explicit value wins.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Run a kernel test once per backend (FASTDIFF_KERNELS); Triton runs interpreted on
    CPU tensors, and is skipped where its kernels were not defined under the interpreter."""
    from fastdiff.kernels import backend_for
    from fastdiff.kernels.dispatch import TRITON_INTERPRETED, triton

    if request.param == "triton" and (triton is None or not TRITON_INTERPRETED):
        pytest.skip("Triton kernels were not defined under TRITON_INTERPRET=1")
    monkeypatch.setenv("FASTDIFF_KERNELS", request.param)
    assert backend_for(torch.empty(1)) == request.param
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
