"""``python -m iemask.report``: the ablation table (–, Δ, mean ± std over seeds, names) and its ``--plots``."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHAPES_TINY, TINY_OVERRIDES, compose_config
from iemask.models.switches import SWITCH_NAMES
from iemask.plots import DPI, FIGSIZE
from iemask.report import collect_runs, format_ablation_table, group_runs, main
from iemask.train import train

SIZE = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))


def assert_png(path: Path) -> None:
    """An RGB(A) image of the figure size that is not a single flat colour."""
    with Image.open(path) as image:
        assert image.mode in ("RGB", "RGBA") and image.size == SIZE
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.var() > 0 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10


def write_job(job: Path, switches: str, seed: int, ap: float | None, apl: float = 0.5, log: bool = False) -> None:
    """A job folder as ``iemask.train`` leaves it; ``switches``: the letters on; ``ap=None``: unfinished; ``log``:
    with CSV logs, and precision-recall curves for segm (bbox's undefined: no class with ground truth)."""
    on = {name: letter in switches for name, letter in zip(SWITCH_NAMES, "CGBAH", strict=True)}
    (job / ".hydra").mkdir(parents=True)
    config = {"seed": seed, "model": {**on, "backbone": "resnet50"}, "data": {"name": "coco"}}
    (job / ".hydra" / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    (job / "run.json").write_text(json.dumps({"switches": on, "backbone": "resnet50", "params_m": 44.4}))
    if ap is not None:
        metrics = {f"{t}/{m}": ap for t in ("segm", "bbox") for m in ("AP", "AP50", "AP75", "APs", "APm")}
        (job / "metrics.json").write_text(json.dumps({**metrics, "segm/APl": apl, "bbox/APl": apl}))
    if log:
        (job / "csv").mkdir()
        rows = ["epoch,step,train/loss,train/lr,val/segm/AP,val/bbox/AP"]
        rows += [f"0,{s},{2 / (s + 1)},{0.01 * min(1, s / 4)},," for s in range(10)]
        rows += ["0,4,,,0.1,0.12", "0,9,,,0.2,-1.0"]
        (job / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
        recall = np.linspace(0, 1, 101)
        segm = {"0.50": 1 - recall**3, "0.75": 0.8 * (1 - recall**2), "0.50:0.95": 0.6 * (1 - recall)}
        curves = {"segm": {k: v.tolist() for k, v in segm.items()}, "bbox": {k: [-1.0] * 101 for k in segm}}
        (job / "pr_curves.json").write_text(json.dumps({"recall": recall.tolist(), "max_dets": 100, "curves": curves}))


@pytest.fixture
def sweep(tmp_path) -> Path:
    """Mask R-CNN and all five switches over three seeds each, one seed of ``B``, a skipped and an unfinished job."""
    root = tmp_path / "multirun"
    for seed, ap in enumerate((0.30, 0.32, 0.34)):
        write_job(root / str(2 * seed), "", seed, ap, log=seed == 0)
        write_job(root / str(2 * seed + 1), "CGBAH", seed, ap + 0.05)
    write_job(root / "6", "B", 0, 0.31, apl=-1.0)
    write_job(root / "7", "A", 0, None)
    (root / "7" / "skipped.json").write_text(json.dumps({"reason": "aff=true needs bottom_up=true"}))
    write_job(root / "8", "C", 0, None)
    return root


def test_sweep_table_groups_seeds_with_mean_std_delta_and_dashes(sweep, capsys):
    main([str(sweep)])
    lines = capsys.readouterr().out.splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:8] == ["name", "jobs", "CEM", "GIM", "BU", "AFF", "EDH", "n"]
    assert header[8:10] == ["mask AP", "Δ mask AP"] and "box AP" in header and "Δ box AP" in header
    rows = {cells[0]: dict(zip(header, cells, strict=True)) for cells in (
        [cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]
    )}  # fmt: skip
    assert list(rows) == [
        "mask_rcnn-resnet50", "iemask-CGBAH-resnet50", "iemask-B-resnet50", "iemask-A-resnet50", "iemask-C-resnet50"
    ]  # fmt: skip
    base, full, b, skipped, unfinished = rows.values()
    assert base["jobs"] == "0 2 4" and base["n"] == "3" and base["mask AP"] == "32.00 ± 2.00"
    assert base["Δ mask AP"] == "base" and base["box APl"] == "50.00 ± 0.00"
    assert full["jobs"] == "1 3 5" and full["mask AP"] == "37.00 ± 2.00" and full["Δ mask AP"] == "+5.00"
    assert full["CEM"] == full["EDH"] == "✓" and base["CEM"] == "" and full["params (M)"] == "44.4"
    assert b["mask AP"] == "31.00" and b["Δ box AP"] == "-1.00" and b["mask APl"] == b["box APl"] == "–"
    assert skipped["mask AP"] == "skipped: aff=true needs bottom_up=true" and skipped["n"] == "0"
    assert unfinished["mask AP"] == "unfinished"
    assert "-100" not in "\n".join(lines)


def test_sweep_csv_keeps_machine_readable_columns(sweep):
    rows = list(csv.DictReader(io.StringIO(format_ablation_table(group_runs(collect_runs(sweep)), "csv"))))
    full = next(row for row in rows if row["name"] == "iemask-CGBAH-resnet50")
    assert full["CEM"] == "1" and full["n"] == "3" and full["status"] == "done"
    assert float(full["segm/AP"]) == pytest.approx(37.0) and float(full["segm/AP_std"]) == pytest.approx(2.0)
    assert float(full["segm/AP_delta"]) == pytest.approx(5.0) and float(full["bbox/AP_delta"]) == pytest.approx(5.0)
    b = next(row for row in rows if row["name"] == "iemask-B-resnet50")
    assert b["segm/APl"] == "" and b["segm/AP_std"] == "" and b["params_m"] == "44.4000"


def test_a_sweep_without_baseline_has_no_delta_column(sweep, capsys):
    for job in ("0", "2", "4"):
        (sweep / job / "metrics.json").unlink()  # the baseline is unfinished: nothing to compare with
    main([str(sweep), "--iou-type", "segm"])
    lines = capsys.readouterr().out.splitlines()
    assert "Δ" not in lines[0] and "box AP" not in lines[0] and "| mask_rcnn-resnet50 | 0 2 4 |" in lines[2]


def test_sweep_plots(sweep, tmp_path, capsys):
    out = tmp_path / "figures"
    main([str(sweep), "--plots", "--out", str(out)])
    written = capsys.readouterr().err.split()
    expected = [out / "segm_ap.png", *(out / "0" / f for f in ("loss.png", "lr.png", "val_ap.png", "pr_segm.png"))]
    assert [Path(p) for p in written if p.endswith(".png")] == expected  # only job 0 has CSV logs and PR curves
    for path in expected:
        assert_png(path)


def test_report_and_plots_of_a_real_run(shapes_cache, tmp_path, capsys):
    overrides = [o for o in TINY_OVERRIDES if o != "logger=none"] + [
        *SHAPES_TINY, "logger=csv", f"data.cache_dir={shapes_cache}", "schedule.max_iters=4",
        "schedule.reference_batch_size=2", "schedule.eval_period=2", "trainer.log_every_n_steps=1",
    ]  # fmt: skip
    run_dir = tmp_path / "run"
    train(compose_config("train", overrides, run_dir))
    main([str(run_dir), "--plots"])
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    (row,) = collect_runs(run_dir)
    assert len(lines) == 3 and lines[2].startswith(f"| {row.name} | run |") and " 1 | " in lines[2]
    assert "–" in lines[2]  # 64 px shapes have no large objects: APl is undefined
    written = [Path(p) for p in captured.err.split() if p.endswith(".png")]
    names = ("loss.png", "lr.png", "val_ap.png", "pr_bbox.png", "pr_segm.png")
    assert written == [run_dir / "plots" / name for name in names]
    for path in written:
        assert_png(path)
    # The final validation's curves: each one's mean over the recall points is the AP in metrics.json.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    pr = json.loads((run_dir / "pr_curves.json").read_text())
    assert len(pr["recall"]) == 101 and pr["max_dets"] == 100 and not any(k.startswith("pr") for k in metrics)
    for iou_type in ("bbox", "segm"):
        for label, metric in (("0.50", "AP50"), ("0.75", "AP75"), ("0.50:0.95", "AP")):
            assert np.mean(pr["curves"][iou_type][label]) == pytest.approx(metrics[f"{iou_type}/{metric}"], abs=1e-9)


def test_a_malformed_pr_curves_file_is_named(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "pr_curves.json").write_text(json.dumps({"recall": [0.0, 1.0]}))
    with pytest.raises(ValueError, match=r"pr_curves\.json is not a precision-recall file.*curves"):
        main([str(tmp_path), "--plots"])
