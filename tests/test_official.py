"""The authors' released variant (model.variant=official) and the converter of their Detectron2 checkpoints.

The test re-implements the authors' neck and mask head directly from their code (github.com/Fhujinwu/IEMask,
detectron2/modeling/backbone/{fpn,gim,cem,seblock}.py and roi_heads/mask_head.py: same module names, same
forward, including the unused ``conv2``), writes a Detectron2-named checkpoint from it, converts it and checks
that our official variant computes the same function on the same weights.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY, square_target
from iemask.loggers import run_name
from iemask.models import build_model, load_pretrained_parts
from iemask.models.capture import capture_intermediates
from iemask.models.convert import (
    STRIDE_IN_1X1_WARNING,
    from_official,
    input_normalisation,
    is_official_checkpoint,
    read_detectron2_pickle,
)
from iemask.models.switches import SWITCH_NAMES
from iemask.report import collect_runs, format_ablation_table, group_runs
from iemask.utils.checkpoint import CheckpointError

W = TINY["neck_channels"]  # 32
C = (64, 128, 256, 512)  # ResNet-18's C2..C5
K = 3  # foreground classes


# ---- the authors' modules, re-implemented from their code (widths scaled to the tiny model) ----


class TheirCEM(nn.Module):  # cem.CEMayer
    def __init__(self, channel, reduction=16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Conv2d(channel, channel // reduction, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channel // reduction, channel, 1),
            nn.Sigmoid(),
        )

    def forward(self, x):
        return x * self.fc(self.avg_pool(x))


class TheirSE(nn.Module):  # seblock.SELayer
    def __init__(self, channel, reduction=16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channel, channel // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channel // reduction, channel, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x):
        b, c, _, _ = x.size()
        y = self.fc(self.avg_pool(x).view(b, c)).view(b, c, 1, 1)
        return x * y.expand_as(x)


class TheirGIM(nn.Module):  # gim.GlobalEnchanceModule: repeat over H×W, then the 1×1 conv
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, in_channels // 2, 5, stride=2, padding=2),
            nn.Conv2d(in_channels // 2, in_channels // 4, 5, stride=2, padding=2),
            nn.AdaptiveAvgPool2d(1),
        )
        self.conv1 = nn.Conv2d(in_channels // 4, out_channels, 1, 1)

    def forward(self, x):
        h, w = int(x.shape[2]), int(x.shape[3])
        return self.conv1(self.conv(x).repeat(1, 1, h, w))


class TheirFPN(nn.Module):  # fpn.FPN, after the ResNet: C2..C5 in, p2..p6 out
    # Their GroupNorm(32, 192) at width 256 is GroupNorm(8, 24) at the tiny width 32 (32 groups do not divide 24).
    def __init__(self, out_channels=W, reduced=W * 3 // 4):
        super().__init__()
        for stage, c in zip((2, 3, 4, 5), C, strict=True):
            lateral = nn.Conv2d(c, out_channels, 1)
            self.add_module(f"fpn_lateral{stage}", nn.Sequential(TheirCEM(c), lateral) if stage > 2 else lateral)
            self.add_module(f"fpn_output{stage}", nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.gimdoule = TheirGIM(C[-1], out_channels)
        self.down = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        self.conv1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Sequential(  # built, never called
            nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.GroupNorm(8, out_channels), nn.ReLU()
        )
        self.weight1 = nn.Sequential(nn.Conv2d(out_channels, reduced, 1), nn.GroupNorm(8, reduced), nn.ReLU())
        self.weight2 = nn.Sequential(nn.Conv2d(out_channels, reduced, 1), nn.GroupNorm(8, reduced), nn.ReLU())
        self.weight = nn.Sequential(TheirSE(2 * reduced), nn.Conv2d(2 * reduced, 2, 1))
        self.conv3 = nn.Conv2d(out_channels * 2, out_channels, 3, padding=1)

    def forward(self, c2, c3, c4, c5):
        prev = self.conv3(torch.cat((self.gimdoule(c5), self.fpn_lateral5(c5)), dim=1))
        results = [self.fpn_output5(prev)]
        for feats, lateral, output in (
            (c4, self.fpn_lateral4, self.fpn_output4),
            (c3, self.fpn_lateral3, self.fpn_output3),
            (c2, self.fpn_lateral2, self.fpn_output2),
        ):
            prev = lateral(feats) + F.interpolate(prev, scale_factor=2, mode="nearest")
            results.insert(0, output(prev))
        n = results[0]
        outs = [n]
        for p in results[1:]:
            n = self.down(n)
            w = F.softmax(self.weight(torch.cat((self.weight1(n), self.weight2(p)), 1)), dim=1)
            n = self.conv1(n * w[:, 0:1, :, :] + p * w[:, 1:2, :, :])
            outs.append(n)
        return [*outs, F.max_pool2d(outs[-1], kernel_size=1, stride=2, padding=0)]


def _conv_gn_relu(cin, cout):
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(32, cout), nn.ReLU(inplace=True)]


class TheirMaskHead(nn.Module):  # mask_head.MaskRCNNConvUpsampleHead (layers)
    def __init__(self, c=W, num_classes=K):
        super().__init__()
        self.down1 = nn.Sequential(nn.MaxPool2d(2), *_conv_gn_relu(c, 2 * c), *_conv_gn_relu(2 * c, 2 * c))
        self.down2 = nn.Sequential(nn.MaxPool2d(2), *_conv_gn_relu(2 * c, 4 * c), *_conv_gn_relu(4 * c, 4 * c))
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv1 = nn.Sequential(*_conv_gn_relu(4 * c, 2 * c))
        self.conv2 = nn.Sequential(*_conv_gn_relu(4 * c, 2 * c), *_conv_gn_relu(2 * c, c))
        self.conv3 = nn.Sequential(*_conv_gn_relu(2 * c, c))
        self.predictor = nn.Conv2d(c, num_classes, 1)

    def forward(self, x):
        y1 = x
        x = self.down1(x)
        y2 = x
        x = self.up(self.conv1(self.down2(x)))
        x = self.up(self.conv2(torch.cat((x, y2), 1)))
        return self.predictor(self.conv3(torch.cat((x, y1), 1)))


def _randomise(module: nn.Module) -> nn.Module:
    """Non-trivial values everywhere (GroupNorm affine terms too), so a wrong mapping shows."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return module


