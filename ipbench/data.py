"""Data sources → decoded uint8 image batches + labels, normalised per batch on the fly.

Images are decoded ONCE to uint8 (the model's eval transform without ToTensor/Normalize) so that
several models can be evaluated on the same decoded batches; `normalize` then gives bit-identical
float input to timm's ToTensor + Normalize.

Class numbering of an ImageNet-style folder is the position of the wnid in the fixed, sorted list
of the 1000 ImageNet synsets (timm's ``ImageNetInfo``), never the folders that happen to be present.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ipbench import shards
from ipbench.errors import UserError
from ipbench.images import one_line as _one_line
from ipbench.images import to_rgb

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif"})
SYNTHETIC = "synthetic"
SAMPLE = "sample"  # the 100 real labelled photographs shipped with ipbench (CC-BY 2.0, see their README)
SAMPLE_FOLDER = Path(__file__).resolve().parent / "sample" / "nips17-100"
SYNTHETIC_DEFAULT_IMAGES = 256
UNLABELLED = -1


@functools.lru_cache(maxsize=1)
def imagenet_wnids() -> dict[str, int]:
    """wnid → class index over the fixed sorted list of the 1000 ImageNet-1k synsets."""
    from timm.data import ImageNetInfo

    return {wnid: i for i, wnid in enumerate(ImageNetInfo().label_names())}


def data_config(model_or_cfg: nn.Module | dict[str, Any]) -> dict[str, Any]:
    """The model's eval data config (input size, resize, crop, mean/std), as timm resolves it."""
    from timm.data import resolve_data_config

    if isinstance(model_or_cfg, nn.Module):
        return resolve_data_config({}, model=model_or_cfg)
    return resolve_data_config(dict(model_or_cfg))


def uint8_transform(cfg: dict[str, Any]) -> Any:
    """timm's eval transform for `cfg` with ToTensor/Normalize replaced by PIL → uint8 tensor."""
    from timm.data import create_transform
    from timm.data.transforms import MaybeToTensor, ToTensor
    from torchvision import transforms as T

    full = create_transform(**cfg, is_training=False)
    drop = (T.ToTensor, T.Normalize, MaybeToTensor, ToTensor)
    return T.Compose([t for t in full.transforms if not isinstance(t, drop)] + [T.PILToTensor()])


def normalize(batch: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 [B,3,H,W] → float32, bit-identical to torchvision's ToTensor (x/255) then Normalize."""
    m = torch.tensor(mean, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    return batch.to(torch.float32).div(255).sub_(m).div_(s)


class _Files(Dataset):
    """(path, label) list decoded with the uint8 transform; failures are returned, not raised,
    so that a worker process never turns a bad file into a traceback."""

    def __init__(self, items: list[tuple[Path, int]], transform: Any) -> None:
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor | None, int, str]:
        from PIL import Image

        path, label = self.items[i]
        try:
            with Image.open(path) as im:
                rgb = to_rgb(im)  # decoded here (convert loads the pixels)
        except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError... for broken files
            return None, label, f"cannot read image {path}: {_one_line(exc)}"
        return self.transform(rgb), label, ""  # outside: a failing transform is a bug, not a bad file


class _Synthetic(Dataset):
    """Seeded random images: the same (seed, index) always gives the same pixels."""

    def __init__(self, n: int, size: tuple[int, int, int], seed: int) -> None:
        self.n, self.size, self.seed = n, size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, int, str]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return torch.randint(0, 256, self.size, generator=g, dtype=torch.uint8), UNLABELLED, ""


def collate(items: list[tuple[Tensor | None, int, str]]) -> tuple[Tensor | None, Tensor, list[str]]:
    """A batch of the readable items, their labels, and the read errors of the others."""
    good = [(img, label) for img, label, err in items if img is not None]
    errors = [err for _, _, err in items if err]
    images = torch.stack([img for img, _ in good]) if good else None
    return images, torch.tensor([label for _, label in good], dtype=torch.long), errors


@dataclass
class DataSource:
    """An opened data source: what it is, how many images, and its batches of decoded images."""

    name: str  # "folder", "csv", "shards" or "synthetic"
    path: str  # resolved path, or "synthetic"
    num_images: int
    has_labels: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int, int]
    skip_bad: bool
    dataset: Dataset = field(repr=False)
    skipped: list[str] = field(default_factory=list)  # messages of images skipped by the last pass
    part: range | None = None  # this process's contiguous share of the images (None: all of them)
    max_label: int = -1  # the largest class index among the labels (-1 without labels)

    @property
    def local_images(self) -> int:
        """How many images this process reads (its shard; all of them in a single process)."""
        return len(self.part) if self.part is not None else self.num_images

    def sharded(self, part: range) -> DataSource:
        """The same source, reading only `part` of its fixed order (num_images stays the total)."""
        return replace(self, part=part, skipped=[])

    def batches(self, batch_size: int = 32, workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield (uint8 images [B,3,H,W], labels) in the source's fixed order."""
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {batch_size}")
        self.skipped = []
        dataset = Subset(self.dataset, self.part) if self.part is not None else self.dataset
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                            num_workers=max(0, workers), collate_fn=collate)
        yield from readable(loader, self.skip_bad, self.skipped)


def readable(loader: Iterable[tuple[Tensor | None, Tensor, list[str]]], skip_bad: bool, skipped: list[str]
             ) -> Iterator[tuple[Tensor, Tensor]]:
    """The batches of a loader that collates with `collate`: the first unreadable image is a
    UserError, or with `skip_bad` its message goes to `skipped` and the batch keeps the others."""
    for images, labels, errors in loader:
        if errors:
            if not skip_bad:
                raise UserError(f"{errors[0]} (use --skip-bad to skip unreadable images)")
            skipped.extend(errors)
        if images is not None:
            yield images, labels


