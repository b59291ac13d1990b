"""Sample-quality metrics that fastdiff computes itself (nothing is downloaded).

- 2-D (or any flat) data: `sliced_wasserstein` and `energy_distance`, against fresh true
  samples from `Dataset.sample_true` or a held-out split.
- digits: **FID-digits**, the Fréchet distance between Gaussians fitted to the features of a
  small CNN classifier trained on the digits' training split (`DigitsFID`). It is *not*
  Inception FID: the feature network, the image size and the sample counts all differ, and
  its numbers are not comparable with any published FID. Its floor is the FID-digits of the
  held-out split against the training split (`DigitsFID.floor`); the classifier's held-out
  accuracy is reported with it (`DigitsFID.accuracy`), and `DigitsFID.class_accuracy` says
  whether class-conditional samples show the digit they were asked for.

Like every Fréchet distance, FID-digits is biased upward by small sample counts: compare
numbers computed from the same number of samples (`DigitsFID.n_reference`, the held-out
size, is the count the floor uses).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fastdiff.engine.data import Dataset, load_dataset

__all__ = [
    "sliced_wasserstein",
    "energy_distance",
    "frechet_distance",
    "gaussian_stats",
    "DigitsClassifier",
    "DigitsFID",
    "fid_digits",
    "cache_dir",
    "true_spread",
]


# --- distances between two sample sets -----------------------------------------------------------


def _flat64(x, what: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim < 2 or len(x) < 2:
        raise ValueError(f"{what} must be samples (N, ...) with N ≥ 2, got shape {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float64).reshape(len(x), -1)
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or Inf")
    return x


def _check_pair(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _flat64(x, "x"), _flat64(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features per sample but y has {y.shape[1]}")
    return x, y


def sliced_wasserstein(
    x, y, *, projections: int = 512, p: int = 2, generator: torch.Generator | None = None
) -> float:
    """Sliced p-Wasserstein distance between two sample sets (N, ...) and (M, ...).

    (mean over random unit directions θ of W_p(θ·x, θ·y)^p)^(1/p), each 1-D W_p from
    sorted projections (quantile functions, so N ≠ M is fine). Directions come from
    `generator` (seed 0 when None), so the same inputs give the same number.
    """
    x, y = _check_pair(x, y)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    theta = torch.randn(x.shape[1], projections, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ theta, dim=0)
    py, _ = torch.sort(y @ theta, dim=0)
    if len(px) != len(py):  # compare quantile functions on a common grid
        n = max(len(px), len(py))
        q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        px, py = _quantiles(px, q), _quantiles(py, q)
    return float((px - py).abs().pow(p).mean().pow(1.0 / p))


def _quantiles(sorted_cols: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Empirical quantile function (step function) of each column at levels q."""
    n = len(sorted_cols)
    idx = torch.clamp((q * n).floor().long(), max=n - 1)
    return sorted_cols[idx]


