"""``python -m iemask.export ckpt_path=... format=onnx|torchscript output=<file>``.

Writes a trained checkpoint's model as one file that runs without iemask, its preprocessing inside
(the resize to the test size and the input normalisation; masks pasted back at input resolution), and
``<output stem>.metadata.json`` beside it (class names, category ids, the input convention, sizes,
opset, the parity measured). Two parts can be exported (``part=``):

- ``full``: image in, detections out. TorchScript scripts it (``torch.jit.script``: every branch kept);
  ONNX traces it with PyTorch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``):
  ``torch.export`` (the dynamo exporter) cannot take Mask R-CNN's post-processing, whose NMS output
  size depends on the data.
- ``features``: the network up to the RoI heads (normalisation, backbone, neck), image batch in,
  feature maps out; traced for both formats. For a runtime that takes the detection heads elsewhere,
  and the part to export when the full model cannot be.

After writing, the exported file is run (ONNX Runtime, or ``torch.jit.load``) on real images next to the
eager model and the largest differences are checked against ``check.atol`` (:func:`check_parity`).
Files are written under a temporary name and renamed into place: a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.onnx import symbolic_helper
from torchvision.models.detection import MaskRCNN

from iemask.classes import checkpoint_classes, model_num_classes
from iemask.data.image_io import read_rgb
from iemask.inference import IMAGE_SUFFIXES, set_test_settings
from iemask.lit_module import InstanceSegmentationModule
from iemask.utils.config import CONFIG_DIR, resolve_device
from iemask.utils.runs import write_json_atomic

log = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
PARTS = ("full", "features")
INPUT_NAME = "images"
DETECTION_OUTPUTS = ("boxes", "labels", "scores", "masks")  # the order of a detection dict, ONNX's outputs
INPUT_CONVENTION = {"channels": "RGB", "dtype": "float32", "range": [0.0, 1.0]}


class ExportError(RuntimeError):
    """An exporter could not take the model; the message says which part failed and what can be exported."""


class ParityError(AssertionError):
    """The exported model's outputs differ from the eager model's by more than the tolerance."""


class Detector(nn.Module):
    """The whole detector as a list of (3, H, W) float RGB images in [0, 1] in, one detection dict per
    image out (boxes (N, 4) xyxy px, labels (N,), scores (N,), masks (N, 1, H, W) probabilities), eager
    and scripted alike (a scripted torchvision detector returns ``(losses, detections)``)."""

    def __init__(self, model: MaskRCNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        if torch.jit.is_scripting():
            return self.model(images)[1]
        return self.model(images)


class Features(nn.Module):
    """The network up to the RoI heads: the model's input normalisation, its backbone and neck.

    Takes a (B, 3, H, W) float RGB batch in [0, 1], H and W multiples of the model's ``size_divisible``
    (no resize: the caller picks the size); returns the neck's maps in level order, (B, C, H/s, W/s) each.
    """

    def __init__(self, model: MaskRCNN) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.size_divisible = model.transform.size_divisible
        self.register_buffer("mean", torch.tensor(model.transform.image_mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(model.transform.image_std).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.backbone((images - self.mean) / self.std).values())


# ---- what is exported ------------------------------------------------------------------------
def prepare_model(model: MaskRCNN, traced: bool = True) -> MaskRCNN:
    """``model`` in eval mode with masks as (N, 1, H, W) probabilities (box-local binary patches are
    Python objects no exporter can take) and, when ``traced``, the mask head unchunked (a trace would
    fix the number of chunks it saw)."""
    model.eval()
    if getattr(model.transform, "mask_output", "probabilities") != "probabilities":
        log.info("exporting masks as (N, 1, H, W) probabilities (the checkpoint's mask_output is binary)")
        model.transform.mask_output = "probabilities"
    mask_head = model.roi_heads.mask_head
    if traced and getattr(mask_head, "chunk_size", None) is not None:
        mask_head.chunk_size = None
    return model


def export_module(model: MaskRCNN, part: str, scripted: bool = False) -> nn.Module:
    """The module exported for ``part`` (:data:`PARTS`), in eval mode; ``scripted``: for ``torch.jit.script``
    (the full detector in TorchScript), else for tracing."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    model = prepare_model(model, traced=not (scripted and part == "full"))
    return (Detector(model) if part == "full" else Features(model)).eval()


