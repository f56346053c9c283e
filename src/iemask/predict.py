"""``python -m iemask.predict ckpt_path=... input=<image, folder or video> output=<folder>``.

Writes one overlay PNG per image (masks, boxes, class names, scores; drawn as set under
``overlay``), a COCO results json (each result also carries its ``file_name``), the same results
streamed per image into a ``.jsonl`` beside it, and ``summary.json`` (files processed and
skipped). Unreadable files are skipped with a warning; the run fails only when no image could be
processed. A folder's videos are skipped too (:data:`~iemask.inference.VIDEO_IN_FOLDER`).

A video (a suffix of :data:`~iemask.data.video.VIDEO_SUFFIXES`) given as ``input=`` is predicted frame by
frame (:func:`~iemask.inference.predict_video`): ``<output>/<stem>.mp4`` is the annotated clip, at the
input's timing (H.264 via libx264, else MPEG-4), and the results json has one result per detection,
its ``image_id`` the frame's index, with ``frame`` and ``time_s``; set under ``video`` (stride, frame
limit, encoder). ``categories=<COCO annotation json>`` writes that dataset's category ids and names,
after checking that they are the checkpoint's.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from iemask.classes import check_classes, checkpoint_classes, dataset_classes, model_num_classes
from iemask.data.video import is_video
from iemask.inference import predict_folder, predict_video, set_test_settings
from iemask.lit_module import InstanceSegmentationModule
from iemask.models.tta import set_tta
from iemask.utils.config import CONFIG_DIR, resolve_device


def predict(cfg: DictConfig) -> Path:
    """Run the checkpoint on ``cfg.input``; return the results json path.

    The classes written are the checkpoint's, or those of ``cfg.categories`` when given; either way
    they must fit the model (refused otherwise unless ``cfg.check_classes`` is false).
    """
    module = InstanceSegmentationModule.from_checkpoint(cfg.ckpt_path)
    model = module.model
    set_test_settings(model, cfg.test_min_size, cfg.max_size, score_thresh=cfg.score_thresh)
    set_tta(model, cfg.model.tta)  # the checkpoint's test-time augmentation, changed by model.tta.* overrides
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
    common = (model, cfg.input, cfg.output, class_names, category_ids, resolve_device(cfg.device))
    settings = dict(
        score_thresh=cfg.score_thresh, mask_thresh=cfg.mask_thresh, results_file=cfg.results_file, overlay=cfg.overlay
    )
    if is_video(cfg.input):
        predict_video(*common, **settings, **cfg.video)
    else:
        predict_folder(*common, **settings)
    return Path(cfg.output) / cfg.results_file


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
