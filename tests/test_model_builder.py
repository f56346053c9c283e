"""The builder: switches, torchvision equivalence, Table 8 sizes, training, inference, weights."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

from conftest import TINY, square_image, square_target
from iemask.models import SWITCH_NAMES, build_model, count_parameters, load_pretrained_parts
from iemask.models.mask_head import EncDecMaskHead
from iemask.models.neck import AFF, CEM, SumFusion, TopLateral

OFF = dict.fromkeys(SWITCH_NAMES, False)


def _key_prefixes(model, depth=4):
    return {".".join(k.split(".")[:depth]) for k in model.state_dict()}


def test_aff_without_bottom_up_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="aff=true needs bottom_up=true"):
        build_model(3, **TINY, bottom_up=False, aff=True)


def test_unknown_detector_argument_names_itself():
    with pytest.raises(ValueError, match="box_detections_per_image"):
        build_model(3, **TINY, box_detections_per_image=10)


def test_each_switch_changes_exactly_its_modules(tiny_model_factory):
    base = tiny_model_factory(**OFF)
    base_keys = set(base.state_dict())
    expected_changed = {
        "cem": {"backbone.fpn.inner_blocks.1", "backbone.fpn.inner_blocks.2", "backbone.fpn.inner_blocks.3"},
        "gim": {"backbone.fpn.inner_blocks.3"},
        "bottom_up": {"backbone.bottom_up"},
        "encdec_head": {"roi_heads.mask_head", "roi_heads.mask_predictor"},
    }
    for switch, changed in expected_changed.items():
        model = tiny_model_factory(**{**OFF, switch: True})
        diff = set(model.state_dict()) ^ base_keys
        roots = {k for k in diff for c in changed if k.startswith(c + ".")}
        assert diff == roots, f"{switch} changed keys outside {changed}: {sorted(diff - roots)[:5]}"
        assert {c for c in changed if any(k.startswith(c + ".") for k in diff)} == changed
        assert model.switches[switch] is True
    # aff swaps the bottom-up fusion (sum → AFF) and nothing else.
    summed = tiny_model_factory(**{**OFF, "bottom_up": True})
    fused = tiny_model_factory(**{**OFF, "bottom_up": True, "aff": True})
    assert all(isinstance(f, SumFusion) for f in summed.backbone.bottom_up.fuse)
    assert all(isinstance(f, AFF) for f in fused.backbone.bottom_up.fuse)
    diff = set(summed.state_dict()) ^ set(fused.state_dict())
    assert diff and all(k.startswith("backbone.bottom_up.fuse.") for k in diff)


def test_module_types_for_iemask(tiny_model_factory):
    model = tiny_model_factory()
    inner = model.backbone.fpn.inner_blocks
    assert not isinstance(inner[0], CEM | TopLateral)
    assert isinstance(inner[1], CEM) and isinstance(inner[2], CEM)
    assert isinstance(inner[3], TopLateral) and isinstance(inner[3].lateral, CEM)
    assert isinstance(model.roi_heads.mask_head, EncDecMaskHead)
    assert model.roi_heads.mask_roi_pool.output_size == (28, 28)


def test_all_switches_off_is_torchvisions_mask_rcnn_key_for_key():
    ours = build_model(90, "resnet50", **OFF, norm="bn", trainable_layers=5)
    reference = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    a, b = ours.state_dict(), reference.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    assert count_parameters(ours) == count_parameters(reference)
    # The paper's setting (frozen BN, 3 trainable stages) equals torchvision's pretrained-backbone build.
    frozen = build_model(90, "resnet50", **OFF)
    reference = MaskRCNN(resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3), 91)
    a, b = frozen.state_dict(), reference.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    trainable = [n for n, p in frozen.named_parameters() if p.requires_grad]
    assert trainable == [n for n, p in reference.named_parameters() if p.requires_grad]
    assert isinstance(frozen.backbone.body.bn1, FrozenBatchNorm2d)
    # torchvision's checkpoint (a state_dict of this architecture) loads strictly into the baseline.
    frozen.load_state_dict(reference.state_dict(), strict=True)
    x = [torch.rand(3, 96, 128)]
    frozen.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(frozen.backbone(x[0][None]), reference.backbone(x[0][None]))


@pytest.mark.parametrize(
    ("switches", "paper_m", "tolerance"),
    [(OFF, 44.3, 0.01), ({"gim": False}, 75.0, 0.02), ({}, 140.0, 0.02)],
    ids=["mask_rcnn", "iemask_dagger", "iemask"],
)
def test_parameter_counts_match_table_8(switches, paper_m, tolerance):
    model = build_model(80, "resnet50", **switches)
    assert count_parameters(model) / 1e6 == pytest.approx(paper_m, rel=tolerance)


def test_trainable_layers_and_groupnorm_option():
    model = build_model(3, "resnet18", trainable_layers=2, norm="gn", neck_channels=64)
    frozen = {n.split(".")[0] for n, p in model.backbone.body.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "bn1", "layer1", "layer2"}
    assert isinstance(model.backbone.body.bn1, torch.nn.GroupNorm)
    with pytest.raises(ValueError, match="unknown norm"):
        build_model(3, "resnet18", norm="layernorm")


def test_training_steps_lower_the_loss(tiny_model_factory):
    model = tiny_model_factory(num_classes=2).train()
    target = square_target()
    image = square_image(target)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    losses = []
    for _ in range(8):
        loss_dict = model([image], [target])
        assert set(loss_dict) == {
            "loss_classifier",
            "loss_box_reg",
            "loss_mask",
            "loss_objectness",
            "loss_rpn_box_reg",
        }
        loss = sum(loss_dict.values())
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_eval_outputs_are_well_formed_including_no_detections(tiny_model_factory):
    model = tiny_model_factory(num_classes=2).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 100, 140), torch.rand(3, 128, 96)])
    for o, (h, w) in zip(out, [(100, 140), (128, 96)], strict=True):
        n = len(o["boxes"])
        assert o["boxes"].shape == (n, 4) and o["scores"].shape == (n,) and o["labels"].shape == (n,)
        assert o["masks"].shape == (n, 1, h, w)
        assert ((o["masks"] >= 0) & (o["masks"] <= 1)).all()
        assert (o["labels"] >= 1).all() and (o["labels"] <= 2).all()
    model.roi_heads.score_thresh = 1.0  # nothing can pass
    with torch.no_grad():
        (empty,) = model([torch.rand(3, 64, 80)])
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 1, 64, 80)


def test_backbone_weights_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    reference = resnet18()
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(3, "resnet18", backbone_weights=str(path), neck_channels=64)
    body = model.backbone.body.state_dict()
    torch.testing.assert_close(body["layer3.1.conv2.weight"], reference.state_dict()["layer3.1.conv2.weight"])
    torch.testing.assert_close(body["bn1.running_mean"], reference.state_dict()["bn1.running_mean"])
    # Wrapped and prefixed checkpoints load too.
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, wrapped)
    model = build_model(3, "resnet18", backbone_weights=str(wrapped), neck_channels=64)
    torch.testing.assert_close(model.backbone.body.state_dict()["conv1.weight"], reference.state_dict()["conv1.weight"])


def test_bad_backbone_weights_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        build_model(3, "resnet18", backbone_weights=str(tmp_path / "missing.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"foo.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match=r"wrong\.pth"):
        build_model(3, "resnet18", backbone_weights=str(wrong))
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        build_model(3, "resnet18", backbone_weights="IMAGENET9K")


def test_partial_loading_from_a_baseline_checkpoint(tiny_model_factory, tmp_path):
    baseline = tiny_model_factory(num_classes=5, **OFF)
    path = tmp_path / "baseline.pth"
    torch.save(baseline.state_dict(), path)
    iemask = tiny_model_factory(num_classes=3)
    before = {k: v.clone() for k, v in iemask.state_dict().items()}
    report = load_pretrained_parts(iemask, path)
    after, source = iemask.state_dict(), baseline.state_dict()
    for key in report.loaded:
        torch.testing.assert_close(after[key], source[key])
    assert any(k.startswith("backbone.body.") for k in report.loaded)
    assert any(k.startswith("rpn.") for k in report.loaded)
    assert any(k.startswith("roi_heads.box_head.") for k in report.loaded)
    # 5 vs 3 classes: the box predictor is skipped, not half-loaded; the IEMask parts are untouched.
    assert set(report.shape_mismatch) == {k for k in after if k.startswith("roi_heads.box_predictor.")}
    for key in after:
        if key.startswith(("backbone.fpn.", "backbone.bottom_up.", "roi_heads.mask_", "roi_heads.box_predictor.")):
            torch.testing.assert_close(after[key], before[key])


@pytest.mark.parametrize("encdec_head", [False, True])
def test_roi_sampling_ratio_sets_both_pools_and_keeps_their_sizes(encdec_head):
    default = build_model(3, **TINY, encdec_head=encdec_head)
    cheap = build_model(3, **TINY, encdec_head=encdec_head, roi_sampling_ratio=1)
    mask_size = (28, 28) if encdec_head else (14, 14)
    for name, size in (("box_roi_pool", (7, 7)), ("mask_roi_pool", mask_size)):
        before, after = getattr(default.roi_heads, name), getattr(cheap.roi_heads, name)
        assert (before.sampling_ratio, after.sampling_ratio) == (2, 1)
        assert tuple(before.output_size) == tuple(after.output_size) == size
    image = square_image(square_target())
    cheap.train()
    losses = cheap([image], [square_target()])
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="roi_sampling_ratio"):
        build_model(3, **TINY, roi_sampling_ratio=0)


def test_a_runs_best_checkpoint_starts_a_new_run_with_every_weight(tiny_model_factory, tmp_path):
    # the way on that check_resumable names for a weights-only checkpoint: init_from with these three parts
    trained = tiny_model_factory(num_classes=3)
    with torch.no_grad():
        for value in trained.state_dict().values():
            value.add_(1)  # every tensor (buffers too) now differs from a fresh model's
    path = tmp_path / "best.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()}, "global_step": 9}, path)
    fresh = tiny_model_factory(num_classes=3)
    report = load_pretrained_parts(fresh, path, parts=("backbone", "rpn", "roi_heads"))
    assert set(report.loaded) == set(fresh.state_dict()) and not report.shape_mismatch
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value)
