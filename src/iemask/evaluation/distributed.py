"""The collective steps every streaming evaluator shares: gather per-image results on rank 0, score once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_per_image(per_image: dict[int, Any]) -> dict[int, Any]:
    """Merge every rank's ``{image_id: results}`` on rank 0; an image seen by several ranks counts once.

    Only rank 0 receives the results (the other ranks get ``{}``), so one copy of them is held,
    as Detectron2 gathers to its main process. On one process this is the identity. The lowest
    rank's copy of a duplicated image wins, so a padded sampler cannot count an image twice.
    """
    if not is_distributed():
        return per_image
    is_main = dist.get_rank() == 0
    gathered: list[dict[int, Any] | None] | None = [None] * dist.get_world_size() if is_main else None
    dist.gather_object(per_image, gathered, dst=0)
    merged: dict[int, Any] = {}
    for rank_per_image in gathered or ():
        for image_id, results in rank_per_image.items():
            merged.setdefault(image_id, results)
    return merged


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
