"""fastdiff.engine.data: built-in data sets, the Dataset interface, a user's folders and arrays."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdiff.engine.data import (
    DataError,
    Dataset,
    as_dataset,
    checkerboard,
    dataset_names,
    eight_gaussians,
    from_tensors,
    load_dataset,
    two_moons,
)

TOY = ["eight_gaussians", "two_moons", "checkerboard"]


@pytest.mark.parametrize("name", TOY)
def test_toy_shapes_and_determinism(name):
    a = load_dataset(name, seed=3, n_train=500, n_held_out=100)
    b = load_dataset(name, seed=3, n_train=500, n_held_out=100)
    c = load_dataset(name, seed=4, n_train=500, n_held_out=100)
    assert a.shape == (2,) and a.train.dtype == torch.float32
    assert a.train.shape == (500, 2) and a.held_out.shape == (100, 2)
    assert a.num_classes == 0 and a.train_labels is None and a.has_true_sampler
    assert torch.equal(a.train, b.train) and torch.equal(a.held_out, b.held_out)
    assert not torch.equal(a.train, c.train)
    assert not torch.equal(a.train[:100], a.held_out)  # the splits are different draws
    fresh = a.sample_true(300)
    assert fresh.shape == (300, 2) and torch.equal(fresh, b.sample_true(300))


def test_toy_samplers_follow_their_definitions():
    g = torch.Generator().manual_seed(0)
    x = eight_gaussians(20_000, g).double()
    angle = torch.atan2(x[:, 1], x[:, 0])
    nearest = torch.round(angle / (math.pi / 4)) * (math.pi / 4)
    centres = torch.stack([torch.cos(nearest), torch.sin(nearest)], 1)
    resid = x - centres
    assert abs(resid.std().item() - 0.1) < 0.005 and resid.mean().abs().max() < 0.01

    x = checkerboard(20_000, g)
    assert x.min() >= -1 and x.max() <= 1
    cell = ((x + 1) / 0.5).floor().long().clamp(0, 3)
    assert ((cell[:, 0] + cell[:, 1]) % 2 == 0).all()  # only the even squares
    counts = torch.bincount(cell[:, 0] * 4 + cell[:, 1], minlength=16)
    assert (counts[counts > 0] > 20_000 / 8 * 0.9).all() and (counts > 0).sum() == 8

    x = two_moons(20_000, g)
    assert x.mean(0).abs().max() < 0.03 and x.abs().max() < 1.3


def test_digits():
    d = load_dataset("digits")
    assert d.shape == (1, 8, 8) and d.num_classes == 10 and d.is_image
    assert len(d.train) + len(d.held_out) == 1797 and len(d.held_out) == 359
    assert d.train.min() == -1 and d.train.max() == 1
    assert set(d.train_labels.tolist()) == set(range(10))
    # the split is a partition: no held-out image appears in train
    tr = {tuple(r.tolist()) for r in d.train.flatten(1)}
    assert sum(tuple(r.tolist()) in tr for r in d.held_out.flatten(1)) <= 5  # duplicates exist
    assert torch.equal(load_dataset("digits").train, d.train)
    assert not torch.equal(load_dataset("digits", seed=1).train, d.train)


def test_photo_patches():
    d = load_dataset("photo-patches", n_train=64, n_held_out=16)
    assert d.train.shape == (64, 3, 16, 16) and d.held_out.shape == (16, 3, 16, 16)
    assert d.train.min() >= -1 and d.train.max() <= 1 and d.train.std() > 0.1
    assert torch.equal(load_dataset("photo_patches", n_train=64, n_held_out=16).train, d.train)
    assert load_dataset("photo-patches", n_train=8, n_held_out=2, size=8).shape == (3, 8, 8)


def test_batches_are_deterministic_and_labels_follow_examples():
    d = load_dataset("digits")
    it1, it2 = d.batches(32), d.batches(32)
    for _ in range(3):
        (x1, y1), (x2, y2) = next(it1), next(it2)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    lookup = {tuple(r.tolist()): int(lab) for r, lab in zip(d.train.flatten(1), d.train_labels)}
    assert all(lookup[tuple(r.tolist())] == int(lab) for r, lab in zip(x1.flatten(1), y1))
    g = torch.Generator().manual_seed(5)
    x3, _ = next(d.batches(32, generator=g))
    assert not torch.equal(x3, next(d.batches(32))[0])
    xh, yh = next(d.batches(8, split="held_out"))
    assert xh.shape == (8, 1, 8, 8) and yh.shape == (8,)
    x, y = next(load_dataset("two_moons", n_train=100, n_held_out=10).batches(16))
    assert x.shape == (16, 2) and y is None


@settings(deadline=None, max_examples=40)
@given(
    n=st.integers(1, 40),
    batch_size=st.integers(1, 50),
    epochs=st.integers(1, 3),
    drop_last=st.booleans(),
)
def test_batches_visit_every_example_once_per_epoch(n, batch_size, epochs, drop_last):
    x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 2)
    d = Dataset("t", x, x[:1])
    got = [b for b, _ in d.batches(batch_size, epochs=epochs, drop_last=drop_last)]
    assert all(len(b) == batch_size for b in got[:-1])
    seen = torch.cat(got)[:, 0].long() if got else torch.empty(0, dtype=torch.long)
    counts = torch.bincount(seen, minlength=n)
    if drop_last:
        assert len(seen) == (n * epochs // batch_size) * batch_size
        assert counts.max() <= epochs
    else:
        assert (counts == epochs).all()


def test_as_dataset_accepts_every_form_of_data():
    x = torch.randn(50, 1, 4, 4)
    y = torch.arange(50) % 5
    d = as_dataset(x)
    assert len(d.train) == 45 and len(d.held_out) == 5 and d.num_classes == 0
    d = as_dataset((x, y))
    assert d.num_classes == 5 and len(d.train_labels) == 45
    assert as_dataset(d) is d
    assert as_dataset("digits").num_classes == 10
    assert as_dataset(np.random.rand(20, 2)).shape == (2,)
    with pytest.raises(DataError, match="cannot use dict"):
        as_dataset({"x": x})
    with pytest.raises(DataError, match="3 labels for 50 examples"):
        as_dataset((x, torch.arange(3)))
    with pytest.raises(DataError, match="integer class labels"):
        as_dataset((x, torch.rand(50)))
    with pytest.raises(DataError, match="dtype torch.int64"):
        as_dataset(torch.zeros(10, 2, dtype=torch.int64))
    with pytest.raises(DataError, match="unknown data set 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="held_out=60"):
        from_tensors(x, held_out=60)
    assert set(dataset_names()) >= {"digits", "photo-patches", *TOY}


# --- a user's own data -------------------------------------------------------------------------


def _png(path, size=(6, 5), mode="L", value=0):
    from PIL import Image

    Image.new(mode, size, value if mode == "L" else (value, 0, 255)).save(path)


def test_image_folder(tmp_path):
    for i in range(10):
        _png(tmp_path / f"{i:02d}.png", value=25 * i)
    d = load_dataset(tmp_path, held_out=2)
    assert d.shape == (1, 5, 6) and len(d.train) == 8 and d.num_classes == 0
    assert torch.allclose(
        torch.cat([d.train, d.held_out]).amin((1, 2, 3)).sort().values,
        torch.arange(10) * 25 / 127.5 - 1,
    )


def test_image_folder_with_class_subfolders_and_rgb(tmp_path):
    for c, name in enumerate(["cat", "dog", "eel"]):
        (tmp_path / name).mkdir()
        for i in range(4):
            _png(tmp_path / name / f"{i}.png", mode="RGB" if c == 0 else "L", value=10 * c)
    d = load_dataset(str(tmp_path), held_out=0.25)
    assert d.shape == (3, 5, 6) and d.num_classes == 3
    x = torch.cat([d.train, d.held_out])
    y = torch.cat([d.train_labels, d.held_out_labels])
    assert torch.bincount(y).tolist() == [4, 4, 4]
    assert torch.allclose(x[y == 1][:, 0, 0, 0], torch.full((4,), 10 / 127.5 - 1))


def test_image_folder_errors_name_the_culprit(tmp_path):
    with pytest.raises(DataError, match="no image files"):
        load_dataset(tmp_path)
    _png(tmp_path / "a.png", size=(8, 8))
    _png(tmp_path / "b.png", size=(9, 8))
    with pytest.raises(DataError, match=r"b\.png: image is 9×8 but a\.png is 8×8"):
        load_dataset(tmp_path)
    (tmp_path / "b.png").unlink()
    (tmp_path / "c.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"c\.png: cannot read image"):
        load_dataset(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "missing")
    with pytest.raises(DataError, match="single image"):
        load_dataset(tmp_path / "a.png")


def test_array_files(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (20, 7, 7, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", imgs)
    d = load_dataset(tmp_path / "x.npy", held_out=0)
    assert d.shape == (3, 7, 7) and d.train.min() >= -1 and d.train.max() <= 1
    np.savez(tmp_path / "xy.npz", x=imgs[..., 0], y=np.arange(20) % 4)
    d = load_dataset(tmp_path / "xy.npz")
    assert d.shape == (1, 7, 7) and d.num_classes == 4
    np.savez(tmp_path / "pts.npz", data=np.random.rand(30, 2).astype(np.float32))
    assert load_dataset(tmp_path / "pts.npz").shape == (2,)
    np.savez(tmp_path / "bad.npz", a=imgs, b=imgs)
    with pytest.raises(DataError, match=r"bad\.npz: no examples array"):
        load_dataset(tmp_path / "bad.npz")
    (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError, match=r"broken\.npy: cannot read"):
        load_dataset(tmp_path / "broken.npy")
    np.save(tmp_path / "nan.npy", np.full((4, 2), np.nan))
    with pytest.raises(DataError, match="NaN"):
        load_dataset(tmp_path / "nan.npy")
