"""Overlays of predicted (or ground-truth) instances, drawn with torchvision's utilities."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from iemask.models.postprocess import BinaryMasks

_PALETTE = torch.tensor(
    [
        (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
        (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    ],
    dtype=torch.uint8,
)  # fmt: skip


def class_colour(label: int) -> tuple[int, int, int]:
    """A stable, distinct colour per class label."""
    return tuple(int(c) for c in _PALETTE[label % len(_PALETTE)])


def draw_instances(
    image: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor | BinaryMasks | None = None,
    scores: torch.Tensor | None = None,
    class_names: Sequence[str] | None = None,
    mask_threshold: float = 0.5,
    alpha: float = 0.45,
) -> torch.Tensor:
    """Draw masks, boxes and "name score" captions on a uint8 (3, H, W) image.

    Args:
        image: uint8 (3, H, W), or float in [0, 1].
        boxes: (N, 4) XYXY pixels. labels: (N,) contiguous 1..K.
        masks: (N, H, W) or (N, 1, H, W), binary or probabilities (thresholded at ``mask_threshold``),
            or the model's ``BinaryMasks`` (already thresholded; drawn without an (N, H, W) array).
        scores: (N,) optional; shown next to the class name.
        class_names: names of labels 1..K (``class_names[k-1]``); numbers are shown without them.
    """
    if image.dtype != torch.uint8:
        image = (image.clamp(0, 1) * 255).to(torch.uint8)
    image, boxes, labels = image.cpu(), boxes.detach().cpu(), labels.detach().cpu()
    colours = [class_colour(int(k)) for k in labels]
    if isinstance(masks, BinaryMasks) and len(masks):
        merged, merged_colours = _merge_by_colour(masks.cpu(), colours, image.shape[-2:])
        image = draw_segmentation_masks(image, merged, alpha=alpha, colors=merged_colours)
    elif masks is not None and len(masks):
        binary = masks.detach().cpu().reshape(len(masks), *image.shape[-2:]) > mask_threshold
        image = draw_segmentation_masks(image, binary, alpha=alpha, colors=colours)
    if len(boxes):
        names = [class_names[int(k) - 1] if class_names else str(int(k)) for k in labels]
        if scores is not None:
            names = [f"{n} {float(s):.2f}" for n, s in zip(names, scores.detach().cpu(), strict=True)]
        image = draw_bounding_boxes(image, boxes, labels=names, colors=colours, width=2)
    return image


def _merge_by_colour(
    masks: BinaryMasks, colours: Sequence[tuple[int, int, int]], size: Sequence[int]
) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """At most one mask per colour, plus one for overlaps, that draw as the N masks would.

    ``draw_segmentation_masks`` paints each pixel with its last mask's colour and overlaps black;
    splitting the pixels the same way gives disjoint masks, so the drawing is identical while the
    arrays are (colours + 1, H, W) instead of (N, H, W).
    """
    palette = sorted(set(colours))
    top = torch.zeros(tuple(size), dtype=torch.uint8)  # (H, W) 1 + palette index of the last mask there; 0: none
    count = torch.zeros(tuple(size), dtype=torch.int32)  # (H, W) masks covering each pixel
    for (y0, x0, patch), colour in zip(masks.patches(), colours, strict=True):
        rows, cols = slice(y0, y0 + patch.shape[0]), slice(x0, x0 + patch.shape[1])
        top[rows, cols][patch] = palette.index(colour) + 1
        count[rows, cols] += patch
    once = count == 1
    merged = [(top == i + 1) & once for i in range(len(palette))] + [count > 1]  # each (H, W)
    return torch.stack(merged), [*palette, (0, 0, 0)]
