"""`fastdiff demo --diffusers` (issue 16's quality report) in its quick mode, end to end:
a tiny UNet2DConditionModel pipeline folder and prompt .npz, the teacher trained by
train_teacher on prompt embeddings, `fastdiff distill --method guided` on them, and the
report / results.json with every measure against its target. Plus the pieces it rests on:
prompt dropout to the negative prompt in teacher training, labels mapped to prompts."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("diffusers")

from fastdiff.apps.diffusers_demo import (  # noqa: E402
    NEGATIVE_ROW,
    QUICK_RECIPE,
    PromptLabels,
    prompt_table,
    run_diffusers_demo,
)
from fastdiff.training.teacher import teacher_draw  # noqa: E402


def test_teacher_draw_drops_prompts_to_the_negative_prompt():
    x = torch.randn(50, 1, 8, 8)
    conds = {"encoder_hidden_states": torch.randn(50, 3, 4)}
    null = {"encoder_hidden_states": torch.full((3, 4), 7.0)}
    with_c = teacher_draw(x, None, 0.5, conds, null)(torch.Generator().manual_seed(3), 64)
    without = teacher_draw(x, None, 0.5)(torch.Generator().manual_seed(3), 64)
    # the conditions take no random draws: the same examples, times and noise
    for k in ("x", "t", "eps"):
        assert torch.equal(with_c[k], without[k])
    e = with_c["cond"]["encoder_hidden_states"]
    dropped = (e == 7.0).all(dim=(1, 2))
    assert 10 < int(dropped.sum()) < 54          # about half of 64 at p = 0.5
    kept = ~dropped
    rows = [int(torch.nonzero((x == xi).flatten(1).all(1))[0]) for xi in with_c["x"][kept]]
    assert torch.equal(e[kept], conds["encoder_hidden_states"][rows])


def test_prompt_labels_maps_the_null_label_to_the_negative_prompt():
    table = prompt_table(QUICK_RECIPE)
    assert table.shape == (11, QUICK_RECIPE.prompt_tokens, QUICK_RECIPE.cross_attention_dim)
    seen = {}

    class Recorder(torch.nn.Module):
        schedule = None

        def forward(self, z, t, encoder_hidden_states):
            seen["e"] = encoder_hidden_states
            return z

    wrapped = PromptLabels(Recorder(), table)
    z = torch.zeros(3, 1, 8, 8)
    wrapped(z, torch.zeros(3), y=torch.tensor([2, -1, 9]))
    assert torch.equal(seen["e"], table[[2, NEGATIVE_ROW, 9]])


def test_quick_demo_writes_report_and_results(tmp_path):
    out = tmp_path / "demo"
    report = run_diffusers_demo(out, quick=True, progress=False, log=lambda *a: None)
    text = report.read_text()
    assert "not Inception FID" in text and "--method guided" in text
    res = json.loads((out / "results.json").read_text())
    ws = ["w=0", "w=2"]
    for key in ("teacher_reference", "stage1_reference", "teacher_few_steps", "student_ddim",
                "student_stochastic_sampler", "stochastic_trained"):
        assert sorted(res[key]) == ws, key
        for fid, acc, _sd in res[key].values():
            assert math.isfinite(fid) and fid >= 0, (key, fid)
            assert 0.0 <= acc <= 1.0, (key, acc)
    measures = res["measures"]
    assert len(measures) == len(ws) + 2
    for m in measures:
        assert math.isfinite(m["value"]), m
        assert m["verdict"].split()[0] in ("MET", "MISSED"), m
        assert m["verdict"].split()[0] in text
    # stage 1 starts as the teacher (zero-initialised cond_proj): no error at w = 0
    assert res["stage1_rel_error_initial"]["w=0"] == pytest.approx(0.0, abs=1e-6)
    # the real user path ran: a pipeline folder as --teacher, the .npz as --data
    assert "--teacher" in res["command"] and ".npz" in res["command"]
    assert (out / "distill" / "stage1").is_dir() and (out / "distill" / "stochastic").is_dir()
    assert list(out.glob("stochastic-4steps-w2.png"))
