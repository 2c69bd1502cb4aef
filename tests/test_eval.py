"""Accuracy against plain timm, the eval CSV row, and the result-file helpers."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from ipbench import results
from ipbench.cli import app
from ipbench.data import batched, normalize
from ipbench.errors import UserError
from ipbench.measure.accuracy import Result
from ipbench.runs.context import RunContext, RunSpec
from ipbench.runs.loop import Accuracy, Job, run_jobs

runner = CliRunner()


def evaluate(models: dict[str, torch.nn.Module], batches: Any, source: Any) -> dict[str, Result]:
    """Top-1/top-5 of several models through the one batch loop, on the same batches."""
    ctx = RunContext(spec=RunSpec(), net=next(iter(models.values())), model="deit_tiny_patch16_224",
                     weights="checkpoint", checkpoint="test", sha256="", source=source, threads=torch.get_num_threads())
    accs = {name: Accuracy() for name in models}
    run_jobs(ctx, batches, [Job(name, model, [accs[name]]) for name, model in models.items()])
    return {name: acc.result for name, acc in accs.items()}


def plain_timm_reference(checkpoint: Path, data: Path, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, logits and labels of `n` evenly spaced shared images, the way a timm user computes them:
    timm's own transform on PIL images, labels from the data's ATTRIBUTION.csv."""
    import timm
    from PIL import Image
    from safetensors.torch import load_file
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model("deit_tiny_patch16_224")
    model.load_state_dict(load_file(str(checkpoint)))
    model.eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    with (data / "ATTRIBUTION.csv").open(newline="") as f:
        rows = sorted((r["file"], int(r["label"])) for r in csv.DictReader(f))
    picked = [rows[i * len(rows) // n] for i in range(n)]
    inputs = []
    for file, _ in picked:
        with Image.open(data / file) as im:
            inputs.append(transform(im.convert("RGB")))
    x = torch.stack(inputs)
    with torch.inference_mode():
        logits = torch.cat([model(x[i:i + 32]) for i in range(0, n, 32)])
    return x, logits, torch.tensor([label for _, label in picked])


def test_subset_accuracy_equals_plain_timm(shared_subset: Any, deit_tiny: torch.nn.Module, checkpoint_path: Path,
                                           data_path: Path) -> None:
    n = len(shared_subset.labels)  # conftest's deterministic subset, decoded once per session
    x_ref, logits, labels = plain_timm_reference(checkpoint_path, data_path, n)
    src = shared_subset.source
    assert torch.equal(shared_subset.labels, labels)
    assert torch.equal(normalize(shared_subset.uint8, src.mean, src.std), x_ref)  # bit-identical input
    res = evaluate({"deit_t": deit_tiny}, batched(shared_subset.uint8, shared_subset.labels, 32), src)["deit_t"]
    top5 = logits.topk(5, dim=-1).indices
    assert res.total == res.images == n
    assert res.correct1 == int((top5[:, 0] == labels).sum())
    assert res.correct5 == int((top5 == labels[:, None]).any(-1).sum())
    assert res.top1 == pytest.approx(100 * res.correct1 / n)


def test_several_models_see_the_same_batches(shared_subset: Any, deit_tiny: torch.nn.Module) -> None:
    src = shared_subset.source
    out = evaluate({"a": deit_tiny, "b": deit_tiny}, batched(shared_subset.uint8[:16], shared_subset.labels[:16], 8),
                   src)
    assert out["a"] == out["b"] and out["a"].total == 16


def test_unlabelled_images_have_no_accuracy(shared_subset: Any, deit_tiny: torch.nn.Module) -> None:
    src = shared_subset.source
    unlabelled = torch.full((4,), -1, dtype=torch.long)
    res = evaluate({"m": deit_tiny}, [(shared_subset.uint8[:4], unlabelled)], src)["m"]
    assert res.images == 4 and res.total == 0 and res.top1 is None and res.top5 is None


def eval_cli(checkpoint: Path, data: str, out: Path, *extra: str) -> list[dict[str, str]]:
    args = ["eval", "--model", "deit_t", "--checkpoint", str(checkpoint), "--data", data, "--out", str(out),
            *extra]
    result = runner.invoke(app, args, env={"IPBENCH_CHECKPOINT": None, "IPBENCH_DATA": None})
    assert result.exit_code == 0, result.output
    with (out / "eval.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_eval_appends_one_complete_row_per_run(checkpoint_path: Path, small_folder: Path, tmp_path: Path) -> None:
    rows = eval_cli(checkpoint_path, str(small_folder), tmp_path, "--workers", "0", "--threads", "1")
    rows = eval_cli(checkpoint_path, str(small_folder), tmp_path, "--workers", "0", "--batch-size", "2")
    assert (tmp_path / "eval.csv").read_text().splitlines()[0] == ",".join(results.EVAL_COLUMNS)
    assert len(rows) == 2
    row = rows[0]
    assert row["model"] == "deit_tiny_patch16_224" and row["checkpoint_sha256"] == "feb465dcfedcc2d9"
    assert row["data"] == str(small_folder.resolve()) and row["num_images"] == "5"
    assert row["reducer"] == "none" and row["reducer_params"] == "{}" and row["training_free"] == "True"
    assert row["tokens_per_layer"] == " ".join(["197"] * 12) and row["final_tokens"] == "197"
    assert row["threads"] == "1" and rows[1]["batch_size"] == "2"
    assert row["device"] == "cpu" and row["dtype"] == "float32" and row["seed"] == "0"
    assert row["torch"] == torch.__version__ and row["ipbench"]
    assert row["timestamp"].endswith("+00:00")
    # batch size does not change what is measured, so both rows share the configuration key
    assert rows[0]["config_key"] == rows[1]["config_key"]
    assert rows[0]["correct1"] == rows[1]["correct1"]
    assert float(row["top1"]) == pytest.approx(100 * int(row["correct1"]) / 5)


def test_synthetic_eval_reports_no_accuracy(checkpoint_path: Path, tmp_path: Path) -> None:
    rows = eval_cli(checkpoint_path, "synthetic", tmp_path, "--limit", "4", "--workers", "0")
    assert rows[0]["data"] == "synthetic" and rows[0]["num_images"] == "4"
    assert rows[0]["top1"] == "" and rows[0]["top5"] == ""
    assert results.read_rows(tmp_path / "eval.csv")["top1"].isna().all()


def test_eval_with_a_reducer_records_its_token_plan(checkpoint_path: Path, tmp_path: Path) -> None:
    row = eval_cli(checkpoint_path, "synthetic", tmp_path, "--limit", "2", "--workers", "0",
                   "--reducer", "tome:r=13")[0]
    tokens = [int(t) for t in row["tokens_per_layer"].split()]
    assert row["reducer"].startswith("tome:") and len(tokens) == 12
    assert tokens == sorted(tokens, reverse=True) and tokens[-1] < 197 and row["final_tokens"] == str(tokens[-1])
    assert tokens == TOME_R13  # 197 tokens, 13 merged in every block


TOME_R13 = [184, 171, 158, 145, 132, 119, 106, 93, 80, 67, 54, 41]  # ToMe r=13 on a 224 px /16 DeiT (README)


def test_eval_token_counts_of_tome_r13_on_deit_s(tmp_path: Path) -> None:
    """The README's DeiT-S counts (184 … 41); token counts do not depend on the weights."""
    args = ["eval", "--model", "deit_s", "--weights", "random", "--data", "synthetic", "--limit", "2",
            "--reducer", "tome:r=13", "--out", str(tmp_path)]
    result = runner.invoke(app, args, env={"IPBENCH_CHECKPOINT": None, "IPBENCH_DATA": None})
    assert result.exit_code == 0, result.output
    with (tmp_path / "eval.csv").open(newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["model"] == "deit_small_patch16_224" and row["weights"] == "random"
    assert [int(t) for t in row["tokens_per_layer"].split()] == TOME_R13 and row["final_tokens"] == "41"


@pytest.mark.slow
def test_append_row_writes_header_once_and_rejects_another_schema(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "x.csv"
    results.append_row(path, {"a": 1, "b": "x,y"}, ["a", "b"])
    results.append_row(path, {"a": 2}, ["a", "b"])
    assert path.read_text() == 'a,b\n1,"x,y"\n2,\n'
    with pytest.raises(UserError, match="different columns.*another --out"):
        results.append_row(path, {"a": 3}, ["a", "c"])
    with pytest.raises(ValueError, match="outside the schema"):
        results.append_row(path, {"z": 3}, ["a", "b"])


def test_read_rows_keeps_hashes_as_strings(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    assert results.read_rows(path).empty
    results.append_row(path, {"config_key": "123456789012", "checkpoint_sha256": "1e50", "top1": ""},
                       ["config_key", "checkpoint_sha256", "top1"])
    frame = results.read_rows(path)
    assert frame["config_key"][0] == "123456789012" and frame["checkpoint_sha256"][0] == "1e50"
    assert frame["top1"].isna().all()


def test_config_key_is_stable_and_order_independent() -> None:
    a = results.config_key({"model": "deit_tiny_patch16_224", "reducer": "none", "n": 1000})
    b = results.config_key({"n": 1000, "reducer": "none", "model": "deit_tiny_patch16_224"})
    assert a == b and len(a) == 12
    assert a != results.config_key({"model": "deit_tiny_patch16_224", "reducer": "none", "n": 999})


def test_common_fields_say_where_and_how_without_hostname(shared_subset: Any, deit_tiny: torch.nn.Module) -> None:
    import socket

    ctx = RunContext(spec=RunSpec(batch_size=32), net=deit_tiny, model="deit_tiny_patch16_224", weights="checkpoint",
                     checkpoint="test", sha256="", source=shared_subset.source, threads=torch.get_num_threads())
    fields = ctx.row_fields()
    assert fields["threads"] == torch.get_num_threads() and fields["batch_size"] == 32
    assert set(fields) <= set(results.EVAL_COLUMNS)
    assert socket.gethostname() not in {str(v) for v in fields.values()}
