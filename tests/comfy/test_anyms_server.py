"""The shipped AnyMS workflow through a real ComfyUI server, with tiny fixtures in place of the real weights."""

import copy

import pytest
from anyms_helpers import adapter_state
from fixture_nodes.fx_sdxl import CONTEXT_DIM, MODEL_CHANNELS
from safetensors.torch import save_file

from multisubject.headless import error_message, load_api_workflow

WORKFLOW = load_api_workflow("anyms_sdxl")
ADAPTER_NAME = WORKFLOW["3"]["inputs"]["adapter_name"]
CKPT = "1"


@pytest.fixture(scope="module")
def tiny_server(server):
    """The session server with a tiny plus adapter written over the placeholder of the workflow's adapter file."""
    folder = server.base_dir / "models" / "ipadapter"
    folder.mkdir(parents=True, exist_ok=True)
    state = adapter_state("sdxl", "plus", model_channels=MODEL_CHANNELS, context_dim=CONTEXT_DIM, clip_dim=48)
    save_file(state, str(folder / ADAPTER_NAME))
    save_file(adapter_state("sd15", "plus", context_dim=CONTEXT_DIM, clip_dim=48), str(folder / "tiny_sd15.safetensors"))
    return server


def tiny_prompt(overrides=None):
    """The shipped workflow with the checkpoint, CLIP vision and text encoders swapped for tiny fixtures."""
    prompt = copy.deepcopy(WORKFLOW)
    prompt[CKPT] = {"class_type": "MSTest_TinySDXLCheckpoint", "inputs": {"ckpt_name": "tiny", "seed": 0}}
    prompt["2"] = {"class_type": "MSTest_TinyCLIPVision", "inputs": {"clip_name": "tiny", "hidden": 48}}
    for node_id in ("12", "13"):
        prompt[node_id] = {"class_type": "MSTest_TinyTextEncode",
                           "inputs": {"text": prompt[node_id]["inputs"]["text"], "clip": [CKPT, 1]}}
    prompt["14"]["inputs"].update(width=128, height=128)  # 16x16 latent; the 1024x1024 layout has its aspect
    prompt["15"]["inputs"].update(steps=2, cfg=4.0, sampler_name="euler", scheduler="normal")
    prompt["20"] = {"class_type": "MSTest_LatentChecksum", "inputs": {"samples": ["15", 0]}}
    for (node_id, name), value in (overrides or {}).items():
        prompt[node_id]["inputs"][name] = value
    return prompt


def unpatched_prompt(tag):
    """Tiny checkpoint (same node inputs, so the server reuses the cached MODEL) -> KSampler without AnyMS."""
    prompt = tiny_prompt()
    prompt["15"]["inputs"]["model"] = ["21", 0]
    prompt["21"] = {"class_type": "MSTest_ModelPassthrough", "inputs": {"model": [CKPT, 0], "tag": tag}}
    for node_id in ("2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "16", "17"):
        del prompt[node_id]
    return prompt


def _latent(entry):
    return entry["outputs"]["20"]["latent"][0]


def test_shipped_workflow_runs_with_tiny_models_and_the_unpatched_model_samples_identically_after(tiny_server):
    before = tiny_server.run(unpatched_prompt("before"))
    assert before["status"]["status_str"] == "success"
    entry = tiny_server.run(tiny_prompt())
    assert entry["status"]["status_str"] == "success", error_message(entry)
    saved = entry["outputs"]["17"]["images"]
    assert len(saved) == 1 and saved[0]["type"] == "output"
    assert len(tiny_server.view(saved[0])) > 0
    assert entry["outputs"]["9"]["images"][0]["type"] == "temp"  # layout preview
    patched = _latent(entry)
    assert patched["shape"] == [1, 4, 16, 16] and patched["hex"] != _latent(before)["hex"]
    after = tiny_server.run(unpatched_prompt("after"))  # KSampler re-runs on the cached, unpatched MODEL
    assert after["status"]["status_str"] == "success"
    assert _latent(after)["hex"] == _latent(before)["hex"]


BAD = [
    ("more boxes than subjects", {("8", "boxes"): "0,0,0.5,1\n0.5,0,1,1\n0,0,1,1"}, "layout has 3 region(s) but 2 subject(s)"),
    ("layout aspect differs from the latent", {("14", "width"): 256},
     "layout canvas 1024x1024 (aspect 1.000) does not match the latent 32x16"),
    ("SD1.5 adapter on SDXL", {("3", "adapter_name"): "tiny_sd15.safetensors"},
     "is an SD1.5 adapter (16 cross-attention sites), but this SDXL UNet has 70"),
    ("CLIP vision width differs from the adapter", {("2", "hidden"): 40}, "expects width 48"),
]


@pytest.mark.parametrize("name, overrides, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_error_through_the_server(tiny_server, name, overrides, message):
    status, body = tiny_server.queue(tiny_prompt(overrides))
    assert status == 200, body
    entry = tiny_server.wait(body["prompt_id"])
    assert entry["status"]["status_str"] == "error"
    assert message in error_message(entry)
