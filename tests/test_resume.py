"""Exact resume: a run killed (SIGKILL) or pre-empted (SIGTERM) and resumed ends bit-identical to one left alone.

Every run here is a real ``python -m iemask.train`` process on a tiny shapes set: 12 steps of 2 images
(8 batches per epoch, so the run crosses an epoch), multi-scale resizing and flips on, an evaluation
every 5 steps and a resumable checkpoint every 3, so that a kill lands mid-epoch.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from conftest import SHAPES_TINY, TINY_OVERRIDES
from iemask.data.resumable import ResumableBatchSampler, ResumableDataLoader, SeededDataset
from iemask.data.samplers import GroupedBatchSampler, TrainingSampler
from iemask.train import resolve_resume
from iemask.utils.checkpoint import CheckpointError

MAX_STEPS = 12


def run_args(shapes_cache: Path, run_dir: Path, workers: int) -> list[str]:
    return [
        sys.executable, "-m", "iemask.train", *TINY_OVERRIDES, *SHAPES_TINY,
        f"data.cache_dir={shapes_cache}", f"data.num_workers={workers}", "data.train_min_size=[48,56,64]",
        f"schedule.max_iters={MAX_STEPS}", "schedule.reference_batch_size=2", "schedule.steps=[8]",
        "schedule.warmup_iters=2", "schedule.eval_period=5", "schedule.checkpoint_period=3",
        "callbacks.last_checkpoint.keep_after_success=true",  # the finished runs' optimizer states are compared
        f"hydra.run.dir={run_dir}",
    ]  # fmt: skip


def start(shapes_cache: Path, run_dir: Path, workers: int) -> subprocess.Popen:
    return subprocess.Popen(
        run_args(shapes_cache, run_dir, workers), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def wait_for_checkpoint(path: Path, process: subprocess.Popen, count: int = 1, timeout: float = 300) -> None:
    """Until ``path`` has been written ``count`` times (each save replaces the file: a new inode)."""
    deadline, seen = time.monotonic() + timeout, set()
    while len(seen) < count:
        assert process.poll() is None, f"the run ended before checkpoint {len(seen) + 1}"
        assert time.monotonic() < deadline, f"no checkpoint {len(seen) + 1} at {path}"
        try:
            seen.add(path.stat().st_ino)
        except FileNotFoundError:
            pass
        time.sleep(0.01)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_identical(expected: dict, actual: dict, where: str = "") -> None:
    """Every tensor equal to the bit, every other value equal, recursively."""
    if isinstance(expected, torch.Tensor):
        assert torch.equal(expected, actual), f"{where}: differs by {(expected - actual).abs().max().item()}"
    elif isinstance(expected, dict):
        assert expected.keys() == actual.keys(), where
        for key in expected:
            assert_identical(expected[key], actual[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), where
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_identical(e, a, f"{where}[{i}]")
    else:
        assert expected == actual, f"{where}: {expected!r} != {actual!r}"


def assert_same_run(reference: Path, resumed: Path) -> None:
    """Same weights, optimizer and schedule state, step and final metrics as the uninterrupted run."""
    expected, actual = load(reference / "checkpoints" / "last.ckpt"), load(resumed / "checkpoints" / "last.ckpt")
    assert actual["global_step"] == expected["global_step"] == MAX_STEPS
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        assert_identical(expected[key], actual[key], key)
    metrics = json.loads((reference / "metrics.json").read_text())
    assert json.loads((resumed / "metrics.json").read_text()) == metrics
    # The best-checkpoint tracking went on across the restart: one best file, the reference's.
    best = sorted(p.name for p in (reference / "checkpoints").glob("best-*.ckpt"))
    assert sorted(p.name for p in (resumed / "checkpoints").glob("best-*.ckpt")) == best and len(best) == 1


@pytest.fixture(scope="module")
def reference_run(shapes_cache, tmp_path_factory) -> Path:
    """The run left alone (no data workers)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    finish(start(shapes_cache, run_dir, workers=0))
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "checkpoints"), [(0, 1), (2, 2)])  # killed after step 3, or after 5's evaluation
def test_sigkill_after_a_mid_epoch_checkpoint_then_resume_is_exact(
    workers, checkpoints, reference_run, shapes_cache, tmp_path
):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    process = start(shapes_cache, run_dir, workers)
    wait_for_checkpoint(last, process, count=checkpoints)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    step = load(last)["global_step"]
    assert 0 < step < MAX_STEPS and step % 8 != 0  # killed part-way through an epoch, after a checkpoint
    resumed = finish(start(shapes_cache, run_dir, workers))  # ckpt_path=last (the default): same run folder
    assert f"resuming from {last}" in resumed
    assert "not resumable" not in resumed  # Lightning's warning for a dataloader without state
    assert_same_run(reference_run, run_dir)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_at_the_current_step_and_exits_cleanly(reference_run, shapes_cache, tmp_path):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    process = start(shapes_cache, run_dir, workers=0)
    wait_for_checkpoint(last, process)
    first = load(last)["global_step"]
    process.send_signal(signal.SIGTERM)
    output = finish(process)  # exit code 0
    assert "pre-empted" in output and not (run_dir / "metrics.json").exists()
    assert load(last)["global_step"] >= first
    finish(start(shapes_cache, run_dir, workers=0))
    assert_same_run(reference_run, run_dir)
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))


