"""Training end to end on tiny shapes runs: configs, fast_dev_run, resume, DDP, CLIs, guards."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from conftest import SHAPES_TINY, TINY_OVERRIDES, compose_config
from iemask.evaluation import COCO_METRICS
from iemask.train import train

METRIC_KEYS = {f"{t}/{m}" for t in ("bbox", "segm") for m in COCO_METRICS}
EXPERIMENTS = ["shapes", "coco_r50", "coco_r101", "coco_x101"]


def tiny(shapes_cache, *extra: str) -> list[str]:
    return [*TINY_OVERRIDES, *SHAPES_TINY, f"data.cache_dir={shapes_cache}", *extra]


def run(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False
    )


# ---- configuration ----------------------------------------------------------------------------
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment, tmp_path):
    cfg = compose_config("train", [f"experiment={experiment}"], tmp_path)
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    plain = OmegaConf.to_container(job, resolve=True, throw_on_missing=True)  # every interpolation resolves
    assert plain["model"]["num_classes"] == plain["data"]["num_classes"]
    if experiment == "shapes":
        assert cfg.data._target_.endswith("ShapesDataModule") and cfg.model.backbone == "resnet18"
        assert cfg.model.backbone_weights is None and cfg.model.norm == "bn"
        return
    backbone = {"coco_r50": "resnet50", "coco_r101": "resnet101", "coco_x101": "resnext101_32x8d"}[experiment]
    assert cfg.model.backbone == backbone and cfg.model.backbone_weights == "IMAGENET1K_V1"
    assert cfg.model.norm == "frozen_bn" and cfg.model.trainable_layers == 3
    assert all(cfg.model[s] for s in ("cem", "gim", "bottom_up", "aff", "encdec_head"))
    assert cfg.data._target_.endswith("COCODataModule") and cfg.data.num_classes == 80
    assert list(cfg.data.train_min_size) == [640, 800] and cfg.data.train_min_size_sampling == "range"
    assert cfg.data.test_min_size == 800 and cfg.model.min_size == 800 and cfg.model.max_size == 1333
    s = cfg.schedule
    assert (s.reference_batch_size, s.base_lr, s.max_iters, list(s.steps)) == (2, 0.0025, 720000, [480000, 640000])
    assert (cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (0.9, 1e-4)


def test_command_line_groups_override_the_experiment(tmp_path):
    overrides = ["experiment=coco_r50", "trainer=ddp", "trainer.devices=8", "model=mask_rcnn"]
    cfg = compose_config("train", overrides, tmp_path)
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 8
    assert not cfg.model.cem and cfg.model.backbone == "resnet50"


def test_cli_prints_the_config_and_rejects_unknown_choices_and_keys(tmp_path):
    shown = run(["iemask.train", "--cfg", "job", "experiment=coco_r101"], tmp_path)
    assert shown.returncode == 0 and "resnet101" in shown.stdout and "max_iters: 720000" in shown.stdout
    bad_group = run(["iemask.train", "model=iemask_plus"], tmp_path)
    assert bad_group.returncode != 0
    assert "Could not find 'model/iemask_plus'" in bad_group.stderr and "mask_rcnn" in bad_group.stderr
    bad_key = run(["iemask.train", "model.cem_ratio=4"], tmp_path)
    assert bad_key.returncode != 0 and "Key 'cem_ratio' not in 'ModelConfig'" in bad_key.stderr


# ---- runs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["iemask", "mask_rcnn"])
def test_fast_dev_run_trains_and_evaluates(model, shapes_cache, tmp_path):
    cfg = compose_config("train", tiny(shapes_cache, f"model={model}", "+trainer.fast_dev_run=1"), tmp_path)
    result = train(cfg)
    assert set(result["metrics"]) == METRIC_KEYS
    assert all(-1 <= v <= 1 for v in result["metrics"].values())
    assert json.loads((tmp_path / "metrics.json").read_text()).keys() == METRIC_KEYS | {"train/skipped_images"}


@pytest.fixture(scope="module")
def short_run(shapes_cache, tmp_path_factory):
    """Four steps with an evaluation at step 2 and at the end; checkpoints and metrics on disk."""
    out = tmp_path_factory.mktemp("run")
    cfg = compose_config(
        "train",
        tiny(shapes_cache, "schedule.max_iters=4", "schedule.eval_period=2", "schedule.warmup_iters=2",
             "schedule.reference_batch_size=2", "schedule.steps=[3]", "logger=csv"),
        out,
    )  # fmt: skip
    return train(cfg), cfg, out


def test_a_short_run_writes_checkpoints_metrics_and_logs(short_run):
    result, _, out = short_run
    assert Path(result["last_checkpoint"]).name == "last.ckpt" and Path(result["last_checkpoint"]).is_file()
    assert Path(result["best_checkpoint"]).is_file() and "segmAP" in Path(result["best_checkpoint"]).name
    written = json.loads((out / "metrics.json").read_text())
    assert written == pytest.approx({**result["metrics"], "train/skipped_images": 0})
    ckpt = torch.load(result["last_checkpoint"], map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4 and ckpt["class_names"] == ["circle", "square", "triangle"]
    assert not list((out / "checkpoints").glob(".*.tmp"))  # nothing half-written left behind
    logged = (out / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("train/loss", "train/loss_mask", "train/loss_classifier", "train/lr", "val/segm/AP", "val/bbox/AR100"):
        assert key in logged


class _Capture(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.step = trainer.global_step
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.optimizer_state = copy.deepcopy(trainer.optimizers[0].state_dict())  # SGD updates in place
        self.scheduler_epoch = trainer.lr_scheduler_configs[0].scheduler.last_epoch


def test_resume_continues_at_the_saved_step_with_schedule_and_optimizer_state(short_run, tmp_path):
    result, cfg, _ = short_run
    ckpt = torch.load(result["last_checkpoint"], map_location="cpu", weights_only=False)
    resume = compose_config(
        "train",
        tiny(cfg.data.cache_dir, "schedule.max_iters=6", "schedule.eval_period=null", "schedule.warmup_iters=2",
             "schedule.reference_batch_size=2", "schedule.steps=[3]", f"ckpt_path={result['last_checkpoint']}"),
        tmp_path,
    )  # fmt: skip
    capture = _Capture()
    resumed = train(resume, callbacks=[capture])
    assert capture.step == 4 and capture.scheduler_epoch == 4
    assert capture.lr == pytest.approx(cfg.schedule.base_lr * 0.1 * (2 / 2))  # after the decay at step 3
    saved = ckpt["optimizer_states"][0]["state"]
    assert saved and all(
        torch.equal(saved[k]["momentum_buffer"], capture.optimizer_state["state"][k]["momentum_buffer"]) for k in saved
    )
    assert torch.load(resumed["last_checkpoint"], weights_only=False)["global_step"] == 6


def test_two_process_ddp_counts_every_validation_image_once(shapes_cache, tmp_path):
    cfg = compose_config(
        "train",
        tiny(shapes_cache, "trainer.strategy=ddp_spawn", "trainer.devices=2", "schedule.max_iters=2",
             "schedule.reference_batch_size=4", "schedule.eval_period=null", "data.eval_batch_size=2"),
        tmp_path,
    )  # fmt: skip
    result = train(cfg)
    assert set(result["metrics"]) == METRIC_KEYS
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics.keys() == METRIC_KEYS | {"train/skipped_images"}
    (path,) = [p for p in Path(shapes_cache).iterdir() if p.name.startswith("shapes-")]
    val_images = len(json.loads((path / "annotations" / "instances_val.json").read_text())["images"])
    assert val_images == 6 and result["evaluated_images"] == val_images  # gathered from both ranks, once each


def test_eval_and_predict_clis_on_the_run_checkpoint(short_run, tmp_path):
    result, cfg, _ = short_run
    ckpt = result["last_checkpoint"]
    data_args = [a for a in tiny(cfg.data.cache_dir) if a.startswith("data.")]
    evaluated = run(["iemask.eval", f"ckpt_path={ckpt}", *data_args, "trainer.accelerator=cpu",
                     "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'eval'}"], tmp_path)  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics == pytest.approx(result["metrics"], abs=1e-6)  # same weights, same data
    detections = json.loads((tmp_path / "eval" / "instances_results.json").read_text())
    assert all({"image_id", "category_id", "bbox", "score", "segmentation"} <= d.keys() for d in detections)

    (dataset,) = [p for p in Path(cfg.data.cache_dir).iterdir() if p.name.startswith("shapes-")]
    out = tmp_path / "pred"
    predicted = run(["iemask.predict", f"ckpt_path={ckpt}", f"input={dataset / 'val'}", f"output={out}",
                     "score_thresh=0.0", f"hydra.run.dir={tmp_path / 'pred-run'}"], tmp_path)  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    images = sorted(p.name for p in (dataset / "val").glob("*.png"))
    assert sorted(p.name for p in out.glob("*.png")) == images
    results = json.loads((out / "predictions.json").read_text())
    assert {r["file_name"] for r in results} <= set(images)
    assert all(r["category_id"] in (1, 2, 3) and "segmentation" in r for r in results)


# ---- guards -----------------------------------------------------------------------------------
def _nan_forward(model):
    original = model.forward

    def forward(images, targets=None):
        out = original(images, targets)
        if model.training:
            out["loss_mask"] = out["loss_mask"] * float("nan")
        return out

    return forward


@pytest.mark.parametrize(
    ("action", "every", "stopped_at"), [("raise", 1, 0), ("raise", 3, 2), ("raise", 5, 3), ("skip", 1, None)]
)
def test_non_finite_loss_stops_or_skips_the_step(action, every, stopped_at, shapes_cache, tmp_path):
    overrides = tiny(
        shapes_cache, f"module.on_nonfinite={action}", f"module.check_finite_every={every}", "+trainer.fast_dev_run=3"
    )
    cfg = compose_config("train", overrides, tmp_path)
    import hydra

    datamodule = hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.module, _recursive_=False)
    module.model.forward = _nan_forward(module.model)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[])
    if action == "raise":
        # Checked every step, or every 3rd step without a per-step sync: either way the first bad step and
        # the term that went bad first are named, though a NaN update has poisoned every term since.
        with pytest.raises(
            FloatingPointError, match=r"non-finite loss at step 0: .*loss_mask=nan.*\(non-finite: loss_mask\)"
        ):
            trainer.fit(module, datamodule=datamodule)
        # Raised inside the check step, before its update; with no check step in the 3 steps, before
        # the validation that follows them.
        assert trainer.global_step == stopped_at
        return
    with pytest.warns(UserWarning, match="step skipped"):
        trainer.fit(module, datamodule=datamodule)
    after = module.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.endswith("num_batches_tracked"))


def test_checkpoints_are_never_left_half_written(tmp_path, monkeypatch):
    from iemask.utils.checkpoint import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_multirun_ddp_relaunch_stays_in_the_jobs_folder(tmp_path, monkeypatch):
    from hydra.types import RunMode
    from lightning.fabric.strategies.launchers.subprocess_script import _hydra_subprocess_cmd
    from omegaconf import read_write

    from iemask.utils.runs import prepare_ddp_relaunch

    compose_config("train", ["model.cem=false"], tmp_path / "job0")
    hc = HydraConfig.get()
    with read_write(hc):
        hc.mode = RunMode.MULTIRUN
        hc.overrides.task = ["model.cem=false", "trainer=ddp"]
        hc.run.dir = str(tmp_path / "elsewhere")
    monkeypatch.setattr(sys, "argv", ["iemask/train.py", "-m", "model.cem=true,false", "trainer=ddp"])
    prepare_ddp_relaunch()
    command, _ = _hydra_subprocess_cmd(local_rank=1)
    # `python -m <module>` stays; the sweep's own `-m` and its comma lists are gone
    assert command.count("-m") == 1 and command[1] == "-m" and "model.cem=true,false" not in command
    assert "model.cem=false" in command and f'hydra.run.dir="{tmp_path / "job0"}"' in command
