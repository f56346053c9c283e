"""LVIS v1.0: coco_url loading, repeat-factor sampling, federated evaluation equal to LVISEval, configs, a tiny run."""

from __future__ import annotations

import copy
import gc
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from torchvision import tv_tensors

from conftest import TINY_OVERRIDES, assert_metrics_equal, box_mask, compose_config, encode_rle
from iemask.data.base import DatasetError
from iemask.data.image_io import read_rgb
from iemask.data.lvis import LVISDataModule, LVISInstanceDataset
from iemask.data.samplers import RepeatFactorTrainingSampler, TrainingSampler
from iemask.data.shapes import SHAPES_CATEGORIES
from iemask.evaluation import get_protocol, to_coco_results
from iemask.evaluation.lvis import LVIS_METRICS, LVISEvaluator, evaluate_lvis, format_lvis_table
from test_evaluation_coco import reference_per_class, reference_pr_curves

METRIC_KEYS = {f"{t}/{m}" for t in ("bbox", "segm") for m in LVIS_METRICS}
# The generated case's AP and AP50 per class, and those of the shapes classes in the tiny run.
CASE_CLASS_KEYS = {f"{t}/{m}-class{c}" for t in ("bbox", "segm") for m in ("AP", "AP50") for c in range(1, 8)}
SHAPES_CLASS_KEYS = {
    f"{t}/{m}-{c['name']}" for t in ("bbox", "segm") for m in ("AP", "AP50") for c in SHAPES_CATEGORIES
}
# The lvis package logs through the deprecated Logger.warn.
pytestmark = pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning")


# ---- a generated LVIS case for the evaluator ---------------------------------------------------
FREQUENCY = {1: "r", 2: "r", 3: "c", 4: "c", 5: "f", 6: "f", 7: "r"}
# (id, height, width, COCO folder); image 13 has no annotations, image 16 gets more than 300 detections.
IMAGES = [
    (11, 240, 320, "train2017"),
    (12, 180, 200, "val2017"),
    (13, 64, 80, "val2017"),
    (14, 300, 260, "train2017"),
    (15, 120, 160, "val2017"),
    (16, 200, 200, "train2017"),
]


def make_lvis_case(seed: int = 0) -> tuple[dict, list[dict]]:
    """LVIS-format ground truth (polygons, no iscrowd, r/c/f categories with counts, per-image negative and
    not-exhaustive lists, an image without annotations, all three area ranges) and noisy detections:
    matches, duplicates, wrong classes, false positives on negative, not-exhaustive and unlabelled categories,
    tied scores, and more than 300 detections on one image."""
    rng = np.random.default_rng(seed)
    category_ids = sorted(FREQUENCY)
    images, annotations, results = [], [], []

    def detect(image_id: int, mask: np.ndarray, category_id: int, score: float) -> None:
        box = mask_util.toBbox(mask_util.encode(np.asfortranarray(mask))) + rng.uniform(-2, 2, size=4)
        box[2:] = np.maximum(box[2:], 1)
        score = round(score, 1) if rng.random() < 0.3 else score  # some tied scores
        results.append(
            {"image_id": image_id, "category_id": int(category_id), "bbox": box.tolist(), "score": score}
            | {"segmentation": encode_rle(mask)}
        )

    def random_box(h: int, w: int) -> np.ndarray:
        x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        return box_mask(h, w, x0, y0, x0 + int(rng.integers(3, w - x0)), y0 + int(rng.integers(3, h - y0)))

    sides = {"small": (6, 28), "medium": (36, 90), "large": (100, 150)}
    for image_id, h, w, folder in IMAGES:
        positive = [] if image_id == 13 else [int(c) for c in rng.choice(category_ids[:6], 3, replace=False)]
        others = [c for c in category_ids if c not in positive]
        negative = [int(c) for c in rng.choice(others, 2, replace=False)]
        images.append(
            {
                "id": image_id,
                "height": h,
                "width": w,
                "coco_url": f"http://images.cocodataset.org/{folder}/{image_id:012d}.jpg",
                "neg_category_ids": negative,
                "not_exhaustive_category_ids": positive[:1],
            }
        )
        for i in range(len(positive) and int(rng.integers(4, 8))):
            lo, hi = sides[("small", "medium", "large")[i % 3]]
            bw, bh = (int(rng.integers(lo, min(hi, w - 2, h - 2) + 1)) for _ in range(2))
            x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            if i % 2 == 0:  # a rectangle, sometimes with a second part
                polygons = [[x0, y0, x0 + bw, y0, x0 + bw, y0 + bh, x0, y0 + bh]]
                if i % 4 == 0:
                    polygons.append([x0, y0, x0 + bw / 2, y0, x0, y0 + bh / 3])
            else:  # a triangle
                polygons = [[x0, y0, x0 + bw, y0 + bh / 2, x0, y0 + bh]]
            polygons = [[float(v) for v in p] for p in polygons]
            rle = mask_util.merge(mask_util.frPyObjects(polygons, h, w))
            mask = mask_util.decode(rle)
            category_id = positive[i % len(positive)]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "segmentation": polygons,
                    "area": float(mask_util.area(rle)),
                    "bbox": mask_util.toBbox(rle).tolist(),
                }
            )
            if rng.random() < 0.85:
                detect(image_id, np.roll(mask, tuple(rng.integers(-4, 5, size=2)), axis=(0, 1)), category_id,
                       float(rng.uniform(0.3, 1)))  # fmt: skip
            if rng.random() < 0.3:  # duplicate or wrong class
                other = category_id if rng.random() < 0.5 else int(rng.choice(category_ids))
                detect(image_id, np.roll(mask, (6, -5), axis=(0, 1)), other, float(rng.uniform(0, 0.6)))
        unlabelled = [c for c in others if c not in negative]
        for category_id in [*negative, *positive[:1], *unlabelled]:  # scored as FP / ignored / dropped
            for _ in range(2):
                detect(image_id, random_box(h, w), category_id, float(rng.uniform(0.2, 0.9)))
        for _ in range(320 if image_id == 16 else 6):
            detect(image_id, random_box(h, w), int(rng.choice(category_ids)), float(rng.uniform(0, 0.5)))
    categories = [
        {
            "id": c,
            "name": f"class{c}",
            "synset": f"class{c}.n.01",
            "frequency": FREQUENCY[c],
            "image_count": len({a["image_id"] for a in annotations if a["category_id"] == c}),
            "instance_count": sum(a["category_id"] == c for a in annotations),
        }
        for c in category_ids
    ]
    return {"images": images, "annotations": annotations, "categories": categories}, results


