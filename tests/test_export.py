"""python -m iemask.export on a tiny checkpoint: the ONNX file runs in ONNX Runtime as the eager model does on
real images, the TorchScript file loads and runs alike, the metadata says what a consumer needs, and a
failed export or check leaves no file behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import SHARED_DATA, TINY, compose_config
from iemask.export import (
    DETECTION_OUTPUTS,
    Detector,
    ExportError,
    ParityError,
    check_parity,
    export,
    export_module,
    export_onnx,
    export_torchscript,
    load_onnx,
    metadata_path,
    run_eager,
)
from iemask.lit_module import InstanceSegmentationModule

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

CLASSES = ["circle", "square", "triangle"]
CATEGORY_IDS = [1, 2, 5]  # not 1..K: the ids must come from the checkpoint
REAL_IMAGES = SHARED_DATA / "tiny_coco" / "val2017"
ATOL = {"boxes": 0.01, "scores": 1e-4, "masks": 1e-3, "features": 1e-3}  # conf/export.yaml's check.atol


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An IEMask checkpoint (all five switches, random weights) with its classes, as iemask.train stores them."""
    torch.manual_seed(0)
    module = InstanceSegmentationModule(model={"_target_": "iemask.models.build_model", "num_classes": 3, **TINY})
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    state = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    torch.save({**state, "class_names": CLASSES, "category_ids": CATEGORY_IDS}, path)
    return path


@pytest.fixture(scope="module")
def real_images(tmp_path_factory) -> Path:
    """Three real COCO photos, shrunk to about 128 px on the long side (the tiny model's test size)."""
    if not REAL_IMAGES.is_dir():
        pytest.skip(f"real COCO images not found at {REAL_IMAGES} (../shared/data or IEMASK_SHARED_DATA)")
    folder = tmp_path_factory.mktemp("images")
    for path in sorted(REAL_IMAGES.glob("*.jpg"))[:3]:
        with Image.open(path) as image:
            scale = 128 / max(image.size)
            image.convert("RGB").resize((round(image.width * scale), round(image.height * scale))).save(
                folder / path.name
            )
    return folder


def export_config(checkpoint: Path, output: Path, images: Path | None, *extra: str):
    args = [f"ckpt_path={checkpoint}", f"output={output}", f"check.images={images}", "check.num_images=2",
            "onnx.height=64", "onnx.width=96", *extra]  # fmt: skip
    return compose_config("export", args, output.parent)


def eager(checkpoint: Path, part: str = "full") -> nn.Module:
    """The checkpoint's model as exported, run eagerly: the reference."""
    return export_module(InstanceSegmentationModule.from_checkpoint(checkpoint).model, part)


