"""Mask paste-back whose cost follows the detections' box areas, not image area × detections.

torchvision's ``paste_masks_in_image`` gives every detection an image-sized float32 mask (LVIS: 300 ×
800 × 1216 × 4 B = 1.1 GB per image) that evaluation then thresholds and scans whole. Here each mask
is resized within its expanded box exactly as torchvision resizes it, thresholded at once, and kept
as a bool patch of the part of that box inside the image: the pixels are those of torchvision's paste
followed by ``> threshold``, and COCO RLEs are computed from the patches alone.

TorchScript: a scripted model's outputs are ``dict[str, Tensor]`` (torchvision's ``GeneralizedRCNN``
is typed so), which a :class:`BinaryMasks` is not; scripted, ``mask_output="binary"`` gives the dense
(N, 1, H, W) bool masks, equal to ``BinaryMasks.to_dense()`` of the eager model. The patch cutting and
the dense filling are plain scriptable functions that both paths share; the eager-only branch sits
under ``torch.jit.is_scripting()``, which the compiler leaves out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks, paste_masks_in_image
from torchvision.models.detection.transform import (
    GeneralizedRCNNTransform,
    _resize_image_and_masks,
    resize_boxes,
)

MASK_OUTPUTS = ("probabilities", "binary")
PASTE_PADDING = 1  # torchvision's border, in mask pixels, around a mask before it is resized into its box


def check_mask_output(mask_output: str) -> str:
    """Return ``mask_output`` if it names a mask output form, else raise naming the choices."""
    if mask_output not in MASK_OUTPUTS:
        raise ValueError(f"mask_output must be one of {MASK_OUTPUTS}, got {mask_output!r}")
    return mask_output


class BinaryMasks:
    """The thresholded masks of one image's N detections, as box-local bool patches.

    Patch ``i`` covers image rows ``y0:y1`` and columns ``x0:x1`` (``regions[i] = (x0, y0, x1, y1)``,
    inside the image); every pixel outside it is background. Selecting detections (``masks[keep]``
    with a bool or index tensor, a list or a slice), ``len``, ``to``/``cpu``/``detach`` and ``shape``
    behave as on torchvision's (N, 1, H, W) mask tensor, so outputs are filtered and moved as before;
    :meth:`to_dense` builds that tensor (bool) for code that needs it.
    """

    def __init__(self, data: Tensor, regions: Tensor, image_size: tuple[int, int], threshold: float) -> None:
        """Wrap ``data`` (sum of patch areas,) bool, the row-major patches one after another, and
        ``regions`` (N, 4) int64 ``x0, y0, x1, y1``; ``threshold`` is the probability they were cut at."""
        self.data = data
        self.regions = regions
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.threshold = float(threshold)

    def __len__(self) -> int:
        return len(self.regions)

    def __repr__(self) -> str:
        return f"BinaryMasks(n={len(self)}, image_size={self.image_size}, device={self.device})"

    @property
    def shape(self) -> torch.Size:
        """Shape of the dense equivalent, (N, 1, H, W)."""
        return torch.Size((len(self), 1, *self.image_size))

    @property
    def device(self) -> torch.device:
        """Where the patches are (the model's device, until moved)."""
        return self.data.device

    def _sizes(self) -> list[tuple[int, int]]:
        """(height, width) of each patch."""
        return [(y1 - y0, x1 - x0) for x0, y0, x1, y1 in self.regions.tolist()]

    def patches(self) -> list[tuple[int, int, Tensor]]:
        """``(y0, x0, patch)`` per detection; ``patch`` is an (h, w) bool view of :attr:`data`."""
        sizes = self._sizes()
        pieces = self.data.split([h * w for h, w in sizes])
        return [
            (y0, x0, piece.view(h, w))
            for (x0, y0, _, _), (h, w), piece in zip(self.regions.tolist(), sizes, pieces, strict=True)
        ]

    def __getitem__(self, index: Tensor | slice | Sequence[int]) -> BinaryMasks:
        """The masks of the selected detections, in the order selected (the patches are copied)."""
        if isinstance(index, Tensor):
            index = index.cpu()
        selected = torch.arange(len(self))[index]
        if selected.dim() != 1:
            raise TypeError(
                f"select detections with a bool or index tensor, a list or a slice (got {index!r}); "
                "to_dense()[i] is the (1, H, W) mask of detection i"
            )
        sizes = self._sizes()
        pieces = self.data.split([h * w for h, w in sizes])
        chosen = selected.tolist()
        data = torch.cat([pieces[i] for i in chosen]) if chosen else self.data[:0]
        return BinaryMasks(data, self.regions[selected.to(self.regions.device)], self.image_size, self.threshold)

    def to(self, device: torch.device | str) -> BinaryMasks:
        """The same masks on ``device`` (one copy of the patches)."""
        return BinaryMasks(self.data.to(device), self.regions.to(device), self.image_size, self.threshold)

    def cpu(self) -> BinaryMasks:
        """The same masks on the CPU."""
        return self.to("cpu")

    def detach(self) -> BinaryMasks:
        """Itself: bool patches carry no gradient (for code that detaches every output)."""
        return self

    def to_dense(self) -> Tensor:
        """The (N, 1, H, W) bool masks, as torchvision's paste followed by ``> threshold`` gives them."""
        return _dense_masks(self.data, self.regions, self.image_size)

    def encode(self) -> list[dict[str, Any]]:
        """pycocotools' compressed RLE of each full-image mask, from the patches (no image-sized array).

        COCO RLE alternates background and foreground run lengths over the image in column-major
        order, starting with background. The runs are found in each patch (its columns framed by
        background), placed at their image offsets, and pycocotools compresses them, so ``counts`` is
        byte-for-byte what ``pycocotools.mask.encode`` gives for the full-image mask.
        """
        height, width = self.image_size
        uncompressed = []
        for y0, x0, patch in self.cpu().patches():
            h, w = patch.shape
            framed = np.zeros((w, h + 2), dtype=np.int8)  # (w, h + 2): patch columns, background above and below
            framed[:, 1:-1] = patch.numpy().T
            column, row = np.nonzero(np.diff(framed, axis=1))  # a start, then an end, in each run; image order
            edges = (x0 + column) * height + y0 + row  # column-major image index of each start / end
            starts, ends = edges[0::2], edges[1::2]
            # a run reaching the image's bottom continues at the top of the next column (full-height patches)
            joined = np.flatnonzero(starts[1:] == ends[:-1])
            starts, ends = np.delete(starts, joined + 1), np.delete(ends, joined)
            bounds = np.concatenate(([0], np.stack((starts, ends), axis=1).reshape(-1), [height * width]))
            counts = np.diff(bounds)
            if len(counts) > 1 and counts[-1] == 0:  # pycocotools ends on the last run, foreground or not
                counts = counts[:-1]
            uncompressed.append({"size": [height, width], "counts": counts})
        return mask_util.frPyObjects(uncompressed, height, width) if uncompressed else []


def _binary_patches(
    masks: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float, padding: int = PASTE_PADDING
) -> tuple[Tensor, Tensor]:
    """The patches of :class:`BinaryMasks` (bool, one after another) and their (N, 4) ``x0, y0, x1, y1`` regions.

    Scriptable: the scripted model fills the dense masks from them with :func:`_dense_masks`.
    """
    padded, scale = expand_masks(masks, padding=padding)  # (N, 1, M + 2p, M + 2p)
    expanded = expand_boxes(boxes, scale).to(dtype=torch.int64)  # (N, 4), truncated as torchvision does
    corners: list[list[int]] = expanded.tolist()
    im_h, im_w = image_size
    pieces: list[Tensor] = []
    regions: list[list[int]] = []
    for i, (x0, y0, x1, y1) in enumerate(corners):
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1 + 1, im_w), min(y1 + 1, im_h)
        if cx1 <= cx0 or cy1 <= cy0:
            regions.append([0, 0, 0, 0])
            continue
        size = [max(y1 - y0 + 1, 1), max(x1 - x0 + 1, 1)]
        resized = F.interpolate(padded[i : i + 1], size=size, mode="bilinear", align_corners=False)[0, 0]  # (h, w)
        pieces.append((resized[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] > threshold).reshape(-1))
        regions.append([cx0, cy0, cx1, cy1])
    data = torch.cat(pieces) if len(pieces) > 0 else torch.zeros(0, dtype=torch.bool, device=masks.device)
    region_tensor = torch.tensor(regions, dtype=torch.int64).reshape(-1, 4).to(masks.device)
    return data, region_tensor


