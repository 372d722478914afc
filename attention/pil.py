"""The one tensor -> PIL conversion of the pack (previews, reports, scoring models' processors, trainer files)."""

from __future__ import annotations

from PIL import Image
from torch import Tensor


def to_pil(image: Tensor) -> Image.Image:
    """An 8-bit PIL image of ``image``: (H, W, C) floats in [0, 1] (clamped, rounded), any device and dtype; C = 1, 3, 4."""
    pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().byte()
    return Image.fromarray(pixels.squeeze(-1).numpy() if pixels.shape[-1] == 1 else pixels.numpy())
