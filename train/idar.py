"""IDAR trainer (MultiCrafter stage 1): flow loss + lambda * IDAR Dice loss + Switch balance loss, on FLUX through
ComfyUI's own model code. The loop, readable top to bottom (nanoGPT style), over small functions; the run
bookkeeping around it (resume, checkpoints, observers, SIGTERM) is ``run.py``. See README "Training: IDAR".

    python -m multisubject train idar --config cfg.toml [--section.key=value ...]
    torchrun --nproc_per_node=8 -m multisubject train idar --config cfg.toml
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..attention.families import FLUX
from .backend import build_backend, export_weights
from .cache import LatentCache, empty_text_key, file_hash
from .checkpoint import RESUMABLE_KEYS, checkpoint_root
from .config import IDARConfig
from .data import epoch_batches, rank_slice, read_training_manifest
from .distributed import (
    DistInfo,
    all_mean,
    any_rank,
    average_gradients,
    barrier,
    is_sharded,
    setup_distributed,
    teardown_distributed,
)
from .losses import balance_loss, flow_loss, idar_loss, noised, router_load, sample_timesteps
from .run import (
    Observers,
    Position,
    SigtermGuard,
    optimizer_and_schedule,
    prepare_checkpoints,
    restore,
    resume_path,
    sample_generator,
    save,
)

EXPORT_NAME = "multicrafter_idar.safetensors"
log = logging.getLogger("multisubject.train")


# data

@dataclass
class Batch:
    """Shapes: x0 (B, C, h, w); refs: S x (B, C, h_s, w_s); masks (B, S, L); context (B, T_txt, D_ctx);
    pooled (B, D_vec); lines: manifest line numbers (for error messages)."""

    x0: Tensor
    refs: list[Tensor]
    masks: Tensor
    context: Tensor
    pooled: Tensor
    lines: list[int]


def load_batch(cache: LatentCache, ids: list[int], drop_text: list[bool], device: torch.device) -> Batch:
    """Stack cached latents, token masks and text embeddings of samples ``ids`` (same bucket and subject count)."""
    samples = [cache.samples[i] for i in ids]
    texts = [cache.text(empty_text_key(cache.encoder) if drop else s.text) for s, drop in zip(samples, drop_text)]
    lengths = {c.shape[0] for c, _ in texts}
    if len(lengths) > 1:
        raise ValueError(f"captions of manifest lines {[s.line for s in samples]} encode to different lengths "
                         f"{sorted(lengths)}; shorten the long captions to the text encoder's padded length")
    num_refs = len(samples[0].references)
    return Batch(
        x0=torch.stack([cache.get(s.target) for s in samples]).to(device),
        refs=[torch.stack([cache.get(s.references[j]) for s in samples]).to(device) for j in range(num_refs)],
        masks=torch.stack([cache.get(s.masks) for s in samples]).to(device),
        context=torch.stack([c for c, _ in texts]).to(device),
        pooled=torch.stack([p for _, p in texts]).to(device),
        lines=[s.line for s in samples],
    )


def draw_noise(batch_slots: list[int], step: int, cfg: IDARConfig, shape: tuple[int, ...], image_tokens: int
               ) -> tuple[Tensor, Tensor, list[bool]]:
    """Per sample: timestep t, noise, text dropout. Shapes: returns t (B,), noise (B, C, h, w), drops [B]."""
    ts, noises, drops = [], [], []
    for slot in batch_slots:
        gen = sample_generator(cfg.run.seed, step, slot)
        ts.append(sample_timesteps(1, image_tokens, gen, cfg.loss.timestep_shift))
        noises.append(torch.randn(shape, generator=gen))
        drops.append(bool(torch.rand(1, generator=gen) < cfg.data.text_dropout))
    return torch.cat(ts), torch.stack(noises), drops


# model

def idar_blocks(cfg: IDARConfig, num_double_blocks: int) -> list[int]:
    blocks = list(cfg.loss.idar_blocks) or list(range(num_double_blocks))
    bad = [i for i in blocks if not 0 <= i < num_double_blocks]
    if bad:
        raise ValueError(f"loss.idar_blocks {bad} do not exist; this model has double blocks 0..{num_double_blocks - 1}")
    return blocks


# one step

def micro_step(backend, batch: Batch, t: Tensor, noise: Tensor, cfg: IDARConfig, blocks: list[int],
               with_maps: bool) -> dict[str, Tensor]:
    """Forward one micro-batch; returns the loss terms (``total`` carries the gradient)."""
    from .comfy_backend import FluxInputs

    device = batch.x0.device
    x_t = noised(batch.x0, noise.to(device), t.to(device))
    inputs = FluxInputs(x_t, t.to(device), batch.context, batch.pooled, batch.refs, cfg.model.guidance)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.run.precision == "bf16" else nullcontext()
    with autocast:
        v, maps = backend(inputs, idar_blocks=blocks if with_maps else None, capture_checkpoint=True,
                          idar_direction=cfg.loss.idar_direction)
    terms = {"flow": flow_loss(v, noise.to(device), batch.x0)}
    total = terms["flow"]
    if maps:
        weights = (t <= cfg.loss.idar_max_t).float().to(device)
        terms["idar"], dice = idar_loss(maps, batch.masks, cfg.loss.dice_eps, weights)
        terms["dice"] = dice.mean(0)  # (S,) per-subject Dice score, for logging
        if cfg.loss.idar_weight > 0:
            total = total + cfg.loss.idar_weight * terms["idar"]
    if backend.routing:
        terms["balance"] = balance_loss(backend.routing)  # summed over MoE layers, as Switch
        terms["router_load"] = torch.stack([router_load(ex, lg.shape[-1]) for lg, ex in backend.routing]).mean(0)
        if cfg.moe.balance_weight > 0:
            total = total + cfg.moe.balance_weight * terms["balance"]
    terms["total"] = total
    return terms


def check_finite(terms: dict[str, Tensor], step: int, lines: list[int]) -> None:
    bad = {k: float(v.detach()) for k, v in terms.items() if v.ndim == 0 and not torch.isfinite(v)}
    if bad:
        raise RuntimeError(f"non-finite loss at step {step} ({bad}) on the batch of manifest lines {lines}; training "
                           "stopped. Lower optim.lr, check those samples, or resume from the last checkpoint")


# the loop

def train_idar(cfg: IDARConfig) -> Path:
    """Train; returns the exported weight file (or, when stopped by SIGTERM, the checkpoint it saved). Safe to kill
    at any point: re-running resumes (run.resume=auto)."""
    info = setup_distributed()
    try:
        return _train(cfg, info)
    finally:
        teardown_distributed()


def _train(cfg: IDARConfig, info: DistInfo) -> Path:
    out_dir = Path(cfg.run.out_dir)
    manifest = Path(cfg.data.manifest)
    read_training_manifest(manifest)  # refuses to start on missing files, with line numbers
    cache = LatentCache(cfg.data.cache_dir or manifest.parent / "cache", file_hash(manifest))
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(cache.samples):
        groups.setdefault((s.bucket, len(s.references)), []).append(i)
    global_batch = cfg.optim.micro_batch * cfg.optim.grad_accum * info.world_size
    if not epoch_batches(groups, global_batch, cfg.run.seed, 0):
        raise ValueError(f"no (bucket, subject count) group holds a whole global batch of {global_batch} samples "
                         f"(groups: { {str(k): len(v) for k, v in groups.items()} }); lower optim.micro_batch/grad_accum")

    torch.manual_seed(cfg.run.seed)
    backend = build_backend(cfg.model, cfg.lora, cfg.moe, cfg.run, info.device, info)
    blocks = idar_blocks(cfg, backend.num_double_blocks)
    params = [p for _, p in backend.trainable_parameters()]
    optimizer, scheduler = optimizer_and_schedule(params, cfg.optim, cfg.run.max_steps)
    config = cfg.to_dict()
    pos = Position()
    resume = resume_path(cfg.run)
    prepare_checkpoints(cfg.run, resume, info)
    if resume is not None:
        pos = restore(resume, config, RESUMABLE_KEYS, backend, optimizer, scheduler)
        if info.is_main:
            log.info("resumed from %s at step %d", resume, pos.step)

    epoch_cache: tuple[int, list[list[int]]] = (-1, [])
    saved_step = pos.step if resume is not None else -1
    with SigtermGuard() as sigterm, Observers(config, cfg.run, info, pos.step, "idar") as observers:
        while pos.step < cfg.run.max_steps and not sigterm.requested:
            if epoch_cache[0] != pos.epoch:
                epoch_cache = (pos.epoch, epoch_batches(groups, global_batch, cfg.run.seed, pos.epoch))
            if pos.batch >= len(epoch_cache[1]):
                pos.epoch, pos.batch = pos.epoch + 1, 0
                continue
            started = time.perf_counter()
            global_ids = epoch_cache[1][pos.batch]
            mine = rank_slice(global_ids, info.rank, info.world_size)
            metrics = _optimizer_step(backend, cache, mine, info.rank * len(mine), pos.step, cfg, blocks, info)
            grad_norm = _clip_and_step(params, optimizer, scheduler, cfg, info)
            pos.step, pos.batch = pos.step + 1, pos.batch + 1
            metrics.update(grad_norm=grad_norm, lr=torch.tensor(scheduler.get_last_lr()[0]),
                           step_time=torch.tensor(time.perf_counter() - started))
            _log(observers, metrics, pos.step, info)
            sigterm.requested = any_rank(sigterm.requested, info)
            if cfg.run.save_every and pos.step % cfg.run.save_every == 0:
                save(backend, optimizer, scheduler, pos, config, cfg.run, info)
                saved_step = pos.step
            preview = observers.preview_path(pos.step, "step")
            if preview is not None:
                from .preview import write_preview

                write_preview(backend, cache, epoch_cache[1][0][0], cfg, blocks, preview)
        if saved_step != pos.step:
            save(backend, optimizer, scheduler, pos, config, cfg.run, info)
        if sigterm.requested:
            log.info("stopped by SIGTERM at step %d; checkpoint saved; run the same command again to resume", pos.step)
            return checkpoint_root(out_dir) / f"step_{pos.step:08d}"
    export = export_weights(backend, config, out_dir / EXPORT_NAME, write=info.is_main)
    barrier(info)
    return export


def _optimizer_step(backend, cache: LatentCache, mine: list[int], slot0: int, step: int, cfg: IDARConfig,
                    blocks: list[int], info: DistInfo) -> dict[str, Tensor]:
    """Gradient accumulation over this rank's micro-batches; returns the mean loss terms (detached)."""
    sums: dict[str, Tensor] = {}
    micro, accum = cfg.optim.micro_batch, cfg.optim.grad_accum
    with_maps = cfg.loss.idar_weight > 0 or (cfg.run.log_every and (step + 1) % cfg.run.log_every == 0)
    for m in range(accum):
        ids = mine[m * micro:(m + 1) * micro]
        slots = list(range(slot0 + m * micro, slot0 + (m + 1) * micro))
        sample = cache.get(cache.samples[ids[0]].target)
        tokens = math.prod(FLUX.token_grid(*sample.shape[-2:]))
        t, noise, drops = draw_noise(slots, step, cfg, tuple(sample.shape), tokens)
        batch = load_batch(cache, ids, drops, info.device)
        terms = micro_step(backend, batch, t, noise, cfg, blocks, with_maps)
        check_finite(terms, step + 1, batch.lines)
        (terms["total"] / accum).backward()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0) + v.detach().float().cpu() / accum
    return sums


def _clip_and_step(params, optimizer, scheduler, cfg: IDARConfig, info: DistInfo) -> Tensor:
    if not is_sharded(params):  # FSDP already reduce-scattered the gradients
        average_gradients(params, info)
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or float("inf"))  # inf: measure, never clip
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    if not torch.isfinite(norm):
        raise RuntimeError(f"non-finite gradient norm ({float(norm)}) at step {scheduler.last_epoch + 1}; training "
                           "stopped. Lower optim.lr or resume from the last checkpoint")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.detach().cpu()


# observability

def _log(observers: Observers, metrics: dict[str, Tensor], step: int, info: DistInfo) -> None:
    """Means over ranks to the progress bar and TensorBoard (per-subject Dice and per-expert load as one scalar each)."""
    scalars = {k: all_mean(v, info) for k, v in metrics.items()}
    observers.progress(loss=f"{float(scalars['total']):.4f}")
    flat = {}
    for key, value in scalars.items():
        if value.ndim == 0:
            flat[f"train/{key}"] = value
        else:
            name = "dice/subject" if key == "dice" else f"{key}/expert"
            flat |= {f"{name}_{i}": item for i, item in enumerate(value.tolist())}
    observers.scalars(flat, step)
