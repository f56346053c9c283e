"""COCO-format instance segmentation: a ``Dataset`` that reads images + ``instances_*.json``.

Plain PyTorch (no Lightning), so notebooks and tests use it directly. Crowd regions are kept
in the json for evaluation but never become training targets (torchvision's Mask R-CNN has no
ignore label); in training, images without a usable annotation are skipped, as Detectron2 does.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset
from torchvision import tv_tensors

from iemask.data.image_io import ImageDecodeError, read_rgb

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names the file and id."""


def require_file(path: Path, what: str, hint: str) -> Path:
    """Return ``path`` if it is a file, else raise :class:`FileNotFoundError` saying what to do."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}. {hint}")
    return path


def load_json(path: Path) -> dict[str, Any]:
    """Read a json file, naming it in the error if it is not valid json."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid json ({e}); re-download or regenerate it") from e


def _polygon_is_valid(segmentation: Any) -> bool:
    if isinstance(segmentation, dict):  # RLE, compressed or not
        return "counts" in segmentation and "size" in segmentation
    if isinstance(segmentation, list):
        return len(segmentation) > 0 and all(len(p) >= 6 and len(p) % 2 == 0 for p in segmentation)
    return False


class COCOInstanceDataset(Dataset):
    """Images and instance annotations of one COCO-format split.

    Each item is ``(image, target)``: ``image`` a ``tv_tensors.Image`` (uint8, 3×H×W) and
    ``target`` a dict with ``boxes`` (``BoundingBoxes``, XYXY pixels), ``labels`` (int64,
    contiguous 1..K), ``masks`` (``Mask``, N×H×W uint8) and ``image_id`` (int), ready for
    ``torchvision.transforms.v2``.

    Args:
        image_dir: folder holding the images named by ``file_name``.
        annotation_file: the ``instances_*.json``.
        transforms: a v2 transform applied to ``(image, target)``.
        train: skip images without a usable (non-crowd, non-degenerate) annotation.
    """

    def __init__(
        self,
        image_dir: str | Path,
        annotation_file: str | Path,
        transforms: Callable | None = None,
        train: bool = False,
    ):
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_dir} (check data.root)")
        require_file(self.annotation_file, "annotation file", "Check data.root and the annotation file name.")
        data = load_json(self.annotation_file)
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise DatasetError(f"{self.annotation_file} has no {key!r} list: not a COCO instances file")
        self.transforms = transforms
        self.train = train
        self.categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in self.categories]
        self.class_names = [c["name"] for c in self.categories]
        self._label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        self.images = {img["id"]: img for img in data["images"]}
        self.annotations: dict[int, list[dict]] = {img_id: [] for img_id in self.images}
        degenerate = []
        for ann in data["annotations"]:
            self._check_annotation(ann)
            if ann.get("iscrowd", 0):
                continue
            if not _polygon_is_valid(ann.get("segmentation")) or ann["bbox"][2] < 1 or ann["bbox"][3] < 1:
                degenerate.append(ann["id"])
                continue
            self.annotations[ann["image_id"]].append(ann)
        if degenerate:
            log.warning(
                "%s: skipped %d annotation(s) with an empty or degenerate mask or box (ids %s%s)",
                self.annotation_file,
                len(degenerate),
                degenerate[:10],
                "..." if len(degenerate) > 10 else "",
            )
        self.ids = sorted(self.images)
        if train:
            self.ids = [i for i in self.ids if self.annotations[i]]
            skipped = len(self.images) - len(self.ids)
            if skipped:
                log.info(
                    "%s: %d image(s) without usable annotations skipped for training",
                    self.annotation_file,
                    skipped,
                )
        if not self.ids:
            raise DatasetError(f"{self.annotation_file} has no usable images{' for training' if train else ''}")

    def _check_annotation(self, ann: dict) -> None:
        where = f"{self.annotation_file}, annotation id {ann.get('id')}"
        if ann.get("image_id") not in self.images:
            raise DatasetError(f"{where}: image_id {ann.get('image_id')} is not in the file's images")
        if ann.get("category_id") not in self._label_of:
            raise DatasetError(
                f"{where}: category_id {ann.get('category_id')} is not in the file's categories "
                f"{self.category_ids[:10]}{'...' if len(self.category_ids) > 10 else ''}"
            )
        if "bbox" not in ann or len(ann["bbox"]) != 4:
            raise DatasetError(f"{where}: missing or malformed bbox {ann.get('bbox')}")

    def __len__(self) -> int:
        return len(self.ids)

    def aspect_ratios(self) -> list[float]:
        """Width / height of every image, from the json (no decoding), for batch grouping."""
        return [self.images[i]["width"] / self.images[i]["height"] for i in self.ids]

    def load_image(self, image_id: int) -> tv_tensors.Image:
        """Decode one image as RGB uint8, checking it against the json's size."""
        info = self.images[image_id]
        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path} (image id {image_id} of {self.annotation_file})")
        try:
            image = read_rgb(path)
        except ImageDecodeError as e:
            raise DatasetError(f"{e} (image id {image_id} of {self.annotation_file}); replace or remove it") from e
        height, width = image.shape[-2:]
        if (height, width) != (info["height"], info["width"]):
            raise DatasetError(
                f"image {path} (image id {image_id}) is {width}×{height} but {self.annotation_file} "
                f"says {info['width']}×{info['height']}"
            )
        return tv_tensors.Image(image)

    def decode_masks(self, anns: list[dict], height: int, width: int) -> np.ndarray:
        """Rasterise polygon or RLE annotations to an (N, H, W) uint8 array with pycocotools."""
        masks = np.zeros((len(anns), height, width), dtype=np.uint8)
        for i, ann in enumerate(anns):
            seg = ann["segmentation"]
            if isinstance(seg, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
            elif isinstance(seg["counts"], list):
                rle = mask_utils.frPyObjects(seg, height, width)
            else:
                rle = seg
            with contextlib.redirect_stderr(io.StringIO()):
                masks[i] = mask_utils.decode(rle)
        return masks

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        image_id = self.ids[index]
        image = self.load_image(image_id)
        height, width = image.shape[-2:]
        anns = self.annotations[image_id]
        masks = self.decode_masks(anns, height, width)
        keep = masks.reshape(len(anns), -1).any(axis=1) if anns else np.zeros(0, dtype=bool)
        if not keep.all():
            dropped = [a["id"] for a, k in zip(anns, keep, strict=True) if not k]
            log.warning(
                "%s: annotation(s) %s of image %d decode to empty masks; skipped",
                self.annotation_file,
                dropped,
                image_id,
            )
            anns, masks = [a for a, k in zip(anns, keep, strict=True) if k], masks[keep]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": torch.tensor([self._label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "masks": tv_tensors.Mask(torch.from_numpy(masks)),
            "image_id": image_id,
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target
