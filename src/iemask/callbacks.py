"""Callbacks: a plain-text progress line with throughput, and W&B validation overlays."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import numpy as np
import torch

log = logging.getLogger("iemask.progress")


class ThroughputLog(L.Callback):
    """Every ``every_n_steps`` optimizer steps: log ``train/images_per_sec`` and print one line.

    Throughput is measured over the interval (wall time between the interval's first and last
    batch, data loading included), so it needs no device sync beyond reading the logged loss.
    """

    def __init__(self, every_n_steps: int = 20):
        self.every_n_steps = every_n_steps
        self._start: float | None = None
        self._images = 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._start is None:
            self._start = time.perf_counter()
            self._images = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._images += len(batch[0]) * trainer.world_size
        step = trainer.global_step
        if step % self.every_n_steps or self._start is None:
            return
        elapsed = time.perf_counter() - self._start
        rate = self._images / elapsed if elapsed > 0 else 0.0
        pl_module.log("train/images_per_sec", rate, on_step=True, batch_size=len(batch[0]))
        if trainer.is_global_zero:
            metrics = trainer.callback_metrics
            loss = metrics.get("train/loss")
            lr = metrics.get("train/lr")
            log.info(
                "step %d/%d  loss %s  lr %s  %.1f images/s",
                step,
                trainer.max_steps,
                f"{float(loss):.4f}" if loss is not None else "-",
                f"{float(lr):.3g}" if lr is not None else "-",
                rate,
            )
        self._start = None


MAX_MASK_CLASSES = 256  # background + 255 classes fit W&B's 8-bit class maps


class WandbValidationImages(L.Callback):
    """Log a fixed set of validation images with predicted and ground-truth overlays to W&B.

    The first ``num_images`` images of rank 0's validation shard (the same at every
    evaluation) become ``wandb.Image`` objects with mask overlays (a class-label map per image)
    and box overlays, under ``val/examples``. Does nothing without a ``WandbLogger``.
    """

    def __init__(self, num_images: int = 8, score_thresh: float = 0.3):
        self.num_images = num_images
        self.score_thresh = score_thresh
        self._items: list[tuple] = []

    @staticmethod
    def _logger(trainer: L.Trainer) -> Any:
        from lightning.pytorch.loggers import WandbLogger

        return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._items = []

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, **_: Any
    ) -> None:
        if not trainer.is_global_zero or outputs is None or len(self._items) >= self.num_images:
            return
        if self._logger(trainer) is None:
            return
        images, targets = batch
        for image, target, output in zip(images, targets, outputs, strict=True):
            if len(self._items) < self.num_images:
                keep = output["scores"] >= self.score_thresh
                prediction = {k: output[k][keep].detach().cpu() for k in ("boxes", "labels", "scores", "masks")}
                truth = {k: target[k].detach().cpu() for k in ("boxes", "labels", "masks")}
                self._items.append((image.detach().cpu(), prediction, truth))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = self._logger(trainer)
        if not trainer.is_global_zero or logger is None or not self._items:
            return
        names = getattr(pl_module, "class_names", None) or []
        class_labels = {0: "background", **{i + 1: n for i, n in enumerate(names)}}
        # W&B stores class maps as 8-bit PNGs: with more classes (LVIS' 1203) only boxes are drawn.
        with_masks = len(class_labels) <= MAX_MASK_CLASSES
        images, masks, boxes = [], [], []
        for image, prediction, truth in self._items:
            images.append((image.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy())
            if with_masks:
                masks.append(
                    {
                        "predictions": {
                            "mask_data": _label_map(prediction, image.shape[-2:]),
                            "class_labels": class_labels,
                        },
                        "ground_truth": {
                            "mask_data": _label_map(truth, image.shape[-2:]),
                            "class_labels": class_labels,
                        },
                    }
                )
            boxes.append(
                {
                    "predictions": {"box_data": _box_data(prediction, class_labels), "class_labels": class_labels},
                    "ground_truth": {"box_data": _box_data(truth, class_labels), "class_labels": class_labels},
                }
            )
        overlays = {"masks": masks, "boxes": boxes} if with_masks else {"boxes": boxes}
        logger.log_image("val/examples", images, step=trainer.global_step, **overlays)
        self._items = []


def _label_map(instances: dict[str, torch.Tensor], size: tuple[int, int]) -> np.ndarray:
    """(H, W) class ids; higher-scoring (or later) instances are painted on top."""
    label_map = np.zeros(tuple(size), dtype=np.uint8)
    masks = instances["masks"].reshape(len(instances["masks"]), *size) > 0.5
    order = instances["scores"].argsort() if "scores" in instances else torch.arange(len(masks))
    for i in order.tolist():
        label_map[masks[i].numpy()] = int(instances["labels"][i])
    return label_map


def _box_data(instances: dict[str, torch.Tensor], class_labels: dict[int, str]) -> list[dict]:
    data = []
    for i, (box, label) in enumerate(zip(instances["boxes"].tolist(), instances["labels"].tolist(), strict=True)):
        item = {
            "position": {"minX": box[0], "minY": box[1], "maxX": box[2], "maxY": box[3]},
            "domain": "pixel",
            "class_id": int(label),
            "box_caption": class_labels.get(int(label), str(label)),
        }
        if "scores" in instances:
            score = float(instances["scores"][i])
            item["scores"] = {"score": score}
            item["box_caption"] += f" {score:.2f}"
        data.append(item)
    return data
