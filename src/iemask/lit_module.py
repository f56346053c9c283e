"""The LightningModule: trains and validates an IEMask R-CNN / Mask R-CNN built from its config.

The network is plain torchvision (``iemask.models``); this wrapper adds the optimiser and the
iteration schedule, loss logging, the non-finite-loss guard, and streaming evaluation with the
data module's protocol (COCO, LVIS or Cityscapes). The model config is saved in the checkpoint,
so ``InstanceSegmentationModule.from_checkpoint(path)`` rebuilds the network without a config.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig, OmegaConf
from torch import nn

from iemask.models import compile_parts, load_pretrained_parts
from iemask.training.optim import Schedule, build_sgd, total_batch_size
from iemask.utils.checkpoint import CheckpointError, load_checkpoint_file

log = logging.getLogger(__name__)

NONFINITE_ACTIONS = ("raise", "skip")
NONFINITE_ADVICE = (
    "Lower the learning rate, enable gradient clipping (trainer.gradient_clip_val), or set module.on_nonfinite=skip"
)


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


class InstanceSegmentationModule(L.LightningModule):
    """Train/validate a detector given as a Hydra config (``_target_: iemask.models.build_model``).

    Args:
        model: the model config (a mapping with ``_target_``), instantiated here.
        optimizer: keyword arguments of :func:`iemask.training.optim.build_sgd` except ``lr``.
        schedule: keyword arguments of :class:`iemask.training.optim.Schedule`, written at its
            ``reference_batch_size`` and scaled at fit time to the real total batch size.
        scale_schedule: apply that scaling (``False`` runs the schedule as written).
        on_nonfinite: ``raise`` stops with the step and loss terms; ``skip`` drops the step.
        check_finite_every: with ``raise``, look at the (device-side) finiteness flags every this
            many steps: 1 syncs host and device once per step; more keeps the hot path sync-free
            and still names the first bad step and term (the weights may have taken the bad
            steps meanwhile; resume from the last good checkpoint). ``skip`` checks every step.
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
        on_nonfinite: str = "raise",
        check_finite_every: int = 1,
        compile_modules: list[str] | tuple[str, ...] | None = None,
        compile_dynamic: bool = True,
        init_from: str | None = None,
        init_parts: tuple[str, ...] | list[str] | None = None,
    ):
        super().__init__()
        if on_nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_ACTIONS}, got {on_nonfinite!r}")
        model, optimizer, schedule = _plain(model), _plain(optimizer) or {}, _plain(schedule)
        self.save_hyperparameters(
            {
                "model": model,
                "optimizer": optimizer,
                "schedule": schedule,
                "scale_schedule": scale_schedule,
                "on_nonfinite": on_nonfinite,
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
        self.on_nonfinite = on_nonfinite
        if check_finite_every < 1:
            raise ValueError(f"check_finite_every must be >= 1, got {check_finite_every}")
        self.check_finite_every = check_finite_every
        self._first_bad_step: torch.Tensor | None = None  # -1 until a loss goes non-finite
        self._first_bad_values: torch.Tensor | None = None  # (num_terms,) loss terms at that step
        self._loss_names: list[str] = []
        if compile_modules:
            compile_parts(self.model, compile_modules, dynamic=compile_dynamic)
        self.evaluator: Any = None
        self.val_metrics: dict[str, float] = {}
        self.best_metric: float | None = None
        self.class_names: list[str] | None = None
        self.category_ids: list[int] | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> InstanceSegmentationModule:
        """Rebuild from a checkpoint alone (no backbone weights are fetched: the checkpoint has them).

        The file is read once, as data (:func:`load_checkpoint_file`: weights only, never code), and
        the module is rebuilt from its hyper-parameters, then given its state and extras.
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
        module = cls(**{**hparams, "model": {**hparams["model"], "backbone_weights": None}})
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"])
        return module.to(map_location)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Inference on a list of float images (3×H×W in [0, 1]); detections at input resolution."""
        return self.model(images)

    # ---- fitting -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "class_names"):
            datamodule.setup(stage)
            self.class_names, self.category_ids = datamodule.class_names, datamodule.category_ids
        if stage == "fit" and self.base_schedule is not None:
            self._scale_schedule(datamodule)

    def _scale_schedule(self, datamodule: Any) -> None:
        trainer = self.trainer
        batch = total_batch_size(
            getattr(datamodule, "batch_size", self.base_schedule.reference_batch_size),
            trainer.world_size,
            trainer.accumulate_grad_batches,
        )
        self.schedule = self.base_schedule.scaled(batch) if self.hparams.scale_schedule else self.base_schedule
        if not trainer.fast_dev_run:
            if trainer.max_steps in (-1, None):
                trainer.fit_loop.epoch_loop.max_steps = self.schedule.max_iters
            # evaluate every eval_period iterations (only at the end without one)
            trainer.val_check_interval = self.schedule.eval_period or trainer.max_steps
        log.info(
            "schedule at %d images/step: lr %.5g, %d iterations, steps %s, warm-up %d",
            batch,
            self.schedule.base_lr,
            self.schedule.max_iters,
            list(self.schedule.steps),
            self.schedule.warmup_iters,
        )

    def configure_optimizers(self) -> dict:
        if self.schedule is None:
            raise ValueError("training needs a schedule (set the `schedule` config)")
        optimizer = build_sgd(self.model, lr=self.schedule.base_lr, **self.optimizer_kwargs)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch: tuple[list, list[dict]], batch_idx: int) -> torch.Tensor | None:
        images, targets = batch
        loss_dict = self.model(images, targets)
        loss = torch.stack(list(loss_dict.values())).sum()
        if self.on_nonfinite == "skip":
            # The step must not run on a non-finite loss, and under DDP all ranks decide alike.
            if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
                rank_zero_warn(f"{self._nonfinite_message(loss_dict, self.global_step)}; step skipped")
                self.log("train/skipped_steps", 1.0, on_step=True, reduce_fx="sum", batch_size=len(images))
                return None
        else:
            self._track_nonfinite(loss_dict)
        n = len(images)
        self.log_dict({f"train/{k}": v.detach() for k, v in loss_dict.items()}, on_step=True, batch_size=n)
        self.log("train/loss", loss.detach(), on_step=True, prog_bar=True, batch_size=n)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, prog_bar=True, batch_size=n)
        return loss

    def _track_nonfinite(self, loss_dict: dict[str, torch.Tensor]) -> None:
        """Remember the first non-finite step on the device; sync and raise every ``check_finite_every`` steps.

        The loss terms of the first bad step are kept (not those of later steps, which a NaN update
        has already poisoned), so the message names the term that went wrong first.
        """
        values = torch.stack([v.detach().float() for v in loss_dict.values()])  # (num_terms,)
        bad = ~torch.isfinite(values)
        step = torch.full((), self.global_step, device=values.device)
        if self._first_bad_step is None:
            self._first_bad_step, self._first_bad_values = torch.full_like(step, -1), values.clone()
        is_first = bad.any() & (self._first_bad_step < 0)
        self._first_bad_values = torch.where(is_first, values, self._first_bad_values)
        self._first_bad_step = torch.where(is_first, step, self._first_bad_step)
        self._loss_names = list(loss_dict)
        if (self.global_step + 1) % self.check_finite_every == 0:
            self._check_nonfinite()

    def _check_nonfinite(self) -> None:
        """Sync the finiteness record and raise if any step so far had a non-finite loss.

        Runs every ``check_finite_every`` steps and, so that no bad step goes unreported or into
        a checkpoint, before each validation, checkpoint save and at the end of training.
        """
        if self.on_nonfinite != "raise" or self._first_bad_step is None:
            return
        if not self.trainer.strategy.reduce_boolean_decision(bool(self._first_bad_step >= 0), all=False):
            return
        first = int(self._first_bad_step)
        if first < 0:
            raise FloatingPointError(f"non-finite loss on another rank by step {self.global_step}. " + NONFINITE_ADVICE)
        first_values = dict(zip(self._loss_names, self._first_bad_values.tolist(), strict=True))
        names = [k for k, v in first_values.items() if not math.isfinite(v)]
        raise FloatingPointError(
            f"{self._nonfinite_message(first_values, first)} (non-finite: {', '.join(names)}). " + NONFINITE_ADVICE
        )

    @staticmethod
    def _nonfinite_message(loss_dict: dict[str, torch.Tensor | float], step: int) -> str:
        terms = ", ".join(f"{k}={float(v):.4g}" for k, v in loss_dict.items())
        return f"non-finite loss at step {step}: {terms}"

    def on_train_end(self) -> None:
        self._check_nonfinite()  # the last steps, when max_steps is not a multiple of check_finite_every

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Stopping through `should_stop` on the last step makes Lightning validate (and checkpoint)
        # the final weights even when max_steps is not a multiple of the validation interval.
        if 0 < self.trainer.max_steps <= self.global_step:
            self.trainer.should_stop = True

    # ---- evaluation ----------------------------------------------------------------------
    def _start_evaluation(self) -> None:
        datamodule = self.trainer.datamodule
        if self.evaluator is None:
            self.evaluator = datamodule.build_evaluator()
        self.evaluator.reset()

    def _evaluation_step(self, batch: tuple[list, list[dict]]) -> list[dict[str, torch.Tensor]]:
        images, targets = batch
        outputs = self.model(images)
        self.evaluator.process([t["image_id"] for t in targets], outputs)
        return outputs  # for callbacks (e.g. W&B overlays); Lightning does not keep them

    def _finish_evaluation(self, prefix: str) -> dict[str, float]:
        """Gather and score; log metrics under ``<prefix>/`` and bookkeeping under ``<prefix>_info/``."""
        metrics = self.evaluator.evaluate()
        self.val_metrics = metrics
        self.log_dict({f"{prefix}/{k}": float(v) for k, v in metrics.items()}, sync_dist=True)
        info = {"num_images": float(self.evaluator.num_images), "step": float(self.global_step)}
        key = "segm/AP" if "segm/AP" in metrics else next(iter(metrics))
        if prefix == "val" and not self.trainer.sanity_checking:
            self.best_metric = max(metrics[key], self.best_metric if self.best_metric is not None else -1.0)
            info[f"{key}_best"] = float(self.best_metric)
        self.log_dict({f"{prefix}_info/{k}": v for k, v in info.items()}, sync_dist=True)
        return metrics

    def on_validation_epoch_start(self) -> None:
        self._check_nonfinite()
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
        self._check_nonfinite()  # never write weights trained on a non-finite loss
        checkpoint["class_names"] = self.class_names
        checkpoint["category_ids"] = self.category_ids
        checkpoint["best_metric"] = self.best_metric

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.class_names = checkpoint.get("class_names")
        self.category_ids = checkpoint.get("category_ids")
        self.best_metric = checkpoint.get("best_metric")
