"""Every bad input is one line `error: ...` with exit code 2 (typer's own range checks included),
and nothing is silently wrong: head-less models, labels outside the model's classes, 16-bit
images, non-ViT models, analyses that do not apply, an empty plot."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_user_error
from PIL import Image
from typer.testing import CliRunner

from ipbench.cli import app
from ipbench.data import SAMPLE_FOLDER, open_source, to_rgb

runner = CliRunner()
ENV = {"IPBENCH_CHECKPOINT": None, "IPBENCH_DATA": None, "COLUMNS": "200"}


def invoke(args: list[str]):
    return runner.invoke(app, args, env=ENV)


@pytest.mark.parametrize(("args", "names"), [
    (["eval", "--limit", "0"], "'--limit'"),
    (["eval", "--batch-size", "0"], "'--batch-size'"),
    (["eval", "--threads", "0"], "'--threads'"),
    (["eval", "--device", "tpu"], "'--device'"),
    (["eval", "--workers", "-1"], "'--workers'"),
    (["speed", "--repeats", "0"], "'--repeats'"),
    (["sweep", "--speed-group", "-1"], "'--speed-group'"),
    (["eval", "--bogus"], "No such option: --bogus"),
    (["evl"], "No such command 'evl'"),
    (["eval", "--limit"], "'--limit' requires an argument"),
])
def test_typers_own_checks_are_one_line_errors(args: list[str], names: str) -> None:
    result = invoke(args)
    assert_user_error(result, names)
    assert "--help" in result.stderr  # where to look


def test_a_bare_ipbench_still_prints_the_help() -> None:
    result = invoke([])
    assert result.exit_code == 2 and "Usage: ipbench" in result.output and "eval" in result.output


@pytest.mark.parametrize("command", [["robustness"], ["similarity"], ["importance"], ["attentiveness"],
                                     ["coherence"], ["sweep", "--no-speed"]])
def test_non_vit_models_are_one_line_errors(command: list[str], tmp_path: Path) -> None:
    result = invoke([*command, "--model", "resnet18", "--weights", "random", "--limit", "2",
                     "--out", str(tmp_path)])
    assert_user_error(result, "resnet18 is a ResNet, not a ViT family ipbench reduces (timm VisionTransformer, "
                              "Eva, Beit)")
    assert not list(tmp_path.glob("*.csv")) or all(len(p.read_text().splitlines()) <= 1 for p in tmp_path.glob("*.csv"))


def test_visualize_on_a_non_vit_is_a_one_line_error(tmp_path: Path) -> None:
    image = next(SAMPLE_FOLDER.glob("*/*.jpg"))
    result = invoke(["visualize", "--model", "resnet18", "--weights", "random", "--reducer", "tome",
                     "--image", str(image), "--out", str(tmp_path / "x.png")])
    assert_user_error(result, "ResNet is not a ViT family ipbench can reduce; supported: ")


def test_a_model_without_a_head_has_no_accuracy_and_says_so(tmp_path: Path) -> None:
    # timm's DINO ViT-S/16 has num_classes=0 (features only): 0 % top-1 would be a silent lie
    result = invoke(["eval", "--model", "vit_small_patch16_224.dino", "--weights", "random", "--limit", "4",
                     "--out", str(tmp_path)])
    assert_user_error(result, "has no classifier head (num_classes=0)")
    assert not (tmp_path / "eval.csv").exists()
    # without labels there is nothing to be wrong about: GMACs and speed still work
    result = invoke(["flops", "--model", "vit_small_patch16_224.dino", "--weights", "random", "--data", "synthetic",
                     "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output


def test_a_label_outside_the_models_classes_is_an_error(tmp_path: Path) -> None:
    image = next(SAMPLE_FOLDER.glob("*/*.jpg"))
    shutil.copy(image, tmp_path / "a.jpg")
    with (tmp_path / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["file", "label"], ["a.jpg", "1000"]])
    result = invoke(["eval", "--weights", "random", "--data", str(tmp_path / "labels.csv"), "--out", str(tmp_path)])
    assert_user_error(result, "has class index 1000, but deit_tiny_patch16_224 has 1000 classes (0-999)")


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (64, 1))
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
        rgb = np.asarray(to_rgb(im))
        clipped = np.asarray(im.convert("RGB"))  # what timm's loader gives: white from 255/65535 on
    expected = np.rint(ramp / 257.0)
    assert rgb.shape == (64, 256, 3) and np.abs(rgb[..., 0] - expected).max() <= 1
    assert (rgb[..., 0] == rgb[..., 2]).all()
    assert (clipped > 250).mean() > 0.99  # the bug this fixes


@pytest.mark.parametrize("mode", ["L", "P", "PA", "CMYK", "RGBA", "LA", "1"])
def test_other_modes_decode_as_timms_loader_does(mode: str) -> None:
    with Image.open(next(SAMPLE_FOLDER.glob("*/*.jpg"))) as im:
        src = im.convert(mode) if mode != "PA" else im.convert("P").convert("PA")
    if mode == "P":
        src.info["transparency"] = 0
    assert np.array_equal(np.asarray(to_rgb(src)), np.asarray(src.convert("RGB")))


def test_a_sixteen_bit_png_in_a_data_folder_is_decoded_like_its_8_bit_twin(tmp_path: Path) -> None:
    wnid = SAMPLE_FOLDER.glob("n*/").__next__().name
    with Image.open(next((SAMPLE_FOLDER / wnid).glob("*.jpg"))) as im:
        gray8 = np.asarray(im.convert("L"))
    (tmp_path / "a" / wnid).mkdir(parents=True)
    (tmp_path / "b" / wnid).mkdir(parents=True)
    Image.fromarray(gray8).save(tmp_path / "a" / wnid / "x.png")
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "b" / wnid / "x.png")
    a = next(open_source(str(tmp_path / "a"), {"model": "deit_tiny_patch16_224"}).batches(1))[0]
    b = next(open_source(str(tmp_path / "b"), {"model": "deit_tiny_patch16_224"}).batches(1))[0]
    assert torch.equal(a, b)


def test_coherence_skips_a_reducer_it_does_not_apply_to_with_a_note(tmp_path: Path, checkpoint_path: Path) -> None:
    result = invoke(["coherence", "-r", "tome,imagepiece", "--localities", "0", "--no-prune", "--limit", "4",
                     "--checkpoint", str(checkpoint_path), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "note: tome" in result.output and "no imagepiece part" in result.output
    rows = list(csv.DictReader((tmp_path / "coherence.csv").open()))
    assert [r["reducer"] for r in rows] == ["imagepiece"]
    result = invoke(["coherence", "-r", "tome,evit", "--out", str(tmp_path)])
    assert_user_error(result, "no imagepiece part in 'tome', 'evit'")


def test_the_sample_is_the_default_data_and_gives_real_accuracy(tmp_path: Path, checkpoint_path: Path) -> None:
    rows = list(csv.DictReader((SAMPLE_FOLDER / "ATTRIBUTION.csv").open()))
    assert len(rows) == 100 and {r["license"] for r in rows} == {"https://creativecommons.org/licenses/by/2.0/"}
    assert sorted(r["file"] for r in rows) == sorted(f"{p.parent.name}/{p.name}" for p in SAMPLE_FOLDER.glob("*/*.jpg"))
    result = invoke(["eval", "--checkpoint", str(checkpoint_path), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (row,) = csv.DictReader((tmp_path / "eval.csv").open())
    # the README's reference: plain DeiT-Tiny on the sample, 88/100 top-1 and 98/100 top-5
    assert (row["num_images"], row["correct1"], row["correct5"]) == ("100", "88", "98")
    assert row["data"] == str(SAMPLE_FOLDER)


def test_a_cut_last_row_is_measured_again_with_one_warning_line(tmp_path: Path) -> None:
    args = ["sweep", "--weights", "random", "--data", "synthetic", "--limit", "2", "--no-speed",
            "--reducers", "tome", "--keep-rates", "0.7", "--out", str(tmp_path)]
    assert invoke(args).exit_code == 0
    path = tmp_path / "sweep.csv"
    text = path.read_text()
    whole = text.splitlines(keepends=True)
    assert len(whole) == 3  # header, baseline, tome
    path.write_text("".join(whole[:2]) + whole[2][: len(whole[2]) // 2])  # a crash in the middle of the last row
    result = invoke(args)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "sweep.csv.damaged" in warnings[0] and "line 3" in warnings[0], result.stderr
    rows = list(csv.DictReader(path.open()))
    assert [r["reducer"] for r in rows] == ["none", "tome"]  # re-measured once, nothing glued or doubled
    assert (tmp_path / "sweep.csv.damaged").read_text() == whole[2][: len(whole[2]) // 2] + "\n"
    assert "1 configuration(s) measured, 1 already in the CSV" in " ".join(result.output.split())


def test_unsteady_timings_are_flagged_and_the_wait_is_announced() -> None:
    from ipbench.measure.throughput import SpeedProtocol, SpeedResult
    from ipbench.runs.cost import SPREAD_WARNING, speed_estimate, spread_note

    def result(name: str, low: float, mid: float, high: float) -> SpeedResult:
        return SpeedResult(name, 10.0, 9.0, 11.0, mid, low, high, "none", (1.0,), (mid,), 32, "cpu", "float32", 2,
                           False)

    steady = {"none": result("none", 1, 1, 1), "tome": result("tome", 1.5, 1.6, 1.7)}
    assert spread_note(steady) is None
    busy = {**steady, "evit": result("evit", 0.7, 1.2, 1.2 * (1 + SPREAD_WARNING) + 0.2)}
    note = spread_note(busy, {"evit": "evit:keep=0.7"})
    assert note is not None and "1 speed-up(s)" in note and "evit:keep=0.7" in note and "idle machine" in note
    # 1 baseline + 8 reducers in groups of 4: 2 groups, 10 timed models, 6 rounds each of >= 2 s
    assert speed_estimate(9, SpeedProtocol(repeats=5, min_seconds=2.0, group=4)) == 10 * 6 * 2.0


@pytest.mark.parametrize("command", [["flops", "--images", "2"], ["speed", "--batch-size", "2", "--repeats", "1",
                                                                   "--min-seconds", "0", "--warmup", "1"]])
def test_every_command_that_decodes_images_has_the_skip_bad_it_suggests(command: list[str], tmp_path: Path) -> None:
    wnid = next(SAMPLE_FOLDER.glob("n*/")).name
    folder = tmp_path / "data" / wnid
    folder.mkdir(parents=True)
    (folder / "a.jpg").write_bytes(b"not an image")
    for f in sorted(SAMPLE_FOLDER.glob(f"{wnid}/*.jpg")):
        shutil.copy(f, folder / f.name)
    args = [*command, "--weights", "random", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    assert_user_error(invoke(args), "use --skip-bad to skip unreadable images")
    assert invoke([*args, "--skip-bad"]).exit_code == 0
