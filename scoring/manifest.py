"""Evaluation manifests: which generated image, with which references and layout, per sample.

A manifest is a JSON list (or JSON Lines) of samples; paths are relative to the manifest's folder::

    {"id": "s0", "image": "gen/s0.png", "prompt": "a corgi and a teapot on a table",
     "references": ["refs/corgi.png", {"image": "refs/teapot.png", "mask": "refs/teapot_mask.png", "label": "teapot"}],
     "layout": {"width": 1024, "height": 1024, "boxes": [[0.05, 0.2, 0.5, 0.95], [0.5, 0.2, 0.95, 0.95]]}}

A reference is a path, or an object with ``image`` (or ``images``: several views), optional ``mask``
(white = subject; RGBA images use their alpha) and ``label`` (the detector's phrase for the layout
metrics). ``layout`` is optional: ``boxes`` (normalised x0, y0, x1, y1, or {"box": [...], "label": ...})
or ``masks`` (image paths), in reference order. A sample whose files are missing or malformed is
reported with its entry and counted as failed; the rest are still evaluated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..attention.layout import Layout
from ..attention.subjects import Subject, Subjects


class ManifestError(ValueError):
    """A manifest entry that cannot be evaluated (missing file, malformed field)."""


@dataclass(frozen=True)
class Sample:
    index: int
    id: str
    image: Path
    prompt: str
    subjects: Subjects
    layout: Layout | None
    reference_key: str = ""  # identifies the reference files: samples sharing them share embeddings


def read_eval_manifest(path: Path) -> list:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} not found; give a JSON (list of samples) or JSON Lines file")
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"manifest {path} is neither JSON nor JSON Lines: {e}") from None
    if isinstance(data, dict):  # {"samples": [...]}, or a JSON Lines file with a single sample
        data = data["samples"] if "samples" in data else [data]
    if not isinstance(data, list):
        raise ValueError(f"manifest {path} must hold a list of samples, got {type(data).__name__}")
    return data


def load_image(path: Path, what: str) -> Tensor:
    """Shapes: returns (H, W, C) float in [0, 1], C = 4 for images with alpha, else 3."""
    if not path.is_file():
        raise ManifestError(f"{what} {path} does not exist")
    try:
        with Image.open(path) as im:
            im = im.convert("RGBA" if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info else "RGB")
            return torch.from_numpy(np.asarray(im).copy()).float() / 255.0
    except OSError as e:
        raise ManifestError(f"{what} {path} is not a readable image ({e})") from None


def _load_mask(path: Path, what: str) -> Tensor:
    return load_image(path, what)[..., :3].mean(-1)


def parse_sample(entry, index: int, root: Path) -> Sample:
    """One manifest entry -> Sample (raises ManifestError naming the problem)."""
    if not isinstance(entry, dict):
        raise ManifestError(f"an entry must be an object with image, prompt, references; got {type(entry).__name__}")
    missing = [k for k in ("image", "references") if k not in entry]
    if missing:
        raise ManifestError(f"entry lacks {', '.join(missing)} (has {', '.join(sorted(entry)) or 'nothing'})")
    sample_id = str(entry.get("id", index))
    refs = entry["references"]
    if not isinstance(refs, list) or not refs:
        raise ManifestError("references must be a non-empty list of paths or {image, mask, label} objects")
    subjects = Subjects()
    for r, ref in enumerate(refs):
        ref = {"image": ref} if isinstance(ref, str) else ref
        if not isinstance(ref, dict) or not ("image" in ref or "images" in ref):
            raise ManifestError(f"reference {r} must be a path or an object with 'image' or 'images', got {ref!r}")
        paths = ref["images"] if "images" in ref else [ref["image"]]
        views = [load_image(root / p, f"reference {r} image") for p in paths]
        if len({tuple(v.shape[:2]) for v in views}) > 1:
            raise ManifestError(f"reference {r}: all views must share one size, got {[tuple(v.shape[:2]) for v in views]}")
        views = [v if v.shape[-1] == 4 else torch.cat([v, torch.ones_like(v[..., :1])], -1) for v in views] \
            if any(v.shape[-1] == 4 for v in views) else views
        mask = _load_mask(root / ref["mask"], f"reference {r} mask") if ref.get("mask") else None
        try:
            subjects = subjects.append(Subject.from_image(torch.stack(views), mask, label=str(ref.get("label", ""))))
        except ValueError as e:
            raise ManifestError(f"reference {r}: {e}") from None
    layout = None
    if entry.get("layout") is not None:
        layout = _parse_layout(entry["layout"], root, len(subjects), subjects.labels)
    key = json.dumps([str(root.resolve()), refs], sort_keys=True)
    return Sample(index, sample_id, root / entry["image"], str(entry.get("prompt", "")), subjects, layout, key)


def _parse_layout(spec, root: Path, num_subjects: int, labels: list[str]) -> Layout:
    if not isinstance(spec, dict) or not ("boxes" in spec or "masks" in spec):
        raise ManifestError(f"layout must be an object with 'boxes' (and width, height) or 'masks', got {spec!r}")
    try:
        if "masks" in spec:
            layout = Layout.from_masks(torch.stack([_load_mask(root / p, "layout mask") for p in spec["masks"]]))
        else:
            boxes = [b["box"] if isinstance(b, dict) else b for b in spec["boxes"]]
            names = [b.get("label", "") if isinstance(b, dict) else "" for b in spec["boxes"]]
            layout = Layout.from_boxes(int(spec["width"]), int(spec["height"]), [tuple(map(float, b)) for b in boxes],
                                       names)
        layout.check_subject_count(num_subjects)
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"layout: {e}") from None
    return layout.with_labels(labels)
