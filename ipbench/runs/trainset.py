"""The training images: the same items as a data source, under timm's random training transform, in
a reproducible order (each epoch a permutation of (seed, epoch), each image's augmentation drawn
from its own seed), and a validation split held out of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from ipbench.data import DataSource, collate, evenly_spaced, readable
from ipbench.errors import UserError


def holdout(source: DataSource, n: int) -> tuple[DataSource, DataSource]:
    """(train, validation): the `n` images `--limit n` would pick (evenly spaced over the sorted
    order, so every class is represented) are held out for validation, the rest train."""
    total = source.num_images
    if not 0 < n < total:
        raise UserError(f"--holdout {n}: must be between 1 and {total - 1} (the data has {total} images)")
    held = evenly_spaced(list(range(total)), n)
    rest = sorted(set(range(total)) - set(held))
    return _indexed(source, rest), _indexed(source, held)


def _indexed(source: DataSource, indices: list[int]) -> DataSource:
    labels = _labels_of(source.dataset)
    top = max((labels[i] for i in indices), default=-1) if labels is not None else source.max_label
    return replace(source, dataset=Subset(source.dataset, indices), num_images=len(indices), part=None,
                   skipped=[], max_label=top)


def _labels_of(dataset: Dataset) -> list[int] | None:
    """Every item's label, read from the dataset's item list without decoding (None if it has none)."""
    if isinstance(dataset, Subset):
        inner = _labels_of(dataset.dataset)
        return [inner[i] for i in dataset.indices] if inner is not None else None
    items = getattr(dataset, "items", None)
    return [label for _, label in items] if items is not None else None


def with_transform(dataset: Dataset, transform: Any) -> Dataset:
    """The same items decoded through another transform (a Subset keeps its indices)."""
    import copy

    if isinstance(dataset, Subset):
        return Subset(with_transform(dataset.dataset, transform), dataset.indices)
    if not hasattr(dataset, "transform"):
        raise UserError("training needs labelled images (a folder, a CSV or tar shards), not synthetic data")
    out = copy.copy(dataset)
    out.transform = transform
    return out


def train_transform(cfg: dict[str, Any], auto_augment: str | None, re_prob: float) -> Any:
    """timm's training transform for the model's data config (random resized crop, flip, colour
    jitter, RandAugment, random erasing), ending in ToTensor + Normalize."""
    from timm.data import create_transform
    from timm.data.auto_augment import RandAugment

    transform = create_transform(input_size=cfg["input_size"], is_training=True, auto_augment=auto_augment,
                                 interpolation=cfg.get("interpolation", "bicubic"), mean=cfg["mean"], std=cfg["std"],
                                 re_prob=re_prob, re_mode="pixel", re_count=1)
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []) if isinstance(t, RandAugment) else []:
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
    return transform


def _posterize(img: Any, bits_to_keep: int, **_: Any) -> Any:
    """timm's posterize for any bit count: 'keep 0 bits' (DeiT's rand-...-inc1 at magnitude 10) is a
    black image, as in the TensorFlow original, where Pillow >= 11 refuses bits=0 with an error."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


class SeededItems(Dataset):
    """Each image's random augmentation drawn from its own seed, a function of (seed, epoch, index):
    an image gets the same crop on any rank, in any worker process and after any resume, and the
    global random generators (dropout, drop-path, mixup) are left as they were."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Tensor | None, int, str]:
        import random

        import numpy as np

        s = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + i
        saved = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                random.seed(s)
                np.random.seed(s % 2**32)
                return self.dataset[i]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The training images' order in `epoch`: a permutation drawn from (seed, epoch) alone."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def train_batches(dataset: SeededItems, indices: list[int], batch_size: int, workers: int, skip_bad: bool
                  ) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (float images, labels) of `indices` in that order, `batch_size` at a time. The loader
    has its own generator, so creating it draws nothing from torch's global one (exact resume)."""
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=max(0, workers),
                        collate_fn=collate, generator=torch.Generator())
    yield from readable(loader, skip_bad, [])
