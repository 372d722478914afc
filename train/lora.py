"""Training-side LoRA: wraps a frozen ``Linear`` as ``y = base(x) + (alpha / r) * B(A(x))``.

Only the training module lives here; the file format for export is ``attention/weights.py``. A LoRA may change only
the first ``out_rows`` outputs of its Linear (UNO's single-block q/k/v LoRA, the q/k/v part of ``linear1``); the file
format stores LoRAs of whole Linears, so such a ``B`` is exported zero-padded (``exported_B``), which the stock
ComfyUI LoraLoader applies as is, and cut back on import (``imported_B``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class LoRALinear(nn.Module):
    """A frozen base Linear plus a trainable low-rank delta. B starts at zero, so the wrapped layer starts
    identical to the base (PEFT init: A Kaiming-uniform)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float = 0.0, out_rows: int | None = None) -> None:
        super().__init__()
        self.base = base
        self.rank = rank
        self.alpha = float(alpha or rank)
        in_features, self.out_features = base.weight.shape[1], base.weight.shape[0]
        self.out_rows = out_rows or self.out_features  # the LoRA changes outputs [0, out_rows) only
        if not 0 < self.out_rows <= self.out_features:
            raise ValueError(f"out_rows must be in [1, {self.out_features}] for this Linear, got {out_rows}")
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=torch.float32, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_rows, rank, dtype=torch.float32, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        delta = (x.to(self.lora_A.dtype) @ self.lora_A.t()) @ self.lora_B.t()  # (..., out_rows)
        if self.out_rows < self.out_features:
            delta = nn.functional.pad(delta, (0, self.out_features - self.out_rows))  # (..., out)
        return self.base(x) + (self.alpha / self.rank) * delta.to(x.dtype)

    def exported_B(self, lora_B: Tensor) -> Tensor:
        """``lora_B`` (out_rows, r) as the weight format stores it: (out_features, r), zero rows past ``out_rows``."""
        return nn.functional.pad(lora_B, (0, 0, 0, self.out_features - self.out_rows))

    def imported_B(self, lora_B: Tensor) -> Tensor:
        """A stored (out_features, r) ``B`` cut to this LoRA's rows; refuses one that changes the other outputs."""
        if self.out_rows == self.out_features or lora_B.shape[0] != self.out_features:
            return lora_B  # nothing to cut (a shape mismatch is reported by the caller)
        if lora_B[self.out_rows:].abs().max() > 0:
            raise ValueError(f"the stored LoRA changes outputs {self.out_rows}..{self.out_features - 1} of this Linear "
                             "(e.g. the MLP part of a single block's linear1) but this config trains only the first "
                             f"{self.out_rows}; set lora.linear1_qkv_only = false to load it")
        return lora_B[:self.out_rows]


def get_submodule_parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, name = path.rpartition(".")
    return (root.get_submodule(parent) if parent else root), name


def inject_lora(root: nn.Module, paths: list[str], rank: int, alpha: float = 0.0,
                out_rows: dict[str, int] | None = None) -> dict[str, LoRALinear]:
    """Replace each Linear at ``paths`` (dotted, relative to ``root``) with a ``LoRALinear``; returns them by path.
    ``out_rows`` limits the LoRA of some paths to their first outputs (see ``LoRALinear``)."""
    out = {}
    for path in paths:
        parent, name = get_submodule_parent(root, path)
        base = getattr(parent, name)
        if isinstance(base, LoRALinear):
            raise ValueError(f"{path} already has a LoRA")
        if not hasattr(base, "weight") or base.weight.ndim != 2:
            raise ValueError(f"{path} is a {type(base).__name__}, expected a Linear layer")
        wrapped = LoRALinear(base, rank, alpha, (out_rows or {}).get(path))
        setattr(parent, name, wrapped)
        out[path] = wrapped
    return out
