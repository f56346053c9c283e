"""Helpers every evaluation protocol shares: loading and checking ground truth and results, the COCO result
format (model output → result dicts, RLE masks), the metric table layout and the precision-recall curves of
COCO-style precision arrays.

The protocols (``coco``, ``lvis``, ``cityscapes``) import from here and never from each other.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch
from faster_coco_eval.core.cocoeval import Params

from iemask.models.postprocess import BinaryMasks

IOU_TYPES = ("bbox", "segm")


def per_iou_type(names: Sequence[str]) -> tuple[str, ...]:
    """Flat metric keys ``"<iou type>/<name>"`` for every IoU type (``bbox/AP`` ... ``segm/AP``...)."""
    return tuple(f"{iou_type}/{name}" for iou_type in IOU_TYPES for name in names)


GroundTruth = str | Path | dict[str, Any]
Results = str | Path | Sequence[dict[str, Any]]


def silent(*_args: Any, **_kwargs: Any) -> None:
    """Swallow faster-coco-eval's progress messages (it logs them at INFO, which Hydra would show)."""


def _read_json(source: str | Path) -> Any:
    with open(source) as f:
        return json.load(f)


def load_gt(gt: GroundTruth) -> tuple[dict[str, Any], str]:
    """Return the ground-truth dict (never copied here, never mutated later) and a name for error messages."""
    if isinstance(gt, dict):
        return gt, "the in-memory ground-truth dict"
    return _read_json(gt), f"ground truth {str(gt)!r}"


def load_results(results: Results) -> list[dict[str, Any]]:
    """The result dicts of a results json path, or a new list of the given ones (which are left unmodified)."""
    return _read_json(results) if isinstance(results, str | Path) else list(results)


def check_iou_types(iou_types: str | Iterable[str], required: str | None = None) -> tuple[str, ...]:
    """``iou_types`` as a tuple, after checking it is a non-empty subset of ``IOU_TYPES`` with ``required`` in it."""
    iou_types = (iou_types,) if isinstance(iou_types, str) else tuple(iou_types)
    if not iou_types or any(t not in IOU_TYPES for t in iou_types) or (required and required not in iou_types):
        needs = f" and must include {required!r}" if required else ""
        raise ValueError(f"iou_types must be a non-empty subset of {IOU_TYPES}{needs}, got {iou_types}")
    return iou_types


def _is_int(value: Any) -> bool:
    """An integer id as json or NumPy gives it; a bool, float or string (``"139"``) is not one."""
    return type(value) is int or isinstance(value, np.integer)


def check_results(results: list[dict[str, Any]], gt: dict[str, Any], gt_name: str, iou_types: tuple[str, ...]) -> None:
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


def metric_table(metrics: Mapping[str, float], columns: Sequence[str], iou_types: str | Iterable[str] | None) -> str:
    """Markdown table: one row per IoU type (``None``: each one ``metrics`` has), ``columns`` ×100 with 2
    decimals, "-" where undefined (-1)."""
    if iou_types is None:
        iou_types = [t for t in IOU_TYPES if f"{t}/{columns[0]}" in metrics]
    iou_types = check_iou_types(iou_types)
    lines = ["| IoU type | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for iou_type in iou_types:
        values = [metrics[f"{iou_type}/{name}"] for name in columns]
        lines.append(f"| {iou_type} | " + " | ".join(_cell(v) for v in values) + " |")
    return "\n".join(lines)


def _cell(value: float) -> str:
    """A metric as a table shows it: ×100 with 2 decimals, "-" where undefined (-1)."""
    return "-" if value < 0 else f"{100 * value:.2f}"


# Per-class metrics, in the keys Cityscapes uses too: "<iou type>/AP-<class name>", "<iou type>/AP50-<class name>".
PER_CLASS_METRICS = ("AP", "AP50")
_PER_CLASS_COLUMNS = 3  # (category, AP, AP50) groups per row of the per-class table, as in Detectron2


def per_class_metrics(precision: np.ndarray, names: Sequence[str], iou_type: str) -> dict[str, float]:
    """Detectron2's per-category AP (``_derive_coco_results``), and AP50 likewise, under flat keys.

    Args:
        precision: (T, R, K) precision at every IoU threshold (0.50 first), recall point and category, for
            the "all" area range and the last max-detections setting (pycocotools' and LVISEval's layout,
            sliced); -1 where undefined.
        names: the name of each of the K categories, kept as they are (spaces included): ``"segm/AP-traffic
            light"``. Names must be unique, or one category's metrics would overwrite another's.
        iou_type: ``"bbox"`` or ``"segm"``, the keys' prefix.

    Returns:
        ``{f"{iou_type}/AP-{name}": ..., f"{iou_type}/AP50-{name}": ...}`` in category order: the mean of the
        defined (> -1) precisions, or -1 where none is (a category without ground truth; Detectron2's NaN),
        following the summary metrics' convention.
    """
    if precision.ndim != 3 or precision.shape[2] != len(names):
        raise ValueError(f"precision must be (T, R, K) with K = {len(names)} categories, got {precision.shape}")
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"category names {duplicates} are not unique: per-class metrics are keyed by name")

    def mean(values: np.ndarray) -> float:
        defined = values[values > -1]
        return float(defined.mean()) if defined.size else -1.0

    metrics = {}
    for k, name in enumerate(names):
        metrics[f"{iou_type}/AP-{name}"] = mean(precision[:, :, k])
        metrics[f"{iou_type}/AP50-{name}"] = mean(precision[0, :, k])
    return metrics


