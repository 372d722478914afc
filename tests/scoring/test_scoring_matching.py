"""Multi-ID Hungarian matching: optimal, one-to-one, missing subjects score 0, no double credit."""

from itertools import permutations

import numpy as np
import pytest
import torch

from multisubject.scoring.matching import match_identities


def brute_force_best_total(similarity: np.ndarray) -> float:
    """Best total over all one-to-one assignments of min(M, K) pairs (exponential; reference only)."""
    num_refs, num_dets = similarity.shape
    if num_refs > num_dets:
        return brute_force_best_total(similarity.T)
    if num_refs == 0:
        return 0.0
    return max(sum(similarity[i, c] for i, c in enumerate(cols)) for cols in permutations(range(num_dets), num_refs))


@pytest.mark.parametrize("num_refs, num_dets", [(m, k) for m in range(1, 8) for k in range(1, 8)])
def test_hungarian_total_equals_brute_force(num_refs, num_dets):
    rng = np.random.default_rng(num_refs * 10 + num_dets)
    for _ in range(3):
        similarity = rng.uniform(-1, 1, (num_refs, num_dets))
        matching = match_identities(torch.from_numpy(similarity))
        rows = torch.nonzero(matching.assignment >= 0)[:, 0]
        cols = matching.assignment[rows]
        clamped = similarity.clip(min=0)  # the score's objective: negatives earn 0
        total = float(clamped[rows.numpy(), cols.numpy()].sum())
        assert total == pytest.approx(brute_force_best_total(clamped), abs=1e-9)
        assert matching.total == pytest.approx(total, abs=1e-6)
        assert len(set(cols.tolist())) == len(cols) == min(num_refs, num_dets)  # one-to-one


def test_missing_subject_scores_zero_and_extra_detections_earn_nothing():
    one_detection = match_identities(torch.tensor([[0.9], [0.8]]))
    assert one_detection.assignment.tolist() == [0, -1]
    assert one_detection.score == pytest.approx(0.45)  # (0.9 + 0) / 2 references
    extras = match_identities(torch.tensor([[0.1, 0.9, 0.3, 0.2]]))
    assert extras.assignment.tolist() == [1] and extras.score == pytest.approx(0.9)


def test_one_identity_repeated_is_credited_once():
    # both detections are the first person; the second reference resembles them at 0.3 at best
    similarity = torch.tensor([[0.95, 0.95], [0.3, 0.3]])
    matching = match_identities(similarity)
    assert matching.score == pytest.approx((0.95 + 0.3) / 2)
    assert sorted(matching.assignment.tolist()) == [0, 1]


def test_negative_similarity_counts_zero_and_no_detection_is_zero():
    assert match_identities(torch.tensor([[-0.4]])).matched.tolist() == [0.0]
    empty = match_identities(torch.zeros(3, 0))
    assert empty.score == 0.0 and empty.assignment.tolist() == [-1, -1, -1]
    assert match_identities(torch.zeros(0, 2)).score == 0.0


def test_minus_infinity_counts_zero_not_rejected():
    matching = match_identities(torch.tensor([[float("-inf"), 0.5], [float("-inf"), float("-inf")]]))
    assert matching.assignment.tolist() == [1, 0]
    assert matching.matched.tolist() == [0.5, 0.0]


def test_negatives_are_clamped_before_assignment():
    # raw optimum: (0, 1) + (1, 0) = 0.3 + 0.2 beats (0, 0) + (1, 1) = 0.9 - 0.9, and scores 0.25; the score
    # counts -0.9 as 0, so (0, 0) + (1, 1) is worth 0.9 + 0 and is the assignment to make (score 0.45)
    similarity = torch.tensor([[0.9, 0.3], [0.2, -0.9]])
    matching = match_identities(similarity)
    assert matching.assignment.tolist() == [0, 1]
    assert matching.score == pytest.approx(0.45)


def test_nan_similarity_is_a_clear_error():
    with pytest.raises(ValueError, match=r"NaN entries \(reference rows \[1\]\).*embedding was NaN"):
        match_identities(torch.tensor([[0.5, 0.1], [float("nan"), 0.2]]))


def test_similarity_must_be_a_matrix():
    with pytest.raises(ValueError, match=r"\(references, detections\) matrix, got \(3,\)"):
        match_identities(torch.zeros(3))
