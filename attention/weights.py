"""THE MultiCrafter weight format: the one contract between the trainers and the ComfyUI loader.

One safetensors file, format ``multisubject.multicrafter`` version ``FORMAT_VERSION``:

(a) plain attention LoRA in ComfyUI's generic Flux naming (the stock LoraLoader applies it as is)::

    diffusion_model.<path>.lora_A.weight   (r, C_in)     e.g. <path> = double_blocks.3.img_attn.qkv
    diffusion_model.<path>.lora_B.weight   (C_out, r)
    diffusion_model.<path>.alpha           ()            ComfyUI scales by alpha / r

    <path>: double_blocks.N.{img,txt}_attn.{qkv,proj} or single_blocks.N.{linear1,linear2}

(b) the MoE-LoRA, one group per target FFN (ComfyUI's LoraLoader ignores these keys with a
    "lora key not loaded" log line; the MultiCrafter MoE-LoRA loader applies them)::

    moe_lora.<path>.router.weight          (E, C_in)     W_g, no bias
    moe_lora.<path>.lora_A                 (E, r, C_in)  A_i stacked over experts
    moe_lora.<path>.lora_B                 (E, C_out, r) B_i stacked over experts

    <path>: double_blocks.N.{img,txt}_mlp

Metadata (safetensors ``__metadata__``, str -> str)::

    multisubject.format          "multisubject.multicrafter"
    multisubject.format_version  "1"
    multisubject.base_model      "flux1"   (FLUX.1 dev/schnell architecture, ComfyUI module names)
    multisubject.moe_lora        JSON {"num_experts", "rank", "alpha", "top_k", "routing", "targets"}
    multisubject.lora            JSON {"rank", "alpha", "targets"}          (targets may be [])
    multisubject.train_config    JSON, optional: the trainer's resolved config, informational

Tensors are float32, float16 or bfloat16, contiguous, and share no storage. Every rule above is
checked on save and on load (``MultiCrafterWeights.__post_init__``) and against a model with
``check_against_model``; each mismatch raises one ValueError that lists every problem found.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .checks import weight_problems
from .families import FLUX
from .files import read_safetensors
from .moe_lora import MoELoRA, MoELoRAConfig

FORMAT = "multisubject.multicrafter"
FORMAT_VERSION = 1
# FLUX.1's module names and base-model tag: the family registry's (attention/families.py)
BASE_MODEL = FLUX.weight_format.base_model
LORA_PREFIX = FLUX.weight_format.lora_prefix
MOE_PREFIX = "moe_lora."
META = "multisubject."  # metadata key prefix

LORA_TARGET = FLUX.weight_format.lora_target
MOE_TARGET = FLUX.weight_format.moe_target
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".alpha")
_MOE_SUFFIXES = (".router.weight", ".lora_A", ".lora_B")


@dataclass(frozen=True)
class LoRAConfig:
    """The plain attention LoRA: one rank and alpha for all its modules."""

    rank: int = 512  # r (paper / UNO: 512)
    alpha: float = 512.0  # scale alpha / r (UNO: 1)
    targets: tuple[str, ...] = ()  # attention Linear paths in ComfyUI's Flux naming

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.rank, int) and self.rank >= 1):
            problems.append(f"rank must be an integer >= 1, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            problems.append(f"alpha must be a finite number > 0, got {self.alpha!r}")
        bad = [t for t in self.targets if not isinstance(t, str) or not LORA_TARGET.match(t)]
        if bad:
            problems.append(
                f"LoRA targets {bad} are not Flux attention Linear paths (double_blocks.N.img_attn.qkv, "
                "...txt_attn.proj, single_blocks.N.linear1 / linear2)"
            )
        if problems:
            raise ValueError("invalid LoRA config: " + "; ".join(problems))


@dataclass(frozen=True)
class LoRAPair:
    """Shapes: lora_A (r, C_in), lora_B (C_out, r)."""

    lora_A: Tensor
    lora_B: Tensor


@dataclass(frozen=True)
class MoEExperts:
    """Shapes: router (E, C_in), lora_A (E, r, C_in), lora_B (E, C_out, r)."""

    router: Tensor
    lora_A: Tensor
    lora_B: Tensor

    def to_module(self, config: MoELoRAConfig) -> MoELoRA:
        return MoELoRA.from_tensors(self.router, self.lora_A, self.lora_B, config)


@dataclass(frozen=True)
class MultiCrafterWeights:
    """Everything one MultiCrafter file holds; validated for internal consistency on construction."""

    moe_config: MoELoRAConfig
    moe: Mapping[str, MoEExperts]  # target FFN path -> experts; keys == moe_config.targets
    lora_config: LoRAConfig = field(default_factory=lambda: LoRAConfig(targets=()))
    lora: Mapping[str, LoRAPair] = field(default_factory=dict)  # attention Linear path -> pair
    base_model: str = BASE_MODEL
    train_config: Mapping | None = None  # the trainer's resolved config (JSON-serialisable), informational

    def __post_init__(self) -> None:
        problems = _consistency_problems(self)
        if problems:
            raise ValueError("inconsistent MultiCrafter weights: " + "; ".join(problems))


def moe_target_problems(targets: Sequence[str]) -> list[str]:
    """The one check that MoE targets are Flux FFN paths (empty when they are)."""
    bad = [t for t in targets if not MOE_TARGET.match(t)]
    return [f"MoE targets {bad} are not Flux FFN paths (double_blocks.N.img_mlp / txt_mlp)"] if bad else []


def _consistency_problems(w: MultiCrafterWeights) -> list[str]:
    problems = []
    if w.base_model != BASE_MODEL:
        problems.append(f"base_model must be {BASE_MODEL!r} (this format is for FLUX.1), got {w.base_model!r}")
    cfg = w.moe_config
    problems += moe_target_problems(cfg.targets)
    if set(w.moe) != set(cfg.targets):
        problems.append(
            f"MoE tensors cover {sorted(w.moe)} but the config lists targets {sorted(cfg.targets)}; they must match"
        )
    e, r = cfg.num_experts, cfg.rank
    for path, ex in w.moe.items():
        problems += weight_problems(f"moe {path}", [ex.router, ex.lora_A, ex.lora_B])
        if ex.router.ndim != 2 or ex.lora_A.ndim != 3 or ex.lora_B.ndim != 3:
            problems.append(
                f"moe {path}: expected router (E, C_in), lora_A (E, r, C_in), lora_B (E, C_out, r), got "
                f"{tuple(ex.router.shape)}, {tuple(ex.lora_A.shape)}, {tuple(ex.lora_B.shape)}"
            )
            continue
        c_in = ex.lora_A.shape[2]
        expected = {"router": (e, c_in), "lora_A": (e, r, c_in), "lora_B": (e, ex.lora_B.shape[1], r)}
        for name, shape in expected.items():
            got = tuple(getattr(ex, name).shape)
            if got != shape:
                problems.append(
                    f"moe {path}.{name}: metadata says {e} experts of rank {r} (input {c_in}), so expected shape "
                    f"{shape}, got {got}"
                )
    lcfg = w.lora_config
    if set(w.lora) != set(lcfg.targets):
        problems.append(
            f"LoRA tensors cover {sorted(w.lora)} but the config lists targets {sorted(lcfg.targets)}; they must match"
        )
    for path, pair in w.lora.items():
        problems += weight_problems(f"lora {path}", [pair.lora_A, pair.lora_B])
        a, b = pair.lora_A, pair.lora_B
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != lcfg.rank or b.shape[1] != lcfg.rank:
            problems.append(
                f"lora {path}: metadata says rank {lcfg.rank}, so expected lora_A ({lcfg.rank}, C_in) and lora_B "
                f"(C_out, {lcfg.rank}), got {tuple(a.shape)} and {tuple(b.shape)}"
            )
    return problems


# serialisation


def to_state_dict(w: MultiCrafterWeights) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The safetensors tensors and metadata of ``w`` (keys and metadata as in the module docstring)."""
    tensors: dict[str, Tensor] = {}
    for path, pair in w.lora.items():
        tensors[f"{LORA_PREFIX}{path}.lora_A.weight"] = pair.lora_A
        tensors[f"{LORA_PREFIX}{path}.lora_B.weight"] = pair.lora_B
        tensors[f"{LORA_PREFIX}{path}.alpha"] = torch.tensor(float(w.lora_config.alpha), dtype=pair.lora_A.dtype)
    for path, ex in w.moe.items():
        tensors[f"{MOE_PREFIX}{path}.router.weight"] = ex.router
        tensors[f"{MOE_PREFIX}{path}.lora_A"] = ex.lora_A
        tensors[f"{MOE_PREFIX}{path}.lora_B"] = ex.lora_B
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}  # no shared storage
    c, lc = w.moe_config, w.lora_config
    metadata = {
        f"{META}format": FORMAT,
        f"{META}format_version": str(FORMAT_VERSION),
        f"{META}base_model": w.base_model,
        f"{META}moe_lora": json.dumps({
            "num_experts": c.num_experts, "rank": c.rank, "alpha": float(c.alpha), "top_k": c.top_k,
            "routing": c.routing, "targets": list(c.targets),
        }),
        f"{META}lora": json.dumps({"rank": lc.rank, "alpha": float(lc.alpha), "targets": list(lc.targets)}),
    }
    if w.train_config is not None:
        metadata[f"{META}train_config"] = json.dumps(w.train_config, sort_keys=True, default=str)
    return tensors, metadata