def _dense_masks(data: Tensor, regions: Tensor, image_size: tuple[int, int]) -> Tensor:
    """The (N, 1, H, W) bool masks of patches ``data`` at ``regions`` (as :class:`BinaryMasks` holds them)."""
    dense = torch.zeros((regions.shape[0], 1, image_size[0], image_size[1]), dtype=torch.bool, device=data.device)
    corners: list[list[int]] = regions.tolist()
    start = 0
    for i, (x0, y0, x1, y1) in enumerate(corners):
        h, w = y1 - y0, x1 - x0
        dense[i, 0, y0:y1, x0:x1] = data[start : start + h * w].view(h, w)
        start += h * w
    return dense


def paste_masks_binary(
    masks: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float = 0.5, padding: int = PASTE_PADDING
) -> BinaryMasks:
    """Paste (N, 1, M, M) mask probabilities into their boxes and threshold them, box by box.

    Same expansion, rounding and bilinear resize as torchvision's ``paste_masks_in_image``, so the
    pixels equal its output ``> threshold``; only the part of each expanded box inside the image is
    resized-then-kept, on the masks' device. A box entirely outside the image gets an empty patch.

    Args:
        masks: (N, 1, M, M) probabilities (the ROI heads' sigmoid output).
        boxes: (N, 4) xyxy in pixels of the image of size ``image_size`` = (H, W).
        threshold: a pixel is foreground where its probability exceeds this.
        padding: torchvision's border, in mask pixels, added before resizing.
    """
    data, regions = _binary_patches(masks, boxes, image_size, threshold, padding)
    return BinaryMasks(data, regions, image_size, threshold)


