"""IDAR trainer config: frozen dataclasses, loaded from TOML with ``--section.key=value`` overrides.

nanoGPT's configurator without ``exec``: every key must exist, every override is parsed and type-checked
against the field's type, and the resolved config (``to_dict``) goes into checkpoints and exported weights.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..attention.attention_maps import DIRECTIONS
from ..attention.families import FLUX
from ..attention.moe_lora import MoELoRAConfig
from ..attention.weights import LoRAConfig as CoreLoRAConfig

try:
    import tomllib
except ModuleNotFoundError:  # python 3.10: the same API from the backport
    import tomli as tomllib

SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("fp32", "bf16")
LORA_TARGETS = FLUX.weight_format.lora_leaves  # per-block Linear names: img/txt_attn.qkv/proj, linear1/2
TRAINERS = ("idar", "ippo")
log = logging.getLogger("multisubject.train")


@dataclass(frozen=True)
class ModelConfig:
    comfyui: str = ""  # your ComfyUI folder ("" = $COMFYUI_PATH or ~/comfy/ComfyUI)
    diffusion_model: str = ""  # FLUX.1 transformer .safetensors (models/diffusion_models); "" only with tiny = true
    vae: str = ""  # FLUX ae.safetensors (models/vae); used by `data cache` only
    clip_l: str = ""  # clip_l.safetensors (models/text_encoders); used by `data cache` only
    t5: str = ""  # t5xxl .safetensors (models/text_encoders); used by `data cache` only
    tiny: bool = False  # build ComfyUI's Flux class at the tiny sizes below with random weights (tests, benchmarks)
    tiny_hidden: int = 64  # tiny only: hidden size
    tiny_heads: int = 2  # tiny only: attention heads (hidden / heads must be a multiple of 4)
    tiny_depth: int = 2  # tiny only: double blocks
    tiny_depth_single: int = 1  # tiny only: single blocks
    tiny_context_dim: int = 32  # tiny only: text embedding width (T5 = 4096)
    tiny_vec_dim: int = 32  # tiny only: pooled text width (CLIP-L = 768)
    guidance: float = 1.0  # FLUX guidance fed during training (UNO trains with 1)

    def __post_init__(self) -> None:
        if not self.tiny and not self.diffusion_model:
            raise ValueError("model.diffusion_model is empty; point it at your FLUX .safetensors (or set model.tiny = true)")
        if self.tiny and self.tiny_hidden % self.tiny_heads:
            raise ValueError(f"model.tiny_hidden {self.tiny_hidden} must be divisible by model.tiny_heads {self.tiny_heads}")
        if self.tiny and (self.tiny_hidden // self.tiny_heads) % 4:
            raise ValueError("model.tiny_hidden / model.tiny_heads must be a multiple of 4 (RoPE axes)")


@dataclass(frozen=True)
class DataConfig:
    manifest: str = ""  # JSONL manifest (see README: Training); required
    cache_dir: str = ""  # latent/text cache from `data cache`; "" = <manifest folder>/cache
    resolution: int = 512  # target bucket area = resolution**2 pixels (bucket sides are multiples of 16)
    ref_size: int = 320  # references are center-cropped square and resized to this (UNO: 320)
    max_aspect: float = 2.0  # largest bucket aspect ratio (long side / short side)
    text_dropout: float = 0.1  # probability of training on the empty caption (UNO: 0.1)

    def __post_init__(self) -> None:
        for name in ("resolution", "ref_size"):
            step = FLUX.vae_downscale * FLUX.patch  # pixels per token side (16)
            if getattr(self, name) % step or getattr(self, name) <= 0:
                raise ValueError(f"data.{name} must be a positive multiple of {step}, got {getattr(self, name)}")
        if self.max_aspect < 1.0:
            raise ValueError(f"data.max_aspect must be >= 1, got {self.max_aspect}")
        if not 0.0 <= self.text_dropout < 1.0:
            raise ValueError(f"data.text_dropout must be in [0, 1), got {self.text_dropout}")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 512  # attention LoRA rank (paper / UNO: 512); 0 = no attention LoRA
    alpha: float = 0.0  # scale = alpha / rank; 0 = alpha equals rank (scale 1, as UNO)
    targets: tuple[str, ...] = LORA_TARGETS  # which Linear layers of every block get a LoRA
    double_blocks: tuple[int, ...] = ()  # restrict to these double blocks; () = all
    single_blocks: tuple[int, ...] = ()  # restrict to these single blocks; () = all
    # single blocks' linear1 LoRA on its q/k/v outputs only, as UNO (qkv part of linear1 + all of linear2); off: on all
    # of linear1 (also the MLP input). Exported zero-padded to the whole linear1 (the stock LoraLoader applies it)
    linear1_qkv_only: bool = False

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"lora.rank must be >= 0 (0 = no attention LoRA), got {self.rank}")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad:
            raise ValueError(f"lora.targets has unknown entries {bad}; choose from {list(LORA_TARGETS)}")
        _checked("lora", lambda: self.to_core(0, 0))  # rank, alpha: the core config's checks

    def to_core(self, double_blocks: int, single_blocks: int) -> CoreLoRAConfig | None:
        """The core attention-LoRA config (module paths) for a Flux with these block counts; None when rank = 0."""
        if self.rank == 0:
            return None
        paths = []
        for i in range(double_blocks):
            if not self.double_blocks or i in self.double_blocks:
                paths += [f"{FLUX.double_blocks}.{i}.{t}" for t in self.targets if "attn" in t]
        for i in range(single_blocks):
            if not self.single_blocks or i in self.single_blocks:
                paths += [f"single_blocks.{i}.{t}" for t in self.targets if t in ("linear1", "linear2")]
        return CoreLoRAConfig(rank=self.rank, alpha=self.alpha or float(self.rank), targets=tuple(paths))

    def out_rows(self, core: CoreLoRAConfig | None, hidden_size: int) -> dict[str, int]:
        """The LoRAs of ``core`` (``to_core``'s) that change only their Linear's first outputs: with
        ``linear1_qkv_only``, each single block's ``linear1`` ([q | k | v | mlp_in]) on its 3 · ``hidden_size``
        q/k/v rows (UNO); {} otherwise."""
        if core is None or not self.linear1_qkv_only:
            return {}
        return {p: 3 * hidden_size for p in core.targets if p.startswith("single_blocks.") and p.endswith(".linear1")}


@dataclass(frozen=True)
class MoEConfig:
    enabled: bool = True  # MoE-LoRA branch parallel to the image-stream FFN of double blocks (paper §4)
    num_experts: int = 4  # experts per MoE layer (paper: 4)
    top_k: int = 1  # experts per token (paper: 1)
    rank: int = 128  # expert LoRA rank
    alpha: float = 0.0  # scale = alpha / rank; 0 = alpha equals rank
    blocks: tuple[int, ...] = ()  # double blocks with an MoE branch; () = all
    balance_weight: float = 0.01  # Switch load-balancing loss weight; 0 = off
    routing: str = "switch"  # switch (router gets gradient with top-1, spec §4.2) | renormalized (softmax over top-k)

    def __post_init__(self) -> None:
        if self.balance_weight < 0:
            raise ValueError(f"moe.balance_weight must be >= 0, got {self.balance_weight}")
        _checked("moe", lambda: self._core(()))  # experts, rank, alpha, top_k, routing: the core config's checks

    def to_core(self, double_blocks: int) -> MoELoRAConfig | None:
        """The core MoE-LoRA config for a Flux with ``double_blocks`` double blocks: the image-stream FFNs of the
        chosen blocks (spec §4.2); None when disabled."""
        if not self.enabled:
            return None
        bad = [i for i in self.blocks if not 0 <= i < double_blocks]
        if bad:
            raise ValueError(f"moe.blocks {bad} do not exist; this model has double blocks 0..{double_blocks - 1}")
        blocks = self.blocks or tuple(range(double_blocks))
        return self._core(tuple(f"{FLUX.double_blocks}.{i}.img_mlp" for i in blocks))

    def _core(self, targets: tuple[str, ...]) -> MoELoRAConfig:
        return MoELoRAConfig(num_experts=self.num_experts, rank=self.rank, alpha=self.alpha or float(self.rank),
                             top_k=self.top_k, routing=self.routing, targets=targets)


def _checked(section: str, build) -> None:
    """Run a core config's own checks on a trainer section, naming the section in the error."""
    try:
        build()
    except ValueError as e:
        raise ValueError(f"[{section}] {e}") from None


@dataclass(frozen=True)
class LossConfig:
    idar_weight: float = 0.1  # lambda for the IDAR Dice loss; 0 = flow loss only
    dice_eps: float = 1.0  # Dice smoothing epsilon
    idar_blocks: tuple[int, ...] = ()  # double blocks whose ref->image attention is supervised; () = all
    idar_max_t: float = 1.0  # skip the IDAR loss for samples with t above this (1 = never skip)
    # which attention IDAR supervises: reference_to_image (spec §3.2: reference queries over all keys, image columns)
    # | image_to_reference (ablation: each image token's attention to a subject's reference; subjects compete per pixel)
    idar_direction: str = "reference_to_image"
    timestep_shift: bool = True  # sample t from the resolution-shifted schedule (UNO / FLUX)

    def __post_init__(self) -> None:
        if self.idar_weight < 0 or self.dice_eps <= 0:
            raise ValueError(f"loss.idar_weight must be >= 0 and loss.dice_eps > 0, got {self.idar_weight}/{self.dice_eps}")
        if not 0.0 < self.idar_max_t <= 1.0:
            raise ValueError(f"loss.idar_max_t must be in (0, 1], got {self.idar_max_t}")
        if self.idar_direction not in DIRECTIONS:
            raise ValueError(f"loss.idar_direction must be one of {DIRECTIONS}, got {self.idar_direction!r}")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5  # peak learning rate (UNO: 1e-5)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    weight_decay: float = 0.01  # AdamW weight decay
    warmup_steps: int = 100  # linear warmup from 0; 0 = none
    schedule: str = "constant"  # after warmup: constant | cosine | linear (to 0 at run.max_steps)
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    micro_batch: int = 1  # samples per rank per forward
    grad_accum: int = 1  # micro-batches per optimizer step; global batch = micro_batch * grad_accum * world size

    min_lr: ClassVar[float | None] = None  # the smallest allowed lr (None: lr must be > 0)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got '{self.schedule}'")
        if self.min_lr is not None and self.lr < self.min_lr:
            raise ValueError(f"optim.lr must be >= {self.min_lr} ({self.min_lr} = frozen policy), got {self.lr}")
        if (self.min_lr is None and self.lr <= 0) or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("optim.lr must be > 0, optim.warmup_steps >= 0 and optim.grad_clip >= 0")
        if self.micro_batch < 1 or self.grad_accum < 1:
            raise ValueError(f"optim.micro_batch and optim.grad_accum must be >= 1, got {self.micro_batch}/{self.grad_accum}")


@dataclass(frozen=True)
class RunConfig:
    out_dir: str = "runs/idar"  # checkpoints, logs, samples and the exported weights go here
    max_steps: int = 5000  # optimizer steps
    seed: int = 0  # seeds data order, noise and timesteps
    precision: str = "bf16"  # bf16 autocast | fp32
    grad_checkpointing: bool = True  # recompute block activations in backward (saves memory)
    fsdp: bool = False  # shard the frozen base (and adapters) across ranks with FSDP2 instead of replicating it
    save_every: int = 500  # checkpoint every N steps (and on SIGTERM); 0 = only at the end
    keep_last: int = 3  # checkpoints kept on disk
    log_every: int = 10  # TensorBoard scalars every N steps
    sample_every: int = 0  # preview PNGs (image + attention heatmaps) every N steps; 0 = off
    sample_steps: int = 20  # Euler steps for previews
    resume: str = "auto"  # auto = latest checkpoint in out_dir if any | a checkpoint folder | "" = fresh start
    progress: bool = True  # tqdm bar with ETA on rank 0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"run.precision must be one of {PRECISIONS}, got '{self.precision}'")
        if self.max_steps < 1 or self.keep_last < 1:
            raise ValueError("run.max_steps and run.keep_last must be >= 1")


@dataclass(frozen=True)
class IDARConfig:
    trainer: str = "idar"  # which trainer this config is for (`train export`, `data cache` read it)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        check_trainer(self.trainer, "idar")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def check_trainer(value: str, expected: str) -> None:
    if value != expected:
        raise ValueError(f"this config says trainer = {value!r}, but it is being loaded for the {expected!r} trainer; "
                         f"use `train {value}` (trainers: {list(TRAINERS)}) or fix the `trainer` key")


# loading

def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config (tuples become lists, so it round-trips through TOML/JSON)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Mapping):  # e.g. IPPO's reward weights table
            value = dict(value)
        out[f.name] = value
    return out


