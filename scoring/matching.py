"""Multi-ID matching: optimal one-to-one assignment of references to detected subjects.

Implements the Hungarian step of MultiCrafter's Multi-ID Alignment Reward (Eq. 11 context, §5.4 of
the spec): ``X* = argmax_X sum_ij C_ij X_ij`` with each reference and each detection used at most once.
The score is the mean over *references* of the matched similarity (clamped at 0), so a missing subject
contributes 0 and an extra detection earns nothing; an image that repeats one identity twice can be
credited for it only once. The assignment maximises that same clamped objective: negatives are clamped to 0
*before* assignment, so a pair that cannot score is never preferred over one that can (on raw similarities the
solver would trade a positive pair away to avoid a very negative one that scores 0 anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


@dataclass(frozen=True)
class Matching:
    """Result of matching M references to K detections.

    Shapes:
        similarity: (M, K) float, cosine similarities
        assignment: (M,) long, detection index matched to each reference, -1 when unmatched
        matched:    (M,) float, matched similarity clamped at 0; 0 for an unmatched reference
    """

    similarity: Tensor
    assignment: Tensor
    matched: Tensor

    @property
    def score(self) -> float:
        """Mean over references of the matched similarity (0 when there are no references)."""
        return float(self.matched.mean()) if self.matched.numel() else 0.0

    @property
    def total(self) -> float:
        """Sum over references of the matched similarity (to average over several matching problems)."""
        return float(self.matched.sum())


def match_identities(similarity: Tensor) -> Matching:
    """Optimal one-to-one matching of references (rows) to detections (columns).

    Rectangular matrices are fine: with more detections than references the extras stay unmatched; with
    fewer, some references stay unmatched and score 0. NaN entries are an error (they would silently
    turn into arbitrary matches); ``-inf`` entries count as "cannot match" (0, like every negative entry).

    Shapes:
        similarity: (M, K) float
        returns Matching with (M,) assignment and matched scores
    """
    if not isinstance(similarity, Tensor) or similarity.ndim != 2:
        got = tuple(similarity.shape) if isinstance(similarity, Tensor) else type(similarity).__name__
        raise ValueError(f"similarity must be a (references, detections) matrix, got {got}")
    if torch.isnan(similarity).any():
        rows = sorted({int(i) for i in torch.nonzero(torch.isnan(similarity))[:, 0]})
        raise ValueError(
            f"similarity matrix has NaN entries (reference rows {rows}); an embedding was NaN - check the model "
            "files and that images are finite, RGB in [0, 1]"
        )
    num_refs, num_dets = similarity.shape
    # the objective is what the score counts: negative similarities (and -inf: scipy rejects it) earn 0
    sim = similarity.detach().double().cpu().nan_to_num(neginf=0.0, posinf=1.0).clamp(min=0.0)
    assignment = torch.full((num_refs,), -1, dtype=torch.long)
    matched = torch.zeros(num_refs, dtype=torch.float32)
    if num_refs and num_dets:
        rows, cols = linear_sum_assignment(sim.numpy(), maximize=True)
        assignment[torch.from_numpy(rows)] = torch.from_numpy(cols).long()
        matched[torch.from_numpy(rows)] = sim[rows, cols].float()
    return Matching(similarity=similarity.detach().float().cpu(), assignment=assignment, matched=matched)

