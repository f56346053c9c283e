"""ResNet/ResNeXt bodies and the IEMask backbone (body + IEFPN + optional bottom-up path).

TorchScript: the backbone's ``forward`` is annotated ``dict[str, Tensor]``, as torchvision's
``BackboneWithFPN`` is (the value is still an ``OrderedDict``; TorchScript has no ``OrderedDict``
annotation); without the bottom-up path ``bottom_up`` is ``None`` and scripting drops that branch.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torchvision.models import WeightsEnum, get_model_weights
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from iemask.models.neck import IEFPN, BottomUpPath, NormFactory
from iemask.models.norms import norm_layer
from iemask.models.official import build_official_neck, check_variant
from iemask.models.switches import check_switches
from iemask.utils.checkpoint import load_checkpoint_file

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnext101_32x8d")


class IEMaskBackbone(nn.Module):
    """ResNet body → IEFPN → (bottom-up path): an ``OrderedDict`` of N2..N5 and ``pool``.

    Same contract as torchvision's ``BackboneWithFPN`` (string feature names ``"0".."3"``,
    ``"pool"``; an ``out_channels`` attribute) and the same ``body``/``fpn`` key names, so
    with every switch off its state_dict is torchvision's.
    """

    def __init__(self, body: nn.Module, fpn: nn.Module, out_channels: int, bottom_up: nn.Module | None = None):
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.bottom_up = bottom_up
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        # x: (N, 3, H, W) -> {"0": (N, C, H/4, W/4), ..., "3": (N, C, H/32, W/32), "pool": (N, C, H/64, W/64)}
        feats = self.fpn(self.body(x))
        if self.bottom_up is not None:
            feats = self.bottom_up(feats)
        return feats


def resolve_backbone_weights(backbone: str, weights: str | None) -> WeightsEnum | None:
    """Map a torchvision weights name (``"IMAGENET1K_V1"``, ``"DEFAULT"``) to its enum entry.

    Returns ``None`` for ``None`` and for a path (a local state_dict, loaded separately).
    """
    if weights is None or _looks_like_path(weights):
        return None
    enum = get_model_weights(backbone)
    try:
        return enum[weights.split(".")[-1]]
    except KeyError:
        names = ", ".join(w.name for w in enum)
        raise ValueError(
            f"unknown backbone weights {weights!r} for {backbone}: use one of {names}, "
            "a path to a local state_dict file, or null for random initialisation"
        ) from None


def torchvision_weights_file(weights: WeightsEnum, setting: str) -> Path:
    """The local file of torchvision ``weights`` in torch hub's cache, downloaded there on first use.

    Read with :func:`load_checkpoint_file` (weights only) rather than torchvision's loader, which
    unpickles without that restriction. A failed download (no internet) names the weights, the
    file looked for and the two fixes, ``setting`` being the config key that takes a local file.
    """
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    file = folder / os.path.basename(urlparse(weights.url).path)
    if file.is_file():
        return file
    name = f"{type(weights).__name__}.{weights.name}"
    digest = torch.hub.HASH_REGEX.search(file.name)  # torchvision checks the hash its file names carry
    try:
        folder.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(weights.url, str(file), digest.group(1) if digest else None, progress=True)
    except OSError as err:  # URLError (no network, DNS), HTTPError, a read-only cache folder
        fetch = f"import torch; torch.hub.load_state_dict_from_url('{weights.url}', check_hash=True, weights_only=True)"
        raise OSError(
            f"could not download {name} from {weights.url} ({err}).\n"
            f"It was looked for as {file.name} in torch hub's checkpoints folder {folder} (TORCH_HOME). Either:\n"
            f'  1. fetch it once into the torch cache on a machine with internet: python -c "{fetch}"\n'
            f"     and copy {file.name} from that cache into {folder} (no copy needed if TORCH_HOME is shared), or\n"
            f"  2. set {setting}=<path to a local copy of {file.name}>"
        ) from err
    return file


def _looks_like_path(weights: str) -> bool:
    return "/" in weights or weights.endswith((".pth", ".pt", ".pkl", ".bin")) or Path(weights).exists()


def load_backbone_state_dict(body: nn.Module, path: str | Path) -> None:
    """Load ImageNet weights from a local file into ``body`` (the classifier is ignored).

    Accepts a plain torchvision ResNet state_dict, optionally wrapped as ``{"state_dict": ...}``
    or ``{"model": ...}`` and optionally prefixed (``module.``, ``backbone.body.``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path} (set model.backbone_weights)")
    state = load_checkpoint_file(path)
    for key in ("state_dict", "model"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
    cleaned = {}
    for k, v in state.items():
        for prefix in ("module.", "backbone.body.", "body."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        if not k.startswith("fc."):
            cleaned[k] = v
    missing, unexpected = body.load_state_dict(cleaned, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not hold a matching backbone state_dict: "
            f"missing {sorted(missing)[:5]}..., unexpected {sorted(unexpected)[:5]}... "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys)"
        )


def build_backbone(
    backbone: str = "resnet50",
    *,
    weights: str | None = None,
    norm: str = "frozen_bn",
    trainable_layers: int = 3,
    neck_channels: int = 256,
    neck_norm: NormFactory = None,
    cem: bool = True,
    gim: bool = True,
    bottom_up: bool = True,
    aff: bool = True,
    variant: str = "paper",
) -> IEMaskBackbone:
    """Build the IEMask backbone; the neck's switches are those of :mod:`iemask.models.switches`.

    Args:
        backbone: one of :data:`BACKBONES`.
        weights: ``None``, a torchvision weights name, or a path to a local state_dict.
        norm: the body's normalisation, ``frozen_bn`` (paper), ``bn`` or ``gn``.
        trainable_layers: ResNet stages trained, counted from the top (0–5), as torchvision.
        neck_channels: width of every pyramid level.
        neck_norm: optional normalisation for the neck's convs.
        cem, gim, bottom_up, aff: the neck's switches.
        variant: ``paper`` (IEFPN, BottomUpPath) or ``official``: the authors' released neck
            (:mod:`iemask.models.official`, docs/method.md §7), the same switches.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}: choose one of {', '.join(BACKBONES)}")
    check_switches(dict(cem=cem, gim=gim, bottom_up=bottom_up, aff=aff))
    check_variant(variant)
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers}")
    named = resolve_backbone_weights(backbone, weights)
    # torchvision weights are read as data from torch hub's cache (fetched first: an offline node fails fast)
    weights_file = torchvision_weights_file(named, "model.backbone_weights") if named is not None else weights
    base = resnet_fpn_backbone(
        backbone_name=backbone, weights=None, norm_layer=norm_layer(norm), trainable_layers=trainable_layers
    )
    body = base.body
    if weights_file is not None:
        load_backbone_state_dict(body, weights_file)
    in_channels = [block[0].in_channels for block in base.fpn.inner_blocks]  # C2..C5 widths
    if variant == "official":
        official_fpn, official_path = build_official_neck(
            in_channels, neck_channels, cem=cem, gim=gim, bottom_up=bottom_up, aff=aff, norm=neck_norm
        )
        return IEMaskBackbone(body, official_fpn, neck_channels, official_path)
    fpn = IEFPN(
        in_channels,
        neck_channels,
        cem=cem,
        gim=gim,
        extra_blocks=None if bottom_up else LastLevelMaxPool(),
        norm=neck_norm,
    )
    path = BottomUpPath(neck_channels, len(in_channels), aff=aff, norm=neck_norm) if bottom_up else None
    return IEMaskBackbone(body, fpn, neck_channels, path)
