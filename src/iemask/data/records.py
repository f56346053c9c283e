"""Per-image records kept as bytes in numpy arrays, shared by forked data-loader workers without copies.

A data set held as Python dicts costs several times its json in memory, and every read of an object writes
its reference count: each forked data-loader worker slowly copies every page it reads ("copy-on-read"), until
each holds a private copy. A numpy array is one object whatever its size, so its buffer is never written by a
read. :class:`SerializedList` pickles each record into one ``uint8`` buffer plus an ``int64`` offset array,
as Detectron2's ``NumpySerializedList`` does; a record is unpickled (a fresh copy) when it is read.
"""

from __future__ import annotations

import ctypes
import pickle
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


class SerializedList(Sequence[T]):
    """A read-only list of picklable records stored as one byte buffer; ``list[i]`` unpickles record ``i``.

    The instance holds two numpy arrays and nothing else: the pickled records end to end and where each ends.
    """

    def __init__(self, records: Iterable[T]) -> None:
        chunks = [np.frombuffer(pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8) for r in records]
        self._ends = np.cumsum([len(c) for c in chunks], dtype=np.int64)  # (N,) end offset of each record
        self._buffer = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint8)  # (total bytes,)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> T:  # type: ignore[override]  # no slices: one record at a time
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} of a list of {len(self)}")
        index %= len(self)
        start = int(self._ends[index - 1]) if index else 0
        return pickle.loads(self._buffer[start : self._ends[index]].data)  # from a view: the buffer is not copied

    @property
    def nbytes(self) -> int:
        """Bytes held: the buffer and the offsets."""
        return self._buffer.nbytes + self._ends.nbytes


def sorted_position(keys: np.ndarray, key: Any) -> int:
    """Where ``key`` is in the sorted 1-d integer array ``keys``; :class:`KeyError` if it is not there."""
    if isinstance(key, bool) or not isinstance(key, int | np.integer):
        raise KeyError(key)
    position = int(np.searchsorted(keys, key))
    if position == len(keys) or keys[position] != key:
        raise KeyError(key)
    return position


class RecordView(Mapping[int, T]):
    """A read-only ``id -> record`` mapping over sorted integer ids; ``record(position)`` builds each value.

    Lookups build a fresh value every time (nothing is cached, so nothing grows), and edits to it are not kept.
    """

    def __init__(self, keys: np.ndarray, record: Callable[[int], T]) -> None:
        self._keys, self._record = keys, record  # keys: (N,) sorted int64

    def __getitem__(self, key: int) -> T:
        return self._record(sorted_position(self._keys, key))

    def __iter__(self) -> Iterator[int]:
        return iter(self._keys.tolist())

    def __len__(self) -> int:
        return len(self._keys)


def release_freed_memory() -> None:
    """Return the heap memory freed since (a parsed json, say) to the OS; glibc only (Linux), else nothing.

    glibc keeps freed small blocks for reuse: after a large json is parsed and dropped, the process would keep
    about twice the json's size resident, and forked data-loader workers would copy those pages as soon as
    their allocator reuses them. ``malloc_trim(0)`` hands every free page back.
    """
    if sys.platform.startswith("linux"):
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # absent from other C libraries (musl)
        if trim is not None:
            trim(0)