@pytest.fixture
def lvis_official(monkeypatch, tmp_path):
    """The official ``lvis`` package's LVISEval as Detectron2 calls it (300 per image; mask AP without boxes),
    run on ``(gt, results, iou_type)``."""
    from lvis import LVIS, LVISEval, LVISResults

    monkeypatch.setattr(np, "float", float, raising=False)  # lvis 0.5.3 still uses np.float

    def run(gt: dict, results: list[dict], iou_type: str) -> LVISEval:
        path = tmp_path / "lvis_gt.json"
        path.write_text(json.dumps(gt))
        dets = copy.deepcopy(results)
        if iou_type == "segm":
            dets = [{k: v for k, v in d.items() if k != "bbox"} for d in dets]
        lvis_gt = LVIS(str(path))
        lvis_eval = LVISEval(lvis_gt, LVISResults(lvis_gt, dets, max_dets=300), iou_type)
        lvis_eval.run()
        return lvis_eval

    return run


@pytest.fixture
def lvis_oracle(lvis_official):
    """LVISEval's summary, then the per-class AP and AP50 from its (T, R, K, A) precision array."""

    def metrics(gt: dict, results: list[dict], iou_types=("bbox", "segm")) -> dict[str, float]:
        out = {}
        for iou_type in iou_types:
            lvis_eval = lvis_official(gt, results, iou_type)
            out.update({f"{iou_type}/{k}": float(lvis_eval.results[k]) for k in LVIS_METRICS})
            names = [lvis_eval.lvis_gt.cats[c]["name"] for c in lvis_eval.params.cat_ids]
            out.update(reference_per_class(lvis_eval.eval["precision"][..., 0], names, iou_type))
        return out

    return metrics


@pytest.fixture(scope="module")
def lvis_case() -> tuple[dict, list[dict]]:
    return make_lvis_case()


def test_generated_case_matches_lvis_eval(lvis_case, lvis_oracle):
    gt, results = lvis_case
    gt_before, results_before = copy.deepcopy(gt), copy.deepcopy(results)
    metrics = evaluate_lvis(gt, results)
    assert metrics.keys() == METRIC_KEYS | CASE_CLASS_KEYS
    assert_metrics_equal(metrics, lvis_oracle(gt, results))
    assert all(0.05 < metrics[k] < 0.95 for k in METRIC_KEYS), metrics  # not degenerate: every group has gt
    assert gt == gt_before and results == results_before  # neither input is modified
    # The case holds every federated situation, and more than 300 detections on an image.
    pairs = {(r["image_id"], r["category_id"]) for r in results}
    positive = {(a["image_id"], a["category_id"]) for a in gt["annotations"]}
    negative = {(i["id"], c) for i in gt["images"] for c in i["neg_category_ids"]}
    not_exhaustive = {(i["id"], c) for i in gt["images"] for c in i["not_exhaustive_category_ids"]}
    assert pairs & negative and pairs & not_exhaustive and pairs - positive - negative
    assert max(Counter(r["image_id"] for r in results).values()) > 300


