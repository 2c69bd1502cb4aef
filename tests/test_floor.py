"""The run floor: import rules, module sizes, a new reducer in one file, random weights, any timm
classifier in eval, output folders checked before anything is measured."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from click.testing import Result
from helpers import assert_user_error
from typer.testing import CliRunner

from ipbench.cli import app
from ipbench.errors import UserError
from ipbench.reducers import KEEP_RATE, REGISTRY, Param, Policy, apply_reducer, parse_spec, register
from ipbench.reducers.policy import keep_count

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
OFFLINE = ["--weights", "random", "--data", "synthetic"]


def invoke(args: list[str], env: dict[str, str | None] | None = None) -> Result:
    return runner.invoke(app, args, env={"IPBENCH_CHECKPOINT": None, "IPBENCH_DATA": None, "COLUMNS": "200",
                                         **(env or {})})


def rows_of(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))




# -- the house's rules ----------------------------------------------------------------------------

def test_import_rules_hold() -> None:
    exe = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(exe), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout and "BROKEN" not in out.stdout


def test_plots_and_results_leave_torch_unimported() -> None:
    code = ("import sys; import ipbench.plots, ipbench.results, ipbench.plots.recipes, ipbench.plots.tokens; "
            "print(sorted(m for m in ('torch', 'timm', 'fvcore', 'ipbench.reducers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_no_module_over_400_lines_and_the_sweep_under_300() -> None:
    sizes = {p.relative_to(REPO).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
             for p in (REPO / "ipbench").rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 400} == {}
    assert sizes["ipbench/runs/sweep.py"] < 300


def test_no_code_outside_the_reducers_tests_a_reducer_name() -> None:
    """Which parameter a sweep sets is the policy's declaration, not a name compared anywhere."""
    names = [n for n in REGISTRY if n != "none"]
    for path in (REPO / "ipbench").rglob("*.py"):
        if "reducers" in path.parts:
            continue
        text = path.read_text(encoding="utf-8")
        for name in names:
            for pattern in (f'== "{name}"', f'!= "{name}"', f'in ("{name}"', f'.name == "{name}"'):
                assert pattern not in text, f"{path.relative_to(REPO)} tests the name {name!r}"


# -- a new reducer is one file ----------------------------------------------------------------------

class DropLast(Policy):
    """A throw-away pruning reducer: blocks 3 and 7 keep the first ⌈ρ·(N−prefix)⌉ tokens by position."""

    name = "droplast"
    description = "test only: keep the first tokens by position"
    PARAMS = (Param("keep", "float01", 0.7, "keep rate"),)
    knob = KEEP_RATE

    def acts_at(self, layer: int) -> bool:
        return layer in (3, 7) and self.params["keep"] < 1.0

    def tokens_after(self, layer: int, n: int, n_prefix: int) -> int:
        return n_prefix + keep_count(self.params["keep"], n - n_prefix)

    def reduce(self, layer: int, x: torch.Tensor, ev: Any, st: Any) -> torch.Tensor:
        n = self.tokens_after(layer, x.shape[1], st.n_prefix)
        return st.keep(x, torch.arange(n, device=x.device).expand(x.shape[0], -1))


@pytest.fixture
def droplast() -> Any:
    register(DropLast)
    yield DropLast
    REGISTRY.pop("droplast")


def test_a_new_reducer_is_one_file(droplast: Any, tmp_path: Path) -> None:
    args = ["sweep", "--model", "deit_t", *OFFLINE, "--limit", "2", "--batch-size", "2", "--no-speed",
            "--reducers", "droplast", "--out", str(tmp_path / "keep")]
    result = invoke([*args, "--keep-rates", "0.7,0.5"])
    assert result.exit_code == 0, result.output
    rows = rows_of(tmp_path / "keep" / "sweep.csv")
    assert [(r["reducer"], r["keep_rate"], r["final_tokens"]) for r in rows] == [
        ("none", "", "197"), ("droplast", "0.7", str(1 + 97)), ("droplast", "0.5", str(1 + 49))]  # 196→138→97
    assert rows[1]["reducer_label"] == "droplast:keep=0.7" and rows[1]["reducer_line"] == "droplast"
    result = invoke([*args[:-2], "--out", str(tmp_path / "budget"), "--match-gmacs", "0.9"])
    assert result.exit_code == 0, result.output
    row = rows_of(tmp_path / "budget" / "sweep.csv")[1]
    assert row["reducer"] == "droplast" and abs(float(row["gmacs_analytic"]) - 0.9) <= 0.02 * 0.9


# -- models and weights -----------------------------------------------------------------------------

