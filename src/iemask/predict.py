"""``python -m iemask.predict ckpt_path=... input=<image or folder> output=<folder>``.

Writes one overlay PNG per image (masks, boxes, class names, scores) and a COCO results json
(each result also carries its ``file_name``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from iemask.inference import predict_folder, set_test_settings
from iemask.lit_module import InstanceSegmentationModule
from iemask.utils.config import CONFIG_DIR, resolve_device

log = logging.getLogger(__name__)


def predict(cfg: DictConfig) -> Path:
    """Run the checkpoint on ``cfg.input``; return the results json path."""
    module = InstanceSegmentationModule.from_checkpoint(cfg.ckpt_path)
    model = module.model
    set_test_settings(model, cfg.test_min_size, cfg.max_size, score_thresh=cfg.score_thresh)
    num_classes = model.roi_heads.box_predictor.cls_score.out_features - 1
    category_ids = module.category_ids or list(range(1, num_classes + 1))
    results = predict_folder(
        model,
        cfg.input,
        cfg.output,
        module.class_names,
        category_ids,
        resolve_device(cfg.device),
        cfg.score_thresh,
        cfg.mask_thresh,
    )
    path = Path(cfg.output) / cfg.results_file
    path.write_text(json.dumps(results))
    log.info("%d detections; overlays and %s in %s", len(results), path.name, cfg.output)
    return path


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
