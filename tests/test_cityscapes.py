"""Cityscapes on a tiny generated dataset in the official layout: labels, loading, the instance protocol
against the official ``cityscapesscripts`` evaluation, the export format, the streaming evaluator, training."""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cityscapesscripts.helpers.annotation import Annotation
from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
from PIL import Image

from conftest import free_port
from iemask.data.cityscapes import (
    CLASS_LABEL_IDS,
    CLASS_NAMES,
    LABELS,
    CityscapesDataModule,
    CityscapesInstanceDataset,
    find_images,
    read_instance_ids,
)
from iemask.evaluation import evaluate
from iemask.evaluation.cityscapes import (
    CITYSCAPES_METRICS,
    VOID_LABEL_IDS,
    CityscapesEvaluator,
    evaluate_cityscapes,
    format_cityscapes_table,
    read_predictions,
)

# conftest (the models) is imported inside the tests that use it: the two-rank test's spawned workers import
# this module, and that import would add to their start-up time.
H, W = 64, 128
CITIES = {"train": ("aachen", "bochum"), "val": ("frankfurt", "lindau")}
IMAGES_PER_CITY = 3
# "train" never appears (its AP is undefined: -1); "bus" is never predicted (AP 0).
SCENE_CLASSES = ("person", "rider", "car", "truck", "bus", "motorcycle", "bicycle")
PREDICTED_IDS = tuple(i for i in CLASS_LABEL_IDS if i != 28)
EMPTY_TRAIN_STEM = "aachen_000002_000019"  # only stuff and a group region: skipped in training