def _mean_pairwise(a: torch.Tensor, b: torch.Tensor, *, exclude_diagonal: bool) -> float:
    total, chunk = 0.0, max(1, 4_000_000 // max(len(b), 1))
    for i in range(0, len(a), chunk):
        total += float(torch.cdist(a[i : i + chunk], b).sum())
    n_pairs = len(a) * len(b) - (len(a) if exclude_diagonal else 0)
    return total / n_pairs  # the diagonal of d(a, a) is 0, so it only changes the count


def energy_distance(x, y) -> float:
    """Squared energy distance 2E‖X−Y‖ − E‖X−X'‖ − E‖Y−Y'‖ (Székely), ≥ 0, 0 iff equal laws.

    Within-set means leave out the zero self-distances (U-statistics), so two samples of
    one distribution give values spread around 0 (slightly negative is possible).
    """
    x, y = _check_pair(x, y)
    xy = _mean_pairwise(x, y, exclude_diagonal=False)
    xx = _mean_pairwise(x, x, exclude_diagonal=True)
    yy = _mean_pairwise(y, y, exclude_diagonal=True)
    return 2.0 * xy - xx - yy


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased) of features (N, D), in float64."""
    f = _flat64(features, "features").numpy()
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """‖μ₁−μ₂‖² + tr(C₁ + C₂ − 2 (C₁^½ C₂ C₁^½)^½), the Fréchet distance of two Gaussians.

    The trace term uses the symmetric form (eigenvalues of C₁^½ C₂ C₁^½), which is exact for
    PSD matrices and needs no complex sqrtm or diagonal jitter.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
        raise ValueError(
            f"mismatched statistics: means {mu1.shape}, {mu2.shape}; "
            f"covariances {cov1.shape}, {cov2.shape}"
        )
    w, v = np.linalg.eigh((cov1 + cov1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ cov2 @ root1
    tr_cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_cross)
    return max(d, 0.0)


def true_spread(
    data: Dataset, n: int, *, metric=sliced_wasserstein, repeats: int = 10, seed: int = 0
) -> torch.Tensor:
    """`metric` between two independent sets of n exact samples, `repeats` times: the
    spread a perfect model shows at n samples, to set a quality threshold from (toy data)."""
    out = []
    for r in range(repeats):
        a = data.sample_true(n, generator=torch.Generator().manual_seed(seed + 2 * r))
        b = data.sample_true(n, generator=torch.Generator().manual_seed(seed + 2 * r + 1))
        out.append(metric(a, b))
    return torch.tensor(out, dtype=torch.float64)


# --- FID-digits ----------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where fastdiff caches what it trains for itself: `$FASTDIFF_CACHE`, else
    `$XDG_CACHE_HOME/fastdiff`, else `~/.cache/fastdiff`."""
    if os.environ.get("FASTDIFF_CACHE"):
        return Path(os.environ["FASTDIFF_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastdiff"


class DigitsClassifier(nn.Module):
    """A small CNN for 8×8 digits in [-1, 1]; `features(x)` is the 64-d penultimate layer."""

    feature_dim = 64

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 16, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # 8×8 → 4×4
        h = F.relu(self.conv3(h))
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass(frozen=True)
class _TrainConfig:
    seed: int = 0
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    width: int = 32
    max_shift: int = 1  # random translation by up to this many pixels (augmentation)
    version: int = 2  # bump when the architecture or training changes

    def key(self, data: Dataset) -> str:
        h = hashlib.sha256(json.dumps(self.__dict__, sort_keys=True).encode())
        for t in (data.train, data.train_labels, data.held_out, data.held_out_labels):
            h.update(t.numpy().tobytes())
        return h.hexdigest()[:16]


def _shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to max_shift pixels, filling with background (-1)."""
    if max_shift == 0:
        return x
    h, w = x.shape[-2:]
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, len(x)), generator=gen)
    out = torch.empty_like(x)
    for oy in range(2 * max_shift + 1):
        for ox in range(2 * max_shift + 1):
            m = (dy == oy) & (dx == ox)
            out[m] = pad[m, :, oy : oy + h, ox : ox + w]
    return out


