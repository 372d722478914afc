"""Rollout sampler: Flow-GRPO SDE step, Euler outside the window, MixGRPO window, Flux time shift."""

from __future__ import annotations

import math

import pytest
import torch

from multisubject.attention.families import FLUX
from multisubject.train.sde import (
    WindowSchedule,
    euler_step,
    sample_trajectory,
    sde_std,
    sde_step,
    sigma_schedule,
    window_log_probs,
)


def _xv(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, 5, 6, generator=g, dtype=dtype), torch.randn(3, 4, 5, 6, generator=g, dtype=dtype)


def test_log_prob_equals_independent_gaussian_log_density():
    x, v = _xv()
    eps = torch.randn_like(x)
    sigma, sigma_next, a = 0.7, 0.6, 0.7
    step = sde_step(x, v, sigma, sigma_next, a, sigma_max=0.95, noise=eps)
    # independent: the Normal distribution of the spec's mean and std, averaged over elements
    std = a * math.sqrt(sigma / (1 - sigma)) * math.sqrt(sigma - sigma_next)
    dt = sigma_next - sigma
    s2 = (a**2) * sigma / (1 - sigma)
    mean = x * (1 + s2 / (2 * sigma) * dt) + v * (1 + s2 * (1 - sigma) / (2 * sigma)) * dt
    expected = torch.distributions.Normal(mean.double(), std).log_prob(step.sample.double()).flatten(1).mean(1)
    assert step.log_prob is not None and step.log_prob.shape == (3,)
    torch.testing.assert_close(step.log_prob.double(), expected, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(step.sample, mean + std * eps, atol=1e-6, rtol=1e-6)


def test_noise_level_zero_is_the_euler_step():
    x, v = _xv(1)
    step = sde_step(x, v, 0.8, 0.55, noise_level=0.0, sigma_max=0.95, noise=torch.randn_like(x))
    torch.testing.assert_close(step.sample, euler_step(x, v, 0.8, 0.55))
    torch.testing.assert_close(step.sample, x + (0.55 - 0.8) * v)
    assert step.log_prob is None


def test_math_runs_in_fp32_for_bf16_inputs():
    x, v = _xv(2, dtype=torch.bfloat16)
    step = sde_step(x, v, 0.5, 0.4, 0.7, 0.95, noise=torch.randn(x.shape))
    assert step.sample.dtype == torch.float32 and step.log_prob.dtype == torch.float32
    assert euler_step(x, v, 0.5, 0.4).dtype == torch.float32


def test_sigma_one_uses_second_schedule_entry_in_the_std_denominator():
    assert sde_std(1.0, 0.7, sigma_max=0.9) == pytest.approx(0.7 * math.sqrt(1.0 / 0.1))
    assert sde_std(0.5, 0.7, sigma_max=0.9) == pytest.approx(0.7)
    x, v = _xv(3)
    step = sde_step(x, v, 1.0, 0.9, 0.7, sigma_max=0.9, noise=torch.randn_like(x))
    assert torch.isfinite(step.log_prob).all()


def test_scoring_a_sample_gives_the_same_log_prob_as_sampling_it():
    x, v = _xv(4)
    sampled = sde_step(x, v, 0.6, 0.5, 0.7, 0.95, noise=torch.randn_like(x))
    scored = sde_step(x, v, 0.6, 0.5, 0.7, 0.95, sample=sampled.sample)
    torch.testing.assert_close(scored.log_prob, sampled.log_prob)


def test_schedule_matches_flux_time_shift_and_endpoints():
    sigmas = sigma_schedule(16, image_seq_len=1024)
    assert sigmas.shape == (17,) and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert (sigmas[1:] < sigmas[:-1]).all()
    mu = FLUX.time_shift.mu(1024)
    assert mu == pytest.approx(0.5 + (1.15 - 0.5) / 3840 * 768)  # ≈ 0.63 at 512 px (spec §8.1)
    t = 0.5
    assert float(sigmas[8]) == pytest.approx(math.exp(mu) / (math.exp(mu) + (1 / t - 1)), rel=1e-6)
    torch.testing.assert_close(sigma_schedule(4), torch.linspace(1, 0, 5))


def test_window_follows_mixgrpo_progressive_schedule():
    w = WindowSchedule(num_steps=16, size=2, shift_interval=50, stride=1)
    assert w.steps(0) == (0, 1) and w.steps(49) == (0, 1) and w.steps(50) == (1, 2)
    assert w.last_start == 13  # 14 positions x 50 iterations = 700 per sweep (spec §5.1)
    assert w.start(13 * 50) == 13 and w.start(10_000) == 13
    r = WindowSchedule(num_steps=16, size=2, shift_interval=50, stride=1, roll_back=True)
    assert r.start(14 * 50) == 0 and r.start(15 * 50) == 1
    assert WindowSchedule(num_steps=8, size=3, shift_interval=2, stride=2).steps(4) == (4, 5, 6)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(num_steps=16, size=16), "window size"),
        (dict(size=0), "window size"),
        (dict(shift_interval=0), "shift_interval"),
        (dict(stride=-1), "stride"),
    ],
)
def test_bad_window_config_names_the_field(kwargs, words):
    with pytest.raises(ValueError, match=words):
        WindowSchedule(**kwargs)


class _LinearVelocity(torch.nn.Module):
    """Tiny policy: v = W x + b·sigma (channel mixing), and it records whether grad mode was on per call."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.mix = torch.nn.Conv2d(channels, channels, 1)
        self.grad_modes: list[bool] = []

    def forward(self, x, sigma):
        self.grad_modes.append(torch.is_grad_enabled())
        return self.mix(x) * sigma.view(-1, 1, 1, 1)


def test_no_grad_is_recorded_outside_the_window():
    policy = _LinearVelocity()
    sigmas = sigma_schedule(6)
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    traj = sample_trajectory(policy, noise, sigmas, window=(2, 3), noise_level=0.7, track_grad=True)
    assert policy.grad_modes == [False, False, True, True, False, False]
    assert traj.log_probs.shape == (2, 2) and traj.log_probs.requires_grad
    assert not traj.final.requires_grad and not traj.latents.requires_grad
    policy.grad_modes.clear()
    traj = sample_trajectory(policy, noise, sigmas, window=(2, 3), noise_level=0.7)
    assert policy.grad_modes == [False] * 6 and not traj.log_probs.requires_grad


def test_recomputed_window_log_probs_equal_the_rollout_ones():
    policy = _LinearVelocity()
    sigmas = sigma_schedule(5, image_seq_len=16)
    traj = sample_trajectory(
        policy, torch.randn(3, 4, 2, 2), sigmas, window=(1, 2), noise_level=0.7, generator=torch.Generator().manual_seed(1)
    )
    recomputed = window_log_probs(policy, traj, noise_level=0.7)
    torch.testing.assert_close(recomputed, traj.log_probs)
    assert recomputed.requires_grad


def test_same_generator_seed_gives_the_same_trajectory():
    policy = _LinearVelocity()
    sigmas = sigma_schedule(4)
    noise = torch.randn(2, 4, 2, 2)
    a = sample_trajectory(policy, noise, sigmas, (0, 1), 0.7, generator=torch.Generator().manual_seed(5))
    b = sample_trajectory(policy, noise, sigmas, (0, 1), 0.7, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a.final, b.final)
    torch.testing.assert_close(a.log_probs, b.log_probs)


def test_bad_window_indices_raise():
    with pytest.raises(ValueError, match="window steps"):
        sample_trajectory(_LinearVelocity(), torch.randn(1, 4, 2, 2), sigma_schedule(4), (3, 4), 0.7)
