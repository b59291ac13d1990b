"""fastdiff.eval.metrics: distances against closed forms, and FID-digits' behaviour and cache."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdiff.engine.data import load_dataset
from fastdiff.eval.metrics import (
    DigitsFID,
    energy_distance,
    frechet_distance,
    sliced_wasserstein,
    true_spread,
)

# --- Fréchet distance ----------------------------------------------------------------------------


def test_frechet_distance_closed_form_for_commuting_covariances():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))  # same eigenvectors: C1 C2 commute
    c1, c2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0, abs=1e-10)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
@settings(deadline=None, max_examples=25)
@given(d=st.integers(1, 12), rank=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_frechet_distance_matches_scipy_sqrtm_even_when_singular(d, rank, seed):
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(seed)
    f1, f2 = rng.normal(size=(d, min(rank, d))), rng.normal(size=(d, d))
    c1, c2 = f1 @ f1.T, f2 @ f2.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    ref = np.real(sqrtm(c1 @ c2))
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * ref)
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(max(expected, 0), abs=1e-6 * d)


def test_frechet_distance_rejects_mismatched_stats():
    with pytest.raises(ValueError, match="mismatched statistics"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --- sliced Wasserstein and energy distance -----------------------------------------------------


def test_sliced_wasserstein_closed_forms():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 1, generator=g)
    assert sliced_wasserstein(x, x) == 0
    assert sliced_wasserstein(x, x + 0.3) == pytest.approx(
        0.3, rel=1e-6
    )  # 1-D: exact (float32 data)
    # 2-D shift c: W2 along θ is |θ·c|, and E[(θ·c)²] = |c|²/2 over unit θ
    x = torch.randn(1000, 2, generator=g)
    c = torch.tensor([0.6, -0.8])
    assert sliced_wasserstein(x, x + c, projections=1024) == pytest.approx(
        1 / math.sqrt(2), rel=0.03
    )
    # unequal sizes go through quantile functions: a duplicated set is the same law
    assert sliced_wasserstein(x, torch.cat([x, x])) == pytest.approx(0, abs=1e-12)
    # images (N, C, H, W) are flattened
    assert sliced_wasserstein(torch.zeros(5, 1, 2, 2), torch.ones(5, 1, 2, 2)) > 0


def test_energy_distance_closed_forms():
    zeros, ones = torch.zeros(50, 3), torch.ones(50, 3)
    # point masses at distance r: 2r − 0 − 0
    assert energy_distance(zeros, ones) == pytest.approx(2 * math.sqrt(3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(800, 2, generator=g), torch.randn(800, 2, generator=g)
    same, shifted = energy_distance(x, y), energy_distance(x, y + 1)
    assert abs(same) < 0.01 and shifted > 0.2


def test_distances_reject_bad_input():
    with pytest.raises(ValueError, match="x has 2 features per sample but y has 3"):
        sliced_wasserstein(torch.zeros(4, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="NaN"):
        energy_distance(torch.full((4, 2), float("nan")), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="N ≥ 2"):
        energy_distance(torch.zeros(1, 2), torch.zeros(4, 2))


@pytest.mark.parametrize("name", ["eight_gaussians", "two_moons", "checkerboard"])
def test_toy_metrics_tell_true_samples_from_wrong_ones(name):
    d = load_dataset(name, n_train=100, n_held_out=100)
    spread = true_spread(d, 1000, repeats=5)
    assert spread.shape == (5,) and (spread > 0).all()
    truth = d.sample_true(1000)
    wrong = 0.5 * torch.randn(1000, 2, generator=torch.Generator().manual_seed(9))
    assert sliced_wasserstein(truth, wrong) > 2 * spread.max()
    ed = true_spread(d, 1000, repeats=3, metric=energy_distance)
    assert energy_distance(truth, wrong) > 4 * ed.abs().max()


# --- FID-digits -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fid_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fid_cache")


@pytest.fixture(scope="module")
def fid(fid_cache):
    return DigitsFID.load(cache=fid_cache)  # trains once here (about 10 s on 2 cores)


@pytest.mark.slow  # the module fixture trains the classifier (~10 s alone)
def test_fid_digits_classifier_and_floor(fid):
    assert fid.accuracy > 0.97
    assert 0 < fid.floor < 6
    assert fid.n_reference == 359
    assert fid.score(fid.data.train) == pytest.approx(0, abs=1e-6)
    rep = fid.report()
    assert "not Inception FID" in rep["metric"] and rep["floor"] == fid.floor


@pytest.mark.slow  # the module fixture trains the classifier (~10 s alone)
def test_fid_digits_orders_worse_samples_higher(fid):
    held = fid.data.held_out
    g = torch.Generator().manual_seed(0)
    noisy = [
        fid.score((held + s * torch.randn(held.shape, generator=g)).clamp(-1, 1))
        for s in (0.1, 0.3, 0.6)
    ]
    assert fid.floor < noisy[0] < noisy[1] < noisy[2]
    uniform = torch.rand(359, 1, 8, 8, generator=g) * 2 - 1
    assert fid.score(uniform) > 10 * fid.floor
    # mode collapse: every sample a (real) 3 scores far worse than the held-out mix
    threes = held[fid.data.held_out_labels == 3]
    assert fid.score(threes) > 10 * fid.floor


@pytest.mark.slow  # the module fixture trains the classifier (~10 s alone)
def test_fid_digits_class_accuracy(fid):
    held, labels = fid.data.held_out, fid.data.held_out_labels
    assert fid.class_accuracy(held, labels) == pytest.approx(fid.accuracy)
    assert fid.class_accuracy(held, (labels + 1) % 10) < 0.05
    with pytest.raises(ValueError, match="359 samples but 3 labels"):
        fid.class_accuracy(held, labels[:3])
    with pytest.raises(ValueError, match=r"digit images \(N, 1, 8, 8\)"):
        fid.score(torch.zeros(10, 3, 16, 16))
    assert fid.score(held[:, 0]) == pytest.approx(fid.floor)  # (N, 8, 8) is accepted


@pytest.mark.slow  # the module fixture trains the classifier (~10 s alone)
def test_fid_digits_cache_reload(fid, fid_cache):
    files = list(fid_cache.glob("fid_digits_*.safetensors"))
    assert len(files) == 1 and fid.train_seconds is not None
    again = DigitsFID.load(cache=fid_cache)
    assert again.train_seconds is None  # read from the cache, not retrained
    assert torch.equal(again.features(fid.data.held_out), fid.features(fid.data.held_out))
    assert again.floor == fid.floor


def test_fid_digits_corrupt_cache_is_retrained(tmp_path):
    quick = {"epochs": 1}  # its own cache key; a poor classifier, but a fast one
    DigitsFID.load(cache=tmp_path, **quick)
    (path,) = tmp_path.glob("fid_digits_*.safetensors")
    path.write_bytes(path.read_bytes()[:100])  # truncated
    assert DigitsFID.load(cache=tmp_path, **quick).train_seconds is not None
    assert DigitsFID.load(cache=tmp_path, **quick).train_seconds is None  # rewritten whole
    path.write_bytes(b"{}")  # foreign
    assert DigitsFID.load(cache=tmp_path, **quick).train_seconds is not None
    assert len(list(tmp_path.iterdir())) == 1  # no temporary files left behind
