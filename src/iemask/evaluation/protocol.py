"""The evaluation protocols in one registry: ``get_protocol(name)`` for training, ``evaluate`` and the CLIs.

A :class:`~iemask.evaluation.base.Protocol` declares everything the rest of the project needs of a dataset's
evaluation: its metric names, the offline scorer, its streaming evaluator (built from the validation dataset),
its metric table and, where the dataset has one, the writer of its official result format. Each module of
this package that declares a ``PROTOCOL`` is registered under its name, so a dataset with a protocol of its
own adds ``evaluation/<name>.py`` and names the protocol in its data module's ``protocol`` attribute.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from pathlib import Path

from iemask.evaluation.base import Protocol
from iemask.evaluation.common import IOU_TYPES, GroundTruth, Results


def _find_protocols() -> dict[str, Protocol]:
    """The ``PROTOCOL`` of every module of :mod:`iemask.evaluation`, by name."""
    found = {}
    for info in pkgutil.iter_modules([str(Path(__file__).parent)], f"{__package__}."):
        protocol = getattr(importlib.import_module(info.name), "PROTOCOL", None)
        if isinstance(protocol, Protocol):
            if protocol.name in found:
                raise RuntimeError(f"two evaluation protocols are called {protocol.name!r}: rename one")
            found[protocol.name] = protocol
    return dict(sorted(found.items()))


PROTOCOLS: dict[str, Protocol] = _find_protocols()


def get_protocol(name: str) -> Protocol:
    """The registered protocol ``name``; a ValueError naming the known ones otherwise."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {name!r}; supported: {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


def evaluate(
    gt: GroundTruth,
    results: Results,
    protocol: str = "coco",
    iou_types: str | Iterable[str] = IOU_TYPES,
) -> dict[str, float]:
    """Score ``results`` against ``gt`` with a registered protocol.

    Args:
        gt: ground-truth json path, or the already-loaded dict (left unmodified); for
            ``"cityscapes"``, the dataset root (``gtFine/`` under it).
        results: results json path, or a list of result dicts (left unmodified); for
            ``"cityscapes"``, a folder of ``*_pred.txt`` files in the official format.
        protocol: a key of ``PROTOCOLS``.
        iou_types: any of ``"bbox"``, ``"segm"`` (Cityscapes scores ``"segm"`` only and needs it).

    Returns:
        Flat metric names such as ``"segm/AP"``, ``"bbox/AR100"`` mapped to values in [0, 1], or -1
        where undefined.
    """
    return get_protocol(protocol).score(gt, results, iou_types)
