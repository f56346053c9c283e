"""Evaluation protocols behind one registry: ``get_protocol(name)``, and ``evaluate(gt, results, protocol=...)``.

Each protocol (:mod:`~iemask.evaluation.coco`, :mod:`~iemask.evaluation.lvis`, :mod:`~iemask.evaluation.cityscapes`)
builds on the helpers of :mod:`~iemask.evaluation.common` and the torchmetrics evaluator of
:mod:`~iemask.evaluation.base`, and declares its ``PROTOCOL``, which :mod:`~iemask.evaluation.protocol` registers.
"""

from __future__ import annotations

from iemask.evaluation.base import Detections, Protocol, StreamingEvaluator
from iemask.evaluation.cityscapes import (
    CITYSCAPES_METRICS,
    CityscapesEvaluator,
    evaluate_cityscapes,
    format_cityscapes_table,
    write_cityscapes_results,
)
from iemask.evaluation.coco import COCO_METRICS, COCOEvaluator, evaluate_coco, format_coco_table
from iemask.evaluation.common import GroundTruth, Results, to_coco_results
from iemask.evaluation.lvis import LVIS_METRICS, LVISEvaluator, evaluate_lvis, format_lvis_table
from iemask.evaluation.protocol import PROTOCOLS, evaluate, get_protocol

__all__ = [
    "CITYSCAPES_METRICS",
    "COCO_METRICS",
    "LVIS_METRICS",
    "PROTOCOLS",
    "COCOEvaluator",
    "CityscapesEvaluator",
    "Detections",
    "GroundTruth",
    "LVISEvaluator",
    "Protocol",
    "Results",
    "StreamingEvaluator",
    "evaluate",
    "evaluate_cityscapes",
    "evaluate_coco",
    "evaluate_lvis",
    "format_cityscapes_table",
    "format_coco_table",
    "format_lvis_table",
    "get_protocol",
    "to_coco_results",
    "write_cityscapes_results",
]
