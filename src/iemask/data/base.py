"""What every dataset shares: file checks and errors, the bad-image policy, and the base Lightning data module.

The data module holds transforms, per-rank samplers (the Trainer runs with ``use_distributed_sampler=False``),
aspect-ratio grouping, the resumable training loader and the pre-flight checks; each dataset's module
(:mod:`~iemask.data.coco`, :mod:`~iemask.data.lvis`, :mod:`~iemask.data.cityscapes`, :mod:`~iemask.data.shapes`)
says where its splits are and names its evaluation ``protocol``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from torch.utils.data import BatchSampler, DataLoader
from torchvision import tv_tensors

from iemask.data.resumable import ResumableBatchSampler, ResumableDataLoader, SeededDataset
from iemask.data.samplers import GroupedBatchSampler, InferenceSampler, TrainingSampler, aspect_ratio_groups
from iemask.data.transforms import build_eval_transforms, build_train_transforms

log = logging.getLogger(__name__)

ON_BAD_IMAGE = ("raise", "skip")
MAX_REPLACEMENTS = 10  # with on_bad_image="skip": consecutive bad images tried before giving up
MISSING_SHOWN = 10  # missing files named in the pre-flight error


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names the file and id."""


class DetectionDataset(Protocol):
    """What the data modules and ``iemask.data.check`` read of a data set (COCO, LVIS, Cityscapes).

    Items are ``(image, target)`` pairs; ``ids[i]`` is item ``i``'s image id.
    """

    annotation_file: Path  # named in messages (Cityscapes: the split's gtFine folder)
    category_ids: list[int]
    class_names: list[str]
    ids: list[int]
    on_bad_image: str

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]: ...

    def aspect_ratios(self) -> list[float]: ...

    def image_path(self, image_id: int) -> Path: ...

    def image_paths(self) -> list[Path]: ...

    def load_image(self, image_id: int) -> tv_tensors.Image: ...

    def annotation_problems(self, image_id: int) -> list[tuple[str, str]]: ...


def check_on_bad_image(value: str, key: str = "on_bad_image") -> str:
    """``value`` if it is one of :data:`ON_BAD_IMAGE`, else a ``ValueError`` naming ``key``."""
    if value not in ON_BAD_IMAGE:
        raise ValueError(f"{key} must be one of {ON_BAD_IMAGE}, not {value!r}")
    return value


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


def check_image_files(dataset: DetectionDataset) -> None:
    """Raise one :class:`DatasetError` with the count and the first missing image files of ``dataset``.

    Run before training so that a missing image stops the run at once, not when the sampler reaches it.
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


def load_item_image(dataset: DetectionDataset, index: int) -> tuple[int, tv_tensors.Image, list[str]]:
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


def collate_detection(batch: list[tuple[Any, dict]]) -> tuple[list, list[dict]]:
    """Keep images and targets as lists: detection images differ in size (the model batches them)."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


