"""Run folders: the Hydra + DDP relaunch fix, instantiation of lists, atomic metric files."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, read_write


def prepare_ddp_relaunch() -> None:
    """Make Lightning's per-GPU relaunch of this script land in this job's run folder.

    Lightning's DDP launcher restarts ``sys.argv`` once per extra local GPU, adding
    ``hydra.run.dir=<this run's dir>``. In a single run that is this job's folder already. In a
    multirun, ``sys.argv`` holds the whole sweep (``-m a=1,2``) and ``run.dir`` is not the job's
    folder, so each child would start the sweep again in another folder. Here the command line
    becomes this job's own overrides and ``run.dir`` its output folder: one folder per job.
    """
    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return
    with read_write(hc.run):
        hc.run.dir = hc.runtime.output_dir
    sys.argv = [sys.argv[0], *hc.overrides.task]


def instantiate_all(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a group mapping (callbacks, loggers); ``null`` entries, and
    factories that return ``None`` (e.g. a disabled logger), are left out."""
    if not cfg:
        return []
    objects = (hydra.utils.instantiate(v) for v in cfg.values() if v is not None and "_target_" in v)
    return [o for o in objects if o is not None]


def write_json_atomic(path: str | Path, data: Mapping[str, Any] | list[Any], indent: int | None = 2) -> Path:
    """Write ``data`` (a mapping, keys sorted, or a list) as json next to ``path`` then rename it into
    place (no partial files); ``indent=None`` writes it compactly (long result lists)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    plain = dict(data) if isinstance(data, Mapping) else data
    tmp.write_text(json.dumps(plain, indent=indent, sort_keys=isinstance(data, Mapping)))
    os.replace(tmp, path)
    return path
