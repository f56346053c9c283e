"""Callbacks: a plain-text progress line with throughput, for logs where no progress bar renders."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L

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