def features_size(model: MaskRCNN, height: int, width: int) -> tuple[int, int]:
    """``(height, width)`` rounded up to multiples of the model's ``size_divisible`` (the neck's strides)."""
    step = model.transform.size_divisible
    return -(-height // step) * step, -(-width // step) * step


def feature_names(module: Features) -> list[str]:
    """The neck's level names (``"0"``..., ``"pool"``), read from one run on a small blank image."""
    side = 2 * module.size_divisible
    probe = torch.zeros(1, 3, side, side, device=module.mean.device)
    with torch.no_grad():
        return list(module.backbone((probe - module.mean) / module.std).keys())


def output_names(module: nn.Module) -> list[str]:
    """Names of the exported outputs: :data:`DETECTION_OUTPUTS`, or ``features_<level>`` per neck level."""
    if isinstance(module, Features):
        return [f"features_{name}" for name in feature_names(module)]
    return list(DETECTION_OUTPUTS)


def example_input(module: nn.Module, image: Tensor) -> Any:
    """The call arguments of ``module`` for one (3, H, W) image: ``([image],)`` or ``(image[None],)``."""
    return (image[None],) if isinstance(module, Features) else ([image],)


def run_eager(module: nn.Module, image: Tensor) -> dict[str, np.ndarray]:
    """The eager module's outputs for one (3, H, W) image, by output name, as numpy arrays."""
    with torch.no_grad():
        outputs = module(*example_input(module, image))
    if isinstance(module, Features):
        return {name: out.cpu().numpy() for name, out in zip(output_names(module), outputs, strict=True)}
    return {name: outputs[0][name].cpu().numpy() for name in DETECTION_OUTPUTS}


# ---- writing ---------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; renamed onto ``path`` on success, removed on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet_tracer() -> Iterator[None]:
    """Tracing torchvision's detector warns at every shape turned into a constant, at its ``torch.tensor(tensor)``
    copies and its indexing (never negative): expected, not news."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        for message in ("To copy construct from a tensor", "Constant folding", "Exporting aten::index", "`torch.jit"):
            warnings.filterwarnings("ignore", message=message)
        yield


@symbolic_helper.parse_args("v", "i", "v", "v", "f", "i")
def _group_norm_symbolic(g: Any, input: Any, num_groups: int, weight: Any, bias: Any, eps: float, cudnn: int) -> Any:
    """``aten::group_norm`` in ONNX as PyTorch's own symbolic writes it (InstanceNormalization over
    (N, G, C/G·H·W), then the affine), but with every size of that reshape computed: PyTorch's target
    (0, G, -1) cannot be resolved by ONNX Runtime for an empty batch, which the mask head's GroupNorm
    gets on an image without detections."""
    shape = g.op("Shape", input)
    batch = symbolic_helper._slice_helper(g, shape, axes=[0], starts=[0], ends=[1])
    rest = symbolic_helper._slice_helper(g, shape, axes=[0], starts=[1], ends=[2**62])
    groups = g.op("Constant", value_t=torch.tensor([num_groups]))
    per_group = g.op("Div", g.op("ReduceProd", rest, keepdims_i=1), groups)
    grouped = g.op("Reshape", input, g.op("Concat", batch, groups, per_group, axis_i=0))
    ones, zeros = torch.ones(num_groups), torch.zeros(num_groups)
    normed = g.op(
        "InstanceNormalization",
        grouped,
        g.op("Constant", value_t=ones),
        g.op("Constant", value_t=zeros),
        epsilon_f=eps,
    )
    out = g.op("Reshape", normed, shape)
    axes = list(range(1, symbolic_helper._get_tensor_rank(input) - 1))
    if not symbolic_helper._is_none(weight):
        out = g.op("Mul", out, symbolic_helper._unsqueeze_helper(g, weight, axes))
    if not symbolic_helper._is_none(bias):
        out = g.op("Add", out, symbolic_helper._unsqueeze_helper(g, bias, axes))
    return out


@contextlib.contextmanager
def _empty_safe_group_norm() -> Iterator[None]:
    """:func:`_group_norm_symbolic` in force for every opset (it needs 9+) while exporting, PyTorch's after."""
    torch.onnx.register_custom_op_symbolic("aten::group_norm", _group_norm_symbolic, 9)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::group_norm", 9)


