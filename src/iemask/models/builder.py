"""Build IEMask R-CNN (or, with every switch off, torchvision's Mask R-CNN) and load weights into it."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torchvision.models import get_weight
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from iemask.models.backbones import build_backbone, torchvision_weights_file
from iemask.models.convert import is_official_checkpoint, official_for_model, read_detectron2_pickle
from iemask.models.mask_head import EncDecMaskHead, MaskPredictor
from iemask.models.norms import norm_layer
from iemask.models.official import OfficialMaskHead, OfficialMaskPredictor, check_variant
from iemask.models.postprocess import MaskPostprocessTransform, check_mask_output
from iemask.models.precision import channels_last_input, keep_fp32_outputs
from iemask.models.switches import SWITCH_NAMES, check_switches
from iemask.models.tta import TTASettings
from iemask.utils.checkpoint import load_checkpoint_file

PRETRAINED_PARTS = ("backbone.body", "rpn", "roi_heads.box_head", "roi_heads.box_predictor")


def detector_parameters() -> tuple[Callable[..., Any], ...]:
    """The torchvision callables whose keyword arguments :func:`build_model` passes on (``min_size``,
    ``rpn_*``, ``box_*``, ``size_divisible``...)."""
    return MaskRCNN.__init__, FasterRCNN.__init__, GeneralizedRCNNTransform.__init__


_DETECTOR_KWARGS = {name for fn in detector_parameters() for name in inspect.signature(fn).parameters} - {
    "self",
    "kwargs",
    "backbone",
    "num_classes",
}


class IEMaskRCNN(MaskRCNN):
    """torchvision's ``MaskRCNN`` with the IEMask parts injected; ``switches`` records which.

    Forward contract is torchvision's: ``model(images, targets)`` returns the loss dict in
    ``train()``; ``model(images)`` returns per-image dicts (boxes, labels, scores, masks) in
    ``eval()``, the masks as (N, 1, H, W) probabilities or, with ``mask_output="binary"``, as
    thresholded box-local :class:`~iemask.models.postprocess.BinaryMasks`. ``torch.jit.script(model)``
    works for every build; the scripted model returns torchvision's ``(losses, detections)`` tuple,
    with binary masks as dense (N, 1, H, W) bool tensors.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        switches: Mapping[str, bool],
        box_predictor: nn.Module | None = None,
        mask_predictor: nn.Module | None = None,
        mask_output: str = "probabilities",
        mask_threshold: float = 0.5,
        variant: str = "paper",
        **kwargs: Any,
    ):
        super().__init__(backbone, num_classes=num_classes, **kwargs)
        self.transform = MaskPostprocessTransform.like(
            self.transform, mask_output=mask_output, mask_threshold=mask_threshold
        )
        # torchvision takes num_classes or custom predictors, not both: it builds its defaults
        # for num_classes and the custom predictors replace them here.
        if box_predictor is not None:
            self.roi_heads.box_predictor = box_predictor
        if mask_predictor is not None:
            self.roi_heads.mask_predictor = mask_predictor
        self.switches = dict(switches)
        self.variant = variant  # "paper" or "official" (iemask.models.official)


