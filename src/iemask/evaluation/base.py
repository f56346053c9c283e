"""The streaming-evaluator skeleton shared by every protocol: a ``torchmetrics.Metric`` (update / compute / reset).

Detectron2's ``DatasetEvaluator`` flow on torchmetrics' states: ``update`` turns each model output into COCO
result dicts at once (masks as RLE, never kept dense) and keeps them as :class:`Detections`' arrays rather
than a dict per detection; the states hold those arrays as a few compact tensors, which under DDP
torchmetrics' sync concatenates on every rank (one ``all_gather`` per state); ``compute`` counts each image
once and scores on rank 0 alone, which broadcasts the metrics. Result dicts are made again only where a
backend needs them, and :attr:`StreamingEvaluator.results` only when asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric

from iemask.evaluation.distributed import on_rank_zero
from iemask.utils.memory import gc_paused
from iemask.utils.runs import write_json_atomic

PR_CURVES_FILE = "pr_curves.json"  # beside a run's metrics.json: :meth:`StreamingEvaluator.write_pr_curves`

# The arrays of a store, which are also the metric states: trailing shape and dtype of each. The first two have
# one entry per image, ``counts`` one per byte of RLE counts, the others one per detection.
_FIELDS: dict[str, tuple[tuple[int, ...], type[np.generic]]] = {
    "image_ids": ((), np.int64),
    "sizes": ((), np.int64),
    "category_ids": ((), np.int32),
    "scores": ((), np.float32),
    "boxes": ((4,), np.float32),
    "mask_sizes": ((2,), np.int32),
    "count_lengths": ((), np.int32),
    "counts": ((), np.uint8),
}
_IMAGE_FIELDS = ("image_ids", "sizes")


def _narrow(values: np.ndarray, narrow: type[np.generic]) -> np.ndarray:
    """``values`` as the ``narrow`` dtype where that holds every value exactly (model outputs are float32),
    else unchanged, so that the result dicts made again later equal the original ones."""
    narrowed = values.astype(narrow)
    return narrowed if np.array_equal(narrowed, values, equal_nan=values.dtype.kind == "f") else values


@dataclass(frozen=True)
class Detections:
    """COCO-format detections of several images as flat arrays: D detections of M images, image by image.

    Image ``image_ids[i]`` has the ``sizes[i]`` detections that follow those of the images before it. Scores
    and boxes are float32 and category ids int32 unless a value needs float64 / int64 (result dicts from a
    json); a detection without a mask has mask size (-1, -1) and no counts. Counts are kept as lengths, not
    ends, so that stores concatenate as they are.
    """

    image_ids: np.ndarray  # (M,) int64
    sizes: np.ndarray  # (M,) int64 detections per image
    category_ids: np.ndarray  # (D,) int32 (int64 if needed)
    scores: np.ndarray  # (D,) float32 (float64 if needed)
    boxes: np.ndarray  # (D, 4) x, y, w, h; float32 (float64 if needed)
    mask_sizes: np.ndarray  # (D, 2) int32 RLE [height, width]; -1 without a mask
    count_lengths: np.ndarray  # (D,) int32 bytes of each detection's RLE counts
    counts: np.ndarray  # (B,) uint8 every RLE's compressed counts, one after the other

    @classmethod
    def empty(cls) -> Detections:
        """A store without images."""
        return cls(**{name: np.zeros((0, *shape), dtype) for name, (shape, dtype) in _FIELDS.items()})

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
            count_lengths=np.array([len(c) for c in counts], dtype=np.int32),
            counts=np.frombuffer(b"".join(counts), dtype=np.uint8).copy(),  # writable: torch takes it as it is
        )

    @classmethod
    def merge(cls, parts: Sequence[Detections]) -> Detections:
        """One store of ``parts`` (in rank order), sorted by image id; an image in several parts, or twice in one,
        counts once, from its first place, so that a padded sampler cannot count an image twice."""
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
        return cls(**{name: np.concatenate([getattr(p, name) for p in parts]) for name in _FIELDS})

    def _take_images(self, lo: int, hi: int) -> Detections:
        """The images ``lo`` to ``hi - 1`` (a copy)."""
        d_lo, d_hi = self._first_detections[lo], self._first_detections[hi]
        byte_lo, byte_hi = (int(self.count_ends[d - 1]) if d > 0 else 0 for d in (d_lo, d_hi))
        bounds = {"image": (lo, hi), "detection": (d_lo, d_hi), "byte": (byte_lo, byte_hi)}
        fields = {}
        for name in _FIELDS:
            start, stop = bounds["image" if name in _IMAGE_FIELDS else "byte" if name == "counts" else "detection"]
            fields[name] = getattr(self, name)[start:stop].copy()
        return Detections(**fields)

    @cached_property
    def _first_detections(self) -> np.ndarray:
        """(M + 1,) int64 index of each image's first detection, and D."""
        return np.concatenate([[0], np.cumsum(self.sizes)])

    @cached_property
    def count_ends(self) -> np.ndarray:
        """(D,) int64 where each detection's counts end in ``counts``."""
        return np.cumsum(self.count_lengths, dtype=np.int64)

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    def __len__(self) -> int:
        return len(self.scores)

    def detection_image_ids(self, indices: np.ndarray | None = None) -> np.ndarray:
        """(D,) int64 the image id of each detection, or (D',) of the detections ``indices``."""
        if indices is None:
            return np.repeat(self.image_ids, self.sizes)
        return self.image_ids[np.searchsorted(self._first_detections[1:], indices, side="right")]

    def results(self, indices: np.ndarray | None = None, boxes: bool = True) -> list[dict[str, Any]]:
        """Fresh COCO result dicts, equal to the packed ones: of every detection, or of ``indices`` (D',) in
        that order; without ``bbox`` where ``boxes`` is false (mask AP is scored without them)."""
        if indices is None:
            indices = np.arange(len(self))
        ends = self.count_ends[indices]  # (D',) where each one's counts end
        columns = [self.detection_image_ids(indices), self.category_ids[indices], self.scores[indices]]
        columns += [self.boxes[indices], self.mask_sizes[indices], ends - self.count_lengths[indices], ends]
        image_ids, category_ids, scores, xywh, mask_sizes, starts, ends = (column.tolist() for column in columns)
        counts, out = memoryview(self.counts), []
        for image_id, category_id, score, box, (height, width), start, end in zip(
            image_ids, category_ids, scores, xywh, mask_sizes, starts, ends, strict=True
        ):
            if boxes:
                result = {"image_id": image_id, "category_id": category_id, "bbox": box, "score": score}
            else:
                result = {"image_id": image_id, "category_id": category_id, "score": score}
            if height >= 0:
                result["segmentation"] = {"size": [height, width], "counts": counts[start:end].tobytes().decode()}
            out.append(result)
        return out

    def by_image(self) -> dict[int, list[dict[str, Any]]]:
        """Result dicts per image id (every image of the store, also those without detections)."""
        per_image: dict[int, list[dict[str, Any]]] = {image_id: [] for image_id in self.image_ids.tolist()}
        for result in self.results():
            per_image[result["image_id"]].append(result)
        return per_image


