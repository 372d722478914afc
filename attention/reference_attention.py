"""Apply MultiCrafter's settings (strength and one window for every subject).

The binding itself is ``attention/binding.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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