# The backend's (pycocotools') default thresholds: IoU 0.50:0.05:0.95, 101 recall points, max dets 1, 10, 100.
DEFAULT_PARAMS = Params(iouType="bbox")
# The curves of ``pr_curves.json``: IoU threshold 0.50, 0.75, or (None) the mean over all of them.
PR_CURVE_IOUS: dict[str, float | None] = {"0.50": 0.5, "0.75": 0.75, "0.50:0.95": None}


def pr_curves(precisions: Mapping[str, np.ndarray], max_dets: int) -> dict[str, Any]:
    """The precision-recall summary written to ``pr_curves.json``: per IoU type, the precision at each recall
    point averaged over the categories, at IoU 0.50, at 0.75 and over 0.50:0.95 (as AP50, AP75 and AP are).

    Args:
        precisions: (T, R, K) precision of each IoU type (:func:`per_class_metrics`' layout: the backend's
            T IoU thresholds and R recall points, the "all" area range, the last max-detections setting);
            -1 where undefined (a category without ground truth), left out of the means as COCO does.
        max_dets: the detections per image that setting allows (COCO: 100, LVIS: 300).

    Returns:
        ``{"recall": [R], "max_dets": max_dets, "curves": {iou_type: {"0.50": [R], "0.75": [R],
        "0.50:0.95": [R]}}}``; a recall point where no category is defined is -1. The mean of a curve over
        the recall points is the IoU type's AP50, AP75 or AP.
    """
    iou_thresholds, recall = DEFAULT_PARAMS.iouThrs, DEFAULT_PARAMS.recThrs  # (T,), (R,)

    def mean(values: np.ndarray) -> list[float]:
        """(T', R, K) → (R,) the mean of the defined values at each recall point, -1 where none is."""
        defined = values > -1
        counts = defined.sum(axis=(0, 2))  # (R,)
        sums = np.where(defined, values, 0.0).sum(axis=(0, 2))
        return np.where(counts > 0, sums / np.maximum(counts, 1), -1.0).tolist()

    curves = {}
    for iou_type, precision in precisions.items():
        if precision.ndim != 3 or precision.shape[:2] != (len(iou_thresholds), len(recall)):
            raise ValueError(
                f"{iou_type} precision must be (T, R, K) with T = {len(iou_thresholds)} IoU thresholds and "
                f"R = {len(recall)} recall points, got {precision.shape}"
            )
        curves[iou_type] = {
            label: mean(precision if iou is None else precision[np.isclose(iou_thresholds, iou)])
            for label, iou in PR_CURVE_IOUS.items()
        }
    return {"recall": recall.tolist(), "max_dets": max_dets, "curves": curves}


def per_class_table(metrics: Mapping[str, float], iou_types: str | Iterable[str] | None) -> str:
    """Markdown tables of the per-class AP and AP50 in ``metrics`` (as :func:`per_class_metrics` names them),
    one per IoU type (``None``: each one that has them), Detectron2-like: three categories a row, ×100 with 2
    decimals, "-" where undefined (-1); "" where ``metrics`` holds none."""
    iou_types = IOU_TYPES if iou_types is None else check_iou_types(iou_types)
    header = "| " + " | ".join(["category", *PER_CLASS_METRICS] * _PER_CLASS_COLUMNS) + " |"
    rule = "|" + (" --- |" + " ---: |" * len(PER_CLASS_METRICS)) * _PER_CLASS_COLUMNS
    tables = []
    for iou_type in iou_types:
        prefix = f"{iou_type}/{PER_CLASS_METRICS[0]}-"
        names = [key[len(prefix) :] for key in metrics if key.startswith(prefix)]
        if not names:
            continue
        cells = [[name, *(_cell(metrics[f"{iou_type}/{m}-{name}"]) for m in PER_CLASS_METRICS)] for name in names]
        lines = [f"Per-category {iou_type} {' and '.join(PER_CLASS_METRICS)}:", header, rule]
        for start in range(0, len(cells), _PER_CLASS_COLUMNS):
            row = cells[start : start + _PER_CLASS_COLUMNS]
            row += [[""] * (1 + len(PER_CLASS_METRICS))] * (_PER_CLASS_COLUMNS - len(row))
            lines.append("| " + " | ".join(cell for group in row for cell in group) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def summary_and_per_class_table(
    metrics: Mapping[str, float], columns: Sequence[str], iou_types: str | Iterable[str] | None
) -> str:
    """:func:`metric_table` of the summary ``columns``, then :func:`per_class_table` where ``metrics`` has
    per-class values."""
    per_class = per_class_table(metrics, iou_types)
    summary = metric_table(metrics, columns, iou_types)
    return f"{summary}\n\n{per_class}" if per_class else summary


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


def decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """An (H, W) uint8 mask from a compressed RLE whose counts may be a json string."""
    counts = rle["counts"]
    counts = counts.encode() if isinstance(counts, str) else counts
    return mask_util.decode({"size": list(rle["size"]), "counts": counts})