def _train_classifier(data: Dataset, cfg: _TrainConfig) -> DigitsClassifier:
    """Trains on one CPU thread: as fast as two for a network this small, the same weights
    whatever the machine's core count, and immune to thread oversubscription (measured
    here on a loaded 2-core machine: 18 s on one thread, 248 s on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_classifier_1t(data, cfg)
    finally:
        torch.set_num_threads(threads)


def _train_classifier_1t(data: Dataset, cfg: _TrainConfig) -> DigitsClassifier:
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = DigitsClassifier(cfg.width)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * len(data.train) // cfg.batch_size  # batches() carries over
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps)
    model.train()
    for x, y in data.batches(cfg.batch_size, generator=gen, epochs=cfg.epochs):
        loss = F.cross_entropy(model(_shift(x, cfg.max_shift, gen)), y, label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


class DigitsFID:
    """FID-digits: the Fréchet distance in the feature space of a digits classifier.

    `DigitsFID.load()` trains the classifier on the digits training split (seed 0 split,
    about 10 s on 2 CPU cores) or reuses the one cached under `cache_dir()`; the cache key
    hashes the training settings and the data, so a change to either retrains.

    `score(samples)` is the FID-digits of samples (N, 1, 8, 8) in [-1, 1] against the
    training split; `floor` is that of the held-out split (the best a perfect model scores
    at `n_reference` samples); `accuracy` is the classifier's held-out accuracy.
    """

    def __init__(self, classifier: DigitsClassifier, data: Dataset, *, train_seconds=None):
        self.classifier = classifier.eval().requires_grad_(False)
        self.data = data
        self.train_seconds = train_seconds
        self.mu_train, self.cov_train = gaussian_stats(self.features(data.train))
        held = self.features(data.held_out)
        self.floor = frechet_distance(*gaussian_stats(held), self.mu_train, self.cov_train)
        pred = self.predict(data.held_out)
        self.accuracy = float((pred == data.held_out_labels).double().mean())
        self.n_reference = len(data.held_out)

    @classmethod
    def load(
        cls,
        cache: str | os.PathLike | bool | None = None,
        *,
        retrain: bool = False,
        verbose: bool = False,
        **train_options,
    ) -> DigitsFID:
        """The FID-digits metric, from the cache or freshly trained (and then cached).

        `cache`: a folder (None: `cache_dir()`; False: train every time, cache nothing).
        `train_options` override the classifier's training settings (seed, epochs, ...).
        """
        from fastdiff.engine.checkpoint import load_state, save_state

        cfg = _TrainConfig(**train_options)
        data = load_dataset("digits", seed=0)
        folder = None if cache is False else cache_dir() if cache in (None, True) else Path(cache)
        path = None if folder is None else folder / f"fid_digits_{cfg.key(data)}.safetensors"
        if path is not None and path.exists() and not retrain:
            model = DigitsClassifier(cfg.width)
            try:
                model.load_state_dict(load_state(path)[0])
                return cls(model, data)
            except Exception as e:  # a truncated or foreign file: say so, then retrain
                if verbose:
                    print(f"fastdiff: ignoring unreadable FID-digits cache {path}: {e}")
        t0 = time.perf_counter()
        model = _train_classifier(data, cfg)
        seconds = time.perf_counter() - t0
        metric = cls(model, data, train_seconds=seconds)
        if verbose:
            print(
                f"fastdiff: trained the FID-digits classifier in {seconds:.1f} s, held-out "
                f"accuracy {metric.accuracy:.3f}, floor {metric.floor:.3f}"
            )
        if path is not None:
            meta = {"config": cfg.__dict__, "accuracy": metric.accuracy, "seconds": seconds}
            save_state(path, model.state_dict(), meta)  # atomic: temp file, then rename
        return metric

    def _check(self, x) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"FID-digits takes digit images (N, 1, 8, 8), got {tuple(x.shape)}")
        return x.detach().to("cpu", torch.float32)

    @torch.no_grad()
    def features(self, x, batch_size: int = 2048) -> torch.Tensor:
        """Classifier features (N, 64) of images (N, 1, 8, 8) in [-1, 1]."""
        x = self._check(x)
        return torch.cat(
            [self.classifier.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        )

    @torch.no_grad()
    def predict(self, x, batch_size: int = 2048) -> torch.Tensor:
        """The classifier's predicted digit (N,) for each image."""
        x = self._check(x)
        return torch.cat(
            [self.classifier(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
        )

    def score(self, samples) -> float:
        """FID-digits of samples (N ≥ 2, 1, 8, 8) against the digits training split."""
        mu, cov = gaussian_stats(self.features(samples))
        return frechet_distance(mu, cov, self.mu_train, self.cov_train)

    __call__ = score

    def class_accuracy(self, samples, labels) -> float:
        """Fraction of samples the classifier reads as the digit in `labels` (N,)."""
        labels = torch.as_tensor(labels).reshape(-1).to(torch.int64).cpu()
        pred = self.predict(samples)
        if len(pred) != len(labels):
            raise ValueError(f"{len(pred)} samples but {len(labels)} labels")
        return float((pred == labels).double().mean())

    def report(self) -> dict:
        """The facts to print next to any FID-digits number."""
        return {
            "metric": "FID-digits (not Inception FID; not comparable with published FIDs)",
            "floor": self.floor,
            "n_reference": self.n_reference,
            "classifier_accuracy": self.accuracy,
        }


_DEFAULT: DigitsFID | None = None


def fid_digits(samples) -> float:
    """FID-digits of samples with the default (cached) classifier; see `DigitsFID`."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = DigitsFID.load()
    return _DEFAULT.score(samples)
