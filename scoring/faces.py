"""Face identity: insightface detection + ArcFace embeddings from a local model pack.

Packs live where ComfyUI's face packs (IPAdapter, InstantID, PuLID) already keep them:
``<root>/models/<pack>/*.onnx`` with ``<root> = ComfyUI/models/insightface``. Layouts of the two usual
packs (only the detector and the recognizer are loaded):

* ``buffalo_l``:  ``det_10g.onnx`` (SCRFD detector) + ``w600k_r50.onnx`` (ArcFace R50)
* ``antelopev2``: ``scrfd_10g_bnkps.onnx`` (SCRFD detector) + ``glintr100.onnx`` (ArcFace R100)

The folder is resolved and checked here, before insightface is constructed, so insightface never
reaches its download code. Detection always runs at ``det_size=(640, 640)`` so scores are the same on
insightface 0.7.3 and 2.x (whose default runs two sizes).
"""

from __future__ import annotations

import contextlib
import glob
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..attention.files import reading
from .deps import require

log = logging.getLogger("multisubject")

DET_SIZE = (640, 640)
KNOWN_PACKS = {
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
}
DET_THRESHOLD = 0.5  # insightface's default detection score threshold


def _expected(name: str) -> str:
    files = KNOWN_PACKS.get(name)
    if files:
        return f"{files[0]} (detector) and {files[1]} (recognizer)"
    return "a detector and a recognizer .onnx (buffalo_l: det_10g.onnx + w600k_r50.onnx; antelopev2: " \
        "scrfd_10g_bnkps.onnx + glintr100.onnx)"


def looks_like_hub_id(text: str) -> bool:
    """``org/name`` with no such local path: what people paste from a model hub."""
    parts = str(text).split("/")
    return len(parts) == 2 and all(parts) and not os.path.exists(text) and not str(text).startswith((".", "~"))


def refuse_hub_id(text: str, what: str, give: str) -> None:
    """Raise when ``text`` is a model-hub id rather than a local path (nothing is ever downloaded)."""
    if looks_like_hub_id(text):
        raise ValueError(f"{what} '{text}' looks like a model-hub id, but models are only read from local files "
                         f"(nothing is downloaded); {give}")


def resolve_face_pack(roots: list[str | Path], name: str) -> Path:
    """Find the folder holding pack ``name``'s ``.onnx`` files under any of ``roots``.

    Looks at ``<root>/models/<name>`` (ComfyUI convention), ``<root>/models/<name>/<name>`` (the
    antelopev2 zip unpacks one level deeper), ``<root>/<name>`` and ``<root>`` itself; ``name`` may also
    be a path to the pack folder.
    """
    refuse_hub_id(name, "face pack", "put the pack in <ComfyUI>/models/insightface/models/<pack>/ and give its "
                  "name or path")
    candidates = [Path(name).expanduser()] if os.sep in name or Path(name).expanduser().is_dir() else []
    for root in roots:
        root = Path(root).expanduser()
        candidates += [root / "models" / name, root / "models" / name / name, root / name, root]
    looked = []
    for cand in candidates:
        looked.append(str(cand))
        if cand.is_dir() and glob.glob(str(cand / "*.onnx")):
            return cand.resolve()
    raise FileNotFoundError(
        f"insightface pack '{name}' not found: no .onnx files in {', '.join(dict.fromkeys(looked))}. Expected "
        f"<insightface root>/models/{name}/ with {_expected(name)}. Packs are never downloaded; copy the pack folder "
        "there (note: the pack weights are licensed for non-commercial research only)"
    )


def check_face_pack(pack_dir: Path) -> None:
    """Raise naming the expected files when a known pack is incomplete (before insightface loads it)."""
    present = {p.name for p in pack_dir.glob("*.onnx")}
    files = KNOWN_PACKS.get(pack_dir.name)
    if files and not set(files) <= present:
        missing = sorted(set(files) - present)
        raise FileNotFoundError(
            f"insightface pack {pack_dir} is incomplete: missing {', '.join(missing)}; expected {_expected(pack_dir.name)} "
            f"(found: {', '.join(sorted(present)) or 'no .onnx files'})"
        )
    if len(present) < 2:
        raise FileNotFoundError(
            f"insightface pack {pack_dir} has {len(present)} .onnx file(s) ({', '.join(sorted(present))}); expected "
            f"{_expected(pack_dir.name)}"
        )


