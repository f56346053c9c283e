"""Side-by-side speed of Mask R-CNN, IEMask† and IEMask: training, inference, input pipeline, evaluation.

The three models are built in one process with the same backbone, inputs and device, and measured
interleaved (A, B, C, A, B, C, ...) so that drifts of the machine (clocks, other jobs) hit all of them
alike; warm-up runs are discarded and every figure is the median with its min and max over repeats.
Weights are random and the inputs synthetic: speed does not depend on what the weights have learnt,
and inference is forced to a fixed number of detections per image (:func:`iemask.analysis.fixed_detections`)
so the models do equal work. ``python -m iemask.benchmark`` is the command-line entry point.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torchvision
from pycocotools import mask as mask_utils
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN

from iemask.analysis import check_detections, fixed_detections, synchronize, timed
from iemask.data.datamodule import COCODataModule, DetectionDataModule, ShapesDataModule
from iemask.evaluation import evaluate
from iemask.evaluation.lvis import FREQUENCIES
from iemask.models import SWITCH_NAMES, build_model, count_parameters
from iemask.models.parts import compile_parts
from iemask.training.optim import build_sgd
from iemask.utils.config import CONFIG_DIR, resolve_device

log = logging.getLogger(__name__)

BASELINE = "mask_rcnn"
MODELS: dict[str, dict[str, bool]] = {
    BASELINE: dict.fromkeys(SWITCH_NAMES, False),
    "iemask_dagger": {**dict.fromkeys(SWITCH_NAMES, True), "gim": False},
    "iemask": dict.fromkeys(SWITCH_NAMES, True),
}
LABELS = {BASELINE: "Mask R-CNN", "iemask_dagger": "IEMask†", "iemask": "IEMask"}

# Modules timed by the hooks of the shares pass; "other" is the rest of the call (pre-processing,
# box decoding and NMS, mask paste-back).
SHARE_PARTS: dict[str, tuple[str, ...]] = {
    "backbone": ("backbone.body",),
    "neck": ("backbone.fpn", "backbone.bottom_up"),
    "rpn": ("rpn",),
    "box_head": ("roi_heads.box_roi_pool", "roi_heads.box_head", "roi_heads.box_predictor"),
    "mask_head": ("roi_heads.mask_roi_pool", "roi_heads.mask_head", "roi_heads.mask_predictor"),
}
SHARES = (*SHARE_PARTS, "other")
PRECISIONS = ("32", "bf16")
OPTIMIZER_PATHS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
CPU_MEMORY_NOTE = "peak memory is measured on CUDA only (torch.cuda.max_memory_allocated); not measured on CPU"


# ---- helpers ---------------------------------------------------------------------------------
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


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_runs(warmup: int, repeats: int, min_warmup: int, why: str) -> None:
    if warmup < min_warmup or repeats < 1:
        raise ValueError(f"need warmup >= {min_warmup} ({why}) and repeats >= 1, got {warmup=}, {repeats=}")


def build_models(
    device: torch.device,
    names: Sequence[str] = tuple(MODELS),
    compile: Sequence[str] = (),
    compile_dynamic: bool = True,
    seed: int = 0,
    **build_kwargs: Any,
) -> dict[str, MaskRCNN]:
    """The benchmarked models, with random weights, on ``device``.

    Each is built from the same seed, so their backbone bodies (built first) start from the same
    weights. ``compile`` lists parts for :func:`iemask.models.parts.compile_parts`;
    ``build_kwargs`` go to :func:`iemask.models.build_model`.
    """
    models = {}
    for name in names:
        torch.manual_seed(seed)
        model = build_model(**{**build_kwargs, **MODELS[name], "backbone_weights": None}).to(device)
        if compile:
            compile_parts(model, list(compile), dynamic=compile_dynamic)
        models[name] = model
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
    times: dict[str, list[float]] = {name: [] for name in models}
    peaks: dict[str, list[float]] = {name: [] for name in models}

    def step(model: MaskRCNN, opt: torch.optim.Optimizer) -> None:
        with precision_context(device, precision):
            losses = model(images, targets)
        torch.stack(list(losses.values())).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for model in models.values():
        model.train()
    for i in range(warmup + repeats):
        for name, model in models.items():
            torch.manual_seed(seed)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                start_bytes = torch.cuda.memory_allocated(device)
            elapsed = timed(lambda model=model, name=name: step(model, optimizers[name]), device)
            if i < warmup:
                continue
            times[name].append(elapsed)
            if device.type == "cuda":
                increase = torch.cuda.max_memory_allocated(device) - start_bytes
                peaks[name].append((increase + _resident_bytes(model, optimizers[name])) / 2**20)
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
    result: dict[str, dict[str, dict[str, float]]] = {name: {} for name in models}
    for model in models.values():
        model.eval()
    for count in detections:
        times: dict[str, list[float]] = {name: [] for name in models}
        with contextlib.ExitStack() as stack, torch.no_grad(), precision_context(device, precision):
            for model in models.values():
                stack.enter_context(fixed_detections(model, count))
            for i in range(warmup + repeats):
                for name, model in models.items():
                    if i < warmup:
                        outputs = model(images)
                        if i == 0:
                            check_detections(outputs, count)
                    else:
                        times[name].append(1000 * timed(lambda model=model: model(images), device) / len(images))
        for name in models:
            result[name][str(count)] = summarize(times[name])
    return result


@contextlib.contextmanager
def part_timer(model: nn.Module) -> Iterator[dict[str, float]]:
    """Add up the wall time (s) of each part of :data:`SHARE_PARTS` with forward pre/post hooks.

    CUDA is synchronised at both ends of every timed module, so the pass that uses this is slower
    than the timing pass and only its proportions are kept. The hooks run eagerly inside compiled
    parts (a graph break at each end). They are removed on exit.
    """
    device = _device_of(model)
    totals = dict.fromkeys(SHARE_PARTS, 0.0)
    modules = dict(model.named_modules())
    handles = []
    for part, names in SHARE_PARTS.items():
        for name in names:
            if name not in modules:
                continue
            started: list[float] = []

            @torch.compiler.disable
            def before(_module: nn.Module, _args: Any, started: list[float] = started) -> None:
                synchronize(device)
                started.append(time.perf_counter())

            @torch.compiler.disable
            def after(_module: nn.Module, _args: Any, _output: Any, part: str = part, started: list = started) -> None:
                synchronize(device)
                totals[part] += time.perf_counter() - started.pop()

            handles += [modules[name].register_forward_pre_hook(before), modules[name].register_forward_hook(after)]
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
    """Share of inference time per part (:data:`SHARES`), in a pass of its own with hooks.

    Returns ``{model: {str(detections): {"shares": {part: fraction}, "part_ms": {part: ms/img}}}}``;
    the shares sum to 1, ``other`` being the call's time outside the hooked parts.
    """
    _check_runs(warmup, repeats, 0, "compiled parts need 1")
    device = images[0].device
    result: dict[str, dict[str, dict[str, dict[str, float]]]] = {name: {} for name in models}
    for model in models.values():
        model.eval()
    for count in detections:
        totals = dict.fromkeys(models, 0.0)
        with contextlib.ExitStack() as stack, torch.no_grad(), precision_context(device, precision):
            for model in models.values():
                stack.enter_context(fixed_detections(model, count))
            timers = {name: stack.enter_context(part_timer(model)) for name, model in models.items()}
            for i in range(warmup + repeats):
                if i == warmup:  # forget the warm-up calls (compiled parts recompile once the hooks are on)
                    for parts in timers.values():
                        parts.update(dict.fromkeys(parts, 0.0))
                for name, model in models.items():
                    elapsed = timed(lambda model=model: model(images), device)
                    if i >= warmup:
                        totals[name] += elapsed
        for name in models:
            parts = dict(timers[name])
            parts["other"] = max(0.0, totals[name] - sum(parts.values()))
            whole = sum(parts.values())
            per_image = 1000 / (repeats * len(images))
            result[name][str(count)] = {
                "shares": {p: v / whole for p, v in parts.items()},
                "part_ms": {p: v * per_image for p, v in parts.items()},
            }
    return result


# ---- input pipeline --------------------------------------------------------------------------
def measure_pipeline(
    datamodule: DetectionDataModule, num_workers: Sequence[int], batches: int, warmup_batches: int = 2
) -> dict[str, float]:
    """Decoded and augmented training images/s of the data module's real training ``DataLoader``.

    For each worker count, ``warmup_batches`` (worker start-up) are discarded and ``batches`` timed;
    the loader is iterated epoch after epoch if the dataset is shorter. Returns ``{str(workers): images/s}``.
    """
    datamodule.prepare_data()
    datamodule.train_set = datamodule.build_dataset("train", train=True)  # no validation json needed
    rates = {}
    for workers in num_workers:
        datamodule.num_workers, datamodule.persistent_workers = workers, workers > 0
        loader = datamodule.train_dataloader()

        def endless(loader: Any = loader) -> Iterator[tuple[list, list]]:
            while True:
                yield from loader

        stream = endless()
        for _ in range(warmup_batches):
            next(stream)
        start, count = time.perf_counter(), 0
        for _ in range(batches):
            count += len(next(stream)[0])
        rates[str(workers)] = count / (time.perf_counter() - start)
        stream.close()
        del stream, loader  # drops the last references to the persistent workers, which then shut down
    return rates


def pipeline_datamodule(
    data_root: str | None,
    cache_dir: str,
    num_classes: int = 80,
    shapes_images: int = 64,
    shapes_image_size: int = 128,
    pin_memory: bool = False,
    seed: int = 0,
    **loader_kwargs: Any,
) -> COCODataModule:
    """The COCO data module on ``data_root`` (COCO 2017 layout), or on the generated shapes dataset if ``None``.

    ``loader_kwargs`` are data-module settings (``batch_size``, ``train_min_size``, ``max_size``...).
    """
    common = dict(pin_memory=pin_memory, seed=seed, **loader_kwargs)
    if data_root:
        return COCODataModule(root=data_root, num_classes=num_classes, **common)
    return ShapesDataModule(
        cache_dir=cache_dir, num_train=shapes_images, num_val=1, image_size=shapes_image_size, num_classes=3, **common
    )


# ---- evaluation ------------------------------------------------------------------------------
def _ellipse(centre: np.ndarray, axes: np.ndarray, corners: int = 24) -> list[float]:
    angles = np.linspace(0.0, 2 * np.pi, corners, endpoint=False)
    return np.stack([centre[0] + axes[0] * np.cos(angles), centre[1] + axes[1] * np.sin(angles)], 1).ravel().tolist()


def synthetic_evaluation_set(
    num_images: int,
    detections: int,
    num_categories: int,
    height: int = 480,
    width: int = 640,
    objects: int = 7,
    seed: int = 0,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Ground truth and detections in memory, in the formats ``evaluate`` reads.

    Every image has ``objects`` elliptical instances; half of the ``detections`` per image are jittered
    copies of them (true or near positives), the others random ellipses of random categories. Masks are
    compressed RLE with ``str`` counts, as :func:`iemask.evaluation.to_coco_results` writes them. The
    ground truth also carries LVIS's fields (category frequencies, per-image negative and
    not-exhaustive categories), so the COCO and LVIS protocols both read it.
    """
    rng = np.random.default_rng(seed)
    size = np.array([width, height], dtype=np.float64)
    categories = [{"id": c, "name": f"class{c}", "frequency": FREQUENCIES[c % 3]} for c in range(1, num_categories + 1)]
    images, annotations, results = [], [], []

    def shape() -> tuple[np.ndarray, np.ndarray]:
        axes = rng.uniform(0.03, 0.2, 2) * size
        return rng.uniform(axes, size - axes), axes

    for image_id in range(1, num_images + 1):
        shapes = [shape() for _ in range(objects)]
        labels = rng.integers(1, num_categories + 1, objects)
        rles = mask_utils.frPyObjects([_ellipse(c, a) for c, a in shapes], height, width)
        for rle, label in zip(rles, labels.tolist(), strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                    "area": float(mask_utils.area(rle)),
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "iscrowd": 0,
                }
            )
        polygons, det_labels = [], []
        for d in range(detections):
            if d % 2 == 0:
                j = rng.integers(objects)
                centre, axes = shapes[j]
                polygons.append(_ellipse(centre + rng.normal(0, 0.1, 2) * axes, axes * rng.uniform(0.8, 1.2, 2)))
                det_labels.append(int(labels[j]))
            else:
                polygons.append(_ellipse(*shape()))
                det_labels.append(int(rng.integers(1, num_categories + 1)))
        rles = mask_utils.frPyObjects(polygons, height, width)
        for rle, label, box, score in zip(
            rles, det_labels, mask_utils.toBbox(rles).tolist(), rng.random(detections), strict=True
        ):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": label,
                    "bbox": box,
                    "score": float(score),
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                }
            )
        absent = np.setdiff1d(np.arange(1, num_categories + 1), labels)
        negatives = rng.choice(absent, size=min(5, len(absent)), replace=False)
        images.append(
            {
                "id": image_id,
                "height": height,
                "width": width,
                "file_name": f"{image_id:06d}.jpg",
                "neg_category_ids": sorted(negatives.tolist()),
                "not_exhaustive_category_ids": [],
            }
        )
    return {"images": images, "annotations": annotations, "categories": categories}, results


