"""ipbench finetune: the loss falls, a checkpoint evaluates, a resumed run is bit-identical to an
uninterrupted one, torchrun equals one process, the conv stem is fitted and loads.

Everything runs DeiT-Tiny with the real weights at 112 px (timm resamples the position embedding),
so a step takes a fraction of a second on 2 cores.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ipbench.cli import app
from ipbench.reducers import list_reducers
from ipbench.runs.progress import Silent
from tests.helpers import assert_user_error

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "torchrun_commands.py"
runner = CliRunner()
ENV = {"IPBENCH_CHECKPOINT": None, "IPBENCH_DATA": None, "COLUMNS": "200"}
SMALL = ["--img-size", "112", "--workers", "0", "--threads", "1", "--data", "sample"]
NO_AUG = ["--aa", "none", "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--smoothing", "0", "--drop-path", "0"]


def invoke(args: list[str]) -> Any:
    return runner.invoke(app, args, env=ENV)


def rows(path: Path, kind: str | None = None) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return [r for r in csv.DictReader(f) if kind is None or r["kind"] == kind]


def finetune(out: Path, checkpoint: Path, *extra: str) -> Any:
    result = invoke(["finetune", "--checkpoint", str(checkpoint), "--out", str(out), *SMALL, *extra])
    assert result.exit_code == 0, result.output
    return result


def test_loss_falls_and_the_checkpoint_evaluates(tmp_path: Path, checkpoint_path: Path) -> None:
    out = tmp_path / "ft"
    result = finetune(out, checkpoint_path, "--reducer", "tome:r=2", "--limit", "24", "--holdout", "8",
                      "--batch-size", "8", "--epochs", "5", "--lr", "2e-4", "--lr-base-size", "8", "--log-every", "1",
                      *NO_AUG)
    train = rows(out / "finetune.csv", "train")
    assert [int(r["step"]) for r in train] == list(range(1, 11))  # 16 training images, batch 8, 5 epochs
    losses = [float(r["loss"]) for r in train]
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    val = rows(out / "finetune.csv", "val")
    assert [int(r["epoch"]) for r in val] == [-1, 0, 1, 2, 3, 4]  # before training, then after each epoch
    assert all(r["n_labelled"] == "8" and r["top1_ema"] != "" for r in val)
    assert "top-1" in result.output
    weights = out / "checkpoint" / "model.safetensors"
    evaluated = invoke(["eval", "--checkpoint", str(weights), "--reducer", "tome:r=2", "--out", str(tmp_path / "ev"),
                        *SMALL, "--limit", "24"])
    assert evaluated.exit_code == 0, evaluated.output
    # the row says the weights were trained with the reducer: not a training-free number
    (row,) = rows(tmp_path / "ev" / "eval.csv")
    assert row["trained_with"] == "tome:r=2,prop_attn=true" and row["training_free"] == "True"
    assert "weights fine-tuned by ipbench with tome:r=2,prop_attn=true: not a training-free number" in " ".join(
        evaluated.output.split())
    plain = invoke(["eval", "--checkpoint", str(checkpoint_path), "--out", str(tmp_path / "ev0"), *SMALL,
                    "--limit", "4"])
    assert plain.exit_code == 0 and rows(tmp_path / "ev0" / "eval.csv")[0]["trained_with"] == ""
    trained = load_file(str(weights))
    start = load_file(str(checkpoint_path))
    assert not torch.equal(trained["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])
    # a rerun of a finished run resumes and has nothing left to do
    again = finetune(out, checkpoint_path, "--reducer", "tome:r=2", "--limit", "24", "--holdout", "8",
                     "--batch-size", "8", "--epochs", "5", "--lr", "2e-4", "--lr-base-size", "8", "--log-every", "1",
                     *NO_AUG)
    assert "nothing to do" in again.output
    assert len(rows(out / "finetune.csv", "train")) == 10
    plotted = invoke(["plot", str(out)])
    assert plotted.exit_code == 0, plotted.output
    assert (out / "plots" / "finetune_curves.png").stat().st_size > 10_000


RESUME = ["--reducer", "evit:keep=0.7", "--limit", "40", "--holdout", "8", "--batch-size", "8", "--epochs", "2",
          "--save-every", "2", "--log-every", "1", "--lr", "1e-4", "--lr-base-size", "8", "--drop-path", "0.1"]


class _Interrupt(Silent):
    """Progress that sends this process SIGINT (Ctrl-C) or crashes after `at` training steps."""

    def __init__(self, at: int, how: str) -> None:
        self.at, self.how, self.steps, self.training = at, how, 0, False

    def phase(self, description: str, total: int | None) -> None:
        self.training = description.startswith("finetune")

    def advance(self, n: int = 1, detail: str | None = None) -> None:
        if not self.training or detail is None:
            return
        self.steps += n
        if self.steps == self.at:
            if self.how == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise RuntimeError("killed")


def _run(out: Path, checkpoint: Path, progress: Any) -> Any:
    from ipbench.reducers import parse_spec
    from ipbench.runs.context import RunSpec
    from ipbench.runs.finetune import run_finetune
    from ipbench.runs.training import Recipe, Schedule

    spec = RunSpec(model="deit_t", checkpoint=str(checkpoint), data="sample", limit=40, batch_size=8, workers=0,
                   img_size=112, threads=1)
    recipe = Recipe(epochs=2, lr=1e-4, lr_base_size=8)  # the full default augmentation: every generator in use
    return run_finetune(spec, parse_spec("evit:keep=0.7"), recipe, out, holdout_images=8,
                        schedule=Schedule(save_every=2, log_every=1), progress=progress)


def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path: Path, checkpoint_path: Path) -> None:
    whole = tmp_path / "whole"
    done = _run(whole, checkpoint_path, Silent())
    assert done.steps == 8
    # Ctrl-C after step 3: a checkpoint at step 3, then the run stops; the rerun goes on from there
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        _run(cut, checkpoint_path, _Interrupt(3, "sigint"))
    resumed = _run(cut, checkpoint_path, Silent())
    assert resumed.resumed_from == 3
    # a crash in step 6 loses what came after the step-4 checkpoint; the rerun redoes steps 5 and 6
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="killed"):
        _run(crashed, checkpoint_path, _Interrupt(6, "crash"))
    again = _run(crashed, checkpoint_path, Silent())
    assert again.resumed_from == 4
    for name in ("model.safetensors", "model_ema.safetensors"):
        expected = (whole / "checkpoint" / name).read_bytes()
        assert (cut / "checkpoint" / name).read_bytes() == expected, name
        assert (crashed / "checkpoint" / name).read_bytes() == expected, name
    keep = ("kind", "epoch", "step", "images_seen", "loss", "lr", "top1", "top5", "top1_ema", "top5_ema")
    reference = [{k: r[k] for k in keep} for r in rows(whole / "finetune.csv")]
    for folder in (cut, crashed):
        assert [{k: r[k] for k in keep} for r in rows(folder / "finetune.csv")] == reference


def test_torchrun_two_processes_equal_one(tmp_path: Path, checkpoint_path: Path) -> None:
    """Same global batch on 1 and 2 processes: the same losses, validation counts and weights (1e-6).

    With SGD: AdamW divides each gradient by its own running magnitude, so where a gradient is exactly
    zero in exact arithmetic (the key bias: softmax ignores it) it turns the summation order's rounding
    noise (1e-12) into full ±lr steps, which differ between any two reduction orders."""
    args = ["--checkpoint", str(checkpoint_path), *SMALL, "--limit", "40", "--holdout", "9", "--batch-size", "8",
            "--epochs", "1", "--max-steps", "3", "--lr", "1e-2", "--lr-base-size", "8", "--reducer", "tome:r=2",
            "--mixup", "0", "--cutmix", "0", "--drop-path", "0", "--log-every", "1", "--threads", "1",
            "--opt", "sgd"]
    single = tmp_path / "single"
    finetune(single, checkpoint_path, *args[2:])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "IPBENCH_DATA")}
    env.update(OMP_NUM_THREADS="1", COLUMNS="200")
    line = " ".join(["finetune", *args, "--out", str(tmp_path / "two")])
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(DRIVER), line], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_file(str(single / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoint" / "model.safetensors"))
    start = load_file(str(checkpoint_path))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert max((a[k] - start[k]).abs().max().item() for k in a if a[k].shape == start[k].shape) > 1e-5
    keep = ("kind", "step", "images_seen", "top1", "correct1", "correct5", "n_labelled")
    one = [{k: r[k] for k in keep} for r in rows(single / "finetune.csv")]
    two = [{k: r[k] for k in keep} for r in rows(tmp_path / "two" / "finetune.csv")]
    assert one == two
    assert [r["world_size"] for r in rows(tmp_path / "two" / "finetune.csv")] == ["2"] * len(two)
    losses = [(float(x["loss"]), float(y["loss"])) for x, y in zip(rows(single / "finetune.csv", "train"),
                                                                   rows(tmp_path / "two" / "finetune.csv", "train"))]
    assert all(abs(x - y) < 1e-4 for x, y in losses), losses


def test_the_conv_stem_is_fitted_and_loads_in_eval_and_coherence(tmp_path: Path, checkpoint_path: Path) -> None:
    out = tmp_path / "stem"
    result = finetune(out, checkpoint_path, "--reducer", "imagepiece:keep=0.7,stem=conv", "--limit", "24",
                      "--holdout", "8", "--batch-size", "8", "--epochs", "1", "--stem-init-steps", "30",
                      "--stem-init-lr", "3e-3", "--log-every", "10", *NO_AUG)
    assert "conv stem fitted" in result.output
    stem_rows = rows(out / "finetune.csv", "stem")
    assert [int(r["step"]) for r in stem_rows] == [10, 20, 30]
    assert float(stem_rows[-1]["loss"]) < float(stem_rows[0]["loss"])
    weights = out / "checkpoint" / "model.safetensors"
    state = load_file(str(weights))
    assert "patch_embed.proj.body.0.weight" in state and "patch_embed.proj.weight" not in state
    assert {r["stem"] for r in rows(out / "finetune.csv")} == {"conv"}
    evaluated = invoke(["eval", "--checkpoint", str(weights), "--reducer", "imagepiece:keep=0.7,stem=conv",
                        "--out", str(tmp_path / "ev"), *SMALL, "--limit", "8"])
    assert evaluated.exit_code == 0, evaluated.output
    coherence = invoke(["coherence", "--checkpoint", str(checkpoint_path), "--stem-checkpoint", str(weights),
                        "--localities", "0", "--no-prune", "--out", str(tmp_path / "co"), *SMALL, "--limit", "8"])
    assert coherence.exit_code == 0, coherence.output
    co = rows(tmp_path / "co" / "coherence.csv")
    assert [r["stem"] for r in co] == ["patch", "conv"]
    assert co[1]["sim_metric_first"] != ""
    # the conv row ran the fine-tuned stem checkpoint, the patch row the off-the-shelf weights
    conv_trained = co[1]["trained_with"]
    assert co[0]["trained_with"] == "" and conv_trained.startswith("imagepiece:") and "stem=conv" in conv_trained
    assert "stem=conv rows run the --stem-checkpoint, trained with the stem (not training-free)" in " ".join(
        coherence.output.split())


def test_the_stem_fit_lowers_its_error() -> None:
    from ipbench.reducers.imagepiece import ConvStem
    from ipbench.runs.stem import fit_conv_stem

    torch.manual_seed(0)
    projection = torch.nn.Conv2d(3, 32, 16, stride=16)
    # smooth images (as photographs are, and unlike white noise, which no small stem can predict)
    images = (torch.nn.functional.interpolate(torch.randn(8, 3, 8, 8), size=64, mode="bilinear") for _ in range(60))
    fit = fit_conv_stem(ConvStem(3, 32), projection, images, 60, 3e-3)
    assert len(fit.losses) == 60 and fit.last < 0.8 * fit.first, (fit.first, fit.last)


@pytest.mark.parametrize(("args", "message"), [
    (["--holdout", "5", "--val", "sample"], "--val and --holdout exclude each other"),
    (["--batch-size", "7", "--accum-steps", "2"], "--batch-size 7 (the global batch) does not split"),
    (["--stem", "cnn"], "unknown --stem 'cnn'; valid: auto, patch, conv"),
    (["--distill", "teacher"], "unknown --distill 'teacher'; valid: none, kd"),
    (["--opt", "adamw9"], "unknown --opt 'adamw9'"),
    (["--drop-path", "1.5"], "--drop-path must be in [0, 1)"),
    (["--distill-alpha", "1.5"], "--distill-alpha must be in [0, 1], got 1.5"),
    (["--holdout", "100"], "--holdout 100: must be between 1 and 99"),
    (["--batch-size", "7"], "mixup/CutMix pair the images of a micro-batch, so it must be even; it is 7"),
    (["--config", "nope.toml"], "--config nope.toml: no such file"),
])
def test_bad_settings_are_one_line_errors(tmp_path: Path, checkpoint_path: Path, args: list[str],
                                          message: str) -> None:
    result = invoke(["finetune", "--checkpoint", str(checkpoint_path), "--out", str(tmp_path), *SMALL, *args])
    assert_user_error(result, message)


def test_a_config_file_sets_options_and_the_command_line_wins(tmp_path: Path, checkpoint_path: Path) -> None:
    config = tmp_path / "ft.toml"
    config.write_text('[finetune]\nreducer = "tome:r=2"\nepochs = 1\nbatch_size = 8\nlimit = 20\nholdout = 4\n'
                      'max_steps = 1\nlog_every = 1\nmixup = 0.0\ncutmix = 0.0\ndistill = "kd"\n', encoding="utf-8")
    out = tmp_path / "cfg"
    finetune(out, checkpoint_path, "--config", str(config), "--max-steps", "2")
    train = rows(out / "finetune.csv", "train")
    assert [r["step"] for r in train] == ["1", "2"] and {r["reducer_label"] for r in train} == {"tome:r=2"}
    bad = tmp_path / "bad.toml"
    bad.write_text('[finetune]\nepoch = 3\n', encoding="utf-8")
    assert_user_error(invoke(["finetune", "--config", str(bad), "--out", str(out)]), "unknown setting(s) epoch")


def test_a_checkpoint_of_another_run_is_not_resumed(tmp_path: Path, checkpoint_path: Path) -> None:
    out = tmp_path / "ft"
    common = ["--limit", "20", "--holdout", "4", "--batch-size", "8", "--max-steps", "1", *NO_AUG]
    finetune(out, checkpoint_path, "--reducer", "tome:r=2", *common)
    other = invoke(["finetune", "--checkpoint", str(checkpoint_path), "--out", str(out), *SMALL, "--reducer",
                    "tome:r=3", *common])
    assert_user_error(other, "is a checkpoint of another fine-tune (reducer: 'tome:r=2,prop_attn=true' -> "
                             "'tome:r=3,prop_attn=true')")
    forced = invoke(["finetune", "--checkpoint", str(checkpoint_path), "--out", str(out), *SMALL, "--reducer",
                     "tome:r=3", "--force", *common])
    assert forced.exit_code == 0, forced.output
    again = invoke(["finetune", "--checkpoint", str(checkpoint_path), "--out", str(out), *SMALL, "--reducer",
                    "tome:r=3", "--force", *common])
    assert again.exit_code == 0, again.output
    labels = [(r["reducer_label"], r["kind"], r["step"]) for r in rows(out / "finetune.csv")]
    assert labels == [("tome:r=2", "val", "0"), ("tome:r=2", "train", "1"), ("tome:r=2", "val", "1"),
                      ("tome:r=3", "val", "0"), ("tome:r=3", "train", "1"), ("tome:r=3", "val", "1")]


def test_the_kd_term_is_zero_only_when_student_and_teacher_agree() -> None:
    from ipbench.runs.training import kd_loss

    torch.manual_seed(0)
    logits = torch.randn(4, 10)
    assert kd_loss(logits, logits.clone(), 2.0).abs().item() < 1e-6
    other = torch.randn(4, 10)
    expected = (torch.softmax(other / 2, -1) * (torch.log_softmax(other / 2, -1) - torch.log_softmax(logits / 2, -1))
                ).sum(-1).mean() * 4
    assert torch.allclose(kd_loss(logits, other, 2.0), expected, atol=1e-6)


@pytest.mark.parametrize("name", sorted(cls.name for cls in list_reducers()))
def test_every_reducer_trains_after_an_inference_pass(name: str) -> None:
    """The engine under autograd, drop-path on, after an inference-mode pass (a cache filled there
    must not poison training): every parameter gets a finite gradient."""
    import timm

    from ipbench.reducers import apply_reducer, parse_spec

    torch.manual_seed(0)
    size = 224 if name == "diffrate" else 112  # DiffRate's published schedules are for 197 tokens
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=size, drop_path_rate=0.1)
    apply_reducer(model, parse_spec(name))
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        model.eval()(x)
    model.train()(x).logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
