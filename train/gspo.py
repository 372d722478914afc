"""The IPPO objective: group-normalized advantages and GSPO's clipped sequence-ratio loss (multicrafter.md §5.2–5.4).

Pure functions over tensors; the trainer loop calls them in this order:
``reward_advantages`` (per-reward scores -> advantages A) then ``gspo_objective`` (log-probs, A -> loss).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

ADVANTAGE_EPS = 1e-8  # added to the group std (Eq. 3), so constant groups give A = 0 instead of NaN


class RewardAggregation(str, Enum):
    """How several rewards become one advantage (both are in the spec, §5.4)."""

    # Eq. 11 as written: R = Σ w_k R_k, then one group normalization
    SUM_THEN_NORMALIZE = "sum_then_normalize"
    # MixGRPO's advantage_aggr: normalize each R_k inside its group, then A = Σ w_k A_k
    NORMALIZE_THEN_SUM = "normalize_then_sum"


@dataclass(frozen=True)
class GSPOConfig:
    """Knobs of the GSPO update (defaults: multicrafter.md §5.3)."""

    clip_range: float = 1e-4  # β: the sequence ratio is clipped to [1 − β, 1 + β] (per-element-mean log-probs)
    clip_range_high: float = 0.0  # upper side 1 + this instead of 1 + β, as GSPO's ε_low/ε_high (3e-4/4e-4); 0 = β
    kl_coef: float = 0.0  # weight of MixGRPO's approximate KL 0.5·(log π − log π_old)²; 0 = off (GSPO default)
    advantage_clamp: float = 5.0  # clamp A to ±this (MixGRPO adv_clip_max); 0 = off
    aggregation: str = "sum_then_normalize"  # sum_then_normalize (Eq. 11) | normalize_then_sum (see RewardAggregation)
    # optimizer steps per rollout batch: the batch is shuffled into this many mini-batches, one step each, every ratio
    # taken against the rollout's log-probs (GSPO: 4). 1 = GRPO-equivalent ablation: the only gradient is taken at
    # θ = θ_old, where every ratio is 1 and the clip never acts
    minibatches: int = 4

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 < self.clip_range < 1.0:
            problems.append(f"clip_range must be in (0, 1), got {self.clip_range}")
        if self.clip_range_high < 0:
            problems.append(f"clip_range_high must be >= 0 (0 = clip_range), got {self.clip_range_high}")
        if self.kl_coef < 0:
            problems.append(f"kl_coef must be >= 0 (0 turns the KL term off), got {self.kl_coef}")
        if self.advantage_clamp < 0:
            problems.append(f"advantage_clamp must be >= 0 (0 turns the clamp off), got {self.advantage_clamp}")
        if self.minibatches < 1:
            problems.append(f"minibatches must be >= 1 optimizer step per rollout batch, got {self.minibatches}")
        try:
            object.__setattr__(self, "aggregation", RewardAggregation(self.aggregation))
        except ValueError:
            choices = ", ".join(repr(m.value) for m in RewardAggregation)
            problems.append(f"aggregation must be one of {choices}, got {self.aggregation!r}")
        if problems:
            raise ValueError("invalid GSPO config: " + "; ".join(problems))

    @property
    def clip(self) -> tuple[float, float]:
        """(ε_low, ε_high): the sequence ratio is clipped to [1 − ε_low, 1 + ε_high]."""
        return self.clip_range, self.clip_range_high or self.clip_range


# advantages


def _groups(values: Tensor, group_size: int) -> Tensor:
    if group_size < 2:
        raise ValueError(
            f"group size must be >= 2: advantages are normalized within a prompt group and are undefined for a "
            f"group of {group_size}; sample at least 2 images per prompt"
        )
    if values.ndim != 1 or values.numel() % group_size:
        raise ValueError(
            f"expected rewards of shape (B,) with B a multiple of the group size {group_size}, got "
            f"{tuple(values.shape)}; rollouts must hold whole prompt groups"
        )
    return values.view(-1, group_size)  # (B / G, G)


def group_advantages(rewards: Tensor, group_size: int, clamp: float | None = None) -> Tensor:
    """Eq. 3: ``A_i = (R_i − mean_g R) / (std_g R + eps)`` within each prompt group, optionally clamped to ±clamp.

    Groups are consecutive: items ``[g·G, (g+1)·G)`` share a prompt. The std is the population std, so each
    group of A has mean 0 and std 1 (or is all 0 when its rewards are constant).

    Shapes:
        rewards: (B,) with B = num_groups · G
        returns (B,)
    """
    groups = _groups(rewards.float(), group_size)
    adv = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, unbiased=False, keepdim=True) + ADVANTAGE_EPS)
    if clamp is not None:
        adv = adv.clamp(-clamp, clamp)
    return adv.reshape(-1)


def normalized_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Reward weights scaled to sum to 1 (MixGRPO normalizes them); zero-weight rewards are dropped."""
    bad = {name: w for name, w in weights.items() if w < 0}
    if bad:
        raise ValueError(f"reward weights must be >= 0, got {bad}")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"at least one reward needs a positive weight, got {dict(weights)}")
    return {name: w / total for name, w in weights.items() if w > 0}


def _check_rewards(rewards: Mapping[str, Tensor], weights: Mapping[str, float]) -> None:
    missing = sorted(set(weights) - set(rewards))
    if missing:
        raise ValueError(f"rewards {missing} have weights but were not computed; computed: {sorted(rewards)}")


