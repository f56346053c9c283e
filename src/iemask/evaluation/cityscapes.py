"""Cityscapes instance-level evaluation (the paper's Table 6), equal to the official ``cityscapesscripts``.

Re-implements ``evalInstanceLevelSemanticLabeling`` (checked against it to 1e-4 in
``tests/test_cityscapes.py``) without depending on it at run time:

- Ground truth is the ``*_gtFine_instanceIds.png`` map: ``labelId * 1000 + k`` for instance ``k``, the bare
  ``labelId`` for group regions ("cargroup", ...) and stuff. Without the png, ``*_gtFine_polygons.json`` is
  rasterised exactly as the official ``json2instanceImg`` does.
- Eight classes are scored (labels with instances that are not ignored in evaluation). Group regions and
  instances under 100 px are not ground truth; a prediction matching none of the ground truth is a false
  positive unless more than the IoU threshold of its pixels lie on void labels, on same-class groups or on
  same-class instances under 100 px.
- A ground truth instance is matched by its best-scoring prediction with IoU above the threshold; further
  such predictions are false positives. AP is the official step-wise area under the precision-recall curve,
  per class and IoU threshold 0.5:0.95:0.05; ``AP`` averages over both, ``AP50`` over classes at 0.5.

Predictions use the official result format, also written by :meth:`CityscapesEvaluator.write_results`: one
``<stem>_pred.txt`` per image with lines ``<relative mask png> <label id> <score>``, any non-zero mask pixel
belonging to the instance.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from iemask.data.cityscapes import (
    CLASS_LABEL_IDS,
    CLASS_NAMES,
    CLASSES,
    LABEL_BY_ID,
    LABELS,
    file_key,
    find_ground_truth,
    read_instance_ids,
)
from iemask.evaluation.base import Detections, Protocol, StreamingEvaluator
from iemask.evaluation.common import check_iou_types, decode_rle, to_coco_results

VOID_LABEL_IDS: tuple[int, ...] = tuple(label.id for label in LABELS if label.ignore_in_eval)

MIN_REGION_SIZE = 100  # ground truth instances below this many pixels are ignored
OVERLAPS = np.arange(0.5, 1.0, 0.05)  # the official thresholds, bit for bit
# ``"segm/AP"``, ``"segm/AP50"``, then ``"segm/AP-<class>"`` and ``"segm/AP50-<class>"`` for every class.
CITYSCAPES_METRICS: tuple[str, ...] = (
    "segm/AP",
    "segm/AP50",
    *(f"segm/{metric}-{name}" for name in CLASS_NAMES for metric in ("AP", "AP50")),
)


# ---- predictions in the official format --------------------------------------------------------
def find_prediction_files(results: str | Path, keys: Iterable[str]) -> dict[str, Path]:
    """The ``<city>_<sequence>_<frame>*.txt`` file of every key, searched recursively as the official script does."""
    folder = Path(results)
    if not folder.is_dir():
        raise FileNotFoundError(f"Cityscapes results folder not found: {folder} (expected <stem>_pred.txt files)")
    found: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(folder.rglob("*.txt")):
        found[file_key(path.name)].append(path)
    files = {}
    for key in keys:
        if not found[key]:
            raise FileNotFoundError(f"no prediction file {key}*.txt under {folder} for ground truth image {key}")
        if len(found[key]) > 1:
            raise ValueError(f"several prediction files for image {key}: {[str(p) for p in found[key]]}")
        files[key] = found[key][0]
    return files


def read_predictions(path: str | Path) -> Iterator[tuple[int, float, np.ndarray]]:
    """``(label id, score, boolean mask)`` of each line of a ``*_pred.txt``; masks are read one at a time.

    As in the official reader, a mask file listed twice counts once, with its last label and score.
    """
    path = Path(path)
    entries: dict[Path, tuple[int, float]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 3:
                raise ValueError(f"{len(parts)} fields")
            entries[path.parent / parts[0]] = (int(float(parts[1])), float(parts[2]))
        except ValueError as e:
            raise ValueError(
                f"{path}, line {number}: expected '<relative mask png> <label id> <score>', got {line!r}"
            ) from e
    for mask_file, (label_id, score) in entries.items():
        if not mask_file.is_file():
            raise FileNotFoundError(f"predicted mask {mask_file} listed in {path} not found")
        with Image.open(mask_file) as image:
            yield label_id, score, np.asarray(image.convert("L")) != 0


def write_cityscapes_results(
    results: Iterable[Mapping[str, Any]], stems: Mapping[int, str], folder: str | Path
) -> None:
    """Write result dicts in the official format: ``<stem>_pred.txt`` per image and ``masks/*.png``.

    Args:
        results: dicts with ``image_id``, ``category_id`` (Cityscapes label id), ``score`` and
            ``segmentation`` (RLE), e.g. :attr:`CityscapesEvaluator.results`.
        stems: image id → ``<city>_<sequence>_<frame>`` of every image; images without results get an
            empty file, since the official script wants one per ground truth image.
        folder: created if needed.
    """
    folder = Path(folder)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    per_image: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for result in results:
        if result["image_id"] not in stems:
            raise ValueError(f"result image_id {result['image_id']} is not one of the {len(stems)} images")
        per_image[result["image_id"]].append(result)
    for image_id, stem in stems.items():
        lines = []
        for i, result in enumerate(per_image[image_id]):
            label = LABEL_BY_ID.get(result["category_id"])
            if label is None:
                raise ValueError(f"result category_id {result['category_id']} is not a Cityscapes label id")
            relative = f"masks/{stem}_{i}_{label.name.replace(' ', '-')}.png"
            Image.fromarray(decode_rle(result["segmentation"]) * 255).save(folder / relative)
            # repr: the shortest text that reads back as the same float, so the files score as the evaluator did
            lines.append(f"{relative} {label.id} {float(result['score'])!r}\n")
        (folder / f"{stem}_pred.txt").write_text("".join(lines))


# ---- the protocol --------------------------------------------------------------------------------
class _ClassRecords:
    """What AP needs of one class over all images, independent of the IoU threshold."""

    def __init__(self) -> None:
        self.num_gt = 0  # ground truth instances that count: not groups, at least MIN_REGION_SIZE pixels
        self.pair_gt: list[int] = []  # (counted instance, prediction) pairs that overlap
        self.pair_score: list[float] = []
        self.pair_iou: list[float] = []
        self.pred_score: list[float] = []  # every non-empty prediction of the class
        self.pred_iou: list[float] = []  # its best IoU with any same-class region (groups and small ones too)
        self.pred_ignored: list[float] = []  # fraction of it on void, same-class groups and small instances


class CityscapesAccumulator:
    """Matches predictions with ground truth image by image and computes the official AP matrix."""

    def __init__(self) -> None:
        self.records = {label_id: _ClassRecords() for label_id in CLASS_LABEL_IDS}

    def add_image(self, instance_ids: np.ndarray, predictions: Iterable[tuple[int, float, np.ndarray]]) -> None:
        """Match one image's ``(label id, score, boolean mask)`` predictions with its instance-id map."""
        counts = np.bincount(instance_ids.ravel())
        regions: dict[int, list[tuple[int, int, int]]] = defaultdict(list)  # label id -> (value, pixels, number)
        for value in np.flatnonzero(counts).tolist():
            label_id = value if value < 1000 else value // 1000
            if label_id in self.records:
                record = self.records[label_id]
                counted = value >= 1000 and counts[value] >= MIN_REGION_SIZE
                regions[label_id].append((value, int(counts[value]), record.num_gt if counted else -1))
                record.num_gt += int(counted)
        void = np.isin(instance_ids, VOID_LABEL_IDS)
        for label_id, score, mask in predictions:
            if label_id not in LABEL_BY_ID:
                raise ValueError(f"prediction label id {label_id} is not a Cityscapes label id")
            if label_id in self.records:
                self._add_prediction(self.records[label_id], regions[label_id], instance_ids, void, score, mask)

    @staticmethod
    def _add_prediction(
        record: _ClassRecords,
        regions: list[tuple[int, int, int]],
        instance_ids: np.ndarray,
        void: np.ndarray,
        score: float,
        mask: np.ndarray,
    ) -> None:
        if mask.shape != instance_ids.shape:
            raise ValueError(f"a predicted mask is {mask.shape} (H, W) but its image is {instance_ids.shape}")
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size == 0:
            return  # empty predictions do not count
        cols = np.flatnonzero(mask[rows[0] : rows[-1] + 1].any(axis=0))
        window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        inside = mask[window]
        pixels = int(np.count_nonzero(inside))
        ignored = int(np.count_nonzero(void[window] & inside))
        values, intersections = np.unique(instance_ids[window][inside], return_counts=True)
        overlap = dict(zip(values.tolist(), intersections.tolist(), strict=True))
        best_iou = 0.0
        for value, region_pixels, number in regions:
            intersection = overlap.get(value, 0)
            if not intersection:
                continue
            iou = intersection / (region_pixels + pixels - intersection)
            best_iou = max(best_iou, iou)
            if number >= 0:
                record.pair_gt.append(number)
                record.pair_score.append(score)
                record.pair_iou.append(iou)
            # the official script adds a small group's pixels twice (once as group, once as small)
            ignored += intersection * ((value < 1000) + (region_pixels < MIN_REGION_SIZE))
        record.pred_score.append(score)
        record.pred_iou.append(best_iou)
        record.pred_ignored.append(ignored / pixels)

    def average_precisions(self) -> np.ndarray:
        """AP of each class (rows, ``CLASS_NAMES`` order) at each IoU threshold of ``OVERLAPS`` (columns).

        NaN for a class without ground truth; 0 with ground truth but no prediction.
        """
        ap = np.full((len(CLASSES), len(OVERLAPS)), np.nan)
        for c, record in enumerate(self.records.values()):
            if not record.num_gt:
                continue
            if not record.pred_score:
                ap[c] = 0.0
                continue
            pair_gt, pair_score, pair_iou = map(np.asarray, (record.pair_gt, record.pair_score, record.pair_iou))
            pred_score, pred_iou, pred_ignored = map(
                np.asarray, (record.pred_score, record.pred_iou, record.pred_ignored)
            )
            for o, threshold in enumerate(OVERLAPS):
                matched = pair_iou > threshold
                gt, score = pair_gt[matched], pair_score[matched]
                order = np.lexsort((-score, gt))  # by instance, best score first
                _, first = np.unique(gt[order], return_index=True)
                is_tp = np.zeros(len(order), dtype=bool)
                is_tp[first] = True  # each instance's best match is a true positive, the rest false positives
                false_pos = pred_score[(pred_iou <= threshold) & (pred_ignored <= threshold)]
                y_true = np.concatenate([is_tp.astype(float), np.zeros(len(false_pos))])
                y_score = np.concatenate([score[order], false_pos])
                ap[c, o] = _area_under_pr(y_true, y_score, record.num_gt - len(first))
        return ap


def _area_under_pr(y_true: np.ndarray, y_score: np.ndarray, hard_false_negatives: int) -> float:
    """The official step-wise area under the precision-recall curve of scored detections."""
    if not len(y_score):
        return 0.0  # every instance missed and every prediction ignored (the official script crashes here)
    order = np.argsort(y_score)
    scores, cumulative = y_score[order], np.concatenate([[0.0], np.cumsum(y_true[order])])
    _, first = np.unique(scores, return_index=True)  # one point per distinct score, ascending
    below = cumulative[first]  # true positives scoring below the threshold
    tp = cumulative[-1] - below
    fp = len(scores) - first - tp
    precision = np.append(tp / (tp + fp), 1.0)
    recall = np.append(tp / (tp + below + hard_false_negatives), 0.0)
    widths = (np.concatenate([recall[:1], recall[:-1]]) - np.concatenate([recall[1:], [0.0]])) / 2
    return float(precision @ widths)


def cityscapes_metrics(ap: np.ndarray) -> dict[str, float]:
    """``CITYSCAPES_METRICS`` from the AP matrix: means over what is defined, -1 where nothing is (the
    official script's NaN, following the project's convention for undefined metrics)."""

    def mean(values: np.ndarray) -> float:
        values = values[~np.isnan(values)]
        return float(values.mean()) if values.size else -1.0

    metrics = {"segm/AP": mean(ap), "segm/AP50": mean(ap[:, 0])}
    for name, row in zip(CLASS_NAMES, ap, strict=True):
        metrics[f"segm/AP-{name}"] = mean(row)
        metrics[f"segm/AP50-{name}"] = mean(row[:1])
    return metrics


def evaluate_cityscapes(
    gt: str | Path, results: str | Path, iou_types: str | Iterable[str] = ("segm",)
) -> dict[str, float]:
    """Score official-format predictions as ``evalInstanceLevelSemanticLabeling`` does.

    Args:
        gt: the Cityscapes root (``gtFine/val`` is scored) or a folder of ``*_gtFine_instanceIds.png``
            (or ``*_gtFine_polygons.json``) files, searched recursively.
        results: folder searched recursively for one ``<city>_<sequence>_<frame>*.txt`` per ground truth image.
        iou_types: must include ``"segm"``; ``"bbox"`` is accepted (``evaluate``'s default passes it) but
            the protocol has no box metrics.

    Returns:
        ``CITYSCAPES_METRICS``: ``"segm/AP"``, ``"segm/AP50"`` and per class ``"segm/AP-person"``,
        ``"segm/AP50-person"``, ... in [0, 1], or -1 where undefined (a class without ground truth).
    """
    check_iou_types(iou_types, required="segm")  # the protocol scores masks
    gt_files = find_ground_truth(gt)
    prediction_files = find_prediction_files(results, gt_files)
    accumulator = CityscapesAccumulator()
    for key, gt_file in sorted(gt_files.items()):
        accumulator.add_image(read_instance_ids(gt_file), read_predictions(prediction_files[key]))
    return cityscapes_metrics(accumulator.average_precisions())


# ---- streaming evaluation during training --------------------------------------------------------
class CityscapesEvaluator(StreamingEvaluator):
    """Streaming Cityscapes evaluator (:class:`~iemask.evaluation.base.StreamingEvaluator`).

    ``update`` keeps each detection as a COCO-style result with an RLE mask (never dense, in the compact
    :class:`~iemask.evaluation.base.Detections` states); ``compute`` counts each image of every rank once and
    scores every ground truth image (unseen ones as without predictions), giving what
    :func:`evaluate_cityscapes` gives on the files that :meth:`write_results` writes. :attr:`results` are
    dicts with ``category_id`` the Cityscapes label id.
    """

    def __init__(self, gt_files: Mapping[int, str | Path], label_ids: Sequence[int] = CLASS_LABEL_IDS) -> None:
        """Remember where the ground truth is (it is read at each ``compute``, one image at a time).

        Args:
            gt_files: image id → its ``*_gtFine_instanceIds.png`` (or ``*_gtFine_polygons.json``), for
                every image of the split.
            label_ids: Cityscapes label id of each contiguous model label 1..K.
        """
        super().__init__()
        unknown = [i for i in label_ids if i not in CLASS_LABEL_IDS]
        if unknown:
            raise ValueError(f"label ids {unknown} are not evaluated Cityscapes classes {CLASS_LABEL_IDS}")
        self.gt_files = {int(i): Path(p) for i, p in gt_files.items()}
        self.stems = {i: file_key(p.name) for i, p in self.gt_files.items()}
        self.label_ids = list(label_ids)

    def convert(self, image_id: int, output: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        """One output as result dicts (masks thresholded at 0.5, RLE), after checking it can be scored."""
        if image_id not in self.gt_files:
            raise ValueError(f"image id {image_id} is not one of the {len(self.gt_files)} evaluated images")
        if "masks" not in output:
            raise ValueError("the Cityscapes protocol scores masks: outputs need 'masks'")
        return to_coco_results(image_id, output, self.label_ids)

    def score(self, detections: Detections) -> dict[str, float]:
        """The official AP of ``detections`` over every ground truth image, one image decoded at a time."""
        per_image = detections.by_image()
        accumulator = CityscapesAccumulator()
        for image_id, gt_file in sorted(self.gt_files.items()):
            predictions = (
                (r["category_id"], r["score"], decode_rle(r["segmentation"]).astype(bool))
                for r in per_image.get(image_id, [])
            )
            accumulator.add_image(read_instance_ids(gt_file), predictions)
        return cityscapes_metrics(accumulator.average_precisions())

    def write_results(self, folder: str | Path) -> None:
        """Write :attr:`results` in the official format (see :func:`write_cityscapes_results`)."""
        write_cityscapes_results(self.results, self.stems, folder)


def format_cityscapes_table(metrics: Mapping[str, float]) -> str:
    """Markdown table in the paper's Table 6 layout: mean and per-class AP and AP50, ×100, "-" if -1."""
    lines = [
        "| metric | mean | " + " | ".join(CLASS_NAMES) + " |",
        "| --- |" + " ---: |" * (len(CLASS_NAMES) + 1),
    ]
    for metric in ("AP", "AP50"):
        values = [metrics[f"segm/{metric}"], *(metrics[f"segm/{metric}-{name}"] for name in CLASS_NAMES)]
        cells = ["-" if v < 0 or math.isnan(v) else f"{100 * v:.2f}" for v in values]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _build_evaluator(val_set: Any) -> CityscapesEvaluator:
    """Scores ``val_set.gt_files()``; labels 1..K are the Cityscapes label ids ``val_set.category_ids``."""
    return CityscapesEvaluator(val_set.gt_files(), label_ids=val_set.category_ids)


PROTOCOL = Protocol(
    "cityscapes",
    CITYSCAPES_METRICS,
    evaluate_cityscapes,
    _build_evaluator,
    format_cityscapes_table,
    write_results=CityscapesEvaluator.write_results,
)
