"""The inspection notebook runs end to end on CPU (tiny shapes runs trained inside it)."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "inspect.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow
def test_inspect_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("IEMASK_NOTEBOOK_CACHE", str(tmp_path / "cache"))
    for key in ("IEMASK_CKPT", "IEMASK_BASELINE_CKPT"):
        monkeypatch.delenv(key, raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= 4  # predictions, feature maps, AFF maps, CEM/GIM plots
    assert os.path.isfile(tmp_path / "cache" / "iemask" / "checkpoints" / "last.ckpt")
