"""The ``scale`` benchmark: memory and time at a fraction of LVIS v1 (``python -m iemask.benchmark benchmark=scale``).

On synthetic data shaped like LVIS v1 (image sizes, polygons of 8-40 points, 1203 categories, per-image
negative and not-exhaustive lists) it measures what grows with the data set rather than with the model:

* the training json: its size, the main process' RSS growth from building ``LVISInstanceDataset`` on it
  and the build's seconds;
* a data-loader worker's private memory (``/proc/self/smaps_rollup`` Private_Clean + Private_Dirty, the
  pages it no longer shares with the main process) at its start and after batches of real training
  targets; images are not decoded, each is a zero image of the json's size (there are no image files);
* mask post-processing ms per 800×1216 image at fixed detection counts, torchvision's paste + threshold +
  encode against the old and the project's paths (:mod:`iemask.benchmarking.postprocess`);
* evaluation seconds and peak RSS on LVIS-shaped val at the same fraction (:mod:`iemask.benchmarking.simulate`),
  ``LVISEvaluator`` against the official ``LVISEval``, each in a fresh process for its peak.
"""

from __future__ import annotations

import gc
import json
import logging
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, get_worker_info
from torchvision import tv_tensors

from iemask.benchmarking.postprocess import DESCRIPTIONS, VARIANTS, time_variants
from iemask.benchmarking.report import machine_meta
from iemask.benchmarking.simulate import LVIS_VAL_IMAGES
from iemask.data.lvis import LVISInstanceDataset

log = logging.getLogger(__name__)

LVIS_TRAIN_IMAGES = 100_170  # LVIS v1.0 train
LVIS_TRAIN_ANNOTATIONS = 1_270_141
IMAGE_SIZES = [(480, 640), (640, 480), (427, 640), (640, 427), (375, 500), (500, 375), (512, 640), (612, 612)]
WORKER_NOTE = "images not decoded: each item's image is a zero image of the json's size; targets are real"


# ---- data ------------------------------------------------------------------------------------
def train_counts(fraction: float) -> tuple[int, int]:
    """Images and annotations of ``fraction`` of LVIS v1 train (at least one of each)."""
    return max(1, round(fraction * LVIS_TRAIN_IMAGES)), max(1, round(fraction * LVIS_TRAIN_ANNOTATIONS))