def build_model(
    num_classes: int = 80,
    backbone: str = "resnet50",
    cem: bool = True,
    gim: bool = True,
    bottom_up: bool = True,
    aff: bool = True,
    encdec_head: bool = True,
    backbone_weights: str | None = None,
    *,
    variant: str = "paper",
    norm: str = "frozen_bn",
    trainable_layers: int = 3,
    neck_channels: int = 256,
    neck_norm: str | None = None,
    head_skip: str = "concat",
    mask_head_chunk_size: int | None = None,
    train_resize: bool = True,
    box_head_dim: int = 1024,
    anchor_sizes: Sequence[int] | None = None,
    roi_sampling_ratio: int = 2,
    channels_last: bool = False,
    mask_output: str = "probabilities",
    mask_threshold: float = 0.5,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    bbox_reg_weights: Sequence[float] | None = None,
    tta: TTASettings = TTASettings(),  # noqa: B008 (a frozen dataclass: immutable)
    **detector_kwargs: Any,
) -> IEMaskRCNN:
    """Build IEMask R-CNN; with all five switches off it is exactly torchvision's Mask R-CNN.

    Args:
        num_classes: foreground classes (COCO 80, Cityscapes 8, LVIS 1203); background is added.
        backbone: ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101`` or ``resnext101_32x8d``.
        cem, gim, bottom_up, aff, encdec_head: the IEMask switches (:mod:`iemask.models.switches`,
            docs/method.md §4).
        backbone_weights: ``None``, a torchvision weights name (``"IMAGENET1K_V1"``) or a
            path to a local ResNet state_dict.
        variant: ``paper`` (the paper's equations) or ``official`` (the authors' released modules,
            :mod:`iemask.models.official`, docs/method.md §7); the switches turn either's modules on and off.
        norm: backbone normalisation: ``frozen_bn`` (paper), ``bn`` or ``gn`` (from scratch).
        trainable_layers: ResNet stages trained, from the top (torchvision's convention).
        neck_channels: width of the neck and heads (256 in the paper).
        neck_norm: optional normalisation name for the neck's convs (``None``: as FPN).
        head_skip: ``concat`` or ``sum`` skip connections in the encoding-decoding head.
        mask_head_chunk_size: RoIs per chunk in the mask head at inference (``None``: all).
        train_resize: let torchvision's transform resize training images to ``min_size``;
            ``False`` when the data pipeline already does multi-scale resizing (test-time
            resize and paste-back to the original size stay in the model either way).
        box_head_dim: width of the two-layer box head (torchvision: 1024); smaller for CPU models.
        anchor_sizes: one anchor size per pyramid level N2..N6 (torchvision: 32, 64, 128, 256, 512),
            with aspect ratios 0.5, 1, 2; smaller for small images or objects.
        roi_sampling_ratio: RoIAlign sampling points per bin side for the box and mask RoIs
            (torchvision: 2); 1 quarters RoIAlign's work, which matters on small CPU models.
        channels_last: run the backbone, neck and mask head in NHWC memory format (faster
            convolutions on GPU tensor cores; same results).
        mask_output: eval masks as torchvision's (N, 1, H, W) ``probabilities``, or ``binary``: thresholded
            at ``mask_threshold`` while pasted, box-local patches (same pixels, a fraction of the time and
            memory; settable later as ``model.transform.mask_output``).
        mask_threshold: probability above which a pixel is foreground in ``binary`` masks.
        image_mean, image_std: per-channel input normalisation (``None``: torchvision's, ImageNet's).
        bbox_reg_weights: the box coder's (wx, wy, ww, wh) (``None``: torchvision's 10, 10, 5, 5).
        tta: test-time augmentation for evaluation and prediction (:mod:`iemask.models.tta`; off by
            default), kept as ``model.tta`` and run by :func:`iemask.models.tta.detect`, not by ``forward``.
        **detector_kwargs: passed to torchvision's ``MaskRCNN`` (``min_size``, ``rpn_*``, ``box_*``...).

    Raises:
        ValueError: on a switch without one it requires (``aff`` without ``bottom_up``), an unknown
            backbone, norm, mask output or detector keyword.
    """
    arguments = locals()
    switches = {name: bool(arguments[name]) for name in SWITCH_NAMES}
    if num_classes < 1:
        raise ValueError(f"num_classes counts foreground classes and must be >= 1, got {num_classes}")
    check_switches(switches)
    check_variant(variant)
    if variant == "official" and head_skip != "concat":
        raise ValueError(
            "the authors' mask head concatenates its skips: model.variant=official needs model.head_skip=concat"
        )
    check_mask_output(mask_output)  # before the backbone is built (and its weights read)
    unknown = sorted(set(detector_kwargs) - _DETECTOR_KWARGS)
    if unknown:
        raise ValueError(
            f"unknown detector argument(s) {unknown}: torchvision's MaskRCNN takes {sorted(_DETECTOR_KWARGS)}"
        )
    body = build_backbone(
        backbone,
        weights=backbone_weights,
        norm=norm,
        trainable_layers=trainable_layers,
        neck_channels=neck_channels,
        neck_norm=norm_layer(neck_norm) if neck_norm else None,
        cem=cem,
        gim=gim,
        bottom_up=bottom_up,
        aff=aff,
        variant=variant,
    )
    if anchor_sizes is not None:
        if len(anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes needs one size per level N2..N6 (5), got {list(anchor_sizes)}")
        detector_kwargs.setdefault(
            "rpn_anchor_generator", AnchorGenerator(tuple((int(s),) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
        )
    if roi_sampling_ratio < 1:
        raise ValueError(f"roi_sampling_ratio must be >= 1, got {roi_sampling_ratio}")
    # torchvision's own pools unless changed, so that the baseline stays exactly torchvision's
    if roi_sampling_ratio != 2:
        detector_kwargs.setdefault("box_roi_pool", _roi_pool(7, roi_sampling_ratio))
    if encdec_head or roi_sampling_ratio != 2:  # docs/method.md §3: the encoding-decoding head takes 28×28 RoIs
        detector_kwargs.setdefault("mask_roi_pool", _roi_pool(28 if encdec_head else 14, roi_sampling_ratio))
    if box_head_dim != 1024:
        resolution = 7  # torchvision's box RoIAlign output
        detector_kwargs.setdefault("box_head", TwoMLPHead(neck_channels * resolution**2, box_head_dim))
        detector_kwargs.setdefault("box_predictor", FastRCNNPredictor(box_head_dim, num_classes + 1))
    if encdec_head and variant == "official":
        detector_kwargs.setdefault("mask_head", OfficialMaskHead(neck_channels, chunk_size=mask_head_chunk_size))
        detector_kwargs.setdefault("mask_predictor", OfficialMaskPredictor(neck_channels, num_classes + 1))
    elif encdec_head:
        detector_kwargs.setdefault(
            "mask_head", EncDecMaskHead(neck_channels, skip=head_skip, chunk_size=mask_head_chunk_size)
        )
        detector_kwargs.setdefault("mask_predictor", MaskPredictor(neck_channels, num_classes + 1))
    for name, value in (("image_mean", image_mean), ("image_std", image_std), ("bbox_reg_weights", bbox_reg_weights)):
        if value is not None:  # torchvision's own defaults otherwise (it takes None as "default")
            detector_kwargs[name] = [float(v) for v in value] if name != "bbox_reg_weights" else tuple(value)
    if not train_resize:
        detector_kwargs["_skip_resize"] = True  # torchvision's switch for "training images come resized"
    model = IEMaskRCNN(
        body,
        num_classes + 1,
        switches,
        mask_output=mask_output,
        mask_threshold=mask_threshold,
        variant=variant,
        **detector_kwargs,
    )
    model.tta = tta
    keep_fp32_outputs(model)
    if channels_last:
        channels_last_input(model.backbone)
        channels_last_input(model.roi_heads.mask_head)
    return model


def _roi_pool(output_size: int, sampling_ratio: int) -> MultiScaleRoIAlign:
    """RoIAlign over the N2..N5 levels, as torchvision's Mask R-CNN pools."""
    return MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=output_size, sampling_ratio=sampling_ratio)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (frozen-BN affine terms are buffers, as in Detectron2, and not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


@dataclass
class LoadReport:
    """What :func:`load_pretrained_parts` did: keys loaded, skipped for shape, and left untouched."""

    loaded: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    not_in_source: list[str] = field(default_factory=list)


def load_pretrained_parts(
    model: nn.Module,
    source: str | Path | Mapping[str, Tensor],
    parts: Iterable[str] = PRETRAINED_PARTS,
) -> LoadReport:
    """Copy the weights of ``parts`` (key prefixes) from a Mask R-CNN checkpoint into ``model``.

    This is the one call that initialises IEMask from torchvision's COCO Mask R-CNN (or any
    baseline checkpoint): backbone body, RPN and box head load; the IEMask neck and mask head
    keep their fresh initialisation. Keys whose shapes differ (e.g. a box predictor trained
    for another class count) are skipped and reported, never half-loaded.

    Args:
        model: the target model.
        source: a state_dict, a path to one (a Lightning checkpoint's ``state_dict`` with the
            ``model.`` prefix works too), or a torchvision weights name such as
            ``"MaskRCNN_ResNet50_FPN_Weights.COCO_V1"`` (downloads on first use), or the authors'
            Detectron2 checkpoint (``.pth``/``.pkl``), converted by :func:`iemask.models.convert.from_official`.
        parts: key prefixes to load.
    """
    state = _read_state_dict(source)
    if is_official_checkpoint(state):  # the authors' Detectron2 checkpoint (docs/method.md §7)
        state = official_for_model(model, state)
    parts = tuple(parts)
    own = model.state_dict()
    report = LoadReport()
    to_load = {}
    for key, value in own.items():
        if not key.startswith(parts):
            continue
        if key not in state:
            report.not_in_source.append(key)
        elif state[key].shape != value.shape:
            report.shape_mismatch.append(key)
        else:
            to_load[key] = state[key]
            report.loaded.append(key)
    if not to_load:
        raise ValueError(f"no key of {source!r} matches the parts {parts}; is it a Mask R-CNN state_dict?")
    model.load_state_dict(to_load, strict=False)
    return report


def _read_state_dict(source: str | Path | Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(source, Mapping):
        state = dict(source)
    elif Path(source).is_file():
        state = read_detectron2_pickle(source) if Path(source).suffix == ".pkl" else load_checkpoint_file(source)
    elif isinstance(source, str) and "." in source and "/" not in source:
        state = load_checkpoint_file(torchvision_weights_file(get_weight(source), "module.init_from"))
    else:
        raise FileNotFoundError(f"checkpoint not found: {source}")
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if all(k.startswith("model.") for k in state):
        state = {k[len("model.") :]: v for k, v in state.items()}
    return state
