"""The compared models: built from the composed ``model`` config, timed in training, inference and per part.

Every model shares the composed ``model`` config (backbone, neck width, resize...) and takes its five
switches from its own model preset (:func:`preset_switches`). The models are built in one
process from the same seed and measured interleaved (:func:`~iemask.benchmarking.timing.interleaved`);
warm-up runs are discarded and every figure is the median with its min and max over repeats. Weights are
random and the inputs synthetic: speed does not depend on what the weights have learnt, and inference is
forced to a fixed number of detections per image so the models do equal work.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import hydra
import torch
from hydra.core.global_hydra import GlobalHydra
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN

from iemask.benchmarking.timing import (
    check_detections,
    fixed_detections,
    interleaved,
    precision_context,
    summarize,
    synchronize,
)
from iemask.models.parts import GROUPS, compile_parts, model_parts, part_modules
from iemask.models.switches import switch_values
from iemask.training.optim import build_sgd
from iemask.utils.config import CONFIG_DIR

# Inference time shares: the part groups of the parts map, and "other", the rest of the call
# (pre-processing, box decoding and NMS, mask paste-back).
SHARES = (*GROUPS, "other")
OPTIMIZER_PATHS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
CPU_MEMORY_NOTE = "peak memory is measured on CUDA only (torch.cuda.max_memory_allocated); not measured on CPU"


def preset_switches(name: str) -> dict[str, bool]:
    """The switches of the model preset ``model=<name>``, as Hydra composes it (its defaults too)."""
    overrides = [f"+model={name}"]
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app
        return switch_values(hydra.compose(overrides=overrides).model)
    with hydra.initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return switch_values(hydra.compose(overrides=overrides).model)


def build_models(
    model: Mapping[str, Any],
    names: Sequence[str],
    device: torch.device,
    compile: Sequence[str] = (),
    compile_dynamic: bool = True,
    seed: int = 0,
) -> dict[str, MaskRCNN]:
    """The model presets ``names`` on ``device``: ``model`` (a resolved model config) with each preset's switches.

    Each is built from the same seed, so their backbone bodies (built first) start from the same
    weights. ``compile`` lists parts for :func:`iemask.models.parts.compile_parts`.
    """
    models = {}
    for name in names:
        torch.manual_seed(seed)
        built = hydra.utils.instantiate({**model, **preset_switches(name)}).to(device)
        if compile:
            compile_parts(built, list(compile), dynamic=compile_dynamic)
        models[name] = built
    return models


def synthetic_batch(
    batch_size: int,
    height: int,
    width: int,
    num_classes: int,
    objects: int = 3,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Random images with ``objects`` random boxes per image, each with a filled-rectangle mask."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    size = torch.tensor([width, height], dtype=torch.float32)
    for _ in range(batch_size):
        images.append(torch.rand(3, height, width, generator=g).to(device))
        corner = torch.rand(objects, 2, generator=g) * size * 0.6
        extent = (0.1 + 0.3 * torch.rand(objects, 2, generator=g)) * size
        boxes = torch.cat([corner, corner + extent], dim=1).floor()
        masks = torch.zeros(objects, height, width, dtype=torch.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist(), strict=True):
            mask[y1:y2, x1:x2] = 1
        labels = torch.randint(1, num_classes + 1, (objects,), generator=g)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device), "masks": masks.to(device)})
    return images, targets


def _check_runs(warmup: int, repeats: int, min_warmup: int, why: str) -> None:
    if warmup < min_warmup or repeats < 1:
        raise ValueError(f"need warmup >= {min_warmup} ({why}) and repeats >= 1, got {warmup=}, {repeats=}")


# ---- training --------------------------------------------------------------------------------
def _resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the model's parameters and buffers and of the optimizer's state."""
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, Tensor)]
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers(), *state))


