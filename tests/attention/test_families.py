"""The model-family registry: token arithmetic, joint order, joint-call recognition, the FLUX facts train/ reads."""

import math

import pytest

from multisubject.attention.families import FAMILIES, FLUX, OMNIGEN2, QWEN_IMAGE, TokenOrder, family_for_class


def test_every_family_has_one_entry_and_a_host_class():
    assert [f.name for f in FAMILIES] == ["flux", "qwen_image", "omnigen2"]
    assert family_for_class("Flux") is FLUX and family_for_class("QwenImageTransformer2DModel") is QWEN_IMAGE
    assert family_for_class("OmniGen2Transformer2DModel") is OMNIGEN2 and family_for_class("UNetModel") is None


def test_token_grids_pad_odd_latents_and_layouts_follow_the_family_order():
    assert FLUX.token_grid(13, 9) == (7, 5)
    flux = FLUX.token_layout(5, (8, 12), [(4, 4), (5, 3)])  # img 4x6, refs 2x2 and 3x2
    assert flux.image_span == (5, 29) and flux.reference_spans == [(29, 33), (33, 39)] and flux.total == 39
    omni = OMNIGEN2.token_layout(5, (8, 12), [(4, 4), (5, 3)])
    assert omni.order is TokenOrder.TXT_REFS_IMG
    assert omni.reference_spans == [(5, 9), (9, 15)] and omni.image_span == (15, 39) and omni.total == 39


@pytest.mark.parametrize("family, shape, method, tokens", [
    (FLUX, (1, 16, 40, 40), "offset", 400), (FLUX, (1, 16, 40, 40), "index", 400), (FLUX, (1, 16, 5, 3), "uxo", 6),
    (QWEN_IMAGE, (1, 16, 1, 40, 40), "index", 400), (QWEN_IMAGE, (1, 16, 1, 5, 3), "offset", 6),
    (OMNIGEN2, (1, 16, 5, 3), None, 6),
])
def test_reference_tokens_per_method(family, shape, method, tokens):
    assert family.reference_tokens(shape, method) == tokens


def test_unknown_methods_and_wrong_latent_shapes_are_named():
    with pytest.raises(ValueError, match=r"has no reference method 'uxo'; it implements \['index', 'offset'\]"):
        QWEN_IMAGE.reference_tokens((1, 16, 1, 4, 4), "uxo")
    with pytest.raises(ValueError, match=r"shaped \(B, 16, 1, h, w\), got \(1, 16, 4, 4\)"):
        QWEN_IMAGE.reference_tokens((1, 16, 4, 4))
    with pytest.raises(ValueError, match=r"shaped \(B, 16, h, w\), got \(1, 4, 4, 4\)"):
        FLUX.reference_tokens((1, 4, 4, 4))


def test_joint_calls_and_omnigen2_refiners_are_recognised_by_length():
    layout = OMNIGEN2.token_layout(5, (8, 12), [(4, 4)])
    assert OMNIGEN2.is_joint_call(layout.total, layout)
    assert not any(OMNIGEN2.is_joint_call(n, layout) for n in (5, 24, 4))  # context, noise, reference refiners
    flux = FLUX.token_layout(5, (8, 12), [(4, 4)])
    with pytest.raises(RuntimeError, match=r"sees 24 tokens, but text 5 \+ image 24 \+ references \[4\] = 33; another "
                                           "patch changed the token sequence"):
        FLUX.is_joint_call(24, flux)


def test_flux_time_shift_and_weight_format_are_the_facts_train_uses():
    shift = FLUX.time_shift
    assert shift.mu(256) == pytest.approx(0.5) and shift.mu(4096) == pytest.approx(1.15)
    mu = 0.5 + (1.15 - 0.5) * (1024 - 256) / (4096 - 256)  # train/losses.py's copy
    assert shift.shift(0.3, 1024) == pytest.approx(math.exp(mu) / (math.exp(mu) + (1 / 0.3 - 1)))
    fmt = FLUX.weight_format
    assert fmt.base_model == "flux1" and fmt.lora_prefix == "diffusion_model."
    assert fmt.lora_target.match("double_blocks.3.img_attn.qkv") and fmt.lora_target.match("single_blocks.0.linear2")
    assert fmt.moe_target.match("double_blocks.0.txt_mlp") and not fmt.moe_target.match("single_blocks.0.linear1")
    assert fmt.lora_leaves == ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "linear1", "linear2")