def test_several_seeds_and_paths_match_lvis_eval(lvis_oracle, tmp_path):
    for seed in (1, 2):
        gt, results = make_lvis_case(seed)
        gt_file, results_file = tmp_path / f"gt{seed}.json", tmp_path / f"results{seed}.json"
        gt_file.write_text(json.dumps(gt))
        results_file.write_text(json.dumps(results))
        assert_metrics_equal(evaluate_lvis(gt_file, str(results_file)), lvis_oracle(gt, results))


def test_per_class_ap_equals_lvis_eval_precision(lvis_case, lvis_oracle, monkeypatch):
    """Each category's AP and AP50 come from its own chunk's precision, as LVISEval's over all categories."""
    import iemask.evaluation.lvis as lvis_module

    gt, results = lvis_case
    gt = copy.deepcopy(gt)
    gt["categories"][1]["name"] = "traffic light"  # kept as it is in the keys, spaces included
    monkeypatch.setattr(lvis_module, "CATEGORY_CHUNK", 3)
    metrics = evaluate_lvis(gt, results)
    per_class = {k: v for k, v in lvis_oracle(gt, results).items() if k not in METRIC_KEYS}
    assert len(per_class) == len(CASE_CLASS_KEYS) and "bbox/AP50-traffic light" in per_class
    for key, value in per_class.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    # Category 7 has detections but no annotations: undefined, -1 as the summary's undefined values.
    assert metrics["segm/AP-class7"] == metrics["bbox/AP50-class7"] == -1
    assert sum(0 < v < 1 for v in per_class.values()) == len(per_class) - 4
    assert evaluate_lvis(gt, results, per_class=False) == {k: metrics[k] for k in METRIC_KEYS}
    evaluator = LVISEvaluator(gt, per_class=False)
    evaluator.update([11], [model_outputs(gt, results)[11]])
    assert evaluator.compute().keys() == set(get_protocol("lvis").metric_names)


def test_categories_scored_in_chunks_match_lvis_eval(lvis_case, lvis_oracle, monkeypatch):
    import iemask.evaluation.lvis as lvis_module

    gt, results = lvis_case
    unused = {"id": 8, "name": "class8", "synset": "class8.n.01", "frequency": "c", "image_count": 0}
    gt = {**gt, "categories": [*gt["categories"], unused]}  # a chunk with neither annotations nor detections
    monkeypatch.setattr(lvis_module, "CATEGORY_CHUNK", 2)
    assert_metrics_equal(evaluate_lvis(gt, results), lvis_oracle(gt, results))


def test_federated_rules(lvis_case):
    gt, results = lvis_case
    metrics = evaluate_lvis(gt, results)
    image = gt["images"][0]
    labelled = {a["category_id"] for a in gt["annotations"]}
    here = {a["category_id"] for a in gt["annotations"] if a["image_id"] == image["id"]}
    # A confident 2×2 detection in the corner, matching no annotation (every one is at least 6×6).
    corner = {"image_id": image["id"], "bbox": [0.0, 0.0, 2.0, 2.0], "score": 0.999}
    corner["segmentation"] = encode_rle(box_mask(image["height"], image["width"], 0, 0, 2, 2))
    unknown = next(c for c in FREQUENCY if c not in here and c not in image["neg_category_ids"])
    negative = next(c for c in image["neg_category_ids"] if c in labelled)
    (not_exhaustive,) = image["not_exhaustive_category_ids"]
    # Unknown categories are not scored, negative ones are false positives, unmatched not-exhaustive ones ignored.
    assert evaluate_lvis(gt, [*results, {**corner, "category_id": unknown}]) == metrics
    assert evaluate_lvis(gt, [*results, {**corner, "category_id": negative}])["bbox/AP"] < metrics["bbox/AP"]
    assert evaluate_lvis(gt, [*results, {**corner, "category_id": not_exhaustive}]) == metrics
    # Only the 300 best detections of an image count.
    crowded = sorted((r for r in results if r["image_id"] == 16), key=lambda r: -r["score"])
    assert len(crowded) > 300 and crowded[299]["score"] > 0
    assert evaluate_lvis(gt, [*results, *({**r, "score": 0.0} for r in crowded[:5])]) == metrics


