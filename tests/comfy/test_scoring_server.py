"""The identity score node inside a real ComfyUI server prompt (fake insightface pack, tiny DINOv2)."""

import io
import shutil

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("insightface", reason="needs the eval extra: pip install -e '.[eval]'")
pytest.importorskip("onnx", reason="needs the eval extra (onnx builds the fake packs)")

from scoring_fakes import built, face_canvas  # noqa: E402

from multisubject.headless import error_message  # noqa: E402

A, B = 11, 22


@pytest.fixture(scope="module")
def scoring_server(server):
    """The session server with a fake face pack, a tiny DINOv2 and a few input images in its folders."""
    models = server.base_dir / "models"
    shutil.copytree(built("face_root") / "models", models / "insightface" / "models", dirs_exist_ok=True)
    shutil.copytree(built("dinov2"), models / "reward_models" / "tiny_dinov2", dirs_exist_ok=True)
    inputs = server.base_dir / "input"
    inputs.mkdir(exist_ok=True)
    images = {"ref_a.png": [(A, 10, 10)], "ref_b.png": [(B, 10, 10)], "gen_good.png": [(A, 5, 10), (B, 15, 10)],
              "gen_missing.png": [(B, 15, 10)]}
    for name, faces in images.items():
        Image.fromarray((face_canvas(faces).numpy() * 255).round().astype(np.uint8)).save(inputs / name)
    return server


def _prompt(generated, face_pack="buffalo_l", object_model="none", layout=False):
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "ref_a.png"}},
        "2": {"class_type": "MS_Subject", "inputs": {"image": ["1", 0], "label": "a", "weight": 1.0,
              "start_percent": 0.0, "end_percent": 1.0, "priority": 0, "invert_mask": False}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "ref_b.png"}},
        "4": {"class_type": "MS_Subject", "inputs": {"image": ["3", 0], "label": "b", "weight": 1.0,
              "start_percent": 0.0, "end_percent": 1.0, "priority": 0, "invert_mask": False, "subjects": ["2", 0]}},
        "5": {"class_type": "LoadImage", "inputs": {"image": generated}},
        "6": {"class_type": "MS_ScoreIdentity", "inputs": {"image": ["5", 0], "subjects": ["4", 0],
              "face_pack": face_pack, "object_model": object_model, "subject_kind": "auto", "face_threshold": 0.5}},
        "7": {"class_type": "MSTest_ReportFloat", "inputs": {"value": ["6", 0]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["6", 1], "filename_prefix": "identity_report"}},
    }
    if layout:
        prompt["9"] = {"class_type": "MS_LayoutFromBoxes", "inputs": {
            "boxes": "0.1, 0.3, 0.4, 0.7\n0.6, 0.3, 0.9, 0.7", "units": "normalized", "width": 640, "height": 640}}
        prompt["6"]["inputs"]["layout"] = ["9", 0]
    return prompt


def _report_pixels(server, entry):
    saved = entry["outputs"]["8"]["images"][0]
    return np.asarray(Image.open(io.BytesIO(server.view(saved))).convert("RGB"))


def test_score_node_returns_a_score_and_a_report_image(scoring_server):
    entry = scoring_server.run(_prompt("gen_good.png"))
    assert entry["status"]["status_str"] == "success"
    assert entry["outputs"]["7"]["value"][0] == pytest.approx(1.0, abs=1e-3)
    report = _report_pixels(scoring_server, entry)
    assert report.shape[0] == 640 and report.shape[1] > 640  # image + reference column
    assert entry["outputs"]["6"]["images"], "the node previews its report"


def test_missing_face_halves_the_score_and_is_marked_in_the_report(scoring_server):
    entry = scoring_server.run(_prompt("gen_missing.png"))
    assert entry["outputs"]["7"]["value"][0] == pytest.approx(0.5, abs=1e-3)
    report = _report_pixels(scoring_server, entry).astype(int)
    red = (np.abs(report - np.array([220, 40, 40])).max(-1) < 8).sum()
    assert red > 200  # the unmatched reference is crossed out in red


def test_object_model_with_layout_scores_every_subject(scoring_server):
    entry = scoring_server.run(_prompt("gen_good.png", face_pack="none", object_model="tiny_dinov2", layout=True))
    assert entry["status"]["status_str"] == "success", error_message(entry)
    assert 0.0 < entry["outputs"]["7"]["value"][0] <= 1.0


def test_no_model_chosen_is_refused_with_a_clear_message(scoring_server):
    status, body = scoring_server.queue(_prompt("gen_good.png", face_pack="none"))
    assert status == 400 and "choose a face_pack" in str(body["node_errors"])


def test_unknown_pack_is_rejected_naming_the_expected_files(scoring_server):
    status, body = scoring_server.queue(_prompt("gen_good.png", face_pack="antelopev2"))
    assert status == 400
    assert "scrfd_10g_bnkps.onnx (detector) and glintr100.onnx (recognizer)" in str(body["node_errors"])
    status, body = scoring_server.queue(_prompt("gen_good.png", object_model="facebook/dinov2-base"))
    assert status == 400 and "object model 'facebook/dinov2-base' not found" in str(body["node_errors"])
