"""Reference binding on tiny instances of ComfyUI's real Flux, Qwen-Image and OmniGen2 classes: the family registry
against the host's own sequences, the binding's exactness (probed on every joint call), and the bad-input errors."""

import pytest
import torch
from fixture_nodes.fx_families import build_tiny, latent_shape, tiny_conditioning

from multisubject.attention.binding import BindingConfig, BindingPlan, SubjectBinding
from multisubject.attention.families import FLUX, OMNIGEN2, QWEN_IMAGE
from multisubject.attention.layout import Layout
from multisubject.attention.subjects import Subject, Subjects

FAMILIES = {"flux": FLUX, "qwen_image": QWEN_IMAGE, "omnigen2": OMNIGEN2}
METHODS = [("flux", "offset"), ("flux", "index"), ("flux", "uxo"), ("qwen_image", "index"), ("qwen_image", "offset"),
           ("omnigen2", None)]
JOINT_CALLS = {"flux": 3, "qwen_image": 2, "omnigen2": 2}  # joint attention calls per forward of the tiny models
TWO_BOXES = Layout.from_boxes(96, 64, [(0, 0, 0.5, 1), (0.5, 0, 1, 1)])  # 8x12 latent: token columns 0-2 | 3-5


@pytest.fixture(scope="module")
def models(comfy):
    return {name: build_tiny(name) for name in FAMILIES}


def _sample(model, positive, negative, latent, cfg=1.0, steps=2):
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, 0)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, latent,
                                   disable_pbar=True, seed=0)


def _latent(family, batch=1, h=8, w=12):
    return torch.randn(latent_shape(family, batch, h, w), generator=torch.Generator().manual_seed(3))


def _subjects(images=(1, 1), fields=None):
    chain = Subjects()
    for j, count in enumerate(images):
        chain = chain.append(Subject(images=torch.rand(count, 16, 16, 3), label=f"s{j}", **(fields or {}).get(j, {})))
    return chain


def _bind(comfy, model, layout, subjects=None, strength=1.0, direction="image_to_reference"):
    node = comfy.NODE_CLASS_MAPPINGS["MS_BindReferences"]
    return node.execute(model, layout, strength, direction, subjects=subjects).result[0]