def test_empty_results_and_bad_input(lvis_case):
    gt, results = lvis_case
    metrics = evaluate_lvis(gt, [])
    assert metrics.keys() == METRIC_KEYS | CASE_CLASS_KEYS
    assert all(v == (-1 if k.endswith("-class7") else 0) for k, v in metrics.items())  # 7 has no ground truth
    with pytest.raises(ValueError, match="category_id 9 is not a category"):
        evaluate_lvis(gt, [{**results[0], "category_id": 9}])
    coco_like = copy.deepcopy(gt)
    del coco_like["images"][2]["neg_category_ids"]
    with pytest.raises(ValueError, match=r"image id 13 .* lacks \['neg_category_ids'\]"):
        evaluate_lvis(coco_like, results)
    no_frequency = copy.deepcopy(gt)
    del no_frequency["categories"][0]["frequency"]
    with pytest.raises(ValueError, match=r"category id 1 .* frequency None"):
        evaluate_lvis(no_frequency, results)


def test_protocol_is_registered(lvis_case):
    from iemask.evaluation import evaluate

    gt, results = lvis_case
    assert evaluate(gt, results, protocol="lvis", iou_types="segm") == evaluate_lvis(gt, results, iou_types="segm")


def model_outputs(gt: dict, results: list[dict]) -> dict[int, dict[str, torch.Tensor]]:
    """torchvision-style eval outputs (xyxy boxes, contiguous labels, probability masks) per image."""
    category_ids = sorted(c["id"] for c in gt["categories"])
    outputs = {}
    for image in gt["images"]:
        dets = [r for r in results if r["image_id"] == image["id"]]
        masks = torch.from_numpy(mask_util.decode([r["segmentation"] for r in dets])).permute(2, 0, 1)  # (N, H, W)
        xywh = torch.tensor([r["bbox"] for r in dets], dtype=torch.float32)
        outputs[image["id"]] = {
            "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
            "labels": torch.tensor([category_ids.index(r["category_id"]) + 1 for r in dets]),
            "scores": torch.tensor([r["score"] for r in dets], dtype=torch.float32),
            "masks": (0.1 + 0.8 * masks.float())[:, None],  # (N, 1, H, W) probabilities
        }
    return outputs


@pytest.fixture(scope="module")
def lvis_outputs(lvis_case) -> dict[int, dict[str, torch.Tensor]]:
    return model_outputs(*lvis_case)


def test_evaluator_matches_evaluate_and_counts_duplicates_once(lvis_case, lvis_outputs, lvis_oracle):
    gt, results = lvis_case
    outputs = lvis_outputs
    ids = sorted(outputs)
    evaluator = LVISEvaluator(gt)
    evaluator.update(ids[:3], [outputs[i] for i in ids[:3]])
    again = {k: v[:0] for k, v in outputs[ids[0]].items()}  # image ids[0] again: skipped
    evaluator.update([ids[0], *ids[3:]], [again, *(outputs[i] for i in ids[3:])])
    metrics = evaluator.compute()
    assert evaluator.num_images == len(gt["images"])
    category_ids = sorted(FREQUENCY)
    flat = [r for i in ids for r in to_coco_results(i, outputs[i], category_ids)]
    assert len(evaluator.results) == len(flat) == len(results)
    assert metrics == evaluate_lvis(gt, flat)
    assert_metrics_equal(metrics, lvis_oracle(gt, flat))


def test_pr_curves_are_lvis_eval_precision_averaged_over_classes(lvis_case, lvis_outputs, lvis_official, monkeypatch):
    """The curves of the stored, chunked scoring equal the class means of LVISEval's own precision array."""
    import iemask.evaluation.lvis as lvis_module

    gt, _ = lvis_case
    monkeypatch.setattr(lvis_module, "CATEGORY_CHUNK", 3)  # curves made of several chunks' precision
    evaluator = LVISEvaluator(gt)
    evaluator.update(sorted(lvis_outputs), [lvis_outputs[i] for i in sorted(lvis_outputs)])
    metrics = evaluator.compute()
    curves = evaluator.pr_curves
    assert curves["max_dets"] == 300 and list(curves["curves"]) == ["bbox", "segm"]
    for iou_type, by_iou in curves["curves"].items():
        reference = lvis_official(gt, evaluator.results, iou_type)
        assert curves["recall"] == pytest.approx(reference.params.rec_thrs.tolist(), abs=1e-12)
        precision = reference.eval["precision"][..., 0]  # (T, R, K, A) → area "all"
        assert (precision[:, :, 6] == -1).all()  # category 7: detections, no annotations
        expected = reference_pr_curves(precision, reference.params.iou_thrs)
        for label, curve in by_iou.items():
            assert np.allclose(curve, expected[label], atol=1e-6), (iou_type, label)
        for label, metric in (("0.50", "AP50"), ("0.75", "AP75"), ("0.50:0.95", "AP")):
            assert np.mean(by_iou[label]) == pytest.approx(metrics[f"{iou_type}/{metric}"], abs=1e-9)


