"""Evaluation manifests and the files they name: the reader and the image/mask loaders shared by the evaluation
(``evaluate``) and its plots (``plots``); a missing or unreadable file raises ``ManifestError`` naming it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


class ManifestError(ValueError):
    """A manifest entry that cannot be evaluated (missing file, malformed field)."""


def read_manifest(path: Path) -> list:
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


def load_mask(path: Path, what: str) -> Tensor:
    """Shapes: returns (H, W) float in [0, 1], the mean of the RGB channels."""
    return load_image(path, what)[..., :3].mean(-1)
