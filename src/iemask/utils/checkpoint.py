"""Checkpoints as data: one weights-only loader for every file iemask opens, and atomic saves.

Every checkpoint or weights file (``ckpt_path`` for eval/predict, training resume, ``module.init_from``,
a local ``model.backbone_weights`` file, torchvision downloads) is read by :func:`load_checkpoint_file`
with ``torch.load(weights_only=True)``: only tensors and plain containers unpickle, so a file whose
pickle would import or call anything else is refused before any of it runs. iemask's own checkpoints
(Lightning's dict: tensors, plain hyper-parameters, loop/optimizer/scheduler/callback state) and
torchvision's weights need no extra types, so nothing is allowlisted.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol, get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

MapLocation = str | torch.device | Callable | dict[str, str] | None

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
_PICKLE_MAGIC = b"\x80"  # the legacy torch.save format is a pickle stream
_READER_FAILURES = ("PytorchStreamReader", "magic number", "EOF")  # torch's RuntimeErrors for an unreadable file
_PICK_ANOTHER = "re-download it or pick another file"
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")  # AtomicCheckpointIO's `.<name>.<pid>.tmp`


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be read as data: corrupt, foreign, or wanting code."""


def load_checkpoint_file(path: str | Path, map_location: MapLocation = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint/weights file as data (``torch.load(weights_only=True)``); return its dict.

    ``mmap`` maps a local zip-format file's tensors instead of reading them (for a look at its keys).

    Raises ``FileNotFoundError`` for a missing file and :class:`CheckpointError`, naming the file,
    for a truncated/corrupt file, a file that is not a ``torch.save`` file, one that holds something
    other than a dict, and one whose pickle wants a type that is not plain data (code is never run).
    """
    fs = get_filesystem(path)
    if not fs.isfile(str(path)):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    with fs.open(str(path), "rb") as f:
        head = f.read(4)
        # torch reads a local file itself; a remote one (fsspec) is read into memory first
        source = str(path) if _is_local_file_protocol(str(path)) else io.BytesIO(head + f.read())
    if not head:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (the file is empty); {_PICK_ANOTHER}")
    if not head.startswith((_ZIP_MAGIC, _PICKLE_MAGIC)):
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle: it starts with {head!r}); "
            f"{_PICK_ANOTHER}"
        )
    try:
        mmap = mmap and isinstance(source, str) and head.startswith(_ZIP_MAGIC)
        obj = torch.load(source, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        wanted = list(dict.fromkeys(re.findall(r"GLOBAL ([\w.]+)", str(err))))
        if wanted:
            raise CheckpointError(
                f"{path} is refused: its pickle wants {', '.join(wanted)}, which is not plain data (tensors, "
                "numbers, strings, lists, dicts). iemask reads checkpoints as data and never runs code from "
                "them; use a checkpoint written by iemask or torchvision, or re-save just the tensors "
                "(a state_dict) from a copy you trust"
            ) from None
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (not a torch.save pickle: {_first_sentence(err.__context__ or err)}); "
            f"{_PICK_ANOTHER}"
        ) from None
    except (EOFError, IndexError, KeyError, struct.error, OSError, RuntimeError) as err:  # how truncation shows
        if isinstance(err, RuntimeError) and not any(s in str(err) for s in _READER_FAILURES):
            raise  # not about the file's format (e.g. a map_location to a missing device)
        kind = "truncated or corrupt zip" if head.startswith(_ZIP_MAGIC) else "truncated or foreign pickle"
        detail = f"reading it failed: {err}" if isinstance(err, OSError) else _first_sentence(err) or "it ends early"
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({kind}: {detail}); {_PICK_ANOTHER}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} is not a checkpoint: it holds a {type(obj).__name__}, not a dict (a Lightning checkpoint "
            "or a state_dict); pick a checkpoint or state_dict file"
        )
    return obj


RESUME_STATE = ("optimizer_states", "loops")  # what Lightning needs beyond the weights to go on with a fit


def check_resumable(path: str | Path) -> None:
    """Refuse, naming the file and the ways on, a checkpoint that training cannot resume from.

    The best checkpoint is weights-only (``callbacks.checkpoint.save_weights_only``): it has no optimizer,
    scheduler or loop state, and Lightning would stop deep inside its loops. Its weights can still start a
    new run through ``module.init_from``.
    """
    checkpoint = load_checkpoint_file(path, mmap=True)
    missing = [key for key in RESUME_STATE if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"ckpt_path={path} cannot be resumed: it is a weights-only checkpoint (no {', '.join(missing)}), like "
            "the best checkpoint of a run. Resume from the run's checkpoints/last.ckpt (kept until the run "
            "completes; callbacks.last_checkpoint.keep_after_success=true keeps it after), or start a new run "
            f"from these weights: ckpt_path=null module.init_from={path} 'module.init_parts=[backbone,rpn,roi_heads]'"
        )


def _first_sentence(err: BaseException) -> str:
    """torch's reader errors run to a paragraph; the first sentence says what failed."""
    return str(err).strip().split("\n")[0].split(". ")[0]


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete ``.<name>.<pid>.tmp`` files that killed saves left in ``folder``; return what was removed.

    Only files named as :class:`AtomicCheckpointIO` names its temporaries are touched, and none whose
    process is still running here (a save may be in flight).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        match = _TEMPORARY.match(path.name)
        if match is None or not path.is_file() or _process_running(int(match["pid"])):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) left by interrupted checkpoint saves: %s", len(removed), removed)
    return removed


def _process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OverflowError:  # not a pid this system can have
        return False
    return True


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves go to a temporary file in the same folder first.

    ``os.replace`` within one folder is atomic, so a run killed mid-save leaves the previous
    ``last.ckpt`` intact (Lightning's own save stages through the system temp folder, which can
    be another file system, where the final move is a copy). Remote paths use Lightning's path.
    Loading (training resume) goes through :func:`load_checkpoint_file`: weights only.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        """Write ``checkpoint`` atomically; a failed write (disk full) names the path and the free space."""
        if not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as err:
            if isinstance(err, RuntimeError) and not _is_write_failure(err):
                raise
            raise OSError(
                f"could not write checkpoint {path} ({str(err).strip().splitlines()[0]}); {_free_space(path.parent)}. "
                "Free space there, or put the run folder on a file system with room (hydra.run.dir=<folder>), "
                "then resume from the last checkpoint written (ckpt_path=<run folder>/checkpoints/last.ckpt)"
            ) from err
        finally:
            tmp.unlink(missing_ok=True)
        return None

    def load_checkpoint(
        self, path: str | Path, map_location: MapLocation = "cpu", weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Read a checkpoint to resume from, as data: always weights only, whatever ``weights_only`` says."""
        return load_checkpoint_file(path, map_location=map_location)


def _is_write_failure(err: RuntimeError) -> bool:
    """torch's zip writer reports a failed write (e.g. a full disk) as a RuntimeError."""
    return any(s in str(err) for s in ("PytorchStreamWriter", "inline_container", "file write failed"))


def _free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return f"the free space in {folder} could not be read"
    return f"{free / 2**30:.2f} GiB free in {folder}"
