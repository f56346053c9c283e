"""Own data in one line: ``data=coco data.root=...`` reads its classes from the json, ``experiment=custom_r50``
is a real-photo setup, and what a run really composed or scaled is recorded and said loudly."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from hydra.utils import instantiate

from conftest import SHARED_DATA, TINY_OVERRIDES, compose_config
from iemask.data.base import DatasetError
from iemask.data.coco import COCODataModule
from iemask.data.transforms import train_short_sides
from iemask.train import experiment_data, log_schedule_scaling, train
from iemask.training.optim import Schedule

SHAPES_FILES = {  # the generated shapes dataset is COCO format with its own file names
    "train_images": "train",
    "train_annotations": "annotations/instances_train.json",
    "val_images": "val",
    "val_annotations": "annotations/instances_val.json",
}


@pytest.fixture
def own_data(shapes_cache, tmp_path):
    """A COCO-format folder with 3 categories and non-COCO file names (a copy of the tiny shapes dataset)."""
    (source,) = [p for p in shapes_cache.iterdir() if p.name.startswith("shapes-")]
    return shutil.copytree(source, tmp_path / "own")


def test_num_classes_is_read_from_the_training_json(own_data):
    dm = COCODataModule(own_data, **SHAPES_FILES, num_workers=0)
    assert dm.num_classes is None
    dm.setup("fit")
    assert dm.num_classes == 3 == len(dm.class_names)


def test_a_set_num_classes_that_the_json_contradicts_is_named_with_the_file(own_data):
    dm = COCODataModule(own_data, **SHAPES_FILES, num_classes=80, num_workers=0)
    with pytest.raises(DatasetError) as error:
        dm.setup("fit")
    message = str(error.value)
    assert "data.num_classes is 80" in message and "instances_train.json has 3 categories" in message
    assert "data.num_classes=3" in message and "data.num_classes=null" in message


@pytest.mark.skipif(not (SHARED_DATA / "tiny_coco").is_dir(), reason=f"no real COCO data at {SHARED_DATA}/tiny_coco")
def test_real_coco_classes_are_read_from_its_json():
    dm = COCODataModule(SHARED_DATA / "tiny_coco", num_workers=0)
    dm.setup("fit")
    assert dm.num_classes == 80


def test_range_sampling_with_one_size_names_both_keys_and_the_fix():
    with pytest.raises(ValueError) as error:
        train_short_sides([320], "range")
    message = str(error.value)
    assert "data.train_min_size=[320]" in message and "data.train_min_size_sampling=range" in message
    assert "[low, high]" in message and "data.train_min_size_sampling=choice" in message


def test_custom_r50_is_a_real_photo_setup_not_the_shapes_one(tmp_path):
    cfg = compose_config("train", ["experiment=custom_r50", "data.root=/datasets/own"], tmp_path)
    assert cfg.data._target_ == "iemask.data.coco.COCODataModule" and cfg.data.num_classes is None
    assert cfg.model.backbone == "resnet50" and cfg.model.backbone_weights == "IMAGENET1K_V1"
    assert cfg.model.neck_channels == 256 and cfg.trainer.accelerator == "gpu"
    assert (cfg.schedule.base_lr, cfg.schedule.reference_batch_size) == (0.0025, 2)
    assert list(cfg.data.train_min_size) == [640, 800]
    without_root = instantiate(compose_config("train", ["experiment=custom_r50"], tmp_path).data)
    with pytest.raises(FileNotFoundError, match=r"set data\.root"):
        without_root.prepare_data()


def test_experiments_name_the_data_they_are_made_for():
    assert experiment_data("shapes") == "shapes" and experiment_data("custom_r50") == "coco"
    assert experiment_data("coco_r101") == "coco"  # through coco_r50, which it extends
    assert experiment_data("no_such_experiment") is None


def test_a_scaled_schedule_is_said_at_warning_with_the_way_out(caplog):
    requested = Schedule(base_lr=0.0025, max_iters=80, steps=(40,), warmup_iters=8, reference_batch_size=2)
    with caplog.at_level(logging.WARNING, logger="iemask.train"):
        log_schedule_scaling(requested, requested, 80)
        assert not caplog.records  # run as written: nothing to say
        log_schedule_scaling(requested, requested.scaled(8), 20)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert message.startswith("schedule.max_iters=80 at reference batch 2 runs as 20 iterations at batch 8")
    assert "lr 0.0025 -> 0.01" in message and "steps [40] -> [10]" in message
    assert "set trainer.max_steps for a literal cap or module.scale_schedule=false" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="iemask.train"):
        log_schedule_scaling(requested, requested.scaled(8), 3)
    assert "trainer.max_steps=3 caps the run" in caplog.records[0].getMessage()


def test_own_data_in_one_line_with_the_shapes_experiment_warns_and_records_what_ran(own_data, tmp_path, caplog):
    overrides = [
        *TINY_OVERRIDES,
        "experiment=shapes",
        "data=coco",
        f"data.root={own_data}",
        *(f"data.{key}={value}" for key, value in SHAPES_FILES.items()),
        "data.train_min_size=[48,64]",
        "data.test_min_size=64",
        "data.max_size=64",
        "data.batch_size=2",
        "data.eval_batch_size=3",
        "trainer.max_steps=2",
    ]
    cfg = compose_config("train", overrides, tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="iemask.train"):
        result = train(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.name == "iemask.train"]
    assert any("experiment=shapes is made for data=shapes but runs with data=coco" in w for w in warnings)
    assert any(w.startswith("schedule.max_iters=400 at reference batch 8 runs as 1600 iterations") for w in warnings)
    assert result["step"] == 2 and "segm/AP" in result["metrics"]
    assert cfg.data.num_classes == 3 and cfg.model.num_classes == 3  # read from the json, given to the model
    summary = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (summary["experiment"], summary["data"], summary["variant"]) == ("shapes", "coco", "paper")
