"""Checkpoints are data: every loader is weights-only, refuses code and corrupt files by name; failed
writes, offline weight downloads and bad config values say what is wrong and what to do."""

from __future__ import annotations

import copy
import errno
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import hydra
import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from torchvision.models import resnet18

from conftest import SHAPES_TINY, TINY, TINY_OVERRIDES, compose_config
from iemask.lit_module import InstanceSegmentationModule
from iemask.models import build_model, load_pretrained_parts
from iemask.models.backbones import build_backbone
from iemask.train import train
from iemask.utils.checkpoint import (
    AtomicCheckpointIO,
    CheckpointError,
    load_checkpoint_file,
    remove_stale_temporaries,
)
from iemask.utils.validation import ConfigError, validate_train_config

SYSTEM = f"{os.system.__module__}.system"  # what the malicious pickle imports (posix.system on Linux)


class _RunsCode:
    """Unpickles as ``os.system("touch <marker>")``: the classic code-execution checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def malicious(tmp_path) -> tuple[Path, Path]:
    """A checkpoint-shaped file whose pickle would create ``marker``; and that marker path."""
    marker = tmp_path / "code-ran"
    path = tmp_path / "malicious.ckpt"
    torch.save(
        {"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"model": {}}, "payload": _RunsCode(marker)}, path
    )
    return path, marker


def test_the_malicious_file_really_runs_code_when_unpickled_unrestricted(malicious):
    path, marker = malicious
    torch.load(path, weights_only=False)
    assert marker.exists()  # so the refusals below prevent something real


def _trainer_resume_load(path: Path) -> None:
    """What ``trainer.fit(ckpt_path=...)`` calls, with the trainer built from the project's config."""
    cfg = compose_config("train", ["trainer.accelerator=cpu", "logger=none"], path.parent / "out")
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[])
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    trainer.strategy.load_checkpoint(path)


