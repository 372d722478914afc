"""Pure Flux reference pieces: UnoPE ids, token layout, layout bias, attention maps."""

import math

import pytest
import torch

from multisubject.attention.attention_maps import normalize_maps, reference_attention_maps
from multisubject.attention.binding import combine_with_mask
from multisubject.attention.families import TokenLayout
from multisubject.attention.reference_attention import ReferenceAttentionConfig
from multisubject.attention.unope import FluxReferences, reference_size, unope_ids


def test_unope_worked_example_from_the_spec():
    ids = unope_ids((32, 32), [(20, 20), (20, 20)])
    assert ids.shape == (1024 + 400 + 400, 3)
    assert (ids[:, 0] == 0).all()
    ref1, ref2 = ids[1024:1424], ids[1424:]
    assert (ref1[:, 1].min(), ref1[:, 1].max(), ref1[:, 2].min(), ref1[:, 2].max()) == (32, 51, 32, 51)
    assert (ref2[:, 1].min(), ref2[:, 1].max()) == (52, 71)
    assert ids[1024 + 21].tolist() == [0, 33, 33]  # row-major inside each reference


def test_unope_shifts_accumulate_for_different_reference_sizes():
    ids = unope_ids((3, 5), [(2, 4), (1, 1), (3, 2)])
    assert ids.shape == (15 + 8 + 1 + 6, 3)
    assert ids[15].tolist() == [0, 3, 5] and ids[23].tolist() == [0, 5, 9] and ids[24].tolist() == [0, 6, 10]


@pytest.mark.parametrize("hw, keep, expected", [
    ((600, 400), True, (320, 208)), ((400, 600), True, (208, 320)), ((600, 400), False, (320, 320)),
    ((1000, 20), True, (320, 16)),
])
def test_reference_sizes_are_whole_patches(hw, keep, expected):
    assert reference_size(*hw, 320, keep) == expected


def test_reference_size_must_be_a_multiple_of_16():
    with pytest.raises(ValueError, match="multiple of 16"):
        reference_size(100, 100, 300, True)


def test_references_record_checks_subjects():
    with pytest.raises(ValueError, match="cover every subject"):
        FluxReferences(((40, 40), (40, 40)), (0, 2), ("a", "b"))


LAYOUT = TokenLayout(num_txt=3, image_grid=(2, 3), reference_grids=((2, 2), (1, 2), (1, 1)))
SUBJECT_OF_REF = (0, 1, 1)  # subject 1 has two reference images


def test_token_layout_spans():
    assert LAYOUT.image_span == (3, 9)
    assert LAYOUT.reference_spans == [(9, 13), (13, 15), (15, 16)]
    assert LAYOUT.total == 16
    keys = LAYOUT.subject_key_mask(SUBJECT_OF_REF, 2)
    assert keys[0].nonzero().flatten().tolist() == [9, 10, 11, 12]
    assert keys[1].nonzero().flatten().tolist() == [13, 14, 15]
    with pytest.raises(ValueError, match="got 3 reference latent"):
        LAYOUT.subject_key_mask((0, 1), 2)


def _probs(q, k, bias=None):
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return (logits if bias is None else logits + bias).softmax(-1)


def test_incoming_bool_mask_is_converted_and_added():
    bias = torch.zeros(1, 1, 4, 4)
    mask = torch.ones(1, 4, 4, dtype=torch.bool)
    mask[0, 0, 1] = False
    out = combine_with_mask(bias, mask)
    assert out.shape == (1, 1, 4, 4) and out[0, 0, 0, 1] < -1e30 and out[0, 0, 0, 0] == 0


def test_config_validation_and_blocked_values():
    assert ReferenceAttentionConfig(strength=0.0).blocked_value(torch.float32) == 0.0
    assert ReferenceAttentionConfig().blocked_value(torch.float16) == torch.finfo(torch.float16).min / 4
    with pytest.raises(ValueError, match="strength"):
        ReferenceAttentionConfig(strength=1.5)
    with pytest.raises(ValueError, match="after end_percent"):
        ReferenceAttentionConfig(start_percent=0.8, end_percent=0.2)


@pytest.mark.parametrize("chunk", [1, 3, 512])
def test_attention_maps_match_the_full_matrix(chunk):
    torch.manual_seed(3)
    q, k = torch.randn(2, 3, 16, 8), torch.randn(2, 3, 16, 8)
    bias = torch.zeros(1, 1, 16, 16)
    bias[0, 0, 3:9, 9:13] = -5.0  # an additive bias on image rows -> subject 0's reference keys
    probs = _probs(q, k, bias).mean(1)  # (B, N, N)
    keys = LAYOUT.subject_key_mask(SUBJECT_OF_REF, 2)
    r2i = reference_attention_maps(q, k, LAYOUT, SUBJECT_OF_REF, 2, bias=bias, chunk=chunk)
    i2r = reference_attention_maps(q, k, LAYOUT, SUBJECT_OF_REF, 2, "image_to_reference", bias=bias, chunk=chunk)
    for j in range(2):
        expected_r2i = probs[:, keys[j]][:, :, 3:9].mean(1)
        expected_i2r = probs[:, 3:9][:, :, keys[j]].sum(-1)
        assert torch.allclose(r2i[:, j], expected_r2i, atol=1e-6)
        assert torch.allclose(i2r[:, j], expected_i2r, atol=1e-6)
    assert r2i.shape == (2, 2, 6)


def test_attention_maps_carry_gradients_and_normalise_to_unit_range():
    q = torch.randn(1, 2, 16, 8, requires_grad=True)
    maps = reference_attention_maps(q, torch.randn(1, 2, 16, 8), LAYOUT, SUBJECT_OF_REF, 2)
    maps.sum().backward()
    assert q.grad.abs().sum() > 0
    norm = normalize_maps(maps.detach())
    assert torch.allclose(norm.amax(-1), torch.ones(1, 2), atol=1e-4) and norm.amin() == 0


def test_heat_colours_span_black_to_pale_yellow_and_pixels_cut_the_padding():
    from multisubject.attention.attention_maps import HEAT_COLOURS, heat_colours, maps_to_pixels

    colours = heat_colours(torch.tensor([0.0, 1.0, float("nan"), 2.0]))
    assert torch.equal(colours[0], HEAT_COLOURS[0]) and torch.equal(colours[1], HEAT_COLOURS[-1])
    assert torch.equal(colours[2], HEAT_COLOURS[0]) and torch.equal(colours[3], HEAT_COLOURS[-1])
    maps = torch.arange(6.0).view(1, 1, 2, 3)  # a 3x5 latent pads to a 2x3 token grid
    pixels = maps_to_pixels(maps, 16, 24, 40)
    assert pixels.shape == (1, 1, 24, 40) and pixels[0, 0, 20, 39] == 5 and pixels[0, 0, 15, 15] == 0
    with pytest.raises(ValueError, match="do not cover"):
        maps_to_pixels(maps, 16, 40, 40)
