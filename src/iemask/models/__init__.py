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

__all__ = [
    "PRETRAINED_PARTS",
    "SWITCHES",
    "IEMaskRCNN",
    "LoadReport",
    "build_model",
    "count_parameters",
    "load_pretrained_parts",
]
