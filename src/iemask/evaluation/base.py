"""The streaming-evaluator skeleton shared by every protocol: reset / process / evaluate.

Detectron2's ``DatasetEvaluator`` shape: ``process`` turns each model output into COCO result dicts at
once (masks as RLE, never kept dense) and stores them as :class:`Detections`, a few arrays per image
rather than a dict per detection; ``evaluate`` gathers every rank's store on rank 0 in one collective,
counts each image once and scores there, and every rank gets the metrics. Result dicts are made again
only where a backend needs them, and :attr:`StreamingEvaluator.results` only when asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from iemask.evaluation.distributed import gather_to_rank_zero, on_rank_zero
from iemask.utils.memory import gc_paused


def _narrow(values: np.ndarray, narrow: type[np.generic]) -> np.ndarray:
    """``values`` as the ``narrow`` dtype where that holds every value exactly (model outputs are float32),
    else unchanged, so that the result dicts made again later equal the original ones."""
    narrowed = values.astype(narrow)
    return narrowed if np.array_equal(narrowed, values, equal_nan=values.dtype.kind == "f") else values


@dataclass(frozen=True)
class Detections:
    """COCO-format detections of several images as flat arrays: D detections of M images, image by image.

    Image ``image_ids[i]`` has the ``sizes[i]`` detections that follow those of the images before it.
    Scores and boxes are float32 unless a value needs float64; a detection without a mask has mask size
    (-1, -1) and empty counts.
    """

    image_ids: np.ndarray  # (M,) int64
    sizes: np.ndarray  # (M,) int64 detections per image
    category_ids: np.ndarray  # (D,) int32 (int64 if needed)
    scores: np.ndarray  # (D,) float32 (float64 if needed)
    boxes: np.ndarray  # (D, 4) x, y, w, h; float32 (float64 if needed)
    mask_sizes: np.ndarray  # (D, 2) int32 RLE [height, width]; -1 without a mask
    counts: bytes  # every RLE's compressed counts, one after the other
    count_ends: np.ndarray  # (D,) int64 where each detection's counts end in `counts`

    @classmethod
    def empty(cls) -> Detections:
        """A store without images."""
        return cls(
            image_ids=np.zeros(0, dtype=np.int64),
            sizes=np.zeros(0, dtype=np.int64),
            category_ids=np.zeros(0, dtype=np.int32),
            scores=np.zeros(0, dtype=np.float32),
            boxes=np.zeros((0, 4), dtype=np.float32),
            mask_sizes=np.zeros((0, 2), dtype=np.int32),
            counts=b"",
            count_ends=np.zeros(0, dtype=np.int64),
        )

    @classmethod
    def from_results(cls, image_id: int, results: Sequence[dict[str, Any]]) -> Detections:
        """Pack one image's result dicts (``category_id``, ``bbox``, ``score``, optional RLE ``segmentation``)."""
        category_ids = np.asarray([r["category_id"] for r in results], dtype=None if results else np.int64)
        if category_ids.dtype.kind not in "iu":
            raise ValueError(f"category ids must be integers, got {category_ids.dtype} ({category_ids[:3].tolist()})")
        masks = [r.get("segmentation") for r in results]
        if not all(m is None or isinstance(m, dict) for m in masks):
            raise ValueError("detections keep masks as compressed RLE ({'size', 'counts'}), not as polygons")
        counts = [b"" if m is None else m["counts"] for m in masks]
        counts = [c.encode() if isinstance(c, str) else bytes(c) for c in counts]
        sizes = [(-1, -1) if m is None else m["size"] for m in masks]
        return cls(
            image_ids=np.array([image_id], dtype=np.int64),
            sizes=np.array([len(results)], dtype=np.int64),
            category_ids=_narrow(category_ids.astype(np.int64), np.int32),
            scores=_narrow(np.asarray([r["score"] for r in results], dtype=np.float64), np.float32),
            boxes=_narrow(np.asarray([r["bbox"] for r in results], dtype=np.float64).reshape(-1, 4), np.float32),
            mask_sizes=np.array(sizes, dtype=np.int32).reshape(-1, 2),
            counts=b"".join(counts),
            count_ends=np.cumsum([len(c) for c in counts], dtype=np.int64),
        )

    @classmethod
    def merge(cls, parts: Sequence[Detections]) -> Detections:
        """One store of ``parts`` (in rank order), sorted by image id; an image in several parts counts once,
        from the first of them, so that a padded sampler cannot count an image twice."""
        if len(parts) == 1 and _strictly_increasing(parts[0].image_ids):
            return parts[0]  # nothing to reorder: no copy
        if not parts:
            return cls.empty()
        offsets = np.cumsum([0, *(p.num_images for p in parts)])  # (P + 1,) first image of each part
        _, first = np.unique(np.concatenate([p.image_ids for p in parts]), return_index=True)  # (M,) by id
        part_of = np.searchsorted(offsets, first, side="right") - 1  # (M,)
        # Runs of consecutive images of one part: whole shards where the ranks hold contiguous id ranges.
        run_starts = np.flatnonzero(np.diff(part_of, prepend=-1) | (np.diff(first, prepend=-2) != 1))  # (R,)
        run_ends = [*run_starts[1:].tolist(), len(first)]
        whole = []
        for start, end in zip(run_starts.tolist(), run_ends, strict=True):
            part, lo = parts[part_of[start]], int(first[start] - offsets[part_of[start]])
            whole.append(part if end - start == part.num_images else part._take_images(lo, lo + end - start))
        return cls.concatenate(whole)

    @classmethod
    def concatenate(cls, parts: Sequence[Detections]) -> Detections:
        """The images of ``parts`` one after the other (floats widen to float64 where one part needs it)."""
        if len(parts) == 1:
            return parts[0]
        fields = {name: np.concatenate([getattr(p, name) for p in parts]) for name in _ARRAY_FIELDS}
        byte_offsets = np.cumsum([0, *(len(p.counts) for p in parts[:-1])])  # (P,) where each part's counts start
        fields["count_ends"] = np.concatenate(
            [p.count_ends + offset for p, offset in zip(parts, byte_offsets, strict=True)]
        )
        return cls(**fields, counts=b"".join(p.counts for p in parts))

    def _take_images(self, lo: int, hi: int) -> Detections:
        """The images ``lo`` to ``hi - 1`` (a copy)."""
        first_detection = np.concatenate([[0], np.cumsum(self.sizes)])  # (M + 1,)
        d_lo, d_hi = first_detection[lo], first_detection[hi]
        byte_lo, byte_hi = (self.count_ends[d - 1] if d > 0 else 0 for d in (d_lo, d_hi))
        fields = {
            name: (getattr(self, name)[lo:hi] if name in _IMAGE_FIELDS else getattr(self, name)[d_lo:d_hi]).copy()
            for name in _ARRAY_FIELDS
        }
        fields["count_ends"] -= byte_lo
        return Detections(**fields, counts=self.counts[byte_lo:byte_hi])

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    def __len__(self) -> int:
        return len(self.scores)

    def detection_image_ids(self, indices: np.ndarray | None = None) -> np.ndarray:
        """(D,) int64 the image id of each detection, or (D',) of the detections ``indices``."""
        if indices is None:
            return np.repeat(self.image_ids, self.sizes)
        return self.image_ids[np.searchsorted(np.cumsum(self.sizes), indices, side="right")]

    def results(self, indices: np.ndarray | None = None, boxes: bool = True) -> list[dict[str, Any]]:
        """Fresh COCO result dicts, equal to the packed ones: of every detection, or of ``indices`` (D',) in
        that order; without ``bbox`` where ``boxes`` is false (mask AP is scored without them)."""
        if indices is None:
            indices = np.arange(len(self))
        starts = np.where(indices > 0, self.count_ends[indices - 1], 0)  # (D',) where each one's counts start
        columns = [self.detection_image_ids(indices), self.category_ids[indices], self.scores[indices]]
        columns += [self.boxes[indices], self.mask_sizes[indices], starts, self.count_ends[indices]]
        image_ids, category_ids, scores, xywh, mask_sizes, starts, ends = (column.tolist() for column in columns)
        counts, out = self.counts, []
        for image_id, category_id, score, box, (height, width), start, end in zip(
            image_ids, category_ids, scores, xywh, mask_sizes, starts, ends, strict=True
        ):
            if boxes:
                result = {"image_id": image_id, "category_id": category_id, "bbox": box, "score": score}
            else:
                result = {"image_id": image_id, "category_id": category_id, "score": score}
            if height >= 0:
                result["segmentation"] = {"size": [height, width], "counts": counts[start:end].decode()}
            out.append(result)
        return out

    def by_image(self) -> dict[int, list[dict[str, Any]]]:
        """Result dicts per image id (every image of the store, also those without detections)."""
        per_image: dict[int, list[dict[str, Any]]] = {image_id: [] for image_id in self.image_ids.tolist()}
        for result in self.results():
            per_image[result["image_id"]].append(result)
        return per_image


