"""Object identity: DINO (v1, ViT) / DINOv2 / CLIP image embeddings (and CLIP text embeddings) from local HF folders.

DINO v1 ViT-S/16 (``facebook/dino-vits16``, model_type ``vit``) is the DreamBench DINO-I backbone; its embedding
is the final-layer-normed CLS token (``last_hidden_state[:, 0]``; ViTModel's pooler is not part of DINO and is
not loaded). DINOv2's is ``pooler_output`` (the layer-normed CLS). CLIP's is the projected image embedding.

A model folder is what ``save_pretrained`` writes: ``config.json``, ``model.safetensors`` (or
``pytorch_model.bin``), ``preprocessor_config.json`` and, for CLIP text, tokenizer files. Folders are
loaded with ``local_files_only=True``; a hub id is refused with a clear message instead of a download.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..attention.files import reading
from .deps import require
from .faces import refuse_hub_id

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # transformers 4.x / 5.x processors
SUPPORTED = {"vit": "DINO (ViT)", "dinov2": "DINOv2", "clip": "CLIP"}
REFETCH = "download the folder again (huggingface-cli download <id> --local-dir <folder>) or re-save it"
BACKGROUND = 1.0  # masked crops get a white background (MultiCrafter's recipe)


def check_model_dir(path: str | Path, what: str) -> Path:
    """Raise naming the expected files unless ``path`` is a complete local HF model folder."""
    refuse_hub_id(str(path), what, "download it once (e.g. huggingface-cli download <id> --local-dir <folder>) and "
                  "give the folder")
    folder = Path(str(path)).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{what}: model folder {folder} does not exist; expected a folder with config.json, model.safetensors and "
            "preprocessor_config.json (what save_pretrained writes)"
        )
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if not any((folder / f).is_file() for f in PROCESSOR_FILES):
        missing.append(" or ".join(PROCESSOR_FILES))
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES[:2]))
    if missing:
        raise FileNotFoundError(
            f"{what}: model folder {folder} is incomplete: missing {', '.join(missing)}; expected config.json, "
            "model.safetensors and preprocessor_config.json (what save_pretrained writes)"
        )
    return folder


def read_model_type(folder: Path, what: str) -> str:
    """``model_type`` of a folder's config.json; a damaged config.json is named with the fix."""
    with reading(folder / "config.json", f"{what} config", REFETCH):
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return str(config.get("model_type", ""))


def masked_crop(image: Tensor, box_px: tuple[int, int, int, int], mask: Tensor | None = None) -> Tensor:
    """Crop ``box_px`` out of ``image``; pixels outside ``mask`` become white.

    Shapes:
        image: (H, W, 3) float in [0, 1]
        mask:  (H, W) float in [0, 1] or None
        returns (y1 - y0, x1 - x0, 3)
    """
    x0, y0, x1, y1 = box_px
    crop = image[y0:y1, x0:x1]
    if mask is not None:
        alpha = mask[y0:y1, x0:x1, None].to(crop)
        crop = crop * alpha + BACKGROUND * (1 - alpha)
    return crop


def _to_pil(image: Tensor) -> Image.Image:
    return Image.fromarray((image.detach().float().cpu().clamp(0, 1) * 255).round().byte().numpy())


class ImageEmbedder:
    """DINO v1 / DINOv2 (CLS) or CLIP (projected image and text embeddings), L2-normalised."""

    def __init__(self, model, processor, kind: str, folder: Path, tokenizer=None, device: str | None = None) -> None:
        self.model = model.eval()
        self.processor = processor
        self.kind = kind
        self.folder = folder
        self.tokenizer = tokenizer
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, what: str = "image embedder") -> ImageEmbedder:
        folder = check_model_dir(path, what)
        transformers = require("transformers", what)
        model_type = read_model_type(folder, what)
        if model_type not in SUPPORTED:
            raise ValueError(
                f"{what}: {folder} holds a '{model_type}' model; expected one of {', '.join(SUPPORTED.values())} "
                f"(config.json model_type {' or '.join(repr(k) for k in SUPPORTED)})"
            )
        tokenizer = None
        with reading(folder, f"{what} ({SUPPORTED[model_type]})", REFETCH):
            processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
            if model_type == "vit":
                model = transformers.ViTModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False)
            elif model_type == "dinov2":
                model = transformers.AutoModel.from_pretrained(folder, local_files_only=True)
            else:
                model = transformers.CLIPModel.from_pretrained(folder, local_files_only=True)
                if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
                    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        return cls(model, processor, model_type, folder, tokenizer, device)

    @property
    def name(self) -> str:
        return SUPPORTED[self.kind]

    @torch.no_grad()
    def embed_images(self, images: list[Tensor]) -> Tensor:
        """Shapes: images N x (H_i, W_i, 3) float in [0, 1] -> (N, D) L2-normalised."""
        if not images:
            return torch.zeros(0, 0)
        pixels = self.processor(images=[_to_pil(im) for im in images], return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device)
        if self.kind == "vit":
            features = self.model(pixel_values=pixels).last_hidden_state[:, 0]
        elif self.kind == "dinov2":
            features = self.model(pixel_values=pixels).pooler_output
        else:
            out = self.model.get_image_features(pixel_values=pixels)
            features = out if torch.is_tensor(out) else out.pooler_output  # transformers 4.x vs 5.x
        return self._normalise(features, "image")

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> Tensor:
        """Shapes: texts N -> (N, D) L2-normalised (CLIP only)."""
        if self.kind != "clip" or self.tokenizer is None:
            raise ValueError(
                f"text embeddings need a CLIP folder with tokenizer files (tokenizer.json or vocab.json + merges.txt); "
                f"{self.folder} is {self.name}{'' if self.kind != 'clip' else ' without a tokenizer'}"
            )
        max_length = int(getattr(self.model.config.text_config, "max_position_embeddings", 77))
        tokens = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        out = self.model.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()})
        features = out if torch.is_tensor(out) else out.pooler_output
        return self._normalise(features, "text")

    def _normalise(self, features: Tensor, what: str) -> Tensor:
        features = features.float().cpu()
        if not torch.isfinite(features).all():
            raise ValueError(
                f"{self.name} model in {self.folder} returned NaN/inf {what} embeddings; the weights are probably "
                "corrupt or were saved in a dtype that overflowed - re-save the model"
            )
        return F.normalize(features, dim=-1)


def box_to_pixels(box: tuple[float, float, float, float], height: int, width: int) -> tuple[int, int, int, int]:
    """Normalised box -> integer pixel box, rounded outward, at least one pixel."""
    x0, y0, x1, y1 = box
    px0, py0 = int(np.floor(x0 * width)), int(np.floor(y0 * height))
    px1, py1 = max(int(np.ceil(x1 * width)), px0 + 1), max(int(np.ceil(y1 * height)), py0 + 1)
    return px0, py0, min(px1, width), min(py1, height)
