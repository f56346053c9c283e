"""COCO box and mask AP/AR (the paper's Table 5 metrics), computed by faster-coco-eval.

faster-coco-eval is the C++ port of pycocotools' ``COCOeval``; it gives the same twelve summary numbers
(checked against pycocotools to 1e-4 in ``tests/test_evaluation_coco.py``) several times faster, and it
evaluates an empty result list where pycocotools' ``loadRes`` crashes. Detections stay RLE-encoded from
the model output to the backend, so a whole validation set never has to fit in memory as dense masks.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from typing import Any

import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster

from iemask.evaluation.base import Detections, Protocol, StreamingEvaluator
from iemask.evaluation.common import (
    DEFAULT_PARAMS,
    IOU_TYPES,
    GroundTruth,
    Results,
    check_iou_types,
    check_results,
    load_gt,
    load_results,
    per_class_metrics,
    per_iou_type,
    pr_curves,
    silent,
    summary_and_per_class_table,
    to_coco_results,
)

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

# Fields pycocotools' COCOeval reads from every ground-truth annotation; it fails with a bare KeyError
# deep inside evaluateImg when one is missing, so they are checked up front instead.
_GT_FIELDS = {"bbox": ("area", "iscrowd", "bbox"), "segm": ("area", "iscrowd", "segmentation")}


def _check_gt(gt: dict[str, Any], gt_name: str, iou_types: tuple[str, ...]) -> None:
    """Raise a clear error for annotations lacking a field COCOeval needs for these IoU types."""
    for iou_type in iou_types:
        for field in _GT_FIELDS[iou_type]:
            lacking = [ann.get("id") for ann in gt.get("annotations", []) if field not in ann]
            if lacking:
                raise ValueError(
                    f"{len(lacking)} annotation(s) of {gt_name} lack {field!r} (first: annotation id "
                    f"{lacking[0]}); COCO {iou_type} evaluation needs {', '.join(_GT_FIELDS[iou_type])} "
                    "on every annotation"
                )


def _coco_eval(gt: dict[str, Any], results: list[dict[str, Any]], iou_type: str) -> tuple[np.ndarray, np.ndarray]:
    """Run COCOeval for one IoU type: its twelve summary numbers (pycocotools' ``stats``) and its (T, R, K)
    precision over all areas at the last max-detections setting, K being the categories sorted by id."""
    if iou_type == "segm":
        # As in Detectron2 and MMDetection: with a "bbox" present, loadRes takes the instance area from the
        # box, which moves masks between the small/medium/large ranges; without it the mask area is used.
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        # use_deepcopy: the backend writes flags and RLEs into the annotation dicts; copy, don't mutate ours.
        coco_gt = COCO(gt, use_deepcopy=True, print_function=silent)
        coco_dt = coco_gt.loadRes(results)
        coco_eval = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=silent)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    stats = np.asarray(coco_eval.stats[: len(COCO_METRICS)], dtype=np.float64)
    return stats, np.asarray(coco_eval.eval["precision"])[:, :, :, 0, -1]  # (T, R, K, A, M): area "all", last M


def _score_coco(
    gt: GroundTruth, results: Results, iou_types: str | Iterable[str], per_class: bool
) -> tuple[dict[str, float], dict[str, Any]]:
    """:func:`evaluate_coco`'s metrics, and the :func:`~iemask.evaluation.common.pr_curves` of the same
    precision arrays (the backend's last max-detections setting, 100)."""
    iou_types = check_iou_types(iou_types)
    gt, gt_name = load_gt(gt)
    results = load_results(results)
    _check_gt(gt, gt_name, iou_types)
    check_results(results, gt, gt_name, iou_types)
    metrics: dict[str, float] = {}
    precisions = {}
    for iou_type in iou_types:
        stats, precisions[iou_type] = _coco_eval(gt, results, iou_type)
        metrics.update({f"{iou_type}/{name}": float(v) for name, v in zip(COCO_METRICS, stats, strict=True)})
        if per_class:
            names = [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])]  # the backend's order
            metrics.update(per_class_metrics(precisions[iou_type], names, iou_type))
    return metrics, pr_curves(precisions, DEFAULT_PARAMS.maxDets[-1])


