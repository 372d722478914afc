"""A real ComfyUI server on loopback: registration, the shipped workflow end to end, and bad input."""

import copy
import io

import numpy as np
import pytest
from PIL import Image

from multisubject.headless import error_message, load_api_workflow
from multisubject.nodes import NODES

NODE_IDS = {cls.GET_SCHEMA().node_id for cls in NODES}


def test_pack_imports_cleanly_and_lists_every_node(server):
    info = server.get("/object_info")
    ours = {k: v for k, v in info.items() if k.startswith("MS_")}
    assert set(ours) == NODE_IDS
    assert {v["category"].split("/")[0] for v in ours.values()} == {"multisubject"}
    log = server.log()
    assert "IMPORT FAILED" not in "\n".join(line for line in log.splitlines() if "multisubject" in line)
    assert "custom_nodes/multisubject" in log  # listed in the import times


def _png(server, image_ref):
    return np.asarray(Image.open(io.BytesIO(server.view(image_ref))).convert("RGB")).astype(np.float32) / 255


def test_layout_preview_workflow_renders_the_layout(server):
    from multisubject.attention.preview import EMPTY_BACKGROUND, FILL_ALPHA, region_colour

    entry = server.run(load_api_workflow("layout_preview"))
    saved = entry["outputs"]["7"]["images"]
    assert len(saved) == 1 and saved[0]["type"] == "output"
    preview = entry["outputs"]["6"]["images"][0]
    assert preview["type"] == "temp"
    pixels = _png(server, saved[0])
    assert pixels.shape == (512, 768, 3)
    assert np.array_equal(pixels, _png(server, preview))

    def tinted(bg, index):
        return np.array([b * (1 - FILL_ALPHA) + c * FILL_ALPHA for b, c in zip(bg, region_colour(index))])

    bg = [EMPTY_BACKGROUND] * 3
    only_first = pixels[int(0.9 * 512), int(0.2 * 768)]  # inside box 1 only
    overlap = pixels[int(0.5 * 512), int(0.5 * 768)]  # both boxes: subject 2 has priority 1, painted on top
    outside = pixels[int(0.97 * 512), int(0.97 * 768)]
    assert np.abs(only_first - tinted(bg, 0)).max() < 2 / 255
    assert np.abs(overlap - tinted(tinted(bg, 0), 1)).max() < 2 / 255
    assert np.abs(outside - np.array(bg)).max() < 2 / 255
    # the red (0xd04040) subject thumbnail sits inside box 1 under its label
    red = (np.abs(pixels - np.array([0xD0, 0x40, 0x40]) / 255).max(-1) < 2 / 255).sum()
    assert red > 1000


def _with(prompt, node_id, **inputs):
    prompt = copy.deepcopy(prompt)
    prompt[node_id]["inputs"].update(inputs)
    return prompt


BASE = load_api_workflow("layout_preview")

# (name, broken prompt, text that must appear in ComfyUI's answer)
BAD_PROMPTS = [
    ("box outside [0,1]", _with(BASE, "5", boxes="0.1, 0.2, 1.4, 0.9\n0.5, 0.1, 0.9, 0.9"), "outside [0, 1]"),
    ("pixel box outside canvas", _with(BASE, "5", units="pixels", boxes="0, 0, 800, 100\n0, 0, 10, 10"),
     "outside the 768x512 canvas"),
    ("inverted box", _with(BASE, "5", boxes="0.6, 0.2, 0.3, 0.9\n0.5, 0.1, 0.9, 0.9"), "inverted corners"),
    ("zero-area box", _with(BASE, "5", boxes="0.3, 0.2, 0.3, 0.9\n0.5, 0.1, 0.9, 0.9"), "zero area"),
    ("NaN in a box", _with(BASE, "5", boxes="0.1, nan, 0.3, 0.9\n0.5, 0.1, 0.9, 0.9"), "NaN or inf"),
    ("three numbers", _with(BASE, "5", boxes="0.1, 0.2, 0.3\n0.5, 0.1, 0.9, 0.9"), "expected 4 numbers"),
    ("malformed JSON", _with(BASE, "5", boxes="[[0.1, 0.2, 0.3, 0.4]"), "do not parse"),
    ("empty text", _with(BASE, "5", boxes="   "), "the text is empty"),
    ("more boxes than subjects", _with(BASE, "5", boxes="0,0,1,1\n0,0,1,1\n0,0,1,1"),
     "layout has 3 region(s) but 2 subject(s)"),
    ("start after end", _with(BASE, "3", start_percent=0.9, end_percent=0.1), "is after end_percent"),
    ("weight out of range", _with(BASE, "3", weight=9.0), "weight"),
]


