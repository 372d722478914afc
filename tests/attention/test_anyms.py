"""AnyMS decoupled attention: equivalences with the paper's formulas, no leakage, CFG order, bad input."""

import dataclasses
import logging
import math

import pytest
import torch
from anyms_helpers import adapter_state

from multisubject.attention.anyms import (
    AnyMSConfig,
    AnyMSPlan,
    EncodedSubject,
    EncodedSubjects,
    Mode,
    average_reference_tokens,
    sdpa_attention,
)
from multisubject.attention.ip_adapter import adapter_from_state_dict
from multisubject.attention.layout import Layout, TokenGrid, composite_ownership, region_areas, region_token_masks

HEADS = 2
LATENT = (12, 16)  # non-square latent: grid /1 = 12x16 tokens
SITE = 0  # ("input", 4, 0): 64 channels for model_channels 32


@pytest.fixture(scope="module")
def adapter():
    return adapter_from_state_dict(adapter_state("sdxl", "global", clip_dim=24))


def _subjects(adapter, count, seed=0, priorities=None, **fields):
    gen = torch.Generator().manual_seed(seed)
    items = []
    for i in range(count):
        cond = torch.randn(4, 32, generator=gen)
        uncond = torch.randn(4, 32, generator=gen)
        priority = i % 2 if priorities is None else priorities[i]
        items.append(EncodedSubject(cond, uncond, label=f"s{i}", priority=priority, **fields))
    return EncodedSubjects(adapter, tuple(items))


BOXES = [(0.0, 0.0, 0.6, 0.7), (0.4, 0.3, 1.0, 1.0), (0.3, 0.1, 0.5, 0.5)]


def _layout(count=3, boxes=BOXES):
    return Layout.from_boxes(128, 96, list(boxes[:count]))


