"""``python -m iemask.train``: train and evaluate a model; see ``conf/train.yaml``.

Examples:
    python -m iemask.train                                   # shapes, small IEMask, CPU, ~minutes
    python -m iemask.train experiment=coco_r50 data.root=/datasets/coco trainer=ddp trainer.devices=8
    python -m iemask.train --cfg job                         # print the composed config
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from iemask.evaluation import format_table
from iemask.loggers import finish_loggers
from iemask.models import count_parameters
from iemask.utils.config import CONFIG_DIR
from iemask.utils.runs import instantiate_all, prepare_ddp_relaunch, write_json_atomic

log = logging.getLogger(__name__)


def logged_metrics(trainer: L.Trainer, prefix: str) -> dict[str, float]:
    """The last evaluation's metrics as logged under ``<prefix>/`` (flat keys like ``segm/AP``)."""
    start = f"{prefix}/"
    return {k[len(start) :]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(start)}


def run_summary(cfg: DictConfig, model: Any) -> dict[str, Any]:
    """What a sweep report needs besides the metrics: switches, backbone, parameter count."""
    return {
        "switches": dict(model.switches),
        "backbone": cfg.model.backbone,
        "params_m": count_parameters(model) / 1e6,
        "experiment": HydraConfig.get().runtime.choices.get("experiment") if HydraConfig.initialized() else None,
    }


def invalid_switches(model_cfg: DictConfig) -> str | None:
    """Why a switch combination cannot be built, or ``None`` (AFF needs the bottom-up path)."""
    if model_cfg.get("aff") and not model_cfg.get("bottom_up"):
        return "aff=true needs bottom_up=true (AFF fuses the bottom-up path)"
    return None


def train(cfg: DictConfig, callbacks: list[L.Callback] | None = None) -> dict[str, Any]:
    """Fit, evaluate the final weights, write ``metrics.json``; return metrics and checkpoint paths.

    Args:
        cfg: the composed ``train`` config.
        callbacks: extra callbacks (from a notebook or a test) besides ``cfg.callbacks``.
    """
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    datamodule = hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.module, _recursive_=False)
    callbacks = [*instantiate_all(cfg.get("callbacks")), *(callbacks or [])]
    loggers = instantiate_all(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    job_config = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    for logger in loggers:
        logger.log_hyperparams(job_config)
    if trainer.is_global_zero:
        write_json_atomic(output_dir / "run.json", run_summary(cfg, module.model))
    prepare_ddp_relaunch()
    succeeded = False
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        # callback_metrics, unlike the module's attributes, also come back from ddp_spawn workers.
        evaluated_step = trainer.callback_metrics.get("val_info/step")
        if cfg.get("validate_at_end", True) and (evaluated_step is None or int(evaluated_step) != trainer.global_step):
            trainer.validate(module, datamodule=datamodule, verbose=False)
        succeeded = True
    finally:
        finish_loggers(loggers, succeeded)  # a sweep's next job must start a new W&B run
    metrics = logged_metrics(trainer, "val")
    checkpoints = {
        "best": trainer.checkpoint_callback,
        "last": next((c for c in trainer.checkpoint_callbacks if c.monitor is None), None),
    }
    result = {
        "metrics": metrics,
        "evaluated_images": int(trainer.callback_metrics.get("val_info/num_images", 0)),
        "best_checkpoint": getattr(checkpoints["best"], "best_model_path", "") or None,
        "last_checkpoint": getattr(checkpoints["last"], "best_model_path", "") or None,
        "output_dir": str(output_dir),
    }
    if trainer.is_global_zero:
        write_json_atomic(output_dir / "metrics.json", metrics)
        log.info("final validation at step %d:\n%s", trainer.global_step, format_table(metrics))
        log.info("checkpoints: best %s, last %s", result["best_checkpoint"], result["last_checkpoint"])
        log.info("metrics: %s", output_dir / "metrics.json")
    return result


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns validation mask AP for sweepers that optimise it.

    In a multirun, an invalid switch combination is skipped (logged, and recorded as
    ``skipped.json`` in the job folder) so the rest of the sweep goes on.
    """
    reason = invalid_switches(cfg.model)
    if reason and HydraConfig.get().mode == RunMode.MULTIRUN:
        log.warning("skipping this configuration: %s", reason)
        write_json_atomic(Path(cfg.paths.output_dir) / "skipped.json", {"reason": reason})
        return None
    result = train(cfg)
    return result["metrics"].get("segm/AP")


if __name__ == "__main__":
    main()
