"""Hostile prompts through a real ComfyUI server's /prompt API (issue 14): each gets a clear error, nothing is
read outside the models folders, and the same server then runs the next good prompt."""

import copy
import os

import pytest
from anyms_helpers import adapter_state
from safetensors.torch import save_file

from multisubject.headless import error_message, load_api_workflow

BASE = load_api_workflow("layout_preview")
OUTSIDE = "outside_adapter.safetensors"
PACK = "fakepack"


@pytest.fixture(scope="module")
def hostile_server(server, tmp_path_factory):
    """The session server, an IP-Adapter outside its models folders, a link to it inside, a stub face pack."""
    outside = tmp_path_factory.mktemp("outside") / OUTSIDE
    save_file(adapter_state("sdxl", "plus"), str(outside))
    folder = server.base_dir / "models" / "ipadapter"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "linked_out.safetensors"
    if not link.is_symlink():
        os.symlink(outside, link)
    pack = server.base_dir / "models" / "insightface" / "models" / PACK
    pack.mkdir(parents=True, exist_ok=True)
    for name in ("det.onnx", "rec.onnx"):  # resolution only looks for .onnx files; nothing here is ever loaded
        (pack / name).write_bytes(b"")
    return server, outside


def _fails(server, prompt) -> str:
    """The error text of a prompt that must fail, at validation (HTTP 400) or while running."""
    status, body = server.queue(prompt)
    if status != 200 or body.get("node_errors"):  # with other valid outputs, ComfyUI runs those and answers 200
        return str(body.get("node_errors", body))
    entry = server.wait(body["prompt_id"])
    assert entry["status"]["status_str"] == "error", entry["status"]
    return error_message(entry)


def _still_serves(server):
    assert server.run(BASE)["status"]["status_str"] == "success"


def _sunk(node: dict) -> dict:
    """A prompt that runs ``node`` alone (with a tiny FLUX model where it needs one) into a sink."""
    prompt = {"1": node, "2": {"class_type": "MSTest_Sink", "inputs": {"value": ["1", 0]}}}
    if "model" in node["inputs"]:
        prompt["0"] = {"class_type": "MSTest_TinyFluxLoader", "inputs": {"seed": 0}}
    return prompt


def test_adapter_paths_outside_the_models_folder_are_refused(hostile_server):
    server, outside = hostile_server
    cases = [
        (str(outside), "is an absolute path"),
        (f"../../{outside.parent.name}/{OUTSIDE}", "contains '..'"),
        ("linked_out.safetensors", "outside the 'ipadapter' folders"),
    ]
    for name, reason in cases:
        message = _fails(server, _sunk({"class_type": "MS_LoadIPAdapter", "inputs": {"adapter_name": name}}))
        assert reason in message and "models/ipadapter" in message, (name, message)
        _still_serves(server)
    # the same file inside the folder loads
    (server.base_dir / "models" / "ipadapter" / OUTSIDE).write_bytes(outside.read_bytes())
    entry = server.run(_sunk({"class_type": "MS_LoadIPAdapter", "inputs": {"adapter_name": OUTSIDE}}))
    assert entry["outputs"]["2"]["type"] == ["IPAdapter"]


def _nan_prompt(**subject_inputs):
    prompt = copy.deepcopy(BASE)
    prompt["3"]["inputs"].update(subject_inputs)
    return prompt


def test_nan_reference_image_and_nan_subject_mask_are_refused(hostile_server):
    server, _ = hostile_server
    prompt = _nan_prompt(image=["30", 0])  # ImageBlend with a JSON NaN blend factor: a NaN image from core nodes
    prompt["30"] = {"class_type": "ImageBlend", "inputs": {"image1": BASE["3"]["inputs"]["image"],
                    "image2": BASE["3"]["inputs"]["image"], "blend_factor": float("nan"), "blend_mode": "normal"}}
    assert "reference image holds NaN or inf" in _fails(server, prompt)
    _still_serves(server)
    prompt = _nan_prompt(mask=["31", 0])
    prompt["31"] = {"class_type": "SolidMask", "inputs": {"value": float("nan"), "width": 256, "height": 256}}
    assert "subject mask holds NaN or inf" in _fails(server, prompt)
    _still_serves(server)


@pytest.mark.parametrize("name, value", [("strength", float("nan")), ("attention_strength", float("inf")),
                                         ("strength", 1e9)])
def test_load_moe_lora_refuses_non_finite_strengths_from_the_api(hostile_server, name, value):
    server, _ = hostile_server
    inputs = {"model": ["0", 0], "lora_name": "none.safetensors", "strength": 1.0, "attention_strength": 1.0}
    inputs[name] = value
    prompt = _sunk({"class_type": "MS_LoadMoELoRA", "inputs": inputs})
    message = _fails(server, prompt)
    assert name in message and ("finite number within [-2, 2]" in message or "bigger than max" in message), message
    _still_serves(server)


def _score_prompt(**inputs):
    prompt = copy.deepcopy(BASE)
    prompt["40"] = {"class_type": "MS_ScoreIdentity", "inputs": {
        "image": BASE["3"]["inputs"]["image"], "subjects": ["4", 0], "face_pack": PACK, "object_model": "none",
        "subject_kind": "auto", "face_threshold": 0.5, **inputs}}
    return prompt


@pytest.mark.parametrize("inputs, message", [
    ({"face_pack": "/etc"}, "is an absolute path"),
    ({"face_pack": "../../.."}, "contains '..'"),
    ({"object_model": "/tmp"}, "is an absolute path"),
    ({"face_threshold": 5.0}, "bigger than max"),  # ComfyUI's own range check is on again
    ({"face_threshold": float("nan")}, "face_threshold must be a finite number"),
    ({"subject_kind": "everything"}, "subject_kind must be one of"),
])
def test_score_identity_refuses_paths_out_and_values_out_of_range(hostile_server, inputs, message):
    server, _ = hostile_server
    text = _fails(server, _score_prompt(**inputs))
    assert message in text, text
    _still_serves(server)


def test_huge_box_text_and_ten_thousand_regions_get_short_errors(hostile_server):
    server, _ = hostile_server
    for boxes, message in (("0, 0, 1, " + "9" * 1_000_000, "characters; at most"),
                           ("0, 0, 0.5, 0.5\n" * 4000, "at most 64 regions"),
                           ("[" * 5000 + "]" * 5000, "nested more than")):
        prompt = copy.deepcopy(BASE)
        prompt["5"]["inputs"]["boxes"] = boxes
        text = _fails(server, prompt)
        assert message in text and len(text) < 600, text[:1000]
        _still_serves(server)
