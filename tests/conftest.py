"""Shared fixtures: tiny models and tiny images, CPU only, nothing downloaded."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from pycocotools import mask as mask_util

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from iemask.models import build_model  # noqa: E402

# Real data shared between checkouts (read-only): ../shared/data, or IEMASK_SHARED_DATA. Tests that need it
# skip when it is absent; point the variable at an empty folder to check that they do.
SHARED_DATA = Path(os.environ.get("IEMASK_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def _compiled_frames() -> int:
    dynamo = sys.modules.get("torch._dynamo")
    return sum(dynamo.utils.counters["frames"].values()) if dynamo is not None else 0


@contextlib.contextmanager
def _global_state_restored() -> Iterator[None]:
    """Put process-wide state back as it was on entry.

    Torch's thread count, deterministic-algorithm and cuDNN flags, matmul precision, default dtype and grad
    mode; the torch, numpy and ``random`` RNGs (tests seed them, as does ``train``'s ``seed_everything``);
    environment variables (``PL_GLOBAL_SEED``, ...) and the working directory; Hydra's global config (which
    :func:`compose_config` sets); and dynamo's caches once something was compiled.
    """
    threads, dtype, grad = torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled()
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    matmul = torch.get_float32_matmul_precision()
    rng = torch.get_rng_state(), np.random.get_state(), random.getstate()  # noqa: NPY002 (the legacy global one)
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    environ, cwd, frames = dict(os.environ), os.getcwd(), _compiled_frames()
    hydra_config, hydra_initialized = HydraConfig.instance().cfg, GlobalHydra.instance().is_initialized()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
        torch.set_grad_enabled(grad)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
        torch.set_float32_matmul_precision(matmul)
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])  # noqa: NPY002
        random.setstate(rng[2])
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        for key in os.environ.keys() - environ.keys():
            del os.environ[key]
        os.environ.update(environ)
        os.chdir(cwd)
        HydraConfig.instance().cfg = hydra_config
        if not hydra_initialized:
            GlobalHydra.instance().clear()
        if _compiled_frames() != frames:
            torch._dynamo.reset()


@pytest.fixture(scope="module", autouse=True)
def _module_leaves_global_state_unchanged():
    """Around each test module, its module-scoped fixtures included (they run before a test's own snapshot)."""
    with _global_state_restored():
        yield


@pytest.fixture(autouse=True)
def _test_leaves_global_state_unchanged():
    """Around each test: whatever ran before, a test starts from the same process-wide state."""
    with _global_state_restored():
        yield


# The tiny CPU model of every test: ResNet-18 with GroupNorm from scratch, a 32-channel neck, a 64-wide box
# head and few proposals. TINY builds it directly (build_model's defaults otherwise, at 128 px);
# TINY_MODEL_OVERRIDES makes a composed config's model the same one (TINY_OVERRIDES: with a CPU trainer).
TINY_MODEL = dict(
    backbone="resnet18",
    norm="gn",
    trainable_layers=5,
    neck_channels=32,
    box_head_dim=64,
    rpn_pre_nms_top_n_train=200,
    rpn_post_nms_top_n_train=100,
    rpn_pre_nms_top_n_test=100,
    rpn_post_nms_top_n_test=50,
    box_batch_size_per_image=32,
)
TINY = {**TINY_MODEL, "min_size": 128, "max_size": 128}
TINY_MODEL_OVERRIDES = [
    f"model/backbone={TINY_MODEL['backbone']}",
    "model.backbone_weights=null",
    *(f"model.{key}={value}" for key, value in TINY_MODEL.items() if key != "backbone"),
]


def encode_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a binary (H, W) mask, json-ready."""
    encoded = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode()}


def box_mask(h: int, w: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """An (h, w) uint8 mask with the rectangle [x0, x1) × [y0, y1) set."""
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def assert_metrics_equal(actual: dict[str, float], expected: dict[str, float]) -> None:
    """Same keys, and every value equal to the reference tool's to 1e-4."""
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, abs=1e-4), key


def free_port() -> int:
    """A free local TCP port for a two-process gloo group."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def tiny_model_factory():
    """Build the tiny CPU model (:data:`TINY`) with given switches."""

    def make(num_classes: int = 3, **switches):
        torch.manual_seed(0)
        return build_model(num_classes, **{**TINY, **switches})

    return make


def square_target(size: int = 128, boxes=((16, 16, 64, 64), (70, 40, 120, 100)), labels=(1, 2)) -> dict:
    """A target with filled rectangles as masks; boxes in (x1, y1, x2, y2) pixels."""
    masks = torch.zeros(len(boxes), size, size, dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        masks[i, y1:y2, x1:x2] = 1
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": masks,
    }


def square_image(target: dict, size: int = 128) -> torch.Tensor:
    """A noisy image where each target mask is painted in a class colour."""
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, size, size, generator=g) * 0.2
    colours = torch.tensor([[0.0, 0.0, 0.0], [0.9, 0.1, 0.1], [0.1, 0.1, 0.9], [0.1, 0.9, 0.1]])
    for m, lab in zip(target["masks"], target["labels"], strict=True):
        img[:, m.bool()] = colours[lab][:, None]
    return img


# ---- Hydra configs and tiny runs ------------------------------------------------------------
TINY_OVERRIDES = [
    *TINY_MODEL_OVERRIDES,
    "data.detections_per_img=20",
    "data.num_workers=0",
    "logger=none",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
]
SHAPES_TINY = [
    "data.spec.num_train=16",
    "data.spec.num_val=6",
    "data.spec.image_size=64",
    "data.batch_size=2",
    "data.eval_batch_size=3",
]


@pytest.fixture(scope="session")
def shapes_cache(tmp_path_factory):
    """A tiny generated shapes dataset shared by the session's tests (16 train / 6 val, 64 px)."""
    from iemask.data.shapes import ShapesSpec, ensure_shapes

    cache = tmp_path_factory.mktemp("shapes-cache")
    ensure_shapes(cache, ShapesSpec(num_train=16, num_val=6, image_size=64, max_objects=4, seed=0))
    return cache


def compose_config(config_name: str, overrides: list[str], output_dir) -> DictConfig:
    """Compose a config as the CLI would, with ``paths.output_dir`` pointed at ``output_dir``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from iemask.utils.config import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg
