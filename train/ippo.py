"""IPPO (MultiCrafter stage 2): one iteration = rollout -> rewards -> advantages -> GSPO update (mini-batch steps).

Each step of the algorithm box is one small function below; ``ippo_iteration`` calls them in order and the
trainer (``ippo_trainer.train_ippo``) only adds distribution, logging and checkpoints around it. The model is reached through the
``Policy`` protocol, so the same loop drives the ComfyUI Flux backend and the toy models of the tests.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..attention.layout import Layout
from ..attention.subjects import Subjects
from .gspo import GSPOConfig, GSPOLoss, gspo_objective, reward_advantages
from .rewards import Reward, RewardInputs, RewardResult, compute_rewards, repeat_per_image
from .sde import Trajectory, sample_trajectory, window_log_probs


@dataclass(frozen=True)
class PromptGroup:
    """One RL prompt: text plus the reference subjects (and an optional layout the rewards may use).

    ``conditioning`` is what the policy needs to run this prompt (e.g. cached text embeddings and reference
    latents); the loop passes it through untouched.
    """

    prompt: str
    subjects: Subjects
    layout: Layout | None = None
    conditioning: Any = None

    def __post_init__(self) -> None:
        if len(self.subjects) == 0:
            raise ValueError(
                f"prompt '{self.prompt}' has no reference subjects; IPPO needs the references of every prompt "
                "(the identity reward and the model's reference tokens use them). Add references or drop the prompt"
            )
        if self.layout is not None:
            self.layout.check_subject_count(len(self.subjects))


class Policy(Protocol):
    """What the IPPO loop needs from a model backend (an ``nn.Module``: train()/eval() toggle its mode)."""

    def condition(self, groups: Sequence[PromptGroup], group_size: int) -> Any:
        """Batch the groups' conditioning, each repeated ``group_size`` times (B = len(groups) · G images)."""

    def velocity(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        """Shapes: x (B, C, h, w), sigma (B,) -> v (B, C, h, w)."""

    def select(self, cond: Any, index: Tensor) -> Any:
        """The conditioning of a subset of the batch (for micro-batched updates)."""

    def latent_shape(self, group: PromptGroup) -> tuple[int, int, int]:
        """(C, h, w) of the latent sampled for this prompt."""

    def decode(self, latents: Tensor) -> Tensor:
        """Shapes: latents (B, C, h, w) -> images (B, H, W, 3) float RGB in [0, 1]."""


@dataclass(frozen=True)
class RolloutConfig:
    """How rollouts are sampled (defaults: multicrafter.md §5.1)."""

    group_size: int = 12  # G: images per prompt group (MixGRPO FLUX: 12); advantages are normalized within it
    noise_level: float = 0.7  # a: SDE noise level inside the window (Flow-GRPO default)
    same_noise_per_group: bool = False  # start every image of a group from the same noise (init_same_noise)

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(
                f"rollout.group_size must be >= 2: advantages are normalized within a prompt group and are "
                f"undefined for a group of {self.group_size}"
            )
        if not self.noise_level > 0:
            raise ValueError(f"rollout.noise_level must be > 0 (the SDE window needs noise), got {self.noise_level}")


# the four steps of one iteration


@dataclass(frozen=True)
class Rollout:
    """Shapes: trajectory over B = len(groups) · G images; images (B, H, W, 3)."""

    groups: tuple[PromptGroup, ...]
    cond: Any
    trajectory: Trajectory
    images: Tensor


def rollout(
    policy: Policy,
    groups: Sequence[PromptGroup],
    config: RolloutConfig,
    sigmas: Tensor,
    window: Sequence[int],
    generators: Sequence[torch.Generator],
    device: torch.device | str = "cpu",
) -> Rollout:
    """Sample G images per prompt group with the policy in eval mode, recording the window steps' log-probs.

    Group g's randomness (initial noise, SDE noise) comes from ``generators[g]`` alone, so a group samples the same
    images however the groups are split over ranks.
    """
    shapes = {policy.latent_shape(g) for g in groups}
    if len(shapes) != 1:
        raise ValueError(f"prompt groups of one rollout batch must share a latent size, got {sorted(shapes)}")
    if len(generators) != len(groups):
        raise ValueError(f"expected one generator per prompt group ({len(groups)}), got {len(generators)}")
    shape, size, steps = shapes.pop(), config.group_size, len(window)
    noise, step_noise = [], []
    for gen in generators:
        first = torch.randn((1 if config.same_noise_per_group else size, *shape), generator=gen)
        noise.append(first.expand(size, *shape))  # (G, C, h, w)
        step_noise.append(torch.randn((steps, size, *shape), generator=gen))  # (W, G, C, h, w)
    noise, step_noise = torch.cat(noise), torch.cat(step_noise, 1)  # (B, C, h, w), (W, B, C, h, w)
    cond = policy.condition(groups, config.group_size)
    was_training = policy.training
    policy.eval()
    try:
        with torch.no_grad():
            trajectory = sample_trajectory(
                lambda x, s: policy.velocity(x, s, cond), noise.to(device), sigmas, window, config.noise_level,
                step_noise=step_noise.to(device),
            )
            images = policy.decode(trajectory.final)
    finally:
        policy.train(was_training)
    return Rollout(tuple(groups), cond, trajectory, images)


def merge_rollouts(policy: Policy, parts: Sequence[Rollout], group_size: int) -> Rollout:
    """One rollout batch from rollouts of single groups (same window and schedule), groups in order."""
    groups = tuple(g for part in parts for g in part.groups)
    trajectories = [part.trajectory for part in parts]
    trajectory = Trajectory(
        final=torch.cat([t.final for t in trajectories]),
        latents=torch.cat([t.latents for t in trajectories]),
        next_latents=torch.cat([t.next_latents for t in trajectories]),
        log_probs=torch.cat([t.log_probs for t in trajectories]),
        window=trajectories[0].window,
        sigmas=trajectories[0].sigmas,
    )
    return Rollout(groups, policy.condition(groups, group_size), trajectory, torch.cat([p.images for p in parts]))


class GroupScorer(Protocol):
    """Rewards computed elsewhere (``reward_ranks``): groups are submitted one by one as soon as they are decoded."""

    def submit(self, position: int, images: Tensor) -> None:
        """Images (G, H, W, 3) of the ``position``-th prompt group of this rank's batch."""

    def collect(self) -> RewardResult:
        """Scores of every submitted group, in submission order."""


def score(rollout: Rollout, rewards: dict[str, Reward], group_size: int) -> RewardResult:
    """Every reward on the rollout's images, one prompt group's entries repeated for each of its images."""
    inputs = RewardInputs(
        images=rollout.images,
        prompts=repeat_per_image([g.prompt for g in rollout.groups], group_size),
        subjects=repeat_per_image([g.subjects for g in rollout.groups], group_size),
        layouts=repeat_per_image([g.layout for g in rollout.groups], group_size),
    )
    return compute_rewards(rewards, inputs)


def advantages(result: RewardResult, weights: dict[str, float], group_size: int, gspo: GSPOConfig) -> Tensor:
    """Group-normalized advantages (B,) from the per-reward scores, aggregated as configured."""
    return reward_advantages(result.scores, weights, group_size, gspo.aggregation, gspo.advantage_clamp or None)


def select_trajectory(trajectory: Trajectory, index: Tensor) -> Trajectory:
    """The trajectories at ``index`` (B' of B)."""
    return Trajectory(
        final=trajectory.final[index],
        latents=trajectory.latents[index],
        next_latents=trajectory.next_latents[index],
        log_probs=trajectory.log_probs[index],
        window=trajectory.window,
        sigmas=trajectory.sigmas,
    )


GradientSync = Callable[[list[nn.Parameter]], None]


def check_minibatches(group_size: int, minibatches: int) -> None:
    """Refuse more mini-batches than images per prompt group (every mini-batch takes part of every group)."""
    if not 1 <= minibatches <= group_size:
        raise ValueError(f"gspo.minibatches = {minibatches} needs 1 <= minibatches <= sampler.rollout.group_size "
                         f"({group_size}): each mini-batch takes a share of every prompt group; lower gspo.minibatches")


def minibatch_indices(num_groups: int, group_size: int, minibatches: int,
                      generators: Sequence[torch.Generator] | None = None) -> list[Tensor]:
    """The rollout batch's trajectory indices shuffled into ``minibatches`` parts, stratified by prompt group: group
    g's images are permuted with ``generators[g]`` and dealt into the parts (sizes differ by at most one), so the
    parts do not depend on how groups are split over ranks and every rank's part k has the same size. With one
    mini-batch: the whole batch in order.

    Shapes:
        returns ``minibatches`` long tensors, together a permutation of ``range(num_groups · group_size)``
    """
    check_minibatches(group_size, minibatches)
    if minibatches == 1:
        return [torch.arange(num_groups * group_size)]
    if generators is not None and len(generators) != num_groups:
        raise ValueError(f"expected one generator per prompt group ({num_groups}), got {len(generators)}")
    parts: list[list[Tensor]] = [[] for _ in range(minibatches)]
    for g in range(num_groups):
        order = torch.randperm(group_size, generator=None if generators is None else generators[g]) + g * group_size
        for k, chunk in enumerate(order.tensor_split(minibatches)):
            parts[k].append(chunk)
    return [torch.cat(chunks) for chunks in parts]


def update(
    policy: Policy,
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    adv: Tensor,
    noise_level: float,
    gspo: GSPOConfig,
    micro_batch: int,
    grad_clip: float = 0.0,
    sync_gradients: GradientSync | None = None,
    shuffle: Sequence[torch.Generator] | None = None,
) -> GSPOLoss:
    """GSPO's update: the rollout batch is shuffled (``shuffle``: one generator per prompt group, see
    ``minibatch_indices``) into ``gspo.minibatches`` mini-batches and each takes one optimizer step. Every
    mini-batch recomputes its window log-probs with gradients at the current parameters and takes the ratio against
    the log-probs stored at rollout time, so from the second mini-batch on the ratio moves away from 1 and the clip
    acts (with one mini-batch it never does: plain GRPO).

    Returns the whole batch's statistics (each trajectory's log-probs at the parameters its step was taken at) with
    each mini-batch's own in ``minibatches``.

    Shapes:
        adv: (B,) advantages of the rollout's trajectories
    """
    trajectory = rollout.trajectory
    batch = trajectory.log_probs.shape[0]
    if adv.shape != (batch,):
        raise ValueError(f"expected {batch} advantages, got {tuple(adv.shape)}")
    device = trajectory.latents.device
    adv = adv.to(device)
    policy.train()
    parts, order, new_log_probs = [], [], []
    for index in minibatch_indices(len(rollout.groups), batch // len(rollout.groups), gspo.minibatches, shuffle):
        stats, log_probs = _minibatch_step(policy, params, optimizer, rollout, adv, index.to(device), noise_level, gspo,
                                           micro_batch, grad_clip, sync_gradients)
        parts.append(stats)
        order.append(index)
        new_log_probs.append(log_probs)
    # back to rollout order, so the whole-batch statistics line up with the stored log-probs and advantages
    log_probs = torch.empty_like(trajectory.log_probs)
    log_probs[torch.cat(order).to(device)] = torch.cat(new_log_probs)
    stats = gspo_objective(log_probs, trajectory.log_probs, adv, gspo.clip, gspo.kl_coef)
    grad_norm = parts[0].grad_norm if len(parts) == 1 else torch.stack([p.grad_norm for p in parts]).mean()
    return dataclasses.replace(stats, grad_norm=grad_norm, minibatches=tuple(parts))


def _minibatch_step(
    policy: Policy,
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    adv: Tensor,
    index: Tensor,
    noise_level: float,
    gspo: GSPOConfig,
    micro_batch: int,
    grad_clip: float,
    sync_gradients: GradientSync | None,
) -> tuple[GSPOLoss, Tensor]:
    """One optimizer step on the trajectories ``index`` (B'): backprop the clipped objective in micro-batches (their
    sum is the mini-batch loss), sync gradients across ranks, clip, step. Returns the statistics at the parameters
    the gradient was taken at and those log-probs (B', W)."""
    optimizer.zero_grad(set_to_none=False)
    new_log_probs = []
    for micro in index.split(micro_batch):
        part = select_trajectory(rollout.trajectory, micro)
        cond = policy.select(rollout.cond, micro)
        log_probs = window_log_probs(lambda x, s: policy.velocity(x, s, cond), part, noise_level)  # (B'', W)
        out = gspo_objective(log_probs, part.log_probs, adv[micro], gspo.clip, gspo.kl_coef)
        (out.loss * (len(micro) / len(index))).backward()
        new_log_probs.append(log_probs.detach())
    if sync_gradients is not None:
        sync_gradients(params)
    # the norm before clipping (inf max_norm: measure only); a non-finite one would poison the adapters for good
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if not torch.isfinite(grad_norm):
        raise RuntimeError(f"non-finite gradient norm ({float(grad_norm)}) in the GSPO update; training stopped. Lower "
                           "optim.lr or gspo.clip_range, check the rewards for NaN, or resume from the last checkpoint")
    optimizer.step()
    log_probs = torch.cat(new_log_probs)
    stats = gspo_objective(log_probs, rollout.trajectory.log_probs[index], adv[index], gspo.clip, gspo.kl_coef)
    return dataclasses.replace(stats, grad_norm=grad_norm.detach().float().cpu()), log_probs


# one iteration


@dataclass(frozen=True)
class IterationResult:
    """What one iteration produced, for logging and previews (this rank's share).

    Shapes:
        advantages: (B,); images: (B, H, W, 3)
    """

    rewards: RewardResult
    advantages: Tensor
    loss: GSPOLoss | None  # None when every advantage was 0 (nothing to learn; no optimizer step was taken)
    window: tuple[int, ...]
    images: Tensor
    seconds: dict[str, float]  # rollout, reward, update (wall clock on this rank)


def ippo_iteration(
    policy: Policy,
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    groups: Sequence[PromptGroup],
    rewards: dict[str, Reward],
    weights: dict[str, float],
    rollout_config: RolloutConfig,
    gspo: GSPOConfig,
    sigmas: Tensor,
    window: Sequence[int],
    generators: Sequence[torch.Generator],
    micro_batch: int,
    grad_clip: float = 0.0,
    device: torch.device | str = "cpu",
    sync_gradients: GradientSync | None = None,
    any_rank: Callable[[bool], bool] = bool,
    remote: GroupScorer | None = None,
) -> IterationResult:
    """Rollout -> rewards -> advantages -> GSPO update (``gspo.minibatches`` optimizer steps; skipped on every rank
    when all advantages are 0). The mini-batch shuffle draws from each group's generator after its rollout, so it
    is a function of the same seeds: it resumes identically and does not depend on the number of ranks.

    ``any_rank(flag)`` is True when ``flag`` is True on any rank (an all-reduce under torchrun), so every rank
    takes the same decision about the optimizer step. With a ``remote`` scorer, groups are rolled out one at a time
    and each is scored elsewhere while the next one is sampled; ``reward`` is then the time spent waiting for scores.
    """
    check_minibatches(rollout_config.group_size, gspo.minibatches)  # refuse before sampling
    clock = _Clock(device)
    if remote is None:
        batch = rollout(policy, groups, rollout_config, sigmas, window, generators, device)
        clock.lap("rollout")
        result = score(batch, rewards, rollout_config.group_size)
    else:
        parts = []
        for k, (group, gen) in enumerate(zip(groups, generators)):
            parts.append(rollout(policy, [group], rollout_config, sigmas, window, [gen], device))
            remote.submit(k, parts[-1].images)
        batch = merge_rollouts(policy, parts, rollout_config.group_size)
        clock.lap("rollout")
        result = remote.collect()
    clock.lap("reward")
    adv = advantages(result, weights, rollout_config.group_size, gspo)
    loss = None
    if any_rank(bool(adv.abs().max() > 0)):
        loss = update(policy, params, optimizer, batch, adv, rollout_config.noise_level, gspo, micro_batch,
                      grad_clip, sync_gradients, shuffle=generators)
    clock.lap("update")
    return IterationResult(result, adv, loss, tuple(batch.trajectory.window), batch.images, clock.seconds)


class _Clock:
    def __init__(self, device: torch.device | str) -> None:
        self._now = time.perf_counter
        self._cuda = torch.device(device).type == "cuda"
        self._last = self._now()
        self.seconds: dict[str, float] = {}

    def lap(self, name: str) -> None:
        if self._cuda:
            torch.cuda.synchronize()
        now = self._now()
        self.seconds[name] = now - self._last
        self._last = now
