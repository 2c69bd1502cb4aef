"""Recipes: every file loads, one runs end to end on a few real images, bad recipes fail in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from ipbench.cli import app
from ipbench.cli.reproduce import build_argv
from ipbench.plots.recipes import Column, Row, load_recipe, measured_value
from ipbench.reducers import parse_spec


def canon(spec: str) -> str:
    return parse_spec(spec).spec

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (REPO / "recipes").glob("*.toml") if not p.stem.startswith("finetune_"))
FINETUNE_RECIPES = sorted((REPO / "recipes").glob("finetune_*.toml"))
runner = CliRunner()
TINY_TIMING = ["--set", "repeats=1", "--set", "min_seconds=0", "--set", "warmup=1", "--set", "batch_size=8"]


def test_there_is_a_recipe_per_paper_table_and_figure() -> None:
    assert {p.stem for p in RECIPES} == {f"table{i}" for i in range(1, 10)} | {"fig3"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_builds_its_commands(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.title and recipe.steps and recipe.compares
    for cmp in recipe.compares:
        assert all(len(r.paper) == len(cmp.columns) for r in cmp.rows)
        assert any(p is not None for r in cmp.rows for p in r.paper)
    argvs = build_argv(recipe, {"model": "deit_t", "limit": 8, "out": "x"}, {})
    for argv in argvs:
        assert argv[0] == recipe.steps[0].command and "--limit" in argv and "--out" in argv


def _invoke(args: list[str], env: dict | None = None):
    return runner.invoke(app, args, env=env or {})


def test_recipe_runs_end_to_end_on_8_images(tmp_path: Path, checkpoint_path: Path, data_path: Path,
                                            clean_env) -> None:
    out = tmp_path / "t1"
    r = _invoke(["reproduce", str(REPO / "recipes" / "table1.toml"), "--checkpoint", str(checkpoint_path),
                 "--data", str(data_path), "--limit", "8", "--out", str(out), *TINY_TIMING], clean_env)
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "ipbench sweep --reducers evit,imagepiece --keep-rates 0.7" in text
    assert "72.13" in text and "9450" in text  # paper numbers printed...
    md = (out / "table1.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in md.splitlines() if line.startswith("| ") and "[deit_" in line}
    # ...beside measured ones: the DeiT-Ti rows are measured, DeiT-S rows are not (another model)
    assert rows["EViT [deit_t]"][0] == "71.70" and rows["EViT [deit_t]"][1] != "—"
    assert rows["ImagePiece [deit_t]"][-1] == "imagepiece:keep=0.7" and rows["ImagePiece [deit_t]"][-2] == "47"
    assert rows["DeiT-Ti [deit_t]"][-2] == "197" and rows["DeiT-S [deit_s]"][1] == "—"
    assert rows["DynamicViT [deit_t]"][-1] == "(not in ipbench)"
    assert (out / "sweep.csv").exists() and (out / "REPORT.md").exists()
    assert (out / "plots" / "sweep_top1_vs_gmacs.png").stat().st_size > 5000
    # comparing again without running reads the same CSV
    again = _invoke(["reproduce", str(REPO / "recipes" / "table1.toml"), "--out", str(out), "--compare-only",
                     "--no-plot"], clean_env)
    assert again.exit_code == 0 and (out / "table1.md").read_text().split("## ")[1:] == md.split("## ")[1:]


def test_analysis_recipe_runs_end_to_end(tmp_path: Path, checkpoint_path: Path, data_path: Path,
                                         clean_env) -> None:
    """Table 7 (importance): the paper's DeiT-Ti row gets the measured shares, in percent."""
    out = tmp_path / "t7"
    r = _invoke(["reproduce", str(REPO / "recipes" / "table7.toml"), "--checkpoint", str(checkpoint_path),
                 "--data", str(data_path), "--limit", "8", "--out", str(out), "--no-plot"], clean_env)
    assert r.exit_code == 0, r.output
    md = (out / "table7.md").read_text()
    ti = next(ln for ln in md.splitlines() if ln.startswith("| ToMe r=13 [deit_t]"))
    cells = [c.strip() for c in ti.split("|")[2:-1]]
    assert cells[0] == "65.16" and 0 < float(cells[1]) <= 100 and cells[-1] == "tome:r=13"
    assert 25 < float(cells[-3]) < 35  # random share for top 30 %
    s_row = next(ln for ln in md.splitlines() if ln.startswith("| ToMe r=13 [deit_s]"))
    assert "(not run: another model)" in s_row


