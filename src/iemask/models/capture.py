"""Look inside IEMask R-CNN: record the neck's and heads' intermediate values with forward hooks.

The model's forward pass is not copied or changed; hooks registered for the duration of a
``with`` block store detached copies of what each module produces::

    with capture_intermediates(model) as seen:
        model([image])
    seen["aff/N3"]      # (1, 2, H/8, W/8): W1 (channel 0) and W2 (channel 1) of the AFF into N3
    seen["cem/C4"]      # (1, 1024, 1, 1): CEM's channel scores on C4
    seen["gim"]         # (1, 256, 1, 1): GIM's global term added to P5
    seen["fpn"]["0"]    # P2 ... seen["bottom_up"]["pool"]: N6

Every part of :data:`iemask.models.parts.PARTS` the model has is recorded under its key, for both
``model.variant`` s: the authors' modules (:mod:`iemask.models.official`) give the same keys and shapes.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

from iemask.models.neck import AFF, CEM, GIM
from iemask.models.official import CEMLayer, GlobalEnhanceModule, OfficialBottomUp
from iemask.models.parts import model_parts

LEVELS = ("C2", "C3", "C4", "C5")  # backbone stages feeding the FPN's lateral blocks 0..3


def _detach(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, dict):
        return OrderedDict((k, _detach(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_detach(v) for v in value)
    return value


@contextlib.contextmanager
def capture_intermediates(model: nn.Module) -> Iterator[dict[str, Any]]:
    """Record intermediates of every forward pass run inside the block (the last pass wins).

    Keys, where the module exists in ``model``:
        the parts (:func:`iemask.models.parts.model_parts`): ``backbone``: C2..C5 (``OrderedDict``
        "0".."3"); ``fpn``: P2..P5 (and P6 without the bottom-up path); ``bottom_up``: N2..N5 and N6
        ("pool"); ``rpn``: (proposals per image, losses); ``box_head``: box features (R, box_head_dim);
        ``mask_head``: the mask head's output features for the detections (R, C, 28, 28);
        and the IEMask modules' inner values: ``cem/C3``..``cem/C5``: channel scores (N, C, 1, 1);
        ``gim``: GIM's global term (N, C_neck, 1, 1); ``aff/N3``..``aff/N5``: fusion weights
        (N, 2, H, W), W1 = ``[:, 0]`` for P~, W2 = ``[:, 1]`` for N~.
    """
    seen: dict[str, Any] = {}
    handles = []

    def store(key: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            seen[key] = _detach(output)

        return hook

    modules = dict(model.named_modules())
    for part in model_parts(model):
        handles.append(modules[part.output].register_forward_hook(store(part.key)))
    backbone = getattr(model, "backbone", model)
    fpn = getattr(backbone, "fpn", None)
    if fpn is not None:
        for level, block in zip(LEVELS, _lateral_blocks(fpn), strict=True):
            for module in block.modules():
                if isinstance(module, CEM):
                    handles.append(module.se.scale_activation.register_forward_hook(store(f"cem/{level}")))
                elif isinstance(module, CEMLayer):
                    handles.append(module.fc.register_forward_hook(store(f"cem/{level}")))
                elif isinstance(module, GIM):
                    handles.append(module.register_forward_hook(store("gim")))
        if isinstance(getattr(fpn, "gimdoule", None), GlobalEnhanceModule):
            handles.append(fpn.gimdoule.conv1.register_forward_hook(store("gim")))  # before the H×W expansion
    bottom_up = getattr(backbone, "bottom_up", None)
    if isinstance(bottom_up, OfficialBottomUp) and bottom_up.weight is not None:
        handles.extend(_shared_aff_hooks(bottom_up, seen))
    elif bottom_up is not None:
        for i, fuse in enumerate(bottom_up.fuse, start=3):
            if isinstance(fuse, AFF):
                handles.append(fuse.weights.register_forward_hook(store(f"aff/N{i}")))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _lateral_blocks(fpn: nn.Module) -> list[nn.Module]:
    """The lateral blocks of C2..C5: torchvision's ``inner_blocks``, or the authors' ``fpn_lateral2..5``."""
    if hasattr(fpn, "inner_blocks"):
        return list(fpn.inner_blocks)
    return [getattr(fpn, f"fpn_lateral{stage}") for stage in range(2, 2 + len(LEVELS))]


def _shared_aff_hooks(bottom_up: OfficialBottomUp, seen: dict[str, Any]) -> list[Any]:
    """The authors' one set of AFF weights serves N3, N4, N5 in turn: number its calls within each forward."""
    calls = [0]

    def reset(_module: nn.Module, _inputs: Any) -> None:
        calls[0] = 0

    def hook(_module: nn.Module, _inputs: Any, logits: Tensor) -> None:
        seen[f"aff/N{3 + calls[0]}"] = logits.detach().softmax(dim=1)  # (N, 2, H, W), as the path applies them
        calls[0] += 1

    return [bottom_up.register_forward_pre_hook(reset), bottom_up.weight.register_forward_hook(hook)]
