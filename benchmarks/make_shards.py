"""Turn an ImageNet-style folder (one sub-folder per wnid) into webdataset tar shards for
``ipbench ... --data 'OUT/val-{000000..000063}.tar'``.

    python benchmarks/make_shards.py FOLDER OUT [--shards 64] [--prefix val]

Samples keep ipbench's fixed order of the folder (sorted wnids, then sorted file names), so a
sweep over the shards measures the same images in the same order as over the folder: every
count is the same. Each sample is ``<index>.<ext>`` (the image file's own bytes, not re-encoded)
and ``<index>.cls`` (the class index, ImageNet's sorted-wnid numbering). Written with
webdataset's ShardWriter.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import webdataset as wds

from ipbench.data import folder_items
from ipbench.errors import UserError


def write_shards(folder: Path, out: Path, shards: int, prefix: str = "val") -> list[Path]:
    """Write the folder's images into `shards` tar files of (nearly) equal size; return their paths."""
    items = folder_items(folder)
    if shards < 1:
        raise UserError(f"--shards must be at least 1, got {shards}")
    out.mkdir(parents=True, exist_ok=True)
    per = math.ceil(len(items) / shards)
    pattern = str(out / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=per, verbose=0) as sink:
        for i, (path, label) in enumerate(items):
            ext = path.suffix.lower().lstrip(".")
            sink.write({"__key__": f"{i:08d}", ext: path.read_bytes(), "cls": str(label).encode()})
    return sorted(out.glob(f"{prefix}-*.tar"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--prefix", default="val")
    args = parser.parse_args(argv)
    try:
        paths = write_shards(args.folder, args.out, args.shards, args.prefix)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    last = len(paths) - 1
    print(f"{len(paths)} shards: --data '{args.out}/{args.prefix}-{{000000..{last:06d}}}.tar'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
