"""Face identity through the real insightface FaceAnalysis path, driven by fake ONNX packs."""

import shutil

import pytest
import torch

pytest.importorskip("insightface", reason="needs the eval extra: pip install -e '.[eval]'")
pytest.importorskip("onnx", reason="needs the eval extra (onnx builds the fake packs)")

from scoring_fakes import built, face_canvas, make_fake_face_pack, make_fake_recognizer  # noqa: E402

from multisubject.attention.subjects import Subject, Subjects  # noqa: E402
from multisubject.scoring.faces import FaceEmbedder, resolve_face_pack  # noqa: E402
from multisubject.scoring.identity import IdentityScorer  # noqa: E402

A, B, C = 11, 22, 33  # identities (texture seeds)


@pytest.fixture(scope="module")
def scorer():
    return IdentityScorer(faces=FaceEmbedder.load("buffalo_l", roots=[built("face_root")]), kind="face")


def _subjects(*seeds):
    return Subjects(tuple(Subject(images=face_canvas([(s, 10, 10)])[None], label=f"id{s}") for s in seeds))


def test_same_identity_gets_the_top_score(scorer):
    refs = scorer.embed_references(_subjects(A, B))
    same = scorer(face_canvas([(A, 4, 6), (B, 15, 12)])[None], refs)
    other = scorer(face_canvas([(C, 4, 6), (C + 1, 15, 12)])[None], refs)
    assert same.tolist() == pytest.approx([1.0], abs=1e-4)
    assert float(other[0]) < 0.95


def test_swapped_references_matching_follows_the_identities(scorer):
    image = face_canvas([(A, 4, 10), (B, 15, 10)])  # A left, B right
    left_first = scorer.score_image(image, scorer.embed_references(_subjects(A, B)))
    right_first = scorer.score_image(image, scorer.embed_references(_subjects(B, A)))
    boxes = left_first.face_boxes
    left, right = int(torch.argmin(boxes[:, 0])), int(torch.argmax(boxes[:, 0]))
    assert left_first.assignment.tolist() == [left, right]
    assert right_first.assignment.tolist() == [right, left]
    assert left_first.score == pytest.approx(1.0, abs=1e-4) and right_first.score == pytest.approx(1.0, abs=1e-4)


def test_duplicated_identity_gets_no_double_credit(scorer):
    refs = scorer.embed_references(_subjects(A, B))
    result = scorer.score_image(face_canvas([(A, 4, 10), (A, 15, 10)]), refs)
    cross = float(refs.face_embeddings[1] @ refs.face_embeddings[0])  # B's reference vs face A
    assert result.per_subject[0] == pytest.approx(1.0, abs=1e-4)
    assert result.per_subject[1] == pytest.approx(max(cross, 0.0), abs=1e-4)  # at most the single-match value
    assert result.score < 1.0 - 1e-3


def test_no_face_scores_zero(scorer):
    result = scorer.score_image(face_canvas([]), scorer.embed_references(_subjects(A, B)))
    assert result.score == 0.0 and result.assignment.tolist() == [-1, -1] and len(result.face_boxes) == 0


def test_more_faces_than_references_leaves_extras_unmatched(scorer):
    result = scorer.score_image(face_canvas([(C, 3, 3), (A, 10, 10), (C + 1, 16, 16)]),
                                scorer.embed_references(_subjects(A)))
    assert len(result.face_boxes) == 3
    assert result.score == pytest.approx(1.0, abs=1e-4)
    matched = int(result.assignment[0])
    assert result.face_boxes[matched].tolist() == pytest.approx([320 - 64, 320 - 64, 320 + 64, 320 + 64], abs=1)  # anchor +- 64


def test_batch_scores_every_image_and_accepts_per_image_subjects(scorer):
    images = torch.stack([face_canvas([(A, 4, 10), (B, 15, 10)]), face_canvas([(B, 8, 8)])])
    scores = scorer(images, [_subjects(A, B), _subjects(B)])
    assert scores.shape == (2,) and scores.dtype == torch.float32
    assert scores.tolist() == pytest.approx([1.0, 1.0], abs=1e-4)
    with pytest.raises(ValueError, match="got 2 image.s. but 3 subject lists"):
        scorer(images, [_subjects(A)] * 3)


def test_reference_without_a_face_is_a_clear_error_in_face_mode(scorer):
    with pytest.raises(ValueError, match="no face found in the reference image.s. of 'blank'"):
        scorer.embed_references(Subjects((Subject(images=face_canvas([])[None], label="blank"),)))


def test_antelopev2_layout_and_nested_zip_folder_are_found(tmp_path):
    make_fake_face_pack(tmp_path, "antelopev2")
    assert resolve_face_pack([tmp_path], "antelopev2") == (tmp_path / "models" / "antelopev2").resolve()
    nested = tmp_path / "nested"
    (nested / "models" / "antelopev2").mkdir(parents=True)
    shutil.move(str(tmp_path / "models" / "antelopev2"), str(nested / "models" / "antelopev2" / "antelopev2"))
    pack = resolve_face_pack([nested], "antelopev2")
    assert pack.name == "antelopev2" and pack.parent.name == "antelopev2"
    faces = FaceEmbedder.load("antelopev2", roots=[nested]).detect(face_canvas([(A, 10, 10)]))
    assert len(faces) == 1


def test_missing_pack_names_the_expected_files_without_downloading(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'antelopev2' not found.*scrfd_10g_bnkps.onnx \(detector\) and "
                                                r"glintr100.onnx \(recognizer\).*never downloaded"):
        FaceEmbedder.load("antelopev2", roots=[tmp_path])


def test_incomplete_pack_names_the_missing_file(tmp_path):
    make_fake_face_pack(tmp_path, "buffalo_l")
    (tmp_path / "models" / "buffalo_l" / "w600k_r50.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete: missing w600k_r50.onnx"):
        FaceEmbedder.load("buffalo_l", roots=[tmp_path])


def test_pack_without_a_recognizer_is_a_clear_error(tmp_path):
    pack = make_fake_face_pack(tmp_path, "mypack")
    shutil.copy(pack / "det.onnx", pack / "rec.onnx")  # two detectors, no recognizer
    with pytest.raises(FileNotFoundError, match="has no recognition model"):
        FaceEmbedder.load(pack)


def test_hub_id_is_refused(tmp_path):
    with pytest.raises(ValueError, match="looks like a model-hub id"):
        FaceEmbedder.load("deepinsight/antelopev2", roots=[tmp_path])


def test_nan_embeddings_are_a_clear_error(tmp_path):
    pack = make_fake_face_pack(tmp_path, "buffalo_l")
    make_fake_recognizer(pack / "w600k_r50.onnx", nan=True)
    with pytest.raises(ValueError, match="NaN/inf embeddings"):
        FaceEmbedder.load("buffalo_l", roots=[tmp_path]).detect(face_canvas([(A, 10, 10)]))