def measure_evaluation(
    num_images: int,
    detections: int,
    coco_categories: int = 80,
    lvis_categories: int = 1203,
    height: int = 480,
    width: int = 640,
    objects: int = 7,
    seed: int = 0,
) -> dict[str, float | int]:
    """Seconds that ``evaluate`` (boxes and masks) takes on synthetic detections, COCO and LVIS protocols."""
    seconds = {}
    for protocol, categories in (("coco", coco_categories), ("lvis", lvis_categories)):
        gt, results = synthetic_evaluation_set(num_images, detections, categories, height, width, objects, seed)
        start = time.perf_counter()
        evaluate(gt, results, protocol=protocol)
        seconds[f"{protocol}_s"] = time.perf_counter() - start
    return {**seconds, "num_images": num_images, "detections_per_image": detections}


# ---- the whole benchmark ---------------------------------------------------------------------
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"{name} ({os.cpu_count()} CPUs)"


def _git_commit() -> str | None:
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


def _ratios(result: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
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


_META_SWITCHES = (
    "precision",
    "channels_last",
    "compile",
    "mask_head_chunk_size",
    "cudnn_benchmark",
    "size_divisible",
    "fused_optimizer",
)


def _measure_models(cfg: Mapping[str, Any], device: torch.device) -> dict[str, dict[str, Any]]:
    """Training, inference and time shares of the three models, with their ratios to the baseline."""
    models = build_models(
        device,
        compile=cfg["compile"],
        compile_dynamic=cfg["compile_dynamic"],
        seed=cfg["seed"],
        num_classes=cfg["num_classes"],
        backbone=cfg["backbone"],
        norm=cfg["norm"],
        trainable_layers=cfg["trainable_layers"],
        neck_channels=cfg["neck_channels"],
        box_head_dim=cfg["box_head_dim"],
        anchor_sizes=cfg["anchor_sizes"],
        mask_head_chunk_size=cfg["mask_head_chunk_size"],
        channels_last=cfg["channels_last"],
        min_size=cfg["min_size"],
        max_size=cfg["max_size"],
        size_divisible=cfg["size_divisible"],
        train_resize=False,  # the synthetic training images come at their training size
        **cfg["model_kwargs"],
    )
    timing = dict(warmup=cfg["warmup"], repeats=cfg["repeats"], precision=cfg["precision"])
    t, i = cfg["train"], cfg["infer"]
    log.info("training: %d steps per model", cfg["warmup"] + cfg["repeats"])
    images, targets = synthetic_batch(
        t["batch_size"], *t["image_size"], cfg["num_classes"], t["objects"], cfg["seed"], device
    )
    train = measure_training(
        models, images, targets, optimizer=cfg["fused_optimizer"], lr=t["lr"], seed=cfg["seed"], **timing
    )
    log.info("inference at %s detections per image", list(i["detections"]))
    images, _ = synthetic_batch(i["batch_size"], *i["image_size"], 1, 0, cfg["seed"] + 1, device)
    infer = measure_inference(models, images, i["detections"], **timing)
    shares = measure_shares(
        models, images, i["detections"], warmup=cfg["warmup"], repeats=i["share_repeats"], precision=cfg["precision"]
    )
    result = {
        name: {
            "label": LABELS[name],
            "switches": MODELS[name],
            "params_m": count_parameters(model) / 1e6,
            "train": train[name],
            "infer": {d: {"ms_per_img": infer[name][d], **shares[name][d]} for d in infer[name]},
        }
        for name, model in models.items()
    }
    for r in result.values():
        r["ratios"] = _ratios(r, result[BASELINE])
    return result


def _measure_input_pipeline(cfg: Mapping[str, Any], device: torch.device, slowest: float) -> dict[str, Any]:
    """Pipeline images/s per worker count, and whether it delivers 2× the slowest model's training rate."""
    p = cfg["pipeline"]
    log.info("input pipeline with %s workers", list(p["num_workers"]))
    datamodule = pipeline_datamodule(
        cfg["data_root"],
        p["cache_dir"],
        num_classes=cfg["num_classes"],
        shapes_images=p["shapes_images"],
        shapes_image_size=p["shapes_image_size"],
        pin_memory=device.type == "cuda",
        seed=cfg["seed"],
        batch_size=p["batch_size"],
        train_min_size=p["train_min_size"],
        train_min_size_sampling=p["train_min_size_sampling"],
        max_size=p["max_size"],
    )
    rates = measure_pipeline(datamodule, p["num_workers"], p["batches"], p["warmup_batches"])
    return {
        "images_per_sec": rates,
        "dataset": str(cfg["data_root"] or "generated shapes"),
        "batch_size": p["batch_size"],
        "batches": p["batches"],
        "training_workers": p["training_workers"],
        "required_images_per_sec": 2 * slowest,
        "keeps_up": rates[str(p["training_workers"])] >= 2 * slowest,
    }


def run_benchmark(cfg: Mapping[str, Any], preset: str | None = None, command: str | None = None) -> dict[str, Any]:
    """Run every measurement that ``cfg`` (a ``conf/benchmark/*.yaml`` preset, resolved) asks for.

    Returns the JSON-ready result: ``meta``, ``config``, ``models`` (per model: ``params_m``, ``train``,
    ``infer`` per detection count with ``ms_per_img`` and ``shares``, ``ratios`` against the baseline),
    ``pipeline`` and ``eval``.
    """
    workers = cfg["pipeline"]["training_workers"]
    if workers not in cfg["pipeline"]["num_workers"]:
        raise ValueError(f"pipeline.training_workers={workers} is not in {list(cfg['pipeline']['num_workers'])}")
    device = resolve_device(cfg["device"])
    saved_threads, saved_cudnn = torch.get_num_threads(), torch.backends.cudnn.benchmark
    try:
        torch.set_num_threads(cfg["num_threads"] or saved_threads)
        torch.backends.cudnn.benchmark = bool(cfg["cudnn_benchmark"])
        meta = {
            "device": str(device),
            "device_name": _device_name(device),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "git_commit": _git_commit(),
            "command": command,
            "preset": preset,
            "num_threads": torch.get_num_threads(),
            **{key: cfg[key] for key in _META_SWITCHES},
        }
        models = _measure_models(cfg, device)
        slowest = min(r["train"]["images_per_sec"]["median"] for r in models.values())
        pipeline = _measure_input_pipeline(cfg, device, slowest)
        e = cfg["eval"]
        log.info("evaluation of %d images", e["num_images"])
        evaluation = measure_evaluation(
            e["num_images"],
            e["detections"],
            e["coco_categories"],
            e["lvis_categories"],
            *e["image_size"],
            e["objects"],
            cfg["seed"],
        )
    finally:
        torch.set_num_threads(saved_threads)
        torch.backends.cudnn.benchmark = saved_cudnn
    return {"meta": meta, "config": dict(cfg), "models": models, "pipeline": pipeline, "eval": evaluation}


# ---- report ----------------------------------------------------------------------------------
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
