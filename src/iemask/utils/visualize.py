"""Overlays of predicted (or ground-truth) instances: the one drawing function for rendered images.

Each instance gets its own colour, a shade of its class colour (instances of one class differ yet stay
recognisably that class), a translucent fill, a darker opaque outline, an optional box and a
"name score" label on a filled background kept inside the image, in a font scaled to the image.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, features

from iemask.models.postprocess import BinaryMasks

Colour = tuple[int, int, int]

_PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
)  # fmt: skip
# Shades of a class colour for its 1st, 2nd, ... instance in an image: > 0 mixes towards white, < 0 towards black.
_SHADES = (0.0, -0.4, 0.4, -0.6, 0.6, -0.2, 0.2)
_OUTLINE_DARKENING = 0.5  # outline = instance colour times this
_FONT_SCALE = 0.03  # scaled font size: this fraction of the image's shorter side
_MIN_FONT_SIZE = 8


def class_colour(label: int) -> Colour:
    """A stable, distinct colour per class label."""
    return _PALETTE[label % len(_PALETTE)]


def shade(colour: Colour, amount: float) -> Colour:
    """``colour`` mixed towards white (``amount`` > 0) or black (< 0) by ``|amount|`` in [0, 1]."""
    target = 255 if amount > 0 else 0
    r, g, b = (round(c + (target - c) * abs(amount)) for c in colour)
    return r, g, b


def instance_colours(labels: Sequence[int]) -> list[Colour]:
    """One colour per instance: the k-th instance of a class gets the k-th shade of the class colour."""
    seen: dict[int, int] = {}
    colours = []
    for label in labels:
        k = seen.get(label, 0)
        seen[label] = k + 1
        colours.append(shade(class_colour(label), _SHADES[k % len(_SHADES)]))
    return colours


def scaled_font_size(height: int, width: int) -> int:
    """Label font size (px) for an image: grows with its shorter side, never below a readable minimum."""
    return max(_MIN_FONT_SIZE, round(_FONT_SCALE * min(height, width)))


@lru_cache(maxsize=16)
def load_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A ``size`` px font: Pillow's default (FreeType builds), else matplotlib's bundled DejaVu Sans,
    else Pillow's fixed-size bitmap default."""
    if features.check("freetype2"):
        return ImageFont.load_default(size=size)
    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default()


