"""Bind Subjects to Layout through a real ComfyUI server on every family: tiny models, references on the positive
only (the negative has none), CFG 2, batch 2, a non-square latent; errors reach the user through /prompt."""

import pytest

from multisubject.headless import error_message


def _prompt(family, strength=1.0, boxes="0,0,0.5,1\n0.5,0,1,1", bind=True):
    prompt = {
        "1": {"class_type": "MSTest_TinyFamilyLoader", "inputs": {"family": family, "seed": 0}},
        "2": {"class_type": "MSTest_TinyReferenceConditioning",
              "inputs": {"family": family, "seed": 1, "references": "4x4, 6x2", "method": ""}},
        "3": {"class_type": "MSTest_TinyReferenceConditioning",
              "inputs": {"family": family, "seed": 2, "references": "", "method": ""}},
        "4": {"class_type": "MSTest_TinyLatent", "inputs": {"family": family, "height": 8, "width": 12, "batch": 2}},
        "5": {"class_type": "MS_LayoutFromBoxes",
              "inputs": {"boxes": boxes, "units": "normalized", "width": 96, "height": 64}},
        "6": {"class_type": "MS_BindReferences",
              "inputs": {"model": ["1", 0], "layout": ["5", 0], "strength": strength,
                         "direction": "image_to_reference"}},
        "7": {"class_type": "KSampler",
              "inputs": {"model": ["6" if bind else "1", 0], "positive": ["2", 0], "negative": ["3", 0],
                         "latent_image": ["4", 0], "seed": 0, "steps": 2, "cfg": 2.0, "sampler_name": "euler",
                         "scheduler": "simple", "denoise": 1.0}},
        "8": {"class_type": "MSTest_LatentChecksum", "inputs": {"samples": ["7", 0]}},
    }
    if not bind:
        del prompt["5"], prompt["6"]
    return prompt


def _latent(server, prompt):
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", error_message(entry)
    return entry["outputs"]["8"]["latent"][0]


@pytest.mark.parametrize("family", ["flux", "qwen_image", "omnigen2"])
def test_binding_runs_through_the_server_and_strength_zero_equals_the_plain_model(server, family):
    plain = _latent(server, _prompt(family, bind=False))
    bound = _latent(server, _prompt(family))
    off = _latent(server, _prompt(family, strength=0.0))
    assert bound["shape"][0] == 2 and bound["hex"] != plain["hex"]
    assert off["hex"] == plain["hex"]


def test_more_regions_than_references_reaches_the_user(server):
    status, body = server.queue(_prompt("qwen_image", boxes="0,0,0.3,1\n0.3,0,0.6,1\n0.6,0,1,1"))
    entry = server.wait(body["prompt_id"])
    assert "the layout has 3 regions but the conditioning carries 2 reference latent(s)" in error_message(entry)
    assert _latent(server, _prompt("qwen_image"))["shape"][0] == 2  # the server keeps serving
