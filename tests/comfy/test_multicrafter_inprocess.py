"""MultiCrafter on a tiny FLUX built from ComfyUI's own classes: UnoPE ids, references, MoE-LoRA loading,
layout-masked reference attention on every CPU backend, and attention maps."""

import math

import pytest
import torch
from fixture_nodes.fx_flux import TINY_FLUX, build_tiny_flux, build_tiny_flux_vae, tiny_flux_conditioning

from multisubject.attention.binding import BindingConfig, BindingPlan, SubjectBinding
from multisubject.attention.families import FLUX
from multisubject.attention.layout import Layout
from multisubject.attention.moe_lora import MoELoRA, MoELoRAConfig
from multisubject.attention.subjects import Subject, Subjects
from multisubject.attention.unope import unope_ids
from multisubject.attention.weights import LoRAConfig, LoRAPair, MoEExperts, MultiCrafterWeights

HIDDEN = TINY_FLUX["hidden_size"]


@pytest.fixture(scope="module")
def flux(comfy):
    return build_tiny_flux()


@pytest.fixture(scope="module")
def vae(comfy):
    return build_tiny_flux_vae()


def _node(comfy, name):
    return comfy.NODE_CLASS_MAPPINGS[name]


def _subjects(images_per_subject=(1, 2), size=(48, 40)):
    chain = Subjects()
    for j, count in enumerate(images_per_subject):
        torch.manual_seed(j)
        chain = chain.append(Subject(images=torch.rand(count, *size, 3), label=f"s{j}", priority=j))
    return chain


def _sample(model, positive, negative, latent, cfg=1.0, steps=2, seed=0):
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, latent,
                                   disable_pbar=True, seed=seed)


# UnoPE: ComfyUI's "uxo" ids against the spec's recurrence


def _comfy_ids(flux, ref_sizes, latent_hw=(12, 10)):
    captured = {}

    def post_input(args):
        captured["ids"] = args["img_ids"]
        return args

    refs = [torch.randn(1, 16, h, w) for h, w in ref_sizes]
    flux.model.diffusion_model(
        torch.randn(1, 16, *latent_hw), torch.tensor([0.5]), torch.randn(1, 8, 32), torch.randn(1, 32),
        torch.tensor([3.5]), ref_latents=refs, transformer_options={"patches": {"post_input": [post_input]}},
        ref_latents_method="uxo",
    )
    return captured["ids"][0].float()


