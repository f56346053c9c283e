"""COCO-format instance segmentation: the ``Dataset`` that reads images + ``instances_*.json``, and the COCO
data module.

Crowd regions are kept in the json for evaluation but never become training targets (torchvision's Mask R-CNN
has no ignore label); in training, images without a usable annotation are skipped, as Detectron2 does. The parsed
json is not kept: images and annotations live in compact numpy-backed records (:mod:`iemask.data.records`).
:class:`COCOFormatFiles` is what the COCO-format data modules (COCO, shapes, LVIS) share of their layout.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset
from torchvision import tv_tensors

from iemask.data.base import (
    DatasetError,
    DetectionDataModule,
    check_on_bad_image,
    load_item_image,
    load_json,
    require_file,
)
from iemask.data.image_io import ImageDecodeError, read_rgb
from iemask.data.records import RecordView, SerializedList, release_freed_memory, sorted_position
from iemask.utils.memory import gc_paused

log = logging.getLogger(__name__)


class ImageSizeError(DatasetError):
    """An image decodes to another size than its annotation file says."""


def _annotation_defect(ann: dict) -> str | None:
    """Why a non-crowd annotation cannot be a training target (checked without decoding), or None."""
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, dict):  # RLE, compressed or not
        if "counts" not in segmentation or "size" not in segmentation:
            return "its RLE segmentation lacks 'counts' or 'size'"
    elif isinstance(segmentation, list):
        if not segmentation or not all(len(p) >= 6 and len(p) % 2 == 0 for p in segmentation):
            return "its polygon segmentation is empty or has a polygon of fewer than 3 points"
    else:
        return f"its segmentation is {type(segmentation).__name__}, neither polygons nor RLE"
    if ann["bbox"][2] < 1 or ann["bbox"][3] < 1:
        return f"its box {ann['bbox']} is degenerate (width or height below 1 px)"
    return None


def _snap(coords: np.ndarray) -> np.ndarray:
    """pycocotools' polygon rasterisation snaps each coordinate to ``(int)(5 * x + 0.5)`` (truncating), in double."""
    return (5.0 * coords + 0.5).astype(np.int64)


def rasterisation_exact_float32(polygon: np.ndarray) -> np.ndarray:
    """A float64 polygon ``(x0, y0, x1, y1, ...)`` as float32 that pycocotools rasterises to the very same mask.

    pycocotools draws a polygon on a 1/5-pixel grid: only ``(int)(5 * x + 0.5)`` of each coordinate counts.
    Plain rounding to float32 moves ~2% of two-decimal coordinates across a grid boundary, which changes edge
    pixels of about half of the masks; each such value is moved one float32 step back to the side its json
    value is on (a float32 is exact in double, so what is checked here is what pycocotools computes).
    """
    stored = polygon.astype(np.float32)
    wanted, got = _snap(polygon), _snap(stored.astype(np.float64))
    moved = wanted != got
    toward = np.where(got[moved] > wanted[moved], -np.inf, np.inf).astype(np.float32)
    stored[moved] = np.nextafter(stored[moved], toward)
    return stored


def _is_polygons(segmentation: Any) -> bool:
    """Whether a segmentation is a list of polygons (lists; their coordinates are checked by :func:`_coords`)."""
    return isinstance(segmentation, list) and all(isinstance(polygon, list) for polygon in segmentation)


