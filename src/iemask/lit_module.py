"""The LightningModule: trains and validates an IEMask R-CNN / Mask R-CNN built from its config.

The network is plain torchvision (``iemask.models``); this wrapper adds the optimiser and the
iteration schedule, loss logging, and streaming evaluation with the data module's protocol (COCO,
LVIS or Cityscapes); the non-finite-loss guard is a callback (``iemask.callbacks.NonFiniteLossGuard``).
The model config is saved in the checkpoint, so ``InstanceSegmentationModule.from_checkpoint(path)``
rebuilds the network without a config.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from iemask.callbacks import NonFiniteLossGuard
from iemask.evaluation import StreamingEvaluator, get_protocol
from iemask.models import compile_parts, load_pretrained_parts
from iemask.models.tta import detect
from iemask.training.optim import Schedule, build_sgd, total_batch_size
from iemask.utils.checkpoint import CheckpointError, load_checkpoint_file

log = logging.getLogger(__name__)

# Hyper-parameters that checkpoints of earlier versions saved and the module no longer takes
# (``on_nonfinite``: the non-finite-loss guard is now a callback).
RETIRED_HPARAMS = ("on_nonfinite",)
NO_SCHEDULE = "training needs a schedule (set the `schedule` config)"


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


class InstanceSegmentationModule(L.LightningModule):
    """Train/validate a detector given as a Hydra config (``_target_: iemask.models.build_model``).

    Args:
        model: the model config (a mapping with ``_target_``), instantiated here.
        optimizer: keyword arguments of :func:`iemask.training.optim.build_sgd` except ``lr``.
        schedule: keyword arguments of :class:`iemask.training.optim.Schedule`, written at its
            ``reference_batch_size`` and scaled to the real total batch size (:meth:`fit_schedule`).
        scale_schedule: apply that scaling (``False`` runs the schedule as written).
        compile_modules: parts compiled with ``torch.compile`` (in place, same state_dict keys):
            any of ``backbone``, ``neck``, ``mask_head``.
        compile_dynamic: compile for dynamic input shapes (detection images vary in size).
        init_from: optional Mask R-CNN checkpoint (path or torchvision weights name) whose
            ``init_parts`` are loaded before training (see ``load_pretrained_parts``).
        init_parts: key prefixes to load from ``init_from``.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        optimizer: Mapping[str, Any] | None = None,
        schedule: Mapping[str, Any] | None = None,
        scale_schedule: bool = True,
        compile_modules: list[str] | tuple[str, ...] | None = None,
        compile_dynamic: bool = True,
        init_from: str | None = None,
        init_parts: tuple[str, ...] | list[str] | None = None,
    ):
        super().__init__()
        model, optimizer, schedule = _plain(model), _plain(optimizer) or {}, _plain(schedule)
        self.save_hyperparameters(
            {
                "model": model,
                "optimizer": optimizer,
                "schedule": schedule,
                "scale_schedule": scale_schedule,
            }
        )
        self.model: nn.Module = hydra.utils.instantiate(model)
        if init_from:
            kwargs = {"parts": tuple(init_parts)} if init_parts else {}
            report = load_pretrained_parts(self.model, init_from, **kwargs)
            log.info("initialised %d tensors from %s", len(report.loaded), init_from)
        self.optimizer_kwargs = dict(optimizer)
        self.base_schedule = Schedule(**{**schedule, "steps": tuple(schedule.get("steps", ()))}) if schedule else None
        self.schedule = self.base_schedule
        self.loss_terms: dict[str, torch.Tensor] = {}  # the training step's, detached (NonFiniteLossGuard reads them)
        if compile_modules:
            compile_parts(self.model, compile_modules, dynamic=compile_dynamic)
        self.evaluator: StreamingEvaluator | None = None  # the data module's protocol's, built when first needed
        self.last_metrics: dict[str, dict[str, float]] = {}  # of the last "val" and the last "test" loop
        self.best_metric: float | None = None
        self.class_names: list[str] | None = None
        self.category_ids: list[int] | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> InstanceSegmentationModule:
        """Rebuild from a checkpoint alone (no backbone weights are fetched: the checkpoint has them).

        The file is read once, as data (:func:`load_checkpoint_file`: weights only, never code), and
        the module is rebuilt from its hyper-parameters (less :data:`RETIRED_HPARAMS`), then given its
        state and extras.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path} (set ckpt_path)")
        checkpoint = load_checkpoint_file(path)
        hparams = checkpoint.get("hyper_parameters")
        if not isinstance(hparams, Mapping) or not isinstance(hparams.get("model"), Mapping):
            raise CheckpointError(
                f"{path} is not an iemask checkpoint (no model config in its hyper_parameters); "
                "set ckpt_path to a .ckpt written by `python -m iemask.train`"
            )
        if not isinstance(checkpoint.get("state_dict"), Mapping):
            raise CheckpointError(
                f"{path} has no state_dict; set ckpt_path to a .ckpt written by `python -m iemask.train`"
            )
        kwargs = {k: v for k, v in hparams.items() if k not in RETIRED_HPARAMS}
        module = cls(**{**kwargs, "model": {**hparams["model"], "backbone_weights": None}})
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"])
        return module.to(map_location)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Inference on a list of float images (3×H×W in [0, 1]); detections at input resolution, with
        test-time augmentation when ``model.tta`` enables it."""
        return detect(self.model, images)

    # ---- fitting -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Take the data set's classes (Lightning has set the data module up) and, to fit, the scaled schedule."""
        datamodule = self.trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "class_names"):
            self.class_names, self.category_ids = datamodule.class_names, datamodule.category_ids
        if stage != "fit" or self.base_schedule is None:
            return
        batch = total_batch_size(
            getattr(datamodule, "batch_size", self.base_schedule.reference_batch_size),
            self.trainer.world_size,
            self.trainer.accumulate_grad_batches,
        )
        self.schedule = self.fit_schedule(batch)
        log.info(
            "schedule at %d images/step: lr %.5g, %d iterations, steps %s, warm-up %d",
            batch,
            self.schedule.base_lr,
            self.schedule.max_iters,
            list(self.schedule.steps),
            self.schedule.warmup_iters,
        )

    def fit_schedule(self, images_per_step: int) -> Schedule:
        """The schedule to run at ``images_per_step`` (scaled to it unless ``scale_schedule=False``).

        ``iemask.train`` asks for it before building the Trainer, whose ``max_steps`` and evaluation
        interval it sets; :meth:`setup` takes it again for the Trainer's world size.
        """
        if self.base_schedule is None:
            raise ValueError(NO_SCHEDULE)
        return self.base_schedule.scaled(images_per_step) if self.hparams.scale_schedule else self.base_schedule

    def configure_optimizers(self) -> dict:
        if self.schedule is None:
            raise ValueError(NO_SCHEDULE)
        optimizer = build_sgd(self.model, lr=self.schedule.base_lr, **self.optimizer_kwargs)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch: tuple[list, list[dict]], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        loss_dict = self.model(images, targets)
        loss = torch.stack(list(loss_dict.values())).sum()
        self.loss_terms = {k: v.detach() for k, v in loss_dict.items()}
        n = len(images)
        self.log_dict({f"train/{k}": v for k, v in self.loss_terms.items()}, on_step=True, batch_size=n)
        self.log("train/loss", loss.detach(), on_step=True, prog_bar=True, batch_size=n)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, prog_bar=True, batch_size=n)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Stopping through `should_stop` on the last step makes Lightning validate (and checkpoint)
        # the final weights even when max_steps is not a multiple of the validation interval.
        if 0 < self.trainer.max_steps <= self.global_step:
            self.trainer.should_stop = True

    # ---- evaluation ----------------------------------------------------------------------
    def _start_evaluation(self) -> None:
        """Empty the evaluator, built at the first evaluation from the data module's protocol and validation set.

        It is a child module (a ``torchmetrics.Metric``): its states live on this module's device, where
        torchmetrics gathers them across ranks.
        """
        if self.evaluator is None:
            datamodule = self.trainer.datamodule
            self.evaluator = get_protocol(datamodule.protocol).build_evaluator(datamodule.val_set).to(self.device)
        self.evaluator.reset()

    def _evaluation_step(self, batch: tuple[list, list[dict]]) -> list[dict[str, torch.Tensor]]:
        images, targets = batch
        outputs = detect(self.model, images)  # with test-time augmentation when model.tta enables it
        self.evaluator.update([t["image_id"] for t in targets], outputs)
        return outputs  # for callbacks (e.g. W&B overlays); Lightning does not keep them

    def _finish_evaluation(self, prefix: str) -> dict[str, float]:
        """Sync and score (rank 0 scores, every rank gets the metrics); log metrics under ``<prefix>/`` and
        bookkeeping under ``<prefix>_info/``."""
        metrics = self.evaluator.compute()
        self.last_metrics[prefix] = metrics
        # Every rank holds the same metrics (scored once, broadcast): logged without a collective per key (LVIS
        # gives thousands with its per-class APs).
        self.log_dict({f"{prefix}/{k}": float(v) for k, v in metrics.items()}, sync_dist=False)
        info = {"num_images": float(self.evaluator.num_images), "step": float(self.global_step)}
        key = "segm/AP" if "segm/AP" in metrics else next(iter(metrics))
        if prefix == "val" and not self.trainer.sanity_checking:
            self.best_metric = max(metrics[key], self.best_metric if self.best_metric is not None else -1.0)
            info[f"{key}_best"] = float(self.best_metric)
        self.log_dict({f"{prefix}_info/{k}": v for k, v in info.items()}, sync_dist=True)
        return metrics

    def on_validation_epoch_start(self) -> None:
        self._start_evaluation()

    def validation_step(self, batch: tuple[list, list[dict]], batch_idx: int) -> list[dict[str, torch.Tensor]]:
        return self._evaluation_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def on_test_epoch_start(self) -> None:
        self._start_evaluation()

    def test_step(self, batch: tuple[list, list[dict]], batch_idx: int) -> list[dict[str, torch.Tensor]]:
        return self._evaluation_step(batch)

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    # ---- checkpoint extras ---------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "optimizer_states" not in checkpoint and self._trainer is not None:
            # A weights-only checkpoint (the best file): Lightning skips the callbacks' save hooks,
            # so the non-finite-loss guard's check before a save runs from here.
            for callback in self.trainer.callbacks:
                if isinstance(callback, NonFiniteLossGuard):
                    callback.on_save_checkpoint(self.trainer, self, checkpoint)
        checkpoint["class_names"] = self.class_names
        checkpoint["category_ids"] = self.category_ids
        checkpoint["best_metric"] = self.best_metric

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.class_names = checkpoint.get("class_names")
        self.category_ids = checkpoint.get("category_ids")
        self.best_metric = checkpoint.get("best_metric")