def load_config(path: str | Path | None, overrides: list[str] = (), cls: type = IDARConfig,
                base: dict[str, Any] | None = None) -> Any:
    """TOML file (optional; or a ``base`` dict) + ``--section.key=value`` overrides -> validated frozen config.

    Unknown sections/keys, unparsable or non-finite values and wrong types raise ``ValueError`` naming the key.
    """
    raw: dict[str, Any] = read_toml(path) if path is not None else _deep_copy(base or {})
    for item in overrides:
        key, value = parse_override(item)
        section, _, name = key.rpartition(".")
        node = raw
        for part in filter(None, section.split(".")):
            node = node.setdefault(part, {})
        node[name] = value
    return from_dict(cls, raw)


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    with open(path, "rb") as fh:
        try:
            return tomllib.load(fh)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"config file {path} is not valid TOML: {e}") from e


def _deep_copy(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in raw.items()}


def parse_override(item: str) -> tuple[str, Any]:
    """``--optim.lr=1e-4`` -> ("optim.lr", 1e-4). Values are Python/TOML literals; bare words are strings."""
    body = item[2:] if item.startswith("--") else item
    if "=" not in body:
        raise ValueError(f"override '{item}' must look like --section.key=value")
    key, text = body.split("=", 1)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):  # TOML's words: true, false, nan, inf (refused later for a float key)
        words = {"true": True, "false": False, "nan": math.nan, "inf": math.inf, "+inf": math.inf, "-inf": -math.inf}
        value = words.get(text.strip().lower(), text)
    return key.strip(), value


