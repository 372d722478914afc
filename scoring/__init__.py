"""Identity scoring and benchmark evaluation (pure: no ComfyUI imports, relative imports only).

Used by the ``MS_ScoreIdentity`` node, the ``python -m multisubject eval`` CLI and, as the identity
reward, by the RL trainer. Heavy optional packages (insightface, onnxruntime, transformers, open_clip,
matplotlib, tqdm: the ``eval`` extra) are imported only when a scorer is loaded.

The reward in one call::

    from multisubject.scoring import IdentityScorer
    scorer = IdentityScorer.from_paths(face_pack="antelopev2", insightface_roots=["ComfyUI/models/insightface"],
                                       object_model="models/reward_models/dinov2-base",
                                       detector="models/reward_models/owlv2-base")  # locates objects (no layout)
    refs = scorer.embed_references(subjects)   # once per subject list (attention.Subjects)
    reward = scorer(images, refs, layout)      # images (B, H, W, 3) in [0, 1] -> (B,) float32 in [0, 1]

Shape legend: B images, S subjects, R reference images of one subject, H, W pixels, M references and
K candidates of one matching problem, E / D embedding widths.
"""

from .confusion import identity_confusion
from .faces import FaceEmbedder, resolve_face_pack
from .identity import IdentityResult, IdentityScorer, ReferenceSet
from .locate import ObjectLocator
from .matching import Matching, match_identities
from .objects import ImageEmbedder
from .segment import BoxSegmenter

__all__ = [
    "BoxSegmenter",
    "FaceEmbedder",
    "IdentityResult",
    "IdentityScorer",
    "ImageEmbedder",
    "Matching",
    "ObjectLocator",
    "ReferenceSet",
    "identity_confusion",
    "match_identities",
    "resolve_face_pack",
]
