"""Cityscapes fine instance segmentation: the label table and ground truth files of the official format, the
data set read from the official layout, and its Lightning data module (the evaluation reads the first two).

Under one root: ``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` and, for each image,
``gtFine/<split>/<city>/<stem>_gtFine_instanceIds.png`` (or, without it, ``<stem>_gtFine_polygons.json``,
rasterised as the official ``json2instanceImg`` does). Training targets are the instances (ids
``labelId * 1000 + k``) of the eight evaluated classes. Group regions ("cargroup", ...: the bare label id,
below 1000) are never targets: Detectron2 reads them as crowd annotations, which its mapper drops and
which leave an image "empty"; torchvision's Mask R-CNN has no crowd input, so they are left out the same
way. Caravan and trailer instances (ignored by the protocol) are not targets either. Images without a
target are skipped in training.

Images get stable integer ids: the index of their stem in the sorted split. ``images`` maps each id to
its city, stem, image file and ground truth file, for the evaluator and the exporter; they are kept as
compact records (:mod:`iemask.data.records`) that data-loader workers share without copying.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes

from iemask.data.base import DatasetError, DetectionDataModule, check_on_bad_image, load_item_image
from iemask.data.image_io import ImageDecodeError, read_rgb
from iemask.data.records import RecordView, SerializedList, sorted_position

log = logging.getLogger(__name__)

IMAGE_SUFFIX = "_leftImg8bit.png"
INSTANCE_IDS_SUFFIX = "_gtFine_instanceIds.png"
POLYGONS_SUFFIX = "_gtFine_polygons.json"


# ---- the label table -----------------------------------------------------------------------------
class CityscapesLabel(NamedTuple):
    """The fields of ``cityscapesscripts.helpers.labels.Label`` that instance segmentation needs."""

    name: str
    id: int
    has_instances: bool
    ignore_in_eval: bool


# The official label table (ids, not train ids); tests check it against cityscapesscripts.
LABELS: tuple[CityscapesLabel, ...] = tuple(
    CityscapesLabel(*row)
    for row in (
        ("unlabeled", 0, False, True),
        ("ego vehicle", 1, False, True),
        ("rectification border", 2, False, True),
        ("out of roi", 3, False, True),
        ("static", 4, False, True),
        ("dynamic", 5, False, True),
        ("ground", 6, False, True),
        ("road", 7, False, False),
        ("sidewalk", 8, False, False),
        ("parking", 9, False, True),
        ("rail track", 10, False, True),
        ("building", 11, False, False),
        ("wall", 12, False, False),
        ("fence", 13, False, False),
        ("guard rail", 14, False, True),
        ("bridge", 15, False, True),
        ("tunnel", 16, False, True),
        ("pole", 17, False, False),
        ("polegroup", 18, False, True),
        ("traffic light", 19, False, False),
        ("traffic sign", 20, False, False),
        ("vegetation", 21, False, False),
        ("terrain", 22, False, False),
        ("sky", 23, False, False),
        ("person", 24, True, False),
        ("rider", 25, True, False),
        ("car", 26, True, False),
        ("truck", 27, True, False),
        ("bus", 28, True, False),
        ("caravan", 29, True, True),
        ("trailer", 30, True, True),
        ("train", 31, True, False),
        ("motorcycle", 32, True, False),
        ("bicycle", 33, True, False),
        ("license plate", -1, False, True),
    )
)
LABEL_BY_NAME = {label.name: label for label in LABELS}
LABEL_BY_ID = {label.id: label for label in LABELS}
# The evaluated instance classes, in label-id order: person, rider, car, truck, bus, train, motorcycle, bicycle.
CLASSES: tuple[CityscapesLabel, ...] = tuple(
    label for label in LABELS if label.has_instances and not label.ignore_in_eval
)
CLASS_NAMES: tuple[str, ...] = tuple(label.name for label in CLASSES)
CLASS_LABEL_IDS: tuple[int, ...] = tuple(label.id for label in CLASSES)


# ---- ground truth files --------------------------------------------------------------------------
def rasterise_polygons(annotation: Mapping[str, Any], source: str = "polygons json") -> np.ndarray:
    """The instance-id map of a ``*_gtFine_polygons.json`` dict, drawn as the official ``json2instanceImg``.

    Polygons are filled in file order with PIL (later ones cover earlier ones) on an "unlabeled" (0)
    background; deleted objects and labels with a negative id are skipped.
    """
    image = Image.new("I", (int(annotation["imgWidth"]), int(annotation["imgHeight"])), 0)
    draw = ImageDraw.Draw(image)
    counts: dict[str, int] = defaultdict(int)
    for obj in annotation["objects"]:
        if obj.get("deleted"):
            continue
        name, group = obj["label"], False
        if name not in LABEL_BY_NAME and name.endswith("group"):
            name, group = name[: -len("group")], True
        if name not in LABEL_BY_NAME:
            raise ValueError(f"{source}: unknown Cityscapes label {obj['label']!r}")
        label = LABEL_BY_NAME[name]
        value = label.id
        if label.has_instances and not group:
            value = value * 1000 + counts[name]
            counts[name] += 1
        if value >= 0:
            draw.polygon([tuple(point) for point in obj["polygon"]], fill=value)
    return np.asarray(image, dtype=np.int32)


def read_instance_ids(path: str | Path) -> np.ndarray:
    """The (H, W) int32 instance-id map of an ``*_instanceIds.png``, or rasterised from a ``*_polygons.json``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Cityscapes ground truth file not found: {path}")
    if path.suffix == ".json":
        with open(path) as f:
            return rasterise_polygons(json.load(f), str(path))
    try:
        with Image.open(path) as image:
            return np.asarray(image, dtype=np.int32)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot decode Cityscapes ground truth {path}: {e}") from e


