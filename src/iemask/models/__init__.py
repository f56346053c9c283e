"""IEMask R-CNN models: the builder, the neck and the mask head."""

from iemask.models.builder import (
    PRETRAINED_PARTS,
    SWITCHES,
    IEMaskRCNN,
    LoadReport,
    build_model,
    count_parameters,
    load_pretrained_parts,
)
from iemask.models.inspect import capture_intermediates

__all__ = [
    "PRETRAINED_PARTS",
    "SWITCHES",
    "IEMaskRCNN",
    "LoadReport",
    "build_model",
    "capture_intermediates",
    "count_parameters",
    "load_pretrained_parts",
]
