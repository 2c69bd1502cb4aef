"""Token groups drawn over an image (ImagePiece Fig. 1, ToMe's merge visualisation).

After a chosen block, every token stands for a set of patches. Patches of one merged token get
one colour; a token that is still a single patch shows the image as it is; patches whose token
was discarded (pruned, or fused into EViT's one extra token) are greyed. Group borders are drawn
so that neighbouring groups of similar colour stay apart. This shows at a glance WHAT a reducer
merged and what it threw away, which accuracy numbers alone never do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ipbench.errors import UserError

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure
    from torch import nn

# Enough distinct colours that neighbouring groups rarely share one (tab20 + tab20b + tab20c).
PALETTES = ("tab20", "tab20b", "tab20c")
MERGED_ALPHA = 0.55
BORDER = np.array([1.0, 1.0, 1.0])


@dataclass
class GroupLayout:
    """Where the patches went after one block, for one image."""

    layer: int
    labels: np.ndarray  # [rows, cols] index of the token holding each patch (-1: none)
    discarded: np.ndarray  # [rows, cols] bool: the patch's token was dropped or fused away
    tokens: int  # tokens leaving the block, prefix tokens included

    @property
    def merged_groups(self) -> int:
        sizes = np.bincount(self.labels[~self.discarded & (self.labels >= 0)].ravel())
        return int((sizes > 1).sum())


def parse_layers(text: str | None, depth: int) -> list[int]:
    """'11', '-1', '2,5,8,11' or 'all' -> block indices in [0, depth) (default: the last block)."""
    if text is None or text.strip() == "":
        return [depth - 1]
    if text.strip().lower() == "all":
        return list(range(depth))
    layers = []
    for part in text.split(","):
        try:
            value = int(part)
        except ValueError:
            raise UserError(f"--layer {text!r}: expected block numbers like 11 or 2,5,8,11 (0-indexed)") from None
        if not -depth <= value < depth:
            raise UserError(f"--layer {value}: the model has blocks 0 to {depth - 1}")
        layers.append(value % depth)
    return layers


def load_image(path: str | os.PathLike, model: nn.Module) -> torch.Tensor:
    """The image as the model sees it: its eval transform, uint8 [3, H, W]."""
    from PIL import Image, UnidentifiedImageError

    from ipbench.data import data_config, uint8_transform

    file = Path(path)
    if not file.is_file():
        raise UserError(f"--image {file}: no such file")
    try:
        with Image.open(file) as img:
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"--image {file}: not a readable image ({' '.join(str(exc).split())[:100]})") from None
    return uint8_transform(data_config(model))(rgb)


def trace_layouts(model: nn.Module, image: torch.Tensor, spec: str, layers: list[int]) -> list[GroupLayout]:
    """Run `image` (uint8 [3,H,W]) through `model` with reducer `spec` traced; the groups after `layers`."""
    import torch

    from ipbench.data import data_config, normalize
    from ipbench.reducers import apply_reducer, parse_spec, remove_reducer
    from ipbench.reducers.trace import entries, get_trace, group_map

    cfg = data_config(model)
    x = normalize(image.unsqueeze(0), cfg["mean"], cfg["std"])
    apply_reducer(model, parse_spec(spec), tracing=True)
    try:
        with torch.inference_mode():
            model(x)
        trace = get_trace(model)
        outs = entries(trace, "out")
        rows, cols = outs[0]["grid"]
        result = []
        for layer in sorted(set(layers)):
            gone = _discarded_until(trace, layer, rows * cols)
            labels = group_map(trace, layer)[0]
            n_tokens = outs[layer]["source"].shape[1]
            result.append(GroupLayout(layer, labels.numpy().astype(np.int64),
                                      gone.reshape(rows, cols).numpy(), int(n_tokens)))
        return result
    finally:
        remove_reducer(model)


def _discarded_until(trace: list, layer: int, n_patches: int) -> torch.Tensor:
    """Patches whose token was dropped (keep steps, or retok=prune) in blocks <= layer."""
    import torch

    from ipbench.reducers.trace import entries

    gone = torch.zeros(n_patches, dtype=torch.bool)
    for e in entries(trace, ("keep", "prune")):
        if e["layer"] > layer:
            continue
        idx = e["drop"] if e["op"] == "keep" else e["src"]
        if idx.numel() == 0:
            continue
        src = e["source"][0]  # [N, P], image 0
        gone |= (src[idx[0]] > 0).any(dim=0)
    return gone


def _colors(n: int, seed: int = 0) -> np.ndarray:
    import matplotlib as mpl

    base = np.concatenate([np.asarray(mpl.colormaps[p].colors)[:, :3] for p in PALETTES])
    order = np.random.default_rng(seed).permutation(len(base))
    return base[order][np.arange(max(n, 1)) % len(base)]


def paint(image: np.ndarray, layout: GroupLayout, patch: int) -> np.ndarray:
    """The overlay as an RGB float array [H, W, 3] in [0, 1]."""
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


def draw(image: torch.Tensor, layouts: list[GroupLayout], patch: int, title: str) -> Figure:
    """Original image beside one overlay per block."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    arr = image.permute(1, 2, 0).numpy()
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


def visualize(image_path: str | os.PathLike, spec: str, layer: str | None, model_name: str,
              checkpoint: str | None, out: str | os.PathLike | None) -> Path:
    """Write the token-group figure of one image; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from ipbench.models import create_model, resolve_name
    from ipbench.plots import short_spec
    from ipbench.reducers import parse_spec

    policy = parse_spec(spec)  # bad input fails before the model loads
    if not Path(image_path).is_file():
        raise UserError(f"--image {image_path}: no such file")
    png = Path(out) if out is not None else Path("results") / f"tokens_{Path(image_path).stem}.png"
    if png.suffix.lower() != ".png":
        raise UserError(f"--out {png}: the figure is written as PNG; give a file name ending in .png")
    model = create_model(model_name, checkpoint)
    layers = parse_layers(layer, len(model.blocks))
    image = load_image(image_path, model)
    layouts = trace_layouts(model, image, policy.spec, layers)
    patch = int(model.patch_embed.patch_size[0])
    title = (f"{resolve_name(model_name)} · {short_spec(policy.spec)}"
             f"{' · training-free' if policy.training_free else ''} · {Path(image_path).name}")
    fig = draw(image, layouts, patch, title)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=130)
    return png
