"""Training-side LoRA: wraps a frozen ``Linear`` as ``y = base(x) + (alpha / r) * B(A(x))``.

Only the training module lives here; the file format for export is ``attention/weights.py``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class LoRALinear(nn.Module):
    """A frozen base Linear plus a trainable low-rank delta. B starts at zero, so the wrapped layer starts
    identical to the base (PEFT init: A Kaiming-uniform)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.rank = rank
        self.alpha = float(alpha or rank)
        in_features, out_features = base.weight.shape[1], base.weight.shape[0]
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=torch.float32, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=torch.float32, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        delta = (x.to(self.lora_A.dtype) @ self.lora_A.t()) @ self.lora_B.t()  # (..., out)
        return self.base(x) + (self.alpha / self.rank) * delta.to(x.dtype)


def get_submodule_parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, name = path.rpartition(".")
    return (root.get_submodule(parent) if parent else root), name


def inject_lora(root: nn.Module, paths: list[str], rank: int, alpha: float = 0.0) -> dict[str, LoRALinear]:
    """Replace each Linear at ``paths`` (dotted, relative to ``root``) with a ``LoRALinear``; returns them by path."""
    out = {}
    for path in paths:
        parent, name = get_submodule_parent(root, path)
        base = getattr(parent, name)
        if isinstance(base, LoRALinear):
            raise ValueError(f"{path} already has a LoRA")
        if not hasattr(base, "weight") or base.weight.ndim != 2:
            raise ValueError(f"{path} is a {type(base).__name__}, expected a Linear layer")
        wrapped = LoRALinear(base, rank, alpha)
        setattr(parent, name, wrapped)
        out[path] = wrapped
    return out
