"""IP-Adapter loading: variant detection from keys and shapes, both file formats, site maps, bad files."""

import pytest
import torch
from anyms_helpers import adapter_state
from safetensors.torch import save_file

from multisubject.attention.ip_adapter import (
    adapter_from_state_dict,
    adapter_state_dict,
    load_adapter_file,
    sd15_sites,
    sdxl_sites,
)


def test_sdxl_has_70_and_sd15_16_distinct_cross_attention_sites():
    assert len(sdxl_sites()) == 70 and len(set(sdxl_sites())) == 70
    assert len(sd15_sites()) == 16 and len(set(sd15_sites())) == 16
    # adapter order: input blocks, then output blocks, then middle (ip_adapter.{2n+1} numbering)
    assert sdxl_sites()[0] == ("input", 4, 0) and sdxl_sites()[24] == ("output", 0, 0)
    assert sdxl_sites()[-1] == ("middle", 0, 9) and sd15_sites()[-1] == ("middle", 0, 0)


@pytest.mark.parametrize(
    "base, kind, clip_dim, context_dim, tokens, name",
    [
        ("sdxl", "global", 1280, 2048, 4, "ip-adapter_sdxl"),
        ("sdxl", "global", 1024, 2048, 4, "ip-adapter_sdxl_vit-h"),
        ("sd15", "global", 1024, 768, 4, "ip-adapter_sd15"),
    ],
)
def test_real_dims_name_the_published_variant(base, kind, clip_dim, context_dim, tokens, name):
    # real widths with the smallest UNet width that keeps the key layout (site widths do not matter here)
    state = adapter_state(base, kind, clip_dim=clip_dim, context_dim=context_dim, model_channels=1)
    adapter = adapter_from_state_dict(state)
    assert (adapter.name, adapter.base, adapter.kind, adapter.num_tokens) == (name, base, kind, tokens)
    assert adapter.encoder_features == "image_embeds"


def test_plus_variant_is_a_resampler_on_penultimate_hidden_states():
    adapter = adapter_from_state_dict(adapter_state("sdxl", "plus", clip_dim=48, context_dim=32))
    assert adapter.kind == "plus" and adapter.num_tokens == 16 and adapter.clip_dim == 48
    assert adapter.encoder_features == "penultimate_hidden_states"
    tokens = adapter.project(torch.randn(3, 5, 48))
    assert tokens.shape == (3, 16, 32) and torch.isfinite(tokens).all()
    assert len(adapter.to_k_ip) == 70 and adapter.to_k_ip[0].shape == (64, 32)  # input 4: 2x model channels


def test_safetensors_and_bin_files_load_to_the_same_adapter(tmp_path):
    flat = adapter_state("sdxl", "plus")
    save_file(flat, str(tmp_path / "a.safetensors"))
    torch.save(adapter_state("sdxl", "plus", nested=True), str(tmp_path / "a.bin"))
    a = load_adapter_file(tmp_path / "a.safetensors")
    b = load_adapter_file(tmp_path / "a.bin")
    features = torch.randn(2, 5, 48)
    assert torch.equal(a.project(features), b.project(features))
    assert all(torch.equal(x, y) for x, y in zip(a.to_v_ip, b.to_v_ip))
    assert adapter_state_dict(a).keys() == flat.keys()


def test_global_projection_gives_four_layer_normed_tokens():
    adapter = adapter_from_state_dict(adapter_state("sdxl", "global", clip_dim=24))
    tokens = adapter.project(torch.randn(2, 24))
    assert tokens.shape == (2, 4, 32)


def test_file_that_is_not_an_ip_adapter_is_rejected_naming_its_keys():
    with pytest.raises(ValueError, match=r"not an IP-Adapter.*found keys \[lora_unet_a\.weight\]"):
        adapter_from_state_dict({"lora_unet_a.weight": torch.zeros(1)}, name_hint="x.safetensors")


def test_adapter_for_another_model_family_is_rejected_by_site_count():
    state = adapter_state("sd15", "global")
    state = {k: v for k, v in state.items() if not k.startswith("ip_adapter.31.")}  # 15 sites
    with pytest.raises(ValueError, match="found 15 cross-attention sites.*SDXL IP-Adapters have 70"):
        adapter_from_state_dict(state)


def test_unknown_projection_layout_is_rejected():
    state = {k: v for k, v in adapter_state("sdxl", "global").items() if not k.startswith("image_proj.")}
    state["image_proj.proj.0.weight"] = torch.zeros(2, 2)  # full-face / FaceID MLP style
    with pytest.raises(ValueError, match=r"unknown image projection with keys \[proj\.0\.weight\]"):
        adapter_from_state_dict(state)


def test_clip_width_mismatch_names_both_widths_and_the_encoder_to_use():
    adapter = adapter_from_state_dict(adapter_state("sdxl", "global", clip_dim=1280, context_dim=2048, model_channels=1))
    with pytest.raises(ValueError, match=r"image_embeds of shape \(1, 1024\).*expects width 1280.*ViT-bigG"):
        adapter.project(torch.randn(1, 1024))


def test_unknown_file_suffix_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="is not a .safetensors or .bin file"):
        load_adapter_file(tmp_path / "adapter.onnx")
