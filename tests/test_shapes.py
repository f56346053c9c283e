"""Synthetic shapes dataset: deterministic, valid COCO whose masks match the pixels, cached atomically."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from iemask.data import shapes
from iemask.data.shapes import MARKER, SHAPES_CATEGORIES, ShapesSpec, ensure_shapes, generate_shapes

SMALL = dict(num_train=20, num_val=8)
TINY = dict(num_train=3, num_val=2, image_size=64)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _pixels(root: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(root)): np.asarray(Image.open(p)) for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("shapes"), ShapesSpec(**SMALL))


def test_generation_is_deterministic(dataset, tmp_path):
    again = generate_shapes(tmp_path / "again", ShapesSpec(**SMALL))
    files, files_again = _files(dataset), _files(again)
    assert files.keys() == files_again.keys()
    for split in ("train", "val"):
        name = f"annotations/instances_{split}.json"
        assert files[name] == files_again[name]
    pixels, pixels_again = _pixels(dataset), _pixels(again)
    assert len(pixels) == 28
    assert all(np.array_equal(pixels[name], pixels_again[name]) for name in pixels)
    # Train and val are drawn from independent seeds, and another seed gives another dataset.
    assert not np.array_equal(pixels["train/000001.png"], pixels["val/000001.png"])
    other = generate_shapes(tmp_path / "other", ShapesSpec(**SMALL, seed=1))
    assert _files(other)["annotations/instances_train.json"] != files["annotations/instances_train.json"]
    assert not np.array_equal(_pixels(other)["train/000001.png"], pixels["train/000001.png"])


@pytest.mark.parametrize("split, count", [("train", 20), ("val", 8)])
def test_files_are_valid_coco_with_disjoint_masks(dataset, split, count):
    coco = COCO(str(dataset / "annotations" / f"instances_{split}.json"))
    assert coco.loadCats(coco.getCatIds()) == SHAPES_CATEGORIES
    assert sorted(coco.getImgIds()) == list(range(1, count + 1))
    kinds = set()
    for image in coco.loadImgs(coco.getImgIds()):
        assert Image.open(dataset / split / image["file_name"]).size == (image["width"], image["height"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert 1 <= len(anns) <= 4
        cover = np.zeros((image["height"], image["width"]), dtype=int)
        for ann in anns:
            mask = coco.annToMask(ann)
            assert mask.any() and ann["iscrowd"] == 0 and ann["category_id"] in {1, 2, 3}
            assert ann["area"] == mask.sum()
            ys, xs = np.nonzero(mask)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            cover += mask
            kinds.add(type(ann["segmentation"]).__name__)
            if isinstance(ann["segmentation"], dict):
                assert isinstance(ann["segmentation"]["counts"], str)  # compressed RLE
        assert cover.max() == 1  # occluded parts belong to the object on top only
    if split == "train":
        assert kinds == {"list", "dict"}  # polygons (unoccluded) and RLE (occluded) both occur


def test_polygons_match_the_painted_pixels(dataset):
    coco = COCO(str(dataset / "annotations" / "instances_train.json"))
    polygons = [ann for ann in coco.loadAnns(coco.getAnnIds()) if isinstance(ann["segmentation"], list)]
    assert len(polygons) >= 10
    for ann in polygons:
        image = coco.loadImgs(ann["image_id"])[0]
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], image["height"], image["width"]))
        pixels = np.asarray(Image.open(dataset / "train" / image["file_name"])).astype(float)
        mask = mask_utils.decode(rle).astype(bool)
        # One flat colour plus noise inside the polygon, clearly different pixels just outside it.
        inside = pixels[mask]
        ring = _dilate(mask, 2) & ~mask
        assert inside.std(axis=0).max() < 20
        assert np.linalg.norm(pixels[ring] - inside.mean(axis=0), axis=1).mean() > 40


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def test_no_objects_and_other_sizes(tmp_path):
    root = generate_shapes(tmp_path, ShapesSpec(num_train=2, num_val=1, image_size=48, max_objects=0))
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    assert len(coco["images"]) == 2 and coco["annotations"] == []
    assert Image.open(root / "val" / "000001.png").size == (48, 48)
    with pytest.raises(ValueError, match="image_size"):
        ShapesSpec(image_size=16)


def test_ensure_shapes_generates_once(tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="iemask.data.shapes"):
        root = ensure_shapes(tmp_path, ShapesSpec(**TINY))
    assert root.parent == tmp_path and root.name.startswith("shapes-")
    assert (root / MARKER).is_file() and len(caplog.records) == 1
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temporary folder left behind

    def fail(*args, **kwargs):
        raise AssertionError("regenerated a complete dataset")

    monkeypatch.setattr(shapes, "_render", fail)
    assert ensure_shapes(tmp_path, ShapesSpec(**TINY, seed=0)) == root  # defaults are part of the key
    assert ensure_shapes(str(tmp_path), ShapesSpec(**TINY)) == root
    yaml_ints = ShapesSpec(**TINY, max_rotation=15, min_visible=0.5, object_size=[18, 56])
    assert yaml_ints == ShapesSpec(**TINY) and ensure_shapes(tmp_path, yaml_ints) == root
    with pytest.raises(AssertionError, match="regenerated"):
        ensure_shapes(tmp_path, ShapesSpec(**TINY, seed=1))  # other params, other folder


def test_ensure_shapes_replaces_incomplete_folders(tmp_path):
    root = ensure_shapes(tmp_path, ShapesSpec(**TINY))
    expected = _files(root)
    # Interrupted leftovers: a temporary folder, and the target folder itself without its marker.
    (tmp_path / f".{root.name}.abc.tmp").mkdir()
    (root / MARKER).unlink()
    (root / "annotations" / "instances_train.json").write_text("{")
    assert ensure_shapes(tmp_path, ShapesSpec(**TINY)) == root
    assert _files(root) == expected


def test_ensure_shapes_race_ends_with_one_valid_folder(tmp_path, monkeypatch):
    """Two generators finish together; whoever renames second keeps the winner's folder."""
    barrier = threading.Barrier(2, timeout=30)
    real = shapes._move_into_place

    def in_step(tmp, final):
        barrier.wait()
        real(tmp, final)

    monkeypatch.setattr(shapes, "_move_into_place", in_step)
    results, errors = [], []

    def run():
        try:
            results.append(ensure_shapes(tmp_path, ShapesSpec(**TINY)))
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]
    assert COCO(str(results[0] / "annotations" / "instances_val.json")).getImgIds() == [1, 2]


