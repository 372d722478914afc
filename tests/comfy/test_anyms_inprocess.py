"""AnyMS inside ComfyUI's process: tiny SDXL/SD1.5 UNets from ComfyUI's classes, the real loader node, KSampler."""

import dataclasses

import pytest
import torch
from anyms_helpers import adapter_state
from fixture_nodes.fx_sdxl import CONTEXT_DIM, MODEL_CHANNELS, tiny_clip_vision, tiny_conditioning, tiny_sdxl
from safetensors.torch import save_file

from multisubject.attention.anyms import EncodedSubjects
from multisubject.attention.ip_adapter import sdxl_sites

LATENT = (16, 16)  # 128x128 px
BOXES = "0.05, 0.30, 0.55, 0.95\n0.50, 0.20, 0.95, 0.80"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run hundreds of small ops: on a shared CPU, OpenMP thread hand-offs cost 10-40x more than the math."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapter_dir(comfy, tmp_path_factory):
    import folder_paths

    folder = tmp_path_factory.mktemp("ipadapter")
    save_file(adapter_state("sdxl", "plus", model_channels=MODEL_CHANNELS, context_dim=CONTEXT_DIM, clip_dim=48), str(folder / "tiny_plus_sdxl.safetensors"))
    torch.save(adapter_state("sdxl", "global", model_channels=MODEL_CHANNELS, context_dim=CONTEXT_DIM, clip_dim=24,
                              nested=True),
               str(folder / "tiny_sdxl.bin"))
    save_file(adapter_state("sd15", "global", model_channels=32, context_dim=CONTEXT_DIM, clip_dim=24), str(folder / "tiny_sd15.safetensors"))
    save_file({"lora_unet_down.weight": torch.zeros(2, 2)}, str(folder / "not_an_adapter.safetensors"))
    folder_paths.add_model_folder_path("ipadapter", str(folder))
    return folder


@pytest.fixture(scope="module")
def model(comfy):
    return tiny_sdxl(seed=0)


@pytest.fixture(scope="module")
def clip_vision(comfy):
    return tiny_clip_vision()


def _node(comfy, name):
    return comfy.NODE_CLASS_MAPPINGS[name]


def _load(comfy, adapter_dir, name="tiny_plus_sdxl.safetensors"):
    return _node(comfy, "MS_LoadIPAdapter").execute(name).result[0]


def _subjects(comfy, count=2, **fields):
    chain = None
    for i in range(count):
        image = torch.zeros(2 if i == 0 else 1, 40, 32, 3)  # subject 0 has two reference images
        image[..., i % 3] = 1.0
        args = dict(label=f"s{i}", weight=1.0, start_percent=0.0, end_percent=1.0, priority=i, invert_mask=False)
        args.update(fields)
        chain = _node(comfy, "MS_Subject").execute(image, subjects=chain, **args).result[0]
    return chain


def _encoded(comfy, adapter_dir, clip_vision, adapter_name="tiny_plus_sdxl.safetensors", **fields):
    subjects = _subjects(comfy, **fields)
    adapter = _load(comfy, adapter_dir, adapter_name)
    return _node(comfy, "MS_EncodeSubjects").execute(subjects, clip_vision, adapter).result[0]


def _layout(comfy, boxes=BOXES, width=1024, height=1024):
    return _node(comfy, "MS_LayoutFromBoxes").execute(boxes, "normalized", width, height).result[0]


def _apply(comfy, model, encoded, layout, scale=1.0, mode="crop_merge"):
    return _node(comfy, "MS_ApplyAnyMS").execute(model, encoded, layout, scale, mode, "layout").result[0]


def _sample(patcher, latent=LATENT, batch=1, cfg=4.0, seed=0):
    import comfy.sample

    shape = (batch, 4, *latent)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(
        patcher, noise, 2, cfg, "euler", "normal", tiny_conditioning("a corgi and a teapot", batch),
        tiny_conditioning("blurry", batch), torch.zeros(shape), seed=seed,
    )


