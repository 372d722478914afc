"""Layout-guided reference attention on Flux: keep image tokens outside a subject's region from
attending to that subject's reference tokens.

The mask is an *additive float* bias over the joint sequence ``[txt | img | ref_0 | ...]``:
0 where attention is allowed, ``log(1 - strength)`` where an image query lies outside subject j's
region and the key is one of subject j's reference tokens (strength 1 = a hard block, a large
negative number). Float biases behave the same on every ComfyUI attention backend; boolean masks do
not (sub-quadratic and split attention add them as 0/1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .families import TokenLayout

__all__ = ["BiasCache", "ReferenceAttentionConfig", "TokenLayout", "combine_with_mask", "reference_attention_bias"]


@dataclass(frozen=True)
class ReferenceAttentionConfig:
    """How strongly, and when, image tokens outside a region are kept from that subject's references."""

    strength: float = 1.0  # 1 = hard block; s in (0, 1) = additive bias log(1 - s); 0 = off
    start_percent: float = 0.0  # fraction of the schedule where masking starts
    end_percent: float = 1.0  # fraction where it stops

    def __post_init__(self) -> None:
        problems = []
        if not (math.isfinite(self.strength) and 0.0 <= self.strength <= 1.0):
            problems.append(f"strength must be within [0, 1], got {self.strength}")
        for name in ("start_percent", "end_percent"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                problems.append(f"{name} must be within [0, 1], got {value}")
        if self.start_percent > self.end_percent:
            problems.append(f"start_percent ({self.start_percent}) is after end_percent ({self.end_percent})")
        if problems:
            raise ValueError("invalid reference attention settings: " + "; ".join(problems))

    def blocked_value(self, dtype: torch.dtype) -> float:
        """The additive bias on blocked pairs in ``dtype``: log(1 - strength), or a hard block at strength 1."""
        hard = torch.finfo(dtype).min / 4  # large negative, with headroom so adding other biases cannot overflow
        if self.strength >= 1.0:
            return hard
        return max(math.log1p(-self.strength), hard)


def reference_attention_bias(layout: TokenLayout, allowed: Tensor, subject_index: Sequence[int],
                             blocked_value: float, dtype: torch.dtype = torch.float32,
                             device: torch.device | str = "cpu") -> Tensor:
    """Additive bias that keeps image queries outside subject j's region off subject j's reference keys.

    Shapes:
        allowed: (S, h, w) or (S, L) bool, image tokens (of ``layout.image_grid``) that may attend to subject j
        returns (1, 1, N, N) in ``dtype``; 0 = allowed, ``blocked_value`` = blocked
    """
    num_subjects = allowed.shape[0]
    allowed = allowed.reshape(num_subjects, -1).to(device)
    if allowed.shape[1] != layout.num_img:
        raise ValueError(
            f"region masks cover {allowed.shape[1]} image tokens but the image has {layout.num_img} "
            f"({layout.image_grid[0]}x{layout.image_grid[1]}); build them on the layout's token grid"
        )
    keys = layout.subject_key_mask(subject_index, num_subjects).to(device)  # (S, N)
    img0, img1 = layout.image_span
    # blocked[p, n] = OR_j (not allowed[j, p]) and keys[j, n]  -- a (L, S) x (S, N) boolean product
    blocked_rows = (~allowed).t().to(torch.float32) @ keys.to(torch.float32)  # (L, N)
    bias = torch.zeros(layout.total, layout.total, dtype=dtype, device=device)
    bias[img0:img1] = torch.where(blocked_rows > 0, blocked_value, 0.0).to(dtype)
    return bias.view(1, 1, layout.total, layout.total)


def combine_with_mask(bias: Tensor, mask: Tensor | None) -> Tensor:
    """Add an incoming attention mask (bool: True = attend, or additive float) to our bias.

    Shapes:
        bias: (1, 1, N, N); mask: broadcastable to (B, H, N, N) or (B, N, N); returns broadcastable (B, H, N, N)
    """
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=bias.dtype, device=bias.device).masked_fill(
            ~mask.to(bias.device), torch.finfo(bias.dtype).min / 4)
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    return bias + mask.to(device=bias.device, dtype=bias.dtype)


class BiasCache:
    """Biases keyed by (token layout, dtype, device): Flux calls attention 57 times per step with the same one."""

    def __init__(self, max_entries: int = 4) -> None:
        self.max_entries = max_entries
        self._items: dict[tuple, Tensor] = {}

    def get(self, key: tuple, build) -> Tensor:
        if key not in self._items:
            if len(self._items) >= self.max_entries:
                self._items.pop(next(iter(self._items)))
            self._items[key] = build()
        return self._items[key]

    def __len__(self) -> int:
        return len(self._items)