def _qkv(batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    tokens = LATENT[0] * LATENT[1]
    q = torch.randn(batch, tokens, 64, generator=gen)
    k = torch.randn(batch, 7, 64, generator=gen)
    v = torch.randn(batch, 7, 64, generator=gen)
    return q, k, v


def _run(plan, q, k, v, cond_or_uncond=(0, 1), sigma=None):
    out = sdpa_attention(q, k, v, HEADS)
    return plan.add_image_attention(
        out, q, site=SITE, heads=HEADS, latent_hw=LATENT, cond_or_uncond=list(cond_or_uncond), sigma=sigma
    )


def _subject_attention(adapter, subject, q, branch):
    """Full-image IP-Adapter attention of one subject: Softmax(Q K_j^T) V_j for every query."""
    tokens = torch.stack([(subject.cond, subject.uncond)[b] for b in branch])  # (B, T, C)
    return sdpa_attention(q, tokens @ adapter.to_k_ip[SITE].T, tokens @ adapter.to_v_ip[SITE].T, HEADS)


def _token_masks(layout, priorities):
    grid = TokenGrid.infer(*LATENT, LATENT[0] * LATENT[1])
    masks = region_token_masks(layout, grid).reshape(len(layout), -1)
    return masks, composite_ownership(masks, priorities, region_areas(layout)).exclusive


def test_crop_merge_equals_hard_priority_masks_after_full_attention(adapter):
    subjects, layout = _subjects(adapter, 3), _layout()
    q, k, v = _qkv()
    got = _run(AnyMSPlan(subjects, layout, AnyMSConfig(scale=0.7)), q, k, v)
    _, exclusive = _token_masks(layout, subjects.priorities)
    expected = sdpa_attention(q, k, v, HEADS)
    for j, s in enumerate(subjects.items):
        z = _subject_attention(adapter, s, q, [0, 1])
        expected = expected + 0.7 * s.weight * exclusive[j].float()[None, :, None] * z
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_overlap_is_owned_by_the_top_priority_subject_only(adapter):
    subjects, layout = _subjects(adapter, 2), _layout(2)
    _, exclusive = _token_masks(layout, subjects.priorities)
    masks, _ = _token_masks(layout, subjects.priorities)
    overlap = masks[0] & masks[1]
    assert overlap.any() and exclusive[1][overlap].all() and not exclusive[0][overlap].any()


def test_one_subject_covering_the_image_equals_ip_adapter_decoupled_attention(adapter):
    subjects = _subjects(adapter, 1)
    layout = Layout.from_boxes(128, 96, [(0.0, 0.0, 1.0, 1.0)])
    q, k, v = _qkv()
    for mode in Mode:
        got = _run(AnyMSPlan(subjects, layout, AnyMSConfig(scale=0.6, mode=mode)), q, k, v)
        expected = sdpa_attention(q, k, v, HEADS) + 0.6 * _subject_attention(adapter, subjects.items[0], q, [0, 1])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_weight_zero_or_outside_the_schedule_leaves_the_output_unchanged(adapter):
    q, k, v = _qkv()
    text_only = sdpa_attention(q, k, v, HEADS)
    off = _subjects(adapter, 3, weight=0.0)
    assert torch.equal(_run(AnyMSPlan(off, _layout(), AnyMSConfig()), q, k, v), text_only)
    late = _subjects(adapter, 3, start_percent=0.5)
    # sigma ranges as the node maps them: start 0.5 -> sigma 3.0, end 1.0 -> sigma 0
    plan = AnyMSPlan(late, _layout(), AnyMSConfig(), sigma_ranges=[(3.0, 0.0)] * 3)
    assert torch.equal(_run(plan, q, k, v, sigma=torch.tensor([7.0, 7.0])), text_only)
    assert not torch.equal(_run(plan, q, k, v, sigma=torch.tensor([2.0, 2.0])), text_only)
    assert torch.equal(_run(AnyMSPlan(_subjects(adapter, 3), _layout(), AnyMSConfig(scale=0.0)), q, k, v), text_only)


def test_global_mode_equals_the_sum_of_all_subjects_attentions(adapter):
    subjects = _subjects(adapter, 3)
    q, k, v = _qkv()
    got = _run(AnyMSPlan(subjects, _layout(), AnyMSConfig(mode="global")), q, k, v)
    expected = sdpa_attention(q, k, v, HEADS)
    for s in subjects.items:
        expected = expected + _subject_attention(adapter, s, q, [0, 1])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_masked_sum_sums_full_attentions_under_non_exclusive_region_masks(adapter):
    subjects, layout = _subjects(adapter, 3), _layout()
    q, k, v = _qkv()
    got = _run(AnyMSPlan(subjects, layout, AnyMSConfig(mode="masked_sum")), q, k, v)
    masks, _ = _token_masks(layout, subjects.priorities)
    expected = sdpa_attention(q, k, v, HEADS)
    for j, s in enumerate(subjects.items):
        expected = expected + masks[j].float()[None, :, None] * _subject_attention(adapter, s, q, [0, 1])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_perturbing_one_subject_changes_the_output_only_inside_its_owned_region(adapter):
    subjects, layout = _subjects(adapter, 3), _layout()
    q, k, v = _qkv()
    base = _run(AnyMSPlan(subjects, layout, AnyMSConfig()), q.clone(), k, v)
    _, exclusive = _token_masks(layout, subjects.priorities)
    for j in range(3):
        items = list(subjects.items)
        s = items[j]
        items[j] = EncodedSubject(s.cond + 3.0, s.uncond - 3.0, priority=s.priority)
        changed = _run(AnyMSPlan(EncodedSubjects(adapter, tuple(items)), layout, AnyMSConfig()), q.clone(), k, v)
        moved = (changed - base).abs().amax(dim=(0, 2)) > 0  # (L,)
        assert moved.any()
        assert torch.equal(moved & ~exclusive[j], torch.zeros_like(moved)), f"subject {j} leaks outside its region"


def test_background_tokens_get_text_attention_only(adapter):
    layout = Layout.from_boxes(128, 96, [(0.0, 0.0, 0.25, 0.25), (0.75, 0.75, 1.0, 1.0)])
    q, k, v = _qkv()
    got = _run(AnyMSPlan(_subjects(adapter, 2), layout, AnyMSConfig()), q, k, v)
    masks, _ = _token_masks(layout, [0, 1])
    background = ~masks.any(0)
    assert torch.equal(got[:, background], sdpa_attention(q, k, v, HEADS)[:, background])


def test_cond_and_uncond_rows_use_their_own_tokens_in_either_batch_order(adapter):
    subjects, layout = _subjects(adapter, 2), _layout(2)
    q, k, v = _qkv(batch=4)  # batch 2 per branch
    cond_first = _run(AnyMSPlan(subjects, layout, AnyMSConfig()), q, k, v, cond_or_uncond=(0, 1))
    swapped = torch.cat([q[2:], q[:2]]), torch.cat([k[2:], k[:2]]), torch.cat([v[2:], v[:2]])
    uncond_first = _run(AnyMSPlan(subjects, layout, AnyMSConfig()), *swapped, cond_or_uncond=(1, 0))
    torch.testing.assert_close(torch.cat([uncond_first[2:], uncond_first[:2]]), cond_first, atol=1e-6, rtol=0)
    # the uncond rows really use the zero-image tokens
    all_cond = _run(AnyMSPlan(subjects, layout, AnyMSConfig()), q, k, v, cond_or_uncond=(0, 0))
    assert torch.equal(all_cond[:2], cond_first[:2]) and not torch.equal(all_cond[2:], cond_first[2:])


# overlaps: area order by default, explicit priority wins, switched-off subjects take no part

HAT_ON_DOG = [(0.25, 0.25, 0.5, 0.75), (0.0, 0.0, 0.75, 1.0)]  # the nested box listed first


def _every_site(adapter, plan, sigma=None):
    """The plan's output at every site of the adapter, each on its SDXL grid (64 channels: /2, 128: /4)."""
    gen = torch.Generator().manual_seed(5)
    outs = []
    for site in range(len(adapter.sites)):
        width = adapter.to_k_ip[site].shape[0]
        downscale = 2 if width == 64 else 4
        grid = TokenGrid.from_latent(*LATENT, downscale)
        q = torch.randn(2, grid.num_tokens, width, generator=gen)
        out = torch.randn(2, grid.num_tokens, width, generator=gen)
        outs.append(plan.add_image_attention(
            out, q, site=site, heads=HEADS, latent_hw=LATENT, cond_or_uncond=[0, 1], sigma=sigma))
    return outs


def test_nested_box_listed_first_keeps_its_tokens_by_default(adapter):
    layout = Layout.from_boxes(128, 96, HAT_ON_DOG, ["hat", "dog"])
    plan = AnyMSPlan(_subjects(adapter, 2, priorities=[0, 0]), layout, AnyMSConfig())
    for downscale in (1, 2, 4):
        grid = TokenGrid.from_latent(*LATENT, downscale)
        gp = plan.grid_plan(*LATENT, grid.num_tokens, torch.device("cpu"))
        owned = plan.owned_tokens(gp, (0, 1))
        assert torch.equal(owned[0], torch.nonzero(gp.token_masks[0]).squeeze(1))  # all of the hat's tokens
        assert owned[1].numel() == int(gp.token_masks[1].sum()) - owned[0].numel()


def test_explicit_priority_beats_area_and_a_subject_left_without_tokens_is_warned_once(adapter, caplog):
    layout = Layout.from_boxes(128, 96, HAT_ON_DOG, ["hat", "dog"])
    plan = AnyMSPlan(_subjects(adapter, 2, priorities=[0, 1]), layout, AnyMSConfig())
    q, k, v = _qkv()
    with caplog.at_level(logging.WARNING, logger="multisubject"):
        _run(plan, q, k, v)
        _run(plan, q, k, v)
    gp = plan.grid_plan(*LATENT, LATENT[0] * LATENT[1], torch.device("cpu"))
    assert plan.owned_tokens(gp, (0, 1))[0].numel() == 0
    assert caplog.text.count("'hat' owns no token of the 12x16 token grid: 'dog' cover(s) all of its region") == 1


@pytest.mark.parametrize("switch", ["weight_zero", "not_yet_started", "already_ended"])
def test_a_switched_off_subject_changes_nothing_at_every_site(adapter, switch):
    # the hat listed after the dog: it owned its tokens whatever the rule, and punched a hole in the dog when off
    dog, hat = _subjects(adapter, 2, priorities=[0, 0]).items
    dog_then_hat = Layout.from_boxes(128, 96, HAT_ON_DOG[::-1])
    off = {
        "weight_zero": dict(fields={"weight": 0.0}, ranges=None, sigma=None),
        "not_yet_started": dict(fields={}, ranges=[(math.inf, 0.0), (3.0, 0.0)], sigma=torch.tensor([7.0, 7.0])),
        "already_ended": dict(fields={}, ranges=[(math.inf, 0.0), (math.inf, 5.0)], sigma=torch.tensor([2.0, 2.0])),
    }[switch]
    hat_off = dataclasses.replace(hat, **off["fields"])
    both = AnyMSPlan(EncodedSubjects(adapter, (dog, hat_off)), dog_then_hat, AnyMSConfig(), sigma_ranges=off["ranges"])
    left_out = AnyMSPlan(EncodedSubjects(adapter, (dog,)), Layout.from_boxes(128, 96, HAT_ON_DOG[1:]), AnyMSConfig())
    with_hat_off = _every_site(adapter, both, sigma=off["sigma"])
    without_hat = _every_site(adapter, left_out, sigma=off["sigma"])
    assert len(with_hat_off) == 70
    for site, (a, b) in enumerate(zip(with_hat_off, without_hat)):
        assert torch.equal(a, b), f"site {site}: the switched-off subject changed the output"
    # and the same hat, switched on, does change every site: the comparison can fail
    on = AnyMSPlan(EncodedSubjects(adapter, (dog, hat)), dog_then_hat, AnyMSConfig())
    assert not any(torch.equal(a, b) for a, b in zip(_every_site(adapter, on), without_hat))


def test_layout_aspect_different_from_the_latent_names_both():
    adapter = adapter_from_state_dict(adapter_state("sdxl", "global", clip_dim=24))
    plan = AnyMSPlan(_subjects(adapter, 1), Layout.from_boxes(100, 100, [(0, 0, 1, 1)]), AnyMSConfig())
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"layout canvas 100x100 .* does not match the latent 16x12"):
        _run(plan, q, k, v)


