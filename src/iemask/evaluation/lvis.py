"""LVIS v1.0 federated box and mask AP (the paper's Table 7 metrics), computed by faster-coco-eval.

LVIS is exhaustively labelled only per (image, category) pair: an image's ``neg_category_ids`` are
verified absent, its annotated categories present, and everything else unknown. The official
``lvis`` package (``LVISEval``) keeps the 300 top-scoring detections per image, drops detections of
unknown categories, scores those of negative categories as false positives, and ignores unmatched ones
of categories listed in ``not_exhaustive_category_ids``. faster-coco-eval's ``lvis_style`` mode applies
the last two rules in C++; the first two are applied here, before the backend sees the detections
(its own dropping raises ``IndexError: unordered_map::at`` when it drops every detection of an image
without annotations). The summary numbers are ``LVISEval.summarize``'s means over the backend's
precision array, and equal ``LVISEval`` to 1e-4 (``tests/test_lvis.py``).

The backend, like ``LVISEval``, keeps entries for every (image, category) pair it scores: 24M pairs on
LVIS val. Categories are therefore scored ``CATEGORY_CHUNK`` at a time, each chunk over the images that
have its annotations or detections (a category's precision depends on nothing else). On 1000 images
× 1203 categories × 300 boxes per image this takes 3 s and 0.1 GB where ``LVISEval`` takes 40 s and
0.9 GB; masks stay RLE throughout.

As in Detectron2, mask AP is scored without the detections' boxes, so that an instance's area (and
small/medium/large range) comes from its mask rather than its box.

During training, :class:`LVISEvaluator` scores the gathered arrays (:class:`~iemask.evaluation.base.Detections`)
without making every result dict: the checks, the top 300 and the federated filter run on the arrays, and
dicts are made only for the kept detections of one category chunk at a time. On the LVIS-shaped load of
:mod:`iemask.benchmarking.simulate` (2000 images × 300 detections, a tenth of LVIS val) rank 0 holds 90 MB
of results instead of 530 MB, and scores in 3.3 s (segm) and 2.3 s (bbox) of CPU instead of 5.7 s and
4.6 s (``LVISEval``: 48 s and 40 s), with the same AP.
"""

from __future__ import annotations

import contextlib
import io
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

from iemask.data.lvis import FREQUENCIES
from iemask.evaluation import common
from iemask.evaluation.base import Detections, Protocol
from iemask.evaluation.coco import COCOEvaluator

LVIS_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
MAX_DETS_PER_IMAGE = 300  # the official LVIS limit (LVISResults' max_dets)

CATEGORY_CHUNK = 64  # categories scored per backend call (bounds its per-(image, category) tables)

_IOU_50, _IOU_75 = 0, 5  # indices in the IoU thresholds 0.50, 0.55, ..., 0.95
_GT_FIELDS = {"bbox": ("area", "bbox"), "segm": ("area", "segmentation")}
_IMAGE_FIELDS = ("neg_category_ids", "not_exhaustive_category_ids")


