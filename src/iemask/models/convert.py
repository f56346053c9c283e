"""Convert the authors' Detectron2 checkpoints (github.com/Fhujinwu/IEMask) to ``model.variant=official``.

docs/method.md §7. Keys are renamed (Detectron2's ResNet, RPN and box head to torchvision's; the IEMask
neck and mask head to :mod:`iemask.models.official`, whose attribute names are the authors'), and three
things are rewritten so the converted model computes what theirs computes:

- input: Detectron2 feeds BGR pixels in 0–255 minus ``pixel_mean`` (over ``pixel_std``); torchvision feeds
  RGB in 0–1. The first conv's input channels are reversed (BGR → RGB) and the model needs
  ``image_mean = pixel_mean[::-1] / 255`` and ``image_std = pixel_std[::-1] / 255``
  (:func:`input_normalisation`; :func:`official_for_model` warns when the model's differ).
- classes: Detectron2's box classifier puts the background last and its box regression and mask
  predictor have no background slot; torchvision's put the background first. The classifier's rows are
  rotated and a zero background slot is added to the box regression (4 rows) and the mask predictor (1 map).
- unused: their ``backbone.conv2`` (a 3×3 conv + GroupNorm + ReLU built but never called) and
  Detectron2's ``pixel_mean``/``pixel_std`` buffers have no place in the model and are reported.

Not convertible, said exactly: Detectron2 ResNets trained from the MSRA ImageNet weights
(``MODEL.RESNETS.STRIDE_IN_1X1=True``, Detectron2's default and every config of the authors) put the
stride of the first block of res3–res5 in its 1×1 conv; torchvision's ``Bottleneck`` puts it in the 3×3
conv. The weights have the same shapes and load, but the body then samples differently, so the converted
model is a starting point for fine-tuning, not the authors' trained function; a checkpoint trained with
``STRIDE_IN_1X1=False`` (torchvision-style ImageNet weights) converts exactly. The checkpoint does not
record which, so :func:`official_for_model` warns whenever it converts ResNet weights. Also unsupported:
Caffe2-named weights (the MSRA ``R-50.pkl`` ImageNet files: ``res2_0_branch2a_w``...), class-agnostic box
regression or masks, Detectron2's ``ROIAlignV2`` (torchvision's RoIAlign is not pixel-aligned) and its
anchor placement (torchvision rounds anchor corners): these last two shift boxes and masks by under a
pixel.
"""

from __future__ import annotations

import logging
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from numpy._core import multiarray
from torch import Tensor, nn

from iemask.utils.checkpoint import CheckpointError

log = logging.getLogger(__name__)

DETECTRON2_PIXEL_MEAN = (103.530, 116.280, 123.675)  # Detectron2's defaults (BGR, 0–255), the authors' configs'
DETECTRON2_PIXEL_STD = (1.0, 1.0, 1.0)
STRIDE_IN_1X1_WARNING = (
    "the checkpoint's ResNet was converted, but Detectron2 ResNets trained from MSRA ImageNet weights "
    "(MODEL.RESNETS.STRIDE_IN_1X1=True: Detectron2's default and the authors' setting) put the stride of "
    "res3-res5's first block in its 1x1 conv, torchvision's Bottleneck in its 3x3 conv. The weights load, but "
    "the body computes a different function until fine-tuned; only a checkpoint trained with "
    "STRIDE_IN_1X1=False converts exactly (the file does not say which)"
)

# renamed prefixes, first match wins: (Detectron2 key regex, our key template)
_RULES: tuple[tuple[str, str], ...] = (
    (r"backbone\.bottom_up\.stem\.conv1\.norm\.(.+)", r"backbone.body.bn1.\1"),
    (r"backbone\.bottom_up\.stem\.conv1\.(weight|bias)", r"backbone.body.conv1.\1"),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.norm\.(.+)", r"backbone.body.layer{res}.\2.bn\3.\4"),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.(weight|bias)", r"backbone.body.layer{res}.\2.conv\3.\4"),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.norm\.(.+)", r"backbone.body.layer{res}.\2.downsample.1.\3"),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.(weight|bias)", r"backbone.body.layer{res}.\2.downsample.0.\3"),
    (r"backbone\.((?:fpn_lateral\d|fpn_output\d|gimdoule|conv3)\..*)", r"backbone.fpn.\1"),
    (r"backbone\.((?:down|conv1|weight1|weight2|weight)\..*)", r"backbone.bottom_up.\1"),
    (r"proposal_generator\.rpn_head\.conv\.(.+)", r"rpn.head.conv.0.0.\1"),
    (r"proposal_generator\.rpn_head\.objectness_logits\.(.+)", r"rpn.head.cls_logits.\1"),
    (r"proposal_generator\.rpn_head\.anchor_deltas\.(.+)", r"rpn.head.bbox_pred.\1"),
    (r"roi_heads\.box_head\.fc1\.(.+)", r"roi_heads.box_head.fc6.\1"),
    (r"roi_heads\.box_head\.fc2\.(.+)", r"roi_heads.box_head.fc7.\1"),
    (r"roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(.+)", r"roi_heads.box_predictor.\1.\2"),
    (r"roi_heads\.mask_head\.predictor\.(.+)", r"roi_heads.mask_predictor.mask_fcn_logits.\1"),
    (r"roi_heads\.mask_head\.deconv\.(.+)", r"roi_heads.mask_predictor.conv5_mask.\1"),
    (r"roi_heads\.mask_head\.mask_fcn(\d)\.(.+)", r"roi_heads.mask_head.{fcn}.0.\2"),
    (r"roi_heads\.mask_head\.((?:down1|down2|conv1|conv2|conv3)\..*)", r"roi_heads.mask_head.\1"),
)
_UNUSED = (
    (r"backbone\.conv2\..*", "their FPN's conv2 (3x3 conv + GroupNorm + ReLU) is built but never called"),
    (r"pixel_(mean|std)", "Detectron2's input normalisation: becomes model.image_mean/image_std"),
)


