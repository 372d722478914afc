"""AnyMS decoupled cross-attention (Yu et al., arXiv 2512.23537): global and local decoupling.

Global decoupling (Eq. 3): ``Z = Z_text + lambda * Z_image``; text attention is untouched.
Local decoupling (Eq. 4-6): subject ``j``'s image tokens (IP-Adapter K/V, ``K_j = W'_k c_j``) are
attended to only by the query tokens of its region; the regions are composited by priority, so
the top subject owns an overlap, and the background gets no image features (``Z_image`` starts at 0).
Only the subjects active at the current step (weight > 0, sigma inside their window) take part in
the compositing, so a switched-off subject changes nothing, exactly as if it were left out.

Because softmax runs over keys, cropping query rows equals computing full attention and keeping
those rows, so crop-and-merge is exactly "hard exclusive masks after full attention"; computing
it on the gathered rows only (gather -> attention -> scatter) is what makes it cheap.

Modes:
  * ``crop_merge`` (paper, default): exclusive priority-composited regions, gathered rows only;
  * ``masked_sum`` (paper's Eq. 7 ablation, what masked IP-Adapters do): full attention per subject,
    multiplied by its (non-exclusive) region mask, summed;
  * ``global`` (no local decoupling): every subject's attention everywhere, summed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor

from .ip_adapter import IPAdapter
from .layout import (
    Layout,
    Region,
    TokenGrid,
    composite_ownership,
    describe_unowned,
    region_areas,
    region_token_masks,
)
from .subjects import WEIGHT_RANGE

log = logging.getLogger("multisubject")

AttentionFn = Callable[[Tensor, Tensor, Tensor, int], Tensor]  # (q, k, v, heads) on (B, N, heads*D) -> (B, N, heads*D)
SCALE_RANGE = (0.0, 5.0)


class Mode(str, Enum):
    CROP_MERGE = "crop_merge"
    MASKED_SUM = "masked_sum"
    GLOBAL = "global"


class RegionSource(str, Enum):
    LAYOUT = "layout"  # each region as drawn: a box, or a mask's own token set
    BOUNDING_BOX = "bounding_box"  # mask regions replaced by their bounding boxes (the paper's boxes)


@dataclass(frozen=True)
class AnyMSConfig:
    scale: float = 1.0  # lambda in Z = Z_text + lambda * Z_image (Eq. 3 has 1); 0 = text only
    mode: Mode = Mode.CROP_MERGE  # crop_merge (paper) | masked_sum (Eq. 7 ablation) | global (no local decoupling)
    region_source: RegionSource = RegionSource.LAYOUT  # layout (box or mask as drawn) | bounding_box

    def __post_init__(self) -> None:
        lo, hi = SCALE_RANGE
        if not (math.isfinite(self.scale) and lo <= self.scale <= hi):
            raise ValueError(f"adapter scale must be within [{lo}, {hi}], got {self.scale}")
        for name, enum in (("mode", Mode), ("region_source", RegionSource)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, enum(value))
            except ValueError:
                raise ValueError(
                    f"{name} must be one of {[m.value for m in enum]}, got {value!r}"
                ) from None


@dataclass(frozen=True, eq=False)
class EncodedSubject:
    """One subject's adapter tokens (references averaged in token space) and how it applies.

    Shapes:
        cond:   (T, C) tokens of the reference image(s)
        uncond: (T, C) tokens of a zero image (the CFG negative branch)
    """

    cond: Tensor
    uncond: Tensor
    label: str = ""
    weight: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    priority: int = 0

    def __post_init__(self) -> None:
        if self.cond.ndim != 2 or self.cond.shape != self.uncond.shape:
            raise ValueError(
                f"subject tokens must be (T, C) for cond and uncond alike, got {tuple(self.cond.shape)} and "
                f"{tuple(self.uncond.shape)}"
            )
        lo, hi = WEIGHT_RANGE
        if not (math.isfinite(self.weight) and lo <= self.weight <= hi):
            raise ValueError(f"subject weight must be within [{lo}, {hi}], got {self.weight}")
        if not (0.0 <= self.start_percent <= self.end_percent <= 1.0):
            raise ValueError(
                f"need 0 <= start_percent <= end_percent <= 1, got {self.start_percent} and {self.end_percent}"
            )


@dataclass(frozen=True, eq=False)
class EncodedSubjects:
    """Encoded subjects plus the adapter whose K/V projections read them (``MS_ENCODED_SUBJECTS``)."""

    adapter: IPAdapter
    items: tuple[EncodedSubject, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for i, s in enumerate(self.items):
            if s.cond.shape[-1] != self.adapter.context_dim:
                raise ValueError(
                    f"subject {i} tokens are {s.cond.shape[-1]} wide but the adapter reads {self.adapter.context_dim}"
                )

    def __len__(self) -> int:
        return len(self.items)

    @property
    def priorities(self) -> list[int]:
        return [s.priority for s in self.items]


def average_reference_tokens(tokens: Tensor) -> Tensor:
    """Several reference images of one subject -> one token set (mean in token space).

    Shapes:
        tokens: (R, T, C)
        returns (T, C)
    """
    if tokens.ndim != 3 or tokens.shape[0] == 0:
        raise ValueError(f"expected reference tokens (R, T, C) with R >= 1, got {tuple(tokens.shape)}")
    return tokens.float().mean(dim=0)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Plain multi-head attention on flattened heads (torch's SDPA).

    Shapes:
        q: (B, N, heads*D); k, v: (B, M, heads*D)
        returns (B, N, heads*D)
    """
    batch, _, width = q.shape
    dim_head = width // heads
    q, k, v = (t.reshape(batch, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))  # (B, heads, *, D)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(batch, -1, width)


