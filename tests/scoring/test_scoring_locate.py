"""Locate, then match: objects are found in the generated image before they are scored (fake detector, colour
embedder), and the evaluation cannot be fooled by swaps, blends or same-label subjects."""

import logging

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from multisubject.attention.layout import Layout
from multisubject.attention.subjects import Subject, Subjects
from multisubject.scoring.confusion import identity_confusion
from multisubject.scoring.evaluate import Evaluator, Sample, format_table, summarise
from multisubject.scoring.identity import IdentityScorer
from multisubject.scoring.locate import FALLBACK_QUERY, NOT_LOCATED, ObjectLocator
from multisubject.scoring.metrics import average_precision_50, layout_ious
from multisubject.scoring.report import report_caption

RED, BLUE, PURPLE = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.5, 0.0, 0.5)
HEIGHT, WIDTH = 64, 128
LEFT, RIGHT = (8, 8, 56, 56), (72, 8, 120, 56)  # pixel boxes x0, y0, x1, y1
LAYOUT = Layout.from_boxes(WIDTH, HEIGHT, [tuple(v / s for v, s in zip(b, (WIDTH, HEIGHT) * 2)) for b in (LEFT, RIGHT)])


class ColourEmbedder:
    """Embedding = L2-normalised mean RGB: red . blue = 0, purple . red = 0.707."""

    def __init__(self, kind="dinov2"):
        self.kind, self.name, self.folder, self.tokenizer = kind, "colour", "colour", None

    def embed_images(self, images):
        return F.normalize(torch.stack([im.reshape(-1, 3).mean(0) for im in images]), dim=-1)


class SceneDetector:
    """Finds the coloured (non-white) squares of a scene, for every phrase (OWL proposes the same box for two
    labels when it cannot tell them apart); records the phrases it was asked for."""

    def __init__(self):
        self.queries = []

    def detect(self, image, phrases):
        self.queries.append(list(phrases))
        boxes = [b for b in (LEFT, RIGHT) if float(image[b[1]:b[3], b[0]:b[2]].mean()) < 0.99]
        found = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        return [(found.clone(), torch.full((len(found),), 0.9)) for _ in phrases]


def _scene(left=None, right=None):
    image = torch.ones(HEIGHT, WIDTH, 3)
    for box, colour in ((LEFT, left), (RIGHT, right)):
        if colour is not None:
            image[box[1]:box[3], box[0]:box[2]] = torch.tensor(colour)
    return image


def _subjects(labels=("red toy", "blue toy")):
    return Subjects(tuple(Subject(images=torch.tensor(c).expand(1, 16, 16, 3).clone(), label=label)
                          for c, label in zip((RED, BLUE), labels)))


@pytest.fixture
def scorer():
    return IdentityScorer(objects=ColourEmbedder(), locator=ObjectLocator(SceneDetector()))


def test_correct_composition_beats_an_average_object_which_beats_a_duplicate(scorer):
    refs = scorer.embed_references(_subjects())
    correct = scorer.score_image(_scene(RED, BLUE), refs)
    blended = scorer.score_image(_scene(PURPLE, PURPLE), refs)
    duplicated = scorer.score_image(_scene(RED, RED), refs)
    assert correct.score == pytest.approx(1.0, abs=1e-6) and correct.object_source == "detector"
    assert blended.score == pytest.approx(0.5 ** 0.5, abs=1e-6)
    assert duplicated.score == pytest.approx(0.5, abs=1e-6)  # one red credited once, blue gets nothing
    assert correct.score > blended.score > duplicated.score
    # the same box proposed for both labels is one candidate: one object cannot stand in for two references
    assert len(duplicated.object_boxes) == 2 and len(scorer.score_image(_scene(RED, None), refs).object_boxes) == 1


def test_a_missing_object_scores_zero_for_its_reference(scorer):
    result = scorer.score_image(_scene(None, BLUE), scorer.embed_references(_subjects()))
    assert result.per_subject.tolist() == pytest.approx([0.0, 1.0], abs=1e-6)
    assert result.assignment.tolist() == [-1, 0] and result.score == pytest.approx(0.5)


def test_detector_is_queried_with_each_label_once_and_a_fallback_for_unlabelled_subjects(scorer):
    scorer.score_image(_scene(RED, BLUE), scorer.embed_references(_subjects(("toy", ""))))
    scorer.score_image(_scene(RED, BLUE), scorer.embed_references(_subjects(("toy", "toy"))))
    assert scorer.locator.detector.queries == [["toy", FALLBACK_QUERY], ["toy"]]