def _resize_exact(
    image: Tensor, min_size: int, max_size: int, target: dict[str, Tensor] | None
) -> tuple[Tensor, dict[str, Tensor] | None]:
    """torchvision's ``_resize_image_and_masks`` (no fixed size) with the scale in double precision."""
    h, w = image.shape[-2], image.shape[-1]
    scale = min(float(min_size) / float(min(h, w)), float(max_size) / float(max(h, w)))
    image = F.interpolate(
        image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True, align_corners=False
    )[0]  # (3, H', W')
    if target is not None and "masks" in target:
        masks = F.interpolate(target["masks"][:, None].float(), scale_factor=scale, recompute_scale_factor=True)
        target["masks"] = masks[:, 0].byte()
    return image, target


class MaskPostprocessTransform(GeneralizedRCNNTransform):
    """torchvision's transform; with ``mask_output="binary"`` eval masks come back as :class:`BinaryMasks`.

    ``mask_output`` and ``mask_threshold`` are plain attributes: set ``mask_output = "probabilities"``
    on a built model for torchvision's (N, 1, H, W) float masks.
    """

    def __init__(self, *args: Any, mask_output: str = "binary", mask_threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mask_output = check_mask_output(mask_output)
        self.mask_threshold = float(mask_threshold)

    @classmethod
    def like(cls, transform: GeneralizedRCNNTransform, **kwargs: Any) -> MaskPostprocessTransform:
        """A copy of ``transform``'s settings with the mask output settings ``kwargs``."""
        return cls(
            transform.min_size,
            transform.max_size,
            transform.image_mean,
            transform.image_std,
            size_divisible=transform.size_divisible,
            fixed_size=transform.fixed_size,
            _skip_resize=transform._skip_resize,
            **kwargs,
        )

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor] | None]:
        """torchvision's resize; scripted, the scale is computed in double precision as eager Python does.

        torchvision's scripted branch computes it in float32, which puts some images a pixel short of the
        eager size (a 427×640 photo at 800: 799×1199, not 800×1199) and changes every detection after it.
        Eager and traced (ONNX) models keep torchvision's code. Written out: a scripted module cannot call
        ``super()``.
        """
        h, w = image.shape[-2], image.shape[-1]
        if self.training:
            if self._skip_resize:
                return image, target
            size = self.torch_choice(self.min_size)
        else:
            size = self.min_size[-1]
        if torch.jit.is_scripting() and self.fixed_size is None:
            image, target = _resize_exact(image, size, self.max_size, target)
        else:
            image, target = _resize_image_and_masks(image, size, self.max_size, target, self.fixed_size)
        if target is None:
            return image, target
        target["boxes"] = resize_boxes(target["boxes"], (h, w), (image.shape[-2], image.shape[-1]))
        return image, target

    def postprocess(
        self,
        result: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """torchvision's postprocess (boxes back to the original sizes, masks pasted into them), with
        binary masks pasted by :func:`paste_masks_binary` (scripted: its dense bool masks).

        torchvision's loop written out with its own functions: a scripted module cannot call ``super()``.
        A Mask R-CNN has no keypoints, the one output of torchvision's loop not handled here. The return
        type is the scripted one; eager binary masks are :class:`BinaryMasks`.
        """
        if self.training:
            return result
        for pred, image_shape, original_size in zip(result, image_shapes, original_image_sizes, strict=True):
            boxes = resize_boxes(pred["boxes"], image_shape, original_size)
            pred["boxes"] = boxes
            if "masks" in pred:
                masks = pred["masks"]  # (N, 1, M, M) probabilities
                if self.mask_output == "probabilities":
                    pred["masks"] = paste_masks_in_image(masks, boxes, original_size)  # (N, 1, H, W)
                elif torch.jit.is_scripting():
                    data, regions = _binary_patches(masks, boxes, original_size, self.mask_threshold)
                    pred["masks"] = _dense_masks(data, regions, original_size)  # (N, 1, H, W) bool
                else:
                    pred["masks"] = paste_masks_binary(masks, boxes, original_size, self.mask_threshold)
        return result