def from_state_dict(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None,
                    source: str = "the weights") -> MultiCrafterWeights:
    """Parse and validate tensors + metadata (the inverse of ``to_state_dict``)."""
    metadata = dict(metadata or {})
    fmt = metadata.get(f"{META}format")
    if fmt != FORMAT:
        raise ValueError(
            f"{source} is not a MultiCrafter weight file: metadata '{META}format' is {fmt!r}, expected {FORMAT!r}. "
            "A plain LoRA loads with ComfyUI's LoraLoader; MultiCrafter files are written by "
            "multisubject.attention.weights.save_multicrafter_weights"
        )
    version = metadata.get(f"{META}format_version")
    if version != str(FORMAT_VERSION):
        hint = "update the multisubject pack" if _int_or_none(version) and int(version) > FORMAT_VERSION else \
            "re-export the weights with the current trainer"
        raise ValueError(
            f"{source} has MultiCrafter format version {version!r}; this pack reads version {FORMAT_VERSION}; {hint}"
        )
    base = metadata.get(f"{META}base_model")
    if base != BASE_MODEL:
        raise ValueError(
            f"{source} was trained for base model {base!r}, but this loader handles {BASE_MODEL!r} (FLUX.1); use "
            "weights trained on FLUX.1"
        )
    moe_meta = _json_meta(metadata, "moe_lora", source)
    lora_meta = _json_meta(metadata, "lora", source)
    try:
        moe_config = MoELoRAConfig(
            num_experts=moe_meta["num_experts"], rank=moe_meta["rank"], alpha=float(moe_meta["alpha"]),
            top_k=moe_meta["top_k"], routing=moe_meta["routing"], targets=tuple(moe_meta["targets"]),
        )
        lora_config = LoRAConfig(rank=lora_meta["rank"], alpha=float(lora_meta["alpha"]),
                                 targets=tuple(lora_meta["targets"]))
    except KeyError as e:
        raise ValueError(f"{source}: metadata misses the field {e.args[0]!r}") from None
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    problems = moe_target_problems(moe_config.targets)  # first: tensors of a wrong target would only look "missing"
    if problems:
        raise ValueError(f"{source}: {problems[0]}")
    moe: dict[str, MoEExperts] = {}
    lora: dict[str, LoRAPair] = {}
    for path in moe_config.targets:
        group = _tensor_group(tensors, MOE_PREFIX, path, _MOE_SUFFIXES, problems)
        if group is not None:
            moe[path] = MoEExperts(*group)
    for path in lora_config.targets:
        group = _tensor_group(tensors, LORA_PREFIX, path, _LORA_SUFFIXES, problems)
        if group is None:
            continue
        alpha = float(group[2])
        if not math.isclose(alpha, lora_config.alpha, rel_tol=1e-3):
            problems.append(f"{LORA_PREFIX}{path}.alpha is {alpha:g} but the metadata says alpha {lora_config.alpha:g}")
        lora[path] = LoRAPair(group[0], group[1])
    expected = {f"{MOE_PREFIX}{p}{s}" for p in moe_config.targets for s in _MOE_SUFFIXES}
    expected |= {f"{LORA_PREFIX}{p}{s}" for p in lora_config.targets for s in _LORA_SUFFIXES}
    unknown = sorted(set(tensors) - expected)
    if unknown:
        shown = unknown[:6] + (["..."] if len(unknown) > 6 else [])
        problems.append(f"{len(unknown)} tensor(s) not described by the metadata targets: {shown}")
    if problems:
        raise ValueError(f"{source} is damaged or inconsistent: " + "; ".join(problems))
    train_config = json.loads(metadata[f"{META}train_config"]) if f"{META}train_config" in metadata else None
    try:
        return MultiCrafterWeights(moe_config, moe, lora_config, lora, base, train_config)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def _tensor_group(tensors: Mapping[str, Tensor], prefix: str, path: str, suffixes: tuple[str, ...],
                  problems: list[str]) -> list[Tensor] | None:
    """The tensors ``prefix + path + suffix`` in suffix order, or None (and a problem noted) if any is missing."""
    keys = [f"{prefix}{path}{suffix}" for suffix in suffixes]
    missing = [k for k in keys if k not in tensors]
    if missing:
        problems.append(f"missing tensors {missing}")
        return None
    return [tensors[k] for k in keys]


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _json_meta(metadata: Mapping[str, str], name: str, source: str) -> dict:
    key = f"{META}{name}"
    if key not in metadata:
        raise ValueError(f"{source}: metadata misses {key!r}")
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: metadata {key!r} is not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{source}: metadata {key!r} must be a JSON object, got {type(value).__name__}")
    return value


