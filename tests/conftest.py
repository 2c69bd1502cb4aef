"""Shared fixtures: the real weights and images in ../shared (or IPBENCH_CHECKPOINT / IPBENCH_DATA).

Where they are missing, tests that need them skip with the reason, except under CI=true, where a
missing file must fail the run rather than silently test less.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SUBSET_SIZE = 64


TRUE = {"1", "true", "yes", "on"}


def in_ci() -> bool:
    """CI set to any true value (1, true, yes, on; any case): missing shared files fail, never skip."""
    return os.environ.get("CI", "").strip().lower() in TRUE


def _need(env: str, default: Path) -> Path:
    path = Path(os.environ.get(env) or default)
    if not path.exists():
        reason = f"{path} not found: put shared/ beside the repo or set {env}"
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session", autouse=True)
def _fvcore_counted_once() -> object:
    """Commands count GMACs with fvcore for every configuration; the count depends only on the
    architecture, the reducer and the input shape, so within the test session each is traced once.
    (tests/test_flops.py calls fvcore directly and is not affected.)"""
    from ipbench.runs import cost

    real = cost.count_gmacs
    memo: dict[tuple, object] = {}

    def counted_once(model: nn.Module, images: torch.Tensor) -> object:
        eng = getattr(model, "_ipb", None)
        key = (type(model).__qualname__, getattr(model, "pretrained_cfg", {}).get("architecture"),
               tuple(model.state_dict()), eng.policy.spec if eng is not None else "none", tuple(images.shape),
               images.dtype)
        if key not in memo:
            memo[key] = real(model, images)
        return memo[key]

    cost.count_gmacs = counted_once
    yield
    cost.count_gmacs = real


@contextlib.contextmanager
def isolated() -> Iterator[None]:
    """Undo what ipbench changes process-wide: the environment (it switches the hub client offline),
    the hub client's own offline switch, and torch's thread count (--threads)."""
    env = dict(os.environ)
    threads = torch.get_num_threads()
    constants = sys.modules.get("huggingface_hub.constants")
    offline = getattr(constants, "HF_HUB_OFFLINE", None)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(env)
        torch.set_num_threads(threads)
        constants = sys.modules.get("huggingface_hub.constants")
        if constants is not None and offline is not None:
            constants.HF_HUB_OFFLINE = offline


@pytest.fixture(autouse=True)
def _isolated() -> Iterator[None]:
    """No test leaves the environment, the hub client's offline switch or torch's threads changed."""
    with isolated():
        yield


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
