"""webdataset tar shards (``val-{000000..000063}.tar``) as a map-style dataset of images.

webdataset's own readers stream, so they cannot hand each torchrun rank an exact contiguous slice
of a fixed order with several DataLoader workers; here the tar headers are indexed once (no image
is read) and each image is read by its offset. webdataset's key rule (`base_plus_ext`) groups a
sample's members; `braceexpand` (its dependency) expands the pattern.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset

from ipbench.errors import UserError
from ipbench.images import one_line, to_rgb


@dataclass(frozen=True)
class TarMember:
    """Where one image's bytes lie inside a tar shard (read by seeking: no extraction)."""

    tar: Path
    offset: int
    size: int
    name: str


class TarImages(Dataset):
    """Images inside webdataset tar shards, read by offset: a map-style dataset, so that each rank
    reads only its contiguous shard and DataLoader workers keep the fixed order."""

    def __init__(self, items: list[tuple[TarMember, int]], transform: Any) -> None:
        self.items = items
        self.transform = transform
        self._open: dict[Path, Any] = {}  # one handle per tar and per worker process

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}}  # file handles do not travel to worker processes

    def __getitem__(self, i: int) -> tuple[Tensor | None, int, str]:
        import io

        from PIL import Image

        member, label = self.items[i]
        try:
            f = self._open.get(member.tar)
            if f is None:
                f = self._open[member.tar] = member.tar.open("rb")
            f.seek(member.offset)
            with Image.open(io.BytesIO(f.read(member.size))) as im:
                rgb = to_rgb(im)
        except Exception as exc:  # as for files: a broken sample is reported, not raised
            return None, label, f"cannot read image {member.tar}:{member.name}: {one_line(exc)}"
        return self.transform(rgb), label, ""  # a failing transform is a bug, not a bad sample


TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")


def is_shards(spec: str) -> bool:
    """Whether `spec` names webdataset tar shards (``val-{000000..000063}.tar``, or one ``x.tar``)."""
    return spec.strip().lower().endswith(".tar")


def shard_paths(spec: str) -> list[Path]:
    """The tar files of a brace pattern, in its order; each must exist."""
    from braceexpand import braceexpand

    try:
        paths = [Path(p).expanduser() for p in braceexpand(spec.strip())]
    except Exception as exc:  # braceexpand raises on unbalanced braces
        raise UserError(f"bad shard pattern {spec!r}: {one_line(exc)}") from None
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"shard not found: {missing[0]} ({len(missing)} of {len(paths)} missing)")
    return paths


def tar_items(paths: list[Path], parse_label: Callable[[str, str], int]) -> list[tuple[TarMember, int]]:
    """(image member, label) of every sample of the shards, in shard order then tar order.

    A sample is the members sharing a key (webdataset's rule: the name up to the first dot of its
    last part); its image is the first of TAR_IMAGE_EXTENSIONS, its label the ``.cls`` field, read
    by `parse_label(text, where)` (data's rule: a class index, or an ImageNet wnid).
    """
    import tarfile

    from webdataset.tariterators import base_plus_ext

    items: list[tuple[TarMember, int]] = []
    for path in paths:
        samples: dict[str, dict[str, Any]] = {}
        try:
            with tarfile.open(path, "r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, ext = base_plus_ext(m.name)
                    if key is None:
                        continue
                    sample = samples.setdefault(key, {})
                    ext = ext.lower()
                    if ext == "cls":
                        sample["cls"] = tar.extractfile(m).read().decode("utf-8", "replace")  # type: ignore[union-attr]
                    elif ext in TAR_IMAGE_EXTENSIONS and "image" not in sample:
                        sample["image"] = TarMember(path, m.offset_data, m.size, m.name)
        except (OSError, tarfile.TarError) as exc:
            raise UserError(f"cannot read shard {path}: {one_line(exc)}") from None
        for key, sample in samples.items():
            if "image" not in sample:
                continue
            if "cls" not in sample:
                raise UserError(f"sample {key!r} of {path} has no .cls field (its class label)")
            items.append((sample["image"], parse_label(sample["cls"], f"{path}:{key}.cls")))
    if not items:
        raise UserError(f"no image samples in {len(paths)} shard(s) (looked for "
                        f"{', '.join('.' + e for e in TAR_IMAGE_EXTENSIONS)} with a .cls label)")
    return items
