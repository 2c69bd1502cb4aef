"""Data sources: fixed ImageNet numbering, CSV, synthetic, subsets, bad input, exact normalisation."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from ipbench.data import decode_all, normalize, open_source, uint8_transform
from ipbench.errors import UserError

DEIT_CFG = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center",
            "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def test_folder_numbering_uses_the_fixed_1000_class_list(small_folder: Path) -> None:
    source = open_source(str(small_folder), DEIT_CFG)
    _, labels = decode_all(source, max_bytes=1 << 30)
    # n01443537 is class 1, n01530575 class 10, n04522168 class 883 in ImageNet-1k; ImageFolder
    # would have numbered the three folders 0, 1, 2.
    assert labels.tolist() == [1, 1, 10, 883, 883]
    assert source.num_images == 5 and source.has_labels and source.name == "folder"


def test_shared_folder_labels_match_its_attribution_list(data_path: Path) -> None:
    source = open_source(str(data_path), DEIT_CFG)
    with (data_path / "ATTRIBUTION.csv").open(newline="") as f:
        expected = {row["file"]: int(row["label"]) for row in csv.DictReader(f)}
    got = {f"{p.parent.name}/{p.name}": label for p, label in source.dataset.items}
    assert source.num_images == 1000
    assert got == expected


def test_uint8_batches_normalise_bit_identically_to_timm(small_folder: Path) -> None:
    from timm.data import create_transform

    timm_transform = create_transform(**DEIT_CFG, is_training=False)
    ours = uint8_transform(DEIT_CFG)
    files = sorted(small_folder.rglob("*.jpg"))
    with Image.open(files[0]) as a, Image.open(files[-1]) as b:
        imgs = [a.convert("RGB"), b.convert("RGB")]
    batch = torch.stack([ours(im) for im in imgs])
    assert batch.dtype == torch.uint8 and batch.shape == (2, 3, 224, 224)
    expected = torch.stack([timm_transform(im) for im in imgs])
    assert torch.equal(normalize(batch, DEIT_CFG["mean"], DEIT_CFG["std"]), expected)


def test_limit_takes_evenly_spaced_images_in_sorted_order(data_path: Path) -> None:
    full = open_source(str(data_path), DEIT_CFG).dataset.items
    sub = open_source(str(data_path), DEIT_CFG, limit=10)
    assert sub.num_images == 10
    assert sub.dataset.items == [full[i * 100] for i in range(10)]
    assert open_source(str(data_path), DEIT_CFG, limit=5000).num_images == 1000


def test_csv_source_paths_relative_to_the_csv_and_labels_as_index_or_wnid(small_folder: Path) -> None:
    listing = small_folder / "list.csv"
    files = sorted(small_folder.rglob("*.jpg"))
    with listing.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label"])
        w.writerow([files[0].relative_to(small_folder).as_posix(), 7])
        w.writerow([files[2].relative_to(small_folder).as_posix(), "n04522168"])
    source = open_source(str(listing), DEIT_CFG)
    images, labels = decode_all(source, max_bytes=1 << 30)
    assert source.name == "csv" and source.num_images == 2
    assert labels.tolist() == [7, 883]
    assert images.shape == (2, 3, 224, 224)


def test_shared_attribution_csv_is_a_valid_csv_source(data_path: Path) -> None:
    source = open_source(str(data_path / "ATTRIBUTION.csv"), DEIT_CFG)
    folder = open_source(str(data_path), DEIT_CFG)
    assert sorted(source.dataset.items) == sorted(folder.dataset.items)


@pytest.mark.parametrize(("content", "message"), [
    ("path,label\na.jpg,1\n", "lacks column(s) file"),
    ("file,label\na.jpg,cat\n", "bad label 'cat'"),
    ("file,label\n", "has no rows"),
])
def test_bad_csv_is_a_user_error(tmp_path: Path, content: str, message: str) -> None:
    listing = tmp_path / "list.csv"
    listing.write_text(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        open_source(str(listing), DEIT_CFG)


def test_synthetic_is_seeded_unlabelled_and_sized_by_the_model_config() -> None:
    cfg = {**DEIT_CFG, "input_size": (3, 160, 160)}
    source = open_source("synthetic", cfg)
    assert source.num_images == 256 and not source.has_labels and source.path == "synthetic"
    a, labels = decode_all(open_source("synthetic", cfg, limit=3, seed=1), max_bytes=1 << 30)
    b, _ = decode_all(open_source("synthetic", cfg, limit=3, seed=1), max_bytes=1 << 30)
    c, _ = decode_all(open_source("synthetic", cfg, limit=3, seed=2), max_bytes=1 << 30)
    assert a.shape == (3, 3, 160, 160) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert labels.tolist() == [-1, -1, -1]


def test_decode_all_refuses_politely_above_max_bytes() -> None:
    source = open_source("synthetic", DEIT_CFG, limit=10)
    with pytest.raises(UserError, match="10 images at 224x224 need 1 MiB.*use --limit"):
        decode_all(source, max_bytes=1000)


def test_unreadable_image_is_named_or_skipped_and_counted(small_folder: Path) -> None:
    bad = small_folder / "n01530575" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match=f"cannot read image {bad}"):
        decode_all(open_source(str(small_folder), DEIT_CFG), max_bytes=1 << 30)
    source = open_source(str(small_folder), DEIT_CFG, skip_bad=True)
    images, labels = decode_all(source, max_bytes=1 << 30, batch_size=2, workers=1)
    assert len(source.skipped) == 1 and str(bad) in source.skipped[0]
    assert labels.tolist() == [1, 1, 10, 883, 883] and len(images) == 5


def test_folder_errors_name_the_problem(tmp_path: Path, small_folder: Path) -> None:
    with pytest.raises(UserError, match="data path not found"):
        open_source(str(tmp_path / "nope"), DEIT_CFG)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty data folder"):
        open_source(str(tmp_path / "empty"), DEIT_CFG)
    shutil.copytree(small_folder / "n01443537", small_folder / "cats")
    with pytest.raises(UserError, match="unknown wnid folder .*cats"):
        open_source(str(small_folder), DEIT_CFG)


def test_a_failing_transform_is_a_bug_not_an_unreadable_image() -> None:
    """Only decoding is caught (a broken file is bad input); an exception in the transform is a bug and
    must show itself, not pass as 'cannot read image'."""
    from ipbench.data import SAMPLE_FOLDER, _Files

    path = next(SAMPLE_FOLDER.glob("*/*.jpg"))

    def broken(_: object) -> object:
        raise ZeroDivisionError("transform bug")

    with pytest.raises(ZeroDivisionError, match="transform bug"):
        _Files([(path, 0)], broken)[0]
