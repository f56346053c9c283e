"""``python -m iemask.eval ckpt_path=... [data=coco data.root=...]``: score a checkpoint.

Writes the detections as a COCO results json (test-dev submission format), the metrics json and,
for COCO and LVIS, ``pr_curves.json`` beside it into the run folder, and prints the metric table.
A checkpoint whose classes are not the dataset's is refused before anything is evaluated
(``check_classes=false`` evaluates it anyway).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig

from iemask.classes import check_classes, model_num_classes
from iemask.evaluation import get_protocol
from iemask.inference import set_test_settings
from iemask.lit_module import InstanceSegmentationModule
from iemask.models.tta import set_tta
from iemask.utils.config import CONFIG_DIR
from iemask.utils.runs import write_json_atomic

log = logging.getLogger(__name__)


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.data``'s validation split with the dataset's protocol.

    The checkpoint's class names and category ids must be the dataset's (see :func:`check_classes`).
    ``cfg.model.tta`` changes the checkpoint's test-time augmentation settings (null keeps each; a
    checkpoint saved without them has TTA off): ``model.tta.enabled=true`` evaluates with TTA.
    """
    L.seed_everything(cfg.seed, workers=True)
    module = InstanceSegmentationModule.from_checkpoint(cfg.ckpt_path)
    datamodule = hydra.utils.instantiate(cfg.data)
    # Set up here, before the trainer's setup replaces the module's classes with the dataset's.
    datamodule.prepare_data()
    datamodule.setup("test")
    check_classes(
        model_num_classes(module.model),
        module.class_names,
        module.category_ids,
        datamodule.class_names,
        datamodule.category_ids,
        checkpoint=cfg.ckpt_path,
        dataset=datamodule.val_set.annotation_file,
        enforce=cfg.check_classes,
    )
    set_test_settings(
        module.model,
        datamodule.test_min_size,
        datamodule.max_size,
        datamodule.detections_per_img,
        datamodule.score_thresh,
    )
    tta = set_tta(module.model, cfg.model.tta)  # the checkpoint's settings, changed by model.tta.* overrides
    if tta.enabled:
        log.info("test-time augmentation: %s", tta)
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[])
    trainer.test(module, datamodule=datamodule, verbose=False)
    metrics = dict(module.last_metrics["test"])
    protocol = get_protocol(datamodule.protocol)
    if trainer.is_global_zero:
        results_path = Path(cfg.results_file)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        with open(results_path, "w") as f:
            json.dump(module.evaluator.results, f)
        if protocol.write_results is not None:  # the dataset's official result format too
            protocol.write_results(module.evaluator, Path(cfg.paths.output_dir) / "official_results")
        write_json_atomic(cfg.metrics_file, metrics)
        module.evaluator.write_pr_curves(Path(cfg.metrics_file).parent)  # COCO and LVIS: precision-recall curves
        log.info("%d images evaluated:\n%s", module.evaluator.num_images, protocol.format_table(metrics))
        log.info("results: %s; metrics: %s", results_path, cfg.metrics_file)
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate_checkpoint(cfg)


if __name__ == "__main__":
    main()
