"""The shipped binding workflows (Kontext, UNO, Qwen-Image-Edit-2509, OmniGen2) through a real ComfyUI server.

No real weights: each workflow runs with its loaders swapped for tiny models of the same ComfyUI class, its text
encoders for tiny conditionings, tiny image sizes and 2 steps. Everything else runs as shipped: the subject images,
VAE encoding, the core reference nodes (FluxKontextImageScale, ReferenceLatent, the uxo method, LoRA loading),
Subject, Layout from Boxes, Bind Subjects to Layout, KSampler and Subject Attention Maps. Qwen-Image has no tiny
Wan VAE, so there its text+reference encoding and decoding are the swapped parts.
"""

import copy

import pytest
import torch
from safetensors.torch import save_file

from multisubject.headless import error_message, load_api_workflow

HIDDEN = 64  # fixture_nodes.fx_flux.TINY_FLUX hidden size
TINY_LORA = "uno_tiny.safetensors"
LATENT_PX = (64, 96)  # (height, width): non-square


def _nodes(prompt, kind):
    return [k for k, v in prompt.items() if v["class_type"] == kind]


def _tiny(name: str, family: str) -> dict:
    prompt = copy.deepcopy(load_api_workflow(name))
    for k in _nodes(prompt, "UNETLoader"):
        prompt[k] = {"class_type": "MSTest_TinyFamilyLoader", "inputs": {"family": family, "seed": 0}}
    for kind in ("DualCLIPLoader", "CLIPLoader"):
        for k in _nodes(prompt, kind):
            del prompt[k]
    for seed, k in enumerate(_nodes(prompt, "CLIPTextEncode")):
        prompt[k] = ({"class_type": "MSTest_TinyFluxConditioning", "inputs": {"text": prompt[k]["inputs"]["text"]}}
                     if family == "flux" else
                     {"class_type": "MSTest_TinyReferenceConditioning",
                      "inputs": {"family": family, "seed": seed, "references": "", "method": ""}})
    for k in _nodes(prompt, "EmptyImage"):
        prompt[k]["inputs"].update(width=48, height=40)  # references of another aspect than the image
    for k in _nodes(prompt, "ImageScale"):
        prompt[k]["inputs"].update(width=32, height=32)
    for k in _nodes(prompt, "EmptySD3LatentImage"):
        prompt[k]["inputs"].update(height=LATENT_PX[0], width=LATENT_PX[1])
    for k in _nodes(prompt, "MS_LayoutFromBoxes"):
        prompt[k]["inputs"].update(height=LATENT_PX[0], width=LATENT_PX[1])
    for k in _nodes(prompt, "KSampler"):
        prompt[k]["inputs"]["steps"] = 2
    for k in _nodes(prompt, "MS_MultiCrafterAttentionMaps"):
        prompt[k]["inputs"]["at_percent"] = "0.5"
    if family == "qwen_image":
        for seed, k in enumerate(_nodes(prompt, "TextEncodeQwenImageEditPlus")):
            prompt[k] = {"class_type": "MSTest_TinyReferenceConditioning",
                         "inputs": {"family": family, "seed": seed, "references": "4x4, 6x2, 2x6", "method": ""}}
        for kind in ("VAELoader", "VAEDecode", "SaveImage"):
            for k in _nodes(prompt, kind):
                del prompt[k]
        for k in _nodes(prompt, "MS_MultiCrafterAttentionMaps"):
            del prompt[k]["inputs"]["image"]
    else:
        for k in _nodes(prompt, "VAELoader"):
            prompt[k] = {"class_type": "MSTest_TinyFluxVAELoader", "inputs": {"seed": 0}}
    return prompt


def _write_tiny_uno_lora(server) -> None:
    folder = server.base_dir / "models" / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    key = "diffusion_model.double_blocks.0.img_attn.qkv"
    save_file({f"{key}.lora_down.weight": torch.randn(2, HIDDEN) * 0.1,
               f"{key}.lora_up.weight": torch.randn(3 * HIDDEN, 2) * 0.1}, str(folder / TINY_LORA))


WORKFLOWS = [("kontext_bind_flux", "flux", 2), ("uno_bind_flux", "flux", 2), ("qwen_edit_bind", "qwen_image", 3),
             ("omnigen2_bind", "omnigen2", 2)]


@pytest.mark.parametrize("name, family, subjects", WORKFLOWS)
def test_binding_workflow_runs_and_shows_one_heatmap_per_subject(server, name, family, subjects):
    prompt = _tiny(name, family)
    for k in _nodes(prompt, "LoraLoaderModelOnly"):
        _write_tiny_uno_lora(server)
        prompt[k]["inputs"]["lora_name"] = TINY_LORA
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", error_message(entry)
    (maps,) = _nodes(prompt, "MS_MultiCrafterAttentionMaps")
    assert len(entry["outputs"][maps]["images"]) == subjects
    for k in _nodes(prompt, "SaveImage"):
        assert len(entry["outputs"][k]["images"]) == 1
    assert "lora key not loaded" not in server.log()


def test_a_workflow_with_a_missing_subject_reference_reaches_the_user(server):
    prompt = _tiny("kontext_bind_flux", "flux")
    (second,) = [k for k in _nodes(prompt, "ReferenceLatent") if prompt[k]["inputs"]["conditioning"][0] != "10"]
    del prompt[second]["inputs"]["latent"]  # ReferenceLatent without a latent adds nothing: 1 reference, 2 subjects
    status, body = server.queue(prompt)
    entry = server.wait(body["prompt_id"])
    assert "the subjects own 2 reference image(s) ([1, 1] per subject) but the conditioning carries 1" in (
        error_message(entry))
