"""The world size: known from the trainer config before the Trainer exists (the schedule is scaled to it
and sets the Trainer's length), and a real four-rank run.

Four CPU ranks (gloo): every validation image is evaluated once, and a run resumes from last.ckpt.

Six validation images over four ranks do not divide evenly, so the ranks hold different numbers of images
(or padding duplicates); the evaluators' one gather must still count each image exactly once. The ranks are
forked (``ddp_fork``, Lightning's ``ddp_spawn`` with the fork start method): they inherit the imported
modules instead of importing torch again each, which makes this test several times faster.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from conftest import SHAPES_TINY, TINY_OVERRIDES, compose_config
from iemask.data.shapes import SHAPES_CATEGORIES
from iemask.evaluation import COCO_METRICS
from iemask.train import schedule_trainer_args, train
from iemask.training.optim import Schedule, trainer_world_size

# The summary, then AP and AP50 per shapes class.
METRIC_KEYS = {f"{t}/{m}" for t in ("bbox", "segm") for m in COCO_METRICS} | {
    f"{t}/{m}-{c['name']}" for t in ("bbox", "segm") for m in ("AP", "AP50") for c in SHAPES_CATEGORIES
}
WORLD_SIZE = 4


def four_ranks(shapes_cache: Path, *extra: str) -> list[str]:
    """Tiny shapes run on four gloo ranks, 2 images per rank (8 per step: the schedule is not rescaled)."""
    return [
        *TINY_OVERRIDES, *SHAPES_TINY, f"data.cache_dir={shapes_cache}", "trainer.strategy=ddp_fork",
        f"trainer.devices={WORLD_SIZE}", "schedule.reference_batch_size=8", "schedule.eval_period=null",
        "schedule.warmup_iters=1", "schedule.steps=[3]", "data.eval_batch_size=1", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("accelerator", "devices", "num_nodes"),
    [("cpu", 1, 1), ("cpu", "auto", 1), ("cpu", 4, 1), ("cpu", "3", 2), ("auto", "auto", 2)],
)
def test_the_world_size_from_the_config_is_the_trainers(accelerator, devices, num_nodes, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # "auto" is the CPU here, with or without a GPU
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, num_nodes=num_nodes, logger=False, enable_checkpointing=False
    )
    assert trainer_world_size(accelerator, devices, num_nodes) == trainer.world_size


def test_the_world_size_on_gpus_counts_the_visible_or_listed_ones(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert trainer_world_size("gpu", "auto", 2) == trainer_world_size("auto", -1, 2) == 8
    assert trainer_world_size("cuda", OmegaConf.create([0, 2]), 1) == trainer_world_size("gpu", "1,3", 1) == 2
    assert trainer_world_size("cuda", 3, 1) == 3
    monkeypatch.setattr("sys.ps1", ">>> ", raising=False)  # interactive: Lightning trains on one GPU there
    assert trainer_world_size("cuda", "auto", 1) == 1


def test_the_trainer_runs_the_scaled_schedule_unless_told_otherwise():
    schedule = Schedule(base_lr=0.01, max_iters=1000, eval_period=100).scaled(8)  # 4x the reference batch
    cfg = OmegaConf.create({"max_steps": -1})
    assert schedule_trainer_args(cfg, schedule) == {"max_steps": 250, "val_check_interval": 25}
    no_evaluations = Schedule(base_lr=0.01, max_iters=1000)
    assert schedule_trainer_args(cfg, no_evaluations) == {"max_steps": 1000, "val_check_interval": 1000}
    assert schedule_trainer_args(OmegaConf.create({"max_steps": 7}), no_evaluations) == {
        "max_steps": 7,
        "val_check_interval": 7,
    }
    assert schedule_trainer_args(OmegaConf.create({"max_steps": -1, "fast_dev_run": 2}), schedule) == {}


def test_a_trainer_of_another_world_size_than_the_schedules_is_refused(shapes_cache, tmp_path, monkeypatch):
    monkeypatch.setattr("iemask.train.trainer_world_size", lambda *args: 2)
    cfg = compose_config("train", [*TINY_OVERRIDES, *SHAPES_TINY, f"data.cache_dir={shapes_cache}"], tmp_path)
    with pytest.raises(RuntimeError, match="world size is 1, not the 2 the schedule was scaled for"):
        train(cfg)


def load(checkpoint: str | Path) -> dict:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)


def test_four_ranks_evaluate_each_image_once_and_resume_from_last_checkpoint(shapes_cache, tmp_path):
    (dataset,) = [p for p in Path(shapes_cache).iterdir() if p.name.startswith("shapes-")]
    val_images = len(json.loads((dataset / "annotations" / "instances_val.json").read_text())["images"])
    assert val_images % WORLD_SIZE != 0  # the ranks get different shares

    keep = "callbacks.last_checkpoint.keep_after_success=true"  # the finished runs' last.ckpt are compared below
    first = train(compose_config("train", four_ranks(shapes_cache, "schedule.max_iters=2", keep), tmp_path / "first"))
    assert first["metrics"].keys() == METRIC_KEYS
    assert first["evaluated_images"] == val_images  # gathered from four ranks, each image once
    # The forked workers train: their step comes back in the checkpoint (the parent's trainer stays at 0).
    checkpoint = load(first["last_checkpoint"])
    assert Path(first["last_checkpoint"]).name == "last.ckpt" and checkpoint["global_step"] == 2
    # A best metric no AP reaches: only a run that loaded this checkpoint carries it on.
    torch.save({**checkpoint, "best_metric": 2.0}, first["last_checkpoint"])

    resume = four_ranks(shapes_cache, "schedule.max_iters=4", f"ckpt_path={first['last_checkpoint']}", keep)
    resumed = train(compose_config("train", resume, tmp_path / "resumed"))
    assert resumed["metrics"].keys() == METRIC_KEYS and resumed["evaluated_images"] == val_images
    resumed_checkpoint = load(resumed["last_checkpoint"])
    assert resumed_checkpoint["global_step"] == 4 and resumed_checkpoint["best_metric"] == 2.0  # 2 more steps
    written = json.loads((Path(resumed["output_dir"]) / "metrics.json").read_text())
    assert written == pytest.approx({**resumed["metrics"], "train/skipped_images": 0})
