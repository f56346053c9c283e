"""Mask post-processing cost against torchvision's, side by side in one process (a measurement, not a test).

    python -m iemask.benchmarking.postprocess [--repeats 5] [--threads 1] [--memory]

On synthetic detections of an 800×1216 image (10, 35, 100 and 300 of them; LVIS keeps up to 300) it
times, interleaved, per image:

(a) torchvision's ``paste_masks_in_image`` + ``> 0.5`` + pycocotools' encoding of those masks;
(b) the old path: torchvision's ``GeneralizedRCNNTransform.postprocess`` + ``to_coco_results``;
(c) the new path: the binary ``MaskPostprocessTransform.postprocess`` + ``to_coco_results``;

and prints ms per image (the best of ``--repeats``: other load only ever adds time) and the marginal
cost of the 290 detections between 10 and 300 of (c) and (b) as ratios to (a)'s. On a loaded machine
every multi-threaded op can wait a scheduler slice for its threads, which inflates the per-detection
ops of (c) most; ``--threads 1`` measures the work itself.

``--memory`` runs each variant once more in a fresh subprocess per detection count on a 4000×3000 image
and prints its peak resident memory above what the process held before it: Linux' ``VmHWM`` high-water
mark, reset just before the run (torch's CPU allocator keeps no statistics, tracemalloc misses its
memory, and ``ru_maxrss`` carries this parent's peak into its children). A run that would need more
than ``--max-gib`` (torchvision's paste holds N float32 image-sized masks and stacks them: 2 × N × H ×
W × 4 B, 27 GiB at 300 detections) is skipped, with that lower bound printed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

from iemask.evaluation.common import to_coco_results
from iemask.models.postprocess import MaskPostprocessTransform

VARIANTS = ("a", "b", "c")
DESCRIPTIONS = {
    "a": "torchvision paste + threshold + encode",
    "b": "old: torchvision postprocess + to_coco_results",
    "c": "new: binary postprocess + to_coco_results",
}
MIN_SIZE, MAX_SIZE = 800, 1333  # torchvision's (and COCO/LVIS') test sizes
MASK_SIZE = 28
CATEGORY_IDS = list(range(1, 1204))  # LVIS' 1203 categories


def resized_shape(original: tuple[int, int]) -> tuple[int, int]:
    """The size torchvision's transform resizes an image of ``original`` (H, W) to at test time."""
    scale = min(MIN_SIZE / min(original), MAX_SIZE / max(original))
    return int(original[0] * scale), int(original[1] * scale)


