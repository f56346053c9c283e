"""The overlay drawing, checked on rendered pixels."""

import colorsys

import pytest
import torch
from omegaconf import OmegaConf

from iemask.data.image_io import read_rgb, write_png
from iemask.inference import predict_folder, predict_image
from iemask.models.postprocess import BinaryMasks
from iemask.utils.config import CONFIG_DIR
from iemask.utils.visualize import class_colour, draw_instances, instance_colours


def square(size: tuple[int, int], top: int, left: int, bottom: int, right: int) -> torch.Tensor:
    """(H, W) bool mask of rows top..bottom-1, columns left..right-1."""
    mask = torch.zeros(size, dtype=torch.bool)
    mask[top:bottom, left:right] = True
    return mask


def grey(height: int, width: int, value: int = 128) -> torch.Tensor:
    return torch.full((3, height, width), value, dtype=torch.uint8)


def pixel(image: torch.Tensor, y: int, x: int) -> tuple[int, ...]:
    return tuple(int(v) for v in image[:, y, x])


def extent(image: torch.Tensor, colour: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the pixels of exactly ``colour``."""
    ys, xs = torch.nonzero((image == torch.tensor(colour, dtype=torch.uint8)[:, None, None]).all(0), as_tuple=True)
    assert len(ys), f"no pixel of {colour}"
    return int(ys.min()), int(xs.min()), int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)


def hue(rgb: tuple[int, ...]) -> float:
    return colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0]


def test_overlapping_instances_of_one_class_get_different_shades_of_its_colour():
    size = (200, 200)
    masks = torch.stack([square(size, 20, 20, 120, 120), square(size, 80, 80, 180, 180)])
    boxes = torch.tensor([[20.0, 20, 119, 119], [80, 80, 179, 179]])
    drawn = draw_instances(grey(*size), boxes, torch.tensor([1, 1]), masks, show_boxes=False)
    first, second = pixel(drawn, 50, 50), pixel(drawn, 150, 150)
    assert first != second
    for colour in (first, second):  # blending with grey keeps the hue: still the class colour
        assert hue(colour) == pytest.approx(hue(class_colour(1)), abs=0.02)


def test_outline_is_darker_than_the_fill():
    size = (140, 140)
    masks = square(size, 40, 40, 100, 100)[None]
    drawn = draw_instances(grey(*size), torch.tensor([[40.0, 40, 99, 99]]), torch.tensor([2]), masks, show_boxes=False)
    fill, outline = pixel(drawn, 70, 70), pixel(drawn, 99, 70)
    assert all(o < f for o, f in zip(outline, fill, strict=True))
    assert pixel(drawn, 101, 70) == (128, 128, 128)  # the outline lies inside the mask


def test_label_at_the_border_is_shifted_inside_the_image_whole():
    labels, scores, names = torch.tensor([1]), torch.tensor([0.9]), ["person"]
    colour = instance_colours([1])[0]
    style = {"font_size": 14, "show_boxes": False}
    free = draw_instances(grey(300, 300, 0), torch.tensor([[50.0, 100, 80, 130]]), labels, None, scores, names, **style)
    _, _, height, width = extent(free, colour)
    assert width > 60
    cases = {  # image height: boxes in the corners, partly outside, and one too low for a label below its top
        100: ([110.0, 90, 119, 99], [0, 0, 5, 5], [-20, -20, 5, 5], [115, 95, 130, 110]),
        height + 4: ([110.0, 10, 119, height + 3],),
    }
    for image_height, boxes in cases.items():
        for box in boxes:
            drawn = draw_instances(
                grey(image_height, 120, 0), torch.tensor([box]), labels, None, scores, names, **style
            )
            top, left, h, w = extent(drawn, colour)
            assert (h, w) == (height, width)  # not cut off
            assert 0 <= top and top + h <= image_height and 0 <= left and left + w <= 120


def test_font_grows_with_the_image():
    heights = []
    for side in (100, 400, 1000):
        drawn = draw_instances(grey(side, side, 0), torch.tensor([[10.0, 50, 40, 80]]), torch.tensor([1]))
        heights.append(extent(drawn, instance_colours([1])[0])[2])
    assert heights[0] < heights[1] < heights[2]
    small, fixed = (
        draw_instances(grey(side, side, 0), torch.tensor([[10.0, 50, 40, 80]]), torch.tensor([1]), font_size=12)
        for side in (100, 400)
    )
    assert extent(small, instance_colours([1])[0])[2] == extent(fixed, instance_colours([1])[0])[2]


def test_alpha_zero_leaves_the_masked_pixels_unchanged():
    size = (120, 120)
    image = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    masks = square(size, 40, 40, 100, 100)[None]
    box = torch.tensor([[40.0, 40, 99, 99]])
    drawn = draw_instances(image, box, torch.tensor([1]), masks, alpha=0.0, show_boxes=False)
    assert torch.equal(drawn[:, 42:98, 42:98], image[:, 42:98, 42:98])  # inside the outline
    opaque = draw_instances(image, box, torch.tensor([1]), masks, alpha=1.0, show_boxes=False)
    assert pixel(opaque, 70, 70) == instance_colours([1])[0]


def test_show_boxes_false_draws_no_box_lines():
    image, box, labels = grey(120, 120, 0), torch.tensor([[20.0, 30, 80, 90]]), torch.tensor([1])
    with_boxes = draw_instances(image, box, labels, None, torch.tensor([0.8]))
    assert pixel(with_boxes, 90, 50) == pixel(with_boxes, 60, 80) == instance_colours([1])[0]
    without = draw_instances(image, box, labels, None, torch.tensor([0.8]), show_boxes=False)
    assert not without[:, 30:].any()  # only the label, above the box, is drawn
    assert without[:, :30].any()


def test_binary_masks_probabilities_and_ground_truth_draw_alike():
    size = (64, 80)
    dense = torch.stack([square(size, 5, 10, 40, 50), square(size, 20, 30, 60, 75)])
    regions = torch.tensor([[8, 3, 52, 42], [30, 20, 80, 64]])  # x0, y0, x1, y1 patches around each mask
    data = torch.cat([dense[i, y0:y1, x0:x1].flatten() for i, (x0, y0, x1, y1) in enumerate(regions.tolist())])
    binary = BinaryMasks(data, regions, size, threshold=0.5)
    assert torch.equal(binary.to_dense()[:, 0], dense)
    image = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    boxes, labels, scores = (
        torch.tensor([[10.0, 5, 49, 39], [30, 20, 74, 59]]),
        torch.tensor([1, 2]),
        torch.tensor([0.9, 0.6]),
    )
    expected = draw_instances(image, boxes, labels, dense, scores)
    assert not torch.equal(expected, draw_instances(image, boxes, labels, None, scores))
    assert torch.equal(draw_instances(image, boxes, labels, binary, scores), expected)
    probabilities = (dense.float() * 0.8 + 0.1)[:, None]  # torchvision's (N, 1, H, W)
    assert torch.equal(draw_instances(image, boxes, labels, probabilities, scores), expected)
    truth = draw_instances(image, boxes, labels, dense.to(torch.uint8))  # a target: uint8 masks, no scores
    assert torch.equal(truth, draw_instances(image, boxes, labels, dense))
    assert truth.dtype == torch.uint8 and truth.shape == image.shape


def test_score_thresh_drops_low_scoring_instances():
    size = (64, 80)
    masks = torch.stack([square(size, 5, 10, 40, 50), square(size, 20, 30, 60, 75)])
    image, boxes, labels = grey(*size), torch.tensor([[10.0, 5, 49, 39], [30, 20, 74, 59]]), torch.tensor([1, 2])
    kept = draw_instances(image, boxes, labels, masks, torch.tensor([0.9, 0.2]), score_thresh=0.5)
    assert torch.equal(kept, draw_instances(image, boxes[:1], labels[:1], masks[:1], torch.tensor([0.9])))


def test_predict_folder_draws_with_the_overlay_settings_of_predict_yaml(tiny_model_factory, tmp_path):
    settings = OmegaConf.load(CONFIG_DIR / "predict.yaml").overlay
    assert set(settings) == {"alpha", "font_size", "show_boxes"}
    source = tmp_path / "images"
    source.mkdir()
    image = torch.randint(0, 256, (3, 70, 90), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    write_png(image, source / "a.png")
    model = tiny_model_factory(num_classes=3, encdec_head=False)
    model.roi_heads.score_thresh = 0.0
    overlay = {**settings, "alpha": 0.0, "show_boxes": False, "font_size": 9}
    predict_folder(model, source, tmp_path / "out", None, [1, 2, 3], torch.device("cpu"), 0.0, 0.4, overlay=overlay)
    out = predict_image(model, read_rgb(source / "a.png"), torch.device("cpu"))
    assert len(out["scores"])
    expected = draw_instances(image, out["boxes"], out["labels"], out["masks"], out["scores"], None, 0.4, **overlay)
    assert torch.equal(read_rgb(tmp_path / "out" / "a.png"), expected)