def _check_lvis_gt(gt: dict[str, Any], gt_name: str, iou_types: tuple[str, ...]) -> None:
    """Raise a clear error where ``gt`` lacks a field the federated protocol reads."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise ValueError(f"{gt_name} has no {key!r} list: not an LVIS annotation file")
    if not gt["categories"]:
        raise ValueError(f"{gt_name} has no categories")
    for image in gt["images"]:
        lacking = [field for field in _IMAGE_FIELDS if field not in image]
        if lacking:
            raise ValueError(f"image id {image.get('id')} of {gt_name} lacks {lacking}: not an LVIS annotation file")
    for category in gt["categories"]:
        if category.get("frequency") not in FREQUENCIES:
            raise ValueError(
                f"category id {category.get('id')} of {gt_name} has frequency {category.get('frequency')!r}; "
                f"LVIS evaluation needs one of {FREQUENCIES} on every category"
            )
    for iou_type in iou_types:
        for field in _GT_FIELDS[iou_type]:
            lacking = [ann.get("id") for ann in gt["annotations"] if field not in ann]
            if lacking:
                raise ValueError(
                    f"{len(lacking)} annotation(s) of {gt_name} lack {field!r} (first: annotation id {lacking[0]}); "
                    f"LVIS {iou_type} evaluation needs {', '.join(_GT_FIELDS[iou_type])} on every annotation"
                )


def _federated_detections(gt: dict[str, Any], results: Sequence[dict[str, Any]], max_dets: int) -> list[dict]:
    """The detections that LVISEval scores: the top ``max_dets`` of each image, then only those of verified
    categories (annotated in the image or listed in its ``neg_category_ids``).

    The order is LVISResults' (images by first appearance, the kept detections of each in input order,
    or by decreasing score where the image had to be cut), which decides how tied scores rank.
    """
    verified: dict[int, set[int]] = defaultdict(set)
    for image in gt["images"]:
        verified[image["id"]].update(image["neg_category_ids"])
    for ann in gt["annotations"]:
        verified[ann["image_id"]].add(ann["category_id"])
    per_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        per_image[result["image_id"]].append(result)
    kept = []
    for image_id, dets in per_image.items():
        if len(dets) > max_dets:
            dets = sorted(dets, key=lambda d: d["score"], reverse=True)[:max_dets]  # stable, as LVISResults
        kept.extend(d for d in dets if d["category_id"] in verified[image_id])
    return kept


def _federated_indices(gt: dict[str, Any], detections: Detections, max_dets: int) -> np.ndarray:
    """:func:`_federated_detections` on the stored arrays: (K,) indices of the detections LVISEval scores,
    in its order (the store is sorted by image id, each image's detections in their original order)."""
    pairs = [(image["id"], c) for image in gt["images"] for c in image["neg_category_ids"]]
    pairs += [(ann["image_id"], ann["category_id"]) for ann in gt["annotations"]]
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)  # (P, 2) verified (image id, category id)
    key = 1 + max(int(pairs[:, 1].max(initial=0)), int(detections.category_ids.max(initial=0)))
    starts = np.concatenate([[0], np.cumsum(detections.sizes)])  # (M + 1,) first detection of each image
    pieces, done = [], 0
    for i in np.flatnonzero(detections.sizes > max_dets).tolist():
        lo, hi = starts[i], starts[i + 1]
        top = lo + np.argsort(-detections.scores[lo:hi], kind="stable")[:max_dets]  # as sorted(reverse=True)
        pieces += [np.arange(done, lo), top]
        done = hi
    top = np.concatenate([*pieces, np.arange(done, len(detections))])  # (K',) at most max_dets per image
    keys = detections.detection_image_ids(top) * key + detections.category_ids[top]
    return top[np.isin(keys, pairs[:, 0] * key + pairs[:, 1])]


def _detections_pass_checks(detections: Detections, gt: dict[str, Any], iou_types: tuple[str, ...]) -> bool:
    """Whether :func:`~iemask.evaluation.common.check_results` passes the result dicts of ``detections``,
    decided on the arrays (their ids are integers and every detection has a box by construction)."""
    images = sorted(gt["images"], key=lambda image: image["id"])
    image_ids = np.array([image["id"] for image in images], dtype=np.int64)  # (I,) sorted
    known = [(image.get("height"), image.get("width")) for image in images]
    expected = np.array([(-2, -2) if h is None else (h, w) for h, w in known], dtype=np.int64).reshape(-1, 2)
    detection_images = detections.detection_image_ids()
    if not np.isin(detection_images, image_ids).all():
        return False
    if not np.isin(detections.category_ids, [c["id"] for c in gt["categories"]]).all():
        return False
    if not np.isfinite(detections.scores).all():
        return False
    has_mask = detections.mask_sizes[:, 0] >= 0  # (D,)
    sizes = expected[np.searchsorted(image_ids, detection_images)]  # (D, 2) of each detection's image
    size_ok = ~has_mask | (sizes[:, 0] == -2) | (sizes == detections.mask_sizes).all(axis=1)
    return bool(size_ok.all()) and ("segm" not in iou_types or bool(has_mask.all()))


