"""Samplers that shard by rank themselves (the Trainer runs with ``use_distributed_sampler=False``).

- :class:`TrainingSampler`: a seeded permutation per epoch, split evenly across ranks.
- :class:`InferenceSampler`: contiguous, exact shards: every image is evaluated exactly once
  (``DistributedSampler`` pads with duplicates, which inflates mAP).
- :class:`GroupedBatchSampler`: batches of images with the same aspect-ratio group
  (landscape or portrait), so padding to a common size wastes little.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

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