def export_torchscript(module: nn.Module, path: str | Path, image: Tensor, metadata: Mapping[str, Any]) -> Path:
    """Write ``module`` as TorchScript to ``path``, ``metadata`` inside as ``metadata.json``.

    The full detector is scripted (data-dependent branches kept); the features part, which has none,
    is traced on ``image`` (3, H, W).

    Raises:
        ExportError: TorchScript cannot compile the model (the message names the failing code).
    """
    path = Path(path)
    if isinstance(module, Features):
        with _quiet_tracer(), torch.no_grad():
            compiled = torch.jit.trace(module, example_input(module, image), check_trace=False)  # check_parity checks
    else:
        try:
            compiled = torch.jit.script(module)
        except Exception as e:  # TorchScript's frontend raises many types; all mean "cannot compile"
            raise ExportError(
                f"torch.jit.script cannot compile this model, so the full detector cannot be written as "
                f"TorchScript: {str(e).strip()[:2000]}\nExport what can be: part=features (backbone and neck, "
                "traced), or format=onnx (the full detector, traced)"
            ) from e
    with atomic_path(path) as tmp:
        torch.jit.save(compiled, str(tmp), _extra_files={"metadata.json": json.dumps(metadata, sort_keys=True)})
    return path


def onnx_dynamic_axes(names: Sequence[str], part: str, dynamic: bool) -> dict[str, dict[int, str]]:
    """Axes left free in the ONNX graph: detections always; image height and width when ``dynamic``
    (with ``features``, the batch too)."""
    if part == "full":
        axes: dict[str, dict[int, str]] = {name: {0: "detections"} for name in names}
        if dynamic:
            axes[INPUT_NAME] = {1: "height", 2: "width"}
            axes["masks"] = {0: "detections", 2: "height", 3: "width"}
        return axes
    spatial = {2: "height", 3: "width"} if dynamic else {}
    axes = {INPUT_NAME: {0: "batch", **spatial}}
    for name in names:
        axes[name] = {0: "batch", **({2: f"{name}_height", 3: f"{name}_width"} if dynamic else {})}
    return axes


def export_onnx(
    module: nn.Module,
    path: str | Path,
    image: Tensor,
    metadata: Mapping[str, Any],
    opset: int,
    dynamic: bool = True,
) -> Path:
    """Write ``module`` as ONNX to ``path`` (opset ``opset``), traced on ``image`` (3, H, W).

    With ``dynamic``, input height and width are free (any image size, resized inside as the eager model
    does); otherwise the input must be ``image``'s size. ``metadata`` is stored in the model's
    ``metadata_props`` (key ``iemask``, json).

    Raises:
        ExportError: the exporter cannot take the model (the message names the failing operation).
    """
    import onnx

    path = Path(path)
    names = output_names(module)
    with atomic_path(path) as tmp:
        try:
            with _quiet_tracer(), _empty_safe_group_norm():
                torch.onnx.export(
                    module,
                    example_input(module, image),
                    str(tmp),
                    dynamo=False,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=names,
                    dynamic_axes=onnx_dynamic_axes(
                        names, "features" if isinstance(module, Features) else "full", dynamic
                    ),
                )
        except Exception as e:  # the exporter raises many types; all mean "cannot export"
            raise ExportError(
                f"torch.onnx.export (TorchScript-based, opset {opset}) cannot export this model: "
                f"{str(e).strip()[:2000]}\nTry another onnx.opset, or export what can be: part=features "
                "(backbone and neck)"
            ) from e
        proto = onnx.load(str(tmp))
        entry = proto.metadata_props.add()
        entry.key, entry.value = "iemask", json.dumps(metadata, sort_keys=True)
        onnx.save(proto, str(tmp))
    return path


