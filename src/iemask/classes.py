"""Checking that a checkpoint's classes are those of the data it is evaluated on or predicts for.

A detector predicts labels 1..K; what label k means is stored in its checkpoint (``class_names``,
``category_ids``). Scored against a dataset with other classes, or written out with another dataset's
category ids, its results look valid and mean nothing, so ``iemask.eval`` and ``iemask.predict``
compare the two first and refuse a mismatch unless run with ``check_classes=false``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from iemask.data.base import DatasetError, load_json, require_file

log = logging.getLogger(__name__)

SHOWN = 5  # names shown before "..." in messages


class ClassMismatchError(ValueError):
    """A checkpoint's classes are not the dataset's; the message shows both and how to override."""


def model_num_classes(model: nn.Module) -> int:
    """Foreground classes a torchvision Mask R-CNN predicts (its box classifier has one more: background)."""
    return model.roi_heads.box_predictor.cls_score.out_features - 1


def describe_classes(names: Sequence[str] | None) -> str:
    """``"3 classes [circle, square, triangle]"``, ``"80 classes [person, bicycle, ...]"`` (first ``SHOWN``)."""
    if names is None:
        return "no class names"
    shown = ", ".join(map(str, names[:SHOWN])) + (", ..." if len(names) > SHOWN else "")
    return f"{len(names)} class{'' if len(names) == 1 else 'es'} [{shown}]"


def _ids(ids: Sequence[int] | None) -> str:
    if ids is None:
        return "none"
    return "[" + ", ".join(map(str, ids[:SHOWN])) + (", ...]" if len(ids) > SHOWN else "]")


def _refuse_or_warn(message: str, advice: str, anyway: str, enforce: bool) -> None:
    """Raise ``message`` with what to do, or (overridden) log it with what happens instead."""
    if enforce:
        raise ClassMismatchError(f"{message}. {advice}, or set check_classes=false to run anyway ({anyway})")
    log.warning("%s; running anyway because check_classes=false: %s", message, anyway)


def check_classes(
    num_model_classes: int,
    checkpoint_names: Sequence[str] | None,
    checkpoint_ids: Sequence[int] | None,
    dataset_names: Sequence[str],
    dataset_ids: Sequence[int],
    *,
    checkpoint: str | Path,
    dataset: str | Path,
    enforce: bool = True,
) -> None:
    """Refuse (or, with ``enforce=False``, warn about) a checkpoint whose classes are not the dataset's.

    Names and category ids are compared in order (label k is the k-th category by id). A model that
    predicts another number of classes than the dataset has is refused even with ``enforce=False``:
    its labels cannot be mapped onto the dataset's categories at all.
    """
    trained = "carries" if checkpoint_names is None else "was trained on"
    message = f"{checkpoint} {trained} {describe_classes(checkpoint_names)} but {dataset} has "
    message += describe_classes(list(dataset_names))
    if num_model_classes != len(dataset_ids):
        raise ClassMismatchError(
            f"{message}; its model predicts {num_model_classes} classes, which cannot be mapped onto "
            f"{len(dataset_ids)} categories (check_classes=false cannot help). Use a checkpoint trained on this "
            "dataset's classes"
        )
    names_match = checkpoint_names is not None and list(checkpoint_names) == list(dataset_names)
    ids_match = checkpoint_ids is None or list(checkpoint_ids) == list(dataset_ids)
    if names_match and ids_match:
        return
    if names_match:
        message += f" (same names, other category ids: {_ids(checkpoint_ids)} vs {_ids(dataset_ids)})"
    _refuse_or_warn(
        message,
        "Use a checkpoint trained on this dataset's classes",
        "the model's label k is read as the dataset's k-th category by id",
        enforce,
    )


def checkpoint_classes(
    num_model_classes: int,
    names: Sequence[str] | None,
    ids: Sequence[int] | None,
    *,
    checkpoint: str | Path,
    enforce: bool = True,
) -> tuple[list[str] | None, list[int]]:
    """The checkpoint's own class names and category ids, checked against the model's number of classes.

    A checkpoint without names, or with another number of them than its model has classes, is refused;
    with ``enforce=False`` it is used anyway, with numbers for names and ids 1..K.
    """
    if names is not None and len(names) == num_model_classes and (ids is None or len(ids) == num_model_classes):
        return list(names), list(ids) if ids is not None else list(range(1, num_model_classes + 1))
    _refuse_or_warn(
        f"{checkpoint} carries {describe_classes(names)} and category ids {_ids(ids)}, but its model predicts "
        f"{num_model_classes} classes",
        "Use a checkpoint written by iemask.train (it stores its classes)",
        f"classes are numbered 1..{num_model_classes}, as category ids and names",
        enforce,
    )
    return None, list(range(1, num_model_classes + 1))


def dataset_classes(annotation_file: str | Path) -> tuple[list[str], list[int]]:
    """Class names and category ids of a COCO annotation json, in category-id order (label k = k-th id)."""
    path = require_file(Path(annotation_file), "categories file", "Give a COCO annotation json (categories=...).")
    categories = load_json(path).get("categories")
    if not isinstance(categories, list) or not categories:
        raise DatasetError(f"{path} has no 'categories' list: give a COCO annotation json (categories=...)")
    categories = sorted(categories, key=lambda c: c["id"])
    return [c["name"] for c in categories], [c["id"] for c in categories]