def _category_chunks(gt: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """The categories sorted by id, ``CATEGORY_CHUNK`` at a time."""
    categories = sorted(gt["categories"], key=lambda c: c["id"])
    return [categories[i : i + CATEGORY_CHUNK] for i in range(0, len(categories), CATEGORY_CHUNK)]


def _chunk_results(
    chunks: list[list[dict[str, Any]]], detections: list[dict[str, Any]], iou_type: str
) -> Iterator[list[dict[str, Any]]]:
    """Copies of the result dicts of each chunk's categories, one chunk at a time (the backend writes into
    them); mask AP is scored without the boxes, so that area ranges go by mask area (as in Detectron2)."""
    chunk_of = {c["id"]: k for k, chunk in enumerate(chunks) for c in chunk}
    per_chunk: list[list[dict[str, Any]]] = [[] for _ in chunks]
    for det in detections:
        per_chunk[chunk_of[det["category_id"]]].append(det)
    for dets in per_chunk:
        yield [{k: v for k, v in det.items() if not (iou_type == "segm" and k == "bbox")} for det in dets]


def _stored_chunk_results(
    chunks: list[list[dict[str, Any]]], detections: Detections, kept: np.ndarray, iou_type: str
) -> Iterator[list[dict[str, Any]]]:
    """:func:`_chunk_results` of the stored detections ``kept`` (K,): dicts made only for one chunk at a time."""
    category_ids = np.array([c["id"] for chunk in chunks for c in chunk])  # (C,) sorted
    chunk_index = np.repeat(np.arange(len(chunks)), [len(chunk) for chunk in chunks])  # (C,)
    chunk_of = chunk_index[np.searchsorted(category_ids, detections.category_ids[kept])]  # (K,)
    order = np.argsort(chunk_of, kind="stable")  # by chunk, in the protocol's order within each
    bounds = np.searchsorted(chunk_of[order], np.arange(len(chunks) + 1))
    for k in range(len(chunks)):
        yield detections.results(kept[order[bounds[k] : bounds[k + 1]]], boxes=iou_type == "bbox")


def _precision(
    images: list[dict[str, Any]],
    categories: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
    results: list[dict[str, Any]],
    iou_type: str,
    max_dets: int,
) -> np.ndarray:
    """The backend's LVIS-mode precision of some categories over the images that have their annotations or
    detections: (T, R, K, A) = (IoU thresholds, recall points, ``categories``, area ranges), -1 where undefined.

    ``results`` are handed to the backend, which writes into them: they must be dicts of this call's own.
    """
    touched = {ann["image_id"] for ann in annotations} | {r["image_id"] for r in results}
    gt = {"images": [image for image in images if image["id"] in touched], "categories": categories}
    # The backend writes flags and RLEs into annotation dicts too: it gets shallow copies of them (nested
    # polygons and RLEs are only read), not a deep copy of a whole LVIS split.
    gt["annotations"] = [dict(ann) for ann in annotations]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt, print_function=common.silent)
        coco_dt = coco_gt.loadRes(results)
        coco_eval = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=common.silent, lvis_style=True)
        coco_eval.params.maxDets = [max_dets]
        coco_eval.evaluate()
        coco_eval.accumulate()
    return coco_eval.eval["precision"][..., 0]  # the only maxDets setting


