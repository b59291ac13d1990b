"""Shared pytest setup.

TRITON_INTERPRET must be set before Triton kernels are defined (when fastdiff.kernels is
first imported, e.g. through fastdiff.samplers by an earlier test module), so that the
kernel tests can run the Triton path on CPU tensors. setdefault: an explicit value wins.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
