"""The benchmarks cannot rot: the naive baseline agrees with fastdiff, and the quick subset
of the suite (python -m benchmarks.summary --quick) runs in-process and reports sane numbers.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import summary  # noqa: E402
from benchmarks.naive_pd import naive_pd_loss  # noqa: E402
from fastdiff.apps.profile import build_pair, random_batch  # noqa: E402
from fastdiff.engine.schedules import CosineSchedule  # noqa: E402
from fastdiff.methods.pd import PDBatch, pd_update  # noqa: E402


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("student_steps", [1, 4, 32])
def test_naive_pd_matches_fastdiff(one_thread, student_steps):
    """Same inputs, same weights: the paper's x-space loss with the truncated-SNR weight
    equals fastdiff's v-space snr_trunc loss (DESIGN §2), and so do the gradients."""
    teacher, student = build_pair("demo", "cpu", seed=3)
    batch = random_batch(teacher, 16, student_steps, seed=4)
    # include both ends: t = 1 (alpha = 0) and the last step to t'' = 0 (sigma = 0)
    t = batch.t.clone()
    t[0], t[1] = 1.0, 1.0 / student_steps
    sched = CosineSchedule()
    batch = PDBatch(z_t=batch.z_t, t=t, y=batch.y)

    ref = pd_update(student, teacher, batch, student_steps, sched, weighting="snr_trunc",
                    autocast=torch.autocast("cpu", enabled=False))
    ref.backward()
    g_ref = _grads(student)
    student.zero_grad(set_to_none=True)

    naive = naive_pd_loss(student, teacher, batch.z_t, batch.t, student_steps, batch.cond)
    naive.backward()
    g_naive = _grads(student)

    assert ref.item() > 0
    assert naive.item() == pytest.approx(ref.item(), rel=1e-4)
    # the textbook x-space target cancels in float32 for small steps (DESIGN §2): compare
    # the gradients as vectors, not element by element
    assert (g_naive - g_ref).norm() <= 1e-3 * g_ref.norm()


@pytest.mark.slow
def test_quick_benchmark_subset_runs(tmp_path, one_thread, monkeypatch, capsys):
    """`python -m benchmarks.summary --quick` in-process: every quick case runs and
    records finite, positive figures with the ceilings attached."""
    monkeypatch.setenv("FASTDIFF_BENCH_THREADS", "1")
    out = tmp_path / "quick.json"
    assert summary.main(["--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    names = {b["name"] for b in data["benchmarks"]}
    for provider in ("fastdiff", "eager", "compile"):
        assert f"bench_kernel[fused_pd_loss_fwdbwd-1M-fp32-{provider}]" in names
    assert {"bench_round[demo-naive]", "bench_round[demo-fastdiff-default]"} <= names
    ceilings = data["machine_info"]["fastdiff_ceilings"]
    assert ceilings["copy_GBps"] > 0 and ceilings["matmul_fp32_TFLOPs"] > 0
    for b in data["benchmarks"]:
        info = b["extra_info"]
        assert info["ceilings"]["copy_GBps"] == ceilings["copy_GBps"]
        rate = info["GBps"] if info["kind"] == "kernel" else info["samples_per_s"]
        assert math.isfinite(rate) and rate > 0
    rows = summary.rows(data)
    naive_loss = [r for r in rows if r["provider"] == "fastdiff-default"][0]["loss_diff"]
    assert naive_loss < 1e-4  # equal loss on equal inputs
    table = capsys.readouterr().out
    assert "targets (issue 5):" in table and "fused_pd_loss fwd+bwd" in table


def test_methods_benchmark_compares_defaults_with_policy_off(one_thread):
    """benchmarks.methods times both providers every rep, in turned order, on the same run:
    where the policy keeps everything off (a short round on CPU) the two train the very same
    student, so their quality agrees exactly."""
    from benchmarks import methods
    from fastdiff.engine.data import load_dataset

    teacher, _ = build_pair("demo", "cpu")
    data = load_dataset("digits", seed=0)
    lines = []
    result = methods.compare("sfd", teacher.eval(), data, reps=2, updates=2, batch_size=4,
                             log=lines.append)
    assert len(lines) == 2 and result["order"] == [["off", "default"], ["default", "off"]]
    for name in methods.PROVIDERS:
        assert result[name]["reps"] == 2 and result[name]["min_s"] > 0
    assert result["off"]["quality"] == result["default"]["quality"]
    assert result["default"]["policy"]["decided"]["teacher_compile"] is False
    assert result["speedup"] > 0 and isinstance(result["verdict"], str)
    report = methods.format_report("sfd", result, {"updates": 2, "batch": 4, "threads": 1,
                                                   "reps": 2})
    assert "defaults / off" in report
