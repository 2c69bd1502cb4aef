"""A fine-tune's checkpoint: the weights as .safetensors and a training state, written whole.

OUT/checkpoint/ holds model.safetensors (plain timm keys, so `ipbench eval --checkpoint` loads it),
model_ema.safetensors and train_state.pt (optimizer, scheduler, scaler, the position in the data
order and every rank's random generators: what an exact resume needs).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ipbench.errors import UserError

CHECKPOINT = "checkpoint"  # OUT/checkpoint/: the last checkpoint
MODEL_FILE = "model.safetensors"
EMA_FILE = "model_ema.safetensors"
STATE_FILE = "train_state.pt"


# -- random generators: saved with every rank's checkpoint, restored on resume ------------------

def rng_state() -> dict[str, Any]:
    """This process's random generators (torch, numpy, Python; CUDA where used) as plain values."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype("int64")), pos,
                                                        has_gauss, cached],
             "python": list(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# -- checkpoints ----------------------------------------------------------------------------

def _tensors(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(out: Path, model: nn.Module, ema: nn.Module | None, state: dict[str, Any],
                    metadata: dict[str, str] | None = None) -> Path:
    """Write OUT/checkpoint/ whole: into checkpoint.tmp, then two renames (the old one aside, the new
    one in place), so a crash at any moment leaves one complete checkpoint. `metadata` goes into both
    weight files' safetensors headers (`models.TRAINED_WITH`)."""
    from safetensors.torch import save_file

    final, tmp, old = out / CHECKPOINT, out / f"{CHECKPOINT}.tmp", out / f"{CHECKPOINT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_tensors(model), str(tmp / MODEL_FILE), metadata=metadata)
    if ema is not None:
        save_file(_tensors(ema), str(tmp / EMA_FILE), metadata=metadata)
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def last_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint in OUT (the set-aside one if a crash came between the two renames)."""
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):
        folder = out / name
        if (folder / STATE_FILE).is_file() and (folder / MODEL_FILE).is_file():
            return folder
    return None


def load_state(folder: Path) -> dict[str, Any]:
    try:
        return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or foreign file: say which, never a traceback
        raise UserError(f"cannot read {folder / STATE_FILE}: {str(exc).strip().splitlines()[0]} "
                        "(use --force to start over)") from exc


def load_weights(module: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(path)), strict=True)

