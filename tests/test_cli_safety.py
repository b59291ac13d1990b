"""`--out` safety and one-line errors of the `fastdiff` command (issue 13, "What was
measured"): one writer per folder, stale temporaries swept, `save` keeps what it does not
own, `--overwrite` removes only fastdiff's files, bad input and failed writes are one line
naming the path, never a traceback. Tiny 2-D data; the real subprocesses are the cases
where another process or the shell's limits are the point.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastdiff.training as training
from fastdiff.apps.cli import main
from fastdiff.apps.outdir import DISTILL_FILES, TEACHER_FILES, check_out, remove_owned
from fastdiff.apps.torchrun import under_torchrun
from fastdiff.engine import checkpoint
from fastdiff.engine.checkpoint import (
    FolderLockedError,
    load,
    lock_folder,
    remove_stale_temps,
    save,
    save_state,
)
from fastdiff.engine.models import MLP
from fastdiff.engine.samplers import sample

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
FASTDIFF = [sys.executable, "-m", "fastdiff"]
TINY = ["--data", "eight_gaussians", "--updates", "3", "--batch-size", "8", "--quiet"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RANK",
                                                            "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


def _fastdiff(*args, shell_prefix=None, timeout=120) -> subprocess.CompletedProcess:
    cmd = [*FASTDIFF, *args]
    if shell_prefix:  # e.g. "ulimit -f 64;": run through the shell
        cmd = ["bash", "-c", shell_prefix + " exec " + " ".join(f"'{c}'" for c in cmd)]
    return subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _one_line(err: str, *needles: str) -> str:
    err = err.strip()
    assert "Traceback" not in err, err
    assert err.startswith("fastdiff") and "error:" in err and "\n" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _mlp(seed=0) -> MLP:
    torch.manual_seed(seed)
    return MLP(dim=2, hidden=16, depth=1)


@pytest.fixture
def no_training(monkeypatch):
    """train_teacher must not be reached."""
    def refuse(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(training, "train_teacher", refuse)


# --- one writer per --out ------------------------------------------------------------------


def test_a_folder_has_one_writer(tmp_path):
    with lock_folder(tmp_path / "out"):
        with pytest.raises(FolderLockedError, match=f"{os.getpid()}") as info:
            lock_folder(tmp_path / "out")  # a second lock, even from this process
        assert str(tmp_path / "out") in str(info.value)
    with lock_folder(tmp_path / "out"):  # released: free again
        pass


def test_a_second_concurrent_writer_is_refused_in_one_line(tmp_path, capsys,
                                                           no_training):
    out = tmp_path / "T"
    first = subprocess.Popen([*FASTDIFF, "train-teacher", "--out", str(out), "--data",
                              "eight_gaussians", "--updates", "100000", "--batch-size", "8",
                              "--quiet"], env=_env(), cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # until the first writer holds the lock
            try:
                lock_folder(out).release()
            except FolderLockedError:
                break
            except OSError:
                pass
            assert first.poll() is None, first.communicate()
            time.sleep(0.2)
        else:
            raise AssertionError("the first writer never locked its --out")
        # the second writer is this process (the command in-process: one start less)
        assert main(["train-teacher", "--out", str(out), *TINY]) == 2
        _one_line(capsys.readouterr().err, "in use", str(first.pid), str(out))
        assert first.poll() is None  # the first one goes on undisturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert not (out / "model.safetensors").exists()


# --- stale temporaries, save keeps other files, --overwrite ---------------------------------


def test_stale_temps_of_a_killed_write_are_removed_by_the_next_writer(tmp_path, capsys):
    out = tmp_path / "T"
    (out / "checkpoints" / "student-00002").mkdir(parents=True)
    dead = 99_999_999  # above any pid_max: no such process
    stale = [out / f".model.safetensors.tmp-{dead}-0badcafe",
             out / "checkpoints" / f".teacher.state.tmp-{dead}-0123abcd",
             out / "checkpoints" / "student-00002" / f".config.json.tmp-{dead}-89abcdef",
             out / f".student.old-{dead}-deadbeef"]
    for path in stale[:3]:
        path.write_bytes(b"\0" * 1000)
    stale[3].mkdir()
    (stale[3] / "model.safetensors").write_bytes(b"x")
    writer = subprocess.Popen(["sleep", "60"])  # a live process writing without a lock
    kept = [out / ".notes.tmp", out / f"model.tmp-{dead}-0badcafe", out / "notes.txt",
            out / "other-run" / f".model.safetensors.tmp-{dead}-0badcafe",
            out / f".samples.png.tmp-{writer.pid}-0badcafe"]
    (out / "other-run").mkdir()
    (out / "other-run" / ".lock").write_text("")  # another job's folder: not ours to sweep
    for path in kept:
        path.write_text("keep")
    try:
        assert main(["train-teacher", "--out", str(out), *TINY]) == 0
    finally:
        writer.kill()
        writer.wait()
    assert "removed 4 temporary file(s)" in capsys.readouterr().out
    assert not any(p.exists() for p in stale)
    assert all(p.read_text() == "keep" for p in kept)
    assert remove_stale_temps(out) == [kept[-1]]  # its writer is gone now


def test_train_teacher_into_a_run_folder_keeps_the_distillation(tmp_path, capsys):
    out = tmp_path / "T"
    save(_mlp(), out)
    save(_mlp(1), out / "student")
    save(_mlp(2), out / "checkpoints" / "student-00002")
    save_state(out / "checkpoints" / "round-00004-to-00002.state", {"x": torch.ones(2)},
               {"k": 3})
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()
              and p.parent != out}
    assert main(["train-teacher", "--out", str(out), *TINY]) == 0
    assert load(out).config != _mlp().config  # the new teacher replaced the old one
    for path, data in before.items():  # ...and nothing else
        if path.name != "teacher.state":
            assert path.read_bytes() == data, path
    assert not [p for p in out.rglob(".*tmp-*")]


def test_overwrite_removes_only_fastdiffs_own_files(tmp_path):
    out = tmp_path / "run"
    save(_mlp(), out)  # a teacher saved in the run folder itself
    save(_mlp(), out / "student")
    (out / "student" / "mine.txt").write_text("user file")
    save(_mlp(), out / "stage1")
    save(_mlp(), out / "checkpoints" / "student-00004")
    for name in ("round-00004-to-00002.state", "stage1.state", "teacher.state"):
        save_state(out / "checkpoints" / name, {"x": torch.ones(1)}, {})
    (out / "checkpoints" / "fake.state").write_text("not a state file")
    (out / "notes.txt").write_text("user file")

    gone = remove_owned(out, DISTILL_FILES)
    names = sorted(str(p.relative_to(out)) for p in gone)
    assert "checkpoints/round-00004-to-00002.state" in names and "stage1/config.json" in names
    assert not (out / "stage1").exists() and not (out / "checkpoints" / "student-00004").exists()
    assert (out / "student" / "mine.txt").exists() and not (out / "student" / "config.json")\
        .exists()
    for keep in ("model.safetensors", "config.json", "notes.txt", "checkpoints/teacher.state",
                 "checkpoints/fake.state"):
        assert (out / keep).exists(), keep

    remove_owned(out, TEACHER_FILES)
    assert not (out / "model.safetensors").exists()
    assert not (out / "checkpoints" / "teacher.state").exists()
    assert (out / "notes.txt").exists() and (out / "checkpoints" / "fake.state").exists()


def test_train_teacher_overwrite_starts_over(tmp_path, capsys):
    out = tmp_path / "T"
    assert main(["train-teacher", "--out", str(out), *TINY]) == 0
    state = out / "checkpoints" / "teacher.state"
    assert state.exists()
    # a finished state of other settings is refused, and --overwrite starts over
    argv = ["train-teacher", "--out", str(out), *TINY, "--seed", "1"]
    assert main(argv) == 2
    _one_line(capsys.readouterr().err)
    assert main([*argv, "--overwrite"]) == 0
    assert "--overwrite: removed 3" in capsys.readouterr().out
    assert load(out).checkpoint_metadata["updates"] == 3


# --- --out that cannot be a folder: one line, before any training --------------------------


def test_out_under_a_file_is_one_line_before_training(tmp_path, capsys, no_training):
    (tmp_path / "file").write_text("x")
    assert main(["train-teacher", "--out", str(tmp_path / "file" / "T"), *TINY]) == 2
    _one_line(capsys.readouterr().err, f"{tmp_path / 'file'} is a file")
    assert main(["train-teacher", "--out", str(tmp_path / "file"), *TINY]) == 2
    _one_line(capsys.readouterr().err, "is a file; --out must be a folder")


def test_symlink_loop_is_one_line(tmp_path, capsys):
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    assert main(["distill", "--teacher", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "loop" / "run")]) == 2
    _one_line(capsys.readouterr().err, "symbolic-link loop", str(tmp_path / "loop"))
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    with pytest.raises(ValueError, match="broken symbolic link"):
        check_out(tmp_path / "dangling")


def test_unwritable_out_is_one_line(tmp_path, capsys, monkeypatch, no_training):
    # root ignores file modes, so the kernel's answer is simulated where the lock is made
    real_open = os.open

    def read_only(path, flags, *a):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(checkpoint.os, "open", read_only)
    assert main(["train-teacher", "--out", str(tmp_path / "ro"), *TINY]) == 2
    _one_line(capsys.readouterr().err, "Read-only file system", str(tmp_path / "ro" / ".lock"))


# --- failed writes: one line with the path, the old files intact ----------------------------


@pytest.mark.parametrize("failure", ["disk full", "safetensors"])
def test_a_failed_save_is_one_line_and_keeps_the_old_checkpoint(tmp_path, capsys,
                                                                monkeypatch, failure):
    from safetensors import SafetensorError

    out = tmp_path / "T"
    save(_mlp(), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = checkpoint.save_file

    def failing(tensors, filename, metadata=None):
        if Path(filename).name.startswith(".model.safetensors"):
            Path(filename).write_bytes(b"half a file")
            if failure == "disk full":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # names no file
            raise SafetensorError("Error while serializing: IoError")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", failing)
    assert main(["train-teacher", "--out", str(out), *TINY]) == 2
    _one_line(capsys.readouterr().err, str(out / "model.safetensors"))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == before
    assert not list(out.glob(".*tmp-*"))


def test_a_file_size_limit_is_one_line_with_the_path(tmp_path):
    # the case: a write cut short by `ulimit -f` (Python ignores SIGXFSZ: EFBIG)
    r = _fastdiff("train-teacher", "--out", str(tmp_path / "T"), *TINY,
                  shell_prefix="ulimit -f 512;")
    assert r.returncode == 2, r.stderr[-2000:]
    _one_line(r.stderr, str(tmp_path / "T"))
    assert not list((tmp_path / "T").rglob(".*tmp-*"))


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("argv, needle", [
    (["sample", "--model", "m", "--n", "-1"], "--n: expected a positive integer"),
    (["sample", "--model", "m", "--steps", "1e13"], "--steps: expected a positive integer"),
    (["sample", "--model", "m", "--steps", "10000000000000"], "at most 100000"),
    (["eval", "--model", "m", "--steps", "1,99999999"], "from 1 to 100000"),
    (["train-teacher", "--out", "t", "--lr", "inf"], "--lr: expected a finite positive"),
    (["distill", "--teacher", "t", "--out", "o", "--lr", "nan"], "finite positive"),
    (["distill", "--teacher", "t", "--out", "o", "--lr", "-1"], "finite positive"),
    (["distill", "--teacher", "t", "--out", "o", "--batch-size", "0"], "positive integer"),
])
def test_bad_numbers_are_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    _one_line(capsys.readouterr().err, needle)


def test_guided_and_another_method_contradict(tmp_path, capsys):
    save(_mlp(), tmp_path / "t")
    assert main(["distill", "--teacher", str(tmp_path / "t"), "--out", str(tmp_path / "o"),
                 "--guided", "--method", "sfd"]) == 2
    _one_line(capsys.readouterr().err, "--guided is --method guided")


def test_a_diverging_teacher_stops_in_one_line_and_saves_nothing(tmp_path, capsys):
    out = tmp_path / "T"
    assert main(["train-teacher", "--out", str(out), "--lr", "1e30", "--data",
                 "eight_gaussians", "--updates", "40", "--batch-size", "8", "--quiet"]) == 2
    _one_line(capsys.readouterr().err, "non-finite")
    assert not (out / "model.safetensors").exists()


def test_a_model_that_returns_a_tuple_is_a_clear_error(tmp_path, capsys, monkeypatch):
    mlp = _mlp()
    with pytest.raises(TypeError, match="returned a tuple, not a tensor"):
        sample(lambda z, t: (mlp(z, t),), torch.randn(4, 2), 2)

    class Pair(MLP):
        def forward(self, z, t, **cond):
            return super().forward(z, t, **cond), None

    torch.manual_seed(0)
    save(Pair(dim=2, hidden=16, depth=1), tmp_path / "m")
    import fastdiff.apps.cli as cli

    monkeypatch.setattr(cli, "_load_model", lambda path: Pair(dim=2, hidden=16, depth=1))
    assert main(["sample", "--model", str(tmp_path / "m"), "--steps", "2", "--n", "4",
                 "--out", str(tmp_path / "s.png")]) == 2
    _one_line(capsys.readouterr().err, "returned a tuple")


# --- torchrun --------------------------------------------------------------------------------


def test_torchrun_is_recognised_by_its_environment(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert not under_torchrun()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not under_torchrun()  # one process: the plain command
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert under_torchrun()


@pytest.mark.slow  # two ranks of Python + torch on a shared 2-core box: ~15 s
def test_under_torchrun_a_refused_out_stops_every_rank_at_once(tmp_path):
    import socket

    torchrun = str(Path(sys.executable).with_name("torchrun"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "T"
    with lock_folder(out):  # another writer holds --out
        t0 = time.monotonic()
        r = subprocess.run([torchrun, "--nproc-per-node=2", "--master-addr=127.0.0.1",
                            f"--master-port={port}", "-m", "fastdiff", "--timeout-s", "60",
                            "train-teacher", "--out", str(out), *TINY],
                           env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - t0
    assert r.returncode != 0
    assert "rank 0: error:" in r.stderr and "in use" in r.stderr, r.stderr[-3000:]
    assert "rank 1: error: rank 0 cannot write to --out" in r.stderr, r.stderr[-3000:]
    assert "fastdiff/apps" not in r.stderr  # no traceback from the ranks (torchrun has its own)
    assert took < 60, took  # no rank waited for the collective timeout
    assert not (out / "model.safetensors").exists()
