"""Stage-1 losses (pure torch): rectified-flow loss, the IDAR attention map and Dice loss, the MoE balance loss.

Spec: shared/docs/multicrafter.md §3 (IDAR), §4.2 (balancing). One layer's Switch load-balancing loss is
``attention.moe_lora.load_balancing_loss``; ``balance_loss`` sums it over the MoE layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..attention.attention_maps import DIRECTIONS, normalize_maps, reference_attention_maps
from ..attention.families import FLUX, TokenLayout
from ..attention.moe_lora import load_balancing_loss


def flow_loss(v_pred: Tensor, noise: Tensor, x0: Tensor) -> Tensor:
    """Rectified-flow loss ``mean ||v_theta(x_t) - (noise - x0)||^2`` with ``x_t = (1-t) x0 + t noise`` (§3.1).

    Shapes:
        v_pred, noise, x0: (B, C, h, w); returns () float32
    """
    return F.mse_loss(v_pred.float(), (noise - x0).float())


def noised(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """``x_t = (1 - t) x0 + t noise``. Shapes: x0, noise (B, C, h, w); t (B,); returns (B, C, h, w)."""
    t = t.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - t) * x0 + t * noise


def sample_timesteps(batch: int, image_tokens: int, generator: torch.Generator, shift: bool = True) -> Tensor:
    """t in (0, 1): uniform, then FLUX's resolution-dependent shift ``t' = e^mu / (e^mu + 1/t - 1)`` with
    ``mu = lin(image_tokens; (256, 0.5), (4096, 1.15))`` (UNO train.py, §8.1; ``FLUX.time_shift``).

    Shapes:
        returns (batch,) float32
    """
    t = torch.rand(batch, generator=generator).clamp(1e-4, 1 - 1e-4)
    if not shift:
        return t
    return FLUX.time_shift.shift(t, image_tokens)


def supervised_maps(q: Tensor, k: Tensor, layout: TokenLayout, use_checkpoint: bool = False,
                    direction: str = "reference_to_image") -> Tensor:
    """One double block's attention map per subject (reference ``i`` = subject ``i``), computed by
    ``attention.attention_maps.reference_attention_maps``: only the needed query rows are recomputed against all
    keys, reusing the block's own post-RoPE q/k (no (N, N) matrix). ``direction`` (``loss.idar_direction``):
    ``"reference_to_image"`` (spec §3.2 default: where subject i's reference queries look in the image) or the
    ablation ``"image_to_reference"`` (how much each image token attends to subject i's reference; subjects compete
    per pixel). With ``use_checkpoint`` the (B, H, rows, N) probabilities are recomputed in backward instead of stored.

    Shapes:
        q, k: (B, H, N, D); returns (B, S, L) float32
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"loss.idar_direction must be one of {DIRECTIONS}, got {direction!r}")
    num = len(layout.reference_grids)

    def run(q: Tensor, k: Tensor) -> Tensor:
        return reference_attention_maps(q, k, layout, list(range(num)), num, direction)

    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(run, q, k, use_reentrant=False)
    return run(q, k)


def dice_loss(pred: Tensor, mask: Tensor, eps: float = 1.0) -> Tensor:
    """Per-subject Dice loss ``1 - (2 sum(p m) + eps) / (sum p + sum m + eps)`` (§3.1). Empty masks are finite
    (the loss then pushes the map towards zero).

    Shapes:
        pred: (B, S, L) in [0, 1]; mask: (B, S, L) in {0, 1}
        returns (B, S)
    """
    pred, mask = pred.float(), mask.float()
    inter = (pred * mask).sum(-1)
    return 1 - (2 * inter + eps) / (pred.sum(-1) + mask.sum(-1) + eps)


def idar_loss(block_maps: list[Tensor], masks: Tensor, eps: float = 1.0,
              keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """IDAR: mean the maps over blocks, min-max normalize, Dice against the token masks, sum over subjects,
    mean over the supervised samples. ``keep`` (B,) marks the samples IDAR supervises (e.g. t <= ``loss.idar_max_t``);
    the others leave the mean instead of counting as zeros, so skipping high t does not shrink the loss (and its
    gradient) by the skipped share. With no sample kept the loss is 0.

    Shapes:
        block_maps: list of (B, S, L); masks: (B, S, L); keep: (B,) bool or 0/1
        returns (loss (), per-subject Dice score 1 - loss (B, S), of every sample)
    """
    pred = normalize_maps(torch.stack(block_maps).mean(0))  # (B, S, L)
    per_subject = dice_loss(pred, masks, eps)  # (B, S)
    per_sample = per_subject.sum(-1)
    if keep is None:
        return per_sample.mean(), (1 - per_subject).detach()
    keep = keep.to(per_sample.device, per_sample.dtype)
    return (per_sample * keep).sum() / keep.sum().clamp(min=1), (1 - per_subject).detach()


def balance_loss(routing: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """The Switch load-balancing loss summed over the MoE layers: Switch Transformer (Fedus et al. 2021, §2.2) adds
    ``α · E · Σ_e f_e P_e`` to the total loss for each Switch layer, so ``moe.balance_weight`` (α = 0.01) is the
    paper's per-layer weight (perfect balance gives one per layer).

    Shapes:
        routing: per MoE layer (router logits (T, E), chosen experts (T, k)); returns () float32
    """
    if not routing:
        raise ValueError("balance_loss needs the routing of at least one MoE layer")
    return torch.stack([load_balancing_loss(logits, experts) for logits, experts in routing]).sum()


def router_load(experts: Tensor, num_experts: int) -> Tensor:
    """Share of routing slots per expert (for logging). Shapes: experts (T, k) long; returns (E,)."""
    counts = torch.bincount(experts.reshape(-1), minlength=num_experts).float()
    return counts / counts.sum().clamp(min=1)
