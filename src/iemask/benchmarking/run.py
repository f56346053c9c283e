"""The whole benchmark: the compared models, the input pipeline and the evaluation, with the machine's metadata."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from iemask.benchmarking.evaluation import measure_evaluation
from iemask.benchmarking.models import (
    build_models,
    measure_inference,
    measure_shares,
    measure_training,
    synthetic_batch,
)
from iemask.benchmarking.pipeline import measure_pipeline, pipeline_datamodule
from iemask.benchmarking.report import LABELS, machine_meta, ratios
from iemask.models import count_parameters
from iemask.utils.config import resolve_device

log = logging.getLogger(__name__)

# The fast paths, each switchable to measure before/after and recorded in the JSON's meta: settings of the
# benchmark preset, and fields of the model config.
BENCHMARK_FAST_PATHS = ("precision", "compile", "cudnn_benchmark", "fused_optimizer")
MODEL_FAST_PATHS = ("channels_last", "mask_head_chunk_size", "size_divisible")


def _measure_models(
    settings: Mapping[str, Any], model: Mapping[str, Any], device: torch.device
) -> dict[str, dict[str, Any]]:
    """Training, inference and time shares of the compared models, with their ratios to the first (the baseline)."""
    models = build_models(
        model,
        settings["models"],
        device,
        compile=settings["compile"],
        compile_dynamic=settings["compile_dynamic"],
        seed=settings["seed"],
    )
    timing = dict(warmup=settings["warmup"], repeats=settings["repeats"], precision=settings["precision"])
    t, i, seed = settings["train"], settings["infer"], settings["seed"]
    log.info("training: %d steps per model", settings["warmup"] + settings["repeats"])
    images, targets = synthetic_batch(
        t["batch_size"], *t["image_size"], model["num_classes"], t["objects"], seed, device
    )
    train = measure_training(
        models, images, targets, optimizer=settings["fused_optimizer"], lr=t["lr"], seed=seed, **timing
    )
    log.info("inference at %s detections per image", list(i["detections"]))
    images, _ = synthetic_batch(i["batch_size"], *i["image_size"], 1, 0, seed + 1, device)
    infer = measure_inference(models, images, i["detections"], **timing)
    shares = measure_shares(
        models,
        images,
        i["detections"],
        warmup=settings["warmup"],
        repeats=i["share_repeats"],
        precision=settings["precision"],
    )
    result = {
        name: {
            "label": LABELS.get(name, name),
            "switches": dict(built.switches),
            "params_m": count_parameters(built) / 1e6,
            "train": train[name],
            "infer": {d: {"ms_per_img": infer[name][d], **shares[name][d]} for d in infer[name]},
        }
        for name, built in models.items()
    }
    baseline = result[settings["models"][0]]
    for r in result.values():
        r["ratios"] = ratios(r, baseline)
    return result


def _measure_input_pipeline(
    settings: Mapping[str, Any], num_classes: int, device: torch.device, slowest: float
) -> dict[str, Any]:
    """Pipeline images/s per worker count, and whether it delivers 2× the slowest model's training rate."""
    p = settings["pipeline"]
    log.info("input pipeline with %s workers", list(p["num_workers"]))
    datamodule = pipeline_datamodule(
        settings["data_root"],
        p["cache_dir"],
        num_classes=num_classes,
        shapes_images=p["shapes_images"],
        shapes_image_size=p["shapes_image_size"],
        pin_memory=device.type == "cuda",
        seed=settings["seed"],
        batch_size=p["batch_size"],
        train_min_size=p["train_min_size"],
        train_min_size_sampling=p["train_min_size_sampling"],
        max_size=p["max_size"],
    )
    rates = measure_pipeline(datamodule, p["num_workers"], p["batches"], p["warmup_batches"])
    return {
        "images_per_sec": rates,
        "dataset": str(settings["data_root"] or "generated shapes"),
        "batch_size": p["batch_size"],
        "batches": p["batches"],
        "training_workers": p["training_workers"],
        "required_images_per_sec": 2 * slowest,
        "keeps_up": rates[str(p["training_workers"])] >= 2 * slowest,
    }


def run_benchmark(
    settings: Mapping[str, Any], model: Mapping[str, Any], preset: str | None = None, command: str | None = None
) -> dict[str, Any]:
    """Run every measurement that ``settings`` (a ``conf/benchmark/*.yaml`` preset) asks for on the models
    ``settings["models"]`` built from ``model`` (the composed ``model`` config), both resolved.

    Returns the JSON-ready result: ``meta``, ``config`` (``benchmark`` and ``model``), ``models`` (per model:
    ``params_m``, ``train``, ``infer`` per detection count with ``ms_per_img`` and ``shares``, ``ratios``
    against the first model), ``pipeline`` and ``eval``.
    """
    workers = settings["pipeline"]["training_workers"]
    if workers not in settings["pipeline"]["num_workers"]:
        raise ValueError(f"pipeline.training_workers={workers} is not in {list(settings['pipeline']['num_workers'])}")
    device = resolve_device(settings["device"])
    saved_threads, saved_cudnn = torch.get_num_threads(), torch.backends.cudnn.benchmark
    try:
        torch.set_num_threads(settings["num_threads"] or saved_threads)
        torch.backends.cudnn.benchmark = bool(settings["cudnn_benchmark"])
        meta = {
            "device": str(device),
            **machine_meta(device, preset, command),
            "num_threads": torch.get_num_threads(),
            **{key: settings[key] for key in BENCHMARK_FAST_PATHS},
            **{key: model[key] for key in MODEL_FAST_PATHS},
        }
        models = _measure_models(settings, model, device)
        slowest = min(r["train"]["images_per_sec"]["median"] for r in models.values())
        pipeline = _measure_input_pipeline(settings, model["num_classes"], device, slowest)
        e = settings["eval"]
        log.info("evaluation of %d images", e["num_images"])
        evaluation = measure_evaluation(
            e["num_images"],
            e["detections"],
            e["coco_categories"],
            e["lvis_categories"],
            *e["image_size"],
            e["objects"],
            settings["seed"],
        )
    finally:
        torch.set_num_threads(saved_threads)
        torch.backends.cudnn.benchmark = saved_cudnn
    return {
        "meta": meta,
        "config": {"benchmark": dict(settings), "model": dict(model)},
        "models": models,
        "pipeline": pipeline,
        "eval": evaluation,
    }
