"""Check a composed training config before anything is built, naming the key that is wrong.

Without this, ``data.batch_size=abc`` surfaces as a TypeError inside the sampler after the model
is built, and a zero learning rate trains nothing. :func:`validate_train_config` reports every
bad value at once, each as ``key=value: expected ...``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from iemask.callbacks import NONFINITE_ACTIONS

_ABSENT = object()


class ConfigError(ValueError):
    """A config value of the wrong type or out of range; the message names the full key."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def _optional_positive_int(value: Any) -> bool:
    return value is None or _positive_int(value)


def _devices(value: Any) -> bool:
    """What Lightning takes: ``auto``, a count (``-1``: all), a list of indices, or those as a string ("0,1")."""
    if isinstance(value, str) and value != "auto":
        try:
            value = [int(p) for p in value.split(",") if p.strip()] if "," in value else int(value)
        except ValueError:
            return False
    if isinstance(value, Sequence) and not isinstance(value, str):
        return bool(value) and all(_is_int(v) and v >= 0 for v in value) and len(set(value)) == len(value)
    return value == "auto" or (_is_int(value) and (value > 0 or value == -1))


@dataclass(frozen=True)
class _Rule:
    key: str
    expected: str
    check: Callable[[Any], bool]
    required: bool = True  # an absent optional key is fine


_RULES = (
    _Rule("data.num_classes", "null (read from the annotation files) or a positive integer", _optional_positive_int),
    _Rule("data.batch_size", "a positive integer (images per device)", _positive_int),
    _Rule("data.eval_batch_size", "a positive integer (images per device)", _positive_int),
    _Rule("data.num_workers", "an integer >= 0", lambda v: _is_int(v) and v >= 0),
    _Rule("schedule.reference_batch_size", "a positive integer", _positive_int),
    _Rule("schedule.base_lr", "a positive number", lambda v: _is_number(v) and v > 0),
    _Rule("schedule.max_iters", "a positive integer", _positive_int),
    _Rule("schedule.warmup_iters", "an integer >= 0", lambda v: _is_int(v) and v >= 0),
    _Rule("schedule.warmup_factor", "a number in (0, 1]", lambda v: _is_number(v) and 0 < v <= 1),
    _Rule("schedule.gamma", "a positive number", lambda v: _is_number(v) and v > 0),
    _Rule("schedule.eval_period", "null or a positive integer", _optional_positive_int),
    _Rule("schedule.checkpoint_period", "null or a positive integer", _optional_positive_int, required=False),
    _Rule("optimizer.momentum", "a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
    _Rule("optimizer.weight_decay", "a number >= 0", lambda v: _is_number(v) and v >= 0),
    _Rule("optimizer.weight_decay_norm", "a number >= 0", lambda v: _is_number(v) and v >= 0, required=False),
    _Rule("optimizer.weight_decay_bias", "a number >= 0", lambda v: _is_number(v) and v >= 0, required=False),
    _Rule("trainer.devices", "auto, a positive count, -1 (all), or a list of device indices", _devices),
    _Rule("trainer.num_nodes", "a positive integer", _positive_int),
    _Rule("trainer.accumulate_grad_batches", "a positive integer", _positive_int, required=False),
    _Rule(
        "callbacks.nonfinite_loss.action",
        " or ".join(NONFINITE_ACTIONS),
        lambda v: v in NONFINITE_ACTIONS,
        required=False,
    ),
    _Rule("callbacks.nonfinite_loss.check_every", "a positive integer", _positive_int, required=False),
)


def validate_train_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every bad or missing training setting, each by its full key."""
    problems = []
    for rule in _RULES:
        value, problem = _read(cfg, rule.key)
        if problem is None and value is _ABSENT and rule.required:
            problem = f"{rule.key} is missing: add it to the config ({rule.expected})"
        elif problem is None and value is not _ABSENT and not rule.check(value):
            problem = f"{rule.key}={value!r}: expected {rule.expected}"
        if problem:
            problems.append(problem)
    steps, problem = _read(cfg, "schedule.steps")
    problems += [problem] if problem else _check_steps(steps)
    if problems:
        raise ConfigError("invalid training config:\n  " + "\n  ".join(problems))


def _read(cfg: DictConfig, key: str) -> tuple[Any, str | None]:
    """The value at ``key`` (``_ABSENT`` if the key does not exist), or why it cannot be read."""
    try:
        return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True), None
    except MissingMandatoryValue:
        return _ABSENT, f"{key} is not set (???): set {key}=<value>"
    except OmegaConfBaseException as err:  # e.g. an interpolation that does not resolve
        return _ABSENT, f"{key} cannot be read: {err}"


def _check_steps(steps: Any) -> list[str]:
    """``schedule.steps``: increasing positive integers.

    Steps at or beyond ``schedule.max_iters`` are allowed: a shortened run keeps the schedule's
    shape and those decays just never happen (``Schedule`` warns), as in Detectron2.
    """
    expected = "a list of increasing positive integers"
    if steps is _ABSENT:
        return [f"schedule.steps is missing: add it to the config ({expected}; [] for a constant rate)"]
    plain = OmegaConf.to_container(steps) if isinstance(steps, ListConfig) else steps
    if not isinstance(plain, list) or not all(_positive_int(s) for s in plain):
        return [f"schedule.steps={plain!r}: expected {expected}"]
    if any(b <= a for a, b in itertools.pairwise(plain)):
        return [f"schedule.steps={plain!r}: expected {expected} (these are not increasing)"]
    return []
