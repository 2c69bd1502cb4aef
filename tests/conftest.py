"""Shared fixtures: the real weights and images in ../shared (or IPBENCH_CHECKPOINT / IPBENCH_DATA).

Where they are missing, tests that need them skip with the reason, except under CI=true, where a
missing file must fail the run rather than silently test less.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SUBSET_SIZE = 64


def _need(env: str, default: Path) -> Path:
    path = Path(os.environ.get(env) or default)
    if not path.exists():
        reason = f"{path} not found: put shared/ beside the repo or set {env}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def checkpoint_path() -> Path:
    """Real ImageNet-trained DeiT-Tiny weights (timm key names)."""
    return _need("IPBENCH_CHECKPOINT", SHARED / "weights" / "deit_tiny_patch16_224.safetensors")


@pytest.fixture(scope="session")
def data_path() -> Path:
    """1000 real photographs in ImageNet-validation folder layout (430 classes)."""
    return _need("IPBENCH_DATA", SHARED / "data" / "nips17-dev")


@pytest.fixture(scope="session")
def deit_tiny(checkpoint_path: Path) -> nn.Module:
    """DeiT-Tiny with the real weights, eval mode, CPU; shared by the session (do not patch it)."""
    from ipbench.models import create_model

    return create_model("deit_t", str(checkpoint_path))


@dataclass
class Subset:
    """A deterministic subset of the shared images, decoded once."""

    source: object  # ipbench.data.DataSource
    uint8: torch.Tensor  # decoded images, uint8 [N,3,224,224]
    images: torch.Tensor  # the same, normalised float32: ready for the model
    labels: torch.Tensor


@pytest.fixture(scope="session")
def shared_subset(deit_tiny: nn.Module, data_path: Path) -> Subset:
    """SUBSET_SIZE shared images evenly spaced over the sorted list (ipbench's --limit rule)."""
    from ipbench.data import decode_all, normalize, open_source

    source = open_source(str(data_path), deit_tiny, limit=SUBSET_SIZE)
    uint8, labels = decode_all(source, max_bytes=1 << 30)
    return Subset(source, uint8, normalize(uint8, source.mean, source.std), labels)


@pytest.fixture
def small_folder(tmp_path: Path, data_path: Path) -> Path:
    """A copy of two images from each of three real classes (a subset of the 1000 classes)."""
    root = tmp_path / "val"
    for wnid in ("n01443537", "n01530575", "n04522168"):
        src = data_path / wnid
        if not src.is_dir():
            pytest.fail(f"{src} is missing from the shared data")
        (root / wnid).mkdir(parents=True)
        for f in sorted(src.iterdir())[:2]:
            shutil.copy(f, root / wnid / f.name)
    return root


@pytest.fixture
def clean_env() -> dict[str, str | None]:
    """CliRunner env that hides the user's IPBENCH_* settings from a test."""
    return {"IPBENCH_CHECKPOINT": None, "IPBENCH_DATA": None}
