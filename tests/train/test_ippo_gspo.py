"""GSPO objective and group advantages (multicrafter.md §5.2–5.4)."""

from __future__ import annotations

import pytest
import torch

from multisubject.train.gspo import (
    GSPOConfig,
    RewardAggregation,
    combine_rewards,
    group_advantages,
    gspo_objective,
    reward_advantages,
    sequence_log_ratio,
)
from multisubject.train.sde import sample_trajectory, sigma_schedule, window_log_probs


def test_ratio_one_gives_minus_mean_advantage():
    logp = torch.randn(6, 2)
    adv = torch.randn(6)
    out = gspo_objective(logp.clone().requires_grad_(), logp, adv, clip_range=1e-4)
    torch.testing.assert_close(out.loss, -adv.mean())
    assert float(out.ratio_mean) == 1.0 and float(out.clip_fraction) == 0.0 and float(out.kl) == 0.0


def test_sequence_ratio_is_exp_of_mean_step_log_ratio():
    new, old = torch.randn(4, 3), torch.randn(4, 3)
    log_s = sequence_log_ratio(new, old)
    torch.testing.assert_close(log_s, ((new[:, 0] - old[:, 0]) + (new[:, 1] - old[:, 1]) + (new[:, 2] - old[:, 2])) / 3)
    adv = torch.ones(4)
    out = gspo_objective(new, old, adv, clip_range=0.9)
    s = torch.exp(log_s)
    torch.testing.assert_close(out.ratio_mean, s.mean())
    torch.testing.assert_close(out.ratio_max, s.max())


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_clipping_engages_exactly_beyond_beta(sign):
    beta = 1e-2
    old = torch.zeros(1, 2)
    adv = torch.tensor([sign])
    # the clipped side is the one where moving further would help: s > 1 + β for A > 0, s < 1 − β for A < 0
    inside = torch.log(torch.tensor(1 + sign * beta * 0.99))
    beyond = torch.log(torch.tensor(1 + sign * beta * 1.01))
    grads = {}
    for name, log_s in (("inside", inside), ("beyond", beyond)):
        new = torch.full((1, 2), float(log_s), requires_grad=True)
        out = gspo_objective(new, old, adv, clip_range=beta)
        out.loss.backward()
        grads[name] = new.grad.abs().sum().item()
        assert float(out.clip_fraction) == (1.0 if name == "beyond" else 0.0)
    assert grads["inside"] > 0 and grads["beyond"] == 0.0
    # on the other side the ratio is never clipped: the min keeps the unclipped (pessimistic) term
    new = torch.full((1, 2), float(torch.log(torch.tensor(1 - sign * beta * 2))), requires_grad=True)
    gspo_objective(new, old, adv, clip_range=beta).loss.backward()
    assert new.grad.abs().sum() > 0


class _TinyPolicy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Conv2d(3, 3, 1).double()

    def forward(self, x, sigma):
        return self.mix(x) * (1 + sigma.view(-1, 1, 1, 1))


def test_gradient_matches_finite_differences_on_a_tiny_policy():
    torch.manual_seed(0)
    policy = _TinyPolicy()
    sigmas = sigma_schedule(5)
    noise = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        traj = sample_trajectory(policy, noise, sigmas, (1, 2), 0.7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # move away from θ_old so the ratio is not 1, but stay inside the clip band
        policy.mix.weight.add_(1e-3 * torch.randn_like(policy.mix.weight))
    adv = torch.tensor([1.0, -0.5, 0.3, -0.8], dtype=torch.float64)

    def loss_fn() -> torch.Tensor:
        out = gspo_objective(window_log_probs(policy, traj, 0.7), traj.log_probs, adv, clip_range=0.5, kl_coef=0.1)
        return out.loss

    loss_fn().backward()
    analytic = policy.mix.weight.grad.clone()
    numeric = torch.zeros_like(analytic)
    h = 1e-6
    with torch.no_grad():
        for idx in range(analytic.numel()):
            w = policy.mix.weight.view(-1)
            w[idx] += h
            plus = loss_fn()
            w[idx] -= 2 * h
            minus = loss_fn()
            w[idx] += h
            numeric.view(-1)[idx] = (plus - minus) / (2 * h)
    assert analytic.abs().max() > 1e-4
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)