def draw_instances(
    image: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor | BinaryMasks | None = None,
    scores: torch.Tensor | None = None,
    class_names: Sequence[str] | None = None,
    mask_threshold: float = 0.5,
    alpha: float = 0.45,
    *,
    font_size: int | None = None,
    show_boxes: bool = True,
    score_thresh: float = 0.0,
) -> torch.Tensor:
    """Draw masks, outlines, boxes and "name score" labels on an image; return a uint8 (3, H, W) copy.

    Instances are drawn lowest score first, so the best-scoring ones end up on top.

    Args:
        image: uint8 (3, H, W), or float in [0, 1].
        boxes: (N, 4) XYXY pixels. labels: (N,) contiguous 1..K.
        masks: (N, H, W) or (N, 1, H, W), binary or probabilities (thresholded at ``mask_threshold``),
            or the model's ``BinaryMasks`` (already thresholded; drawn patch by patch, no (N, H, W) array).
        scores: (N,) optional; shown next to the class name.
        class_names: names of labels 1..K (``class_names[k-1]``); numbers are shown without them.
        alpha: opacity of the mask fill (0: the image shows through unchanged; outlines stay opaque).
        font_size: label font size in px; ``None`` scales it to the image (see ``scaled_font_size``).
        show_boxes: draw the boxes (labels are drawn either way, at the box's top-left corner).
        score_thresh: instances scoring below it are not drawn (ignored without ``scores``).
    """
    if image.dtype != torch.uint8:
        image = (image.clamp(0, 1) * 255).to(torch.uint8)
    height, width = image.shape[-2:]
    boxes, labels = boxes.detach().cpu(), labels.detach().cpu()
    masks = masks.detach().cpu() if masks is not None else None
    if scores is not None:
        scores = scores.detach().cpu()
        keep = scores >= score_thresh
        boxes, labels, scores = boxes[keep], labels[keep], scores[keep]
        masks = masks[keep] if masks is not None else None
    colours = instance_colours([int(k) for k in labels])
    order = scores.argsort(stable=True).tolist() if scores is not None else list(range(len(labels)))
    line = 1 if max(height, width) < 512 else 2

    canvas = image.detach().cpu().permute(1, 2, 0).numpy().astype(np.float32)  # (H, W, 3)
    if masks is not None and len(masks):
        original = canvas.copy()
        patches = list(_patches(masks, (height, width), mask_threshold))
        for i in order:
            y0, x0, patch = patches[i]
            region = (slice(y0, y0 + patch.shape[0]), slice(x0, x0 + patch.shape[1]))
            fill = np.asarray(colours[i], dtype=np.float32)
            canvas[region][patch] = original[region][patch] * (1 - alpha) + fill * alpha
            canvas[region][_outline(patch, line)] = fill * _OUTLINE_DARKENING
    picture = Image.fromarray(np.rint(canvas).astype(np.uint8))

    draw = ImageDraw.Draw(picture)
    font = load_font(font_size or scaled_font_size(height, width))
    if show_boxes:
        for i in order:
            x0, y0, x1, y1 = boxes[i].tolist()
            draw.rectangle((x0, y0, max(x0, x1), max(y0, y1)), outline=colours[i], width=line)  # PIL refuses x1 < x0
    for i in order:  # after all boxes, so that no box line crosses a label
        k = int(labels[i])
        text = class_names[k - 1] if class_names and 1 <= k <= len(class_names) else str(k)
        if scores is not None:
            text = f"{text} {float(scores[i]):.2f}"
        _draw_label(draw, text, font, colours[i], tuple(boxes[i, :2].tolist()), (width, height))
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)


def _patches(
    masks: torch.Tensor | BinaryMasks, size: tuple[int, int], threshold: float
) -> Iterator[tuple[int, int, np.ndarray]]:
    """(y0, x0, bool patch) per mask: ``BinaryMasks``' own patches, or a dense mask cropped to its pixels.

    Both kinds give the same drawing: pixels outside a patch are outside its mask.
    """
    if isinstance(masks, BinaryMasks):
        for y0, x0, patch in masks.patches():
            yield y0, x0, patch.numpy()
        return
    dense = masks.reshape(len(masks), *size)
    binary = dense if dense.dtype == torch.bool else dense > threshold
    for mask in binary.numpy():
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if not len(rows):
            yield 0, 0, mask[:0, :0]
            continue
        yield int(rows[0]), int(cols[0]), mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The mask's pixels within ``width`` px (square neighbourhood) of a pixel outside it."""
    if not mask.size:
        return mask
    outside = F.pad(torch.from_numpy(~mask).float()[None, None], (width,) * 4, value=1.0)
    near_outside = F.max_pool2d(outside, 2 * width + 1, stride=1)[0, 0].bool().numpy()
    return mask & near_outside


def _draw_label(
    draw: ImageDraw.ImageDraw,
    text: str,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    colour: Colour,
    corner: tuple[float, float],
    size: tuple[int, int],
) -> None:
    """``text`` on a ``colour`` box just above ``corner`` (inside the box when there is no room above),
    shifted to lie within the image; black or white text, whichever reads better on the colour."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(1, (bottom - top) // 6)
    box_w, box_h = right - left + 2 * pad, bottom - top + 2 * pad
    x, y = corner
    y = y - box_h if y - box_h >= 0 else y
    x = max(0, min(round(x), size[0] - box_w))
    y = max(0, min(round(y), size[1] - box_h))
    draw.rectangle((x, y, x + box_w - 1, y + box_h - 1), fill=colour)
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    draw.text((x + pad - left, y + pad - top), text, font=font, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255))
