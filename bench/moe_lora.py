"""MoE-LoRA patched FFN vs the plain FFN at FLUX.1 shapes: hidden 3072 (FFN 3072 -> 12288 -> 3072, GELU-tanh),
4 experts, top-1, rank 64, 2,048 tokens. Both run side by side in one process, interleaved, median of ``--reps``.
Last line: JSON figures.

    python bench/moe_lora.py [--device cpu|cuda] [--quick] [--reps 5] [--dtype float32|bfloat16]

2,048 tokens cover MultiCrafter's image stream (1,024 image + 2x400 reference tokens at 512 px), so ``--real-dims``
changes nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics

import harness
import torch
from torch import nn

from multisubject.attention.moe_lora import MoELoRA, MoELoRAConfig, MoELoRAFFN

TARGETS = {"moe_ffn_over_ffn": ("<=", 1.15), "ffn_peak_mib": None, "moe_ffn_peak_mib": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=None, help="default 5, 3 with --quick")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--tokens", type=int, default=2048)
    harness.add_suite_args(parser, "accepted; the default already is FLUX.1's FFN at MultiCrafter's token count")
    args = parser.parse_args()
    device = harness.device_from(args)
    args.reps = args.reps or (3 if args.quick else 5)
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, args.dtype)
    hidden = 3072
    torch.manual_seed(0)
    ffn = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(approximate="tanh"), nn.Linear(4 * hidden, hidden))
    ffn = ffn.to(device=device, dtype=dtype)
    config = MoELoRAConfig(num_experts=4, rank=64, alpha=64.0, top_k=1)
    moe = MoELoRA(hidden, hidden, config, dtype=dtype, device=device)
    with torch.no_grad():
        moe.lora_B.normal_(0, 0.02)
    patched = MoELoRAFFN(ffn, moe)
    h = torch.randn(1, args.tokens, hidden, dtype=dtype, device=device)

    with torch.no_grad():
        ffn(h), patched(h)  # warm-up
        peak = {"ffn": None, "moe_ffn": None}
        for name, fn in (("ffn", ffn), ("moe_ffn", patched)) if device.type == "cuda" else ():
            harness.reset_peak(device)
            fn(h)
            peak[name] = harness.peak_mib(device)  # includes the weights and the input
        base_t, moe_t, branch_t = [], [], []
        for _ in range(args.reps):
            base_t.append(harness.timed(lambda: ffn(h), device))
            moe_t.append(harness.timed(lambda: patched(h), device))
            branch_t.append(harness.timed(lambda: moe(h), device))
    base, full, branch = (statistics.median(t) for t in (base_t, moe_t, branch_t))
    ratio = statistics.median(m / b for m, b in zip(moe_t, base_t))  # paired per rep: robust to load drift
    print(f"device {device.type}, dtype {args.dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"FFN {hidden} -> {4 * hidden} -> {hidden}, {args.tokens} tokens; MoE-LoRA 4 experts, top-1, rank 64")
    print(f"{'path':<30}{'median ms':>12}{'ratio':>8}")
    print(f"{'FFN':<30}{base * 1e3:>12.1f}{1.0:>8.2f}")
    print(f"{'FFN + MoE-LoRA (patched)':<30}{full * 1e3:>12.1f}{ratio:>8.2f}  (median of paired per-rep ratios)")
    print(f"{'MoE-LoRA branch alone':<30}{branch * 1e3:>12.1f}{branch / base:>8.2f}")
    if device.type == "cuda":
        print(f"peak CUDA memory per call: FFN {peak['ffn']} MiB, FFN + MoE-LoRA {peak['moe_ffn']} MiB")
    print(f"target patched/FFN <= 1.15: {'met' if ratio <= 1.15 else 'MISSED'}")
    print(json.dumps({"moe_ffn_over_ffn": round(ratio, 3), "ffn_ms": round(base * 1e3, 2),
                      "moe_ffn_ms": round(full * 1e3, 2), "branch_ms": round(branch * 1e3, 2),
                      "ffn_peak_mib": peak["ffn"], "moe_ffn_peak_mib": peak["moe_ffn"], "device": device.type,
                      "dtype": args.dtype, "tokens": args.tokens, "reps": args.reps}))


if __name__ == "__main__":
    main()
