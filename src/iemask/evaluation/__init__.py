"""Evaluation protocols behind one entry point, ``evaluate(gt, results, protocol=...)``.

A protocol is a callable ``(gt, results, iou_types) -> dict[str, float]`` registered in ``PROTOCOLS``;
new datasets (LVIS, Cityscapes) add an entry there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from iemask.evaluation.coco import (
    COCO_METRICS,
    COCOEvaluator,
    GroundTruth,
    Results,
    evaluate_coco,
    format_metrics_table,
    to_coco_results,
)

PROTOCOLS: dict[str, Callable[..., dict[str, float]]] = {"coco": evaluate_coco}


def evaluate(
    gt: GroundTruth,
    results: Results,
    protocol: str = "coco",
    iou_types: str | Iterable[str] = ("bbox", "segm"),
) -> dict[str, float]:
    """Score ``results`` against ``gt`` with a registered protocol.

    Args:
        gt: ground-truth json path, or the already-loaded dict (left unmodified).
        results: results json path, or a list of result dicts (left unmodified).
        protocol: a key of ``PROTOCOLS``.
        iou_types: for ``"coco"``, any of ``"bbox"``, ``"segm"``.

    Returns:
        Flat metric names such as ``"segm/AP"``, ``"bbox/AR100"`` mapped to values in [0, 1], or -1
        where undefined.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; supported: {sorted(PROTOCOLS)}")
    return PROTOCOLS[protocol](gt, results, iou_types)


__all__ = [
    "COCO_METRICS",
    "PROTOCOLS",
    "COCOEvaluator",
    "evaluate",
    "evaluate_coco",
    "format_metrics_table",
    "to_coco_results",
]
