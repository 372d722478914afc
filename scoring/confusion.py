"""ID-Conf: UMO's identity-confusion metric (arXiv 2509.06818; bytedance/UMO ``eval/id_conf_xversebench.py``).

For each reference r and the similarities s_r,k to the K generated candidates (faces, or object crops):

    ID-Conf_r = min(1, (s_first - s_second) / s_first)   if s_first > 0, else 0

where s_first is the best and s_second the second-best similarity: 1 when the reference's identity shows up in
one candidate and nowhere else, 0 when two candidates resemble it equally (a duplicated or blended identity).
Higher is better (UMO reports it x100 next to ID-Sim). UMO scores a reference only when K >= 2; with fewer
candidates there is nothing to be confused with and the reference is left out (NaN here).

With a layout, "first" is not the best candidate but the reference's own one (the candidate in its region):

    ID-Conf_r = clamp((s_own - max_{k != own} s_r,k) / s_own, 0, 1)   if s_own > 0 and r has a candidate, else 0

so a subject that resembles another region more than its own (a swap) scores 0 instead of a perfect margin.
"""

from __future__ import annotations

import torch
from torch import Tensor


def identity_confusion(similarity: Tensor, own: Tensor | None = None) -> Tensor:
    """Per-reference ID-Conf in [0, 1] (NaN where undefined: fewer than 2 candidates).

    Shapes:
        similarity: (M, K) cosine similarities, references x candidates
        own: (M,) long candidate index of each reference (-1: none), or None (UMO: the best candidate)
        returns (M,)
    """
    num_refs, num_candidates = similarity.shape
    out = torch.full((num_refs,), float("nan"))
    if num_candidates < 2:
        return out
    sim = similarity.detach().float().cpu()
    for r in range(num_refs):
        if own is None:
            first, second = torch.topk(sim[r], 2).values.tolist()
        else:
            k = int(own[r])
            if k < 0:
                out[r] = 0.0
                continue
            first = float(sim[r, k])
            second = float(torch.cat([sim[r, :k], sim[r, k + 1:]]).max())
        out[r] = 0.0 if first <= 0 else min(1.0, max(0.0, (first - second) / first))
    return out


def own_candidates(candidate_boxes: Tensor, region_boxes: Tensor) -> Tensor:
    """Each layout region's own candidate: the one whose box centre lies in the region, overlapping it most.

    Shapes:
        candidate_boxes: (K, 4), region_boxes: (M, 4) pixels x0, y0, x1, y1; returns (M,) long, -1 when none
    """
    own = torch.full((len(region_boxes),), -1, dtype=torch.long)
    if not len(candidate_boxes):
        return own
    centres = (candidate_boxes[:, :2] + candidate_boxes[:, 2:]) / 2
    for m, (x0, y0, x1, y1) in enumerate(region_boxes.tolist()):
        inside = (centres[:, 0] >= x0) & (centres[:, 0] <= x1) & (centres[:, 1] >= y0) & (centres[:, 1] <= y1)
        if inside.any():
            lt = torch.maximum(candidate_boxes[:, :2], torch.tensor([x0, y0]))
            rb = torch.minimum(candidate_boxes[:, 2:], torch.tensor([x1, y1]))
            overlap = (rb - lt).clamp(min=0).prod(-1) * inside
            own[m] = int(torch.argmax(overlap))
    return own


def mean_defined(values: Tensor) -> float | None:
    """Mean over the defined (non-NaN) entries; None when none is defined."""
    defined = values[~torch.isnan(values)]
    return float(defined.mean()) if len(defined) else None
