"""Box-prompted segmentation of located objects: SAM (transformers ``SamModel``) from a local folder.

MultiCrafter masks each grounded object with SAM2 before embedding it (spec §5.4); with a segmenter configured the
located candidates are masked crops (white background), without one they are the detector's boxes. The folder is
what ``save_pretrained`` writes for ``SamModel`` + ``SamProcessor`` (e.g. facebook/sam-vit-base downloaded once).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from .deps import require
from .objects import check_model_dir


class BoxSegmenter:
    """One mask per box: SAM's single-mask output for the box prompt, binarised at logit 0."""

    def __init__(self, model, processor, device: str) -> None:
        self.model = model.eval().to(device)
        self.processor = processor
        self.device = device

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> BoxSegmenter:
        folder = check_model_dir(path, "object segmenter (SAM)")
        transformers = require("transformers", "the object segmenter (SAM)")
        model_type = json.loads((folder / "config.json").read_text()).get("model_type", "")
        if model_type != "sam":
            raise ValueError(
                f"object segmenter: {folder} holds a '{model_type}' model; expected a SAM folder (config.json "
                "model_type 'sam', e.g. facebook/sam-vit-base saved with save_pretrained)"
            )
        processor = transformers.SamProcessor.from_pretrained(folder, local_files_only=True)
        model = transformers.SamModel.from_pretrained(folder, local_files_only=True)
        return cls(model, processor, device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @torch.no_grad()
    def segment(self, image: Tensor, boxes: Tensor) -> Tensor:
        """Shapes: image (H, W, 3) float in [0, 1], boxes (K, 4) pixels x0, y0, x1, y1 -> (K, H, W) float {0, 1}."""
        height, width = image.shape[:2]
        if not len(boxes):
            return torch.zeros(0, height, width)
        pil = Image.fromarray((image.clamp(0, 1) * 255).round().byte().cpu().numpy())
        inputs = self.processor(images=pil, input_boxes=[boxes.float().tolist()], return_tensors="pt")
        outputs = self.model(**{k: v.to(self.device) for k, v in inputs.items()}, multimask_output=False)
        masks = self.processor.post_process_masks(outputs.pred_masks.cpu(), inputs["original_sizes"],
                                                  inputs["reshaped_input_sizes"])[0]  # (K, 1, H, W) bool
        return masks[:, 0].float()
