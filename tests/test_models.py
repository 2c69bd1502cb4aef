"""Model names, strict checkpoint loading, checksums, and the no-network path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ipbench import models
from ipbench.errors import UserError

SHARED_SHA256 = "feb465dcfedcc2d9f508ad557ba587cd23f5d24994a4183a73658688e70cfb52"


def tiny_state() -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", depth=2).state_dict()


def test_aliases_resolve_and_other_names_pass_through() -> None:
    assert models.resolve_name("deit_t") == "deit_tiny_patch16_224"
    assert models.resolve_name("deit_s") == "deit_small_patch16_224"
    assert models.resolve_name("deit_b") == "deit_base_patch16_224"
    assert models.resolve_name("vit_small_patch16_224") == "vit_small_patch16_224"


def test_unknown_model_lists_aliases_and_suggests_timm_listing() -> None:
    with pytest.raises(UserError, match=r"unknown model 'deit_x'.*deit_t.*timm.list_models\('\*vit\*'\)"):
        models.create_model("deit_x", checkpoint="unused.safetensors")


@pytest.mark.parametrize("wrapper", [None, "model", "state_dict", "model_ema", "module."])
def test_pth_checkpoint_wrappers_are_unwrapped(tmp_path: Path, wrapper: str | None) -> None:
    state = tiny_state()
    payload: object = state
    if wrapper == "module.":
        payload = {f"module.{k}": v for k, v in state.items()}
    elif wrapper:
        payload = {wrapper: state, "epoch": 3}
    path = tmp_path / "ckpt.pth"
    torch.save(payload, path)
    model = models.create_model("deit_t", str(path), depth=2)
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    state = tiny_state()
    del state["head.weight"]
    state["extra.bias"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(UserError, match=r"missing keys: head\.weight; unexpected keys: extra\.bias"):
        models.create_model("deit_t", str(path), depth=2)


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    state = tiny_state()
    state["head.bias"] = torch.zeros(10)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(UserError, match=r"shape mismatch in head\.bias \(10,\) vs \(1000,\)"):
        models.create_model("deit_t", str(path), depth=2)


def test_unreadable_or_missing_checkpoint(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        models.create_model("deit_t", str(junk), depth=2)
    with pytest.raises(UserError, match="checkpoint not found"):
        models.create_model("deit_t", str(tmp_path / "none.safetensors"), depth=2)


def test_checkpoint_sha256_of_shared_weights(checkpoint_path: Path) -> None:
    if os.environ.get("IPBENCH_CHECKPOINT"):
        pytest.skip("IPBENCH_CHECKPOINT points at other weights")
    assert models.checkpoint_sha256(checkpoint_path) == SHARED_SHA256


def test_no_network_fails_fast_with_a_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=2.0: False)
    with pytest.raises(UserError) as err:
        models.create_model("deit_s", checkpoint=None)
    assert str(err.value) == ("no network and no cached weights for deit_small_patch16_224; "
                              "pass --checkpoint FILE or set IPBENCH_CHECKPOINT")
    assert os.environ["HF_HUB_OFFLINE"] == "1" and hf.HF_HUB_OFFLINE is True


def test_plain_model_reports_all_tokens_in_every_block(deit_tiny: torch.nn.Module) -> None:
    from ipbench.runs.plan import config

    info = config(deit_tiny, "none").fields()
    assert info["reducer"] == "none" and info["reducer_params"] == "{}" and info["training_free"]
    assert info["tokens_per_layer"] == " ".join(["197"] * 12) and info["final_tokens"] == 197


@pytest.mark.parametrize(("value", "strict"), [("1", True), ("true", True), ("yes", True), ("TRUE", True),
                                               ("on", True), ("0", False), ("", False), ("false", False)])
def test_ci_set_to_any_true_value_makes_missing_shared_files_fail(monkeypatch: pytest.MonkeyPatch, value: str,
                                                                  strict: bool) -> None:
    from conftest import in_ci

    monkeypatch.setenv("CI", value)
    assert in_ci() is strict


def test_the_isolation_restores_the_environment_and_torch_threads() -> None:
    """What every test runs inside (conftest's autouse fixture): ipbench's process-wide changes undone."""
    from conftest import isolated

    env, threads = dict(os.environ), torch.get_num_threads()
    with isolated():
        os.environ["HF_HUB_OFFLINE"] = "changed-by-a-test"
        os.environ["IPBENCH_SOMETHING"] = "1"
        torch.set_num_threads(1 if threads != 1 else 2)
    assert dict(os.environ) == env and torch.get_num_threads() == threads
