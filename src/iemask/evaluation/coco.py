"""COCO box and mask AP/AR (the paper's Table 5 metrics), computed by faster-coco-eval.

faster-coco-eval is the C++ port of pycocotools' ``COCOeval``; it gives the same twelve summary numbers
(checked against pycocotools to 1e-4 in ``tests/test_evaluation_coco.py``) several times faster, and it
evaluates an empty result list where pycocotools' ``loadRes`` crashes. Detections stay RLE-encoded from
the model output to the backend, so a whole validation set never has to fit in memory as dense masks.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch
from faster_coco_eval import COCO, COCOeval_faster

from iemask.evaluation.base import Detections, StreamingEvaluator
from iemask.models.postprocess import BinaryMasks

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")

# Fields pycocotools' COCOeval reads from every ground-truth annotation; it fails with a bare KeyError
# deep inside evaluateImg when one is missing, so they are checked up front instead.
_GT_FIELDS = {"bbox": ("area", "iscrowd", "bbox"), "segm": ("area", "iscrowd", "segmentation")}

GroundTruth = str | Path | dict[str, Any]
Results = str | Path | Sequence[dict[str, Any]]


def _silent(*_args: Any, **_kwargs: Any) -> None:
    """Swallow the backend's progress messages (it logs them at INFO, which Hydra would show)."""


def _load_json(source: str | Path) -> Any:
    with open(source) as f:
        return json.load(f)


def _load_gt(gt: GroundTruth) -> tuple[dict[str, Any], str]:
    """Return the ground-truth dict (never copied here, never mutated later) and a name for error messages."""
    if isinstance(gt, dict):
        return gt, "the in-memory ground-truth dict"
    return _load_json(gt), f"ground truth {str(gt)!r}"


def _check_iou_types(iou_types: str | Iterable[str]) -> tuple[str, ...]:
    iou_types = (iou_types,) if isinstance(iou_types, str) else tuple(iou_types)
    unknown = [t for t in iou_types if t not in IOU_TYPES]
    if unknown or not iou_types:
        raise ValueError(f"iou_types must be a non-empty subset of {IOU_TYPES}, got {iou_types}")
    return iou_types


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


def _is_int(value: Any) -> bool:
    """An integer id as json or NumPy gives it; a bool, float or string (``"139"``) is not one."""
    return type(value) is int or isinstance(value, np.integer)


def _check_results(results: list[dict[str, Any]], gt: dict[str, Any], gt_name: str, iou_types: tuple[str, ...]) -> None:
    """Reject results the backend would either assert on or silently misread, in one pass over them.

    The backend scores an RLE of the wrong size as if it were the image's (a resized mask can score
    high, a transposed one near zero) and ranks NaN scores arbitrarily, so neither gets through.
    """
    image_sizes = {img["id"]: (img.get("height"), img.get("width")) for img in gt["images"]}
    category_ids = {cat["id"] for cat in gt["categories"]}
    all_masks = all_boxes = True
    any_box = False
    for index, result in enumerate(results):
        missing = [key for key in ("image_id", "category_id", "score") if key not in result]
        if missing:
            raise ValueError(f"result {index} lacks {missing}: it has {sorted(result)}")
        image_id, category_id, score = result["image_id"], result["category_id"], result["score"]
        if not (_is_int(image_id) and _is_int(category_id)):
            raise ValueError(
                f"result {index} has image_id {image_id!r} and category_id {category_id!r}: both must be integers "
                f"(ids of {gt_name}); convert them with int() when writing the results"
            )
        if image_id not in image_sizes:
            raise ValueError(f"result {index}: image_id {image_id} is not an image of {gt_name}")
        if category_id not in category_ids:
            raise ValueError(f"result {index}: category_id {category_id} is not a category of {gt_name}")
        try:
            finite = math.isfinite(score)
        except TypeError:  # a string or None
            finite = False
        if not finite:
            raise ValueError(
                f"result {index} (image_id {image_id}) has score {score!r}: scores must be finite numbers, "
                "or the detections cannot be ranked; drop or fix that detection"
            )
        segmentation = result.get("segmentation")
        if segmentation is None:
            all_masks = False
        elif isinstance(segmentation, dict):  # an RLE; polygons are in image coordinates and have no size
            height, width = image_sizes[image_id]
            size = segmentation.get("size")
            if height is not None and (size is None or len(size) != 2 or (size[0], size[1]) != (height, width)):
                raise ValueError(
                    f"result {index} (image_id {image_id}) has a segmentation RLE of size {size} but that image "
                    f"of {gt_name} is [height, width] = [{height}, {width}]: encode masks at the image's "
                    "original resolution, as [height, width] (a resized or transposed mask is scored wrongly)"
                )
        if "bbox" in result:
            any_box = True
        else:
            all_boxes = False
    if "segm" in iou_types and not all_masks:
        raise ValueError("segm evaluation needs a 'segmentation' (RLE) in every result")
    # With no "bbox" at all the backend takes each box from its mask (pycocotools' toBbox); a mix crashes it.
    if "bbox" in iou_types and not (all_boxes or (not any_box and all_masks)):
        raise ValueError("bbox evaluation needs a 'bbox' in every result, or a 'segmentation' in all")