def evaluate_coco(
    gt: GroundTruth, results: Results, iou_types: str | Iterable[str] = IOU_TYPES, per_class: bool = True
) -> dict[str, float]:
    """COCO AP/AR over all images of ``gt``; returns flat keys such as ``"segm/AP"`` and ``"bbox/AR100"``.

    Args:
        gt: COCO instances json path, or the already-loaded dict (left unmodified).
        results: COCO results json path, or a list of result dicts (left unmodified); may be empty.
        iou_types: any of ``"bbox"``, ``"segm"``.
        per_class: also give each category's AP and AP50 (see below).

    Returns:
        ``{f"{iou_type}/{metric}": value}`` for every metric in ``COCO_METRICS`` (the protocol's
        ``metric_names``), then with ``per_class`` ``f"{iou_type}/AP-{name}"`` and ``f"{iou_type}/AP50-{name}"``
        for every category of ``gt`` by id (its ``name`` as it is, e.g. ``"segm/AP-traffic light"``; see
        :func:`~iemask.evaluation.common.per_class_metrics`). Values in [0, 1], or -1 where undefined (no
        ground truth in that area range, or of that category), as pycocotools' summary.
    """
    return _score_coco(gt, results, iou_types, per_class)[0]


class COCOEvaluator(StreamingEvaluator):
    """Streaming COCO evaluator: results are COCO result dicts (RLE masks); every image of ``gt`` is scored."""

    def __init__(
        self,
        gt: GroundTruth,
        iou_types: str | Iterable[str] = IOU_TYPES,
        category_ids: Sequence[int] | None = None,
        per_class: bool = True,
    ) -> None:
        """Remember the ground truth; a path is read when first needed, once.

        With ``category_ids`` given (as the protocol builds it from a validation set) only rank 0, which
        scores, ever reads it: the other ranks never hold a second copy of a large validation json.

        Args:
            gt: COCO instances json path or loaded dict (never modified).
            iou_types: any of ``"bbox"``, ``"segm"``.
            category_ids: COCO id of each contiguous label 1..K; default: the sorted category ids of ``gt``.
            per_class: also give each category's AP and AP50, as :func:`evaluate_coco`.
        """
        super().__init__()
        self.iou_types = check_iou_types(iou_types)
        self.per_class = per_class
        self._gt_source = gt
        self.category_ids = (
            list(category_ids) if category_ids is not None else sorted(c["id"] for c in self.gt["categories"])
        )

    @cached_property
    def gt(self) -> dict[str, Any]:
        """The ground-truth dict, loaded on first use."""
        return load_gt(self._gt_source)[0]

    def convert(self, image_id: int, output: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        return to_coco_results(image_id, output, self.category_ids)

    def score(self, detections: Detections) -> dict[str, float]:
        """Metrics of all ranks' detections, as result dicts made for this call (LVIS changes the protocol here);
        keeps their precision-recall curves in :attr:`pr_curves`."""
        metrics, self.pr_curves = _score_coco(self.gt, detections.results(), self.iou_types, self.per_class)
        return metrics


def format_coco_table(metrics: Mapping[str, float], iou_types: str | Iterable[str] | None = None) -> str:
    """The paper's Table 5 layout (AP ... ARl), one row per IoU type (``None``: each one ``metrics`` has),
    then the per-category AP and AP50 where ``metrics`` has them."""
    return summary_and_per_class_table(metrics, COCO_METRICS, iou_types)


def _build_evaluator(val_set: Any) -> COCOEvaluator:
    """Scores ``val_set.annotation_file``; labels 1..K are ``val_set.category_ids``."""
    return COCOEvaluator(val_set.annotation_file, category_ids=val_set.category_ids)


# metric_names are the summary keys; the per-class ones depend on the ground truth's categories.
PROTOCOL = Protocol("coco", per_iou_type(COCO_METRICS), evaluate_coco, _build_evaluator, format_coco_table)
