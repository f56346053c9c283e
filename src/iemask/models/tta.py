"""Test-time augmentation (TTA) for evaluation and prediction, as Detectron2's ``GeneralizedRCNNWithTTA``.

Each augmentation is a test size (the short side, capped by a long-side maximum) with or without a
horizontal flip. The detector finds boxes in every augmented image; they are mapped back to the original
image, merged, and reduced by per-class NMS at the box head's threshold to its ``detections_per_img``.
The mask head then sees the merged boxes in every augmented image, and the mean of its mask
probabilities (flipped ones flipped back) is pasted as usual, as probabilities or as binary masks.

It is a function over torchvision's Mask R-CNN parts (``transform``, ``backbone``, ``rpn``,
``roi_heads``), kept out of the model's own (scriptable) forward; :func:`detect` runs it where a model's
settings (``model.tta``, set by ``build_model(tta=...)``, config ``model.tta.*``) turn it on. It is for
inference only: a model in training mode is never augmented.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import batched_nms, clip_boxes_to_image


@dataclass(frozen=True)
class TTASettings:
    """Which augmentations :func:`tta_inference` runs (Detectron2's ``TEST.AUG``: ``MIN_SIZES``, ``MAX_SIZE``,
    ``FLIP``).

    Args:
        enabled: evaluate and predict with TTA (training is never augmented).
        min_sizes: test sizes (short side, px), one pass each; ``None``: the model's own test size
            (``model.transform.min_size``), so that with ``flip`` TTA is the image and its mirror image.
            Detectron2's COCO setting is 400, 500, ..., 1200 with ``max_size`` 4000.
        max_size: the long side's cap at every size; ``None``: the model's own (``model.transform.max_size``).
        flip: also run each size on the horizontally flipped image.
    """

    enabled: bool = False
    min_sizes: tuple[int, ...] | None = None
    max_size: int | None = None
    flip: bool = True

    def __post_init__(self) -> None:
        for name in ("enabled", "flip"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"model.tta.{name} must be true or false, got {getattr(self, name)!r}")
        if self.min_sizes is not None:
            sizes = tuple(int(s) for s in self.min_sizes)
            if not sizes or min(sizes) < 1:
                raise ValueError(
                    f"model.tta.min_sizes must be a non-empty list of positive sizes (or null: the model's "
                    f"test size), got {list(self.min_sizes)}"
                )
            object.__setattr__(self, "min_sizes", sizes)
        if self.max_size is not None:
            if int(self.max_size) < 1:
                raise ValueError(f"model.tta.max_size must be positive (or null: the model's), got {self.max_size}")
            object.__setattr__(self, "max_size", int(self.max_size))


TTA_KEYS = tuple(f.name for f in dataclasses.fields(TTASettings))


def tta_settings(model: MaskRCNN) -> TTASettings:
    """The model's TTA settings (a model not built by ``build_model`` has none: TTA off)."""
    return getattr(model, "tta", None) or TTASettings()


def set_tta(model: MaskRCNN, changes: Mapping[str, Any] | None) -> TTASettings:
    """Change the model's TTA settings by ``changes`` (``model.tta.*`` keys; a ``None`` value keeps the
    model's value), as eval does for a checkpoint; return the new settings.

    Raises:
        ValueError: on a key that is not a TTA setting, naming the valid ones.
    """
    changes = {k: v for k, v in dict(changes or {}).items() if v is not None}
    unknown = sorted(set(changes) - set(TTA_KEYS))
    if unknown:
        raise ValueError(
            f"unknown test-time augmentation setting(s) {unknown} under model.tta; valid: {list(TTA_KEYS)}"
        )
    model.tta = dataclasses.replace(tta_settings(model), **changes)
    return model.tta


def detect(model: MaskRCNN, images: list[Tensor]) -> list[dict[str, Any]]:
    """``model(images)`` for a model in eval mode, with test-time augmentation when its settings enable it.

    Args:
        model: a torchvision Mask R-CNN (an ``IEMaskRCNN``).
        images: float (3, H, W) images in [0, 1].

    Returns:
        Per image, torchvision's detections at input resolution (``boxes``, ``labels``, ``scores``, ``masks``).
    """
    settings = tta_settings(model)
    if model.training or not settings.enabled:
        return model(images)
    return tta_inference(model, images, settings)