ENTRY_POINTS = {
    "load_checkpoint_file": load_checkpoint_file,
    "from_checkpoint (eval, predict)": InstanceSegmentationModule.from_checkpoint,
    "load_pretrained_parts (module.init_from)": lambda p: load_pretrained_parts(build_model(3, **TINY), p),
    "local backbone weights": lambda p: build_backbone("resnet18", weights=str(p)),
    "AtomicCheckpointIO.load_checkpoint (resume)": lambda p: AtomicCheckpointIO().load_checkpoint(p),
    "trainer resume": _trainer_resume_load,
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_refuses_a_checkpoint_that_would_run_code(entry, malicious):
    path, marker = malicious
    with pytest.raises(CheckpointError, match=re.escape(f"{path} is refused: its pickle wants {SYSTEM}")):
        ENTRY_POINTS[entry](path)
    assert not marker.exists()


def test_eval_cli_refuses_a_checkpoint_that_would_run_code(malicious, tmp_path):
    path, marker = malicious
    done = subprocess.run(
        [sys.executable, "-m", "iemask.eval", f"ckpt_path={path}", f"hydra.run.dir={tmp_path / 'eval'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert f"{path} is refused: its pickle wants {SYSTEM}" in done.stderr
    assert not marker.exists()


# ---- corrupt and foreign files ------------------------------------------------------------------------
def _truncated(keep: int | None):
    def write(path: Path) -> None:
        torch.save({"w": torch.ones(10_000)}, path)
        path.write_bytes(path.read_bytes()[: keep or path.stat().st_size // 2])

    return write


def _legacy_truncated(path: Path) -> None:
    torch.save({"w": torch.ones(100)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:60])


FAULTY_FILES = {
    "zip cut in half": (_truncated(None), r"is not a PyTorch checkpoint \(truncated or corrupt zip: reading it failed"),
    "zip cut short": (_truncated(200), r"is not a PyTorch checkpoint \(truncated or corrupt zip: PytorchStreamReader"),
    "truncated legacy file": (_legacy_truncated, r"is not a PyTorch checkpoint \(truncated or foreign pickle"),
    "text file": (
        lambda p: p.write_text("model weights: see the wiki\n"),
        r"is not a PyTorch checkpoint \(neither a zip archive nor a pickle: it starts with b'mode'\)",
    ),
    "empty file": (lambda p: p.write_bytes(b""), r"is not a PyTorch checkpoint \(the file is empty\)"),
    "plain pickle": (
        lambda p: p.write_bytes(pickle.dumps({"w": [1.0]}, protocol=4)),
        r"is not a PyTorch checkpoint \(not a torch\.save pickle: Unsupported operand",
    ),
    "plain pickle, protocol 2": (
        lambda p: p.write_bytes(pickle.dumps({"w": [1.0]}, protocol=2)),
        r"is not a PyTorch checkpoint \(truncated or foreign pickle: Invalid magic number",
    ),
    "tensor": (lambda p: torch.save(torch.ones(3), p), r"is not a checkpoint: it holds a Tensor, not a dict"),
    "list": (lambda p: torch.save([torch.ones(3)], p), r"is not a checkpoint: it holds a list, not a dict"),
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the protocol-4 pickle
@pytest.mark.parametrize("kind", FAULTY_FILES)
def test_corrupt_and_foreign_files_are_named_with_what_they_are_not(kind, tmp_path):
    write, message = FAULTY_FILES[kind]
    path = tmp_path / "weights.pth"
    write(path)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + " " + message) as raised:
        load_checkpoint_file(path)
    if "PyTorch checkpoint" in message:
        assert str(raised.value).endswith("re-download it or pick another file")
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        InstanceSegmentationModule.from_checkpoint(path)


def test_missing_file_and_a_state_dict_given_as_an_iemask_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt"):
        load_checkpoint_file(tmp_path / "nope.ckpt")
    state_dict = tmp_path / "plain.pth"
    torch.save(resnet18().state_dict(), state_dict)
    assert "conv1.weight" in load_checkpoint_file(state_dict)  # a state_dict is data: it loads
    with pytest.raises(CheckpointError, match=re.escape(f"{state_dict} is not an iemask checkpoint (no model config")):
        InstanceSegmentationModule.from_checkpoint(state_dict)


# ---- iemask's own checkpoints need nothing allowlisted ---------------------------------------------------
@pytest.fixture(scope="module")
def real_checkpoint(shapes_cache, tmp_path_factory) -> Path:
    """last.ckpt of a two-step tiny training run (with an evaluation, so callback state is filled in), kept."""
    out = tmp_path_factory.mktemp("run")
    steps = ["schedule.max_iters=2", "schedule.eval_period=1", "schedule.warmup_iters=1",
             "schedule.reference_batch_size=2", "schedule.steps=[1]",
             "callbacks.last_checkpoint.keep_after_success=true"]  # fmt: skip
    result = train(
        compose_config("train", [*TINY_OVERRIDES, *SHAPES_TINY, f"data.cache_dir={shapes_cache}", *steps], out)
    )
    return Path(result["last_checkpoint"])


def test_a_training_checkpoint_loads_weights_only_without_extra_types(real_checkpoint):
    assert torch.serialization.get_unsafe_globals_in_checkpoint(real_checkpoint) == []
    checkpoint = load_checkpoint_file(real_checkpoint)
    assert checkpoint["global_step"] == 2 and checkpoint["class_names"] == ["circle", "square", "triangle"]
    assert checkpoint["optimizer_states"] and checkpoint["lr_schedulers"] and checkpoint["callbacks"]
    resumed = AtomicCheckpointIO().load_checkpoint(real_checkpoint)
    assert resumed.keys() == checkpoint.keys() and resumed["loops"] == checkpoint["loops"]

    module = InstanceSegmentationModule.from_checkpoint(real_checkpoint)
    assert module.class_names == checkpoint["class_names"] and module.category_ids == [1, 2, 3]
    assert module.hparams["model"]["backbone_weights"] is None  # nothing to fetch at eval time
    state = module.state_dict()
    assert state.keys() == checkpoint["state_dict"].keys()
    assert all(torch.equal(state[k], v) for k, v in checkpoint["state_dict"].items())


def test_the_weights_only_best_checkpoint_rebuilds_the_module(real_checkpoint):
    (best,) = real_checkpoint.parent.glob("best-*.ckpt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(best) == []
    checkpoint = load_checkpoint_file(best)
    assert not {"optimizer_states", "lr_schedulers", "callbacks"} & checkpoint.keys()
    assert checkpoint["class_names"] == ["circle", "square", "triangle"] and checkpoint["category_ids"] == [1, 2, 3]
    assert checkpoint["hyper_parameters"] == load_checkpoint_file(real_checkpoint)["hyper_parameters"]
    module = InstanceSegmentationModule.from_checkpoint(best)
    assert module.class_names == checkpoint["class_names"] and module.best_metric == checkpoint["best_metric"]
    assert all(torch.equal(module.state_dict()[k], v) for k, v in checkpoint["state_dict"].items())


def test_a_checkpoint_of_an_earlier_version_still_loads(real_checkpoint, tmp_path):
    """Earlier versions saved ``on_nonfinite`` among the hyper-parameters (the guard is now a callback)."""
    checkpoint = load_checkpoint_file(real_checkpoint)
    assert "on_nonfinite" not in checkpoint["hyper_parameters"]
    checkpoint["hyper_parameters"]["on_nonfinite"] = "raise"
    earlier = tmp_path / "earlier.ckpt"
    torch.save(checkpoint, earlier)
    module = InstanceSegmentationModule.from_checkpoint(earlier)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in checkpoint["state_dict"].items())


# ---- failed writes and leftovers ------------------------------------------------------------------------
def _full_disk_oserror(obj, f, *args, **kwargs):
    f.write(b"partial bytes")
    raise OSError(errno.ENOSPC, "No space left on device")


def _full_disk_torch_writer(obj, f, *args, **kwargs):
    f.write(b"partial bytes")
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5 vs 0")


@pytest.mark.parametrize("failing_save", [_full_disk_oserror, _full_disk_torch_writer])
def test_a_failed_write_names_the_path_and_free_space_and_leaves_the_previous_checkpoint(
    failing_save, tmp_path, monkeypatch
):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(10)}, path)
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match=re.escape(f"could not write checkpoint {path} (")) as raised:
        io.save_checkpoint({"step": 2, "w": torch.zeros(10)}, path)
    message = str(raised.value)
    assert re.search(r"\d+\.\d\d GiB free in " + re.escape(str(path.parent)), message)
    assert "Free space there" in message and "ckpt_path=" in message
    monkeypatch.undo()
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # the temporary file is gone
    assert load_checkpoint_file(path)["step"] == 1


WRITE_LIMITED = """
import resource, signal, sys, torch
from iemask.utils.checkpoint import AtomicCheckpointIO
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, write() fails (EFBIG) as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
AtomicCheckpointIO().save_checkpoint({"w": torch.ones(1_000_000)}, sys.argv[1])
"""


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file-size limits")
def test_torchs_own_writer_failure_is_reported_with_the_path(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    done = subprocess.run(
        [sys.executable, "-c", WRITE_LIMITED, str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"OSError: could not write checkpoint {path} ([enforce fail at inline_container.cc")
    assert f"GiB free in {path.parent}" in last
    assert list(path.parent.iterdir()) == []  # no temporary file left behind


def test_other_errors_while_saving_pass_through_unchanged(tmp_path, monkeypatch):
    def unpicklable(obj, f, *args, **kwargs):
        raise RuntimeError("cannot pickle this object")

    monkeypatch.setattr(torch, "save", unpicklable)
    with pytest.raises(RuntimeError, match=r"^cannot pickle this object$"):
        AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_remove_stale_temporaries_removes_only_leftovers_of_dead_writers(tmp_path, caplog):
    dead = tmp_path / ".last.ckpt.999999999.tmp"  # beyond any pid_max: no such process
    dead_best = tmp_path / ".best-step0000002-segmAP0.5000.ckpt.999999998.tmp"
    alive = tmp_path / f".last.ckpt.{os.getpid()}.tmp"  # a save in flight
    keep = [tmp_path / "last.ckpt", tmp_path / ".notes.tmp", tmp_path / "last.ckpt.123.tmp", alive]
    for p in [dead, dead_best, *keep]:
        p.write_bytes(b"x")
    (tmp_path / ".folder.1.tmp").mkdir()
    with caplog.at_level("INFO", logger="iemask.utils.checkpoint"):
        removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([dead, dead_best])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".folder.1.tmp", *(p.name for p in keep)])
    assert dead.name in caplog.text and "2 temporary file(s)" in caplog.text
    assert remove_stale_temporaries(tmp_path / "no-such-folder") == []


# ---- torchvision weights: read as data from the torch cache; offline failures say what to do ---------------
def _offline(*args, **kwargs):
    raise URLError(socket.gaierror(-3, "Temporary failure in name resolution"))


@pytest.mark.parametrize(
    ("build", "weights", "file", "setting"),
    [
        (lambda: build_backbone("resnet101", weights="IMAGENET1K_V1"), "ResNet101_Weights.IMAGENET1K_V1",
         "resnet101-63fe2227.pth", "model.backbone_weights"),
        (lambda: load_pretrained_parts(build_model(3, **TINY), "MaskRCNN_ResNet50_FPN_Weights.COCO_V1"),
         "MaskRCNN_ResNet50_FPN_Weights.COCO_V1", "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth", "module.init_from"),
    ],
)  # fmt: skip
def test_weights_that_cannot_be_downloaded_name_the_file_and_both_fixes(
    build, weights, file, setting, tmp_path, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _offline)
    with pytest.raises(OSError, match=re.escape(f"could not download {weights} from https://")) as raised:
        build()
    message = str(raised.value)
    folder = tmp_path / "hub" / "checkpoints"
    assert "Temporary failure in name resolution" in message
    assert f"looked for as {file} in torch hub's checkpoints folder {folder}" in message
    assert f"set {setting}=<path to a local copy of {file}>" in message
    (one_liner,) = re.findall(r'python -c "([^"]+)"', message)
    assert f"torch.hub.load_state_dict_from_url('https://download.pytorch.org/models/{file}'" in one_liner
    compile(one_liner, "<one-liner>", "exec")  # valid python, ready to paste


def test_torchvision_weights_are_fetched_once_into_the_cache_and_read_as_data(tmp_path, monkeypatch):
    torch.manual_seed(3)
    reference = resnet18().state_dict()
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, Path(dst).name, hash_prefix))
        torch.save(reference, dst)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    for _ in range(2):
        body = build_backbone("resnet18", weights="IMAGENET1K_V1", cem=False, gim=False).body.state_dict()
        torch.testing.assert_close(body["layer4.1.conv2.weight"], reference["layer4.1.conv2.weight"])
        torch.testing.assert_close(body["bn1.running_var"], reference["bn1.running_var"])
    assert calls == [("https://download.pytorch.org/models/resnet18-f37072fd.pth", "resnet18-f37072fd.pth", "f37072fd")]

    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    marker = tmp_path / "code-ran"
    torch.save({**reference, "payload": _RunsCode(marker)}, cached)  # a poisoned cache is refused too
    with pytest.raises(CheckpointError, match=re.escape(f"{cached} is refused")):
        build_backbone("resnet18", weights="IMAGENET1K_V1")
    assert not marker.exists()


