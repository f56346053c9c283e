"""``python -m iemask.predict ckpt_path=... input=<image or folder> output=<folder>``.

Writes one overlay PNG per image (masks, boxes, class names, scores; drawn as set under
``overlay``), a COCO results json (each result also carries its ``file_name``), the same results
streamed per image into a ``.jsonl`` beside it, and ``summary.json`` (files processed and
skipped). Unreadable files are skipped with a warning; the run fails only when no image could be
processed. ``categories=<COCO annotation json>`` writes that dataset's category ids and names,
after checking that they are the checkpoint's.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from iemask.classes import check_classes, checkpoint_classes, dataset_classes, model_num_classes
from iemask.inference import predict_folder, set_test_settings
from iemask.lit_module import InstanceSegmentationModule
from iemask.utils.config import CONFIG_DIR, resolve_device


def predict(cfg: DictConfig) -> Path:
    """Run the checkpoint on ``cfg.input``; return the results json path.

    The classes written are the checkpoint's, or those of ``cfg.categories`` when given; either way
    they must fit the model (refused otherwise unless ``cfg.check_classes`` is false).
    """
    module = InstanceSegmentationModule.from_checkpoint(cfg.ckpt_path)
    model = module.model
    set_test_settings(model, cfg.test_min_size, cfg.max_size, score_thresh=cfg.score_thresh)
    num_classes = model_num_classes(model)
    if cfg.categories:
        class_names, category_ids = dataset_classes(cfg.categories)
        check_classes(
            num_classes,
            module.class_names,
            module.category_ids,
            class_names,
            category_ids,
            checkpoint=cfg.ckpt_path,
            dataset=cfg.categories,
            enforce=cfg.check_classes,
        )
    else:
        class_names, category_ids = checkpoint_classes(
            num_classes, module.class_names, module.category_ids, checkpoint=cfg.ckpt_path, enforce=cfg.check_classes
        )
    predict_folder(
        model,
        cfg.input,
        cfg.output,
        class_names,
        category_ids,
        resolve_device(cfg.device),
        cfg.score_thresh,
        cfg.mask_thresh,
        cfg.results_file,
        cfg.overlay,
    )
    return Path(cfg.output) / cfg.results_file


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
