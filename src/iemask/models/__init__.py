"""IEMask R-CNN models: the builder, the neck and the mask head, the switch registry and the parts map."""

from iemask.models.builder import (
    PRETRAINED_PARTS,
    IEMaskRCNN,
    LoadReport,
    build_model,
    count_parameters,
    load_pretrained_parts,
)
from iemask.models.capture import capture_intermediates
from iemask.models.parts import PARTS, Part, compile_parts, model_parts
from iemask.models.switches import SWITCH_NAMES, SWITCHES, Switch, switch_values

__all__ = [
    "PARTS",
    "PRETRAINED_PARTS",
    "SWITCHES",
    "SWITCH_NAMES",
    "IEMaskRCNN",
    "LoadReport",
    "Part",
    "Switch",
    "build_model",
    "capture_intermediates",
    "compile_parts",
    "count_parameters",
    "load_pretrained_parts",
    "model_parts",
    "switch_values",
]