def _strictly_increasing(values: np.ndarray) -> bool:
    return bool(np.all(values[1:] > values[:-1]))


def _one_tensor(state: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """A state as one tensor: synced (every rank's, already concatenated), a list's only tensor as it is (no
    copy), or a list's tensors concatenated."""
    if isinstance(state, torch.Tensor):
        return state
    return state[0] if len(state) == 1 else torch.cat(state)


def _state(name: str) -> str:
    """The metric state of a :class:`Detections` array (``stored_scores``, ...), named apart from the
    evaluators' own attributes (their ``category_ids`` map labels to ids)."""
    return f"stored_{name}"


class StreamingEvaluator(Metric):
    """Base class; subclasses define :meth:`convert` (one output → result dicts) and :meth:`score`.

    The states (``stored_<array>``) are :class:`Detections`' arrays (``dist_reduce_fx="cat"``) on the metric's
    device: under NCCL torchmetrics can only gather them there (``compute_on_cpu`` would not sync). ``update``
    stages each batch's arrays in NumPy and :meth:`sync` (which ``compute`` calls) moves them into the states
    at once, one tensor per state: small tensors made image by image, between the large temporaries of mask
    encoding, fragment the process heap (measured: 11 GB of freed but held RSS over 2000 LVIS-shaped images).
    Every state starts with an empty tensor of its dtype and shape, so that a rank without images still sends
    well-formed ones. Scores and boxes are stored as float32 and category ids as int32, which hold model
    outputs exactly; a value that they would not is an error, never rounded.

    Attributes:
        num_images: distinct images the last ``compute`` covered, to check that the whole split was seen
            (on every rank).
        pr_curves: the last ``compute``'s precision-recall curves per IoU type, on rank 0, where the protocol
            scores with COCO's precision arrays (COCO, LVIS; see :func:`~iemask.evaluation.common.pr_curves`);
            empty otherwise (Cityscapes' official AP has no such arrays).
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__(compute_with_cache=False)  # each compute scores what is stored now
        for name in _FIELDS:
            self.add_state(_state(name), default=[], dist_reduce_fx="cat")
        self.reset()

    def reset(self) -> None:
        """Forget everything stored so far (call at the start of each evaluation loop)."""
        if self._is_synced:  # a compute that raised under DDP left every rank's states in place of this rank's
            self.unsync()
        super().reset()
        for name, (shape, dtype) in _FIELDS.items():
            getattr(self, _state(name)).append(torch.from_numpy(np.zeros((0, *shape), dtype)).to(self.device))
        self._seen: set[int] = set()
        self._staged: list[Detections] = []  # batches not yet in the states
        self._detections: Detections | None = None  # all ranks' after compute, on rank 0
        self._results: list[dict[str, Any]] | None = None
        self.num_images = 0
        self.pr_curves: dict[str, Any] = {}

    def convert(self, image_id: int, output: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def score(self, detections: Detections) -> dict[str, float]:
        raise NotImplementedError

    def update(self, image_ids: Sequence[int | torch.Tensor], outputs: Sequence[dict[str, torch.Tensor]]) -> None:
        """Convert and store a batch of model outputs; an image id seen before on this rank is skipped."""
        parts = []
        for image_id, output in zip(image_ids, outputs, strict=True):
            image_id = int(image_id)
            if image_id not in self._seen:
                self._seen.add(image_id)
                parts.append(Detections.from_results(image_id, self.convert(image_id, output)))
        if not parts:
            return
        batch = Detections.concatenate(parts)
        for name, (_, dtype) in _FIELDS.items():
            if getattr(batch, name).dtype != dtype:
                raise ValueError(
                    f"the {name} of images {batch.image_ids.tolist()} need {getattr(batch, name).dtype}, but the "
                    f"evaluator stores them as {np.dtype(dtype)}, which holds any float32 model output exactly"
                )
        self._staged.append(batch)

    def _unstage(self) -> None:
        """Move the staged batches into the states, one tensor per state (in place of the empty one, so that
        torchmetrics' sync sends it without concatenating it into a copy first)."""
        if self._staged:
            batch = Detections.concatenate(self._staged)
            self._staged = []
            for name in _FIELDS:
                state, tensor = getattr(self, _state(name)), torch.from_numpy(getattr(batch, name)).to(self.device)
                state[:] = [tensor] if not any(len(t) for t in state) else [*state, tensor]

    def sync(
        self,
        dist_sync_fn: Callable | None = None,
        process_group: Any | None = None,
        should_sync: bool = True,
        distributed_available: Callable | None = None,
    ) -> None:
        """torchmetrics' ``sync``, after moving the staged batches into the states."""
        self._unstage()
        super().sync(dist_sync_fn, process_group, should_sync, distributed_available)

    def stored(self) -> Detections:
        """The states as one store, in the order they came: this rank's images, or inside ``compute``, where
        torchmetrics has synced them, every rank's one rank after the other."""
        self._unstage()
        return Detections(**{name: _one_tensor(getattr(self, _state(name))).cpu().numpy() for name in _FIELDS})

    def compute(self) -> dict[str, float]:
        """Keep each image of every rank once, score on rank 0 alone (once, not on every rank) and return the
        same metrics on every rank."""
        self._detections, self._results, self.pr_curves = None, None, {}

        def score() -> tuple[dict[str, float], int]:
            self._detections = Detections.merge([self.stored()])
            with gc_paused():
                return self.score(self._detections), self._detections.num_images

        metrics, self.num_images = on_rank_zero(score)
        return metrics

    def write_pr_curves(self, folder: str | Path) -> Path | None:
        """Write :attr:`pr_curves` as ``<folder>/pr_curves.json`` (atomically); ``None`` (nothing written)
        where the last ``compute`` gave none: another rank than 0, or a protocol without them."""
        if not self.pr_curves:
            return None
        return write_json_atomic(Path(folder) / PR_CURVES_FILE, self.pr_curves, indent=None)

    @property
    def results(self) -> list[dict[str, Any]]:
        """COCO result dicts of the last ``compute`` (all ranks', sorted by image id), made on first use from
        the stored arrays; on rank 0 only (empty on the other ranks)."""
        if self._results is None:
            with gc_paused():
                self._results = self._detections.results() if self._detections is not None else []
        return self._results


@dataclass(frozen=True)
class Protocol:
    """One dataset's evaluation protocol: what the rest of the project needs of it.

    Each protocol module (:mod:`~iemask.evaluation.coco`, ...) declares its own as ``PROTOCOL``, and
    :mod:`~iemask.evaluation.protocol` finds them all; a data module names its protocol in ``protocol``.

    Attributes:
        name: its registry key, the data modules' ``protocol``.
        metric_names: the summary metric keys it gives (``"segm/AP"``, ...); fewer IoU types give fewer. COCO and
            LVIS add per-class keys (``"segm/AP-<class name>"``, ``"segm/AP50-<class name>"``) beside them.
        score: ``(gt, results, iou_types) -> metrics``, scoring saved results offline (``evaluate``).
        build_evaluator: ``val_set -> evaluator``, the streaming evaluator of a validation dataset.
        format_table: ``metrics -> str``, its metric table (markdown, in the paper's layout).
        write_results: ``(evaluator, folder) -> None``, writing the evaluator's last results in the dataset's
            official format; ``None`` where the COCO results json is that format.
    """

    name: str
    metric_names: tuple[str, ...]
    score: Callable[..., dict[str, float]]
    build_evaluator: Callable[[Any], StreamingEvaluator]
    format_table: Callable[[Mapping[str, float]], str]
    write_results: Callable[[Any, str | Path], None] | None = None