def _coords(segmentations: list[list[list]]) -> np.ndarray | None:
    """Every coordinate of polygon segmentations as one flat float64 array (one conversion for an image, not one
    per polygon), or None if a coordinate is not a number (nested lists of equal length convert, but to 2-d)."""
    flat = []
    for segmentation in segmentations:
        for polygon in segmentation:
            flat.extend(polygon)
    try:
        coords = np.array(flat, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return coords if coords.ndim == 1 else None


def _pack_targets(anns: list[dict], label_of: Mapping[int, int]) -> dict[str, Any]:
    """One image's usable annotations as a few arrays: what items and checks read, nothing else (see
    :class:`COCOInstanceDataset`). Segmentations other than polygons of numbers (RLE, ...) are kept as read,
    so that decoding them fails or succeeds as it did from the json."""
    segmentations = [a["segmentation"] for a in anns]
    polygonal = [_is_polygons(s) for s in segmentations]
    coords = _coords([s for s, p in zip(segmentations, polygonal, strict=True) if p])
    if coords is None:  # some polygon holds something else than numbers: find which, keep those as read
        polygonal = [p and _coords([s]) is not None for s, p in zip(segmentations, polygonal, strict=True)]
        coords = _coords([s for s, p in zip(segmentations, polygonal, strict=True) if p])
    kinds = list(enumerate(zip(segmentations, polygonal, strict=True)))  # (index, (segmentation, is polygons))
    return {
        "ids": np.array([a["id"] for a in anns], dtype=np.int64),  # (N,) annotation ids
        "labels": np.array([label_of[a["category_id"]] for a in anns], dtype=np.int64),  # (N,) 1..K
        "boxes": np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4),  # (N, 4) x, y, w, h
        "polygons": np.array([len(s) if p else 0 for _, (s, p) in kinds], dtype=np.int32),  # (N,) 0: in verbatim
        "lengths": np.array([len(q) for _, (s, p) in kinds if p for q in s], dtype=np.int32),  # (P,) per polygon
        "coords": rasterisation_exact_float32(coords),  # (sum of lengths,) x0, y0, x1, y1, ... float32
        "verbatim": {i: s for i, (s, p) in kinds if not p},  # annotation index -> segmentation as read (RLE, ...)
    }


def _segmentations(targets: dict[str, Any]) -> list[Any]:
    """Each annotation's segmentation from :func:`_pack_targets`' record: float32 polygons, or as in the json."""
    polygons = iter(np.split(targets["coords"], np.cumsum(targets["lengths"])[:-1]))
    return [
        [next(polygons) for _ in range(count)] if count else targets["verbatim"][i]
        for i, count in enumerate(targets["polygons"].tolist())
    ]


def decode_segmentations(segmentations: Sequence[Any], height: int, width: int) -> np.ndarray:
    """Rasterise COCO polygons (lists of coordinate lists or arrays) or RLEs to an (N, H, W) uint8 array."""
    masks = np.zeros((len(segmentations), height, width), dtype=np.uint8)
    for i, seg in enumerate(segmentations):
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
        elif isinstance(seg["counts"], list):
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = seg
        with contextlib.redirect_stderr(io.StringIO()):
            masks[i] = mask_utils.decode(rle)
    return masks


