"""The trainers' FLUX backend with its adapters: built from the config sections it uses, loaded from a checkpoint's
tensors, exported in THE MultiCrafter weight format (``attention/weights.py``). ComfyUI is imported (through
``comfy_backend``) only when a backend is built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..attention.families import FLUX
from ..attention.moe_lora import MoELoRAConfig
from ..attention.weights import LoRAConfig as CoreLoRAConfig
from ..attention.weights import (
    LoRAPair,
    MoEExperts,
    MultiCrafterWeights,
    check_against_model,
    module_features,
    save_multicrafter_weights,
)
from .config import LoRAConfig, ModelConfig, MoEConfig, RunConfig
from .distributed import DistInfo, full_trainable_state, load_trainable_state, shard_flux


def build_backend(model: ModelConfig, lora: LoRAConfig, moe: MoEConfig, run: RunConfig, device: torch.device,
                  info: DistInfo | None = None):
    """ComfyUI's Flux (``model``) with the ``lora``/``moe`` adapters on ``device``, in ``run.precision``; with
    ``run.fsdp`` under torchrun, sharded. Adapters train in fp32 whatever the base dtype."""
    from .comfy_backend import FluxBackend, load_flux  # imports ComfyUI

    base_dtype = torch.bfloat16 if run.precision == "bf16" and device.type == "cuda" else torch.float32
    flux = load_flux(model, dtype=base_dtype, seed=run.seed).model.diffusion_model
    double_blocks = len(getattr(flux, FLUX.double_blocks))
    core_lora = lora.to_core(double_blocks, len(flux.single_blocks))
    backend = FluxBackend(flux, core_lora, moe.to_core(double_blocks), run.grad_checkpointing,
                          lora.out_rows(core_lora, flux.hidden_size)).to(device)
    for _, p in backend.trainable_parameters():
        p.data = p.data.float()
    if run.fsdp and info is not None and info.world_size > 1:
        shard_flux(backend.flux, info)
    return backend


def load_trainable(backend, trainable: dict[str, Tensor], source) -> None:
    """Copy a checkpoint's adapter tensors into ``backend``; refuses a checkpoint of other adapters."""
    named = backend.trainable_parameters()
    names = {n for n, _ in named}
    if names != set(trainable):
        raise ValueError(f"checkpoint {source} holds other adapter parameters than this config builds "
                         f"(missing {sorted(names - set(trainable))[:4]}, extra {sorted(set(trainable) - names)[:4]})")
    load_trainable_state(named, trainable)


def export_weights(backend, train_config: dict[str, Any], path: str | Path, write: bool = True) -> Path:
    """Write the trained adapters in THE MultiCrafter format with ``train_config`` (the resolved config) in its
    metadata; the MultiCrafter loader node reads this file. Under FSDP every rank calls this (the adapters are
    gathered); only ``write`` ranks write."""
    full = full_trainable_state(backend.trainable_parameters())
    if not write:
        return Path(path)

    prefixes = {id(m): n for n, m in backend.named_modules()}

    def tensor(module, attr: str) -> Tensor:
        return full[f"{prefixes[id(module)]}.{attr}"].float()

    # a LoRA on part of its Linear's outputs is stored as one of the whole Linear (zero rows past its own)
    lora = {p: LoRAPair(tensor(m, "lora_A"), m.exported_B(tensor(m, "lora_B"))) for p, m in backend.loras.items()}
    moe = {p: MoEExperts(*(tensor(m, a) for a in ("router", "lora_A", "lora_B"))) for p, m in backend.moes.items()}
    weights = MultiCrafterWeights(backend.moe_config or MoELoRAConfig(targets=()), moe,
                                  backend.lora_config or CoreLoRAConfig(targets=()), lora, train_config=train_config)
    check_against_model(weights, module_features(backend.flux, weights), "the trained model")  # as the loader does
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_multicrafter_weights(weights, tmp)
    tmp.replace(path)
    return path


def load_run(config, checkpoint: str | Path | None = None, device: str = "cpu"):
    """A backend with the adapters of ``checkpoint`` (default: the run's newest), for evaluation or export.
    ``config``: the run's IDAR or IPPO config."""
    from .checkpoint import list_checkpoints, load_checkpoint

    backend = build_backend(config.model, config.lora, config.moe, config.run, torch.device(device))
    path = Path(checkpoint) if checkpoint else list_checkpoints(config.run.out_dir)[-1]
    load_trainable(backend, load_checkpoint(path, config.to_dict())["trainable"], path)
    return backend


def export_checkpoint(config, checkpoint: str | Path, out: str | Path) -> Path:
    """Export the adapters of a checkpoint folder (e.g. of an interrupted run) as a MultiCrafter weight file."""
    return export_weights(load_run(config, checkpoint), config.to_dict(), out)
