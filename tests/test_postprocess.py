"""Binary mask post-processing: torchvision's pixels and COCO RLEs, from box-local patches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from conftest import TINY_OVERRIDES, compose_config
from iemask.callbacks import WandbValidationImages
from iemask.data.image_io import write_png
from iemask.evaluation import to_coco_results
from iemask.inference import predict_folder
from iemask.models import build_model
from iemask.models.postprocess import BinaryMasks, MaskPostprocessTransform, paste_masks_binary
from iemask.utils.visualize import draw_instances

H, W = 60, 80
CATEGORY_IDS = [1, 3, 7]


def detections(n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, 28, 28) probabilities and (N, 4) boxes that meet the image: some partly outside it,
    sub-pixel ones, one over the whole image and two over more than it (full-height patches, one all
    foreground: its runs continue from each image column into the next)."""
    g = torch.Generator().manual_seed(seed)
    probabilities = torch.rand(n, 1, 28, 28, generator=g)
    blocks = torch.sigmoid(4 * torch.randn(n // 3, 1, 4, 4, generator=g))
    probabilities[: n // 3] = torch.nn.functional.interpolate(blocks, size=28)  # blocky masks: long runs
    corner = torch.rand(n, 2, generator=g) * torch.tensor([W + 10.0, H + 10.0]) - 10  # x0, y0 in [-10, size)
    corner = torch.minimum(corner, torch.tensor([W - 1.0, H - 1.0]))
    sides = torch.rand(n, 2, generator=g) ** 3 * torch.tensor([1.3 * W, 1.3 * H])
    boxes = torch.cat((corner, torch.maximum(corner + sides, torch.tensor(0.5))), dim=1)  # (N, 4), x1 >= 0.5
    boxes[:10, 2:] = boxes[:10, :2].clamp(min=0) + 0.3  # sub-pixel boxes
    boxes[10] = torch.tensor([0.0, 0.0, W - 1.0, H - 1.0])
    boxes[11:13] = torch.tensor([-4.0, -4.0, W + 4.0, H + 4.0])
    probabilities[11] = 0.9
    return probabilities, boxes


def output_with(masks: torch.Tensor | BinaryMasks, n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "boxes": torch.rand(n, 4, generator=g) * 50,
        "labels": torch.randint(1, len(CATEGORY_IDS) + 1, (n,), generator=g),
        "scores": torch.rand(n, generator=g),
        "masks": masks,
    }


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_binary_paste_has_torchvision_paste_pixels_above_the_threshold(threshold):
    probabilities, boxes = detections()
    expected = paste_masks_in_image(probabilities, boxes, (H, W)) > threshold  # (N, 1, H, W)
    masks = paste_masks_binary(probabilities, boxes, (H, W), threshold)
    assert len(masks) == len(boxes) and masks.shape == expected.shape and masks.threshold == threshold
    assert masks.data.dtype == torch.bool and masks.data.numel() < expected.numel() / 3
    assert torch.equal(masks.to_dense(), expected)
    assert expected[:12].any() and not expected[:12].all()  # the test's edge cases are not all empty or full


def test_a_box_outside_the_image_gets_an_empty_mask_and_no_detection_none():
    probabilities = torch.full((2, 1, 28, 28), 0.9)
    masks = paste_masks_binary(probabilities, torch.tensor([[W + 5.0, 0, W + 20, 10], [0, -30, 10, -20]]), (H, W))
    assert masks.regions.tolist() == [[0, 0, 0, 0]] * 2 and not masks.to_dense().any()
    empty = paste_masks_binary(probabilities[:0], torch.zeros(0, 4), (H, W))
    assert len(empty) == 0 and empty.to_dense().shape == (0, 1, H, W) and empty.encode() == []


def test_rles_from_patches_are_those_of_today_to_coco_results():
    probabilities, boxes = detections()
    dense = paste_masks_in_image(probabilities, boxes, (H, W))  # torchvision's float (N, 1, H, W)
    expected = to_coco_results(5, output_with(dense, len(boxes)), CATEGORY_IDS)
    actual = to_coco_results(5, output_with(paste_masks_binary(probabilities, boxes, (H, W)), len(boxes)), CATEGORY_IDS)
    assert actual == expected  # identical "counts" strings, boxes, scores and ids
    assert actual[11]["segmentation"]["counts"] == "0Pf4"  # one foreground run of H × W


def test_to_coco_results_refuses_another_threshold_than_the_masks_were_cut_at():
    probabilities, boxes = detections(20)
    output = output_with(paste_masks_binary(probabilities, boxes, (H, W), 0.5), 20)
    assert to_coco_results(1, output, CATEGORY_IDS, mask_threshold=0.5) == to_coco_results(1, output, CATEGORY_IDS)
    with pytest.raises(ValueError, match=r"thresholded at 0.5 by the model, not at mask_threshold=0.3"):
        to_coco_results(1, output, CATEGORY_IDS, mask_threshold=0.3)


def test_selecting_and_moving_binary_masks_behaves_as_on_the_dense_tensor():
    probabilities, boxes = detections(40)
    masks = paste_masks_binary(probabilities, boxes, (H, W))
    dense = masks.to_dense()
    keep = torch.rand(40, generator=torch.Generator().manual_seed(1)) > 0.5
    for index in (keep, torch.tensor([7, 3, 3]), [5, 1], slice(2, 9), torch.zeros(40, dtype=torch.bool)):
        assert torch.equal(masks[index].to_dense(), dense[index])
    assert torch.equal(masks.cpu().detach().to("cpu").to_dense(), dense)
    with pytest.raises(TypeError, match="bool or index tensor"):
        masks[3]


def test_transform_copy_keeps_every_torchvision_setting():
    original = GeneralizedRCNNTransform(
        (600, 700), 900, [0.1, 0.2, 0.3], [0.4, 0.5, 0.6], size_divisible=128, fixed_size=(64, 64), _skip_resize=True
    )
    copy = MaskPostprocessTransform.like(original, mask_output="binary", mask_threshold=0.4)
    added = {"mask_output": "binary", "mask_threshold": 0.4}
    assert {k: v for k, v in vars(copy).items() if k not in added} == vars(original)
    assert {k: getattr(copy, k) for k in added} == added


def test_build_model_rejects_an_unknown_mask_output():
    with pytest.raises(ValueError, match="mask_output must be one of"):
        build_model(3, backbone="resnet18", mask_output="float")


def test_model_binary_output_is_its_probability_output_thresholded(tiny_model_factory):
    model = tiny_model_factory(num_classes=3, encdec_head=False).eval()
    model.roi_heads.score_thresh = 0.0  # an untrained model: keep its (many) low-score detections
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 100, 140, generator=g), torch.rand(3, 90, 70, generator=g)]
    assert model.transform.mask_output == "probabilities"
    with torch.no_grad():
        probabilities = model(images)
        model.transform.mask_output = "binary"
        binary = model(images)
    for p, b in zip(probabilities, binary, strict=True):
        assert len(p["boxes"]) > 10 and isinstance(b["masks"], BinaryMasks)
        for key in ("boxes", "labels", "scores"):
            assert torch.equal(p[key], b[key])
        assert torch.equal(b["masks"].to_dense(), p["masks"] > 0.5)
        assert to_coco_results(1, b, CATEGORY_IDS) == to_coco_results(1, p, CATEGORY_IDS)


def test_the_model_configs_build_binary_models(tmp_path):
    import hydra

    for name in ("mask_rcnn", "iemask_dagger"):
        cfg = compose_config("train", [f"model={name}", *TINY_OVERRIDES], tmp_path)
        assert cfg.model.mask_output == "binary" and cfg.model.mask_threshold == 0.5
    cfg = compose_config("train", ["model=mask_rcnn", *TINY_OVERRIDES], tmp_path)
    model = hydra.utils.instantiate(cfg.model)
    assert isinstance(model.transform, MaskPostprocessTransform) and model.transform.mask_output == "binary"


def overlapping_masks() -> tuple[BinaryMasks, torch.Tensor, torch.Tensor]:
    """Masks, labels and scores with overlaps between the same and between different classes."""
    probabilities, boxes = detections(25, seed=3)
    labels = torch.tensor([1, 2, 1, 13, 3] * 5)  # 1 and 13 share a colour
    return paste_masks_binary(probabilities, boxes, (H, W)), labels, torch.rand(25, generator=torch.Generator())


def test_drawing_binary_masks_equals_drawing_the_dense_ones():
    masks, labels, scores = overlapping_masks()
    image = torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=torch.Generator())
    boxes = torch.tensor([[1.0, 2, 30, 40]] * len(masks))
    dense = masks.to_dense()
    assert (dense.sum(0) > 1).any()  # overlaps, which torchvision draws black
    expected = draw_instances(image, boxes, labels, dense, scores)
    assert torch.equal(draw_instances(image, boxes, labels, masks, scores), expected)
    assert not torch.equal(expected, draw_instances(image, boxes, labels, None, scores))


