"""One IDAR training step (forward + backward, flow loss + lambda * IDAR Dice) vs the same step with the flow loss
alone, on ComfyUI's Flux class at a small-but-not-trivial size with random weights, side by side in one process
(interleaved reps, paired ratios). Memory on CPU is the growth of the peak resident set during one step, each
variant measured in its own fresh child process (the model is built and warmed up first); on CUDA the real peak
allocation of the step is reported instead.

    python bench/idar_step.py [--device cpu|cuda] [--quick] [--reps 5] [--grad-checkpointing] [--real-dims]

``--real-dims``: FLUX.1 sizes (hidden 3072, 19+38 blocks, LoRA r512, MoE 4x r128) at MultiCrafter's 512 px output
with two 320 px references; CUDA only.

Last line: JSON with time_ratio and memory_ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import harness
import torch

from multisubject.attention.moe_lora import load_balancing_loss
from multisubject.train.comfy_backend import FluxBackend, FluxInputs, load_flux
from multisubject.train.config import LoRAConfig, ModelConfig, MoEConfig
from multisubject.train.losses import flow_loss, idar_loss

TARGETS = {"time_ratio": ("<=", 1.2), "memory_ratio": ("<=", 1.2), "idar_peak_mib": None}


def step(backend, inputs, noise, x0, masks, blocks, with_idar: bool, device) -> int:
    """One forward + backward; returns how far the step raised CUDA memory above what was allocated before it
    (weights, inputs), the GPU twin of the CPU's peak-RSS growth; 0 on CPU."""
    harness.reset_peak(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        v, maps = backend(inputs, idar_blocks=blocks if with_idar else None, capture_checkpoint=True)
        loss = flow_loss(v, noise, x0)
        if with_idar:
            loss = loss + 0.1 * idar_loss(maps, masks)[0]
        loss = loss + 0.01 * torch.stack([load_balancing_loss(lg, ex) for lg, ex in backend.routing]).mean()
    loss.backward()
    backend.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - before
    return 0


def peak_rss_bytes() -> int:
    """This process's peak resident set. VmHWM belongs to the address space (reset by exec); ru_maxrss would
    carry over the parent's peak into a child."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_peak_growth(with_idar: bool) -> int:
    """Run this script as a child that builds the model, runs one no-grad forward, then reports how much one
    training step raises its peak resident set."""
    proc = subprocess.run([sys.executable, __file__, "--child", "idar" if with_idar else "flow", *sys.argv[1:]],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=None, help="default 5, 2 with --quick")
    parser.add_argument("--grad-checkpointing", action="store_true", help="block-level gradient checkpointing")
    parser.add_argument("--child", choices=["flow", "idar"], help=argparse.SUPPRESS)
    harness.add_suite_args(parser, "FLUX.1 sizes: hidden 3072, 24 heads, 19+38 blocks, 512 px, 2x320 px refs (CUDA)")
    args = parser.parse_args()
    device = harness.device_from(args)
    args.reps = args.reps or (2 if args.quick else 5)
    if args.real_dims and device.type != "cuda":
        raise SystemExit("--real-dims builds FLUX.1 (12B parameters) and needs --device cuda; leave it off on CPU")
    if args.real_dims:
        cfg = ModelConfig(tiny=True, tiny_hidden=3072, tiny_heads=24, tiny_depth=19, tiny_depth_single=38,
                          tiny_context_dim=4096, tiny_vec_dim=768)
        image, ref, n_txt, lora, moe = 64, 40, 512, LoRAConfig(rank=512), MoEConfig(rank=128)
    else:
        cfg = ModelConfig(tiny=True, tiny_hidden=256, tiny_heads=4, tiny_depth=4, tiny_depth_single=4,
                          tiny_context_dim=128, tiny_vec_dim=64)
        image, ref, n_txt, lora, moe = 64, 32, 128, LoRAConfig(rank=32), MoEConfig(rank=16)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    flux = load_flux(cfg, dtype=dtype).model.diffusion_model
    backend = FluxBackend(flux, lora.to_core(cfg.tiny_depth, cfg.tiny_depth_single), moe.to_core(cfg.tiny_depth),
                          grad_checkpointing=args.grad_checkpointing).to(device)
    blocks = list(range(cfg.tiny_depth))
    gen = torch.Generator().manual_seed(0)
    batch, subjects = 1, 2
    x0 = torch.randn(batch, 16, image, image, generator=gen).to(device)
    noise = torch.randn(batch, 16, image, image, generator=gen).to(device)
    t = torch.full((batch,), 0.5, device=device)
    inputs = FluxInputs((1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise, t,
                        torch.randn(batch, n_txt, cfg.tiny_context_dim, generator=gen).to(device),
                        torch.randn(batch, cfg.tiny_vec_dim, generator=gen).to(device),
                        [torch.randn(batch, 16, ref, ref, generator=gen).to(device) for _ in range(subjects)])
    tokens = (image // 2) ** 2
    masks = (torch.rand(batch, subjects, tokens, generator=gen) > 0.7).float().to(device)
    if args.child:
        with torch.no_grad():
            backend(inputs)
        before = peak_rss_bytes()
        step(backend, inputs, noise, x0, masks, blocks, args.child == "idar", device)
        print(peak_rss_bytes() - before)
        return
    for with_idar in (False, True):  # warm-up
        step(backend, inputs, noise, x0, masks, blocks, with_idar, device)
    times = {False: [], True: []}
    memory = {}
    for _ in range(args.reps):
        for with_idar in (False, True):
            start = time.perf_counter()
            memory[with_idar] = step(backend, inputs, noise, x0, masks, blocks, with_idar, device)
            times[with_idar].append(time.perf_counter() - start)
    if device.type == "cpu":
        memory = {key: child_peak_growth(key) for key in (False, True)}
    time_ratio = statistics.median(b / a for a, b in zip(times[False], times[True]))
    memory_ratio = memory[True] / memory[False]
    n_total = n_txt + tokens + subjects * (ref // 2) ** 2
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, reps {args.reps}")
    print(f"Flux hidden {cfg.tiny_hidden}, {cfg.tiny_heads} heads, {cfg.tiny_depth}+{cfg.tiny_depth_single} blocks; "
          f"tokens: {n_txt} txt + {tokens} img + {subjects}x{(ref // 2) ** 2} ref = {n_total}; LoRA r{lora.rank}, "
          f"MoE 4x r{moe.rank}; block checkpointing {'on' if args.grad_checkpointing else 'off'}; IDAR on all "
          f"{len(blocks)} double blocks")
    unit = "peak+ MiB" if device.type == "cuda" else "RSS+ MiB"
    print(f"{'step':<22}{'median ms':>12}{unit:>12}")
    for name, key in (("flow only", False), ("flow + IDAR", True)):
        print(f"{name:<22}{statistics.median(times[key]) * 1e3:>12.1f}{memory[key] / 2**20:>12.2f}")
    print(f"{'ratio (IDAR / flow)':<22}{time_ratio:>12.3f}{memory_ratio:>12.3f}")
    print(json.dumps({"device": device.type, "time_ratio": round(time_ratio, 4), "memory_ratio": round(memory_ratio, 4),
                      "flow_ms": round(statistics.median(times[False]) * 1e3, 2),
                      "idar_ms": round(statistics.median(times[True]) * 1e3, 2),
                      "memory_kind": "cuda_peak_growth" if device.type == "cuda" else "peak_rss_growth",
                      "idar_peak_mib": harness.peak_mib(device),  # whole peak of the last IDAR step, weights included
                      "flow_bytes": memory[False], "idar_bytes": memory[True], "tokens": n_total}))


if __name__ == "__main__":
    main()
