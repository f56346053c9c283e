"""predict and eval on a tiny trained checkpoint: bad input files are skipped and counted, results are
streamed, nothing processed fails the run, and a checkpoint with other classes than the data is refused."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from conftest import SHAPES_TINY, TINY_OVERRIDES, compose_config
from iemask.classes import ClassMismatchError, check_classes, checkpoint_classes, describe_classes
from iemask.eval import evaluate_checkpoint
from iemask.inference import NothingProcessedError
from iemask.predict import predict
from iemask.train import train

SHAPES = ["circle", "square", "triangle"]
OTHER = [(11, "cat"), (12, "dog"), (13, "bird")]  # same count, other names and ids


@pytest.fixture(scope="module")
def trained(shapes_cache, tmp_path_factory) -> tuple[Path, Path]:
    """A checkpoint after one training step on tiny shapes, and the shapes dataset folder it was trained on."""
    out = tmp_path_factory.mktemp("run")
    steps = ["schedule.max_iters=1", "schedule.eval_period=null", "schedule.warmup_iters=1",
             "schedule.reference_batch_size=2", "schedule.steps=[]"]  # fmt: skip
    result = train(
        compose_config("train", [*TINY_OVERRIDES, *SHAPES_TINY, f"data.cache_dir={shapes_cache}", *steps], out)
    )
    (dataset,) = [p for p in Path(shapes_cache).iterdir() if p.name.startswith("shapes-")]
    return Path(result["best_checkpoint"]), dataset


@pytest.fixture(scope="module")
def other_classes(trained, tmp_path_factory) -> Path:
    """The shapes validation annotations with the categories renamed and renumbered (OTHER)."""
    _, dataset = trained
    data = json.loads((dataset / "annotations" / "instances_val.json").read_text())
    new_id = {old: new for old, (new, _) in zip((1, 2, 3), OTHER, strict=True)}
    data["categories"] = [{"id": i, "name": name, "supercategory": "thing"} for i, name in OTHER]
    for ann in data["annotations"]:
        ann["category_id"] = new_id[ann["category_id"]]
    path = tmp_path_factory.mktemp("other") / "instances_other.json"
    path.write_text(json.dumps(data))
    return path


def predict_config(ckpt: Path, source: Path, out: Path, *extra: str):
    args = [f"ckpt_path={ckpt}", f"input={source}", f"output={out}", "device=cpu", "score_thresh=0.0",
            "test_min_size=64", "max_size=64", *extra]  # fmt: skip
    return compose_config("predict", args, out)


def bad_folder(dataset: Path, folder: Path) -> Path:
    """``folder`` with a text file named .jpg and a truncated PNG in it."""
    folder.mkdir()
    (folder / "notes.jpg").write_text("not an image")
    data = sorted(dataset.glob("val/*.png"))[0].read_bytes()
    (folder / "broken.png").write_bytes(data[: len(data) // 2])
    return folder


def mixed_folder(dataset: Path, folder: Path) -> list[str]:
    """Two good images besides :func:`bad_folder`'s two bad files in ``folder``; returns the good names."""
    bad_folder(dataset, folder)
    good = sorted(dataset.glob("val/*.png"))[:2]
    for path in good:
        shutil.copy(path, folder / path.name)
    return [p.name for p in good]


# ---- predict ------------------------------------------------------------------------------------
def test_predict_skips_unreadable_files_streams_results_and_summarises(trained, tmp_path, caplog):
    ckpt, dataset = trained
    good = mixed_folder(dataset, tmp_path / "in")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        path = predict(predict_config(ckpt, tmp_path / "in", out))
    skipped = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "skipping" in r.getMessage()]
    assert len(skipped) == 2
    assert any("notes.jpg: cannot be read as an image" in m for m in skipped)
    assert any("broken.png: cannot be read as an image" in m for m in skipped)

    assert path == out / "predictions.json"
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [line["file_name"] for line in lines] == good
    results = json.loads(path.read_text())
    assert results == [r for line in lines for r in line["results"]] and results  # score_thresh=0: detections
    assert all(r["category_id"] in (1, 2, 3) and r["file_name"] in good for r in results)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["processed"], summary["skipped"], summary["detections"]) == (2, 2, len(results))
    assert sorted(summary["skipped_files"]) == ["broken.png", "notes.jpg"]
    assert sorted(p.name for p in out.glob("*.png")) == good  # overlays of the good images only
    assert not list(out.glob(".*.tmp"))


def test_predict_fails_when_no_image_can_be_read(trained, tmp_path):
    ckpt, dataset = trained
    bad_folder(dataset, tmp_path / "in")
    out = tmp_path / "out"
    with pytest.raises(NothingProcessedError, match=r"no image of .*in could be processed \(2 file\(s\) skipped"):
        predict(predict_config(ckpt, tmp_path / "in", out))
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["processed"], summary["skipped"]) == (0, 2)
    assert not (out / "predictions.json").exists()


