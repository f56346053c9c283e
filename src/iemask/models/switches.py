"""The IEMask switches: the one list that the builder, config checks, run names, reports and tests read.

Each switch turns one of the method's modules on (docs/method.md §4). A switch is described once here:
its config key (also the :func:`~iemask.models.build_model` argument), the letter it adds to run names,
its column header in ablation tables, the model part it changes (a key of
:data:`iemask.models.parts.PARTS`), and the switches it cannot work without.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Switch:
    """One IEMask module that can be turned on or off."""

    name: str  # config key and build_model argument
    letter: str  # in run names: iemask-CGBAH-resnet50
    header: str  # ablation-table column
    part: str  # the model part it changes (iemask.models.parts)
    description: str
    requires: tuple[str, ...] = ()  # switches that must be on with this one


SWITCHES: tuple[Switch, ...] = (
    Switch("cem", "C", "CEM", "fpn", "channel enhancement of C3..C5 before the FPN's lateral convs"),
    Switch("gim", "G", "GIM", "fpn", "global information from C5 added to the top pyramid level"),
    Switch("bottom_up", "B", "BU", "bottom_up", "the bottom-up path N2..N6 after the top-down pyramid"),
    Switch("aff", "A", "AFF", "bottom_up", "adaptive feature fusion in the bottom-up path", requires=("bottom_up",)),
    Switch("encdec_head", "H", "EDH", "mask_head", "the encoding-decoding mask head on 28×28 RoIs"),
)
SWITCH_NAMES: tuple[str, ...] = tuple(s.name for s in SWITCHES)
_BY_NAME = {s.name: s for s in SWITCHES}


def get_switch(name: str) -> Switch:
    """The switch called ``name``; a ``KeyError`` naming the known ones otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown switch {name!r}: the switches are {', '.join(SWITCH_NAMES)}") from None


def switch_values(config: Mapping[str, Any], default: bool = False) -> dict[str, bool]:
    """The switches of a model config (or any mapping holding them), in registry order.

    Other keys (``backbone``, ``_target_``...) are ignored; a switch missing from ``config`` is ``default``.
    """
    return {name: bool(config.get(name, default)) for name in SWITCH_NAMES}


def switch_conflict(values: Mapping[str, Any]) -> str | None:
    """Why a switch combination cannot be built (a switch on without one it requires), or ``None``."""
    for switch in SWITCHES:
        if not values.get(switch.name):
            continue
        for needed in switch.requires:
            if not values.get(needed):
                return (
                    f"{switch.name}=true needs {needed}=true ({switch.header} {switch.description} needs "
                    f"{get_switch(needed).header}); set model.{needed}=true or model.{switch.name}=false"
                )
    return None


def check_switches(values: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` on a combination :func:`switch_conflict` rejects."""
    reason = switch_conflict(values)
    if reason:
        raise ValueError(reason)


def switch_letters(values: Mapping[str, Any]) -> str:
    """The letters of the switches that are on, in registry order (``CGBAH`` with all five)."""
    return "".join(s.letter for s in SWITCHES if values.get(s.name))
