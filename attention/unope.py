"""UNO's in-context references on Flux: token layout and UnoPE position ids (MultiCrafter §2.2–2.3).

The joint sequence is ``[txt | img | ref_0 | ref_1 | ...]``. Reference latents are patchified like
the image (2x2 patches) and get *diagonal* RoPE offsets: reference k starts one row and one column
past the image and every earlier reference (UNO ``prepare_multi_ip``, ``pe='d'``)::

    img_ids[r, c] = (0, r, c)                      r < h, c < w     (h, w: image token grid)
    shift = (h, w)
    ids_k[r, c]   = (0, r + shift_h, c + shift_w)  r < h_k, c < w_k (reference k token grid)
    shift += (h_k, w_k)

UNO writes the grids as ``H/2`` for a latent of height ``H``; Flux pads odd latents to a whole patch,
so the grid here is ``ceil(H/2)`` (identical for the even sizes UNO supports).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .families import FLUX

PATCH = FLUX.patch  # Flux patchifies latents in 2x2 patches
LATENT_CHANNELS = FLUX.latent_channels  # Flux VAE latent channels
VAE_DOWNSCALE = FLUX.vae_downscale  # Flux VAE: 8 pixels per latent pixel
REFERENCE_MULTIPLE_PX = VAE_DOWNSCALE * PATCH  # reference sides are multiples of 16 px: whole patches, no padding
token_grid = FLUX.token_grid  # (latent_h, latent_w) -> token grid, odd sizes padded as Flux does


def unope_ids(image_grid: tuple[int, int], reference_grids: Sequence[tuple[int, int]]) -> Tensor:
    """RoPE ids of the image tokens followed by every reference's tokens (the UnoPE recurrence).

    Shapes:
        image_grid: (h, w) token grid of the generated image
        reference_grids: one (h_k, w_k) token grid per reference, in sequence order
        returns (h*w + Σ h_k*w_k, 3) float32, rows in token order (row-major per grid)
    """
    h, w = image_grid
    parts = [_grid_ids(h, w, 0, 0)]
    shift_h, shift_w = h, w
    for h_k, w_k in reference_grids:
        parts.append(_grid_ids(h_k, w_k, shift_h, shift_w))
        shift_h += h_k
        shift_w += w_k
    return torch.cat(parts)


def _grid_ids(h: int, w: int, offset_h: int, offset_w: int) -> Tensor:
    rows = torch.arange(h, dtype=torch.float32).repeat_interleave(w) + offset_h
    cols = torch.arange(w, dtype=torch.float32).repeat(h) + offset_w
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1)


def reference_size(height: int, width: int, long_side: int, keep_aspect: bool) -> tuple[int, int]:
    """Pixel size a reference image is resized to: ``long_side`` on its long side, multiples of 16.

    With ``keep_aspect`` the short side is scaled by the same factor and rounded to the nearest
    multiple of 16 (at least 16); otherwise the reference becomes ``long_side`` square (UNO/MultiCrafter
    train on 320x320 references).
    """
    if long_side <= 0 or long_side % REFERENCE_MULTIPLE_PX:
        raise ValueError(
            f"reference size must be a positive multiple of {REFERENCE_MULTIPLE_PX} px (whole Flux patches), got "
            f"{long_side}; try {max(REFERENCE_MULTIPLE_PX, round(long_side / REFERENCE_MULTIPLE_PX) * 16)}"
        )
    if not keep_aspect:
        return long_side, long_side
    scale = long_side / max(height, width)
    short = max(REFERENCE_MULTIPLE_PX, round(min(height, width) * scale / REFERENCE_MULTIPLE_PX) * REFERENCE_MULTIPLE_PX)
    return (long_side, short) if height >= width else (short, long_side)


def resize_reference(image: Tensor, height: int, width: int) -> Tensor:
    """Resize one RGB reference image (antialiased bicubic), values kept in [0, 1].

    Shapes:
        image: (H, W, 3) float in [0, 1]
        returns (height, width, 3)
    """
    if tuple(image.shape[:2]) == (height, width):
        return image
    chw = image.permute(2, 0, 1).unsqueeze(0).float()  # (1, 3, H, W)
    out = F.interpolate(chw, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).clamp(0.0, 1.0)


@dataclass(frozen=True)
class FluxReferences:
    """The references appended to a conditioning (the ``MS_FLUX_REFERENCES`` socket value).

    One entry per reference image, in sequence order; a subject with several images owns several
    references. ``latent_sizes`` are latent pixels (h, w) of each reference.
    """

    latent_sizes: tuple[tuple[int, int], ...]
    subject_index: tuple[int, ...]  # which subject each reference belongs to
    labels: tuple[str, ...]  # one per subject
    priorities: tuple[int, ...] = ()  # one per subject (overlap order for layouts); () = all 0

    def __post_init__(self) -> None:
        if self.priorities and len(self.priorities) != len(self.labels):
            raise ValueError(f"{len(self.priorities)} priorities for {len(self.labels)} subjects")
        if len(self.latent_sizes) != len(self.subject_index):
            raise ValueError(
                f"{len(self.latent_sizes)} reference sizes but {len(self.subject_index)} subject indices; one each"
            )
        if not self.latent_sizes:
            raise ValueError("no references: connect at least one subject")
        if sorted(set(self.subject_index)) != list(range(len(self.labels))):
            raise ValueError(
                f"subject indices {self.subject_index} must cover every subject 0..{len(self.labels) - 1}"
            )

    @property
    def num_subjects(self) -> int:
        return len(self.labels)

    @property
    def num_references(self) -> int:
        return len(self.latent_sizes)
