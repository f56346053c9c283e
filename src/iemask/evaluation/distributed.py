"""The one collective step the streaming evaluators add to torchmetrics' sync: score on rank 0, tell every rank."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def on_rank_zero(compute: Callable[[], T]) -> T:
    """Run ``compute`` on rank 0 only (one copy of its memory and time) and give its result to every rank.

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