# ---- config validation -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes_config(tmp_path_factory):
    return compose_config("train", ["experiment=shapes"], tmp_path_factory.mktemp("cfg"))


BAD_VALUES = [
    ("data.batch_size", 0, "a positive integer"),
    ("data.eval_batch_size", -1, "a positive integer"),
    ("data.num_workers", -1, "an integer >= 0"),
    ("data.num_classes", 0, "a positive integer"),
    ("schedule.base_lr", 0.0, "a positive number"),
    ("schedule.base_lr", -0.01, "a positive number"),
    ("schedule.base_lr", float("nan"), "a positive number"),
    ("schedule.reference_batch_size", 0, "a positive integer"),
    ("schedule.max_iters", 0, "a positive integer"),
    ("schedule.steps", [370, 300], "increasing"),
    ("schedule.warmup_iters", -1, "an integer >= 0"),
    ("schedule.warmup_factor", 0.0, "a number in (0, 1]"),
    ("schedule.warmup_factor", 1.5, "a number in (0, 1]"),
    ("schedule.gamma", 0.0, "a positive number"),
    ("schedule.eval_period", 0, "null or a positive integer"),
    ("schedule.checkpoint_period", -100, "null or a positive integer"),
    ("optimizer.momentum", 1.0, "a number in [0, 1)"),
    ("optimizer.momentum", -0.1, "a number in [0, 1)"),
    ("optimizer.weight_decay", -1e-4, "a number >= 0"),
    ("trainer.devices", 0, "auto, a positive count"),
    ("trainer.devices", "gpu", "auto, a positive count"),
    ("trainer.devices", [0, 0], "auto, a positive count"),
    ("trainer.num_nodes", 0, "a positive integer"),
    ("callbacks.nonfinite_loss.action", "ignore", "raise or skip"),
    ("callbacks.nonfinite_loss.check_every", 0, "a positive integer"),
]


