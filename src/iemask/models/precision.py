"""Mixed-precision and memory-format switches that leave the model's results unchanged.

Under bf16 autocast the convolutions run in bf16, but box decoding, anchors and mask pasting
need fp32: bf16 keeps 8 bits of mantissa, so a box at x = 1000 px would move in 4–8 px steps.
``keep_fp32_outputs`` casts the outputs that feed those steps back to fp32 with forward hooks
(no change to the modules or their state_dict keys; a no-op in fp32).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn


def _to_fp32(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, OrderedDict):
        return OrderedDict((k, _to_fp32(v)) for k, v in value.items())
    if isinstance(value, dict):
        return {k: _to_fp32(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_fp32(v) for v in value)
    return value


def _fp32_hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
    return _to_fp32(output)


def _fp32_anchor_pre_hook(_module: nn.Module, args: tuple) -> tuple:
    """Let the anchor generator see fp32 feature maps without copying them.

    torchvision's ``AnchorGenerator`` reads only the maps' shapes, device and the first one's
    dtype (which its anchors take), so zero-stride fp32 stand-ins of the same shapes suffice.
    """
    image_list, feature_maps = args
    stand_ins = [
        torch.empty((), dtype=torch.float32, device=f.device).expand(f.shape) if f.dtype != torch.float32 else f
        for f in feature_maps
    ]
    return image_list, stand_ins


def keep_fp32_outputs(model: nn.Module) -> None:
    """Keep anchors, box decoding, NMS, losses and mask paste-back in fp32 under autocast.

    The anchor generator works in fp32 (see :func:`_fp32_anchor_pre_hook`); the RPN head's
    objectness and deltas, the box predictor's scores and deltas, and the mask logits are upcast
    to fp32. The pyramid features themselves stay in the autocast dtype (RoIAlign upcasts under
    autocast by itself), so nothing as large as a feature map is copied.
    """
    model.rpn.anchor_generator.register_forward_pre_hook(_fp32_anchor_pre_hook)
    for module in (model.rpn.head, model.roi_heads.box_predictor, model.roi_heads.mask_predictor):
        module.register_forward_hook(_fp32_hook)


def _channels_last_pre_hook(_module: nn.Module, args: tuple) -> tuple:
    return tuple(
        a.contiguous(memory_format=torch.channels_last) if isinstance(a, Tensor) and a.dim() == 4 else a for a in args
    )


def channels_last_input(module: nn.Module) -> None:
    """Make ``module`` (and its weights) channels_last: NHWC convolutions on GPU tensor cores.

    A forward pre-hook converts the 4-D input; the weights are converted in place. Outputs are
    numerically the same as in NCHW (within floating-point reordering). Hooks are module-level
    functions, so the model still pickles (``ddp_spawn``).
    """
    module.to(memory_format=torch.channels_last)
    module.register_forward_pre_hook(_channels_last_pre_hook)
