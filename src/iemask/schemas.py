"""Typed config schemas: Hydra structured configs made from the signatures of what the configs build.

Every config group whose node is instantiated (``model``, ``data``, ``module``) or read field by field
(``schedule``, ``optimizer``) gets a dataclass in Hydra's ConfigStore, generated from the signature of
the callable it feeds, so the signature stays the one place that names each setting, its type and its
default. A group's YAML file extends its schema (``defaults: [schema, _self_]``) and carries only what
differs from the defaults; a misspelt key or a value of the wrong type then fails when the config is
composed, naming the key (``python -m iemask.train model.neck_chanels=64``).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import importlib
import inspect
import pkgutil
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

_PRIMITIVES = (bool, int, float, str)
_SEQUENCES = (list, tuple, collections.abc.Sequence, collections.abc.Iterable)


def config_type(annotation: Any) -> Any:
    """The nearest type OmegaConf can check for a Python annotation (``Any`` where it has none).

    ``X | None`` → ``Optional[X]``; sequences → ``list``; paths → ``str``; a dataclass → its
    :func:`dataclass_schema` (instantiated into the dataclass); mappings and other types → ``Any``.
    """
    if annotation in _PRIMITIVES:
        return annotation
    if annotation is Path:
        return str
    if dataclasses.is_dataclass(annotation):
        return dataclass_schema(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        present = [a for a in args if a is not type(None)]
        inner = config_type(present[0]) if len(present) == 1 else (str if set(present) <= {str, Path} else Any)
        return Optional[inner] if len(present) < len(args) and inner is not Any else inner  # noqa: UP045 (OmegaConf)
    if origin in _SEQUENCES:
        element = [a for a in args if a is not Ellipsis]
        inner = config_type(element[0]) if len(set(element)) == 1 else Any
        return list[inner if inner in _PRIMITIVES else Any]
    return Any  # mappings too: they hold sub-configs, often by interpolation (module.model: ${model})


def _field(name: str, annotation: Any, default: Any) -> tuple[str, Any, Any]:
    if default is inspect.Parameter.empty:
        return name, annotation, dataclasses.field(default=MISSING)
    if isinstance(default, (list, tuple)):
        return name, annotation, dataclasses.field(default_factory=lambda value=list(default): list(value))
    if isinstance(default, collections.abc.Mapping):
        return name, annotation, dataclasses.field(default_factory=lambda value=dict(default): dict(value))
    if dataclasses.is_dataclass(default):
        values = {f.name: getattr(default, f.name) for f in dataclasses.fields(default)}
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        return name, annotation, dataclasses.field(default_factory=lambda: annotation(**values))
    return name, annotation, dataclasses.field(default=default)


def signature_fields(
    fn: Callable[..., Any], skip: Iterable[str] = (), required: bool = True
) -> list[tuple[str, Any, Any]]:
    """Dataclass fields ``(name, type, field)`` for the named parameters of ``fn``.

    Annotated parameters get their annotation's :func:`config_type`; unannotated ones (torchvision's)
    are kept only when their default is a bool, int, float or string, typed by it — the others take
    objects (modules, anchor generators) that a config cannot hold. ``self``, ``*args``, ``**kwargs``,
    private (``_``) and ``skip`` names are left out, and so are parameters without a default unless
    ``required`` (they become mandatory, ``???``, fields).
    """
    hints = typing.get_type_hints(fn)
    fields = []
    for name, parameter in inspect.signature(fn).parameters.items():
        if name == "self" or name.startswith("_") or name in skip:
            continue
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.default is parameter.empty and not required:
            continue
        if name in hints:
            annotation = config_type(hints[name])
        elif isinstance(parameter.default, _PRIMITIVES):
            annotation = type(parameter.default)
        else:
            continue
        fields.append(_field(name, annotation, parameter.default))
    return fields


def make_schema(
    name: str,
    sources: Iterable[Callable[..., Any]],
    target: str | None = None,
    skip: Iterable[str] = (),
    building: int = 1,
) -> type:
    """A dataclass with a field per parameter of ``sources``, plus ``_target_`` when the node is instantiated.

    The first ``building`` sources are what the node builds (a data module and the base class its
    ``**kwargs`` go to): their parameters without a default are mandatory (``???``) fields. Later ones are
    what it passes keyword arguments on to (torchvision's detector): only their parameters with a default
    are taken. The first source that names a parameter gives its type and default.
    """
    fields: dict[str, tuple[str, Any, Any]] = {}
    if target is not None:
        fields["_target_"] = ("_target_", str, dataclasses.field(default=target))
    for index, source in enumerate(sources):
        for field in signature_fields(source, skip, required=index < building):
            fields.setdefault(field[0], field)
    return dataclasses.make_dataclass(name, list(fields.values()))


@functools.cache
def dataclass_schema(cls: type) -> type:
    """The schema of a dataclass a config builds (``ShapesSpec``): its fields, and ``_target_`` naming it."""
    return make_schema(f"{cls.__name__}Config", [cls], target=f"{cls.__module__}.{cls.__qualname__}")


def changes_schema(cls: type) -> type:
    """Changes to a dataclass's settings (``model.tta.*`` for a checkpoint): each field, typed, ``null`` by
    default, meaning "keep the value the object has" (a misspelt key still fails when composed)."""
    fields = []
    for field in dataclasses.fields(make_schema(cls.__name__, [cls])):
        optional = field.type if field.type is Any else Optional[field.type]  # noqa: UP045 (OmegaConf)
        fields.append((field.name, optional, dataclasses.field(default=None)))
    return dataclasses.make_dataclass(f"{cls.__name__}Changes", fields)


def data_module_classes() -> list[type]:
    """Every data module of :mod:`iemask.data` (one per dataset module; they all extend ``DetectionDataModule``)."""
    import iemask.data
    from iemask.data.base import DetectionDataModule

    for module in pkgutil.iter_modules(iemask.data.__path__, "iemask.data."):
        importlib.import_module(module.name)
    found, stack = [], [DetectionDataModule]
    while stack:
        for subclass in stack.pop().__subclasses__():
            if subclass.__module__.startswith("iemask.data."):
                found.append(subclass)
                stack.append(subclass)
    return sorted(found, key=lambda c: c.__name__)


def schemas() -> dict[tuple[str, str], type]:
    """``(group, name) -> schema`` for every typed group option.

    ``model/schema``: :func:`~iemask.models.build_model` with torchvision's keywords; ``data/<DataModule>``
    per data module: its own arguments and ``DetectionDataModule``'s (which its ``**kwargs`` go to);
    ``module/schema``: the LightningModule's; ``schema/schedule`` and ``schema/optimizer``: the training
    config's ``schedule`` (:class:`~iemask.training.optim.Schedule`) and ``optimizer``
    (:func:`~iemask.training.optim.build_sgd` but the model and the rate, which the schedule gives);
    ``schema/tta_changes``: eval's and predict's ``model.tta`` (:func:`changes_schema` of the TTA settings).
    """
    from iemask.data.base import DetectionDataModule
    from iemask.lit_module import InstanceSegmentationModule
    from iemask.models.builder import build_model, detector_parameters
    from iemask.models.tta import TTASettings
    from iemask.training.optim import Schedule, build_sgd

    found = {
        ("model", "schema"): make_schema(
            "ModelConfig", [build_model, *detector_parameters()], target="iemask.models.build_model"
        ),
        ("module", "schema"): make_schema(
            "ModuleConfig", [InstanceSegmentationModule.__init__], target="iemask.lit_module.InstanceSegmentationModule"
        ),
        ("schema", "schedule"): make_schema("ScheduleConfig", [Schedule]),
        ("schema", "optimizer"): make_schema("OptimizerConfig", [build_sgd], skip=("model", "lr")),
        ("schema", "tta_changes"): changes_schema(TTASettings),
    }
    for cls in data_module_classes():
        found["data", cls.__name__] = make_schema(
            f"{cls.__name__}Config",
            [cls.__init__, DetectionDataModule.__init__],
            target=f"{cls.__module__}.{cls.__name__}",
            building=2,
        )
    return found


def baseline_preset() -> dict[str, Any]:
    """``model=mask_rcnn``: the ``iemask`` preset with every switch of the registry off, which is
    torchvision's Mask R-CNN exactly (docs/method.md §4); made here so that a new switch is off in it too."""
    from iemask.models.switches import SWITCH_NAMES

    return {"defaults": ["iemask", "_self_"], **dict.fromkeys(SWITCH_NAMES, False)}


def register_schemas() -> None:
    """Store the schemas (and the baseline preset) in Hydra's ConfigStore (idempotent), before any config is
    composed."""
    store = ConfigStore.instance()
    for (group, name), schema in schemas().items():
        store.store(group=group, name=name, node=schema)
    store.store(group="model", name="mask_rcnn", node=baseline_preset())