_IMAGE_FIELDS = ("image_ids", "sizes")  # one entry per image; the other arrays have one per detection
_ARRAY_FIELDS = (*_IMAGE_FIELDS, "category_ids", "scores", "boxes", "mask_sizes", "count_ends")


def _strictly_increasing(values: np.ndarray) -> bool:
    return bool(np.all(values[1:] > values[:-1]))


class StreamingEvaluator:
    """Base class; subclasses define :meth:`convert` (one output → result dicts) and :meth:`score`.

    Attributes:
        num_images: distinct images the last ``evaluate`` covered, to check that the whole split was seen
            (on every rank).
    """

    def reset(self) -> None:
        """Forget everything processed so far (call at the start of each evaluation loop)."""
        self._seen: set[int] = set()
        self._parts: list[Detections] = []  # this rank's images, one store each until local_detections()
        self._detections: Detections | None = None  # all ranks' after evaluate, on rank 0
        self._results: list[dict[str, Any]] | None = None
        self.num_images = 0

    def convert(self, image_id: int, output: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def score(self, detections: Detections) -> dict[str, float]:
        raise NotImplementedError

    def process(self, image_ids: Sequence[int], outputs: Sequence[dict[str, torch.Tensor]]) -> None:
        """Convert and store a batch of model outputs; an image id seen before on this rank is skipped."""
        for image_id, output in zip(image_ids, outputs, strict=True):
            image_id = int(image_id)
            if image_id not in self._seen:
                self._seen.add(image_id)
                self._parts.append(Detections.from_results(image_id, self.convert(image_id, output)))

    def local_detections(self) -> Detections:
        """This rank's detections as one store, sorted by image id (what ``evaluate`` sends to rank 0)."""
        if len(self._parts) != 1:
            self._parts = [Detections.merge(self._parts)]  # one store instead of one per image
        return self._parts[0]

    def evaluate(self) -> dict[str, float]:
        """Gather all ranks' stores on rank 0 (one ``gather_object``), keep each image once, score there and
        return the same metrics on every rank."""
        gathered = gather_to_rank_zero(self.local_detections())  # None on ranks other than 0
        self._detections = Detections.merge(gathered) if gathered is not None else None
        del gathered  # the ranks' parts, copied into the merged store: not held while scoring
        self._results = None

        def score() -> tuple[dict[str, float], int]:
            with gc_paused():
                return self.score(self._detections), self._detections.num_images

        metrics, self.num_images = on_rank_zero(score)
        return metrics

    @property
    def results(self) -> list[dict[str, Any]]:
        """COCO result dicts of the last ``evaluate`` (all ranks', sorted by image id), made on first use from
        the stored arrays; on rank 0 only (empty on the other ranks)."""
        if self._results is None:
            with gc_paused():
                self._results = self._detections.results() if self._detections is not None else []
        return self._results
