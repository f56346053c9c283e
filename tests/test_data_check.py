"""Data errors found early: the pre-flight stat pass in setup, the `iemask.data.check` tool, data.on_bad_image."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA
from iemask.data.base import MAX_REPLACEMENTS, DatasetError
from iemask.data.check import check_data, check_split
from iemask.data.cityscapes import CityscapesDataModule, CityscapesInstanceDataset
from iemask.data.coco import COCODataModule, COCOInstanceDataset
from iemask.data.image_io import write_png
from iemask.data.lvis import LVISDataModule, LVISInstanceDataset

H, W = 32, 40  # every test image; annotations are 10×8 px squares


def write_split(root: Path, split: str, num_images: int) -> Path:
    """``root/<split>2017/`` with ``num_images`` PNGs and ``root/annotations/instances_<split>2017.json``
    (two categories, one square polygon per image); returns the json."""
    image_dir, ann_dir = root / f"{split}2017", root / "annotations"
    image_dir.mkdir(parents=True)
    ann_dir.mkdir(exist_ok=True)
    images, annotations = [], []
    for i in range(1, num_images + 1):
        name = f"{i:012d}.png"
        write_png(torch.full((3, H, W), 10 * i, dtype=torch.uint8), image_dir / name)
        images.append({"id": i, "file_name": name, "height": H, "width": W})
        x, y = i % 20, 5
        polygon = [x, y, x + 10, y, x + 10, y + 8, x, y + 8]
        annotations.append({"id": 100 + i, "image_id": i, "category_id": 1 + i % 2, "iscrowd": 0, "area": 80.0,
                            "segmentation": [[float(v) for v in polygon]], "bbox": [x, y, 10.0, 8.0]})  # fmt: skip
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    path = ann_dir / f"instances_{split}2017.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def coco_root(tmp_path: Path, num_train: int = 4, num_val: int = 3) -> Path:
    root = tmp_path / "coco"
    write_split(root, "train", num_train)
    write_split(root, "val", num_val)
    return root


def datamodule(root: Path, **kwargs) -> COCODataModule:
    return COCODataModule(root, num_classes=2, num_workers=0, pin_memory=False, **kwargs)


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def break_dataset(root: Path) -> dict[str, Path]:
    """One of each fault in ``root``: a missing and a truncated train image, a val image of the wrong size,
    a degenerate (zero-width) box and an RLE of the wrong size; returns the files concerned."""
    missing = root / "train2017" / "000000000002.png"
    truncated = root / "train2017" / "000000000003.png"
    resized = root / "val2017" / "000000000001.png"
    missing.unlink()
    truncated.write_bytes(truncated.read_bytes()[:40])
    write_png(torch.zeros(3, H + 4, W, dtype=torch.uint8), resized)

    def degenerate_box(data: dict) -> None:
        data["annotations"][0]["bbox"][2] = 0.0  # annotation 101 of image 1

    def wrong_rle(data: dict) -> None:
        data["annotations"][1]["segmentation"] = {"size": [H, W + 1], "counts": [5, 10, H * (W + 1) - 15]}

    edit_json(root / "annotations" / "instances_train2017.json", degenerate_box)
    edit_json(root / "annotations" / "instances_val2017.json", wrong_rle)  # annotation 102 of image 2
    return {"missing": missing, "truncated": truncated, "resized": resized}


# ---- pre-flight: one stat per image in setup ------------------------------------------------------
def test_setup_names_every_missing_image_in_one_error(tmp_path):
    root = coco_root(tmp_path, num_train=13)
    gone = [root / "train2017" / f"{i:012d}.png" for i in range(2, 13)]
    for path in gone:
        path.unlink()
    dm = datamodule(root)
    with pytest.raises(DatasetError) as caught:
        dm.setup("fit")  # what the trainer runs before its first step
    message = str(caught.value)
    assert "11 of the 13 image files of" in message and "instances_train2017.json are missing" in message
    assert all(str(path) in message for path in gone[:10]) and str(gone[10]) not in message
    assert "... and 1 more" in message and "python -m iemask.data.check" in message
    assert dm.train_set is not None and dm.val_set is None  # stopped before building anything more


def test_setup_checks_the_validation_images_too(tmp_path):
    root = coco_root(tmp_path)
    (root / "val2017" / "000000000003.png").unlink()
    with pytest.raises(DatasetError, match=r"1 of the 3 image files .*instances_val2017\.json are missing:\n  .*"
                                           r"val2017/000000000003\.png"):  # fmt: skip
        datamodule(root).setup("validate")
    dm = datamodule(coco_root(tmp_path / "intact"))
    dm.setup("fit")
    assert len(dm.train_set) == 4 and len(dm.val_set) == 3


# ---- the check tool --------------------------------------------------------------------------------
def test_check_reports_every_problem_at_once(tmp_path):
    root = coco_root(tmp_path)
    files = break_dataset(root)
    report = check_data(datamodule(root), decode=True, workers=2)
    assert report.images == {"train": 4, "val": 3}
    assert report.counts() == {
        "missing_image": 1,
        "unreadable_image": 1,
        "image_size": 1,
        "bad_annotation": 1,
        "skipped_annotation": 1,
    }
    by_kind = {p.kind: p for p in report.problems}
    assert by_kind["missing_image"].split == "train" and str(files["missing"]) in by_kind["missing_image"].message
    assert str(files["truncated"]) in by_kind["unreadable_image"].message
    assert str(files["resized"]) in by_kind["image_size"].message and "40×36" in by_kind["image_size"].message
    assert "annotation id 102 (image id 2): RLE size [32, 41]" in by_kind["bad_annotation"].message
    assert "annotation id 101 (image id 1): its box" in by_kind["skipped_annotation"].message
    assert len(report.errors) == 4  # skipped annotations are warnings
    assert report.to_json()["ok"] is False and "unreadable_image: 1" in report.summary()

    quick = check_data(datamodule(root))  # without decoding: the stat pass and what the json shows
    assert quick.counts() == {"missing_image": 1, "skipped_annotation": 1}


def test_check_reports_a_split_that_cannot_be_built_and_checks_the_other(tmp_path):
    root = coco_root(tmp_path)
    edit_json(root / "annotations" / "instances_train2017.json", lambda d: d["annotations"][0].update(category_id=7))
    (root / "val2017" / "000000000001.png").unlink()
    report = check_data(datamodule(root))
    assert [(p.kind, p.split) for p in report.problems] == [("dataset", "train"), ("missing_image", "val")]
    assert "annotation id 101: category_id 7 is not in the file's categories" in report.problems[0].message


def test_check_cli_exits_nonzero_and_writes_the_report(tmp_path):
    root = coco_root(tmp_path)
    files = break_dataset(root)
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "iemask.data.check", "data=coco", f"data.root={root}", "data.num_classes=2",
               "decode=true", "workers=1", f"hydra.run.dir={run_dir}"]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "4 problem(s), 1 warning(s)" in output and str(files["truncated"]) in output
    report = json.loads((run_dir / "data_check.json").read_text())
    assert report["ok"] is False and report["counts"]["missing_image"] == 1
    assert {p["kind"] for p in report["problems"]} == {
        "missing_image",
        "unreadable_image",
        "image_size",
        "bad_annotation",
        "skipped_annotation",
    }


@pytest.mark.skipif(not (SHARED_DATA / "tiny_coco").is_dir(), reason=f"{SHARED_DATA / 'tiny_coco'} is not present")
def test_real_coco_files_pass_the_check():
    dm = COCODataModule(SHARED_DATA / "tiny_coco", num_classes=80, num_workers=0)
    report = check_data(dm, decode=True, workers=2)
    assert report.images == {"train": 50, "val": 50} and not report.errors


# ---- data.on_bad_image at run time -------------------------------------------------------------------
def test_skip_returns_the_next_image_and_lists_the_failed_file(tmp_path, caplog):
    root = coco_root(tmp_path)
    dm = datamodule(root, on_bad_image="skip")
    dm.setup("fit")
    bad = root / "train2017" / "000000000002.png"
    bad.unlink()  # after the pre-flight check
    with caplog.at_level(logging.WARNING):
        image, target = dm.train_set[1]
    assert target["image_id"] == 3 and target["skipped_files"] == [str(bad)]
    assert torch.is_tensor(image) and image.shape[-2:] == target["masks"].shape[-2:]
    assert f"data.on_bad_image=skip: {bad} cannot be loaded (image file not found" in caplog.text
    assert dm.train_set[1][1]["image_id"] == 3  # the same replacement every time: no random draw
    assert "skipped_files" not in dm.train_set[0][1]
    (root / "val2017" / "000000000002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"val2017/000000000002\.png"):  # evaluation always raises
        dm.val_set[1]


def test_skip_wraps_around_and_gives_up_after_a_bound(tmp_path):
    root = coco_root(tmp_path, num_train=MAX_REPLACEMENTS + 2)
    ds = COCOInstanceDataset(root / "train2017", root / "annotations" / "instances_train2017.json", on_bad_image="skip")
    last = root / "train2017" / f"{len(ds):012d}.png"
    last.write_bytes(b"not a png")
    _, target = ds[len(ds) - 1]
    assert target["image_id"] == 1 and target["skipped_files"] == [str(last)]
    for i in range(1, MAX_REPLACEMENTS + 1):
        (root / "train2017" / f"{i:012d}.png").unlink()
    with pytest.raises(DatasetError, match=rf"{MAX_REPLACEMENTS} consecutive images .* from item 0 on cannot be"):
        ds[0]


def test_raise_names_the_file(tmp_path):
    root = coco_root(tmp_path)
    dm = datamodule(root)
    dm.setup("fit")
    truncated = root / "train2017" / "000000000001.png"
    truncated.write_bytes(truncated.read_bytes()[:40])
    with pytest.raises(DatasetError, match=r"cannot decode image .*train2017/000000000001\.png.*replace or remove it"):
        dm.train_set[0]
    (root / "train2017" / "000000000002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*000000000002\.png .*restore it"):
        dm.train_set[1]
    with pytest.raises(ValueError, match=r"data\.on_bad_image must be one of \('raise', 'skip'\), not 'ignore'"):
        datamodule(root, on_bad_image="ignore")


# ---- LVIS and Cityscapes -------------------------------------------------------------------------------
def test_lvis_image_paths_follow_the_coco_urls(shapes_cache, tmp_path):
    from test_lvis import _lvis_split

    (shapes_root,) = [p for p in shapes_cache.iterdir() if p.name.startswith("shapes-")]
    root = tmp_path / "lvis"
    for folder in ("annotations", "train2017", "val2017"):
        (root / folder).mkdir(parents=True)
    _lvis_split(shapes_root, root, "train", lambda i: (i + 1, "train2017"))
    _lvis_split(shapes_root, root, "val", lambda i: (1001 + i, ("val2017", "train2017")[i % 2]))
    ds = LVISInstanceDataset(root, root / "annotations" / "lvis_v1_val.json")
    expected = [root / ("val2017", "train2017")[i % 2] / f"{1001 + i:012d}.png" for i in range(6)]
    assert ds.image_paths() == expected and all(p.is_file() for p in expected)
    expected[3].unlink()
    dm = LVISDataModule(root, num_classes=3, num_workers=0)
    with pytest.raises(DatasetError, match=r"(?s)1 of the 6 image files .*lvis_v1_val\.json .*train2017/000000001004"):
        dm.setup("validate")


def test_cityscapes_image_paths_and_ground_truth_check(tmp_path):
    from test_cityscapes import write_dataset

    root = tmp_path / "cityscapes"
    write_dataset(root)
    ds = CityscapesInstanceDataset(root, "val")
    assert ds.image_paths() == sorted((root / "leftImg8bit" / "val").glob("*/*_leftImg8bit.png"), key=lambda p: p.name)
    gt = ds.images[ds.ids[1]].gt_file
    gt.write_bytes(b"broken")
    dm = CityscapesDataModule(root, num_classes=8, num_workers=0)
    images, problems = check_split(dm, "val", decode=True, workers=1)
    assert images == len(ds) and [p.kind for p in problems] == ["bad_annotation"] and str(gt) in problems[0].message
