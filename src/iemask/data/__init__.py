"""Datasets, transforms, samplers and Lightning data modules."""

from iemask.data.shapes import SHAPES_CATEGORIES, ensure_shapes, generate_shapes

__all__ = ["SHAPES_CATEGORIES", "ensure_shapes", "generate_shapes"]