def test_more_boxes_than_subjects_or_the_reverse_is_rejected(adapter):
    with pytest.raises(ValueError, match=r"layout has 3 region\(s\) but 2 subject\(s\)"):
        AnyMSPlan(_subjects(adapter, 2), _layout(3), AnyMSConfig())
    with pytest.raises(ValueError, match=r"layout has 1 region\(s\) but 2 subject\(s\)"):
        AnyMSPlan(_subjects(adapter, 2), _layout(1), AnyMSConfig())


def test_box_too_small_for_the_coarsest_grid_keeps_one_token_and_warns(adapter, caplog):
    layout = Layout.from_boxes(128, 96, [(0.50, 0.50, 0.52, 0.52)], ["tiny"])
    plan = AnyMSPlan(_subjects(adapter, 1), layout, AnyMSConfig())
    with caplog.at_level(logging.WARNING, logger="multisubject"):
        grid = plan.grid_plan(12, 16, 3 * 4, torch.device("cpu"))  # /4 grid: 3x4 tokens
    assert plan.owned_tokens(grid, (0,))[0].numel() == 1
    assert "box of tiny is smaller than one token of the 3x4 grid; kept at 1x1" in caplog.text


def test_bounding_box_region_source_turns_masks_into_boxes(adapter):
    mask = torch.zeros(96, 128)
    mask[10:20, 10:20] = 1
    mask[60:70, 90:100] = 1
    layout = Layout.from_masks(mask[None])
    as_drawn = AnyMSPlan(_subjects(adapter, 1), layout, AnyMSConfig()).grid_plan(12, 16, 192, torch.device("cpu"))
    boxed = AnyMSPlan(_subjects(adapter, 1), layout, AnyMSConfig(region_source="bounding_box")).grid_plan(
        12, 16, 192, torch.device("cpu"))
    assert boxed.token_masks[0].sum() > as_drawn.token_masks[0].sum()


