"""Shapes and invariants of CEM, GIM, AFF, the bottom-up path and the encoding-decoding head."""

from __future__ import annotations

import pytest
import torch

from iemask.models.mask_head import EncDecMaskHead, MaskPredictor
from iemask.models.neck import AFF, CEM, GIM, AFFWeights, BottomUpPath, TopLateral


def test_cem_keeps_spatial_size_reduces_channels_and_scores_in_unit_interval():
    cem = CEM(512, 64)
    scores = {}
    cem.se.scale_activation.register_forward_hook(lambda m, i, o: scores.setdefault("s", o))
    x = torch.randn(2, 512, 9, 13)
    y = cem(x)
    assert y.shape == (2, 64, 9, 13)
    assert scores["s"].shape == (2, 512, 1, 1)
    assert ((scores["s"] > 0) & (scores["s"] < 1)).all()
    # CEM is the 1×1 reduction of the channel-rescaled input.
    expected = cem.reduce(scores["s"] * x)
    torch.testing.assert_close(y, expected)


def test_gim_global_term_is_constant_over_space_when_broadcast():
    gim = GIM(512, 64)
    assert gim.encode[0].out_channels == 256 and gim.encode[2].out_channels == 128  # C → C/2 → C/4
    c5 = torch.randn(2, 512, 10, 7)
    g = gim(c5)
    assert g.shape == (2, 64, 1, 1)
    lateral = torch.nn.Conv2d(512, 64, 1)
    top = TopLateral(lateral, gim)
    out = top(c5)
    assert out.shape == (2, 64, 10, 7)
    torch.testing.assert_close(out - lateral(c5), g.expand(-1, -1, 10, 7))


def test_gim_gradients_under_cpu_bf16_autocast_on_a_two_pixel_c5_are_the_fp32_ones():
    """A 2×2 C5 (a 64-px image) gives GIM's second stride-2 conv a 1×1 map, whose bf16 weight gradient on CPU
    reads uninitialised memory; memory freed full of NaNs before each step makes that show."""
    torch.manual_seed(0)
    gim = GIM(256, 32)
    c5 = torch.randn(1, 256, 2, 2)
    gim(c5).sum().backward()
    reference = [p.grad.clone() for p in gim.parameters()]
    for _ in range(10):
        poison = [torch.full((1 << 14,), float("nan")) for _ in range(64)]
        del poison
        gim.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = gim(c5)
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        for p, ref in zip(gim.parameters(), reference, strict=True):
            torch.testing.assert_close(p.grad, ref)


def test_gim_parameter_count_matches_the_paper_at_resnet50_widths():
    gim = GIM(2048, 256)
    assert sum(p.numel() for p in gim.parameters()) / 1e6 == pytest.approx(65.6, rel=0.01)


def test_aff_weights_are_in_unit_interval_and_sum_to_one_per_pixel():
    aff = AFF(64, 48)
    seen = {}
    aff.weights.register_forward_hook(lambda m, i, o: seen.setdefault("w", o))
    n_prev, p = torch.randn(2, 64, 32, 32), torch.randn(2, 64, 16, 16)
    out = aff(n_prev, p)
    w = seen["w"]
    assert out.shape == (2, 64, 16, 16)
    assert w.shape == (2, 2, 16, 16)
    assert ((w >= 0) & (w <= 1)).all()
    torch.testing.assert_close(w.sum(dim=1), torch.ones(2, 16, 16))
    # N_i = W1 ⊙ P~ + W2 ⊙ N~
    expected = w[:, :1] * aff.lateral(p) + w[:, 1:] * aff.down(n_prev)
    torch.testing.assert_close(out, expected)


def test_aff_weights_reduction_widths_use_groupnorm():
    weights = AFFWeights(256, 192)
    assert weights.reduce_p[0].out_channels == 192
    assert isinstance(weights.reduce_p[1], torch.nn.GroupNorm) and weights.reduce_p[1].num_groups == 32


@pytest.mark.parametrize("aff", [True, False])
def test_bottom_up_path_outputs_n2_to_n6(aff):
    path = BottomUpPath(64, 4, aff=aff)
    sizes = [32, 16, 8, 4]
    p = {str(i): torch.randn(1, 64, s, s) for i, s in enumerate(sizes)}
    n = path(p)
    assert list(n) == ["0", "1", "2", "3", "pool"]
    assert [t.shape[-1] for t in n.values()] == [32, 16, 8, 4, 2]
    assert all(t.shape[1] == 64 for t in n.values())
    torch.testing.assert_close(n["0"], path.stem(p["0"]))
    torch.testing.assert_close(n["pool"], torch.nn.functional.max_pool2d(n["3"], 1, 2))


@pytest.mark.parametrize("skip", ["concat", "sum"])
def test_encdec_head_maps_28x28_rois_to_28x28_per_class_logits(skip):
    head, predictor = EncDecMaskHead(64, skip=skip), MaskPredictor(64, 4)
    x = torch.randn(5, 64, 28, 28)
    feats = head(x)
    assert feats.shape == (5, 64, 28, 28)
    assert predictor(feats).shape == (5, 4, 28, 28)


def test_encdec_head_widths_match_the_authors_at_256():
    head = EncDecMaskHead(256)
    widths = [m[0].out_channels for m in [*head.encode1[1:], *head.encode2[1:], head.decode1, *head.decode2]]
    assert widths == [512, 512, 1024, 1024, 512, 512, 256]
    assert head.decode2[0][0].in_channels == 1024 and head.fuse[0].in_channels == 512
    assert sum(p.numel() for p in head.parameters()) / 1e6 == pytest.approx(29.5, rel=0.01)


def test_encdec_head_chunked_inference_equals_unchunked():
    torch.manual_seed(0)
    head = EncDecMaskHead(32).eval()
    x = torch.randn(23, 32, 28, 28)
    with torch.no_grad():
        full = head(x)
        head.chunk_size = 5
        chunked = head(x)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)


def test_encdec_head_rejects_unknown_skip_and_bad_chunk():
    with pytest.raises(ValueError, match="skip"):
        EncDecMaskHead(64, skip="add")
    with pytest.raises(ValueError, match="chunk_size"):
        EncDecMaskHead(64, chunk_size=0)
