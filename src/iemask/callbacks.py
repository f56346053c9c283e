"""Callbacks: resumable checkpoints and pre-emption, per-step seeding, the non-finite-loss guard, a
progress line with throughput, the count of replaced unreadable images, and W&B validation overlays."""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from iemask.models.postprocess import BinaryMasks
from iemask.utils.seeding import derive_seed

log = logging.getLogger("iemask.progress")


class LastCheckpoint(Checkpoint):
    """Keep ``<dirpath>/last.ckpt`` resumable: after each evaluation, every ``every_n_steps`` steps,
    and at once (at the end of the current step) when the job is pre-empted.

    A Lightning ``Checkpoint``, so the Trainer runs it after the other callbacks, the best-checkpoint
    ``ModelCheckpoint`` listed before it included: a ``last.ckpt`` written after an evaluation holds
    the best-checkpoint tracking that this evaluation updated.

    Pre-emption is SIGTERM (which Lightning turns into ``trainer.received_sigterm``) or
    ``requeue_signal``, SLURM's advance warning (``sbatch --signal=USR1@120``). The checkpoint is
    written between steps, never from inside a signal handler, so the resumed run is exact; after
    ``requeue_signal`` on SLURM the job is requeued (``scontrol requeue``), as Lightning's
    auto-requeue does. Training then stops with Lightning's ``SIGTERMException`` (a clean exit).

    ``last.ckpt`` holds the optimizer state too, so it is the run's largest file: once the job has
    completed (:meth:`on_success`, called by ``iemask.train`` after the final evaluation and
    ``metrics.json``) it is removed, unless ``keep_after_success`` or the run has no best checkpoint.
    A pre-empted or failed job keeps it.

    Args:
        dirpath: the run's checkpoint folder.
        filename: the file name of the resumable checkpoint.
        every_n_steps: the period in optimizer steps; ``None`` takes the module's scaled
            ``schedule.checkpoint_period`` (``None`` there too: after evaluations only).
        requeue_signal: a signal name (``"SIGUSR1"``) that asks for a checkpoint and a requeue.
        keep_after_success: keep ``last.ckpt`` when the job completes (to train it further).
    """

    def __init__(
        self,
        dirpath: str | Path,
        filename: str = "last.ckpt",
        every_n_steps: int | None = None,
        requeue_signal: str | None = "SIGUSR1",
        keep_after_success: bool = False,
    ):
        self.dirpath, self.filename = Path(dirpath), filename
        self.keep_after_success = keep_after_success
        self.every_n_steps = every_n_steps
        self.requeue_signal = getattr(signal, requeue_signal) if requeue_signal else None
        self.last_saved_step: int | None = None
        self.preempted = False
        self._requeue_requested = False
        self._previous_handler: Any = None

    @property
    def path(self) -> Path:
        return self.dirpath / self.filename

    def _period(self, pl_module: L.LightningModule) -> int | None:
        if self.every_n_steps:
            return self.every_n_steps
        schedule = getattr(pl_module, "schedule", None)
        return getattr(schedule, "checkpoint_period", None)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning has installed its own handlers, so this one wins for the requeue signal.
        if self.requeue_signal is not None and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(self.requeue_signal, self._on_requeue_signal)

    def _on_requeue_signal(self, signum: int, frame: Any) -> None:
        self._requeue_requested = True  # acted on between steps

    def _restore_handler(self) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(self.requeue_signal, self._previous_handler)
            self._previous_handler = None

    def save(self, trainer: L.Trainer) -> None:
        """Write the checkpoint now (every rank calls this; the strategy writes once)."""
        trainer.save_checkpoint(self.path)
        self.last_saved_step = trainer.global_step

    def on_success(self, trainer: L.Trainer) -> None:
        """The job completed: remove ``last.ckpt`` unless it is to be kept or is the only weights left."""
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        if self.keep_after_success or not trainer.is_global_zero or not self.path.is_file():
            return
        if not best or not Path(best).is_file():
            log.warning("no best checkpoint was written: keeping %s", self.path)
            return
        self.path.unlink()
        log.info("removed %s (callbacks.last_checkpoint.keep_after_success=true keeps it)", self.path)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stop = bool(trainer.received_sigterm or self._requeue_requested)
        if trainer.world_size > 1:  # every rank must take the same decision (the save is collective)
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self._preempt(trainer)
        period, step = self._period(pl_module), trainer.global_step
        evaluates_now = isinstance(trainer.val_check_interval, int) and step % trainer.val_check_interval == 0
        if period and step % period == 0 and not evaluates_now and step != self.last_saved_step:
            self.save(trainer)

    def _preempt(self, trainer: L.Trainer) -> None:
        self._save_preempted(trainer)
        if trainer.is_global_zero and self._requeue_requested and SLURMEnvironment.detect():
            self._requeue_slurm_job()
        raise SIGTERMException

    def _save_preempted(self, trainer: L.Trainer) -> None:
        self.save(trainer)
        self.preempted = True
        if trainer.is_global_zero:
            log.warning(
                "pre-empted at step %d: saved %s; resume with ckpt_path=%s", trainer.global_step, self.path, self.path
            )

    @staticmethod
    def _requeue_slurm_job() -> None:
        array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
        result = subprocess.run(["scontrol", "requeue", job], check=False, capture_output=True, text=True)
        if result.returncode == 0:
            log.warning("requeued SLURM job %s", job)
        else:
            log.error("could not requeue SLURM job %s: %s", job, result.stderr.strip())

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or trainer.received_sigterm:
            return
        self.save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handler()
        if not isinstance(exception, SIGTERMException) or self.preempted:
            return
        if trainer.training:
            # Under DDP, Lightning broadcasts rank 0's SIGTERM at the start of a step and stops every rank
            # there, between two steps (this hook runs on all of them): the state is whole, so save it.
            self._save_preempted(trainer)
            return
        self.preempted = True
        if trainer.is_global_zero:
            # SIGTERM during an evaluation: Lightning stops it part-way; the last checkpoint stands.
            log.warning(
                "pre-empted during an evaluation at step %d; resume from %s (step %s)",
                trainer.global_step,
                self.path,
                self.last_saved_step,
            )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handler()