def image_tensor(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def onnx_export(checkpoint, real_images, tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return output, export(export_config(checkpoint, output, real_images))


def test_onnx_runtime_gives_the_eager_model_outputs_on_real_images_of_any_size(onnx_export, checkpoint, real_images):
    path, _ = onnx_export
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(DETECTION_OUTPUTS)
    reference = eager(checkpoint)
    images = [image_tensor(p) for p in sorted(real_images.iterdir())]
    images.append(images[0][:, :90, :120])  # a size no image of the export had
    assert len({tuple(im.shape) for im in images}) >= 3
    for image in images:
        with torch.no_grad():
            (expected,) = reference([image])
        actual = dict(zip(DETECTION_OUTPUTS, session.run(None, {"images": image.numpy()}), strict=True))
        assert len(expected["boxes"]) > 0  # something to compare
        assert actual["masks"].shape == (len(expected["boxes"]), 1, *image.shape[1:])
        np.testing.assert_array_equal(actual["labels"], expected["labels"].numpy())
        for name in ("boxes", "scores", "masks"):
            np.testing.assert_allclose(actual[name], expected[name].numpy(), rtol=0, atol=ATOL[name], err_msg=name)


def test_the_metadata_gives_classes_input_convention_and_the_parity_measured(onnx_export):
    path, metadata = onnx_export
    written = json.loads(metadata_path(path).read_text())
    assert metadata_path(path).name == "model.metadata.json" and written == metadata
    assert written["class_names"] == CLASSES and written["category_ids"] == CATEGORY_IDS
    assert written["format"] == "onnx" and written["part"] == "full" and written["opset"] == 17
    assert written["input"]["channels"] == "RGB" and written["input"]["range"] == [0.0, 1.0]
    assert written["input"]["size"] == "dynamic" and written["input"]["resize_inside"]["max_size"] == 128
    assert written["outputs"] == list(DETECTION_OUTPUTS) and written["variant"] == "paper"
    parity = written["parity"]
    assert parity["images"] == 2 and all(n > 0 for n in parity["detections"])
    assert set(parity["max_abs_diff"]) == {"boxes", "scores", "masks"}
    assert all(parity["max_abs_diff"][name] <= ATOL[name] for name in parity["max_abs_diff"])
    (entry,) = onnx.load(str(path), load_external_data=False).metadata_props
    assert entry.key == "iemask" and json.loads(entry.value) == {k: v for k, v in written.items() if k != "parity"}


def test_a_check_that_fails_names_the_output_and_image(onnx_export, checkpoint, real_images):
    path, _ = onnx_export
    run = load_onnx(path)
    images = [image_tensor(p) for p in sorted(real_images.iterdir())[:1]]
    raised = lambda image: {**run(image), "scores": run(image)["scores"] + 0.01}  # noqa: E731
    with pytest.raises(ParityError, match=r"image 0 \(.*\): scores: max \|diff\| 0.01 > atol 0.0001"):
        check_parity(eager(checkpoint), raised, images, ATOL)
    reversed_ = lambda image: {k: v[::-1] for k, v in run(image).items()}  # noqa: E731
    assert check_parity(eager(checkpoint), reversed_, images, ATOL)["images"] == 1  # paired by content, not order
    dropped = lambda image: {k: v[1:] for k, v in run(image).items()}  # noqa: E731
    with pytest.raises(ParityError, match=r"boxes: shape \(\d+, 4\) instead of"):
        check_parity(eager(checkpoint), dropped, images, ATOL)


def test_an_image_without_detections_runs_in_onnx_runtime(tmp_path):
    """The mask head's GroupNorm then gets no RoIs, which PyTorch's own GroupNorm export cannot reshape."""
    torch.manual_seed(0)
    model = InstanceSegmentationModule(model={"_target_": "iemask.models.build_model", "num_classes": 3, **TINY}).model
    model.roi_heads.score_thresh = 1.0  # no score is above it
    module = export_module(model, "full")
    path = export_onnx(module, tmp_path / "model.onnx", torch.rand(3, 64, 96), {}, opset=17)
    image = torch.rand(3, 80, 72)
    expected, actual = run_eager(module, image), load_onnx(path)(image)
    assert expected["boxes"].shape == actual["boxes"].shape == (0, 4)
    assert expected["masks"].shape == actual["masks"].shape == (0, 1, 80, 72)


def test_an_export_that_fails_its_check_is_removed(checkpoint, real_images, tmp_path):
    output = tmp_path / "features.onnx"
    with pytest.raises(ParityError, match=r"(?s)features_0: max \|diff\| .* > atol 0\n.*features.onnx was removed"):
        export(export_config(checkpoint, output, real_images, "part=features", "check.atol.features=0"))
    assert list(tmp_path.iterdir()) == []  # no model, no metadata, no temporary file


def test_a_fixed_size_onnx_features_part_takes_only_its_size(checkpoint, real_images, tmp_path):
    output = tmp_path / "features.onnx"
    metadata = export(
        export_config(
            checkpoint, output, real_images, "part=features", "onnx.dynamic=false", "onnx.height=64", "onnx.width=80"
        )
    )
    assert metadata["input"]["size"] == [64, 80] and metadata["outputs"][-1] == "features_pool"
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, 64, 96]  # the width rounded up to the neck's stride 32
    batch = torch.rand(2, 3, 64, 96)
    reference = eager(checkpoint, "features")
    with torch.no_grad():
        expected = reference(batch)
    for got, want in zip(session.run(None, {"images": batch.numpy()}), expected, strict=True):
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=ATOL["features"])
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="images"):
        session.run(None, {"images": torch.rand(1, 3, 96, 96).numpy()})


