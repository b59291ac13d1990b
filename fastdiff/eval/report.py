"""Pictures and tables for reports: sample grids, scatter plots, curves, markdown tables.

All writers are atomic (temp file, then rename) and use matplotlib's Agg backend, so they
work on a machine with no display.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastdiff.engine.checkpoint import atomic_write


def write_text(path, text: str) -> Path:
    def w(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    return atomic_write(path, w)


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1,
               scale: int = 4) -> np.ndarray:
    """Tile images (N, C, H, W) in [-1, 1] into one uint8 array (H', W', 3), upscaled."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu()
    n, c, h, w = x.shape
    if c == 1:
        x = x.expand(n, 3, h, w)
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    grid = torch.full((3, ncol * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top:top + h, left:left + w] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    return np.kron(arr, np.ones((scale, scale, 1), dtype=np.uint8)) if scale > 1 else arr


def save_grid(images: torch.Tensor, path, nrow: int | None = None, scale: int = 4) -> Path:
    """Write a PNG grid of images (N, C, H, W) in [-1, 1]."""
    from PIL import Image

    arr = image_grid(images, nrow=nrow, scale=scale)
    return atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_scatter(points: torch.Tensor, path, *, reference: torch.Tensor | None = None,
                 title: str = "") -> Path:
    """Scatter plot of 2-D samples (N, 2), optionally over reference samples (grey)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(4, 4), dpi=120)
    if reference is not None:
        r = reference.detach().cpu().numpy()
        ax.scatter(r[:, 0], r[:, 1], s=2, c="0.75", label="data")
    p = points.detach().cpu().numpy()
    ax.scatter(p[:, 0], p[:, 1], s=2, c="C0", label="samples")
    ax.set_aspect("equal")
    ax.set_title(title)
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return out


def save_curves(path, curves: dict, *, xlabel: str, ylabel: str, title: str = "",
                logx: bool = False, logy: bool = False, hlines: dict | None = None) -> Path:
    """Line plot: curves = {label: (xs, ys)}; hlines = {label: y} drawn dashed."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", label=label)
    for i, (label, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, ls="--", c=f"C{len(curves) + i}", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return out


def markdown_table(header: list, rows: list) -> str:
    """A GitHub-flavoured markdown table; floats printed with 4 significant digits."""
    def cell(v):
        if isinstance(v, float):
            return "—" if v != v else f"{v:.4g}"
        return "—" if v is None else str(v)

    lines = ["| " + " | ".join(map(str, header)) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
