"""Rollouts with log-probabilities: Flow-GRPO's SDE step inside a MixGRPO sliding window, Euler outside it.

The sampler integrates the rectified-flow ODE ``dx = v dt`` from sigma = 1 (noise) to sigma = 0 (image) on the
same time-shifted schedule as Flux inference. Inside the window it takes Euler-Maruyama steps of the SDE with the
same marginals (Flow-GRPO, ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``), so each window step is a
Gaussian with a tractable log-density; outside the window it takes plain Euler steps under ``no_grad``.
See multicrafter.md §5.1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..attention.families import FLUX

# (x (B, C, h, w), sigma (B,)) -> v (B, C, h, w); the policy with its conditions (text, references) bound.
VelocityFn = Callable[[Tensor, Tensor], Tensor]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


# schedule


def time_shift(mu: float, t: Tensor) -> Tensor:
    """Flux's time shift ``e^mu / (e^mu + (1/t - 1))`` with the endpoints kept at exactly 0 and 1.

    Shapes:
        t: any shape, values in [0, 1]
        returns the same shape
    """
    t = t.double()
    shifted = math.exp(mu) / (math.exp(mu) + (1.0 / t.clamp_min(1e-12) - 1.0))
    return torch.where(t <= 0, torch.zeros_like(t), shifted)


def sigma_schedule(num_steps: int, image_seq_len: int | None = None, mu: float | None = None) -> Tensor:
    """The K + 1 sigmas of a K-step Flux sampling run: ``linspace(1, 0, K + 1)`` time-shifted as at inference.

    ``mu`` defaults to ``FLUX.time_shift.mu(image_seq_len)`` (``attention.families``); give neither to get the unshifted linear schedule.

    Shapes:
        returns (K + 1,) float32, decreasing from 1 to 0
    """
    if num_steps < 2:
        raise ValueError(f"a rollout needs at least 2 denoising steps, got num_steps={num_steps}")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    if mu is None and image_seq_len is not None:
        if image_seq_len <= 0:
            raise ValueError(f"image_seq_len must be a positive token count, got {image_seq_len}")
        mu = FLUX.time_shift.mu(image_seq_len)
    return (t if mu is None else time_shift(mu, t)).float()


# window


@dataclass(frozen=True)
class WindowSchedule:
    """MixGRPO's progressive sliding window over the denoising steps (``sample_strategy="progressive"``).

    The window covers ``size`` consecutive steps among the trainable ones (0 … K-2: the last step, to sigma = 0,
    is never trained). It starts at step 0 and moves ``stride`` steps every ``shift_interval`` iterations; at the
    end it stays on the last position, or starts over when ``roll_back`` is set.
    """

    num_steps: int = 16  # K, denoising steps per rollout (paper: 16)
    size: int = 2  # w, SDE steps per rollout that are optimized (paper: 2)
    shift_interval: int = 50  # tau, iterations before the window moves (paper: 50)
    stride: int = 1  # s, steps the window moves each time (paper: 1)
    roll_back: bool = False  # after the last position start again at step 0 (off: stay at the end)

    def __post_init__(self) -> None:
        problems = []
        if self.num_steps < 2:
            problems.append(f"num_steps must be >= 2, got {self.num_steps}")
        if not 1 <= self.size <= self.num_steps - 1:
            problems.append(
                f"window size must be in [1, num_steps - 1] = [1, {self.num_steps - 1}] (the last step is never "
                f"trained), got {self.size}"
            )
        if self.shift_interval < 1:
            problems.append(f"shift_interval must be >= 1 iteration, got {self.shift_interval}")
        if self.stride < 0:
            problems.append(f"stride must be >= 0 steps, got {self.stride}")
        if problems:
            raise ValueError("invalid window schedule: " + "; ".join(problems))

    @property
    def last_start(self) -> int:
        """The last window start: trainable steps are 0 … K-2, so starts run 0 … K-1-w."""
        return self.num_steps - 1 - self.size

    def start(self, iteration: int) -> int:
        """First window step at a training iteration (0-based)."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        start = (iteration // self.shift_interval) * self.stride
        if self.roll_back:
            return start % (self.last_start + 1)
        return min(start, self.last_start)

    def steps(self, iteration: int) -> tuple[int, ...]:
        """The step indices inside the window at this iteration."""
        start = self.start(iteration)
        return tuple(range(start, start + self.size))


