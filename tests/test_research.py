"""The research workflow: W&B logging (offline), ablation sweeps with a report, the Table 3 sweep."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import SHAPES_TINY, TINY_OVERRIDES, compose_config
from iemask.loggers import resolve_mode, run_name, wandb_logger
from iemask.models.switches import SWITCH_NAMES, SWITCHES, switch_conflict
from iemask.report import collect_runs, format_ablation_table, group_runs
from iemask.train import train
from iemask.utils.config import CONFIG_DIR

TABLE3 = {  # docs/method.md §4: row -> letters of the switches on
    1: "", 2: "CG", 3: "C", 4: "G", 5: "B", 6: "BA", 7: "H", 8: "CGB", 9: "CGBA", 10: "CGBH",
    11: "CGH", 12: "CBAH", 13: "GBAH", 14: "CGBAH",
}  # fmt: skip
LETTERS = {s.letter: s.name for s in SWITCHES}


def test_switch_registry_is_consistent_with_the_builder_and_the_parts():
    import inspect

    from iemask.models import build_model
    from iemask.models.parts import PARTS

    assert len(LETTERS) == len({s.header for s in SWITCHES}) == len(SWITCHES)
    assert set(SWITCH_NAMES) <= set(inspect.signature(build_model).parameters)
    assert {s.part for s in SWITCHES} <= {p.key for p in PARTS}
    assert all(set(s.requires) <= set(SWITCH_NAMES) for s in SWITCHES)
    assert switch_conflict({"aff": True, "bottom_up": False}).startswith("aff=true needs bottom_up=true")
    assert switch_conflict({"aff": True, "bottom_up": True}) is None


def test_run_names_say_which_switches_are_on():
    assert run_name(dict.fromkeys(SWITCH_NAMES, False), "resnet50") == "mask_rcnn-resnet50"
    assert run_name({**dict.fromkeys(SWITCH_NAMES, True), "gim": False}, "resnet101") == "iemask-CBAH-resnet101"


def test_wandb_goes_offline_without_a_key_and_can_be_disabled(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert resolve_mode("auto") == "offline"
    assert "logging offline" in caplog.text
    assert resolve_mode("disabled") == "disabled"
    assert wandb_logger({"backbone": "resnet18"}, save_dir=str(tmp_path), mode="disabled") is None
    with pytest.raises(ValueError, match="mode"):
        resolve_mode("sometimes")


def read_wandb_records(path: Path) -> list:
    """Protobuf records of an offline run's ``.wandb`` file (W&B's leveldb-style log: a 7-byte
    header, then 32 KiB blocks of records with a 7-byte header each, possibly split across blocks).
    wandb 0.31 has no Python reader and writes no summary json for offline runs."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, block, records, pending, offset = path.read_bytes(), 32768, [], b"", 7
    while offset + 7 <= len(raw):
        left = block - offset % block
        if left < 7:
            offset += left
            continue
        length, kind = int.from_bytes(raw[offset + 4 : offset + 6], "little"), raw[offset + 6]
        pending += raw[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
        elif kind == 0:
            break
    return records


def test_wandb_offline_run_holds_metrics_config_and_overlay_images(shapes_cache, tmp_path):
    overrides = [
        *TINY_OVERRIDES, *SHAPES_TINY, f"data.cache_dir={shapes_cache}", "logger=wandb", "logger.wandb.mode=offline",
        "schedule.max_iters=2", "schedule.reference_batch_size=2", "schedule.eval_period=null",
        "callbacks.wandb_images.num_images=3", "callbacks.wandb_images.score_thresh=0.0",
    ]  # fmt: skip
    cfg = compose_config("train", overrides, tmp_path)
    train(cfg)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    records = read_wandb_records(next(run_dir.glob("run-*.wandb")))
    logged = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            logged.update({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    for key in ("val/segm/AP", "val/bbox/AR100", "train/loss", "train/loss_mask", "train/lr"):
        assert key in logged, key
    assert json.loads(logged["val/examples/count"]) == 3
    masks, boxes = json.loads(logged["val/examples/all_masks"]), json.loads(logged["val/examples/all_boxes"])
    assert len(masks) == len(boxes) == 3  # mask and box overlays, not flat PNGs
    assert all({"predictions", "ground_truth"} <= m.keys() for m in masks + boxes)
    files = run_dir / "files" / "media"
    assert len(list((files / "images").rglob("*.png"))) >= 3
    assert list(files.rglob("*.mask.png")) and list(files.rglob("*.boxes2D.json"))
    config = next(r.config for r in records if r.WhichOneof("record_type") == "config")
    keys = {item.key or "/".join(item.nested_key) for item in config.update}
    assert {"model", "schedule", "data"} <= keys
    assert any(r.WhichOneof("record_type") == "exit" for r in records)  # the run was finished


def test_table3_sweep_has_the_papers_fourteen_configurations(tmp_path):
    sweep = OmegaConf.load(CONFIG_DIR / "sweep" / "table3.yaml")
    rows = sweep.hydra.sweeper.params["+ablation"].split(",")
    assert len(rows) == 14
    for number, on in TABLE3.items():
        cfg = compose_config("train", ["experiment=coco_r50", f"+ablation={rows[number - 1]}"], tmp_path)
        assert {k for k in SWITCH_NAMES if cfg.model[k]} == {LETTERS[c] for c in on}, f"row {number}"
        assert cfg.model.backbone == "resnet50"  # the experiment stays


def test_submitit_launcher_composes(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "iemask.train", "--cfg", "hydra", "hydra/launcher=submitit_slurm",
         "hydra.launcher.gpus_per_node=8", "hydra.launcher.tasks_per_node=8"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, check=True,
    )  # fmt: skip
    assert "SlurmLauncher" in result.stdout and "gpus_per_node: 8" in result.stdout


def test_switch_sweep_skips_the_invalid_combination_and_reports_the_table(shapes_cache, tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = [
        *TINY_OVERRIDES, *SHAPES_TINY, f"data.cache_dir={shapes_cache}", "schedule.max_iters=2",
        "schedule.reference_batch_size=2", "schedule.eval_period=null", "model.aff=true",
        "model.gim=true,false", "model.bottom_up=true,false", f"hydra.sweep.dir={sweep_dir}",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "iemask.train", "-m", *args], capture_output=True, text=True, cwd=tmp_path, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = collect_runs(sweep_dir)
    assert len(rows) == 4
    done = [r for r in rows if r.status == "done"]
    skipped = [r for r in rows if r.status.startswith("skipped")]
    assert len(done) == 2 and len(skipped) == 2
    assert all(r.switches["bottom_up"] for r in done) and not any(r.switches["bottom_up"] for r in skipped)
    assert {r.switches["gim"] for r in done} == {True, False}
    assert all({"segm/AP", "bbox/AP"} <= set(r.metrics) for r in done)
    with_gim = next(r for r in done if r.switches["gim"])
    without = next(r for r in done if not r.switches["gim"])
    assert with_gim.params_m > without.params_m
    table = subprocess.run(
        [sys.executable, "-m", "iemask.report", str(sweep_dir)], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert table[0].startswith("| name | jobs | CEM | GIM | BU | AFF | EDH | n | mask AP | mask AP50 |")
    assert len(table) == 2 + 4 and sum("skipped: aff=true needs bottom_up=true" in line for line in table) == 2
    assert {line.split(" | ")[0].removeprefix("| ") for line in table[2:]} == {r.name for r in rows}
    csv_rows = list(csv.DictReader(io.StringIO(format_ablation_table(group_runs(rows), "csv"))))
    assert len(csv_rows) == 4
    done_ap = sorted(float(row["segm/AP"]) for row in csv_rows if row["status"] == "done")
    assert done_ap == pytest.approx(sorted(r.metrics["segm/AP"] for r in done), abs=1e-4)
    assert Path(sweep_dir / "0" / "run.json").is_file() or Path(sweep_dir / "1" / "run.json").is_file()


@pytest.mark.parametrize(("num_classes", "with_masks"), [(3, True), (1203, False)])
def test_validation_overlays_draw_masks_up_to_255_classes_and_boxes_always(num_classes, with_masks, monkeypatch):
    import torch

    from iemask.callbacks import WandbValidationImages

    logged = {}

    class Recorder:
        def log_image(self, key, images, step, **overlays):
            logged.update(key=key, images=images, step=step, **overlays)

    callback = WandbValidationImages(num_images=1)
    monkeypatch.setattr(WandbValidationImages, "_logger", staticmethod(lambda trainer: Recorder()))
    label = num_classes  # the last class id: 1203 does not fit an 8-bit class map
    mask = torch.zeros(1, 32, 32)
    mask[:, 4:20, 6:24] = 1
    instances = {"boxes": torch.tensor([[6.0, 4.0, 24.0, 20.0]]), "labels": torch.tensor([label]), "masks": mask}
    callback._items = [(torch.rand(3, 32, 32), {**instances, "scores": torch.tensor([0.9])}, instances)]
    trainer = type("Trainer", (), {"is_global_zero": True, "global_step": 7})()
    module = type("Module", (), {"class_names": [f"c{i}" for i in range(num_classes)]})()
    callback.on_validation_epoch_end(trainer, module)
    assert logged["key"] == "val/examples" and logged["step"] == 7 and len(logged["images"]) == 1
    box = logged["boxes"][0]["predictions"]["box_data"][0]
    assert box["class_id"] == label and box["position"] == {"minX": 6.0, "minY": 4.0, "maxX": 24.0, "maxY": 20.0}
    assert ("masks" in logged) == with_masks
    if with_masks:
        label_map = logged["masks"][0]["predictions"]["mask_data"]
        assert label_map[10, 10] == label and label_map[0, 0] == 0 and label_map.sum() == label * 16 * 18