def rect(x0: int, y0: int, x1: int, y1: int) -> list[list[int]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def scene(rng: np.random.Generator, with_instances: bool) -> list[dict]:
    """Stuff, instances of several classes (some overlapping), groups, a tiny car, void and ignored labels."""
    x, y = (int(v) for v in rng.integers(0, 60, 2))
    objects = [
        {"label": "sky", "polygon": rect(0, 0, W - 1, 14)},
        {"label": "road", "polygon": rect(0, 40, W - 1, H - 1)},  # rows 15..39 stay "unlabeled" (void)
        {"label": "cargroup", "polygon": rect(x, y // 2, x + 25, y // 2 + 15)},
    ]
    if with_instances:
        for name in [*rng.choice(SCENE_CLASSES, 4), "bus"]:
            x0, y0 = int(rng.integers(0, W - 40)), int(rng.integers(0, H - 30))
            w, h = int(rng.integers(14, 40)), int(rng.integers(12, 30))
            triangle = [[x0, y0 + h], [x0 + w // 2, y0], [x0 + w, y0 + h]]
            objects.append({"label": str(name), "polygon": rect(x0, y0, x0 + w, y0 + h) if x0 % 3 else triangle})
        x, y = int(rng.integers(0, W - 8)), int(rng.integers(0, H - 8))
        objects += [
            {"label": "car", "polygon": rect(x, y, x + 5, y + 6)},  # 42 px: below the 100 px minimum
            {"label": "caravan", "polygon": rect(110, 20, 127, 35)},  # an instance class the protocol ignores
            {"label": "person", "polygon": rect(5, 5, 30, 30), "deleted": 1},
        ]
    objects += [
        {"label": "persongroup", "polygon": [[110, 50], [115, 40], [120, 50]]},
        {"label": "license plate", "polygon": rect(40, 45, 50, 50)},  # id -1: not drawn
        {"label": "ego vehicle", "polygon": rect(0, H - 3, W - 1, H - 1)},  # void
    ]
    return objects


def write_dataset(root: Path, seed: int = 0) -> None:
    """The official layout; instanceIds.png drawn by the official json2instanceImg's ``createInstanceImage``
    and saved as 16-bit PNG like the released files (Pillow 13 no longer writes its 32-bit "I" images)."""
    rng = np.random.default_rng(seed)
    for split, cities in CITIES.items():
        for city in cities:
            for frame in range(IMAGES_PER_CITY):
                stem = f"{city}_{frame:06d}_000019"
                image_dir, gt_dir = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
                image_dir.mkdir(parents=True, exist_ok=True)
                gt_dir.mkdir(parents=True, exist_ok=True)
                objects = scene(rng, with_instances=stem != EMPTY_TRAIN_STEM)
                json_file = gt_dir / f"{stem}_gtFine_polygons.json"
                json_file.write_text(json.dumps({"imgHeight": H, "imgWidth": W, "objects": objects}))
                annotation = Annotation()
                annotation.fromJsonFile(str(json_file))
                ids = np.asarray(createInstanceImage(annotation, "ids"), dtype=np.uint16)
                Image.fromarray(ids).save(gt_dir / f"{stem}_gtFine_instanceIds.png")
                pixels = rng.integers(0, 60, (H, W, 3), dtype=np.uint8) + (ids[..., None] % 7 * 25).astype(np.uint8)
                Image.fromarray(pixels).save(image_dir / f"{stem}_leftImg8bit.png")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cityscapes")
    write_dataset(root)
    return root


def val_gt(root: Path) -> dict[str, np.ndarray]:
    files = sorted((root / "gtFine" / "val").glob("*/*_gtFine_instanceIds.png"))
    return {p.name[: -len("_gtFine_instanceIds.png")]: read_instance_ids(p) for p in files}


def random_predictions(instance_ids: np.ndarray, rng: np.random.Generator) -> list[tuple[int, float, np.ndarray]]:
    """Shifted copies of the regions (IoU across the thresholds), duplicates, wrong classes, hits on groups,
    small instances and caravans, boxes anywhere (some on void), an empty mask; scores on a grid (ties)."""

    def score() -> float:
        return float(rng.choice(np.linspace(0.05, 1.0, 20)))

    predictions = []
    for value in np.unique(instance_ids).tolist():
        label_id = value if value < 1000 else value // 1000
        if label_id < 24 or label_id == 28:
            continue
        for _ in range(int(rng.integers(0, 3))):  # missed, found, or found twice
            shift = tuple(int(s) for s in rng.choice([-2, -1, 0, 0, 0, 1, 3], 2))
            mask = np.roll(instance_ids == value, shift, axis=(0, 1))
            predicted = label_id if rng.random() > 0.15 or label_id == 29 else int(rng.choice(PREDICTED_IDS))
            predictions.append((predicted, score(), mask))
    for _ in range(4):
        mask = np.zeros((H, W), dtype=bool)
        x, y = int(rng.integers(0, W - 20)), int(rng.integers(0, H - 10))
        mask[y : y + int(rng.integers(3, 12)), x : x + int(rng.integers(3, 20))] = True
        predictions.append((int(rng.choice(PREDICTED_IDS)), score(), mask))
    predictions.append((26, 0.5, np.zeros((H, W), dtype=bool)))
    return predictions


@pytest.fixture(scope="module")
def predictions(root) -> dict[str, list[tuple[int, float, np.ndarray]]]:
    rng = np.random.default_rng(1)
    return {stem: random_predictions(ids, rng) for stem, ids in val_gt(root).items()}


def write_official(predictions: dict[str, list], folder: Path) -> Path:
    """The official result format, written independently of the code under test."""
    (folder / "masks").mkdir(parents=True)
    for stem, preds in predictions.items():
        lines = []
        for i, (label_id, score, mask) in enumerate(preds):
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / f"{stem}_{i}.png")
            lines.append(f"masks/{stem}_{i}.png {label_id} {score}\n")
        (folder / f"{stem}_pred.txt").write_text("".join(lines))
    return folder


def official_metrics(root: Path, results: Path, monkeypatch) -> dict[str, float]:
    """``evalInstanceLevelSemanticLabeling`` run in-process, its NaN as -1 (the project's convention)."""
    from cityscapesscripts.evaluation import evalInstanceLevelSemanticLabeling as official

    monkeypatch.setattr(np, "in1d", np.isin, raising=False)  # gone in numpy 2.4; the script still calls it
    # Its debug dump of all matches ("matches.json" in the cwd) fails on numpy scalars; no file is needed.
    monkeypatch.setattr(official, "writeDict2JSON", lambda *args: None)
    settings = {
        "cityscapesPath": str(root),
        "groundTruthSearch": str(root / "gtFine" / "val" / "*" / "*_gtFine_instanceIds.png"),
        "gtInstancesFile": str(results / "no-gt-cache.json"),
        "predictionPath": os.path.abspath(results),
        "predictionWalk": None,
        "JSONOutput": False,
        "quiet": True,
    }
    for name, value in settings.items():
        monkeypatch.setattr(official.args, name, value)
    gt_files = sorted(glob.glob(official.args.groundTruthSearch))
    prediction_files = [official.getPrediction(gt, official.args) for gt in gt_files]
    averages = official.evaluateImgLists(prediction_files, gt_files, official.args)["averages"]
    metrics = {"segm/AP": averages["allAp"], "segm/AP50": averages["allAp50%"]}
    for name, values in averages["classes"].items():
        metrics[f"segm/AP-{name}"], metrics[f"segm/AP50-{name}"] = values["ap"], values["ap50%"]
    return {k: -1.0 if np.isnan(v) else float(v) for k, v in metrics.items()}


def max_difference(a: dict[str, float], b: dict[str, float]) -> float:
    assert a.keys() == b.keys()
    return max(abs(a[k] - b[k]) for k in a)


# ---- labels and ground truth ---------------------------------------------------------------------
def test_label_table_matches_cityscapesscripts():
    from cityscapesscripts.helpers import labels as official

    ours = [(label.name, label.id, label.has_instances, label.ignore_in_eval) for label in LABELS]
    assert ours == [(label.name, label.id, label.hasInstances, label.ignoreInEval) for label in official.labels]
    assert CLASS_NAMES == ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
    assert CLASS_LABEL_IDS == (24, 25, 26, 27, 28, 31, 32, 33)
    assert set(VOID_LABEL_IDS) == {label.id for label in official.labels if label.ignoreInEval}


def test_polygons_are_rasterised_as_the_official_json2instanceImg(root):
    for json_file in sorted(root.glob("gtFine/*/*/*_gtFine_polygons.json")):
        png = json_file.with_name(json_file.name.replace("polygons.json", "instanceIds.png"))
        np.testing.assert_array_equal(read_instance_ids(json_file), read_instance_ids(png))


# ---- loading -------------------------------------------------------------------------------------
def test_dataset_items_hold_the_instances_of_the_eight_classes(root):
    dataset = CityscapesInstanceDataset(root, "train", train=True)
    all_stems = sorted(f"{c}_{f:06d}_000019" for c in CITIES["train"] for f in range(IMAGES_PER_CITY))
    assert [dataset.images[i].stem for i in sorted(dataset.images)] == all_stems  # ids: sorted stems
    assert EMPTY_TRAIN_STEM not in [dataset.images[i].stem for i in dataset.ids] and len(dataset) == 5
    assert dataset.category_ids == list(CLASS_LABEL_IDS) and dataset.class_names == list(CLASS_NAMES)
    assert dataset.aspect_ratios() == [2.0] * 5
    info = dataset.images[0]
    assert info.city == "aachen" and info.stem == "aachen_000000_000019"
    assert info.image_file == root / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    assert info.gt_file == root / "gtFine/train/aachen/aachen_000000_000019_gtFine_instanceIds.png"
    seen_small = False
    for index, image_id in enumerate(dataset.ids):
        image, target = dataset[index]
        ids = read_instance_ids(dataset.images[image_id].gt_file)
        assert image.shape == (3, H, W) and image.dtype == torch.uint8 and target["image_id"] == image_id
        expected = [v for v in np.unique(ids).tolist() if v >= 1000 and v // 1000 in CLASS_LABEL_IDS]
        assert len(target["masks"]) == len(expected) > 0  # groups, caravans, stuff and void are no targets
        for mask, label, box, value in zip(target["masks"], target["labels"], target["boxes"], expected, strict=True):
            np.testing.assert_array_equal(mask.numpy(), ids == value)
            assert CLASS_LABEL_IDS[label - 1] == value // 1000
            ys, xs = np.nonzero(ids == value)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            seen_small |= (ids == value).sum() < 100
    assert seen_small  # instances under 100 px are still trained on, as in Detectron2
    assert len(CityscapesInstanceDataset(root, "val")) == 6  # evaluation keeps every image


def test_polygons_alone_load_the_same_targets(root, tmp_path):
    copy = tmp_path / "cityscapes"
    shutil.copytree(root, copy)
    for png in copy.glob("gtFine/train/*/*_instanceIds.png"):
        png.unlink()
    from_json = CityscapesInstanceDataset(copy, "train", train=True)
    from_png = CityscapesInstanceDataset(root, "train", train=True)
    assert from_json.ids == from_png.ids and from_json.images[0].gt_file.suffix == ".json"
    for index in range(len(from_png)):
        a, b = from_png[index][1], from_json[index][1]
        assert torch.equal(a["masks"], b["masks"]) and torch.equal(a["labels"], b["labels"])


def test_a_wrong_root_or_a_missing_ground_truth_file_is_named(root, tmp_path):
    module = CityscapesDataModule(tmp_path / "nowhere", num_classes=8)
    with pytest.raises(FileNotFoundError, match=r"lacks leftImg8bit/ and gtFine/.*_gtFine_instanceIds\.png"):
        module.prepare_data()
    with pytest.raises(
        FileNotFoundError,
        match=r"not found: .*leftImg8bit/test\. Expected leftImg8bit/test/<city>/<stem>_leftImg8bit\.png",
    ):
        find_images(root, "test")
    copy = tmp_path / "cityscapes"
    shutil.copytree(root, copy)
    for gt in copy.glob("gtFine/val/lindau/lindau_000001_000019_*"):
        gt.unlink()
    with pytest.raises(FileNotFoundError, match=r"lindau_000001_000019_gtFine_instanceIds\.png or .*polygons\.json"):
        CityscapesInstanceDataset(copy, "val")


# ---- the protocol --------------------------------------------------------------------------------
def test_protocol_equals_the_official_script(root, predictions, tmp_path, monkeypatch):
    results = write_official(predictions, tmp_path / "results")
    ours = evaluate_cityscapes(root, results)
    official = official_metrics(root, results, monkeypatch)
    assert list(ours) == list(CITYSCAPES_METRICS)
    assert max_difference(ours, official) < 1e-4
    assert ours["segm/AP-train"] == ours["segm/AP50-train"] == -1.0  # no ground truth
    assert ours["segm/AP-bus"] == 0.0  # ground truth, never predicted
    assert 0.1 < ours["segm/AP"] < ours["segm/AP50"] < 1.0  # a case that is neither trivial nor perfect
    assert evaluate(gt=root, results=results, protocol="cityscapes") == ours


def test_protocol_rejects_bad_input(root, predictions, tmp_path):
    results = write_official(predictions, tmp_path / "results")
    with pytest.raises(ValueError, match="must include 'segm'"):
        evaluate_cityscapes(root, results, iou_types=("bbox",))
    assert evaluate_cityscapes(root, results, iou_types=("bbox", "segm")) == evaluate_cityscapes(root, results)
    (results / "lindau_000001_000019_pred.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"no prediction file lindau_000001_000019\*\.txt"):
        evaluate_cityscapes(root, results)
    (results / "lindau_000001_000019_pred.txt").write_text("masks/x.png 26\n")
    with pytest.raises(ValueError, match=r"lindau_000001_000019_pred\.txt, line 1: expected"):
        evaluate_cityscapes(root, results)
    with pytest.raises(FileNotFoundError, match="ground truth folder not found"):
        evaluate_cityscapes(tmp_path / "nowhere", results)


def model_outputs(predictions: list[tuple[int, float, np.ndarray]]) -> dict[str, torch.Tensor]:
    """torchvision Mask R-CNN eval output for the predictions of the eight classes."""
    kept = [p for p in predictions if p[0] in CLASS_LABEL_IDS]
    masks = torch.from_numpy(np.stack([m for _, _, m in kept])).float()[:, None]
    return {
        "boxes": torch.zeros(len(kept), 4),
        "labels": torch.tensor([CLASS_LABEL_IDS.index(label) + 1 for label, _, _ in kept]),
        "scores": torch.tensor([s for _, s, _ in kept], dtype=torch.float32),
        "masks": masks * 0.8 + 0.1,  # probabilities; > 0.5 exactly on the mask
    }


def test_evaluator_exports_the_official_format_and_scores_it_as_the_official_script(
    root, predictions, tmp_path, monkeypatch
):
    dataset = CityscapesInstanceDataset(root, "val")
    evaluator = CityscapesEvaluator(dataset.gt_files(), label_ids=dataset.category_ids)
    stems = {image_id: info.stem for image_id, info in dataset.images.items()}
    outputs = {image_id: model_outputs(predictions[stem]) for image_id, stem in stems.items()}
    evaluator.update([0, 1], [outputs[0], outputs[1]])
    evaluator.update([2, 0], [outputs[2], {k: v[:0] for k, v in outputs[0].items()}])  # image 0 again: skipped
    evaluator.update([torch.tensor(3), 4, 5], [outputs[3], outputs[4], outputs[5]])
    metrics = evaluator.compute()
    assert evaluator.num_images == 6 and len(evaluator.results) == sum(len(o["labels"]) for o in outputs.values())
    json.dumps(evaluator.results)  # what `python -m iemask.eval` saves

    export = tmp_path / "export"
    evaluator.write_results(export)
    for image_id, stem in stems.items():  # round trip: masks, label ids and scores come back exactly
        read = list(read_predictions(export / f"{stem}_pred.txt"))
        out = outputs[image_id]
        assert [label for label, _, _ in read] == [CLASS_LABEL_IDS[k - 1] for k in out["labels"].tolist()]
        assert [score for _, score, _ in read] == out["scores"].tolist()
        for (_, _, mask), probabilities in zip(read, out["masks"], strict=True):
            np.testing.assert_array_equal(mask, probabilities[0].numpy() > 0.5)
    assert metrics == evaluate_cityscapes(root, export)
    official = official_metrics(root, export, monkeypatch)
    assert max_difference(metrics, official) < 1e-4

    evaluator.reset()
    evaluator.update([2], [outputs[2]])
    assert evaluator.compute()["segm/AP"] < metrics["segm/AP"]  # still scored over every image
    assert evaluator.num_images == 1
    with pytest.raises(ValueError, match="image id 99"):
        evaluator.update([99], [outputs[2]])


def test_format_cityscapes_table():
    metrics = dict.fromkeys(CITYSCAPES_METRICS, 0.5) | {"segm/AP": 0.12345, "segm/AP-train": -1.0}
    lines = format_cityscapes_table(metrics).splitlines()
    assert lines[0] == "| metric | mean | person | rider | car | truck | bus | train | motorcycle | bicycle |"
    assert lines[1] == "| --- |" + " ---: |" * 9
    assert lines[2] == "| AP | 12.35 | 50.00 | 50.00 | 50.00 | 50.00 | 50.00 | - | 50.00 | 50.00 |"
    assert lines[3] == "| AP50 |" + " 50.00 |" * 9


def _gather_worker(rank: int, port: int, gt_files: dict, shards: list[dict], out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        evaluator = CityscapesEvaluator(gt_files)
        evaluator.update(list(shards[rank]), list(shards[rank].values()))
        metrics = evaluator.compute()
        summary = {"metrics": metrics, "num_images": evaluator.num_images, "results": len(evaluator.results)}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(summary))
    finally:
        dist.destroy_process_group()


def test_distributed_gather_two_ranks(root, predictions, tmp_path):
    dataset = CityscapesInstanceDataset(root, "val")
    outputs = {i: model_outputs(predictions[info.stem]) for i, info in dataset.images.items()}
    shards = [{i: outputs[i] for i in (0, 1, 2)}, {i: outputs[i] for i in (3, 4, 5, 0)}]  # image 0 twice
    mp.spawn(_gather_worker, args=(free_port(), dataset.gt_files(), shards, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    single = CityscapesEvaluator(dataset.gt_files())
    single.update(list(outputs), list(outputs.values()))
    assert ranks[0]["metrics"] == ranks[1]["metrics"] and ranks[0]["num_images"] == ranks[1]["num_images"] == 6
    assert ranks[0]["results"] == sum(len(o["labels"]) for o in outputs.values()) and ranks[1]["results"] == 0
    assert ranks[0]["metrics"] == pytest.approx(single.compute(), abs=1e-12)


# ---- configuration and training ------------------------------------------------------------------
def test_the_experiment_has_the_papers_settings(tmp_path):
    from conftest import compose_config

    cfg = compose_config("train", ["experiment=cityscapes_r50"], tmp_path)
    assert cfg.data._target_ == "iemask.data.cityscapes.CityscapesDataModule" and cfg.data.num_classes == 8
    assert cfg.model.num_classes == 8 and cfg.model.backbone == "resnet50" and cfg.model.cem
    assert list(cfg.data.train_min_size) == [800, 1024] and cfg.data.train_min_size_sampling == "range"
    assert (cfg.model.min_size, cfg.model.max_size) == (1024, 2048)
    assert (cfg.model.box_detections_per_img, cfg.model.box_score_thresh) == (100, 0.05)
    s = cfg.schedule
    assert (s.reference_batch_size, s.base_lr, s.max_iters, list(s.steps)) == (2, 0.01, 160000, [140000])


def test_fast_dev_run_trains_and_evaluates(root, tmp_path):
    from conftest import TINY_OVERRIDES, compose_config
    from iemask.train import train

    # The shapes experiment defines the RPN and box-head keys that TINY_OVERRIDES set; here they are added.
    tiny = [f"++{o}" if o.startswith("model.") else o for o in TINY_OVERRIDES]
    overrides = [
        "experiment=cityscapes_r50",
        *tiny,
        f"data.root={root}",
        "data.train_min_size=[64,64]",
        "data.test_min_size=64",
        "data.max_size=128",
        "data.eval_batch_size=2",
        "data.pin_memory=false",
        "+trainer.fast_dev_run=1",
    ]
    result = train(compose_config("train", overrides, tmp_path))
    assert set(result["metrics"]) == set(CITYSCAPES_METRICS) and "segm/AP" in result["metrics"]
    assert all(-1 <= v <= 1 for v in result["metrics"].values())
    assert json.loads((tmp_path / "metrics.json").read_text()).keys() == {*CITYSCAPES_METRICS, "train/skipped_images"}
