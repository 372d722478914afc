"""Reference binding on in-context models: subject k's reference tokens serve only region k's image tokens.

The core plan of ``MS_BindReferences`` and Apply MultiCrafter, ComfyUI-free (spec: docs/references.md).
Per joint attention call it adds, to the logits of image queries on subject k's reference keys:

* ``log(1 - strength)`` where the image token lies outside region k (``-inf`` at strength 1: hard binding);
* ``log(weight_k)`` everywhere (the per-reference strength; weight 0 = the image ignores that reference);
* optionally (``symmetric``) ``log(1 - strength)`` on subject k's reference queries -> image keys outside region k.

Regions are the layout's, priority-composited over the subjects *active* at the call's sigma; a subject
outside its window is left unbound. The bias is constant per (image-token owner, subject), so it can be
applied two exact ways: as an additive float mask (``CallBinding.bias``, any backend) or by splitting the
keys into blocks and merging the blocks' partial attentions with their log-sum-exps
(``CallBinding.attend_split``), which keeps every partial call on an unmasked (flash) kernel and skips the
blocked blocks entirely.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .families import TokenLayout
from .layout import Layout, TokenGrid, composite_ownership, region_areas, region_token_masks

DIRECTIONS = ("image_to_reference", "both")
IMPLEMENTATIONS = ("auto", "bias", "split")


@dataclass(frozen=True)
class SubjectBinding:
    """How one subject binds: how many consecutive references it owns, its weight, window and priority.

    ``sigma_start >= sigma_end``: the subject is active while ``sigma_end <= sigma <= sigma_start``.
    """

    references: int = 1  # R: a subject with R reference images owns R consecutive references
    weight: float = 1.0  # +log(weight) on every image query -> this subject's reference keys; 0 = ignored
    sigma_start: float = math.inf
    sigma_end: float = 0.0
    priority: int = 0
    label: str = ""

    def __post_init__(self) -> None:
        if self.references < 1:
            raise ValueError(f"subject {self.label!r} owns {self.references} references; a subject needs at least one")
        if not (math.isfinite(self.weight) and self.weight >= 0.0):
            raise ValueError(f"subject {self.label!r} weight must be finite and >= 0, got {self.weight}")
        if self.sigma_start < self.sigma_end:
            raise ValueError(f"subject {self.label!r} window starts at sigma {self.sigma_start} after it ends "
                             f"({self.sigma_end})")

    def active(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start


@dataclass(frozen=True)
class BindingConfig:
    strength: float = 1.0  # 0 = off, 1 = hard (-inf), between = additive log(1 - strength)
    direction: str = "image_to_reference"  # or "both": also subject k's reference queries -> image keys outside k
    implementation: str = "auto"  # auto | bias | split (auto: the faster one on the device, see choose_implementation)

    def __post_init__(self) -> None:
        problems = []
        if not (math.isfinite(self.strength) and 0.0 <= self.strength <= 1.0):
            problems.append(f"strength must be within [0, 1], got {self.strength}")
        if self.direction not in DIRECTIONS:
            problems.append(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.implementation not in IMPLEMENTATIONS:
            problems.append(f"implementation must be one of {IMPLEMENTATIONS}, got {self.implementation!r}")
        if problems:
            raise ValueError("invalid binding settings: " + "; ".join(problems))

    @property
    def outside_log(self) -> float:
        """log(1 - strength), -inf at strength 1."""
        return -math.inf if self.strength >= 1.0 else math.log1p(-self.strength)


def active_ownership(layout: Layout, grid: TokenGrid, priorities: Sequence[int], active: Sequence[bool]) -> Tensor:
    """Exclusive token ownership of the layout's regions, composited over the active subjects only.

    The one place binding asks the layout module for ownership (priority, then smaller area, then later subject).

    Shapes:
        returns (S, h, w) bool; rows of inactive subjects are all False
    """
    on = [i for i, a in enumerate(active) if a]
    return composite_ownership(region_token_masks(layout, grid), list(priorities), region_areas(layout), on).exclusive


class BindingPlan:
    """Layout + subjects + settings -> the attention of every joint call, cached per (token layout, active set).

    ``one_reference_per_region``: no subject records; region k binds reference k, extra references stay unbound.
    """

    def __init__(self, layout: Layout, subjects: Sequence[SubjectBinding], config: BindingConfig,
                 one_reference_per_region: bool = False, max_cached: int = 8) -> None:
        layout.check_subject_count(len(subjects))
        self.layout = layout
        self.subjects = tuple(subjects)
        self.config = config
        self.one_reference_per_region = one_reference_per_region
        self.max_cached = max_cached
        self._calls: dict[tuple, CallBinding | None] = {}

    @property
    def num_subjects(self) -> int:
        return len(self.subjects)

    def reference_owners(self, num_references: int, sources: str = "") -> tuple[int, ...]:
        """Subject index of each reference in sequence order (-1 = unbound)."""
        added = f" (added by {sources})" if sources else ""
        if self.one_reference_per_region:
            if self.num_subjects > num_references:
                raise ValueError(
                    f"the layout has {self.num_subjects} regions but the conditioning carries {num_references} "
                    f"reference latent(s){added}; without subjects region k binds reference k, so add references "
                    "or remove regions"
                )
            return tuple(range(self.num_subjects)) + (-1,) * (num_references - self.num_subjects)
        owned = [s.references for s in self.subjects]
        if sum(owned) != num_references:
            raise ValueError(
                f"the subjects own {sum(owned)} reference image(s) ({owned} per subject) but the conditioning "
                f"carries {num_references} reference latent(s){added}; give each subject exactly the images that "
                "node encoded, in the same order"
            )
        return tuple(j for j, r in enumerate(owned) for _ in range(r))

    def active(self, sigma: float) -> tuple[bool, ...]:
        return tuple(s.active(sigma) for s in self.subjects)

    def for_call(self, token_layout: TokenLayout, latent_hw: tuple[int, int], patch: int, sigma: float,
                 dtype: torch.dtype, device: torch.device | str, sources: str = "") -> CallBinding | None:
        """What to do in a joint call of ``token_layout`` at ``sigma``; None when it changes nothing."""
        owners = self.reference_owners(len(token_layout.reference_grids), sources)
        active = self.active(sigma)
        key = (token_layout, tuple(latent_hw), patch, active, dtype, str(device))
        if key not in self._calls:
            if len(self._calls) >= self.max_cached:
                self._calls.pop(next(iter(self._calls)))
            self._calls[key] = self._build(token_layout, latent_hw, patch, owners, active, dtype, device)
        return self._calls[key]

    def cached_calls(self) -> int:
        return len(self._calls)

    def _build(self, token_layout, latent_hw, patch, owners, active, dtype, device) -> CallBinding | None:
        outside = self.config.outside_log
        logs = []
        for s, on in zip(self.subjects, active):
            w = math.log(s.weight) if s.weight > 0 else -math.inf
            logs.append((w, w + outside) if on else (0.0, 0.0))  # (inside region, outside region)
        symmetric = self.config.direction == "both" and self.config.strength > 0
        if all(v == (0.0, 0.0) for v in logs) and not (symmetric and any(active)):
            return None
        self.layout.check_aspect(*latent_hw, what="latent")
        grid = TokenGrid.from_latent(*latent_hw, downscale=patch)
        if (grid.h, grid.w) != token_layout.image_grid:
            raise ValueError(f"latent {latent_hw} gives a {grid.h}x{grid.w} token grid but the call's layout has "
                             f"{token_layout.image_grid}")
        own = active_ownership(self.layout, grid, [s.priority for s in self.subjects], active)  # (S, h, w)
        owner = torch.full((grid.h * grid.w,), -1, dtype=torch.long)
        for j in range(self.num_subjects):
            owner[own[j].flatten()] = j
        # table[g, j]: bias of an image row owned by g - 1 (0 = background) on subject j's reference keys
        table = torch.tensor([[logs[j][0] if g == j + 1 else logs[j][1] for j in range(self.num_subjects)]
                              for g in range(self.num_subjects + 1)], dtype=torch.float64)
        reverse = tuple(outside if (symmetric and a) else 0.0 for a in active)  # ref rows of j -> img keys outside j
        return CallBinding(token_layout, owner, owners, table, reverse, dtype, torch.device(device))


class CallBinding:
    """The binding of one (token layout, active set): the additive bias, or the split + log-sum-exp attention.

    Shapes (N = token_layout.total, L = image tokens):
        owner: (L,) long, owning subject per image token (-1 = background)
        table: (S + 1, S) float64, bias of an image row owned by g - 1 on subject j's reference keys
    """

    def __init__(self, token_layout: TokenLayout, owner: Tensor, reference_owners: Sequence[int], table: Tensor,
                 reverse: Sequence[float], dtype: torch.dtype, device: torch.device) -> None:
        self.token_layout = token_layout
        self.owner = owner
        self.reference_owners = tuple(reference_owners)
        self.table = table
        self.reverse = tuple(reverse)
        self.dtype = dtype
        self.device = device
        self._bias: Tensor | None = None
        self._groups: list | None = None

    # which token indices are which

    def _image_rows(self, g: int) -> Tensor:
        img0, _ = self.token_layout.image_span
        return torch.nonzero(self.owner == g - 1).flatten() + img0

    def _ref_keys(self, j: int) -> Tensor:
        spans = [sp for sp, o in zip(self.token_layout.reference_spans, self.reference_owners) if o == j]
        return torch.cat([torch.arange(a, b) for a, b in spans]) if spans else torch.zeros(0, dtype=torch.long)

    def _image_keys_outside(self, j: int) -> Tensor:
        img0, _ = self.token_layout.image_span
        return torch.nonzero(self.owner != j).flatten() + img0

    def _blocks(self):
        """Row groups with their biased key blocks: [(rows, [(keys, value), ...])], each value a finite non-zero
        float or -inf. Keys in no block get 0. Rows in no group attend plainly."""
        groups = []
        for g in range(self.table.shape[0]):
            rows = self._image_rows(g)
            if rows.numel():
                blocks = [(self._ref_keys(j), float(self.table[g, j])) for j in range(self.table.shape[1])
                          if float(self.table[g, j]) != 0.0]
                groups.append((rows, [(k, v) for k, v in blocks if k.numel()]))
        for j, value in enumerate(self.reverse):
            rows = self._ref_keys(j)
            if value != 0.0 and rows.numel():
                groups.append((rows, [(self._image_keys_outside(j), value)]))
        return [(rows, blocks) for rows, blocks in groups if blocks]

    # additive bias

    def bias(self) -> Tensor:
        """Shapes: returns (1, 1, N, N) in ``dtype``: 0 = untouched, finfo.min / 4 where the value is -inf."""
        if self._bias is None:
            n = self.token_layout.total
            hard = torch.finfo(self.dtype).min / 4  # large negative with headroom: adding other masks cannot overflow
            bias = torch.zeros(n, n, dtype=torch.float32)
            for rows, blocks in self._blocks():
                for keys, value in blocks:
                    bias[rows[:, None], keys[None, :]] = max(value, hard)
            self._bias = bias.to(device=self.device, dtype=self.dtype).view(1, 1, n, n)
        return self._bias

    # split + log-sum-exp merge

    def _split_groups(self):
        """Per row group: the indices of keys with bias 0 (one block) and the biased blocks with finite values."""
        if self._groups is None:
            n = self.token_layout.total
            plan, covered = [], torch.zeros(n, dtype=torch.bool)
            for rows, blocks in self._blocks():
                covered[rows] = True
                biased = torch.zeros(n, dtype=torch.bool)
                for keys, _ in blocks:
                    biased[keys] = True
                plain = torch.nonzero(~biased).flatten()
                finite = [(keys.to(self.device), value) for keys, value in blocks if math.isfinite(value)]
                plan.append((rows.to(self.device), plain.to(self.device), finite))
            rest = torch.nonzero(~covered).flatten().to(self.device)
            self._groups = (rest, plan)
        return self._groups

    def attend_split(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Exact bound attention without a mask: per row group, unmasked attention over its key blocks, merged by
        log-sum-exp. Blocks at -inf are skipped, so a hard binding does less work than unbound attention.

        Shapes:
            q, k, v: (B, H, N, D); returns (B, H, N, D)
        """
        rest, plan = self._split_groups()
        out = torch.empty_like(q)
        if rest.numel():
            out[:, :, rest] = F.scaled_dot_product_attention(q[:, :, rest], k, v)
        for rows, plain, finite in plan:
            qg = q[:, :, rows]
            if not finite:
                out[:, :, rows] = F.scaled_dot_product_attention(qg, k[:, :, plain], v[:, :, plain])
                continue
            parts = [attention_with_lse(qg, k[:, :, plain], v[:, :, plain])]
            parts += [attention_with_lse(qg, k[:, :, keys], v[:, :, keys], value) for keys, value in finite]
            out[:, :, rows] = merge_partials(parts).to(q.dtype)
        return out


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, bias: float = 0.0) -> tuple[Tensor, Tensor]:
    """Unmasked attention and its log-sum-exp (plus a constant ``bias`` on every logit of this key block).

    Uses the fused kernels that return the log-sum-exp (flash on CPU and CUDA half, memory-efficient on CUDA fp32),
    falling back to plain math.

    Shapes:
        q: (B, H, Lq, D); k, v: (B, H, Lk, D); returns (B, H, Lq, D) and (B, H, Lq) float32
    """
    try:
        if q.device.type == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)[:2]
        elif q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[:2]
        elif q.device.type == "cuda":
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
            lse = lse[..., :q.shape[2]]
        else:
            raise RuntimeError("no fused kernel")
    except RuntimeError:
        logits = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        lse = logits.logsumexp(-1)
        out = (logits - lse.unsqueeze(-1)).exp() @ v.float()
    return out, lse.float() + bias


def merge_partials(parts: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """Softmax over the union of key blocks from each block's normalised output and log-sum-exp.

    Shapes:
        parts: [(out (B, H, L, D), lse (B, H, L))]; returns (B, H, L, D) float32
    """
    lses = torch.stack([lse for _, lse in parts])  # (P, B, H, L)
    weights = (lses - lses.amax(0, keepdim=True)).exp()
    weights = weights / weights.sum(0, keepdim=True)
    return sum(w.unsqueeze(-1) * o.float() for w, (o, _) in zip(weights, parts))


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


def choose_implementation(config: BindingConfig, device: torch.device, has_mask: bool) -> str:
    """``bias`` or ``split`` for one call. An incoming mask forces ``bias`` (it is added to ours).

    ``auto`` follows the measurement in the report of issue 10: on CUDA the split keeps SDPA on the flash kernel
    and is faster; on CPU the fused float-mask kernel is faster than several gathered calls.
    """
    if has_mask:
        return "bias"
    if config.implementation != "auto":
        return config.implementation
    return "split" if device.type == "cuda" else "bias"
