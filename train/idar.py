"""IDAR trainer (MultiCrafter stage 1): flow loss + lambda * IDAR Dice loss + Switch balance loss, on FLUX through
ComfyUI's own model code. A readable loop (nanoGPT style) over small functions; see README "Training: IDAR".

    python -m multisubject train idar --config cfg.toml [--section.key=value ...]
    torchrun --nproc_per_node=8 -m multisubject train idar --config cfg.toml
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..attention.weights import LoRAConfig as WeightsLoRAConfig
from ..attention.weights import (
    LoRAPair,
    MoEExperts,
    MultiCrafterWeights,
    check_against_model,
    module_features,
    save_multicrafter_weights,
)
from .cache import LatentCache, empty_text_key, file_hash
from .checkpoint import checkpoint_root, list_checkpoints, load_checkpoint, save_checkpoint, set_rng_state
from .config import IDARConfig
from .data import epoch_batches, rank_slice, read_manifest
from .distributed import (
    DistInfo,
    all_mean,
    any_rank,
    average_gradients,
    barrier,
    full_optimizer_state,
    full_trainable_state,
    is_sharded,
    load_optimizer_state,
    load_trainable_state,
    setup_distributed,
    shard_flux,
    teardown_distributed,
)
from .losses import balance_loss, flow_loss, idar_loss, noised, router_load, sample_timesteps

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


def sample_generator(seed: int, step: int, slot: int) -> torch.Generator:
    """Randomness of one sample of one step, a pure function of (seed, step, position in the global batch): the
    same sample draws the same noise however the batch is split over ranks and micro-batches, and resume needs no
    generator state."""
    digest = hashlib.sha256(f"{seed}/{step}/{slot}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


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

def build_backend(cfg: IDARConfig, device: torch.device, info: DistInfo | None = None):
    """ComfyUI's Flux with the configured adapters on ``device``; with ``run.fsdp`` under torchrun, sharded."""
    from .comfy_backend import FluxBackend, load_flux  # imports ComfyUI

    base_dtype = torch.bfloat16 if cfg.run.precision == "bf16" and device.type == "cuda" else torch.float32
    flux = load_flux(cfg.model, dtype=base_dtype, seed=cfg.run.seed).model.diffusion_model
    backend = FluxBackend(flux, cfg.lora, cfg.moe, cfg.run.grad_checkpointing).to(device)
    for _, p in backend.trainable_parameters():
        p.data = p.data.float()  # adapters train in fp32 whatever the base dtype
    if cfg.run.fsdp and info is not None and info.world_size > 1:
        shard_flux(backend.flux, info)
    return backend


def idar_blocks(cfg: IDARConfig, num_double_blocks: int) -> list[int]:
    blocks = list(cfg.loss.idar_blocks) or list(range(num_double_blocks))
    bad = [i for i in blocks if not 0 <= i < num_double_blocks]
    if bad:
        raise ValueError(f"loss.idar_blocks {bad} do not exist; this model has double blocks 0..{num_double_blocks - 1}")
    return blocks


def lr_factor(step: int, cfg: IDARConfig) -> float:
    """Linear warmup, then constant / cosine / linear decay to 0 at run.max_steps."""
    o = cfg.optim
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - o.warmup_steps) / max(1, cfg.run.max_steps - o.warmup_steps))
    return 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1.0 - progress


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

