"""The authors' released IEMask modules (github.com/Fhujinwu/IEMask), module for module: ``model.variant=official``.

docs/method.md §7. The authors' Detectron2 fork differs from the paper's equations in the neck and in
details of the mask head; this module rebuilds their structure on torchvision's detector so both can be
trained and compared with the same switches. Attribute names follow theirs (``fpn_lateral5``,
``gimdoule``, ``weight1``...) so that :mod:`iemask.models.convert` maps a checkpoint by renaming prefixes.
Where their code hard-codes the R-50/101 widths (GIM on 2048 channels, AFF on 192, GroupNorm(32)),
these modules derive them from the input widths and give the same modules at those widths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from iemask.models.mask_head import MaskPredictor
from iemask.models.neck import NormFactory
from iemask.models.norms import group_norm

VARIANTS = ("paper", "official")  # model.variant: the paper's equations (neck.py, mask_head.py) or this module


def check_variant(variant: str) -> None:
    """Raise ``ValueError`` naming the choices for an unknown ``model.variant``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown model.variant {variant!r}: choose one of {', '.join(VARIANTS)}")


def _conv3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3×3 conv with bias and PyTorch's default initialisation (as ``nn.Conv2d`` in their code)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)


class Conv2dNorm(nn.Conv2d):
    """Detectron2's ``layers.Conv2d`` as their FPN uses it: a conv, then an optional norm (keys ``norm.*``).

    With a norm the conv has no bias (their ``use_bias = norm == ""``); without one it is ``nn.Conv2d``, key for key.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm: NormFactory = None):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=norm is None)
        self.norm = norm(out_channels) if norm is not None else None

    def forward(self, x: Tensor) -> Tensor:
        x = self._conv_forward(x, self.weight, self.bias)
        if self.norm is not None:
            x = self.norm(x)
        return x


def _c2_xavier(conv: nn.Conv2d) -> nn.Conv2d:
    """fvcore's ``c2_xavier_fill``: Kaiming-uniform (a=1), zero bias (their FPN output convs only)."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.constant_(conv.bias, 0)
    return conv


class CEMLayer(nn.Module):
    """Their ``cem.CEMayer``: an SE gate of 1×1 convs with bias, reduction 16, ``x * sigmoid(...)``."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1), nn.Sigmoid()
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.fc(self.avg_pool(x))  # (N, C, H, W) * (N, C, 1, 1)


class SELayer(nn.Module):
    """Their ``seblock.SELayer`` (inside AFF): an SE gate of bias-free linear layers, reduction 16."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(self.avg_pool(x).flatten(1))  # (N, C)
        return x * y[:, :, None, None]


