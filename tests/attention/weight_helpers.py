"""Test oracles for the MultiCrafter weight format (both test tiers)."""

from __future__ import annotations

from multisubject.attention.moe_lora import MoELoRA
from multisubject.attention.weights import MoEExperts


def experts_of(module: MoELoRA) -> MoEExperts:
    """Detached copies of a ``MoELoRA``'s parameters, as the weight format stores them."""
    return MoEExperts(*(p.detach().clone().contiguous() for p in (module.router, module.lora_A, module.lora_B)))