def test_wrong_mask_sizes_scores_and_ids_are_named(lvis_case, lvis_outputs):
    gt, results = lvis_case
    index = next(i for i, r in enumerate(results) if r["image_id"] == 11)  # image 11 is 240 × 320
    transposed = encode_rle(box_mask(320, 240, 10, 10, 60, 60))
    cases = [
        ({"segmentation": transposed}, r"image_id 11\) has a segmentation RLE of size \[320, 240\] .*\[240, 320\]"),
        ({"score": float("nan")}, r"image_id 11\) has score nan: scores must be finite"),
        ({"image_id": "11"}, r"has image_id '11' .* must be integers"),
    ]
    for change, message in cases:
        bad = [*results[:index], {**results[index], **change}, *results[index + 1 :]]
        with pytest.raises(ValueError, match=rf"result {index}\b.*{message}"):
            evaluate_lvis(gt, bad)
    # The streaming evaluator scores through the same checks.
    evaluator = LVISEvaluator(gt)
    resized = {**lvis_outputs[11], "masks": lvis_outputs[11]["masks"][..., :100, :100]}
    evaluator.update([11, 12], [resized, lvis_outputs[12]])
    with pytest.raises(ValueError, match=r"image_id 11\) .* size \[100, 100\] .*\[240, 320\]"):
        evaluator.compute()


def test_evaluator_cuts_filters_and_chunks_the_stored_arrays_as_evaluate_lvis(lvis_case, lvis_outputs, monkeypatch):
    """The top ``max_dets`` (tied scores included), the federated filter and the category chunks, done on the
    stored arrays, give exactly what evaluate_lvis gives on the result dicts."""
    import iemask.evaluation.lvis as lvis_module

    gt, _ = lvis_case
    monkeypatch.setattr(lvis_module, "CATEGORY_CHUNK", 2)
    ids = sorted(lvis_outputs)
    flat = [r for i in ids for r in to_coco_results(i, lvis_outputs[i], sorted(FREQUENCY))]
    scores = [r["score"] for r in flat if r["image_id"] == 16]
    assert len(scores) > 300 and len(set(scores)) < len(scores)  # cut at 20 below, among tied scores
    evaluator = LVISEvaluator(gt, max_dets=20)
    evaluator.update(ids[::-1], [lvis_outputs[i] for i in ids[::-1]])
    assert evaluator.compute() == evaluate_lvis(gt, flat, max_dets=20)
    assert evaluator.results == flat


@pytest.mark.parametrize("bad", ["nan score", "unknown category"])
def test_evaluator_names_a_bad_detection_as_evaluate_lvis_does(bad, lvis_case, lvis_outputs):
    gt, _ = lvis_case
    ids = sorted(lvis_outputs)
    outputs, category_ids = dict(lvis_outputs), sorted(FREQUENCY)
    if bad == "nan score":
        outputs[12] = {**outputs[12], "scores": outputs[12]["scores"].clone()}
        outputs[12]["scores"][3] = float("nan")
    else:
        category_ids[-1] = 9  # label 7 becomes a category that gt does not have
    flat = [r for i in ids for r in to_coco_results(i, outputs[i], category_ids)]
    message = {"nan score": r"image_id 12\) has score nan", "unknown category": "category_id 9 is not a category"}[bad]
    with pytest.raises(ValueError, match=message) as expected:
        evaluate_lvis(gt, flat)
    evaluator = LVISEvaluator(gt, category_ids=category_ids)
    evaluator.update(ids, [outputs[i] for i in ids])
    with pytest.raises(ValueError, match=re.escape(str(expected.value))):  # the same result index and words
        evaluator.compute()
    assert gc.isenabled()  # paused while scoring only, also when scoring fails


