"""Random 16×16 masks over images: pure tensor functions (paper Table 4).

The paper masks "random 16×16 patches" and says no more; the open choices are parameters
(docs/METHODS.md):

* placement ``patch``: squares aligned to the patch grid at DISTINCT random patch positions, so a
  count of k masks exactly k patches; ``free``: squares at any pixel position, which may overlap
  each other and straddle patch borders (the masked area can be less than k·256 pixels).
* fill ``zero``: 0 in normalised space (the dataset's mean colour); ``mean``: the image's own
  per-channel mean; ``noise``: standard normal noise in normalised space.
* seeding: one generator per image, seeded from (seed, image index), so every reducer, every run
  and every batch size sees the same masked images; positions are drawn first from a fresh
  generator, so the masks of a smaller count are a subset of those of a larger one (same seed).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ipbench.errors import UserError

PLACEMENTS = ("patch", "free")
FILLS = ("zero", "mean", "noise")
DEFAULT_COUNTS = (7, 10, 15, 20, 25, 50)  # the paper's Table 4
_SEED_STRIDE = 1_000_003  # as the synthetic images: (seed, index) pairs never collide in practice


def image_seed(seed: int, index: int) -> int:
    """The mask seed of image `index` (its position in the data source) under run seed `seed`."""
    return seed * _SEED_STRIDE + index


def image_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded by `image_seed`."""
    return [torch.Generator().manual_seed(image_seed(seed, int(i))) for i in indices]


def grid_shape(height: int, width: int, patch: int) -> tuple[int, int]:
    """Patch rows and columns of an image (whole patches only, as a ViT's patch embedding)."""
    return height // patch, width // patch


def mask_count_for(fraction: float, n_patches: int) -> int:
    """Patches masked for a fraction of the image: round(fraction · patches), at least one."""
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"--mask must be a fraction of the patches in (0, 1], got {fraction:g}")
    return max(1, min(n_patches, round(fraction * n_patches)))


def check_count(count: int, n_patches: int, placement: str) -> None:
    """A count must be at least 1; patch placement can mask at most every patch once."""
    if placement not in PLACEMENTS:
        raise UserError(f"unknown placement {placement!r}; valid: {', '.join(PLACEMENTS)}")
    if count < 1:
        raise UserError(f"mask count must be at least 1, got {count}")
    if placement == "patch" and count > n_patches:
        raise UserError(f"{count} masks do not fit {n_patches} patches at distinct positions "
                        "(use a smaller count or --placement free)")


def mask_positions(count: int, height: int, width: int, placement: str, patch: int,
                   generator: torch.Generator) -> Tensor:
    """Top-left pixel (row, col) of each of `count` squares of side `patch`: long [count, 2]."""
    if placement == "patch":
        rows, cols = grid_shape(height, width, patch)
        cells = torch.randperm(rows * cols, generator=generator)[:count]
        return torch.stack([cells // cols, cells % cols], dim=1) * patch
    top = torch.randint(0, height - patch + 1, (count,), generator=generator)
    left = torch.randint(0, width - patch + 1, (count,), generator=generator)
    return torch.stack([top, left], dim=1)


def mask_images(images: Tensor, count: int, placement: str = "patch", fill: str = "zero",
                generator: torch.Generator | Sequence[torch.Generator] | None = None,
                patch: int = 16) -> tuple[Tensor, Tensor]:
    """Mask `count` random patch×patch squares in each image.

    images: normalised float [B, C, H, W] (not modified). generator: one per image (see
    `image_generators`) for masks that do not depend on the batch, or one shared by the batch
    (drawn image by image), or None (torch's global generator).
    Returns (masked images, mask bool [B, H, W], True where a pixel was masked).
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got {tuple(images.shape)}")
    if fill not in FILLS:
        raise UserError(f"unknown fill {fill!r}; valid: {', '.join(FILLS)}")
    bsz, channels, height, width = images.shape
    rows, cols = grid_shape(height, width, patch)
    check_count(count, rows * cols, placement)
    if isinstance(generator, Sequence):
        if len(generator) != bsz:
            raise ValueError(f"{len(generator)} generators for {bsz} images")
        gens: list[torch.Generator | None] = list(generator)
    else:
        gens = [generator] * bsz
    out = images.clone()
    mask = torch.zeros(bsz, height, width, dtype=torch.bool, device=images.device)
    for i, gen in enumerate(gens):
        g = gen if gen is not None else torch.default_generator
        for top, left in mask_positions(count, height, width, placement, patch, g).tolist():
            mask[i, top:top + patch, left:left + patch] = True
        m = mask[i].unsqueeze(0).expand(channels, -1, -1)
        if fill == "zero":
            out[i][m] = 0.0
        elif fill == "mean":
            mean = images[i].mean(dim=(1, 2), keepdim=True).expand(-1, height, width)
            out[i][m] = mean[m]
        else:
            noise = torch.randn(channels, height, width, generator=g).to(images.device, images.dtype)
            out[i][m] = noise[m]
    return out, mask


def masked_patch_count(mask: Tensor, patch: int = 16) -> Tensor:
    """Patches of the grid that are fully masked, per image: long [B] (check for tests and users)."""
    bsz, height, width = mask.shape
    rows, cols = grid_shape(height, width, patch)
    cells = mask[:, :rows * patch, :cols * patch].reshape(bsz, rows, patch, cols, patch)
    return cells.all(dim=4).all(dim=2).sum(dim=(1, 2))
