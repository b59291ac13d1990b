"""Data-parallel distillation on 2 CPU ranks (gloo): equal to one process, one checkpoint
writer, a killed rank takes the job down with a clear error, and a rerun resumes.

The file is also the worker the tests launch: `python tests/test_distributed.py MODE ...`
(under torchrun, or with RANK/WORLD_SIZE/MASTER_* set by hand).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TORCHRUN = str(Path(PY).with_name("torchrun"))
TIMEOUT_S = 15  # collective timeout used by the tests' jobs

ROUND = dict(teacher_steps=8, updates=6, batch_size=64, lr=1e-3, eval_every=3,
             checkpoint_every=2, heldout_size=256, seed=3, progress=False)


def _teacher():
    from fastdiff.engine.models import MLP

    torch.manual_seed(0)
    return MLP(dim=2, hidden=32, depth=2)


def _train_teacher(rank=0, world=1, wrap=None):
    from fastdiff.engine.data import load_dataset
    from fastdiff.engine.models import MLP
    from fastdiff.training import train_teacher

    torch.manual_seed(1)
    return train_teacher(MLP(dim=2, hidden=32, depth=2), load_dataset("eight_gaussians"),
                         updates=4, batch_size=64, lr=1e-3, warmup=2, seed=5, progress=False,
                         rank=rank, world_size=world, wrap_model=wrap)


def _run_round(rank=0, world=1, wrap=None, ckpt=None, teacher=None, **kw):
    from fastdiff.engine.data import load_dataset
    from fastdiff.methods.pd import distill_round

    data = load_dataset("eight_gaussians", seed=0)
    return distill_round(teacher or _teacher(), data, rank=rank, world_size=world,
                         wrap_student=wrap, checkpoint_dir=ckpt, **{**ROUND, **kw})


GUIDED = dict(w_min=0.0, w_max=4.0, updates=5, batch_size=64, lr=3e-3, eval_every=5,
              heldout_size=128, seed=2, progress=False)
GUIDED_CLI = ["distill", "--guided", "--start-steps", "2", "--end-steps", "1", "--updates",
              "3", "--stage1-updates", "4", "--batch-size", "32", "--seed", "4", "--quiet"]


def _guided_teacher():
    """A class-conditional MLP whose conditional and null outputs differ (guidance matters)."""
    from fastdiff.engine.models import MLP

    torch.manual_seed(2)
    m = MLP(dim=2, hidden=32, depth=2, num_classes=3)
    with torch.no_grad():
        m.out.weight.normal_(0, 0.3)
        m.cond.classes.weight.normal_(0, 1.0)
    return m.eval()


def _blobs_file(path: Path) -> Path:
    """Three labelled Gaussian blobs in 2-D as a user's `.npz` (x, y)."""
    import numpy as np

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (400,), generator=g)
    x = torch.tensor([[1.0, 0.0], [-0.5, 0.8], [-0.5, -0.8]])[y] + 0.15 * torch.randn(
        400, 2, generator=g)
    np.savez(path, x=x.numpy(), y=y.numpy())
    return path


def _run_guided(data_path, rank=0, world=1, wrap=None, **kw):
    from fastdiff.engine.data import load_dataset
    from fastdiff.methods.guided import distill_guidance

    return distill_guidance(_guided_teacher(), load_dataset(data_path), rank=rank,
                            world_size=world, wrap_student=wrap, **{**GUIDED, **kw})


STOCHASTIC = dict(steps=2, teacher_steps=4, updates=4, batch_size=64, lr=1e-3, eval_every=2,
                  heldout_size=64, checkpoint_every=3, seed=6, progress=False)


def _w_teacher():
    """A w-conditioned model (standing in for a stage-2 student) whose output depends on w."""
    from fastdiff.engine.models import add_scalar_condition

    m = _guided_teacher()
    torch.manual_seed(3)
    add_scalar_condition(m, "w")
    with torch.no_grad():
        for p in m.cond.scalars["w"].parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m.eval()


def _run_stochastic(data_path, rank=0, world=1, wrap=None, **kw):
    from fastdiff.engine.data import load_dataset
    from fastdiff.methods.guided import distill_stochastic

    return distill_stochastic(_w_teacher(), load_dataset(data_path), rank=rank,
                              world_size=world, wrap_student=wrap, **{**STOCHASTIC, **kw})


