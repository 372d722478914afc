"""The IPPO policy on FLUX: the IDAR trainer's ComfyUI Flux backend (LoRA + MoE-LoRA) behind ``ippo.Policy``, and
the RL prompt set read from an IDAR manifest and its ``data cache`` (text embeddings and reference latents).

References are fed at every step of every rollout and update (UNO's in-context tokens, clean latents).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..attention.subjects import Subject, Subjects
from ..attention.weights import load_multicrafter_weights
from .cache import LatentCache, TinyEncoder
from .data import ManifestRow, load_image
from .ippo import PromptGroup

Decoder = Callable[[Tensor], Tensor]  # latents (B, C, h, w) -> images (B, H, W, 3) float RGB in [0, 1]


@dataclass(frozen=True)
class GroupConditioning:
    """One prompt's model inputs from the cache.

    Shapes:
        context: (T_txt, D_ctx); pooled: (D_vec); refs: S x (C, h_s, w_s); latent_shape: (C, h, w)
    """

    context: Tensor
    pooled: Tensor
    refs: tuple[Tensor, ...]
    latent_shape: tuple[int, int, int]
    line: int  # manifest line (for error messages)


@dataclass(frozen=True)
class FluxCond:
    """A rollout batch's conditioning, one row per image.

    Shapes:
        context: (B, T_txt, D_ctx); pooled: (B, D_vec); refs: S x (B, C, h_s, w_s)
    """

    context: Tensor
    pooled: Tensor
    refs: tuple[Tensor, ...]


class FluxPolicy(nn.Module):
    """``ippo.Policy`` over ``comfy_backend.FluxBackend``: velocity with text + reference tokens, decode to RGB."""

    def __init__(self, backend: nn.Module, decoder: Decoder, guidance: float, bf16: bool = False) -> None:
        super().__init__()
        self.backend = backend
        self.decoder = decoder
        self.guidance = guidance
        self.bf16 = bf16

    def condition(self, groups: Sequence[PromptGroup], group_size: int) -> FluxCond:
        conds: list[GroupConditioning] = [g.conditioning for g in groups]
        counts = {len(c.refs) for c in conds}
        lengths = {c.context.shape[0] for c in conds}
        if len(counts) > 1 or len(lengths) > 1:
            lines = [c.line for c in conds]
            raise ValueError(f"prompts of manifest lines {lines} cannot share a rollout batch: subject counts "
                             f"{sorted(counts)}, text lengths {sorted(lengths)}; they must match within a batch")
        device = self.device

        def rows(t: Tensor) -> Tensor:
            return t.to(device).repeat_interleave(group_size, 0)

        return FluxCond(
            context=rows(torch.stack([c.context for c in conds])),
            pooled=rows(torch.stack([c.pooled for c in conds])),
            refs=tuple(rows(torch.stack([c.refs[s] for c in conds])) for s in range(counts.pop())),
        )

    def select(self, cond: FluxCond, index: Tensor) -> FluxCond:
        return FluxCond(cond.context[index], cond.pooled[index], tuple(r[index] for r in cond.refs))

    def latent_shape(self, group: PromptGroup) -> tuple[int, int, int]:
        return group.conditioning.latent_shape

    @property
    def device(self) -> torch.device:
        return next(p for _, p in self.backend.trainable_parameters()).device

    def velocity(self, x: Tensor, sigma: Tensor, cond: FluxCond) -> Tensor:
        from .comfy_backend import FluxInputs

        inputs = FluxInputs(x, sigma, cond.context, cond.pooled, list(cond.refs), self.guidance)
        autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with autocast:
            v, _ = self.backend(inputs)
        return v.float()

    def decode(self, latents: Tensor) -> Tensor:
        return self.decoder(latents)


# decoders


class TinyDecoder:
    """Inverse of the cache's ``TinyEncoder`` for tiny models: pseudo-inverse of its 3 -> 16 channel map, then 8x
    nearest upsampling; images in [0, 1]."""

    def __init__(self, encoder: TinyEncoder) -> None:
        self.inverse = torch.linalg.pinv(encoder.channels)  # (3, 16)

    def __call__(self, latents: Tensor) -> Tensor:
        rgb = torch.einsum("rc,bchw->brhw", self.inverse.to(latents), latents.float())  # (B, 3, h, w) in ~[-1, 1]
        rgb = nn.functional.interpolate(rgb, scale_factor=8, mode="nearest")  # (B, 3, H, W)
        return ((rgb + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)  # (B, H, W, 3)


# prompt set


def load_prompt_groups(rows: Sequence[ManifestRow], cache: LatentCache) -> list[PromptGroup]:
    """One ``PromptGroup`` per manifest line: caption, reference subjects (pixels, for the rewards) and the cached
    conditioning (for the model). No layout: the generation never sees the target's masks, so the identity reward
    locates object subjects with its detector (``reward.detector_dir``) instead of scoring them there."""
    if len(rows) != len(cache.samples):
        raise ValueError(f"the manifest has {len(rows)} lines but its cache {cache.dir} has {len(cache.samples)} "
                         "samples; re-run `python -m multisubject data cache`")
    groups = []
    for row, keys in zip(rows, cache.samples):
        if not row.references:
            raise ValueError(f"manifest line {row.line} has no references; every IPPO prompt needs its subjects")
        subjects = Subjects(tuple(
            Subject(images=((load_image(path).permute(1, 2, 0) + 1) / 2)[None], label=label)
            for path, label in zip(row.references, row.labels)
        ))
        context, pooled = cache.text(keys.text)
        target = cache.get(keys.target)
        conditioning = GroupConditioning(context, pooled, tuple(cache.get(k) for k in keys.references),
                                         tuple(target.shape), row.line)
        groups.append(PromptGroup(row.caption, subjects, None, conditioning))
    return groups


# stage-1 weights


def load_stage1_weights(backend: nn.Module, path: str | Path) -> None:
    """Copy a MultiCrafter weight file (the IDAR trainer's export) into the backend's LoRA and MoE-LoRA modules.
    Every adapter of the file must exist in the backend with the same shapes, and vice versa."""
    weights = load_multicrafter_weights(path)
    problems = []
    if set(weights.lora) != set(backend.loras):
        problems.append(f"attention LoRA targets differ (file-only {sorted(set(weights.lora) - set(backend.loras))[:3]}, "
                        f"config-only {sorted(set(backend.loras) - set(weights.lora))[:3]})")
    if set(weights.moe) != set(backend.moes):
        problems.append(f"MoE-LoRA targets differ (file-only {sorted(set(weights.moe) - set(backend.moes))[:3]}, "
                        f"config-only {sorted(set(backend.moes) - set(weights.moe))[:3]})")
    pairs = []
    for p, w in weights.lora.items():
        if p in backend.loras:
            lora = backend.loras[p]
            pairs += [(lora.lora_A, w.lora_A), (lora.lora_B, lora.imported_B(w.lora_B))]
    for p, e in weights.moe.items():
        if p in backend.moes:
            m = backend.moes[p]
            pairs += [(m.router, e.router), (m.lora_A, e.lora_A), (m.lora_B, e.lora_B)]
    bad = [f"{tuple(dst.shape)} vs {tuple(src.shape)}" for dst, src in pairs if dst.shape != src.shape]
    if bad:
        problems.append(f"{len(bad)} tensors differ in shape (config vs file, e.g. {bad[0]}): ranks or expert counts differ")
    if problems:
        raise ValueError(f"init.weights {path} does not fit this config's adapters: " + "; ".join(problems)
                         + ". Use the lora/moe settings of the stage-1 run")
    with torch.no_grad():
        for dst, src in pairs:
            dst.copy_(src.to(dst))