def test_wandb_overlays_of_binary_outputs_equal_those_of_dense_ones(monkeypatch):
    masks, labels, scores = overlapping_masks()
    boxes = torch.tensor([[1.0, 2, 30, 40]] * len(masks))
    logged = {}

    class Recorder:
        def log_image(self, key, images, step, **overlays):
            logged.update(overlays)

    monkeypatch.setattr(WandbValidationImages, "_logger", staticmethod(lambda trainer: Recorder()))
    callback = WandbValidationImages(num_images=2, score_thresh=0.3)
    trainer = type("Trainer", (), {"is_global_zero": True, "global_step": 3})()
    module = type("Module", (), {"class_names": [f"c{i}" for i in range(13)]})()
    truth = {"boxes": boxes, "labels": labels, "masks": masks.to_dense()[:, 0].to(torch.uint8)}
    outputs = [{"boxes": boxes, "labels": labels, "scores": scores, "masks": m} for m in (masks, masks.to_dense())]
    callback.on_validation_batch_end(trainer, module, outputs, ([torch.zeros(3, H, W)] * 2, [truth] * 2), 0)
    callback.on_validation_epoch_end(trainer, module)
    binary, dense = (m["predictions"]["mask_data"] for m in logged["masks"])
    assert len(np.unique(dense)) >= 3  # several classes, painted in score order
    np.testing.assert_array_equal(binary, dense)


def test_predict_folder_writes_the_same_results_with_binary_masks(tiny_model_factory, tmp_path):
    source = tmp_path / "images"
    source.mkdir()
    for i in range(2):
        image = torch.randint(0, 256, (3, 70 + 10 * i, 90), dtype=torch.uint8, generator=torch.Generator())
        write_png(image, source / f"{i}.png")
    model = tiny_model_factory(num_classes=3, encdec_head=False)
    model.roi_heads.score_thresh = 0.0
    written = {}
    for mode in ("probabilities", "binary"):
        model.transform.mask_output = mode
        predict_folder(model, source, tmp_path / mode, None, CATEGORY_IDS, torch.device("cpu"), 0.0, 0.4)
        written[mode] = json.loads((tmp_path / mode / "predictions.json").read_text())
    assert model.transform.mask_threshold == 0.4
    assert len(written["binary"]) > 10 and written["binary"] == written["probabilities"]