def generate_lvis_train(root: Path, fraction: float, seed: int = 0) -> Path:
    """Write ``root/lvis_v1_train.json`` shaped like ``fraction`` of LVIS v1 train (and ``root/train2017/``).

    Images take COCO's common sizes and LVIS' fields (``coco_url``, up to 11 negative and 2 not-exhaustive
    categories); each annotation is one star-shaped polygon of 8-40 points around a random centre, its
    size log-uniform in 1-50 % of the image's short side, on a random image and category.
    """
    num_images, num_annotations = train_counts(fraction)
    rng = np.random.default_rng(seed)
    (root / "train2017").mkdir(parents=True, exist_ok=True)
    sizes = np.array(IMAGE_SIZES)[rng.integers(0, len(IMAGE_SIZES), num_images)]  # (I, 2) height, width
    images = [
        {
            "id": i + 1,
            "height": int(h),
            "width": int(w),
            "license": int(rng.integers(1, 7)),
            "date_captured": "2013-11-14 11:18:45",
            "coco_url": f"http://images.cocodataset.org/train2017/{i + 1:012d}.jpg",
            "flickr_url": f"http://farm4.staticflickr.com/3153/{i + 1}_883a0d4a54_z.jpg",
            "neg_category_ids": _some_categories(rng, 12),
            "not_exhaustive_category_ids": _some_categories(rng, 3),
        }
        for i, (h, w) in enumerate(sizes.tolist())
    ]
    image_index = rng.integers(0, num_images, num_annotations)  # (A,)
    points = rng.integers(8, 41, num_annotations)  # (A,)
    owner = np.repeat(np.arange(num_annotations), points)  # (P,) annotation of each point
    hw = sizes[image_index].astype(float)  # (A, 2)
    scale = np.exp(rng.uniform(np.log(0.01), np.log(0.5), num_annotations)) * hw.min(1)  # (A,)
    centres = rng.uniform(0.05, 0.95, (num_annotations, 2)) * hw[:, ::-1]  # (A, 2) x, y
    angles = rng.uniform(0, 2 * np.pi, len(owner))
    order = np.lexsort((angles, owner))  # points by annotation, then angle: a simple (star-shaped) polygon
    radii = rng.uniform(0.4, 1.0, len(owner)) * scale[owner]
    xy = centres[owner] + radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], 1)  # (P, 2)
    xy = np.round(np.clip(xy, 0, hw[owner][:, ::-1] - 0.01), 2)[order]
    starts = np.concatenate([[0], np.cumsum(points)[:-1]])
    low, high = np.minimum.reduceat(xy, starts), np.maximum.reduceat(xy, starts)  # (A, 2) each
    boxes = np.round(np.concatenate([low, high - low], 1), 2).tolist()
    polygons = np.split(xy.ravel(), 2 * np.cumsum(points)[:-1])
    categories = rng.integers(1, 1204, num_annotations).tolist()
    annotations = [
        {
            "area": round(b[2] * b[3] * 0.55, 2),
            "id": a + 1,
            "segmentation": [p.tolist()],
            "image_id": int(image_index[a]) + 1,
            "bbox": b,
            "category_id": c,
        }
        for a, (p, b, c) in enumerate(zip(polygons, boxes, categories, strict=True))
    ]
    cats = [
        {
            "id": c,
            "name": f"category_{c}",
            "synset": f"category_{c}.n.01",
            "synonyms": [f"category_{c}"],
            "def": "a thing",
            "frequency": "rcf"[c % 3],
            "image_count": 10,
            "instance_count": 20,
        }
        for c in range(1, 1204)
    ]
    path = root / "lvis_v1_train.json"
    data = {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": cats}
    path.write_text(json.dumps(data))
    return path


def _some_categories(rng: np.random.Generator, below: int) -> list[int]:
    """Fewer than ``below`` distinct category ids, sorted."""
    return np.sort(rng.choice(1203, int(rng.integers(0, below)), replace=False) + 1).tolist()


def _generate_in_subprocess(root: Path, fraction: float, seed: int) -> Path:
    """:func:`generate_lvis_train` in a fresh process, so that this one never holds the json's objects (the
    memory they leave behind would be reused by the data set and hide its growth)."""
    code = "import sys; from pathlib import Path; from iemask.benchmarking.scale import generate_lvis_train as g; "
    code += "print(g(Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])))"
    done = subprocess.run(
        [sys.executable, "-c", code, str(root), str(fraction), str(seed)], capture_output=True, text=True, check=True
    )
    return Path(done.stdout.strip().splitlines()[-1])


# ---- memory ----------------------------------------------------------------------------------
def rss_mb() -> float:
    """This process' resident memory in MiB (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def private_mb() -> float:
    """This process' private memory in MiB: Private_Clean + Private_Dirty of ``/proc/self/smaps_rollup``."""
    with open("/proc/self/smaps_rollup") as f:
        text = f.read()
    fields = ("Private_Clean", "Private_Dirty")
    return sum(int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1)) for field in fields) / 1024


def measure_dataset_build(root: Path, annotation_file: Path) -> tuple[LVISInstanceDataset, dict[str, float]]:
    """Build the training ``LVISInstanceDataset``; its seconds and this process' RSS growth (MiB).

    The growth means "MiB per data set" only in a process that has done little else (the benchmark CLI
    is one): in a long-lived process the build's ``malloc_trim`` also returns memory freed earlier.
    """
    gc.collect()
    before = rss_mb()
    start = time.perf_counter()
    dataset = LVISInstanceDataset(root, annotation_file, train=True)
    seconds = time.perf_counter() - start
    gc.collect()
    return dataset, {"build_s": seconds, "main_process_mb": rss_mb() - before}


def _zero_image(dataset: LVISInstanceDataset, image_id: int) -> tv_tensors.Image:
    """A zero uint8 image of the size the json gives ``image_id`` (stands in for decoding its file)."""
    height, width = dataset._sizes[dataset._position(image_id)].tolist()
    return tv_tensors.Image(torch.zeros(3, height, width, dtype=torch.uint8))


_worker_start_mb: float | None = None  # set in each worker by _record_start


def _record_start(_worker_id: int) -> None:
    global _worker_start_mb
    _worker_start_mb = private_mb()


def _memory_collate(batch: list[Any]) -> dict[str, Any]:
    """Drop the batch (it was made in full) and report the worker's private memory instead."""
    info = get_worker_info()
    return {"worker": info.id if info else 0, "start_mb": _worker_start_mb, "private_mb": private_mb()}


