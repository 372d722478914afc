"""IPPO trainer (MultiCrafter stage 2): online RL with GSPO and the Multi-ID reward, on FLUX through ComfyUI's own
model code. The loop reads like the algorithm box; every step is a function of ``ippo.py``. See README
"Training: IPPO (stage 2)".

    python -m multisubject train ippo --config cfg.toml [--section.key=value ...]
    torchrun --nproc_per_node=8 -m multisubject train ippo --config cfg.toml

Distribution: every rank samples whole prompt groups (``sampler.groups_per_rank`` per iteration), scores them and
normalizes advantages within each group, so no rank needs another's rewards to learn; gradients are averaged over
ranks (one optimizer step per iteration), and rewards are gathered only for logging. With ``reward.ranks = N`` the
last N ranks hold the reward models and only score (``reward_ranks.py``); the others only generate.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from ..attention.families import FLUX
from .backend import build_backend, export_weights
from .cache import LatentCache, TinyEncoder, file_hash
from .checkpoint import RESUMABLE_KEYS, load_checkpoint
from .data import epoch_batches, rank_slice, read_training_manifest
from .distributed import DistInfo, any_rank, average_gradients, barrier, setup_distributed, teardown_distributed
from .ippo import IterationResult, PromptGroup, ippo_iteration
from .ippo_config import IPPOConfig
from .ippo_flux import FluxPolicy, TinyDecoder, load_prompt_groups, load_stage1_weights
from .reward_ranks import RemoteScorer, Roles, serve_rewards
from .rewards import REWARD_RESUMABLE_KEYS, build_rewards, check_reward_config, load_plugins
from .rollout_preview import render_rollout_grid
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
from .sde import sigma_schedule

EXPORT_NAME = "multicrafter_ippo.safetensors"
# config keys that may change when resuming: the IDAR ones, plus where the reward models are and who runs them, and
# the stage-1 file (the checkpoint's adapters replace it anyway)
RESUMABLE = RESUMABLE_KEYS + REWARD_RESUMABLE_KEYS + ("reward.device", "reward.ranks", "init.weights")
log = logging.getLogger("multisubject.train")


# setup


def build_policy(cfg: IPPOConfig, device: torch.device) -> FluxPolicy:
    """Flux + attention LoRA + MoE-LoRA (from the stage-1 weights when given) and a latent decoder."""
    backend = build_backend(cfg.model, cfg.lora, cfg.moe, cfg.run, device)
    if cfg.init.weights:
        load_stage1_weights(backend, cfg.init.weights)
    if cfg.model.tiny:
        decoder = TinyDecoder(TinyEncoder(cfg.model.tiny_context_dim, cfg.model.tiny_vec_dim))
    else:
        from .comfy_backend import load_vae_decoder

        decoder = load_vae_decoder(cfg.model, device)
    bf16 = cfg.run.precision == "bf16" and device.type == "cuda"
    return FluxPolicy(backend, decoder, cfg.sampler.guidance, bf16)


def load_prompts(cfg: IPPOConfig) -> list[PromptGroup]:
    manifest = Path(cfg.data.manifest)
    rows = read_training_manifest(manifest)  # refuses to start on missing files, with line numbers
    cache = LatentCache(cfg.data.cache_dir or manifest.parent / "cache", file_hash(manifest))
    return load_prompt_groups(rows, cache)


def prompt_buckets(groups: list[PromptGroup]) -> dict[tuple, list[int]]:
    """Prompts that can share a rollout batch: same latent size, subject count and text length."""
    buckets: dict[tuple, list[int]] = {}
    for i, g in enumerate(groups):
        c = g.conditioning
        buckets.setdefault((c.latent_shape, len(c.refs), c.context.shape[0]), []).append(i)
    return buckets


# the loop


def train_ippo(cfg: IPPOConfig) -> Path:
    """Train; returns the exported weight file. Safe to kill at any point: re-running resumes (run.resume=auto)."""
    info = setup_distributed()
    try:
        return _train(cfg, info)
    finally:
        teardown_distributed()


def _train(cfg: IPPOConfig, world: DistInfo) -> Path:
    out_dir = Path(cfg.run.out_dir)
    roles = Roles.split(world.world_size, cfg.reward.ranks)
    scoring_here = cfg.reward.ranks == 0 or world.rank in roles.scorers
    # every rank checks the reward config (fails fast on unknown rewards or missing files); scorers load the models
    rewards = build_rewards(cfg.reward) if scoring_here else {}
    check_reward_config(cfg.reward, load_plugins(cfg.reward.plugins))
    weights = cfg.reward.active()
    prompts = load_prompts(cfg)
    buckets = prompt_buckets(prompts)
    # the generating ranks: all of them, or all but the last reward.ranks, with their own process group
    group = dist.new_group(list(roles.generators)) if cfg.reward.ranks else None
    resume = resume_path(cfg.run)
    prepare_checkpoints(cfg.run, resume, world)  # every rank, scorers included, waits for the tidy-up
    if world.rank in roles.scorers:
        start_step = load_checkpoint(resume, cfg.to_dict(), RESUMABLE)["position"]["step"] if resume is not None else 0
        serve_rewards(rewards, prompts, cfg.sampler.rollout.group_size, cfg.sampler.groups_per_rank, roles, world,
                      start_step, cfg.run.save_every)
        return out_dir / EXPORT_NAME
    info = DistInfo(roles.generators.index(world.rank), len(roles.generators), world.local_rank, world.device)
    global_groups = cfg.sampler.groups_per_rank * info.world_size
    if not epoch_batches(buckets, global_groups, cfg.run.seed, 0):
        raise ValueError(f"no set of compatible prompts holds {global_groups} prompt groups (groups_per_rank x ranks); "
                         f"sizes: { {str(k): len(v) for k, v in buckets.items()} }; lower sampler.groups_per_rank")

    torch.manual_seed(cfg.run.seed)
    policy = build_policy(cfg, info.device)
    params = [p for _, p in policy.backend.trainable_parameters()]
    optimizer, scheduler = optimizer_and_schedule(params, cfg.optim, cfg.run.max_steps)
    config = cfg.to_dict()
    pos = Position()
    if resume is not None:
        pos = restore(resume, config, RESUMABLE, policy.backend, optimizer, scheduler)
        if info.is_main:
            log.info("resumed from %s at iteration %d", resume, pos.step)

    remote = None
    if cfg.reward.ranks:
        remote = RemoteScorer(roles.scorer_of(world.rank), sorted(weights), cfg.sampler.rollout.group_size, world.device)
    epoch: tuple[int, list[list[int]]] = (-1, [])
    saved_step = pos.step if resume is not None else -1
    with SigtermGuard() as sigterm, Observers(config, cfg.run, info, pos.step, "ippo") as observers:
        while pos.step < cfg.run.max_steps and not sigterm.requested:
            if epoch[0] != pos.epoch:
                epoch = (pos.epoch, epoch_batches(buckets, global_groups, cfg.run.seed, pos.epoch))
            if pos.batch >= len(epoch[1]):
                pos.epoch, pos.batch = pos.epoch + 1, 0
                continue
            slots = rank_slice(list(range(global_groups)), info.rank, info.world_size)  # global group positions
            indices = [epoch[1][pos.batch][k] for k in slots]
            mine = [prompts[i] for i in indices]
            sigmas = _sigmas(cfg, mine[0])
            result = ippo_iteration(
                policy, params, optimizer, mine, rewards, weights, cfg.sampler.rollout, cfg.gspo, sigmas,
                cfg.sampler.window.steps(pos.step), [sample_generator(cfg.run.seed, pos.step, k) for k in slots],
                cfg.optim.micro_batch, cfg.optim.grad_clip, info.device,
                sync_gradients=lambda ps: average_gradients(ps, info, group),
                any_rank=lambda flag: any_rank(flag, info, group),
                remote=None if remote is None else _Submit(remote, pos.step, indices),
            )
            scheduler.step()
            pos.step, pos.batch = pos.step + 1, pos.batch + 1
            _log(observers, result, scheduler.get_last_lr()[0], pos.step, info, group)
            sigterm.requested = any_rank(sigterm.requested, info, group)  # every generator stops after the same iteration
            preview = observers.preview_path(pos.step, "iter")
            if preview is not None:
                _preview(result, mine, cfg, preview)
            if cfg.run.save_every and pos.step % cfg.run.save_every == 0:
                save(policy.backend, optimizer, scheduler, pos, config, cfg.run, world)  # world: scorers join barriers
                saved_step = pos.step
        final_save = saved_step != pos.step
        if remote is not None:
            remote.finish(final_save)
        if final_save:
            save(policy.backend, optimizer, scheduler, pos, config, cfg.run, world)
        stopped = sigterm.requested
    export = out_dir / EXPORT_NAME
    if info.is_main and not stopped:
        export_weights(policy.backend, config, export)
    barrier(world)
    return export


def _sigmas(cfg: IPPOConfig, group: PromptGroup) -> Tensor:
    _, h, w = group.conditioning.latent_shape
    tokens = math.prod(FLUX.token_grid(h, w))
    return sigma_schedule(cfg.sampler.window.num_steps, image_seq_len=tokens if cfg.sampler.time_shift else None)


class _Submit:
    """``ippo.GroupScorer`` over a ``RemoteScorer``: binds the iteration and the prompt indices of this batch."""

    def __init__(self, remote: RemoteScorer, iteration: int, indices: list[int]) -> None:
        self.remote, self.iteration, self.indices = remote, iteration, indices

    def submit(self, position: int, images: Tensor) -> None:
        self.remote.submit(self.iteration, self.indices[position], images)

    def collect(self):
        return self.remote.collect()


# observability


def iteration_metrics(result: IterationResult, lr: float) -> dict[str, Tensor]:
    """This rank's scalars of one iteration (see README for what each means)."""
    adv = result.advantages
    metrics = {f"reward/{name}": s.mean() for name, s in result.rewards.scores.items()}
    metrics |= {f"time/reward_{name}": torch.tensor(s) for name, s in result.rewards.seconds.items()}
    metrics |= {f"time/{name}": torch.tensor(s) for name, s in result.seconds.items()}
    metrics |= {"advantage/mean": adv.mean(), "advantage/std": adv.std(unbiased=False), "advantage/abs_max": adv.abs().max(),
                "window/start": torch.tensor(float(result.window[0])), "lr": torch.tensor(lr),
                "update/skipped": torch.tensor(float(result.loss is None))}
    if result.loss is not None:
        metrics |= {f"gspo/{k}": torch.tensor(v) for k, v in result.loss.stats().items()}
    return {k: v.detach().float().cpu() for k, v in metrics.items()}


def _log(observers: Observers, result: IterationResult, lr: float, step: int, info: DistInfo, group=None) -> None:
    metrics = iteration_metrics(result, lr)
    if info.world_size > 1:  # every rank has the same keys: the same rewards, and the update is skipped on all or none
        keys = sorted(metrics)
        values = torch.stack([metrics[k] for k in keys]).to(info.device)
        dist.all_reduce(values, group=group)
        metrics = dict(zip(keys, (values / info.world_size).cpu()))
    observers.progress(**{k.split("/")[1]: f"{float(v):.3f}" for k, v in metrics.items() if k.startswith("reward/")})
    observers.scalars(metrics, step)


def _preview(result: IterationResult, groups: list[PromptGroup], cfg: IPPOConfig, path: Path) -> None:
    grid = render_rollout_grid(result.images, result.rewards.scores, result.advantages, cfg.sampler.rollout.group_size,
                               [g.prompt for g in groups])
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
