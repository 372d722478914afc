"""Pure pieces of Subject Attention Maps: the leak share, references of no subject, the caption."""

import math

import pytest
import torch

from multisubject.attention.attention_maps import caption, leak_shares, reference_attention_maps
from multisubject.attention.families import OMNIGEN2


def test_leak_is_the_share_of_mass_outside_the_region():
    maps = torch.tensor([[[1.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])  # (B=1, S=2, L=4)
    owned = torch.tensor([[True, True, False, False], [False, False, True, True]])
    leaks = leak_shares(maps, owned)
    assert leaks[0, 0] == pytest.approx(0.5) and math.isnan(leaks[0, 1])  # no mass at all: not a 0% leak
    assert leak_shares(maps * owned, owned)[0, 0] == 0
    with pytest.raises(ValueError, match=r"ownership \(2, 3\) does not match the maps' \(subjects, tokens\) \(2, 4\)"):
        leak_shares(maps, owned[:, :3])


def test_a_reference_of_no_subject_adds_to_no_map():
    layout = OMNIGEN2.token_layout(2, (4, 4), [(2, 2), (2, 2)])  # [txt 2 | refs 1 + 1 | img 4]
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, layout.total, 8), torch.randn(1, 2, layout.total, 8)
    for direction in ("reference_to_image", "image_to_reference"):
        only_first = reference_attention_maps(q, k, layout, (0, -1), 1, direction)
        both = reference_attention_maps(q, k, layout, (0, 1), 2, direction)
        assert torch.allclose(only_first[:, 0], both[:, 0])


def test_caption_writes_light_text_on_a_dark_box_and_keeps_the_rest():
    images = torch.full((2, 64, 96, 3), 0.5)
    out = caption(images, ["cat: leak 0.0%", "dog: leak 12.5%"])
    assert out.shape == images.shape
    assert (out[:, :10, :20] < 0.5).any() and (out[:, :12, :60] > 0.6).flatten(1).any(1).all()
    assert torch.equal(out[:, 40:], images[:, 40:])
    with pytest.raises(ValueError, match="1 captions for 2 images"):
        caption(images, ["one"])