class DetectionDataModule(L.LightningDataModule):
    """Shared loading logic; subclasses say where the splits are and which protocol scores them.

    Args:
        num_classes: foreground classes the model predicts; checked against the annotation files, or
            ``None``: their category count (known after :meth:`setup`; ``iemask.train`` passes it to the model).
        batch_size: training images per device.
        eval_batch_size: validation/test images per device.
        num_workers, pin_memory, persistent_workers: ``DataLoader`` settings.
        train_min_size, train_min_size_sampling: short side for training (``choice`` from a
            list, or ``range`` ``[low, high]``).
        test_min_size, max_size: test short side and the long-side cap; the model's test-time
            resize reads them (``model.min_size``/``max_size`` interpolate these keys).
        detections_per_img, score_thresh: the dataset's inference protocol, read by the model.
        hflip_prob: horizontal-flip probability in training.
        aspect_ratio_grouping: batch landscape and portrait images separately.
        seed: base seed of the training order (epoch ``e`` uses ``seed + e``) and of every augmentation draw.
        on_bad_image: a training image that cannot be loaded at run time: ``raise`` (naming it) or ``skip``
            (warn, load the next item's image instead, list the path in ``target["skipped_files"]``).
            Evaluation always raises: a missing validation image would make the metrics silently wrong.
    """

    protocol: str  # the evaluation protocol's registry key: "coco", "lvis", "cityscapes"

    def __init__(
        self,
        num_classes: int | None = None,
        batch_size: int = 2,
        eval_batch_size: int = 1,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        train_min_size: int | list[int] = 800,
        train_min_size_sampling: str = "choice",
        test_min_size: int = 800,
        max_size: int = 1333,
        detections_per_img: int = 100,
        score_thresh: float = 0.05,
        hflip_prob: float = 0.5,
        aspect_ratio_grouping: bool = True,
        seed: int = 0,
        on_bad_image: str = "raise",
    ):
        super().__init__()
        self.on_bad_image = check_on_bad_image(on_bad_image, "data.on_bad_image")
        self.num_classes = num_classes
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.train_transforms = build_train_transforms(train_min_size, max_size, train_min_size_sampling, hflip_prob)
        self.eval_transforms = build_eval_transforms()
        self.test_min_size, self.max_size = test_min_size, max_size
        self.detections_per_img, self.score_thresh = detections_per_img, score_thresh
        self.aspect_ratio_grouping = aspect_ratio_grouping
        self.seed = seed
        self.train_set: DetectionDataset | None = None
        self.val_set: DetectionDataset | None = None

    def build_dataset(self, split: str, train: bool) -> DetectionDataset:
        """The ``train`` or ``val`` split, with the training or evaluation transforms (subclasses)."""
        raise NotImplementedError

    @property
    def class_names(self) -> list[str]:
        return self._dataset_for_meta().class_names

    @property
    def category_ids(self) -> list[int]:
        return self._dataset_for_meta().category_ids

    def _dataset_for_meta(self) -> DetectionDataset:
        dataset = self.val_set or self.train_set
        if dataset is None:
            raise RuntimeError("call setup() before asking for class names or category ids")
        return dataset

    def setup(self, stage: str | None = None) -> None:
        """Build the splits, checking (one ``stat`` per file) that every image exists before any step runs."""
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self.build_dataset("train", train=True)
            check_image_files(self.train_set)
            self.train_set.on_bad_image = self.on_bad_image
            self._check_classes(self.train_set)
        if self.val_set is None:
            self.val_set = self.build_dataset("val", train=False)
            check_image_files(self.val_set)
            self._check_classes(self.val_set)
            if self.train_set is not None and self.train_set.category_ids != self.val_set.category_ids:
                raise DatasetError(
                    f"{self.train_set.annotation_file} and {self.val_set.annotation_file} have different categories"
                )

    def _check_classes(self, dataset: DetectionDataset) -> None:
        """Take the first split's category count as ``num_classes`` when it is unset, else check it."""
        found = len(dataset.category_ids)
        if self.num_classes is None:
            log.info("data.num_classes=null: %d classes, from %s", found, dataset.annotation_file)
            self.num_classes = found
        elif found != self.num_classes:
            raise DatasetError(
                f"{dataset.annotation_file} has {found} categories but data.num_classes is {self.num_classes}; "
                f"set data.num_classes={found}, or data.num_classes=null to read it from the annotation file"
            )

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader_options(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory and torch.cuda.is_available(),  # pinning needs an accelerator
            "persistent_workers": self.persistent_workers,
            "collate_fn": collate_detection,
        }

    def train_sampler(self, rank: int, world_size: int) -> TrainingSampler:
        """The per-rank training order; LVIS swaps in repeat-factor sampling."""
        return TrainingSampler(len(self.train_set), seed=self.seed, rank=rank, world_size=world_size)

    def train_dataloader(self) -> DataLoader:
        rank, world_size = self._rank()
        sampler = self.train_sampler(rank, world_size)
        if self.aspect_ratio_grouping:
            groups = aspect_ratio_groups(self.train_set.aspect_ratios())
            batches = GroupedBatchSampler(sampler, groups, self.batch_size)
        else:
            batches = BatchSampler(sampler, self.batch_size, drop_last=True)
        if len(batches) == 0:
            raise DatasetError(
                f"{self.train_set.annotation_file}: {len(self.train_set)} training images cannot fill one batch "
                f"of {self.batch_size} per device; lower data.batch_size"
            )
        return ResumableDataLoader(
            SeededDataset(self.train_set),
            batch_sampler=ResumableBatchSampler(batches, self.seed),
            batches_done=self._batches_done,
            **self._loader_options(),
        )

    def _batches_done(self) -> int:
        """Training batches of the current epoch the trainer has taken (saved with each checkpoint)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.ready

    def val_dataloader(self) -> DataLoader:
        rank, world_size = self._rank()
        sampler = InferenceSampler(len(self.val_set), rank=rank, world_size=world_size)
        batches = BatchSampler(sampler, self.eval_batch_size, drop_last=False)
        return DataLoader(self.val_set, batch_sampler=batches, **self._loader_options())

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
