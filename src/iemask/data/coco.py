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
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset
from torchvision import tv_tensors

from iemask.data.image_io import ImageDecodeError, read_rgb

log = logging.getLogger(__name__)


ON_BAD_IMAGE = ("raise", "skip")
MAX_REPLACEMENTS = 10  # with on_bad_image="skip": consecutive bad images tried before giving up
MISSING_SHOWN = 10  # missing files named in the pre-flight error


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names the file and id."""


class ImageSizeError(DatasetError):
    """An image decodes to another size than its annotation file says."""


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


def missing_files(paths: Iterable[Path]) -> list[Path]:
    """The paths that are not regular files: one ``os.stat`` each, nothing opened or decoded."""
    return [path for path in paths if not os.path.isfile(path)]


def check_image_files(dataset: Any) -> None:
    """Raise one :class:`DatasetError` with the count and the first missing image files of ``dataset``.

    Run before training so that a missing image stops the run at once, not when the sampler reaches it.
    ``dataset`` is any of the package's datasets (they all have ``image_paths()`` and ``annotation_file``).
    """
    paths = dataset.image_paths()
    missing = missing_files(paths)
    if missing:
        shown = "\n  ".join(str(p) for p in missing[:MISSING_SHOWN])
        more = f"\n  ... and {len(missing) - MISSING_SHOWN} more" if len(missing) > MISSING_SHOWN else ""
        raise DatasetError(
            f"{len(missing)} of the {len(paths)} image files of {dataset.annotation_file} are missing:"
            f"\n  {shown}{more}\n"
            "Restore them (re-download or re-extract the images under data.root, or fix data.root) or remove their "
            "entries from the annotation file; `python -m iemask.data.check data=<dataset> data.root=<root>` "
            "lists every missing file (add decode=true to also decode every image and annotation)."
        )


def load_item_image(dataset: Any, index: int) -> tuple[int, tv_tensors.Image, list[str]]:
    """``(image id, image, failed paths)`` of item ``index`` of ``dataset``.

    With ``dataset.on_bad_image == "raise"`` a file that fails to load raises (naming it). With ``"skip"`` it is
    logged and the next item's image (``index + 1``, ``+ 2``, ... at most ``MAX_REPLACEMENTS`` tries) is used
    instead: the replacement is fixed by the index, with no random draw, so a resumed run stays bit-exact.
    """
    ids = dataset.ids
    if dataset.on_bad_image == "raise":
        return ids[index], dataset.load_image(ids[index]), []
    failed: list[str] = []
    last_error: Exception | None = None
    for k in range(min(MAX_REPLACEMENTS, len(ids))):
        image_id = ids[(index + k) % len(ids)]
        try:
            return image_id, dataset.load_image(image_id), failed
        except (FileNotFoundError, DatasetError) as e:
            path = dataset.image_path(image_id)
            log.warning("data.on_bad_image=skip: %s cannot be loaded (%s); using the next image instead", path, e)
            failed.append(str(path))
            last_error = e
    raise DatasetError(
        f"{len(failed)} consecutive images of {dataset.annotation_file} from item {index} on cannot be loaded "
        f"(the last: {last_error}); restore them, or find every bad file with `python -m iemask.data.check "
        "data=<dataset> decode=true`"
    )


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
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, not {on_bad_image!r}")
        self.on_bad_image = on_bad_image
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
        errors = [error for ann in data["annotations"] if (error := self._annotation_error(ann))]
        if errors:
            raise DatasetError(
                f"{self.annotation_file}: {len(errors)} annotation(s) cannot be read: {'; '.join(errors[:10])}"
                f"{'; ...' if len(errors) > 10 else ''}. Fix or remove them"
            )
        # Annotations left out as training targets, with the reason: `python -m iemask.data.check` lists them.
        self.skipped_annotations: list[str] = []
        for ann in data["annotations"]:
            if ann.get("iscrowd", 0):
                continue
            defect = _annotation_defect(ann)
            if defect:
                self.skipped_annotations.append(f"annotation id {ann['id']} (image id {ann['image_id']}): {defect}")
                continue
            self.annotations[ann["image_id"]].append(ann)
        if self.skipped_annotations:
            log.warning(
                "%s: skipped %d annotation(s) with an empty or degenerate mask or box (%s%s)",
                self.annotation_file,
                len(self.skipped_annotations),
                "; ".join(self.skipped_annotations[:3]),
                "; ..." if len(self.skipped_annotations) > 3 else "",
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

    def _annotation_error(self, ann: dict) -> str | None:
        """Why ``ann`` cannot be read at all (unknown image or category, no box), or None."""
        where = f"annotation id {ann.get('id')}"
        if ann.get("image_id") not in self.images:
            return f"{where}: image_id {ann.get('image_id')} is not in the file's images"
        if ann.get("category_id") not in self._label_of:
            return (
                f"{where}: category_id {ann.get('category_id')} is not in the file's categories "
                f"{self.category_ids[:10]}{'...' if len(self.category_ids) > 10 else ''}"
            )
        if not isinstance(ann.get("bbox"), list) or len(ann["bbox"]) != 4:
            return f"{where}: missing or malformed bbox {ann.get('bbox')}"
        return None

    def __len__(self) -> int:
        return len(self.ids)

    def aspect_ratios(self) -> list[float]:
        """Width / height of every image, from the json (no decoding), for batch grouping."""
        return [self.images[i]["width"] / self.images[i]["height"] for i in self.ids]

    def image_path(self, image_id: int) -> Path:
        """The file of one image."""
        return self.image_dir / self.images[image_id]["file_name"]

    def image_paths(self) -> list[Path]:
        """The image file of every item, in item order (for the pre-flight check: nothing is opened)."""
        return [self.image_path(i) for i in self.ids]

    def load_image(self, image_id: int) -> tv_tensors.Image:
        """Decode one image as RGB uint8, checking it against the json's size."""
        info = self.images[image_id]
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
        if (height, width) != (info["height"], info["width"]):
            raise ImageSizeError(
                f"image {path} (image id {image_id}) is {width}×{height} but {self.annotation_file} "
                f"says {info['width']}×{info['height']}; replace the image or correct its size in the file"
            )
        return tv_tensors.Image(image)

    def annotation_problems(self, image_id: int) -> list[tuple[str, str]]:
        """``(kind, message)`` for each of the image's target annotations that cannot be decoded (kind
        ``bad_annotation``: training would fail on it) or decodes to an empty mask (``skipped_annotation``)."""
        info = self.images[image_id]
        height, width = info["height"], info["width"]
        problems = []
        for ann in self.annotations[image_id]:
            where = f"{self.annotation_file}, annotation id {ann['id']} (image id {image_id})"
            segmentation = ann["segmentation"]
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
                mask = self.decode_masks([ann], height, width)
            except (ValueError, TypeError) as e:
                problems.append(("bad_annotation", f"{where}: its segmentation cannot be decoded ({e})"))
                continue
            if not mask.any():
                problems.append(("skipped_annotation", f"{where}: its segmentation decodes to an empty mask"))
        return problems

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
        image_id, image, failed = load_item_image(self, index)
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
        if failed:
            target["skipped_files"] = failed
        return image, target