def test_predict_checks_the_categories_it_writes(trained, other_classes, tmp_path):
    ckpt, dataset = trained
    source = sorted(dataset.glob("val/*.png"))[0]
    own = predict(
        predict_config(ckpt, source, tmp_path / "own", f"categories={dataset}/annotations/instances_val.json")
    )
    assert {r["category_id"] for r in json.loads(own.read_text())} <= {1, 2, 3}
    with pytest.raises(
        ClassMismatchError, match=r"3 classes \[circle, square, triangle\] .*3 classes \[cat, dog, bird\]"
    ):
        predict(predict_config(ckpt, source, tmp_path / "refused", f"categories={other_classes}"))
    anyway = predict(
        predict_config(ckpt, source, tmp_path / "anyway", f"categories={other_classes}", "check_classes=false")
    )
    assert {r["category_id"] for r in json.loads(anyway.read_text())} <= {11, 12, 13}


def test_predict_refuses_a_checkpoint_without_class_names(trained, tmp_path, caplog):
    ckpt, dataset = trained
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state["class_names"] = None
    nameless = tmp_path / "nameless.ckpt"
    torch.save(state, nameless)
    source = sorted(dataset.glob("val/*.png"))[0]
    with pytest.raises(ClassMismatchError, match=r"carries no class names .* predicts 3 classes.*check_classes=false"):
        predict(predict_config(nameless, source, tmp_path / "refused"))
    with caplog.at_level(logging.WARNING):
        path = predict(predict_config(nameless, source, tmp_path / "anyway", "check_classes=false"))
    assert any("classes are numbered 1..3" in r.getMessage() for r in caplog.records)
    assert {r["category_id"] for r in json.loads(path.read_text())} <= {1, 2, 3}


# ---- eval ---------------------------------------------------------------------------------------
def eval_config(ckpt: Path, dataset: Path, annotations: Path, out: Path, *extra: str):
    data = ["data=coco", f"data.root={dataset}", "data.val_images=val", f"data.val_annotations={annotations}",
            "data.num_classes=3", "data.test_min_size=64", "data.max_size=64", "data.eval_batch_size=3",
            "data.num_workers=0", "data.pin_memory=false"]  # fmt: skip
    trainer = ["trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]
    return compose_config("eval", [f"ckpt_path={ckpt}", *data, *trainer, *extra], out)


def test_eval_refuses_a_dataset_with_other_classes(trained, other_classes, tmp_path, caplog):
    ckpt, dataset = trained
    with pytest.raises(ClassMismatchError) as refused:
        evaluate_checkpoint(eval_config(ckpt, dataset, other_classes, tmp_path / "refused"))
    message = str(refused.value)
    assert "3 classes [circle, square, triangle]" in message and "3 classes [cat, dog, bird]" in message
    assert str(ckpt) in message and str(other_classes) in message and "check_classes=false" in message
    assert not (tmp_path / "refused" / "metrics.json").exists()

    with caplog.at_level(logging.WARNING):
        metrics = evaluate_checkpoint(
            eval_config(ckpt, dataset, other_classes, tmp_path / "anyway", "check_classes=false")
        )
    assert metrics and all(-1 <= v <= 1 for v in metrics.values())
    assert any("running anyway because check_classes=false" in r.getMessage() for r in caplog.records)
    results = json.loads((tmp_path / "anyway" / "instances_results.json").read_text())
    assert {r["category_id"] for r in results} <= {11, 12, 13}


# ---- the comparison itself ----------------------------------------------------------------------
def test_class_lists_are_abbreviated_and_counts_must_match_even_when_overridden():
    coco = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train"]
    assert describe_classes(SHAPES) == "3 classes [circle, square, triangle]"
    assert describe_classes(coco) == "7 classes [person, bicycle, car, motorcycle, airplane, ...]"
    with pytest.raises(
        ClassMismatchError,
        match=r"a.ckpt was trained on 3 classes \[circle, square, triangle\] but coco.json has 7 classes "
        r"\[person, bicycle, car, motorcycle, airplane, \.\.\.\]; its model predicts 3 classes.*cannot help",
    ):
        check_classes(3, SHAPES, [1, 2, 3], coco, list(range(1, 8)), checkpoint="a.ckpt", dataset="coco.json",
                      enforce=False)  # fmt: skip
    with pytest.raises(ClassMismatchError, match=r"same names, other category ids: \[1, 2, 3\] vs \[4, 5, 6\]"):
        check_classes(3, SHAPES, [1, 2, 3], SHAPES, [4, 5, 6], checkpoint="a.ckpt", dataset="b.json")
    check_classes(3, SHAPES, None, SHAPES, [4, 5, 6], checkpoint="a.ckpt", dataset="b.json")  # no ids saved: names
    assert checkpoint_classes(3, SHAPES, None, checkpoint="a.ckpt") == (SHAPES, [1, 2, 3])
    assert checkpoint_classes(3, coco, None, checkpoint="a.ckpt", enforce=False) == (None, [1, 2, 3])
