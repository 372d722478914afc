"""Multi-ID identity score: faces by ArcFace, other subjects by DINOv2/CLIP, Hungarian-matched.

Implements MultiCrafter's Multi-ID Alignment Reward R_id (spec §5.4, recommended recipe):

* faces: every face detected in the generated image (score >= threshold) is a candidate; a face
  reference is the mean ArcFace embedding of the largest face in each of its reference images;
* objects: located, then matched (``locate``): the candidates are the layout's regions (masked crops, white
  background) when a layout is given, else the boxes an open-vocabulary detector finds for the object subjects'
  labels. With neither, the whole image stands in for every object reference (DreamBench: each reference is
  compared with the whole image, nothing to match) and the result says "objects not located";
* faces and objects are matched in separate Hungarian problems; the score is the sum of matched
  similarities (clamped at 0) divided by the number of subjects, so a missing subject scores 0, an extra
  detection earns nothing and one identity repeated twice is credited once.

Which subjects are faces (``kind="auto"``): a subject is a face when a face pack is loaded and a face is
found in its reference image(s); otherwise it is an object.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..attention.layout import Layout
from ..attention.subjects import Subjects
from .faces import FaceEmbedder
from .locate import NOT_LOCATED, Candidates, ObjectLocator, object_candidates
from .matching import Matching, match_identities
from .objects import ImageEmbedder, masked_crop

log = logging.getLogger("multisubject")

KINDS = ("auto", "face", "object")


def check_images(images: Tensor, what: str = "images") -> Tensor:
    """Shapes: images (B, H, W, 3) float RGB in [0, 1] (a single (H, W, 3) becomes B = 1)."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{what} must be a torch tensor (B, H, W, 3), got {type(images).__name__}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{what} must be (B, H, W, 3) RGB float in [0, 1], got shape {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{what} contain NaN or inf values; the decoder or the pipeline upstream produced them")
    return images


def _reference_crop(image: Tensor, mask: Tensor | None) -> Tensor:
    """The subject in one reference image: its mask's bounding box with a white background, or the whole image."""
    if mask is None or float(mask.max()) <= 0.0:
        return image
    ys, xs = torch.nonzero(mask > 0, as_tuple=True)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return masked_crop(image, box, mask)


def embed_object_references(embedder: ImageEmbedder, subjects: Subjects, indices: Sequence[int]) -> Tensor:
    """Mean embedding of each subject's reference images (masked crops when the subject has masks).

    Shapes:
        returns (len(indices), D) L2-normalised
    """
    if not indices:
        return torch.zeros(0, 0)
    rows = []
    for i in indices:
        subject = subjects[i]
        crops = [
            _reference_crop(subject.images[r], None if subject.masks is None else subject.masks[r])
            for r in range(subject.num_images)
        ]
        rows.append(torch.nn.functional.normalize(embedder.embed_images(crops).mean(0), dim=-1))
    return torch.stack(rows)


def object_matching(embedder: ImageEmbedder, references: Tensor, candidates: Candidates) -> Matching:
    """Match object references to candidate crops (Hungarian), or compare each with the whole image.

    Shapes:
        references: (M, D); returns Matching over (M, K)
    """
    if references.shape[0] == 0:
        return match_identities(torch.zeros(0, len(candidates.crops)))
    if not candidates.crops:
        return match_identities(torch.zeros(references.shape[0], 0))
    similarity = references @ embedder.embed_images(candidates.crops).T  # (M, K)
    if not candidates.located:  # DreamBench: every reference against the whole image, no competition for it
        sim = similarity[:, 0]
        if torch.isnan(sim).any():
            match_identities(similarity)  # raises the NaN message
        return Matching(similarity, torch.zeros(len(sim), dtype=torch.long), sim.clamp(min=0.0))
    return match_identities(similarity)


@dataclass(frozen=True)
class ReferenceSet:
    """A subject list embedded once, reused for every generated image scored against it.

    Shapes:
        face_embeddings:   (F, E) ArcFace, rows follow ``face_subjects``
        object_embeddings: (O, D) DINOv2/CLIP, rows follow ``object_subjects``
    """

    subjects: Subjects
    kinds: tuple[str, ...]  # per subject: "face", "object" (or "none": not scorable, see embed_references)
    face_embeddings: Tensor
    object_embeddings: Tensor

    @property
    def face_subjects(self) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k == "face"]

    @property
    def object_subjects(self) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k == "object"]

    def __len__(self) -> int:
        return len(self.kinds)