def test_format_lvis_table():
    metrics = {f"{t}/{m}": 0.5 for t in ("bbox", "segm") for m in LVIS_METRICS}
    metrics["segm/APr"] = -1.0
    metrics["bbox/AP"] = 0.12345
    lines = format_lvis_table(metrics).splitlines()
    assert lines[0] == "| IoU type | AP | AP50 | AP75 | APs | APm | APl | APr | APc | APf |"
    assert lines[1] == "| --- |" + " ---: |" * 9
    assert lines[2] == "| bbox | 12.35 |" + " 50.00 |" * 8
    assert lines[3] == "| segm |" + " 50.00 |" * 6 + " - | 50.00 | 50.00 |"
    assert format_lvis_table(metrics, iou_types="segm").splitlines()[2:] == lines[3:]
    metrics.update({f"bbox/{m}-class{c}": c / 10 for c in (1, 2) for m in ("AP", "AP50")})
    table = format_lvis_table(metrics).split("\n\n")
    assert table[0].splitlines() == lines and len(table) == 2
    assert table[1].splitlines()[0] == "Per-category bbox AP and AP50:"
    assert table[1].splitlines()[3] == "| class1 | 10.00 | 10.00 | class2 | 20.00 | 20.00 |  |  |  |"


# ---- repeat-factor sampling --------------------------------------------------------------------
# 40 images: category 1 in one image (rare), 2 in six (common), 3 in twenty-five (frequent); ten have none.
LONG_TAIL = [{1, 3}, {2, 3}, *[{2}] * 5, *[{3}] * 23, *[set()] * 10]
LONG_TAIL_THRESHOLD = 0.3


def test_repeat_factors_follow_detectron2():
    factors = RepeatFactorTrainingSampler.repeat_factors(LONG_TAIL, LONG_TAIL_THRESHOLD)
    n = len(LONG_TAIL)
    count = Counter(c for cats in LONG_TAIL for c in cats)
    assert (count[1], count[2], count[3]) == (1, 6, 25)
    rare, common = (max(1.0, (LONG_TAIL_THRESHOLD / (count[c] / n)) ** 0.5) for c in (1, 2))
    assert factors[0] == pytest.approx(rare) and factors[2] == pytest.approx(common)  # max over the image's
    assert factors[1] == pytest.approx(common) and factors[10] == 1.0 and factors[-1] == 1.0
    assert rare > common > 1


def test_repeat_factor_sampling_frequencies():
    factors = RepeatFactorTrainingSampler.repeat_factors(LONG_TAIL, LONG_TAIL_THRESHOLD)
    sampler = RepeatFactorTrainingSampler(factors, seed=5)
    assert len(sampler) == round(float(factors.sum()))
    epochs = 1000
    seen = torch.zeros(len(factors))
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == len(sampler)
        seen += torch.bincount(torch.tensor(order), minlength=len(factors))
    mean = seen / epochs
    assert torch.allclose(mean, factors.float(), atol=0.08), (mean, factors)
    assert mean[0] > mean[2] > mean[12] and mean[0] > 2 * mean[12]  # rare > common > frequent only


