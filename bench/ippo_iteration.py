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

    python bench/ippo_iteration.py [--reps 3] [--threads 1]

Last line: JSON with rollout_s, reward_s, update_s (medians, 4 mini-batches), update_one_step_s,
update_over_rollout and minibatches_over_one_step.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from multisubject.attention.subjects import Subject, Subjects
from multisubject.train.gspo import GSPOConfig
from multisubject.train.ippo import PromptGroup, RolloutConfig, ippo_iteration
from multisubject.train.ippo_config import load_ippo_config
from multisubject.train.ippo_flux import GroupConditioning
from multisubject.train.ippo_trainer import build_policy
from multisubject.train.sde import WindowSchedule, sigma_schedule

CONFIG = ["--model.tiny=true", "--model.tiny_hidden=128", "--model.tiny_heads=4", "--model.tiny_depth=2",
          "--model.tiny_depth_single=2", "--lora.rank=16", "--moe.rank=16", "--run.precision=fp32",
          "--run.grad_checkpointing=false", "--reward.weights={'brightness': 1.0}"]
RESOLUTION, REF, TEXT, GROUPS, GROUP_SIZE, STEPS, WINDOW = 128, 64, 16, 2, 6, 16, 2


def brightness(inputs) -> torch.Tensor:
    return inputs.images.mean((1, 2, 3))


def prompt_groups(cfg) -> list[PromptGroup]:
    gen = torch.Generator().manual_seed(0)
    latent = (16, RESOLUTION // 8, RESOLUTION // 8)
    groups = []
    for i in range(GROUPS):
        conditioning = GroupConditioning(
            context=torch.randn(TEXT, cfg.model.tiny_context_dim, generator=gen),
            pooled=torch.randn(cfg.model.tiny_vec_dim, generator=gen),
            refs=tuple(torch.randn(16, REF // 8, REF // 8, generator=gen) for _ in range(2)),
            latent_shape=latent, line=i + 1)
        subjects = Subjects(tuple(Subject(images=torch.rand(1, REF, REF, 3, generator=gen), label=f"s{j}")
                                  for j in range(2)))
        groups.append(PromptGroup(f"prompt {i}", subjects, None, conditioning))
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="timed iterations after one warm-up (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0 = torch default (default: %(default)s: the matrices are small)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_ippo_config(None, CONFIG)
    torch.manual_seed(0)
    policy = build_policy(cfg, device)
    params = [p for _, p in policy.backend.trainable_parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    groups = prompt_groups(cfg)
    window = WindowSchedule(num_steps=STEPS, size=WINDOW, shift_interval=1)
    sigmas = sigma_schedule(STEPS, image_seq_len=(RESOLUTION // 16) ** 2)
    rollout_cfg = RolloutConfig(group_size=GROUP_SIZE)
    times: dict[str, list[float]] = {"rollout": [], "reward": [], "update": [], "update_one_step": []}
    for it in range(args.reps + 1):
        for minibatches in (4, 1):  # interleaved, so machine noise hits both alike
            gens = [torch.Generator().manual_seed(100 * it + g) for g in range(GROUPS)]
            result = ippo_iteration(policy, params, optimizer, groups, {"brightness": brightness}, {"brightness": 1.0},
                                    rollout_cfg, GSPOConfig(minibatches=minibatches), sigmas,
                                    window.steps(it % (window.last_start + 1)), gens,
                                    micro_batch=GROUPS * GROUP_SIZE, grad_clip=1.0, device=device)
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
          f"{RESOLUTION} px, 2 refs at {REF} px, K = {STEPS} steps, window {WINDOW}; median of {args.reps}")
    print(f"{'phase':<34}{'seconds':>10}{'share':>9}")
    for name, label in (("rollout", "rollout"), ("reward", "reward"), ("update", "update (GSPO, 4 mini-batch steps)")):
        print(f"{label:<34}{median[name]:>10.3f}{median[name] / total:>9.1%}")
    print(f"{'update (1 step, GRPO-equivalent)':<34}{median['update_one_step']:>10.3f}")
    ratio = median["update"] / median["rollout"]
    steps_ratio = median["update"] / median["update_one_step"]
    print(f"update / rollout = {ratio:.2f} (target <= 1); 4 mini-batch steps / 1 step = {steps_ratio:.2f}")
    print(json.dumps({"rollout_s": round(median["rollout"], 4), "reward_s": round(median["reward"], 4),
                      "update_s": round(median["update"], 4), "update_one_step_s": round(median["update_one_step"], 4),
                      "update_over_rollout": round(ratio, 3), "minibatches_over_one_step": round(steps_ratio, 3),
                      "device": device.type}))


if __name__ == "__main__":
    main()
