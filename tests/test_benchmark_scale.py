"""The ``scale`` benchmark preset at a tiny fraction of LVIS v1: every figure present and sane."""

from __future__ import annotations

import json
import math

from omegaconf import OmegaConf

from conftest import compose_config
from iemask.benchmarking.scale import (
    LVIS_TRAIN_IMAGES,
    format_scale_report,
    generate_lvis_train,
    run_scale_benchmark,
    train_counts,
)

TINY_FRACTION = 200 / LVIS_TRAIN_IMAGES  # 200 images, about 2.5k annotations


def test_generated_json_is_lvis_shaped(tmp_path):
    path = generate_lvis_train(tmp_path, TINY_FRACTION, seed=1)
    data = json.loads(path.read_text())
    images, annotations = train_counts(TINY_FRACTION)
    assert (len(data["images"]), len(data["annotations"]), len(data["categories"])) == (images, annotations, 1203)
    assert (tmp_path / "train2017").is_dir()
    sizes = {i["id"]: (i["height"], i["width"]) for i in data["images"]}
    for ann in data["annotations"][:200]:
        (polygon,) = ann["segmentation"]
        assert 16 <= len(polygon) <= 80 and len(polygon) % 2 == 0
        height, width = sizes[ann["image_id"]]
        assert 0 <= min(polygon[0::2]) and max(polygon[0::2]) < width
        assert 0 <= min(polygon[1::2]) and max(polygon[1::2]) < height
        x, y, w, h = ann["bbox"]
        assert math.isclose(x, min(polygon[0::2]), abs_tol=0.011) and math.isclose(y, min(polygon[1::2]), abs_tol=0.011)
        assert w > 0 and h > 0


def test_scale_benchmark_reports_every_figure(tmp_path):
    cfg = compose_config(
        "benchmark",
        [
            "benchmark=scale",
            f"benchmark.fraction={TINY_FRACTION}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            "benchmark.worker.batches=20",
            "benchmark.worker.report_at=[1,10,20]",
            "benchmark.postprocess.detections=[10,35]",
            "benchmark.postprocess.repeats=2",
            "benchmark.eval.images=20",
            "benchmark.eval.lvis_eval_images=10",
            "benchmark.eval.detections=100",
        ],
        tmp_path,
    )
    settings = OmegaConf.to_container(cfg.benchmark, resolve=True)
    assert settings["kind"] == "scale"
    result = json.loads(json.dumps(run_scale_benchmark(settings, preset="scale", command="test")))

    data = result["data"]
    assert (data["images"], data["annotations"]) == train_counts(TINY_FRACTION)
    assert 0 < data["train_items"] <= data["images"]
    # RSS growth is a per-data-set figure only in a fresh process (the CLI); in the test runner it is just a number
    assert data["json_mb"] > 0 and data["build_s"] > 0 and math.isfinite(data["main_process_mb"])
    assert not any((tmp_path / "cache").iterdir())  # the generated folder is deleted

    worker = result["worker"]
    assert list(worker["after_batches_mb"]) == ["1", "10", "20"]
    assert worker["start_mb"] > 0 and all(v >= worker["start_mb"] * 0.5 for v in worker["after_batches_mb"].values())
    assert "not decoded" in worker["note"]

    post = result["postprocess"]
    for name in ("a", "b", "c"):
        assert set(post["ms"][name]) == {"10", "35"} and all(v > 0 for v in post["ms"][name].values())
    assert set(post["marginal_ratio"]) == {"b", "c"} and all(map(math.isfinite, post["marginal_ratio"].values()))
    assert post["rle_identical"] is True and post["num_threads"] == 1

    ev = result["eval"]
    assert (ev["iemask"]["images"], ev["lvis_eval"]["images"], ev["detections_per_image"]) == (20, 10, 100)
    for name in ("iemask", "lvis_eval"):
        r = ev[name]
        assert r["segm_s"] > 0 and r["bbox_s"] > 0 and r["peak_rss_mb"] >= r["baseline_rss_mb"] > 0
        assert 0 <= r["segm_ap"] <= 1 and 0 <= r["bbox_ap"] <= 1

    report = format_scale_report(result)
    assert "LVISEval" in report and "not decoded" in report and "marginal" in report
