"""The IPPO loop on a toy policy: it learns, learning rate 0 does not, and its pieces keep their contracts."""

from __future__ import annotations

import pytest
import torch
from ippo_toy import ToyPolicy, box_brightness, toy_group

from multisubject.attention.subjects import Subjects
from multisubject.train.gspo import GSPOConfig, gspo_objective
from multisubject.train.ippo import PromptGroup, RolloutConfig, ippo_iteration, minibatch_indices, rollout, update
from multisubject.train.sde import WindowSchedule, sigma_schedule, window_log_probs

GROUP = 8
STEPS = 6


def _gens(count: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(1000 * seed + k) for k in range(count)]


def _train(lr: float, iterations: int = 30, gspo: GSPOConfig = GSPOConfig(clip_range=1e-2), log: list | None = None,
           policy: ToyPolicy | None = None) -> list[float]:
    """Mean reward per iteration; each iteration's GSPO statistics go to ``log`` when given."""
    policy = policy or ToyPolicy(seed=0)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    config = RolloutConfig(group_size=GROUP, noise_level=0.7)
    window = WindowSchedule(num_steps=STEPS, size=2, shift_interval=10)
    sigmas = sigma_schedule(STEPS)
    means = []
    for it in range(iterations):
        groups = [toy_group(4 * it + k) for k in range(4)]
        out = ippo_iteration(policy, params, optimizer, groups, {"brightness": box_brightness}, {"brightness": 1.0},
                             config, gspo, sigmas, window.steps(it), _gens(4, it), micro_batch=16,
                             grad_clip=1.0)
        means.append(float(out.rewards.scores["brightness"].mean()))
        if log is not None:
            log.append(out.loss.stats())
    return means


def test_it_learns_and_learning_rate_zero_does_not():
    # measured (seeded, CPU, 4 GSPO mini-batches): lr 3e-3 goes 0.509 -> 0.997 (mean of the last 5; 0.970 with one
    # step per rollout batch); lr 0 stays within 0.504-0.521
    learned, frozen = _train(3e-3), _train(0.0)
    print("lr 3e-3:", [round(m, 3) for m in learned], "lr 0:", [round(m, 3) for m in frozen])
    assert learned[0] == frozen[0]  # same seeds: the first rollout is the same
    start = sum(frozen) / len(frozen)  # the untrained policy's mean reward
    assert sum(learned[-5:]) / 5 > start + 0.2
    assert abs(sum(frozen[-5:]) / 5 - start) < 0.03