def synthetic_detections(n: int, resized: tuple[int, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` detections as the ROI heads give them, in the ``resized`` (H, W) image: blob-shaped (N, 1, 28, 28)
    mask probabilities, boxes with sides log-uniform in 16..512 px (partly outside the image at times)."""
    g = torch.Generator().manual_seed(seed)
    h, w = resized
    sides = torch.exp(torch.empty(n, 2).uniform_(np.log(16), np.log(512), generator=g))  # (N, 2) w, h
    centres = torch.rand(n, 2, generator=g) * torch.tensor([w, h])  # (N, 2) x, y
    boxes = torch.cat((centres - sides / 2, centres + sides / 2), dim=1)  # (N, 4)
    boxes = torch.stack(
        (boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)), 1
    )  # clipped, as the ROI heads clip
    grid = torch.linspace(-1, 1, MASK_SIZE)
    radius = grid[None, :, None] ** 2 + grid[None, None, :] ** 2  # (1, 28, 28)
    noise = torch.nn.functional.interpolate(torch.randn(n, 1, 7, 7, generator=g), size=MASK_SIZE, mode="bilinear")
    masks = torch.sigmoid(8 * (0.6 - radius[:, None]) + 2 * noise)  # (N, 1, 28, 28)
    return {
        "boxes": boxes,
        "labels": torch.randint(1, len(CATEGORY_IDS) + 1, (n,), generator=g),
        "scores": torch.rand(n, generator=g),
        "masks": masks,
    }


def _transform(mask_output: str | None) -> GeneralizedRCNNTransform:
    """torchvision's test-time transform (``None``), or the project's with ``mask_output``."""
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    if mask_output is None:
        return GeneralizedRCNNTransform(MIN_SIZE, MAX_SIZE, mean, std).eval()
    return MaskPostprocessTransform(MIN_SIZE, MAX_SIZE, mean, std, mask_output=mask_output).eval()


def variant(name: str, original: tuple[int, int]) -> Callable[[dict[str, torch.Tensor]], Any]:
    """The post-processing of one detection dict (resized-image coordinates) under variant ``name``."""
    resized = resized_shape(original)
    if name == "a":

        def run(det: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
            boxes = resize_boxes(det["boxes"], resized, original)
            masks = paste_masks_in_image(det["masks"], boxes, original)  # (N, 1, H, W) float32
            binary = (masks[:, 0] > 0.5).to(torch.uint8).numpy()  # (N, H, W)
            return mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))

        return run
    transform = _transform({"b": None, "c": "binary"}[name])

    def run(det: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        (out,) = transform.postprocess([dict(det)], [resized], [original])
        return to_coco_results(1, out, CATEGORY_IDS)

    return run


@torch.inference_mode()
def time_variants(
    counts: tuple[int, ...], original: tuple[int, int], repeats: int
) -> tuple[dict[str, dict[int, float]], bool]:
    """Best seconds per image of each variant at each detection count, the variants interleaved;
    and whether (c)'s RLEs equal (a)'s everywhere."""
    runs = {name: variant(name, original) for name in VARIANTS}
    seconds: dict[str, dict[int, list[float]]] = {name: {n: [] for n in counts} for name in VARIANTS}
    same = True
    everything = synthetic_detections(max(counts), resized_shape(original))
    for n in counts:
        det = {k: v[:n] for k, v in everything.items()}  # the first n: more detections, the same first ones
        for _ in range(repeats):
            outputs = {}
            for name, run in runs.items():
                start = time.perf_counter()
                outputs[name] = run(det)
                seconds[name][n].append(time.perf_counter() - start)
            same &= [r["counts"] for r in outputs["a"]] == [r["segmentation"]["counts"].encode() for r in outputs["c"]]
    return {name: {n: min(v) for n, v in per.items()} for name, per in seconds.items()}, same


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in MiB."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1)) / 1024


@torch.inference_mode()
def peak_memory(name: str, original: tuple[int, int], n: int) -> dict[str, float]:
    """Resident MiB of this process before one run of variant ``name`` and at its peak (run it in a fresh one)."""
    run = variant(name, original)
    det = synthetic_detections(n, resized_shape(original))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    before = _status_mib("VmRSS")
    start = time.perf_counter()
    run(det)
    seconds = time.perf_counter() - start
    peak = _status_mib("VmHWM")
    return {"before_mib": before, "peak_mib": peak, "added_mib": peak - before, "seconds": seconds}


def _peak_in_subprocess(name: str, original: tuple[int, int], n: int) -> dict[str, float]:
    args = ["--peak-of", name, "--height", str(original[0]), "--width", str(original[1]), "--detections", str(n)]
    args += ["--threads", str(torch.get_num_threads())]
    done = subprocess.run(
        [sys.executable, "-m", "iemask.benchmarking.postprocess", *args], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    """Print the timing table (and with ``--memory`` the peak-memory table)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 35, 100, 300])
    parser.add_argument("--memory", action="store_true", help="peak memory at 4000×3000 (--memory-counts)")
    parser.add_argument("--memory-counts", type=int, nargs="+", default=[10, 35, 300])
    parser.add_argument("--max-gib", type=float, default=6.0, help="skip (a), (b) runs needing more memory")
    parser.add_argument("--peak-of", choices=VARIANTS, help=argparse.SUPPRESS)  # the subprocess' job
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1216)
    parser.add_argument("--detections", type=int, default=300, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    original = (args.height, args.width)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_of:
        print(json.dumps(peak_memory(args.peak_of, original, args.detections)))
        return
    counts = tuple(args.counts)
    seconds, same = time_variants(counts, original, args.repeats)
    print(f"{original[0]}×{original[1]} image, best of {args.repeats}, {torch.get_num_threads()} torch threads")
    print("ms per image       " + "".join(f"{n:>10d}" for n in counts) + "   marginal")
    lo, hi = min(counts), max(counts)
    for name in VARIANTS:
        row = "".join(f"{1000 * seconds[name][n]:10.1f}" for n in counts)
        print(f"({name}) {row}   {1000 * (seconds[name][hi] - seconds[name][lo]):8.1f}   {DESCRIPTIONS[name]}")
    marginal_a = seconds["a"][hi] - seconds["a"][lo]
    for name in ("b", "c"):
        ratio = (seconds[name][hi] - seconds[name][lo]) / marginal_a
        print(f"marginal cost of {hi - lo} detections ({hi} − {lo}), ({name}) / (a): {ratio:.3f}")
    print(f"(c) RLEs identical to (a)'s: {same}")
    if args.memory:
        big = (3000, 4000)
        print(f"peak memory above the process' own, {big[0]}×{big[1]} image, one fresh process per run:")
        for n in args.memory_counts:
            for name in VARIANTS:
                dense_gib = 2 * n * big[0] * big[1] * 4 / 2**30  # torchvision's float masks, listed then stacked
                if name != "c" and dense_gib > args.max_gib:
                    print(f"({name}) {n:4d} detections: skipped, needs > {dense_gib:.1f} GiB   {DESCRIPTIONS[name]}")
                    continue
                m = _peak_in_subprocess(name, big, n)
                print(
                    f"({name}) {n:4d} detections: +{m['added_mib']:7.0f} MiB (peak {m['peak_mib']:.0f} MiB), "
                    f"{1000 * m['seconds']:7.0f} ms   {DESCRIPTIONS[name]}"
                )


if __name__ == "__main__":
    main()
