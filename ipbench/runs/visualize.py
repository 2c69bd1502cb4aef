"""`ipbench visualize`: which patches each token stands for after a block (ImagePiece Fig. 1).

One traced forward of one image gives, after each chosen block, the token holding every patch
and the patches whose token was discarded; `ipbench.plots.tokens` draws them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ipbench.data import data_config, to_rgb, uint8_transform
from ipbench.errors import UserError
from ipbench.reducers import Policy, check_fits
from ipbench.reducers.trace import Trace, entries, get_trace, group_map
from ipbench.runs.context import RunContext, RunSpec, open_run
from ipbench.runs.plan import variant


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

    file = Path(path)
    if not file.is_file():
        raise UserError(f"--image {file}: no such file")
    try:
        with Image.open(file) as img:
            rgb = to_rgb(img)
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"--image {file}: not a readable image ({' '.join(str(exc).split())[:100]})") from None
    return uint8_transform(data_config(model))(rgb)


def _discarded_until(trace: Trace, layer: int, n_patches: int) -> torch.Tensor:
    """Patches whose token was dropped (keep steps, or retok=prune) in blocks <= layer."""
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


def trace_layouts(model: nn.Module, image: torch.Tensor, policy: Policy | str, layers: list[int],
                  ctx: RunContext | None = None) -> list[GroupLayout]:
    """Run `image` (uint8 [3,H,W]) through `model` with `policy` traced; the groups after `layers`."""
    from ipbench.data import normalize
    from ipbench.reducers import parse_spec

    policy = parse_spec(policy) if isinstance(policy, str) else policy
    traced = variant(model, policy, tracing=True)
    if ctx is not None:
        x = ctx.inputs(image.unsqueeze(0))
    else:
        cfg = data_config(model)
        x = normalize(image.unsqueeze(0), cfg["mean"], cfg["std"])
    with torch.inference_mode():
        traced(x)
    trace = get_trace(traced)
    outs = entries(trace, "out")
    rows, cols = outs[0]["grid"]
    result = []
    for layer in sorted(set(layers)):
        gone = _discarded_until(trace, layer, rows * cols)
        labels = group_map(trace, layer)[0].cpu()
        result.append(GroupLayout(layer, labels.numpy().astype(np.int64), gone.reshape(rows, cols).numpy(),
                                  int(outs[layer]["source"].shape[1])))
    return result


@dataclass
class Groups:
    """What the figure shows: the image, its layouts, the patch size, and the title."""

    image: np.ndarray  # uint8 [H, W, 3]
    layouts: list[GroupLayout]
    patch: int
    title: str


def token_groups(spec: RunSpec, image_path: str | os.PathLike, policy: Policy, layer: str | None) -> Groups:
    """Trace one image with `policy` and return the token groups after the chosen block(s)."""
    if not Path(image_path).is_file():
        raise UserError(f"--image {image_path}: no such file")
    ctx = open_run(spec, source_limit=1)
    check_fits(ctx.net, policy)  # a ViT (and a class token for the CLS-attention reducers)
    layers = parse_layers(layer, len(ctx.net.blocks))
    image = load_image(image_path, ctx.net)
    layouts = trace_layouts(ctx.net, image, policy, layers, ctx)
    patch = int(ctx.net.patch_embed.patch_size[0])
    title = (f"{ctx.model} · {policy.label()}{' · training-free' if policy.training_free else ''}"
             f" · {Path(image_path).name}")
    return Groups(image=image.permute(1, 2, 0).numpy(), layouts=layouts, patch=patch, title=title)
