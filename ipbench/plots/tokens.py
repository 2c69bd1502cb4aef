"""Token groups drawn over an image (ImagePiece Fig. 1, ToMe's merge visualisation).

After a chosen block, every token stands for a set of patches. Patches of one merged token get
one colour; a token that is still a single patch shows the image as it is; patches whose token
was discarded (pruned, or fused into EViT's one extra token) are greyed. Group borders are drawn
so that neighbouring groups of similar colour stay apart. This shows at a glance WHAT a reducer
merged and what it threw away, which accuracy numbers alone never do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ipbench.errors import UserError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Enough distinct colours that neighbouring groups rarely share one (tab20 + tab20b + tab20c).
PALETTES = ("tab20", "tab20b", "tab20c")
MERGED_ALPHA = 0.55
BORDER = np.array([1.0, 1.0, 1.0])


class Layout(Protocol):
    """One block's groups (`ipbench.runs.visualize.GroupLayout`)."""

    layer: int
    labels: np.ndarray  # [rows, cols] token of each patch (-1: none)
    discarded: np.ndarray  # [rows, cols] bool
    tokens: int

    @property
    def merged_groups(self) -> int: ...


def _colors(n: int, seed: int = 0) -> np.ndarray:
    import matplotlib as mpl

    base = np.concatenate([np.asarray(mpl.colormaps[p].colors)[:, :3] for p in PALETTES])
    order = np.random.default_rng(seed).permutation(len(base))
    return base[order][np.arange(max(n, 1)) % len(base)]


def paint(image: np.ndarray, layout: Layout, patch: int) -> np.ndarray:
    """The overlay as an RGB float array [H, W, 3] in [0, 1] (image: uint8 [H, W, 3])."""
    img = image.astype(np.float64) / 255.0
    rows, cols = layout.labels.shape
    labels, gone = layout.labels, layout.discarded
    sizes = np.bincount(labels[labels >= 0].ravel(), minlength=1)
    colors = _colors(len(sizes))
    out = img.copy()
    for r in range(rows):
        for c in range(cols):
            ys, xs = slice(r * patch, (r + 1) * patch), slice(c * patch, (c + 1) * patch)
            lab = labels[r, c]
            if gone[r, c] or lab < 0:
                lum = img[ys, xs] @ np.array([0.299, 0.587, 0.114])
                out[ys, xs] = (0.25 + 0.35 * lum)[..., None]
            elif sizes[lab] > 1:
                out[ys, xs] = (1 - MERGED_ALPHA) * img[ys, xs] + MERGED_ALPHA * colors[lab]
    # borders between patches of different tokens (discarded patches form one region)
    key = np.where(gone | (labels < 0), -2, labels)
    for r in range(rows):
        for c in range(cols):
            if c + 1 < cols and key[r, c] != key[r, c + 1]:
                out[r * patch:(r + 1) * patch, (c + 1) * patch - 1:(c + 1) * patch + 1] = BORDER
            if r + 1 < rows and key[r, c] != key[r + 1, c]:
                out[(r + 1) * patch - 1:(r + 1) * patch + 1, c * patch:(c + 1) * patch] = BORDER
    return out


def draw(image: Any, layouts: list[Layout], patch: int, title: str) -> Figure:
    """Original image beside one overlay per block (image: uint8 [H, W, 3], or [3, H, W] as a tensor)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    n = len(layouts) + 1
    nrows = -(-n // 5)
    ncols = -(-n // nrows)
    fig = Figure(figsize=(3.6 * ncols, 3.7 * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    axes[0].imshow(arr)
    axes[0].set_title("input (model's eval crop)", fontsize=9)
    for ax, layout in zip(axes[1:], layouts):
        ax.imshow(paint(arr, layout, patch))
        n_gone = int(layout.discarded.sum())
        ax.set_title(f"after block {layout.layer}: {layout.tokens} tokens\n"
                     f"{layout.merged_groups} merged groups, {n_gone} patches discarded", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.legend(handles=[Patch(color="tab:blue", alpha=MERGED_ALPHA, label="one colour = one merged token"),
                        Patch(color="0.45", label="discarded (pruned, or fused into one token)"),
                        Patch(facecolor="white", edgecolor="0.3", label="unchanged: still one patch")],
               loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    return fig


def png_path(out: str | os.PathLike | None, image_path: str | os.PathLike) -> Path:
    """Where the figure goes: --out (a .png), else results/tokens_<image name>.png."""
    png = Path(out) if out is not None else Path("results") / f"tokens_{Path(image_path).stem}.png"
    if png.suffix.lower() != ".png":
        raise UserError(f"--out {png}: the figure is written as PNG; give a file name ending in .png")
    return png


def save_groups(image: np.ndarray, layouts: list[Layout], patch: int, title: str, png: Path) -> Path:
    """Draw and write the figure (PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    fig = draw(image, layouts, patch, title)
    try:
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, dpi=130)
    except OSError as exc:
        raise UserError(f"--out {png}: cannot write there ({exc.strerror or type(exc).__name__})") from None
    return png
