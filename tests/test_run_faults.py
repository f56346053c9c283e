"""Faults a long run meets, as ``iemask.train`` reports them: bad values, a missing dataset, pre-emption."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

import iemask.callbacks as callbacks_module
from conftest import compose_config
from iemask.callbacks import LastCheckpoint
from iemask.train import train
from iemask.utils.validation import ConfigError


@pytest.mark.parametrize(
    ("override", "key"), [("data.batch_size=0", "data.batch_size"), ("schedule.base_lr=-0.01", "schedule.base_lr")]
)
def test_a_bad_value_is_named_before_anything_is_built(override, key, tmp_path, monkeypatch):
    monkeypatch.setattr("hydra.utils.instantiate", lambda *a, **k: pytest.fail("built something"))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        train(compose_config("train", [override], tmp_path))


def test_the_dataset_root_is_checked_before_backbone_weights_are_fetched(tmp_path, monkeypatch):
    """The headline command on a node without internet: the missing data is named, nothing is downloaded."""

    def no_network(*args, **kwargs):
        pytest.fail("tried to download weights before checking the dataset")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = compose_config("train", ["experiment=lvis_r101", f"data.root={tmp_path / 'lvis'}"], tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="lvis"):
        train(cfg)


class FakeTrainer:
    """What LastCheckpoint reads of a Trainer, recording saves."""

    def __init__(self, step: int):
        self.global_step, self.world_size, self.is_global_zero = step, 1, True
        self.received_sigterm = False
        self.val_check_interval = 10
        self.saved: list[tuple[str, int]] = []

    def save_checkpoint(self, path) -> None:
        self.saved.append((str(path), self.global_step))


def test_periodic_checkpoints_skip_evaluation_steps_and_use_the_scaled_schedule(tmp_path):
    callback = LastCheckpoint(tmp_path, every_n_steps=None, requeue_signal=None)
    module = SimpleNamespace(schedule=SimpleNamespace(checkpoint_period=4))
    saved = []
    for step in range(1, 21):
        trainer = FakeTrainer(step)
        callback.on_train_batch_end(trainer, module, None, None, step - 1)
        saved += [s for _, s in trainer.saved]
    assert saved == [4, 8, 12, 16]  # 20 is an evaluation step: the evaluation writes last.ckpt


def test_the_requeue_signal_checkpoints_at_the_step_boundary_and_requeues_on_slurm(tmp_path, monkeypatch):
    requeued = []
    monkeypatch.setattr(callbacks_module.SLURMEnvironment, "detect", staticmethod(lambda: True))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setattr(
        callbacks_module.subprocess, "run", lambda cmd, **kw: requeued.append(cmd) or SimpleNamespace(returncode=0)
    )
    callback = LastCheckpoint(tmp_path, every_n_steps=100, requeue_signal="SIGUSR1")
    previous = signal.getsignal(signal.SIGUSR1)
    trainer = FakeTrainer(7)
    callback.on_train_start(trainer, None)
    try:
        signal.raise_signal(signal.SIGUSR1)  # only sets a flag: nothing is written inside the handler
        assert trainer.saved == []
        with pytest.raises(SIGTERMException):
            callback.on_train_batch_end(trainer, None, None, None, 6)
    finally:
        callback.teardown(trainer, None, "fit")
    assert trainer.saved == [(str(tmp_path / "last.ckpt"), 7)]
    assert requeued == [["scontrol", "requeue", "4242"]]
    assert signal.getsignal(signal.SIGUSR1) == previous


@pytest.mark.parametrize(("training", "saved"), [(True, [7]), (False, [])])
def test_a_sigterm_raised_between_steps_saves_and_one_during_an_evaluation_keeps_the_last(training, saved, tmp_path):
    """Under DDP Lightning stops every rank with SIGTERMException at the start of a step (no batch-end hook)."""
    callback = LastCheckpoint(tmp_path, requeue_signal=None)
    trainer = FakeTrainer(7)
    trainer.training = training
    callback.on_exception(trainer, None, SIGTERMException())
    assert [step for _, step in trainer.saved] == saved and callback.preempted
    callback.on_exception(trainer, None, SIGTERMException())  # once only
    assert [step for _, step in trainer.saved] == saved
