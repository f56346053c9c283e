"""The IEMask neck: information-enhanced FPN (CEM, GIM) and the bottom-up path with AFF.

docs/method.md §1–2. The neck is built from torchvision's ``FeaturePyramidNetwork``: CEM and GIM
replace its lateral (``inner_blocks``) modules, so with both off the neck *is* the FPN,
key for key. The bottom-up path is a separate module that consumes the FPN outputs.

TorchScript: pyramids are annotated ``dict[str, Tensor]`` and built as ``OrderedDict([(name, level), ...])``,
as torchvision's FPN does; a ``ModuleList`` is iterated with ``enumerate``; GIM's eager-only guard (CPU
autocast) sits under ``if not torch.jit.is_scripting():`` (a branch the compiler leaves out) and calls a
``@torch.jit.unused`` method.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import Conv2dNormActivation, SqueezeExcitation

from iemask.models.norms import group_norm

NormFactory = Callable[[int], nn.Module] | None


def _init_conv(module: nn.Module) -> None:
    """FPN's initialisation (kaiming-uniform, a=1; zero bias) for every conv in ``module``."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, a=1)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)


class CEM(nn.Module):
    """Channel enhancement module: squeeze-and-excitation, then the 1×1 channel reduction.

    ``CEM(C) = Conv1x1(F_s ⊙ C)`` with ``F_s = sigmoid(W2 ReLU(W1 GAP(C)))`` (R = 16).
    The channel scores ``F_s`` are the output of ``self.se.scale_activation``: a forward
    hook there sees them, shape (N, C, 1, 1).
    """

    def __init__(self, in_channels: int, out_channels: int, reduction: int = 16, norm: NormFactory = None):
        super().__init__()
        self.se = SqueezeExcitation(in_channels, max(in_channels // reduction, 1))
        self.reduce = Conv2dNormActivation(
            in_channels, out_channels, kernel_size=1, padding=0, norm_layer=norm, activation_layer=None
        )
        _init_conv(self.reduce)

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, C_in, H, W) -> (N, C_out, H, W)
        return self.reduce(self.se(x))


class GIM(nn.Module):
    """Global information module on C5: two 5×5 stride-2 convs, global pooling, 1×1 conv.

    Returns the global term of shape (N, C_out, 1, 1); the caller broadcasts it over
    C5's H×W (broadcasting after the 1×1 conv is the same function, and cheaper).
    Widths follow the authors' code: C → C/2 → C/4 → C_out (2048 → 1024 → 512 → 256).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid1, mid2 = in_channels // 2, in_channels // 4
        self.encode = nn.Sequential(
            nn.Conv2d(in_channels, mid1, kernel_size=5, stride=2, padding=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid1, mid2, kernel_size=5, stride=2, padding=2),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.project = nn.Conv2d(mid2, out_channels, kernel_size=1)
        _init_conv(self)

    def forward(self, c5: Tensor) -> Tensor:
        # c5: (N, C, H, W) -> (N, C_out, 1, 1)
        if not torch.jit.is_scripting():  # the guard is for eager training; a scripted model skips it
            if c5.device.type == "cpu" and torch.is_autocast_enabled("cpu") and min(c5.shape[-2:]) <= 2:
                return self._fp32_under_cpu_autocast(c5)
        return self.project(self.pool(self.encode(c5)))

    @torch.jit.unused
    def _fp32_under_cpu_autocast(self, c5: Tensor) -> Tensor:
        # A stride-2 conv of a 1-px-wide map under CPU autocast (oneDNN bf16) reads uninitialised
        # memory into its weight gradient (torch 2.14): NaNs or wrong values at random. C5 that
        # small (images up to 64 px) is cheap, so GIM runs in fp32 and returns the autocast dtype.
        with torch.autocast("cpu", enabled=False):
            global_term = self.project(self.pool(self.encode(c5.float())))
        return global_term.to(torch.get_autocast_dtype("cpu"))


class TopLateral(nn.Module):
    """The C5 lateral with GIM: ``P5_lateral = lateral(C5) + GIM(C5)`` (broadcast over H×W)."""

    def __init__(self, lateral: nn.Module, gim: GIM):
        super().__init__()
        self.lateral = lateral
        self.gim = gim

    def forward(self, c5: Tensor) -> Tensor:
        return self.lateral(c5) + self.gim(c5)


class IEFPN(FeaturePyramidNetwork):
    """Information-enhanced FPN: torchvision's FPN with CEM laterals on C3–C5 and GIM on C5.

    Args:
        in_channels_list: channels of C2..C5.
        out_channels: neck width (256 in the paper).
        cem: use CEM instead of the plain 1×1 lateral on every level but the first.
        gim: add GIM's global term to the top lateral.
        extra_blocks: torchvision's extra-level hook (``LastLevelMaxPool`` when the
            FPN outputs feed the heads directly; ``None`` when the bottom-up path follows).
        norm: optional normalisation for the lateral and output convs (as torchvision's).
    """

    def __init__(
        self,
        in_channels_list: list[int],
        out_channels: int,
        *,
        cem: bool = True,
        gim: bool = True,
        extra_blocks: LastLevelMaxPool | None = None,
        norm: NormFactory = None,
    ):
        super().__init__(in_channels_list, out_channels, extra_blocks=extra_blocks, norm_layer=norm)
        if cem:
            for i, c in enumerate(in_channels_list[1:], start=1):
                self.inner_blocks[i] = CEM(c, out_channels, norm=norm)
        if gim:
            top = len(in_channels_list) - 1
            self.inner_blocks[top] = TopLateral(self.inner_blocks[top], GIM(in_channels_list[-1], out_channels))


class AFFWeights(nn.Module):
    """Per-pixel fusion weights W = softmax(Conv1x1(SE(concat(a, b)))) over 2 channels.

    Output (N, 2, H, W); channel 0 is W1 (for P~), channel 1 is W2 (for N~). A forward
    hook on this module sees the weight maps.
    """

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce_p = Conv2dNormActivation(channels, reduced, kernel_size=1, norm_layer=group_norm)
        self.reduce_n = Conv2dNormActivation(channels, reduced, kernel_size=1, norm_layer=group_norm)
        self.se = SqueezeExcitation(2 * reduced, max(2 * reduced // 16, 1))
        self.logits = nn.Conv2d(2 * reduced, 2, kernel_size=1)
        _init_conv(self)

    def forward(self, p: Tensor, n: Tensor) -> Tensor:
        a, b = self.reduce_p(p), self.reduce_n(n)
        return self.logits(self.se(torch.cat([a, b], dim=1))).softmax(dim=1)


class AFF(nn.Module):
    """Adaptive feature fusion of N_{i-1} (stride s/2) with P_i (stride s).

    ``N~ = Conv3x3_s2(N_{i-1})``, ``P~ = Conv3x3(P_i)``, ``N_i = W1 ⊙ P~ + W2 ⊙ N~``.
    """

    def __init__(self, channels: int, reduced: int, norm: NormFactory = None):
        super().__init__()
        self.down = Conv2dNormActivation(channels, channels, 3, stride=2, norm_layer=norm, activation_layer=None)
        self.lateral = Conv2dNormActivation(channels, channels, 3, norm_layer=norm, activation_layer=None)
        self.weights = AFFWeights(channels, reduced)
        _init_conv(self.down)
        _init_conv(self.lateral)

    def forward(self, n_prev: Tensor, p: Tensor) -> Tensor:
        n_t = self.down(n_prev)
        p_t = self.lateral(p)
        w = self.weights(p_t, n_t)  # (N, 2, H, W), sums to 1 over dim 1
        return w[:, :1] * p_t + w[:, 1:] * n_t


class SumFusion(nn.Module):
    """PANet-style fusion (the "bottom-up without AFF" ablation): ``Conv3x3(Conv3x3_s2(N) + P)``."""

    def __init__(self, channels: int, norm: NormFactory = None):
        super().__init__()
        self.down = Conv2dNormActivation(channels, channels, 3, stride=2, norm_layer=norm, activation_layer=None)
        self.post = Conv2dNormActivation(channels, channels, 3, norm_layer=norm, activation_layer=None)
        _init_conv(self)

    def forward(self, n_prev: Tensor, p: Tensor) -> Tensor:
        return self.post(self.down(n_prev) + p)


class BottomUpPath(nn.Module):
    """Bottom-up path enhancement: N2 = Conv3x3(P2), N_i = fuse(N_{i-1}, P_i), plus pooled N6.

    Args:
        channels: neck width.
        num_levels: pyramid levels in the input (4: P2..P5).
        aff: fuse with per-pixel AFF weights; ``False`` fuses by plain sum.
        aff_channels: AFF's reduced width (192 at width 256 in the authors' code).
        norm: optional normalisation for the 3×3 convs.
    """

    def __init__(
        self,
        channels: int,
        num_levels: int = 4,
        *,
        aff: bool = True,
        aff_channels: int | None = None,
        norm: NormFactory = None,
    ):
        super().__init__()
        aff_channels = aff_channels or channels * 3 // 4
        self.stem = Conv2dNormActivation(channels, channels, 3, norm_layer=norm, activation_layer=None)
        _init_conv(self.stem)
        self.fuse = nn.ModuleList(
            AFF(channels, aff_channels, norm) if aff else SumFusion(channels, norm) for _ in range(num_levels - 1)
        )
        self.extra = LastLevelMaxPool()

    def forward(self, p: dict[str, Tensor]) -> dict[str, Tensor]:
        # p: the FPN's OrderedDict P2..P5 -> an OrderedDict N2..N5 and "pool" (N6), the same names
        names, feats = list(p.keys()), list(p.values())
        outs = [self.stem(feats[0])]
        for i, fuse in enumerate(self.fuse):  # fuse[i] makes N_{i+3} from N_{i+2} and P_{i+3}
            outs.append(fuse(outs[-1], feats[i + 1]))
        outs, names = self.extra(outs, feats, names)
        return OrderedDict([(name, out) for name, out in zip(names, outs, strict=True)])