@dataclass
class ConversionReport:
    """What :func:`from_official` did with each key of the authors' checkpoint."""

    converted: dict[str, str] = field(default_factory=dict)  # their key -> ours
    unused: dict[str, str] = field(default_factory=dict)  # their key -> why it has no place in our model
    unmapped: list[str] = field(default_factory=list)  # their keys that no rule knows
    missing: list[str] = field(default_factory=list)  # our model's keys the checkpoint did not give (with a target)
    converted_resnet: bool = False  # the stride-in-1x1 caveat applies
    image_mean: tuple[float, ...] = ()  # what the converted model needs (RGB, 0-1 scale)
    image_std: tuple[float, ...] = ()


def is_official_checkpoint(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` (a state_dict, or Detectron2's ``{"model": state_dict}``) has Detectron2's key names."""
    state = _unwrap(state)
    # Detectron2's ResNet is backbone.bottom_up.{stem.conv1,res2..res5} (not our paper variant's bottom_up.stem.0)
    return any(re.match(r"backbone\.bottom_up\.(stem\.conv1|res\d)\.|proposal_generator\.", k) for k in state)


def input_normalisation(state: Mapping[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(image_mean, image_std)`` for torchvision's RGB 0–1 input equal to Detectron2's BGR 0–255 normalisation.

    From the checkpoint's ``pixel_mean``/``pixel_std`` buffers, or Detectron2's defaults without them.
    """
    state = _unwrap(state)
    mean = _values(state.get("pixel_mean"), DETECTRON2_PIXEL_MEAN)
    std = _values(state.get("pixel_std"), DETECTRON2_PIXEL_STD)
    return tuple(v / 255.0 for v in reversed(mean)), tuple(v / 255.0 for v in reversed(std))


def from_official(
    state: Mapping[str, Any], target: Mapping[str, Tensor] | None = None
) -> tuple[dict[str, Tensor], ConversionReport]:
    """Convert the authors' (Detectron2) state_dict to ``model.variant=official``'s key names and layouts.

    Args:
        state: their state_dict, or their checkpoint ``{"model": state_dict, ...}``; tensors or numpy arrays.
        target: our model's state_dict. With it, every converted key must exist there with the same shape
            (a ``ValueError`` lists those that do not) and the target's keys the checkpoint lacks are reported.

    Returns:
        the converted state_dict and a :class:`ConversionReport` (unused and unmapped keys).
    """
    state = _unwrap(state)
    if any(re.fullmatch(r"(res\d_\d+_branch|conv1_w|fc1000_)\w*", k) for k in state):
        raise ValueError(
            "this is a Caffe2-named checkpoint (res2_0_branch2a_w...: Detectron's or the MSRA ImageNet .pkl), not "
            "a Detectron2 one; its names are not converted. Use a Detectron2 checkpoint (model_final.pth) instead"
        )
    report = ConversionReport()
    report.image_mean, report.image_std = input_normalisation(state)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        reason = next((why for pattern, why in _UNUSED if re.fullmatch(pattern, key)), None)
        if reason is not None:
            report.unused[key] = reason
            continue
        ours = _rename(key)
        if ours is None:
            report.unmapped.append(key)
            continue
        out[ours] = _relayout(ours, _tensor(key, value))
        report.converted[key] = ours
        report.converted_resnet |= ours.startswith("backbone.body.")
    classes = state.get("roi_heads.box_predictor.cls_score.weight")
    regression = state.get("roi_heads.box_predictor.bbox_pred.weight")
    if classes is not None and regression is not None and len(regression) != 4 * (len(classes) - 1):
        raise ValueError(
            f"class-agnostic box regression ({len(regression)} outputs for {len(classes) - 1} classes) is not "
            "supported: torchvision's box predictor regresses per class"
        )
    if target is not None:
        wrong = [
            f"{theirs} -> {ours}: checkpoint {tuple(out[ours].shape)}, model {tuple(target[ours].shape)}"
            if ours in target
            else f"{theirs} -> {ours}: not in the model"
            for theirs, ours in report.converted.items()
            if ours not in target or target[ours].shape != out[ours].shape
        ]
        if wrong:
            raise ValueError(
                f"{len(wrong)} converted key(s) do not fit the model (is it built with model.variant=official, the "
                "checkpoint's backbone, switches and class count?):\n  " + "\n  ".join(wrong)
            )
        report.missing = sorted(set(target) - set(out))
    return out, report


def official_for_model(model: nn.Module, state: Mapping[str, Any]) -> dict[str, Tensor]:
    """Convert ``state`` for ``model`` (keys it lacks are left out, for :func:`load_pretrained_parts`), and warn.

    Warns (``UserWarning``) about the stride-in-1×1 caveat when ResNet weights are converted, and when the
    model's input normalisation is not the checkpoint's (naming the ``model.image_mean``/``image_std`` to set).
    """
    converted, report = from_official(state)
    own = model.state_dict()
    if report.unused or report.unmapped:
        log.info("authors' checkpoint: unused %s, unmapped %s", sorted(report.unused), report.unmapped)
    if getattr(model, "variant", "official") != "official":
        log.warning("an authors' checkpoint loads fully only into model.variant=official, not %s", model.variant)
    if report.converted_resnet:
        warnings.warn(STRIDE_IN_1X1_WARNING, stacklevel=2)
    transform = getattr(model, "transform", None)
    if transform is not None and not (
        np.allclose(transform.image_mean, report.image_mean) and np.allclose(transform.image_std, report.image_std)
    ):
        warnings.warn(
            f"the model normalises inputs with mean {list(transform.image_mean)} and std {list(transform.image_std)}, "
            "the checkpoint's Detectron2 model with the equivalent of "
            f"model.image_mean=[{', '.join(f'{v:.6g}' for v in report.image_mean)}] "
            f"model.image_std=[{', '.join(f'{v:.6g}' for v in report.image_std)}]: set these for its features",
            stacklevel=2,
        )
    return {k: v for k, v in converted.items() if k in own}


def read_detectron2_pickle(path: str | Path) -> dict[str, Any]:
    """Read a Detectron2 ``.pkl`` checkpoint (a pickled dict of numpy arrays) as data.

    Only plain containers and numpy arrays unpickle; anything else is refused before it runs, naming it,
    as :func:`iemask.utils.checkpoint.load_checkpoint_file` does for ``torch.save`` files.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    with path.open("rb") as f:
        try:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"{path} is refused: {err}") from None
        except (EOFError, ValueError, IndexError) as err:
            raise CheckpointError(f"{path} is not a readable pickle ({err}); re-download it") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers, nothing else."""

    ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy.core.multiarray", "scalar"): multiarray.scalar,
        ("numpy._core.multiarray", "scalar"): multiarray.scalar,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): dict,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"its pickle wants {module}.{name}, which is not a numpy array or plain data; "
                "re-save just the state_dict from a copy you trust"
            ) from None


def _unwrap(state: Mapping[str, Any]) -> Mapping[str, Any]:
    model = state.get("model")
    return model if isinstance(model, Mapping) else state


def _values(value: Any, default: tuple[float, ...]) -> tuple[float, ...]:
    return default if value is None else tuple(float(v) for v in np.asarray(value).reshape(-1))


def _tensor(key: str, value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise ValueError(f"checkpoint key {key!r} holds a {type(value).__name__}, not a tensor or numpy array")


def _rename(key: str) -> str | None:
    for pattern, template in _RULES:
        match = re.fullmatch(pattern, key)
        if match is None:
            continue
        ours = match.expand(template)
        if "{res}" in ours:  # Detectron2's res2..res5 are torchvision's layer1..layer4
            ours = ours.replace("{res}", str(int(match.group(1)) - 1))
        if "{fcn}" in ours:  # mask_fcn1..4 are torchvision's MaskRCNNHeads 0..3
            ours = ours.replace("{fcn}", str(int(match.group(1)) - 1))
        return ours
    return None


def _relayout(ours: str, value: Tensor) -> Tensor:
    """BGR → RGB in the first conv; the background slot first (torchvision) in the class-wise outputs."""
    if ours == "backbone.body.conv1.weight":
        return value.flip(1)  # (64, 3, 7, 7): input channels B, G, R -> R, G, B
    if ours.startswith("roi_heads.box_predictor.cls_score."):
        return torch.cat([value[-1:], value[:-1]])  # (K+1, ...): background last -> first
    if ours.startswith("roi_heads.box_predictor.bbox_pred."):
        return torch.cat([torch.zeros_like(value[:4]), value])  # (4K, ...) -> (4(K+1), ...)
    if ours.startswith("roi_heads.mask_predictor.mask_fcn_logits."):
        return torch.cat([torch.zeros_like(value[:1]), value])  # (K, ...) -> (K+1, ...)
    return value
