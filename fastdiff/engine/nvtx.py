"""NVTX ranges around the phases of training, safe everywhere.

The `nvtx` package is a no-op until a profiler (Nsight Systems) attaches; `torch.cuda.nvtx`
raises on CPU-only builds and breaks torch.compile graphs, so it is not used. While
torch.compile traces, `phase` does nothing, so no graph break is introduced.

Range names used by fastdiff (one per phase of an update, identical in every method):
``fastdiff/teacher_forward``, ``fastdiff/target``, ``fastdiff/student_forward``,
``fastdiff/backward``, ``fastdiff/optimizer_step``, ``fastdiff/ema``, ``fastdiff/data``,
``fastdiff/eval``, ``fastdiff/checkpoint``, ``fastdiff/sample``.
"""

from __future__ import annotations

import contextlib

import torch

try:  # optional: present in the default install, absent is fine
    import nvtx as _nvtx
except Exception:  # pragma: no cover - depends on the environment
    _nvtx = None

PHASES = (
    "teacher_forward",
    "target",
    "student_forward",
    "backward",
    "optimizer_step",
    "ema",
    "data",
    "eval",
    "checkpoint",
    "sample",
)

_listeners: list = []  # callables (name, entering: bool) used by `fastdiff profile`


@contextlib.contextmanager
def _noop():
    yield


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except Exception:  # pragma: no cover - very old torch
        return False


@contextlib.contextmanager
def _range(name: str):
    full = f"fastdiff/{name}"
    if _nvtx is not None:
        _nvtx.push_range(full, domain="fastdiff")
    for listener in _listeners:
        listener(full, True)
    try:
        yield
    finally:
        for listener in reversed(_listeners):
            listener(full, False)
        if _nvtx is not None:
            _nvtx.pop_range(domain="fastdiff")


def phase(name: str):
    """Context manager marking one phase (an NVTX range named ``fastdiff/<name>``)."""
    if _compiling():
        return _noop()
    return _range(name)


def add_listener(fn) -> None:
    _listeners.append(fn)


def remove_listener(fn) -> None:
    _listeners.remove(fn)