def evenly_spaced(items: list[Any], limit: int | None) -> list[Any]:
    """Deterministic `limit` items evenly spaced over the fixed order (so stratified over classes)."""
    if limit is None or limit >= len(items):
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


def folder_items(root: Path) -> list[tuple[Path, int]]:
    wnids = imagenet_wnids()
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise UserError(f"empty data folder {root}: expected one sub-folder per ImageNet wnid "
                        "(e.g. n01440764/)")
    unknown = [d.name for d in class_dirs if d.name not in wnids]
    if unknown:
        raise UserError(f"unknown wnid folder {root / unknown[0]}: sub-folders must be ImageNet-1k wnids "
                        f"like n01440764 ({len(unknown)} unknown)")
    items = [(f, wnids[d.name]) for d in class_dirs for f in sorted(d.iterdir())
             if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise UserError(f"no images in data folder {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return items


def _parse_label(value: str, wnids: dict[str, int], where: str) -> int:
    value = value.strip()
    if value in wnids:
        return wnids[value]
    try:
        label = int(value)
    except ValueError:
        label = -1
    if label < 0:
        raise UserError(f"bad label {value!r} at {where}: expected a class index >= 0 or an ImageNet wnid")
    return label


def _csv_items(path: Path) -> list[tuple[Path, int]]:
    wnids = imagenet_wnids()
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"file", "label"} - set(reader.fieldnames or [])
            if missing:
                raise UserError(f"CSV {path} lacks column(s) {', '.join(sorted(missing))}: "
                                "expected file,label")
            items = [(path.parent / (row["file"] or "").strip(),
                      _parse_label(row["label"] or "", wnids, f"{path}:{n}"))
                     for n, row in enumerate(reader, start=2)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"cannot read CSV {path}: {_one_line(exc)}") from exc
    if not items:
        raise UserError(f"CSV {path} has no rows")
    return items


def open_source(spec: str, model_or_cfg: nn.Module | dict[str, Any], limit: int | None = None,
                skip_bad: bool = False, seed: int = 0) -> DataSource:
    """Open `spec`: an ImageNet-style folder, a ``file,label`` CSV, webdataset tar shards
    (``shards/val-{000000..000063}.tar``), "sample" (the 100 photographs shipped with ipbench) or
    "synthetic".

    `limit` keeps N images evenly spaced over the sorted order (every total/N-th: all classes stay
    represented); for synthetic it is the number of images (default 256).
    """
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    cfg = data_config(model_or_cfg)
    input_size = tuple(int(x) for x in cfg["input_size"])
    common = dict(mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), input_size=input_size, skip_bad=skip_bad)
    if spec.strip().lower() == SYNTHETIC:
        n = limit or SYNTHETIC_DEFAULT_IMAGES
        return DataSource(name=SYNTHETIC, path=SYNTHETIC, num_images=n, has_labels=False,
                          dataset=_Synthetic(n, input_size, seed), **common)
    if spec.strip().lower() == SAMPLE:
        if not SAMPLE_FOLDER.is_dir():
            raise UserError(f"the sample images are missing from this installation ({SAMPLE_FOLDER}); "
                            "reinstall ipbench or pass --data PATH")
        spec = str(SAMPLE_FOLDER)
    if shards.is_shards(spec):
        paths = shards.shard_paths(spec)
        wnids = imagenet_wnids()
        tar_items = evenly_spaced(shards.tar_items(paths, lambda text, where: _parse_label(text, wnids, where)), limit)
        where = str(paths[0].resolve()) if len(paths) == 1 else f"{paths[0].resolve()} .. {paths[-1].name}"
        return DataSource(name="shards", path=where, num_images=len(tar_items), has_labels=True,
                          dataset=shards.TarImages(tar_items, uint8_transform(cfg)),
                          max_label=max(label for _, label in tar_items), **common)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"data path not found: {spec}")
    if path.is_dir():
        kind, items = "folder", folder_items(path)
    elif path.suffix.lower() == ".csv":
        kind, items = "csv", _csv_items(path)
    else:
        raise UserError(f"unsupported data source {spec}: expected a folder of wnid sub-folders, "
                        "a .csv with columns file,label, tar shards (val-{000000..000063}.tar) or 'synthetic'")
    items = evenly_spaced(items, limit)
    return DataSource(name=kind, path=str(path.resolve()), num_images=len(items), has_labels=True,
                      dataset=_Files(items, uint8_transform(cfg)), max_label=max(label for _, label in items),
                      **common)


def decode_all(source: DataSource, max_bytes: int, batch_size: int = 64, workers: int = 0,
               advance: Callable[[int], None] | None = None) -> tuple[Tensor, Tensor]:
    """Decode the source's images (this rank's shard) into one uint8 tensor, for measurements that
    reuse the same images; images skipped with --skip-bad are left out (empty when none is readable).

    advance(n) is called after each batch of n images (a progress bar's hook).
    """
    c, h, w = source.input_size
    count = source.local_images
    need = count * c * h * w
    if need > max_bytes:
        raise UserError(f"{count} images at {h}x{w} need {need / 2**20:.0f} MiB in memory, "
                        f"more than the {max_bytes / 2**20:.0f} MiB allowed; use --limit")
    images = torch.empty((count, c, h, w), dtype=torch.uint8)
    labels = torch.empty(count, dtype=torch.long)
    n = 0
    for batch, batch_labels in source.batches(batch_size, workers):
        images[n:n + len(batch)] = batch
        labels[n:n + len(batch)] = batch_labels
        n += len(batch)
        if advance is not None:
            advance(len(batch))
    return images[:n], labels[:n]


def batched(images: Tensor, labels: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches over already decoded images (see `decode_all`)."""
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size], labels[start:start + batch_size]