def _detectron2_resnet18() -> dict[str, torch.Tensor]:
    """Detectron2's ResNet-18 key names and shapes (BasicBlock: conv1, conv2; shortcut where widths change)."""
    g = torch.Generator().manual_seed(1)
    state = {}

    def conv_norm(name, cout, cin, k):
        state[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) * 0.05
        for stat in ("weight", "bias", "running_mean"):
            state[f"{name}.norm.{stat}"] = torch.randn(cout, generator=g) * 0.1
        state[f"{name}.norm.running_var"] = torch.rand(cout, generator=g) + 0.5

    conv_norm("backbone.bottom_up.stem.conv1", 64, 3, 7)
    cin = 64
    for stage, cout in zip((2, 3, 4, 5), C, strict=True):
        for block in (0, 1):
            prefix = f"backbone.bottom_up.res{stage}.{block}"
            conv_norm(f"{prefix}.conv1", cout, cin if block == 0 else cout, 3)
            conv_norm(f"{prefix}.conv2", cout, cout, 3)
            if block == 0 and cin != cout:
                conv_norm(f"{prefix}.shortcut", cout, cin, 1)
        cin = cout
    return state


@pytest.fixture(scope="module")
def theirs():
    """The authors' modules with random weights and their full Detectron2 state_dict."""
    with torch.random.fork_rng(devices=[]):  # fixed weights, the global RNG left alone
        torch.manual_seed(0)
        fpn, head = _randomise(TheirFPN()).eval(), _randomise(TheirMaskHead()).eval()
        dim = TINY["box_head_dim"]
        state = {
            **_detectron2_resnet18(),
            **{f"backbone.{k}": v for k, v in fpn.state_dict().items()},
            **{f"roi_heads.mask_head.{k}": v for k, v in head.state_dict().items()},
            "proposal_generator.rpn_head.conv.weight": torch.randn(W, W, 3, 3),
            "proposal_generator.rpn_head.conv.bias": torch.randn(W),
            "proposal_generator.rpn_head.objectness_logits.weight": torch.randn(3, W, 1, 1),
            "proposal_generator.rpn_head.objectness_logits.bias": torch.randn(3),
            "proposal_generator.rpn_head.anchor_deltas.weight": torch.randn(12, W, 1, 1),
            "proposal_generator.rpn_head.anchor_deltas.bias": torch.randn(12),
            "roi_heads.box_head.fc1.weight": torch.randn(dim, W * 7 * 7),
            "roi_heads.box_head.fc1.bias": torch.randn(dim),
            "roi_heads.box_head.fc2.weight": torch.randn(dim, dim),
            "roi_heads.box_head.fc2.bias": torch.randn(dim),
            "roi_heads.box_predictor.cls_score.weight": torch.randn(K + 1, dim),
            "roi_heads.box_predictor.cls_score.bias": torch.randn(K + 1),
            "roi_heads.box_predictor.bbox_pred.weight": torch.randn(4 * K, dim),
            "roi_heads.box_predictor.bbox_pred.bias": torch.randn(4 * K),
            "pixel_mean": torch.tensor([103.53, 116.28, 123.675]).view(3, 1, 1),
            "pixel_std": torch.ones(3, 1, 1),  # the authors' configs: Detectron2's default
        }
    return fpn, head, state