def measure_worker_memory(
    dataset: LVISInstanceDataset,
    batches: int,
    report_at: Sequence[int],
    num_workers: int = 2,
    batch_size: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """A forked data-loader worker's private MiB at its start and after ``report_at`` batches (the largest
    across the workers, each at its latest batch), iterating ``batches`` shuffled batches of real targets
    with zero images (:data:`WORKER_NOTE`)."""
    if num_workers < 1:
        raise ValueError(f"the worker measurement needs num_workers >= 1, got {num_workers}")
    dataset.load_image = lambda image_id: _zero_image(dataset, image_id)  # this instance only
    try:
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            num_workers=num_workers,
            collate_fn=_memory_collate,
            worker_init_fn=_record_start,
            persistent_workers=True,
            generator=torch.Generator().manual_seed(seed),
            multiprocessing_context="fork",
        )
        latest: dict[int, float] = {}
        starts: dict[int, float] = {}
        after: dict[str, float] = {}
        done = 0
        while done < batches:
            for report in loader:
                done += 1
                latest[report["worker"]] = report["private_mb"]
                starts[report["worker"]] = report["start_mb"]
                if done in report_at or done == batches:
                    after[str(done)] = max(latest.values())
                if done == batches:
                    break
        del loader
    finally:
        del dataset.load_image
    return {
        "start_mb": max(starts.values()),
        "after_batches_mb": after,
        "batches": batches,
        "num_workers": num_workers,
        "batch_size": batch_size,
        "note": WORKER_NOTE,
    }


# ---- post-processing -------------------------------------------------------------------------
def measure_postprocess(
    detections: Sequence[int], image_size: Sequence[int], repeats: int, num_threads: int | None
) -> dict[str, Any]:
    """Best ms per image of :mod:`~iemask.benchmarking.postprocess`'s variants at each detection count,
    and the marginal cost of the detections between the fewest and the most, (b) and (c) over (a)."""
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(num_threads or saved)
        threads = torch.get_num_threads()
        seconds, identical = time_variants(tuple(detections), tuple(image_size), repeats)
    finally:
        torch.set_num_threads(saved)
    lo, hi = min(detections), max(detections)
    marginal = {name: seconds[name][hi] - seconds[name][lo] for name in VARIANTS}
    return {
        "ms": {name: {str(n): 1000 * s for n, s in per.items()} for name, per in seconds.items()},
        "descriptions": DESCRIPTIONS,
        "marginal_ratio": {name: marginal[name] / marginal["a"] for name in ("b", "c")},
        "rle_identical": identical,
        "image_size": list(image_size),
        "repeats": repeats,
        "num_threads": threads,
    }


# ---- evaluation ------------------------------------------------------------------------------
def _simulate_in_subprocess(images: int, detections: int, seed: int, repeats: int, lvis_eval: bool) -> dict:
    """:func:`iemask.benchmarking.simulate.main` in a fresh process; ``peak_rss_mb`` is replaced by that process'
    own high-water mark (``VmHWM``, reset at its start): ``ru_maxrss`` would carry this process' peak into it."""
    args = ["--images", str(images), "--detections", str(detections), "--seed", str(seed), "--repeats", str(repeats)]
    code = (
        "import json, re, sys; open('/proc/self/clear_refs', 'w').write('5'); "
        "from iemask.benchmarking.simulate import main; figures = main(sys.argv[1:]); "
        "status = open('/proc/self/status').read(); "
        r"figures['peak_rss_mb'] = int(re.search(r'^VmHWM:\s+(\d+) kB', status, re.M).group(1)) / 1024; "
        "print(json.dumps(figures))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *args, *(["--lvis-eval"] if lvis_eval else [])],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_evaluation_scale(
    images: int, lvis_eval_images: int, detections: int, seed: int = 0, repeats: int = 1
) -> dict[str, Any]:
    """Seconds (segm, bbox) and peak RSS of ``LVISEvaluator`` on ``images`` LVIS-shaped val images and of
    ``LVISEval`` on the first ``lvis_eval_images`` of them (the same detections), each in a fresh process."""
    runs = {
        "iemask": (images, _simulate_in_subprocess(images, detections, seed, repeats, lvis_eval=False)),
        "lvis_eval": (lvis_eval_images, _simulate_in_subprocess(lvis_eval_images, detections, seed, 1, lvis_eval=True)),
    }
    return {
        name: {
            "images": n,
            "segm_s": f["segm_s"],
            "bbox_s": f["bbox_s"],
            "peak_rss_mb": f["peak_rss_mb"],
            "baseline_rss_mb": f["baseline_rss_mb"],
            "segm_ap": f["segm/AP"],
            "bbox_ap": f["bbox/AP"],
        }
        for name, (n, f) in runs.items()
    } | {"detections_per_image": detections}


