"""What a benchmark result says and where it was taken: machine metadata, ratios and Markdown tables."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from typing import Any

import torch
import torchvision

from iemask.benchmarking.models import CPU_MEMORY_NOTE, SHARES
from iemask.utils.config import CONFIG_DIR

LABELS = {"mask_rcnn": "Mask R-CNN", "iemask_dagger": "IEMask†", "iemask": "IEMask"}  # model preset -> table label


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name with the CPU count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"{name} ({os.cpu_count()} CPUs)"


def git_commit() -> str | None:
    """The repository's commit (``-dirty`` with uncommitted changes), or ``None`` outside a git checkout."""
    repo = CONFIG_DIR.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "src", "conf"],  # new files count too
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def machine_meta(device: torch.device, preset: str | None, command: str | None) -> dict[str, Any]:
    """Where and with what a result was taken: device name, torch versions, commit, command line and preset."""
    return {
        "device_name": device_name(device),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "git_commit": git_commit(),
        "command": command,
        "preset": preset,
    }


def ratios(result: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """One model's figures over the baseline's: parameters, training step, images/s and memory, ms/img."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    train, base_train = result["train"], baseline["train"]
    return {
        "params": ratio(result["params_m"], baseline["params_m"]),
        "train_step_time": ratio(train["step_ms"]["median"], base_train["step_ms"]["median"]),
        "train_images_per_sec": ratio(train["images_per_sec"]["median"], base_train["images_per_sec"]["median"]),
        "train_peak_memory": ratio(train["peak_memory_mb"], base_train["peak_memory_mb"]),
        "infer_ms_per_img": {
            d: ratio(v["ms_per_img"]["median"], baseline["infer"][d]["ms_per_img"]["median"])
            for d, v in result["infer"].items()
        },
    }


def _spread(s: dict[str, float], digits: int = 1) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}–{s['max']:.{digits}f}]"


def _times(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def format_report(result: dict[str, Any]) -> str:
    """Markdown tables of the result: speed with ratios to the baseline, time shares, pipeline and evaluation."""
    meta, models = result["meta"], result["models"]
    counts = list(next(iter(models.values()))["infer"])
    lines = [
        f"{meta['device_name']} ({meta['device']}), torch {meta['torch']}, preset {meta['preset']}, "
        f"precision {meta['precision']}, channels_last {meta['channels_last']}, compile {list(meta['compile'])}",
        "",
        "| model | params (M) | train img/s | step time | peak MB | "
        + " | ".join(f"ms/img @{d} | ×" for d in counts)
        + " |",
        "| --- | ---: | ---: | ---: | ---: | " + " | ".join("---: | ---:" for _ in counts) + " |",
    ]
    for r in models.values():
        train, ratios = r["train"], r["ratios"]
        peak = "n/a" if train["peak_memory_mb"] is None else f"{train['peak_memory_mb']:.0f}"
        cells = [
            r["label"],
            f"{r['params_m']:.1f}",
            _spread(train["images_per_sec"], 2),
            _times(ratios["train_step_time"]),
            peak,
            *(f"{_spread(r['infer'][d]['ms_per_img'])} | {_times(ratios['infer_ms_per_img'][d])}" for d in counts),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| model @ detections | " + " | ".join(SHARES) + " |", "| --- |" + " ---: |" * len(SHARES)]
    for r in models.values():
        for d in counts:
            shares = r["infer"][d]["shares"]
            lines.append(f"| {r['label']} @{d} | " + " | ".join(f"{100 * shares[p]:.0f} %" for p in SHARES) + " |")
    pipe, ev = result["pipeline"], result["eval"]
    rates = ", ".join(f"{w} workers: {v:.1f}" for w, v in pipe["images_per_sec"].items())
    lines += [
        "",
        f"input pipeline ({pipe['dataset']}), images/s: {rates}; at {pipe['training_workers']} workers it "
        f"{'keeps' if pipe['keeps_up'] else 'does not keep'} up (needs ≥ {pipe['required_images_per_sec']:.1f})",
        f"evaluation of {ev['num_images']} images × {ev['detections_per_image']} detections: "
        f"COCO {ev['coco_s']:.2f} s, LVIS {ev['lvis_s']:.2f} s",
    ]
    if any(r["train"]["peak_memory_mb"] is None for r in models.values()):
        lines.append(CPU_MEMORY_NOTE)
    return "\n".join(lines)
