"""``python -m iemask.report <run or multirun dir> [--format markdown|csv] [--plots [--out DIR]]``: the ablation table.

Reads every job folder of a Hydra multirun, or one run folder (``metrics.json`` and ``run.json`` written by
``iemask.train``; no W&B needed) and prints one row per configuration, laid out like the paper's Table 3: a
column per switch (:mod:`iemask.models.switches`), mask and box AP, AP50, AP75, APs, APm, APl, parameters, and
the model variant (``paper`` or the authors' ``official`` modules, :mod:`iemask.models.official`).
Jobs that differ only in ``seed`` share a row (mean ± std over their n seeds); the AP difference Δ is taken
against the row with every switch off and otherwise the same config, when the sweep has one. Undefined
values (COCO's -1, e.g. APl without large objects) show as "–". ``--plots`` also draws the figures of
:mod:`iemask.plots`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iemask.loggers import run_name
from iemask.models.switches import SWITCH_NAMES, SWITCHES, switch_values

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("segm", "bbox")
IOU_LABELS = {"segm": "mask", "bbox": "box"}
UNDEFINED = "–"


@dataclass
class RunRow:
    """One job folder: its switches, metrics (``segm/AP``... ×100, undefined ones left out), seed and size."""

    job: str
    path: Path
    switches: dict[str, bool]
    metrics: dict[str, float]
    params_m: float | None
    status: str = "done"
    backbone: str | None = None
    variant: str = "paper"  # model.variant: the paper's modules or the authors' released ones
    seed: int | None = None
    config_key: str = ""  # the job's config without its seed: jobs with equal keys are seeds of one row
    baseline_key: str = ""  # the config without seed and switches: finds the all-off row to compare with

    @property
    def name(self) -> str:
        """The W&B run name of these switches, e.g. ``iemask-CGBAH-resnet50`` or ``mask_rcnn-resnet50-official``."""
        return run_name(self.switches, self.backbone or "?", self.variant)


@dataclass
class RunGroup:
    """The jobs of one configuration (its seeds), summarised as one table row."""

    runs: list[RunRow]
    baseline: RunGroup | None = field(default=None, repr=False)

    @property
    def first(self) -> RunRow:
        return self.runs[0]

    @property
    def done(self) -> list[RunRow]:
        return [r for r in self.runs if r.status == "done"]

    @property
    def n(self) -> int:
        """How many of the jobs finished (the seeds averaged over)."""
        return len(self.done)

    @property
    def status(self) -> str:
        return "done" if self.done else self.first.status

    @property
    def jobs(self) -> str:
        return " ".join(r.job for r in self.runs)

    @property
    def is_baseline(self) -> bool:
        return self.baseline is self

    def values(self, key: str) -> list[float]:
        return [r.metrics[key] for r in self.done if key in r.metrics]

    def mean(self, key: str) -> float | None:
        """Mean of ``key`` (e.g. ``segm/AP``) over the finished seeds; ``None`` where undefined."""
        values = self.values(key)
        return statistics.fmean(values) if values else None

    def std(self, key: str) -> float | None:
        """Sample standard deviation over the seeds; ``None`` with fewer than two."""
        values = self.values(key)
        return statistics.stdev(values) if len(values) > 1 else None

    def delta(self, iou_type: str) -> float | None:
        """AP minus the baseline's AP for ``iou_type``; ``None`` without a baseline or a value."""
        if self.baseline is None:
            return None
        ours, base = self.mean(f"{iou_type}/AP"), self.baseline.mean(f"{iou_type}/AP")
        return None if ours is None or base is None else ours - base


