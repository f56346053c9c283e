"""Test-time augmentation: one size without flip is plain inference, flips of a mirror-symmetric image give
mirror-symmetric detections, several sizes give valid detections, and ``model.tta.*`` reaches the model in
training configs, checkpoints and eval."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchvision.ops import box_iou

from conftest import SHAPES_TINY, TINY_OVERRIDES, compose_config, square_image, square_target
from iemask.data import SHAPES_CATEGORIES
from iemask.eval import evaluate_checkpoint
from iemask.lit_module import InstanceSegmentationModule
from iemask.models.postprocess import BinaryMasks
from iemask.models.switches import SWITCH_NAMES
from iemask.models.tta import TTA_KEYS, TTASettings, detect, set_tta, tta_inference

ALL_OFF = dict.fromkeys(SWITCH_NAMES, False)
SIZE = {"min_size": 64, "max_size": 64}  # the model's test size: the images below are shrunk to it (fast)


def images() -> list[torch.Tensor]:
    """Two images of different sizes (so that the batch is padded): 128×128 and a 96×112 crop of it."""
    image = square_image(square_target())
    return [image, image[:, 10:106, 4:116]]


def dense(masks: torch.Tensor | BinaryMasks) -> torch.Tensor:
    return masks.to_dense() if isinstance(masks, BinaryMasks) else masks


@pytest.mark.parametrize(("switches", "mask_output"), [({}, "binary"), (ALL_OFF, "probabilities")])
def test_one_size_without_flip_is_plain_inference(tiny_model_factory, switches, mask_output):
    model = tiny_model_factory(**switches, **SIZE, mask_output=mask_output, box_detections_per_img=10).eval()
    batch = images()
    with torch.no_grad():
        plain = model(batch)
        set_tta(model, {"enabled": True, "flip": False})  # the model's own test size
        augmented = detect(model, batch)
    assert model.transform.min_size == (64,) and model.transform.max_size == 64  # left as they were
    for expected, actual in zip(plain, augmented, strict=True):
        assert len(expected["boxes"]) > 0 and set(actual) == set(expected)
        torch.testing.assert_close(actual["boxes"], expected["boxes"], rtol=0, atol=1e-5)
        torch.testing.assert_close(actual["scores"], expected["scores"], rtol=0, atol=1e-5)
        assert torch.equal(actual["labels"], expected["labels"])
        assert type(actual["masks"]) is type(expected["masks"])
        torch.testing.assert_close(dense(actual["masks"]), dense(expected["masks"]), rtol=0, atol=1e-5)


def test_flips_of_a_mirror_symmetric_image_give_mirror_symmetric_detections(tiny_model_factory):
    half = square_image(square_target())[:, :, :64]
    image = torch.cat((half, half.flip(-1)), dim=-1)  # (3, 128, 128), its own mirror image
    width = image.shape[-1]
    # room for every box of both passes: nothing is cut at detections_per_img
    model = tiny_model_factory(**SIZE, mask_output="probabilities", box_detections_per_img=1000).eval()
    (out,) = tta_inference(model, [image], TTASettings(enabled=True, flip=True))
    boxes, labels, masks = out["boxes"], out["labels"], out["masks"]
    mirrored = torch.stack((width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]), dim=1)
    overlap = box_iou(mirrored, boxes) * (labels[:, None] == labels[None, :])  # (N, N), same class only
    # Per-class NMS over the boxes of the image and of its mirror image (the same boxes, mirrored) keeps,
    # for every box, its mirror image or a box overlapping that above the NMS threshold.
    assert len(boxes) > 0 and bool((overlap.max(dim=1).values > model.roi_heads.nms_thresh).all())
    partner = overlap.argmax(dim=1)
    exact = overlap.max(dim=1).values > 0.999  # boxes whose mirror image is kept too
    assert bool(exact.any())
    # their masks are each other's mirror images (pasting rounds box edges: up to a pixel's shift)
    difference = (masks[exact].flip(-1) - masks[partner[exact]]).abs().mean(dim=(1, 2, 3))
    assert bool((difference < 0.02).all()), difference.max()


def test_several_sizes_give_valid_detections_within_the_image(tiny_model_factory):
    model = tiny_model_factory(**SIZE, mask_output="probabilities", box_detections_per_img=15).eval()
    batch = images()
    settings = set_tta(model, {"enabled": True, "min_sizes": [48, 96], "max_size": 112})
    assert settings == TTASettings(enabled=True, min_sizes=(48, 96), max_size=112, flip=True)
    with torch.no_grad():
        outputs = detect(model, batch)
    assert model.transform.min_size == (64,) and model.transform.max_size == 64
    for image, out in zip(batch, outputs, strict=True):
        height, width = image.shape[-2:]
        boxes, scores, masks = out["boxes"], out["scores"], out["masks"]
        assert 0 < len(boxes) <= 15 and len(scores) == len(out["labels"]) == len(boxes)
        assert bool((boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all())
        assert bool((boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all())
        assert bool((boxes[:, 2:] >= boxes[:, :2]).all())
        assert bool((scores[:-1] >= scores[1:]).all()) and bool(((out["labels"] >= 1) & (out["labels"] <= 3)).all())
        assert masks.shape == (len(boxes), 1, height, width) and 0 <= masks.min() and masks.max() <= 1


def test_settings_are_checked_and_training_is_not_augmented(tiny_model_factory):
    with pytest.raises(ValueError, match=r"model.tta.min_sizes must be a non-empty list"):
        TTASettings(enabled=True, min_sizes=[])
    with pytest.raises(TypeError, match=r"model.tta.flip must be true or false"):
        TTASettings(flip="yes")
    model = tiny_model_factory(**SIZE)
    assert model.tta == TTASettings() and not model.tta.enabled  # off by default
    with pytest.raises(ValueError, match=r"unknown test-time augmentation setting\(s\) \['sizes'\].*min_sizes"):
        set_tta(model, {"sizes": [64]})
    set_tta(model, {"enabled": True, "min_sizes": [96], "max_size": None})  # None keeps the model's value
    assert model.tta == TTASettings(enabled=True, min_sizes=(96,))
    target = square_target()
    losses = model.train()(images()[:1], [target])  # training mode: plain forward, losses
    assert set(losses) >= {"loss_classifier", "loss_mask"} and all(torch.isfinite(v) for v in losses.values())


def test_tta_keys_compose_and_reach_the_model_and_its_checkpoint(tmp_path):
    cfg = compose_config("train", [*TINY_OVERRIDES, "model.tta.enabled=true", "model.tta.min_sizes=[64,96]"], tmp_path)
    module = instantiate(cfg.module, model={**cfg.model, "backbone_weights": None}, _recursive_=False)
    assert module.model.tta == TTASettings(enabled=True, min_sizes=(64, 96), max_size=None, flip=True)
    saved = module.hparams["model"]  # what a checkpoint keeps: the model is rebuilt from it
    assert InstanceSegmentationModule(model=saved).model.tta == module.model.tta
    old = {k: v for k, v in saved.items() if k != "tta"}  # a checkpoint from before TTA: off
    assert InstanceSegmentationModule(model=old).model.tta == TTASettings()
    required = {"train": [], "eval": ["ckpt_path=x"], "predict": ["ckpt_path=x", "input=y"]}
    for config, needed in required.items():
        with pytest.raises(ConfigCompositionException) as error:
            compose_config(config, [*needed, "model.tta.enabeld=true"], tmp_path)
        assert "enabeld" in f"{error.value} {error.value.__cause__}"
    for config in ("eval", "predict"):  # their overrides are the settings, null: the checkpoint's
        changes = compose_config(config, [*required[config], "model.tta.enabled=true"], tmp_path).model.tta
        assert OmegaConf.to_container(changes) == {**dict.fromkeys(TTA_KEYS), "enabled": True}


def test_eval_turns_tta_on_for_a_checkpoint_saved_without_it(shapes_cache, tmp_path):
    cfg = compose_config("train", [*TINY_OVERRIDES, *SHAPES_TINY, f"data.cache_dir={shapes_cache}"], tmp_path)
    torch.manual_seed(0)
    module = instantiate(cfg.module, model={**cfg.model, "backbone_weights": None}, _recursive_=False)
    hparams = {**module.hparams, "model": {k: v for k, v in module.hparams["model"].items() if k != "tta"}}
    ckpt = tmp_path / "old.ckpt"
    names = [c["name"] for c in SHAPES_CATEGORIES]
    state = {"hyper_parameters": hparams, "state_dict": module.state_dict(), "class_names": names,
             "category_ids": [c["id"] for c in SHAPES_CATEGORIES]}  # fmt: skip
    torch.save(state, ckpt)
    data = [*SHAPES_TINY, f"data.cache_dir={shapes_cache}", "data.num_workers=0", "data.detections_per_img=20"]
    trainer = ["trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]
    results = {}
    for name, extra in (("plain", []), ("tta", ["model.tta.enabled=true"])):
        out = tmp_path / name
        evaluate_checkpoint(compose_config("eval", [f"ckpt_path={ckpt}", *data, *trainer, *extra], out))
        results[name] = json.loads((out / "instances_results.json").read_text())
    assert results["plain"] and results["tta"] and results["tta"] != results["plain"]  # flipped passes merged in