def _official(**switches) -> nn.Module:
    torch.manual_seed(0)
    return build_model(K, **{**TINY, "norm": "frozen_bn", "variant": "official", **switches})


def test_converted_checkpoint_loads_strictly_and_computes_the_authors_neck_and_mask_head(theirs):
    fpn, head, state = theirs
    model = _official().eval()
    converted, report = from_official({"model": state, "iteration": 7}, target=model.state_dict())
    assert report.missing == []
    model.load_state_dict(converted, strict=True)
    assert sorted(report.unused) == sorted(
        [k for k in state if k.startswith("backbone.conv2.")] + ["pixel_mean", "pixel_std"]
    )
    assert report.unmapped == [] and report.converted_resnet

    g = torch.Generator().manual_seed(1)
    c = [torch.randn(2, ch, 64 // 2**i, 96 // 2**i, generator=g) for i, ch in enumerate(C)]
    with torch.no_grad():
        expected = fpn(*c)
        ours = model.backbone.bottom_up(model.backbone.fpn(OrderedDict((str(i), x) for i, x in enumerate(c))))
    assert list(ours) == ["0", "1", "2", "3", "pool"]
    for got, want in zip(ours.values(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    rois = torch.randn(5, W, 28, 28)
    with torch.no_grad():
        logits = model.roi_heads.mask_predictor(model.roi_heads.mask_head(rois))
        want = head(rois)
    torch.testing.assert_close(logits[:, 1:], want, rtol=1e-4, atol=1e-5)  # class k+1 is their class k
    assert (logits[:, 0] == 0).all()  # the background map torchvision's indexing needs

    x = torch.randn(4, TINY["box_head_dim"])
    with torch.no_grad():
        scores, deltas = model.roi_heads.box_predictor(x)
    their_scores = F.linear(
        x, state["roi_heads.box_predictor.cls_score.weight"], state["roi_heads.box_predictor.cls_score.bias"]
    )
    their_deltas = F.linear(
        x, state["roi_heads.box_predictor.bbox_pred.weight"], state["roi_heads.box_predictor.bbox_pred.bias"]
    )
    torch.testing.assert_close(scores, torch.cat([their_scores[:, K:], their_scores[:, :K]], 1))  # background first
    torch.testing.assert_close(deltas[:, 4:], their_deltas)
    assert (deltas[:, :4] == 0).all()

    rgb = torch.rand(1, 3, 16, 16)
    their_stem = F.conv2d(rgb.flip(1), state["backbone.bottom_up.stem.conv1.weight"], stride=2, padding=3)
    torch.testing.assert_close(model.backbone.body.conv1(rgb), their_stem)  # BGR -> RGB in the first conv


def test_conversion_reports_unmapped_keys_and_fails_clearly_on_shape_mismatch(theirs):
    _, _, state = theirs
    converted, report = from_official({**state, "roi_heads.extra_head.weight": torch.zeros(1)})
    assert report.unmapped == ["roi_heads.extra_head.weight"]
    assert "backbone.fpn.gimdoule.conv1.weight" in converted
    wrong_classes = build_model(K + 2, **{**TINY, "norm": "frozen_bn", "variant": "official"})
    with pytest.raises(
        ValueError, match=r"roi_heads\.box_predictor\.cls_score\.weight.*checkpoint \(4, 64\), model \(6, 64\)"
    ):
        from_official(state, target=wrong_classes.state_dict())
    with pytest.raises(ValueError, match="Caffe2-named"):
        from_official({"res2_0_branch2a_w": np.zeros(3)})


def test_input_normalisation_is_detectron2s_bgr_255_in_torchvision_terms(theirs):
    _, _, state = theirs
    mean, std = input_normalisation(state)
    np.testing.assert_allclose(mean, (123.675 / 255, 116.28 / 255, 103.53 / 255))
    np.testing.assert_allclose(std, (1 / 255,) * 3)
    x_rgb = torch.rand(3, 4, 4)
    theirs_in = (x_rgb.flip(0) * 255 - state["pixel_mean"]) / state["pixel_std"]  # Detectron2: BGR 0-255
    ours_in = (x_rgb - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(ours_in.flip(0), theirs_in)


def test_init_from_an_authors_pth_and_pkl_converts_and_warns(theirs, tmp_path):
    _, _, state = theirs
    assert is_official_checkpoint({"model": state})
    paper = build_model(K, **TINY).state_dict()  # its bottom-up path has backbone.bottom_up.stem.0.*
    assert not is_official_checkpoint(paper) and not is_official_checkpoint(_official().state_dict())
    pth = tmp_path / "model_final.pth"
    torch.save({"model": state, "iteration": 90000}, pth)
    pkl = tmp_path / "model_final.pkl"
    with pkl.open("wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "Detectron2"}, f)
    for path in (pth, pkl):
        model = _official()
        with pytest.warns(UserWarning) as caught:
            report = load_pretrained_parts(model, path, parts=("backbone", "rpn", "roi_heads"))
        messages = [str(w.message) for w in caught]
        assert STRIDE_IN_1X1_WARNING in messages
        assert any("model.image_std=[0.00392157, 0.00392157, 0.00392157]" in m for m in messages)
        assert report.not_in_source == [] and report.shape_mismatch == []
        torch.testing.assert_close(
            model.state_dict()["backbone.fpn.conv3.weight"], state["backbone.conv3.weight"], rtol=0, atol=1e-7
        )

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(CheckpointError, match=r"builtins\.print"):
        read_detectron2_pickle(bad)


def test_both_variants_train_a_step_and_the_official_switches_are_independent():
    for variant in ("paper", "official"):
        torch.manual_seed(0)
        model = build_model(K, variant=variant, **TINY).train()
        losses = model([torch.rand(3, 128, 128)], [square_target()])
        sum(losses.values()).backward()
        grads = [p.grad for p in model.backbone.fpn.parameters() if p.requires_grad]
        assert all(torch.isfinite(g).all() for g in grads if g is not None) and any(g is not None for g in grads)
        assert model.variant == variant
    expected = {  # the state-dict key prefixes each switch changes in the official variant
        "cem": ("backbone.fpn.fpn_lateral3.", "backbone.fpn.fpn_lateral4.", "backbone.fpn.fpn_lateral5."),
        "gim": ("backbone.fpn.gimdoule.", "backbone.fpn.conv3."),
        "aff": ("backbone.bottom_up.weight",),
        "bottom_up": ("backbone.bottom_up.",),
        "encdec_head": ("roi_heads.mask_head.", "roi_heads.mask_predictor."),
    }
    everything = set(_official().state_dict())
    for name in SWITCH_NAMES:
        off = {name: False, **({"aff": False} if name == "bottom_up" else {})}
        without = set(_official(**off).state_dict())
        gone = everything - without
        assert gone and all(k.startswith(expected[name]) for k in gone), name
        assert all(k.startswith(expected[name]) for k in without - everything), name
    with pytest.raises(ValueError, match=r"model\.variant"):
        build_model(K, variant="authors", **TINY)
    with pytest.raises(ValueError, match="head_skip=concat"):
        build_model(K, variant="official", head_skip="sum", **TINY)


def test_official_run_names_differ_from_the_papers():
    switches = dict.fromkeys(SWITCH_NAMES, True)
    assert run_name(switches, "resnet50") == "iemask-CGBAH-resnet50"
    assert run_name(switches, "resnet50", variant="official") == "iemask-CGBAH-resnet50-official"
    assert run_name(dict.fromkeys(SWITCH_NAMES, False), "resnet50", "official") == "mask_rcnn-resnet50-official"


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:RCNN always returns a \\(Losses, Detections\\) tuple in scripting:UserWarning")
def test_official_variant_scripts_and_the_scripted_model_gives_the_same_detections():
    model = _official(mask_head_chunk_size=8).eval()
    scripted = torch.jit.script(model)
    images = [torch.rand(3, 128, 128)]
    with torch.no_grad():
        eager = model(images)[0]
        _, (script,) = scripted(images)
    assert len(eager["boxes"]) > 8  # the mask head ran in chunks
    for key in ("boxes", "scores", "labels", "masks"):
        torch.testing.assert_close(script[key], eager[key])


def test_report_shows_the_variant_and_compares_each_variant_with_its_own_baseline(tmp_path):
    for job, (variant, on, ap) in enumerate(
        [("paper", False, 0.30), ("paper", True, 0.35), ("official", False, 0.31), ("official", True, 0.37)]
    ):
        folder = tmp_path / str(job)
        (folder / ".hydra").mkdir(parents=True)
        model = {**dict.fromkeys(SWITCH_NAMES, on), "backbone": "resnet50", "variant": variant}
        (folder / ".hydra" / "config.yaml").write_text(json.dumps({"seed": 0, "model": model}))  # JSON is YAML
        (folder / "metrics.json").write_text(json.dumps({"segm/AP": ap, "bbox/AP": ap}))
    rows = list(csv.DictReader(io.StringIO(format_ablation_table(group_runs(collect_runs(tmp_path)), "csv"))))
    assert [(r["name"], r["variant"]) for r in rows] == [
        ("mask_rcnn-resnet50", "paper"),
        ("iemask-CGBAH-resnet50", "paper"),
        ("mask_rcnn-resnet50-official", "official"),
        ("iemask-CGBAH-resnet50-official", "official"),
    ]
    assert [round(float(r["segm/AP_delta"]), 4) for r in rows] == [0.0, 5.0, 0.0, 6.0]
    markdown = format_ablation_table(group_runs(collect_runs(tmp_path)), iou_types=("segm",)).splitlines()
    assert markdown[0].endswith("| params (M) | variant |") and markdown[-1].endswith("| – | official |")


def test_capture_sees_the_same_parts_and_inner_values_in_both_variants():
    seen = {}
    for variant in ("paper", "official"):
        model = build_model(3, **TINY, variant=variant).eval()
        with capture_intermediates(model) as values, torch.no_grad():
            model([torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0))])
        seen[variant] = values
    paper, official = seen["paper"], seen["official"]
    assert set(official) == set(paper)
    for key, value in official.items():
        if isinstance(value, torch.Tensor) and key.startswith(("cem/", "gim", "aff/")):
            assert value.shape == paper[key].shape, key
    for level in ("N3", "N4", "N5"):  # the one shared set of weights, numbered by level, as applied (softmax)
        torch.testing.assert_close(official[f"aff/{level}"].sum(dim=1), torch.ones_like(official[f"aff/{level}"][:, 0]))
    scores = official["cem/C4"]
    assert ((scores > 0) & (scores < 1)).all()  # sigmoid gates
