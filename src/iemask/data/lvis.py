"""LVIS v1.0: COCO 2017 images with LVIS' 1203-category annotations, repeat-factor sampling, federated AP.

LVIS files name an image only by its ``coco_url`` (``http://images.cocodataset.org/train2017/000000391895.jpg``);
the last two components of that URL locate it among the COCO image folders under ``data.root``. The
validation split takes its images from both ``train2017`` and ``val2017``. Categories carry their frequency
(:data:`FREQUENCIES`), which federated AP reports separately. Expected layout::

    root/annotations/lvis_v1_train.json
    root/annotations/lvis_v1_val.json
    root/train2017/   (COCO 2017 images; a symlink to an existing COCO folder is fine)
    root/val2017/
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from torch.utils.data import Sampler

from iemask.data.base import DatasetError, DetectionDataModule
from iemask.data.coco import COCOFormatFiles, COCOInstanceDataset
from iemask.data.samplers import RepeatFactorTrainingSampler

log = logging.getLogger(__name__)

FREQUENCIES = ("r", "c", "f")  # rare (< 10 training images), common (10-99), frequent (>= 100)

# Folder named in a coco_url -> folder under data.root that holds those images.
COCO_IMAGE_FOLDERS = {"train2017": "train2017", "val2017": "val2017"}
LVIS_ANNOTATIONS = {"train": "annotations/lvis_v1_train.json", "val": "annotations/lvis_v1_val.json"}


class LVISInstanceDataset(COCOInstanceDataset):
    """One LVIS split, read through :class:`COCOInstanceDataset` (same items, same checks).

    Each image's ``coco_url`` ``.../<folder>/<name>`` is resolved once to ``root/<image_folders[folder]>/<name>``;
    the images keep their ``neg_category_ids`` and ``not_exhaustive_category_ids`` (in ``images``), and
    annotations without ``iscrowd`` (all of LVIS') count as non-crowd.

    Args:
        root: the folder holding the COCO image folders.
        annotation_file: ``lvis_v1_{train,val}.json``.
        transforms: a v2 transform applied to ``(image, target)``.
        train: skip images without a usable annotation.
        image_folders: folder named in the coco_url -> folder under ``root``.
        on_bad_image: ``raise`` or ``skip`` an image that cannot be loaded (see :class:`COCOInstanceDataset`).

    :meth:`image_paths` gives the resolved files, across the image folders.
    """

    def __init__(
        self,
        root: str | Path,
        annotation_file: str | Path,
        transforms: Callable | None = None,
        train: bool = False,
        image_folders: Mapping[str, str] = COCO_IMAGE_FOLDERS,
        on_bad_image: str = "raise",
    ):
        self.image_folders = dict(image_folders)  # read by _image_record while the base class builds
        super().__init__(root, annotation_file, transforms, train=train, on_bad_image=on_bad_image)
        used_folders = {record["file_name"].rpartition("/")[0] for record in self._image_records}
        for folder in sorted(used_folders):
            if not (self.image_dir / folder).is_dir():
                raise FileNotFoundError(
                    f"image folder not found: {self.image_dir / folder} ({self.annotation_file} has images there; "
                    f"put or symlink the COCO 2017 image folders under data.root={self.image_dir})"
                )

    def _check_categories(self, categories: list[dict]) -> None:
        for category in categories:
            if category.get("frequency") not in FREQUENCIES:
                raise DatasetError(
                    f"{self.annotation_file}, category id {category['id']}: frequency "
                    f"{category.get('frequency')!r} is not one of {FREQUENCIES}; not an LVIS v1 file"
                )

    def _image_record(self, image_id: int, info: dict) -> dict[str, Any]:
        """The file the image's coco_url resolves to (what load_image opens) and its two category lists."""
        lacking = [key for key in ("neg_category_ids", "not_exhaustive_category_ids") if key not in info]
        if lacking:
            raise DatasetError(f"{self.annotation_file}, image id {image_id}: no {lacking}; not an LVIS file")
        folder, name = self._url_parts(image_id, info)
        if folder not in self.image_folders:
            raise DatasetError(
                f"{self.annotation_file}, image id {image_id}: coco_url {info['coco_url']!r} names folder "
                f"{folder!r}, not one of the configured image folders {sorted(self.image_folders)}"
            )
        return {
            "file_name": str(PurePosixPath(self.image_folders[folder], name)),
            "neg_category_ids": info["neg_category_ids"],
            "not_exhaustive_category_ids": info["not_exhaustive_category_ids"],
        }

    def _url_parts(self, image_id: int, info: dict[str, Any]) -> tuple[str, str]:
        """``(folder, file name)``: the last two path components of the image's coco_url."""
        path = PurePosixPath(urlparse(info.get("coco_url", "")).path)
        if not path.parent.name or not path.name:
            raise DatasetError(
                f"{self.annotation_file}, image id {image_id}: coco_url {info.get('coco_url')!r} does not end "
                "in <folder>/<file name>"
            )
        return path.parent.name, path.name

    def image_category_ids(self) -> list[set[int]]:
        """The categories of each item's usable annotations, in item order (for repeat factors)."""
        return [
            {self.category_ids[label - 1] for label in self._targets[position]["labels"].tolist()}
            for position in self._item_positions()
        ]


class LVISDataModule(DetectionDataModule):
    """LVIS v1.0 under one root (see the module docstring for the layout), scored by federated LVIS AP.

    Args:
        root: the dataset folder (``data.root``).
        train_annotations, val_annotations: the split files, relative to ``root``.
        image_folders: folder named in a coco_url -> folder under ``root`` holding those images.
        repeat_factor_sampling: train with :class:`RepeatFactorTrainingSampler` (LVIS' default), else
            with the plain shuffled :class:`~iemask.data.samplers.TrainingSampler`.
        repeat_threshold: the category frequency ``t`` below which images are repeated (0.001).
        **kwargs: :class:`~iemask.data.base.DetectionDataModule` settings.
    """

    protocol = "lvis"

    def __init__(
        self,
        root: str | Path,
        train_annotations: str = LVIS_ANNOTATIONS["train"],
        val_annotations: str = LVIS_ANNOTATIONS["val"],
        image_folders: Mapping[str, str] = COCO_IMAGE_FOLDERS,
        repeat_factor_sampling: bool = True,
        repeat_threshold: float = 0.001,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.root = Path(root)
        self.image_folders = dict(image_folders)
        annotations = {"train": train_annotations, "val": val_annotations}
        layout = ", ".join([*annotations.values(), *(f"{folder}/" for folder in self.image_folders.values())])
        self.files = COCOFormatFiles("LVIS", annotations, layout)
        self.repeat_factor_sampling, self.repeat_threshold = repeat_factor_sampling, repeat_threshold

    def prepare_data(self) -> None:
        """Fail early, naming the expected layout, if the root is missing."""
        self.files.check_root(self.root)

    def build_dataset(self, split: str, train: bool) -> LVISInstanceDataset:
        annotation_file = self.files.annotation_file(self.root, split)
        transforms = self.train_transforms if train else self.eval_transforms
        return LVISInstanceDataset(
            self.root, annotation_file, transforms, train=train, image_folders=self.image_folders
        )

    def train_sampler(self, rank: int, world_size: int) -> Sampler[int]:
        """Repeat-factor sampling over the training images, or the plain shuffle when switched off."""
        if not self.repeat_factor_sampling:
            return super().train_sampler(rank, world_size)
        factors = RepeatFactorTrainingSampler.repeat_factors(self.train_set.image_category_ids(), self.repeat_threshold)
        sampler = RepeatFactorTrainingSampler(factors, seed=self.seed, rank=rank, world_size=world_size)
        log.info(
            "repeat-factor sampling (threshold %g): %d images, %d repeated, %d samples per epoch over all ranks",
            self.repeat_threshold,
            len(factors),
            int((factors > 1).sum()),
            len(sampler) * world_size,
        )
        return sampler
