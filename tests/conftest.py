"""Shared fixtures: tiny models and tiny images, CPU only, nothing downloaded."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from iemask.models import build_model  # noqa: E402

TINY = dict(backbone="resnet18", neck_channels=64, norm="gn", trainable_layers=5, min_size=128, max_size=128)


@pytest.fixture
def tiny_model_factory():
    """Build a small CPU model (ResNet-18, GroupNorm, 64-channel neck) with given switches."""

    def make(num_classes: int = 3, **switches):
        torch.manual_seed(0)
        return build_model(num_classes, **{**TINY, **switches})

    return make


def square_target(size: int = 128, boxes=((16, 16, 64, 64), (70, 40, 120, 100)), labels=(1, 2)) -> dict:
    """A target with filled rectangles as masks; boxes in (x1, y1, x2, y2) pixels."""
    masks = torch.zeros(len(boxes), size, size, dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        masks[i, y1:y2, x1:x2] = 1
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": masks,
    }


def square_image(target: dict, size: int = 128) -> torch.Tensor:
    """A noisy image where each target mask is painted in a class colour."""
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, size, size, generator=g) * 0.2
    colours = torch.tensor([[0.0, 0.0, 0.0], [0.9, 0.1, 0.1], [0.1, 0.1, 0.9], [0.1, 0.9, 0.1]])
    for m, lab in zip(target["masks"], target["labels"], strict=True):
        img[:, m.bool()] = colours[lab][:, None]
    return img