def test_loader_node_reads_safetensors_and_bin_and_detects_the_variant(comfy, adapter_dir):
    plus = _load(comfy, adapter_dir)
    base = _load(comfy, adapter_dir, "tiny_sdxl.bin")
    assert (plus.kind, plus.num_tokens, plus.base) == ("plus", 16, "sdxl")
    assert (base.kind, base.num_tokens, base.base) == ("global", 4, "sdxl")
    options = _node(comfy, "MS_LoadIPAdapter").GET_SCHEMA().inputs[0].options
    assert "tiny_plus_sdxl.safetensors" in options


def test_loader_rejects_a_file_that_is_not_an_ip_adapter(comfy, adapter_dir):
    with pytest.raises(ValueError, match="not_an_adapter.safetensors is not an IP-Adapter"):
        _load(comfy, adapter_dir, "not_an_adapter.safetensors")


def test_encoding_gives_cond_and_zero_image_uncond_tokens_per_subject(comfy, adapter_dir, clip_vision):
    encoded = _encoded(comfy, adapter_dir, clip_vision)
    assert len(encoded) == 2
    for s in encoded.items:
        assert s.cond.shape == (16, CONTEXT_DIM) and s.uncond.shape == (16, CONTEXT_DIM)
        assert not torch.equal(s.cond, s.uncond)
    # the uncond (zero image) tokens do not depend on the subject
    assert torch.equal(encoded.items[0].uncond, encoded.items[1].uncond)
    # two reference images of subject 0 are averaged in token space
    adapter = encoded.adapter
    image = torch.zeros(1, 40, 32, 3)
    image[..., 0] = 1.0
    single = adapter.project(clip_vision.encode_image(image)["penultimate_hidden_states"])[0]
    torch.testing.assert_close(encoded.items[0].cond, single, atol=1e-5, rtol=1e-5)


def test_clip_vision_width_not_matching_the_adapter_is_rejected(comfy, adapter_dir):
    narrow = tiny_clip_vision(hidden=40)
    with pytest.raises(ValueError, match=r"penultimate_hidden_states of shape \(\d+, 5, 40\).*expects width 48"):
        _encoded(comfy, adapter_dir, narrow)


def test_apply_patches_all_70_sites_of_a_clone_and_leaves_the_input_model_alone(comfy, model, adapter_dir, clip_vision):
    before_options = repr(model.model_options)
    before = _sample(model)
    patched = _apply(comfy, model, _encoded(comfy, adapter_dir, clip_vision), _layout(comfy))
    assert patched is not model
    keys = set(patched.model_options["transformer_options"]["patches_replace"]["attn2"])
    assert keys == set(sdxl_sites())
    assert repr(model.model_options) == before_options
    out = _sample(patched)
    assert torch.isfinite(out).all() and not torch.equal(out, before)
    assert torch.equal(_sample(model), before)  # unpatched model samples bit-identically afterwards


def test_cfg_batch_and_aspect_ratio_work_through_ksampler(comfy, model, adapter_dir, clip_vision):
    layout = _layout(comfy, width=1536, height=1024)
    patched = _apply(comfy, model, _encoded(comfy, adapter_dir, clip_vision), layout)
    out = _sample(patched, latent=(16, 24), batch=2, cfg=5.0)
    assert out.shape == (2, 4, 16, 24) and torch.isfinite(out).all()
    assert not torch.equal(out, _sample(model, latent=(16, 24), batch=2, cfg=5.0))


def test_subjects_with_weight_zero_leave_the_model_output_unchanged(comfy, model, adapter_dir, clip_vision):
    patched = _apply(comfy, model, _encoded(comfy, adapter_dir, clip_vision, weight=0.0), _layout(comfy))
    assert torch.equal(_sample(patched), _sample(model))  # bit-identical: same backend call as unpatched attn2


def test_subjects_outside_their_start_end_range_leave_the_model_output_unchanged(comfy, model, adapter_dir, clip_vision):
    # 2 "normal" euler steps evaluate the model at sigma ~14.6 and ~0.03; the window 0.3-0.6 contains neither
    late = _apply(comfy, model, _encoded(comfy, adapter_dir, clip_vision, start_percent=0.3, end_percent=0.6),
                  _layout(comfy))
    assert torch.equal(_sample(late), _sample(model))