def image_to_bgr_uint8(image: Tensor) -> np.ndarray:
    """Shapes: image (H, W, 3) float RGB in [0, 1] -> (H, W, 3) uint8 BGR (cv2 convention)."""
    return (image.detach().float().cpu() * 255).round().clamp(0, 255).byte().numpy()[..., ::-1].copy()


@dataclass(frozen=True)
class Faces:
    """Faces found in one image.

    Shapes:
        boxes:      (K, 4) float pixels x0, y0, x1, y1
        scores:     (K,) detection scores
        embeddings: (K, E) L2-normalised ArcFace embeddings
    """

    boxes: Tensor
    scores: Tensor
    embeddings: Tensor

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def largest(self) -> int:
        """Index of the largest face (by box area)."""
        area = (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])
        return int(torch.argmax(area))


class FaceEmbedder:
    """insightface ``FaceAnalysis`` restricted to detection + recognition, from a checked local pack."""

    def __init__(self, app, pack_dir: Path, det_threshold: float = DET_THRESHOLD) -> None:
        if not 0.0 < det_threshold < 1.0:
            raise ValueError(f"det_threshold must be within (0, 1), got {det_threshold}")
        self.app = app
        self.pack_dir = pack_dir
        self.det_threshold = det_threshold

    @classmethod
    def load(cls, pack: str | Path, roots: list[str | Path] = (), det_threshold: float = DET_THRESHOLD,
             providers: list[str] | None = None) -> FaceEmbedder:
        """Load pack ``pack`` (a name under ``roots`` or a folder path); CUDA when onnxruntime has it, else CPU."""
        pack_dir = resolve_face_pack(list(roots), str(pack))
        check_face_pack(pack_dir)
        ort = require("onnxruntime", "face scoring")
        require("insightface", "face scoring")
        from insightface.app import FaceAnalysis

        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        use_gpu = "CUDAExecutionProvider" in providers
        chatter = io.StringIO()  # insightface prints every model it finds; keep it out of stdout
        with contextlib.redirect_stdout(chatter), reading(pack_dir, "insightface pack", "copy the pack folder again"):
            app = FaceAnalysis(name=str(pack_dir), providers=providers, allowed_modules=["detection", "recognition"])
        missing = [m for m in ("detection", "recognition") if m not in app.models]
        if missing:
            raise FileNotFoundError(
                f"insightface pack {pack_dir} has no {' or '.join(missing)} model among "
                f"{', '.join(sorted(p.name for p in pack_dir.glob('*.onnx')))}; expected {_expected(pack_dir.name)}"
            )
        with contextlib.redirect_stdout(chatter):
            app.prepare(ctx_id=0 if use_gpu else -1, det_thresh=det_threshold, det_size=DET_SIZE)
        log.debug("insightface pack %s loaded:\n%s", pack_dir, chatter.getvalue())
        return cls(app, pack_dir, det_threshold)

    def detect(self, image: Tensor) -> Faces:
        """All faces above the detection threshold.

        Shapes:
            image: (H, W, 3) float RGB in [0, 1]
        """
        with warnings.catch_warnings():  # scikit-image deprecation inside insightface's face_align
            warnings.simplefilter("ignore", FutureWarning)
            found = self.app.get(image_to_bgr_uint8(image))
        faces = [f for f in found if float(f.det_score) >= self.det_threshold]
        if not faces:
            return Faces(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 0))
        embeddings = torch.from_numpy(np.stack([np.asarray(f.normed_embedding, np.float32) for f in faces]))
        if not torch.isfinite(embeddings).all():
            raise ValueError(
                f"the face recognizer in {self.pack_dir} returned NaN/inf embeddings; the .onnx file is probably "
                "corrupt - download the pack again"
            )
        boxes = torch.from_numpy(np.stack([np.asarray(f.bbox, np.float32) for f in faces]))
        scores = torch.tensor([float(f.det_score) for f in faces])
        return Faces(boxes, scores, embeddings)