def _guided_cli_args(tmp: Path, out: str):
    from fastdiff.apps.cli import build_parser

    return build_parser().parse_args([*GUIDED_CLI, "--teacher", str(tmp / "guided-teacher"),
                                      "--data", str(tmp / "blobs.npz"), "--out", str(tmp / out)])


def _fsdp_checks(info, ref_student):
    """FSDP2 on gloo: a plain loop matches DDP; an FSDP-sharded frozen teacher works in
    distill_round; a sharded student is refused with a clear error."""
    import copy

    from fastdiff.engine.parallel import ddp_wrapper, fsdp_wrapper, full_state_dict

    base, weights = _teacher(), {}
    wrappers = {"ddp": ddp_wrapper(info.device), "fsdp": fsdp_wrapper(min_params=1000)}
    for kind, wrapper in wrappers.items():
        m = copy.deepcopy(base)
        w = wrapper(m)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)  # after wrapping (FSDP's new params)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            z, t = torch.randn(64, 2, generator=g), torch.rand(64, generator=g)
            sl = slice(info.rank * 32, (info.rank + 1) * 32)
            opt.zero_grad()
            (w(z[sl], t[sl]) ** 2).mean().backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.1)
            opt.step()
        weights[kind] = full_state_dict(m)
    assert any(hasattr(p, "placements") for p in m.parameters())  # really sharded
    for k, v in weights["ddp"].items():
        torch.testing.assert_close(weights["fsdp"][k], v, rtol=1e-5, atol=1e-6)

    sharded_teacher = fsdp_wrapper(min_params=1000)(_teacher())
    r = _run_round(info.rank, info.world_size, ddp_wrapper(info.device),
                   teacher=sharded_teacher, student=_teacher())
    for k, v in ref_student.state_dict().items():
        torch.testing.assert_close(r.student.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    with pytest.raises(NotImplementedError, match="sharded the student"):
        _run_round(info.rank, info.world_size, fsdp_wrapper(min_params=1000), updates=1)

    from fastdiff.engine.parallel import RankMismatchError, check_same

    assert check_same((3, 7), "x") == (3, 7)
    with pytest.raises(RankMismatchError, match="ranks disagree on where"):
        check_same((3, info.rank), "where")


# --- worker side -----------------------------------------------------------------------------


def _count_checkpoint_writes(log: Path, rank: int):
    """Patch the training-state writer (the runner's, which every method's loop uses) so
    every call leaves a line in `log` (per rank)."""
    import fastdiff.training.runner as runner

    real = runner.save_run_state

    def logged(path, **kw):
        with open(log, "a") as f:
            f.write(f"{rank} {kw['k']} {Path(path).name}\n")
        return real(path, **kw)

    runner.save_run_state = logged


def worker_round(out: str) -> None:
    """train_teacher and one distill_round on this rank; rank 0 writes the EMA weights and
    the round's history to `out`."""
    from safetensors.torch import save_file

    from fastdiff.engine.parallel import cleanup, ddp_wrapper, init_from_env

    torch.set_num_threads(1)
    info = init_from_env(timeout_s=TIMEOUT_S)
    out = Path(out)
    _count_checkpoint_writes(out / f"writes-rank{info.rank}.txt", info.rank)
    teacher = _train_teacher(info.rank, info.world_size, ddp_wrapper(info.device))
    r = _run_round(info.rank, info.world_size, ddp_wrapper(info.device), out / "ckpt")
    _fsdp_checks(info, r.student)
    # guided distillation: stage 1 from the library, then the CLI's two stages
    from fastdiff.apps.cli import cmd_distill
    from fastdiff.apps.torchrun import Ranks

    # (checkpointing at update 3, between two loss read-backs, must not desynchronise ranks)
    g = _run_guided(out / "blobs.npz", info.rank, info.world_size, ddp_wrapper(info.device),
                    checkpoint_dir=out / "guided-state", checkpoint_every=3)
    cmd_distill(_guided_cli_args(out, "guided-run"),
                Ranks(info.rank, info.world_size, info.device, ddp_wrapper(info.device)))
    # the stochastic-sampler student (checkpoint at update 3 of 4, held-out measure at 2)
    s = _run_stochastic(out / "blobs.npz", info.rank, info.world_size,
                        ddp_wrapper(info.device), checkpoint_dir=out / "stochastic-state")
    if info.is_main:
        save_file({k: v.contiguous() for k, v in g.student.state_dict().items()},
                  str(out / "guided.safetensors"))
        (out / "guided-history.json").write_text(json.dumps({"loss": g.history.loss}))
        save_file({k: v.contiguous() for k, v in s.student.state_dict().items()},
                  str(out / "stochastic.safetensors"))
        (out / "stochastic-history.json").write_text(json.dumps(
            {"loss": s.history.loss, "mismatch": s.history.heldout_mismatch}))
        for name, model in (("student", r.student), ("teacher", teacher)):
            save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                      str(out / f"{name}.safetensors"))
        h = r.history
        (out / "history.json").write_text(json.dumps(
            {"loss": h.loss, "mismatch": h.heldout_mismatch,
             "teacher_loss": teacher.train_history.loss}))
    cleanup()


