"""Lightning data modules: COCO-format folders and the generated ``shapes`` default.

The base class holds what every dataset shares: transforms, per-rank samplers (the Trainer
runs with ``use_distributed_sampler=False``), aspect-ratio grouping, loaders and the
evaluator that matches the dataset's official protocol.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import BatchSampler, DataLoader

from iemask.data.coco import COCOInstanceDataset, DatasetError, check_image_files, check_on_bad_image, require_file
from iemask.data.resumable import ResumableBatchSampler, ResumableDataLoader, SeededDataset
from iemask.data.samplers import GroupedBatchSampler, InferenceSampler, TrainingSampler, aspect_ratio_groups
from iemask.data.shapes import MAX_ROTATION, MIN_VISIBLE, OBJECT_SIZE, ensure_shapes
from iemask.data.transforms import build_eval_transforms, build_train_transforms
from iemask.evaluation import COCOEvaluator

log = logging.getLogger(__name__)


def collate_detection(batch: list[tuple[Any, dict]]) -> tuple[list, list[dict]]:
    """Keep images and targets as lists: detection images differ in size (the model batches them)."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


class DetectionDataModule(L.LightningDataModule):
    """Shared loading logic; subclasses say where the splits are and how they are scored.

    Args:
        num_classes: foreground classes the model predicts; checked against the files.
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

    def __init__(
        self,
        num_classes: int,
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
        self.train_set: COCOInstanceDataset | None = None
        self.val_set: COCOInstanceDataset | None = None

    # Subclasses: build the split datasets and the evaluator.
    def build_dataset(self, split: str, train: bool) -> COCOInstanceDataset:
        raise NotImplementedError

    def build_evaluator(self) -> Any:
        """A streaming evaluator (``reset``/``process``/``evaluate``) for the validation split."""
        raise NotImplementedError

    @property
    def class_names(self) -> list[str]:
        return self._dataset_for_meta().class_names

    @property
    def category_ids(self) -> list[int]:
        return self._dataset_for_meta().category_ids

    def _dataset_for_meta(self) -> COCOInstanceDataset:
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

    def _check_classes(self, dataset: COCOInstanceDataset) -> None:
        if len(dataset.category_ids) != self.num_classes:
            raise DatasetError(
                f"{dataset.annotation_file} has {len(dataset.category_ids)} categories but data.num_classes is "
                f"{self.num_classes}; set data.num_classes={len(dataset.category_ids)}"
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


class COCODataModule(DetectionDataModule):
    """A COCO-layout folder: ``root/<images>/`` and ``root/<annotations json>`` per split.

    Defaults are COCO 2017 (``train2017``, ``val2017``, ``annotations/instances_*2017.json``);
    any dataset in COCO format works by pointing the four paths at it.
    """

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
        self.splits = {"train": (train_images, train_annotations), "val": (val_images, val_annotations)}

    def split_paths(self, split: str) -> tuple[Path, Path]:
        images, annotations = self.splits[split]
        return self.root / images, self.root / annotations

    def prepare_data(self) -> None:
        """Fail early, naming the expected layout, if the root or a split is missing."""
        if not self.root.is_dir():
            expected = ", ".join(f"{i}/ and {a}" for i, a in self.splits.values())
            raise FileNotFoundError(
                f"dataset root not found: {self.root}. Expected {expected} under it (set data.root)"
            )

    def build_dataset(self, split: str, train: bool) -> COCOInstanceDataset:
        image_dir, annotation_file = self.split_paths(split)
        require_file(annotation_file, f"{split} annotation file", f"Expected under data.root={self.root}.")
        transforms = self.train_transforms if train else self.eval_transforms
        return COCOInstanceDataset(image_dir, annotation_file, transforms, train=train)

    def build_evaluator(self) -> COCOEvaluator:
        return COCOEvaluator(self.val_set.annotation_file, category_ids=self.val_set.category_ids)


class ShapesDataModule(COCODataModule):
    """The generated ``shapes`` dataset, read through the COCO code path.

    ``prepare_data`` (rank 0 only, under DDP) generates it once into ``cache_dir``.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        num_train: int = 1000,
        num_val: int = 100,
        image_size: int = 128,
        max_objects: int = 4,
        object_size: tuple[float, float] = OBJECT_SIZE,
        min_visible: float = MIN_VISIBLE,
        max_rotation: float = MAX_ROTATION,
        generator_seed: int = 0,
        **kwargs: Any,
    ):
        self.shape_params = dict(
            num_train=num_train,
            num_val=num_val,
            image_size=image_size,
            max_objects=max_objects,
            object_size=tuple(object_size),
            min_visible=min_visible,
            max_rotation=max_rotation,
            seed=generator_seed,
        )
        self.cache_dir = Path(cache_dir)
        super().__init__(
            root=self.cache_dir,
            train_images="train",
            train_annotations="annotations/instances_train.json",
            val_images="val",
            val_annotations="annotations/instances_val.json",
            **kwargs,
        )

    def prepare_data(self) -> None:
        self.root = ensure_shapes(self.cache_dir, **self.shape_params)

    def setup(self, stage: str | None = None) -> None:
        # Every rank resolves the same folder; prepare_data ran on rank 0 and returned it already made.
        self.root = ensure_shapes(self.cache_dir, **self.shape_params)
        super().setup(stage)
