"""Model names, weights (hub or local file) and the reducer a model runs with.

timm (and with it huggingface_hub) is imported inside functions on purpose: the hub client reads
``HF_HUB_OFFLINE`` when it is imported, and the no-network probe must run before that.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from ipbench.errors import UserError

ALIASES: dict[str, str] = {
    "deit_t": "deit_tiny_patch16_224",
    "deit_s": "deit_small_patch16_224",
    "deit_b": "deit_base_patch16_224",
}

CHECKPOINT_WRAPPERS = ("model", "state_dict", "model_ema")
HUB_PROBE_TIMEOUT_S = 2.0


def resolve_name(name: str) -> str:
    """Alias → timm name; any other name is passed through unchanged (checked by `create_model`)."""
    return ALIASES.get(name, name)


def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One TCP connect to the HF endpoint: the hub client itself would retry for minutes."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _go_offline() -> None:
    """Make a download of non-cached weights fail at once instead of hanging on retries."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None and hasattr(constants, "HF_HUB_OFFLINE"):
        constants.HF_HUB_OFFLINE = True


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


Adapt = Callable[[nn.Module, dict[str, torch.Tensor]], None]  # fits a model's modules to a state dict


def create_model(name: str, checkpoint: str | None, device: str = "cpu", pretrained: bool = True,
                 img_size: int | None = None, patch_size: int | None = None, adapt: Adapt | None = None,
                 **kwargs: Any) -> nn.Module:
    """A timm model in eval mode with weights from `checkpoint`, else timm's (cached) hub download, or
    with `pretrained=False` timm's random initialisation (seeded by torch's global generator).

    `img_size` / `patch_size` build the model at another resolution or patch size on the SAME weights:
    the patch embedding and the position embedding are resampled by timm's own functions (FlexiViT's
    pseudo-inverse resize of the kernel, bicubic interpolation of the position grid), and the model's
    data config then asks for images of `img_size`.

    `adapt(model, state)` may change the model's modules to fit a checkpoint before its strict load
    (the run floor installs ImagePiece's conv stem for a checkpoint trained with it)."""
    if img_size is not None:
        kwargs["img_size"] = img_size
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    timm_name = resolve_name(name)
    if checkpoint is None and pretrained and not _offline() and not _hub_reachable():
        _go_offline()
    import timm

    if not timm.is_model(timm_name):
        aliases = ", ".join(f"{a} ({n})" for a, n in ALIASES.items())
        raise UserError(
            f"unknown model {name!r}; use an alias ({aliases}) or a timm name, "
            "e.g. one of timm.list_models('*vit*')"
        )
    if checkpoint is not None:
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
        load_checkpoint(model, checkpoint, resample=img_size is not None or patch_size is not None, adapt=adapt)
    elif not pretrained:
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
    else:
        try:
            model = timm.create_model(timm_name, pretrained=True, **kwargs)
        except Exception as exc:  # hub/network/cache failures come in many types; all mean the same here
            hint = "pass --checkpoint FILE or set IPBENCH_CHECKPOINT"
            if _offline():
                raise UserError(f"no network and no cached weights for {timm_name}; {hint}") from exc
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"could not get pretrained weights for {timm_name} ({reason}); {hint}") from exc
    if img_size is not None:  # timm keeps the pretrained config's 224: the data must come at img_size
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, img_size, img_size)}
    return model.to(device).eval()


TRAINED_WITH = "ipbench.trained_with"  # safetensors metadata: the reducer a fine-tune trained the weights with


def trained_with(path: str | os.PathLike) -> str:
    """The reducer spec `ipbench finetune` trained this checkpoint's weights with (written in the
    safetensors metadata), '' for any other weights: rows must not call those numbers training-free."""
    file = Path(path)
    if file.suffix != ".safetensors":
        return ""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return (f.metadata() or {}).get(TRAINED_WITH, "")
    except Exception:  # unreadable: the strict load says so, with the file's name
        return ""


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, wrong format, pickle with code: all unreadable to us
        raise UserError(f"cannot read checkpoint {path}: {str(exc).strip().splitlines()[0]}") from exc


def _unwrap(state: Any, path: Path) -> dict[str, torch.Tensor]:
    """Training scripts save {'model': sd, 'optimizer': ...}; take the weights out of that."""
    if isinstance(state, dict):
        for key in CHECKPOINT_WRAPPERS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint {path} holds no state dict "
                        f"(looked inside {', '.join(CHECKPOINT_WRAPPERS)})")
    # DataParallel/DDP checkpoints prefix every key with 'module.'.
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _first(keys: list[str], n: int = 3) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_checkpoint(model: nn.Module, path: str | os.PathLike, resample: bool = False,
                    adapt: Adapt | None = None) -> None:
    """Load weights strictly: a silently half-loaded model would give plausible but wrong numbers.

    `resample`: the model has another resolution or patch size than the weights; timm's checkpoint
    filter resamples the patch and position embeddings to it (every other tensor must still match)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"checkpoint not found: {file}")
    state = _unwrap(_read_state_dict(file), file)
    if resample:
        # each timm model module's own checkpoint filter: ViT and EVA resample the patch and position
        # embeddings, BEiT also its relative position tables
        filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        if filter_fn is None or not hasattr(model, "patch_embed"):
            raise UserError(f"--img-size/--patch-size resample a ViT's embeddings; {type(model).__name__} is not one")
        state = filter_fn(state, model)
    if adapt is not None:
        adapt(model, state)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_first(unexpected)}")
        raise UserError(f"checkpoint {file} does not match the model: {'; '.join(parts)}")
    bad_shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                  if state[k].shape != v.shape]
    if bad_shapes:
        raise UserError(f"checkpoint {file} does not match the model: shape mismatch in {_first(bad_shapes)}")
    model.load_state_dict(state, strict=True)


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """Full sha256 of a weights file; cached by (path, size, mtime) because every result row asks."""
    resolved = Path(path).resolve()
    st = resolved.stat()
    return _sha256(str(resolved), st.st_size, st.st_mtime_ns)