@dataclass(frozen=True)
class IdentityResult:
    """Identity score of one generated image, with everything needed to draw or tabulate it.

    Shapes:
        per_subject:  (S,) matched similarity per subject (subject order), 0 when unmatched
        face_boxes:   (K_f, 4) pixels of detected faces; object_boxes: (K_o, 4) pixels of object candidates
        assignment:   (S,) candidate index within its kind's boxes, -1 when unmatched
    ``object_source``: where the object candidates came from ("layout", "detector", "whole image"; "" when no
    subject is an object); "whole image" means the objects were not located.
    """

    score: float
    kinds: tuple[str, ...]
    per_subject: Tensor
    assignment: Tensor
    face_boxes: Tensor
    object_boxes: Tensor
    face_matching: Matching | None
    object_matching: Matching | None
    object_source: str = ""

    @property
    def objects_located(self) -> bool | None:
        """False when object subjects were compared with the whole image; None when there are none."""
        return None if not self.object_source else self.object_source != "whole image"

    @property
    def face_score(self) -> float | None:
        """Face-Sim of this image: mean over face references (None when no subject is a face)."""
        return None if self.face_matching is None else self.face_matching.score

    @property
    def object_score(self) -> float | None:
        return None if self.object_matching is None else self.object_matching.score


class IdentityScorer:
    """The identity reward and the score node's core.

    Usage (e.g. in a trainer)::

        scorer = IdentityScorer.from_paths(face_pack="antelopev2", insightface_roots=[insightface_root],
                                           object_model=dinov2_dir)
        refs = scorer.embed_references(subjects)        # once per subject list
        reward = scorer(images, refs, layout)           # (B,) float tensor, one score per image
    """

    def __init__(self, faces: FaceEmbedder | None = None, objects: ImageEmbedder | None = None,
                 kind: str = "auto", locator: ObjectLocator | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if faces is None and objects is None:
            raise ValueError("identity scoring needs a face pack, an object model (DINOv2/CLIP), or both; got neither")
        if kind == "face" and faces is None:
            raise ValueError("kind='face' needs a face pack (insightface); load one or use kind='auto'")
        if kind == "object" and objects is None:
            raise ValueError("kind='object' needs an object model (DINOv2 or CLIP folder); load one or use kind='auto'")
        self.faces = faces
        self.objects = objects
        self.kind = kind
        self.locator = locator  # finds object subjects when no layout is given; None: whole image (not located)
        self._warned_not_located = False

    @classmethod
    def from_paths(cls, face_pack: str | None = None, insightface_roots: Sequence[str] = (),
                   object_model: str | None = None, kind: str = "auto", det_threshold: float = 0.5,
                   device: str | None = None, detector: str | None = None,
                   detection_threshold: float | None = None) -> IdentityScorer:
        """Load the scorer from local files (a trainer's config): a face pack (name under the roots, or a
        folder), a DINOv2/CLIP/DINO folder for objects and an OWLv2 / OWL-ViT folder that locates them.
        Nothing is downloaded; missing files raise naming them."""
        from .metrics import DETECTION_THRESHOLD, PhraseDetector

        faces = FaceEmbedder.load(face_pack, roots=list(insightface_roots), det_threshold=det_threshold) \
            if face_pack else None
        objects = ImageEmbedder.load(object_model, device, what="object model") if object_model else None
        threshold = DETECTION_THRESHOLD if detection_threshold is None else detection_threshold
        locator = ObjectLocator(PhraseDetector.load(detector, device, threshold)) if detector else None
        return cls(faces=faces, objects=objects, kind=kind, locator=locator)

    def embed_references(self, subjects: Subjects, unscorable_ok: bool = False) -> ReferenceSet:
        """Decide each subject's kind and embed its references.

        ``unscorable_ok``: a subject without a face while no object model is loaded gets kind "none"
        (left out of both matchings, still counted in the mean) instead of raising; the evaluation
        uses it so Face-Sim works without an object model.

        Shapes:
            subjects: S subjects, each with (R, H, W, 3) reference images
        """
        if len(subjects) == 0:
            raise ValueError("no subjects to score against; connect at least one subject")
        kinds, face_rows = [], []
        for i, subject in enumerate(subjects):
            embedding = None
            if self.faces is not None and self.kind != "object":
                embedding = self._face_reference(subject.images)
            if embedding is None:
                if unscorable_ok and self.objects is None:
                    kinds.append("none")
                    continue
                if self.kind == "face" or self.objects is None:
                    name = subject.label or f"subject {i}"
                    why = "kind is 'face'" if self.kind == "face" else "no object model (DINOv2/CLIP) is loaded"
                    raise ValueError(
                        f"no face found in the reference image(s) of '{name}', and {why}; use a reference with a "
                        "clearly visible face, or load an object model to score it as an object"
                    )
                kinds.append("object")
            else:
                kinds.append("face")
                face_rows.append(embedding)
        objects = [i for i, k in enumerate(kinds) if k == "object"]
        object_embeddings = (
            embed_object_references(self.objects, subjects, objects) if objects else torch.zeros(0, 0)
        )
        face_embeddings = torch.stack(face_rows) if face_rows else torch.zeros(0, 0)
        return ReferenceSet(subjects, tuple(kinds), face_embeddings, object_embeddings)

    def _face_reference(self, images: Tensor) -> Tensor | None:
        rows = []
        for image in images:
            faces = self.faces.detect(image)
            if len(faces):
                rows.append(faces.embeddings[faces.largest()])
        if not rows:
            return None
        return torch.nn.functional.normalize(torch.stack(rows).mean(0), dim=-1)

    def score_image(self, image: Tensor, references: ReferenceSet, layout: Layout | None = None) -> IdentityResult:
        """Shapes: image (H, W, 3) float RGB in [0, 1]."""
        if layout is not None:
            layout.check_subject_count(len(references))
        num_subjects = len(references)
        per_subject = torch.zeros(num_subjects)
        assignment = torch.full((num_subjects,), -1, dtype=torch.long)
        face_match = object_match = None
        face_boxes = object_boxes = torch.zeros(0, 4)
        if references.face_subjects:
            faces = self.faces.detect(image)
            face_boxes = faces.boxes
            similarity = (references.face_embeddings @ faces.embeddings.T if len(faces)
                          else torch.zeros(len(references.face_subjects), 0))
            face_match = match_identities(similarity)
            _scatter(per_subject, assignment, references.face_subjects, face_match)
        source = ""
        if references.object_subjects:
            labels = [references.subjects[i].label for i in references.object_subjects]
            candidates = object_candidates(image, labels, layout, self.locator)
            object_match, object_boxes, source = (
                object_matching(self.objects, references.object_embeddings, candidates), candidates.boxes,
                candidates.source)
            _scatter(per_subject, assignment, references.object_subjects, object_match)
            if not candidates.located and not self._warned_not_located:
                self._warned_not_located = True
                log.warning("identity: %s: no layout and no object detector, so each object reference is compared "
                            "with the whole image (a blended 'average object' scores like the right one); configure "
                            "an OWLv2 detector to locate them", NOT_LOCATED)
        return IdentityResult(
            score=float(per_subject.sum()) / num_subjects, kinds=references.kinds, per_subject=per_subject,
            assignment=assignment, face_boxes=face_boxes, object_boxes=object_boxes,
            face_matching=face_match, object_matching=object_match, object_source=source,
        )

    def score_batch(self, images: Tensor, subjects, layout=None) -> list[IdentityResult]:
        """Score every image of a batch; ``subjects``/``layout`` may be one for all or a sequence of B.

        Shapes:
            images: (B, H, W, 3) float RGB in [0, 1]
        """
        images = check_images(images)
        batch = images.shape[0]
        references = _per_image(subjects, batch, "subject lists")
        layouts = _per_image(layout, batch, "layouts")
        cache: dict[int, ReferenceSet] = {}
        results = []
        for image, refs, lay in zip(images, references, layouts):
            if not isinstance(refs, ReferenceSet):
                if id(refs) not in cache:
                    cache[id(refs)] = self.embed_references(refs)
                refs = cache[id(refs)]
            results.append(self.score_image(image, refs, lay))
        return results

    def __call__(self, images: Tensor, subjects, layout=None) -> Tensor:
        """The identity reward: one score per image.

        Args:
            images: generated images, (B, H, W, 3) float RGB in [0, 1] (ComfyUI IMAGE layout; any device).
            subjects: ``Subjects`` or a ``ReferenceSet`` from ``embed_references`` (embed once, reuse), or a
                sequence of B of them (one per image, e.g. a GRPO batch mixing prompts).
            layout: optional ``Layout`` (or a sequence of B, entries may be None); its regions are where the
                object subjects are looked for. Without one they are located by the detector, if configured,
                else compared with the whole image ("objects not located").

        Shapes:
            returns (B,) float32 on the CPU, each in [0, 1]
        """
        return torch.tensor([r.score for r in self.score_batch(images, subjects, layout)], dtype=torch.float32)


def _per_image(value, batch: int, what: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != batch:
            raise ValueError(
                f"got {batch} image(s) but {len(value)} {what}; give one per image, or a single one for the whole batch"
            )
        return list(value)
    return [value] * batch


def _scatter(per_subject: Tensor, assignment: Tensor, subject_indices: list[int], matching: Matching) -> None:
    for row, subject in enumerate(subject_indices):
        per_subject[subject] = matching.matched[row]
        assignment[subject] = matching.assignment[row]
