"""fastdiff.engine.checkpoint: model save/load, corrupt inputs, training state, RNG state."""

import json
import random

import numpy as np
import pytest
import torch

from fastdiff.engine.checkpoint import (
    CheckpointError,
    flatten_state_dict,
    load,
    load_state,
    rng_state,
    save,
    save_state,
    set_rng_state,
    unflatten_state_dict,
)
from fastdiff.engine.models import MLP, UNet, add_scalar_condition
from fastdiff.engine.schedules import CosineSchedule, LinearLogSNRSchedule

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.fixture
def unet():
    model = UNet(channels=16, num_res_blocks=1, num_classes=4)
    add_scalar_condition(model, "w", scale=0.25)
    return _randomise(model)


@pytest.fixture
def mlp():
    return _randomise(MLP(hidden=32, depth=2))


def test_round_trip_unet_with_classes_and_scalar_cond(unet, tmp_path):
    unet.schedule = LinearLogSNRSchedule(-12.0, 8.0)
    out = save(unet, tmp_path / "ckpt", metadata={"step": 7, "note": "teacher"})
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json"}
    loaded = load(tmp_path / "ckpt")
    z, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    cond = dict(y=torch.tensor([0, 3, -1, 2]), w=torch.linspace(0, 4, 4))
    expected = unet.eval()(z, t, **cond)
    assert expected.abs().sum() > 0
    assert torch.equal(loaded(z, t, **cond), expected)
    assert loaded.config == unet.config and loaded.scalar_conds == ("w",)
    assert loaded.schedule == LinearLogSNRSchedule(-12.0, 8.0)
    assert loaded.checkpoint_metadata == {"step": 7, "note": "teacher"}
    doc = json.loads((out / "config.json").read_text())
    assert doc["prediction"] == "v" and doc["num_classes"] == 4 and doc["scalar_conds"] == ["w"]
    # the weights file path works as well as the folder
    assert torch.equal(load(out / "model.safetensors")(z, t, **cond), expected)


@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method:DeprecationWarning")
def test_round_trip_mlp_default_schedule(mlp, tmp_path):
    save(torch.compile(mlp), tmp_path / "m")  # saved as the module inside the wrapper
    loaded = load(tmp_path / "m")
    z, t = torch.randn(8, 2), torch.rand(8)
    assert torch.equal(loaded(z, t), mlp(z, t)) and mlp(z, t).abs().sum() > 0
    assert loaded.schedule == CosineSchedule()


def test_save_over_existing_leaves_no_temp_dirs(unet, mlp, tmp_path):
    save(unet, tmp_path / "ckpt")
    save(mlp, tmp_path / "ckpt")
    assert isinstance(load(tmp_path / "ckpt"), MLP)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"model.safetensors",
                                                               "config.json"}
    # save replaces only its own two files: everything else in the folder stays
    (tmp_path / "ckpt" / "student").mkdir()
    (tmp_path / "ckpt" / "student" / "config.json").write_text("keep me")
    (tmp_path / "ckpt" / "notes.txt").write_text("keep me too")
    save(unet, tmp_path / "ckpt")
    assert isinstance(load(tmp_path / "ckpt"), UNet)
    assert (tmp_path / "ckpt" / "student" / "config.json").read_text() == "keep me"
    assert (tmp_path / "ckpt" / "notes.txt").read_text() == "keep me too"
    # a config.json or weights that are not a fastdiff checkpoint's are never replaced
    for name, text in (("config.json", '{"_class_name": "UNet2DModel"}'),
                       ("model.safetensors", "not ours")):
        folder = tmp_path / f"precious-{name}"
        folder.mkdir()
        (folder / name).write_text(text)
        with pytest.raises(CheckpointError, match=f"precious-{name}"):
            save(mlp, folder)
        assert (folder / name).read_text() == text
        assert [p.name for p in folder.iterdir()] == [name]
    with pytest.raises(CheckpointError, match="is a file"):
        save(mlp, tmp_path / "ckpt" / "notes.txt")


def test_weights_and_config_of_two_saves_are_not_mixed(unet, mlp, tmp_path):
    # what a reader sees between save's two renames (or after a save killed there): the new
    # weights with the old config.json; load refuses the pair instead of mixing them
    folder = save(mlp, tmp_path / "c")
    old_config = (folder / "config.json").read_text()
    save(_randomise(MLP(hidden=32, depth=2), seed=1), folder)
    (folder / "config.json").write_text(old_config)
    with pytest.raises(CheckpointError, match="two different saves") as info:
        load(folder)
    assert str(folder) in str(info.value)


