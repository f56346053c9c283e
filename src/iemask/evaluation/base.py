"""The streaming-evaluator skeleton shared by every protocol: reset / process / evaluate.

Detectron2's ``DatasetEvaluator`` shape: ``process`` turns each model output into compact,
json-serialisable results at once (masks as RLE, never kept dense), ``evaluate`` gathers every
rank's results on rank 0, counts each image once and scores them there, and every rank gets the metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from iemask.evaluation.distributed import gather_per_image, on_rank_zero

PerImage = dict[int, list[dict[str, Any]]]


class StreamingEvaluator:
    """Base class; subclasses define :meth:`convert` (one output → result dicts) and :meth:`score`.

    Attributes:
        results: merged result dicts of the last ``evaluate`` (all ranks', sorted by image id), on
            rank 0 only (empty on the other ranks).
        num_images: distinct images those results cover, to check that the whole split was seen
            (on every rank).
    """

    def reset(self) -> None:
        """Forget everything processed so far (call at the start of each evaluation loop)."""
        self._per_image: PerImage = {}
        self.results: list[dict[str, Any]] = []
        self.num_images = 0

    def convert(self, image_id: int, output: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def score(self, per_image: PerImage) -> dict[str, float]:
        raise NotImplementedError

    def process(self, image_ids: Sequence[int], outputs: Sequence[dict[str, torch.Tensor]]) -> None:
        """Convert a batch of model outputs; an image id seen before on this rank is skipped."""
        for image_id, output in zip(image_ids, outputs, strict=True):
            image_id = int(image_id)
            if image_id not in self._per_image:
                self._per_image[image_id] = self.convert(image_id, output)

    def evaluate(self) -> dict[str, float]:
        """Gather all ranks' results on rank 0, deduplicate by image id, score there and return the
        same metrics on every rank."""
        per_image = gather_per_image(self._per_image)  # {} on ranks other than 0
        self.results = [r for image_id in sorted(per_image) for r in per_image[image_id]]
        metrics, self.num_images = on_rank_zero(lambda: (self.score(per_image), len(per_image)))
        return metrics