def _coco_stats(gt: dict[str, Any], results: list[dict[str, Any]], iou_type: str) -> np.ndarray:
    """Run COCOeval for one IoU type and return its twelve summary numbers (pycocotools' ``stats``)."""
    if iou_type == "segm":
        # As in Detectron2 and MMDetection: with a "bbox" present, loadRes takes the instance area from the
        # box, which moves masks between the small/medium/large ranges; without it the mask area is used.
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        # use_deepcopy: the backend writes flags and RLEs into the annotation dicts; copy, don't mutate ours.
        coco_gt = COCO(gt, use_deepcopy=True, print_function=_silent)
        coco_dt = coco_gt.loadRes(results)
        coco_eval = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=_silent)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return np.asarray(coco_eval.stats[: len(COCO_METRICS)], dtype=np.float64)


def evaluate_coco(gt: GroundTruth, results: Results, iou_types: str | Iterable[str] = IOU_TYPES) -> dict[str, float]:
    """COCO AP/AR over all images of ``gt``; returns flat keys such as ``"segm/AP"`` and ``"bbox/AR100"``.

    Args:
        gt: COCO instances json path, or the already-loaded dict (left unmodified).
        results: COCO results json path, or a list of result dicts (left unmodified); may be empty.
        iou_types: any of ``"bbox"``, ``"segm"``.

    Returns:
        ``{f"{iou_type}/{metric}": value}`` for every metric in ``COCO_METRICS``; values in [0, 1], or -1
        where undefined (no ground truth in that area range), as in pycocotools.
    """
    iou_types = _check_iou_types(iou_types)
    gt, gt_name = _load_gt(gt)
    results = _load_json(results) if isinstance(results, str | Path) else list(results)
    _check_gt(gt, gt_name, iou_types)
    _check_results(results, gt, gt_name, iou_types)
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        stats = _coco_stats(gt, results, iou_type)
        metrics.update({f"{iou_type}/{name}": float(v) for name, v in zip(COCO_METRICS, stats, strict=True)})
    return metrics


def to_coco_results(
    image_id: int,
    output: dict[str, Any],
    category_ids: Sequence[int],
    mask_threshold: float | None = None,
) -> list[dict[str, Any]]:
    """Convert one torchvision Mask R-CNN eval output into COCO result dicts (json-serialisable).

    Args:
        image_id: COCO id of the image.
        output: ``boxes`` (N, 4) xyxy in original-image pixels, ``labels`` (N,) contiguous ids 1..K,
            ``scores`` (N,), optional ``masks``: (N, 1, H, W) or (N, H, W) probabilities or binary masks,
            or the model's ``BinaryMasks`` (encoded from their box-local patches).
        category_ids: ``category_ids[k - 1]`` is the COCO category id of label ``k``.
        mask_threshold: a pixel belongs to the instance where its probability exceeds this (``None``: 0.5,
            or the threshold ``BinaryMasks`` were cut at; any other value for those is an error).

    Returns:
        One dict per detection with ``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score`` and,
        with masks, ``segmentation`` as compressed RLE ``{"size": [H, W], "counts": str}``.
    """
    labels = output["labels"].tolist()
    if not labels:
        return []
    bad = [k for k in labels if not 1 <= k <= len(category_ids)]
    if bad:
        raise ValueError(f"labels {sorted(set(bad))} outside 1..{len(category_ids)} (category_ids)")
    boxes = output["boxes"].detach().clone()
    boxes[:, 2:] -= boxes[:, :2]
    results = [
        {"image_id": int(image_id), "category_id": category_ids[k - 1], "bbox": box, "score": score}
        for k, box, score in zip(labels, boxes.tolist(), output["scores"].tolist(), strict=True)
    ]
    if "masks" in output:
        rles = _mask_rles(output["masks"], len(labels), mask_threshold)
        for result, rle in zip(results, rles, strict=True):
            result["segmentation"] = {"size": list(map(int, rle["size"])), "counts": rle["counts"].decode()}
    return results