def _lvis_precision(
    gt: dict[str, Any],
    chunks: list[list[dict[str, Any]]],
    chunk_results: Iterable[list[dict[str, Any]]],
    iou_type: str,
    max_dets: int,
) -> np.ndarray:
    """The (T, R, K, A) precision of one IoU type over all categories (those of ``chunks``, in order), each
    chunk scored on its own; ``chunk_results`` gives, for each of ``chunks`` in turn, its result dicts."""
    chunk_of = {c["id"]: k for k, chunk in enumerate(chunks) for c in chunk}
    annotations: list[list[dict[str, Any]]] = [[] for _ in chunks]
    for ann in gt["annotations"]:
        annotations[chunk_of[ann["category_id"]]].append(ann)
    return np.concatenate(
        [
            _precision(gt["images"], chunk, annotations[k], results, iou_type, max_dets)
            for k, (chunk, results) in enumerate(zip(chunks, chunk_results, strict=True))
        ],
        axis=2,
    )


def _lvis_summary(precision: np.ndarray, categories: list[dict[str, Any]]) -> list[float]:
    """The LVIS_METRICS values of a (T, R, K, A) precision of ``categories``: ``LVISEval.summarize``'s means
    of the defined precisions."""
    frequency = np.array([c["frequency"] for c in categories])

    def mean(s: np.ndarray) -> float:
        defined = s[s > -1]
        return float(defined.mean()) if defined.size else -1.0

    all_areas = precision[..., 0]
    return [
        mean(all_areas),
        mean(all_areas[_IOU_50]),
        mean(all_areas[_IOU_75]),
        *(mean(precision[..., area]) for area in (1, 2, 3)),  # small, medium, large
        *(mean(all_areas[:, :, frequency == f]) for f in FREQUENCIES),
    ]


def _lvis_metrics(
    gt: dict[str, Any],
    chunk_results: Callable[[list[list[dict[str, Any]]], str], Iterable[list[dict[str, Any]]]],
    iou_types: tuple[str, ...],
    max_dets: int,
    per_class: bool,
) -> tuple[dict[str, float], dict[str, Any]]:
    """``{f"{iou_type}/{metric}": value}``, then with ``per_class`` each category's AP and AP50 (from its
    chunk's precision), with ``chunk_results(chunks, iou_type)`` giving the detections; and the
    :func:`~iemask.evaluation.common.pr_curves` of the same precision over all areas."""
    chunks = _category_chunks(gt)
    categories = [c for chunk in chunks for c in chunk]
    metrics: dict[str, float] = {}
    all_areas = {}
    for iou_type in iou_types:
        precision = _lvis_precision(gt, chunks, chunk_results(chunks, iou_type), iou_type, max_dets)
        values = _lvis_summary(precision, categories)
        metrics.update({f"{iou_type}/{name}": v for name, v in zip(LVIS_METRICS, values, strict=True)})
        all_areas[iou_type] = precision[..., 0]  # (T, R, K)
        if per_class:
            metrics.update(common.per_class_metrics(all_areas[iou_type], [c["name"] for c in categories], iou_type))
    return metrics, common.pr_curves(all_areas, max_dets)


def evaluate_lvis(
    gt: common.GroundTruth,
    results: common.Results,
    iou_types: str | Iterable[str] = common.IOU_TYPES,
    max_dets: int = MAX_DETS_PER_IMAGE,
    per_class: bool = True,
) -> dict[str, float]:
    """LVIS federated AP over all images of ``gt``; returns flat keys such as ``"segm/APr"``.

    Args:
        gt: LVIS annotation json path, or the already-loaded dict (left unmodified).
        results: COCO-format results json path, or a list of result dicts (left unmodified); may be empty.
        iou_types: any of ``"bbox"``, ``"segm"``.
        max_dets: detections kept per image, the highest-scoring (LVIS: 300).
        per_class: also give each category's AP and AP50 (see below).

    Returns:
        ``{f"{iou_type}/{metric}": value}`` for every metric in ``LVIS_METRICS`` (the protocol's
        ``metric_names``), then with ``per_class`` ``f"{iou_type}/AP-{name}"`` and ``f"{iou_type}/AP50-{name}"``
        for every category of ``gt`` by id (see :func:`~iemask.evaluation.common.per_class_metrics`). Values
        in [0, 1], or -1 where undefined (no ground truth in that area range, frequency group or category),
        as in ``LVISEval``.
    """
    iou_types = common.check_iou_types(iou_types)
    gt, gt_name = common.load_gt(gt)
    results = common.load_results(results)
    _check_lvis_gt(gt, gt_name, iou_types)
    common.check_results(results, gt, gt_name, iou_types)
    detections = _federated_detections(gt, results, max_dets)
    return _lvis_metrics(
        gt, lambda chunks, iou_type: _chunk_results(chunks, detections, iou_type), iou_types, max_dets, per_class
    )[0]