@pytest.mark.parametrize("off", [{"weight": 0.0}, {"start_percent": 0.3, "end_percent": 0.6}], ids=["weight0", "window"])
def test_a_switched_off_subject_is_bit_identical_to_leaving_it_out(comfy, model, adapter_dir, clip_vision, off):
    # subject 1 (priority 1) overlaps subject 0: composited while off, it would take the overlap's tokens from it
    encoded = _encoded(comfy, adapter_dir, clip_vision)
    first, second = encoded.items
    with_off = EncodedSubjects(encoded.adapter, (first, dataclasses.replace(second, **off)))
    left_out = EncodedSubjects(encoded.adapter, (first,))
    got = _sample(_apply(comfy, model, with_off, _layout(comfy)))
    assert torch.equal(got, _sample(_apply(comfy, model, left_out, _layout(comfy, BOXES.splitlines()[0]))))
    assert not torch.equal(got, _sample(_apply(comfy, model, encoded, _layout(comfy))))  # on, it does act


@pytest.mark.parametrize("backend", ["attention_pytorch", "attention_sub_quad", "attention_split", "attention_basic"])
def test_comfyui_cpu_attention_backends_agree(comfy, model, adapter_dir, clip_vision, monkeypatch, backend):
    import comfy.ldm.modules.attention as attention

    patched = _apply(comfy, model, _encoded(comfy, adapter_dir, clip_vision), _layout(comfy))
    reference = _sample(patched)
    # every site is patched, so the backend swap reaches text and image attention alike
    monkeypatch.setattr(attention, "optimized_attention", getattr(attention, backend))
    torch.testing.assert_close(_sample(patched), reference, atol=2e-3, rtol=2e-3)


def test_every_mode_runs_and_modes_differ(comfy, model, adapter_dir, clip_vision):
    encoded, layout = _encoded(comfy, adapter_dir, clip_vision), _layout(comfy)
    outs = {mode: _sample(_apply(comfy, model, encoded, layout, mode=mode)) for mode in ("crop_merge", "masked_sum", "global")}
    assert all(torch.isfinite(o).all() for o in outs.values())
    assert not torch.equal(outs["crop_merge"], outs["masked_sum"]) and not torch.equal(outs["crop_merge"], outs["global"])


def test_works_on_top_of_a_lora_patched_model(comfy, model, adapter_dir, clip_vision):
    lora = model.clone()
    key = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_q.weight"
    weight = model.get_model_object(key[: -len(".weight")]).weight
    lora.add_patches({key: (torch.randn_like(weight) * 0.1,)}, 1.0)
    patched = _apply(comfy, lora, _encoded(comfy, adapter_dir, clip_vision), _layout(comfy))
    with_lora = _sample(patched)
    assert torch.isfinite(with_lora).all()
    assert not torch.equal(with_lora, _sample(_apply(comfy, model, _encoded(comfy, adapter_dir, clip_vision), _layout(comfy))))


def test_sd15_adapter_on_sdxl_is_rejected_naming_both(comfy, model, adapter_dir, clip_vision):
    encoded = _encoded(comfy, adapter_dir, tiny_clip_vision(), adapter_name="tiny_sd15.safetensors")
    with pytest.raises(ValueError, match=r"SD1\.5 adapter \(16 cross-attention sites\), but this SDXL UNet has 70"):
        _apply(comfy, model, encoded, _layout(comfy))


def test_sdxl_adapter_on_sd15_is_rejected_and_sd15_adapter_runs_on_sd15(comfy, adapter_dir, clip_vision):
    sd15 = _tiny_sd15()
    with pytest.raises(ValueError, match=r"SDXL adapter \(70 cross-attention sites\), but this BaseModel UNet has 16"):
        _apply(comfy, sd15, _encoded(comfy, adapter_dir, clip_vision), _layout(comfy))
    encoded = _encoded(comfy, adapter_dir, clip_vision, adapter_name="tiny_sd15.safetensors")
    out = _sample(_apply(comfy, sd15, encoded, _layout(comfy)))
    assert torch.isfinite(out).all() and not torch.equal(out, _sample(sd15))


