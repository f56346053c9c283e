"""``python -m iemask.train``: train and evaluate a model; see ``conf/train.yaml``.

Examples:
    python -m iemask.train                                   # shapes, small IEMask, CPU, ~minutes
    python -m iemask.train experiment=coco_r50 data.root=/datasets/coco trainer=ddp trainer.devices=8
    python -m iemask.train experiment=custom_r50 data.root=/datasets/mine      # your COCO-format photos
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
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from iemask.callbacks import LastCheckpoint, SkippedImagesLog
from iemask.evaluation import get_protocol
from iemask.loggers import finish_loggers
from iemask.models import count_parameters
from iemask.models.switches import switch_conflict
from iemask.training.optim import Schedule, total_batch_size, trainer_world_size
from iemask.utils.checkpoint import check_resumable, remove_stale_temporaries
from iemask.utils.config import CONFIG_DIR
from iemask.utils.runs import instantiate_all, prepare_ddp_relaunch, write_json_atomic
from iemask.utils.validation import validate_train_config

log = logging.getLogger(__name__)


def logged_metrics(trainer: L.Trainer, prefix: str) -> dict[str, float]:
    """The last evaluation's metrics as logged under ``<prefix>/`` (flat keys like ``segm/AP``)."""
    start = f"{prefix}/"
    return {k[len(start) :]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(start)}


def run_summary(cfg: DictConfig, model: Any) -> dict[str, Any]:
    """What a sweep report needs besides the metrics: switches, variant, backbone, parameter count, and the
    experiment and data choices that were composed (``data=coco`` on the command line overrides the experiment's)."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    return {
        "switches": dict(model.switches),
        "variant": model.variant,
        "backbone": cfg.model.backbone,
        "params_m": count_parameters(model) / 1e6,
        "experiment": choices.get("experiment"),
        "data": choices.get("data"),
    }


def experiment_data(experiment: str) -> str | None:
    """The ``data`` choice of ``conf/experiment/<experiment>.yaml`` (or of the experiments it extends), if any."""
    path = CONFIG_DIR / "experiment" / f"{experiment}.yaml"
    if not path.is_file():
        return None
    for entry in reversed(OmegaConf.load(path).get("defaults", [])):  # the last entry wins, as in Hydra
        if isinstance(entry, str) and entry != "_self_":
            found = experiment_data(entry)
        else:
            found = entry.get("override /data") if isinstance(entry, DictConfig) else None
        if found:
            return found
    return None


def warn_experiment_data_mismatch() -> None:
    """Warn when ``data=`` overrides the experiment's dataset: its model and schedule stay as made for the other."""
    if not HydraConfig.initialized():
        return
    choices = HydraConfig.get().runtime.choices
    experiment, data = choices.get("experiment"), choices.get("data")
    made_for = experiment_data(experiment) if experiment else None
    if made_for and data != made_for:
        log.warning(
            "experiment=%s is made for data=%s but runs with data=%s: the %s experiment's model and schedule are "
            "kept unchanged for this dataset; choose an experiment for it (e.g. experiment=custom_r50 for your "
            "own COCO-format photos) or set the model and schedule yourself",
            experiment,
            made_for,
            data,
            experiment,
        )


def log_schedule_scaling(requested: Schedule, effective: Schedule, max_steps: int) -> None:
    """Say at WARNING what scaling to the real batch made of the schedule, so that a short test run is not
    surprised by its length; ``max_steps`` is the Trainer's."""
    if effective == requested:
        return
    cap = f"; trainer.max_steps={max_steps} caps the run" if max_steps != effective.max_iters else ""
    log.warning(
        "schedule.max_iters=%d at reference batch %d runs as %d iterations at batch %d (lr %g -> %g, steps %s -> "
        "%s, warm-up %d -> %d, eval_period %s -> %s)%s; set trainer.max_steps for a literal cap or "
        "module.scale_schedule=false to run the schedule as written",
        requested.max_iters,
        requested.reference_batch_size,
        effective.max_iters,
        effective.reference_batch_size,
        requested.base_lr,
        effective.base_lr,
        list(requested.steps),
        list(effective.steps),
        requested.warmup_iters,
        effective.warmup_iters,
        requested.eval_period,
        effective.eval_period,
        cap,
    )


