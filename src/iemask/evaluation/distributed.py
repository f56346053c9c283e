"""The collective steps every streaming evaluator shares: gather each rank's results on rank 0, score once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_to_rank_zero(obj: T) -> list[T] | None:
    """Every rank's ``obj`` on rank 0, in rank order, in one ``gather_object``; ``None`` on the other ranks.

    Only rank 0 receives them, so one copy is held, as Detectron2 gathers to its main process. On one
    process this is ``[obj]``.
    """
    if not is_distributed():
        return [obj]
    gathered: list[T | None] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def on_rank_zero(compute: Callable[[], T]) -> T:
    """Run ``compute`` on rank 0 only (one copy of its memory) and give its result to every rank.

    An exception on rank 0 is sent to the other ranks and raised there too, so that no rank
    waits forever on a broadcast that never comes.
    """
    if not is_distributed():
        return compute()
    outcome: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            outcome[0] = compute()
        except Exception as error:
            outcome[0] = error
    dist.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]
