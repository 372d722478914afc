"""Preview of one rollout batch: a grid with one row per prompt group, each image captioned with its rewards."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

CAPTION_PX = 12  # height of one caption line


def render_rollout_grid(
    images: Tensor,
    scores: Mapping[str, Tensor],
    advantages: Tensor,
    group_size: int,
    prompts: Sequence[str] = (),
    max_groups: int = 4,
) -> Image.Image:
    """Rows = prompt groups (at most ``max_groups``), columns = the G images of a group; under every image its
    reward per component and its advantage, above every row the group's prompt.

    Shapes:
        images: (B, H, W, 3) float RGB in [0, 1], B = num_groups · G
        scores: name -> (B,); advantages: (B,)
    """
    batch, height, width, _ = images.shape
    if batch % group_size:
        raise ValueError(f"{batch} images do not form whole groups of {group_size}")
    groups = min(batch // group_size, max_groups)
    names = list(scores)
    caption = CAPTION_PX * (len(names) + 1)
    title = CAPTION_PX + 2
    grid = Image.new("RGB", (group_size * width, groups * (title + height + caption)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    pixels = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    for g in range(groups):
        top = g * (title + height + caption)
        if g < len(prompts):
            draw.text((2, top), prompts[g][: 12 * group_size], fill="black", font=font)
        for j in range(group_size):
            i = g * group_size + j
            left = j * width
            grid.paste(Image.fromarray(pixels[i]), (left, top + title))
            lines = [f"{n}: {float(scores[n][i]):.3f}" for n in names] + [f"A: {float(advantages[i]):+.2f}"]
            for k, line in enumerate(lines):
                draw.text((left + 2, top + title + height + k * CAPTION_PX), line, fill="black", font=font)
    return grid