def test_object_size_sets_the_range_of_object_diameters(tmp_path):
    small = ensure_shapes(tmp_path, ShapesSpec(num_train=6, num_val=1, image_size=64, object_size=(10, 16), seed=3))
    large = ensure_shapes(tmp_path, ShapesSpec(num_train=6, num_val=1, image_size=64, object_size=(60, 70), seed=3))
    assert small != large

    def widths(root):
        anns = json.loads((root / "annotations" / "instances_train.json").read_text())["annotations"]
        return [max(a["bbox"][2], a["bbox"][3]) for a in anns if isinstance(a["segmentation"], list)]

    # At 64 px, diameters scale by 0.5: unoccluded objects are at most 8 px vs at least ~20 px wide.
    assert max(widths(small)) <= 8.5 < 20 <= min(widths(large))
    with pytest.raises(ValueError, match="object_size"):
        ShapesSpec(object_size=(30, 20))


@pytest.mark.parametrize("min_visible", [0.25, 0.7])
def test_min_visible_bounds_the_occlusion_of_every_object(min_visible):
    occluded = 0
    for i in range(20):
        spec = ShapesSpec(image_size=96, max_objects=6, min_visible=min_visible)
        _, drawn = shapes._render(np.random.default_rng(i), spec)
        for shape in drawn:
            assert shape.visible.sum() >= min_visible * shape.full.sum()
            occluded += int(shape.visible.sum() < shape.full.sum())
    assert occluded > 0  # the bound is exercised, not vacuous


def test_min_visible_one_means_no_occlusion(tmp_path):
    root = ensure_shapes(tmp_path, ShapesSpec(num_train=8, num_val=1, image_size=64, min_visible=1.0, max_objects=6))
    anns = json.loads((root / "annotations" / "instances_train.json").read_text())["annotations"]
    assert len(anns) > 8 and all(isinstance(a["segmentation"], list) for a in anns)  # polygons: nothing covered
    with pytest.raises(ValueError, match="min_visible"):
        ShapesSpec(min_visible=0.0)
