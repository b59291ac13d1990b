"""The command line: help for every command, one-line errors, sample/eval on a tiny model."""

import subprocess
import sys

import pytest
import torch

from fastdiff.apps.cli import build_parser, main
from fastdiff.engine.checkpoint import save
from fastdiff.engine.models import MLP


def test_every_command_explains_its_options(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"train-teacher", "distill", "sample", "eval", "demo"} <= set(sub.choices)
    for name, sp in sub.choices.items():
        for action in sp._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help text"


def test_errors_are_one_clear_line(tmp_path, capsys):
    code = main(["distill", "--teacher", str(tmp_path / "missing"), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("fastdiff: error:") and "\n" not in err and "missing" in err
    code = main(["train-teacher", "--data", str(tmp_path / "nothing.npy"), "--out",
                 str(tmp_path / "t"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("fastdiff: error:") and "nothing.npy" in err


def test_sample_and_eval_on_a_saved_model(tmp_path, capsys):
    torch.manual_seed(0)
    save(MLP(dim=2, hidden=16, depth=1), tmp_path / "m")
    out = tmp_path / "scatter.png"
    assert main(["sample", "--model", str(tmp_path / "m"), "--steps", "2", "--n", "50",
                 "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", "eight_gaussians",
                 "--steps", "1,2", "--n", "200"]) == 0
    table = capsys.readouterr().out
    assert "sliced Wasserstein" in table and table.count("\n| ") >= 2
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", "eight_gaussians",
                 "--guidance", "2"]) == 2
    assert "--guidance is for class-conditional digits" in capsys.readouterr().err


def test_entry_point_runs():
    # `python -m fastdiff` (fastdiff/__main__.py) is what `torchrun -m fastdiff` runs
    r = subprocess.run([sys.executable, "-m", "fastdiff", "distill", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--method {pd,guided,sfd}" in r.stdout


def test_debug_shows_the_traceback(tmp_path):
    from fastdiff.engine.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="missing"):
        main(["--debug", "distill", "--teacher", str(tmp_path / "missing"), "--out",
              str(tmp_path / "run")])


@pytest.mark.parametrize("steps", ["0", "a,b"])
def test_bad_step_lists_are_rejected(steps, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--model", "m", "--steps", steps])