@pytest.mark.parametrize("ref_sizes", [
    [(40, 40)], [(40, 40), (24, 40)], [(8, 12), (16, 6), (10, 10)], [(8, 12), (16, 6), (10, 10), (4, 4)],
], ids=["1 ref", "2 refs", "3 refs", "4 refs"])
@pytest.mark.parametrize("latent_hw", [(12, 10), (13, 9)], ids=["even latent", "odd latent"])
def test_comfy_uxo_ids_equal_the_unope_recurrence(flux, ref_sizes, latent_hw):
    grid = (-(-latent_hw[0] // 2), -(-latent_hw[1] // 2))
    expected = unope_ids(grid, [(h // 2, w // 2) for h, w in ref_sizes])
    assert torch.equal(_comfy_ids(flux, ref_sizes, latent_hw), expected)


def test_uxo_drifts_from_unope_only_after_odd_reference_latents(flux):
    # our references are multiples of 16 px (even latents), so this case never reaches the model from our node
    odd = [(9, 7), (5, 3), (4, 4)]
    expected = unope_ids((6, 5), [(-(-h // 2), -(-w // 2)) for h, w in odd])
    assert not torch.equal(_comfy_ids(flux, odd), expected)


# references node


def test_references_node_appends_one_even_latent_per_image_to_both_conditionings(comfy, vae):
    cond, neg = tiny_flux_conditioning(1), tiny_flux_conditioning(2)
    out = _node(comfy, "MS_MultiCrafterReferences").execute(cond, neg, _subjects(), vae, 64, True).result
    pos, negative, refs = out
    assert refs.subject_index == (0, 1, 1) and refs.labels == ("s0", "s1") and refs.priorities == (0, 1)
    assert refs.latent_sizes == ((8, 6), (8, 6), (8, 6))  # 48x40 -> 64x48 px (aspect kept, multiples of 16)
    for c in (pos, negative):
        assert [r.shape for r in c[0][1]["reference_latents"]] == [(1, 16, 8, 6)] * 3
        assert c[0][1]["reference_latents_method"] == "uxo"
    assert "reference_latents" not in cond[0][1]  # the incoming conditioning is untouched
    square = _node(comfy, "MS_MultiCrafterReferences").execute(cond, neg, _subjects(), vae, 64, False).result[2]
    assert square.latent_sizes == ((8, 8),) * 3


def test_references_refuse_a_non_flux_vae_and_conditioning_that_has_references(comfy, vae):
    from comfy.sd import VAE
    from comfy.taesd.taesd import TAESD

    sd_vae = VAE(sd=TAESD(latent_channels=4).state_dict())
    node = _node(comfy, "MS_MultiCrafterReferences")
    cond = tiny_flux_conditioning()
    with pytest.raises(ValueError, match="this VAE has 4 latent channels"):
        node.execute(cond, cond, _subjects(), sd_vae, 64, False)
    pos = node.execute(cond, cond, _subjects(), vae, 64, False).result[0]
    with pytest.raises(ValueError, match="already carries 3 reference latent"):
        node.execute(pos, cond, _subjects(), vae, 64, False)


# MoE-LoRA loader


def _weights(hidden=HIDDEN, zero_experts=False, targets=("double_blocks.0.img_mlp", "double_blocks.1.img_mlp"),
             with_lora=True, seed=0):
    torch.manual_seed(seed)
    cfg = MoELoRAConfig(num_experts=3, rank=4, alpha=4.0, top_k=1, targets=targets)
    moe = {}
    for path in targets:
        module = MoELoRA(hidden, hidden, cfg)
        if not zero_experts:
            with torch.no_grad():
                module.lora_B.normal_(0, 0.5)
        moe[path] = MoEExperts.from_module(module)
    lora, lora_cfg = {}, LoRAConfig(rank=2, alpha=2.0, targets=())
    if with_lora:
        path = "double_blocks.0.img_attn.qkv"
        lora = {path: LoRAPair(torch.randn(2, hidden) * 0.3, torch.randn(3 * hidden, 2) * 0.3)}
        lora_cfg = LoRAConfig(rank=2, alpha=2.0, targets=(path,))
    return MultiCrafterWeights(cfg, moe, lora_cfg, lora)


@pytest.fixture(scope="module")
def inputs(comfy):
    return tiny_flux_conditioning(1), tiny_flux_conditioning(2), torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))


def test_zero_experts_and_zero_strength_equal_the_base_model_exactly(flux, inputs):
    from multisubject.nodes.moe_lora import apply_multicrafter_weights

    base = _sample(flux, *inputs)
    zero = apply_multicrafter_weights(flux, _weights(zero_experts=True, with_lora=False), 1.0, 1.0)
    off = apply_multicrafter_weights(flux, _weights(), 0.0, 0.0)
    assert torch.equal(_sample(zero, *inputs), base)
    assert torch.equal(_sample(off, *inputs), base)


def test_loaded_file_reproduces_in_memory_experts_and_leaves_other_clones_alone(comfy, flux, inputs, tmp_path):
    import folder_paths

    from multisubject.attention.moe_lora import MoELoRAFFN
    from multisubject.attention.weights import save_multicrafter_weights

    w = _weights(with_lora=False)
    save_multicrafter_weights(w, tmp_path / "mc.safetensors")
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    base = _sample(flux, *inputs)
    other = flux.clone()
    loaded = _node(comfy, "MS_LoadMoELoRA").execute(flux, "mc.safetensors", 0.7, 1.0).result[0]
    by_hand = flux.clone()
    for path, experts in w.moe.items():
        name = f"diffusion_model.{path}"
        by_hand.add_object_patch(name, MoELoRAFFN(flux.get_model_object(name), experts.to_module(w.moe_config), 0.7))
    patched = _sample(loaded, *inputs)
    assert not torch.allclose(patched, base)
    assert torch.equal(patched, _sample(by_hand, *inputs))
    assert torch.equal(_sample(flux, *inputs), base) and torch.equal(_sample(other, *inputs), base)
    assert not flux.object_patches and not isinstance(flux.model.diffusion_model.double_blocks[0].img_mlp, MoELoRAFFN)


def test_attention_lora_part_loads_through_the_stock_lora_loader_and_composes(flux, inputs):
    import comfy.sd

    from multisubject.attention.weights import to_state_dict
    from multisubject.nodes.moe_lora import apply_multicrafter_weights

    tensors, _ = to_state_dict(_weights())
    stock, _ = comfy.sd.load_lora_for_models(flux, None, tensors, 1.0, 0.0)
    assert "diffusion_model.double_blocks.0.img_attn.qkv.weight" in stock.patches
    # another LoRA on the FFN's own Linear composes with the MoE wrapper around that FFN
    ffn_lora = {"diffusion_model.double_blocks.0.img_mlp.0.lora_A.weight": torch.randn(2, HIDDEN) * 0.3,
                "diffusion_model.double_blocks.0.img_mlp.0.lora_B.weight": torch.randn(4 * HIDDEN, 2) * 0.3}
    other, _ = comfy.sd.load_lora_for_models(flux, None, ffn_lora, 1.0, 0.0)
    both = apply_multicrafter_weights(other, _weights(), 1.0, 1.0)
    only_moe = apply_multicrafter_weights(flux, _weights(), 1.0, 1.0)
    outs = [_sample(m, *inputs) for m in (flux, other, only_moe, both)]
    assert all(torch.isfinite(o).all() for o in outs)
    assert not torch.allclose(outs[3], outs[2]) and not torch.allclose(outs[3], outs[1])


@pytest.mark.parametrize("dtype, compute_dtype", [(torch.bfloat16, None), (torch.float8_e4m3fn, torch.float32)],
                         ids=["bf16 weights", "fp8 weights, fp32 compute"])
def test_moe_lora_runs_on_half_and_fp8_base_weights(comfy, inputs, dtype, compute_dtype):
    from multisubject.nodes.moe_lora import apply_multicrafter_weights

    model = build_tiny_flux(0, dtype, compute_dtype)
    assert model.model.diffusion_model.double_blocks[0].img_mlp[0].weight.dtype == dtype
    base = _sample(model, *inputs)
    patched = _sample(apply_multicrafter_weights(model, _weights(), 1.0, 1.0), *inputs)
    assert torch.isfinite(patched).all() and not torch.allclose(patched, base)
    assert torch.equal(_sample(apply_multicrafter_weights(model, _weights(), 0.0, 0.0), *inputs), base)


def test_loader_errors_name_the_model_and_the_mismatch(flux):
    from multisubject.nodes.moe_lora import apply_multicrafter_weights

    with pytest.raises(ValueError, match=r"the file has 32 -> 32 features but this FLUX model \(hidden 64"):
        apply_multicrafter_weights(flux, _weights(hidden=32, with_lora=False), 1.0, 1.0)
    with pytest.raises(ValueError, match="double_blocks.5.img_mlp does not exist"):
        apply_multicrafter_weights(flux, _weights(targets=("double_blocks.5.img_mlp",), with_lora=False), 1.0, 1.0)

    class SDXL(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion_model = torch.nn.Linear(1, 1)

    class Patcher:
        model = SDXL()

    with pytest.raises(TypeError, match="needs a FLUX.1 model, but got SDXL"):
        apply_multicrafter_weights(Patcher(), _weights(), 1.0, 1.0)
    loaded = apply_multicrafter_weights(flux, _weights(with_lora=False), 1.0, 1.0)
    with pytest.raises(ValueError, match="already carries a MoE-LoRA"):
        apply_multicrafter_weights(loaded, _weights(with_lora=False), 1.0, 1.0)


# layout-masked reference attention


@pytest.mark.parametrize("backend", ["basic", "sub_quad", "split", "pytorch"])
def test_layout_bias_is_exact_on_every_cpu_attention_backend(comfy, backend):
    import comfy.ldm.modules.attention as attention

    func = getattr(attention, f"attention_{backend}")
    layout = FLUX.token_layout(4, (6, 8), [(4, 4), (4, 6)])
    boxes = Layout.from_boxes(64, 48, [(0, 0, 0.5, 1), (0.5, 0, 1, 1)])
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, layout.total, 8) for _ in range(3))
    for strength in (1.0, 0.6):
        plan = BindingPlan(boxes, [SubjectBinding(1), SubjectBinding(1)], BindingConfig(strength, "both"))
        bias = plan.for_call(layout, (6, 8), 2, 1.0, torch.float32, "cpu").bias()
        expected = ((q @ k.transpose(-1, -2)) / math.sqrt(8) + bias).softmax(-1) @ v  # (B, H, N, D)
        out = func(q, k, v, 2, mask=bias, skip_reshape=True)  # (B, N, H*D)
        assert torch.allclose(out, expected.transpose(1, 2).reshape(2, layout.total, 16), atol=1e-5)


def _apply(comfy, model, refs, layout=None, strength=1.0, start=0.0, end=1.0):
    return _node(comfy, "MS_ApplyMultiCrafter").execute(model, refs, strength, start, end, layout=layout).result[0]


def _references(comfy, vae, subjects, cond=None, neg=None):
    cond = cond or tiny_flux_conditioning(1, batch=1)
    neg = neg or tiny_flux_conditioning(2, batch=1)
    return _node(comfy, "MS_MultiCrafterReferences").execute(cond, neg, subjects, vae, 32, False).result


def test_apply_with_cfg_batch_two_and_three_references_masks_each_call_once(comfy, flux, vae):
    from multisubject.nodes.binding import ReferenceBindingPatch

    pos, neg, refs = _references(comfy, vae, _subjects((1, 2)))
    layout = Layout.from_boxes(64, 64, [(0, 0, 0.5, 1), (0.5, 0, 1, 1)])
    latent = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    plain = _sample(flux, pos, neg, latent, cfg=2.0)
    masked_model = _apply(comfy, flux, refs, layout)
    patch = masked_model.model_options["transformer_options"]["optimized_attention_override"]
    assert type(patch).__name__ == ReferenceBindingPatch.__name__ and "optimized_attention_override" not in flux.model_options.get(
        "transformer_options", {})
    masked = _sample(masked_model, pos, neg, latent, cfg=2.0)
    assert masked.shape == (2, 16, 8, 8) and torch.isfinite(masked).all()
    assert not torch.allclose(masked, plain)
    assert patch.plan.cached_calls() == 1  # cond and uncond share one layout: one bias for every call
    assert torch.equal(_sample(_apply(comfy, flux, refs, layout, strength=0.0), pos, neg, latent, cfg=2.0), plain)
    assert torch.equal(_sample(_apply(comfy, flux, refs, None), pos, neg, latent, cfg=2.0), plain)
    late = _apply(comfy, flux, refs, layout, start=0.99, end=1.0)  # the 2-step schedule never reaches 99 %
    assert torch.equal(_sample(late, pos, neg, latent, cfg=2.0), plain)
    # a negative without references runs as its own batch (different length); it gets no bias
    plain_negative = tiny_flux_conditioning(2, batch=1)
    mixed = _sample(masked_model, pos, plain_negative, latent, cfg=2.0)
    assert torch.isfinite(mixed).all() and patch.plan.cached_calls() == 1


def test_apply_errors_for_wrong_subject_count_and_mismatched_references(comfy, flux, vae):
    pos, neg, refs = _references(comfy, vae, _subjects((1, 1)))
    three = Layout.from_boxes(64, 64, [(0, 0, 0.3, 1), (0.3, 0, 0.6, 1), (0.6, 0, 1, 1)])
    with pytest.raises(ValueError, match=r"layout has 3 region\(s\) but 2 subject\(s\)"):
        _apply(comfy, flux, refs, three)
    _, _, other_refs = _references(comfy, vae, _subjects((1, 2)))
    model = _apply(comfy, flux, other_refs, Layout.from_boxes(64, 64, [(0, 0, 0.5, 1), (0.5, 0, 1, 1)]))
    with pytest.raises(ValueError, match=r"the subjects own 3 reference image\(s\) \(\[1, 2\] per subject\) but the "
                                         r"conditioning carries 2 reference latent\(s\) \(added by ReferenceLatent"):
        _sample(model, pos, neg, torch.zeros(1, 16, 8, 8))
    wide = Layout.from_boxes(128, 64, [(0, 0, 0.5, 1), (0.5, 0, 1, 1)])
    with pytest.raises(ValueError, match="does not match the latent"):
        _sample(_apply(comfy, flux, refs, wide), pos, neg, torch.zeros(1, 16, 8, 8))


# attention maps


def test_attention_map_node_gives_one_heatmap_and_mask_per_subject(comfy, flux, vae):
    pos, neg, refs = _references(comfy, vae, _subjects((1, 2)))
    latent = {"samples": torch.randn(1, 16, 8, 10)}
    node = _node(comfy, "MS_MultiCrafterAttentionMaps")
    out = node.execute(flux, pos, latent, refs, "0.3, 0.6", "reference_to_image", False, 0)
    heat, masks = out.result
    assert heat.shape == (2, 64, 80, 3) and masks.shape == (2, 64, 80)
    assert masks.min() >= 0 and masks.max() <= 1 and torch.allclose(masks.flatten(1).amax(1), torch.ones(2), atol=1e-4)
    image = torch.rand(1, 64, 80, 3)
    over = node.execute(flux, pos, latent, refs, "0.5", "reference_to_image", True, 0, image=image).result[0]
    assert over.shape == (2, 64, 80, 3)


def test_hard_block_shows_as_zero_image_to_reference_attention_outside_each_region(comfy, flux, vae):
    pos, neg, refs = _references(comfy, vae, _subjects((1, 1)))
    layout = Layout.from_boxes(80, 64, [(0, 0, 0.4, 1), (0.6, 0, 1, 1)])
    model = _apply(comfy, flux, refs, layout)
    masks = _node(comfy, "MS_MultiCrafterAttentionMaps").execute(
        model, pos, {"samples": torch.randn(1, 16, 8, 10)}, refs, "0.5", "image_to_reference", True, 0).result[1]
    # token columns (16 px each): subject 0 owns columns 0-1, subject 1 columns 3-4 of the 5-column grid
    assert masks[0, :, 32:].max() == 0 and masks[0, :, :32].min() > 0
    assert masks[1, :, :48].max() == 0 and masks[1, :, 48:].min() > 0


def test_flux_nodes_refuse_a_non_flux_model(comfy, vae):
    _, _, refs = _references(comfy, vae, _subjects((1,)))

    class UNetModel(torch.nn.Module):
        pass

    class SDXL(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion_model = UNetModel()

    class Patcher:
        model = SDXL()

        def get_model_object(self, name):
            return None

    with pytest.raises(TypeError, match=r"got SDXL \(diffusion model UNetModel\)"):
        _apply(comfy, Patcher(), refs)
