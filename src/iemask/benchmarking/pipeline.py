"""The input pipeline's speed: decoded and augmented training images/s of the real training ``DataLoader``."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from iemask.data import ShapesSpec
from iemask.data.base import DetectionDataModule
from iemask.data.coco import COCODataModule
from iemask.data.shapes import ShapesDataModule


def measure_pipeline(
    datamodule: DetectionDataModule, num_workers: Sequence[int], batches: int, warmup_batches: int = 2
) -> dict[str, float]:
    """Decoded and augmented training images/s of the data module's real training ``DataLoader``.

    For each worker count, ``warmup_batches`` (worker start-up) are discarded and ``batches`` timed;
    the loader is iterated epoch after epoch if the dataset is shorter. Returns ``{str(workers): images/s}``.
    """
    datamodule.prepare_data()
    datamodule.train_set = datamodule.build_dataset("train", train=True)  # no validation json needed
    rates = {}
    for workers in num_workers:
        datamodule.num_workers, datamodule.persistent_workers = workers, workers > 0
        loader = datamodule.train_dataloader()

        def endless(loader: Any = loader) -> Iterator[tuple[list, list]]:
            while True:
                yield from loader

        stream = endless()
        for _ in range(warmup_batches):
            next(stream)
        start, count = time.perf_counter(), 0
        for _ in range(batches):
            count += len(next(stream)[0])
        rates[str(workers)] = count / (time.perf_counter() - start)
        stream.close()
        del stream, loader  # drops the last references to the persistent workers, which then shut down
    return rates


def pipeline_datamodule(
    data_root: str | None,
    cache_dir: str,
    num_classes: int = 80,
    shapes_images: int = 64,
    shapes_image_size: int = 128,
    pin_memory: bool = False,
    seed: int = 0,
    **loader_kwargs: Any,
) -> COCODataModule:
    """The COCO data module on ``data_root`` (COCO 2017 layout), or on the generated shapes dataset if ``None``.

    ``loader_kwargs`` are data-module settings (``batch_size``, ``train_min_size``, ``max_size``...).
    """
    common = dict(pin_memory=pin_memory, seed=seed, **loader_kwargs)
    if data_root:
        return COCODataModule(root=data_root, num_classes=num_classes, **common)
    spec = ShapesSpec(num_train=shapes_images, num_val=1, image_size=shapes_image_size)
    return ShapesDataModule(cache_dir=cache_dir, spec=spec, num_classes=3, **common)
