"""The shipped MultiCrafter FLUX workflow through a real ComfyUI server, with tiny test-only loaders swapped in."""

import copy

import torch
from weight_helpers import experts_of

from multisubject.attention.moe_lora import MoELoRA, MoELoRAConfig
from multisubject.attention.weights import (
    LoRAConfig,
    LoRAPair,
    MultiCrafterWeights,
    save_multicrafter_weights,
)
from multisubject.headless import error_message, load_api_workflow

HIDDEN = 64  # fixture_nodes.fx_flux.TINY_FLUX hidden size
TINY_FILE = "multicrafter_tiny.safetensors"


def _write_tiny_weights(server) -> None:
    folder = server.base_dir / "models" / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    targets = ("double_blocks.0.img_mlp", "double_blocks.1.img_mlp")
    cfg = MoELoRAConfig(num_experts=4, rank=4, alpha=4.0, top_k=1, targets=targets)
    moe = {}
    for path in targets:
        module = MoELoRA(HIDDEN, HIDDEN, cfg)
        with torch.no_grad():
            module.lora_B.normal_(0, 0.1)
        moe[path] = experts_of(module)
    qkv = "double_blocks.0.img_attn.qkv"
    lora = {qkv: LoRAPair(torch.randn(2, HIDDEN) * 0.1, torch.randn(3 * HIDDEN, 2) * 0.1)}
    save_multicrafter_weights(MultiCrafterWeights(cfg, moe, LoRAConfig(2, 2.0, (qkv,)), lora), folder / TINY_FILE)


def _tiny_prompt() -> dict:
    """The shipped API workflow with tiny loaders, tiny sizes, CFG 2 and batch 2."""
    prompt = copy.deepcopy(load_api_workflow("multicrafter_flux"))
    prompt["1"] = {"class_type": "MSTest_TinyFluxLoader", "inputs": {"seed": 0}}
    prompt["3"] = {"class_type": "MSTest_TinyFluxVAELoader", "inputs": {"seed": 0}}
    del prompt["2"]
    prompt["9"] = {"class_type": "MSTest_TinyFluxConditioning", "inputs": {"text": prompt["9"]["inputs"]["text"]}}
    prompt["4"]["inputs"]["lora_name"] = TINY_FILE
    for node in ("5", "6"):
        prompt[node]["inputs"].update(width=48, height=64)
    prompt["12"]["inputs"]["reference_size"] = 32
    prompt["13"]["inputs"].update(width=64, height=64)
    prompt["15"]["inputs"].update(width=64, height=64, batch_size=2)
    prompt["16"]["inputs"].update(steps=2, cfg=2.0)
    prompt["19"]["inputs"]["at_percent"] = "0.5"
    return prompt


def test_multicrafter_workflow_runs_with_tiny_flux_and_shows_one_heatmap_per_subject(server):
    _write_tiny_weights(server)
    info = server.get("/object_info/MS_LoadMoELoRA")["MS_LoadMoELoRA"]
    assert TINY_FILE in info["input"]["required"]["lora_name"][1]["options"]
    entry = server.run(_tiny_prompt())
    assert entry["status"]["status_str"] == "success"
    assert len(entry["outputs"]["18"]["images"]) == 2  # batch 2
    heatmaps = entry["outputs"]["19"]["images"]
    assert len(heatmaps) == 2 * 2  # batch 2 x 2 subjects
    assert "lora key not loaded" not in server.log()


def test_workflow_errors_reach_the_user_through_the_server(server):
    _write_tiny_weights(server)
    prompt = _tiny_prompt()
    prompt["13"]["inputs"]["boxes"] = "0,0,0.3,1\n0.3,0,0.6,1\n0.6,0,1,1"
    prompt["13"]["inputs"].pop("subjects")  # the layout itself accepts 3 boxes; Apply MultiCrafter must refuse
    status, body = server.queue(prompt)
    entry = server.wait(body["prompt_id"])
    assert "layout has 3 region(s) but 2 subject(s)" in error_message(entry)