def _mask_rles(masks: torch.Tensor | BinaryMasks, n: int, mask_threshold: float | None) -> list[dict[str, Any]]:
    """pycocotools RLEs of ``n`` masks: dense ones thresholded, ``BinaryMasks`` encoded from their patches."""
    if isinstance(masks, BinaryMasks):
        if len(masks) != n:
            raise ValueError(f"{len(masks)} masks for {n} detections")
        if mask_threshold is not None and mask_threshold != masks.threshold:
            raise ValueError(
                f"these masks were thresholded at {masks.threshold} by the model, not at mask_threshold="
                f"{mask_threshold}: set the model's (config model.mask_threshold, or model.transform.mask_threshold)"
            )
        return masks.encode()
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.dim() != 3 or masks.shape[0] != n:
        raise ValueError(f"masks must be (N, 1, H, W) or (N, H, W), N={n}: {masks.shape}")
    # Threshold where the probabilities live; only the uint8 masks travel to the CPU.
    binary = (masks > (0.5 if mask_threshold is None else mask_threshold)).to(torch.uint8).cpu().numpy()
    return mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))


class COCOEvaluator(StreamingEvaluator):
    """Streaming COCO evaluator: results are COCO result dicts (RLE masks); every image of ``gt`` is scored."""

    def __init__(
        self,
        gt: GroundTruth,
        iou_types: str | Iterable[str] = IOU_TYPES,
        category_ids: Sequence[int] | None = None,
    ) -> None:
        """Remember the ground truth; a path is read when first needed, once.

        With ``category_ids`` given (as the data modules do) only rank 0, which scores, ever reads
        it: the other ranks never hold a second copy of a large validation json.

        Args:
            gt: COCO instances json path or loaded dict (never modified).
            iou_types: any of ``"bbox"``, ``"segm"``.
            category_ids: COCO id of each contiguous label 1..K; default: the sorted category ids of ``gt``.
        """
        self.iou_types = _check_iou_types(iou_types)
        self._gt_source = gt
        self.category_ids = (
            list(category_ids) if category_ids is not None else sorted(c["id"] for c in self.gt["categories"])
        )
        self.reset()

    @cached_property
    def gt(self) -> dict[str, Any]:
        """The ground-truth dict, loaded on first use."""
        return _load_gt(self._gt_source)[0]

    def convert(self, image_id: int, output: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        return to_coco_results(image_id, output, self.category_ids)

    def score(self, detections: Detections) -> dict[str, float]:
        """Metrics of all ranks' detections, as result dicts made for this call (LVIS changes the protocol here)."""
        return evaluate_coco(self.gt, detections.results(), self.iou_types)


def metric_table(metrics: dict[str, float], columns: Sequence[str], iou_types: str | Iterable[str]) -> str:
    """Markdown table: one row per IoU type, ``columns`` ×100 with 2 decimals, "-" where undefined (-1)."""
    iou_types = _check_iou_types(iou_types)
    lines = ["| IoU type | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for iou_type in iou_types:
        values = [metrics[f"{iou_type}/{name}"] for name in columns]
        lines.append(f"| {iou_type} | " + " | ".join("-" if v < 0 else f"{100 * v:.2f}" for v in values) + " |")
    return "\n".join(lines)


def format_metrics_table(metrics: dict[str, float], iou_types: str | Iterable[str] = IOU_TYPES) -> str:
    """The paper's Table 5 layout (AP ... ARl), one row per IoU type."""
    return metric_table(metrics, COCO_METRICS, iou_types)
