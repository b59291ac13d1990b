"""SIGKILL and rerun: every long-running command resumes to the bit-identical result.

Each case runs the real `fastdiff` command in a subprocess, kills it with SIGKILL at a
random update once its training state is on disk, reruns the same command, and compares
the final weights with an uninterrupted run's, tensor by tensor.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fastdiff.engine.checkpoint import load_state, save
from fastdiff.engine.models import MLP
from fastdiff.training import train_teacher

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["--batch-size", "64", "--seed", "3", "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Labelled 2-D blobs (.npz) and a tiny class-conditional teacher trained on them."""
    root = tmp_path_factory.mktemp("kill")
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (600,), generator=g)
    centres = torch.tensor([[1.0, 0.0], [-0.5, 0.8], [-0.5, -0.8]])
    x = centres[y] + 0.15 * torch.randn(600, 2, generator=g)
    np.savez(root / "blobs.npz", x=x.numpy(), y=y.numpy())
    torch.manual_seed(0)
    teacher = train_teacher(MLP(dim=2, hidden=32, num_classes=3), (x, y), updates=40,
                            batch_size=64, lr=2e-3, progress=False)
    save(teacher, root / "teacher")
    return root


def _commands(files: Path, out: Path) -> dict:
    data, teacher = str(files / "blobs.npz"), str(files / "teacher")
    distill = ["distill", "--teacher", teacher, "--data", data, "--out", str(out),
               "--checkpoint-every", "10", *COMMON]
    return {
        "train-teacher": (["train-teacher", "--data", data, "--out", str(out), "--updates",
                           "150", "--checkpoint-every", "10", *COMMON], "teacher.state"),
        "pd": ([*distill, "--method", "pd", "--start-steps", "4", "--end-steps", "2",
                "--updates", "150", "--eval-every", "50"], "round-*.state"),
        "guided": ([*distill, "--method", "guided", "--start-steps", "4", "--end-steps", "2",
                    "--stage1-updates", "120", "--updates", "60", "--eval-every", "50"],
                   "*.state"),
        "sfd": ([*distill, "--method", "sfd", "--student-steps", "2", "--updates", "150"],
                "sfd-*.state"),
    }


def _start(argv):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "fastdiff", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _final_weights(out: Path, case: str) -> dict:
    path = out / "model.safetensors" if case == "train-teacher" else \
        out / "student" / "model.safetensors"
    return load_file(str(path))


def _state_update(out: Path, pattern: str) -> int:
    best = -1
    for path in out.rglob(pattern):
        try:
            best = max(best, int(load_state(path)[1]["update"]))
        except Exception:
            pass  # being replaced right now
    return best


@pytest.mark.slow
@pytest.mark.parametrize("case", ["train-teacher", "pd", "guided", "sfd"])
def test_sigkill_at_a_random_update_then_rerun_is_bit_identical(files, tmp_path, case):
    ref_out, run_out = tmp_path / "ref", tmp_path / "run"
    argv, pattern = _commands(files, ref_out)[case]
    ref = _start(argv)
    _, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err

    argv, pattern = _commands(files, run_out)[case]
    kill_after = random.Random(case).choice([10, 20, 30])  # a state at/after this update
    proc = _start(argv)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if _state_update(run_out, pattern) >= kill_after:
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"{case} finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    again = _start(argv)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    a, b = _final_weights(ref_out, case), _final_weights(run_out, case)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{case}: {k} differs after kill and rerun"
    # no temp file of a killed write is left behind
    assert not [p for p in run_out.rglob("*") if ".tmp-" in p.name], list(run_out.rglob("*"))