@dataclass(frozen=True)
class GridPlan:
    """Token sets of one latent size at one attention resolution, on one device.

    Shapes:
        token_masks: (S, L) bool, each subject's full region (non-exclusive), composited per active set
        regions:     (S, L) float 0/1, the same masks as the attention's factor for ``masked_sum``
    """

    grid: TokenGrid
    token_masks: Tensor
    regions: Tensor


class AnyMSPlan:
    """Everything the 70 (or 16) patched sites share: subjects, layout, per-site K/V and grid caches.

    Built once per Apply node run; the hot path only looks things up in caches keyed by latent size,
    sequence length, device, dtype and the set of active subjects, so per call it does Python work per
    subject, never per token.
    """

    def __init__(
        self,
        subjects: EncodedSubjects,
        layout: Layout,
        config: AnyMSConfig,
        sigma_ranges: list[tuple[float, float]] | None = None,
    ) -> None:
        layout.check_subject_count(len(subjects))
        if config.region_source is RegionSource.BOUNDING_BOX:
            layout = Layout(
                layout.width, layout.height,
                tuple(Region(box=r.bounding_box(), label=r.label) for r in layout.regions),
            )
        self.subjects = subjects
        self.layout = layout
        self.areas = region_areas(layout)  # the default overlap order: smaller regions win
        self.config = config
        # (sigma_start, sigma_end): active while sigma_end <= sigma <= sigma_start; None = always
        self.sigma_ranges = sigma_ranges or [(math.inf, 0.0)] * len(subjects)
        if len(self.sigma_ranges) != len(subjects):
            raise ValueError(f"got {len(self.sigma_ranges)} sigma ranges for {len(subjects)} subjects")
        self._grids: dict[tuple, GridPlan] = {}
        self._kv: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._branch: dict[tuple, Tensor] = {}
        self._owned: dict[tuple, tuple[Tensor, ...]] = {}
        self._rows: dict[tuple, tuple[Tensor, ...]] = {}
        self._last_sigma: tuple[object, tuple[int, ...]] | None = None

    def __deepcopy__(self, memo: dict) -> AnyMSPlan:
        return self  # ModelPatcher.clone() deep-copies model_options; the plan is shared, never mutated by users

    # lookups (cached)

    def active_subjects(self, sigma: Tensor | float | None) -> tuple[int, ...]:
        """Subjects with weight > 0 whose start/end range contains ``sigma`` (None = all)."""
        if self._last_sigma is not None and self._last_sigma[0] is sigma:
            return self._last_sigma[1]
        value = None if sigma is None else float(sigma.max()) if isinstance(sigma, Tensor) else float(sigma)
        active = tuple(
            j for j, (s, (hi, lo)) in enumerate(zip(self.subjects.items, self.sigma_ranges))
            if s.weight > 0 and (value is None or lo <= value <= hi)
        )
        self._last_sigma = (sigma, active)
        return active

    def grid_plan(self, latent_h: int, latent_w: int, num_tokens: int, device: torch.device) -> GridPlan:
        key = (latent_h, latent_w, num_tokens, str(device))
        plan = self._grids.get(key)
        if plan is None:
            self.layout.check_aspect(latent_h, latent_w)
            grid = TokenGrid.infer(latent_h, latent_w, num_tokens)
            masks = region_token_masks(self.layout, grid).reshape(len(self.layout), -1).to(device)  # (S, L)
            plan = GridPlan(grid=grid, token_masks=masks, regions=masks.float())
            self._grids[key] = plan
        return plan

    def owned_tokens(self, plan: GridPlan, active: tuple[int, ...]) -> tuple[Tensor, ...]:
        """The tokens each subject owns when only the ``active`` subjects are composited, cached per active set.

        Warns once per grid and active set about an active subject that owns no token there.

        Shapes:
            returns S tensors (n_j,) long on the plan's device; empty for inactive subjects
        """
        key = (id(plan), active)
        owned = self._owned.get(key)
        if owned is None:
            ownership = composite_ownership(plan.token_masks, self.subjects.priorities, self.areas, active)
            grid = plan.grid
            where = f"of the {grid.h}x{grid.w} token grid"
            labels = [r.label or s.label for s, r in zip(self.subjects.items, self.layout.regions)]  # as the preview
            for message in describe_unowned(ownership, plan.token_masks, labels, where).values():
                log.warning("multisubject: AnyMS: %s", message)
            owned = tuple(torch.nonzero(row).squeeze(1) for row in ownership.exclusive)
            self._owned[key] = owned
        return owned

    def site_kv(self, site: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Per-subject image K and V of one site, cond and uncond stacked.

        Shapes:
            returns two (S, 2, T, C_site) tensors; [:, 0] cond, [:, 1] uncond
        """
        key = (site, str(device), dtype)
        kv = self._kv.get(key)
        if kv is None:
            tokens = torch.stack([torch.stack([s.cond, s.uncond]) for s in self.subjects.items])  # (S, 2, T, C)
            tokens = tokens.to(device, torch.float32)
            k_w = self.subjects.adapter.to_k_ip[site].to(device, torch.float32)
            v_w = self.subjects.adapter.to_v_ip[site].to(device, torch.float32)
            kv = ((tokens @ k_w.T).to(dtype), (tokens @ v_w.T).to(dtype))
            self._kv[key] = kv
        return kv

    def batch_rows(self, plan: GridPlan, active: tuple[int, ...], batch: int) -> tuple[Tensor, ...]:
        """Each subject's owned tokens (``owned_tokens``) as rows of the flattened ``(B * L, C)`` queries.

        Gathering rows of a 2-D tensor is several times faster on CPU than ``index_select`` along dim 1.

        Shapes:
            returns S tensors (B * n_j,) long
        """
        key = (id(plan), active, batch)
        rows = self._rows.get(key)
        if rows is None:
            num_tokens = plan.grid.num_tokens
            rows = tuple(
                (torch.arange(batch, device=idx.device)[:, None] * num_tokens + idx[None, :]).reshape(-1)
                for idx in self.owned_tokens(plan, active)
            )
            self._rows[key] = rows
        return rows

    def branch_index(self, cond_or_uncond: list[int] | None, batch: int, device: torch.device) -> Tensor:
        """Which stacked token set (0 cond, 1 uncond) each batch row uses. Shapes: returns (B,) long."""
        chunks = tuple(cond_or_uncond) if cond_or_uncond else (0,)
        key = (chunks, batch, str(device))
        index = self._branch.get(key)
        if index is None:
            if batch % len(chunks):
                raise ValueError(f"batch {batch} does not split into {len(chunks)} cond/uncond chunks")
            index = torch.tensor([min(c, 1) for c in chunks], device=device).repeat_interleave(batch // len(chunks))
            self._branch[key] = index
        return index

    # the attention

    def add_image_attention(
        self,
        out: Tensor,
        q: Tensor,
        *,
        site: int,
        heads: int,
        latent_hw: tuple[int, int],
        cond_or_uncond: list[int] | None = None,
        sigma: Tensor | float | None = None,
        attention: AttentionFn = sdpa_attention,
    ) -> Tensor:
        """Add ``lambda * Z_image`` of one site to the text attention output ``out`` (in place).

        Shapes:
            out: (B, L, C_site) text attention output, before ``to_out``
            q:   (B, L, C_site) the site's projected queries
            returns out
        """
        active = self.active_subjects(sigma)
        if not active or self.config.scale == 0.0:
            return out
        batch, num_tokens, _ = q.shape
        k_all, v_all = self.site_kv(site, q.device, q.dtype)
        branch = self.branch_index(cond_or_uncond, batch, q.device)
        mode = self.config.mode
        plan = self.grid_plan(latent_hw[0], latent_hw[1], num_tokens, q.device) if mode is not Mode.GLOBAL else None
        if mode is Mode.CROP_MERGE:
            owned = self.owned_tokens(plan, active)
            rows = self.batch_rows(plan, active, batch)
            q_rows = q.reshape(batch * num_tokens, -1)  # (B * L, C_site)
        for j in active:
            alpha = self.config.scale * self.subjects.items[j].weight
            k_j, v_j = k_all[j][branch], v_all[j][branch]  # (B, T, C_site)
            if mode is Mode.CROP_MERGE:
                idx = owned[j]
                if idx.numel() == 0:  # every token taken by higher-ranked subjects (warned once per active set)
                    continue
                q_j = q_rows.index_select(0, rows[j]).view(batch, idx.numel(), -1)  # (B, n_j, C_site)
                z = attention(q_j, k_j, v_j, heads)  # (B, n_j, C_site)
                out.index_add_(1, idx, z.to(out.dtype), alpha=alpha)
            else:
                z = attention(q, k_j, v_j, heads)  # (B, L, C_site)
                if mode is Mode.MASKED_SUM:
                    z = z * plan.regions[j].to(z.dtype)[None, :, None]
                out.add_(z.to(out.dtype), alpha=alpha)
        return out
