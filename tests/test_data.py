"""COCO-format data: loading, crowd/empty/degenerate handling, transforms, samplers, bad input."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes

from conftest import SHARED_DATA
from iemask.data.base import DatasetError, collate_detection
from iemask.data.coco import COCODataModule, COCOInstanceDataset
from iemask.data.samplers import GroupedBatchSampler, InferenceSampler, TrainingSampler, aspect_ratio_groups
from iemask.data.transforms import build_eval_transforms, build_train_transforms, train_short_sides
from iemask.evaluation import get_protocol


@pytest.fixture
def coco_folder(shapes_cache, tmp_path):
    """A copy of the tiny shapes dataset's val split, edited to hold every COCO case.

    Adds: a crowd region (RLE, iscrowd=1), an image without annotations, a degenerate
    annotation (a 2-point polygon), and keeps shapes' polygons and RLEs.
    """
    (source,) = [p for p in shapes_cache.iterdir() if p.name.startswith("shapes-")]
    root = tmp_path / "coco"
    shutil.copytree(source, root)
    path = root / "annotations" / "instances_val.json"
    data = json.loads(path.read_text())
    size = data["images"][0]["height"]
    crowd = np.zeros((size, size), dtype=np.uint8, order="F")
    crowd[2:14, 40:60] = 1
    rle = mask_utils.encode(crowd)
    rle["counts"] = rle["counts"].decode()
    next_id = max(a["id"] for a in data["annotations"]) + 1
    data["annotations"] += [
        {"id": next_id, "image_id": 1, "category_id": 1, "iscrowd": 1, "segmentation": rle,
         "area": float(crowd.sum()), "bbox": [40.0, 2.0, 20.0, 12.0]},
        {"id": next_id + 1, "image_id": 2, "category_id": 2, "iscrowd": 0, "segmentation": [[1.0, 1.0, 5.0, 5.0]],
         "area": 0.0, "bbox": [1.0, 1.0, 4.0, 4.0]},
    ]  # fmt: skip
    empty_id = 3
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != empty_id]
    path.write_text(json.dumps(data))
    return root, path, empty_id, next_id


def test_dataset_items_are_aligned_tv_tensors(coco_folder):
    root, ann, _, _ = coco_folder
    ds = COCOInstanceDataset(root / "val", ann)
    image, target = ds[0]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape[0] == 3
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes) and isinstance(target["masks"], tv_tensors.Mask)
    n = len(target["labels"])
    assert target["masks"].shape == (n, *image.shape[-2:]) and target["boxes"].shape == (n, 4)
    assert set(target["labels"].tolist()) <= {1, 2, 3}
    # Boxes come from the annotations; they enclose the decoded masks (within COCO's rounding).
    mask_boxes = masks_to_boxes(target["masks"])
    assert torch.allclose(mask_boxes[:, :2], target["boxes"][:, :2], atol=1.0)
    assert torch.allclose(mask_boxes[:, 2:] + 1, target["boxes"][:, 2:], atol=1.0)
    assert ds.class_names == ["circle", "square", "triangle"] and ds.category_ids == [1, 2, 3]


def test_polygons_and_rle_decode_like_pycocotools(coco_folder):
    from pycocotools.coco import COCO

    root, ann, _, _ = coco_folder
    ds = COCOInstanceDataset(root / "val", ann)
    coco = COCO(str(ann))
    kinds = set()
    for image_id in ds.ids[:4]:
        anns = ds.annotations[image_id]
        info = ds.images[image_id]
        masks = ds.decode_masks(anns, info["height"], info["width"])
        for a, m in zip(anns, masks, strict=True):
            kinds.add("poly" if isinstance(a["segmentation"], list) else "rle")
            np.testing.assert_array_equal(m, coco.annToMask(a))
    assert kinds == {"poly", "rle"}


def test_crowd_regions_are_not_training_targets_and_empty_images_are_skipped_in_training(coco_folder, caplog):
    root, ann, empty_id, crowd_id = coco_folder
    with caplog.at_level(logging.WARNING):
        train = COCOInstanceDataset(root / "val", ann, train=True)
    val = COCOInstanceDataset(root / "val", ann, train=False)
    assert empty_id not in train.ids and empty_id in val.ids
    assert len(val) == len(train) + 1
    assert all(a["id"] != crowd_id for anns in val.annotations.values() for a in anns)  # crowd kept out
    assert str(crowd_id + 1) in caplog.text and "degenerate" in caplog.text  # the 2-point polygon
    _, target = val[val.ids.index(empty_id)]
    assert target["boxes"].shape == (0, 4) and target["masks"].shape[0] == 0


def test_train_transforms_keep_masks_and_boxes_aligned(coco_folder):
    root, ann, _, _ = coco_folder
    ds = COCOInstanceDataset(root / "val", ann, transforms=build_train_transforms([96], 1000, hflip_prob=1.0))
    raw = COCOInstanceDataset(root / "val", ann)
    image, target = ds[0]
    raw_image, raw_target = raw[0]
    assert image.dtype == torch.float32 and image.shape[-2:] == (96, 96) and 0 <= image.min() <= image.max() <= 1
    # Flipped and resized together: the mask's bounding box still matches the box.
    mask_boxes = masks_to_boxes(target["masks"])
    assert torch.allclose(mask_boxes[:, :2], target["boxes"][:, :2], atol=2.0)
    assert torch.allclose(mask_boxes[:, 2:] + 1, target["boxes"][:, 2:], atol=2.0)
    # Horizontal flip: x1' = W - x2 (scaled by 96/64).
    scale = 96 / raw_image.shape[-1]
    torch.testing.assert_close(target["boxes"][:, 0], 96 - raw_target["boxes"][:, 2] * scale, atol=1e-3, rtol=0)
    # The image moved with the masks: pixel colours under the first mask match.
    flipped = torch.flip(image, dims=[-1])
    m = torch.flip(target["masks"][0].bool(), dims=[-1])
    resized_raw = torch.nn.functional.interpolate(raw_image[None].float() / 255, size=(96, 96), mode="bilinear")[0]
    assert torch.allclose(flipped[:, m].mean(1), resized_raw[:, m].mean(1), atol=0.05)


def test_short_side_sampling_choices():
    assert train_short_sides([640, 800], "range") == list(range(640, 801))
    assert train_short_sides([640, 672], "choice") == [640, 672]
    assert train_short_sides(800) == [800]
    with pytest.raises(ValueError, match="range"):
        train_short_sides([800, 640], "range")
    with pytest.raises(ValueError, match="sampling"):
        train_short_sides([800], "uniform")


def test_eval_transforms_only_convert_to_float(coco_folder):
    root, ann, _, _ = coco_folder
    image, target = COCOInstanceDataset(root / "val", ann, transforms=build_eval_transforms())[0]
    raw, raw_target = COCOInstanceDataset(root / "val", ann)[0]
    torch.testing.assert_close(image, raw.float() / 255)
    torch.testing.assert_close(target["boxes"], raw_target["boxes"])


def test_inference_sampler_shards_exactly():
    for size, world in [(10, 3), (2, 4), (7, 1), (100, 8)]:
        shards = [list(InferenceSampler(size, rank=r, world_size=world)) for r in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(size))


def test_training_sampler_is_seeded_per_epoch_and_splits_ranks():
    a, b = (
        TrainingSampler(10, seed=3, rank=0, world_size=2),
        TrainingSampler(10, seed=3, rank=1, world_size=2),
    )
    first = list(a)
    assert sorted(first + list(b)) == list(range(10)) and len(a) == 5
    a.set_epoch(1)
    assert list(a) != first
    a.set_epoch(0)
    assert list(a) == first
    odd = [TrainingSampler(7, seed=0, rank=r, world_size=2) for r in range(2)]
    assert [len(list(s)) for s in odd] == [4, 4]


def test_grouped_batches_share_aspect_ratio_and_have_the_promised_length():
    groups = aspect_ratio_groups([1.5, 0.5, 1.2, 0.7, 1.0, 0.6, 2.0, 0.9, 1.1])
    sampler = TrainingSampler(len(groups), seed=0)
    batches = list(GroupedBatchSampler(sampler, groups, batch_size=2))
    assert len(batches) == len(GroupedBatchSampler(sampler, groups, 2)) == 4
    homogeneous = [b for b in batches if len({groups[i] for i in b}) == 1]
    assert len(homogeneous) >= 3  # only the leftovers at the end may mix
    assert all(len(b) == 2 for b in batches)


def test_datamodule_loads_batches_and_builds_the_evaluator(coco_folder):
    root, _, _, _ = coco_folder
    dm = COCODataModule(
        root, "val", "annotations/instances_val.json", "val", "annotations/instances_val.json",
        num_classes=3, batch_size=2, num_workers=0, train_min_size=[64], max_size=64,
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    assert len(images) == 2 and all(i.dtype == torch.float32 for i in images)
    assert all("image_id" in t for t in targets)
    val_batches = list(dm.val_dataloader())
    assert sum(len(b[0]) for b in val_batches) == len(dm.val_set)
    assert get_protocol(dm.protocol).build_evaluator(dm.val_set).category_ids == [1, 2, 3]
    assert collate_detection([(1, {"a": 1}), (2, {"a": 2})]) == ([1, 2], [{"a": 1}, {"a": 2}])


def test_wrong_class_count_is_named(coco_folder):
    root, _, _, _ = coco_folder
    dm = COCODataModule(root, "val", "annotations/instances_val.json", "val", "annotations/instances_val.json",
                        num_classes=80, num_workers=0)  # fmt: skip
    with pytest.raises(DatasetError, match=r"data\.num_classes=3"):
        dm.setup("fit")


# ---- bad input ------------------------------------------------------------------------------
def test_missing_root_names_the_expected_layout(tmp_path):
    dm = COCODataModule(tmp_path / "nowhere", num_classes=80)
    with pytest.raises(FileNotFoundError, match=r"train2017/ and annotations/instances_train2017\.json"):
        dm.prepare_data()


def test_missing_annotation_file_is_named(coco_folder):
    root, _, _, _ = coco_folder
    dm = COCODataModule(root, num_classes=3)
    with pytest.raises(FileNotFoundError, match=r"instances_train2017\.json"):
        dm.setup("fit")


def test_corrupt_image_names_file_and_id(coco_folder):
    root, ann, _, _ = coco_folder
    ds = COCOInstanceDataset(root / "val", ann)
    image_id = ds.ids[0]
    bad = root / "val" / ds.images[image_id]["file_name"]
    bad.write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match=rf"{bad.name}.*image id {image_id}"):
        ds[0]


def test_image_size_mismatch_is_reported(coco_folder):
    root, ann, _, _ = coco_folder
    data = json.loads(ann.read_text())
    data["images"][0]["width"] += 10
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="says"):
        COCOInstanceDataset(root / "val", ann)[0]


def test_unknown_category_id_is_named(coco_folder):
    root, ann, _, _ = coco_folder
    data = json.loads(ann.read_text())
    data["annotations"][0]["category_id"] = 99
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=rf"annotation id {data['annotations'][0]['id']}: category_id 99"):
        COCOInstanceDataset(root / "val", ann)


def test_invalid_json_is_named(coco_folder):
    root, ann, _, _ = coco_folder
    ann.write_text("{not json")
    with pytest.raises(DatasetError, match=r"instances_val\.json is not valid json"):
        COCOInstanceDataset(root / "val", ann)


def test_annotation_that_decodes_empty_is_skipped_with_a_warning(coco_folder, caplog):
    root, ann, _, _ = coco_folder
    data = json.loads(ann.read_text())
    target_ann = next(a for a in data["annotations"] if a["image_id"] == 1 and not a.get("iscrowd"))
    target_ann["segmentation"] = [[200.0, 200.0, 210.0, 200.0, 205.0, 210.0]]  # outside the 64-px image
    ann.write_text(json.dumps(data))
    ds = COCOInstanceDataset(root / "val", ann)
    n = len(ds.annotations[1])
    with caplog.at_level(logging.WARNING):
        _, target = ds[ds.ids.index(1)]
    assert len(target["labels"]) == n - 1
    assert str(target_ann["id"]) in caplog.text and "empty" in caplog.text


# ---- real COCO files ------------------------------------------------------------------------
@pytest.mark.skipif(not (SHARED_DATA / "tiny_coco").is_dir(), reason=f"{SHARED_DATA / 'tiny_coco'} is not present")
def test_real_coco_images_and_annotations_load():
    root = SHARED_DATA / "tiny_coco"
    ds = COCOInstanceDataset(root / "val2017", root / "annotations" / "instances_val2017.json", train=True)
    assert len(ds.category_ids) == 80
    crowd_ids = {
        a["id"]
        for a in json.loads((root / "annotations" / "instances_val2017.json").read_text())["annotations"]
        if a["iscrowd"]
    }
    assert crowd_ids and not any(a["id"] in crowd_ids for anns in ds.annotations.values() for a in anns)
    image, target = ds[0]
    info = ds.images[ds.ids[0]]
    assert image.shape == (3, info["height"], info["width"])
    assert target["masks"].shape[0] == len(target["labels"]) > 0
    assert target["masks"].flatten(1).any(1).all()