def test_advantages_are_zero_mean_unit_std_within_each_group():
    rewards = torch.tensor([1.0, 2.0, 4.0, 7.0, 10.0, 10.5, 9.0, 30.0])
    adv = group_advantages(rewards, group_size=4).view(2, 4)
    torch.testing.assert_close(adv.mean(1), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(adv.std(1, unbiased=False), torch.ones(2), atol=1e-6, rtol=0)
    # each group is normalized by its own statistics: shifting one group leaves the other untouched
    shifted = rewards.clone()
    shifted[:4] += 100
    torch.testing.assert_close(group_advantages(shifted, 4), adv.view(-1), atol=1e-5, rtol=0)


def test_constant_rewards_give_zero_advantages_and_no_gradient():
    adv = group_advantages(torch.full((6,), 0.37), group_size=3)
    assert torch.equal(adv, torch.zeros(6))
    policy = _TinyPolicy()
    with torch.no_grad():
        traj = sample_trajectory(policy, torch.randn(6, 3, 2, 2, dtype=torch.float64), sigma_schedule(4), (0, 1), 0.7)
    out = gspo_objective(window_log_probs(policy, traj, 0.7), traj.log_probs, adv, clip_range=1e-4)
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0
    assert all(float(p.grad.abs().max()) == 0.0 for p in policy.parameters())


def test_advantage_clamp_limits_the_magnitude():
    rewards = torch.tensor([0.0] * 9 + [1.0])
    assert group_advantages(rewards, 10).max() == pytest.approx(3.0, rel=1e-4)  # one outlier in 10: A = 3
    assert group_advantages(rewards, 10, clamp=2.0).max() == pytest.approx(2.0)


def test_group_size_one_is_rejected_with_the_reason():
    with pytest.raises(ValueError, match="undefined for a group of 1"):
        group_advantages(torch.randn(4), group_size=1)
    with pytest.raises(ValueError, match="multiple of the group size"):
        group_advantages(torch.randn(5), group_size=2)


def test_aggregation_modes_follow_the_spec():
    g = torch.Generator().manual_seed(0)
    rewards = {"a": torch.randn(8, generator=g), "b": 100 * torch.randn(8, generator=g)}
    weights = {"a": 3.0, "b": 1.0}
    combined = combine_rewards(rewards, weights)
    torch.testing.assert_close(combined, 0.75 * rewards["a"] + 0.25 * rewards["b"])
    sum_first = reward_advantages(rewards, weights, 4, RewardAggregation.SUM_THEN_NORMALIZE)
    torch.testing.assert_close(sum_first, group_advantages(combined, 4))
    norm_first = reward_advantages(rewards, weights, 4, "normalize_then_sum")
    expected = 0.75 * group_advantages(rewards["a"], 4) + 0.25 * group_advantages(rewards["b"], 4)
    torch.testing.assert_close(norm_first, expected)
    # normalizing first keeps the large-scale reward from drowning the small one
    assert not torch.allclose(sum_first, norm_first)


def test_weight_for_an_uncomputed_reward_is_named():
    with pytest.raises(ValueError, match=r"\['c'\] have weights but were not computed"):
        combine_rewards({"a": torch.zeros(2)}, {"a": 1.0, "c": 1.0})


def test_gspo_config_validates_its_fields():
    assert GSPOConfig(aggregation="normalize_then_sum").aggregation is RewardAggregation.NORMALIZE_THEN_SUM
    with pytest.raises(ValueError, match="clip_range.*aggregation"):
        GSPOConfig(clip_range=0.0, aggregation="mean")


def test_asymmetric_clip_range_bounds_each_side_separately():
    # GSPO's ε_low / ε_high: a ratio 1 + 1.5ε with A > 0 is clipped by [1 − ε, 1 + ε] but not by [1 − ε, 1 + 2ε]
    eps, old = 1e-2, torch.zeros(1, 2)
    config = GSPOConfig(clip_range=eps, clip_range_high=2 * eps)
    assert config.clip == (eps, 2 * eps) and GSPOConfig(clip_range=eps).clip == (eps, eps)
    for log_s, adv, bounds, clipped in ((1 + 1.5 * eps, 1.0, eps, True), (1 + 1.5 * eps, 1.0, config.clip, False),
                                        (1 - 1.5 * eps, -1.0, config.clip, True)):
        new = torch.full((1, 2), float(torch.log(torch.tensor(log_s))), requires_grad=True)
        out = gspo_objective(new, old, torch.tensor([adv]), bounds)
        out.loss.backward()
        assert float(out.clip_fraction) == float(clipped)
        assert (new.grad.abs().sum() == 0) == clipped
    with pytest.raises(ValueError, match="clip_range_high must be >= 0"):
        GSPOConfig(clip_range_high=-1.0)