def from_dict(cls: type, raw: dict[str, Any], where: str = "") -> Any:
    """A ``cls`` from a nested dict, every value type-checked; errors name the key (``section.key``)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    raw = _renamed_legacy_keys(cls, raw, where)
    unknown = sorted(set(raw) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys here: {sorted(prefix + n for n in names)}"
        )
    kwargs = {}
    for name, value in raw.items():
        key = f"{where}.{name}" if where else name
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise ValueError(f"config key '{key}' is a section; write it as [{key}] in TOML")
            kwargs[name] = from_dict(kind, value, key)
        else:
            kwargs[name] = _coerce(key, kind, value)
    try:
        return cls(**kwargs)
    except ValueError as e:  # a core config's own check: say which section it came from
        if not where or f"{where}." in str(e) or str(e).startswith("["):
            raise
        raise ValueError(f"[{where}] {e}") from None


def _renamed_legacy_keys(cls: type, raw: dict[str, Any], where: str) -> dict[str, Any]:
    """Keys a section renamed (``cls.LEGACY_KEYS``: old name -> new dotted path inside it) moved to their new place,
    with a deprecation message."""
    legacy = getattr(cls, "LEGACY_KEYS", {})
    if not legacy or not set(raw) & set(legacy):
        return raw
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for old in sorted(set(raw) & set(legacy)):
        new = legacy[old]
        section, _, name = new.rpartition(".")
        log.warning("config key '%s.%s' is deprecated; write it as '%s.%s' (the old name stops working in a later "
                    "version)", where, old, where, new)
        raw.setdefault(section, {})[name] = raw.pop(old)
    return raw


def _coerce(key: str, kind: Any, value: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key '{key}' expects a list, got {value!r}")
        args = typing.get_args(kind)
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            raise ValueError(f"config key '{key}' expects {len(items)} values, got {len(value)}")
        return tuple(_coerce(key, t, v) for t, v in zip(items, value))
    if origin in (dict, Mapping):  # a TOML table of name = value
        if not isinstance(value, dict):
            raise ValueError(f"config key '{key}' expects a table of name = value, got {value!r}")
        value_kind = typing.get_args(kind)[1]
        return {str(k): _coerce(f"{key}.{k}", value_kind, v) for k, v in value.items()}
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"config key '{key}' expects {kind.__name__}, got {type(value).__name__} {value!r}")
    if kind is float and not math.isfinite(value):
        raise ValueError(f"config key '{key}' must be a finite number, got {value}")
    return value


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose values differ between two ``to_dict`` configs, as ``'section.key: old -> new'``."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out
