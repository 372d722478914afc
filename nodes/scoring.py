"""Identity scoring node: IMAGE + SUBJECTS (+ LAYOUT) -> Multi-ID score and a report image.

Model folders (registered here, so ``extra_model_paths.yaml`` entries with these names work too):
  * ``models/insightface/models/<pack>/*.onnx``: insightface face packs (buffalo_l, antelopev2), the
    folder IPAdapter / InstantID / PuLID already use;
  * ``models/reward_models/<name>/``: transformers folders: DINO (ViT) / DINOv2 / CLIP for object subjects, and
    OWLv2 / OWL-ViT detectors that locate them when no layout is connected.
"""

from __future__ import annotations

import json
import os

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..attention.checks import check_image_batch
from ..scoring.faces import resolve_face_pack
from ..scoring.identity import KINDS
from ..scoring.objects import SUPPORTED
from .inputs import check_inputs, check_name, model_folder, require_inside
from .types import CATEGORY, LAYOUT, PREFIX, SUBJECTS

NONE = "none"
FACE_FOLDER = "insightface"
OBJECT_FOLDER = "reward_models"
for _name in (FACE_FOLDER, OBJECT_FOLDER):
    folder_paths.add_model_folder_path(_name, os.path.join(folder_paths.models_dir, _name))

_LOADED: dict[tuple, object] = {}  # loaded models, reused across runs (keyed by folder + settings)


def _roots(name: str) -> list[str]:
    return folder_paths.get_folder_paths(name)


def face_packs() -> list[str]:
    """Pack folders under every insightface root that hold .onnx files."""
    found = []
    for root in _roots(FACE_FOLDER):
        models = os.path.join(root, "models")
        if os.path.isdir(models):
            found += [d for d in sorted(os.listdir(models))
                      if any(f.endswith(".onnx") for f in _listdir(os.path.join(models, d)))
                      or any(f.endswith(".onnx") for f in _listdir(os.path.join(models, d, d)))]
    return list(dict.fromkeys(found))


def _reward_models(model_types: tuple[str, ...]) -> list[str]:
    """Sub-folders of reward_models whose config.json names one of ``model_types``."""
    found = []
    for root in _roots(OBJECT_FOLDER):
        for name in sorted(_listdir(root)):
            config = os.path.join(root, name, "config.json")
            try:
                with open(config) as f:
                    if json.load(f).get("model_type") in model_types:
                        found.append(name)
            except (OSError, ValueError):
                continue
    return list(dict.fromkeys(found))


def object_models() -> list[str]:
    """DINO (ViT), DINOv2 and CLIP folders in reward_models."""
    return _reward_models(tuple(SUPPORTED))


def object_detectors() -> list[str]:
    """OWLv2 / OWL-ViT folders in reward_models."""
    return _reward_models(("owlv2", "owlvit"))


def object_segmenters() -> list[str]:
    """SAM folders in reward_models."""
    return _reward_models(("sam",))


