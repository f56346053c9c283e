"""COCO evaluation: equal to pycocotools' COCOeval to 1e-4, streaming evaluator, errors, table layout."""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from conftest import SHARED_DATA, assert_metrics_equal, box_mask, encode_rle, free_port
from iemask.evaluation import (
    COCO_METRICS,
    PROTOCOLS,
    COCOEvaluator,
    evaluate,
    evaluate_coco,
    format_coco_table,
    get_protocol,
    to_coco_results,
)
from iemask.evaluation.base import Detections
from iemask.evaluation.common import pr_curves

# pycocotools' decode under NumPy 2, from the test's own mask checks.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept:DeprecationWarning")

REAL_DATA = SHARED_DATA / "coco_val2014_100"
CATEGORY_IDS = [2, 5, 9]  # deliberately not contiguous
# (id, height, width); image 3 has no annotations, image 5 gets more than 100 detections.
IMAGES = [(1, 240, 320), (2, 180, 200), (3, 64, 80), (4, 300, 260), (5, 120, 160)]


def _ellipse_mask(h: int, w: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1).astype(np.uint8)


def _segm_mask(segmentation: list | dict, h: int, w: int) -> np.ndarray:
    if isinstance(segmentation, dict):
        return mask_util.decode(segmentation)
    return mask_util.decode(mask_util.merge(mask_util.frPyObjects(segmentation, h, w)))


def make_coco_case(seed: int = 0) -> tuple[dict, list[dict]]:
    """Ground truth with polygons, RLEs, crowd regions, an empty image, three categories and all three
    area ranges, plus noisy detections: matches, duplicates, wrong classes, false positives (also on the
    empty image), detections on crowd regions, tied scores, and more than 100 detections on one image."""
    rng = np.random.default_rng(seed)
    images, annotations, results = [], [], []

    def detect(image_id: int, mask: np.ndarray, category_id: int, score: float) -> None:
        rle = mask_util.encode(np.asfortranarray(mask))
        box = mask_util.toBbox(rle) + rng.uniform(-2, 2, size=4)
        box[2:] = np.maximum(box[2:], 1)
        score = round(score, 1) if rng.random() < 0.3 else score  # some tied scores
        results.append(
            {"image_id": image_id, "category_id": category_id, "bbox": box.tolist(), "score": score}
            | {"segmentation": encode_rle(mask)}
        )

    sides = {"small": (6, 28), "medium": (36, 90), "large": (100, 150)}
    for image_id, h, w in IMAGES:
        images.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id}.jpg"})
        objects = []  # (mask, category_id, segmentation, iscrowd)
        for i in range(0 if image_id == 3 else int(rng.integers(4, 8))):
            lo, hi = sides[("small", "medium", "large")[i % 3]]
            bw, bh = (int(rng.integers(lo, min(hi, w - 2, h - 2) + 1)) for _ in range(2))
            x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            if i % 2 == 0:  # polygon: a rectangle, sometimes with a second part
                segmentation = [[x0, y0, x0 + bw, y0, x0 + bw, y0 + bh, x0, y0 + bh]]
                if i % 4 == 0:
                    segmentation.append([x0, y0, x0 + bw / 2, y0, x0, y0 + bh / 3])
            else:  # compressed RLE of an ellipse
                segmentation = encode_rle(_ellipse_mask(h, w, x0 + bw / 2, y0 + bh / 2, bw / 2, bh / 2))
            objects.append((_segm_mask(segmentation, h, w), int(rng.choice(CATEGORY_IDS)), segmentation, 0))
        if image_id in (1, 4):  # crowd region with compressed RLE
            crowd = _ellipse_mask(h, w, w * 0.7, h * 0.7, w * 0.2, h * 0.15)
            objects.append((crowd, CATEGORY_IDS[0], encode_rle(crowd), 1))
        for mask, category_id, segmentation, iscrowd in objects:
            rle = mask_util.encode(np.asfortranarray(mask))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "segmentation": segmentation,
                    "area": float(mask_util.area(rle)),
                    "bbox": mask_util.toBbox(rle).tolist(),
                    "iscrowd": iscrowd,
                }
            )
            shifted = np.roll(mask, tuple(rng.integers(-4, 5, size=2)), axis=(0, 1))
            if iscrowd:  # parts of a crowd region: ignored rather than false positives
                for part in (box_mask(h, w, 0, 0, w, int(h * 0.7)), box_mask(h, w, int(w * 0.7), 0, w, h)):
                    detect(image_id, shifted * part, category_id, float(rng.uniform(0.2, 1)))
                continue
            if rng.random() < 0.85:
                detect(image_id, shifted, category_id, float(rng.uniform(0.3, 1)))
            if rng.random() < 0.3:  # duplicate or wrong class
                other = category_id if rng.random() < 0.5 else int(rng.choice(CATEGORY_IDS))
                detect(image_id, np.roll(mask, (6, -5), axis=(0, 1)), other, float(rng.uniform(0, 0.6)))
        for _ in range(110 if image_id == 5 else 3):  # false positives, also on the empty image
            x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
            x1, y1 = x0 + int(rng.integers(3, w - x0)), y0 + int(rng.integers(3, h - y0))
            box = box_mask(h, w, x0, y0, x1, y1)
            detect(image_id, box, int(rng.choice(CATEGORY_IDS)), float(rng.uniform(0, 0.5)))
    categories = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in CATEGORY_IDS]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def without_boxes(results: list[dict]) -> list[dict]:
    """Mask AP is scored without the box, so that loadRes takes the instance area from the mask."""
    return [{k: v for k, v in r.items() if k != "bbox"} for r in results]