# ---- running an exported file ----------------------------------------------------------------
def load_torchscript(path: str | Path, device: torch.device | str = "cpu") -> Callable[[Tensor], dict[str, np.ndarray]]:
    """A TorchScript file written here as a function of one (3, H, W) image → outputs by name (numpy)."""
    extra = {"metadata.json": ""}
    compiled = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    metadata = json.loads(extra["metadata.json"])
    names = metadata["outputs"]

    def run(image: Tensor) -> dict[str, np.ndarray]:
        with torch.no_grad():
            if metadata["part"] == "features":
                return {n: out.cpu().numpy() for n, out in zip(names, compiled(image[None]), strict=True)}
            detections = compiled([image])[0]
        return {name: detections[name].cpu().numpy() for name in names}

    return run


def load_onnx(
    path: str | Path, device: torch.device | str = "cpu", threads: int | None = None
) -> Callable[[Tensor], dict[str, np.ndarray]]:
    """An ONNX file written here, in ONNX Runtime, as a function of one (3, H, W) image → outputs by name.

    CUDA runs on ONNX Runtime's CUDA provider when ``device`` is CUDA and the provider is installed;
    ``threads`` sets its intra-op threads (``None``: its default).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(path), options, providers=providers)
    names = [o.name for o in session.get_outputs()]
    batched = len(session.get_inputs()[0].shape) == 4  # the features part takes a (B, 3, H, W) batch

    def run(image: Tensor) -> dict[str, np.ndarray]:
        array = image.cpu().numpy()
        outputs = session.run(None, {INPUT_NAME: array[None] if batched else array})
        return dict(zip(names, outputs, strict=True))

    return run


# ---- parity ----------------------------------------------------------------------------------
def parity_images(
    folder: str | Path | None, count: int, size: tuple[int, int] | None = None, seed: int = 0
) -> list[Tensor]:
    """``count`` float (3, H, W) images in [0, 1] from ``folder`` (sorted), or generated when it is
    ``None`` or absent (a warning says so); resized to ``size`` (height, width) when given."""
    paths = []
    if folder is not None and Path(folder).is_dir():
        paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if paths:
        images = [read_rgb(p).float() / 255 for p in paths]
    else:
        log.warning("no images in check.images=%s: checking parity on %d generated images", folder, count)
        g = torch.Generator().manual_seed(seed)
        images = [torch.rand(3, *(size or (240, 320)), generator=g) for _ in range(count)]
    if size is not None:
        images = [F.interpolate(im[None], size=size, mode="bilinear", antialias=True)[0].clamp(0, 1) for im in images]
    return images


def pair_detections(expected: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``actual``'s detections reordered to pair with ``expected``'s: same label and nearest box first.

    Detections of near-equal scores may come in either order (float rounding differs between runtimes),
    so they are paired by content before comparing. Counts that differ are left to :func:`compare_outputs`.
    """
    n = len(expected["boxes"])
    if len(actual["boxes"]) != n:
        return dict(actual)
    cost = np.abs(expected["boxes"][:, None].astype(np.float64) - actual["boxes"][None]).max(axis=-1, initial=0.0)
    cost[expected["labels"][:, None] != actual["labels"][None]] = np.inf  # (n, n) px, L∞ between boxes
    order, used, paired = np.full(n, -1), np.zeros(n, dtype=bool), 0
    for flat in np.argsort(cost, axis=None, kind="stable"):  # greedy, closest pairs first
        i, j = divmod(int(flat), n)
        if order[i] < 0 and not used[j]:
            order[i], used[j], paired = j, True, paired + 1
            if paired == n:
                break
    return {name: value[order] for name, value in actual.items()}


