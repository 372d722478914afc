"""Draw an identity result: detected boxes, lines to the matched reference thumbnails with their
similarity, unmatched references crossed out in red."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from ..attention.preview import region_colour
from ..attention.subjects import Subjects
from .identity import IdentityResult
from .locate import NOT_LOCATED

UNMATCHED = (220, 40, 40)
UNUSED_BOX = (150, 150, 150)
PANEL = (24, 24, 24)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _pil(image: Tensor) -> Image.Image:
    return Image.fromarray((image.detach().float().cpu().clamp(0, 1) * 255).round().byte().numpy())


def _caption(name: str, result: IdentityResult, s: int) -> str:
    kind = result.kinds[s]
    if kind == "none":
        return f"{name}\nno face, no object model"
    if int(result.assignment[s]) < 0:
        return f"{name}\n{kind}: unmatched (0)"
    return f"{name}\n{kind} {float(result.per_subject[s]):.3f}"


def report_caption(result: IdentityResult, title: str = "") -> str:
    """The report's headline: title, score, and "objects not located" when objects met the whole image."""
    caption = f"{title}  identity {result.score:.3f}".strip()
    return f"{caption}  ({NOT_LOCATED}: whole image)" if result.objects_located is False else caption


def render_identity_report(image: Tensor, result: IdentityResult, subjects: Subjects, title: str = "") -> Tensor:
    """The generated image with its candidate boxes, plus one reference thumbnail per subject on the right.

    Shapes:
        image: (H, W, 3) float in [0, 1]
        returns (max(H, S * slot), W + T, 3) float in [0, 1]; T = thumbnail column width, slot = row height
    """
    height, width = image.shape[:2]
    num_subjects = len(subjects)
    slot = max(48, min(256, height // max(num_subjects, 1)))
    thumb = slot - 22  # room for the caption under each thumbnail
    font = _font(max(11, min(18, slot // 9)))
    captions = [_caption(subjects[s].label or f"subject {s + 1}", result, s) for s in range(num_subjects)]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max([measure.multiline_textbbox((0, 0), c, font=font)[2] for c in captions] + [40])
    column = thumb + text_width + 24
    canvas = Image.new("RGB", (width + column, max(height, slot * num_subjects)), PANEL)
    canvas.paste(_pil(image), (0, 0))
    draw = ImageDraw.Draw(canvas)
    line_width = max(2, min(height, width) // 200)

    boxes = {"face": result.face_boxes, "object": result.object_boxes}
    used = {"face": set(), "object": set()}
    for s in range(num_subjects):
        if int(result.assignment[s]) >= 0 and result.kinds[s] in used:
            used[result.kinds[s]].add(int(result.assignment[s]))
    for kind, kind_boxes in boxes.items():  # candidates nobody matched: grey
        for k, box in enumerate(kind_boxes.tolist()):
            if k not in used[kind]:
                draw.rectangle(box, outline=UNUSED_BOX, width=line_width)

    for s, subject in enumerate(subjects):
        top = s * slot
        x0 = width + 8
        ref = _pil(subject.images[0])
        ref.thumbnail((thumb, thumb))
        canvas.paste(ref, (x0, top + 2))
        kind, k = result.kinds[s], int(result.assignment[s])
        text_x = x0 + thumb + 6
        if k >= 0:
            rgb = tuple(round(c * 255) for c in region_colour(s))
            box = boxes[kind][k].tolist()
            draw.rectangle(box, outline=rgb, width=line_width)
            start = (box[2], (box[1] + box[3]) / 2)
            draw.line([start, (x0, top + 2 + ref.height / 2)], fill=rgb, width=line_width)
            draw.multiline_text((text_x, top + 4), captions[s], fill=rgb, font=font)
        else:
            draw.line([(x0, top + 2), (x0 + ref.width, top + 2 + ref.height)], fill=UNMATCHED, width=3)
            draw.line([(x0 + ref.width, top + 2), (x0, top + 2 + ref.height)], fill=UNMATCHED, width=3)
            draw.multiline_text((text_x, top + 4), captions[s], fill=UNMATCHED, font=font)
    caption = report_caption(result, title)
    text_box = draw.textbbox((4, 4), caption, font=font)
    draw.rectangle(text_box, fill=(0, 0, 0))
    draw.text((4, 4), caption, fill=(255, 255, 255), font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).float() / 255.0