def _listdir(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []


def _face_pack_dir(pack: str):
    """The pack's folder, inside a registered insightface root (names only: no paths, no links out)."""
    name = check_name(FACE_FOLDER, pack, "face pack")
    return require_inside(resolve_face_pack(_roots(FACE_FOLDER), name), FACE_FOLDER, "face pack", name)


def _load_faces(pack: str, det_threshold: float):
    from ..scoring.faces import FaceEmbedder

    pack_dir = _face_pack_dir(pack)
    key = ("faces", str(pack_dir), det_threshold)
    if key not in _LOADED:
        _LOADED[key] = FaceEmbedder.load(pack_dir, det_threshold=det_threshold)
    return _LOADED[key]


def _load_objects(name: str):
    from ..scoring.objects import ImageEmbedder

    folder = str(model_folder(OBJECT_FOLDER, name, "object model"))
    key = ("objects", folder)
    if key not in _LOADED:
        _LOADED[key] = ImageEmbedder.load(folder, what=f"object model '{name}'")
    return _LOADED[key]


def _load_locator(detector: str, segmenter: str):
    from ..scoring.locate import ObjectLocator
    from ..scoring.metrics import PhraseDetector
    from ..scoring.segment import BoxSegmenter

    folder = str(model_folder(OBJECT_FOLDER, detector, "object detector"))
    masks = str(model_folder(OBJECT_FOLDER, segmenter, "object segmenter")) if segmenter != NONE else None
    key = ("locator", folder, masks)
    if key not in _LOADED:
        _LOADED[key] = ObjectLocator(PhraseDetector.load(folder), BoxSegmenter.load(masks) if masks else None)
    return _LOADED[key]


def _check_models(face_pack: str, object_model: str, object_detector: str = NONE, object_segmenter: str = NONE) -> None:
    if face_pack == NONE and object_model == NONE:
        raise ValueError("choose a face_pack (for people) and/or an object_model (for other subjects); both are "
                         "'none'. Put packs in models/insightface/models/ and DINO/DINOv2/CLIP folders in "
                         "models/reward_models/")
    if face_pack != NONE:
        _face_pack_dir(face_pack)
    if object_model != NONE:
        model_folder(OBJECT_FOLDER, object_model, "object model")
    if object_detector not in (None, NONE):
        model_folder(OBJECT_FOLDER, object_detector, "object detector")
    if object_segmenter not in (None, NONE):
        if object_detector in (None, NONE):
            raise ValueError("object_segmenter masks what object_detector finds; choose an object_detector as well")
        model_folder(OBJECT_FOLDER, object_segmenter, "object segmenter")


class ScoreIdentity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}ScoreIdentity",
            display_name="Score Identity (Multi-ID)",
            category=f"{CATEGORY}/scoring",
            description=(
                "How well the generated image keeps every subject's identity: faces by ArcFace (insightface pack), "
                "other subjects by DINO/DINOv2/CLIP on the layout's regions, or where an OWLv2 detector finds them; "
                "references and candidates are matched one-to-one (Hungarian), so a missing subject scores 0 and a "
                "repeated face is credited once. Needs the pack's 'eval' extra."
            ),
            inputs=[
                io.Image.Input("image", tooltip="Generated image(s) to score; each image of the batch is scored."),
                SUBJECTS.Input("subjects", tooltip="The subjects whose identities should appear in the image."),
                io.Combo.Input(
                    "face_pack", options=[NONE] + face_packs(), default=NONE,
                    tooltip="insightface pack in models/insightface/models/<pack> (antelopev2, buffalo_l) for face "
                    "subjects; none = score every subject as an object. Packs are never downloaded.",
                ),
                io.Combo.Input(
                    "object_model", options=[NONE] + object_models(), default=NONE,
                    tooltip="DINO (ViT), DINOv2 or CLIP folder in models/reward_models/ for subjects without a face; "
                    "none = faces only.",
                ),
                io.Combo.Input(
                    "subject_kind", options=list(KINDS), default="auto",
                    tooltip="auto: a subject is a face when a face is found in its reference, else an object. face / "
                    "object: score every subject that way.",
                ),
                io.Float.Input(
                    "face_threshold", default=0.5, min=0.05, max=0.95, step=0.05,
                    tooltip="Face detection score threshold (insightface's default 0.5).",
                ),
                LAYOUT.Input(
                    "layout", optional=True,
                    tooltip="Optional layout: object subjects are looked for in its regions. Without one they are "
                    "located by the object detector; without that either, each object reference is compared with "
                    "the whole image and the report says 'objects not located'.",
                ),
                io.Combo.Input(
                    "object_detector", options=[NONE] + object_detectors(), default=NONE, optional=True,
                    tooltip="OWLv2 / OWL-ViT folder in models/reward_models/ that finds object subjects by their label "
                    "(subjects without a label are searched as 'an object') when no layout is connected.",
                ),
                io.Combo.Input(
                    "object_segmenter", options=[NONE] + object_segmenters(), default=NONE, optional=True,
                    tooltip="SAM folder in models/reward_models/ that masks each located object (white background) "
                    "before it is embedded; none = the detector's box is the crop.",
                ),
            ],
            outputs=[
                io.Float.Output(display_name="score", tooltip="Mean identity score over the batch, 0..1."),
                io.Image.Output(display_name="report", tooltip="Boxes, lines to the matched references, scores."),
            ],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, face_pack, object_model, object_detector=NONE, object_segmenter=NONE):
        # names only the model inputs, so ComfyUI still checks the others (ranges); V3 combos are not checked by
        # ComfyUI at all, so the folders are resolved here, and again in execute
        try:
            _check_models(face_pack, object_model, object_detector, object_segmenter)
        except (FileNotFoundError, ValueError) as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, image, subjects, face_pack, object_model, subject_kind, face_threshold,
                layout=None, object_detector=NONE, object_segmenter=NONE) -> io.NodeOutput:
        from ..scoring.identity import IdentityScorer
        from ..scoring.report import render_identity_report

        check_inputs(cls, subject_kind=subject_kind, face_threshold=face_threshold)
        check_image_batch("image", image)
        _check_models(face_pack, object_model, object_detector, object_segmenter)
        faces = _load_faces(face_pack, float(face_threshold)) if face_pack != NONE else None
        objects = _load_objects(object_model) if object_model != NONE else None
        locator = _load_locator(object_detector, object_segmenter or NONE) \
            if object_detector not in (None, NONE) else None
        scorer = IdentityScorer(faces=faces, objects=objects, kind=subject_kind, locator=locator)
        results = scorer.score_batch(image[..., :3], subjects, layout)
        reports = torch.stack([
            render_identity_report(img, result, subjects, title=f"#{i + 1}" if len(results) > 1 else "")
            for i, (img, result) in enumerate(zip(image[..., :3], results))
        ])
        score = sum(r.score for r in results) / len(results)
        return io.NodeOutput(score, reports, ui=ui.PreviewImage(reports, cls=cls))