def reference_per_class(precision: np.ndarray, names: list[str], iou_type: str) -> dict[str, float]:
    """Detectron2's ``_derive_coco_results`` per-category AP (and AP50 alike) from a reference tool's
    (T, R, K) precision, with -1 for its NaN (a category without ground truth)."""
    metrics = {}
    for k, name in enumerate(names):
        for metric, values in (("AP", precision[:, :, k]), ("AP50", precision[0, :, k])):
            defined = values[values > -1]
            metrics[f"{iou_type}/{metric}-{name}"] = float(np.mean(defined)) if defined.size else -1.0
    return metrics


def pycocotools_eval(gt: dict, results: list[dict], iou_type: str, mask_area: bool = True) -> COCOeval:
    """pycocotools' COCOeval of ``results``, evaluated, accumulated and summarised (mask AP without boxes,
    unless ``mask_area`` is false)."""
    dets = without_boxes(results) if iou_type == "segm" and mask_area else results
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        if dets:
            coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
        else:  # pycocotools' loadRes cannot load an empty list
            coco_dt = COCO()
            coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
            coco_dt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def pycocotools_metrics(
    gt: dict, results: list[dict], iou_types=("bbox", "segm"), mask_area: bool = True
) -> dict[str, float]:
    """The reference: pycocotools' COCOeval, summary stats[0..11] under our flat keys, then the per-class AP
    and AP50 from its precision array."""
    names = [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])]  # COCOeval's catIds order
    metrics = {}
    for iou_type in iou_types:
        coco_eval = pycocotools_eval(gt, results, iou_type, mask_area)
        metrics.update({f"{iou_type}/{m}": float(v) for m, v in zip(COCO_METRICS, coco_eval.stats, strict=True)})
        metrics.update(reference_per_class(coco_eval.eval["precision"][:, :, :, 0, -1], names, iou_type))
    return metrics


@pytest.fixture(scope="module")
def coco_case() -> tuple[dict, list[dict]]:
    return make_coco_case()


def test_generated_case_matches_pycocotools(coco_case):
    gt, results = coco_case
    gt_before, results_before = copy.deepcopy(gt), copy.deepcopy(results)
    metrics = evaluate(gt, results)
    assert len(metrics) == 2 * (len(COCO_METRICS) + 2 * len(CATEGORY_IDS))  # summary, then AP and AP50 per class
    expected = pycocotools_metrics(gt, results)
    assert_metrics_equal(metrics, expected)
    # The case is not degenerate: every area range has ground truth and the scores are mid-range.
    assert all(0.05 < v < 0.95 for v in metrics.values()), metrics
    # Neither input is modified, although the backend writes into annotation dicts.
    assert gt == gt_before
    assert results == results_before


