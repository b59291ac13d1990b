"""Progressive distillation: one round improves the match, resume after SIGKILL is exact."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastdiff.engine.checkpoint import load_state
from fastdiff.engine.data import load_dataset
from fastdiff.engine.models import MLP
from fastdiff.engine.schedules import CosineSchedule
from fastdiff.methods.pd import distill_round, draw_batch, progressive_distill, update_generator
from fastdiff.training import train_teacher

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy():
    data = load_dataset("eight_gaussians", seed=0)
    torch.manual_seed(0)
    teacher = train_teacher(MLP(dim=2, hidden=64, depth=2), data, updates=300, batch_size=256,
                            lr=3e-3, progress=False)
    return teacher, data


def test_round_reduces_the_heldout_mismatch(toy):
    teacher, data = toy
    r = distill_round(teacher, data, teacher_steps=4, updates=200, batch_size=128, lr=1e-3,
                      eval_every=50, progress=False, seed=1)
    h = r.history
    assert r.steps == 2 and r.teacher_steps == 4
    assert len(h.heldout_mismatch) == 4 and h.eval_updates == [50, 100, 150, 200]
    # the student after the round matches two teacher steps better than the untrained copy
    assert h.heldout_mismatch[-1] < 0.5 * h.initial_mismatch, (h.initial_mismatch, h)
    assert h.stopped_by == "updates" and h.samples_per_s > 0 and len(h.loss) == 200
    # the teacher never received gradients and was not changed
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_convergence_rule_ends_a_round_early(toy):
    teacher, data = toy
    r = distill_round(teacher, data, teacher_steps=2, updates=2000, batch_size=64, lr=1e-3,
                      eval_every=10, tolerance=0.5, patience=2, progress=False)
    assert r.history.stopped_by == "converged"
    assert r.history.updates_done < 2000


def test_student_times_are_the_papers_t_prime_and_t_double_prime():
    # t = i/N, t' = t − ½/N (the teacher's midpoint), t'' = t − 1/N; never swapped.
    from fastdiff.methods.pd import student_times

    t = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    mid, end = student_times(t, 4)
    assert torch.allclose(mid, t - 0.125) and torch.allclose(end, t - 0.25)
    assert (end < mid).all() and (mid < t).all()


def test_updates_draw_the_same_global_batch_on_any_number_of_ranks():
    data = load_dataset("eight_gaussians", seed=0)
    s = CosineSchedule()
    kw = dict(label_dropout=0.0, use_labels=False)
    whole = draw_batch(data.train, None, 4, 8, update_generator(0, "r", 3), s, **kw)
    halves = [draw_batch(data.train, None, 4, 8, update_generator(0, "r", 3), s, rank=r,
                         world=2, **kw) for r in (0, 1)]
    assert torch.equal(torch.cat([h.z_t for h in halves]), whole.z_t)
    assert torch.equal(torch.cat([h.t for h in halves]), whole.t)
    other = draw_batch(data.train, None, 4, 8, update_generator(0, "r", 4), s, **kw)
    assert not torch.equal(other.z_t, whole.z_t)


def test_bad_inputs_give_clear_errors(toy):
    teacher, data = toy
    kw = dict(updates=1, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="teacher_steps"):
        distill_round(teacher, data, teacher_steps=3, **kw)
    with pytest.raises(ValueError, match="weighting"):
        distill_round(teacher, data, teacher_steps=2, weighting="snr", **kw)
    with pytest.raises(ValueError, match="batch_size"):
        distill_round(teacher, data, teacher_steps=2, updates=1, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="start_steps"):
        progressive_distill(teacher, data, start_steps=48, **kw)
    with pytest.raises(ValueError, match="end_steps"):
        progressive_distill(teacher, data, start_steps=8, end_steps=16, **kw)
    with pytest.raises(ValueError, match="end_steps"):
        progressive_distill(teacher, data, start_steps=8, end_steps=3, **kw)


def test_progressive_distill_halves_down_and_skips_finished_rounds(toy, tmp_path):
    teacher, data = toy
    kw = dict(start_steps=8, end_steps=2, updates=[20, 10], batch_size=32, lr=1e-3,
              eval_every=10, progress=False, checkpoint_dir=tmp_path)
    results = progressive_distill(teacher, data, **kw)
    assert [r.steps for r in results] == [4, 2]
    assert (tmp_path / "student-00004").is_dir() and (tmp_path / "student-00002").is_dir()
    loaded: list = []
    again = progressive_distill(teacher, data, on_load=loaded.append, **kw)  # reloaded
    assert [m.sample_steps for m in loaded] == [4, 2]   # on_load saw each reloaded student
    assert all(m is r.student for m, r in zip(loaded, again))
    for a, b in zip(results, again):
        for p, q in zip(a.student.parameters(), b.student.parameters()):
            assert torch.equal(p, q)
        assert b.history.wall_time == pytest.approx(a.history.wall_time)
        assert b.student.sample_steps == a.student.sample_steps == a.steps


RUN = """
import sys, torch
torch.set_num_threads(1)
from fastdiff.engine.checkpoint import load, save
from fastdiff.methods.pd import distill_round
from fastdiff.engine.data import load_dataset
teacher = load(sys.argv[1])
r = distill_round(teacher, load_dataset("eight_gaussians", seed=0), teacher_steps=4,
                  updates=int(sys.argv[3]), batch_size=64, lr=1e-3, eval_every=50,
                  checkpoint_dir=sys.argv[2], checkpoint_every=25, progress=False, seed=7)
save(r.student, sys.argv[2] + "/final")
print("resumed_from", r.history.resumed_from)
"""


def _run(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", RUN, *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_resume_after_sigkill_gives_the_same_weights(toy, tmp_path):
    from fastdiff.engine.checkpoint import load, save

    teacher, _ = toy
    save(teacher, tmp_path / "teacher")
    updates = 600
    # an uninterrupted run
    ref = _run([tmp_path / "teacher", tmp_path / "ref", updates])
    out, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err
    # a run killed mid-round as soon as its second checkpoint is on disk
    ckpt = tmp_path / "killed"
    proc = _run([tmp_path / "teacher", ckpt, updates])
    state = ckpt / "round-00004-to-00002.state"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if state.exists():
            try:
                if load_state(state)[1]["update"] >= 50:
                    break
            except Exception:
                pass  # being replaced right now
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_state(state)[1]["update"]
    assert 0 < killed_at < updates
    # rerun the same command: it resumes and ends with bit-identical weights
    again = _run([tmp_path / "teacher", ckpt, updates])
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert f"resumed_from {killed_at}" in out
    a, b = load(tmp_path / "ref" / "final"), load(ckpt / "final")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.mark.slow
def test_one_step_student_beats_one_step_ddim_on_eight_gaussians(toy):
    from fastdiff.engine.samplers import sample
    from fastdiff.eval.metrics import sliced_wasserstein

    teacher, data = toy
    results = progressive_distill(teacher, data, start_steps=8, end_steps=1, updates=300,
                                  batch_size=256, lr=2e-3, eval_every=100, progress=False)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(2000, 2, generator=g)
    true = data.sample_true(2000, generator=g)
    sw_teacher = float(sliced_wasserstein(sample(teacher, noise, 1), true))
    sw_student = float(sliced_wasserstein(sample(results[-1].student, noise, 1), true))
    print(f"1-step SW: teacher DDIM {sw_teacher:.4f}, distilled student {sw_student:.4f}")
    assert sw_student < 0.5 * sw_teacher, (sw_student, sw_teacher)