def worker_cli(die_at: str, *argv: str) -> int:
    """`python -m fastdiff.apps.distributed ARGV` on this rank; rank 1 SIGKILLs itself at its
    update `die_at` (−1: never), as a crashed GPU or OOM-killed process would die."""
    import fastdiff.methods.pd as pd
    from fastdiff.apps.distributed import main

    torch.set_num_threads(1)
    die_at = int(die_at)
    if int(os.environ["RANK"]) == 1 and die_at >= 0:
        real, calls = pd.pd_update, [0]

        def pd_update(*a, **kw):
            if calls[0] == die_at:
                os.kill(os.getpid(), signal.SIGKILL)
            calls[0] += 1
            return real(*a, **kw)

        pd.pd_update = pd_update
    return main(list(argv))


# --- test side -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


def _launch_ranks(args, world=2):
    """Start `world` ranks by hand (the env torchrun would set), without torchrun's agent,
    so that a survivor's own reaction to a dead peer is what we observe."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([PY, __file__, *args], env=env, cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def _assert_same_weights(got: dict, ref):
    for name, v in ref.state_dict().items():
        torch.testing.assert_close(got[name], v, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow  # ~20-40 s on the shared 2-core box: 2-3 Python processes
def test_two_ranks_under_torchrun_equal_one_process_and_one_writer(tmp_path):
    from safetensors.torch import load_file

    from fastdiff.apps.distill import distill_guided_cli
    from fastdiff.engine.checkpoint import load, save
    from fastdiff.engine.data import load_dataset

    save(_guided_teacher(), tmp_path / "guided-teacher")
    _blobs_file(tmp_path / "blobs.npz")
    cmd = [TORCHRUN, "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", __file__, "round", str(tmp_path)]
    p = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]

    # one process, the same global batch (64) and seed
    h = json.loads((tmp_path / "history.json").read_text())
    teacher = _train_teacher()
    _assert_same_weights(load_file(str(tmp_path / "teacher.safetensors")), teacher)
    torch.testing.assert_close(torch.tensor(h["teacher_loss"]),
                               torch.tensor(teacher.train_history.loss), rtol=1e-5, atol=1e-7)
    ref = _run_round()
    _assert_same_weights(load_file(str(tmp_path / "student.safetensors")), ref.student)
    torch.testing.assert_close(torch.tensor(h["loss"]), torch.tensor(ref.history.loss),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.tensor(h["mismatch"]),
                               torch.tensor(ref.history.heldout_mismatch), rtol=1e-5, atol=1e-7)
    # rank 0 wrote every checkpoint (the runner's, each loop's at its checkpoint_every and at
    # its end: the PD round's at updates 2, 4 and 6; guided stage 1's at 3 and 5; the guided
    # CLI's stage 1 at 4 and its 2 -> 1 round at 3; the stochastic student's at 3 and 4);
    # rank 1 never wrote
    assert (tmp_path / "writes-rank0.txt").read_text().split("\n")[:-1] == [
        "0 2 round-00008-to-00004.state", "0 4 round-00008-to-00004.state",
        "0 6 round-00008-to-00004.state", "0 3 stage1.state", "0 5 stage1.state",
        "0 4 stage1.state", "0 3 round-00002-to-00001.state", "0 3 stochastic-00002.state",
        "0 4 stochastic-00002.state"]
    assert not (tmp_path / "writes-rank1.txt").exists()

    # guided stage 1 on 2 ranks trains what one process trains with the same global batch
    g = _run_guided(tmp_path / "blobs.npz")
    _assert_same_weights(load_file(str(tmp_path / "guided.safetensors")), g.student)
    torch.testing.assert_close(
        torch.tensor(json.loads((tmp_path / "guided-history.json").read_text())["loss"]),
        torch.tensor(g.history.loss), rtol=1e-5, atol=1e-7)
    # ...and so does `distill --guided` under torchrun (stage 1, then 2 -> 1 steps)
    distill_guided_cli(load(tmp_path / "guided-teacher"),
                       load_dataset(tmp_path / "blobs.npz", seed=4),  # the CLI's --seed 4
                       _guided_cli_args(tmp_path, "guided-one"))
    for part in ("stage1", "student"):
        two, one = load(tmp_path / "guided-run" / part), load(tmp_path / "guided-one" / part)
        assert "w" in two.scalar_conds
        _assert_same_weights(two.state_dict(), one)
    # the stochastic-sampler student on 2 ranks trains what one process trains
    st = _run_stochastic(tmp_path / "blobs.npz")
    _assert_same_weights(load_file(str(tmp_path / "stochastic.safetensors")), st.student)
    sh = json.loads((tmp_path / "stochastic-history.json").read_text())
    assert len(sh["mismatch"]) == 2 and st.history.eval_updates == [2, 4]
    for key, mine in (("loss", st.history.loss), ("mismatch", st.history.heldout_mismatch)):
        torch.testing.assert_close(torch.tensor(sh[key]), torch.tensor(mine), rtol=1e-5,
                                   atol=1e-7)


@pytest.mark.slow  # ~20-40 s on the shared 2-core box: 2-3 Python processes
def test_killed_rank_stops_the_job_clearly_and_a_rerun_resumes(tmp_path):
    from fastdiff.engine.checkpoint import load, save
    from fastdiff.engine.data import load_dataset
    from fastdiff.methods.pd import progressive_distill

    save(_teacher(), tmp_path / "teacher")
    out = tmp_path / "run"
    argv = ["--timeout-s", str(TIMEOUT_S), "distill", "--teacher", str(tmp_path / "teacher"),
            "--data", "eight_gaussians", "--out", str(out), "--start-steps", "4",
            "--end-steps", "2", "--updates", "30", "--batch-size", "32",
            "--checkpoint-every", "10", "--eval-every", "10", "--seed", "1", "--quiet"]

    # rank 1 dies at its update 24: rank 0 wrote the checkpoint of update 20, then fails
    # in the all-reduce of update 24, which waits for rank 1
    ranks = _launch_ranks(["cli", "24", *argv])
    rank0, rank1 = ranks
    t_dead = None
    for _ in range(1200):
        if rank1.poll() is not None:
            t_dead = time.monotonic()
            break
        time.sleep(0.1)
    assert rank1.wait() == -signal.SIGKILL
    try:
        rc = rank0.wait(timeout=TIMEOUT_S + 20)
    except subprocess.TimeoutExpired:
        rank0.kill()
        raise AssertionError("rank 0 hung after rank 1 died") from None
    waited = time.monotonic() - t_dead
    err = rank0.stderr.read()
    assert rc == 1, err[-3000:]
    assert "rank 0: error: a collective failed" in err and "Rerun the same command" in err, err
    assert waited < TIMEOUT_S + 10, waited
    state = out / "checkpoints" / "round-00004-to-00002.state"
    assert state.exists() and not (out / "student").exists()

    # the same command again, both ranks alive: resumes at update 20 and finishes
    ranks = _launch_ranks(["cli", "-1", *argv])
    outs = [p.communicate(timeout=120) for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert "resumed from update 20" in outs[0][0], outs[0][0]
    assert outs[1][0] == ""  # only rank 0 prints

    # ...to the student one uninterrupted process trains with the same global batch
    ref = progressive_distill(_teacher(), load_dataset("eight_gaussians", seed=1),
                              start_steps=4, end_steps=2, updates=30, batch_size=32,
                              lr=5e-4, eval_every=10, seed=1, progress=False)[-1].student
    got = load(out / "student")
    for (name, a), b in zip(got.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    sys.exit({"round": worker_round, "cli": worker_cli}[mode](*rest) or 0)
