"""Typed configs: schemas made from signatures reject unknown keys and wrong types when composed."""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import compose_config
from iemask.evaluation import get_protocol
from iemask.models import build_model, switch_values
from iemask.schemas import config_type, make_schema, schemas
from iemask.utils.config import CONFIG_DIR


def test_annotations_map_to_what_omegaconf_checks():
    assert config_type(int) is int and config_type(Path) is str
    assert config_type(int | None) == Optional[int]  # noqa: UP045 (what OmegaConf takes)
    assert config_type(Sequence[int] | None) == Optional[list[int]]  # noqa: UP045
    assert config_type(tuple[str, ...]) == list[str]
    assert config_type(Mapping[str, Any]) is Any
    assert config_type(str | Path) is str
    assert config_type(typing.Callable) is Any


def test_a_schema_has_a_field_per_parameter_with_its_default():
    def source(a: int, b: float = 0.5, c: Sequence[int] = (1, 2), *args: Any, _private: int = 0, **kw: Any):
        """Something configurable."""

    config = OmegaConf.structured(make_schema("SourceConfig", [source], target="x.source"))
    assert OmegaConf.to_container(config) == {"_target_": "x.source", "a": "???", "b": 0.5, "c": [1, 2]}
    with pytest.raises(Exception, match="could not be converted"):
        config.b = "half"


def test_the_model_schema_is_build_model_with_torchvision_keywords():
    model = OmegaConf.structured(schemas()[("model", "schema")])
    assert model._target_ == "iemask.models.build_model"
    assert model.neck_channels == 256 and model.cem is True and model.rpn_post_nms_top_n_test == 1000
    assert "rpn_anchor_generator" not in model and "box_head" not in model  # objects, not settings
    assert model.image_mean is None and model.bbox_reg_weights is None  # settings: typed by build_model
    built = build_model(**{k: v for k, v in OmegaConf.to_container(model).items() if k != "_target_"})
    assert built.rpn._post_nms_top_n["testing"] == 1000
    assert built.transform.image_mean == [0.485, 0.456, 0.406]  # torchvision's default kept
    custom = build_model(3, "resnet18", image_mean=[0.5, 0.5, 0.5], bbox_reg_weights=[1, 1, 1, 1])
    assert custom.transform.image_mean == [0.5, 0.5, 0.5] and custom.roi_heads.box_coder.weights == (1, 1, 1, 1)


@pytest.mark.parametrize(
    ("override", "message"),
    [("model.neck_chanels=64", "neck_chanels"), ("model.neck_channels=wide", "model.neck_channels")],
)
def test_unknown_keys_and_wrong_types_fail_when_composed(override, message, tmp_path):
    with pytest.raises(ConfigCompositionException) as error:
        compose_config("train", [override], tmp_path)
    assert message in f"{error.value} {error.value.__cause__}"


@pytest.mark.parametrize(("child", "parent"), [("coco_r101", "coco_r50"), ("lvis_x101", "lvis_r50")])
def test_experiments_inherit_and_differ_only_in_the_backbone(child, parent, tmp_path):
    def job(experiment: str) -> dict:
        cfg = compose_config("train", [f"experiment={experiment}"], tmp_path)
        return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)

    a, b = job(child), job(parent)
    assert a["model"].pop("backbone") != b["model"].pop("backbone")
    assert a["module"]["model"].pop("backbone") != b["module"]["model"].pop("backbone")
    assert a == b


def test_every_data_module_has_a_schema_and_its_values_reach_the_object(tmp_path):
    from hydra.utils import instantiate

    from iemask.data.shapes import ShapesDataModule, ShapesSpec
    from iemask.schemas import data_module_classes

    names = {cls.__name__ for cls in data_module_classes()}
    assert {"COCODataModule", "LVISDataModule", "CityscapesDataModule", "ShapesDataModule"} <= names
    assert {name for group, name in schemas() if group == "data"} == names
    assert all(get_protocol(cls.protocol).name == cls.protocol for cls in data_module_classes())
    cfg = compose_config("train", ["data.spec.num_train=5", "data.batch_size=3"], tmp_path)
    dm = instantiate(cfg.data)
    assert isinstance(dm, ShapesDataModule) and dm.batch_size == 3 and dm.num_workers == 1
    assert dm.spec == ShapesSpec(num_train=5)  # the schema's spec defaults are ShapesSpec's


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.batch_sise=4", "batch_sise"),
        ("data.batch_size=four", "data.batch_size"),
        ("data.spec.seed=x", "seed"),
        ("schedule.max_iters=many", "schedule.max_iters"),
        ("schedule.warmup=10", "warmup"),
        ("optimizer.momentm=0.5", "momentm"),
        ("module.compile_dynamic=sometimes", "module.compile_dynamic"),
        ("module.init_form=x.pth", "init_form"),
    ],
)
def test_data_module_and_training_keys_are_checked_when_composed(override, message, tmp_path):
    with pytest.raises(ConfigCompositionException) as error:
        compose_config("train", [override], tmp_path)
    assert message in f"{error.value} {error.value.__cause__}"


EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
DEPTHS = {"resnet18": 2, "resnet50": 6, "resnet101": 23, "resnext101_32x8d": 23}  # ResNet stage-4 blocks
# What each experiment's comment promises for 8 devices (images per step -> iterations, LR).
SCALED = {
    "coco": (16, 90000, 0.02),
    "lvis": (16, 180000, 0.02),
    "cityscapes": (8, 40000, 0.04),
    "custom": (8, 22500, 0.01),
}
# What an experiment leaves to the command line (custom_r50: the root; its classes come from the json, as
# iemask.train reads them once the data module is set up).
GIVEN = {"custom_r50": ["data.root=/datasets/own", "data.num_classes=5"]}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_its_values_reach_the_objects(experiment, tmp_path):
    from hydra.utils import instantiate

    cfg = compose_config("train", [f"experiment={experiment}", *GIVEN.get(experiment, [])], tmp_path)
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.to_container(job, resolve=True, throw_on_missing=True)  # every interpolation resolves
    data = instantiate(cfg.data)
    with torch.device("meta"):  # the real architecture, without memory or weights
        module = instantiate(cfg.module, model={**cfg.model, "backbone_weights": None}, _recursive_=False)
    model = module.model
    assert get_protocol(data.protocol).name == data.protocol
    assert model.roi_heads.box_predictor.cls_score.out_features == data.num_classes + 1
    assert model.switches == switch_values(cfg.model)
    assert len(model.backbone.body.layer3) == DEPTHS[cfg.model.backbone]
    assert model.transform.min_size == (data.test_min_size,) and model.transform.max_size == data.max_size
    assert (model.roi_heads.detections_per_img, model.roi_heads.score_thresh) == (
        data.detections_per_img,
        data.score_thresh,
    )
    prefix = experiment.split("_")[0]
    if prefix in SCALED:
        images, iterations, lr = SCALED[prefix]
        schedule = module.fit_schedule(images)
        assert schedule.max_iters == iterations and schedule.base_lr == pytest.approx(lr)


def test_the_baseline_preset_is_iemask_with_every_registry_switch_off(tmp_path):
    def model(name: str) -> dict:
        return OmegaConf.to_container(compose_config("train", [f"model={name}"], tmp_path).model, resolve=True)

    baseline, iemask = model("mask_rcnn"), model("iemask")
    assert switch_values(baseline) == dict.fromkeys(switch_values(iemask), False)
    assert {k: v for k, v in baseline.items() if k not in switch_values(baseline)} == {
        k: v for k, v in iemask.items() if k not in switch_values(iemask)
    }
