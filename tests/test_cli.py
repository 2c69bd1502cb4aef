"""The command line: help texts, one-line errors with exit code 2, interrupts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from click.testing import Result
from helpers import assert_user_error
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ipbench.cli import app

runner = CliRunner()


def invoke(args: list[str], env: dict[str, str | None]) -> Result:
    return runner.invoke(app, args, env=env)




def test_help_describes_every_option() -> None:
    root = invoke(["--help"], {})
    assert root.exit_code == 0 and "eval" in root.output and "models" in root.output
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        assert command.help, name
        options = [p for p in command.params if p.name != "help"]
        assert options, name
        for option in options:
            assert option.help and len(option.help) > 10, f"{name} {option.opts}"
        result = invoke([name, "--help"], {"COLUMNS": "200"})
        assert result.exit_code == 0
        for option in options:
            assert option.opts[0] in result.output


def test_python_dash_m_runs_the_cli() -> None:
    out = subprocess.run([sys.executable, "-m", "ipbench", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Usage: ipbench" in out.stdout


def test_help_does_not_import_torch_timm_or_pandas() -> None:
    code = ("import sys; from ipbench.cli import app; "
            "print(sorted(m for m in ('torch', 'timm', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_models_lists_the_aliases() -> None:
    result = invoke(["models"], {})
    assert result.exit_code == 0
    for alias, name in [("deit_t", "deit_tiny_patch16_224"), ("deit_s", "deit_small_patch16_224"),
                        ("deit_b", "deit_base_patch16_224")]:
        assert re.search(rf"{alias}\s.*{name}", result.output)


def eval_args(checkpoint: Path, data: str, tmp_path: Path, *extra: str) -> list[str]:
    return ["eval", "--checkpoint", str(checkpoint), "--data", data, "--out", str(tmp_path / "out"),
            "--workers", "0", *extra]


def test_missing_data_path(checkpoint_path: Path, tmp_path: Path, clean_env: dict) -> None:
    result = invoke(eval_args(checkpoint_path, str(tmp_path / "nope"), tmp_path), clean_env)
    assert_user_error(result, f"data path not found: {tmp_path / 'nope'}")


def test_empty_folder(checkpoint_path: Path, tmp_path: Path, clean_env: dict) -> None:
    (tmp_path / "empty").mkdir()
    result = invoke(eval_args(checkpoint_path, str(tmp_path / "empty"), tmp_path), clean_env)
    assert_user_error(result, f"empty data folder {tmp_path / 'empty'}")


def test_unknown_wnid_folder(checkpoint_path: Path, small_folder: Path, tmp_path: Path, clean_env: dict) -> None:
    (small_folder / "not_a_wnid").mkdir()
    result = invoke(eval_args(checkpoint_path, str(small_folder), tmp_path), clean_env)
    assert_user_error(result, f"unknown wnid folder {small_folder / 'not_a_wnid'}")


def test_unreadable_image_then_skip_bad(checkpoint_path: Path, small_folder: Path, tmp_path: Path,
                                        clean_env: dict) -> None:
    bad = small_folder / "n01443537" / "zz_truncated.jpg"
    bad.write_bytes((small_folder / "n04522168").glob("*.jpg").__next__().read_bytes()[:300])
    result = invoke(eval_args(checkpoint_path, str(small_folder), tmp_path), clean_env)
    assert_user_error(result, f"cannot read image {bad}")
    assert not (tmp_path / "out" / "eval.csv").exists()

    result = invoke(eval_args(checkpoint_path, str(small_folder), tmp_path, "--skip-bad"), clean_env)
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable image(s)" in result.stderr
    row = (tmp_path / "out" / "eval.csv").read_text().splitlines()[1]
    assert ",5,1,none," in row  # 5 images evaluated, 1 skipped


def test_checkpoint_with_wrong_keys(small_folder: Path, checkpoint_path: Path, tmp_path: Path,
                                    clean_env: dict) -> None:
    state = load_file(str(checkpoint_path))
    state["head.extra"] = torch.zeros(1)
    del state["cls_token"]
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    result = invoke(eval_args(bad, str(small_folder), tmp_path), clean_env)
    assert_user_error(result, "does not match the model: missing keys: cls_token; unexpected keys: head.extra")


def test_unknown_model(checkpoint_path: Path, tmp_path: Path, clean_env: dict) -> None:
    result = invoke(eval_args(checkpoint_path, "synthetic", tmp_path, "--model", "vit_nope"), clean_env)
    assert_user_error(result, "unknown model 'vit_nope'")


def test_unknown_reducer(checkpoint_path: Path, tmp_path: Path, clean_env: dict) -> None:
    result = invoke(eval_args(checkpoint_path, "synthetic", tmp_path, "--reducer", "bogus"), clean_env)
    assert_user_error(result, "bogus")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine(checkpoint_path: Path, tmp_path: Path, clean_env: dict) -> None:
    result = invoke(eval_args(checkpoint_path, "synthetic", tmp_path, "--device", "cuda"), clean_env)
    assert_user_error(result, "--device cuda: CUDA is not available")


def test_checkpoint_and_data_from_environment(checkpoint_path: Path, small_folder: Path, tmp_path: Path) -> None:
    env = {"IPBENCH_CHECKPOINT": str(checkpoint_path), "IPBENCH_DATA": str(small_folder)}
    result = invoke(["eval", "--out", str(tmp_path), "--workers", "0"], env)
    assert result.exit_code == 0, result.output
    row = (tmp_path / "eval.csv").read_text().splitlines()[1]
    assert str(small_folder) in row and "feb465dcfedcc2d9" in row


def test_keyboard_interrupt_exits_130(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, clean_env: dict) -> None:
    from ipbench import models

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "create_model", interrupted)
    result = invoke(["eval", "--out", str(tmp_path)], clean_env)
    assert result.exit_code == 130
    assert "interrupted; rows written so far are kept" in result.stderr
