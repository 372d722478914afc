"""Cost of one bound joint attention call over the unbound one, per in-context family, bias vs split + LSE merge.

Per family at its real sizes (1024x1024 output = 4096 image tokens, 512 text tokens, two 1024x1024 references =
2 x 4096 reference tokens; heads x head dim of the real model), three ways to run the same joint call:

* ``unbound``: plain SDPA over the joint sequence (what the host runs without Bind Subjects to Layout);
* ``bias``: the binding plan's cached additive mask (``CallBinding.bias``) passed to the same SDPA kernel;
* ``split``: the plan's split + log-sum-exp attention (``CallBinding.attend_split``: unmasked partial calls).

Both bound paths start from ``BindingPlan.for_call`` on every call, exactly as the ComfyUI hook does (a cache hit
after the first call). Two subjects, each bound to one reference, boxes leaving a background margin. The three
paths run round-robin (the order rotates every repetition so drift and load hit all alike); the figure is the
median of the per-repetition paired ratios.

    python bench/reference_binding.py [--device cpu|cuda] [--quick] [--reps N] [--heads N] [--strength S]
                                      [--families flux,qwen_image,omnigen2] [--dtype float32|bfloat16|float16]

``--quick`` keeps every token count and head dim but runs 2 heads per family and 2 repetitions: the bias is one
(N, N) mask broadcast over heads and the split's extra work is per head too, so the ratio barely depends on the head
count (use the default on a GPU). The defaults already are real dims, so ``--real-dims`` changes nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

import harness
import torch
import torch.nn.functional as F

from multisubject.attention.binding import BindingConfig, BindingPlan, SubjectBinding
from multisubject.attention.families import FLUX, OMNIGEN2, QWEN_IMAGE, ModelFamily
from multisubject.attention.layout import Layout

TARGETS = {"bound_over_unbound.*": {"cpu": ("<=", 1.10), "cuda": ("<=", 1.15)}}

IMAGE_PX, REFERENCE_PX, TEXT_TOKENS, REFERENCES = 1024, 1024, 512, 2
BOXES = [(0.05, 0.1, 0.5, 0.9), (0.5, 0.1, 0.95, 0.9)]  # normalized (x0, y0, x1, y1), one per subject


@dataclass(frozen=True)
class Shape:
    family: ModelFamily
    heads: int
    head_dim: int
    source: str  # where the sizes come from


# heads x head dim of the released checkpoints as ComfyUI v0.3.64 builds them
SHAPES = {
    "flux": Shape(FLUX, 24, 128, "comfy/supported_models.py Flux: hidden 3072, 24 heads"),
    "qwen_image": Shape(QWEN_IMAGE, 24, 128, "comfy/ldm/qwen_image/model.py defaults: 24 heads x 128"),
    "omnigen2": Shape(OMNIGEN2, 21, 120, "comfy/model_detection.py OmniGen2: hidden 2520, 21 heads (7 kv, repeated)"),
}
PATHS = ("unbound", "bias", "split")


def build(shape: Shape, heads: int, strength: float, dtype, device):
    """The family's joint-call tensors and a ``fn(path)`` running one call of that path."""
    family = shape.family
    latent = IMAGE_PX // family.vae_downscale
    ref_latent = REFERENCE_PX // family.vae_downscale
    token_layout = family.token_layout(TEXT_TOKENS, (latent, latent), [(ref_latent, ref_latent)] * REFERENCES)
    layout = Layout.from_boxes(IMAGE_PX, IMAGE_PX, BOXES)
    plans = {impl: BindingPlan(layout, [SubjectBinding(), SubjectBinding()], BindingConfig(strength, implementation=impl))
             for impl in ("bias", "split")}
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, token_layout.total, shape.head_dim, generator=generator).to(device, dtype)
               for _ in range(3))
    sigma = 1.0

    def for_call(impl):
        return plans[impl].for_call(token_layout, (latent, latent), family.patch, sigma, dtype, device,
                                    family.reference_sources)

    def run(path: str):
        if path == "unbound":
            return F.scaled_dot_product_attention(q, k, v)
        if path == "bias":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=for_call("bias").bias())
        return for_call("split").attend_split(q, k, v)

    return token_layout, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=None, help="default 5, 2 with --quick")
    parser.add_argument("--heads", type=int, default=None,
                        help="heads per family (default: the real model's; 2 with --quick)")
    parser.add_argument("--strength", type=float, default=1.0,
                        help="binding strength (1 = hard, the default; below 1 the split merges biased blocks)")
    parser.add_argument("--families", default=",".join(SHAPES), help="comma-separated, default %(default)s")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default float32 on CPU, bfloat16 on CUDA")
    harness.add_suite_args(parser, "accepted; the default already is real token counts, heads and head dims")
    args = parser.parse_args()
    device = harness.device_from(args)
    reps = args.reps or (2 if args.quick else 5)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    names = [n for n in args.families.split(",") if n]
    unknown = sorted(set(names) - set(SHAPES))
    if unknown:
        parser.error(f"--families {','.join(unknown)}: unknown; have {', '.join(SHAPES)}")

    calls, info = {}, {}
    for name in names:
        shape = SHAPES[name]
        heads = args.heads or (2 if args.quick else shape.heads)
        token_layout, run = build(shape, heads, args.strength, dtype, device)
        start = time.perf_counter()
        out = {p: run(p) for p in PATHS}  # warm-up; the first bound call builds and caches the plan's bias / split
        harness.synchronize(device)
        info[name] = {"max_abs_diff_split_bias": float((out["split"].float() - out["bias"].float()).abs().max())}
        del out
        info[name].update(heads=heads, head_dim=shape.head_dim, tokens=token_layout.total,
                          warmup_s=round(time.perf_counter() - start, 2))
        calls[name] = run

    times = {(n, p): [] for n in names for p in PATHS}
    for rep in range(reps):  # round-robin: families in turn, path order rotated per repetition
        order = PATHS[rep % 3:] + PATHS[:rep % 3]
        for name in names:
            for path in order:
                times[name, path].append(harness.timed(lambda: calls[name](path), device))
        print(f"rep {rep + 1}/{reps} done", flush=True)

    ratios = {n: {impl: round(statistics.median(b / u for b, u in zip(times[n, impl], times[n, "unbound"])), 3)
                  for impl in ("bias", "split")} for n in names}
    ms = {n: {p: round(statistics.median(times[n, p]) * 1e3, 1) for p in PATHS} for n in names}

    print(f"device {device.type}, dtype {dtype_name}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"strength {args.strength}, {reps} round-robin repetitions (median of paired per-rep ratios)")
    print(f"one joint call: {TEXT_TOKENS} text + {(IMAGE_PX // 16) ** 2} image ({IMAGE_PX}^2) + {REFERENCES} x "
          f"{(REFERENCE_PX // 16) ** 2} reference ({REFERENCE_PX}^2) tokens, 2 subjects bound")
    op, bound = TARGETS["bound_over_unbound.*"][device.type]
    header = (f"{'family':<12}{'heads x dim':>12}{'N':>7}{'unbound ms':>12}{'bias ms':>10}{'split ms':>10}"
              f"{'bias/unb':>10}{'split/unb':>11}{'split-bias':>12}")
    print(header)
    for n in names:
        i = info[n]
        print(f"{n:<12}{i['heads']:>7} x {i['head_dim']:<3}{i['tokens']:>7}{ms[n]['unbound']:>12.1f}"
              f"{ms[n]['bias']:>10.1f}{ms[n]['split']:>10.1f}{ratios[n]['bias']:>10.3f}{ratios[n]['split']:>11.3f}"
              f"{i['max_abs_diff_split_bias']:>12.1e}")
    for n in names:
        for impl in ("bias", "split"):
            r = ratios[n][impl]
            print(f"target {n} {impl} bound/unbound {op} {bound} on {device.type}: "
                  f"{'met' if r <= bound else 'MISSED'} ({r:.3f})")
    print(json.dumps({"bound_over_unbound": ratios, "median_ms": ms, "shapes": info, "device": device.type,
                      "dtype": dtype_name, "strength": args.strength, "reps": reps}))


if __name__ == "__main__":
    main()
