"""Compact annotation records: exact items, numpy-only storage, a data set about its json's size, flat workers."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors

from conftest import SHARED_DATA
from iemask.data.coco import COCOInstanceDataset, rasterisation_exact_float32
from iemask.data.image_io import write_png
from iemask.data.lvis import LVISInstanceDataset
from iemask.data.records import SerializedList

SMAPS = Path("/proc/self/smaps_rollup")
MB = 2**20


# ---- the reference: a straightforward parse of the json -------------------------------------------------
def _usable(ann: dict) -> bool:
    """The documented target policy: not crowd, a box of at least 1 px, an RLE or polygons of >= 3 points."""
    seg = ann["segmentation"]
    valid = isinstance(seg, dict) or (bool(seg) and all(len(p) >= 6 and len(p) % 2 == 0 for p in seg))
    return not ann.get("iscrowd", 0) and ann["bbox"][2] >= 1 and ann["bbox"][3] >= 1 and valid


def reference_targets(annotation_file: Path, train: bool) -> list[dict]:
    """Every item's target as pycocotools' COCO index and ``annToMask`` give it, in image-id order; empty masks
    dropped; in training, images without a usable annotation left out."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(annotation_file))
    category_ids = sorted(coco.cats)
    targets = []
    for image_id in sorted(coco.imgs):
        anns = [a for a in coco.imgToAnns[image_id] if _usable(a)]
        if train and not anns:
            continue
        info = coco.imgs[image_id]
        kept = [(a, m) for a in anns if (m := coco.annToMask(a)).any()]
        boxes = torch.tensor([a["bbox"] for a, _ in kept], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        masks = np.stack([m for _, m in kept]) if kept else np.zeros((0, info["height"], info["width"]), np.uint8)
        labels = torch.tensor([category_ids.index(a["category_id"]) + 1 for a, _ in kept], dtype=torch.int64)
        targets.append({"image_id": image_id, "boxes": boxes, "labels": labels, "masks": masks})
    return targets


def assert_same_targets(ds: COCOInstanceDataset, reference: list[dict], items: bool) -> None:
    """``ds`` has the reference's items: through ``ds[i]`` (with its image) when ``items``, else ``ds.target``."""
    assert ds.ids == [r["image_id"] for r in reference]
    for index, expected in enumerate(reference):
        if items:
            image, target = ds[index]
            assert image.shape[-2:] == expected["masks"].shape[-2:]
        else:
            target = ds.target(expected["image_id"])
        assert type(target["image_id"]) is int and target["image_id"] == expected["image_id"]
        assert target["boxes"].dtype == torch.float32 and torch.equal(target["boxes"], expected["boxes"])
        assert torch.equal(target["labels"], expected["labels"])
        np.testing.assert_array_equal(target["masks"].numpy(), expected["masks"], err_msg=str(expected["image_id"]))


# ---- a generated COCO file with every kind of segmentation -------------------------------------------
def _polygon(rng: np.random.Generator, height: int, width: int, points: int, scale: float = 0.3) -> list[float]:
    """A star-shaped polygon of ``points`` points inside (mostly) the image, two decimals as in COCO files."""
    centre = rng.uniform([0.2 * width, 0.2 * height], [0.8 * width, 0.8 * height])
    angles = np.sort(rng.uniform(0, 2 * np.pi, points))
    radii = rng.uniform(0.3, 1.0, points) * scale * min(height, width)
    xy = centre + radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (points, 2)
    return np.round(xy, 2).ravel().tolist()


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (``counts`` a list, column-major runs starting with zeros) of an (H, W) mask."""
    flat = mask.ravel(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"size": list(mask.shape), "counts": [0, *counts] if flat[0] else counts}


def _box(polygons: list[list[float]]) -> list[float]:
    xy = np.concatenate([np.reshape(p, (-1, 2)) for p in polygons])
    (x0, y0), (x1, y1) = xy.min(0), xy.max(0)
    return [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)]


@pytest.fixture(scope="module")
def generated_coco(tmp_path_factory) -> tuple[Path, Path, dict[str, int]]:
    """``(image folder, json, image ids by case)``: images listed out of id order, category ids unsorted and
    sparse; single and multi-part polygons, compressed and uncompressed RLE, crowd, degenerate and empty ones."""
    root = tmp_path_factory.mktemp("generated-coco")
    rng = np.random.default_rng(0)
    sizes = {42: (40, 56), 7: (64, 48), 1000: (33, 70), 3: (50, 50), 18: (48, 64), 5: (40, 40), 9: (60, 30)}
    case = {"polygons": 42, "multipart": 7, "rle": 1000, "crowd_only": 3, "no_annotations": 18, "empty_mask": 5}
    case["integers"] = 9
    category_ids = [11, 3, 20, 7]
    images, annotations = [], []

    def add(image_id: int, segmentation, bbox=None, iscrowd: int = 0) -> None:
        annotations.append({"id": 500 + len(annotations), "image_id": image_id, "iscrowd": iscrowd, "area": 1.0,
                            "bbox": bbox or _box(segmentation), "category_id": category_ids[len(annotations) % 4],
                            "segmentation": segmentation})  # fmt: skip

    for image_id, (h, w) in sizes.items():
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w})
        write_png(torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)), root / f"{image_id}.png")
    for _ in range(40):
        add(case["polygons"], [_polygon(rng, *sizes[case["polygons"]], int(rng.integers(8, 41)))])
    for _ in range(15):
        add(case["multipart"], [_polygon(rng, *sizes[case["multipart"]], 8, 0.15) for _ in range(rng.integers(2, 4))])
    h, w = sizes[case["rle"]]
    for k in range(4):
        mask = np.zeros((h, w), np.uint8)
        mask[3 + k : 20 + 2 * k, 5 * k : 30 + 5 * k] = 1
        compressed = mask_utils.encode(np.asfortranarray(mask))
        rle = _uncompressed_rle(mask) if k % 2 else compressed | {"counts": compressed["counts"].decode()}
        add(case["rle"], rle, bbox=mask_utils.toBbox(compressed).tolist())
    add(case["rle"], [_polygon(rng, h, w, 12)])
    add(case["rle"], _uncompressed_rle(np.ones((h, w), np.uint8)), bbox=[0.0, 0.0, w, h], iscrowd=1)
    add(case["crowd_only"], [_polygon(rng, 50, 50, 10)], iscrowd=1)
    add(case["empty_mask"], [[100.0, 100.0, 120.0, 100.0, 110.0, 130.0]], bbox=[100.0, 100.0, 20.0, 30.0])
    add(case["empty_mask"], [_polygon(rng, 40, 40, 9)], bbox=[1.0, 1.0, 0.5, 8.0])  # degenerate box
    add(case["integers"], [[2, 3, 20, 3, 20, 40, 2, 40]])
    add(case["integers"], [[1.0, 1.0, 5.0, 5.0]], bbox=[1.0, 1.0, 4.0, 4.0])  # a 2-point polygon: skipped
    rng.shuffle(annotations)
    categories = [{"id": c, "name": f"class {c}"} for c in category_ids]
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root, path, case


@pytest.mark.parametrize("train", [False, True])
def test_items_equal_a_straightforward_parse_of_the_json(generated_coco, train, caplog):
    image_dir, path, case = generated_coco
    with caplog.at_level(logging.WARNING):
        ds = COCOInstanceDataset(image_dir, path, train=train)
        assert_same_targets(ds, reference_targets(path, train), items=True)
    assert case["no_annotations"] not in ds.ids if train else case["no_annotations"] in ds.ids
    assert case["crowd_only"] not in ds.ids if train else case["crowd_only"] in ds.ids
    assert case["empty_mask"] in ds.ids  # its one usable annotation decodes empty: an item without targets
    assert "decode to empty masks" in caplog.text and "degenerate" in caplog.text
    assert ds.category_ids == [3, 7, 11, 20] and ds.class_names == [f"class {c}" for c in (3, 7, 11, 20)]
    images = json.loads(path.read_text())["images"]
    by_id = {i["id"]: i for i in images}
    assert ds.aspect_ratios() == [by_id[i]["width"] / by_id[i]["height"] for i in ds.ids]
    assert ds.image_paths() == [image_dir / by_id[i]["file_name"] for i in ds.ids]
    assert ds.image_path(1000) == image_dir / "1000.png"
    problems = {i: ds.annotation_problems(i) for i in ds.ids}
    assert [kind for found in problems.values() for kind, _ in found] == ["skipped_annotation"]
    assert "decodes to an empty mask" in problems[case["empty_mask"]][0][1]


def test_views_give_the_json_fields_of_every_image_and_usable_annotation(generated_coco):
    image_dir, path, _ = generated_coco
    data = json.loads(path.read_text())
    ds = COCOInstanceDataset(image_dir, path)
    assert sorted(ds.images) == sorted(i["id"] for i in data["images"]) and len(ds.annotations) == len(data["images"])
    for info in data["images"]:
        assert ds.images[info["id"]] == info
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(path))
    for image_id, anns in ds.annotations.items():
        expected = [a for a in coco.imgToAnns[image_id] if _usable(a)]
        assert [a["id"] for a in anns] == [a["id"] for a in expected]
        for ann, source in zip(anns, expected, strict=True):
            assert ann["category_id"] == source["category_id"] and ann["image_id"] == image_id
            np.testing.assert_array_equal(np.float32(ann["bbox"]), np.float32(source["bbox"]))
            np.testing.assert_array_equal(coco.annToMask(ann), coco.annToMask(source))
    with pytest.raises(KeyError):
        ds.images[999]
    with pytest.raises(KeyError):
        ds.annotations["42"]


def test_rasterisation_exact_float32_keeps_pycocotools_masks():
    rng = np.random.default_rng(1)
    coords = np.round(rng.uniform(-5, 700, 200_000), 2)  # two decimals, as COCO and LVIS files have them

    def snapped(values: np.ndarray) -> np.ndarray:
        return (5.0 * values.astype(np.float64) + 0.5).astype(np.int64)  # pycocotools' 1/5-pixel grid

    stored = rasterisation_exact_float32(coords)
    assert stored.dtype == np.float32 and np.array_equal(snapped(stored), snapped(coords))
    assert np.abs(stored.astype(np.float64) - coords).max() < 1e-4  # a float32 step at most
    assert not np.array_equal(snapped(coords.astype(np.float32)), snapped(coords))  # plain rounding would differ
    # ... and it changes masks: polygons with plain float32 coordinates decode differently, the stored ones do not.
    polygons = [_polygon(rng, 300, 400, 32) for _ in range(40)]

    def decode(polygon) -> np.ndarray:
        return mask_utils.decode(mask_utils.frPyObjects([polygon], 300, 400))

    exact = [decode(p) for p in polygons]
    assert any((decode(np.float32(p)) != m).any() for p, m in zip(polygons, exact, strict=True))
    assert all(
        np.array_equal(decode(rasterisation_exact_float32(np.array(p))), m)
        for p, m in zip(polygons, exact, strict=True)
    )


def test_polygons_of_other_things_than_numbers_are_kept_as_read_and_reported_as_before(tmp_path):
    good = [2.5, 3.0, 20.25, 3.0, 20.0, 15.5, 2.0, 15.0]
    odd = [[2.0, "x", 20.0, 3.0, 20.0, 15.0]], [[[2.0, 3.0], [20.0, 3.0], [20.0, 15.0], [2.0, 15.0], [5, 5], [6, 6]]]
    anns = [{"id": 1 + i, "image_id": 1, "category_id": 1, "bbox": [2.0, 3.0, 18.0, 12.0], "segmentation": seg}
            for i, seg in enumerate([[good], *odd])]  # fmt: skip
    data = {"images": [{"id": 1, "file_name": "1.png", "height": 20, "width": 30}], "annotations": anns,
            "categories": [{"id": 1, "name": "a"}]}  # fmt: skip
    (tmp_path / "instances.json").write_text(json.dumps(data))
    ds = COCOInstanceDataset(tmp_path, tmp_path / "instances.json")
    stored = ds.annotations[1]
    assert stored[0]["segmentation"][0].dtype == np.float32 and [a["segmentation"] for a in stored[1:]] == list(odd)
    problems = ds.annotation_problems(1)  # as from the json: pycocotools fails on both
    assert [kind for kind, _ in problems] == ["bad_annotation", "bad_annotation"]
    assert "annotation id 2 (image id 1): its segmentation cannot be decoded (could not convert" in problems[0][1]
    assert "annotation id 3 (image id 1): its segmentation cannot be decoded" in problems[1][1]


REAL_FILES = [
    ("tiny_coco/annotations/instances_val2017.json", "tiny_coco/val2017"),
    ("tiny_coco/annotations/instances_train2017.json", "tiny_coco/train2017"),
    ("coco_val2014_100/instances_val2014_100.json", None),  # annotations only: targets without images
]


@pytest.mark.parametrize(("annotations", "images"), REAL_FILES)
def test_real_coco_files_give_the_reference_targets(annotations, images, tmp_path):
    path = SHARED_DATA / annotations
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    image_dir = SHARED_DATA / images if images else tmp_path
    ds = COCOInstanceDataset(image_dir, path, train=images is not None)  # all images of the annotations-only file
    assert_same_targets(ds, reference_targets(path, ds.train), items=images is not None)


# ---- storage ---------------------------------------------------------------------------------------------
def test_serialized_list_round_trips_and_holds_only_numpy_arrays():
    records = [
        {"file_name": "a.jpg", "boxes": np.arange(8, dtype=np.float32).reshape(2, 4), "rle": {"counts": "x1"}},
        None,
        ("tuple", [1, 2.5, "three"]),
        {"coords": np.zeros(0, dtype=np.float32)},
        "é" * 1000,
    ]
    store = SerializedList(records)
    assert len(store) == len(records) and store.nbytes > 1000
    for got, expected in zip(store, records, strict=True):
        if isinstance(expected, dict):
            assert got.keys() == expected.keys()
            assert all(
                np.array_equal(got[k], v) if isinstance(v, np.ndarray) else got[k] == v for k, v in expected.items()
            )
        else:
            assert got == expected
    assert store[-1] == records[-1] and store[0] is not store[0]  # each read is a fresh copy
    with pytest.raises(IndexError):
        store[len(records)]
    assert {type(v) for v in vars(store).values()} == {np.ndarray}  # no Python object per record
    assert store.nbytes == sum(v.nbytes for v in vars(store).values())
    assert len(SerializedList([])) == 0 and list(SerializedList([])) == []


def stored_bytes(dataset: object) -> int:
    """What ``dataset`` holds: its numpy arrays (also inside its serialised lists) and its Python lists."""
    total = 0
    for value in vars(dataset).values():
        if isinstance(value, np.ndarray | SerializedList):
            total += value.nbytes
        elif isinstance(value, list):
            total += sys.getsizeof(value) + sum(sys.getsizeof(v) for v in value)
    return total


def assert_compact(dataset: object, records: int) -> None:
    """No attribute of ``dataset`` holds a Python object per annotation: containers are at most ``records`` long,
    and every serialised list holds numpy arrays only."""
    for name, value in vars(dataset).items():
        if isinstance(value, SerializedList):
            assert all(isinstance(v, np.ndarray) for v in vars(value).values()), name
        elif isinstance(value, list | dict | set | tuple):
            assert len(value) <= records, name


def _random_polygons(rng: np.random.Generator, count: int, size: tuple[int, int]) -> tuple[list, np.ndarray]:
    """``count`` star-shaped polygons of 8-40 points (two decimals) in an image of ``size``, and their xywh boxes."""
    height, width = size
    points = rng.integers(8, 41, count)  # (count,)
    owner = np.repeat(np.arange(count), points)  # (P,) the polygon of each point
    centres = rng.uniform([0.2 * width, 0.2 * height], [0.8 * width, 0.8 * height], (count, 2))
    radii = rng.uniform(0.3, 1.0, len(owner)) * (rng.uniform(0.05, 0.4, count) * min(size))[owner]
    angles = rng.uniform(0, 2 * np.pi, len(owner))
    order = np.lexsort((angles, owner))  # points by polygon, then by angle: a simple polygon
    xy = centres[owner] + radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], 1)  # (P, 2)
    xy = np.round(np.clip(xy, 0, [width, height]), 2)[order]
    starts = np.concatenate([[0], np.cumsum(points)[:-1]])
    low, high = np.minimum.reduceat(xy, starts), np.maximum.reduceat(xy, starts)  # (count, 2) each
    polygons = [p.tolist() for p in np.split(xy.ravel(), 2 * np.cumsum(points)[:-1])]
    return polygons, np.round(np.concatenate([low, high - low], axis=1), 2)


def write_lvis_shaped(path: Path, num_images: int, num_annotations: int, size: tuple[int, int], seed: int) -> None:
    """An LVIS v1-format json: 1203 categories, images with coco_urls in train2017, polygons of 8-40 points."""
    rng = np.random.default_rng(seed)
    height, width = size
    images = [
        {"id": i, "height": height, "width": width, "license": 1, "date_captured": "2013-11-14 11:18:45",
         "coco_url": f"http://images.cocodataset.org/train2017/{i:012d}.jpg",
         "flickr_url": f"http://farm4.staticflickr.com/1/{i}_0123456789_z.jpg",
         "neg_category_ids": np.sort(rng.choice(1203, 6, replace=False) + 1).tolist(),
         "not_exhaustive_category_ids": [int(rng.integers(1, 1204))]}
        for i in range(1, num_images + 1)
    ]  # fmt: skip
    polygons, boxes = _random_polygons(rng, num_annotations, size)
    image_ids, category_ids = rng.integers(1, num_images + 1, num_annotations), rng.integers(1, 1204, num_annotations)
    annotations = [
        {"area": round(box[2] * box[3] * 0.6, 2), "id": ann_id, "segmentation": [polygon], "image_id": image_id,
         "bbox": box, "category_id": category_id}
        for ann_id, polygon, box, image_id, category_id in zip(
            range(1, num_annotations + 1), polygons, boxes.tolist(), image_ids.tolist(), category_ids.tolist(),
            strict=True)
    ]  # fmt: skip
    categories = [
        {"id": c, "name": f"category_{c}", "synset": f"category_{c}.n.01", "synonyms": [f"category_{c}"],
         "def": "a thing of a kind", "frequency": "rcf"[c % 3], "image_count": 10, "instance_count": 20}
        for c in range(1, 1204)
    ]  # fmt: skip
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations,
                                "categories": categories}))  # fmt: skip


def test_lvis_shaped_dataset_holds_at_most_its_json_size(tmp_path):
    (tmp_path / "train2017").mkdir()
    path = tmp_path / "lvis_v1_train.json"
    write_lvis_shaped(path, num_images=1600, num_annotations=20_000, size=(480, 640), seed=0)
    ds = LVISInstanceDataset(tmp_path, path, train=True)
    assert len(ds.images) == 1600 and sum(len(a) for a in ds.annotations.values()) == 20_000
    assert_compact(ds, records=max(len(ds.images), len(ds.category_ids)))
    size = stored_bytes(ds)
    assert size <= 1.2 * path.stat().st_size, (size / MB, path.stat().st_size / MB)


def test_cityscapes_images_are_compact_records(tmp_path):
    from test_cityscapes import write_dataset

    write_dataset(tmp_path)
    from iemask.data.cityscapes import CityscapesImage, CityscapesInstanceDataset

    ds = CityscapesInstanceDataset(tmp_path, "val")
    assert_compact(ds, records=max(len(ds.images), len(ds.category_ids)))
    assert all(isinstance(info, CityscapesImage) for info in ds.images.values())
    assert ds.aspect_ratios() == [ds.images[i].width / ds.images[i].height for i in ds.ids]
    assert ds.gt_files() == {i: info.gt_file for i, info in ds.images.items()}


# ---- copy-on-read ---------------------------------------------------------------------------------------
def private_bytes() -> int:
    """This process's private (not shared with its parent) resident memory."""
    fields = dict(line.split(":", 1) for line in SMAPS.read_text().splitlines()[1:])
    return sum(int(fields[key].split()[0]) for key in ("Private_Clean", "Private_Dirty")) * 1024


class _ConstantImages(LVISInstanceDataset):
    """No image files: a constant image, so that what a worker does is read annotations and decode masks."""

    def load_image(self, image_id: int) -> tv_tensors.Image:
        return tv_tensors.Image(torch.zeros(3, 64, 64, dtype=torch.uint8))


class _PrivateMemoryProbe(Dataset):
    """Item ``i``: the number of targets of the wrapped item ``i`` and the private memory after it."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, int]:
        _, target = self.dataset[index]
        return len(target["labels"]), private_bytes()


@pytest.mark.skipif(not SMAPS.is_file(), reason="reads /proc/self/smaps_rollup (Linux only)")
def test_a_loader_worker_does_not_copy_the_annotations(tmp_path):
    (tmp_path / "train2017").mkdir()
    path = tmp_path / "lvis_v1_train.json"
    write_lvis_shaped(path, num_images=300, num_annotations=18_000, size=(64, 64), seed=1)
    dataset = _ConstantImages(tmp_path, path, train=True)
    loader = DataLoader(
        _PrivateMemoryProbe(dataset),
        batch_size=None,
        num_workers=1,
        multiprocessing_context="fork",  # as Linux training forks its workers: they share the parent's pages
        worker_init_fn=lambda _: gc.freeze(),  # the inherited test process is not what is measured
    )
    counts, memory = zip(*loader, strict=True)
    assert list(counts) == [len(dataset.target(i)["labels"]) for i in dataset.ids]  # every item was read
    growth = memory[-1] - memory[20]  # after warming up
    assert growth < 20 * MB, f"a worker's private memory grew by {growth / MB:.1f} MB over {len(memory)} items"