class SeedEveryStep(L.Callback):
    """Seed torch's generators before every training step from ``(seed, rank, step)``.

    The model draws random numbers of its own (the RPN's and RoI heads' positive/negative
    sampling); seeded per step, those draws do not depend on what ran before in the process
    (data loading, an evaluation, a restart), so a resumed run takes the same steps as an
    uninterrupted one. ``seed=None`` leaves the generators alone.
    """

    def __init__(self, seed: int | None):
        self.seed = seed

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.seed is not None:
            torch.manual_seed(derive_seed(self.seed, trainer.global_rank, trainer.global_step))


NONFINITE_ACTIONS = ("raise", "skip")
NONFINITE_ADVICE = (
    "Lower the learning rate, enable gradient clipping (trainer.gradient_clip_val), "
    "or set callbacks.nonfinite_loss.action=skip"
)


class NonFiniteLossGuard(L.Callback):
    """Stop training at a NaN or infinite loss (``raise``), or drop that optimizer step (``skip``).

    Looks at the module's ``loss_terms`` (the step's loss terms, detached) before the backward pass;
    every rank takes the same decision.

    ``raise`` keeps the first bad step and its terms on the device and syncs every ``check_every``
    steps, and before each validation, each checkpoint save (weights-only ones, such as the best file,
    through ``InstanceSegmentationModule.on_save_checkpoint``: Lightning calls no callback for them) and
    at the end of training, so that no bad step goes unreported or into a checkpoint. The error names
    the first bad step and the term that went bad first (not those of later steps, which a NaN update
    has already poisoned). ``check_every=1`` syncs host and device once per step, before the step's
    update; more keeps the hot path sync-free
    (the weights may have taken the bad steps meanwhile: resume from the last good checkpoint).

    ``skip`` checks every step; a step whose loss is not finite loses its gradients before the
    optimizer sees them (SGD leaves parameters without one alone: no weight or momentum changes), and
    is counted in ``train/skipped_steps``. With gradient accumulation the whole accumulated step goes.

    Args:
        action: ``raise`` or ``skip``.
        check_every: with ``raise``, the period in steps of the host-device sync.
    """

    def __init__(self, action: str = "raise", check_every: int = 1):
        if action not in NONFINITE_ACTIONS:
            raise ValueError(f"action must be one of {NONFINITE_ACTIONS}, got {action!r}")
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.action, self.check_every = action, check_every
        self._first_bad_step: torch.Tensor | None = None  # -1 until a loss goes non-finite
        self._first_bad_values: torch.Tensor | None = None  # (num_terms,) loss terms at that step
        self._names: list[str] = []
        self._skip = False  # skip: drop the gradients at the coming optimizer step

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        terms, step = pl_module.loss_terms, trainer.global_step
        if self.action == "skip":
            if not trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
                rank_zero_warn(f"{_nonfinite_message(terms, step)}; step skipped")
                self._skip = True
            return
        self._track(terms, step)
        if (step + 1) % self.check_every == 0:
            self._check(trainer)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._skip:
            optimizer.zero_grad(set_to_none=True)
            pl_module.log("train/skipped_steps", 1.0, on_step=True, reduce_fx="sum")
            self._skip = False

    def _track(self, terms: dict[str, torch.Tensor], step: int) -> None:
        """Remember the first non-finite step and its terms, on the device (no sync)."""
        values = torch.stack([v.float() for v in terms.values()])  # (num_terms,)
        bad = ~torch.isfinite(values)
        now = torch.full((), step, device=values.device)
        if self._first_bad_step is None:
            self._first_bad_step, self._first_bad_values = torch.full_like(now, -1), values.clone()
        is_first = bad.any() & (self._first_bad_step < 0)
        self._first_bad_values = torch.where(is_first, values, self._first_bad_values)
        self._first_bad_step = torch.where(is_first, now, self._first_bad_step)
        self._names = list(terms)

    def _check(self, trainer: L.Trainer) -> None:
        """Sync the record and raise if any rank has had a non-finite loss so far."""
        if self._first_bad_step is None:
            return
        if not trainer.strategy.reduce_boolean_decision(bool(self._first_bad_step >= 0), all=False):
            return
        first = int(self._first_bad_step)
        if first < 0:
            raise FloatingPointError(
                f"non-finite loss on another rank by step {trainer.global_step}. " + NONFINITE_ADVICE
            )
        first_values = dict(zip(self._names, self._first_bad_values.tolist(), strict=True))
        names = [k for k, v in first_values.items() if not math.isfinite(v)]
        raise FloatingPointError(
            f"{_nonfinite_message(first_values, first)} (non-finite: {', '.join(names)}). " + NONFINITE_ADVICE
        )

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._check(trainer)  # never write weights trained on a non-finite loss

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)  # the last steps, when they end between two checks


