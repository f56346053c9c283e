"""Evaluation protocols behind one entry point, ``evaluate(gt, results, protocol=...)``.

A protocol is a callable ``(gt, results, iou_types) -> dict[str, float]`` registered in ``PROTOCOLS``;
new datasets (LVIS, Cityscapes) add an entry there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from iemask.evaluation.cityscapes import (
    CITYSCAPES_METRICS,
    CityscapesEvaluator,
    evaluate_cityscapes,
    format_cityscapes_table,
    write_cityscapes_results,
)
from iemask.evaluation.coco import (
    COCO_METRICS,
    COCOEvaluator,
    GroundTruth,
    Results,
    evaluate_coco,
    format_metrics_table,
    to_coco_results,
)
from iemask.evaluation.lvis import LVIS_METRICS, LVISEvaluator, evaluate_lvis, format_lvis_table

PROTOCOLS: dict[str, Callable[..., dict[str, float]]] = {
    "coco": evaluate_coco,
    "cityscapes": evaluate_cityscapes,
    "lvis": evaluate_lvis,
}


def evaluate(
    gt: GroundTruth,
    results: Results,
    protocol: str = "coco",
    iou_types: str | Iterable[str] = ("bbox", "segm"),
) -> dict[str, float]:
    """Score ``results`` against ``gt`` with a registered protocol.

    Args:
        gt: ground-truth json path, or the already-loaded dict (left unmodified); for
            ``"cityscapes"``, the dataset root (``gtFine/`` under it).
        results: results json path, or a list of result dicts (left unmodified); for
            ``"cityscapes"``, a folder of ``*_pred.txt`` files in the official format.
        protocol: a key of ``PROTOCOLS``.
        iou_types: for ``"coco"``, any of ``"bbox"``, ``"segm"``.

    Returns:
        Flat metric names such as ``"segm/AP"``, ``"bbox/AR100"`` mapped to values in [0, 1], or -1
        where undefined.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; supported: {sorted(PROTOCOLS)}")
    return PROTOCOLS[protocol](gt, results, iou_types)


def format_table(metrics: dict[str, float]) -> str:
    """The metric table of whichever protocol produced ``metrics`` (the paper's Tables 5–7)."""
    if "segm/AP-person" in metrics:
        return format_cityscapes_table(metrics)
    if any(k.endswith("/APr") for k in metrics):
        return format_lvis_table(metrics, [t for t in ("bbox", "segm") if f"{t}/AP" in metrics])
    return format_metrics_table(metrics, [t for t in ("bbox", "segm") if f"{t}/AP" in metrics])


__all__ = [
    "CITYSCAPES_METRICS",
    "COCO_METRICS",
    "LVIS_METRICS",
    "PROTOCOLS",
    "COCOEvaluator",
    "CityscapesEvaluator",
    "LVISEvaluator",
    "evaluate",
    "evaluate_cityscapes",
    "evaluate_coco",
    "evaluate_lvis",
    "format_cityscapes_table",
    "format_lvis_table",
    "format_metrics_table",
    "format_table",
    "to_coco_results",
    "write_cityscapes_results",
]
