"""Normalisation layers chosen by name, shared by the backbone, neck and heads."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

NORMS = ("frozen_bn", "bn", "gn")


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``max_groups`` that divides ``channels``.

    The paper's widths all divide by 32; narrow CPU models (e.g. 48 AFF channels at
    neck width 64) fall back to the largest divisor so the same code serves both.
    """
    groups = math.gcd(channels, max_groups)
    return nn.GroupNorm(groups, channels)


def norm_layer(name: str) -> Callable[[int], nn.Module]:
    """Return a ``channels -> module`` factory for ``name`` in :data:`NORMS`.

    ``frozen_bn`` is the paper's setting (ImageNet statistics, no updates);
    ``bn`` trains BatchNorm; ``gn`` is GroupNorm(32) for stable from-scratch runs.
    """
    if name == "frozen_bn":
        return FrozenBatchNorm2d
    if name == "bn":
        return nn.BatchNorm2d
    if name == "gn":
        return group_norm
    raise ValueError(f"unknown norm {name!r}: choose one of {', '.join(NORMS)}")
