"""Model analysis: parameters, FLOPs and latency per model part (the paper's Table 8).

FLOPs are counted by ``torch.utils.flop_counter`` on one inference forward and reported
as multiply-accumulates, the convention of fvcore/Detectron2 and of the paper (one fused
multiply-add = one FLOP). Inference work depends on how many detections reach the mask
head, so every measurement forces a fixed detection count (see :func:`iemask.benchmarking.timing.fixed_detections`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection import MaskRCNN

from iemask.benchmarking.timing import check_detections, fixed_detections, interleaved, summarize
from iemask.models import count_parameters
from iemask.models.parts import model_parts, part_label, part_modules


@dataclass
class ModelStats:
    """Size and cost of one model at one input size and detection count."""

    params_m: float
    flops_g: float
    latency_ms: float | None
    latency_spread_ms: tuple[float, float] | None
    detections: int
    input_size: tuple[int, int]
    device: str
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)  # part key -> label, params_m, flops_g

    def to_dict(self) -> dict:
        return asdict(self)


def _part_params(model: nn.Module) -> dict[str, float]:
    return {part.key: sum(count_parameters(m) for m in part_modules(model, part)) / 1e6 for part in model_parts(model)}


def count_flops(model: MaskRCNN, images: list[torch.Tensor]) -> tuple[float, dict[str, float]]:
    """Multiply-accumulates (G) of one inference forward, in total and per part the model has
    (:func:`iemask.models.parts.model_parts`)."""
    with torch.no_grad(), FlopCounterMode(display=False, depth=None) as counter:
        model(images)
    per_module = {
        name.split(".", 1)[1]: sum(ops.values()) for name, ops in counter.get_flop_counts().items() if "." in name
    }
    parts = {part.key: sum(per_module.get(p, 0) for p in part.modules) / 2e9 for part in model_parts(model)}
    return counter.get_total_flops() / 2e9, parts


def measure_latency(
    model: MaskRCNN, images: list[torch.Tensor], warmup: int = 2, repeats: int = 5
) -> tuple[float, tuple[float, float]]:
    """Median and (min, max) milliseconds per image of the full inference call.

    The call includes torchvision's pre-processing (normalise, resize, batch) and the
    post-processing that pastes masks back at image resolution. Warm-up runs are discarded.
    """
    calls = {"model": lambda: model(images)}
    with torch.no_grad():
        interleaved(calls, images[0].device, warmup)
        seconds = interleaved(calls, images[0].device, repeats)["model"]
    ms = summarize([1000 * s / len(images) for s in seconds])
    return ms["median"], (ms["min"], ms["max"])


def analyze_model(
    model: MaskRCNN,
    height: int = 800,
    width: int = 1216,
    detections: int = 35,
    warmup: int = 2,
    repeats: int = 5,
    device: str | torch.device = "cpu",
    latency: bool = True,
    seed: int = 0,
) -> ModelStats:
    """Parameters, FLOPs and latency of ``model`` on a ``height``×``width`` image.

    The model's test-time resize is set to the input size so the counted work is at exactly
    ``height``×``width`` (800×1216 by default, as in the paper).
    """
    device = torch.device(device)
    model = model.eval().to(device)
    generator = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, height, width, generator=generator).to(device)]
    transform = model.transform
    saved = transform.min_size, transform.max_size
    transform.min_size, transform.max_size = (min(height, width),), max(height, width)
    try:
        with fixed_detections(model, detections):
            check_detections(model(images), detections)
            flops, part_flops = count_flops(model, images)
            median, spread = measure_latency(model, images, warmup, repeats) if latency else (None, None)
    finally:
        transform.min_size, transform.max_size = saved
    part_params = _part_params(model)
    parts = {
        p.key: {"label": part_label(model, p), "params_m": part_params[p.key], "flops_g": part_flops[p.key]}
        for p in model_parts(model)
    }
    return ModelStats(
        params_m=count_parameters(model) / 1e6,
        flops_g=flops,
        latency_ms=median,
        latency_spread_ms=spread,
        detections=detections,
        input_size=(height, width),
        device=str(device),
        parts=parts,
    )


def format_model_table(name: str, stats: ModelStats) -> str:
    """A Markdown table of per-part parameters and FLOPs with the totals and latency."""
    lines = [
        f"{name}: {stats.input_size[0]}×{stats.input_size[1]}, {stats.detections} detections, {stats.device}",
        "",
        "| part | params (M) | FLOPs (G) |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {v['label']} | {v['params_m']:.2f} | {v['flops_g']:.2f} |" for v in stats.parts.values()]
    lines.append(f"| **total** | **{stats.params_m:.2f}** | **{stats.flops_g:.2f}** |")
    if stats.latency_ms is not None:
        lo, hi = stats.latency_spread_ms
        lines += ["", f"latency: {stats.latency_ms:.1f} ms/img (median; min {lo:.1f}, max {hi:.1f})"]
    return "\n".join(lines)
