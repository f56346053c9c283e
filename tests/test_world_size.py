"""Four CPU ranks (gloo): every validation image is evaluated once, and a run resumes from last.ckpt.

Six validation images over four ranks do not divide evenly, so the ranks hold different numbers of images
(or padding duplicates); the evaluators' one gather must still count each image exactly once. The ranks are
forked (``ddp_fork``, Lightning's ``ddp_spawn`` with the fork start method): they inherit the imported
modules instead of importing torch again each, which makes this test several times faster.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import SHAPES_TINY, TINY_OVERRIDES, compose_config
from iemask.evaluation import COCO_METRICS
from iemask.train import train

METRIC_KEYS = {f"{t}/{m}" for t in ("bbox", "segm") for m in COCO_METRICS}
WORLD_SIZE = 4


def four_ranks(shapes_cache: Path, *extra: str) -> list[str]:
    """Tiny shapes run on four gloo ranks, 2 images per rank (8 per step: the schedule is not rescaled)."""
    return [
        *TINY_OVERRIDES, *SHAPES_TINY, f"data.cache_dir={shapes_cache}", "trainer.strategy=ddp_fork",
        f"trainer.devices={WORLD_SIZE}", "schedule.reference_batch_size=8", "schedule.eval_period=null",
        "schedule.warmup_iters=1", "schedule.steps=[3]", "data.eval_batch_size=1", *extra,
    ]  # fmt: skip


def load(checkpoint: str | Path) -> dict:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)


def test_four_ranks_evaluate_each_image_once_and_resume_from_last_checkpoint(shapes_cache, tmp_path):
    (dataset,) = [p for p in Path(shapes_cache).iterdir() if p.name.startswith("shapes-")]
    val_images = len(json.loads((dataset / "annotations" / "instances_val.json").read_text())["images"])
    assert val_images % WORLD_SIZE != 0  # the ranks get different shares

    first = train(compose_config("train", four_ranks(shapes_cache, "schedule.max_iters=2"), tmp_path / "first"))
    assert first["metrics"].keys() == METRIC_KEYS
    assert first["evaluated_images"] == val_images  # gathered from four ranks, each image once
    # The forked workers train: their step comes back in the checkpoint (the parent's trainer stays at 0).
    checkpoint = load(first["last_checkpoint"])
    assert Path(first["last_checkpoint"]).name == "last.ckpt" and checkpoint["global_step"] == 2
    # A best metric no AP reaches: only a run that loaded this checkpoint carries it on.
    torch.save({**checkpoint, "best_metric": 2.0}, first["last_checkpoint"])

    resume = four_ranks(shapes_cache, "schedule.max_iters=4", f"ckpt_path={first['last_checkpoint']}")
    resumed = train(compose_config("train", resume, tmp_path / "resumed"))
    assert resumed["metrics"].keys() == METRIC_KEYS and resumed["evaluated_images"] == val_images
    resumed_checkpoint = load(resumed["last_checkpoint"])
    assert resumed_checkpoint["global_step"] == 4 and resumed_checkpoint["best_metric"] == 2.0  # 2 more steps
    written = json.loads((Path(resumed["output_dir"]) / "metrics.json").read_text())
    assert written == pytest.approx({**resumed["metrics"], "train/skipped_images": 0})
