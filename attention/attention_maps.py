"""Per-subject reference<->image attention maps from one attention call, without the full N x N matrix.

Two directions (MultiCrafter §3.2):
  * ``"reference_to_image"`` (IDAR default): rows are subject j's reference queries, softmax over
    *all* keys, keep the image columns, mean over heads and over j's reference queries;
  * ``"image_to_reference"``: for each image query p, the total attention weight it puts on subject
    j's reference keys (softmax over all keys), mean over heads. Subjects compete per pixel.

Only the needed query rows are computed, ``chunk`` rows at a time, so peak memory is
``B * H * chunk * N`` logits. Pass the same post-RoPE q/k the attention uses (and its additive
bias, if any) to see exactly what the model attends to; gradients flow through q and k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .families import TokenLayout

DIRECTIONS = ("reference_to_image", "image_to_reference")


def _logits(q_rows: Tensor, k: Tensor, bias_rows: Tensor | None) -> Tensor:
    """Shapes: q_rows (B, H, c, D), k (B, H, N, D), bias_rows broadcastable to (B, H, c, N) -> (B, H, c, N) fp32."""
    scale = q_rows.shape[-1] ** -0.5
    logits = (q_rows.float() @ k.float().transpose(-1, -2)) * scale
    if bias_rows is not None:
        logits = logits + bias_rows.float()
    return logits


def _bias_rows(bias: Tensor | None, start: int, end: int) -> Tensor | None:
    if bias is None:
        return None
    bias = bias.unsqueeze(1) if bias.ndim == 3 else bias  # (B|1, H|1, N, N)
    return bias[:, :, start:end]


def reference_attention_maps(q: Tensor, k: Tensor, layout: TokenLayout, subject_index: Sequence[int],
                             num_subjects: int, direction: str = "reference_to_image",
                             bias: Tensor | None = None, chunk: int = 512) -> Tensor:
    """Attention between each subject's reference tokens and the image tokens of one call.

    Shapes:
        q, k: (B, H, N, D) post-RoPE, N = layout.total
        bias: None or additive, broadcastable to (B, H, N, N) (e.g. the layout bias)
        returns (B, S, L) float32, L = image tokens (row-major on layout.image_grid)
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    batch, heads, n, _ = q.shape
    if n != layout.total or k.shape[2] != n:
        raise ValueError(
            f"q/k have {n}/{k.shape[2]} tokens but the token layout has {layout.total} (text {layout.num_txt}, image "
            f"{layout.num_img}, references {[e - s for s, e in layout.reference_spans]})"
        )
    img0, img1 = layout.image_span
    keys = layout.subject_key_mask(subject_index, num_subjects).to(q.device)  # (S, N)
    if direction == "reference_to_image":
        out = q.new_zeros(batch, num_subjects, layout.num_img, dtype=torch.float32)
        counts = [0] * num_subjects
        for (start, end), subject in zip(layout.reference_spans, subject_index):
            if subject < 0:  # a reference of no subject
                continue
            for s in range(start, end, chunk):
                e = min(s + chunk, end)
                probs = _logits(q[:, :, s:e], k, _bias_rows(bias, s, e)).softmax(-1)  # (B, H, c, N)
                out[:, subject] += probs[..., img0:img1].sum(2).mean(1)
            counts[subject] += end - start
        return out / torch.tensor(counts, dtype=torch.float32, device=q.device).clamp(min=1).view(1, -1, 1)
    parts = []
    for s in range(img0, img1, chunk):
        e = min(s + chunk, img1)
        probs = _logits(q[:, :, s:e], k, _bias_rows(bias, s, e)).softmax(-1)  # (B, H, c, N)
        parts.append(probs.mean(1) @ keys.t().float())  # (B, c, S)
    return torch.cat(parts, 1).transpose(1, 2)


def normalize_maps(maps: Tensor, eps: float = 1e-6) -> Tensor:
    """Per sample and subject min-max normalisation to [0, 1] (spec §3.2). Shapes: (B, S, L) -> (B, S, L)."""
    low = maps.amin(-1, keepdim=True)
    high = maps.amax(-1, keepdim=True)
    return (maps - low) / (high - low + eps)


HEAT_COLOURS = torch.tensor([[0.0, 0.0, 0.0], [0.35, 0.05, 0.55], [0.85, 0.2, 0.3], [1.0, 0.65, 0.0], [1.0, 1.0, 0.7]])


def heat_colours(values: Tensor) -> Tensor:
    """Black -> purple -> red -> orange -> pale yellow. Shapes: (...) in [0, 1] -> (..., 3)."""
    pos = values.nan_to_num(0.0).clamp(0, 1) * (len(HEAT_COLOURS) - 1)
    low = pos.floor().long().clamp(max=len(HEAT_COLOURS) - 2)
    frac = (pos - low).unsqueeze(-1)
    return HEAT_COLOURS[low] * (1 - frac) + HEAT_COLOURS[low + 1] * frac


def maps_to_pixels(maps: Tensor, cell: int, height: int, width: int) -> Tensor:
    """Token maps to pixels: each token covers ``cell x cell`` px (Flux: 16); padding past the image is cut off.

    Shapes: maps (B, S, h, w) -> (B, S, height, width)
    """
    if maps.shape[-2] * cell < height or maps.shape[-1] * cell < width:
        raise ValueError(f"{maps.shape[-2]}x{maps.shape[-1]} token maps of {cell} px cells do not cover {width}x{height}")
    return maps.repeat_interleave(cell, -2).repeat_interleave(cell, -1)[..., :height, :width]


def leak_shares(maps: Tensor, owned: Tensor) -> Tensor:
    """Share of each subject's attention mass that falls on image tokens outside its region (0 = none, 1 = all).

    ``maps`` are the raw (unnormalised) maps of ``reference_attention_maps``; ``owned`` the layout's exclusive token
    ownership (who owns each image token after priority compositing). A subject with no attention mass gets NaN.

    Shapes:
        maps: (B, S, L); owned: (S, L) bool; returns (B, S) float32
    """
    if owned.shape != maps.shape[1:]:
        raise ValueError(f"ownership {tuple(owned.shape)} does not match the maps' (subjects, tokens) "
                         f"{tuple(maps.shape[1:])}")
    maps = maps.float()
    total = maps.sum(-1)
    outside = (maps * (~owned).to(maps.device).float()).sum(-1)
    return torch.where(total > 0, outside / total.clamp(min=1e-30), torch.full_like(total, float("nan")))


def caption(images: Tensor, texts: list[str]) -> Tensor:
    """Write one line of text in the top-left corner of each image, white on a dark box (Pillow's built-in font).

    Shapes: images (N, H, W, 3) in [0, 1], one text each; returns (N, H, W, 3)
    """
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    if len(texts) != images.shape[0]:
        raise ValueError(f"{len(texts)} captions for {images.shape[0]} images")
    out = images.clone()
    for image, text in zip(out, texts):
        height, width = image.shape[:2]
        size = max(10, min(height, width) // 24)
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
            font = ImageFont.load_default()
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        _, _, right, bottom = probe.textbbox((3, 2), text, font=font)
        box_w, box_h = min(width, right + 3), min(height, bottom + 3)
        box = Image.new("RGB", (box_w, box_h), (0, 0, 0))  # only the box is redrawn; the rest keeps its exact values
        ImageDraw.Draw(box).text((3, 2), text, fill=(255, 255, 255), font=font)
        image[:box_h, :box_w] = torch.from_numpy(np.asarray(box).copy()).to(image.device, image.dtype) / 255.0
    return out