def ground_truth_file(folder: Path, stem: str) -> Path:
    """``<stem>_gtFine_instanceIds.png`` in ``folder``, else ``<stem>_gtFine_polygons.json``; an error naming both."""
    for suffix in (INSTANCE_IDS_SUFFIX, POLYGONS_SUFFIX):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    raise FileNotFoundError(
        f"ground truth of Cityscapes image {stem} not found: expected {folder / (stem + INSTANCE_IDS_SUFFIX)} "
        f"or {folder / (stem + POLYGONS_SUFFIX)}"
    )


def file_key(name: str) -> str:
    """``<city>_<sequence>_<frame>``, the official key that pairs ground truth and prediction files."""
    return "_".join(name.split("_")[:3])


def find_ground_truth(gt: str | Path) -> dict[str, Path]:
    """Ground truth files by ``file_key``: under ``gt/gtFine/val`` for a dataset root, else anywhere under ``gt``."""
    root = Path(gt)
    folder = root / "gtFine" / "val" if (root / "gtFine" / "val").is_dir() else root
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Cityscapes ground truth folder not found: {root}. Expected the dataset root (with "
            f"gtFine/val/<city>/<stem>{INSTANCE_IDS_SUFFIX}) or a folder of such files"
        )
    files: dict[str, Path] = {}
    for suffix in (POLYGONS_SUFFIX, INSTANCE_IDS_SUFFIX):  # the png wins where both exist
        files.update({file_key(p.name): p for p in sorted(folder.rglob(f"*{suffix}"))})
    if not files:
        raise FileNotFoundError(f"no *{INSTANCE_IDS_SUFFIX} (or *{POLYGONS_SUFFIX}) files under {folder}")
    return files


# ---- the data set and its data module ----------------------------------------------------------


@dataclass(frozen=True)
class CityscapesImage:
    """One image of a split: where it is and how big."""

    city: str
    stem: str  # <city>_<sequence>_<frame>
    image_file: Path
    gt_file: Path  # *_gtFine_instanceIds.png, or *_gtFine_polygons.json without it
    width: int
    height: int


