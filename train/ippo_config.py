"""IPPO trainer config: the IDAR trainer's sections (model, data, lora, moe, optim, run) plus the RL ones.

Loaded like the IDAR config (TOML + ``--section.key=value`` overrides, unknown keys are errors); reward weights
are a table, ``[reward.weights]``, overridable as ``--reward.weights.multi_id=0.5``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .config import (
    DataConfig,
    LoRAConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    RunConfig,
    check_trainer,
    load_config,
    to_dict,
)
from .gspo import GSPOConfig
from .ippo import RolloutConfig
from .rewards import RewardConfig
from .sde import WindowSchedule


@dataclass(frozen=True)
class InitConfig:
    weights: str = ""  # stage-1 MultiCrafter weights (.safetensors from `train idar`) to start from; "" = fresh adapters


@dataclass(frozen=True)
class SamplerConfig:
    """Rollouts (multicrafter.md §5.1): ``[sampler.window]`` is MixGRPO's sliding window over the K denoising steps
    (``sde.WindowSchedule``), ``[sampler.rollout]`` the prompt groups' sampling (``ippo.RolloutConfig``)."""

    # flat keys of earlier versions -> their place now
    LEGACY_KEYS: ClassVar[dict[str, str]] = {
        "num_steps": "window.num_steps", "window_size": "window.size", "shift_interval": "window.shift_interval",
        "stride": "window.stride", "roll_back": "window.roll_back", "group_size": "rollout.group_size",
        "noise_level": "rollout.noise_level", "same_noise_per_group": "rollout.same_noise_per_group"}

    window: WindowSchedule = field(default_factory=WindowSchedule)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    groups_per_rank: int = 1  # prompt groups each generating rank samples per iteration
    guidance: float = 3.5  # FLUX guidance during rollouts and updates (MixGRPO: 3.5)
    time_shift: bool = True  # the resolution-dependent Flux time shift of inference (off: linear sigmas)

    def __post_init__(self) -> None:
        if self.groups_per_rank < 1:
            raise ValueError(f"sampler.groups_per_rank must be >= 1, got {self.groups_per_rank}")


@dataclass(frozen=True)
class IPPOOptimConfig(OptimConfig):
    warmup_steps: int = 10  # linear warmup from 0 (spec §5.3: 10)
    micro_batch: int = 4  # trajectories per backward pass in the update (memory knob; the step covers the batch)
    # lr = 0 is allowed here: a frozen-policy run is the baseline that shows what the rewards do without learning
    min_lr: ClassVar[float] = 0.0


@dataclass(frozen=True)
class IPPORunConfig(RunConfig):
    out_dir: str = "runs/ippo"  # checkpoints, logs, rollout previews and the exported weights go here
    max_steps: int = 700  # iterations (one rollout batch + one update each); 700 = one window sweep at the defaults
    save_every: int = 50  # checkpoint every N iterations (and on SIGTERM); 0 = only at the end
    log_every: int = 1  # TensorBoard scalars every N iterations
    sample_every: int = 50  # rollout preview grid (images with their rewards) every N iterations; 0 = off

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fsdp:
            raise ValueError("run.fsdp is not supported by the IPPO trainer (each rank holds the whole model); "
                             "set run.fsdp = false")


@dataclass(frozen=True)
class IPPOMoEConfig(MoEConfig):
    balance_weight: float = 0.0  # stage 2 optimizes rewards only (the Switch balance loss is a stage-1 term)


@dataclass(frozen=True)
class IPPOConfig:
    trainer: str = "ippo"  # which trainer this config is for (`train export`, `data cache` read it)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)  # the RL prompt set: a manifest + its `data cache`
    init: InitConfig = field(default_factory=InitConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    moe: IPPOMoEConfig = field(default_factory=IPPOMoEConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    gspo: GSPOConfig = field(default_factory=GSPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: IPPOOptimConfig = field(default_factory=IPPOOptimConfig)
    run: IPPORunConfig = field(default_factory=IPPORunConfig)

    def __post_init__(self) -> None:
        check_trainer(self.trainer, "ippo")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def load_ippo_config(path: str | Path | None, overrides: list[str] = ()) -> IPPOConfig:
    """TOML file (optional) + ``--section.key=value`` overrides -> validated ``IPPOConfig`` (see ``config.load_config``)."""
    return load_config(path, overrides, cls=IPPOConfig)
