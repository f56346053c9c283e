"""Typed configs: schemas made from signatures reject unknown keys and wrong types when composed."""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import compose_config
from iemask.models import build_model
from iemask.schemas import config_type, make_schema, schemas


def test_annotations_map_to_what_omegaconf_checks():
    assert config_type(int) is int and config_type(Path) is str
    assert config_type(int | None) == Optional[int]  # noqa: UP045 (what OmegaConf takes)
    assert config_type(Sequence[int] | None) == Optional[list[int]]  # noqa: UP045
    assert config_type(tuple[str, ...]) == list[str]
    assert config_type(Mapping[str, Any]) == dict[str, Any]
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
    assert "rpn_anchor_generator" not in model and "image_mean" not in model  # objects, not settings
    built = build_model(**{k: v for k, v in OmegaConf.to_container(model).items() if k != "_target_"})
    assert built.rpn._post_nms_top_n["testing"] == 1000


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