def test_non_sd_model_is_rejected_naming_the_model_class(comfy, adapter_dir, clip_vision):
    with pytest.raises(RuntimeError, match=r"this model is Flux \(Flux\)"):
        _apply(comfy, _tiny_flux(), _encoded(comfy, adapter_dir, clip_vision), _layout(comfy))


def test_layout_aspect_different_from_the_latent_fails_sampling_naming_both(comfy, model, adapter_dir, clip_vision):
    patched = _apply(comfy, model, _encoded(comfy, adapter_dir, clip_vision), _layout(comfy, width=1024, height=512))
    with pytest.raises(ValueError, match=r"layout canvas 1024x512 .* does not match the latent 16x16"):
        _sample(patched)


def test_more_boxes_than_subjects_is_rejected(comfy, model, adapter_dir, clip_vision):
    with pytest.raises(ValueError, match=r"layout has 3 region\(s\) but 2 subject\(s\)"):
        _apply(comfy, model, _encoded(comfy, adapter_dir, clip_vision), _layout(comfy, BOXES + "\n0, 0, 1, 1"))


def test_an_existing_attn2_replace_patch_keeps_computing_the_text_part(comfy, model, adapter_dir, clip_vision):
    calls = []

    def other_pack(q, k, v, extra_options):
        calls.append(q.shape)
        return torch.zeros_like(q)

    other = model.clone()
    for key in sdxl_sites():
        other.set_model_attn2_replace(other_pack, *key)
    patched = _apply(comfy, other, _encoded(comfy, adapter_dir, clip_vision), _layout(comfy))
    _sample(patched)
    assert len(calls) == 70 * 2  # 70 sites x 2 steps (cond and uncond batched together)


def _tiny_sd15():
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    from fixture_nodes.fx_sdxl import _init

    config = {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": 4, "model_channels": 32, "num_res_blocks": [2, 2, 2, 2],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
        "use_linear_in_transformer": False, "context_dim": CONTEXT_DIM, "num_heads": 8,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }
    model_config = comfy.supported_models.SD15(config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    _init(model.diffusion_model, 1)
    return comfy.model_patcher.ModelPatcher(
        model, comfy.model_management.get_torch_device(), comfy.model_management.unet_offload_device()
    )


def _tiny_flux():
    from fixture_nodes.fx_flux import build_tiny_flux

    return build_tiny_flux()


def test_image_attention_is_zero_outside_the_regions_at_every_patched_site(comfy, model, adapter_dir, clip_vision):
    patched = _apply(comfy, model, _encoded(comfy, adapter_dir, clip_vision), _layout(comfy))
    plan = next(iter(patched.model_options["transformer_options"]["patches_replace"]["attn2"].values())).plan
    original = plan.add_image_attention
    seen = []

    def recorder(out, q, **kwargs):
        z_image = original(torch.zeros_like(out), q, **kwargs)
        grid = plan.grid_plan(*kwargs["latent_hw"], q.shape[1], q.device)
        owned = torch.zeros(q.shape[1], dtype=torch.bool)
        for j, tokens in enumerate(plan.owned_tokens(grid, plan.active_subjects(kwargs["sigma"]))):
            assert tokens.numel() > 0 and not owned[tokens].any()  # every subject owns tokens, exclusively
            owned[tokens] = True
            assert z_image[:, tokens].abs().amax() > 0  # and its image features land there
        assert torch.equal(z_image[:, ~owned], torch.zeros_like(z_image[:, ~owned]))
        seen.append((kwargs["site"], grid.grid.h, grid.grid.w))
        return original(out, q, **kwargs)

    plan.add_image_attention = recorder
    _sample(patched)
    assert len(seen) == 70 * 2 and {s for s, _, _ in seen} == set(range(70))
    assert {(h, w) for _, h, w in seen} == {(8, 8), (4, 4)}  # 16x16 latent at /2 and /4
