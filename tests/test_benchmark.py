"""The benchmark harness: the ``cpu`` preset end to end, and the fast paths leaving results unchanged."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import TINY, compose_config
from iemask.benchmark import main
from iemask.benchmarking.evaluation import synthetic_evaluation_set
from iemask.benchmarking.models import (
    OPTIMIZER_PATHS,
    SHARES,
    build_models,
    measure_inference,
    measure_training,
    part_timer,
    preset_switches,
    synthetic_batch,
)
from iemask.benchmarking.report import format_report
from iemask.benchmarking.run import BENCHMARK_FAST_PATHS, MODEL_FAST_PATHS
from iemask.benchmarking.timing import fixed_detections, precision_context
from iemask.evaluation import evaluate
from iemask.models import SWITCH_NAMES, build_model
from iemask.models.parts import GROUPS, compile_parts
from iemask.training.optim import build_sgd


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as the ``cpu`` preset: on 2 cores shared with other jobs two OpenMP threads wait on
    each other and every test here runs several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> tuple[dict, Path]:
    """The ``cpu`` preset through the Hydra entry point (composed as the CLI would): result and JSON path."""
    out = tmp_path_factory.mktemp("benchmark")
    cfg = compose_config("benchmark", ["benchmark=cpu", f"benchmark.pipeline.cache_dir={out / 'cache'}"], out)
    return main(cfg), Path(cfg.benchmark.output)


def _spread_ok(s: dict) -> bool:
    return 0 < s["min"] <= s["median"] <= s["max"]


def test_cpu_preset_writes_every_field(cpu_run):
    result, path = cpu_run
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    meta = result["meta"]
    assert meta["preset"] == "cpu" and meta["device"] == "cpu" and meta["torch"] == torch.__version__
    for key in ("device_name", "torchvision", "git_commit", "command", *BENCHMARK_FAST_PATHS, *MODEL_FAST_PATHS):
        assert key in meta
    config = result["config"]
    assert config["model"]["backbone"] == "resnet18" and config["model"]["neck_channels"] == 32  # the preset's model
    assert list(result["models"]) == config["benchmark"]["models"] == ["mask_rcnn", "iemask_dagger", "iemask"]
    baseline = config["benchmark"]["models"][0]
    for name, r in result["models"].items():
        assert r["switches"] == preset_switches(name)
        assert r["params_m"] > 1
        assert _spread_ok(r["train"]["images_per_sec"]) and _spread_ok(r["train"]["step_ms"])
        assert r["train"]["peak_memory_mb"] is None and "CPU" in r["train"]["peak_memory_note"]
        assert set(r["infer"]) == {"10", "35"}
        for d, infer in r["infer"].items():
            assert _spread_ok(infer["ms_per_img"])
            assert set(infer["shares"]) == set(SHARES)
            assert all(v >= 0 for v in infer["shares"].values())
            assert sum(infer["shares"].values()) == pytest.approx(1.0)
            assert set(infer["part_ms"]) == set(SHARES) and all(map(math.isfinite, infer["part_ms"].values()))
            assert r["ratios"]["infer_ms_per_img"][d] > 0
        assert r["ratios"]["train_step_time"] > 0 and r["ratios"]["train_peak_memory"] is None
        if name == baseline:
            assert r["ratios"]["params"] == r["ratios"]["train_step_time"] == 1.0
            assert set(r["ratios"]["infer_ms_per_img"].values()) == {1.0}
    pipeline = result["pipeline"]
    assert set(pipeline["images_per_sec"]) == {"0", "1", "2"} and min(pipeline["images_per_sec"].values()) > 0
    slowest = min(r["train"]["images_per_sec"]["median"] for r in result["models"].values())
    assert pipeline["keeps_up"] == (pipeline["images_per_sec"]["1"] >= 2 * slowest)
    assert result["eval"]["num_images"] == 20 and result["eval"]["coco_s"] > 0 and result["eval"]["lvis_s"] > 0
    report = format_report(result)
    assert "| Mask R-CNN |" in report and "| IEMask @35 |" in report and "keeps up" in report


def test_compared_models_take_their_switches_from_their_presets():
    assert preset_switches("mask_rcnn") == dict.fromkeys(SWITCH_NAMES, False)  # the registry's baseline preset
    assert preset_switches("iemask_dagger") == {**dict.fromkeys(SWITCH_NAMES, True), "gim": False}
    assert preset_switches("iemask") == dict.fromkeys(SWITCH_NAMES, True)


# ---- fast paths leave the results unchanged ------------------------------------------------------
# The tests' tiny model with fewer proposals and sampled RoIs: bf16 runs emulated on AVX2 CPUs.
SMALL = dict(
    TINY,
    rpn_pre_nms_top_n_train=200,
    rpn_post_nms_top_n_train=100,
    rpn_pre_nms_top_n_test=100,
    rpn_post_nms_top_n_test=50,
    box_batch_size_per_image=64,
)


def _tiny(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(3, **{**SMALL, **kwargs})


IMAGES, TARGETS = synthetic_batch(2, 128, 128, num_classes=3, objects=3, seed=0)


def _features(model: torch.nn.Module, precision: str = "32") -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad(), precision_context(torch.device("cpu"), precision):
        batch, _ = model.transform(IMAGES)
        return model.backbone(batch.tensors)


def _losses(model: torch.nn.Module, precision: str = "32") -> dict[str, float]:
    model.train()
    torch.manual_seed(0)  # the same sampled anchors and RoIs
    with precision_context(torch.device("cpu"), precision):
        return {k: float(v.detach()) for k, v in model(IMAGES, TARGETS).items()}


def _detections(model: torch.nn.Module, count: int = 10) -> list[dict[str, torch.Tensor]]:
    model.eval()
    with torch.no_grad(), fixed_detections(model, count):
        return model(IMAGES)


def test_channels_last_gives_the_same_outputs():
    plain, nhwc = _tiny(), _tiny(channels_last=True)
    ref, out = _features(plain), _features(nhwc)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-4)
    assert _losses(nhwc) == pytest.approx(_losses(plain), rel=1e-4)
    for a, b in zip(_detections(plain), _detections(nhwc), strict=True):
        for key in ("boxes", "scores", "masks"):
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-3)
        assert torch.equal(a["labels"], b["labels"])


def test_bf16_autocast_on_cpu_stays_close_to_fp32():
    model = _tiny()
    ref, out = _features(model), _features(model, "bf16")
    for k in ref:
        assert out[k].dtype == torch.bfloat16  # the pyramid stays in bf16: no feature-map copies
        assert (out[k].float() - ref[k]).norm() / ref[k].norm() < 0.05
    # ...while the anchors are fp32 and exactly the fp32 model's (bf16 would move boxes in 4–8 px steps).
    batch, _ = model.transform(IMAGES)
    with torch.no_grad():
        anchors = model.rpn.anchor_generator(batch, list(ref.values()))
        with precision_context(torch.device("cpu"), "bf16"):
            low_anchors = model.rpn.anchor_generator(batch, list(out.values()))
    for a, b in zip(anchors, low_anchors, strict=True):
        assert b.dtype == torch.float32 and torch.equal(a, b)
    rois = torch.randn(6, TINY["neck_channels"], 28, 28, generator=torch.Generator().manual_seed(0))
    head = torch.nn.Sequential(model.roi_heads.mask_head, model.roi_heads.mask_predictor).eval()
    with torch.no_grad():
        logits = head(rois)
        with precision_context(torch.device("cpu"), "bf16"):
            low = head(rois).float()
    assert (low - logits).norm() / logits.norm() < 0.05
    fp32, bf16 = _losses(model), _losses(model, "bf16")
    assert sum(bf16.values()) == pytest.approx(sum(fp32.values()), rel=0.05)
    assert bf16 == pytest.approx(fp32, rel=0.15, abs=0.02)


@pytest.mark.slow  # inductor takes minutes on a 2-core CPU
def test_compiled_mask_head_gives_the_same_outputs():
    eager = _tiny()
    compiled = copy.deepcopy(eager)
    compile_parts(compiled, ["mask_head"])
    for a, b in zip(_detections(eager), _detections(compiled), strict=True):
        torch.testing.assert_close(b["boxes"], a["boxes"])
        torch.testing.assert_close(b["masks"], a["masks"], rtol=1e-4, atol=1e-4)


def test_foreach_and_fused_sgd_match_the_plain_loop():
    model = _tiny()
    g = torch.Generator().manual_seed(0)
    grads = [[torch.randn(p.shape, generator=g) for p in model.parameters()] for _ in range(2)]
    results = {}
    for path, flags in OPTIMIZER_PATHS.items():
        clone = copy.deepcopy(model)
        optimizer = build_sgd(clone, lr=0.1, weight_decay=1e-4, **flags)
        for step_grads in grads:  # two steps: the second uses the momentum buffers
            for p, grad in zip(clone.parameters(), step_grads, strict=True):
                p.grad = grad.clone()
            optimizer.step()
        results[path] = [p.detach() for p in clone.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(results["loop"], model.parameters(), strict=True))
    for path in ("foreach", "fused"):
        for a, b in zip(results[path], results["loop"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_part_timer_times_every_part_group_and_leaves_no_hooks():
    for switches in ({}, dict.fromkeys(SWITCH_NAMES, False)):  # the baseline has no bottom-up path in its neck
        model = _tiny(**switches).eval()
        hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
        with torch.no_grad(), fixed_detections(model, 5), part_timer(model) as totals:
            model(IMAGES)
        assert list(totals) == list(GROUPS) and all(t > 0 for t in totals.values())
        assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()] == hooks


def test_fast_paths_pass_through_the_measurements():
    model = {"_target_": "iemask.models.build_model", "num_classes": 3, **SMALL, "min_size": 64, "max_size": 64}
    models = build_models({**model, "channels_last": True, "mask_head_chunk_size": 4}, ["iemask"], torch.device("cpu"))
    images, targets = synthetic_batch(1, 64, 64, num_classes=3, objects=2)
    train = measure_training(models, images, targets, warmup=1, repeats=1, precision="bf16", optimizer="fused")
    assert train["iemask"]["images_per_sec"]["median"] > 0
    infer = measure_inference(models, images, [6], warmup=1, repeats=1, precision="bf16")
    assert infer["iemask"]["6"]["median"] > 0
    with pytest.raises(ValueError, match="precision"):
        measure_inference(models, images, [6], precision="fp16")


def test_synthetic_evaluation_set_scores_between_zero_and_one():
    gt, results = synthetic_evaluation_set(4, 10, num_categories=5, height=64, width=96, objects=3)
    assert len(results) == 40 and all(isinstance(r["segmentation"]["counts"], str) for r in results)
    for protocol in ("coco", "lvis"):
        metrics = evaluate(gt, results, protocol=protocol)
        assert 0 < metrics["segm/AP"] < 1 and 0 < metrics["bbox/AP"] < 1