class LVISEvaluator(COCOEvaluator):
    """Streaming LVIS evaluator: :class:`~iemask.evaluation.coco.COCOEvaluator`'s update / compute / reset,
    scored as :func:`evaluate_lvis` scores :attr:`results`, but from the stored arrays (see :meth:`score`)."""

    def __init__(
        self,
        gt: common.GroundTruth,
        iou_types: str | Iterable[str] = common.IOU_TYPES,
        category_ids: Sequence[int] | None = None,
        max_dets: int = MAX_DETS_PER_IMAGE,
        per_class: bool = True,
    ) -> None:
        """Remember the ground truth; a path is read when first needed, once (on rank 0, which scores).

        Args:
            gt: LVIS annotation json path or loaded dict (never modified).
            iou_types: any of ``"bbox"``, ``"segm"``.
            category_ids: LVIS id of each contiguous label 1..K; default: the sorted category ids of ``gt``.
            max_dets: detections scored per image (LVIS: 300).
            per_class: also give each category's AP and AP50, as :func:`evaluate_lvis`.
        """
        super().__init__(gt, iou_types, category_ids, per_class)
        self.max_dets = max_dets

    def score(self, detections: Detections) -> dict[str, float]:
        """:func:`evaluate_lvis` of ``detections.results()``, without making them all: the checks, the top
        ``max_dets`` and the federated filter run on the arrays, and result dicts are made only for the kept
        detections, one category chunk at a time (millions fewer dicts alive at once on LVIS val); keeps the
        precision-recall curves in :attr:`pr_curves`."""
        gt, gt_name = common.load_gt(self.gt)
        _check_lvis_gt(gt, gt_name, self.iou_types)
        if not _detections_pass_checks(detections, gt, self.iou_types):
            common.check_results(detections.results(), gt, gt_name, self.iou_types)  # names the first bad result
        kept = _federated_indices(gt, detections, self.max_dets)

        def chunk_results(chunks: list[list[dict[str, Any]]], iou_type: str) -> Iterator[list[dict[str, Any]]]:
            return _stored_chunk_results(chunks, detections, kept, iou_type)

        metrics, self.pr_curves = _lvis_metrics(gt, chunk_results, self.iou_types, self.max_dets, self.per_class)
        return metrics


def format_lvis_table(metrics: Mapping[str, float], iou_types: str | Iterable[str] | None = None) -> str:
    """The paper's Table 7 layout (AP ... APf), one row per IoU type (``None``: each one ``metrics`` has),
    then the per-category AP and AP50 where ``metrics`` has them."""
    return common.summary_and_per_class_table(metrics, LVIS_METRICS, iou_types)


def _build_evaluator(val_set: Any) -> LVISEvaluator:
    """Scores ``val_set.annotation_file`` federatedly; labels 1..K are ``val_set.category_ids``."""
    return LVISEvaluator(val_set.annotation_file, category_ids=val_set.category_ids)


# metric_names are the summary keys; the per-class ones depend on the ground truth's categories.
PROTOCOL = Protocol("lvis", common.per_iou_type(LVIS_METRICS), evaluate_lvis, _build_evaluator, format_lvis_table)
