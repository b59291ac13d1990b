"""Session set-up for the benchmarks: device, threads, ceilings and what every record carries.

The ceilings (copy bandwidth, matmul rate; DESIGN §5) are measured once, at session start,
on the device in use, and stored in every benchmark's ``extra_info`` and in the JSON's
``machine_info`` so that each figure can be read as a fraction of them.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import common

_CEILINGS: dict = {}


def pytest_configure(config):
    common.setup_threads()
    # one torch.compile per (op, shape, dtype): allow more recompiles per code object than
    # the default 8, or later shapes would silently fall back to eager
    dyn = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(dyn, name):
            setattr(dyn, name, 256)
    if hasattr(dyn, "accumulated_cache_size_limit"):
        dyn.accumulated_cache_size_limit = 4096
    if hasattr(dyn, "accumulated_recompile_limit"):
        dyn.accumulated_recompile_limit = 4096


def _quick(config) -> bool:
    return "quick" in (config.getoption("markexpr", "") or "")


@pytest.fixture(scope="session")
def quick(request) -> bool:
    """True when only the smoke subset runs (``-m quick``): fewer rounds."""
    return _quick(request.config)


@pytest.fixture(scope="session")
def ceilings() -> dict:
    """Copy GB/s and matmul TFLOP/s (fp32, bf16 where supported), measured once."""
    if not _CEILINGS:
        _CEILINGS.update(common.measure_ceilings())
    return dict(_CEILINGS)


@pytest.fixture
def record(benchmark, ceilings):
    """``record(**info)``: put the ceilings, load average and `info` into extra_info."""

    def put(**info):
        benchmark.extra_info.update(ceilings=ceilings, loadavg=common.loadavg(), **info)

    return put


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastdiff_ceilings"] = dict(_CEILINGS)
    machine_info["fastdiff_loadavg_end"] = common.loadavg()
    machine_info["torch"] = torch.__version__