def schedule_trainer_args(trainer_cfg: DictConfig, schedule: Schedule) -> dict[str, int]:
    """The Trainer's ``max_steps`` and ``val_check_interval`` for the (scaled) schedule.

    An explicit ``trainer.max_steps`` wins over ``schedule.max_iters``; evaluations come every
    ``schedule.eval_period`` steps, or only at the end without one. ``fast_dev_run`` sets both itself.
    """
    if trainer_cfg.get("fast_dev_run"):
        return {}
    max_steps = trainer_cfg.get("max_steps", -1)
    if max_steps in (-1, None):
        max_steps = schedule.max_iters
    return {"max_steps": max_steps, "val_check_interval": schedule.eval_period or max_steps}


def resolve_resume(ckpt_path: str | None, output_dir: Path) -> tuple[Path | None, Path]:
    """The checkpoint to resume from (or ``None``) and the run folder to write into.

    ``last``: this run folder's ``checkpoints/last.ckpt`` if it exists (a fixed ``hydra.run.dir``,
    a requeued job), else a fresh start, unless the folder holds a finished run (``FileExistsError``).
    A path: that checkpoint; when it lies in an iemask run
    folder (``<run>/checkpoints/``, with ``<run>/.hydra/``) the run goes on in ``<run>``, so its
    best-checkpoint tracking, logs and ``metrics.json`` stay together. A weights-only checkpoint (a run's
    best) is refused with the ways on (:func:`~iemask.utils.checkpoint.check_resumable`).
    """
    if not ckpt_path:
        return None, output_dir
    if ckpt_path == "last":
        last = output_dir / "checkpoints" / "last.ckpt"
        if not last.is_file() and (output_dir / "metrics.json").is_file():
            # A finished run removes its last.ckpt (callbacks.last_checkpoint.keep_after_success=false): starting
            # afresh here would overwrite its best checkpoint and metrics.
            raise FileExistsError(
                f"{output_dir} holds a finished run (metrics.json, no checkpoints/last.ckpt): nothing to resume. "
                "Give another hydra.run.dir for a new run, or ckpt_path=null to train afresh over it"
            )
        return (last if last.is_file() else None), output_dir
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path}: no such checkpoint file. Give a checkpoint written by iemask "
            "(e.g. runs/train/<date>/checkpoints/last.ckpt), ckpt_path=last, or ckpt_path=null to start afresh"
        )
    check_resumable(path)
    run_dir = path.resolve().parent.parent
    if path.parent.name == "checkpoints" and (run_dir / ".hydra").is_dir():
        return path, run_dir
    return path, output_dir


