"""Inference outside the training loop: test-time settings, reading images, predicting folders."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torchvision.models.detection import MaskRCNN

from iemask.data.image_io import read_rgb, write_png
from iemask.evaluation import to_coco_results
from iemask.utils.visualize import draw_instances

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def set_test_settings(
    model: MaskRCNN,
    min_size: int | None = None,
    max_size: int | None = None,
    detections_per_img: int | None = None,
    score_thresh: float | None = None,
) -> None:
    """Apply a dataset's inference protocol to a model (``None`` keeps the current value)."""
    if min_size is not None:
        model.transform.min_size = (int(min_size),)
    if max_size is not None:
        model.transform.max_size = int(max_size)
    if detections_per_img is not None:
        model.roi_heads.detections_per_img = int(detections_per_img)
    if score_thresh is not None:
        model.roi_heads.score_thresh = float(score_thresh)


def list_images(source: str | Path) -> list[Path]:
    """An image file, or the images of a folder (sorted, not recursive)."""
    source = Path(source)
    if source.is_file():
        return [source]
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {source}")
        return files
    raise FileNotFoundError(f"input not found: {source} (give an image file or a folder of images)")


def image_id_for(path: Path, index: int) -> int:
    """COCO image id of a file: its numeric stem (``000000139.jpg`` → 139), else its index."""
    return int(path.stem) if path.stem.isdigit() else index


@torch.inference_mode()
def predict_images(
    model: MaskRCNN, paths: Sequence[Path], device: torch.device
) -> Iterator[tuple[Path, torch.Tensor, dict[str, torch.Tensor]]]:
    """Yield ``(path, uint8 image, detections on the CPU)`` for each image, one at a time."""
    model.eval().to(device)
    for path in paths:
        image = read_rgb(path)
        (output,) = model([image.to(device, torch.float32) / 255])
        yield path, image, {k: v.cpu() for k, v in output.items()}


def predict_folder(
    model: MaskRCNN,
    source: str | Path,
    output_dir: str | Path,
    class_names: Sequence[str] | None,
    category_ids: Sequence[int],
    device: torch.device,
    score_thresh: float = 0.5,
    mask_thresh: float = 0.5,
) -> list[dict]:
    """Write ``<stem>.png`` overlays into ``output_dir``; return COCO results with ``file_name``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for index, (path, image, out) in enumerate(predict_images(model, list_images(source), device)):
        keep = out["scores"] >= score_thresh
        out = {k: v[keep] for k, v in out.items()}
        overlay = draw_instances(
            image, out["boxes"], out["labels"], out["masks"], out["scores"], class_names, mask_thresh
        )
        write_png(overlay, output_dir / f"{path.stem}.png")
        for r in to_coco_results(image_id_for(path, index), out, category_ids, mask_threshold=mask_thresh):
            results.append({**r, "file_name": path.name})
        log.info("%s: %d detections", path.name, int(keep.sum()))
    return results