# steps


@dataclass(frozen=True)
class SDEStep:
    """One step of the sampler. ``log_prob`` is None for a deterministic step (noise level 0 or Euler).

    Shapes:
        sample, mean: (B, C, h, w) fp32 (fp64 when the inputs are fp64)
        std: 0-d, the standard deviation of ``sample`` around ``mean``
        log_prob: (B,) per-element mean log-density of ``sample``
    """

    sample: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor | None


def _math_dtype(x: Tensor) -> torch.dtype:
    # fp32 at least: bf16 loses the tiny per-step differences the log-prob ratio is made of.
    return torch.promote_types(x.dtype, torch.float32)


def sde_std(sigma: float, noise_level: float, sigma_max: float) -> float:
    """Flow-GRPO's ``std_t = a·sqrt(σ / (1 − σ))``; at σ = 1 the denominator uses ``sigma_max`` (2nd schedule entry)."""
    denominator_sigma = sigma_max if sigma >= 1.0 else sigma
    return noise_level * math.sqrt(sigma / (1.0 - denominator_sigma))


def gaussian_log_prob(sample: Tensor, mean: Tensor, std: Tensor | float) -> Tensor:
    """Per-element mean of the Gaussian log-density ``log N(sample; mean, std²)``, one value per batch item.

    Shapes:
        sample, mean: (B, ...)
        returns (B,)
    """
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    log_density = -((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return log_density.flatten(1).mean(1)


def sde_step(
    x: Tensor,
    v: Tensor,
    sigma: float,
    sigma_next: float,
    noise_level: float,
    sigma_max: float,
    noise: Tensor | None = None,
    sample: Tensor | None = None,
) -> SDEStep:
    """Flow-GRPO SDE step from ``sigma`` to ``sigma_next`` with the log-prob of the reached point (fp32 math).

    ``μ = x(1 + std²/(2σ)·dt) + v(1 + std²(1−σ)/(2σ))·dt`` and ``x' = μ + std·sqrt(−dt)·ε``, ``dt = σ' − σ``.
    Give ``noise`` (ε) to sample, or ``sample`` (x') to score an already sampled point (the update's
    recomputation); with neither the step returns the mean. ``noise_level = 0`` is the Euler step.

    Shapes:
        x, v, noise, sample: (B, C, h, w)
        returns SDEStep (see there)
    """
    if not 0.0 < sigma <= 1.0 or not 0.0 <= sigma_next < sigma:
        raise ValueError(f"expected 1 >= sigma > sigma_next >= 0, got sigma={sigma}, sigma_next={sigma_next}")
    if noise is not None and sample is not None:
        raise ValueError("give either noise (to sample) or sample (to score it), not both")
    dtype = _math_dtype(x)
    x, v = x.to(dtype), v.to(dtype)
    dt = sigma_next - sigma
    std_t = sde_std(sigma, noise_level, sigma_max)
    mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    step_std = torch.tensor(std_t * math.sqrt(-dt), dtype=dtype, device=x.device)
    if sample is None:
        sample = mean if noise is None else mean + step_std * noise.to(dtype)
    if std_t == 0.0:
        return SDEStep(sample=sample, mean=mean, std=step_std, log_prob=None)
    # the sampled point is data, not a function of θ: only the mean carries gradient (as in Flow-GRPO)
    log_prob = gaussian_log_prob(sample.detach().to(dtype), mean, step_std)
    return SDEStep(sample=sample, mean=mean, std=step_std, log_prob=log_prob)


def euler_step(x: Tensor, v: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """Deterministic ODE step ``x' = x + (σ' − σ)·v`` (fp32 math).

    Shapes:
        x, v: (B, C, h, w); returns (B, C, h, w)
    """
    dtype = _math_dtype(x)
    return x.to(dtype) + (sigma_next - sigma) * v.to(dtype)


# trajectories


@dataclass(frozen=True)
class Trajectory:
    """A batch of rollouts and what the update needs from them.

    Shapes:
        final: (B, C, h, w) the denoised latent (sigma = 0)
        latents: (B, W, C, h, w) x_t entering each window step
        next_latents: (B, W, C, h, w) x_{t+1} the SDE step reached
        log_probs: (B, W) log π_old(x_{t+1} | x_t) of each window step
        sigmas: (K + 1,)
    """

    final: Tensor
    latents: Tensor
    next_latents: Tensor
    log_probs: Tensor
    window: tuple[int, ...]
    sigmas: Tensor


def _sigma_batch(sigma: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), sigma, dtype=_math_dtype(x), device=x.device)


def sample_trajectory(
    velocity: VelocityFn,
    noise: Tensor,
    sigmas: Tensor,
    window: Sequence[int],
    noise_level: float,
    generator: torch.Generator | None = None,
    track_grad: bool = False,
    step_noise: Tensor | None = None,
) -> Trajectory:
    """Denoise ``noise`` along ``sigmas``: SDE steps (with log-probs) at the ``window`` step indices, Euler elsewhere.

    Steps outside the window always run under ``no_grad``; window steps record gradients only with
    ``track_grad`` (the rollout itself never needs them: the update recomputes them with ``window_log_probs``).
    The SDE noise ε of the window steps is ``step_noise`` when given, else drawn from ``generator``.

    Shapes:
        noise: (B, C, h, w) the initial latent at sigma = 1
        sigmas: (K + 1,) from ``sigma_schedule``
        step_noise: (W, B, C, h, w), ε of each window step in increasing step order
        returns Trajectory with W = len(window)
    """
    num_steps = sigmas.numel() - 1
    window = tuple(sorted(window))  # steps are visited in increasing order
    if not window or any(not 0 <= k < num_steps for k in window) or len(set(window)) != len(window):
        raise ValueError(f"window steps must be distinct indices in [0, {num_steps - 1}], got {window}")
    if noise_level <= 0:
        raise ValueError(f"the SDE window needs noise_level > 0 for log-probs, got {noise_level}")
    if step_noise is not None and tuple(step_noise.shape) != (len(window), *noise.shape):
        raise ValueError(f"step_noise must be (W, B, C, h, w) = {(len(window), *noise.shape)}, got {tuple(step_noise.shape)}")
    sigma_values = [float(s) for s in sigmas]
    x = noise.to(_math_dtype(noise))
    latents, next_latents, log_probs = [], [], []
    for k in range(num_steps):
        sigma, sigma_next = sigma_values[k], sigma_values[k + 1]
        if k in window:
            with torch.set_grad_enabled(track_grad):
                v = velocity(x, _sigma_batch(sigma, x))
                if step_noise is None:
                    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                else:
                    eps = step_noise[len(latents)].to(x)
                step = sde_step(x, v, sigma, sigma_next, noise_level, sigma_values[1], noise=eps)
            latents.append(x.detach())
            next_latents.append(step.sample.detach())
            log_probs.append(step.log_prob)
            x = step.sample.detach()
        else:
            with torch.no_grad():
                x = euler_step(x, velocity(x, _sigma_batch(sigma, x)), sigma, sigma_next)
    return Trajectory(
        final=x,
        latents=torch.stack(latents, 1),
        next_latents=torch.stack(next_latents, 1),
        log_probs=torch.stack(log_probs, 1),
        window=window,
        sigmas=sigmas,
    )


def window_log_probs(velocity: VelocityFn, trajectory: Trajectory, noise_level: float) -> Tensor:
    """Log-probs of the recorded window transitions under the current policy, with gradients (the update's forward).

    Shapes:
        returns (B, W)
    """
    sigma_values = [float(s) for s in trajectory.sigmas]
    out = []
    for i, k in enumerate(trajectory.window):
        x = trajectory.latents[:, i]
        v = velocity(x, _sigma_batch(sigma_values[k], x))
        step = sde_step(
            x, v, sigma_values[k], sigma_values[k + 1], noise_level, sigma_values[1], sample=trajectory.next_latents[:, i]
        )
        assert step.log_prob is not None
        out.append(step.log_prob)
    return torch.stack(out, 1)
