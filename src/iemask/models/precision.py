"""Mixed-precision and memory-format switches that leave the model's results unchanged.

Under bf16 autocast the convolutions run in bf16, but box decoding, anchors and mask pasting
need fp32: bf16 keeps 8 bits of mantissa, so a box at x = 1000 px would move in 4–8 px steps.
``keep_fp32_outputs`` casts the outputs that feed those steps back to fp32 with forward hooks
(no change to the modules or their state_dict keys; a no-op in fp32).

TorchScript: ``torch.jit.script`` compiles a module's hooks with it, against its forward's
signature, so each hook is typed with the inputs and outputs of the module it is registered on
(torchvision's contracts: the RPN head's two lists, the box predictor's pair, the mask logits).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList


def _as_fp32(x: Tensor) -> Tensor:
    return x.float() if x.is_floating_point() else x


# The hooks are typed with the outputs torchvision's detector expects of each module (TorchScript
# compiles a module's hooks with it, checked against its forward's signature).
def _fp32_rpn_head_hook(
    _module: nn.Module, _inputs: tuple[list[Tensor]], output: tuple[list[Tensor], list[Tensor]]
) -> tuple[list[Tensor], list[Tensor]]:
    """RPN head: per-level objectness and box deltas."""
    return [_as_fp32(o) for o in output[0]], [_as_fp32(d) for d in output[1]]


def _fp32_box_predictor_hook(
    _module: nn.Module, _inputs: tuple[Tensor], output: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    """Box predictor: class scores and box deltas."""
    return _as_fp32(output[0]), _as_fp32(output[1])


def _fp32_mask_predictor_hook(_module: nn.Module, _inputs: tuple[Tensor], output: Tensor) -> Tensor:
    """Mask predictor: per-class mask logits."""
    return _as_fp32(output)


def _fp32_anchor_pre_hook(_module: nn.Module, args: tuple[ImageList, list[Tensor]]) -> tuple[ImageList, list[Tensor]]:
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
    model.rpn.head.register_forward_hook(_fp32_rpn_head_hook)
    model.roi_heads.box_predictor.register_forward_hook(_fp32_box_predictor_hook)
    model.roi_heads.mask_predictor.register_forward_hook(_fp32_mask_predictor_hook)


def _channels_last_pre_hook(_module: nn.Module, args: tuple[Tensor]) -> tuple[Tensor]:
    # args: the module's one input, (N, C, H, W) (the backbone's images, the mask head's RoI features)
    x = args[0]
    return (x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x,)


def channels_last_input(module: nn.Module) -> None:
    """Make ``module`` (and its weights) channels_last: NHWC convolutions on GPU tensor cores.

    A forward pre-hook converts the 4-D input; the weights are converted in place. Outputs are
    numerically the same as in NCHW (within floating-point reordering). Hooks are module-level
    functions, so the model still pickles (``ddp_spawn``).
    """
    module.to(memory_format=torch.channels_last)
    module.register_forward_pre_hook(_channels_last_pre_hook)