def test_flops_with_random_weights_needs_no_file(tmp_path: Path) -> None:
    result = invoke(["flops", "--model", "deit_s", *OFFLINE, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "4.608" in result.stdout  # DeiT-S, fused attention counted (METHODS.md)
    (row,) = rows_of(tmp_path / "flops.csv")
    assert row["weights"] == "random" and row["checkpoint"] == "random:deit_small_patch16_224"
    assert abs(float(row["gmacs"]) - 4.608) < 5e-4 and row["checkpoint_sha256"] == ""


def test_eval_runs_any_timm_classifier_and_says_when_accuracy_means_nothing(tmp_path: Path,
                                                                            small_folder: Path) -> None:
    result = invoke(["eval", "--model", "resnet18", *OFFLINE, "--limit", "8", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (row,) = rows_of(tmp_path / "eval.csv")
    assert row["model"] == "resnet18" and row["num_images"] == "8" and row["tokens_per_layer"] == ""
    labelled = invoke(["eval", "--model", "resnet18", "--weights", "random", "--data", str(small_folder),
                       "--workers", "0", "--out", str(tmp_path)])
    assert labelled.exit_code == 0, labelled.output
    assert "accuracy is meaningless: random weights" in labelled.stderr
    assert_user_error(invoke(["eval", "--model", "resnet18", *OFFLINE, "--reducer", "tome", "--out",
                              str(tmp_path)]), "ResNet is not a ViT family ipbench can reduce")


def test_precision_is_recorded_and_checked(tmp_path: Path) -> None:
    result = invoke(["eval", *OFFLINE, "--limit", "2", "--model-dtype", "bfloat16", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (row,) = rows_of(tmp_path / "eval.csv")
    assert (row["dtype"], row["amp_dtype"], row["model_dtype"]) == ("bfloat16", "float32", "bfloat16")
    assert_user_error(invoke(["eval", *OFFLINE, "--amp-dtype", "bfloat16", "--model-dtype", "bfloat16",
                              "--out", str(tmp_path)]), "use one of the two")
    assert_user_error(invoke(["eval", "--weights", "random", "--checkpoint", "x.safetensors", "--out",
                              str(tmp_path)]), "exclude each other")


def test_class_token_attention_needs_a_class_token() -> None:
    """Without a class token, a CLS-ranking reducer reads the attention each token receives
    (importance=auto -> received); asking for importance=cls there is a one-line error."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", class_token=False, global_pool="avg").eval()
    for spec in ("evit:importance=cls", "imagepiece:importance=cls", "mstm:importance=cls",
                 "imagepiece:importance=cls+tome"):
        with pytest.raises(UserError, match="ranks tokens by class-token attention .importance=cls., but this "
                                            "model has no class token; use importance=received"):
            apply_reducer(model, parse_spec(spec))
    with pytest.raises(UserError, match="rank tokens by cls and received attention"):
        apply_reducer(model, parse_spec("imagepiece:importance=received+evit:importance=cls"))
    for spec in ("tome:r=8", "evit", "imagepiece+tome"):  # ToMe matches on keys: no importance at all
        apply_reducer(model, parse_spec(spec))
        with torch.inference_mode():
            assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)
        assert model._ipb.importance == (None if spec == "tome:r=8" else "received")


# -- output folders -----------------------------------------------------------------------------------

COMMANDS = {
    "eval": ["eval", *OFFLINE], "sweep": ["sweep", *OFFLINE], "flops": ["flops", *OFFLINE],
    "speed": ["speed", *OFFLINE], "robustness": ["robustness", *OFFLINE],
    "similarity": ["similarity", *OFFLINE], "importance": ["importance", *OFFLINE],
    "attentiveness": ["attentiveness", *OFFLINE], "coherence": ["coherence", *OFFLINE],
    "reproduce": ["reproduce", str(REPO / "recipes" / "table1.toml")],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_out_that_cannot_be_written_is_one_line_before_anything_runs(command: str, tmp_path: Path) -> None:
    afile = tmp_path / "a_file"
    afile.write_text("x")
    assert_user_error(invoke([*COMMANDS[command], "--out", str(afile)]), "is a file, not a folder")
    assert_user_error(invoke([*COMMANDS[command], "--out", str(afile / "sub")]), "cannot write there")
    assert afile.read_text() == "x"


def test_plot_report_and_visualize_check_their_folders(tmp_path: Path) -> None:
    afile = tmp_path / "a_file"
    afile.write_text("x")
    assert_user_error(invoke(["plot", str(afile)]), "no such folder")
    assert_user_error(invoke(["plot", str(tmp_path), "--out", str(afile)]), "is a file")
    assert_user_error(invoke(["report", str(afile)]), "no such folder")
    image = REPO / "results" / "reference" / "tokens_imagepiece.png"
    assert_user_error(invoke(["visualize", "--image", str(image), "--reducer", "tome", "--weights", "random",
                              "--out", str(afile / "sub" / "x.png")]), "cannot write there")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_is_one_line(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_user_error(invoke(["eval", *OFFLINE, "--out", str(ro)]), "cannot write there")
    finally:
        ro.chmod(0o755)


def test_a_read_only_filesystem_is_one_line() -> None:
    target = Path("/sys/ipbench-test")  # sysfs refuses new folders, root or not
    try:
        target.mkdir()
    except OSError:
        pass
    else:
        target.rmdir()
        pytest.skip("/sys is writable on this machine")
    assert_user_error(invoke(["eval", *OFFLINE, "--out", str(target)]), "cannot write there")


def test_reference_results_are_never_overwritten(tmp_path: Path) -> None:
    ref = REPO / "results" / "reference" / "deit_tiny_nips17"
    before = {p: p.stat().st_mtime_ns for p in ref.rglob("*") if p.is_file()}
    assert_user_error(invoke(["eval", *OFFLINE, "--out", str(ref)]), "committed reference results")
    assert_user_error(invoke(["plot", str(ref)]), "committed reference results")
    assert {p: p.stat().st_mtime_ns for p in ref.rglob("*") if p.is_file()} == before


def test_a_sweep_of_other_images_is_a_new_measurement(checkpoint_path: Path, data_path: Path,
                                                       tmp_path: Path) -> None:
    """--limit 4 then --limit 8 into one folder: two different runs, both measured (the key has the images)."""
    base = ["sweep", "--checkpoint", str(checkpoint_path), "--data", str(data_path), "--reducers", "evit",
            "--keep-rates", "0.7", "--no-speed", "--batch-size", "4", "--workers", "0", "--out", str(tmp_path)]
    assert invoke([*base, "--limit", "4"]).exit_code == 0
    second = invoke([*base, "--limit", "8"])
    assert second.exit_code == 0 and "2 configuration(s) measured" in second.stdout, second.output
    rows = rows_of(tmp_path / "sweep.csv")
    assert [r["num_images"] for r in rows] == ["4", "4", "8", "8"] and len({r["config_key"] for r in rows}) == 4
