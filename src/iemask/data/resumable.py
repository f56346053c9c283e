"""A training pipeline that resumes exactly: the position in the epoch and every augmentation draw.

Three pieces, each small:

- :class:`ResumableBatchSampler` wraps a batch sampler (grouped or plain) whose index sampler has
  ``epoch``/``rank`` (:class:`~iemask.data.samplers.TrainingSampler`). It turns every index into a
  key ``(index, seed)``, where ``seed`` is derived from the run's seed, the rank, the epoch and the
  sample's position in the epoch, and it can start its next epoch part-way (``start_at``).
- :class:`SeededDataset` applies the dataset's transforms under that seed on a private copy of
  torch's CPU generator state, so an item depends on its key alone: not on the worker that loads
  it, the number of workers, or what was loaded before.
- :class:`ResumableDataLoader` is a ``DataLoader`` with ``state_dict``/``load_state_dict``, which
  Lightning saves in every checkpoint and restores before the first batch of a resumed run
  (its stateful-dataloader interface), so a resumed run draws the same batches as an
  uninterrupted one from the next step on.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from iemask.utils.seeding import derive_seed

SampleKey = tuple[int, int]  # (dataset index, augmentation seed)


class ResumableBatchSampler(Sampler[list[SampleKey]]):
    """Batches of ``(index, seed)`` keys from ``batch_sampler``; the next epoch can start at a given batch.

    Args:
        batch_sampler: yields lists of dataset indices; its ``sampler`` has ``epoch``, ``rank`` and
            ``set_epoch`` (Lightning finds it as ``batch_sampler.sampler`` and sets the epoch).
        seed: the run's data seed, mixed into every sample's augmentation seed.
    """

    def __init__(self, batch_sampler: Sampler[list[int]], seed: int):
        self.batch_sampler = batch_sampler
        self.sampler = batch_sampler.sampler
        self.seed = seed
        self._resume: tuple[int, int] | None = None  # (epoch, batches to skip in it)

    def start_at(self, epoch: int, batch: int) -> None:
        """Set the epoch, and make its iteration skip its first ``batch`` batches (a resume)."""
        self.sampler.set_epoch(epoch)
        self._resume = (epoch, batch)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        # Read the epoch and the start now, not lazily: a DataLoader with workers draws its first
        # batches as soon as it makes its iterator (and it calls iter() twice while doing so, so the
        # resume point holds for the whole epoch it belongs to).
        epoch, rank = self.sampler.epoch, self.sampler.rank
        if self._resume is not None and self._resume[0] != epoch:
            self._resume = None
        start = self._resume[1] if self._resume is not None else 0
        batches = itertools.islice(iter(self.batch_sampler), start, None)
        return (
            [(index, derive_seed(self.seed, rank, epoch, b, slot)) for slot, index in enumerate(batch)]
            for b, batch in enumerate(batches, start)
        )

    def __len__(self) -> int:
        return len(self.batch_sampler)


class SeededDataset(Dataset):
    """Items of ``dataset`` addressed by ``(index, seed)`` keys; random transforms draw from ``seed``.

    torch's CPU generator is seeded for the item and restored afterwards (``fork_rng``), so the
    training process's own random stream is untouched when loading runs in it (no workers).
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        assert isinstance(self.dataset, Sized)
        return len(self.dataset)

    def __getitem__(self, key: SampleKey) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableBatchSampler` whose position Lightning checkpoints.

    Args:
        batches_done: how many batches of the current epoch the trainer has consumed (not merely
            loaded: workers and Lightning's fetcher load ahead); read when a checkpoint is saved.
        *args, **kwargs: ``DataLoader`` arguments; ``batch_sampler`` must be a ``ResumableBatchSampler``.
    """

    def __init__(self, *args: Any, batches_done: Callable[[], int], **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(self.batch_sampler, ResumableBatchSampler):
            raise TypeError("ResumableDataLoader needs a ResumableBatchSampler as batch_sampler")
        self._batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.batch_sampler.sampler.epoch), "batches_done": int(self._batches_done())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        if done >= len(self.batch_sampler):  # saved on the epoch's last batch: the next epoch is next
            epoch, done = epoch + 1, 0
        self.batch_sampler.start_at(epoch, done)
