"""How models are timed on equal work: one timing loop for the benchmark and the model analysis.

A call is timed with the device's queued work finished before and after it (CUDA runs asynchronously);
calls of several models are taken in turn within each round (A, B, C, A, B, C, ...) so that drifts of
the machine (clocks, other jobs) hit them alike. Inference is compared at a fixed number of detections
per image (:func:`fixed_detections`), so that every model's mask head runs on the same number of RoIs.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torchvision.models.detection import MaskRCNN

PRECISIONS = ("32", "bf16")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; a no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds that ``fn`` takes, with the device's queued work finished before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved(
    calls: Mapping[str, Callable[[], Any]],
    device: torch.device,
    rounds: int,
    around: Callable[[str], contextlib.AbstractContextManager] | None = None,
) -> dict[str, list[float]]:
    """Seconds of every call in each of ``rounds`` rounds, the calls taken in turn within a round.

    ``around(name)``, if given, is entered around each call of ``name``, outside the timed span (seeding,
    memory counters). Warm-up is a call of its own whose times are dropped.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            with around(name) if around else contextlib.nullcontext():
                times[name].append(timed(call, device))
    return times


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def precision_context(device: torch.device, precision: str | int) -> contextlib.AbstractContextManager:
    """``32``: nothing; ``bf16``: ``torch.autocast`` to bfloat16 on ``device``'s type."""
    precision = str(precision)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def fixed_detections(model: MaskRCNN, detections: int) -> Iterator[None]:
    """Make ``model`` return exactly ``detections`` boxes per image (no score threshold, no NMS).

    Models are then compared on equal work: the mask head runs on the same number of
    RoIs whatever the weights. Settings are restored on exit.
    """
    heads = model.roi_heads
    saved = heads.score_thresh, heads.nms_thresh, heads.detections_per_img
    heads.score_thresh, heads.nms_thresh, heads.detections_per_img = 0.0, 1.01, detections
    try:
        yield
    finally:
        heads.score_thresh, heads.nms_thresh, heads.detections_per_img = saved


def check_detections(outputs: list[dict[str, torch.Tensor]], detections: int) -> None:
    """Raise unless every image got exactly ``detections`` (models must do equal work to compare)."""
    produced = [len(o["boxes"]) for o in outputs]
    if any(n != detections for n in produced):
        raise RuntimeError(
            f"the model produced {produced} detections instead of {detections} per image; "
            "raise rpn_post_nms_top_n_test so that enough proposals reach the box head"
        )
