"""Weights & Biases logging that works everywhere: online with a key and a network, else offline.

``wandb_logger`` is what ``logger=wandb`` instantiates. It names runs after the switches that
are on, groups the runs of one Hydra sweep, and falls back to offline mode (saying so once)
when there is no API key or no route to the server; ``mode=disabled`` turns W&B off.
"""

from __future__ import annotations

import hashlib
import logging
import netrc
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import WandbLogger

from iemask.models.switches import switch_letters, switch_values

log = logging.getLogger(__name__)

MODES = ("auto", "online", "offline", "disabled")


def run_name(switches: Mapping[str, Any], backbone: str, variant: str = "paper") -> str:
    """``mask_rcnn-resnet50`` with every switch off, else e.g. ``iemask-CBAH-resnet50``.

    The authors' released modules (``model.variant=official``) add ``-official``: ``iemask-CBAH-resnet50-official``.
    """
    on = switch_letters(switches)
    name = f"iemask-{on}-{backbone}" if on else f"mask_rcnn-{backbone}"
    return f"{name}-{variant}" if variant != "paper" else name


def _host() -> str:
    return urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"


def has_api_key() -> bool:
    """A key in ``WANDB_API_KEY`` or in the netrc file that ``wandb login`` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(_host()) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def can_reach_server(timeout: float = 2.0) -> bool:
    """Whether a TCP connection to the W&B server opens within ``timeout`` seconds."""
    try:
        with socket.create_connection((_host(), 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_mode(mode: str) -> str:
    """``auto`` → ``online`` with a key and a network, else ``offline``; ``WANDB_MODE`` wins if set."""
    if mode not in MODES:
        raise ValueError(f"logger.wandb.mode must be one of {MODES}, got {mode!r}")
    env = os.environ.get("WANDB_MODE")
    if mode == "auto" and env:
        return "offline" if env == "dryrun" else env
    if mode != "auto":
        return mode
    if not has_api_key():
        log.warning(
            "W&B: no API key found (WANDB_API_KEY or `wandb login`); logging offline. Upload later with `wandb sync`."
        )
        return "offline"
    if not can_reach_server():
        log.warning("W&B: %s is unreachable; logging offline. Upload later with `wandb sync`.", _host())
        return "offline"
    return "online"


def sweep_group() -> str | None:
    """The Hydra sweep folder's name inside a multirun (one W&B group per sweep), else ``None``."""
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None


def wandb_logger(
    model: Mapping[str, Any],
    project: str = "iemask",
    save_dir: str = ".",
    mode: str = "auto",
    name: str | None = None,
    group: str | None = None,
    log_model: bool | str = False,
    tags: list[str] | None = None,
    **kwargs: Any,
) -> WandbLogger | None:
    """A Lightning ``WandbLogger`` (``None`` when ``mode=disabled``).

    Args:
        model: the model config (its switches, backbone and variant name the run and tag it).
        project, save_dir: W&B project and the folder the run's files go to (the run folder).
        mode: ``auto`` (see :func:`resolve_mode`), ``online``, ``offline`` or ``disabled``.
        name, group: override the run name and the sweep group.
        log_model: upload checkpoints as artifacts (``True``: the best/last at the end; ``"all"``).
    """
    mode = resolve_mode(mode)
    if mode == "disabled":
        return None
    switches, backbone, variant = switch_values(model), str(model["backbone"]), str(model.get("variant", "paper"))
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    # One W&B run per run folder: a run resumed into its folder continues its W&B history.
    kwargs.setdefault("id", hashlib.sha1(str(Path(save_dir).resolve()).encode()).hexdigest()[:16])
    kwargs.setdefault("resume", "allow")
    return WandbLogger(
        name=name or run_name(switches, backbone, variant),
        project=project,
        save_dir=save_dir,
        offline=mode == "offline",
        group=group or sweep_group(),
        log_model=log_model,
        tags=[*(tags or []), backbone, variant, *(k for k, on in switches.items() if on)],
        **kwargs,
    )


def finish_loggers(loggers: list[Any], succeeded: bool = True) -> None:
    """Close W&B runs (writing their summary; offline runs become complete for ``wandb sync``)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish(exit_code=0 if succeeded else 1)
