"""Detection transforms on ``torchvision.transforms.v2``: boxes and masks move with the image.

Training: multi-scale resize of the shorter side (a list to choose from, or an inclusive
range), capped by a max size; horizontal flip; removal of boxes that became degenerate.
Test-time resize is the model's own (torchvision's ``GeneralizedRCNNTransform`` resizes to
``min_size``/``max_size`` and pastes predictions back at the original resolution), so the
evaluation pipeline only converts the image to float.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision.transforms.v2 as v2
from torchvision import tv_tensors

SAMPLINGS = ("choice", "range")


def train_short_sides(min_size: int | Sequence[int], sampling: str = "choice") -> list[int]:
    """Short-side candidates: ``choice`` takes the list as is, ``range`` every size in ``[lo, hi]``.

    ``range`` gives Detectron2's ``MIN_SIZE_TRAIN_SAMPLING="range"`` (uniform integer in the
    closed interval) through v2's ``RandomShortestSize``, which draws uniformly from a list.
    """
    sizes = [min_size] if isinstance(min_size, int) else [int(s) for s in min_size]
    if sampling not in SAMPLINGS:
        raise ValueError(f"data.train_min_size_sampling={sampling!r}: choose one of {', '.join(SAMPLINGS)}")
    if sampling == "range":
        if len(sizes) != 2 or sizes[0] > sizes[1]:
            raise ValueError(
                f"data.train_min_size={list(sizes)} with data.train_min_size_sampling=range: range sampling needs "
                "data.train_min_size=[low, high] with low <= high (e.g. [640, 800]); for fixed sizes set "
                "data.train_min_size_sampling=choice (one of the listed sizes per image)"
            )
        return list(range(sizes[0], sizes[1] + 1))
    if not sizes or min(sizes) < 1:
        raise ValueError(f"data.train_min_size={list(sizes)}: short-side sizes must be positive")
    return sizes


def _to_float() -> v2.ToDtype:
    return v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)


def build_train_transforms(
    min_size: int | Sequence[int],
    max_size: int,
    sampling: str = "choice",
    hflip_prob: float = 0.5,
) -> v2.Compose:
    """Multi-scale resize + horizontal flip + sanitising, then uint8 → float in [0, 1]."""
    return v2.Compose(
        [
            v2.RandomShortestSize(train_short_sides(min_size, sampling), max_size=max_size),
            v2.RandomHorizontalFlip(hflip_prob),
            v2.SanitizeBoundingBoxes(min_size=1.0),
            _to_float(),
        ]
    )


def build_eval_transforms() -> v2.Compose:
    """uint8 → float in [0, 1]; the model resizes and maps predictions back to this size."""
    return v2.Compose([_to_float()])