def measure_training(
    models: Mapping[str, MaskRCNN],
    images: list[Tensor],
    targets: list[dict[str, Tensor]],
    warmup: int = 1,
    repeats: int = 5,
    precision: str | int = 32,
    optimizer: str | None = None,
    lr: float = 0.0,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Training images/s and peak memory of one step (forward, backward, SGD step) per model.

    Every step re-seeds torch so that the RoI sampler draws the same RoIs each time, and the default
    learning rate is 0 (the full SGD update, momentum and weight decay included, is still computed):
    the random weights, hence the work per step, stay the same across repeats. Peak memory (CUDA) is
    what one model alone needs: its weights, buffers and optimizer state plus the step's peak increase
    (``torch.cuda.max_memory_allocated``, reset before each step); on CPU it is ``None``.

    Args:
        optimizer: SGD update path: ``None`` (torch's choice), ``loop``, ``foreach`` or ``fused``.
    """
    _check_runs(warmup, repeats, 1, "the first step creates the optimizer state, and compiles")
    if optimizer is not None and optimizer not in OPTIMIZER_PATHS:
        raise ValueError(f"optimizer must be null or one of {sorted(OPTIMIZER_PATHS)}, got {optimizer!r}")
    device = images[0].device
    optimizers = {name: build_sgd(model, lr=lr, **OPTIMIZER_PATHS.get(optimizer, {})) for name, model in models.items()}
    peaks: dict[str, list[float]] = {name: [] for name in models}

    def step(model: MaskRCNN, opt: torch.optim.Optimizer) -> None:
        with precision_context(device, precision):
            losses = model(images, targets)
        torch.stack(list(losses.values())).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def seeded_with_peak(name: str) -> Iterator[None]:
        torch.manual_seed(seed)
        if device.type != "cuda":
            yield
            return
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
        yield
        increase = torch.cuda.max_memory_allocated(device) - start_bytes
        peaks[name].append((increase + _resident_bytes(models[name], optimizers[name])) / 2**20)

    for model in models.values():
        model.train()
    steps = {name: partial(step, model, optimizers[name]) for name, model in models.items()}
    interleaved(steps, device, warmup, around=seeded_with_peak)
    for values in peaks.values():
        values.clear()  # the warm-up steps' (the first one creates the optimizer state)
    times = interleaved(steps, device, repeats, around=seeded_with_peak)
    return {
        name: {
            "images_per_sec": summarize([len(images) / t for t in times[name]]),
            "step_ms": summarize([1000 * t for t in times[name]]),
            "peak_memory_mb": max(peaks[name]) if peaks[name] else None,
            **({} if peaks[name] else {"peak_memory_note": CPU_MEMORY_NOTE}),
        }
        for name in models
    }


# ---- inference -------------------------------------------------------------------------------
@contextlib.contextmanager
def _inference(
    models: Mapping[str, MaskRCNN], detections: int, device: torch.device, precision: str | int
) -> Iterator[None]:
    """Every model in eval mode without gradients at ``precision``, forced to ``detections`` per image."""
    with contextlib.ExitStack() as stack, torch.no_grad(), precision_context(device, precision):
        for model in models.values():
            model.eval()
            stack.enter_context(fixed_detections(model, detections))
        yield


def measure_inference(
    models: Mapping[str, MaskRCNN],
    images: list[Tensor],
    detections: Sequence[int],
    warmup: int = 1,
    repeats: int = 5,
    precision: str | int = 32,
) -> dict[str, dict[str, dict[str, float]]]:
    """End-to-end ms/img (the model's pre-processing, network, mask paste-back) at fixed detection counts.

    Returns ``{model: {str(detections): {"median", "min", "max"}}}``. The first warm-up call checks that
    every image got exactly that many detections.
    """
    _check_runs(warmup, repeats, 1, "the first call checks the detection count, and compiles")
    device = images[0].device
    calls = {name: partial(model, images) for name, model in models.items()}
    result: dict[str, dict[str, dict[str, float]]] = {name: {} for name in models}
    for count in detections:
        with _inference(models, count, device, precision):
            for call in calls.values():
                check_detections(call(), count)
            interleaved(calls, device, warmup - 1)
            times = interleaved(calls, device, repeats)
        for name in models:
            result[name][str(count)] = summarize([1000 * t / len(images) for t in times[name]])
    return result


@contextlib.contextmanager
def part_timer(model: nn.Module) -> Iterator[dict[str, float]]:
    """Add up the wall time (s) of each part group (:data:`iemask.models.parts.GROUPS`) with forward hooks.

    The modules of every part the model has (:func:`~iemask.models.parts.part_modules`) count for the
    part's group. CUDA is synchronised at both ends of every timed module, so the pass that uses this is
    slower than the timing pass and only its proportions are kept. The hooks run eagerly inside compiled
    parts (a graph break at each end). They are removed on exit.
    """
    device = next(model.parameters()).device
    totals = dict.fromkeys(GROUPS, 0.0)
    handles = []
    for part in model_parts(model):
        for module in part_modules(model, part):
            started: list[float] = []

            @torch.compiler.disable
            def before(_module: nn.Module, _args: Any, started: list[float] = started) -> None:
                synchronize(device)
                started.append(time.perf_counter())

            @torch.compiler.disable
            def after(
                _module: nn.Module, _args: Any, _output: Any, group: str = part.group, started: list = started
            ) -> None:
                synchronize(device)
                totals[group] += time.perf_counter() - started.pop()

            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield totals
    finally:
        for handle in handles:
            handle.remove()


def measure_shares(
    models: Mapping[str, MaskRCNN],
    images: list[Tensor],
    detections: Sequence[int],
    warmup: int = 1,
    repeats: int = 3,
    precision: str | int = 32,
) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """Share of inference time per part group (:data:`SHARES`), in a pass of its own with hooks.

    Returns ``{model: {str(detections): {"shares": {group: fraction}, "part_ms": {group: ms/img}}}}``;
    the shares sum to 1, ``other`` being the call's time outside the hooked parts.
    """
    _check_runs(warmup, repeats, 0, "compiled parts need 1")
    device = images[0].device
    calls = {name: partial(model, images) for name, model in models.items()}
    result: dict[str, dict[str, dict[str, dict[str, float]]]] = {name: {} for name in models}
    for count in detections:
        with _inference(models, count, device, precision), contextlib.ExitStack() as stack:
            timers = {name: stack.enter_context(part_timer(model)) for name, model in models.items()}
            interleaved(calls, device, warmup)
            for parts in timers.values():  # forget the warm-up (compiled parts recompile once the hooks are on)
                parts.update(dict.fromkeys(parts, 0.0))
            times = interleaved(calls, device, repeats)
        for name in models:
            parts = dict(timers[name])
            parts["other"] = max(0.0, sum(times[name]) - sum(parts.values()))
            whole = sum(parts.values())
            per_image = 1000 / (repeats * len(images))
            result[name][str(count)] = {
                "shares": {p: v / whole for p, v in parts.items()},
                "part_ms": {p: v * per_image for p, v in parts.items()},
            }
    return result