def test_per_class_ap_equals_pycocotools_precision(coco_case):
    gt, results = coco_case
    gt = copy.deepcopy(gt)
    gt["categories"][0]["name"] = "traffic light"  # names are kept as they are in the keys, spaces included
    gt["categories"].append({"id": 11, "name": "unseen", "supercategory": "thing"})  # no ground truth
    metrics = evaluate(gt, results)
    expected = pycocotools_metrics(gt, results)
    per_class = {k: v for k, v in expected.items() if "-" in k}
    assert len(per_class) == 2 * 2 * 4 and "segm/AP-traffic light" in per_class and "bbox/AP50-unseen" in per_class
    for key, value in per_class.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    assert metrics["segm/AP-unseen"] == metrics["segm/AP50-unseen"] == -1  # undefined, as the summary's -1
    assert 0 < metrics["segm/AP-traffic light"] < metrics["segm/AP50-traffic light"] < 1
    # Summary keys only when asked, so that the protocol's metric_names are all there is.
    assert evaluate_coco(gt, results, per_class=False) == {k: v for k, v in metrics.items() if "-" not in k}
    evaluator = COCOEvaluator(gt, per_class=False)
    evaluator.update([1], [model_outputs(gt, results)[1]])
    assert evaluator.compute().keys() == set(get_protocol("coco").metric_names)


def test_segm_uses_mask_area_even_when_results_carry_boxes(coco_case):
    gt, results = coco_case
    metrics = evaluate(gt, tuple(results), iou_types="segm")
    assert metrics == evaluate(gt, without_boxes(results), iou_types="segm")
    # pycocotools fed the boxes too sizes detections by box area, which here moves APm.
    box_area = pycocotools_metrics(gt, results, ("segm",), mask_area=False)
    assert abs(box_area["segm/APm"] - metrics["segm/APm"]) > 1e-3


def test_several_seeds_and_paths_match_pycocotools(tmp_path):
    for seed in (1, 2):
        gt, results = make_coco_case(seed)
        gt_file, results_file = tmp_path / f"gt{seed}.json", tmp_path / f"results{seed}.json"
        gt_file.write_text(json.dumps(gt))
        results_file.write_text(json.dumps(results))
        assert_metrics_equal(evaluate(gt_file, str(results_file)), pycocotools_metrics(gt, results))


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real COCO val2014 subset not found at {REAL_DATA}")
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_real_val2014_subset_matches_pycocotools(iou_type):
    gt_file = REAL_DATA / "instances_val2014_100.json"
    results_file = REAL_DATA / f"instances_val2014_fake{iou_type}100_results.json"
    metrics = evaluate(gt_file, results_file, iou_types=(iou_type,))
    gt, results = json.loads(gt_file.read_text()), json.loads(results_file.read_text())
    assert_metrics_equal(metrics, pycocotools_metrics(gt, results, (iou_type,)))
    assert metrics[f"{iou_type}/AP"] > 0.3  # pycocotools' own example output: 0.505 bbox, 0.320 segm


def test_empty_results(coco_case):
    gt, _ = coco_case
    metrics = evaluate(gt, [])
    assert_metrics_equal(metrics, pycocotools_metrics(gt, []))
    assert metrics["segm/AP"] == 0.0 and metrics["bbox/AR100"] == 0.0


def test_undefined_metrics_are_minus_one(coco_case):
    gt, results = coco_case
    no_small = copy.deepcopy(gt)
    no_small["annotations"] = [a for a in gt["annotations"] if a["area"] >= 32**2]
    metrics = evaluate(no_small, results, iou_types="segm")
    assert metrics["segm/APs"] == -1 and metrics["segm/ARs"] == -1
    assert_metrics_equal(metrics, pycocotools_metrics(no_small, results, ("segm",)))


