"""SFD on the shared runner: a run killed mid-trajectory resumes bit-exactly (plain SFD,
SFD-v, stage 2), non-finite teacher outputs are skipped, 2 gloo ranks equal one process,
and what changed in the move (the RNG stream, the evaluation clock) is what is meant.

The file is also the 2-rank worker: `python tests/test_sfd_runner.py worker OUT` (under
torchrun).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastdiff.methods.sfd as sfd
from fastdiff.engine.checkpoint import CheckpointError, load_state
from fastdiff.engine.models import MLP
from fastdiff.training.runner import NonFiniteError, update_generator

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BASE = dict(data_shape=(2,), teacher_substeps=2, batch_size=32, lr=1e-3, progress=False,
            seed=7)
# name -> (distill_sfd options, update to interrupt at, the checkpoint it resumes from)
CASES = {
    "plain": (dict(student_steps=3, updates=10, checkpoint_every=4), 6, 4),
    "sfd_v": (dict(student_steps=2, steps_range=(2, 4), afs=True, label_dropout=0.25,
                   ema_decay=0.9, updates=12, checkpoint_every=5, classes=3), 8, 5),
}


def _teacher(classes: int = 0, seed: int = 0):
    """A random MLP with a nonzero output (a fresh one outputs 0) and, with classes, labels
    that matter."""
    torch.manual_seed(seed)
    m = MLP(dim=2, hidden=32, depth=2, num_classes=classes)
    with torch.no_grad():
        m.out.weight.normal_(0, 0.3)
        if classes:
            m.cond.classes.weight.normal_(0, 1.0)
    return m.eval()


def _distill(options: dict, **kw):
    opts = {**BASE, **options, **kw}
    return sfd.distill_sfd(_teacher(opts.pop("classes", 0)), **opts)


class Interrupted(Exception):
    pass


def _interrupt_at(monkeypatch, k: int) -> None:
    """The next distill_sfd raises from its draw of update k (as a kill would stop it)."""
    real = sfd.run

    def run(method, config, **kw):
        draw, calls = method.draw, [0]

        def failing(gen, n):
            if calls[0] == k:
                raise Interrupted(f"update {k}")
            calls[0] += 1
            return draw(gen, n)

        method.draw = failing
        return real(method, config, **kw)

    monkeypatch.setattr(sfd, "run", run)


def _assert_identical(a, b) -> None:
    sa, sb = a.student.state_dict(), b.student.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    assert a.history.loss == b.history.loss
    assert a.history.teacher_nfe == b.history.teacher_nfe


def _carried(path: Path) -> tuple[int, dict]:
    tensors, meta = load_state(path)
    return meta["update"], {k[len("carry/"):]: v for k, v in tensors.items()
                            if k.startswith("carry/")}


@pytest.mark.parametrize("case", list(CASES))
def test_a_run_interrupted_mid_trajectory_resumes_bit_exactly(case, tmp_path, monkeypatch):
    options, stop, resumes_at = CASES[case]
    ref = _distill(options, checkpoint_dir=tmp_path / "ref")
    assert ref.history.resumed_from == 0 and len(ref.history.loss) == options["updates"]

    _interrupt_at(monkeypatch, stop)
    with pytest.raises(Interrupted):
        _distill(options, checkpoint_dir=tmp_path / "run")
    monkeypatch.undo()
    state = tmp_path / "run" / f"sfd-{options['student_steps']}.state"
    k, carried = _carried(state)
    # the last checkpoint is mid-trajectory: a started trajectory, not at its first interval
    assert k == resumes_at and int(carried["k"]) == k
    assert "z_student" in carried and int(carried["i"]) >= 1, sorted(carried)
    assert any(n.startswith("hist_x") for n in carried)   # the teacher's DPM-Solver++ history
    if case == "sfd_v":
        assert "y" in carried and 2 <= int(carried["n"]) <= 4

    again = _distill(options, checkpoint_dir=tmp_path / "run")   # the same call
    assert again.history.resumed_from == resumes_at
    _assert_identical(again, ref)
    # checkpointing changes nothing either: a run without checkpoint_dir trains the same
    _assert_identical(_distill(options), ref)
    # a rerun of a finished run trains nothing and returns the same student
    done = _distill(options, checkpoint_dir=tmp_path / "run")
    assert done.history.resumed_from == options["updates"]
    _assert_identical(done, ref)
    assert (tmp_path / "run" / f"sfd-{options['student_steps']}-nfe").exists()


def test_stage2_resumes_and_names_its_own_state(tmp_path, monkeypatch):
    stage1 = _distill(dict(student_steps=2, afs=True, updates=3))
    opts = dict(updates=6, batch_size=32, lr=1e-3, progress=False, seed=3,
                checkpoint_every=2)
    ref = sfd.stage2(stage1, **opts)
    _interrupt_at(monkeypatch, 3)
    with pytest.raises(Interrupted):
        sfd.stage2(stage1, checkpoint_dir=tmp_path, **opts)
    monkeypatch.undo()
    assert (tmp_path / "sfd-1-stage2.state").exists()
    again = sfd.stage2(stage1, checkpoint_dir=tmp_path, **opts)
    assert again.history.resumed_from == 2 and again.steps == 1
    _assert_identical(again, ref)


def test_other_settings_are_refused_by_name(tmp_path):
    options = dict(student_steps=2, updates=2, checkpoint_every=1)
    _distill(options, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="lr"):
        _distill(options, checkpoint_dir=tmp_path, lr=2e-3)
    with pytest.raises(CheckpointError, match="teacher_substeps"):
        _distill(options, checkpoint_dir=tmp_path, teacher_substeps=3)
    other_teacher = _teacher(seed=1)     # the same options, other teacher weights
    with pytest.raises(CheckpointError, match="teacher"):
        sfd.distill_sfd(other_teacher, checkpoint_dir=tmp_path, **{**BASE, **options})


class Flaky(torch.nn.Module):
    """A teacher returning NaN on the calls whose index is in `bad` (or all from `from_`)."""

    def __init__(self, inner, bad=(), from_=None):
        super().__init__()
        self.inner, self.bad, self.from_, self.calls = inner, set(bad), from_, 0

    def forward(self, z, t, **cond):
        out = self.inner(z, t, **cond)
        i, self.calls = self.calls, self.calls + 1
        if i in self.bad or (self.from_ is not None and i >= self.from_):
            return torch.full_like(out, float("nan"))
        return out


def _finite_state(path) -> bool:
    tensors, _ = load_state(path)
    return all(bool(torch.isfinite(v).all()) for k, v in tensors.items()
               if k.startswith(("student/", "ema/")) and v.is_floating_point())


def test_nan_from_the_teacher_is_skipped(tmp_path):
    # 2 intervals of 2 DPM-Solver++ substeps per trajectory: update k calls the teacher at
    # 2k and 2k + 1. Call 4 (update 2, a trajectory's first interval) spoils that
    # trajectory, so updates 2 and 3 are skipped; call 11 (update 5, a last interval) only 5
    teacher = Flaky(_teacher(), bad={4, 11})
    r = sfd.distill_sfd(teacher, student_steps=2, updates=8, checkpoint_every=2, policy="off",
                        checkpoint_dir=tmp_path, student=_teacher(), **BASE)
    h = r.history
    assert h.skipped == [2, 3, 5], h.skipped
    assert [k for k, x in enumerate(h.loss) if x is None] == [2, 3, 5]
    assert all(math.isfinite(x) for x in h.loss if x is not None)
    assert all(bool(torch.isfinite(p).all()) for p in r.student.state_dict().values())
    assert _finite_state(tmp_path / "sfd-2.state")
    # the next trajectory starts clean: updates 4 and 6, 7 trained
    assert h.loss[4] is not None and h.loss[6] is not None and h.loss[7] is not None


def test_persistent_nan_stops_and_keeps_the_last_good_state(tmp_path):
    teacher = Flaky(_teacher(), from_=6)   # every update from 3 on
    with pytest.raises(NonFiniteError, match="consecutive"):
        sfd.distill_sfd(teacher, student_steps=2, updates=20, checkpoint_every=2, policy="off",
                        max_skips=3, checkpoint_dir=tmp_path, student=_teacher(), **BASE)
    state = tmp_path / "sfd-2.state"
    assert _carried(state)[0] == 4 and _finite_state(state)


def test_a_trajectory_is_drawn_from_the_generator_of_the_update_that_starts_it(monkeypatch):
    """The new RNG stream: trajectory j no longer has a generator of its own (old:
    hash(seed, j)); update k's draw uses the runner's update_generator(seed, name, k), and
    only the update that starts a trajectory draws from it. The randomness of a trajectory
    is then a pure function of (seed, stage, update), and a resumed run needs no counter
    beyond the carried trajectory."""
    drawn = {}
    real = sfd.run

    def run(method, config, **kw):
        draw, calls = method.draw, [0]

        def recording(gen, n):
            batch = draw(gen, n)
            if batch.noise is not None:
                drawn[calls[0]] = (batch.steps, batch.noise, batch.y)
            calls[0] += 1
            return batch

        method.draw = recording
        return real(method, config, **kw)

    monkeypatch.setattr(sfd, "run", run)
    _distill(dict(student_steps=3, updates=8))
    assert sorted(drawn) == [0, 3, 6]                   # one draw per trajectory
    for k, (steps, noise, y) in drawn.items():
        assert steps == 3 and y is None
        assert torch.equal(noise, torch.randn((32, 2), generator=update_generator(7, "sfd3", k)))
    drawn.clear()
    _distill(dict(student_steps=2, steps_range=(2, 4), afs=True, updates=9, classes=3,
                  label_dropout=0.5))
    starts = sorted(drawn)
    assert [b - a for a, b in zip(starts, starts[1:])] == [drawn[k][0] for k in starts[:-1]]
    for k, (steps, noise, y) in drawn.items():   # N, then the noise, then labels and dropout
        gen = update_generator(7, "sfd2v", k)
        assert steps == int(torch.randint(2, 5, (1,), generator=gen))
        assert torch.equal(noise, torch.randn((32, 2), generator=gen))
        labels = torch.randint(0, 3, (32,), generator=gen)
        drop = torch.rand(32, generator=gen) < 0.5
        assert torch.equal(y, torch.where(drop, torch.full_like(labels, -1), labels))


def test_evaluation_time_is_not_training_time():
    """on_eval(result_so_far, update, secs) as before, on the runner's clock: secs and
    history.eval_times are the training time at each evaluation, which excludes the
    evaluations (0.3 s each here); wall_time excludes them too, and history.eval_time holds
    them. on_eval never sees the untrained student (history.initial stays None)."""
    seen = []

    def on_eval(result, k, secs):
        assert isinstance(result, sfd.SFDResult) and not result.student.training
        seen.append((k, secs))
        time.sleep(0.3)
        return k / 2

    t0 = time.perf_counter()
    r = _distill(dict(student_steps=2, updates=6), eval_every=2, on_eval=on_eval)
    elapsed = time.perf_counter() - t0
    h = r.history
    assert [k for k, _ in seen] == h.eval_updates == [2, 4, 6]
    assert h.eval_values == [1.0, 2.0, 3.0] and h.initial is None
    for (_, secs), t in zip(seen, h.eval_times):
        assert abs(secs - t) < 0.05
    assert all(0 < b - a < 0.3 for a, b in zip(h.eval_times, h.eval_times[1:])), h.eval_times
    assert h.eval_time >= 0.9 and h.wall_time < elapsed - 0.9
    assert h.eval_times[-1] <= h.wall_time


# --- 2 gloo ranks -------------------------------------------------------------------------

DDP_CASE = dict(student_steps=2, steps_range=(2, 3), afs=True, label_dropout=0.25,
                ema_decay=0.9, updates=8, checkpoint_every=2, classes=3)
DDP_STOP = 5  # resumes from the checkpoint of update 4


def worker(out: str) -> None:
    """On each rank: SFD-v on 2 ranks, uninterrupted, and interrupted at update DDP_STOP
    then rerun; rank 0 writes both students and histories to `out`."""
    from safetensors.torch import save_file

    from fastdiff.engine.parallel import barrier, cleanup, ddp_wrapper, init_from_env

    torch.set_num_threads(1)
    info = init_from_env(timeout_s=15)
    out = Path(out)
    par = dict(rank=info.rank, world_size=info.world_size, wrap_student=ddp_wrapper(info.device))
    whole = _distill(DDP_CASE, **par)

    class Patch:  # pytest's monkeypatch, by hand
        def setattr(self, obj, name, value):
            real = getattr(obj, name)
            self.undo = lambda: setattr(obj, name, real)
            setattr(obj, name, value)

    patch = Patch()
    _interrupt_at(patch, DDP_STOP)
    try:
        _distill(DDP_CASE, checkpoint_dir=out / "ckpt", **par)
        raise AssertionError("not interrupted")
    except Interrupted:
        pass
    patch.undo()
    barrier()   # rank 0 has written its checkpoint before anyone reads it
    k, carried = _carried(out / "ckpt" / "sfd-2.state")
    resumed = _distill(DDP_CASE, checkpoint_dir=out / "ckpt", **par)
    if info.is_main:
        for name, r in (("whole", whole), ("resumed", resumed)):
            save_file({n: v.contiguous() for n, v in r.student.state_dict().items()},
                      str(out / f"{name}.safetensors"))
            (out / f"{name}.json").write_text(json.dumps(
                {"loss": r.history.loss, "resumed_from": r.history.resumed_from,
                 "teacher_nfe": r.history.teacher_nfe}))
        (out / "checkpoint.json").write_text(json.dumps(
            {"update": k, "mid_trajectory": "z_student" in carried and int(carried["i"]) >= 1,
             "batch": int(carried["z_student"].shape[0])}))
    cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~15-30 s on the shared 2-core box: 3 Python processes
def test_two_ranks_equal_one_process_and_resume_mid_trajectory(tmp_path):
    from safetensors.torch import load_file

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", __file__, "worker",
           str(tmp_path)]
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    ck = json.loads((tmp_path / "checkpoint.json").read_text())
    # rank 0's checkpoint holds the whole trajectory batch (both ranks' slices)
    assert ck == {"update": 4, "mid_trajectory": True, "batch": BASE["batch_size"]}
    ref = _distill(DDP_CASE)  # one process, the same global batch
    for name in ("whole", "resumed"):
        got = load_file(str(tmp_path / f"{name}.safetensors"))
        for n, v in ref.student.state_dict().items():
            torch.testing.assert_close(got[n], v, rtol=1e-5, atol=1e-6, msg=f"{name}: {n}")
        h = json.loads((tmp_path / f"{name}.json").read_text())
        torch.testing.assert_close(torch.tensor(h["loss"]), torch.tensor(ref.history.loss),
                                   rtol=1e-5, atol=1e-7)
        assert h["teacher_nfe"] == ref.history.teacher_nfe
        assert h["resumed_from"] == (4 if name == "resumed" else 0)


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    sys.exit({"worker": worker}[mode](*rest) or 0)