def compare_outputs(
    expected: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray]
) -> tuple[dict[str, float], list[str]]:
    """Largest absolute difference per output, and what cannot be compared (a shape or label mismatch)."""
    diffs, problems = {}, []
    for name, want in expected.items():
        got = actual[name]
        if got.shape != want.shape:
            problems.append(f"{name}: shape {tuple(got.shape)} instead of {tuple(want.shape)}")
        elif name == "labels":
            if not np.array_equal(got, want):
                problems.append(f"labels differ at {int((got != want).sum())} of {want.size} detections")
        else:
            diffs[name] = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max(initial=0.0))
    return diffs, problems


def tolerance_for(name: str, atol: Mapping[str, float]) -> float:
    """``atol[name]``; feature maps (``features_<level>``) share ``atol["features"]``."""
    return atol["features" if name.startswith("features_") else name]


def check_parity(
    module: nn.Module,
    run_exported: Callable[[Tensor], dict[str, np.ndarray]],
    images: Sequence[Tensor],
    atol: Mapping[str, float],
) -> dict[str, Any]:
    """Run the eager ``module`` and the exported model on ``images``; raise unless they agree.

    Agreement: the same outputs and shapes (so the same number of detections) and, detections paired by
    label and box (:func:`pair_detections`), identical labels and every other output within ``atol[name]``
    in absolute value (boxes in pixels, scores and mask probabilities in [0, 1], feature maps in their own
    units under ``features``).

    Returns:
        ``images`` (count), ``max_abs_diff`` (largest difference per output over the images) and
        ``detections`` (per image, for the full detector).

    Raises:
        ParityError: naming each image and output that disagrees.
    """
    worst: dict[str, float] = {}
    failures, detections = [], []
    for index, image in enumerate(images):
        expected, actual = run_eager(module, image), run_exported(image)
        if "boxes" in expected:
            actual = pair_detections(expected, actual)
        diffs, problems = compare_outputs(expected, actual)
        problems += [
            f"{name}: max |diff| {d:.3g} > atol {tolerance_for(name, atol):g}"
            for name, d in diffs.items()
            if d > tolerance_for(name, atol)
        ]
        failures += [f"image {index} ({tuple(image.shape[-2:])}): {p}" for p in problems]
        for name, d in diffs.items():
            worst[name] = max(worst.get(name, 0.0), d)
        if "boxes" in expected:
            detections.append(len(expected["boxes"]))
    if failures:
        raise ParityError("the exported model differs from the eager model:\n  " + "\n  ".join(failures))
    return {"images": len(images), "max_abs_diff": worst, "detections": detections}


# ---- the command -----------------------------------------------------------------------------
def metadata_path(output: str | Path) -> Path:
    """``<output stem>.metadata.json`` beside the exported file."""
    output = Path(output)
    return output.with_name(f"{output.stem}.metadata.json")