def combine_rewards(rewards: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """Eq. 11: ``R = Σ_k w_k R_k`` with the weights normalized to sum to 1.

    Shapes:
        rewards: name -> (B,)
        returns (B,)
    """
    weights = normalized_weights(weights)
    _check_rewards(rewards, weights)
    return sum(w * rewards[name].float() for name, w in weights.items())  # type: ignore[return-value]


def reward_advantages(
    rewards: Mapping[str, Tensor],
    weights: Mapping[str, float],
    group_size: int,
    aggregation: RewardAggregation = RewardAggregation.SUM_THEN_NORMALIZE,
    clamp: float | None = None,
) -> Tensor:
    """Advantages from several rewards, aggregated as ``aggregation`` says (see RewardAggregation).

    Shapes:
        rewards: name -> (B,)
        returns (B,)
    """
    aggregation = RewardAggregation(aggregation)
    if aggregation is RewardAggregation.SUM_THEN_NORMALIZE:
        return group_advantages(combine_rewards(rewards, weights), group_size, clamp)
    norm = normalized_weights(weights)
    _check_rewards(rewards, norm)
    adv = sum(w * group_advantages(rewards[name], group_size) for name, w in norm.items())
    return adv.clamp(-clamp, clamp) if clamp is not None else adv  # type: ignore[union-attr]


# objective


def sequence_log_ratio(log_probs: Tensor, old_log_probs: Tensor) -> Tensor:
    """GSPO's ``log s_i = mean over window steps of (log π_θ − log π_old)`` (Eq. 10).

    Shapes:
        log_probs, old_log_probs: (B, W)
        returns (B,)
    """
    if log_probs.shape != old_log_probs.shape or log_probs.ndim != 2:
        raise ValueError(
            f"expected log-probs of shape (B, W) on both sides, got {tuple(log_probs.shape)} and "
            f"{tuple(old_log_probs.shape)}"
        )
    return (log_probs - old_log_probs.detach()).mean(1)


MINIBATCH_STATS = ("clip_fraction", "ratio_mean", "ratio_min", "ratio_max", "grad_norm")  # logged per mini-batch


@dataclass(frozen=True)
class GSPOLoss:
    """The loss to minimize and what to log about it (all 0-d; only ``loss`` carries gradient)."""

    loss: Tensor  # −J(θ) (+ kl_coef·KL)
    policy_loss: Tensor  # −J(θ)
    kl: Tensor  # mean 0.5·(log π − log π_old)² over trajectories and window steps
    clip_fraction: Tensor  # fraction of trajectories whose ratio lies outside [1 − ε_low, 1 + ε_high]
    ratio_mean: Tensor
    ratio_min: Tensor
    ratio_max: Tensor
    grad_norm: Tensor | None = None  # global gradient norm before clipping (set by the update)
    # with several mini-batches: the statistics of each one at the parameters its step was taken at, in step order
    minibatches: tuple[GSPOLoss, ...] = ()

    def stats(self) -> dict[str, float]:
        """Scalars to log: the whole batch's, then ``minibatch_<k>/<name>`` for the ratio and clip statistics and
        the gradient norm of each mini-batch (only when there are several)."""
        out = {name: float(getattr(self, name)) for name in self.__dataclass_fields__
               if name != "minibatches" and getattr(self, name) is not None}
        if len(self.minibatches) > 1:
            for k, part in enumerate(self.minibatches, 1):
                out |= {f"minibatch_{k}/{name}": value for name, value in part.stats().items()
                        if name in MINIBATCH_STATS}
        return out



def gspo_objective(
    log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, clip_range: float | tuple[float, float],
    kl_coef: float = 0.0,
) -> GSPOLoss:
    """Eq. 10: ``−(1/N) Σ_i min(s_i A_i, clip(s_i, 1 − β, 1 + β) A_i)`` with ``s_i = exp(mean_t Δlog π)``;
    ``clip_range`` is β, or (ε_low, ε_high) for GSPO's asymmetric range ``[1 − ε_low, 1 + ε_high]``.

    Shapes:
        log_probs: (B, W) under the current policy (with gradient)
        old_log_probs: (B, W) recorded at rollout time
        advantages: (B,)
        returns GSPOLoss
    """
    log_ratio = sequence_log_ratio(log_probs, old_log_probs)
    if advantages.shape != log_ratio.shape:
        raise ValueError(f"expected advantages of shape {tuple(log_ratio.shape)}, got {tuple(advantages.shape)}")
    low, high = clip_range if isinstance(clip_range, tuple) else (clip_range, clip_range)
    ratio = torch.exp(log_ratio)  # (B,)
    adv = advantages.detach().to(ratio.dtype)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - low, 1.0 + high) * adv
    policy_loss = -torch.minimum(unclipped, clipped).mean()
    kl = 0.5 * ((log_probs - old_log_probs.detach()) ** 2).mean()
    loss = policy_loss + kl_coef * kl if kl_coef else policy_loss
    with torch.no_grad():
        r = ratio.detach()
        clip_fraction = ((r < 1.0 - low) | (r > 1.0 + high)).float().mean()
        return GSPOLoss(
            loss=loss,
            policy_loss=policy_loss.detach(),
            kl=kl.detach(),
            clip_fraction=clip_fraction,
            ratio_mean=r.mean(),
            ratio_min=r.min(),
            ratio_max=r.max(),
        )
