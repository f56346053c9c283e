"""Reading and writing images with Pillow (torchvision's own codecs are deprecated since 0.29)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


class ImageDecodeError(ValueError):
    """An image file exists but cannot be decoded; the message names it."""


def read_rgb(path: str | Path) -> torch.Tensor:
    """Decode an image file as RGB uint8 (3, H, W)."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageDecodeError(f"cannot decode image {path}: {e}") from e
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def write_png(image: torch.Tensor, path: str | Path) -> None:
    """Write a uint8 (3, H, W) tensor as a PNG file."""
    Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(path)
