"""The inspection notebook runs end to end on CPU: on the embedded default run (trained tiny inside it) and on a
checkpoint of another class set, read with another dataset (real COCO images)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from conftest import SHARED_DATA, TINY
from iemask.classes import dataset_classes
from iemask.lit_module import InstanceSegmentationModule
from iemask.models import SWITCH_NAMES

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "inspect.ipynb"
TINY_COCO = SHARED_DATA / "tiny_coco"
PARAMETERS = [f"IEMASK_{name}" for name in ("CKPT", "BASELINE_CKPT", "INSPECT_DATA", "INSPECT_IMAGES", "INSPECT_SCORE")]


def execute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **env: str) -> tuple[list, str]:
    """Run the notebook with only ``env``'s parameters set (its cache in ``tmp_path``); its outputs and their text."""
    monkeypatch.setenv("IEMASK_CACHE", str(tmp_path / "cache"))
    for key in PARAMETERS:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    return outputs, text


def figures(outputs: list) -> int:
    return sum(o.output_type == "display_data" and "image/png" in o.get("data", {}) for o in outputs)


def errors(outputs: list) -> list:
    return [o for o in outputs if o.output_type == "error"]


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow
def test_inspect_notebook_on_the_default_run(tmp_path, monkeypatch):
    outputs, text = execute(tmp_path, monkeypatch)
    assert not errors(outputs)
    assert figures(outputs) == 4  # predictions, feature maps, AFF maps, CEM/GIM plots
    (last,) = (tmp_path / "cache" / "notebook").glob("default-*/checkpoints/last.ckpt")  # trained and cached
    label = "iemask-CGBAH-resnet18 (last.ckpt)"  # the default run's model: all five modules on
    assert "3 classes [circle, square, triangle]" in text and f"{label}: {last}" in text
    assert f"{label}: predictions ≥ 0.3 | " in text and "ground truth | " in text
    notes = [line for line in text.splitlines() if line.startswith("Note: ")]
    assert any(note.startswith("Note: no baseline checkpoint") for note in notes)  # said, not an empty panel
    # Every part of the model is shown; the barely trained run may have nothing above the score threshold.
    assert all(note.startswith(("Note: no baseline", f"Note: {label} has no detection")) for note in notes)


@pytest.fixture
def coco_checkpoints(tmp_path) -> tuple[Path, Path]:
    """An IEMask checkpoint without GIM and AFF and a Mask R-CNN baseline, both with tiny COCO's 80 classes; the
    IEMask one's classifier is biased to call every proposal the first class (``person``), so it draws something."""
    names, ids = dataset_classes(TINY_COCO / "annotations" / "instances_val2017.json")
    paths = []
    for name, switches in [("iemask", {"gim": False, "aff": False}), ("baseline", dict.fromkeys(SWITCH_NAMES, False))]:
        torch.manual_seed(0)
        config = {"_target_": "iemask.models.build_model", "num_classes": len(names), **TINY, **switches}
        module = InstanceSegmentationModule(model=config)
        if name == "iemask":
            with torch.no_grad():
                module.model.roi_heads.box_predictor.cls_score.bias[1] = 20.0
        module.class_names, module.category_ids = names, ids
        checkpoint = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
        module.on_save_checkpoint(checkpoint)  # its classes, as a run writes them
        paths.append(tmp_path / f"{name}.ckpt")
        torch.save(checkpoint, paths[-1])
    return paths[0], paths[1]


@pytest.mark.slow
@pytest.mark.skipif(not TINY_COCO.is_dir(), reason=f"no real COCO data at {TINY_COCO}")
def test_inspect_notebook_on_a_coco_checkpoint(tmp_path, monkeypatch, coco_checkpoints):
    ckpt, baseline = coco_checkpoints
    outputs, text = execute(
        tmp_path,
        monkeypatch,
        IEMASK_CKPT=str(ckpt),
        IEMASK_BASELINE_CKPT=str(baseline),
        IEMASK_INSPECT_DATA=f"data=coco data.root={TINY_COCO}",
        IEMASK_INSPECT_IMAGES="2",
    )
    assert not errors(outputs)
    assert not (tmp_path / "cache" / "notebook").exists()  # nothing trained
    assert "80 classes [person, bicycle, car, motorcycle, airplane, ...]" in text
    assert "2 images from IEMASK_INSPECT_DATA=data=coco" in text
    label = "iemask-CBH-resnet18 (iemask.ckpt)"
    predicted = [line for line in text.splitlines() if line.startswith(f"{label}: predictions")]
    assert len(predicted) == 2 and all(" person" in line for line in predicted)  # the checkpoint's class names
    assert sum(line.startswith("mask_rcnn-resnet18 (baseline.ckpt): predictions") for line in text.splitlines()) == 2
    truth = [line for line in text.splitlines() if line.startswith("ground truth | ")]
    assert len(truth) == 2 and "circle" not in text
    # The parts this model lacks are said, not drawn empty; those it has are drawn.
    assert f"Note: {label} has no AFF (aff=false)" in text and f"Note: {label} has no GIM (gim=false)" in text
    assert "no baseline" not in text and "no CEM" not in text and "no bottom-up" not in text
    assert figures(outputs) == 3  # predictions (3 rows), feature maps, CEM scores
