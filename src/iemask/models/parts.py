"""The parts of a built detector: the one map that analysis, benchmarking, compilation and inspection read.

A part is a stable key (``backbone``, ``fpn``, ``bottom_up``, ``rpn``, ``box_head``, ``mask_head``), the
modules of torchvision's ``MaskRCNN`` it is made of, the module whose output is the part's output, and a
coarser group (the neck is the top-down pyramid plus the bottom-up path) used for timing shares and
``torch.compile``. Parts a model does not have (the baseline has no bottom-up path) are not listed for it,
and a part is labelled with the IEMask switches that change it (:mod:`iemask.models.switches`), so the
baseline's pyramid is shown as ``fpn`` and IEMask's as ``fpn (CEM, GIM)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from iemask.models.switches import SWITCHES


@dataclass(frozen=True)
class Part:
    """One part of the detector, named by module paths inside torchvision's ``MaskRCNN``."""

    key: str
    group: str  # backbone, neck, rpn, box_head or mask_head
    modules: tuple[str, ...]  # every module of the part (parameters, FLOPs and time add up over them)
    output: str  # the module whose forward output is the part's output
    compilable: bool = False  # torch.compile-able (fixed-rank tensors in, no torchvision box ops)


PARTS: tuple[Part, ...] = (
    Part("backbone", "backbone", ("backbone.body",), "backbone.body", compilable=True),
    Part("fpn", "neck", ("backbone.fpn",), "backbone.fpn", compilable=True),
    Part("bottom_up", "neck", ("backbone.bottom_up",), "backbone.bottom_up", compilable=True),
    Part("rpn", "rpn", ("rpn",), "rpn"),
    Part(
        "box_head",
        "box_head",
        ("roi_heads.box_roi_pool", "roi_heads.box_head", "roi_heads.box_predictor"),
        "roi_heads.box_head",
    ),
    Part(
        "mask_head",
        "mask_head",
        ("roi_heads.mask_roi_pool", "roi_heads.mask_head", "roi_heads.mask_predictor"),
        "roi_heads.mask_head",
        compilable=True,
    ),
)
GROUPS: tuple[str, ...] = tuple(dict.fromkeys(p.group for p in PARTS))
COMPILABLE: tuple[str, ...] = tuple(dict.fromkeys(p.group for p in PARTS if p.compilable))


def model_parts(model: nn.Module) -> tuple[Part, ...]:
    """The parts ``model`` has (its output module exists), in forward order."""
    names = {name for name, _ in model.named_modules()}
    return tuple(p for p in PARTS if p.output in names)


def part_label(model: nn.Module, part: Part) -> str:
    """``part.key`` followed by the headers of the switches that are on for it: ``fpn (CEM, GIM)``."""
    switches = getattr(model, "switches", {})
    on = [s.header for s in SWITCHES if s.part == part.key and switches.get(s.name)]
    return f"{part.key} ({', '.join(on)})" if on else part.key


def part_modules(model: nn.Module, part: Part) -> list[nn.Module]:
    """The modules of ``part`` present in ``model`` (pools and predictors may be absent in custom models)."""
    modules = dict(model.named_modules())
    return [modules[name] for name in part.modules if name in modules]


def group_modules(model: nn.Module, group: str) -> list[nn.Module]:
    """The output modules of the parts of ``group`` that ``model`` has (e.g. the neck: FPN and bottom-up path)."""
    if group not in GROUPS:
        raise ValueError(f"unknown part group {group!r}: the groups are {', '.join(GROUPS)}")
    modules = dict(model.named_modules())
    return [modules[p.output] for p in model_parts(model) if p.group == group]


def compile_parts(model: nn.Module, groups: Sequence[str], dynamic: bool = True) -> None:
    """``torch.compile`` the compilable parts of ``groups`` in place (``nn.Module.compile``: same state_dict keys)."""
    unknown = sorted(set(groups) - set(COMPILABLE))
    if unknown:
        raise ValueError(f"cannot compile {unknown}: choose from {COMPILABLE}")
    for group in groups:
        for module in group_modules(model, group):
            module.compile(dynamic=dynamic)