@pytest.mark.parametrize("name, prompt, message", BAD_PROMPTS, ids=[b[0] for b in BAD_PROMPTS])
def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(server, name, prompt, message):
    status, body = server.queue(prompt)
    if status == 200:
        entry = server.wait(body["prompt_id"])
        assert entry["status"]["status_str"] == "error"
        assert message in error_message(entry)
    else:  # rejected at validation (widget ranges): the answer names the node and the problem
        assert status == 400 and message in str(body["node_errors"])
    # the same server still runs a good prompt
    assert server.run(BASE)["status"]["status_str"] == "success"


def test_mask_batch_size_and_canvas_errors_through_the_server(server):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 48}},
        "3": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 48}},
        "4": {"class_type": "MS_Subject", "inputs": {"image": ["1", 0], "label": "a", "weight": 1.0,
              "start_percent": 0.0, "end_percent": 1.0, "priority": 0, "invert_mask": False}},
        "5": {"class_type": "MS_LayoutFromMasks", "inputs": {"masks": ["2", 0]}},
        "6": {"class_type": "MS_LayoutFromMasks", "inputs": {"masks": ["3", 0], "layout": ["5", 0],
              "subjects": ["4", 0]}},
        "7": {"class_type": "MS_PreviewLayout", "inputs": {"layout": ["6", 0]}},
    }
    status, body = server.queue(prompt)
    entry = server.wait(body["prompt_id"])
    assert "mask 0 of 1 is all zero" in error_message(entry)

    prompt["3"]["inputs"].update(value=1.0, width=32)  # wrong canvas size for the chain
    entry = server.wait(server.queue(prompt)[1]["prompt_id"])
    assert "different canvas sizes: 64x48 and 32x48" in error_message(entry)

    prompt["3"]["inputs"].update(width=64)  # two masks, one subject
    entry = server.wait(server.queue(prompt)[1]["prompt_id"])
    assert "layout has 2 region(s) but 1 subject(s)" in error_message(entry)

    prompt["4"]["inputs"]["image"] = ["1", 0]
    prompt["8"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 32}}
    prompt["4"]["inputs"]["mask"] = ["8", 0]  # subject mask of another size than its image
    prompt["6"]["inputs"].pop("subjects")
    prompt["7"]["inputs"]["subjects"] = ["4", 0]
    entry = server.wait(server.queue(prompt)[1]["prompt_id"])
    assert "subject mask must be the size of its reference image" in error_message(entry)
    assert server.run(BASE)["status"]["status_str"] == "success"


def test_rgba_and_multi_image_subjects_run_through_the_server(server):
    prompt = load_api_workflow("layout_preview")
    prompt["1"]["inputs"]["batch_size"] = 3  # three reference images of one subject: all kept
    # JoinImageWithAlpha stores alpha = 1 - mask (ComfyUI's mask convention), so mask 0 = opaque
    prompt["10"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 256, "height": 256}}
    prompt["11"] = {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["2", 0], "alpha": ["10", 0]}}
    prompt["4"]["inputs"]["image"] = ["11", 0]  # RGBA reference: alpha becomes the subject mask
    pixels = _png(server, server.run(prompt)["outputs"]["7"]["images"][0])
    blue = (np.abs(pixels - np.array([0x40, 0x60, 0xD0]) / 255).max(-1) < 2 / 255).sum()
    assert blue > 1000  # the RGBA subject's thumbnail is drawn from its RGB channels

    prompt["10"]["inputs"]["value"] = 1.0  # fully transparent reference: a clear error, not a blank subject
    entry = server.wait(server.queue(prompt)[1]["prompt_id"])
    assert "is all zero, so nothing of the subject is visible" in error_message(entry)
    assert server.run(BASE)["status"]["status_str"] == "success"
