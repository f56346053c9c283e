"""Where the Hydra configs live and how entry points compose them."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[3] / "conf"

if not CONFIG_DIR.is_dir():  # an installed wheel without the repository beside it
    raise ImportError(
        f"iemask's Hydra configs were not found at {CONFIG_DIR}; install from a clone of the "
        "repository with `pip install -e .` so that conf/ stays beside src/"
    )


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; other names pass through."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _register_schemas() -> None:
    """Every entry point finds its configs through this module: the typed schemas are stored with them."""
    from iemask.schemas import register_schemas

    register_schemas()


_register_schemas()
# ${iemask.dirname:<path>}: the folder of a file path, so that a run folder can follow an output file's.
OmegaConf.register_new_resolver("iemask.dirname", lambda path: str(Path(path).parent), replace=True)