def test_torchscript_features_part_loads_and_runs_as_the_eager_model(checkpoint, real_images, tmp_path):
    output = tmp_path / "features.torchscript"
    metadata = export(export_config(checkpoint, output, real_images, "format=torchscript", "part=features"))
    extra = {"metadata.json": ""}
    loaded = torch.jit.load(str(output), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["class_names"] == CLASSES
    reference = eager(checkpoint, "features")
    image = torch.rand(3, 96, 160)  # not the traced size
    expected = run_eager(reference, image)
    with torch.no_grad():
        actual = loaded(image[None])
    assert list(expected) == metadata["outputs"]
    for got, want in zip(actual, expected.values(), strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=ATOL["features"])


def test_torchscript_full_detector_loads_and_runs_as_the_eager_model(checkpoint, real_images, tmp_path):
    output = tmp_path / "model.torchscript"
    metadata = export(export_config(checkpoint, output, real_images, "format=torchscript"))
    loaded = torch.jit.load(str(output))
    reference = eager(checkpoint)
    for path in sorted(real_images.iterdir())[2:]:  # the export's own check ran on the first two
        image = image_tensor(path)
        with torch.no_grad():
            (expected,), (actual,) = reference([image]), loaded([image])
        assert len(expected["boxes"]) > 0 and set(actual) == set(DETECTION_OUTPUTS)
        for name in DETECTION_OUTPUTS:
            torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=ATOL.get(name, 0))
    assert metadata["parity"]["images"] == 2


class _Unscriptable(nn.Module):
    def forward(self, images):
        return [dict(**{"boxes": image}) for image in images]


def test_a_model_the_exporter_cannot_take_fails_clearly_and_leaves_no_file(tmp_path):
    with pytest.raises(ExportError, match=r"(?s)torch.jit.script cannot compile.*part=features.*format=onnx"):
        export_torchscript(Detector(_Unscriptable()), tmp_path / "model.torchscript", torch.rand(3, 32, 32), {})
    module = export_module(
        InstanceSegmentationModule(model={"_target_": "iemask.models.build_model", "num_classes": 3, **TINY}).model,
        "features",
    )
    with pytest.raises(ExportError, match=r"(?s)opset 7\) cannot export this model.*onnx.opset"):
        export_onnx(module, tmp_path / "features.onnx", torch.rand(3, 64, 64), {}, opset=7)
    assert list(tmp_path.iterdir()) == []


def test_unsupported_format_part_and_missing_checkpoint_are_named(checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"format must be one of \('torchscript', 'onnx'\), got 'tflite'"):
        export(export_config(tmp_path / "absent.ckpt", tmp_path / "m.tflite", None, "format=tflite"))
    with pytest.raises(ValueError, match=r"part must be one of \('full', 'features'\), got 'heads'"):
        export(export_config(checkpoint, tmp_path / "m.onnx", None, "part=heads"))
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*absent.ckpt \(set ckpt_path\)"):
        export(export_config(tmp_path / "absent.ckpt", tmp_path / "m.onnx", None))
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow  # two exports and three timed runtimes
def test_the_latency_benchmark_times_the_three_runtimes_on_equal_work(tiny_model_factory):
    from iemask.benchmarking.export import RUNTIMES, format_table, measure_exported

    model = tiny_model_factory()
    result = measure_exported(model, torch.rand(3, 64, 96), detections=5, warmup=2, repeats=1)
    assert result["not_exported"] == {} and tuple(result["ms"]) == RUNTIMES
    assert all(s["min"] > 0 for s in result["ms"].values()) and result["vs_eager"]["eager"] == 1.0
    assert model.roi_heads.nms_thresh == 0.5 and model.roi_heads.detections_per_img == 100  # restored
    table = format_table(result).splitlines()
    assert table[0] == "| runtime | ms/img median (min–max) | × eager |" and len(table) == 2 + len(RUNTIMES)
    with pytest.raises(ValueError, match="warmup >= 2"):
        measure_exported(model, torch.rand(3, 64, 96), detections=5, warmup=1)


@pytest.mark.parametrize(
    "settings",
    [
        {"cem": False, "gim": False, "bottom_up": False, "aff": False, "encdec_head": False},  # torchvision's
        {"cem": False, "gim": False, "aff": False, "encdec_head": False},  # the bottom-up path with plain sums
        {"variant": "official"},  # the authors' modules, all five
    ],
    ids=["mask_rcnn", "bottom_up-sum", "official"],
)
def test_other_builds_export_to_onnx_with_eager_outputs(settings, tmp_path):
    """The module fixture's checkpoint is the paper's IEMask with every switch; the other neck and head modules too."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = InstanceSegmentationModule(
            model={"_target_": "iemask.models.build_model", "num_classes": 3, **TINY, **settings}
        ).model
    model.roi_heads.score_thresh = 0.0  # random weights: low scores, and detections to compare
    module = export_module(model, "full")
    path = export_onnx(module, tmp_path / "model.onnx", torch.rand(3, 64, 96), {}, opset=17)
    images = [torch.rand(3, 80, 112, generator=torch.Generator().manual_seed(1))]
    parity = check_parity(module, load_onnx(path), images, ATOL)
    assert parity["detections"][0] > 0
