"""CUDA smoke tests (``-m cuda``; skipped without a GPU): run by ``scripts/gpu_check.sh`` on a device machine.

bf16 autocast training with fused SGD, channels_last inference against contiguous fp32, a single-GPU DDP
run through ``iemask.train``, and inference on the device giving the CPU's detections.
"""

from __future__ import annotations

import pytest
import torch

from conftest import SHAPES_TINY, TINY_OVERRIDES, compose_config, square_image, square_target
from iemask.models.precision import channels_last_input
from iemask.train import train
from iemask.training.optim import build_sgd

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)"),
]


@pytest.fixture
def cuda_model(tiny_model_factory):
    return tiny_model_factory().cuda()


def test_bf16_training_steps_with_fused_sgd_are_finite_and_move_the_weights(cuda_model):
    target = square_target()
    image = square_image(target).cuda()
    targets = [{k: v.cuda() for k, v in target.items()}]
    optimizer = build_sgd(cuda_model, lr=0.01, fused=True)
    before = [p.detach().clone() for p in cuda_model.parameters() if p.requires_grad]
    cuda_model.train()
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses = cuda_model([image], targets)
        loss = sum(losses.values())
        assert torch.isfinite(loss), {k: float(v) for k, v in losses.items()}
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = [p.detach() for p in cuda_model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


@torch.inference_mode()
def test_channels_last_inference_matches_contiguous(cuda_model):
    image = square_image(square_target()).cuda()
    cuda_model.eval()
    (expected,) = cuda_model([image])
    channels_last_input(cuda_model.backbone)
    cuda_model.to(memory_format=torch.channels_last)
    (actual,) = cuda_model([image])
    assert len(actual["boxes"]) == len(expected["boxes"])
    torch.testing.assert_close(actual["boxes"], expected["boxes"], atol=1e-2, rtol=1e-3)


@torch.inference_mode()
def test_inference_on_the_device_gives_the_cpus_detections(tiny_model_factory):
    model = tiny_model_factory().eval()
    image = square_image(square_target())
    (on_cpu,) = model([image])
    (on_gpu,) = model.cuda()([image.cuda()])
    assert on_gpu["masks"].shape[-2:] == image.shape[-2:] and on_gpu["masks"].device.type == "cuda"
    torch.testing.assert_close(on_gpu["boxes"].cpu(), on_cpu["boxes"], atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(on_gpu["scores"].cpu(), on_cpu["scores"], atol=1e-3, rtol=1e-3)


def test_single_gpu_ddp_bf16_run_trains_evaluates_and_checkpoints(shapes_cache, tmp_path):
    overrides = [
        *TINY_OVERRIDES, *SHAPES_TINY, f"data.cache_dir={shapes_cache}", "trainer.accelerator=gpu",
        "trainer.devices=1", "trainer.strategy=ddp", "trainer.precision=bf16-mixed", "schedule.max_iters=4",
        "schedule.reference_batch_size=2", "schedule.eval_period=null", "schedule.steps=[3]",
        "schedule.warmup_iters=1", "optimizer.fused=true",
    ]  # fmt: skip
    result = train(compose_config("train", overrides, tmp_path))
    assert result["step"] == 4 and result["evaluated_images"] == 6
    assert "segm/AP" in result["metrics"] and result["best_checkpoint"] is not None
