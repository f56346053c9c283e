"""The parts map: what each model has, how parts are labelled, compiled and captured."""

from __future__ import annotations

import pytest
import torch

from iemask.models import SWITCH_NAMES, capture_intermediates, compile_parts, count_parameters
from iemask.models.parts import COMPILABLE, GROUPS, group_modules, model_parts, part_label, part_modules

OFF = dict.fromkeys(SWITCH_NAMES, False)


def test_parts_cover_every_parameter_once_and_name_the_baseline_as_what_it_is(tiny_model_factory):
    baseline, iemask = tiny_model_factory(**OFF), tiny_model_factory()
    assert [p.key for p in model_parts(baseline)] == ["backbone", "fpn", "rpn", "box_head", "mask_head"]
    assert [part_label(baseline, p) for p in model_parts(baseline)] == [p.key for p in model_parts(baseline)]
    assert [part_label(iemask, p) for p in model_parts(iemask)] == [
        "backbone", "fpn (CEM, GIM)", "bottom_up (BU, AFF)", "rpn", "box_head", "mask_head (EDH)",
    ]  # fmt: skip
    for model in (baseline, iemask):
        in_parts = sum(count_parameters(m) for p in model_parts(model) for m in part_modules(model, p))
        assert in_parts == count_parameters(model)


def test_groups_and_compilation(tiny_model_factory):
    model = tiny_model_factory()
    assert GROUPS == ("backbone", "neck", "rpn", "box_head", "mask_head")
    assert COMPILABLE == ("backbone", "neck", "mask_head")
    assert group_modules(model, "neck") == [model.backbone.fpn, model.backbone.bottom_up]
    baseline = tiny_model_factory(**OFF)
    assert group_modules(baseline, "neck") == [baseline.backbone.fpn]
    with pytest.raises(ValueError, match="cannot compile"):
        compile_parts(model, ["rpn"])
    with pytest.raises(ValueError, match="unknown part group"):
        group_modules(model, "neck2")


def test_capture_records_every_part_and_the_iemask_modules(tiny_model_factory):
    model = tiny_model_factory().eval()
    with torch.no_grad(), capture_intermediates(model) as seen:
        model([torch.rand(3, 96, 128)])
    assert {p.key for p in model_parts(model)} <= set(seen)
    assert {"cem/C3", "cem/C4", "cem/C5", "gim", "aff/N3", "aff/N4", "aff/N5"} <= set(seen)
    assert list(seen["backbone"]) == ["0", "1", "2", "3"] and "pool" in seen["bottom_up"]
    torch.testing.assert_close(seen["aff/N3"].sum(1), torch.ones_like(seen["aff/N3"][:, 0]))
    baseline = tiny_model_factory(**OFF).eval()
    hooks = sum(len(m._forward_hooks) for m in baseline.modules())
    with torch.no_grad(), capture_intermediates(baseline) as seen:
        baseline([torch.rand(3, 96, 128)])
    assert "bottom_up" not in seen and "gim" not in seen and "pool" in seen["fpn"]
    assert sum(len(m._forward_hooks) for m in baseline.modules()) == hooks  # its own hooks removed