def find_images(root: str | Path, split: str) -> list[CityscapesImage]:
    """The images of ``split`` sorted by stem, each with its ground truth file (an error names a missing one)."""
    root = Path(root)
    image_dir, gt_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    for folder in (image_dir, gt_dir):
        if not folder.is_dir():
            raise FileNotFoundError(
                f"Cityscapes folder not found: {folder}. Expected leftImg8bit/{split}/<city>/<stem>{IMAGE_SUFFIX} "
                f"and gtFine/{split}/<city>/<stem>{INSTANCE_IDS_SUFFIX} (or {POLYGONS_SUFFIX}) under "
                f"data.root={root}"
            )
    files = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"), key=lambda p: p.name)
    if not files:
        raise FileNotFoundError(f"no <city>/<stem>{IMAGE_SUFFIX} images in {image_dir}")
    images = []
    for path in files:
        stem = path.name[: -len(IMAGE_SUFFIX)]
        with Image.open(path) as image:  # reads the header only
            width, height = image.size
        gt_file = ground_truth_file(gt_dir / path.parent.name, stem)
        images.append(CityscapesImage(path.parent.name, stem, path, gt_file, width, height))
    return images


def instance_values(instance_ids: np.ndarray) -> np.ndarray:
    """Sorted ids (``labelId * 1000 + k``) of the instances of the evaluated classes; groups excluded."""
    values = np.unique(instance_ids[instance_ids >= 1000])
    return values[np.isin(values // 1000, CLASS_LABEL_IDS)]


class CityscapesInstanceDataset(Dataset):
    """Images and instance targets of one Cityscapes split, items as in ``COCOInstanceDataset``.

    Each item is ``(image, target)``: a ``tv_tensors.Image`` (uint8, 3×H×W) and a dict with ``boxes``
    (``BoundingBoxes``, XYXY pixels covering the mask), ``labels`` (int64, 1..8 in ``CLASS_NAMES`` order),
    ``masks`` (``Mask``, N×H×W uint8) and ``image_id`` (int).

    Args:
        root: the Cityscapes root.
        split: ``train``, ``val``, ... (folder name under ``leftImg8bit`` and ``gtFine``).
        transforms: a v2 transform applied to ``(image, target)``.
        train: skip images without a target (this reads every ground truth file once).
        on_bad_image: ``raise`` on an image that cannot be loaded, or ``skip`` it: load the next item's image
            instead and list the failed path in ``target["skipped_files"]`` (see ``base.load_item_image``).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transforms: Callable | None = None,
        train: bool = False,
        on_bad_image: str = "raise",
    ):
        self.on_bad_image = check_on_bad_image(on_bad_image)
        self.root, self.split = Path(root), split
        self.annotation_file = self.root / "gtFine" / split  # named by the data module's messages
        self.transforms, self.train = transforms, train
        self.category_ids = list(CLASS_LABEL_IDS)
        self.class_names = list(CLASS_NAMES)
        self._label_of = {label_id: i + 1 for i, label_id in enumerate(self.category_ids)}
        images = find_images(self.root, split)
        self._records = SerializedList(images)
        self._image_ids = np.arange(len(images), dtype=np.int64)  # (I,) an image's id is its position
        self._sizes = np.array([(i.height, i.width) for i in images], dtype=np.int64).reshape(-1, 2)  # (I, 2)
        self.ids = list(range(len(images)))
        if train:
            # PNG decoding releases the GIL: threads read the ground truth in parallel.
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                has_targets = list(pool.map(lambda i: instance_values(self.read_instance_ids(i)).size > 0, self.ids))
            self.ids = [i for i, keep in zip(self.ids, has_targets, strict=True) if keep]
            skipped = len(images) - len(self.ids)
            if skipped:
                log.info("%s: %d image(s) without instances skipped for training", self.annotation_file, skipped)
            if not self.ids:
                raise DatasetError(f"{self.annotation_file}: no image has instances of {', '.join(CLASS_NAMES)}")

    @property
    def images(self) -> Mapping[int, CityscapesImage]:
        """Image id -> :class:`CityscapesImage` of every image of the split (also those skipped in training).

        A read-only view of the compact store: each lookup builds a new record.
        """
        return RecordView(self._image_ids, self._records.__getitem__)

    def _record(self, image_id: int) -> CityscapesImage:
        """One image's record (:class:`KeyError` for an id not in the split)."""
        return self._records[sorted_position(self._image_ids, image_id)]

    def __len__(self) -> int:
        return len(self.ids)

    def aspect_ratios(self) -> list[float]:
        """Width / height of every image (from the file headers), for batch grouping."""
        sizes = self._sizes[self.ids]  # (N, 2) height, width
        return (sizes[:, 1] / sizes[:, 0]).tolist()

    def image_path(self, image_id: int) -> Path:
        """The file of one image."""
        return self._record(image_id).image_file

    def image_paths(self) -> list[Path]:
        """The image file of every item, in item order (for the pre-flight check: nothing is opened)."""
        return [self.image_path(i) for i in self.ids]

    def gt_files(self) -> dict[int, Path]:
        """Image id → ground truth file of every image of the split (also those skipped in training)."""
        return {image_id: info.gt_file for image_id, info in enumerate(self._records)}

    def read_instance_ids(self, image_id: int) -> np.ndarray:
        """The image's instance-id map, checked against the image size."""
        info = self._record(image_id)
        instance_ids = read_instance_ids(info.gt_file)
        if instance_ids.shape != (info.height, info.width):
            raise DatasetError(
                f"{info.gt_file} is {instance_ids.shape[1]}×{instance_ids.shape[0]} but its image "
                f"{info.image_file} is {info.width}×{info.height}"
            )
        return instance_ids

    def load_image(self, image_id: int) -> tv_tensors.Image:
        info = self._record(image_id)
        try:
            return tv_tensors.Image(read_rgb(info.image_file))
        except ImageDecodeError as e:
            raise DatasetError(f"{e} (image id {image_id} of {self.annotation_file}); replace or remove it") from e

    def annotation_problems(self, image_id: int) -> list[tuple[str, str]]:
        """``[("bad_annotation", why)]`` if the image's ground truth file cannot be read or does not match it."""
        try:
            self.read_instance_ids(image_id)
        except (FileNotFoundError, ValueError, KeyError) as e:  # DatasetError and decoding errors are ValueErrors
            return [("bad_annotation", str(e))]
        return []

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        image_id, image, failed = load_item_image(self, index)
        instance_ids = self.read_instance_ids(image_id)
        height, width = instance_ids.shape
        values = instance_values(instance_ids)
        masks = torch.from_numpy(instance_ids[None] == values[:, None, None]).to(torch.uint8)
        boxes = masks_to_boxes(masks)
        boxes[:, 2:] += 1  # masks_to_boxes gives the last pixel; the box covers it
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": torch.tensor([self._label_of[v // 1000] for v in values.tolist()], dtype=torch.int64),
            "masks": tv_tensors.Mask(masks),
            "image_id": image_id,
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        if failed:
            target["skipped_files"] = failed
        return image, target


class CityscapesDataModule(DetectionDataModule):
    """Cityscapes fine, instance level: the eight classes, scored by the official instance protocol.

    Args:
        root: folder holding ``leftImg8bit/`` and ``gtFine/``.
        train_split, val_split: their split folders.
        **kwargs: :class:`~iemask.data.base.DetectionDataModule` arguments.
    """

    protocol = "cityscapes"

    def __init__(self, root: str | Path, train_split: str = "train", val_split: str = "val", **kwargs: Any):
        super().__init__(**kwargs)
        self.root = Path(root)
        self.splits = {"train": train_split, "val": val_split}

    def prepare_data(self) -> None:
        """Fail early, naming the expected layout, if the root is not a Cityscapes folder."""
        missing = [name for name in ("leftImg8bit", "gtFine") if not (self.root / name).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"Cityscapes root {self.root} lacks {' and '.join(f'{m}/' for m in missing)}. Expected "
                f"leftImg8bit/{{train,val}}/<city>/<stem>{IMAGE_SUFFIX} and gtFine/{{train,val}}/<city>/"
                f"<stem>{INSTANCE_IDS_SUFFIX} (or {POLYGONS_SUFFIX}) under it (set data.root)"
            )

    def build_dataset(self, split: str, train: bool) -> CityscapesInstanceDataset:
        transforms = self.train_transforms if train else self.eval_transforms
        return CityscapesInstanceDataset(self.root, self.splits[split], transforms, train=train)
