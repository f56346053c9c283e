"""LVIS-shaped evaluation load for measuring the streaming evaluators (time and memory on rank 0).

:func:`simulate_lvis` generates, from a seed, ground truth shaped like LVIS v1.0 val (1203 categories with
rare/common/frequent groups, per-image ``neg_category_ids`` and ``not_exhaustive_category_ids``, about five
polygon annotations per image) and, image by image, model outputs as torchvision's Mask R-CNN gives them
(300 detections per image with binary masks), so that an evaluator can be fed exactly as in validation.

``python -m iemask.benchmarking.simulate --images 2000`` feeds them to :class:`~iemask.evaluation.LVISEvaluator`
in this (fresh) process, times ``compute`` per IoU type (one process: no sync) and prints the peak RSS;
``--lvis-eval`` times the official ``LVISEval`` on the same detections instead. This module imports nothing
else of ``iemask`` at import time, so that it can drive another checkout of the evaluator (that checkout's
copy of this file, for one from before the torchmetrics evaluators' ``update``/``compute``), run as a script
with that checkout first on the path:
``cp simulate.py /tmp/simulate_lvis.py && PYTHONPATH=<checkout>/src python /tmp/simulate_lvis.py``.
"""

from __future__ import annotations

import argparse
import gc
import json
import pickle
import resource
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

LVIS_VAL_IMAGES = 19809
NUM_CATEGORIES = 1203
FREQUENCY_COUNTS = {"r": 337, "c": 461, "f": 405}  # LVIS v1.0's rare / common / frequent categories
FREQUENCY_WEIGHT = {"r": 1.0, "c": 4.0, "f": 16.0}  # how often a category of each group is annotated


@dataclass
class SimulatedLVIS:
    """Ground truth and a recipe for the model outputs of each of its images (see :func:`simulate_lvis`)."""

    gt: dict[str, Any]
    detections_per_image: int
    seed: int

    def outputs(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """``(image_id, output)`` for every image, in id order; the same on every call.

        ``output`` is a torchvision eval output: ``boxes`` (N, 4) xyxy float32, ``labels`` (N,) int64
        (label k is category id k), ``scores`` (N,) float32, ``masks`` (N, 1, H, W) uint8 (binary).
        """
        annotations: dict[int, list[dict[str, Any]]] = {}
        for ann in self.gt["annotations"]:
            annotations.setdefault(ann["image_id"], []).append(ann)
        weights = _category_weights(self.gt["categories"])
        for image in self.gt["images"]:
            rng = np.random.default_rng([self.seed, image["id"]])
            yield (
                image["id"],
                _image_output(image, annotations.get(image["id"], []), weights, self.detections_per_image, rng),
            )


def _category_weights(categories: list[dict[str, Any]]) -> np.ndarray:
    """(C,) sampling probability of each category (in ``categories`` order), by frequency group."""
    weights = np.array([FREQUENCY_WEIGHT[c["frequency"]] for c in categories])
    return weights / weights.sum()


def _rectangle(rng: np.random.Generator, height: int, width: int, side: tuple[int, int]) -> np.ndarray:
    """(4,) integer x0, y0, x1, y1 of a random rectangle inside the image, sides in [side[0], side[1]]."""
    w, h = (int(rng.integers(side[0], min(side[1], limit - 1) + 1)) for limit in (width, height))
    x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
    return np.array([x0, y0, x0 + w, y0 + h])


def simulate_lvis(
    num_images: int,
    detections_per_image: int = 300,
    annotations_per_image: float = 5.0,
    negatives_per_image: int = 10,
    height: int = 64,
    width: int = 80,
    seed: int = 0,
) -> SimulatedLVIS:
    """LVIS-shaped ground truth for ``num_images`` images, and their detections (deterministic in ``seed``).

    Each image annotates one to three categories (frequent ones more often) with about
    ``annotations_per_image`` rectangles (polygons), lists ``negatives_per_image`` verified-absent
    categories and marks its first annotated category as not exhaustive. Detections: a jittered copy of
    each annotation (sometimes with a duplicate), a few on negative categories, the rest on random
    categories (mostly unverified, which the federated protocol drops) at random places. Images are
    ``height`` × ``width`` so that the masks (and their RLEs) stay small.
    """
    rng = np.random.default_rng(seed)
    frequencies = [f for f, count in FREQUENCY_COUNTS.items() for _ in range(count)]
    frequencies = [frequencies[i] for i in rng.permutation(len(frequencies))]
    categories = [
        {"id": k + 1, "name": f"category_{k + 1}", "synset": f"category_{k + 1}.n.01", "frequency": f}
        for k, f in enumerate(frequencies)
    ]
    weights = _category_weights(categories)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        present = rng.choice(NUM_CATEGORIES, size=int(rng.integers(1, 4)), replace=False, p=weights) + 1
        absent = np.setdiff1d(np.arange(1, NUM_CATEGORIES + 1), present)
        negatives = np.sort(rng.choice(absent, size=negatives_per_image, replace=False))
        images.append(
            {
                "id": image_id,
                "height": height,
                "width": width,
                "coco_url": f"http://images.cocodataset.org/val2017/{image_id:012d}.jpg",
                "neg_category_ids": negatives.tolist(),
                "not_exhaustive_category_ids": [int(present[0])],
            }
        )
        for i in range(max(1, int(rng.poisson(annotations_per_image)))):
            x0, y0, x1, y1 = _rectangle(rng, height, width, (4, 40)).tolist()
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(present[i % len(present)]),
                    "segmentation": [[float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]],
                    "area": float((x1 - x0) * (y1 - y0)),
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                }
            )
    for category in categories:
        category["image_count"] = len({a["image_id"] for a in annotations if a["category_id"] == category["id"]})
    gt = {"images": images, "annotations": annotations, "categories": categories}
    return SimulatedLVIS(gt, detections_per_image, seed)


