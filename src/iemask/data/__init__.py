"""Datasets, transforms, samplers and Lightning data modules: one module per dataset, the shared parts in ``base``."""

from iemask.data.shapes import SHAPES_CATEGORIES, ShapesSpec, ensure_shapes, generate_shapes

__all__ = ["SHAPES_CATEGORIES", "ShapesSpec", "ensure_shapes", "generate_shapes"]
