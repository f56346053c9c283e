"""``python -m iemask.report <multirun dir> [--format markdown|csv]``: the ablation table.

Reads every job folder of a Hydra multirun (``metrics.json`` and ``run.json`` written by
``iemask.train``; no W&B needed) and prints one row per configuration, laid out like the
paper's Table 3: a column per switch (:mod:`iemask.models.switches`), mask AP, AP50, AP75,
APs, APm, APl, and parameters.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from iemask.models.switches import SWITCHES, switch_values

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@dataclass
class RunRow:
    """One job of the sweep: its folder, switches, mask metrics (×100) and size."""

    job: str
    switches: dict[str, bool]
    metrics: dict[str, float]
    params_m: float | None
    status: str = "done"


def _switches_from_hydra(job: Path) -> dict[str, bool]:
    from omegaconf import OmegaConf

    config = job / ".hydra" / "config.yaml"
    if not config.is_file():
        return {}
    return switch_values(OmegaConf.load(config).get("model", {}))


def collect_runs(root: str | Path, iou_type: str = "segm") -> list[RunRow]:
    """One row per job folder under ``root`` (sorted by job number), done, skipped or unfinished."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"multirun folder not found: {root}")
    jobs = [p for p in root.iterdir() if p.is_dir() and ((p / ".hydra").is_dir() or (p / "run.json").is_file())]
    if not jobs:
        raise FileNotFoundError(f"no job folders (with .hydra/ or run.json) under {root}; is it a multirun folder?")
    rows = []
    for job in sorted(jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else p.name)):
        summary = json.loads((job / "run.json").read_text()) if (job / "run.json").is_file() else {}
        switches = summary.get("switches") or _switches_from_hydra(job)
        if (job / "skipped.json").is_file():
            reason = json.loads((job / "skipped.json").read_text())["reason"]
            rows.append(RunRow(job.name, switches, {}, None, f"skipped: {reason}"))
            continue
        metrics_file = job / "metrics.json"
        if not metrics_file.is_file():
            rows.append(RunRow(job.name, switches, {}, summary.get("params_m"), "unfinished"))
            continue
        metrics = json.loads(metrics_file.read_text())
        values = {m: 100 * metrics[f"{iou_type}/{m}"] for m in METRICS if f"{iou_type}/{m}" in metrics}
        rows.append(RunRow(job.name, switches, values, summary.get("params_m")))
    return rows


def _cells(row: RunRow, mark: str) -> list[str]:
    switch_cells = [mark if row.switches.get(s.name) else "" for s in SWITCHES]
    if row.status != "done":
        metric_cells = [row.status] + [""] * (len(METRICS) - 1)
    else:
        metric_cells = [f"{row.metrics[m]:.2f}" if m in row.metrics else "-" for m in METRICS]
    params = f"{row.params_m:.1f}" if row.params_m is not None else "-"
    return [row.job, *switch_cells, *metric_cells, params]


def format_ablation_table(rows: list[RunRow], fmt: str = "markdown") -> str:
    """Markdown (✓ marks, as Table 3) or CSV (1/0 switches, for machines)."""
    header = ["job", *(s.header for s in SWITCHES), *METRICS, "params (M)"]
    switch_columns = slice(1, 1 + len(SWITCHES))
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([*header[:-1], "params_m", "status"])
        for row in rows:
            cells = _cells(row, "1")
            cells[switch_columns] = ["1" if row.switches.get(s.name) else "0" for s in SWITCHES]
            if row.status != "done":
                cells[switch_columns.stop : switch_columns.stop + len(METRICS)] = [""] * len(METRICS)
            writer.writerow([*cells, row.status])
        return buffer.getvalue()
    if fmt != "markdown":
        raise ValueError(f"unknown format {fmt!r}: markdown or csv")
    align = ["---"] + [":-:"] * len(SWITCHES) + ["---:"] * (len(METRICS) + 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_cells(row, "✓")) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m iemask.report", description=__doc__.splitlines()[0])
    parser.add_argument("multirun_dir", help="a Hydra multirun folder, e.g. runs/train/multirun/<date>")
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    parser.add_argument("--iou-type", choices=("segm", "bbox"), default="segm", help="metrics shown (default: mask)")
    args = parser.parse_args(argv)
    print(format_ablation_table(collect_runs(args.multirun_dir, args.iou_type), args.format))


if __name__ == "__main__":
    main()