def test_config_rejects_unknown_mode_and_out_of_range_scale():
    with pytest.raises(ValueError, match=r"mode must be one of \['crop_merge', 'masked_sum', 'global'\]"):
        AnyMSConfig(mode="soft")
    with pytest.raises(ValueError, match="adapter scale must be within"):
        AnyMSConfig(scale=-1)


def test_reference_images_are_averaged_in_token_space():
    tokens = torch.randn(3, 4, 8)
    torch.testing.assert_close(average_reference_tokens(tokens), tokens.mean(0))


def test_plan_survives_deepcopy_as_the_same_object(adapter):
    import copy

    plan = AnyMSPlan(_subjects(adapter, 1), _layout(1), AnyMSConfig())
    assert copy.deepcopy({"p": plan})["p"] is plan


def test_fp16_adapter_weights_and_bf16_activations_match_float32_closely():
    state = {k: v.half() for k, v in adapter_state("sdxl", "global", clip_dim=24).items()}
    adapter = adapter_from_state_dict(state)
    assert adapter.to_k_ip[0].dtype == torch.float16  # kept in the file's dtype
    subjects, layout = _subjects(adapter, 3), _layout()
    q, k, v = _qkv()
    exact = _run(AnyMSPlan(subjects, layout, AnyMSConfig()), q, k, v)
    plan = AnyMSPlan(subjects, layout, AnyMSConfig())
    low = plan.add_image_attention(
        sdpa_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), HEADS), q.bfloat16(), site=SITE, heads=HEADS,
        latent_hw=LATENT, cond_or_uncond=[0, 1],
    )
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), exact, atol=0.1, rtol=0.05)