# ---- the whole benchmark ---------------------------------------------------------------------
def run_scale_benchmark(
    cfg: Mapping[str, Any], preset: str | None = None, command: str | None = None
) -> dict[str, Any]:
    """Run the ``scale`` preset (``conf/benchmark/scale.yaml``, resolved): data set, worker, post-processing
    and evaluation at ``cfg["fraction"]`` of LVIS v1. The generated json lives in a temporary folder under
    ``cfg["cache_dir"]``, deleted on return."""
    fraction, seed = cfg["fraction"], cfg["seed"]
    meta = {
        **machine_meta(torch.device("cpu"), preset, command),
        "kind": "scale",
        "fraction": fraction,
    }
    Path(cfg["cache_dir"]).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="lvis_scale_", dir=cfg["cache_dir"]))
    try:
        log.info("generating %.3g of LVIS v1 train in %s", fraction, root)
        annotation_file = _generate_in_subprocess(root, fraction, seed)
        dataset, build = measure_dataset_build(root, annotation_file)
        data = {
            "json_mb": annotation_file.stat().st_size / 2**20,
            **dict(zip(("images", "annotations"), train_counts(fraction), strict=True)),
            "train_items": len(dataset),
            **build,
        }
        w = cfg["worker"]
        log.info("worker memory over %d batches", w["batches"])
        worker = measure_worker_memory(dataset, w["batches"], w["report_at"], w["num_workers"], w["batch_size"], seed)
        del dataset
    finally:
        shutil.rmtree(root, ignore_errors=True)
    p = cfg["postprocess"]
    log.info("post-processing at %s detections", list(p["detections"]))
    postprocess = measure_postprocess(p["detections"], p["image_size"], p["repeats"], p["num_threads"])
    e = cfg["eval"]
    images = e["images"] or max(1, round(fraction * LVIS_VAL_IMAGES))
    log.info("evaluation of %d LVIS-shaped val images", images)
    evaluation = measure_evaluation_scale(images, e["lvis_eval_images"] or images, e["detections"], seed, e["repeats"])
    return {
        "meta": meta,
        "config": dict(cfg),
        "data": data,
        "worker": worker,
        "postprocess": postprocess,
        "eval": evaluation,
    }


def format_scale_report(result: dict[str, Any]) -> str:
    """Markdown tables of a :func:`run_scale_benchmark` result."""
    meta, data, worker, post, ev = (result[k] for k in ("meta", "data", "worker", "postprocess", "eval"))
    counts = list(post["ms"]["a"])
    after = worker["after_batches_mb"]
    lines = [
        f"{meta['device_name']}, torch {meta['torch']}, preset {meta['preset']}, {meta['fraction']} of LVIS v1",
        "",
        "| train json | images | annotations | json MB | main-process MB | build s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| generated | {data['images']} | {data['annotations']} | {data['json_mb']:.1f} | "
        f"{data['main_process_mb']:+.0f} | {data['build_s']:.1f} |",
        "",
        f"data-loader worker private MB ({worker['num_workers']} workers, batch {worker['batch_size']}; "
        f"{worker['note']}):",
        "",
        "| at start | " + " | ".join(f"after {b}" for b in after) + " |",
        "| ---: |" + " ---: |" * len(after),
        f"| {worker['start_mb']:.0f} | " + " | ".join(f"{v:.0f}" for v in after.values()) + " |",
        "",
        f"post-processing, ms per {post['image_size'][0]}×{post['image_size'][1]} image, best of {post['repeats']}, "
        f"{post['num_threads']} torch thread(s):",
        "",
        "| variant | " + " | ".join(f"@{n}" for n in counts) + " | marginal ×(a) |",
        "| --- |" + " ---: |" * (len(counts) + 1),
    ]
    for name in VARIANTS:
        ratio = "1" if name == "a" else f"{post['marginal_ratio'][name]:.3f}"
        cells = " | ".join(f"{post['ms'][name][n]:.1f}" for n in counts)
        lines.append(f"| ({name}) {post['descriptions'][name]} | {cells} | {ratio} |")
    lines += [
        f"(c) RLEs identical to (a)'s: {post['rle_identical']}",
        "",
        f"evaluation, LVIS-shaped val, {ev['detections_per_image']} detections per image, a fresh process each:",
        "",
        "| evaluator | images | segm s | bbox s | peak RSS MB | above its baseline MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, label in (("iemask", "LVISEvaluator"), ("lvis_eval", "LVISEval (lvis package)")):
        r = ev[name]
        peak, added = r["peak_rss_mb"], r["peak_rss_mb"] - r["baseline_rss_mb"]
        lines.append(f"| {label} | {r['images']} | {r['segm_s']:.1f} | {r['bbox_s']:.1f} | {peak:.0f} | {added:+.0f} |")
    return "\n".join(lines)
