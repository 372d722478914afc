"""Subject Attention Maps on tiny instances of ComfyUI's real Flux, Qwen-Image and OmniGen2: one heatmap and mask per
subject, and the leak figure (share of a subject's attention mass outside its region) that the heatmap prints."""

import pytest
import torch
from fixture_nodes.fx_families import FAMILY_NAMES, build_tiny, latent_shape, tiny_conditioning

from multisubject.attention.layout import Layout
from multisubject.attention.subjects import Subject, Subjects

TWO_BOXES = Layout.from_boxes(96, 64, [(0, 0, 0.5, 1), (0.5, 0, 1, 1)])  # 8x12 latent: token columns 0-2 | 3-5
REFS = [(4, 4), (6, 2)]


@pytest.fixture(scope="module")
def models(comfy):
    return {name: build_tiny(name) for name in FAMILY_NAMES}


def _latent(family, batch=1):
    return {"samples": torch.randn(latent_shape(family, batch, 8, 12), generator=torch.Generator().manual_seed(3))}


def _bind(comfy, model, strength=1.0, direction="image_to_reference", subjects=None):
    node = comfy.NODE_CLASS_MAPPINGS["MS_BindReferences"]
    return node.execute(model, TWO_BOXES, strength, direction, subjects=subjects).result[0]


def _maps(model, family, direction="image_to_reference", refs=REFS, **inputs):
    from multisubject.nodes.attention_maps import subject_attention_maps

    positive = tiny_conditioning(family, 1, ref_sizes=refs)
    with torch.inference_mode():
        return subject_attention_maps(model, positive, _latent(family), "0.5", direction, False, 0, **inputs)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_maps_per_subject_and_leak_zero_when_bound_positive_when_unbound(comfy, models, family):
    model = models[family]
    heat, masks, leaks = _maps(_bind(comfy, model), family, layout=TWO_BOXES)
    assert heat.shape == (2, 64, 96, 3) and masks.shape == (2, 64, 96)  # one per subject, image pixels
    assert masks.min() >= 0 and torch.allclose(masks.flatten(1).amax(1), torch.ones(2), atol=1e-4)
    assert leaks.shape == (1, 2) and leaks.max() < 1e-6  # strength 1: nothing outside the region
    assert masks[0, :, 48:].max() == 0 and masks[1, :, :48].max() == 0  # and the heatmap shows it
    _, _, unbound = _maps(model, family, layout=TWO_BOXES)
    assert unbound.min() > 0.2  # unbound references are seen from everywhere
    _, _, half = _maps(_bind(comfy, model, strength=0.5), family, layout=TWO_BOXES)
    assert (half > 0.02).all() and (half < unbound).all()


def test_reference_to_image_leak_needs_binding_in_both_directions(comfy, models):
    family = "omnigen2"  # [txt | refs | img]: the other token order
    one_way = _maps(_bind(comfy, models[family]), family, "reference_to_image", layout=TWO_BOXES)[2]
    both = _maps(_bind(comfy, models[family], direction="both"), family, "reference_to_image", layout=TWO_BOXES)[2]
    assert one_way.min() > 0.2 and both.max() < 1e-6


def test_subjects_own_consecutive_references_and_the_leak_is_printed(comfy, models):
    subjects = Subjects().append(Subject(images=torch.rand(1, 16, 16, 3), label="cat")).append(
        Subject(images=torch.rand(2, 16, 16, 3), label="dog"))
    node = comfy.NODE_CLASS_MAPPINGS["MS_MultiCrafterAttentionMaps"]
    positive = tiny_conditioning("qwen_image", 1, ref_sizes=[(4, 4), (6, 2), (2, 6)])
    bound = _bind(comfy, models["qwen_image"], subjects=subjects)
    out = node.execute(bound, positive, _latent("qwen_image"), "0.5", "image_to_reference", False, 0,
                       subjects=subjects, layout=TWO_BOXES)
    heat, masks = out.result
    assert heat.shape == (2, 64, 96, 3) and masks[1, :, :48].max() == 0  # "dog" owns references 1 and 2
    corner = heat[:, :12, :48]
    grey = (corner.amax(-1) - corner.amin(-1) < 0.02) & (corner.amin(-1) > 0.5)  # heat colours are never light grey
    assert grey.flatten(1).any(1).all()  # the caption's (anti-aliased white) text
    without = node.execute(bound, positive, _latent("qwen_image"), "0.5", "image_to_reference", False, 0,
                           subjects=subjects).result[0]
    assert without.shape == heat.shape  # no layout: maps without a leak figure


def test_without_subjects_or_layout_every_reference_is_one_map(comfy, models):
    heat, masks, leaks = _maps(models["omnigen2"], "omnigen2", refs=[(4, 4), (6, 2), (2, 2)])
    assert masks.shape == (3, 64, 96) and leaks is None


def test_bad_inputs_name_what_came(comfy, models):
    from multisubject.attention.subjects import Subjects as Chain

    three = Layout.from_boxes(96, 64, [(0, 0, 0.3, 1), (0.3, 0, 0.6, 1), (0.6, 0, 1, 1)])
    with pytest.raises(ValueError, match=r"the layout has 3 regions but the conditioning carries 2 reference"):
        _maps(models["flux"], "flux", layout=three)
    with pytest.raises(ValueError, match="subjects is connected but holds no subject"):
        _maps(models["flux"], "flux", subjects=Chain())
    square = Layout.from_boxes(64, 64, [(0, 0, 0.5, 1), (0.5, 0, 1, 1)])
    with pytest.raises(ValueError, match="does not match the latent"):
        _maps(models["qwen_image"], "qwen_image", layout=square)
    with pytest.raises(RuntimeError, match="no attention was recorded: the model ran without reference tokens"):
        _maps(models["flux"], "flux", refs=[])
