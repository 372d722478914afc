"""Time split of one IPPO iteration (rollout, reward, update) on ComfyUI's Flux class at a small-but-not-trivial size
with random weights: 16 denoising steps with a 2-step SDE window, 2 prompt groups x 6 images at 128 px, two 64 px
references per prompt, attention LoRA + MoE-LoRA. The reward is a cheap stand-in (image brightness), so ``reward_s``
is the loop's own overhead; real reward models add their own time (logged per reward as time/reward_<name>).

The rollout runs K = 16 forwards without gradients; the update recomputes only the W = 2 window steps with
gradients (forward + backward), so it should cost no more than the rollout it learns from. The update is timed as
GSPO takes it (``gspo.minibatches = 4``: each group's 6 trajectories dealt 2, 2, 1, 1 into 4 shuffled mini-batches
of 4, 4, 2, 2, one optimizer step each) side by side with the one-step GRPO-equivalent ablation
(``minibatches = 1``): both recompute every trajectory once, so the difference is the smaller matmuls, the extra
optimizer steps and gradient syncs.

    python bench/ippo_iteration.py [--device cpu|cuda] [--quick] [--real-dims] [--reps 3] [--threads 1]

``--real-dims`` (CUDA only): FLUX.1 sizes (hidden 3072, 19+38 blocks, LoRA r512, MoE 4x r128, bf16, block
checkpointing) at 512 px with two 320 px references and 512 text tokens; the update runs in micro-batches of 4.

Last line: JSON with rollout_s, reward_s, update_s (medians, 4 mini-batches), update_one_step_s,
update_over_rollout and minibatches_over_one_step.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass

import harness
import torch

from multisubject.attention.subjects import Subject, Subjects
from multisubject.train.gspo import GSPOConfig
from multisubject.train.ippo import PromptGroup, RolloutConfig, ippo_iteration
from multisubject.train.ippo_config import load_ippo_config
from multisubject.train.ippo_flux import GroupConditioning
from multisubject.train.ippo_trainer import build_policy
from multisubject.train.sde import WindowSchedule, sigma_schedule

GROUPS, GROUP_SIZE, STEPS, WINDOW = 2, 6, 16, 2
TARGETS = {"update_over_rollout": ("<=", 1.0), "peak_mib": None}


@dataclass(frozen=True)
class Sizes:
    config: tuple[str, ...]  # config overrides (model size, adapters, precision)
    resolution: int  # output px
    ref: int  # reference px
    text: int  # text tokens
    micro_batch: int  # trajectories per backward pass in the update


COMMON = ("--model.tiny=true", "--reward.weights={'brightness': 1.0}")
SMALL = Sizes(COMMON + ("--model.tiny_hidden=128", "--model.tiny_heads=4", "--model.tiny_depth=2",
                        "--model.tiny_depth_single=2", "--lora.rank=16", "--moe.rank=16", "--run.precision=fp32",
                        "--run.grad_checkpointing=false"), 128, 64, 16, GROUPS * GROUP_SIZE)
FLUX1 = Sizes(COMMON + ("--model.tiny_hidden=3072", "--model.tiny_heads=24", "--model.tiny_depth=19",
                        "--model.tiny_depth_single=38", "--model.tiny_context_dim=4096", "--model.tiny_vec_dim=768",
                        "--lora.rank=512", "--moe.rank=128", "--run.precision=bf16",
                        "--run.grad_checkpointing=true"), 512, 320, 512, 4)


def brightness(inputs) -> torch.Tensor:
    return inputs.images.mean((1, 2, 3))


def prompt_groups(cfg, sizes: Sizes) -> list[PromptGroup]:
    gen = torch.Generator().manual_seed(0)
    latent = (16, sizes.resolution // 8, sizes.resolution // 8)
    ref = sizes.ref
    groups = []
    for i in range(GROUPS):
        conditioning = GroupConditioning(
            context=torch.randn(sizes.text, cfg.model.tiny_context_dim, generator=gen),
            pooled=torch.randn(cfg.model.tiny_vec_dim, generator=gen),
            refs=tuple(torch.randn(16, ref // 8, ref // 8, generator=gen) for _ in range(2)),
            latent_shape=latent, line=i + 1)
        subjects = Subjects(tuple(Subject(images=torch.rand(1, ref, ref, 3, generator=gen), label=f"s{j}")
                                  for j in range(2)))
        groups.append(PromptGroup(f"prompt {i}", subjects, None, conditioning))
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=None,
                        help="timed iterations after one warm-up (default 3, 1 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0 = torch default (default: %(default)s: the matrices are small)")
    harness.add_suite_args(parser, "FLUX.1 sizes at 512 px, 2x320 px refs, 512 text tokens (CUDA)")
    args = parser.parse_args()
    device = harness.device_from(args)
    args.reps = args.reps or (1 if args.quick else 3)
    if args.real_dims and device.type != "cuda":
        raise SystemExit("--real-dims builds FLUX.1 (12B parameters) and needs --device cuda; leave it off on CPU")
    sizes = FLUX1 if args.real_dims else SMALL
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_ippo_config(None, list(sizes.config))
    torch.manual_seed(0)
    policy = build_policy(cfg, device)
    params = [p for _, p in policy.backend.trainable_parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    groups = prompt_groups(cfg, sizes)
    window = WindowSchedule(num_steps=STEPS, size=WINDOW, shift_interval=1)
    sigmas = sigma_schedule(STEPS, image_seq_len=(sizes.resolution // 16) ** 2)
    rollout_cfg = RolloutConfig(group_size=GROUP_SIZE)
    times: dict[str, list[float]] = {"rollout": [], "reward": [], "update": [], "update_one_step": []}
    for it in range(args.reps + 1):
        if it == 1:
            harness.reset_peak(device)  # the peak of the timed iterations, weights and optimizer state included
        for minibatches in (4, 1):  # interleaved, so machine noise hits both alike
            gens = [torch.Generator().manual_seed(100 * it + g) for g in range(GROUPS)]
            result = ippo_iteration(policy, params, optimizer, groups, {"brightness": brightness}, {"brightness": 1.0},
                                    rollout_cfg, GSPOConfig(minibatches=minibatches), sigmas,
                                    window.steps(it % (window.last_start + 1)), gens,
                                    micro_batch=sizes.micro_batch, grad_clip=1.0, device=device)
            if it == 0:  # the first iteration warms up allocators and caches
                continue
            if minibatches == 1:
                times["update_one_step"].append(result.seconds["update"])
            else:
                for name, seconds in result.seconds.items():
                    times[name].append(seconds)
    median = {name: statistics.median(v) for name, v in times.items()}
    total = median["rollout"] + median["reward"] + median["update"]
    trainable = sum(p.numel() for p in params)
    print(f"IPPO iteration on {device}: Flux hidden {cfg.model.tiny_hidden}, {cfg.model.tiny_depth}+"
          f"{cfg.model.tiny_depth_single} blocks, {trainable} trainable params; {GROUPS} groups x {GROUP_SIZE} images at "
          f"{sizes.resolution} px, 2 refs at {sizes.ref} px, K = {STEPS} steps, window {WINDOW}; median of {args.reps}")
    print(f"{'phase':<34}{'seconds':>10}{'share':>9}")
    for name, label in (("rollout", "rollout"), ("reward", "reward"), ("update", "update (GSPO, 4 mini-batch steps)")):
        print(f"{label:<34}{median[name]:>10.3f}{median[name] / total:>9.1%}")
    print(f"{'update (1 step, GRPO-equivalent)':<34}{median['update_one_step']:>10.3f}")
    ratio = median["update"] / median["rollout"]
    steps_ratio = median["update"] / median["update_one_step"]
    peak = harness.peak_mib(device)
    if peak is not None:
        print(f"peak CUDA memory: {peak} MiB")
    print(f"update / rollout = {ratio:.2f} (target <= 1); 4 mini-batch steps / 1 step = {steps_ratio:.2f}")
    print(json.dumps({"rollout_s": round(median["rollout"], 4), "reward_s": round(median["reward"], 4),
                      "update_s": round(median["update"], 4), "update_one_step_s": round(median["update_one_step"], 4),
                      "update_over_rollout": round(ratio, 3), "minibatches_over_one_step": round(steps_ratio, 3),
                      "peak_mib": peak, "device": device.type, "real_dims": args.real_dims}))


if __name__ == "__main__":
    main()