@dataclass
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch: int = 0  # global batches of this epoch already consumed


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
    read_manifest(manifest)  # refuses to start on missing files, with line numbers
    cache = LatentCache(cfg.data.cache_dir or manifest.parent / "cache", file_hash(manifest))
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(cache.samples):
        groups.setdefault((s.bucket, len(s.references)), []).append(i)
    global_batch = cfg.optim.micro_batch * cfg.optim.grad_accum * info.world_size
    if not epoch_batches(groups, global_batch, cfg.run.seed, 0):
        raise ValueError(f"no (bucket, subject count) group holds a whole global batch of {global_batch} samples "
                         f"(groups: { {str(k): len(v) for k, v in groups.items()} }); lower optim.micro_batch/grad_accum")

    torch.manual_seed(cfg.run.seed)
    backend = build_backend(cfg, info.device, info)
    blocks = idar_blocks(cfg, backend.num_double_blocks)
    named = backend.trainable_parameters()
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    pos = Position()

    resume = _resume_path(cfg, out_dir)
    if resume is not None:
        state = load_checkpoint(resume, cfg.to_dict())
        load_trainable(backend, state["trainable"], resume)
        load_optimizer_state(backend, optimizer, state["optimizer"], is_sharded(params))
        scheduler.load_state_dict(state["scheduler"])
        pos = Position(**state["position"])
        set_rng_state(state["rng"])
        if info.is_main:
            log.info("resumed from %s at step %d", resume, pos.step)

    stop = {"sigterm": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))
    writer, bar = _observers(cfg, info, out_dir, pos.step)
    epoch_cache: tuple[int, list[list[int]]] = (-1, [])
    saved_step = pos.step if resume is not None else -1
    try:
        while pos.step < cfg.run.max_steps and not stop["sigterm"]:
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
            _log(writer, bar, metrics, pos.step, cfg, info)
            stop["sigterm"] = any_rank(stop["sigterm"], info)
            if cfg.run.save_every and pos.step % cfg.run.save_every == 0:
                _save(backend, optimizer, scheduler, pos, cfg, out_dir, info)
                saved_step = pos.step
            if cfg.run.sample_every and pos.step % cfg.run.sample_every == 0 and info.is_main:
                from .preview import write_preview

                write_preview(backend, cache, epoch_cache[1][0][0], cfg, blocks, out_dir / "samples" / f"step_{pos.step:08d}.png")
        if saved_step != pos.step:
            _save(backend, optimizer, scheduler, pos, cfg, out_dir, info)
        if stop["sigterm"]:
            log.info("stopped by SIGTERM at step %d; checkpoint saved; run the same command again to resume", pos.step)
            return checkpoint_root(out_dir) / f"step_{pos.step:08d}"
        export = export_weights(backend, cfg, out_dir / EXPORT_NAME, write=info.is_main)
        barrier(info)
        return export
    finally:
        signal.signal(signal.SIGTERM, previous)
        if writer is not None:
            writer.close()
        if bar is not None:
            bar.close()


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
        tokens = ((sample.shape[-2] + 1) // 2) * ((sample.shape[-1] + 1) // 2)
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


def _resume_path(cfg: IDARConfig, out_dir: Path) -> Path | None:
    if cfg.run.resume == "":
        return None
    if cfg.run.resume == "auto":
        found = list_checkpoints(out_dir)
        return found[-1] if found else None
    path = Path(cfg.run.resume)
    if not path.is_dir():
        raise ValueError(f"run.resume {path} does not exist; give a folder under {out_dir}/checkpoints, 'auto' or ''")
    return path


def _save(backend, optimizer, scheduler, pos: Position, cfg: IDARConfig, out_dir: Path, info: DistInfo) -> None:
    named = backend.trainable_parameters()
    trainable = full_trainable_state(named)  # collectives under FSDP: every rank takes part
    optim_state = full_optimizer_state(backend, optimizer, is_sharded([p for _, p in named]))
    if info.is_main:
        save_checkpoint(out_dir, pos.step, {"trainable": trainable, "optimizer": optim_state,
                                            "scheduler": scheduler.state_dict(), "position": vars(pos).copy()},
                        cfg.to_dict(), cfg.run.keep_last)
    barrier(info)


# observability

def _observers(cfg: IDARConfig, info: DistInfo, out_dir: Path, step: int, desc: str = "idar"):
    if not info.is_main:
        return None, None
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    writer = bar = None
    try:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=step or None)
    except ImportError:
        log.warning("tensorboard not installed (pip install '.[train]'); scalars are not logged")
    if cfg.run.progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=cfg.run.max_steps, initial=step, desc=desc, dynamic_ncols=True)
        except ImportError:
            pass
    return writer, bar


def _log(writer, bar, metrics: dict[str, Tensor], step: int, cfg: IDARConfig, info: DistInfo) -> None:
    scalars = {k: all_mean(v, info) for k, v in metrics.items()}
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{float(scalars['total']):.4f}")
    if writer is None or not cfg.run.log_every or step % cfg.run.log_every:
        return
    for key, value in scalars.items():
        if value.ndim == 0:
            writer.add_scalar(f"train/{key}", float(value), step)
        else:
            for i, item in enumerate(value.tolist()):
                name = "dice/subject" if key == "dice" else f"{key}/expert"
                writer.add_scalar(f"{name}_{i}", item, step)


