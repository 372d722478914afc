"""The identity score node in-process: object subjects located by an OWLv2 detector, or flagged as not located."""

import logging
import shutil

import pytest
import torch

pytest.importorskip("transformers", reason="needs the eval extra: pip install -e '.[eval]'")

from scoring_fakes import built  # noqa: E402

from multisubject.scoring.locate import NOT_LOCATED  # noqa: E402


@pytest.fixture(scope="module")
def score_node(comfy, tmp_path_factory):
    import folder_paths

    models = tmp_path_factory.mktemp("reward_models")
    shutil.copytree(built("dinov2"), models / "tiny_dinov2")
    shutil.copytree(built("owlv2"), models / "tiny_owlv2")
    shutil.copytree(built("sam"), models / "tiny_sam")
    folder_paths.add_model_folder_path("reward_models", str(models))
    return comfy.NODE_CLASS_MAPPINGS["MS_ScoreIdentity"]


def _subjects(comfy):
    subject = comfy.NODE_CLASS_MAPPINGS["MS_Subject"]
    chain = None
    for i, colour in enumerate(((1.0, 0.0, 0.0), (0.0, 0.0, 1.0))):
        image = torch.tensor(colour).expand(1, 32, 32, 3).clone()
        chain = subject.execute(image, f"toy{i}", 1.0, 0.0, 1.0, 0, False, subjects=chain).result[0]
    return chain


def test_detector_and_segmenter_are_listed_validated_and_locate_objects(comfy, score_node, caplog):
    from multisubject.nodes.scoring import object_detectors, object_segmenters

    assert "tiny_owlv2" in object_detectors() and "tiny_sam" in object_segmenters()
    assert score_node.validate_inputs("none", "tiny_dinov2", object_detector="tiny_owlv2",
                                      object_segmenter="tiny_sam") is True
    assert "choose an object_detector" in score_node.validate_inputs("none", "tiny_dinov2",
                                                                     object_segmenter="tiny_sam")
    assert "not found" in score_node.validate_inputs("none", "tiny_dinov2", object_detector="missing")
    image = torch.rand(1, 64, 96, 3)
    with caplog.at_level(logging.WARNING, logger="multisubject"):
        located = score_node.execute(image, _subjects(comfy), "none", "tiny_dinov2", "object", 0.5,
                                     object_detector="tiny_owlv2", object_segmenter="tiny_sam")
        assert not any(NOT_LOCATED in r.message for r in caplog.records)
        whole = score_node.execute(image, _subjects(comfy), "none", "tiny_dinov2", "object", 0.5)
    assert 0.0 <= located.result[0] <= 1.0 and located.result[1].shape[0] == 1
    assert 0.0 <= whole.result[0] <= 1.0
    assert any(NOT_LOCATED in r.message for r in caplog.records)