def _image_output(
    image: dict[str, Any],
    annotations: list[dict[str, Any]],
    weights: np.ndarray,
    count: int,
    rng: np.random.Generator,
) -> dict[str, torch.Tensor]:
    """One image's ``count`` detections (see :func:`simulate_lvis`) as a torchvision eval output."""
    height, width = image["height"], image["width"]
    boxes, labels = [], []
    for ann in annotations:
        x, y, w, h = ann["bbox"]
        for _ in range(1 + int(rng.random() < 0.3)):  # the object, sometimes with a duplicate
            shift = rng.integers(-3, 4, size=2)
            x0, y0 = np.clip([x + shift[0], y + shift[1]], 0, [width - w, height - h])
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append(ann["category_id"])
    for category_id in image["neg_category_ids"][:3]:  # confident mistakes: false positives
        boxes.append(_rectangle(rng, height, width, (4, 40)))
        labels.append(category_id)
    while len(labels) < count:
        boxes.append(_rectangle(rng, height, width, (4, 40)))
        labels.append(int(rng.choice(len(weights), p=weights)) + 1)
    corners = np.array(boxes[:count], dtype=np.int64)  # (N, 4) integer x0, y0, x1, y1
    ys, xs = np.arange(height)[None, :, None], np.arange(width)[None, None, :]
    masks = (
        (ys >= corners[:, 1, None, None])
        & (ys < corners[:, 3, None, None])
        & (xs >= corners[:, 0, None, None])
        & (xs < corners[:, 2, None, None])
    )  # (N, H, W)
    jitter = rng.uniform(-0.5, 0.5, size=corners.shape)
    scores = np.concatenate([rng.uniform(0.3, 1.0, len(annotations)), rng.uniform(0.0, 0.6, count)])[:count]
    return {
        "boxes": torch.from_numpy((corners + jitter).astype(np.float32)),
        "labels": torch.tensor(labels[:count], dtype=torch.int64),
        "scores": torch.from_numpy(scores.astype(np.float32)),
        "masks": torch.from_numpy(masks[:, None].astype(np.uint8)),
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _rank_payload(evaluator: Any) -> Any:
    """What one rank's states hold, which torchmetrics' sync sends to every rank: the compact store."""
    return evaluator.stored()


def measure_evaluator(
    sim: SimulatedLVIS, iou_types: tuple[str, ...] = ("segm", "bbox"), repeats: int = 3
) -> dict[str, float]:
    """Feed every image to an ``LVISEvaluator`` and time its ``compute`` per IoU type (one process: no sync).

    Each ``compute`` runs ``repeats`` times (the fastest counts: a shared machine's load only adds time).
    Returns the RSS before the first image, seconds of ``update``, the RSS growth that the stored results
    account for, the size and the pickling and unpickling times of this rank's store (``payload_mb``: what the
    sync sends), wall and CPU seconds of each ``compute``, and the peak RSS.
    """
    import iemask.models  # noqa: F401  # loaded on rank 0 in training: the baseline RSS of either checkout has it
    from iemask.evaluation.lvis import LVISEvaluator

    category_ids = [c["id"] for c in sim.gt["categories"]]
    evaluator = LVISEvaluator(sim.gt, iou_types=iou_types, category_ids=category_ids)
    gc.collect()
    before = _rss_mb()
    figures = {"baseline_rss_mb": before}  # imports and ground truth, before any detection
    start = time.perf_counter()
    for image_id, output in sim.outputs():
        evaluator.update([image_id], [output])
    figures["process_s"] = time.perf_counter() - start
    gc.collect()
    figures["stored_mb"] = _rss_mb() - before
    start = time.perf_counter()
    payload = pickle.dumps(_rank_payload(evaluator), protocol=pickle.HIGHEST_PROTOCOL)
    figures["pickle_s"], figures["payload_mb"] = time.perf_counter() - start, len(payload) / 2**20
    start = time.perf_counter()
    pickle.loads(payload)
    figures["unpickle_s"] = time.perf_counter() - start
    del payload
    for iou_type in iou_types:
        evaluator.iou_types = (iou_type,)
        timings = []
        for _ in range(repeats):
            start, cpu = time.perf_counter(), time.process_time()
            metrics = evaluator.compute()
            timings.append((time.perf_counter() - start, time.process_time() - cpu))
        figures[f"{iou_type}_s"], figures[f"{iou_type}_cpu_s"] = min(timings)
        figures[f"{iou_type}/AP"] = metrics[f"{iou_type}/AP"]
    figures["peak_rss_mb"] = _peak_rss_mb()
    return figures


def measure_lvis_eval(sim: SimulatedLVIS, iou_types: tuple[str, ...] = ("segm", "bbox")) -> dict[str, float]:
    """The official ``LVISEval`` on the same detections (as Detectron2 calls it: mask AP without boxes)."""
    from lvis import LVIS, LVISEval, LVISResults

    from iemask.evaluation.common import to_coco_results

    if not hasattr(np, "float"):
        np.float = float  # noqa: NPY001  # lvis 0.5.3 still uses np.float (removed in NumPy 1.24)
    category_ids = [c["id"] for c in sim.gt["categories"]]
    results = [r for image_id, output in sim.outputs() for r in to_coco_results(image_id, output, category_ids)]
    figures = {"baseline_rss_mb": _rss_mb()}  # with every result dict made
    with tempfile.TemporaryDirectory() as folder:
        gt_file = Path(folder) / "lvis_gt.json"
        gt_file.write_text(json.dumps(sim.gt))
        for iou_type in iou_types:
            dets = results if iou_type == "bbox" else [{k: v for k, v in r.items() if k != "bbox"} for r in results]
            start, cpu = time.perf_counter(), time.process_time()
            lvis_gt = LVIS(str(gt_file))
            lvis_eval = LVISEval(lvis_gt, LVISResults(lvis_gt, dets, max_dets=300), iou_type)
            lvis_eval.run()
            figures[f"{iou_type}_s"], figures[f"{iou_type}_cpu_s"] = (
                time.perf_counter() - start,
                time.process_time() - cpu,
            )
            figures[f"{iou_type}/AP"] = float(lvis_eval.results["AP"])
    figures["peak_rss_mb"] = _peak_rss_mb()
    return figures


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Measure one configuration in this process (start a fresh one per configuration for its peak RSS)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--detections", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iou-types", nargs="+", default=["segm", "bbox"], choices=["segm", "bbox"])
    parser.add_argument("--repeats", type=int, default=3, help="evaluations per IoU type (the fastest counts)")
    parser.add_argument("--lvis-eval", action="store_true", help="time the official LVISEval (once) instead")
    args = parser.parse_args(argv)
    import iemask

    sim = simulate_lvis(args.images, args.detections, seed=args.seed)
    iou_types = tuple(args.iou_types)
    figures = measure_lvis_eval(sim, iou_types) if args.lvis_eval else measure_evaluator(sim, iou_types, args.repeats)
    scale = LVIS_VAL_IMAGES / args.images
    source = "LVISEval" if args.lvis_eval else str(Path(iemask.__file__).parent)
    print(f"{source}: {args.images} images x {args.detections} detections (x{scale:.1f} = LVIS val)")
    for key, value in figures.items():
        extrapolated = f"  (~{value * scale:.1f} at LVIS val)" if key.endswith("_s") else ""
        print(f"  {key}: {value:.4g}{extrapolated}")
    return figures


if __name__ == "__main__":
    main()