# Values of the wrong type: the typed schemas refuse them while the config is composed.
BAD_TYPES = [
    "data.batch_size=abc",
    "data.batch_size=2.5",
    "data.batch_size=true",
    "schedule.base_lr=fast",
    "schedule.steps=[0.5]",
    "schedule.steps=300",
]


@pytest.mark.parametrize("override", BAD_TYPES)
def test_a_value_of_the_wrong_type_fails_at_composition_naming_its_key(override, tmp_path):
    key = override.split("=")[0]
    with pytest.raises(ConfigCompositionException) as raised:
        compose_config("train", ["experiment=shapes", override], tmp_path)
    assert f"full_key: {key}" in str(raised.value.__cause__)


@pytest.mark.parametrize(("key", "value", "expected"), BAD_VALUES)
def test_a_bad_config_value_is_named_by_its_full_key(key, value, expected, shapes_config):
    cfg = copy.deepcopy(shapes_config)
    OmegaConf.update(cfg, key, value, merge=False)
    with pytest.raises(ConfigError) as raised:
        validate_train_config(cfg)
    message = str(raised.value)
    shown = OmegaConf.to_container(cfg)["schedule"]["steps"] if key == "schedule.steps" else value
    assert message.splitlines()[1:] == [message.splitlines()[1]]  # exactly one problem: this one
    assert f"  {key}={shown!r}: expected" in message and expected in message


