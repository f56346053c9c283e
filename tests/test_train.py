"""Training end to end on tiny shapes runs: configs, fast_dev_run, resume, DDP, CLIs, guards."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra.core.hydra_config import HydraConfig

from conftest import SHAPES_TINY, TINY_OVERRIDES, compose_config
from iemask.callbacks import NonFiniteLossGuard
from iemask.data.shapes import SHAPES_CATEGORIES
from iemask.evaluation import COCO_METRICS
from iemask.lit_module import InstanceSegmentationModule
from iemask.train import train

# The summary, then AP and AP50 per shapes class.
METRIC_KEYS = {f"{t}/{m}" for t in ("bbox", "segm") for m in COCO_METRICS} | {
    f"{t}/{m}-{c['name']}" for t in ("bbox", "segm") for m in ("AP", "AP50") for c in SHAPES_CATEGORIES
}


def tiny(shapes_cache, *extra: str) -> list[str]:
    return [*TINY_OVERRIDES, *SHAPES_TINY, f"data.cache_dir={shapes_cache}", *extra]


def run(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False
    )


# ---- configuration ----------------------------------------------------------------------------
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
    """Four steps with an evaluation at step 2 and at the end; checkpoints (last.ckpt kept) and metrics on disk."""
    out = tmp_path_factory.mktemp("run")
    cfg = compose_config(
        "train",
        tiny(shapes_cache, "schedule.max_iters=4", "schedule.eval_period=2", "schedule.warmup_iters=2",
             "schedule.reference_batch_size=2", "schedule.steps=[3]", "logger=csv",
             "callbacks.last_checkpoint.keep_after_success=true"),
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
    best = torch.load(result["best_checkpoint"], map_location="cpu", weights_only=True)
    assert "optimizer_states" not in best and best["class_names"] == ckpt["class_names"]  # weights only
    assert best["hyper_parameters"] == ckpt["hyper_parameters"]
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
    # Completed with the default settings: last.ckpt is gone, one weights-only best file stays.
    assert resumed["last_checkpoint"] is None and not (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [Path(resumed["best_checkpoint"]).name]
    assert torch.load(resumed["best_checkpoint"], weights_only=True)["global_step"] == 6


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


def test_eval_and_predict_clis_on_the_weights_only_best_checkpoint(short_run, tmp_path):
    result, cfg, _ = short_run
    ckpt = result["best_checkpoint"]
    data_args = [a for a in tiny(cfg.data.cache_dir) if a.startswith("data.")]
    evaluated = run(["iemask.eval", f"ckpt_path={ckpt}", *data_args, "trainer.accelerator=cpu",
                     "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'eval'}"], tmp_path)  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    # Same weights, same data: the AP that made this checkpoint the best (its file name, to 4 decimals).
    assert metrics["segm/AP"] == pytest.approx(float(Path(ckpt).stem.split("segmAP")[1]), abs=5e-5)
    detections = json.loads((tmp_path / "eval" / "instances_results.json").read_text())
    assert all({"image_id", "category_id", "bbox", "score", "segmentation"} <= d.keys() for d in detections)

    (dataset,) = [p for p in Path(cfg.data.cache_dir).iterdir() if p.name.startswith("shapes-")]
    out = tmp_path / "pred"
    predicted = run(["iemask.predict", f"ckpt_path={ckpt}", f"input={dataset / 'val'}", f"output={out}",
                     "score_thresh=0.0"], tmp_path)  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert (out / ".hydra").is_dir() and not (tmp_path / "runs").exists()  # its log is in output=, not runs/
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
    guard = [f"callbacks.nonfinite_loss.action={action}", f"callbacks.nonfinite_loss.check_every={every}"]
    cfg = compose_config("train", tiny(shapes_cache, *guard, "+trainer.fast_dev_run=3"), tmp_path)
    import hydra

    datamodule = hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.module, _recursive_=False)
    module.model.forward = _nan_forward(module.model)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    callbacks = [hydra.utils.instantiate(cfg.callbacks.nonfinite_loss)]
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=callbacks)
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


class _GuardTrainer:
    """What NonFiniteLossGuard reads of a Trainer: the step and a one-rank (or other-ranks) reduction."""

    def __init__(self, other_ranks_bad: bool = False):
        self.global_step = 0
        self.strategy = SimpleNamespace(
            reduce_boolean_decision=lambda decision, all: decision or (other_ranks_bad and not all)
        )


class _GuardModule:
    def __init__(self):
        self.loss_terms: dict[str, torch.Tensor] = {}
        self.logged: dict[str, float] = {}

    def log(self, name, value, **kwargs):
        self.logged[name] = value


def _step(guard, trainer, module, **terms):
    module.loss_terms = {k: torch.tensor(v) for k, v in terms.items()}
    guard.on_before_backward(trainer, module, sum(module.loss_terms.values()))
    trainer.global_step += 1


def test_the_guard_names_the_first_bad_step_and_term_at_its_check_and_before_a_save():
    guard, trainer, module = NonFiniteLossGuard("raise", check_every=3), _GuardTrainer(), _GuardModule()
    _step(guard, trainer, module, loss_mask=1.0, loss_box=1.0)
    _step(guard, trainer, module, loss_mask=float("nan"), loss_box=1.0)  # step 1: the first bad one
    with pytest.raises(
        FloatingPointError, match=r"^non-finite loss at step 1: loss_mask=nan, loss_box=1 \(non-finite: loss_mask\)"
    ):
        _step(guard, trainer, module, loss_mask=float("nan"), loss_box=float("inf"))  # step 2 checks
    early = NonFiniteLossGuard("raise", check_every=100)
    _step(early, trainer, module, loss_mask=1.0, loss_box=float("inf"))
    for hook in (early.on_validation_epoch_start, early.on_train_end):
        with pytest.raises(FloatingPointError, match="non-finite: loss_box"):
            hook(trainer, module)
    with pytest.raises(FloatingPointError, match="non-finite: loss_box"):
        early.on_save_checkpoint(trainer, module, {})
    # A weights-only save (the best file): Lightning calls no callback; the module's hook runs the guard.
    trainer.callbacks = [early]
    saving = SimpleNamespace(_trainer=trainer, trainer=trainer, class_names=None, category_ids=None, best_metric=None)
    with pytest.raises(FloatingPointError, match="non-finite: loss_box"):
        InstanceSegmentationModule.on_save_checkpoint(saving, {"state_dict": {}})


def test_the_guard_raises_on_every_rank_when_another_rank_went_bad():
    guard, trainer, module = NonFiniteLossGuard("raise"), _GuardTrainer(other_ranks_bad=True), _GuardModule()
    with pytest.raises(FloatingPointError, match="non-finite loss on another rank by step 0"):
        _step(guard, trainer, module, loss_mask=1.0)


def test_the_guard_drops_the_gradients_of_a_skipped_step_only():
    guard, trainer, module = NonFiniteLossGuard("skip"), _GuardTrainer(), _GuardModule()
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    weight.grad = torch.ones(2)
    _step(guard, trainer, module, loss_mask=1.0)
    guard.on_before_optimizer_step(trainer, module, optimizer)
    assert weight.grad is not None and not module.logged
    with pytest.warns(UserWarning, match=r"non-finite loss at step 1: loss_mask=nan; step skipped"):
        _step(guard, trainer, module, loss_mask=float("nan"))
    guard.on_before_optimizer_step(trainer, module, optimizer)
    optimizer.step()
    assert weight.grad is None and torch.equal(weight.detach(), torch.ones(2)) and not optimizer.state
    assert module.logged == {"train/skipped_steps": 1.0}
    guard.on_save_checkpoint(trainer, module, {})  # skip never raises


def test_the_guard_rejects_unknown_settings():
    with pytest.raises(ValueError, match="action must be one of"):
        NonFiniteLossGuard("ignore")
    with pytest.raises(ValueError, match="check_every must be >= 1"):
        NonFiniteLossGuard("raise", check_every=0)


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