def _load_config(job: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    config = job / ".hydra" / "config.yaml"
    return OmegaConf.to_container(OmegaConf.load(config)) if config.is_file() else {}


def _key(config: dict[str, Any], drop_switches: bool) -> str:
    config = {k: v for k, v in config.items() if k != "seed"}
    if drop_switches and isinstance(config.get("model"), dict):
        config["model"] = {k: v for k, v in config["model"].items() if k not in SWITCH_NAMES}
    return json.dumps(config, sort_keys=True, default=str)


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` is one run's folder (rather than a multirun's)."""
    return (path / "metrics.json").is_file() or (path / "run.json").is_file()


def read_run(job: Path) -> RunRow:
    """The row of one run folder: done, skipped (``skipped.json``) or unfinished (no ``metrics.json``)."""
    summary = json.loads((job / "run.json").read_text()) if (job / "run.json").is_file() else {}
    config = _load_config(job)
    model = config.get("model") or {}
    row = RunRow(
        job.name,
        job,
        summary.get("switches") or switch_values(model),
        {},
        summary.get("params_m"),
        backbone=summary.get("backbone") or model.get("backbone"),
        variant=summary.get("variant") or model.get("variant") or "paper",
        seed=config.get("seed"),
        config_key=_key(config, drop_switches=False) if config else job.name,
        baseline_key=_key(config, drop_switches=True) if config else job.name,
    )
    if (job / "skipped.json").is_file():
        row.status = "skipped: " + json.loads((job / "skipped.json").read_text())["reason"]
    elif not (job / "metrics.json").is_file():
        row.status = "unfinished"
    else:
        metrics = json.loads((job / "metrics.json").read_text())
        row.metrics = {
            key: 100 * metrics[key]
            for key in (f"{t}/{m}" for t in IOU_TYPES for m in METRICS)
            if metrics.get(key) is not None and metrics[key] >= 0
        }
    return row


def collect_runs(root: str | Path) -> list[RunRow]:
    """One row per job folder under ``root`` (sorted by job number), or the one row of a run folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"run or multirun folder not found: {root}")
    if is_run_folder(root):
        return [read_run(root)]
    jobs = [p for p in root.iterdir() if p.is_dir() and ((p / ".hydra").is_dir() or (p / "run.json").is_file())]
    if not jobs:
        raise FileNotFoundError(
            f"no job folders (with .hydra/ or run.json) under {root}, nor metrics.json/run.json in it: "
            "is it a run or multirun folder?"
        )
    jobs.sort(key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else p.name))
    return [read_run(job) for job in jobs]


def group_runs(rows: list[RunRow]) -> list[RunGroup]:
    """Rows that differ only in seed as one group each (in job order), each linked to its all-off baseline."""
    groups: dict[str, RunGroup] = {}
    for row in rows:
        groups.setdefault(row.config_key, RunGroup([])).runs.append(row)
    baselines = {g.first.baseline_key: g for g in groups.values() if g.done and not any(g.first.switches.values())}
    for group in groups.values():
        group.baseline = baselines.get(group.first.baseline_key)
    return list(groups.values())


def _number(value: float | None, std: float | None = None) -> str:
    if value is None:
        return UNDEFINED
    return f"{value:.2f} ± {std:.2f}" if std is not None else f"{value:.2f}"


def _delta(group: RunGroup, iou_type: str) -> str:
    if group.is_baseline:
        return "base"
    delta = group.delta(iou_type)
    return UNDEFINED if delta is None else f"{delta:+.2f}"


def _raw(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def format_ablation_table(groups: list[RunGroup], fmt: str = "markdown", iou_types: tuple[str, ...] = IOU_TYPES) -> str:
    """Markdown (✓ marks and "mean ± std", as Table 3) or CSV (1/0 switches, mean, std and Δ columns)."""
    with_delta = any(g.baseline is not None for g in groups)
    switch_headers = [s.header for s in SWITCHES]
    if fmt == "csv":
        metric_header = []
        for t in iou_types:
            for m in METRICS:
                metric_header += [f"{t}/{m}", f"{t}/{m}_std"] + ([f"{t}/{m}_delta"] if m == "AP" else [])
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["name", "jobs", *switch_headers, "n", *metric_header, "params_m", "variant", "status"])
        for g in groups:
            cells = []
            for t in iou_types:
                for m in METRICS:
                    cells += [_raw(g.mean(f"{t}/{m}")), _raw(g.std(f"{t}/{m}"))]
                    cells += [_raw(g.delta(t))] if m == "AP" else []
            switches = ["1" if g.first.switches.get(s.name) else "0" for s in SWITCHES]
            params = _raw(g.first.params_m)
            writer.writerow([g.first.name, g.jobs, *switches, g.n, *cells, params, g.first.variant, g.status])
        return buffer.getvalue()
    if fmt != "markdown":
        raise ValueError(f"unknown format {fmt!r}: markdown or csv")
    metric_header = []
    for t in iou_types:
        label = IOU_LABELS[t]
        for m in METRICS:
            metric_header += [f"{label} {m}"] + ([f"Δ {label} AP"] if m == "AP" and with_delta else [])
    header = ["name", "jobs", *switch_headers, "n", *metric_header, "params (M)", "variant"]
    align = ["---", "---"] + [":-:"] * len(SWITCHES) + ["---:"] * (len(header) - 2 - len(SWITCHES))
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    for g in groups:
        cells: list[str] = []
        for t in iou_types:
            for m in METRICS:
                cells.append(_number(g.mean(f"{t}/{m}"), g.std(f"{t}/{m}")))
                cells += [_delta(g, t)] if m == "AP" and with_delta else []
        if not g.done:
            cells = [g.status] + [""] * (len(cells) - 1)
        switches = ["✓" if g.first.switches.get(s.name) else "" for s in SWITCHES]
        params = f"{g.first.params_m:.1f}" if g.first.params_m is not None else UNDEFINED
        row = [g.first.name, g.jobs, *switches, str(g.n), *cells, params, g.first.variant]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m iemask.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a Hydra multirun folder (runs/train/multirun/<date>) or one run folder")
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    parser.add_argument(
        "--iou-type", choices=("both", *IOU_TYPES), default="both", help="metrics shown (default: mask and box)"
    )
    parser.add_argument("--plots", action="store_true", help="also write PNG figures (matplotlib)")
    parser.add_argument("--out", help="folder for the figures (default: <run_dir>/plots)")
    args = parser.parse_args(argv)
    groups = group_runs(collect_runs(args.run_dir))
    iou_types = IOU_TYPES if args.iou_type == "both" else (args.iou_type,)
    print(format_ablation_table(groups, args.format, iou_types))
    if args.plots:
        from iemask.plots import plot_report

        for path in plot_report(args.run_dir, groups, Path(args.out or Path(args.run_dir) / "plots")):
            print(f"wrote {path}", file=sys.stderr)  # stdout stays the table


if __name__ == "__main__":
    main()