def train(cfg: DictConfig, callbacks: list[L.Callback] | None = None) -> dict[str, Any]:
    """Fit, evaluate the final weights, write ``metrics.json`` (and ``pr_curves.json``, COCO and LVIS); return
    metrics and checkpoint paths.

    Pre-emption (SIGTERM, SLURM's requeue signal) ends the fit at a step boundary with
    ``last.ckpt`` written; the result then has ``preempted=True`` and no final evaluation.
    A completed run removes ``last.ckpt`` (see :class:`LastCheckpoint`); the best checkpoint stays.

    Args:
        cfg: the composed ``train`` config.
        callbacks: extra callbacks (from a notebook or a test) besides ``cfg.callbacks``.
    """
    validate_train_config(cfg)
    warn_experiment_data_mismatch()
    ckpt_path, output_dir = resolve_resume(cfg.get("ckpt_path"), Path(cfg.paths.output_dir))
    if rank_zero_only.rank == 0:
        remove_stale_temporaries(output_dir / "checkpoints")
    if str(output_dir) != str(cfg.paths.output_dir):
        log.info(
            "resuming run %s from %s (this start's config and log: %s)", output_dir, ckpt_path, cfg.paths.output_dir
        )
        cfg.paths.output_dir = str(output_dir)
    elif ckpt_path is not None:
        log.info("resuming from %s", ckpt_path)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")  # cheap data checks (root, files) before the model is built or weights fetched
    if cfg.data.num_classes is None:  # read from the training json: the model's ${data.num_classes} takes it
        cfg.data.num_classes = datamodule.num_classes
    module = hydra.utils.instantiate(cfg.module, _recursive_=False)
    callbacks = [*instantiate_all(cfg.get("callbacks")), *(callbacks or [])]
    loggers = instantiate_all(cfg.get("logger"))
    # The schedule's length goes into the Trainer, so it is scaled for the world size the Trainer will have.
    trainer_cfg = cfg.trainer
    world_size = trainer_world_size(
        trainer_cfg.get("accelerator", "auto"), trainer_cfg.get("devices", "auto"), trainer_cfg.get("num_nodes", 1)
    )
    accumulate = trainer_cfg.get("accumulate_grad_batches", 1)
    schedule = module.fit_schedule(total_batch_size(datamodule.batch_size, world_size, accumulate))
    trainer_args = schedule_trainer_args(trainer_cfg, schedule)
    if trainer_args:
        log_schedule_scaling(module.base_schedule, schedule, trainer_args["max_steps"])
    trainer: L.Trainer = hydra.utils.instantiate(
        trainer_cfg, callbacks=callbacks, logger=loggers or False, **trainer_args
    )
    if trainer.world_size != world_size:
        raise RuntimeError(
            f"the Trainer's world size is {trainer.world_size}, not the {world_size} the schedule was scaled for: "
            "set trainer.devices and trainer.num_nodes to the devices the job has"
        )
    job_config = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    for logger in loggers:
        logger.log_hyperparams(job_config)
    if trainer.is_global_zero:
        write_json_atomic(output_dir / "run.json", run_summary(cfg, module.model))
    prepare_ddp_relaunch()
    succeeded = preempted = False
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        # callback_metrics, unlike the module's attributes, also come back from ddp_spawn workers.
        evaluated_step = trainer.callback_metrics.get("val_info/step")
        if cfg.get("validate_at_end", True) and (evaluated_step is None or int(evaluated_step) != trainer.global_step):
            trainer.validate(module, datamodule=datamodule, verbose=False)
        succeeded = True
    except SIGTERMException:
        preempted = True  # last.ckpt holds the current step; LastCheckpoint said where
    finally:
        finish_loggers(loggers, succeeded)  # a sweep's next job must start a new W&B run
    last = next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
    result = {
        "metrics": {} if preempted else logged_metrics(trainer, "val"),
        "preempted": preempted,
        "step": trainer.global_step,
        "evaluated_images": int(trainer.callback_metrics.get("val_info/num_images", 0)),
        "best_checkpoint": getattr(trainer.checkpoint_callback, "best_model_path", "") or None,
        "output_dir": str(output_dir),
    }
    if preempted:
        return {**result, "last_checkpoint": _existing(last)}
    metrics = result["metrics"]
    skipped = next((c for c in trainer.callbacks if isinstance(c, SkippedImagesLog)), None)
    result["skipped_images"] = skipped.total if skipped is not None else 0
    if trainer.is_global_zero:
        write_json_atomic(output_dir / "metrics.json", {**metrics, "train/skipped_images": result["skipped_images"]})
        if module.evaluator is not None:  # None under ddp_spawn, whose workers kept it
            module.evaluator.write_pr_curves(output_dir)  # the final validation's, as the metrics
    if last is not None:
        last.on_success(trainer)
    result["last_checkpoint"] = _existing(last)
    if trainer.is_global_zero:
        table = get_protocol(datamodule.protocol).format_table(metrics)
        log.info("final validation at step %d:\n%s", trainer.global_step, table)
        log.info("checkpoints: best %s, last %s", result["best_checkpoint"], result["last_checkpoint"])
        log.info("metrics: %s", output_dir / "metrics.json")
    return result


def _existing(last: LastCheckpoint | None) -> str | None:
    return str(last.path) if last is not None and last.path.is_file() else None


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns validation mask AP for sweepers that optimise it.

    In a multirun, an invalid switch combination is skipped (logged, and recorded as
    ``skipped.json`` in the job folder) so the rest of the sweep goes on.
    """
    reason = switch_conflict(cfg.model)
    if reason and HydraConfig.get().mode == RunMode.MULTIRUN:
        log.warning("skipping this configuration: %s", reason)
        write_json_atomic(Path(cfg.paths.output_dir) / "skipped.json", {"reason": reason})
        return None
    result = train(cfg)
    return result["metrics"].get("segm/AP")


if __name__ == "__main__":
    main()
