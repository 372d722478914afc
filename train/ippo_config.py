"""IPPO trainer config: the IDAR trainer's sections (model, data, lora, moe, optim, run) plus the RL ones.

Loaded like the IDAR config (TOML + ``--section.key=value`` overrides, unknown keys are errors); reward weights
are a table, ``[reward.weights]``, overridable as ``--reward.weights.multi_id=0.5``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DataConfig, LoRAConfig, ModelConfig, MoEConfig, OptimConfig, RunConfig, load_config, to_dict
from .gspo import GSPOConfig
from .rewards import RewardConfig
from .sde import WindowSchedule


@dataclass(frozen=True)
class InitConfig:
    weights: str = ""  # stage-1 MultiCrafter weights (.safetensors from `train idar`) to start from; "" = fresh adapters


@dataclass(frozen=True)
class SamplerConfig:
    """Rollouts (multicrafter.md §5.1)."""

    num_steps: int = 16  # K denoising steps per rollout (paper: 16)
    window_size: int = 2  # SDE steps that are optimized, w (paper: 2)
    shift_interval: int = 50  # iterations before the window moves, tau (paper: 50)
    stride: int = 1  # steps the window moves each time (paper: 1)
    roll_back: bool = False  # restart the window at step 0 after the last position (off: stay at the end)
    noise_level: float = 0.7  # SDE noise level a inside the window (Flow-GRPO default)
    group_size: int = 12  # G images per prompt (MixGRPO FLUX: 12); advantages are normalized within a group
    groups_per_rank: int = 1  # prompt groups each generating rank samples per iteration
    same_noise_per_group: bool = False  # every image of a group starts from the same noise (init_same_noise)
    guidance: float = 3.5  # FLUX guidance during rollouts and updates (MixGRPO: 3.5)
    time_shift: bool = True  # the resolution-dependent Flux time shift of inference (off: linear sigmas)

    def __post_init__(self) -> None:
        self.window()  # validates steps / window
        if self.group_size < 2:
            raise ValueError(
                f"sampler.group_size must be >= 2: advantages are normalized within a prompt group and are "
                f"undefined for a group of {self.group_size}"
            )
        if self.groups_per_rank < 1:
            raise ValueError(f"sampler.groups_per_rank must be >= 1, got {self.groups_per_rank}")
        if not self.noise_level > 0:
            raise ValueError(f"sampler.noise_level must be > 0 (the SDE window needs noise), got {self.noise_level}")

    def window(self) -> WindowSchedule:
        return WindowSchedule(self.num_steps, self.window_size, self.shift_interval, self.stride, self.roll_back)


@dataclass(frozen=True)
class IPPOOptimConfig(OptimConfig):
    warmup_steps: int = 10  # linear warmup from 0 (spec §5.3: 10)
    micro_batch: int = 4  # trajectories per backward pass in the update (memory knob; the step covers the batch)

    def __post_init__(self) -> None:
        # lr = 0 is allowed here: a frozen-policy run is the baseline that shows what the rewards do without learning
        if self.lr < 0:
            raise ValueError(f"optim.lr must be >= 0 (0 = frozen policy), got {self.lr}")
        if self.lr > 0:
            super().__post_init__()
        else:
            dataclasses.replace(self, lr=1.0)  # every other field checked as usual


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

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def load_ippo_config(path: str | Path | None, overrides: list[str] = ()) -> IPPOConfig:
    """TOML file (optional) + ``--section.key=value`` overrides -> validated ``IPPOConfig`` (see ``config.load_config``)."""
    return load_config(path, overrides, cls=IPPOConfig)
