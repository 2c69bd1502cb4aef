"""Pinned reference numbers: every reducer's exact counts, token lists and GMACs, and every analysis's
values, on the shared weights and images, equal to the recorded ones (tests/reference/*.json).

How the references were produced: `python benchmarks/record_reference.py --record` ran each case of
tests/reference_cases.py through the command line; the JSON says with which ipbench, torch, timm
and git commit. The first recording was made on the code before the run-floor redesign, so these
tests are also the proof that the redesign changed no number. The full-data case equals the README's
accuracy tables (checked below against the README text itself), whose ToMe and EViT rows equal the
official code on the same images. (The case `sweep200`, a keep-rate sweep on 200 images, is the
redesign's behaviour check and runs from the script only: its configurations' numbers are pinned
here through the other cases, and its keep-rate mapping by tests/test_sweep.py.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from reference_cases import CASES, REFERENCE_DIR, differences, run_case
from typer.testing import CliRunner

from ipbench.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _invoke(argv: list[str]) -> int:
    result = runner.invoke(app, argv, env={"IPBENCH_CHECKPOINT": None, "IPBENCH_DATA": None})
    assert result.exit_code == 0, result.output
    return result.exit_code


def expected(name: str) -> dict[str, list[dict[str, str]]]:
    return json.loads((REFERENCE_DIR / f"{name}.json").read_text(encoding="utf-8"))["rows"]


def check(name: str, checkpoint: Path, data: Path, tmp_path: Path) -> dict[str, list[dict[str, str]]]:
    got = run_case(CASES[name], _invoke, checkpoint, data, tmp_path)
    diff = differences(expected(name), got)
    assert not diff, "\n".join(diff[:30])
    return got


def test_every_reducer_and_combination_on_100_shared_images(checkpoint_path: Path, data_path: Path,
                                                           tmp_path: Path) -> None:
    check("subset100", checkpoint_path, data_path, tmp_path)


def test_every_analysis_on_32_shared_images(checkpoint_path: Path, data_path: Path, tmp_path: Path) -> None:
    got = check("analyses32", checkpoint_path, data_path, tmp_path)
    # two analyses, one quantity: coherence's merged-pair similarity of plain ImagePiece (λ = 0) is the
    # similarity command's, in the first re-tokenize block and over all blocks
    sim = {(r["layer"], r["features"]): r for r in got["similarity"] if r["reducer_spec"].startswith("imagepiece")}
    first = str(min(int(layer) for layer, _ in sim if layer != "all"))
    (plain,) = [r for r in got["coherence"] if r["retok"] == "merge" and float(r["locality"]) == 0]
    assert plain["sim_metric_first"] == sim[(first, "metric")]["mean_cos"]
    assert plain["sim_hidden_first"] == sim[(first, "hidden")]["mean_cos"]
    assert plain["sim_metric"] == sim[("all", "metric")]["mean_cos"]
    assert plain["n_pairs"] == sim[("all", "metric")]["n_pairs"]


@pytest.mark.slow
def test_the_readme_table_on_all_1000_shared_images(checkpoint_path: Path, data_path: Path, tmp_path: Path) -> None:
    check("full1000", checkpoint_path, data_path, tmp_path)
    # which of its differences are real (the README's comparison table): REPORT.md, from the records
    assert runner.invoke(app, ["report", str(tmp_path)]).exit_code == 0
    text = (tmp_path / "REPORT.md").read_text(encoding="utf-8")
    cells = [[c.strip() for c in line.split("|")[1:-1]]
             for line in text.split("### Which differences are real", 1)[1].splitlines() if line.startswith("| ")]
    pairs = {(c[0], c[1]): c[-2:] for c in cells}
    assert pairs[("tome:r=8", "tome:r=11")] == ["12 / 14", "p=0.845 (not significant)"]
    assert pairs[("evit:keep=0.7", "imagepiece:keep=0.8")] == ["21 / 53", "p=0.000256"]
    assert pairs[("none", "tome:r=8")] == ["22 / 6", "p=0.00372"]


# The README's accuracy table as exact counts (correct@1, correct@5 of 1000), written out here once
# more: the recorded reference must say the same, and so must the README.
README_COUNTS = {
    "none": (867, 976), "tome:r=4": (859, 975), "tome:r=8": (851, 973), "tome:r=11": (853, 975),
    "tome:r=13": (830, 962), "tome:r=16": (813, 955), "evit:keep=0.9": (857, 973), "evit:keep=0.8": (838, 968),
    "evit:keep=0.7": (799, 950), "evit:keep=0.6": (746, 926), "evit:keep=0.5": (677, 889),
    "evit:keep=0.7,fuse=false": (796, 949), "evit:keep=0.5,fuse=false": (673, 885),
    "evit:keep=0.7,fused_size=count": (740, 911), "topk:keep=0.7": (796, 949),
    "imagepiece:keep=0.9": (851, 975), "imagepiece:keep=0.8": (831, 967), "imagepiece:keep=0.7": (791, 952),
    "imagepiece:keep=0.6": (725, 930), "imagepiece:keep=0.5": (645, 852),
}


def test_the_recorded_full_data_counts_are_the_documented_ones() -> None:
    from ipbench.reducers import parse_spec

    rows = {r["reducer_spec"]: (int(r["correct1"]), int(r["correct5"])) for r in expected("full1000")["sweep"]}
    assert rows == {parse_spec(spec).spec: counts for spec, counts in README_COUNTS.items()}


def test_the_readme_tables_show_the_recorded_counts() -> None:
    """Every row of the README's two accuracy tables is the recorded count over 1000 images, to one decimal."""
    results, official = {}, {}
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    # the reducers added later have their own table (pinned on 64 images by tests/test_more_reducers.py)
    for line in readme.split("### More reducers, against their official code")[0].splitlines():
        m = re.match(r"\| (none \(plain timm\)|[a-z]+:[^ |]+) \|.*\| ([\d.]+) \| ([\d.]+) \|$", line)
        if m:
            results["none" if m.group(1).startswith("none") else m.group(1)] = (float(m.group(2)), float(m.group(3)))
        m = re.match(r"\| (none|`[^`]+`)(?: = `([^`]+)`)? \| ([\d.]+) / ([\d.]+) \|", line)
        if m:
            for spec in filter(None, (m.group(1).strip("`"), m.group(2))):
                official[spec] = (float(m.group(3)), float(m.group(4)))
    assert len(results) == 16 and len(official) == 10
    for spec, (top1, top5) in {**results, **official}.items():
        c1, c5 = README_COUNTS[spec]
        assert (top1, top5) == (round(c1 / 10, 1), round(c5 / 10, 1)), spec