def export_metadata(
    model: MaskRCNN,
    module: nn.Module,
    names: Sequence[str],
    class_names: Sequence[str] | None,
    category_ids: Sequence[int],
    cfg: DictConfig,
) -> dict[str, Any]:
    """What a consumer of the exported file needs: classes, input convention and sizes, outputs, versions."""
    transform = model.transform
    features = isinstance(module, Features)
    return {
        "format": cfg.format,
        "part": cfg.part,
        "checkpoint": str(cfg.ckpt_path),
        "class_names": list(class_names) if class_names is not None else None,
        "category_ids": list(category_ids),
        "label_meaning": "label k (1..K) is the k-th entry of class_names and category_ids; 0 is background",
        "input": {
            **INPUT_CONVENTION,
            "layout": "NCHW batch" if features else "CHW, one image per call (a list of one image in TorchScript)",
            "size": "dynamic" if cfg.format == "torchscript" or cfg.onnx.dynamic else [cfg.onnx.height, cfg.onnx.width],
            "normalisation_inside": {"mean": list(transform.image_mean), "std": list(transform.image_std)},
            "resize_inside": None
            if features
            else {"min_size": list(transform.min_size), "max_size": transform.max_size},
            "size_divisible": transform.size_divisible,
        },
        "outputs": list(names),
        "detections": None
        if features
        else {
            "boxes": "(N, 4) x1, y1, x2, y2 in input pixels",
            "masks": "(N, 1, H, W) probabilities at input resolution",
            "score_thresh": model.roi_heads.score_thresh,
            "nms_thresh": model.roi_heads.nms_thresh,
            "detections_per_img": model.roi_heads.detections_per_img,
        },
        "switches": dict(getattr(model, "switches", {})),
        "variant": getattr(model, "variant", "paper"),
        "opset": cfg.onnx.opset if cfg.format == "onnx" else None,
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
    }


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export ``cfg.ckpt_path``'s model as ``cfg.format`` to ``cfg.output`` and check it; return the metadata."""
    if cfg.format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {cfg.format!r} (set format=onnx or torchscript)")
    if cfg.part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {cfg.part!r}")
    device = resolve_device(cfg.device)
    module_ = InstanceSegmentationModule.from_checkpoint(cfg.ckpt_path)
    model = module_.model
    set_test_settings(model, cfg.test_min_size, cfg.max_size, score_thresh=cfg.score_thresh)
    class_names, category_ids = checkpoint_classes(
        model_num_classes(model),
        module_.class_names,
        module_.category_ids,
        checkpoint=cfg.ckpt_path,
        enforce=cfg.check_classes,
    )
    module = export_module(model, cfg.part, scripted=cfg.format == "torchscript").to(device)
    size = (cfg.onnx.height, cfg.onnx.width)
    if cfg.part == "features":
        size = features_size(model, *size)
    fixed = cfg.format == "onnx" and not cfg.onnx.dynamic
    images = [im.to(device) for im in parity_images(cfg.check.images, max(1, cfg.check.num_images))]
    example = F.interpolate(images[0][None], size=size, mode="bilinear", antialias=True)[0].clamp(0, 1)
    names = output_names(module)
    metadata = export_metadata(model, module, names, class_names, category_ids, cfg)
    output = Path(cfg.output)
    if cfg.format == "torchscript":
        export_torchscript(module, output, example, metadata)
        run_exported = load_torchscript(output, device)
    else:
        export_onnx(module, output, example, metadata, cfg.onnx.opset, cfg.onnx.dynamic)
        run_exported = load_onnx(output, device)
    log.info("wrote %s (%s, part=%s)", output, cfg.format, cfg.part)
    if cfg.check.enabled:
        if cfg.part == "features" and not fixed:  # any multiple of size_divisible: crop the images to one
            step = model.transform.size_divisible
            images = [im[:, : im.shape[1] // step * step, : im.shape[2] // step * step] for im in images]
        elif fixed:
            images = [F.interpolate(im[None], size=size, mode="bilinear", antialias=True)[0] for im in images]
        atol = OmegaConf.to_container(cfg.check.atol)
        try:
            metadata["parity"] = {**check_parity(module, run_exported, images, atol), "atol": atol}
        except ParityError as e:
            output.unlink(missing_ok=True)
            raise ParityError(f"{e}\n{output} was removed (check.atol sets the tolerances)") from None
        log.info("parity on %d images: max |diff| %s", len(images), metadata["parity"]["max_abs_diff"])
    write_json_atomic(metadata_path(output), metadata)
    return metadata


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