class GlobalEnhanceModule(nn.Module):
    """Their ``gim.GlobalEnchanceModule``: two 5×5 stride-2 convs with no activation, GAP, a 1×1 conv.

    They repeat the pooled vector over C5's H×W before the 1×1 conv; projecting first and expanding
    after gives the same values at every position for a fraction of the work. Output (N, C_out, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, in_channels // 2, 5, stride=2, padding=2),
            nn.Conv2d(in_channels // 2, in_channels // 4, 5, stride=2, padding=2),
            nn.AdaptiveAvgPool2d(1),
        )
        self.conv1 = nn.Conv2d(in_channels // 4, out_channels, 1)

    def forward(self, c5: Tensor) -> Tensor:
        h, w = c5.shape[-2], c5.shape[-1]
        return self.conv1(self.conv(c5)).expand(-1, -1, h, w)


class OfficialFPN(nn.Module):
    """Their ``FPN`` top-down half: CEM before the 1×1 laterals of C3–C5, GIM joined to C5's lateral.

    ``P5' = conv3([GIM(C5); lateral5(C5)])`` (concatenation, 2w → w, 3×3), then FPN's top-down path:
    ``P'_i = lateral_i(C_i) + up2(P'_{i+1})``, ``P_i = output_i(P'_i)``. Without the bottom-up path
    that follows, ``pool`` (P6) is P5 subsampled, as Detectron2's ``LastLevelMaxPool``.

    Args:
        in_channels_list: widths of C2..C5.
        out_channels: neck width w.
        cem: CEM gates on C3..C5 (their code: every input of 512, 1024 or 2048 channels).
        gim: GIM and the concatenating 3×3 conv on the top level.
        pool: add the ``pool`` level (False when the bottom-up path makes it).
        norm: optional norm after the lateral and output convs (Detectron2's ``MODEL.FPN.NORM``; none in
            their configs). GIM's ``conv3`` and the bottom-up path take none in their code.
    """

    def __init__(
        self,
        in_channels_list: list[int],
        out_channels: int,
        cem: bool,
        gim: bool,
        pool: bool,
        norm: NormFactory = None,
    ):
        super().__init__()
        if len(in_channels_list) != 4:
            raise ValueError(f"the authors' FPN takes C2..C5 (4 levels), got {len(in_channels_list)} widths")
        for stage, c in enumerate(in_channels_list, start=2):
            lateral = Conv2dNorm(c, out_channels, 1, norm)
            gated = cem and stage > 2
            self.add_module(f"fpn_lateral{stage}", nn.Sequential(CEMLayer(c), lateral) if gated else lateral)
            self.add_module(f"fpn_output{stage}", _c2_xavier(Conv2dNorm(out_channels, out_channels, 3, norm)))
        self.gimdoule = GlobalEnhanceModule(in_channels_list[-1], out_channels) if gim else None
        self.conv3 = _conv3(2 * out_channels, out_channels) if gim else None
        self.extra = LastLevelMaxPool() if pool else None

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        # x: C2..C5 under names "0".."3" -> P2..P5 (N, w, H/4..H/32) under the same names (+ "pool": P6)
        names = list(x.keys())
        c2, c3, c4, c5 = x[names[0]], x[names[1]], x[names[2]], x[names[3]]
        top = self.fpn_lateral5(c5)
        if self.gimdoule is not None and self.conv3 is not None:
            top = self.conv3(torch.cat([self.gimdoule(c5), top], dim=1))
        td4 = self.fpn_lateral4(c4) + F.interpolate(top, size=c4.shape[-2:], mode="nearest")
        td3 = self.fpn_lateral3(c3) + F.interpolate(td4, size=c3.shape[-2:], mode="nearest")
        td2 = self.fpn_lateral2(c2) + F.interpolate(td3, size=c2.shape[-2:], mode="nearest")
        results = [self.fpn_output2(td2), self.fpn_output3(td3), self.fpn_output4(td4), self.fpn_output5(top)]
        if self.extra is not None:
            results, names = self.extra(results, [c2, c3, c4, c5], names)
        return {names[i]: results[i] for i in range(len(results))}


class OfficialBottomUp(nn.Module):
    """Their bottom-up path: ``N2 = P2``, ``N_i = conv1(fuse(down(N_{i-1}), P_i))``, ``N6 = pool(N5)``.

    One ``down`` (3×3, stride 2), one ``conv1`` (3×3) and one set of AFF weight branches serve all
    three levels. With AFF the fusion is ``W0 ⊙ down(N) + W1 ⊙ P`` with
    ``[W0, W1] = softmax(weight([weight1(down(N)); weight2(P)]))``; without AFF (our definition of the
    ``aff=false`` ablation here: their structure with a plain sum) it is ``down(N) + P``.

    Args:
        channels: neck width w.
        aff: the adaptive fusion weights.
        aff_channels: width of each weight branch (their code: 192 at w = 256; default ¾ w).
    """

    def __init__(self, channels: int, aff: bool, aff_channels: int | None = None):
        super().__init__()
        reduced = aff_channels or channels * 3 // 4
        self.down = _conv3(channels, channels, stride=2)
        self.conv1 = _conv3(channels, channels)
        self.weight1 = self._branch(channels, reduced) if aff else None
        self.weight2 = self._branch(channels, reduced) if aff else None
        self.weight = nn.Sequential(SELayer(2 * reduced), nn.Conv2d(2 * reduced, 2, 1)) if aff else None
        self.extra = LastLevelMaxPool()

    @staticmethod
    def _branch(channels: int, reduced: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(channels, reduced, 1), group_norm(reduced), nn.ReLU(inplace=True))

    def merge(self, n: Tensor, p: Tensor) -> Tensor:
        """``fuse(down(N_{i-1}), P_i)`` before ``conv1``; ``n`` is already down-sampled."""
        if self.weight1 is not None and self.weight2 is not None and self.weight is not None:
            w = self.weight(torch.cat([self.weight1(n), self.weight2(p)], dim=1)).softmax(dim=1)  # (N, 2, H, W)
            return n * w[:, 0:1] + p * w[:, 1:2]
        return n + p

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        # x: P2..P5 under "0".."3" -> N2..N5 under the same names, and "pool": N6
        names = list(x.keys())
        feats = list(x.values())
        outs = [feats[0]]
        for p in feats[1:]:
            outs.append(self.conv1(self.merge(self.down(outs[-1]), p)))
        outs, names = self.extra(outs, feats, names)
        return {names[i]: outs[i] for i in range(len(outs))}


class OfficialMaskHead(nn.Module):
    """Their ``MaskRCNNConvUpsampleHead`` body: a U-shaped head on 28×28 RoIs, concatenating skips.

    Convs are 3×3 with bias, each followed by GroupNorm(32) and ReLU; up-sampling is bilinear with
    ``align_corners=True``. Widths w → 2w → 4w as the paper variant's ``EncDecMaskHead``; the
    predictor is :class:`OfficialMaskPredictor`.

    Args:
        in_channels: RoI feature width w.
        chunk_size: at inference, at most this many RoIs at once (``None``: all), as ``EncDecMaskHead``
            (and declared ``int | None`` for TorchScript as there).
    """

    __annotations__ = {"chunk_size": int | None}

    def __init__(self, in_channels: int = 256, chunk_size: int | None = None):
        super().__init__()
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
        w = in_channels
        self.chunk_size = chunk_size
        self.out_channels = w
        self.down1 = nn.Sequential(nn.MaxPool2d(2), *self._block(w, 2 * w), *self._block(2 * w, 2 * w))
        self.down2 = nn.Sequential(nn.MaxPool2d(2), *self._block(2 * w, 4 * w), *self._block(4 * w, 4 * w))
        self.conv1 = nn.Sequential(*self._block(4 * w, 2 * w))
        self.conv2 = nn.Sequential(*self._block(4 * w, 2 * w), *self._block(2 * w, w))
        self.conv3 = nn.Sequential(*self._block(2 * w, w))

    @staticmethod
    def _block(in_channels: int, out_channels: int) -> list[nn.Module]:
        return [_conv3(in_channels, out_channels), group_norm(out_channels), nn.ReLU(inplace=True)]

    def _forward(self, x: Tensor) -> Tensor:
        # x: (R, w, 28, 28)
        y2 = self.down1(x)  # (R, 2w, 14, 14)
        d = self.conv1(self.down2(y2))  # (R, 2w, 7, 7)
        d = F.interpolate(d, scale_factor=2.0, mode="bilinear", align_corners=True)
        d = self.conv2(torch.cat([d, y2], dim=1))  # (R, w, 14, 14)
        d = F.interpolate(d, scale_factor=2.0, mode="bilinear", align_corners=True)
        return self.conv3(torch.cat([d, x], dim=1))  # (R, w, 28, 28)

    def forward(self, x: Tensor) -> Tensor:
        chunk_size = self.chunk_size  # a local, so that TorchScript narrows it from int | None to int
        if self.training or chunk_size is None or x.shape[0] <= chunk_size:
            return self._forward(x)
        return torch.cat([self._forward(chunk) for chunk in x.split(chunk_size)])


class OfficialMaskPredictor(MaskPredictor):
    """The 1×1 per-class logits with Detectron2's initialisation (normal, std 0.001; zero bias).

    One map more than theirs: torchvision's class 0 is the background (Detectron2 has no background map).
    """

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(in_channels, num_classes)
        nn.init.normal_(self.mask_fcn_logits.weight, std=0.001)
        nn.init.constant_(self.mask_fcn_logits.bias, 0)


def build_official_neck(
    in_channels_list: list[int],
    channels: int,
    *,
    cem: bool,
    gim: bool,
    bottom_up: bool,
    aff: bool,
    norm: NormFactory = None,
) -> tuple[OfficialFPN, OfficialBottomUp | None]:
    """The authors' neck with the IEMask switches: their FPN half, and their bottom-up path if ``bottom_up``."""
    fpn = OfficialFPN(in_channels_list, channels, cem=cem, gim=gim, pool=not bottom_up, norm=norm)
    return fpn, OfficialBottomUp(channels, aff=aff) if bottom_up else None