def test_repeat_factor_shards_partition_each_epoch():
    factors = torch.tensor([1.0, 1.5, 2.2, 1.0, 3.7, 1.0, 1.0])
    world = 3
    samplers = [RepeatFactorTrainingSampler(factors, seed=1, rank=r, world_size=world) for r in range(world)]
    epochs = []
    for epoch in (0, 1, 0):
        for s in samplers:
            s.set_epoch(epoch)
        shards = [list(s) for s in samplers]
        assert all(len(shard) == len(samplers[0]) == 4 for shard in shards)  # ceil(round(11.4) / 3)
        # Position k of the epoch's list goes to rank k % world only: the shards split one list.
        padded = samplers[0].epoch_indices().repeat(2)[: 4 * world].tolist()
        assert [shards[k % world][k // world] for k in range(4 * world)] == padded
        epochs.append(shards)
    assert epochs[0] != epochs[1] and epochs[0] == epochs[2]  # a new draw per epoch, the same for the same epoch
    with pytest.raises(ValueError, match=">= 1"):
        RepeatFactorTrainingSampler([1.0, 0.5])


# ---- the on-disk format ----------------------------------------------------------------------------
FREQUENCY_OF_SHAPE = {1: "r", 2: "c", 3: "f"}  # circle, square, triangle


def _lvis_split(shapes_root: Path, root: Path, split: str, placement) -> None:
    """Rewrite a shapes split as an LVIS file whose images live where ``placement(index)`` says."""
    coco = json.loads((shapes_root / "annotations" / f"instances_{split}.json").read_text())
    images, annotations, new_id = [], [], {}
    for index, image in enumerate(coco["images"]):
        image_id, folder = placement(index)
        new_id[image["id"]] = image_id
        name = f"{image_id:012d}.png"
        shutil.copy(shapes_root / split / image["file_name"], root / folder / name)
        present = sorted({a["category_id"] for a in coco["annotations"] if a["image_id"] == image["id"]})
        images.append(
            {
                "id": image_id,
                "height": image["height"],
                "width": image["width"],
                "coco_url": f"http://images.cocodataset.org/{folder}/{name}",
                "flickr_url": f"http://farm1.staticflickr.com/{name}",
                "license": 1,
                "date_captured": "2013-11-14 17:02:52",
                "neg_category_ids": [c for c in FREQUENCY_OF_SHAPE if c not in present],
                "not_exhaustive_category_ids": present[:1] if index % 3 == 0 else [],
            }
        )
    for ann in coco["annotations"]:  # LVIS annotations carry no iscrowd
        annotations.append({k: v for k, v in ann.items() if k != "iscrowd"} | {"image_id": new_id[ann["image_id"]]})
    categories = [
        {
            **c,
            "synset": f"{c['name']}.n.01",
            "synonyms": [c["name"]],
            "def": f"a {c['name']}",
            "frequency": FREQUENCY_OF_SHAPE[c["id"]],
            "image_count": len({a["image_id"] for a in annotations if a["category_id"] == c["id"]}),
            "instance_count": sum(a["category_id"] == c["id"] for a in annotations),
        }
        for c in coco["categories"]
    ]
    lvis = {"info": {"description": "tiny LVIS-format test data"}, "images": images, "annotations": annotations,
            "categories": categories, "licenses": []}  # fmt: skip
    (root / "annotations" / f"lvis_v1_{split}.json").write_text(json.dumps(lvis))


@pytest.fixture(scope="module")
def lvis_root(shapes_cache, tmp_path_factory) -> Path:
    """LVIS layout built from the tiny shapes data: train images in train2017 (ids 1..16), validation
    images alternately in val2017 and train2017 (ids 1001..1006), as LVIS val mixes both."""
    (shapes_root,) = [p for p in shapes_cache.iterdir() if p.name.startswith("shapes-")]
    root = tmp_path_factory.mktemp("lvis")
    for folder in ("annotations", "train2017", "val2017"):
        (root / folder).mkdir()
    _lvis_split(shapes_root, root, "train", lambda i: (i + 1, "train2017"))
    _lvis_split(shapes_root, root, "val", lambda i: (1001 + i, ("val2017", "train2017")[i % 2]))
    return root


def _copy(root: Path, tmp_path: Path) -> Path:
    target = tmp_path / "lvis"
    shutil.copytree(root, target)
    return target


def test_images_resolve_by_coco_url_across_folders(lvis_root):
    annotation_file = lvis_root / "annotations" / "lvis_v1_val.json"
    raw = json.loads(annotation_file.read_text())
    assert all("file_name" not in image for image in raw["images"])
    ds = LVISInstanceDataset(lvis_root, annotation_file)
    assert ds.ids == list(range(1001, 1007)) and ds.category_ids == [1, 2, 3]
    folders = {ds.images[i]["file_name"].split("/")[0] for i in ds.ids}
    assert folders == {"train2017", "val2017"}
    for index, image_id in enumerate(ds.ids):
        image, target = ds[index]
        folder = ("val2017", "train2017")[index % 2]
        assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
        assert torch.equal(image, read_rgb(lvis_root / folder / f"{image_id:012d}.png"))
        expected = [a for a in raw["annotations"] if a["image_id"] == image_id]
        assert len(target["labels"]) == len(expected) > 0  # no iscrowd field: every annotation is a target
        source = raw["images"][index]
        assert ds.images[image_id]["neg_category_ids"] == source["neg_category_ids"]
        assert ds.images[image_id]["not_exhaustive_category_ids"] == source["not_exhaustive_category_ids"]


def test_missing_image_and_bad_urls_are_named(lvis_root, tmp_path):
    root = _copy(lvis_root, tmp_path)
    annotation_file = root / "annotations" / "lvis_v1_val.json"
    (root / "train2017" / "000000001002.png").unlink()
    ds = LVISInstanceDataset(root, annotation_file)
    with pytest.raises(FileNotFoundError, match=r"train2017/000000001002\.png \(image id 1002 of .*lvis_v1_val"):
        ds[ds.ids.index(1002)]
    data = json.loads(annotation_file.read_text())
    data["images"][0]["coco_url"] = "http://images.cocodataset.org/test2017/000000001001.png"
    annotation_file.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"image id 1001: coco_url .*test2017.* not one of .*'train2017', 'val2017'"):
        LVISInstanceDataset(root, annotation_file)
    del data["images"][0]["coco_url"]
    annotation_file.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"image id 1001: coco_url None does not end in <folder>/<file name>"):
        LVISInstanceDataset(root, annotation_file)
    shutil.rmtree(root / "val2017")
    with pytest.raises(FileNotFoundError, match=r"image folder not found: .*val2017"):
        LVISInstanceDataset(root, root / "annotations" / "lvis_v1_train.json", image_folders={"train2017": "val2017"})


