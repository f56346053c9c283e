"""Latency of the exported model next to the eager one: eager PyTorch, TorchScript and ONNX Runtime.

``python -m iemask.benchmarking.export [--model iemask] [--detections N] [overrides of conf/benchmark.yaml]``,
e.g. ``benchmark=cpu`` for the small CPU model: the model is the composed ``model`` config with the preset's
switches (random weights, as every benchmark here), exported by :mod:`iemask.export` into a temporary folder
(the full detector: TorchScript scripted, ONNX traced) and timed in the same process on the same image,
the three runtimes interleaved (:func:`~iemask.benchmarking.timing.interleaved`) at a fixed number of
detections per image (:func:`~iemask.benchmarking.timing.fixed_detections`, in force while exporting too,
so that the exported graphs keep it). Prints a Markdown table with the ratios against eager, then the
figures as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import torch
from torch import Tensor
from torchvision.models.detection import MaskRCNN

from iemask.benchmarking.models import build_models
from iemask.benchmarking.report import machine_meta
from iemask.benchmarking.timing import check_detections, fixed_detections, interleaved, summarize
from iemask.export import Detector, ExportError, export_onnx, export_torchscript, load_onnx, prepare_model
from iemask.utils.config import CONFIG_DIR

RUNTIMES = ("eager", "torchscript", "onnxruntime")


def measure_exported(
    model: MaskRCNN,
    image: Tensor,
    detections: int,
    warmup: int = 3,
    repeats: int = 10,
    opset: int = 17,
) -> dict[str, Any]:
    """ms per image of ``model`` on one (3, H, W) CPU ``image`` in each of :data:`RUNTIMES`.

    Returns ``{"ms": {runtime: {"median", "min", "max"}}, "vs_eager": {runtime: median ratio},
    "not_exported": {runtime: why}}``; a runtime whose export fails is left out of the timing and its
    reason kept. The first warm-up call checks that each runtime gave exactly ``detections`` boxes
    (equal work); TorchScript's profiling executor optimises over the first calls, so keep ``warmup >= 2``.
    """
    if warmup < 2 or repeats < 1:
        raise ValueError(
            f"need warmup >= 2 (TorchScript optimises over its first calls) and repeats >= 1, got {warmup=}, {repeats=}"
        )
    eager = Detector(prepare_model(model)).eval()
    calls, not_exported = {"eager": partial(eager, [image])}, {}
    with fixed_detections(model, detections), tempfile.TemporaryDirectory() as folder:
        model.roi_heads.nms_thresh = 1.0  # removes nothing either; ONNX's NonMaxSuppression refuses IoU above 1
        try:
            scripted = torch.jit.load(str(export_torchscript(eager, Path(folder) / "model.torchscript", image, {})))
            calls["torchscript"] = partial(scripted, [image])
        except ExportError as e:
            not_exported["torchscript"] = str(e).splitlines()[0]
        try:
            run = load_onnx(
                export_onnx(eager, Path(folder) / "model.onnx", image, {}, opset), threads=torch.get_num_threads()
            )
            calls["onnxruntime"] = partial(run, image)
        except ExportError as e:
            not_exported["onnxruntime"] = str(e).splitlines()[0]
        with torch.inference_mode():
            for name, call in calls.items():
                boxes = call()["boxes"] if name == "onnxruntime" else call()[0]["boxes"]
                check_detections([{"boxes": boxes}], detections)
            interleaved(calls, image.device, warmup - 1)
            times = interleaved(calls, image.device, repeats)
    ms = {name: summarize([1000 * t for t in values]) for name, values in times.items()}
    ratios = {name: ms[name]["median"] / ms["eager"]["median"] for name in ms}
    return {"ms": ms, "vs_eager": ratios, "not_exported": not_exported}


def format_table(result: dict[str, Any]) -> str:
    """The Markdown table of :func:`measure_exported`'s result (runtimes not exported: a line each)."""
    lines = ["| runtime | ms/img median (min–max) | × eager |", "|---|---|---|"]
    for name, s in result["ms"].items():
        lines.append(f"| {name} | {s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f}) | {result['vs_eager'][name]:.2f} |")
    lines += [f"\n{name}: not exported ({why})" for name, why in result["not_exported"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Compose ``conf/benchmark.yaml`` with the overrides, build the model preset, print the table and JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/benchmark.yaml, e.g. benchmark=cpu")
    parser.add_argument("--model", default="iemask", help="the model preset (conf/model/, or mask_rcnn)")
    parser.add_argument("--detections", type=int, default=None, help="per image (default: the preset's largest)")
    parser.add_argument("--opset", type=int, default=17)
    args = parser.parse_args(argv)
    with hydra.initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra.compose(config_name="benchmark", overrides=args.overrides)
        if cfg.benchmark.num_threads:
            torch.set_num_threads(cfg.benchmark.num_threads)
        (model,) = build_models(cfg.model, [args.model], torch.device("cpu"), seed=cfg.benchmark.seed).values()
    height, width = cfg.benchmark.infer.image_size
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(cfg.benchmark.seed))
    detections = args.detections or max(cfg.benchmark.infer.detections)
    result = measure_exported(model, image, detections, cfg.benchmark.warmup + 1, cfg.benchmark.repeats, args.opset)
    command = " ".join(["python -m iemask.benchmarking.export", *(sys.argv[1:] if argv is None else argv)])
    meta = machine_meta(torch.device("cpu"), None, command)
    meta.update(model=args.model, detections=detections, image_size=[height, width], threads=torch.get_num_threads())
    print(
        f"{args.model}, {height}×{width} image, {detections} detections, {meta['threads']} threads, "
        f"median of {cfg.benchmark.repeats}"
    )
    print(format_table(result))
    print(json.dumps({**result, "meta": meta}))


if __name__ == "__main__":
    main()
