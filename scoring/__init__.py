"""Identity scoring and benchmark evaluation (pure: no ComfyUI imports, relative imports only).

Used by the ``MS_ScoreIdentity`` node, the ``python -m multisubject eval`` CLI and, as the identity
reward, by the RL trainer. Heavy optional packages (insightface, onnxruntime, transformers, open_clip,
matplotlib, tqdm: the ``eval`` extra) are imported only when a scorer is loaded.

The reward in one call::

    from multisubject.scoring import IdentityScorer
    scorer = IdentityScorer.from_paths(face_pack="antelopev2", insightface_roots=["ComfyUI/models/insightface"],
                                       object_model="models/reward_models/dinov2-base")
    refs = scorer.embed_references(subjects)   # once per subject list (attention.Subjects)
    reward = scorer(images, refs, layout)      # images (B, H, W, 3) in [0, 1] -> (B,) float32 in [0, 1]

Shape legend: B images, S subjects, R reference images of one subject, H, W pixels, M references and
K candidates of one matching problem, E / D embedding widths.
"""

from .faces import FaceEmbedder, resolve_face_pack
from .identity import IdentityResult, IdentityScorer, ReferenceSet
from .matching import Matching, match_identities
from .objects import ImageEmbedder

__all__ = [
    "FaceEmbedder",
    "IdentityResult",
    "IdentityScorer",
    "ImageEmbedder",
    "Matching",
    "ReferenceSet",
    "match_identities",
    "resolve_face_pack",
]
