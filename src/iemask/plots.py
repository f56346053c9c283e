"""Figures of ``python -m iemask.report --plots``: training curves and precision-recall curves of a run, segm
AP across a sweep.

Drawn with matplotlib's Agg canvas (no pyplot, no display, no global backend switch). Per run, from its CSV
logs (``csv/**/metrics.csv`` of Lightning's CSVLogger): the training losses, the learning rate and the
validation AP over steps; from its ``pr_curves.json`` (the last evaluation's, written by ``iemask.train`` and
``iemask.eval``): a precision-recall figure per IoU type, precision averaged over the classes at IoU 0.50,
0.75 and over 0.50:0.95. Cityscapes runs have no ``pr_curves.json``: their official AP is not computed from
COCO's interpolated precision arrays, so none is drawn. Per sweep: a bar chart of mask AP per configuration,
mean with error bars over seeds, the all-switches-off baseline marked.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from iemask.evaluation.base import PR_CURVES_FILE
from iemask.evaluation.common import PR_CURVE_IOUS
from iemask.report import IOU_LABELS, IOU_TYPES, RunGroup, is_run_folder

FIGSIZE = (8.0, 4.5)  # inches
DPI = 100  # so a figure is 800 × 450 pixels

Series = dict[str, list[tuple[int, float]]]


def read_csv_logs(run_dir: str | Path) -> Series:
    """Every logged metric of a run as (step, value) pairs sorted by step; a resumed run's later logs win."""
    by_step: dict[str, dict[int, float]] = {}
    for path in sorted(Path(run_dir).glob("csv/**/metrics.csv")):
        with path.open(newline="") as file:
            for row in csv.DictReader(file):
                step = int(float(row["step"]))
                for key, value in row.items():
                    if key not in ("epoch", "step") and value not in ("", None):
                        by_step.setdefault(key, {})[step] = float(value)
    return {key: sorted(values.items()) for key, values in by_step.items()}


def _figure() -> tuple[Figure, object]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _line_plot(curves: Series, title: str, ylabel: str, path: Path) -> Path:
    fig, ax = _figure()
    for label, points in curves.items():
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="o", markersize=3, label=label)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_pr_curves(run_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """``pr_<iou type>.png`` in ``out_dir`` for each IoU type of the run's ``pr_curves.json`` (none without one):
    the class-averaged precision against recall at each IoU of ``PR_CURVE_IOUS``, its mean (that AP) in the
    legend; undefined points (-1, no class with ground truth) are left out, and an IoU type without a defined
    point gets no figure."""
    path = Path(run_dir) / PR_CURVES_FILE
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        recall, max_dets, curves = data["recall"], data["max_dets"], data["curves"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(
            f"{path} is not a precision-recall file ({error!r}): expected recall, max_dets and curves as "
            "iemask.train / iemask.eval write them; delete it or evaluate the run again"
        ) from error
    written = []
    for iou_type, by_iou in curves.items():
        defined = {
            label: [(r, p) for r, p in zip(recall, by_iou[label], strict=True) if p >= 0] for label in PR_CURVE_IOUS
        }
        if not any(defined.values()):
            continue
        fig, ax = _figure()
        for label, points in defined.items():
            if points:
                ap = 100 * sum(p for _, p in points) / len(points)
                ax.plot(*zip(*points, strict=True), label=f"IoU {label} (AP {ap:.1f})")
        ax.set(
            title=f"{IOU_LABELS.get(iou_type, iou_type)} precision-recall (mean over classes, all areas, "
            f"{max_dets} detections per image)",
            xlabel="recall",
            ylabel="precision",
            xlim=(0, 1),
            ylim=(0, 1.02),
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        written.append(_save(fig, Path(out_dir) / f"pr_{iou_type}.png"))
    return written


def plot_run(run_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """``loss.png``, ``lr.png`` and ``val_ap.png`` of one run in ``out_dir``, those its CSV logs have data for,
    then its precision-recall figures (:func:`plot_pr_curves`)."""
    series, out = read_csv_logs(run_dir), Path(out_dir)
    written = []
    losses = {k: v for k, v in sorted(series.items()) if k.startswith("train/loss")}
    if losses:
        written.append(_line_plot(losses, "training losses", "loss", out / "loss.png"))
    rates = {k: v for k, v in sorted(series.items()) if k.endswith("/lr") or k.startswith("lr-")}
    if rates:
        written.append(_line_plot(rates, "learning rate", "lr", out / "lr.png"))
    aps = {  # ×100, without COCO's -1 (undefined)
        f"{IOU_LABELS[t]} AP": [(s, 100 * v) for s, v in series.get(f"val/{t}/AP", []) if v >= 0] for t in IOU_TYPES
    }
    aps = {k: v for k, v in aps.items() if v}
    if aps:
        written.append(_line_plot(aps, "validation AP", "AP (%)", out / "val_ap.png"))
    return written + plot_pr_curves(run_dir, out)


def plot_sweep(groups: list[RunGroup], path: str | Path, iou_type: str = "segm") -> Path | None:
    """A bar per configuration: mean AP with ± std error bars over seeds, the baseline hatched and drawn as a
    dashed line. ``None`` (nothing written) when no configuration has that AP."""
    key = f"{iou_type}/AP"
    bars = [g for g in groups if g.mean(key) is not None]
    if not bars:
        return None
    fig, ax = _figure()
    labels = [f"{g.first.name}\n#{g.jobs}" for g in bars]
    heights = [g.mean(key) for g in bars]
    errors = [g.std(key) or 0.0 for g in bars]
    colours = ["tab:gray" if g.is_baseline else "tab:blue" for g in bars]
    drawn = ax.bar(range(len(bars)), heights, yerr=errors, capsize=4, color=colours)
    for bar, group in zip(drawn, bars, strict=True):
        if group.is_baseline:
            bar.set_hatch("//")
            bar.set_label("baseline (all switches off)")
            ax.axhline(group.mean(key), color="tab:gray", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(bars)), labels, rotation=30, ha="right", fontsize="small")
    ax.set(title=f"{IOU_LABELS[iou_type]} AP per configuration (mean ± std over seeds)", ylabel="AP (%)")
    ax.grid(axis="y", alpha=0.3)
    if any(g.is_baseline for g in bars):
        ax.legend(fontsize="small")
    return _save(fig, Path(path))


def plot_report(run_dir: str | Path, groups: list[RunGroup], out_dir: str | Path) -> list[Path]:
    """The figures of ``report --plots``: a run's curves, or a sweep's bar chart and each job's curves."""
    out = Path(out_dir)
    if is_run_folder(Path(run_dir)):
        return plot_run(run_dir, out)
    written = [path for path in [plot_sweep(groups, out / "segm_ap.png")] if path is not None]
    for group in groups:
        for row in group.runs:
            written += plot_run(row.path, out / row.job)
    return written