@torch.no_grad()
def tta_inference(model: MaskRCNN, images: list[Tensor], settings: TTASettings) -> list[dict[str, Any]]:
    """Detections of ``images`` merged over the augmentations of ``settings`` (see the module docstring).

    Every test size is one batch (the images, then their mirror images with ``flip``); with several sizes the
    backbone runs twice per size, for the boxes and for the masks of the merged boxes, as in Detectron2, so
    that no feature maps are held across sizes; with one size (the default) its features serve both.
    """
    transform = model.transform
    if transform.fixed_size is not None:
        raise ValueError(
            f"test-time augmentation resizes to model.tta.min_sizes, but this model resizes every image to its "
            f"fixed_size {transform.fixed_size}"
        )
    sizes = settings.min_sizes or (int(transform.min_size[-1]),)
    max_size = settings.max_size or int(transform.max_size)
    originals = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
    roi_heads = model.roi_heads

    candidates: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in images]
    kept = None  # one size: its features serve the masks too (nothing is held across sizes)
    for size in sizes:
        image_list, features = _features(model, images, size, max_size, settings.flip)
        if len(sizes) == 1:
            kept = image_list, features
        proposals, _ = model.rpn(image_list, features)
        found = _detect_boxes(roi_heads, features, proposals, image_list.image_sizes)
        for entry, (boxes, scores, labels) in enumerate(zip(*found, strict=True)):
            index, flipped = entry % len(images), entry >= len(images)
            boxes = resize_boxes(boxes, image_list.image_sizes[entry], originals[index])
            candidates[index].append((_flip_boxes(boxes, originals[index][1]) if flipped else boxes, scores, labels))

    merged = []
    for parts, size in zip(candidates, originals, strict=True):
        boxes, scores, labels = (torch.cat(column) for column in zip(*parts, strict=True))
        boxes = clip_boxes_to_image(boxes, size)
        keep = batched_nms(boxes, scores, labels, roi_heads.nms_thresh)[: roi_heads.detections_per_img]
        merged.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})

    if roi_heads.has_mask():
        sums: list[Tensor | None] = [None] * len(images)
        for size in sizes:
            image_list, features = kept or _features(model, images, size, max_size, settings.flip)
            rois, labels = [], []
            for entry, resized in enumerate(image_list.image_sizes):
                index, flipped = entry % len(images), entry >= len(images)
                boxes = merged[index]["boxes"]
                boxes = _flip_boxes(boxes, originals[index][1]) if flipped else boxes
                rois.append(resize_boxes(boxes, originals[index], resized))
                labels.append(merged[index]["labels"])
            probabilities = _mask_probabilities(roi_heads, features, rois, image_list.image_sizes, labels)
            for entry, probability in enumerate(probabilities):  # (N, 1, M, M) per entry
                index = entry % len(images)
                probability = probability.flip(-1) if entry >= len(images) else probability
                sums[index] = probability if sums[index] is None else sums[index] + probability
        count = len(sizes) * (2 if settings.flip else 1)
        for detections, total in zip(merged, sums, strict=True):
            detections["masks"] = total / count
    # boxes are at the original sizes already; the transform pastes the masks as the model would
    return transform.postprocess(merged, originals, originals)


@contextmanager
def _test_size(transform: GeneralizedRCNNTransform, min_size: int, max_size: int) -> Iterator[None]:
    """Let ``transform`` resize to ``min_size`` / ``max_size`` inside the block."""
    saved = transform.min_size, transform.max_size
    transform.min_size, transform.max_size = (min_size,), max_size
    try:
        yield
    finally:
        transform.min_size, transform.max_size = saved


def _features(
    model: MaskRCNN, images: list[Tensor], size: int, max_size: int, flip: bool
) -> tuple[ImageList, dict[str, Tensor]]:
    """The images (then their mirror images with ``flip``) resized to ``size`` as one batch, and its features."""
    batch = [*images, *(image.flip(-1) for image in images)] if flip else list(images)
    with _test_size(model.transform, size, max_size):
        image_list, _ = model.transform(batch)
    return image_list, model.backbone(image_list.tensors)


def _detect_boxes(
    roi_heads: RoIHeads, features: dict[str, Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]]
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """The box head's detections per image (boxes (N, 4) at the resized size, scores (N,), labels (N,))."""
    box_features = roi_heads.box_head(roi_heads.box_roi_pool(features, proposals, image_sizes))
    class_logits, box_regression = roi_heads.box_predictor(box_features)
    return roi_heads.postprocess_detections(class_logits, box_regression, proposals, image_sizes)


def _mask_probabilities(
    roi_heads: RoIHeads,
    features: dict[str, Tensor],
    boxes: list[Tensor],
    image_sizes: list[tuple[int, int]],
    labels: list[Tensor],
) -> list[Tensor]:
    """The mask head's (N, 1, M, M) probabilities of each image's ``labels`` in its given ``boxes``."""
    mask_features = roi_heads.mask_head(roi_heads.mask_roi_pool(features, boxes, image_sizes))
    return list(maskrcnn_inference(roi_heads.mask_predictor(mask_features), labels))


def _flip_boxes(boxes: Tensor, width: int) -> Tensor:
    """(N, 4) xyxy boxes mirrored in an image ``width`` pixels wide."""
    x0, y0, x1, y1 = boxes.unbind(1)
    return torch.stack((width - x1, y0, width - x0, y1), dim=1)