GOOD_VALUES = [
    ("trainer.devices", "auto"),
    ("trainer.devices", -1),
    ("trainer.devices", [0, 1]),
    ("trainer.devices", "0,1"),
    ("schedule.eval_period", None),
    ("schedule.checkpoint_period", None),
    ("schedule.steps", []),
    ("schedule.steps", [300, 100000]),  # beyond max_iters: a shortened run keeps the schedule's shape
    ("schedule.base_lr", 1),
    ("schedule.warmup_factor", 1.0),
    ("optimizer.momentum", 0.0),
    ("callbacks.nonfinite_loss.action", "skip"),
]


@pytest.mark.parametrize(("key", "value"), GOOD_VALUES)
def test_valid_edge_values_pass(key, value, shapes_config):
    cfg = copy.deepcopy(shapes_config)
    OmegaConf.update(cfg, key, value, merge=False)
    validate_train_config(cfg)


@pytest.mark.parametrize("experiment", ["shapes", "coco_r50", "coco_x101", "lvis_r101", "cityscapes_r50"])
def test_the_shipped_experiments_validate(experiment, tmp_path):
    validate_train_config(compose_config("train", [f"experiment={experiment}"], tmp_path))


def test_command_line_values_missing_keys_and_every_problem_at_once(shapes_config, tmp_path):
    cfg = compose_config("train", ["data.batch_size=0", "schedule.base_lr=-0.1"], tmp_path)
    with pytest.raises(ConfigError) as raised:
        validate_train_config(cfg)
    assert str(raised.value).splitlines()[1:] == [
        "  data.batch_size=0: expected a positive integer (images per device)",
        "  schedule.base_lr=-0.1: expected a positive number",
    ]
    cfg = copy.deepcopy(shapes_config)  # the schemas keep every key; a mandatory one can be left unset
    OmegaConf.update(cfg, "data.num_classes", "???", merge=False)
    OmegaConf.update(cfg, "schedule.max_iters", "???", merge=False)
    with pytest.raises(ConfigError) as raised:
        validate_train_config(cfg)
    assert str(raised.value).splitlines()[1:] == [
        "  data.num_classes is not set (???): set data.num_classes=<value>",
        "  schedule.max_iters is not set (???): set schedule.max_iters=<value>",
    ]
