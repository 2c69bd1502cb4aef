"""PIL images to 8-bit RGB, and the one-line text of a decoding error.

Every decoder of ipbench (folders, CSVs, tar shards, ``visualize --image``) goes through `to_rgb`,
so an image gets the same pixels whatever the source it came from.
"""

from __future__ import annotations

from typing import Any


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (PIL's can span several): an error stays one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}  # full scale


def to_rgb(im: Any) -> Any:
    """A PIL image as 8-bit RGB, as timm's loader (``convert("RGB")``) gives it, except where that
    is wrong: 16-bit grayscale (modes I;16*, and I as Pillow opens 16-bit PNGs) is SCALED to 8 bits
    instead of clipped at 255 (timm turns such an image all white), and a palette image with a
    transparent colour goes through RGBA (the same colours, without Pillow's warning)."""
    import numpy as np
    from PIL import Image

    if im.mode in WIDE_MODES:
        wide = np.asarray(im, dtype=np.float64)
        scaled = np.clip(np.rint(wide * (255.0 / WIDE_MODES[im.mode])), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        return im.convert("RGBA").convert("RGB")
    return im.convert("RGB")