def _nonfinite_message(terms: dict[str, torch.Tensor | float], step: int) -> str:
    return f"non-finite loss at step {step}: " + ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())


class SkippedImagesLog(L.Callback):
    """Count training images replaced because they could not be read (``data.on_bad_image=skip``).

    The data set marks a replaced item with ``target["skipped_files"]``; the running total (all
    ranks) is logged as ``train/skipped_images`` and kept in checkpoints, and ``total``, summed
    over the ranks at the end of training, is what ``iemask.train`` writes into ``metrics.json``.
    """

    def __init__(self) -> None:
        self._local = 0  # this rank's count
        self.total = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        skipped = sum(len(target.get("skipped_files", ())) for target in batch[1])
        if skipped:
            self._local += skipped
            log.warning("%d unreadable training image(s) replaced at step %d", skipped, trainer.global_step)
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            pl_module.log(
                "train/skipped_images",
                float(self._local),
                on_step=True,
                reduce_fx="sum",
                sync_dist=True,
                batch_size=len(batch[0]),
            )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        count = torch.tensor(float(self._local), device=trainer.strategy.root_device)
        self.total = int(trainer.strategy.reduce(count, reduce_op="sum"))

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self._local}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._local = int(state_dict.get("skipped", 0))


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


def _label_map(instances: dict[str, Any], size: tuple[int, int]) -> np.ndarray:
    """(H, W) class ids; higher-scoring (or later) instances are painted on top.

    ``masks`` are dense (N, H, W) or (N, 1, H, W), cut at 0.5, or the model's ``BinaryMasks``, painted
    patch by patch.
    """
    label_map = np.zeros(tuple(size), dtype=np.uint8)
    masks = instances["masks"]
    order = instances["scores"].argsort() if "scores" in instances else torch.arange(len(masks))
    if isinstance(masks, BinaryMasks):
        patches = masks.cpu().patches()
        for i in order.tolist():
            y0, x0, patch = patches[i]
            label_map[y0 : y0 + patch.shape[0], x0 : x0 + patch.shape[1]][patch.numpy()] = int(instances["labels"][i])
        return label_map
    dense = masks.reshape(len(masks), *size) > 0.5
    for i in order.tolist():
        label_map[dense[i].numpy()] = int(instances["labels"][i])
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
