"""Data sets for teachers, distillation and metrics, behind one interface.

`load_dataset(name, seed=0)` returns a `Dataset`: a fixed train / held-out split (the same for
the same name, seed and options), class labels or None, `num_classes` (0 = unconditional), an
iterator of batches, and for the 2-D toy distributions an exact sampler (`sample_true`), so a
metric can compare with fresh true samples. `as_dataset(data)` accepts everything the public
API calls `data`: a tensor of examples, an `(examples, labels)` pair, a `Dataset`, a data set
name, or a path to a folder of images or a `.npy` / `.npz` file.

Conventions (CONTRIBUTING.md): images are `(N, C, H, W)` float32 in [-1, 1]; 2-D toy data is
`(N, 2)` float32; labels are int64 `(N,)` in `0 .. num_classes-1` (-1, the null class, is the
model's business and never appears in data).

Built-in data sets (nothing is downloaded; all of it ships with scikit-learn):

| name | what | shape |
|---|---|---|
| `eight_gaussians` | 8 Gaussians (std 0.1) on the unit circle | (2,) |
| `two_moons` | two interleaved half circles, noise 0.05, centred and scaled | (2,) |
| `checkerboard` | uniform on the dark squares of a 4×4 board over [-1, 1]² | (2,) |
| `digits` | scikit-learn's 8×8 handwritten digits, 1,797 images, 10 classes | (1, 8, 8) |
| `photo-patches` | random 16×16 RGB crops of scikit-learn's two sample photos | (3, 16, 16) |
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "Dataset",
    "DataError",
    "load_dataset",
    "as_dataset",
    "load_path",
    "dataset_names",
    "eight_gaussians",
    "two_moons",
    "checkerboard",
    "TOY_SAMPLERS",
    "IMAGE_SUFFIXES",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class DataError(ValueError):
    """Data that cannot be used, with a message that names the file or argument at fault."""


# --- the Dataset interface ------------------------------------------------------------------


class Dataset:
    """A fixed train / held-out split of examples, with optional class labels.

    Attributes: `name`, `train`, `held_out` (tensors `(N, ...)`, float32), `train_labels`,
    `held_out_labels` (int64 `(N,)` or None), `num_classes` (0 when unlabelled), `seed`.

    Per-example condition tensors (e.g. text embeddings for a diffusers UNet):
    `train_conds` / `held_out_conds` map a model keyword to a float32 tensor `(N, ...)` of
    that split (`{"encoder_hidden_states": (N, L, D)}`), passed to the model as
    `model(z, t, encoder_hidden_states=...)`; `null_conds` maps the same keywords to one
    example's null condition `(...)` (classifier-free guidance's unconditional input, e.g.
    the empty / negative prompt's embedding; zeros when not given). All `{}` without them.
    """

    def __init__(
        self,
        name: str,
        train: torch.Tensor,
        held_out: torch.Tensor,
        train_labels: torch.Tensor | None = None,
        held_out_labels: torch.Tensor | None = None,
        *,
        num_classes: int | None = None,
        seed: int = 0,
        true_sampler: Callable[[int, torch.Generator], torch.Tensor] | None = None,
        conds: dict | None = None,
        held_out_conds: dict | None = None,
        null_conds: dict | None = None,
    ):
        train = _as_examples(train, "train")
        held_out = _as_examples(held_out, "held_out")
        if train.shape[1:] != held_out.shape[1:]:
            raise DataError(
                f"train examples have shape {tuple(train.shape[1:])} but held_out examples "
                f"{tuple(held_out.shape[1:])}; both splits must hold examples of one shape"
            )
        if len(train) == 0:
            raise DataError(f"data set {name!r} has no training examples")
        if (train_labels is None) != (held_out_labels is None):
            raise DataError("give labels for both splits or for neither")
        if train_labels is not None:
            train_labels = _as_labels(train_labels, len(train), "train_labels")
            held_out_labels = _as_labels(held_out_labels, len(held_out), "held_out_labels")
            seen = int(torch.cat([train_labels, held_out_labels]).max()) + 1
            if num_classes is None:
                num_classes = seen
            elif seen > num_classes:
                raise DataError(f"labels go up to {seen - 1} but num_classes is {num_classes}")
        self.name = name
        self.train = train
        self.held_out = held_out
        self.train_labels = train_labels
        self.held_out_labels = held_out_labels
        self.num_classes = int(num_classes or 0) if train_labels is not None else 0
        self.seed = int(seed)
        self._true_sampler = true_sampler
        self.train_conds, self.held_out_conds, self.null_conds = _check_conds(
            conds, held_out_conds, null_conds, len(train), len(held_out))

    @property
    def conditioned(self) -> bool:
        """Whether the examples carry condition tensors (`train_conds`)."""
        return bool(self.train_conds)

    # basic facts
    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one example: `(2,)` for toy data, `(C, H, W)` for images."""
        return tuple(self.train.shape[1:])

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    @property
    def labelled(self) -> bool:
        return self.train_labels is not None

    @property
    def has_true_sampler(self) -> bool:
        return self._true_sampler is not None

    def __len__(self) -> int:
        return len(self.train)

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={len(self.train)}, held_out={len(self.held_out)}, "
            f"shape={self.shape}, num_classes={self.num_classes})"
        )

    def split(self, which: str = "train") -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(examples, labels)` of the split `"train"` or `"held_out"` (labels may be None)."""
        if which == "train":
            return self.train, self.train_labels
        if which in ("held_out", "heldout", "test"):
            return self.held_out, self.held_out_labels
        raise ValueError(f"unknown split {which!r}; expected 'train' or 'held_out'")

    def batches(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        split: str = "train",
        epochs: int | None = None,
        drop_last: bool = True,
        device: torch.device | str | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Yield `(x, y)` batches (y is None when unlabelled), reshuffled every epoch.

        Endless unless `epochs` is given. Without a `generator` the order comes from the
        data set's seed, so two iterators over one data set give the same batches. A batch
        larger than the split cycles through it (drop_last then has nothing to drop).
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        x, y = self.split(split)
        n = len(x)
        if n == 0:
            raise DataError(f"the {split} split of {self.name!r} is empty")
        if generator is None:
            generator = torch.Generator().manual_seed(self.seed + 7919)
        epoch = 0
        buffer = torch.empty(0, dtype=torch.long)
        while epochs is None or epoch < epochs:
            buffer = torch.cat([buffer, torch.randperm(n, generator=generator)])
            epoch += 1
            last_epoch = epochs is not None and epoch == epochs
            while len(buffer) >= batch_size or (last_epoch and not drop_last and len(buffer)):
                idx, buffer = buffer[:batch_size], buffer[batch_size:]
                yield _to(x[idx], device), (None if y is None else _to(y[idx], device))

    def sample_true(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Fresh exact samples of the true distribution (toy data sets only)."""
        if self._true_sampler is None:
            raise DataError(
                f"data set {self.name!r} has no exact sampler; compare with its held_out split"
            )
        if generator is None:
            generator = torch.Generator().manual_seed(self.seed + 104729)
        return self._true_sampler(int(n), generator)


def _check_conds(conds, held_out_conds, null_conds, n_train: int, n_held: int):
    """(train, held-out, null) condition dicts, checked: float32 tensors, one row per
    example of their split, the same keywords and per-example shapes; null rows default
    to zeros."""
    conds, held = dict(conds or {}), dict(held_out_conds or {})
    nulls = dict(null_conds or {})
    if set(conds) != set(held):
        raise DataError(f"condition tensors must be given for both splits under the same "
                        f"names; train has {sorted(conds)}, held_out {sorted(held)}")
    if set(nulls) - set(conds):
        raise DataError(f"null conditions {sorted(set(nulls) - set(conds))} have no "
                        f"per-example condition tensors")
    out = ({}, {}, {})
    for name in conds:
        tr = torch.as_tensor(conds[name])
        ho = torch.as_tensor(held[name])
        for what, t, n in (("train", tr, n_train), ("held_out", ho, n_held)):
            if not t.is_floating_point() or t.ndim < 1 or len(t) != n:
                raise DataError(f"condition {name!r} ({what}) must be a float tensor with one "
                                f"row per example ({n}), got {tuple(t.shape)} {t.dtype}")
        if tr.shape[1:] != ho.shape[1:]:
            raise DataError(f"condition {name!r} has per-example shape {tuple(tr.shape[1:])} "
                            f"in train but {tuple(ho.shape[1:])} in held_out")
        null = torch.as_tensor(nulls[name]) if name in nulls else torch.zeros(tr.shape[1:])
        if tuple(null.shape) != tuple(tr.shape[1:]) or not null.is_floating_point():
            raise DataError(f"null condition {name!r} must be one example's float tensor of "
                            f"shape {tuple(tr.shape[1:])}, got {tuple(null.shape)}")
        for d, t in zip(out, (tr, ho, null)):
            d[name] = t.detach().to(torch.float32).contiguous()
        if not all(bool(torch.isfinite(d[name]).all()) for d in out):
            raise DataError(f"condition {name!r} contains NaN or Inf")
    return out


def _to(t: torch.Tensor, device) -> torch.Tensor:
    return t if device is None else t.to(device, non_blocking=True)


def _as_examples(x, what: str) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if x.ndim < 2:
        raise DataError(f"{what} must have shape (N, ...) with N examples, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise DataError(
            f"{what} has dtype {x.dtype}; give float examples (images scaled to [-1, 1]), "
            "or load uint8 images through load_path"
        )
    x = x.detach().to(torch.float32).contiguous()
    if not torch.isfinite(x).all():
        raise DataError(f"{what} contains NaN or Inf")
    return x


def _as_labels(y, n: int, what: str) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        if y.is_floating_point() and torch.equal(y, y.round()):
            y = y.long()
        else:
            raise DataError(f"{what} must be integer class labels, got dtype {y.dtype}")
    y = y.reshape(-1).to(torch.int64)
    if len(y) != n:
        raise DataError(f"{what} has {len(y)} labels for {n} examples")
    if n and int(y.min()) < 0:
        raise DataError(f"{what} has negative labels; classes must be 0 .. num_classes-1")
    return y


def _split_indices(n: int, held_out: float | int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded permutation cut into (train, held-out) index sets."""
    if isinstance(held_out, float):  # a fraction: at least one example when there are two
        n_held = max(int(round(held_out * n)), int(held_out > 0 and n >= 2))
    else:
        n_held = int(held_out)
    if not 0 <= n_held < n:
        raise DataError(f"held_out={held_out!r} leaves no training examples out of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_held:], perm[:n_held]


def from_tensors(
    x,
    y=None,
    *,
    name: str = "tensor",
    held_out: float | int = 0.1,
    seed: int = 0,
    num_classes: int | None = None,
    conds: dict | None = None,
    null_conds: dict | None = None,
) -> Dataset:
    """A `Dataset` from examples `(N, ...)` and optional labels, split by a seeded shuffle.

    conds: optional per-example condition tensors {keyword: (N, ...)}, split alike;
    null_conds: {keyword: (...)} their null values (see `Dataset`)."""
    x = _as_examples(x, "examples")
    if y is not None:
        y = _as_labels(y, len(x), "labels")
    tr, ho = _split_indices(len(x), held_out, seed)
    conds = {k: torch.as_tensor(v) for k, v in (conds or {}).items()}
    for k, v in conds.items():
        if v.ndim < 1 or len(v) != len(x):
            raise DataError(f"condition {k!r} has {len(v) if v.ndim else 0} rows for "
                            f"{len(x)} examples")
    return Dataset(
        name,
        x[tr],
        x[ho],
        None if y is None else y[tr],
        None if y is None else y[ho],
        num_classes=num_classes,
        seed=seed,
        conds={k: v[tr] for k, v in conds.items()},
        held_out_conds={k: v[ho] for k, v in conds.items()},
        null_conds=null_conds,
    )


# --- 2-D toy distributions (exact samplers) --------------------------------------------------


def eight_gaussians(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Eight isotropic Gaussians (std 0.1) centred on the unit circle at angles k·π/4."""
    k = torch.randint(0, 8, (n,), generator=generator)
    angle = k.to(torch.float64) * (math.pi / 4)
    centres = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return (centres + 0.1 * noise).to(torch.float32)


def two_moons(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """scikit-learn's two moons (noise 0.05), centred and scaled by 1/1.5 to about [-1, 1]."""
    upper = torch.rand(n, generator=generator) < 0.5
    s = torch.rand(n, generator=generator, dtype=torch.float64) * math.pi
    x = torch.where(upper, torch.cos(s), 1 - torch.cos(s))
    y = torch.where(upper, torch.sin(s), 0.5 - torch.sin(s))
    pts = torch.stack([x, y], dim=1) + 0.05 * torch.randn(
        n, 2, generator=generator, dtype=torch.float64
    )
    pts = (pts - torch.tensor([0.5, 0.25], dtype=torch.float64)) / 1.5
    return pts.to(torch.float32)


def checkerboard(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform on the 8 squares (i + j even) of a 4×4 board over [-1, 1]²."""
    cell = torch.randint(0, 8, (n,), generator=generator)
    row = cell // 2
    col = 2 * (cell % 2) + (row % 2)  # i + j even
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    pts = (torch.stack([col, row], dim=1).to(torch.float64) + u) * 0.5 - 1.0
    return pts.to(torch.float32)


TOY_SAMPLERS: dict[str, Callable[[int, torch.Generator | None], torch.Tensor]] = {
    "eight_gaussians": eight_gaussians,
    "two_moons": two_moons,
    "checkerboard": checkerboard,
}


def _toy(name: str, seed: int, n_train: int = 20_000, n_held_out: int = 5_000) -> Dataset:
    sampler = TOY_SAMPLERS[name]
    train = sampler(n_train, torch.Generator().manual_seed(seed))
    held = sampler(n_held_out, torch.Generator().manual_seed(seed + 1_000_003))
    return Dataset(name, train, held, seed=seed, true_sampler=sampler)


# --- images that ship with scikit-learn ----------------------------------------------------------


def _digits(seed: int, held_out: float | int = 0.2) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)  # 0..16 → [-1, 1]
    y = torch.from_numpy(d.target.astype(np.int64))
    ds = from_tensors(x, y, name="digits", held_out=held_out, seed=seed, num_classes=10)
    return ds


def _photo_patches(
    seed: int,
    n_train: int = 20_000,
    n_held_out: int = 2_000,
    size: int = 16,
    held_out_rows: float = 0.2,
) -> Dataset:
    """Random crops; the bottom `held_out_rows` of each photo is kept for the held-out split,
    so no held-out patch shares a pixel with a training patch."""
    from sklearn.datasets import load_sample_images

    photos = [
        torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1.0
        for im in load_sample_images().images
    ]

    def crops(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
        out = torch.empty(n, 3, size, size)
        which = torch.randint(0, len(photos), (n,), generator=gen)
        for i, p in enumerate(photos):
            sel = (which == i).nonzero().flatten()
            h, w = p.shape[1:]
            r0, r1 = int(lo * h), int(hi * h) - size
            rows = torch.randint(r0, r1 + 1, (len(sel),), generator=gen)
            cols = torch.randint(0, w - size + 1, (len(sel),), generator=gen)
            for j, r, c in zip(sel.tolist(), rows.tolist(), cols.tolist()):
                out[j] = p[:, r : r + size, c : c + size]
        return out

    cut = 1.0 - held_out_rows
    train = crops(n_train, 0.0, cut, torch.Generator().manual_seed(seed))
    held = crops(n_held_out, cut, 1.0, torch.Generator().manual_seed(seed + 1_000_003))
    return Dataset("photo-patches", train, held, seed=seed)


# --- a user's own data ------------------------------------------------------------------------


def load_path(
    path: str | os.PathLike,
    *,
    held_out: float | int = 0.1,
    seed: int = 0,
) -> Dataset:
    """A folder of images, or a `.npy` / `.npz` array file, as a `Dataset`.

    Folder: every image file directly inside it (all of one size), or, ImageFolder-style,
    one subfolder of images per class (classes numbered in sorted name order). Images are
    read as greyscale when all are greyscale, else RGB, and scaled from [0, 255] to [-1, 1].

    `.npy`: an array of examples. `.npz`: examples under `x` (or `images`, `data`, or the
    only array) and optional labels under `y` (or `labels`, `targets`); or, for a
    text-conditional latent model (`LATENT_NPZ_KEYS`), `latents` float (N, C, H, W)
    (already × the VAE's scaling_factor), `prompt_embeds` float (N, L, D) and optional
    `negative_prompt_embeds` (L, D) (zeros if absent), read as examples = latents with the
    condition `encoder_hidden_states` and its null (see `Dataset`). Integer (uint8)
    images are scaled from [0, 255] to [-1, 1]; float arrays are taken as they are. Image
    arrays may be `(N, H, W)`, `(N, C, H, W)` or channels-last `(N, H, W, C)` with C ≤ 4.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.is_dir():
        x, y, classes = _read_image_folder(p)
        return from_tensors(
            x,
            y,
            name=str(p),
            held_out=held_out,
            seed=seed,
            num_classes=None if classes is None else len(classes),
        )
    suffix = p.suffix.lower()
    if suffix == ".npz":
        text = _read_latents_npz(p)
        if text is not None:
            x, conds, nulls = text
            return from_tensors(x, name=str(p), held_out=held_out, seed=seed, conds=conds,
                                null_conds=nulls)
    if suffix in (".npy", ".npz"):
        x, y = _read_array_file(p)
        return from_tensors(x, y, name=str(p), held_out=held_out, seed=seed)
    if suffix in IMAGE_SUFFIXES:
        raise DataError(f"{p}: a single image is not a data set; give the folder that holds it")
    raise DataError(f"{p}: unsupported file type {suffix!r}; expected a folder, .npy or .npz")


def _image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def _read_image_folder(folder: Path):
    files = _image_files(folder)
    subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = None
    labels: list[int] = []
    if not files and subdirs:
        classes = [d.name for d in subdirs if _image_files(d)]
        for c, name in enumerate(classes):
            found = _image_files(folder / name)
            files += found
            labels += [c] * len(found)
    if not files:
        raise DataError(
            f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder "
            "or in class subfolders"
        )
    from PIL import Image

    images, first = [], None
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                mode = "L" if im.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
                arr = np.asarray(im.convert(mode))
        except Exception as e:  # PIL raises many types; name the file whatever it was
            raise DataError(f"{f}: cannot read image ({type(e).__name__}: {e})") from None
        if first is None:
            first = (f, arr.shape[:2])
        elif arr.shape[:2] != first[1]:
            (h0, w0), (h, w) = first[1], arr.shape[:2]
            raise DataError(
                f"{f}: image is {w}×{h} but {first[0].name} is {w0}×{h0}; "
                "all images must have one size (resize or crop them first)"
            )
        images.append(arr)
    grey = all(a.ndim == 2 for a in images)
    arrs = [a[None] if grey else _rgb(a).transpose(2, 0, 1) for a in images]
    x = torch.from_numpy(np.stack(arrs).astype(np.float32) / 127.5 - 1.0)
    return x, (torch.tensor(labels) if classes is not None else None), classes


def _rgb(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a


LATENT_NPZ_KEYS = ("latents", "prompt_embeds", "negative_prompt_embeds")
TEXT_COND = "encoder_hidden_states"   # the model keyword prompt embeddings are passed as


def _read_latents_npz(p: Path):
    """(latents, {TEXT_COND: prompt_embeds}, {TEXT_COND: negative}) of a text-conditional
    .npz, None for another .npz; one DataError naming the file for a mismatched one."""
    try:
        loaded = np.load(p, allow_pickle=False)
    except Exception as e:
        raise DataError(f"{p}: cannot read array file ({type(e).__name__}: {e})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        return None
    with loaded:
        keys = set(loaded.files)
        if not keys & {"latents", "prompt_embeds"}:
            return None
        want = ("needs latents (N, C, H, W), prompt_embeds (N, L, D) and optionally "
                "negative_prompt_embeds (L, D), float")
        missing = [k for k in ("latents", "prompt_embeds") if k not in keys]
        if missing:
            raise DataError(f"{p}: a text-conditional .npz {want}; {', '.join(missing)} "
                            f"missing (found {sorted(keys)})")
        lat, emb = loaded["latents"], loaded["prompt_embeds"]
        neg = loaded["negative_prompt_embeds"] if "negative_prompt_embeds" in keys else None
    problems = []
    for k, a, nd in (("latents", lat, 4), ("prompt_embeds", emb, 3),
                     ("negative_prompt_embeds", neg, 2)):
        if a is not None and (a.ndim != nd or not np.issubdtype(a.dtype, np.floating)):
            problems.append(f"{k} has shape {a.shape} and dtype {a.dtype}")
    if not problems and len(lat) != len(emb):
        problems.append(f"{len(lat)} latents but {len(emb)} prompt_embeds")
    if not problems and len(lat) < 2:
        problems.append(f"only {len(lat)} example(s); at least 2 (train and held-out)")
    if not problems and neg is not None and neg.shape != emb.shape[1:]:
        problems.append(f"negative_prompt_embeds has shape {neg.shape}, prompt_embeds rows "
                        f"{emb.shape[1:]}")
    if not problems and not all(np.isfinite(a).all() for a in (lat, emb) + (
            (neg,) if neg is not None else ())):
        problems.append("NaN or Inf in the arrays")
    if problems:
        raise DataError(f"{p}: a text-conditional .npz {want}; " + "; ".join(problems))
    null = np.zeros(emb.shape[1:], np.float32) if neg is None else neg
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return as_t(lat), {TEXT_COND: as_t(emb)}, {TEXT_COND: as_t(null)}


def _read_array_file(p: Path):
    try:
        loaded = np.load(p, allow_pickle=False)
    except Exception as e:
        raise DataError(f"{p}: cannot read array file ({type(e).__name__}: {e})") from None
    y = None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.files)
            xkey = next((k for k in ("x", "images", "data", "X") if k in keys), None)
            if xkey is None and len(keys) == 1:
                xkey = keys[0]
            if xkey is None:
                raise DataError(
                    f"{p}: no examples array; name it 'x' (labels, if any, 'y'); found {keys}"
                )
            ykey = next((k for k in ("y", "labels", "targets", "Y") if k in keys), None)
            x = loaded[xkey]
            y = None if ykey is None else loaded[ykey]
    else:
        x = loaded
    if x.ndim < 2 or len(x) == 0:
        raise DataError(f"{p}: expected an array of examples (N, ...), got shape {x.shape}")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 127.5 - 1.0
    elif not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{p}: examples have dtype {x.dtype}; expected uint8 images or floats")
    if x.ndim == 3 and x.shape[1] > 4:  # (N, H, W) greyscale images
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] <= 4 and x.shape[1] > 4:  # channels-last
        x = x.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), y


# --- names and the one entry point --------------------------------------------------------------

_ALIASES = {
    "eight_gaussians": "eight_gaussians",
    "8gaussians": "eight_gaussians",
    "8_gaussians": "eight_gaussians",
    "gaussians": "eight_gaussians",
    "two_moons": "two_moons",
    "moons": "two_moons",
    "checkerboard": "checkerboard",
    "digits": "digits",
    "photo_patches": "photo-patches",
    "patches": "photo-patches",
}


def dataset_names() -> list[str]:
    """The built-in data set names."""
    return ["eight_gaussians", "two_moons", "checkerboard", "digits", "photo-patches"]


def load_dataset(name: str | os.PathLike, seed: int = 0, **options) -> Dataset:
    """A built-in data set by name (see the module docstring), or a path (`load_path`).

    Options by data set: toy `n_train`, `n_held_out`; `digits` `held_out` (fraction or
    count, default 0.2); `photo-patches` `n_train`, `n_held_out`, `size`; paths `held_out`.
    The split and every sample depend only on the name, `seed` and the options.
    """
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    canonical = _ALIASES.get(key)
    if canonical is None:
        if isinstance(name, os.PathLike) or os.sep in str(name) or Path(str(name)).exists():
            return load_path(name, seed=seed, **options)
        raise DataError(
            f"unknown data set {str(name)!r}; expected one of {dataset_names()} "
            "or a path to a folder of images / a .npy or .npz file"
        )
    try:
        if canonical in TOY_SAMPLERS:
            return _toy(canonical, seed, **options)
        if canonical == "digits":
            return _digits(seed, **options)
        return _photo_patches(seed, **options)
    except TypeError as e:
        raise DataError(f"bad option for data set {canonical!r}: {e}") from None


def as_dataset(data, *, seed: int = 0) -> Dataset:
    """Whatever the public API accepts as `data`, as a `Dataset`.

    A `Dataset` is returned as it is; a name or path goes to `load_dataset`; a tensor or
    array of examples, or an `(examples, labels)` pair, is split 90 / 10 by a seeded shuffle.
    """
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (str, os.PathLike)):
        return load_dataset(data, seed=seed)
    if isinstance(data, (tuple, list)) and len(data) == 2 and not _is_number_like(data[0]):
        return from_tensors(data[0], data[1], seed=seed)
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return from_tensors(data, seed=seed)
    raise DataError(
        f"cannot use {type(data).__name__} as data; give a tensor (N, ...), an "
        "(examples, labels) pair, a fastdiff Dataset, a data set name or a path"
    )


def _is_number_like(v) -> bool:
    return isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.ndim == 0)