def test_update_in_micro_batches_equals_the_full_batch_step():
    groups = [toy_group(0), toy_group(1)]
    config = RolloutConfig(group_size=4)
    sigmas, window = sigma_schedule(4), (1, 2)
    results = []
    for micro in (8, 1):  # 2 mini-batches of 4: one backward each, or four
        policy = ToyPolicy(seed=1)
        with torch.no_grad():
            policy.adapter[2].weight.normal_(0, 0.05)
        params = [p for p in policy.parameters() if p.requires_grad]
        batch = rollout(policy, groups, config, sigmas, window, _gens(2))
        adv = torch.linspace(-1, 1, 8)
        optimizer = torch.optim.SGD(params, lr=1.0)
        update(policy, params, optimizer, batch, adv, 0.7, GSPOConfig(clip_range=0.1, minibatches=2), micro_batch=micro,
               shuffle=_gens(2, seed=7))
        results.append(torch.cat([p.detach().flatten() for p in params]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-7)


def test_rollout_policy_ratio_is_one_at_the_update():
    policy = ToyPolicy(seed=2)
    params = [p for p in policy.parameters() if p.requires_grad]
    batch = rollout(policy, [toy_group(0)], RolloutConfig(group_size=4), sigma_schedule(4), (0, 1),
                    _gens(1))
    stats = update(policy, params, torch.optim.SGD(params, lr=0.0), batch, torch.tensor([1.0, -1.0, 0.5, -0.5]), 0.7,
                   GSPOConfig(), micro_batch=4)
    assert float(stats.ratio_min) == pytest.approx(1.0, abs=1e-6) and float(stats.ratio_max) == pytest.approx(1.0, abs=1e-6)
    assert float(stats.clip_fraction) == 0.0


def test_constant_rewards_take_no_optimizer_step():
    policy = ToyPolicy(seed=3)
    params = [p for p in policy.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)  # weight decay would move them on any step
    out = ippo_iteration(policy, params, optimizer, [toy_group(0)], {"c": lambda i: torch.ones(len(i.prompts))},
                         {"c": 1.0}, RolloutConfig(group_size=4), GSPOConfig(), sigma_schedule(4), (0, 1),
                         _gens(1), micro_batch=4)
    assert out.loss is None and torch.equal(out.advantages, torch.zeros(4))
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert set(out.seconds) == {"rollout", "reward", "update"}


def test_same_noise_per_group_starts_a_group_from_one_latent():
    policy = ToyPolicy(seed=4)
    batch = rollout(policy, [toy_group(0), toy_group(1)], RolloutConfig(group_size=3, same_noise_per_group=True),
                    sigma_schedule(4), (2,), _gens(2))
    first = batch.trajectory.latents[:, 0]  # x entering step 2, before any SDE noise: deterministic per start
    torch.testing.assert_close(first[0], first[2])
    assert not torch.allclose(first[0], first[3])


def test_prompt_without_references_is_rejected():
    with pytest.raises(ValueError, match="no reference subjects"):
        PromptGroup(prompt="two friends", subjects=Subjects(()))


def test_group_size_one_is_rejected():
    with pytest.raises(ValueError, match="undefined for a group of 1"):
        RolloutConfig(group_size=1)


def test_rollout_grid_has_one_row_per_group_and_one_column_per_image():
    from multisubject.train.rollout_preview import CAPTION_PX, render_rollout_grid

    images = torch.zeros(6, 20, 30, 3)
    images[4] = 1.0  # group 1, image 1 is white
    grid = render_rollout_grid(images, {"id": torch.rand(6), "aes": torch.rand(6)}, torch.randn(6), 3, ["a", "b"])
    row = CAPTION_PX + 2 + 20 + 3 * CAPTION_PX
    assert grid.size == (3 * 30, 2 * row)
    assert grid.getpixel((30 + 15, row + CAPTION_PX + 2 + 10)) == (255, 255, 255)
    assert grid.getpixel((15, CAPTION_PX + 2 + 10)) == (0, 0, 0)
    with pytest.raises(ValueError, match="whole groups"):
        render_rollout_grid(images, {}, torch.zeros(6), 4)


def test_a_group_samples_the_same_images_alone_or_batched_with_others():
    policy = ToyPolicy(seed=5)
    config, sigmas = RolloutConfig(group_size=3), sigma_schedule(4)
    both = rollout(policy, [toy_group(0), toy_group(1)], config, sigmas, (1, 2), _gens(2))
    second = rollout(policy, [toy_group(1)], config, sigmas, (1, 2), _gens(2)[1:])
    torch.testing.assert_close(both.images[3:], second.images)
    torch.testing.assert_close(both.trajectory.log_probs[3:], second.trajectory.log_probs)


def test_non_finite_gradient_stops_the_update_with_a_message():
    policy = ToyPolicy(seed=6)
    params = [p for p in policy.parameters() if p.requires_grad]
    batch = rollout(policy, [toy_group(0)], RolloutConfig(group_size=4), sigma_schedule(4), (0, 1), _gens(1))
    adv = torch.tensor([float("inf"), -1.0, 0.5, -0.5])
    with pytest.raises(RuntimeError, match="non-finite gradient norm"):
        update(policy, params, torch.optim.SGD(params, lr=0.1), batch, adv, 0.7, GSPOConfig(clip_range=0.5), micro_batch=4)


# GSPO's mini-batches (multicrafter.md §5.3): several optimizer steps per rollout batch, ratios against the rollout


def test_one_minibatch_reproduces_the_former_single_step_update():
    # recorded on main before mini-batches existed (one optimizer step per rollout batch), same seeds and settings
    log: list[dict] = []
    policy = ToyPolicy(seed=0)
    means = _train(3e-3, iterations=4, gspo=GSPOConfig(clip_range=1e-2, minibatches=1), log=log, policy=policy)
    params = torch.cat([p.detach().double().flatten() for p in policy.parameters() if p.requires_grad])
    torch.testing.assert_close(means, [0.5092052817344666, 0.5159650444984436, 0.5094422101974487, 0.5147421360015869],
                               rtol=1e-6, atol=0)
    torch.testing.assert_close([s["grad_norm"] for s in log],
                               [0.008094011805951595, 0.006633544806391001, 0.006102106533944607, 0.009164057672023773],
                               rtol=1e-4, atol=0)
    torch.testing.assert_close([float(params.sum()), float(params.abs().sum())],
                               [0.38028410423430614, 61.821186251036124], rtol=1e-4, atol=0)
    assert all(s["clip_fraction"] == 0.0 and s["ratio_min"] == s["ratio_max"] == 1.0 for s in log)
    assert not any(k.startswith("minibatch_") for k in log[0])  # one mini-batch: the same scalars as before


def _one_update(minibatches: int, clip_range: float = 1e-4, lr: float = 3e-3):
    policy = ToyPolicy(seed=0)
    params = [p for p in policy.parameters() if p.requires_grad]
    groups = [toy_group(k) for k in range(4)]
    batch = rollout(policy, groups, RolloutConfig(group_size=GROUP), sigma_schedule(STEPS), (1, 2), _gens(4))
    adv = torch.randn(4 * GROUP, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gspo = GSPOConfig(clip_range=clip_range, minibatches=minibatches)
    stats = update(policy, params, optimizer, batch, adv, 0.7, gspo, micro_batch=16, shuffle=_gens(4))
    return policy, batch, adv, stats


def test_later_minibatches_see_ratios_off_one_and_the_clip_acts():
    *_, stats = _one_update(minibatches=4)
    parts = stats.minibatches
    assert len(parts) == 4
    # the first step is taken at θ = θ_old: ratio exactly 1; each later one at the parameters the earlier steps left
    assert float(parts[0].ratio_min) == float(parts[0].ratio_max) == 1.0 and float(parts[0].clip_fraction) == 0.0
    for part in parts[1:]:
        assert max(abs(float(part.ratio_min) - 1), abs(float(part.ratio_max) - 1)) > 1e-4
    assert max(float(p.clip_fraction) for p in parts[1:]) > 0  # at β = 1e-4 the clip acts
    logged = stats.stats()
    assert logged["minibatch_1/ratio_max"] == 1.0
    assert logged["minibatch_4/clip_fraction"] == float(parts[3].clip_fraction)
    # the ablation: one step per rollout batch never leaves ratio 1, so the clip never acts
    *_, single = _one_update(minibatches=1)
    assert float(single.ratio_min) == float(single.ratio_max) == 1.0 and float(single.clip_fraction) == 0.0


def _grpo_per_step_loss(log_probs, old_log_probs, adv, clip_range):
    """Flow-GRPO's objective: a clipped ratio per denoising step (token), then the mean over steps."""
    ratio = torch.exp(log_probs - old_log_probs)  # (B, W)
    a = adv[:, None]
    return -torch.minimum(ratio * a, ratio.clamp(1 - clip_range, 1 + clip_range) * a).mean()


def _gradients(policy, batch, adv, clip_range):
    params = [p for p in policy.parameters() if p.requires_grad]
    out = []
    for loss_of in (lambda lp: gspo_objective(lp, batch.trajectory.log_probs, adv, clip_range).loss,
                    lambda lp: _grpo_per_step_loss(lp, batch.trajectory.log_probs, adv, clip_range)):
        log_probs = window_log_probs(lambda x, s: policy.velocity(x, s, batch.cond), batch.trajectory, 0.7)
        out.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss_of(log_probs), params)]))
    return out


