"""Render a layout as a picture: coloured regions, labels and subject thumbnails.

Regions are painted in overlap order (``layout.overlap_order``: lowest priority first, then the
largest region first), so what you see on top is what owns an overlap. A subject that would own no
token at some attention resolution is named in a warning drawn under the regions and logged. Text
uses Pillow's built-in font, so no font files are needed.

The picture is at most ``MAX_PREVIEW_SIDE`` pixels on its long side and regions are drawn one at a
time, so memory stays bounded (about 100 MB) whatever the canvas size and region count.
"""

from __future__ import annotations

import json
import logging
import math
import textwrap
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .checks import check_image_batch
from .layout import (
    Layout,
    TokenGrid,
    composite_ownership,
    describe_unowned,
    overlap_order,
    region_areas,
    region_token_masks,
)
from .subjects import Subjects

log = logging.getLogger("multisubject")

# subject colours, shared with the canvas editor in the browser: web/palette.json is their one source
PALETTE_FILE = Path(__file__).resolve().parent.parent / "web" / "palette.json"
PALETTE = tuple(
    tuple(int(code[i : i + 2], 16) / 255 for i in (1, 3, 5)) for code in json.loads(PALETTE_FILE.read_text())["subjects"]
)
FILL_ALPHA = 0.45  # region tint over the background
EMPTY_BACKGROUND = 0.12  # grey level when no background image is given
MAX_ASPECT_ERROR = 0.01  # background image aspect may differ from the canvas by 1%
WARNING_COLOUR = (255, 64, 64)
PIXELS_PER_LATENT = 8  # SD1.5, SDXL and Flux VAEs
# attention grids as latent downscales: SD1.5 uses 1, 2, 4, 8; SDXL 2 and 4; Flux's 2x2 patches 2
TOKEN_DOWNSCALES = (1, 2, 4, 8)
# the ownership check holds (S, h, w) token masks per grid; grids bigger than this many cells (only canvases far
# beyond what the models generate, e.g. 16384 px with 64 regions) are left to the warning the attention itself logs
# at run time, so the preview's memory stays bounded whatever the canvas size and region count
MAX_WARNING_CELLS = 1 << 24
MAX_PREVIEW_SIDE = 2048  # long side of the rendered preview; larger canvases and backgrounds are drawn scaled down


def region_colour(index: int) -> tuple[float, float, float]:
    return PALETTE[index % len(PALETTE)]


