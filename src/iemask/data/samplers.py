"""Samplers that shard by rank themselves (the Trainer runs with ``use_distributed_sampler=False``).

- :class:`TrainingSampler`: a seeded permutation per epoch, split evenly across ranks.
- :class:`InferenceSampler`: contiguous, exact shards: every image is evaluated exactly once
  (``DistributedSampler`` pads with duplicates, which inflates mAP).
- :class:`GroupedBatchSampler`: batches of images with the same aspect-ratio group
  (landscape or portrait), so padding to a common size wastes little.
- :class:`RepeatFactorTrainingSampler`: LVIS' repeat-factor sampling, images of rare categories
  repeated within an epoch.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch.utils.data import Sampler


class TrainingSampler(Sampler[int]):
    """Shuffled indices for one epoch on one rank; ``set_epoch`` reseeds (Lightning calls it).

    Every rank draws the same permutation (same seed and epoch) and takes every
    ``world_size``-th index; the permutation is wrapped so all ranks get equal counts.
    """

    def __init__(self, size: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1):
        if size <= 0:
            raise ValueError("TrainingSampler needs a non-empty dataset")
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.num_samples = math.ceil(size / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_indices(self) -> torch.Tensor:
        """The global order for the current epoch, before sharding."""
        if not self.shuffle:
            return torch.arange(self.size)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.size, generator=g)

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_indices()
        total = self.num_samples * self.world_size
        order = order.repeat(math.ceil(total / len(order)))[:total]
        yield from order[self.rank :: self.world_size].tolist()

    def __len__(self) -> int:
        return self.num_samples


class InferenceSampler(Sampler[int]):
    """Rank ``r`` of ``w`` gets the contiguous slice ``[r*n/w, (r+1)*n/w)``: no padding, no overlap."""

    def __init__(self, size: int, *, rank: int = 0, world_size: int = 1):
        shard = size // world_size
        extra = size % world_size
        self.begin = rank * shard + min(rank, extra)
        self.end = self.begin + shard + (1 if rank < extra else 0)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.begin, self.end))

    def __len__(self) -> int:
        return self.end - self.begin


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches whose images share a group id (Detectron2: aspect ratio ≥ 1 or < 1).

    Yields exactly ``len(sampler) // batch_size`` batches per epoch: full groups first, in
    sampler order; whatever is left at the end is mixed across groups to fill the last batches.
    """

    def __init__(self, sampler: Sampler[int], group_ids: Sequence[int], batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler, self.group_ids, self.batch_size = sampler, list(group_ids), batch_size

    def __iter__(self) -> Iterator[list[int]]:
        buckets: dict[int, list[int]] = {}
        emitted = 0
        for index in self.sampler:
            bucket = buckets.setdefault(self.group_ids[index], [])
            bucket.append(index)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()
                emitted += 1
        leftover = [i for bucket in buckets.values() for i in bucket]
        for start in range(0, (len(self) - emitted) * self.batch_size, self.batch_size):
            yield leftover[start : start + self.batch_size]

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size


def aspect_ratio_groups(aspect_ratios: Sequence[float]) -> list[int]:
    """Group 0 for landscape (w/h ≥ 1), 1 for portrait."""
    return [0 if r >= 1 else 1 for r in aspect_ratios]


class RepeatFactorTrainingSampler(TrainingSampler):
    """Detectron2's repeat-factor sampling for long-tailed data (LVIS), one finite epoch at a time.

    Image ``i`` appears ``repeat_factors[i]`` times per epoch on average: its integer part always,
    plus one more with probability equal to the fractional part (stochastic rounding). The epoch's
    list is shuffled, wrapped or cut to ``len(self) * world_size`` indices (Lightning needs a fixed
    length; the expected length ``round(sum(factors))`` is used) and dealt out to the ranks like
    :class:`TrainingSampler`'s. Every rank draws the same list from ``seed + epoch``.
    """

    def __init__(
        self, repeat_factors: Sequence[float] | torch.Tensor, *, seed: int = 0, rank: int = 0, world_size: int = 1
    ):
        factors = torch.as_tensor(repeat_factors, dtype=torch.float64)
        if factors.dim() != 1 or len(factors) == 0:
            raise ValueError("RepeatFactorTrainingSampler needs one repeat factor per image of a non-empty dataset")
        if (factors < 1).any():
            raise ValueError(f"repeat factors must be >= 1, got a minimum of {factors.min().item():.4g}")
        super().__init__(round(factors.sum().item()), seed=seed, rank=rank, world_size=world_size)
        self._int_part = factors.floor()
        self._frac_part = factors - self._int_part

    @staticmethod
    def repeat_factors(image_categories: Sequence[Iterable[int]], threshold: float = 0.001) -> torch.Tensor:
        """Per-image factors ``max(1, sqrt(threshold / f(c)))``, maximised over the image's categories ``c``.

        ``f(c)`` is the fraction of the images (one category set each) that contain ``c``; an image
        without categories gets 1. Detectron2's ``repeat_factors_from_category_frequency``.
        """
        category_sets = [set(categories) for categories in image_categories]
        image_counts = Counter(c for categories in category_sets for c in categories)
        category_factor = {
            c: max(1.0, math.sqrt(threshold / (count / len(category_sets)))) for c, count in image_counts.items()
        }
        return torch.tensor(
            [max((category_factor[c] for c in categories), default=1.0) for categories in category_sets],
            dtype=torch.float64,
        )

    def epoch_indices(self) -> torch.Tensor:
        """The current epoch's shuffled list of (repeated) image indices, before wrapping and sharding."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        rounded_up = torch.rand(len(self._frac_part), generator=g, dtype=torch.float64) < self._frac_part
        repeats = (self._int_part + rounded_up).long()  # (num_images,)
        indices = torch.repeat_interleave(torch.arange(len(repeats)), repeats)
        return indices[torch.randperm(len(indices), generator=g)]
