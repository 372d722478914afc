"""The reference-binding plan, pure: reference ownership, the bias it computes, split + log-sum-exp == bias."""

import math

import pytest
import torch
import torch.nn.functional as F

from multisubject.attention.binding import (
    BindingConfig,
    BindingPlan,
    SubjectBinding,
    attention_with_lse,
    merge_partials,
)
from multisubject.attention.families import FLUX, OMNIGEN2
from multisubject.attention.layout import Layout

BOXES = Layout.from_boxes(64, 48, [(0, 0, 0.5, 1), (0.25, 0, 1, 1)])  # overlapping; 6x8 latent -> 3x4 tokens


def _call(plan, family=FLUX, refs=((4, 4), (2, 6), (3, 3)), sigma=1.0):
    layout = family.token_layout(5, (6, 8), list(refs))
    return layout, plan.for_call(layout, (6, 8), 2, sigma, torch.float32, "cpu")


def test_reference_owners_with_and_without_subjects():
    plan = BindingPlan(BOXES, [SubjectBinding(1), SubjectBinding(2)], BindingConfig())
    assert plan.reference_owners(3) == (0, 1, 1)
    with pytest.raises(ValueError, match=r"own 3 reference image\(s\) \(\[1, 2\] per subject\) but the conditioning "
                                         r"carries 4 reference latent\(s\) \(added by X\)"):
        plan.reference_owners(4, "X")
    regions = BindingPlan(BOXES, [SubjectBinding(), SubjectBinding()], BindingConfig(), one_reference_per_region=True)
    assert regions.reference_owners(3) == (0, 1, -1)
    with pytest.raises(ValueError, match=r"the layout has 2 regions but the conditioning carries 1 reference"):
        regions.reference_owners(1)


def test_bias_values_follow_strength_weight_and_priority_over_active_subjects():
    subjects = [SubjectBinding(1, weight=0.5), SubjectBinding(2, weight=2.0, priority=1)]
    layout, call = _call(BindingPlan(BOXES, subjects, BindingConfig(0.75)))
    bias = call.bias()[0, 0]
    img0 = layout.image_span[0]
    r0, r1 = layout.reference_spans[0], layout.reference_spans[1]
    # token column 0 is only subject 0's; column 1 is overlapped and subject 1 (priority 1) owns it
    assert bias[img0, r0[0]] == pytest.approx(math.log(0.5))
    assert bias[img0, r1[0]] == pytest.approx(math.log(2.0) + math.log(0.25))
    assert bias[img0 + 1, r0[0]] == pytest.approx(math.log(0.5) + math.log(0.25))
    assert bias[img0 + 1, r1[0]] == pytest.approx(math.log(2.0))
    assert bias[:img0].abs().max() == 0 and bias[layout.image_span[1]:].abs().max() == 0  # text and refs untouched
    assert bias[:, :layout.image_span[1]].abs().max() == 0  # keys of text and image untouched


def test_inactive_subjects_drop_out_of_compositing_and_binding():
    subjects = [SubjectBinding(1), SubjectBinding(1, sigma_start=0.5, sigma_end=0.0, priority=1)]
    plan = BindingPlan(BOXES, subjects, BindingConfig(1.0))
    layout, early = _call(plan, refs=((4, 4), (2, 6)), sigma=0.9)
    bias = early.bias()[0, 0]
    img0, (r1, _) = layout.image_span[0], layout.reference_spans[1]
    assert bias[img0 + 1, layout.reference_spans[0][0]] == 0  # the overlap belongs to subject 0 while 1 is off
    assert (bias[:, r1:] == 0).all()  # subject 1 is unbound outside its window
    _, late = _call(plan, refs=((4, 4), (2, 6)), sigma=0.4)
    assert late.bias()[0, 0, img0 + 1, layout.reference_spans[0][0]] < -1e30  # now subject 1 owns the overlap
    assert plan.cached_calls() == 2


def test_off_settings_do_nothing():
    assert _call(BindingPlan(BOXES, [SubjectBinding(1), SubjectBinding(2)], BindingConfig(0.0)))[1] is None
    late = [SubjectBinding(1, sigma_start=0.1), SubjectBinding(2, sigma_start=0.1)]
    assert _call(BindingPlan(BOXES, late, BindingConfig(1.0)), sigma=0.9)[1] is None


@pytest.mark.parametrize("family", [FLUX, OMNIGEN2])
@pytest.mark.parametrize("strength, weights, direction", [
    (1.0, (1.0, 1.0), "image_to_reference"), (0.6, (0.5, 2.0), "both"), (1.0, (0.0, 1.0), "both"),
    (0.0, (0.3, 1.0), "image_to_reference"),
])
def test_split_and_merge_equals_the_additive_bias(family, strength, weights, direction):
    subjects = [SubjectBinding(1, weight=weights[0]), SubjectBinding(2, weight=weights[1], priority=1)]
    layout, call = _call(BindingPlan(BOXES, subjects, BindingConfig(strength, direction)), family)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, layout.total, 8) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=call.bias())
    assert torch.allclose(call.attend_split(q, k, v), expected, atol=1e-5)


def test_hard_binding_gives_exactly_zero_probability_outside_the_region():
    layout, call = _call(BindingPlan(BOXES, [SubjectBinding(1), SubjectBinding(2)], BindingConfig(1.0, "both")))
    q, k = torch.randn(1, 2, layout.total, 8), torch.randn(1, 2, layout.total, 8)
    probs = ((q @ k.transpose(-1, -2)) / math.sqrt(8) + call.bias()).softmax(-1)[0]
    img0 = layout.image_span[0]
    s0 = torch.arange(*layout.reference_spans[0])
    # equal priorities: the smaller region (subject 0) wins the overlapped column 1, subject 1 owns columns 2-3
    outside0 = torch.tensor([img0 + r * 4 + c for r in range(3) for c in (2, 3)])
    assert probs[:, outside0][..., s0].max() == 0
    assert probs[:, s0][..., outside0].max() == 0  # the symmetric direction
    assert probs[:, img0 + 1][..., s0].min() > 0


def test_lse_merge_of_key_blocks_equals_one_softmax():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4)
    merged = merge_partials([attention_with_lse(q, k[:, :, :4], v[:, :, :4]),
                             attention_with_lse(q, k[:, :, 4:], v[:, :, 4:], math.log(0.3))])
    bias = torch.zeros(5, 9)
    bias[:, 4:] = math.log(0.3)
    assert torch.allclose(merged, F.scaled_dot_product_attention(q, k, v, attn_mask=bias), atol=1e-6)


def test_settings_are_validated():
    with pytest.raises(ValueError, match=r"strength must be within \[0, 1\], got 1.5; direction must be one of"):
        BindingConfig(1.5, "sideways")
    with pytest.raises(ValueError, match="window starts at sigma 0.1 after it ends"):
        SubjectBinding(sigma_start=0.1, sigma_end=0.5)
    with pytest.raises(ValueError, match=r"layout has 2 region\(s\) but 1 subject\(s\)"):
        BindingPlan(BOXES, [SubjectBinding()], BindingConfig())