def test_non_finite_weights_are_never_saved(mlp, tmp_path):
    save(mlp, tmp_path / "c")
    before = (tmp_path / "c" / "model.safetensors").read_bytes()
    with torch.no_grad():
        next(mlp.parameters())[0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite weights"):
        save(mlp, tmp_path / "c")
    assert (tmp_path / "c" / "model.safetensors").read_bytes() == before


def test_missing_folder_and_missing_files(mlp, tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        load(tmp_path / "nowhere")
    save(mlp, tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load(tmp_path / "c")
    save(mlp, tmp_path / "d")
    (tmp_path / "d" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load(tmp_path / "d")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weights(mlp, tmp_path, damage):
    path = save(mlp, tmp_path / "c") / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x13\x37" * 100)
    with pytest.raises(CheckpointError, match="corrupt") as info:
        load(tmp_path / "c")
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "doc, match",
    [
        ({"_class_name": "UNet2DModel", "sample_size": 32}, "not a fastdiff checkpoint"),
        ("not json {", "not valid JSON"),
        (None, "version"),  # ours, but from a future format version
    ],
)
def test_foreign_config(mlp, tmp_path, doc, match):
    folder = save(mlp, tmp_path / "c")
    cfg = folder / "config.json"
    if doc is None:
        ours = json.loads(cfg.read_text())
        ours["version"] = 99
        cfg.write_text(json.dumps(ours))
    else:
        cfg.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(CheckpointError, match=match) as info:
        load(folder)
    assert str(folder) in str(info.value)


def test_mismatched_weights(mlp, tmp_path):
    folder = save(mlp, tmp_path / "c")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model"]["hidden"] = 64
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not match") as info:
        load(folder)
    assert str(folder) in str(info.value)


def test_saving_a_foreign_model_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="config"):
        save(torch.nn.Linear(2, 2), tmp_path / "lin")
    assert not (tmp_path / "lin").exists()


# --- training state ---------------------------------------------------------------------------


def test_save_state_round_trip(tmp_path):
    tensors = {"a": torch.randn(3, 4), "step": torch.tensor(5), "h": torch.randn(2).half()}
    meta = {"round": 2, "lr": 1e-4, "names": ["x", "y"], "done": None}
    path = save_state(tmp_path / "state.safetensors", tensors, meta)
    back, meta2 = load_state(path)
    assert meta2 == meta and back.keys() == tensors.keys()
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and torch.equal(back[k], tensors[k])
    save_state(path, {"b": torch.ones(2)}, {})  # replace in place
    assert list(load_state(path)[0]) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["state.safetensors"]


def test_load_state_errors(mlp, tmp_path):
    with pytest.raises(CheckpointError, match="missing.st"):
        load_state(tmp_path / "missing.st")
    path = save_state(tmp_path / "s.st", {"a": torch.randn(100)}, {"k": 1})
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_state(path)
    model_file = save(mlp, tmp_path / "c") / "model.safetensors"
    with pytest.raises(CheckpointError, match="not a fastdiff training-state"):
        load_state(model_file)


def test_flatten_round_trip_nested():
    sd = {
        "state": {0: {"step": torch.tensor(3.0), "m": torch.randn(2)}, 1: {}},
        "groups": [
            {
                "params": [0, 1],
                "betas": (0.9, 0.999),
                "lr": 1e-3,
                "amsgrad": False,
                "foreach": None,
                "name": "main",
            }
        ],  # fmt: skip
        (1, "x"): [torch.arange(3), 2.5, float("inf")],
    }
    tensors, meta = flatten_state_dict(sd)
    assert all(isinstance(v, torch.Tensor) for v in tensors.values()) and len(tensors) == 3
    back = unflatten_state_dict(*_via_json(tensors, meta))
    assert back.keys() == sd.keys() and list(back["state"]) == [0, 1]
    assert back["groups"] == sd["groups"] and isinstance(back["groups"][0]["betas"], tuple)
    assert torch.equal(back["state"][0]["m"], sd["state"][0]["m"])
    assert torch.equal(back[(1, "x")][0], sd[(1, "x")][0]) and back[(1, "x")][1:] == [
        2.5,
        float("inf"),
    ]
    with pytest.raises(TypeError, match="set"):
        flatten_state_dict({"bad": {1, 2}})


def _via_json(tensors, meta):
    return tensors, json.loads(json.dumps(meta))


def test_adamw_resume_is_exact(tmp_path):
    torch.manual_seed(0)
    model = MLP(hidden=16, depth=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    data = [(torch.randn(16, 2), torch.rand(16)) for _ in range(6)]

    def step(m, o, z, t):
        o.zero_grad()
        (m(z, t) - z).square().mean().backward()
        o.step()

    for z, t in data[:3]:
        step(model, opt, z, t)
    tensors, meta = flatten_state_dict({"model": model.state_dict(), "opt": opt.state_dict()})
    save_state(tmp_path / "resume.st", tensors, {**meta, "epoch": 3})
    for z, t in data[3:]:  # the uninterrupted run
        step(model, opt, z, t)

    tensors2, meta2 = load_state(tmp_path / "resume.st")
    assert meta2["epoch"] == 3
    state = unflatten_state_dict(tensors2, meta2)
    model2 = MLP(hidden=16, depth=1)
    model2.load_state_dict(state["model"])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1.0)  # hyperparameters come from the state
    opt2.load_state_dict(state["opt"])
    assert opt2.param_groups[0]["lr"] == 1e-2
    for z, t in data[3:]:
        step(model2, opt2, z, t)
    for (n, p), p2 in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, p2), n
    assert model.out.weight.abs().sum() > 0


def test_rng_state_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's generator
    np.random.standard_normal()
    state = rng_state()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    save_state(tmp_path / "rng.st", state, {})

    def draw():
        return (torch.rand(4), np.random.standard_normal(3), random.gauss(0, 1), random.random())

    first = draw()
    set_rng_state(load_state(tmp_path / "rng.st")[0])
    second = draw()
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert first[2:] == second[2:]
    assert not torch.equal(first[0], draw()[0])  # the generators do move on
    with pytest.raises(ValueError, match="bogus"):
        set_rng_state({"bogus": torch.zeros(1)})