def save_multicrafter_weights(w: MultiCrafterWeights, path: str | Path) -> None:
    """Write ``w`` as one safetensors file (validated again on the way out)."""
    tensors, metadata = to_state_dict(w)
    save_file(tensors, str(path), metadata=metadata)


def load_multicrafter_weights(path: str | Path, device: str | torch.device = "cpu") -> MultiCrafterWeights:
    """Read and validate a MultiCrafter file; raises ValueError naming the file and every problem."""
    tensors, metadata = read_safetensors(path, "MultiCrafter weight", device=str(device))
    return from_state_dict(tensors, metadata, source=Path(path).name)


# checks against a concrete model


def features_of(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a Linear, or of a container of Linears such as an FFN (first in, last out)."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    linears = [m for m in module.modules() if m is not module and hasattr(m, "in_features")]
    return (int(linears[0].in_features), int(linears[-1].out_features)) if linears else None


def module_features(root: nn.Module, w: MultiCrafterWeights) -> dict[str, tuple[int, int]]:
    """``features_of`` every target of ``w`` that exists under ``root`` (e.g. a Flux ``diffusion_model``)."""
    found = {}
    for path in (*w.moe, *w.lora):
        try:
            features = features_of(root.get_submodule(path))
        except AttributeError:
            continue
        if features is not None:
            found[path] = features
    return found


def check_against_model(w: MultiCrafterWeights, features: Mapping[str, tuple[int, int]],
                        model_name: str = "the model") -> None:
    """Raise unless every target exists in the model with matching feature sizes.

    ``features`` maps ComfyUI module paths (relative to ``diffusion_model``) to
    ``(in_features, out_features)``: the Linear layers for the LoRA targets, and each target FFN's
    input / output width for the MoE targets.
    """
    problems = []
    for kind, items in (("MoE", {p: (e.lora_A.shape[2], e.lora_B.shape[1]) for p, e in w.moe.items()}),
                        ("LoRA", {p: (q.lora_A.shape[1], q.lora_B.shape[0]) for p, q in w.lora.items()})):
        for path, (c_in, c_out) in sorted(items.items()):
            if path not in features:
                problems.append(f"{kind} target {path} does not exist in {model_name}")
                continue
            want = tuple(features[path])
            if (int(c_in), int(c_out)) != want:
                problems.append(
                    f"{kind} target {path}: the file has {c_in} -> {c_out} features but {model_name} has "
                    f"{want[0]} -> {want[1]}"
                )
    if problems:
        hint = "the file was trained for another model size or variant; use weights trained on this base model"
        raise ValueError(f"MultiCrafter weights do not fit {model_name}: " + "; ".join(problems) + f". {hint}")