def test_unknown_ids_and_bad_input_raise(coco_case, tmp_path):
    gt, results = coco_case
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(gt))
    with pytest.raises(ValueError, match=rf"image_id 777 .*{gt_file.name}"):
        evaluate(gt_file, [{**results[0], "image_id": 777}])
    with pytest.raises(ValueError, match=r"category_id 4 .*in-memory"):
        evaluate(gt, [*results, {**results[0], "category_id": 4}])
    with pytest.raises(ValueError, match=r"protocol 'nope'; supported: \['cityscapes', 'coco', 'lvis'\]"):
        evaluate(gt, results, protocol="nope")
    with pytest.raises(ValueError, match="iou_types"):
        evaluate(gt, results, iou_types=("keypoints",))
    with pytest.raises(ValueError, match="'segmentation'"):
        evaluate(gt, [{k: v for k, v in r.items() if k != "segmentation"} for r in results])
    no_area = copy.deepcopy(gt)
    del no_area["annotations"][3]["area"]
    with pytest.raises(ValueError, match="lack 'area' \\(first: annotation id 4\\)"):
        evaluate(no_area, results)


def test_masks_of_the_wrong_size_are_named_instead_of_scored(coco_case):
    gt, results = coco_case
    index = next(i for i, r in enumerate(results) if r["image_id"] == 1)  # image 1 is 240 × 320
    small = encode_rle(box_mask(100, 100, 10, 10, 60, 60))
    transposed = encode_rle(box_mask(320, 240, 10, 10, 60, 60))
    for segmentation, size in ((small, r"\[100, 100\]"), (transposed, r"\[320, 240\]")):
        bad = [*results[:index], {**results[index], "segmentation": segmentation}, *results[index + 1 :]]
        for iou_types in ("segm", "bbox"):
            with pytest.raises(ValueError, match=rf"result {index} \(image_id 1\) .* size {size} .* \[240, 320\]"):
                evaluate(gt, bad, iou_types=iou_types)
    # The streaming evaluator scores through the same checks.
    outputs = model_outputs(gt, results)
    evaluator = COCOEvaluator(gt)
    evaluator.update(list(outputs), [{**out, "masks": out["masks"][..., :100, :100]} for out in outputs.values()])
    with pytest.raises(ValueError, match=r"image_id 1\) .* size \[100, 100\] .* \[240, 320\]"):
        evaluator.compute()


@pytest.mark.parametrize("score", [float("nan"), float("inf"), -float("inf"), "0.9", None])
def test_non_finite_or_non_numeric_scores_are_named(coco_case, score):
    gt, results = coco_case
    with pytest.raises(ValueError, match=rf"result 2 \(image_id {results[2]['image_id']}\) has score .*finite"):
        evaluate(gt, [*results[:2], {**results[2], "score": score}, *results[3:]])


@pytest.mark.parametrize("key, value", [("image_id", "1"), ("image_id", 1.0), ("image_id", True), ("category_id", "2")])
def test_non_integer_ids_are_named(coco_case, key, value):
    gt, results = coco_case
    with pytest.raises(ValueError, match=rf"result 1 has .*{key} {value!r}.* must be integers"):
        evaluate(gt, [results[0], {**results[1], key: value}])


def test_numpy_integer_ids_are_accepted(coco_case):
    gt, results = coco_case
    numpy_ids = [{**r, "image_id": np.int64(r["image_id"]), "category_id": np.int32(r["category_id"])} for r in results]
    assert evaluate(gt, numpy_ids) == evaluate(gt, results)


