"""ipbench visualize: token groups over an image, from the trace of one forward pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from typer.testing import CliRunner

from ipbench.cli import app
from ipbench.plots.tokens import draw
from ipbench.runs.visualize import parse_layers, trace_layouts

runner = CliRunner()


@pytest.fixture(scope="module")
def random_tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8)


def _kept_tokens(layout) -> int:
    return len(np.unique(layout.labels[~layout.discarded]))


def test_evit_discards_exactly_the_dropped_patches(random_tiny, image) -> None:
    (l2, l3) = trace_layouts(random_tiny, image, "evit:keep=0.7", [2, 3])
    assert l2.discarded.sum() == 0 and l2.tokens == 197 and l2.merged_groups == 0
    # 196 patches -> ceil(0.7 * 196) = 138 kept; the other 58 are fused into one token, drawn as discarded
    assert l3.tokens == 1 + 138 + 1 and l3.discarded.sum() == 196 - 138 and _kept_tokens(l3) == 138


def test_tome_groups_cover_every_patch(random_tiny, image) -> None:
    (last,) = trace_layouts(random_tiny, image, "tome:r=13", parse_layers(None, 12))
    assert last.layer == 11 and last.tokens == 41
    assert last.discarded.sum() == 0 and (last.labels >= 0).all()
    assert _kept_tokens(last) == 40 and last.merged_groups > 0


def test_imagepiece_groups_and_discards_add_up(random_tiny, image) -> None:
    layouts = trace_layouts(random_tiny, image, "imagepiece", [1, 3, 11])
    assert [lay.tokens for lay in layouts] == [183, 121, 47]
    for lay in layouts:  # class token, the kept tokens, and the fused token once anything was discarded
        assert lay.tokens == 1 + _kept_tokens(lay) + (1 if lay.discarded.any() else 0)
    # 14 merges in block 1 (several may land on one token): patches in groups − groups = merges
    sizes = np.bincount(layouts[0].labels.ravel())
    assert sizes[sizes > 1].sum() - layouts[0].merged_groups == 197 - 183


def test_parse_layers() -> None:
    assert parse_layers(None, 12) == [11] and parse_layers("-1", 12) == [11]
    assert parse_layers("2,5", 12) == [2, 5] and parse_layers("all", 12) == list(range(12))
    from ipbench.errors import UserError

    with pytest.raises(UserError, match="blocks 0 to 11"):
        parse_layers("12", 12)
    with pytest.raises(UserError, match="block numbers"):
        parse_layers("last", 12)


def test_draw_makes_a_figure(random_tiny, image, tmp_path: Path) -> None:
    layouts = trace_layouts(random_tiny, image, "imagepiece", [2, 11])
    fig = draw(image, layouts, 16, "test")
    fig.savefig(tmp_path / "x.png")
    assert (tmp_path / "x.png").stat().st_size > 10_000


def test_cli_writes_a_png_for_a_real_image(tmp_path: Path, data_path: Path, checkpoint_path: Path,
                                           clean_env) -> None:
    img = sorted((data_path / "n01443537").iterdir())[0]
    out = tmp_path / "groups.png"
    r = runner.invoke(app, ["visualize", "--image", str(img), "--reducer", "imagepiece", "--layer", "3,11",
                            "--checkpoint", str(checkpoint_path), "--out", str(out)], env=clean_env)
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 50_000


@pytest.mark.parametrize("args, message", [
    (["--image", "nope.jpg", "--reducer", "tome"], "nope.jpg: no such file"),
    (["--image", "{img}", "--reducer", "tome:x=1"], "tome"),
    (["--image", "{img}", "--reducer", "tome", "--layer", "99"], "blocks 0 to 11"),
    (["--image", "{txt}", "--reducer", "tome"], "not a readable image"),
    (["--image", "{img}", "--reducer", "tome", "--out", "{tmp}/x.jpg"], "ending in .png"),
])
def test_cli_bad_input_is_one_line(args, message, tmp_path: Path, data_path: Path, checkpoint_path: Path,
                                   clean_env) -> None:
    img = sorted((data_path / "n01443537").iterdir())[0]
    txt = tmp_path / "a.jpg"
    txt.write_text("not an image")
    args = [a.format(img=img, txt=txt, tmp=tmp_path) for a in args]
    r = runner.invoke(app, ["visualize", *args, "--checkpoint", str(checkpoint_path)], env=clean_env)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
