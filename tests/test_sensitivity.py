"""`ipbench sensitivity` and --img-size/--patch-size: one model rebuilt at other patch sizes and
resolutions on the same weights (timm's resampling), each variant swept against its own baseline."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from helpers import assert_user_error
from typer.testing import CliRunner

from ipbench.cli import app
from ipbench.models import create_model

runner = CliRunner()
ENV = {"IPBENCH_CHECKPOINT": None, "IPBENCH_DATA": None}


def test_a_variant_is_the_same_weights_resampled(checkpoint_path: Path) -> None:
    native = create_model("deit_t", str(checkpoint_path))
    same = create_model("deit_t", str(checkpoint_path), img_size=224, patch_size=16)
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(native(x), same(x))  # nothing to resample: the very same model
    coarse = create_model("deit_t", str(checkpoint_path), patch_size=32)
    assert coarse.patch_embed.grid_size == (7, 7) and coarse.pos_embed.shape == (1, 50, 192)
    assert torch.equal(coarse.blocks[3].mlp.fc1.weight, native.blocks[3].mlp.fc1.weight)
    small = create_model("deit_t", str(checkpoint_path), img_size=160)
    assert small.pretrained_cfg["input_size"] == (3, 160, 160) and small.pos_embed.shape == (1, 101, 192)


def test_sensitivity_sweeps_each_variant_against_its_own_baseline(tmp_path: Path, checkpoint_path: Path,
                                                                 data_path: Path) -> None:
    args = ["sensitivity", "--checkpoint", str(checkpoint_path), "--data", str(data_path), "--limit", "8",
            "--batch-size", "8", "--reducers", "tome,evit", "--patch-sizes", "16,32", "--img-sizes", "160,224",
            "--out", str(tmp_path)]
    result = runner.invoke(app, args, env=ENV)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "sensitivity.csv").open()))
    got = {(r["axis"], r["patch_size"], r["img_size"], r["reducer_spec"].split(":")[0]): r for r in rows}
    assert len(rows) == 12  # 4 variants (the native one on both axes) × baseline + 2 reducers
    assert got[("patch", "32", "224", "none")]["final_tokens"] == "50"
    assert got[("resolution", "16", "160", "none")]["final_tokens"] == "101"
    # 49 patches: ⌈0.7·49⌉ = 35, ⌈0.7·36⌉ = 26, ⌈0.7·27⌉ = 19 kept at blocks 3, 6, 9, plus class and fused token
    assert got[("patch", "32", "224", "evit")]["final_tokens"] == "21"
    native = got[("patch", "16", "224", "tome")]
    assert native["correct1"] == got[("resolution", "16", "224", "tome")]["correct1"]
    assert native["reducer_spec"].startswith("tome:r=11")  # keep 0.7 at 196 patches, as in any sweep
    assert got[("patch", "32", "224", "tome")]["reducer_spec"].startswith("tome:r=")
    assert float(got[("resolution", "16", "160", "evit")]["gmacs_ratio"]) > 1
    # a second run resumes every variant's sweep
    again = runner.invoke(app, args, env=ENV)
    assert again.exit_code == 0 and "row: " not in again.output
    assert len(list(csv.DictReader((tmp_path / "sensitivity.csv").open()))) == 12


def test_bad_sizes_are_one_line_errors(tmp_path: Path) -> None:
    base = ["sensitivity", "--weights", "random", "--data", "synthetic", "--out", str(tmp_path)]
    assert_user_error(runner.invoke(app, [*base, "--patch-sizes", "16,x"], env=ENV), "bad --patch-sizes value 'x'")
    assert_user_error(runner.invoke(app, [*base, "--patch-sizes", "200"], env=ENV), "leaves a 1x1 grid")
    assert_user_error(runner.invoke(app, [*base, "--img-size", "160"], env=ENV), "use --patch-sizes and --img-sizes")
