"""The MultiCrafter weight format: round trip, key/metadata contract, and one clear error per mismatch."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from multisubject.attention.moe_lora import MoELoRA, MoELoRAConfig
from multisubject.attention.weights import (
    FORMAT_VERSION,
    LoRAConfig,
    LoRAPair,
    MoEExperts,
    MultiCrafterWeights,
    check_against_model,
    from_state_dict,
    load_multicrafter_weights,
    save_multicrafter_weights,
    to_state_dict,
)

HIDDEN, MLP = 16, 64
MOE_TARGETS = ("double_blocks.0.img_mlp", "double_blocks.1.img_mlp")
LORA_TARGETS = ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear2")
FEATURES = {
    "double_blocks.0.img_mlp": (HIDDEN, HIDDEN), "double_blocks.1.img_mlp": (HIDDEN, HIDDEN),
    "double_blocks.0.img_attn.qkv": (HIDDEN, 3 * HIDDEN), "single_blocks.0.linear2": (HIDDEN + MLP, HIDDEN),
}


def make_weights(dtype=torch.float32, train_config=None) -> MultiCrafterWeights:
    torch.manual_seed(0)
    cfg = MoELoRAConfig(num_experts=3, rank=4, alpha=8.0, top_k=1, targets=MOE_TARGETS)
    moe = {}
    for path in MOE_TARGETS:
        module = MoELoRA(HIDDEN, HIDDEN, cfg)
        with torch.no_grad():
            module.lora_B.normal_()
        moe[path] = MoEExperts.from_module(module.to(dtype))
    lora = {p: LoRAPair(torch.randn(2, FEATURES[p][0], dtype=dtype), torch.randn(FEATURES[p][1], 2, dtype=dtype))
            for p in LORA_TARGETS}
    return MultiCrafterWeights(cfg, moe, LoRAConfig(rank=2, alpha=1.0, targets=LORA_TARGETS), lora,
                               train_config=train_config)


def test_saved_file_reloads_to_identical_tensors_and_module_outputs(tmp_path):
    w = make_weights(train_config={"lr": 1e-5, "steps": 2})
    path = tmp_path / "mc.safetensors"
    save_multicrafter_weights(w, path)
    back = load_multicrafter_weights(path)
    assert back.moe_config == w.moe_config and back.lora_config == w.lora_config
    assert back.train_config == {"lr": 1e-5, "steps": 2}
    h = torch.randn(5, HIDDEN)
    for p in MOE_TARGETS:
        assert torch.equal(back.moe[p].to_module(back.moe_config)(h), w.moe[p].to_module(w.moe_config)(h))
    for p in LORA_TARGETS:
        assert torch.equal(back.lora[p].lora_A, w.lora[p].lora_A)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_keep_their_dtype(tmp_path, dtype):
    save_multicrafter_weights(make_weights(dtype), tmp_path / "h.safetensors")
    back = load_multicrafter_weights(tmp_path / "h.safetensors")
    assert back.moe[MOE_TARGETS[0]].lora_A.dtype == dtype


def test_keys_follow_comfyui_lora_naming_and_metadata_is_versioned(tmp_path):
    save_multicrafter_weights(make_weights(), tmp_path / "k.safetensors")
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alpha = f.get_tensor("diffusion_model.double_blocks.0.img_attn.qkv.alpha")
    assert {k for k in keys if k.startswith("diffusion_model.")} == {
        f"diffusion_model.{p}.{s}" for p in LORA_TARGETS for s in ("lora_A.weight", "lora_B.weight", "alpha")}
    assert {k for k in keys if k.startswith("moe_lora.")} == {
        f"moe_lora.{p}.{s}" for p in MOE_TARGETS for s in ("router.weight", "lora_A", "lora_B")}
    assert alpha.ndim == 0 and float(alpha) == 1.0
    assert meta["multisubject.format"] == "multisubject.multicrafter"
    assert meta["multisubject.format_version"] == str(FORMAT_VERSION) == "1"
    assert meta["multisubject.base_model"] == "flux1"
    assert json.loads(meta["multisubject.moe_lora"]) == {
        "num_experts": 3, "rank": 4, "alpha": 8.0, "top_k": 1, "routing": "switch", "targets": list(MOE_TARGETS)}


def _resaved(tmp_path, edit_tensors=None, edit_meta=None):
    tensors, meta = to_state_dict(make_weights())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


def _set_moe_meta(**fields):
    def edit(meta):
        data = json.loads(meta["multisubject.moe_lora"])
        data.update(fields)
        meta["multisubject.moe_lora"] = json.dumps(data)
    return edit


BAD_FILES = [
    ("future version", None, lambda m: m.update({"multisubject.format_version": "2"}),
     "format version '2'; this pack reads version 1; update the multisubject pack"),
    ("old version", None, lambda m: m.update({"multisubject.format_version": "0"}), "re-export"),
    ("plain LoRA, no metadata", None, lambda m: m.clear(), "not a MultiCrafter weight file"),
    ("other base model", None, lambda m: m.update({"multisubject.base_model": "sdxl"}), "base model 'sdxl'"),
    ("expert count", None, _set_moe_meta(num_experts=4), "metadata says 4 experts of rank 4"),
    ("rank", None, _set_moe_meta(rank=8), "metadata says 3 experts of rank 8"),
    ("top_k above experts", None, _set_moe_meta(top_k=5), "top_k"),
    ("missing tensor", lambda t: t.pop("moe_lora.double_blocks.1.img_mlp.lora_B"), None,
     "missing tensors ['moe_lora.double_blocks.1.img_mlp.lora_B']"),
    ("extra tensor", lambda t: t.update({"moe_lora.double_blocks.7.img_mlp.lora_A": torch.zeros(1)}), None,
     "not described by the metadata targets"),
    ("integer dtype", lambda t: t.update({"moe_lora.double_blocks.0.img_mlp.lora_A": torch.zeros(3, 4, HIDDEN,
                                                                                         dtype=torch.int32)}),
     None, "dtype torch.int32"),
    ("alpha disagrees", lambda t: t.update({"diffusion_model.single_blocks.0.linear2.alpha": torch.tensor(3.0)}),
     None, "metadata says alpha 1"),
    ("broken JSON", None, lambda m: m.update({"multisubject.lora": "{"}), "not valid JSON"),
    ("non-FFN target", None, _set_moe_meta(targets=["double_blocks.0.img_attn"]), "not Flux FFN paths"),
]


@pytest.mark.parametrize("name, edit_tensors, edit_meta, message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_every_mismatch_in_a_file_gets_a_clear_error(tmp_path, name, edit_tensors, edit_meta, message):
    path = _resaved(tmp_path, edit_tensors, edit_meta)
    with pytest.raises(ValueError) as info:
        load_multicrafter_weights(path)
    assert message in str(info.value) and "bad.safetensors" in str(info.value)


def test_not_a_safetensors_file_and_missing_file_are_named(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a file")
    with pytest.raises(ValueError, match="junk.safetensors' is not a safetensors file"):
        load_multicrafter_weights(junk)
    with pytest.raises(ValueError, match="does not exist"):
        load_multicrafter_weights(tmp_path / "nope.safetensors")


def test_model_checks_name_missing_targets_and_shape_mismatches():
    w = make_weights()
    check_against_model(w, FEATURES)
    with pytest.raises(ValueError) as info:
        check_against_model(w, {**FEATURES, "double_blocks.0.img_mlp": (32, 32)}, "Flux (hidden 32)")
    assert "MoE target double_blocks.0.img_mlp: the file has 16 -> 16 features but Flux (hidden 32) has 32 -> 32" \
        in str(info.value)
    missing = {k: v for k, v in FEATURES.items() if k != "double_blocks.1.img_mlp"}
    with pytest.raises(ValueError, match="double_blocks.1.img_mlp does not exist"):
        check_against_model(w, missing)


def test_inconsistent_weights_are_refused_before_saving():
    w = make_weights()
    with pytest.raises(ValueError, match="MoE tensors cover"):
        MultiCrafterWeights(w.moe_config, {MOE_TARGETS[0]: w.moe[MOE_TARGETS[0]]})
    with pytest.raises(ValueError, match="not Flux attention Linear paths"):
        LoRAConfig(rank=2, alpha=2.0, targets=("double_blocks.0.img_mlp.0",))
    with pytest.raises(ValueError, match="NaN or inf"):
        bad = MoEExperts(w.moe[MOE_TARGETS[0]].router * float("nan"), w.moe[MOE_TARGETS[0]].lora_A,
                         w.moe[MOE_TARGETS[0]].lora_B)
        MultiCrafterWeights(w.moe_config, {**w.moe, MOE_TARGETS[0]: bad})


def test_state_dict_round_trip_without_files():
    w = make_weights()
    back = from_state_dict(*to_state_dict(w))
    assert back.moe_config == w.moe_config and set(back.lora) == set(LORA_TARGETS)


def test_module_features_read_linears_and_ffns_from_a_module_tree():
    from torch import nn

    from multisubject.attention.weights import module_features

    block = nn.Module()
    block.img_mlp = nn.Sequential(nn.Linear(HIDDEN, MLP), nn.GELU(), nn.Linear(MLP, HIDDEN))
    block.img_attn = nn.Module()
    block.img_attn.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
    root = nn.Module()
    root.double_blocks = nn.ModuleList([block])
    found = module_features(root, make_weights())
    assert found == {"double_blocks.0.img_mlp": (HIDDEN, HIDDEN), "double_blocks.0.img_attn.qkv": (HIDDEN, 3 * HIDDEN)}
    with pytest.raises(ValueError, match="double_blocks.1.img_mlp does not exist"):
        check_against_model(make_weights(), found)
