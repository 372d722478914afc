"""Render a layout as a picture: coloured regions, labels and subject thumbnails.

Regions are painted in priority order (lowest first), so what you see on top is what owns an
overlap. Text uses Pillow's built-in font, so no font files are needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .layout import Layout
from .subjects import Subjects

# subject colours, shared with the canvas editor in the browser: web/palette.json is their one source
PALETTE_FILE = Path(__file__).resolve().parent.parent / "web" / "palette.json"
PALETTE = tuple(
    tuple(int(code[i : i + 2], 16) / 255 for i in (1, 3, 5)) for code in json.loads(PALETTE_FILE.read_text())["subjects"]
)
FILL_ALPHA = 0.45  # region tint over the background
EMPTY_BACKGROUND = 0.12  # grey level when no background image is given
MAX_ASPECT_ERROR = 0.01  # background image aspect may differ from the canvas by 1%


def region_colour(index: int) -> tuple[float, float, float]:
    return PALETTE[index % len(PALETTE)]


def render_layout(layout: Layout, subjects: Subjects | None = None, background: Tensor | None = None) -> Tensor:
    """Draw ``layout`` over ``background`` (or a dark canvas).

    Shapes:
        background: (H, W, 3) float in [0, 1], same aspect ratio as the canvas
        returns (1, H', W', 3) float in [0, 1]; H' x W' is the background's size or the canvas size
    """
    if subjects is not None:
        layout.check_subject_count(len(subjects))
        layout = layout.with_labels(subjects.labels)
    if background is not None:
        bg_h, bg_w = background.shape[:2]
        if abs(bg_w / bg_h - layout.width / layout.height) > MAX_ASPECT_ERROR * layout.width / layout.height:
            raise ValueError(
                f"background image is {bg_w}x{bg_h} but the layout canvas is {layout.width}x{layout.height}; "
                "their aspect ratios differ, so the boxes would not line up. Use an image of the canvas's aspect ratio"
            )
        canvas = background[..., :3].float().clone()
    else:
        canvas = torch.full((layout.height, layout.width, 3), EMPTY_BACKGROUND)
    height, width = canvas.shape[:2]

    masks = layout.rasterize()  # (S, H_c, W_c)
    if (height, width) != (layout.height, layout.width):
        masks = F.interpolate(masks[None], size=(height, width), mode="nearest")[0]
    priorities = subjects.priorities if subjects is not None else None
    order = _paint_order(len(layout), priorities)
    for i in order:
        alpha = (masks[i] * FILL_ALPHA)[..., None]
        colour = torch.tensor(region_colour(i))
        canvas = canvas * (1 - alpha) + colour * alpha

    image = Image.fromarray((canvas.clamp(0, 1) * 255).round().byte().numpy())
    draw = ImageDraw.Draw(image)
    font = _font(max(12, min(height, width) // 40))
    for i in order:
        x0, y0, x1, y1 = layout.regions[i].bounding_box()
        box_px = (round(x0 * width), round(y0 * height), round(x1 * width) - 1, round(y1 * height) - 1)
        rgb = tuple(round(c * 255) for c in region_colour(i))
        draw.rectangle(box_px, outline=rgb, width=max(2, min(height, width) // 256))
        text = f"{i + 1} {layout.regions[i].label}".strip()
        if subjects is not None and any(p != 0 for p in subjects.priorities):
            text += f" (p{subjects.priorities[i]})"
        text_box = draw.textbbox((box_px[0] + 4, box_px[1] + 4), text, font=font)
        draw.rectangle(text_box, fill=(0, 0, 0))
        draw.text((box_px[0] + 4, box_px[1] + 4), text, fill=rgb, font=font)
        if subjects is not None:
            _paste_thumbnail(image, subjects[i].images[0], box_px, top=text_box[3] + 4)
    out = torch.from_numpy(np.asarray(image).copy()).float() / 255.0
    return out[None]


def _paint_order(num_regions: int, priorities: list[int] | None) -> list[int]:
    """Indices low -> high priority, matching ``composite_by_priority``'s winner on overlaps."""
    if priorities is None:
        return list(range(num_regions))
    # a stable sort, as in composite_by_priority: among ties the later subject paints last
    return sorted(range(num_regions), key=lambda j: priorities[j])


def _paste_thumbnail(image: Image.Image, reference: Tensor, box_px: tuple[int, int, int, int], top: int) -> None:
    """Paste a reference thumbnail inside the region, under its label, if it fits."""
    x0, _, x1, y1 = box_px
    side = min((x1 - x0) // 3, (y1 - top) - 4, 128)
    if side < 12:
        return
    ref_h, ref_w = reference.shape[:2]
    scale = side / max(ref_h, ref_w)
    size = (max(1, round(ref_w * scale)), max(1, round(ref_h * scale)))
    thumb = Image.fromarray((reference.clamp(0, 1) * 255).round().byte().cpu().numpy()).resize(size, Image.BILINEAR)
    image.paste(thumb, (x0 + 4, top))


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()