class Probe:
    """Observer of the binding hook: attention probabilities of every joint call, from its final q, k and mask."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, layout, mask, is_double):
        logits = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        if mask is not None:
            logits = logits + mask.float()
        self.calls.append((layout, logits.softmax(-1)))  # (B, H, N, N)


def _probed(model, plan, family_name):
    from multisubject.nodes.binding import ReferenceBindingPatch

    probe = Probe()
    patched, _ = ReferenceBindingPatch.install(model, "test", plan, observer=probe)
    return patched, probe


def _ref_keys(layout, refs):
    return torch.cat([torch.arange(*layout.reference_spans[r]) for r in refs])


def _image_rows(layout, columns):
    """Joint-sequence rows of the image tokens in the given token columns."""
    h, w = layout.image_grid
    img0, _ = layout.image_span
    return torch.tensor([img0 + r * w + c for r in range(h) for c in columns])


# the family registry against the host's own sequences


class SeqRecorder:
    def __init__(self):
        self.lengths = []

    def __call__(self, func, *args, **kwargs):
        q = args[0]
        self.lengths.append(int(q.shape[2] if kwargs.get("skip_reshape") else q.shape[1]))
        return func(*args, **kwargs)


@pytest.mark.parametrize("family_name, method", METHODS)
def test_registry_token_counts_equal_the_hosts_own_sequence(models, family_name, method):
    family = FAMILIES[family_name]
    sizes = [(4, 6), (5, 3), (6, 4)]  # different sizes, one odd (padded by the host)
    expected = {}
    for case in [[s] for s in sizes] + [sizes]:
        model = models[family_name].clone()
        recorder = SeqRecorder()
        model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = recorder
        cond = tiny_conditioning(family_name, 1, ref_sizes=case, method=method)
        _sample(model, cond, cond, _latent(family_name, h=7, w=10), steps=1)
        shapes = [latent_shape(family_name, 1, h, w) for h, w in case]
        layout = family.token_layout(8, (7, 10), [(h, w) for h, w in case])
        assert sum(family.reference_tokens(s, method) for s in shapes) == layout.num_ref
        joint = [n for n in recorder.lengths if n == layout.total]
        assert len(joint) == JOINT_CALLS[family_name], (recorder.lengths, layout)
        others = sorted(set(recorder.lengths) - {layout.total})
        # only OmniGen2's refiners attend over text, image or references alone
        assert others == ([] if family_name != "omnigen2" else sorted({8, layout.num_img, layout.num_ref}))
        if len(case) == 1:
            expected[case[0]] = layout.num_ref
    assert expected == {(4, 6): 6, (5, 3): 6, (6, 4): 6}


# exactness, on every family and reference method


@pytest.mark.parametrize("family_name, method", METHODS)
def test_strength_one_leaves_no_probability_outside_each_region_on_every_joint_call(models, family_name, method):
    """Batch 2, a non-square latent, references of different sizes, CFG with a negative without references."""
    model = models[family_name]
    plan = BindingPlan(TWO_BOXES, [SubjectBinding(1), SubjectBinding(2)], BindingConfig(1.0))
    patched, probe = _probed(model, plan, family_name)
    # batch 2 from the latent, as with EmptyLatentImage (ComfyUI's OmniGen2 miscounts a batch-2 text mask)
    positive = tiny_conditioning(family_name, 1, ref_sizes=[(4, 4), (6, 2), (2, 6)], method=method)
    negative = tiny_conditioning(family_name, 2)
    out = _sample(patched, positive, negative, _latent(family_name, batch=2), cfg=2.0)
    assert out.shape == latent_shape(family_name, 2, 8, 12) and torch.isfinite(out).all()
    assert len(probe.calls) == 2 * JOINT_CALLS[family_name]  # 2 steps; the negative (no references) is not probed
    for layout, probs in probe.calls:
        assert probs.shape[0] == 2 and layout.image_grid == (4, 6)
        s0, s1 = _ref_keys(layout, [0]), _ref_keys(layout, [1, 2])
        left, right = _image_rows(layout, range(3)), _image_rows(layout, range(3, 6))
        assert probs[:, :, right][..., s0].max() == 0 and probs[:, :, left][..., s1].max() == 0
        assert probs[:, :, left][..., s0].min() > 0 and probs[:, :, right][..., s1].min() > 0
        text = torch.arange(layout.num_txt)
        assert probs[:, :, text][..., s0].min() > 0  # text and references are untouched


@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_split_merge_equals_the_bias_on_the_host(models, family_name):
    positive = tiny_conditioning(family_name, 1, ref_sizes=[(4, 4), (6, 2)])
    outs = {}
    for impl in ("bias", "split"):
        for strength in (1.0, 0.7):
            from multisubject.nodes.binding import ReferenceBindingPatch

            subjects = [SubjectBinding(1, weight=0.5), SubjectBinding(1, weight=2.0)]
            plan = BindingPlan(TWO_BOXES, subjects, BindingConfig(strength, "both", impl))
            patched, _ = ReferenceBindingPatch.install(models[family_name], "test", plan)
            outs[impl, strength] = _sample(patched, positive, positive, _latent(family_name))
    for strength in (1.0, 0.7):
        assert torch.allclose(outs["bias", strength], outs["split", strength], atol=1e-5)
    assert not torch.allclose(outs["bias", 1.0], outs["bias", 0.7])


@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_strength_zero_is_bit_identical_and_the_incoming_model_is_untouched(comfy, models, family_name):
    model = models[family_name]
    positive = tiny_conditioning(family_name, 1, ref_sizes=[(4, 4), (6, 2)])
    negative = tiny_conditioning(family_name, 2)
    latent = _latent(family_name)
    plain = _sample(model, positive, negative, latent, cfg=2.0)
    options_before = repr(model.model_options)
    off = _bind(comfy, model, TWO_BOXES, strength=0.0)
    assert torch.equal(_sample(off, positive, negative, latent, cfg=2.0), plain)
    bound = _bind(comfy, model, TWO_BOXES)
    assert not torch.allclose(_sample(bound, positive, negative, latent, cfg=2.0), plain)
    other_branch = model.clone()
    assert repr(model.model_options) == options_before and "optimized_attention_override" not in repr(
        model.model_options)
    assert torch.equal(_sample(model, positive, negative, latent, cfg=2.0), plain)
    assert torch.equal(_sample(other_branch, positive, negative, latent, cfg=2.0), plain)


@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_a_subject_outside_its_window_equals_that_subject_unbound(comfy, models, family_name):
    model = models[family_name]
    positive = tiny_conditioning(family_name, 1, ref_sizes=[(4, 4), (6, 2)])
    latent = _latent(family_name)
    late = _subjects((1, 1), {1: dict(start_percent=0.99, end_percent=1.0)})  # the 2-step schedule never gets there
    with_late = _sample(_bind(comfy, model, TWO_BOXES, late), positive, positive, latent)
    only_first = Layout.from_boxes(96, 64, [(0, 0, 0.5, 1)])  # region 0 binds reference 0; reference 1 unbound
    assert torch.equal(with_late, _sample(_bind(comfy, model, only_first), positive, positive, latent))
    both = _sample(_bind(comfy, model, TWO_BOXES, _subjects((1, 1))), positive, positive, latent)
    assert not torch.allclose(both, with_late)


@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_weight_zero_gives_that_subjects_references_no_attention_from_any_image_token(models, family_name):
    subjects = [SubjectBinding(1, weight=0.0), SubjectBinding(1, weight=1.0)]
    patched, probe = _probed(models[family_name], BindingPlan(TWO_BOXES, subjects, BindingConfig(0.0)), family_name)
    _sample(patched, *[tiny_conditioning(family_name, 1, ref_sizes=[(4, 4), (6, 2)])] * 2, _latent(family_name))
    assert len(probe.calls) == 2 * JOINT_CALLS[family_name]
    for layout, probs in probe.calls:
        img = torch.arange(*layout.image_span)
        assert probs[:, :, img][..., _ref_keys(layout, [0])].max() == 0
        assert probs[:, :, img][..., _ref_keys(layout, [1])].min() > 0


# bad input


def test_a_model_without_in_context_references_points_to_anyms(comfy):
    class UNetModel(torch.nn.Module):
        pass

    class SDXL(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion_model = UNetModel()

    class Patcher:
        model = SDXL()

    with pytest.raises(TypeError, match=r"Bind Subjects to Layout needs an in-context reference model \(.*\), but got "
                                        r"SDXL \(diffusion model UNetModel\); for SDXL/SD1.5 subjects use Apply AnyMS"):
        _bind(comfy, Patcher(), TWO_BOXES)


def test_more_regions_than_references_names_both_counts(comfy, models):
    three = Layout.from_boxes(96, 64, [(0, 0, 0.3, 1), (0.3, 0, 0.6, 1), (0.6, 0, 1, 1)])
    cond = tiny_conditioning("qwen_image", 1, ref_sizes=[(4, 4), (6, 2)])
    with pytest.raises(ValueError, match=r"the layout has 3 regions but the conditioning carries 2 reference "
                                         r"latent\(s\) \(added by TextEncodeQwenImageEditPlus"):
        _sample(_bind(comfy, models["qwen_image"], three), cond, cond, _latent("qwen_image"))


def test_subject_reference_count_differs_from_the_conditioning(comfy, models):
    cond = tiny_conditioning("flux", 1, ref_sizes=[(4, 4), (6, 2)])
    model = _bind(comfy, models["flux"], TWO_BOXES, _subjects((1, 2)))
    with pytest.raises(ValueError, match=r"the subjects own 3 reference image\(s\) \(\[1, 2\] per subject\) but the "
                                         r"conditioning carries 2 reference latent\(s\) \(added by ReferenceLatent"):
        _sample(model, cond, cond, _latent("flux"))
    with pytest.raises(ValueError, match=r"layout has 2 region\(s\) but 3 subject\(s\)"):
        _bind(comfy, models["flux"], TWO_BOXES, _subjects((1, 1, 1)))


def test_a_layout_of_another_aspect_is_refused(comfy, models):
    cond = tiny_conditioning("omnigen2", 1, ref_sizes=[(4, 4), (6, 2)])
    square = Layout.from_boxes(64, 64, [(0, 0, 0.5, 1), (0.5, 0, 1, 1)])
    with pytest.raises(ValueError, match=r"layout canvas 64x64 .* does not match the latent 12x8"):
        _sample(_bind(comfy, models["omnigen2"], square), cond, cond, _latent("omnigen2"))


def test_another_patch_that_changes_the_token_sequence_is_named(comfy, models):
    def prepend_two_tokens(args):
        txt, ids = args["txt"], args["txt_ids"]
        args["txt"] = torch.cat([txt[:, :2], txt], 1)
        args["txt_ids"] = torch.cat([ids[:, :2], ids], 1)
        return args

    model = _bind(comfy, models["flux"], TWO_BOXES)
    model.set_model_post_input_patch(prepend_two_tokens)
    cond = tiny_conditioning("flux", 1, ref_sizes=[(4, 4), (6, 2)])
    with pytest.raises(RuntimeError, match=r"sees 41 tokens, but text 8 \+ image 24 \+ references \[4, 3\] = 39; "
                                           r"another patch changed the token sequence"):
        _sample(model, cond, cond, _latent("flux"))


def test_a_4d_reference_on_qwen_image_is_refused_before_core_crashes(comfy, models):
    cond = tiny_conditioning("qwen_image", 1, ref_sizes=[(4, 4)])
    cond[0][1]["reference_latents"] = [torch.randn(1, 16, 4, 4)]
    # core's Wan latent scaling broadcasts a 4-D (1, 16, 4, 4) latent to (1, 16, 16, 4, 4) before the model sees it
    with pytest.raises(ValueError, match=r"needs every reference latent shaped \(B, 16, 1, h, w\), got \(1, 16, 16, 4, 4\); "
                                         r"encode each image on its own"):
        _sample(_bind(comfy, models["qwen_image"], TWO_BOXES), cond, cond, _latent("qwen_image"))