def test_wrong_root_and_wrong_files_are_named(lvis_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"annotations/lvis_v1_train\.json, annotations/lvis_v1_val\.json, "
                                                r"train2017/, val2017/ under it \(set data\.root\)"):  # fmt: skip
        LVISDataModule(tmp_path / "nowhere", num_classes=1203).prepare_data()
    with pytest.raises(FileNotFoundError, match=r"LVIS train annotation file not found: .*lvis_v1_train\.json"):
        LVISDataModule(tmp_path, num_classes=1203).setup("fit")
    with pytest.raises(DatasetError, match=r"lvis_v1_train\.json has 3 categories but data\.num_classes is 1203"):
        LVISDataModule(lvis_root, num_classes=1203, num_workers=0).setup("fit")
    root = _copy(lvis_root, tmp_path)
    annotation_file = root / "annotations" / "lvis_v1_val.json"
    data = json.loads(annotation_file.read_text())
    del data["images"][1]["not_exhaustive_category_ids"]  # e.g. a COCO instances file
    annotation_file.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"image id 1002: no \['not_exhaustive_category_ids'\]; not an LVIS file"):
        LVISInstanceDataset(root, annotation_file)


def test_datamodule_samples_by_repeat_factor_and_builds_the_lvis_evaluator(lvis_root):
    kwargs = dict(num_classes=3, batch_size=2, num_workers=0, train_min_size=[64], max_size=64, pin_memory=False)
    dm = LVISDataModule(lvis_root, repeat_threshold=0.9, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    sampler = dm.train_sampler(rank=0, world_size=1)
    assert isinstance(sampler, RepeatFactorTrainingSampler)
    factors = RepeatFactorTrainingSampler.repeat_factors(dm.train_set.image_category_ids(), 0.9)
    assert (factors > 1).any() and len(sampler) == round(float(factors.sum())) > len(dm.train_set)
    images, targets = next(iter(dm.train_dataloader()))
    assert len(images) == 2 and all(t["masks"].shape[-2:] == i.shape[-2:] for i, t in zip(images, targets, strict=True))
    evaluator = get_protocol(dm.protocol).build_evaluator(dm.val_set)
    assert isinstance(evaluator, LVISEvaluator) and evaluator.category_ids == [1, 2, 3]
    plain = LVISDataModule(lvis_root, repeat_factor_sampling=False, **kwargs)
    plain.setup("fit")
    assert type(plain.train_sampler(rank=0, world_size=1)) is TrainingSampler


# ---- configs and a tiny run ------------------------------------------------------------------------
def test_fast_dev_run_on_lvis(lvis_root, tmp_path):
    """train.py prints the LVIS protocol's table of the LVIS metrics."""
    from iemask.train import train

    # ++: the tiny model keys that only the shapes experiment defines are added here
    tiny = [f"++{o}" if "." in o.split("=")[0] else o for o in TINY_OVERRIDES]
    overrides = [
        "experiment=lvis_r50",
        *tiny,
        f"data.root={lvis_root}",
        "data.num_classes=3",
        "data.train_min_size=[64]",
        "data.train_min_size_sampling=choice",
        "data.test_min_size=64",
        "data.max_size=64",
        "data.batch_size=2",
        "data.eval_batch_size=3",
        "data.pin_memory=false",
        "+trainer.fast_dev_run=1",
    ]
    result = train(compose_config("train", overrides, tmp_path))
    assert set(result["metrics"]) == METRIC_KEYS | SHAPES_CLASS_KEYS
    assert all(-1 <= v <= 1 for v in result["metrics"].values())
    written = json.loads((tmp_path / "metrics.json").read_text()).keys()
    assert written == METRIC_KEYS | SHAPES_CLASS_KEYS | {"train/skipped_images"}
