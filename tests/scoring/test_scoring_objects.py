"""Object identity with tiny random DINOv2 / CLIP models saved with save_pretrained and loaded from disk."""

import json
import shutil

import pytest
import torch
from PIL import Image

pytest.importorskip("transformers", reason="needs the eval extra: pip install -e '.[eval]'")

from scoring_fakes import built, face_canvas  # noqa: E402

from multisubject.attention.layout import Layout  # noqa: E402
from multisubject.attention.subjects import Subject, Subjects  # noqa: E402
from multisubject.scoring.identity import IdentityScorer  # noqa: E402
from multisubject.scoring.locate import layout_candidates  # noqa: E402
from multisubject.scoring.objects import ImageEmbedder, masked_crop  # noqa: E402


def _blocks(seed: int, size: int = 96) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(6, 6, 3, generator=g).repeat_interleave(size // 6, 0).repeat_interleave(size // 6, 1)


def _scene(left: int, right: int) -> torch.Tensor:
    """A 128x256 image: object ``left`` in the left half, ``right`` in the right half (16 px margins)."""
    image = torch.full((128, 256, 3), 0.5)
    image[16:112, 16:112] = _blocks(left)
    image[16:112, 144:240] = _blocks(right)
    return image


LAYOUT = Layout.from_boxes(256, 128, [(16 / 256, 16 / 128, 112 / 256, 112 / 128),
                                      (144 / 256, 16 / 128, 240 / 256, 112 / 128)])


def _subjects(*seeds):
    return Subjects(tuple(Subject(images=_blocks(s)[None], label=f"obj{s}") for s in seeds))


@pytest.fixture(scope="module", params=["dinov2", "clip"])
def embedder(request):
    return ImageEmbedder.load(built(request.param))


def test_identical_crop_scores_one_and_other_objects_less(embedder):
    scorer = IdentityScorer(objects=embedder)
    refs = scorer.embed_references(_subjects(1, 2))
    assert refs.kinds == ("object", "object")
    result = scorer.score_image(_scene(1, 2), refs, LAYOUT)
    assert result.score == pytest.approx(1.0, abs=1e-5)
    assert result.assignment.tolist() == [0, 1]
    worse = scorer.score_image(_scene(3, 4), refs, LAYOUT)
    assert worse.score < 0.999


def test_swapped_objects_are_matched_by_identity_not_by_region_order(embedder):
    scorer = IdentityScorer(objects=embedder)
    result = scorer.score_image(_scene(2, 1), scorer.embed_references(_subjects(1, 2)), LAYOUT)
    assert result.assignment.tolist() == [1, 0]
    assert result.score == pytest.approx(1.0, abs=1e-5)


def test_without_layout_each_reference_is_compared_with_the_whole_image(embedder):
    scorer = IdentityScorer(objects=embedder)
    refs = scorer.embed_references(_subjects(1, 2))
    image = _scene(1, 2)
    result = scorer.score_image(image, refs)
    whole = embedder.embed_images([image])[0]
    expected = (refs.object_embeddings @ whole).clamp(min=0)
    assert result.per_subject.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert result.object_boxes.tolist() == [[0.0, 0.0, 256.0, 128.0]]
    assert result.object_source == "whole image" and result.objects_located is False


def test_mask_regions_crop_with_a_white_background():
    masks = torch.zeros(2, 128, 256)
    masks[0, 40:80, 40:60] = 1
    masks[1, 10:20, 200:250] = 1
    candidates = layout_candidates(_scene(1, 2), Layout.from_masks(masks))
    crops, boxes = candidates.crops, candidates.boxes
    assert boxes.tolist() == [[40, 40, 60, 80], [200, 10, 250, 20]]
    assert crops[0].shape == (40, 20, 3) and crops[1].shape == (10, 50, 3)
    partial = torch.zeros(128, 256)
    partial[0:10, 0:5] = 1
    crop = masked_crop(_scene(1, 2), (0, 0, 10, 10), partial)
    assert torch.all(crop[:, 5:] == 1.0) and not torch.all(crop[:, :5] == 1.0)


def test_layout_of_another_aspect_is_refused(embedder):
    scorer = IdentityScorer(objects=embedder)
    refs = scorer.embed_references(_subjects(1, 2))
    square = Layout.from_boxes(100, 100, [(0, 0, 0.5, 1), (0.5, 0, 1, 1)])
    with pytest.raises(ValueError, match="does not match the image 256x128"):
        scorer.score_image(_scene(1, 2), refs, square)


def test_faces_and_objects_are_matched_separately_and_averaged_over_all_references():
    pytest.importorskip("insightface", reason="needs the eval extra")
    from multisubject.scoring.faces import FaceEmbedder

    faces = FaceEmbedder.load("buffalo_l", roots=[built("face_root")])
    scorer = IdentityScorer(faces=faces, objects=ImageEmbedder.load(built("dinov2")))
    person = Subject(images=face_canvas([(5, 10, 10)])[None], label="person")
    dark = _blocks(7) * 0.6  # below the fake face detector's firing level: no face in it
    thing = Subject(images=dark[None], label="thing")
    refs = scorer.embed_references(Subjects((person, thing)))
    assert refs.kinds == ("face", "object")
    image = face_canvas([(5, 5, 10)])
    image[400:496, 400:496] = dark
    layout = Layout.from_boxes(640, 640, [(0.1, 0.3, 0.4, 0.7), (400 / 640, 400 / 640, 496 / 640, 496 / 640)])
    result = scorer.score_image(image, refs, layout)
    assert result.face_score == pytest.approx(1.0, abs=1e-4)
    assert result.object_score == pytest.approx(1.0, abs=1e-4)
    assert result.score == pytest.approx(1.0, abs=1e-4)
    no_person = scorer.score_image(face_canvas([]), refs, layout)  # face missing, object region empty
    assert no_person.per_subject[0] == 0.0
    assert no_person.score == pytest.approx(float(no_person.per_subject[1]) / 2)


def test_clip_text_embeddings_are_normalised():
    clip = ImageEmbedder.load(built("clip"))
    texts = clip.embed_texts(["the cat", "a dog and the cat"])
    assert texts.shape == (2, 16) and torch.allclose(texts.norm(dim=-1), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match="text embeddings need a CLIP folder"):
        ImageEmbedder.load(built("dinov2")).embed_texts(["x"])


def test_missing_or_incomplete_model_folders_name_the_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; expected a folder with config.json"):
        ImageEmbedder.load(tmp_path / "nope")
    partial = tmp_path / "partial"
    shutil.copytree(built("dinov2"), partial)
    (partial / "model.safetensors").unlink()
    (partial / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing preprocessor_config.json or processor_config.json, "
                                                "model.safetensors or pytorch_model.bin"):
        ImageEmbedder.load(partial)


def test_hub_id_is_refused_instead_of_downloaded():
    with pytest.raises(ValueError, match="'facebook/dinov2-base' looks like a model-hub id"):
        ImageEmbedder.load("facebook/dinov2-base")


def test_unsupported_model_type_is_named(tmp_path):
    other = tmp_path / "other"
    shutil.copytree(built("dinov2"), other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "resnet"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"holds a 'resnet' model; expected one of DINO \(ViT\), DINOv2, CLIP"):
        ImageEmbedder.load(other)


def test_nan_embeddings_are_a_clear_error(embedder):
    with torch.no_grad():
        saved = [p.clone() for p in embedder.model.parameters()]
        for p in embedder.model.parameters():
            p.fill_(float("nan"))
    try:
        with pytest.raises(ValueError, match="NaN/inf image embeddings"):
            embedder.embed_images([_blocks(1)])
    finally:
        with torch.no_grad():
            for p, s in zip(embedder.model.parameters(), saved):
                p.copy_(s)


def test_bad_image_batches_are_refused():
    scorer = IdentityScorer(objects=ImageEmbedder.load(built("dinov2")))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\) RGB float in \[0, 1\], got shape \(2, 3, 64, 64\)"):
        scorer(torch.rand(2, 3, 64, 64), _subjects(1))
    nan = torch.rand(1, 64, 64, 3)
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="contain NaN or inf"):
        scorer(nan, _subjects(1))
    with pytest.raises(ValueError, match="got 2 image.s. but 3 layouts"):
        scorer(torch.rand(2, 128, 256, 3), _subjects(1, 2), [LAYOUT] * 3)
    with pytest.raises(ValueError, match="needs a face pack, an object model"):
        IdentityScorer()