class COCOInstanceDataset(Dataset):
    """Images and instance annotations of one COCO-format split.

    Each item is ``(image, target)``: ``image`` a ``tv_tensors.Image`` (uint8, 3×H×W) and
    ``target`` a dict with ``boxes`` (``BoundingBoxes``, XYXY pixels), ``labels`` (int64,
    contiguous 1..K), ``masks`` (``Mask``, N×H×W uint8) and ``image_id`` (int), ready for
    ``torchvision.transforms.v2``.

    The json is parsed once and dropped. What items and checks need stays in numpy arrays, with no Python
    object per image or annotation, so that forked data-loader workers share it without copying it (see
    :mod:`iemask.data.records`): every image's id and size, and one record per image in a
    :class:`~iemask.data.records.SerializedList` for its file name (and the fields :meth:`_image_record` keeps)
    and another for its usable annotations (ids, labels, float32 ``xywh`` boxes, polygons as float32
    coordinates that rasterise exactly as the json's, RLEs as read). :attr:`images` and :attr:`annotations`
    are read-only views built from them.

    Args:
        image_dir: folder holding the images named by ``file_name``.
        annotation_file: the ``instances_*.json``.
        transforms: a v2 transform applied to ``(image, target)``.
        train: skip images without a usable (non-crowd, non-degenerate) annotation.
        on_bad_image: ``raise`` on an image that cannot be loaded, or ``skip`` it: load the next item's image
            instead and list the failed path in ``target["skipped_files"]`` (see :func:`load_item_image`).
    """

    def __init__(
        self,
        image_dir: str | Path,
        annotation_file: str | Path,
        transforms: Callable | None = None,
        train: bool = False,
        on_bad_image: str = "raise",
    ):
        self.on_bad_image = check_on_bad_image(on_bad_image)
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_dir} (check data.root)")
        require_file(self.annotation_file, "annotation file", "Check data.root and the annotation file name.")
        self.transforms = transforms
        self.train = train
        with gc_paused():
            has_targets = self._build(load_json(self.annotation_file))  # the parsed json is freed on return
        # One int per item, made after the json is freed: made while it was alive, they would be scattered among
        # its freed memory and keep much of it from being returned (which release_freed_memory then does).
        self.ids = (self._image_ids[has_targets] if train else self._image_ids).tolist()
        release_freed_memory()
        if train:
            skipped = len(self._image_ids) - len(self.ids)
            if skipped:
                log.info(
                    "%s: %d image(s) without usable annotations skipped for training",
                    self.annotation_file,
                    skipped,
                )
        if not self.ids:
            raise DatasetError(f"{self.annotation_file} has no usable images{' for training' if train else ''}")

    def _build(self, data: dict[str, Any]) -> np.ndarray:
        """Check the parsed json and keep what items need as compact records; ``(I,)`` bool: whether each image
        (in id order) has a usable annotation."""
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise DatasetError(f"{self.annotation_file} has no {key!r} list: not a COCO instances file")
        categories = sorted(data["categories"], key=lambda c: c["id"])
        self._check_categories(categories)
        self.category_ids = [c["id"] for c in categories]
        self.class_names = [c["name"] for c in categories]
        label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        infos = {img["id"]: img for img in data["images"]}
        errors = [error for ann in data["annotations"] if (error := self._annotation_error(ann, infos, label_of))]
        if errors:
            raise DatasetError(
                f"{self.annotation_file}: {len(errors)} annotation(s) cannot be read: {'; '.join(errors[:10])}"
                f"{'; ...' if len(errors) > 10 else ''}. Fix or remove them"
            )
        # Annotations left out as training targets, with the reason: `python -m iemask.data.check` lists them.
        self.skipped_annotations: list[str] = []
        usable: dict[int, list[dict]] = {image_id: [] for image_id in infos}
        for ann in data["annotations"]:
            if ann.get("iscrowd", 0):
                continue
            defect = _annotation_defect(ann)
            if defect:
                self.skipped_annotations.append(f"annotation id {ann['id']} (image id {ann['image_id']}): {defect}")
                continue
            usable[ann["image_id"]].append(ann)
        if self.skipped_annotations:
            log.warning(
                "%s: skipped %d annotation(s) with an empty or degenerate mask or box (%s%s)",
                self.annotation_file,
                len(self.skipped_annotations),
                "; ".join(self.skipped_annotations[:3]),
                "; ..." if len(self.skipped_annotations) > 3 else "",
            )
        image_ids = sorted(infos)
        self._image_ids = np.array(image_ids, dtype=np.int64)  # (I,) every image's id, sorted: its position
        self._sizes = np.array([self._image_size(i, infos[i]) for i in image_ids], dtype=np.int64).reshape(-1, 2)
        self._image_records = SerializedList([self._image_record(i, infos[i]) for i in image_ids])
        self._targets = SerializedList([_pack_targets(usable[i], label_of) for i in image_ids])
        return np.array([bool(usable[i]) for i in image_ids], dtype=bool)

    def _check_categories(self, categories: list[dict]) -> None:
        """Subclasses check the file's categories (sorted by id) here; COCO needs nothing more than ids."""

    def _image_size(self, image_id: int, info: dict) -> tuple[int, int]:
        """``(height, width)`` of an image entry of the json."""
        try:
            return int(info["height"]), int(info["width"])
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{self.annotation_file}, image id {image_id}: no valid height and width ({e!r})") from e

    def _image_record(self, image_id: int, info: dict) -> dict[str, Any]:
        """What an image keeps of its json entry besides its id and size: its ``file_name``."""
        if "file_name" not in info:
            raise DatasetError(f"{self.annotation_file}, image id {image_id}: no 'file_name'")
        return {"file_name": info["file_name"]}

    def _annotation_error(self, ann: dict, infos: Mapping[int, dict], label_of: Mapping[int, int]) -> str | None:
        """Why ``ann`` cannot be read at all (unknown image or category, no box or id), or None."""
        where = f"annotation id {ann.get('id')}"
        if ann.get("image_id") not in infos:
            return f"{where}: image_id {ann.get('image_id')} is not in the file's images"
        if ann.get("category_id") not in label_of:
            return (
                f"{where}: category_id {ann.get('category_id')} is not in the file's categories "
                f"{self.category_ids[:10]}{'...' if len(self.category_ids) > 10 else ''}"
            )
        if not isinstance(ann.get("bbox"), list) or len(ann["bbox"]) != 4:
            return f"{where}: missing or malformed bbox {ann.get('bbox')}"
        if not isinstance(ann.get("id"), int):
            return f"{where}: missing or non-integer id"
        return None

    def _position(self, image_id: int) -> int:
        """Where the image's size and records are (:class:`KeyError` for an id not in the file)."""
        return sorted_position(self._image_ids, image_id)

    def _item_positions(self) -> list[int]:
        """The position of every item's image, in item order."""
        return np.searchsorted(self._image_ids, self.ids).tolist()

    def _image_info(self, position: int) -> dict[str, Any]:
        height, width = self._sizes[position].tolist()
        return {"id": int(self._image_ids[position]), "height": height, "width": width} | self._image_records[position]

    def _annotation_dicts(self, position: int) -> list[dict[str, Any]]:
        targets = self._targets[position]
        image_id = int(self._image_ids[position])
        return [
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": self.category_ids[label - 1],
                "bbox": box,
                "segmentation": segmentation,
            }
            for ann_id, label, box, segmentation in zip(
                targets["ids"].tolist(),
                targets["labels"].tolist(),
                targets["boxes"].tolist(),
                _segmentations(targets),
                strict=True,
            )
        ]

    @property
    def images(self) -> Mapping[int, dict[str, Any]]:
        """Image id -> ``{"id", "height", "width", "file_name", ...}`` of every image (also those training skips).

        A read-only view of the compact store: each lookup builds a new dict.
        """
        return RecordView(self._image_ids, self._image_info)

    @property
    def annotations(self) -> Mapping[int, list[dict[str, Any]]]:
        """Image id -> its usable annotations ``{"id", "image_id", "category_id", "bbox", "segmentation"}``.

        A read-only view of the compact store: ``bbox`` as stored (float32), polygons as float32 arrays.
        """
        return RecordView(self._image_ids, self._annotation_dicts)

    def __len__(self) -> int:
        return len(self.ids)

    def aspect_ratios(self) -> list[float]:
        """Width / height of every image, from the json (no decoding), for batch grouping."""
        sizes = self._sizes[self._item_positions()]  # (N, 2) height, width
        return (sizes[:, 1] / sizes[:, 0]).tolist()

    def image_path(self, image_id: int) -> Path:
        """The file of one image."""
        return self.image_dir / self._image_records[self._position(image_id)]["file_name"]

    def image_paths(self) -> list[Path]:
        """The image file of every item, in item order (for the pre-flight check: nothing is opened)."""
        return [self.image_dir / self._image_records[p]["file_name"] for p in self._item_positions()]

    def load_image(self, image_id: int) -> tv_tensors.Image:
        """Decode one image as RGB uint8, checking it against the json's size."""
        expected = tuple(self._sizes[self._position(image_id)].tolist())  # (height, width)
        path = self.image_path(image_id)
        if not path.is_file():
            raise FileNotFoundError(
                f"image file not found: {path} (image id {image_id} of {self.annotation_file}); "
                "restore it or remove its entry"
            )
        try:
            image = read_rgb(path)
        except ImageDecodeError as e:
            raise DatasetError(f"{e} (image id {image_id} of {self.annotation_file}); replace or remove it") from e
        height, width = image.shape[-2:]
        if (height, width) != expected:
            raise ImageSizeError(
                f"image {path} (image id {image_id}) is {width}×{height} but {self.annotation_file} "
                f"says {expected[1]}×{expected[0]}; replace the image or correct its size in the file"
            )
        return tv_tensors.Image(image)

    def annotation_problems(self, image_id: int) -> list[tuple[str, str]]:
        """``(kind, message)`` for each of the image's target annotations that cannot be decoded (kind
        ``bad_annotation``: training would fail on it) or decodes to an empty mask (``skipped_annotation``)."""
        position = self._position(image_id)
        height, width = self._sizes[position].tolist()
        targets = self._targets[position]
        problems = []
        for ann_id, segmentation in zip(targets["ids"].tolist(), _segmentations(targets), strict=True):
            where = f"{self.annotation_file}, annotation id {ann_id} (image id {image_id})"
            if isinstance(segmentation, dict) and list(segmentation["size"]) != [height, width]:
                problems.append(
                    ("bad_annotation", f"{where}: RLE size {segmentation['size']} is not the image's {[height, width]}")
                )
                continue
            if isinstance(segmentation, dict) and isinstance(segmentation["counts"], list):
                total = sum(segmentation["counts"])
                if total != height * width:
                    problems.append(("bad_annotation", f"{where}: RLE counts add up to {total}, not {height}×{width}"))
                    continue
            try:
                mask = decode_segmentations([segmentation], height, width)
            except (ValueError, TypeError) as e:
                problems.append(("bad_annotation", f"{where}: its segmentation cannot be decoded ({e})"))
                continue
            if not mask.any():
                problems.append(("skipped_annotation", f"{where}: its segmentation decodes to an empty mask"))
        return problems

    def decode_masks(self, anns: Sequence[Mapping[str, Any]], height: int, width: int) -> np.ndarray:
        """Rasterise the ``segmentation`` (polygons or RLE) of annotations to an (N, H, W) uint8 array."""
        return decode_segmentations([ann["segmentation"] for ann in anns], height, width)

    def target(self, image_id: int) -> dict[str, Any]:
        """The image's training target (no transforms) from its record: ``boxes``, ``labels``, ``masks`` at the
        image's size, ``image_id``; annotations that decode to an empty mask are left out with a warning."""
        position = self._position(image_id)
        height, width = self._sizes[position].tolist()
        targets = self._targets[position]
        masks = decode_segmentations(_segmentations(targets), height, width)  # (N, H, W) uint8
        keep = masks.any(axis=(1, 2))  # (N,)
        if not keep.all():
            log.warning(
                "%s: annotation(s) %s of image %d decode to empty masks; skipped",
                self.annotation_file,
                targets["ids"][~keep].tolist(),
                image_id,
            )
            masks = masks[keep]
        boxes = torch.from_numpy(targets["boxes"][keep])  # (N, 4) xywh, a copy
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        return {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": torch.from_numpy(targets["labels"][keep]),  # (N,) int64
            "masks": tv_tensors.Mask(torch.from_numpy(masks)),
            "image_id": image_id,
        }

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        image_id, image, failed = load_item_image(self, index)
        target = self.target(image_id)  # load_image checked that the image has the json's size
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        if failed:
            target["skipped_files"] = failed
        return image, target