class RandomItems(Dataset):
    """Items drawn from torch's global generator, as random transforms draw."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(2)


def loader(done: int, epoch: int = 1) -> ResumableDataLoader:
    """Batches of 2 of 10 items, grouped by aspect ratio, with ``done`` batches of the epoch taken."""
    sampler = TrainingSampler(10, seed=3)
    sampler.set_epoch(epoch)
    batches = ResumableBatchSampler(GroupedBatchSampler(sampler, [0, 1] * 5, 2), seed=7)
    return ResumableDataLoader(SeededDataset(RandomItems()), batch_sampler=batches, batches_done=lambda: done)


def test_the_loader_resumes_mid_epoch_with_the_same_batches_and_augmentation_draws():
    uninterrupted = loader(done=0)
    keys, items = list(uninterrupted.batch_sampler), list(uninterrupted)
    assert len(keys) == len(items) == 5 and len({seed for batch in keys for _, seed in batch}) == 10
    state = loader(done=3).state_dict()
    assert state == {"epoch": 1, "batches_done": 3}
    resumed = loader(done=0, epoch=0)
    resumed.load_state_dict(state)
    assert list(resumed.batch_sampler) == keys[3:]
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(list(resumed), items[3:], strict=True))
    # Saved after the epoch's last batch: the next epoch starts from its beginning.
    at_end = loader(done=0)
    at_end.load_state_dict({"epoch": 1, "batches_done": 5})
    assert at_end.batch_sampler.sampler.epoch == 2 and len(list(at_end.batch_sampler)) == 5


def test_augmentation_draws_depend_on_the_key_alone():
    dataset = SeededDataset(RandomItems())
    state = torch.get_rng_state()
    first = dataset[(1, 123)]
    torch.rand(5)  # whatever else draws in between
    assert torch.equal(dataset[(1, 123)], first) and not torch.equal(dataset[(1, 124)], first)
    assert torch.equal(torch.get_rng_state(), torch.random.default_generator.get_state())
    torch.set_rng_state(state)
    dataset[(2, 5)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's stream is untouched


RESUMABLE = {"state_dict": {}, "optimizer_states": [], "loops": {}}  # what a last.ckpt holds besides tensors


def test_resume_targets_the_checkpoints_run_folder(tmp_path):
    run = tmp_path / "runs" / "train" / "2026-01-01_00-00-00"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    ckpt = run / "checkpoints" / "last.ckpt"
    torch.save(RESUMABLE, ckpt)
    new = tmp_path / "runs" / "train" / "now"
    assert resolve_resume(str(ckpt), new) == (ckpt, run.resolve())
    assert resolve_resume("last", new) == (None, new)  # nothing to resume in a new folder: a fresh start
    assert resolve_resume("last", run) == (ckpt, run)
    assert resolve_resume(None, new) == (None, new)
    ckpt.unlink()
    (run / "metrics.json").write_text("{}")  # a finished run: last.ckpt removed, metrics written
    with pytest.raises(FileExistsError, match="finished run"):
        resolve_resume("last", run)  # would overwrite its results
    assert resolve_resume(None, run) == (None, run)  # asked for explicitly
    loose = tmp_path / "downloaded.ckpt"
    torch.save(RESUMABLE, loose)
    assert resolve_resume(str(loose), new) == (loose, new)
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=missing\.ckpt"):
        resolve_resume("missing.ckpt", new)


def test_a_weights_only_checkpoint_is_refused_for_resume_with_the_ways_on(tmp_path):
    best = tmp_path / "best-step0000400-segmAP0.6751.ckpt"
    torch.save({"state_dict": {"model.w": torch.zeros(2)}, "epoch": 0, "global_step": 400}, best)
    with pytest.raises(CheckpointError, match="weights-only") as err:
        resolve_resume(str(best), tmp_path / "new")
    message = str(err.value)
    assert str(best) in message and "optimizer_states" in message
    assert "last.ckpt" in message and f"module.init_from={best}" in message  # both ways on are named