def test_gspo_and_per_step_grpo_gradients_differ_once_the_policy_has_moved():
    policy, batch, adv, _ = _one_update(minibatches=4)
    gspo, grpo = _gradients(policy, batch, adv, 1e-4)
    assert (gspo - grpo).norm() > 0.1 * gspo.norm()
    # at θ = θ_old (the only point a single step per rollout ever sees) they are the same gradient
    gspo_old, grpo_old = _gradients(ToyPolicy(seed=0), batch, adv, 1e-4)
    torch.testing.assert_close(gspo_old, grpo_old, rtol=1e-5, atol=1e-9)


def test_minibatches_deal_every_group_into_every_part():
    parts = minibatch_indices(num_groups=3, group_size=8, minibatches=4, generators=_gens(3))
    assert [len(p) for p in parts] == [6, 6, 6, 6]
    assert sorted(torch.cat(parts).tolist()) == list(range(24))
    assert all(sorted((p // 8).tolist()) == [0, 0, 1, 1, 2, 2] for p in parts)
    # a group's share of each part depends only on its own generator: split over two ranks, the same parts
    alone = minibatch_indices(num_groups=1, group_size=8, minibatches=4, generators=_gens(3)[2:])
    assert [sorted(p[p >= 16].tolist()) for p in parts] == [sorted((a + 16).tolist()) for a in alone]
    assert torch.equal(minibatch_indices(2, 8, 1)[0], torch.arange(16))


def test_more_minibatches_than_images_per_group_is_refused_before_sampling():
    with pytest.raises(ValueError, match="gspo.minibatches = 5 needs 1 <= minibatches <= sampler.rollout.group_size"):
        ippo_iteration(ToyPolicy(seed=0), [], torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0),
                       [toy_group(0)], {}, {}, RolloutConfig(group_size=4), GSPOConfig(minibatches=5),
                       sigma_schedule(4), (0, 1), _gens(1), micro_batch=4)
    with pytest.raises(ValueError, match="minibatches must be >= 1"):
        GSPOConfig(minibatches=0)