def model_outputs(gt: dict, results: list[dict], seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    """torchvision-style eval outputs (xyxy boxes, contiguous labels, probability masks) per image."""
    g = torch.Generator().manual_seed(seed)
    outputs = {}
    for image in gt["images"]:
        dets = [r for r in results if r["image_id"] == image["id"]]
        h, w = image["height"], image["width"]
        binary = torch.zeros(len(dets), 1, h, w)
        for i, r in enumerate(dets):
            binary[i, 0] = torch.from_numpy(mask_util.decode(r["segmentation"]).astype(np.float32))
        probs = 0.2 + 0.6 * binary + 0.29 * (torch.rand(binary.shape, generator=g) - 0.5)
        probs[:, :, 0, 0] = 0.5  # exactly at the threshold: background
        xywh = torch.tensor([r["bbox"] for r in dets], dtype=torch.float32).reshape(-1, 4)
        outputs[image["id"]] = {
            "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
            "labels": torch.tensor([CATEGORY_IDS.index(r["category_id"]) + 1 for r in dets], dtype=torch.int64),
            "scores": torch.tensor([r["score"] for r in dets], dtype=torch.float32),
            "masks": probs,
        }
    return outputs


def test_to_coco_results_round_trip(coco_case):
    gt, results = coco_case
    outputs = model_outputs(gt, results)
    converted = to_coco_results(1, outputs[1], CATEGORY_IDS)
    json.dumps(converted)  # serialisable as is
    expected = [r for r in results if r["image_id"] == 1]
    assert [r["category_id"] for r in converted] == [r["category_id"] for r in expected]
    for r, e, prob in zip(converted, expected, outputs[1]["masks"], strict=True):
        assert r["bbox"] == pytest.approx(e["bbox"], abs=1e-3)
        assert r["score"] == pytest.approx(e["score"])
        assert r["segmentation"]["size"] == list(prob.shape[1:])
        np.testing.assert_array_equal(mask_util.decode(r["segmentation"]), (prob[0] > 0.5).numpy())
    assert to_coco_results(3, outputs[3], CATEGORY_IDS)[0]["segmentation"]["size"] == [64, 80]
    empty = {k: v[:0] for k, v in outputs[1].items()}
    assert to_coco_results(1, empty, CATEGORY_IDS) == []
    boxes_only = {k: v for k, v in outputs[1].items() if k != "masks"}
    assert all("segmentation" not in r for r in to_coco_results(1, boxes_only, CATEGORY_IDS))
    with pytest.raises(ValueError, match=r"outside 1\.\.3"):
        to_coco_results(1, {**outputs[1], "labels": outputs[1]["labels"] * 0}, CATEGORY_IDS)


def test_evaluator_matches_evaluate_and_counts_duplicates_once(coco_case):
    gt, results = coco_case
    outputs = model_outputs(gt, results)
    evaluator = COCOEvaluator(gt)  # category ids default to the sorted gt ids, CATEGORY_IDS here
    evaluator.update([1, 2], [outputs[1], outputs[2]])
    evaluator.update([3, 1], [outputs[3], {k: v[:0] for k, v in outputs[1].items()}])  # image 1 again
    evaluator.update([torch.tensor(4), 5], [outputs[4], outputs[5]])
    metrics = evaluator.compute()
    assert evaluator.num_images == 5
    flat = [r for image_id, out in outputs.items() for r in to_coco_results(image_id, out, CATEGORY_IDS)]
    assert len(evaluator.results) == len(flat) == len(results)
    assert metrics == evaluate(gt, flat)
    assert_metrics_equal(metrics, pycocotools_metrics(gt, flat))

    evaluator.reset()
    evaluator.update([2], [outputs[2]])
    assert evaluator.compute()["bbox/AR100"] < metrics["bbox/AR100"]  # still scored over all gt images
    assert evaluator.num_images == 1


def reference_pr_curves(precision: np.ndarray, iou_thresholds: np.ndarray) -> dict[str, np.ndarray]:
    """A reference tool's (T, R, K) precision as class-mean curves (R,) at IoU 0.50, 0.75 and over 0.50:0.95,
    its -1 (a category without ground truth) masked out."""
    defined = np.ma.masked_equal(precision, -1)
    at = {iou: int(np.flatnonzero(np.isclose(iou_thresholds, iou))[0]) for iou in (0.5, 0.75)}
    return {
        "0.50": defined[at[0.5]].mean(axis=1).filled(-1),
        "0.75": defined[at[0.75]].mean(axis=1).filled(-1),
        "0.50:0.95": defined.mean(axis=(0, 2)).filled(-1),
    }


def test_pr_curves_are_pycocotools_precision_averaged_over_classes(coco_case, tmp_path):
    gt, results = coco_case
    gt = copy.deepcopy(gt)
    gt["categories"].append({"id": 11, "name": "unseen", "supercategory": "thing"})  # no ground truth: -1
    outputs = model_outputs(gt, results)
    evaluator = COCOEvaluator(gt)
    evaluator.update(list(outputs), list(outputs.values()))
    metrics = evaluator.compute()
    curves = evaluator.pr_curves
    assert curves.keys() == {"recall", "max_dets", "curves"} and list(curves["curves"]) == ["bbox", "segm"]
    for iou_type, by_iou in curves["curves"].items():
        reference = pycocotools_eval(gt, evaluator.results, iou_type)
        assert curves["recall"] == pytest.approx(reference.params.recThrs.tolist(), abs=1e-12)
        assert curves["max_dets"] == reference.params.maxDets[-1] == 100
        precision = reference.eval["precision"][:, :, :, 0, -1]  # (T, R, K): area "all", the last maxDets
        assert (precision[:, :, 3] == -1).all() and (precision[:, :, :3] > -1).all()  # only "unseen" undefined
        expected = reference_pr_curves(precision, reference.params.iouThrs)
        assert list(by_iou) == list(expected)
        for label, curve in by_iou.items():
            assert len(curve) == 101 and np.allclose(curve, expected[label], atol=1e-6), (iou_type, label)
        # Averaged over the recall points, each curve is its summary AP.
        for label, metric in (("0.50", "AP50"), ("0.75", "AP75"), ("0.50:0.95", "AP")):
            assert np.mean(by_iou[label]) == pytest.approx(metrics[f"{iou_type}/{metric}"], abs=1e-9)
        assert by_iou["0.50"][0] > by_iou["0.50"][-1] >= 0  # precision falls with recall, never undefined
    path = evaluator.write_pr_curves(tmp_path)
    assert path == tmp_path / "pr_curves.json" and json.loads(path.read_text()) == curves
    assert evaluate_coco(gt, evaluator.results) == metrics  # the offline scorer gives the same metrics

    evaluator.reset()  # nothing scored since: nothing to write
    assert evaluator.pr_curves == {} and evaluator.write_pr_curves(tmp_path / "none") is None
    assert not (tmp_path / "none").exists()
    segm_only = COCOEvaluator(gt, iou_types="segm")
    segm_only.update([1], [outputs[1]])
    segm_only.compute()
    assert list(segm_only.pr_curves["curves"]) == ["segm"]
    with pytest.raises(ValueError, match=r"segm precision must be \(T, R, K\) with T = 10 .* R = 101 .*\(10, 100, 3\)"):
        pr_curves({"segm": np.zeros((10, 100, 3))}, 100)


def test_format_coco_table():
    metrics = {f"{t}/{m}": 0.5 for t in ("bbox", "segm") for m in COCO_METRICS}
    metrics["segm/APs"] = -1.0
    metrics["bbox/AP"] = 0.12345
    lines = format_coco_table(metrics).splitlines()
    assert lines[0] == "| IoU type | AP | AP50 | AP75 | APs | APm | APl | AR1 | AR10 | AR100 | ARs | ARm | ARl |"
    assert lines[1] == "| --- |" + " ---: |" * 12
    assert lines[2] == "| bbox | 12.35 |" + " 50.00 |" * 11
    assert lines[3] == "| segm | 50.00 | 50.00 | 50.00 | - |" + " 50.00 |" * 8
    assert format_coco_table(metrics, iou_types=("segm",)).splitlines()[2:] == lines[3:]
    # Per-class values follow the summary, Detectron2-like: three categories a row.
    names = ["person", "traffic light", "cat", "dog"]
    metrics.update({f"segm/{m}-{name}": 0.25 for name in names for m in ("AP", "AP50")})
    metrics["segm/AP-cat"] = metrics["segm/AP50-cat"] = -1.0
    table = format_coco_table(metrics).split("\n\n")
    assert table[0].splitlines() == lines
    assert table[1].splitlines() == [
        "Per-category segm AP and AP50:",
        "| category | AP | AP50 | category | AP | AP50 | category | AP | AP50 |",
        "|" + " --- | ---: | ---: |" * 3,
        "| person | 25.00 | 25.00 | traffic light | 25.00 | 25.00 | cat | - | - |",
        "| dog | 25.00 | 25.00 |  |  |  |  |  |  |",
    ]
    assert len(table) == 2  # bbox has no per-class values here


def test_protocols_are_registered_with_their_evaluator_table_and_writer(coco_case):
    gt, _ = coco_case
    assert sorted(PROTOCOLS) == ["cityscapes", "coco", "lvis"]
    coco = get_protocol("coco")
    metrics = dict.fromkeys(coco.metric_names, 0.5)
    assert len(metrics) == 2 * len(COCO_METRICS) and coco.format_table(metrics) == format_coco_table(metrics)
    evaluator = coco.build_evaluator(SimpleNamespace(annotation_file=gt, category_ids=[2, 1, 3]))
    assert isinstance(evaluator, COCOEvaluator) and evaluator.category_ids == [2, 1, 3]
    assert coco.write_results is None and get_protocol("cityscapes").write_results is not None
    with pytest.raises(ValueError, match=r"protocol 'nope'; supported: \['cityscapes', 'coco', 'lvis'\]"):
        get_protocol("nope")


def _gather_worker(rank: int, port: int, gt: dict, shards: list[dict], out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        evaluator = COCOEvaluator(gt)
        outputs = shards[rank]
        evaluator.update(list(outputs), list(outputs.values()))
        metrics = evaluator.compute()
        summary = {
            "metrics": metrics,
            "num_results": len(evaluator.results),
            "num_images": evaluator.num_images,
            "pr_iou_types": list(evaluator.pr_curves.get("curves", {})),
        }
        # An error on rank 0 (category 4 is not in gt) must reach every rank instead of hanging them.
        wrong = COCOEvaluator(gt, category_ids=[2, 5, 4])
        wrong.update(list(outputs), list(outputs.values()))
        with pytest.raises(ValueError, match="category_id 4") as error:
            wrong.compute()
        summary["error"] = str(error.value)
        wrong.reset()  # after a failed compute too
        # A rank without images sends empty states of the right dtypes and shapes.
        evaluator.reset()
        if rank == 1:
            evaluator.update(list(outputs), list(outputs.values()))
        summary["rank_1_only"] = [evaluator.compute(), evaluator.num_images]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(summary))
    finally:
        dist.destroy_process_group()


def test_distributed_gather_two_ranks(coco_case, tmp_path):
    gt, results = coco_case
    outputs = model_outputs(gt, results)
    image_ids = sorted(outputs)
    # Rank 1 also gets rank 0's first image, as a padding sampler would hand out.
    shards = [
        {i: outputs[i] for i in image_ids[0::2]},
        {i: outputs[i] for i in [*image_ids[1::2], image_ids[0]]},
    ]
    mp.spawn(_gather_worker, args=(free_port(), gt, shards, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["metrics"] == ranks[1]["metrics"] and ranks[0]["error"] == ranks[1]["error"]
    assert ranks[0]["num_images"] == ranks[1]["num_images"] == len(image_ids)
    assert ranks[0]["num_results"] == len(results) and ranks[1]["num_results"] == 0  # one copy, on rank 0
    assert ranks[0]["pr_iou_types"] == ["bbox", "segm"] and ranks[1]["pr_iou_types"] == []  # scored on rank 0
    flat = [r for image_id, out in outputs.items() for r in to_coco_results(image_id, out, CATEGORY_IDS)]
    assert_metrics_equal(ranks[0]["metrics"], pycocotools_metrics(gt, flat))
    rank_1 = [r for image_id in sorted(shards[1]) for r in to_coco_results(image_id, outputs[image_id], CATEGORY_IDS)]
    assert ranks[0]["rank_1_only"] == ranks[1]["rank_1_only"] == [evaluate(gt, rank_1), len(shards[1])]


# ---- the compact store ----------------------------------------------------------------------------
def _per_image(results: list[dict]) -> dict[int, list[dict]]:
    per_image: dict[int, list[dict]] = {}
    for r in results:
        per_image.setdefault(r["image_id"], []).append(r)
    return per_image


def test_compact_store_gives_back_the_result_dicts_exactly(coco_case):
    gt, results = coco_case
    for image_id, output in model_outputs(gt, results).items():
        converted = to_coco_results(image_id, output, CATEGORY_IDS)
        packed = Detections.from_results(image_id, converted)
        # Model outputs are float32: stored as such, and given back as the same Python floats.
        assert packed.scores.dtype == packed.boxes.dtype == np.float32 and packed.category_ids.dtype == np.int32
        assert json.dumps(packed.results()) == json.dumps(converted)  # same values, same key order
        assert packed.results(boxes=False) == without_boxes(converted)
    per_image = _per_image(results)
    packed = Detections.from_results(1, per_image[1])  # float64 values that float32 would round: kept
    assert packed.scores.dtype == packed.boxes.dtype == np.float64 and packed.results() == per_image[1]
    picked = np.array([4, 0, 2])
    assert packed.results(picked) == [per_image[1][i] for i in picked]
    no_masks = [{k: v for k, v in r.items() if k != "segmentation"} for r in per_image[2]]
    assert Detections.from_results(2, no_masks).results() == no_masks
    nothing = Detections.from_results(3, [])
    assert nothing.results() == [] and nothing.num_images == 1 and len(nothing) == 0
    with pytest.raises(ValueError, match="category ids must be integers"):
        Detections.from_results(1, [{**per_image[1][0], "category_id": 2.0}])


def test_merge_sorts_by_image_and_keeps_the_first_ranks_copy(coco_case):
    _, results = coco_case
    per_image = _per_image(results)
    assert sorted(per_image) == [1, 2, 3, 4, 5]

    def pack(image_id: int, dets: list[dict] | None = None) -> Detections:
        return Detections.from_results(image_id, per_image[image_id] if dets is None else dets)

    ranks = [
        Detections.merge([pack(5), pack(2)]),
        Detections.merge([]),  # a rank without images
        Detections.merge([pack(4), pack(2, per_image[2][:1]), pack(1)]),  # a padding copy of image 2
        pack(3),
    ]
    assert ranks[0].image_ids.tolist() == [2, 5] and ranks[1].num_images == 0
    merged = Detections.merge([pickle.loads(pickle.dumps(rank)) for rank in ranks])  # as gather_object moves them
    assert merged.image_ids.tolist() == [1, 2, 3, 4, 5]
    assert merged.results() == [r for image_id in sorted(per_image) for r in per_image[image_id]]
    assert merged.by_image() == per_image
    assert Detections.merge([merged]) is merged  # already one sorted store: not copied


def test_evaluator_stores_arrays_and_makes_results_when_asked(coco_case):
    gt, results = coco_case
    outputs = model_outputs(gt, results)
    evaluator = COCOEvaluator(gt)
    evaluator.update(sorted(outputs, reverse=True), [outputs[i] for i in sorted(outputs, reverse=True)])
    assert evaluator.results == []  # nothing evaluated yet
    store = evaluator.stored()
    assert store.image_ids.tolist() == sorted(outputs, reverse=True) and len(store) == len(results)
    # The states: every staged batch in one tensor each, in place of the empty one of its dtype and shape.
    assert [t.dtype for t in evaluator.stored_scores] == [torch.float32]
    assert evaluator.stored_boxes[0].shape == (len(results), 4) and evaluator.stored_counts[0].dtype == torch.uint8
    assert evaluator.stored_count_lengths[0].dtype == torch.int32 and evaluator.stored_image_ids[0].dtype == torch.int64
    evaluator.update([99], [{k: v[:0] for k, v in outputs[1].items()}])  # an image without detections
    assert evaluator.stored().image_ids.tolist() == [*sorted(outputs, reverse=True), 99]
    assert len(evaluator.stored_scores) == 2
    evaluator.reset()
    assert [t.shape for t in evaluator.stored_boxes] == [(0, 4)] and evaluator.stored().num_images == 0
    wide = {**outputs[1], "scores": outputs[1]["scores"].double() + 1e-12}  # float32 would round them: refused
    with pytest.raises(ValueError, match=r"the scores of images \[1\] need float64"):
        evaluator.update([1], [wide])
    evaluator.reset()
    evaluator.update(sorted(outputs), [outputs[i] for i in sorted(outputs)])
    flat = [r for image_id in sorted(outputs) for r in to_coco_results(image_id, outputs[image_id], CATEGORY_IDS)]
    assert len(pickle.dumps(store)) < len(pickle.dumps(flat))  # what the sync moves: RLE bytes, few arrays
    assert evaluator.compute() == evaluate(gt, flat)
    assert json.dumps(evaluator.results) == json.dumps(flat)  # what `python -m iemask.eval` writes
    assert gc.isenabled()  # paused while scoring only
