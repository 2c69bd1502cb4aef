"""`ipbench flops` and `ipbench speed`: their rows, the agreement of the two GMACs counts, bad input.

No test asserts a timing: `speed` runs one tiny round only to check that the columns fill.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ipbench import results
from ipbench.cli import app

runner = CliRunner()


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_flops_rows_on_a_real_image(checkpoint_path: Path, data_path: Path, tmp_path: Path, clean_env: dict) -> None:
    result = runner.invoke(app, ["flops", "--model", "deit_t", "--checkpoint", str(checkpoint_path), "--data",
                                 str(data_path), "--reducers", "tome:r=13,evit:keep=0.7,fuse=false",
                                 "--out", str(tmp_path)], env=clean_env)
    assert result.exit_code == 0, result.output
    header, rows = read_csv(tmp_path / "flops.csv")
    assert header == results.SWEEP_COLUMNS
    assert [r["reducer_spec"].split(",")[0] for r in rows] == ["none", "tome:r=13", "evit:keep=0.7"]
    assert "fuse=false" in rows[2]["reducer_spec"]
    base, tome, _ = rows
    assert float(base["gmacs"]) == pytest.approx(1.258, abs=5e-4)
    assert tome["final_tokens"] == "41" and float(tome["gmacs"]) == pytest.approx(0.737, abs=2e-3)
    for r in rows:
        assert r["flop_counter"] == "fvcore+sdpa" and r["num_images"] == "1" and r["data"] == str(data_path.resolve())
        assert abs(float(r["gmacs"]) - float(r["gmacs_analytic"])) <= 0.01 * float(r["gmacs_analytic"])
        assert r["top1"] == r["img_s_median"] == ""
    assert float(tome["gmacs_ratio"]) == pytest.approx(1.258 / 0.737, rel=5e-3)
    assert "warning" not in result.stderr


def test_speed_rows_interleaved_with_the_baseline(checkpoint_path: Path, data_path: Path, tmp_path: Path,
                                                  clean_env: dict) -> None:
    result = runner.invoke(app, ["speed", "--model", "deit_t", "--checkpoint", str(checkpoint_path), "--data",
                                 str(data_path), "--reducers", "tome:r=13", "--batch-size", "2", "--repeats", "2",
                                 "--min-seconds", "0.01", "--warmup", "1", "--threads", "1", "--out", str(tmp_path)],
                           env=clean_env)
    assert result.exit_code == 0, result.output
    header, rows = read_csv(tmp_path / "speed.csv")
    assert header == results.SWEEP_COLUMNS
    base, tome = rows
    assert (base["reducer"], tome["reducer"]) == ("none", "tome")
    assert base["speedup_median"] == base["speedup_min"] == base["speedup_max"] == "1.0"
    for r in rows:
        assert float(r["img_s_min"]) <= float(r["img_s_median"]) <= float(r["img_s_max"])
        assert (r["batch_size"], r["repeats"], r["min_seconds"], r["threads"], r["dtype"]) == (
            "2", "2", "0.01", "1", "float32")
        assert r["num_images"] == "2" and r["compile"] == "False"
    assert tome["final_tokens"] == "41" and float(tome["gmacs_ratio"]) == pytest.approx(1.715, abs=5e-3)


def test_speed_at_several_batch_sizes_with_latency_memory_and_kernel(checkpoint_path: Path, data_path: Path,
                                                                     tmp_path: Path, clean_env: dict) -> None:
    timm_csv = tmp_path / "timm.csv"
    result = runner.invoke(app, ["speed", "--model", "deit_t", "--checkpoint", str(checkpoint_path), "--data",
                                 str(data_path), "--reducers", "tome:r=13", "--batch-sizes", "1,3", "--repeats", "2",
                                 "--min-seconds", "0.01", "--warmup", "1", "--threads", "1", "--out", str(tmp_path),
                                 "--timm-csv", str(timm_csv)], env=clean_env)
    assert result.exit_code == 0, result.output
    _, rows = read_csv(tmp_path / "speed.csv")
    # one row per (configuration, batch size), each size timed against its own baseline
    assert [(r["reducer"], r["batch_size"], r["num_images"]) for r in rows] == [
        ("none", "1", "1"), ("tome", "1", "1"), ("none", "3", "3"), ("tome", "3", "3")]
    assert len({r["config_key"] for r in rows}) == 4
    for r in rows:
        assert float(r["latency_ms_median"]) > 0 and float(r["latency_ms_p90"]) >= float(r["latency_ms_median"])
        assert float(r["peak_mem_mib"]) > 0
        assert r["attention_backend"] in ("flash", "math", "efficient", "cudnn")
        assert (r["compile_mode"], r["compiled_graphs"], r["recompiles"]) == ("", "0", "0")
        assert (r["cuda"], r["cudnn"], r["driver"]) == ("", "", "")  # the CPU uses none of them
        assert r["speedup_median"] == "1.0" if r["reducer"] == "none" else float(r["speedup_median"]) > 0
    # more images in a batch, more activation memory (the same model, the same kernel)
    assert float(rows[2]["peak_mem_mib"]) > float(rows[0]["peak_mem_mib"])
    _, timm_rows = read_csv(timm_csv)
    assert [(t["model"], t["infer_batch_size"], t["reducer"]) for t in timm_rows] == [
        ("deit_tiny_patch16_224", "1", "none"), ("deit_tiny_patch16_224", "1", "tome:r=13"),
        ("deit_tiny_patch16_224", "3", "none"), ("deit_tiny_patch16_224", "3", "tome:r=13")]
    for t, r in zip(timm_rows, rows):
        assert float(t["infer_samples_per_sec"]) == float(r["img_s_median"])
        assert float(t["infer_step_time"]) == pytest.approx(1000 * int(r["batch_size"]) / float(r["img_s_median"]),
                                                            abs=1e-3)
        assert (t["infer_img_size"], t["param_count"], t["infer_gmacs"]) == ("224", "5.72", r["gmacs_analytic"])


@pytest.mark.parametrize(("command", "args", "message"), [
    ("speed", ["--dtype", "float16"], "needs --device cuda"),
    ("speed", ["--reducers", "evit:keep=7"], "bad value '7' for keep"),
    ("speed", ["--batch-sizes", "1,0"], "bad --batch-sizes value '0'"),
    ("speed", ["--compile", "--compile-mode", "fast"], "unknown --compile-mode 'fast'; valid: default"),
    ("speed", ["--timm-csv", "/nonexistent/t.csv"], "--timm-csv /nonexistent/t.csv: no such folder"),
    ("flops", ["--reducers", "foo"], "unknown reducer 'foo'"),
    ("flops", ["--data", "/nonexistent"], "data path not found"),
])
def test_bad_input_is_one_line_with_exit_code_2(checkpoint_path: Path, tmp_path: Path, clean_env: dict,
                                                command: str, args: list[str], message: str) -> None:
    result = runner.invoke(app, [command, "--checkpoint", str(checkpoint_path), "--out", str(tmp_path), *args],
                           env=clean_env)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
