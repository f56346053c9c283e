"""The evaluation's speed: ``evaluate`` (COCO and LVIS protocols) on synthetic ground truth and detections."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from iemask.data.lvis import FREQUENCIES
from iemask.evaluation import evaluate


def _ellipse(centre: np.ndarray, axes: np.ndarray, corners: int = 24) -> list[float]:
    angles = np.linspace(0.0, 2 * np.pi, corners, endpoint=False)
    return np.stack([centre[0] + axes[0] * np.cos(angles), centre[1] + axes[1] * np.sin(angles)], 1).ravel().tolist()


def synthetic_evaluation_set(
    num_images: int,
    detections: int,
    num_categories: int,
    height: int = 480,
    width: int = 640,
    objects: int = 7,
    seed: int = 0,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Ground truth and detections in memory, in the formats ``evaluate`` reads.

    Every image has ``objects`` elliptical instances; half of the ``detections`` per image are jittered
    copies of them (true or near positives), the others random ellipses of random categories. Masks are
    compressed RLE with ``str`` counts, as :func:`iemask.evaluation.to_coco_results` writes them. The
    ground truth also carries LVIS's fields (category frequencies, per-image negative and
    not-exhaustive categories), so the COCO and LVIS protocols both read it.
    """
    rng = np.random.default_rng(seed)
    size = np.array([width, height], dtype=np.float64)
    categories = [{"id": c, "name": f"class{c}", "frequency": FREQUENCIES[c % 3]} for c in range(1, num_categories + 1)]
    images, annotations, results = [], [], []

    def shape() -> tuple[np.ndarray, np.ndarray]:
        axes = rng.uniform(0.03, 0.2, 2) * size
        return rng.uniform(axes, size - axes), axes

    for image_id in range(1, num_images + 1):
        shapes = [shape() for _ in range(objects)]
        labels = rng.integers(1, num_categories + 1, objects)
        rles = mask_utils.frPyObjects([_ellipse(c, a) for c, a in shapes], height, width)
        for rle, label in zip(rles, labels.tolist(), strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                    "area": float(mask_utils.area(rle)),
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "iscrowd": 0,
                }
            )
        polygons, det_labels = [], []
        for d in range(detections):
            if d % 2 == 0:
                j = rng.integers(objects)
                centre, axes = shapes[j]
                polygons.append(_ellipse(centre + rng.normal(0, 0.1, 2) * axes, axes * rng.uniform(0.8, 1.2, 2)))
                det_labels.append(int(labels[j]))
            else:
                polygons.append(_ellipse(*shape()))
                det_labels.append(int(rng.integers(1, num_categories + 1)))
        rles = mask_utils.frPyObjects(polygons, height, width)
        for rle, label, box, score in zip(
            rles, det_labels, mask_utils.toBbox(rles).tolist(), rng.random(detections), strict=True
        ):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": label,
                    "bbox": box,
                    "score": float(score),
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                }
            )
        absent = np.setdiff1d(np.arange(1, num_categories + 1), labels)
        negatives = rng.choice(absent, size=min(5, len(absent)), replace=False)
        images.append(
            {
                "id": image_id,
                "height": height,
                "width": width,
                "file_name": f"{image_id:06d}.jpg",
                "neg_category_ids": sorted(negatives.tolist()),
                "not_exhaustive_category_ids": [],
            }
        )
    return {"images": images, "annotations": annotations, "categories": categories}, results


def measure_evaluation(
    num_images: int,
    detections: int,
    coco_categories: int = 80,
    lvis_categories: int = 1203,
    height: int = 480,
    width: int = 640,
    objects: int = 7,
    seed: int = 0,
) -> dict[str, float | int]:
    """Seconds that ``evaluate`` (boxes and masks) takes on synthetic detections, COCO and LVIS protocols."""
    seconds = {}
    for protocol, categories in (("coco", coco_categories), ("lvis", lvis_categories)):
        gt, results = synthetic_evaluation_set(num_images, detections, categories, height, width, objects, seed)
        start = time.perf_counter()
        evaluate(gt, results, protocol=protocol)
        seconds[f"{protocol}_s"] = time.perf_counter() - start
    return {**seconds, "num_images": num_images, "detections_per_image": detections}