def test_segmenter_masks_the_candidate_crops():
    class HalfMask:
        def segment(self, image, boxes):
            masks = torch.zeros(len(boxes), *image.shape[:2])
            for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
                masks[k, y0:y1, x0:(x0 + x1) // 2] = 1.0
            return masks

    image = _scene(RED, BLUE)
    image[LEFT[1]:LEFT[3], 32:LEFT[2]] = torch.tensor(BLUE)  # right half of the red object is background clutter
    candidates = ObjectLocator(SceneDetector(), HalfMask()).locate(image, ["red toy"])
    crop = candidates.crops[0]
    assert torch.all(crop[:, :24] == torch.tensor(RED)) and torch.all(crop[:, 24:] == 1.0)


def test_sam_segmenter_gives_one_image_sized_mask_per_box_and_refuses_other_models(tmp_path):
    pytest.importorskip("transformers", reason="needs the eval extra")
    from scoring_fakes import built

    from multisubject.scoring.segment import BoxSegmenter

    segmenter = BoxSegmenter.load(built("sam"), device="cpu")
    masks = segmenter.segment(torch.rand(50, 100, 3), torch.tensor([[10.0, 10.0, 40.0, 40.0], [50.0, 5.0, 90.0, 45.0]]))
    assert masks.shape == (2, 50, 100) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert segmenter.segment(torch.rand(50, 100, 3), torch.zeros(0, 4)).shape == (0, 50, 100)
    with pytest.raises(ValueError, match="holds a 'owlv2' model; expected a SAM folder"):
        BoxSegmenter.load(built("owlv2"))


def test_without_a_detector_objects_are_not_located_and_it_is_said(caplog):
    scorer = IdentityScorer(objects=ColourEmbedder())
    refs = scorer.embed_references(_subjects())
    with caplog.at_level(logging.WARNING, logger="multisubject"):
        result = scorer.score_image(_scene(PURPLE, PURPLE), refs)
        scorer.score_image(_scene(RED, BLUE), refs)
    assert result.objects_located is False and result.object_source == "whole image"
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1  # logged once per scorer
    assert NOT_LOCATED in caplog.records[0].message
    assert NOT_LOCATED in report_caption(result) and NOT_LOCATED not in report_caption(
        IdentityScorer(objects=ColourEmbedder(), locator=ObjectLocator(SceneDetector())).score_image(
            _scene(RED, BLUE), refs))


# evaluation


def _sample(tmp_path, name, image, layout=LAYOUT):
    path = tmp_path / f"{name}.png"
    Image.fromarray((image * 255).round().byte().numpy()).save(path)
    return Sample(0, name, path, "a red toy and a blue toy", _subjects(), layout, "refs")


def test_subjects_swapped_between_their_boxes_lose_dino_i_clip_i_and_ip_conf(tmp_path):
    evaluator = Evaluator(dino=ColourEmbedder("dinov2"), clip=ColourEmbedder("clip"))
    good = evaluator.evaluate(_sample(tmp_path, "good", _scene(RED, BLUE)), "run").metrics
    swapped = evaluator.evaluate(_sample(tmp_path, "swapped", _scene(BLUE, RED)), "run").metrics
    for name in ("DINO-I", "CLIP-I"):
        assert good[name] == pytest.approx(1.0, abs=1e-6) and swapped[name] == pytest.approx(0.0, abs=1e-6)
        # the Hungarian variant re-matches and cannot see the swap: that is why it is a separate column
        assert swapped[f"{name} (Hungarian)"] == pytest.approx(1.0, abs=1e-6)
    assert good["IP-Conf"] == pytest.approx(1.0, abs=1e-6) and swapped["IP-Conf"] == 0.0  # confusion rises


def test_without_a_layout_eval_locates_subjects_or_footnotes_that_it_could_not(tmp_path):
    located = Evaluator(dino=ColourEmbedder(), detector=SceneDetector())
    blended = located.evaluate(_sample(tmp_path, "blend", _scene(PURPLE, PURPLE), layout=None), "run")
    correct = located.evaluate(_sample(tmp_path, "right", _scene(RED, BLUE), layout=None), "run")
    assert correct.metrics["DINO-I"] == pytest.approx(1.0) and blended.metrics["DINO-I"] == pytest.approx(0.5 ** 0.5)
    assert correct.objects_located is True
    whole = Evaluator(dino=ColourEmbedder()).evaluate(_sample(tmp_path, "w", _scene(RED, BLUE), layout=None), "run")
    assert whole.objects_located is False
    table = format_table({"run": summarise([whole])}, ["DINO-I"])
    assert f"Note: {NOT_LOCATED} in 1 sample(s) of run run" in table
    assert "Note" not in format_table({"run": summarise([correct])}, ["DINO-I"])


def test_id_conf_follows_umo_and_drops_to_zero_for_a_swap_with_a_layout():
    similarity = torch.tensor([[0.9, 0.3], [0.2, 0.8]])
    # UMO: (s1 - s2) / s1 per reference, best two candidates
    assert identity_confusion(similarity).tolist() == pytest.approx([0.6 / 0.9, 0.6 / 0.8])
    assert identity_confusion(similarity, torch.tensor([0, 1])).tolist() == pytest.approx([0.6 / 0.9, 0.6 / 0.8])
    assert identity_confusion(similarity, torch.tensor([1, 0])).tolist() == [0.0, 0.0]  # swapped
    assert identity_confusion(torch.tensor([[0.7, 0.7]])).tolist() == [0.0]  # duplicated: fully confused
    assert torch.isnan(identity_confusion(torch.tensor([[0.9]]))).all()  # one candidate: UMO leaves it out


def test_face_id_conf_drops_for_faces_swapped_between_their_boxes(tmp_path):
    pytest.importorskip("insightface", reason="needs the eval extra")
    from scoring_fakes import built, face_canvas

    from multisubject.scoring.faces import FaceEmbedder

    evaluator = Evaluator(faces=FaceEmbedder.load("buffalo_l", roots=[built("face_root")]))
    subjects = Subjects(tuple(Subject(images=face_canvas([(s, 10, 10)])[None], label=f"p{s}") for s in (11, 22)))
    layout = Layout.from_boxes(640, 640, [(0.05, 0.2, 0.45, 0.8), (0.55, 0.2, 0.95, 0.8)])
    results = {}
    for name, faces in (("good", [(11, 5, 10), (22, 15, 10)]), ("swapped", [(22, 5, 10), (11, 15, 10)])):
        path = tmp_path / f"{name}.png"
        Image.fromarray((face_canvas(faces) * 255).round().byte().numpy()).save(path)
        results[name] = evaluator.evaluate(Sample(0, name, path, "", subjects, layout, "f"), "run").metrics
    assert results["good"]["ID-Conf"] > 0.05 and results["swapped"]["ID-Conf"] == 0.0
    assert results["swapped"]["Face-Sim"] == pytest.approx(results["good"]["Face-Sim"], abs=1e-4)  # papers' metric


def test_two_same_label_subjects_placed_perfectly_give_miou_one_and_ap50_one():
    targets = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0]])
    # the detector finds both dogs; the better-scored box is the second dog's
    boxes = torch.tensor([[20.0, 0.0, 30.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    dogs = [(boxes, torch.tensor([0.9, 0.8]))] * 2
    assert layout_ious(dogs, targets, ["dog", "dog"]).tolist() == pytest.approx([1.0, 1.0])
    assert average_precision_50([(dogs, targets, ["dog", "dog"])]) == pytest.approx(1.0)
    one = [(boxes[:1], torch.tensor([0.9]))] * 2  # only one dog found: the other subject gets nothing
    assert layout_ious(one, targets, ["dog", "dog"]).tolist() == pytest.approx([0.0, 1.0])


@pytest.mark.parametrize("family", ["owlvit", "owlv2"])
def test_owl_boxes_land_on_the_object_of_a_non_square_image(family):
    """A 200x100 image with an object at x 50..150, y 25..75. OWL-ViT stretches the image to its square input, so
    the model's normalised box is relative to the image; OWLv2 pads it to 200x200 first, so it is relative to the
    padded square. Either way the detector must return the object's pixel box."""
    pytest.importorskip("transformers", reason="needs the eval extra")
    from scoring_fakes import built
    from transformers import AutoProcessor
    from transformers.models.owlvit.modeling_owlvit import OwlViTObjectDetectionOutput

    from multisubject.scoring.metrics import PhraseDetector

    predicted = {"owlvit": [0.5, 0.5, 0.5, 0.5], "owlv2": [0.5, 0.25, 0.5, 0.25]}[family]  # cx, cy, w, h

    class FixedOwl(torch.nn.Module):
        def forward(self, input_ids, pixel_values, **_):
            logits = torch.full((1, 2, input_ids.shape[0]), -10.0)
            logits[0, 0, 0] = 10.0
            return OwlViTObjectDetectionOutput(logits=logits, pred_boxes=torch.tensor([[predicted, [0.1] * 4]]))

    processor = AutoProcessor.from_pretrained(built(family), local_files_only=True)
    detector = PhraseDetector(FixedOwl(), processor, "cpu")
    (boxes, scores), = detector.detect(torch.rand(100, 200, 3), ["toy"])
    assert len(boxes) == 1 and boxes[0].tolist() == pytest.approx([50.0, 25.0, 150.0, 75.0], abs=1e-3)


def test_multi_id_reward_locates_objects_with_its_detector_and_segmenter(caplog):
    pytest.importorskip("transformers", reason="needs the eval extra")
    from scoring_fakes import built

    from multisubject.train.rewards import RewardConfig, RewardInputs, build_rewards, check_reward_config

    with pytest.raises(ValueError, match="segmenter_dir masks the objects detector_dir locates"):
        check_reward_config(RewardConfig(weights={"multi_id": 1.0}, object_model_dir=str(built("dinov2")),
                                         segmenter_dir=str(built("sam"))))
    config = RewardConfig(weights={"multi_id": 1.0}, object_model_dir=str(built("dinov2")),
                          detector_dir=str(built("owlv2")), detection_threshold=0.0, segmenter_dir=str(built("sam")),
                          device="cpu")
    reward = build_rewards(config)["multi_id"]
    images = torch.stack([_scene(RED, BLUE), _scene(PURPLE, None)])
    with caplog.at_level(logging.WARNING, logger="multisubject"):
        scores = reward(RewardInputs(images=images, prompts=("x",) * 2, subjects=(_subjects(),) * 2))
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 1)).all()
    assert not any(NOT_LOCATED in r.message for r in caplog.records)  # located, not the whole image
