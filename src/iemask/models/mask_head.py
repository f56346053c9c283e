"""The encoding-decoding mask head (docs/method.md §3) and its plain 1×1 per-class predictor.

TorchScript: ``chunk_size`` is declared ``int | None`` in the class's ``__annotations__``, as torchvision
declares its heads' attributes (TorchScript reads no string annotation, and a ``None`` attribute would be
typed ``None``), and ``forward`` copies it to a local, which TorchScript narrows to ``int`` after the
``is None`` test.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.misc import Conv2dNormActivation

from iemask.models.norms import group_norm

SKIPS = ("concat", "sum")


def _conv3(in_channels: int, out_channels: int) -> Conv2dNormActivation:
    """3×3 conv, GroupNorm(32), ReLU: every conv of the head."""
    return Conv2dNormActivation(in_channels, out_channels, 3, norm_layer=group_norm)


def _up(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class EncDecMaskHead(nn.Module):
    """U-shaped mask head on 28×28 RoI features: encode to 7×7, decode back to 28×28.

    Widths scale with the input width w (256 in the paper): encoder w→2w→2w (14×14),
    2w→4w→4w (7×7); decoder 4w→2w (→14×14), (2w⊕2w)→2w→w (→28×28), (w⊕w)→w.

    Args:
        in_channels: RoI feature width w.
        skip: ``"concat"`` (the authors' code) or ``"sum"`` (the paper's equations).
        chunk_size: at inference, run at most this many RoIs at once so memory stays
            bounded with many detections (LVIS: 300 per image); ``None`` runs all at once.
    """

    __annotations__ = {"chunk_size": int | None}

    def __init__(self, in_channels: int = 256, skip: str = "concat", chunk_size: int | None = None):
        super().__init__()
        if skip not in SKIPS:
            raise ValueError(f"unknown skip {skip!r}: choose one of {', '.join(SKIPS)}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
        w = in_channels
        grow = 2 if skip == "concat" else 1
        self.skip = skip
        self.chunk_size = chunk_size
        self.out_channels = w
        self.encode1 = nn.Sequential(nn.MaxPool2d(2), _conv3(w, 2 * w), _conv3(2 * w, 2 * w))
        self.encode2 = nn.Sequential(nn.MaxPool2d(2), _conv3(2 * w, 4 * w), _conv3(4 * w, 4 * w))
        self.decode1 = _conv3(4 * w, 2 * w)
        self.decode2 = nn.Sequential(_conv3(grow * 2 * w, 2 * w), _conv3(2 * w, w))
        self.fuse = _conv3(grow * w, w)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _join(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.cat([a, b], dim=1) if self.skip == "concat" else a + b

    def _forward(self, x: Tensor) -> Tensor:
        # x: (R, w, 28, 28)
        e = self.encode1(x)  # (R, 2w, 14, 14)
        e2 = self.encode2(e)  # (R, 4w, 7, 7)
        d = _up(self.decode1(e2))  # (R, 2w, 14, 14)
        d2 = _up(self.decode2(self._join(e, d)))  # (R, w, 28, 28)
        return self.fuse(self._join(x, d2))  # (R, w, 28, 28)

    def forward(self, x: Tensor) -> Tensor:
        chunk_size = self.chunk_size  # a local, so that TorchScript narrows it from int | None to int
        if self.training or chunk_size is None or x.shape[0] <= chunk_size:
            return self._forward(x)
        return torch.cat([self._forward(chunk) for chunk in x.split(chunk_size)])


class MaskPredictor(nn.Module):
    """Plain 1×1 per-class mask logits at the head's resolution: (R, w, 28, 28) → (R, K, 28, 28)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.mask_fcn_logits = nn.Conv2d(in_channels, num_classes, 1)
        nn.init.kaiming_normal_(self.mask_fcn_logits.weight, mode="fan_out", nonlinearity="relu")
        nn.init.constant_(self.mask_fcn_logits.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        return self.mask_fcn_logits(x)