def render_layout(layout: Layout, subjects: Subjects | None = None, background: Tensor | None = None) -> Tensor:
    """Draw ``layout`` over ``background`` (or a dark canvas).

    Shapes:
        background: (H, W, C) float in [0, 1], C in {1, 3, 4}, same aspect ratio as the canvas
        returns (1, H', W', 3) float in [0, 1]; H' x W' is the background's size or the canvas size, scaled down
        to a long side of ``MAX_PREVIEW_SIDE`` when larger
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
        check_image_batch("background image", background[None])
        height, width = preview_size(bg_h, bg_w)
        rgb = background[..., :3].float().expand(-1, -1, 3)  # grayscale -> RGB, RGBA -> RGB
        if (height, width) == (bg_h, bg_w):
            canvas = rgb.clone()
        else:
            canvas = F.interpolate(rgb.permute(2, 0, 1)[None], size=(height, width), mode="area")[0].permute(1, 2, 0)
    else:
        height, width = preview_size(layout.height, layout.width)
        canvas = torch.full((height, width, 3), EMPTY_BACKGROUND)

    priorities = subjects.priorities if subjects is not None else [0] * len(layout)
    order = overlap_order(priorities, region_areas(layout))
    for i in order:
        # one region at a time, inside its bounding box: memory does not grow with the region count
        x0, y0, x1, y1 = layout.regions[i].bounding_box()
        rows = slice(int(y0 * height), max(int(y0 * height) + 1, math.ceil(y1 * height)))
        cols = slice(int(x0 * width), max(int(x0 * width) + 1, math.ceil(x1 * width)))
        alpha = (layout.regions[i].raster(height, width)[rows, cols] * FILL_ALPHA)[..., None]
        canvas[rows, cols].mul_(1 - alpha).add_(torch.tensor(region_colour(i)) * alpha)

    image = Image.fromarray((canvas.clamp(0, 1) * 255).round().byte().numpy())
    draw = ImageDraw.Draw(image)
    font = _font(max(12, min(height, width) // 40))
    for i in order:
        x0, y0, x1, y1 = layout.regions[i].bounding_box()
        px0, py0 = min(round(x0 * width), width - 1), min(round(y0 * height), height - 1)
        # a box thinner than one preview pixel is still drawn, one pixel wide (PIL needs x1 >= x0)
        box_px = (px0, py0, max(px0, round(x1 * width) - 1), max(py0, round(y1 * height) - 1))
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
    warnings = ownership_warnings(layout, subjects)
    for message in warnings:
        log.warning("multisubject: layout: %s", message)
    _draw_warnings(draw, warnings, font, width, height)
    out = torch.from_numpy(np.asarray(image).copy()).float() / 255.0
    return out[None]


def ownership_warnings(layout: Layout, subjects: Subjects | None = None) -> list[str]:
    """One sentence per subject that would own no token at some attention resolution, as the attention composites.

    Checked for every set of subjects active together (weight > 0 and overlapping start/end windows;
    all regions when no subjects are given) on the token grids SD1.5, SDXL and Flux use for this canvas
    (``TOKEN_DOWNSCALES`` of the canvas / 8 latent). The first (finest) grid where it happens is named.
    """
    if subjects is None:
        priorities, active_sets = [0] * len(layout), {tuple(range(len(layout)))}
    else:
        layout.check_subject_count(len(subjects))
        layout = layout.with_labels(subjects.labels)
        priorities, active_sets = subjects.priorities, _active_sets(subjects)
    areas = region_areas(layout)
    latent_h, latent_w = -(-layout.height // PIXELS_PER_LATENT), -(-layout.width // PIXELS_PER_LATENT)
    messages: dict[int, str] = {}
    for downscale in TOKEN_DOWNSCALES:
        grid = TokenGrid.from_latent(latent_h, latent_w, downscale)
        if len(layout) * grid.num_tokens > MAX_WARNING_CELLS:
            continue
        masks = region_token_masks(layout, grid)
        where = f"at {downscale * PIXELS_PER_LATENT} px tokens ({grid.h}x{grid.w} grid)"
        for active in sorted(active_sets):
            ownership = composite_ownership(masks, priorities, areas, active)
            for j, message in describe_unowned(ownership, masks, layout.labels, where).items():
                messages.setdefault(j, message)
    return [messages[j] for j in sorted(messages)]


def _active_sets(subjects: Subjects) -> set[tuple[int, ...]]:
    """Every set of subjects active together at some point of the schedule (windows are inclusive at both ends)."""
    edges = sorted({p for s in subjects for p in (s.start_percent, s.end_percent)})
    points = edges + [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    sets = {
        tuple(j for j, s in enumerate(subjects) if s.weight > 0 and s.start_percent <= p <= s.end_percent)
        for p in points
    }
    return {active for active in sets if active}


def _draw_warnings(draw: ImageDraw.ImageDraw, warnings: list[str], font, width: int, height: int) -> None:
    """Warnings as lines of text on a black band at the bottom of the image, at most a third of its height."""
    if not warnings:
        return
    size = getattr(font, "size", 11)
    columns = max(16, int(width / (0.6 * size)) - 2)
    lines = [line for message in warnings for line in textwrap.wrap("! " + message, columns)]
    line_height = size + 4
    max_lines = max(1, (height // 3) // line_height)
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + ["! ... (the full warning is in the log)"]
    top = max(0, height - line_height * len(lines) - 4)
    draw.rectangle((0, top, width - 1, height - 1), fill=(0, 0, 0))
    for n, line in enumerate(lines):
        draw.text((4, top + 2 + n * line_height), line, fill=WARNING_COLOUR, font=font)


def preview_size(height: int, width: int) -> tuple[int, int]:
    """``height x width`` scaled down (aspect kept) so the long side is at most ``MAX_PREVIEW_SIDE``."""
    scale = min(1.0, MAX_PREVIEW_SIDE / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


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