def test_scorer_loads_from_local_paths_as_a_trainer_would():
    pytest.importorskip("insightface", reason="needs the eval extra")
    scorer = IdentityScorer.from_paths(face_pack="buffalo_l", insightface_roots=[str(built("face_root"))],
                                       object_model=str(built("dinov2")))
    person = Subject(images=face_canvas([(5, 10, 10)])[None], label="person")
    reward = scorer(face_canvas([(5, 4, 4)])[None].repeat(3, 1, 1, 1), Subjects((person,)))
    assert reward.shape == (3,) and reward.tolist() == pytest.approx([1.0] * 3, abs=1e-4)
    with pytest.raises(ValueError, match="kind must be one of auto, face, object"):
        IdentityScorer.from_paths(object_model=str(built("dinov2")), kind="faces")


def test_dino_v1_folder_loads_as_vit_and_embeds_the_final_cls_token():
    dino = ImageEmbedder.load(built("dino"))
    assert dino.kind == "vit" and dino.name == "DINO (ViT)"
    assert getattr(dino.model, "pooler", None) is None  # ViTModel's pooler is not part of DINO
    image = _blocks(3)
    pixels = dino.processor(images=[Image.fromarray((image * 255).round().byte().numpy())],
                            return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        cls = dino.model(pixel_values=pixels).last_hidden_state[:, 0]
    torch.testing.assert_close(dino.embed_images([image]), torch.nn.functional.normalize(cls, dim=-1))