BAD = {
    "syntax": ("title = 'x'\nsteps = [", "not valid TOML"),
    "no_steps": ("title = 'x'\n", "missing 'steps'"),
    "empty_steps": ("title = 'x'\nsteps = []\n", "'steps' is empty"),
    "unknown_key": ("title = 'x'\ncolour = 1\n[[steps]]\ncommand = 'sweep'\n", "unknown key(s) colour"),
    "command": ("title = 'x'\n[[steps]]\ncommand = 'robustnes'\n", "this ipbench has no command 'robustnes'"),
    "option": ("title = 'x'\n[[steps]]\ncommand = 'sweep'\nargs = { keep_rate = '0.7' }\n",
               "'sweep' has no option --keep-rate"),
    "paper": ("title = 'x'\n[[steps]]\ncommand = 'sweep'\n[compare]\ncsv = 'sweep.csv'\n"
              "columns = [{ name = 'a', value = 'top1' }]\n[[compare.rows]]\nlabel = 'r'\npaper = [1, 2]\n",
              "2 paper numbers for 1 columns"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_recipe_is_a_one_line_error(name: str, tmp_path: Path) -> None:
    text, message = BAD[name]
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    r = _invoke(["reproduce", str(path), "--dry-run"])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr


def test_missing_recipe_file_and_bad_set(tmp_path: Path) -> None:
    r = _invoke(["reproduce", str(tmp_path / "nope.toml")])
    assert r.exit_code == 2 and "no such recipe file" in r.stderr
    r = _invoke(["reproduce", str(REPO / "recipes" / "table1.toml"), "--set", "repeats", "--dry-run"])
    assert r.exit_code == 2 and "expected KEY=VALUE" in r.stderr
    r = _invoke(["reproduce", str(REPO / "recipes" / "table1.toml"), "--set", "colour=red", "--dry-run"])
    assert r.exit_code == 2 and "--set colour: no step" in r.stderr


def test_dry_run_prints_the_commands_with_overrides() -> None:
    r = _invoke(["reproduce", str(REPO / "recipes" / "table2.toml"), "--model", "deit_t", "--limit", "8",
                 "--set", "speed=false", "--dry-run"])
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith("ipbench sweep"))
    assert "--reducers tome:r=13 --reducers imagepiece:keep=0.7,discard_layers= --reducers" in line
    assert "--model deit_t" in line and "--limit 8" in line and "--no-speed" in line


def test_measured_value_conditions() -> None:
    import pandas as pd

    df = pd.DataFrame({
        "reducer_spec": ["tome:r=13,prop_attn=true"] * 4 + ["evit:keep=0.7,fuse=true,layers=3,6,9,fused_size=one"],
        "layer": [0, 0, 11, 11, 3], "top_p": [0.3, 0.7, 0.3, 0.7, 0.3], "share": [0.65, 0.92, 0.5, 0.8, 0.4],
        "speedup_median": [1.0, 1.0, 1.0, 1.0, 2.0],
    })
    tome = Row(label="t", paper=[None], reducer="tome:r=13")
    first30 = Column(name="a", value="share", where={"top_p": 30, "layer": "first"}, percent=True)
    assert measured_value(df, "reducer_spec", tome, first30, {}, canon) == pytest.approx(65.0)
    last70 = Column(name="a", value="share", where={"top_p": 0.7, "layer": "last"})
    assert measured_value(df, "reducer_spec", tome, last70, {}, canon) == pytest.approx(0.8)
    evit = Row(label="e", paper=[None], reducer="evit:keep=0.7", nearest={"speedup_median": 2.5})
    assert measured_value(df, "reducer_spec", evit, Column(name="a", value="share"), {}, canon) == pytest.approx(0.4)
    absent = Row(label="x", paper=[None], reducer="imagepiece")
    assert measured_value(df, "reducer_spec", absent, first30, {}, canon) is None


@pytest.mark.parametrize("path", FINETUNE_RECIPES, ids=lambda p: p.stem)
def test_every_finetune_recipe_sets_only_finetune_options(path: Path) -> None:
    """recipes/finetune_*.toml feed `ipbench finetune --config`: every key is one of its options, and
    `reproduce` points there instead of failing on an unknown key."""
    import typer.main

    from ipbench.cli.train import _read_config

    command = typer.main.get_command(app).commands["finetune"]  # type: ignore[attr-defined]
    options = {p.name for p in command.params} - {"config"}
    table = _read_config(path)
    assert table and set(table) <= options, set(table) - options
    parse_spec(table["reducer"])
    result = runner.invoke(app, ["reproduce", str(path)])
    assert result.exit_code == 2 and "is a fine-tune recipe" in result.stderr


def test_there_are_paper_scale_and_cpu_finetune_recipes() -> None:
    assert {p.stem for p in FINETUNE_RECIPES} >= {"finetune_deit_s_imagepiece", "finetune_cpu_deit_t_tome"}
