"""Model analysis: parameter/FLOP tables at fixed detection counts, and the CLI (an experiment's model, or a
checkpoint's)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torchvision
from hydra.errors import MissingConfigException
from torchvision.ops import FrozenBatchNorm2d

from conftest import TINY, TINY_MODEL_OVERRIDES, compose_config
from iemask.analysis import analyze_model, fixed_detections, format_model_table
from iemask.analyze import analyze, build_analyzed_model
from iemask.classes import model_num_classes
from iemask.models import SWITCH_NAMES, count_parameters

OFF = dict.fromkeys(SWITCH_NAMES, False)


def test_analysis_counts_parts_and_forces_detections(tiny_model_factory):
    baseline = tiny_model_factory(**OFF)
    iemask = tiny_model_factory()
    stats = {
        name: analyze_model(m, height=96, width=128, detections=7, warmup=0, repeats=1)
        for name, m in [("baseline", baseline), ("iemask", iemask)]
    }
    for name, model in [("baseline", baseline), ("iemask", iemask)]:
        s = stats[name]
        assert s.detections == 7 and s.input_size == (96, 128)
        assert s.params_m == pytest.approx(count_parameters(model) / 1e6)
        # Every parameter belongs to exactly one part.
        assert sum(p["params_m"] for p in s.parts.values()) == pytest.approx(s.params_m)
        assert 0 < sum(p["flops_g"] for p in s.parts.values()) <= s.flops_g * (1 + 1e-9)
        assert s.latency_ms > 0
        assert "| **total** |" in format_model_table(name, s)
    # The baseline's parts are named as what they are: a plain FPN and no bottom-up path.
    assert list(stats["baseline"].parts) == ["backbone", "fpn", "rpn", "box_head", "mask_head"]
    assert [p["label"] for p in stats["baseline"].parts.values()] == list(stats["baseline"].parts)
    assert list(stats["iemask"].parts) == ["backbone", "fpn", "bottom_up", "rpn", "box_head", "mask_head"]
    labels = {k: p["label"] for k, p in stats["iemask"].parts.items()}
    assert labels["fpn"] == "fpn (CEM, GIM)" and labels["bottom_up"] == "bottom_up (BU, AFF)"
    assert labels["mask_head"] == "mask_head (EDH)"
    assert stats["iemask"].parts["bottom_up"]["flops_g"] > 0
    assert stats["iemask"].parts["fpn"]["flops_g"] > stats["baseline"].parts["fpn"]["flops_g"]  # CEM, GIM
    # Settings are restored after the analysis.
    assert iemask.roi_heads.detections_per_img == 100 and iemask.roi_heads.score_thresh == 0.05


def test_mask_head_flops_scale_with_the_forced_detection_count(tiny_model_factory):
    model = tiny_model_factory()
    few = analyze_model(model, height=64, width=64, detections=4, latency=False)
    many = analyze_model(model, height=64, width=64, detections=12, latency=False)
    assert many.parts["mask_head"]["flops_g"] == pytest.approx(3 * few.parts["mask_head"]["flops_g"], rel=1e-6)
    assert many.parts["backbone"]["flops_g"] == pytest.approx(few.parts["backbone"]["flops_g"])
    assert few.latency_ms is None


def test_fixed_detections_restores_settings_on_error(tiny_model_factory):
    model = tiny_model_factory()
    with pytest.raises(RuntimeError), fixed_detections(model, 3):
        assert model.roi_heads.detections_per_img == 3
        raise RuntimeError
    assert model.roi_heads.nms_thresh == 0.5


def test_analyze_cli_prints_table_and_json(tmp_path):
    out = tmp_path / "analysis.json"
    cmd = [
        sys.executable, "-m", "iemask.analyze", "experiment=cityscapes_r50", "model=mask_rcnn", *TINY_MODEL_OVERRIDES,
        "analyze.height=64", "analyze.width=96",
        "analyze.detections=3", "analyze.warmup=0", "analyze.repeats=1", f"analyze.output={out}",
        f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300)
    assert "| part | params (M) | FLOPs (G) |" in result.stdout
    assert "mask_rcnn (resnet18), experiment=cityscapes_r50, 8 classes" in result.stdout
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["model"] == "mask_rcnn (resnet18)"  # the command line's model wins over the experiment's
    assert (last["experiment"], last["backbone"], last["num_classes"]) == ("cityscapes_r50", "resnet18", 8)
    assert last["detections"] == 3 and last["input_size"] == [64, 96]
    assert last["params_m"] > 10 and last["flops_g"] > 0 and last["latency_ms"] > 0
    assert json.loads(out.read_text()) == last


# Smaller necks and heads keep these quick; the class count and the backbone are the experiment's.
SMALL_HEADS = ["model.neck_channels=32", "model.box_head_dim=64"]
BLOCKS_IN_LAYER3 = {"resnet18": 2, "resnet50": 6, "resnet101": 23}  # tells the ResNet depths apart


PAPER = {"variant": "paper"}  # what analyze reports for the paper's modules


@pytest.mark.parametrize(
    ("overrides", "experiment", "backbone", "num_classes"),
    [
        ([], "coco_r50", "resnet50", 80),  # the default: the paper's Table 8 setting
        (["experiment=lvis_r101"], "lvis_r101", "resnet101", 1203),  # through lvis_r50, which it extends
        (["experiment=shapes"], "shapes", "resnet18", 3),
        (["experiment=coco_r50", "model.backbone=resnet18"], "coco_r50", "resnet18", 80),
    ],
)
def test_analyze_builds_the_experiments_model(tmp_path, overrides, experiment, backbone, num_classes):
    cfg = compose_config("analyze", [*overrides, *SMALL_HEADS], tmp_path)
    model, about = build_analyzed_model(cfg)
    assert about == {"model": f"iemask ({backbone})", "experiment": experiment, "backbone": backbone, **PAPER}
    assert model_num_classes(model) == num_classes
    assert len(model.backbone.body.layer3) == BLOCKS_IN_LAYER3[backbone]
    assert all(model.switches.values())  # every experiment here is IEMask R-CNN with all five modules


def test_analyze_names_the_authors_variant(tmp_path):
    overrides = ["experiment=coco_r50", "model.backbone=resnet18", "model.variant=official", *SMALL_HEADS]
    model, about = build_analyzed_model(compose_config("analyze", overrides, tmp_path))
    assert model.variant == about["variant"] == "official"
    assert about["model"] == "iemask (resnet18, official variant)"
    assert hasattr(model.backbone.fpn, "gimdoule")  # the authors' modules were built


def test_analyze_sizes_the_experiments_model(tmp_path):
    out = tmp_path / "analysis.json"
    overrides = ["experiment=coco_r50", "model.backbone=resnet18", *SMALL_HEADS, "model.rpn_post_nms_top_n_test=50"]
    cfg = compose_config(
        "analyze",
        [*overrides, "analyze.height=128", "analyze.width=128", "analyze.latency=false", f"analyze.output={out}"],
        tmp_path,
    )
    result = analyze(cfg)
    assert (result["experiment"], result["backbone"], result["num_classes"]) == ("coco_r50", "resnet18", 80)
    assert tuple(result["input_size"]) == (128, 128) and result["latency_ms"] is None
    body = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d)  # the experiment's frozen-BN body, no fc
    expected = sum(p.numel() for name, p in body.named_parameters() if not name.startswith("fc.")) / 1e6
    assert result["parts"]["backbone"]["params_m"] == pytest.approx(expected)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))


def test_the_command_lines_model_wins_over_the_experiments(tmp_path):
    cfg = compose_config("analyze", ["experiment=lvis_r50", "model=mask_rcnn", "model/backbone=resnet18"], tmp_path)
    model, about = build_analyzed_model(cfg)
    assert about["model"] == "mask_rcnn (resnet18)" and not any(model.switches.values())
    assert model_num_classes(model) == 1203


def test_an_unknown_experiment_names_the_known_ones(tmp_path):
    with pytest.raises(MissingConfigException) as error:
        compose_config("analyze", ["experiment=coco_r5"], tmp_path)
    message = str(error.value)
    assert "Could not find 'experiment/coco_r5'" in message
    assert all(name in message for name in ("coco_r50", "lvis_r101", "cityscapes_r50", "shapes"))


def test_an_experiment_reading_its_classes_from_data_needs_them_given(tmp_path):
    with pytest.raises(ValueError, match=r"experiment=custom_r50 .* set data\.num_classes=") as error:
        build_analyzed_model(compose_config("analyze", ["experiment=custom_r50"], tmp_path))
    assert "null" in str(error.value)
    cfg = compose_config("analyze", ["experiment=custom_r50", "data.num_classes=5", *SMALL_HEADS], tmp_path)
    model, _ = build_analyzed_model(cfg)
    assert model_num_classes(model) == 5


def test_analyze_sizes_a_trained_checkpoint(tmp_path):
    import torch

    from iemask.lit_module import InstanceSegmentationModule

    config = {"_target_": "iemask.models.build_model", "num_classes": 5, **TINY, "gim": False}
    module = InstanceSegmentationModule(model=config)
    ckpt = tmp_path / "best.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, ckpt)
    out = tmp_path / "analysis.json"
    cmd = [
        sys.executable, "-m", "iemask.analyze", f"ckpt_path={ckpt}", "analyze.height=64", "analyze.width=96",
        "analyze.detections=3", "analyze.warmup=0", "analyze.repeats=1", "analyze.latency=false",
        f"analyze.output={out}",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300)
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["model"] == "iemask-CBAH-resnet18 (best.ckpt)"  # the checkpoint's switches, not the config's
    assert last["params_m"] == pytest.approx(count_parameters(module.model) / 1e6)