@dataclass(frozen=True)
class COCOFormatFiles:
    """Where a COCO-format dataset's annotation files are under its root, and its whole layout for messages.

    The COCO-format data modules (COCO and shapes, LVIS) each hold one to check the root and find a split's
    annotation file. Where the images are is each dataset's own part: a folder per split for COCO, the folders
    that the images' ``coco_url`` name for LVIS.
    """

    name: str  # the dataset, as messages name it
    annotations: Mapping[str, str]  # split -> annotation json, relative to the root
    layout: str  # everything expected under the root, as messages list it

    def check_root(self, root: Path) -> None:
        """Fail early, naming the expected layout, if the root is missing."""
        if not root.is_dir():
            raise FileNotFoundError(f"dataset root not found: {root}. Expected {self.layout} under it (set data.root)")

    def annotation_file(self, root: Path, split: str) -> Path:
        """The split's annotation file under ``root``; a :class:`FileNotFoundError` naming the layout if missing."""
        return require_file(
            root / self.annotations[split],
            f"{self.name} {split} annotation file",
            f"Expected {self.layout} under data.root={root}.",
        )


class COCODataModule(DetectionDataModule):
    """A COCO-layout folder: ``root/<images>/`` and ``root/<annotations json>`` per split, scored by COCO AP.

    Defaults are COCO 2017 (``train2017``, ``val2017``, ``annotations/instances_*2017.json``);
    any dataset in COCO format works by pointing the four paths at it.

    Args:
        root: the dataset folder (``data.root``).
        train_images, val_images: each split's image folder, relative to ``root``.
        train_annotations, val_annotations: each split's annotation json, relative to ``root``.
        **kwargs: :class:`~iemask.data.base.DetectionDataModule` settings.
    """

    protocol = "coco"

    def __init__(
        self,
        root: str | Path,
        train_images: str = "train2017",
        train_annotations: str = "annotations/instances_train2017.json",
        val_images: str = "val2017",
        val_annotations: str = "annotations/instances_val2017.json",
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.root = Path(root)
        self.image_folders = {"train": train_images, "val": val_images}
        self.files = COCOFormatFiles(
            "COCO",
            {"train": train_annotations, "val": val_annotations},
            f"{train_images}/ and {train_annotations}, {val_images}/ and {val_annotations}",
        )

    def prepare_data(self) -> None:
        """Fail early, naming the expected layout, if the root is missing."""
        self.files.check_root(self.root)

    def build_dataset(self, split: str, train: bool) -> COCOInstanceDataset:
        annotation_file = self.files.annotation_file(self.root, split)
        transforms = self.train_transforms if train else self.eval_transforms
        return COCOInstanceDataset(self.root / self.image_folders[split], annotation_file, transforms, train=train)