# export

def export_weights(backend, cfg: IDARConfig, path: str | Path, write: bool = True) -> Path:
    """Write the trained adapters in THE MultiCrafter format (``attention/weights.py``) with the resolved config in
    its metadata; the MultiCrafter loader node reads this file. Under FSDP every rank calls this (the adapters are
    gathered); only ``write`` ranks write."""
    from ..attention.moe_lora import MoELoRAConfig

    full = full_trainable_state(backend.trainable_parameters())
    if not write:
        return Path(path)

    prefixes = {id(m): n for n, m in backend.named_modules()}

    def tensor(module, attr: str) -> Tensor:
        return full[f"{prefixes[id(module)]}.{attr}"].float()

    lora = {p: LoRAPair(tensor(m, "lora_A"), m.exported_B(tensor(m, "lora_B"))) for p, m in backend.loras.items()}
    lora_config = WeightsLoRAConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha or float(cfg.lora.rank),
                                    targets=tuple(lora)) if lora else WeightsLoRAConfig(targets=())
    moe_config = backend.moe_config or MoELoRAConfig(targets=())
    moe = {p: MoEExperts(*(tensor(m, a) for a in ("router", "lora_A", "lora_B"))) for p, m in backend.moes.items()}
    weights = MultiCrafterWeights(moe_config, moe, lora_config, lora, train_config=cfg.to_dict())
    check_against_model(weights, module_features(backend.flux, weights), "the trained model")  # as the loader does
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_multicrafter_weights(weights, tmp)
    tmp.replace(path)
    return path


def export_checkpoint(cfg: IDARConfig, checkpoint: str | Path, out: str | Path) -> Path:
    """Export the adapters of a checkpoint folder (e.g. after an interrupted run)."""
    backend = build_backend(cfg, torch.device("cpu"))
    state = load_checkpoint(checkpoint, cfg.to_dict())
    load_trainable(backend, state["trainable"], checkpoint)
    return export_weights(backend, cfg, out)


def load_trainable(backend, trainable: dict[str, Tensor], source) -> None:
    named = backend.trainable_parameters()
    names = {n for n, _ in named}
    if names != set(trainable):
        raise ValueError(f"checkpoint {source} holds other adapter parameters than this config builds "
                         f"(missing {sorted(names - set(trainable))[:4]}, extra {sorted(set(trainable) - names)[:4]})")
    load_trainable_state(named, trainable)


@torch.no_grad()
def evaluate_dice(backend, cache: LatentCache, cfg: IDARConfig, ids: list[int] | None = None,
                  t_values: tuple[float, ...] = (0.25, 0.5, 0.75), seed: int = 1234) -> float:
    """Mean soft Dice score (1 - Dice loss) between the IDAR attention maps and the masks, over samples ``ids``
    (default: all) at fixed timesteps with fixed noise: how well the model's reference->image attention follows
    the subjects' regions."""
    device = next(p for _, p in backend.trainable_parameters()).device
    blocks = idar_blocks(cfg, backend.num_double_blocks)
    scores = []
    for i in ids if ids is not None else range(len(cache.samples)):
        batch = load_batch(cache, [i], [False], device)
        for t_value in t_values:
            gen = torch.Generator().manual_seed(seed + i)
            noise = torch.randn(batch.x0.shape, generator=gen).to(device)
            t = torch.full((1,), t_value)
            from .comfy_backend import FluxInputs

            inputs = FluxInputs(noised(batch.x0, noise, t.to(device)), t.to(device), batch.context, batch.pooled,
                                batch.refs, cfg.model.guidance)
            _, maps = backend(inputs, idar_blocks=blocks, idar_direction=cfg.loss.idar_direction)
            _, dice = idar_loss(maps, batch.masks, cfg.loss.dice_eps)
            scores.append(dice.mean())
    return float(torch.stack(scores).mean())


def load_run(cfg: IDARConfig, checkpoint: str | Path | None = None, device: str = "cpu"):
    """A backend with the adapters of ``checkpoint`` (default: the run's latest), for evaluation or export."""
    backend = build_backend(cfg, torch.device(device))
    path = Path(checkpoint) if checkpoint else list_checkpoints(cfg.run.out_dir)[-1]
    load_trainable(backend, load_checkpoint(path, cfg.to_dict())["trainable"], path)
    return backend
