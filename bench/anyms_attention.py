"""Cost of one AnyMS cross-attention call at real SDXL 1024x1024 shapes, as ratios to plain text attention.

Variants, timed side by side (round-robin, median of rounds, random allocator spacer per call) on the same inputs:
  * text:     plain text cross-attention (77 tokens)
  * ip:       one IP-Adapter: text + full-image attention to 16 image tokens
  * anyms_S:  AnyMS crop_merge with S subjects (gather -> attention -> scatter on owned tokens)
  * stacked_S: what other packs do: S full-image adapter attentions, each times its box mask, summed

Sites: 64x64 tokens, 640 channels, 10 heads and 32x32 tokens, 1280 channels, 20 heads; CFG batch 2.
Boxes: S boxes on a grid over [0.1, 0.9] x [0.15, 0.9] (about 60% of the image), overlapping neighbours.

    PYTHONPATH=<parent of the pack> python bench/anyms_attention.py [--device cpu|cuda] [--quick] [--rounds N]
        [--dtype float32] [--threads 1]

These are SDXL's real sizes, so ``--real-dims`` changes nothing.

Last line: a JSON object with every ratio, ``anyms_s4_over_text`` and ``anyms_over_stacked_max``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time

import harness
import torch

from multisubject.attention.anyms import AnyMSConfig, AnyMSPlan, EncodedSubject, EncodedSubjects, sdpa_attention
from multisubject.attention.ip_adapter import ImageProj, IPAdapter
from multisubject.attention.layout import Layout, TokenGrid, region_token_masks

SITES = [("64x64 / 640 ch / 10 heads", 64, 640, 10), ("32x32 / 1280 ch / 20 heads", 32, 1280, 20)]
SUBJECT_COUNTS = (2, 4, 8)
CONTEXT, TEXT_TOKENS, IMAGE_TOKENS, BATCH = 2048, 77, 16, 2
TARGETS = {"anyms_s4_over_text": ("<=", 1.3), "anyms_over_stacked_max": ("<", 1.0)}


def boxes(count: int, overlap: float = 0.05) -> list[tuple[float, float, float, float]]:
    rows = 1 if count <= 2 else 2
    cols = math.ceil(count / rows)
    x0, y0, x1, y1 = 0.1, 0.15, 0.9, 0.9
    w, h = (x1 - x0) / cols, (y1 - y0) / rows
    out = []
    for i in range(count):
        r, c = divmod(i, cols)
        out.append((max(x0, x0 + c * w - overlap), max(y0, y0 + r * h - overlap),
                    min(x1, x0 + (c + 1) * w + overlap), min(y1, y0 + (r + 1) * h + overlap)))
    return out


def adapter_for_site(width: int, gen: torch.Generator) -> IPAdapter:
    """An adapter whose first SDXL site has ``width`` channels (only that site is timed)."""
    k = tuple(torch.randn(width, CONTEXT, generator=gen) * 0.02 for _ in range(70))
    v = tuple(torch.randn(width, CONTEXT, generator=gen) * 0.02 for _ in range(70))
    return IPAdapter("bench", "sdxl", "plus", IMAGE_TOKENS, 1280, CONTEXT, ImageProj(8, CONTEXT, IMAGE_TOKENS), k, v)


def measure(fns: dict, rounds: int, device: torch.device) -> dict[str, tuple[float, float]]:
    """(median, fastest) seconds per variant, variants run round-robin so drifts in machine load hit all alike.

    The median is the main figure: with the placement spacer below every variant sees the same mix of memory
    placements, and the median compares them under that mix. The fastest run is printed alongside.
    """
    for fn in fns.values():  # warm-up (also fills the plan's caches, as the first sampling step does)
        fn()
    times = {name: [] for name in fns}
    jitter = random.Random(0)
    for _ in range(rounds):
        for name, fn in fns.items():
            # where the allocator places the 10-20 MB buffers changes CPU attention time up to 2x (page and cache
            # placement); a random-size spacer per call makes every variant sample the same mix of placements
            spacer = torch.empty(jitter.randrange(0, 24 << 20) if device.type == "cpu" else 0, dtype=torch.uint8)
            times[name].append(harness.timed(fn, device))
            del spacer
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def bench_site(side: int, width: int, heads: int, rounds: int, dtype: torch.dtype,
               device: torch.device) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    tokens = side * side
    q = torch.randn(BATCH, tokens, width, generator=gen).to(device, dtype)
    k_txt = torch.randn(BATCH, TEXT_TOKENS, width, generator=gen).to(device, dtype)
    v_txt = torch.randn(BATCH, TEXT_TOKENS, width, generator=gen).to(device, dtype)
    adapter = adapter_for_site(width, gen)
    latent = side * (1024 // 8 // side)  # the 128x128 latent, seen at this site's downscale
    fns = {"text": lambda: sdpa_attention(q, k_txt, v_txt, heads)}
    k_ip = torch.randn(BATCH, IMAGE_TOKENS, width, generator=gen).to(device, dtype)
    v_ip = torch.randn(BATCH, IMAGE_TOKENS, width, generator=gen).to(device, dtype)
    fns["ip"] = lambda: sdpa_attention(q, k_txt, v_txt, heads).add_(sdpa_attention(q, k_ip, v_ip, heads))
    coverage = {}
    for count in SUBJECT_COUNTS:
        items = tuple(
            EncodedSubject(torch.randn(IMAGE_TOKENS, CONTEXT, generator=gen), torch.randn(IMAGE_TOKENS, CONTEXT, generator=gen),
                           priority=i)
            for i in range(count)
        )
        layout = Layout.from_boxes(1024, 1024, boxes(count))
        plan = AnyMSPlan(EncodedSubjects(adapter, items), layout, AnyMSConfig())
        plan.grid_plan(latent, latent, tokens, q.device)  # caches filled once, as in sampling
        k_all, v_all = plan.site_kv(0, q.device, dtype)
        branch = plan.branch_index([0, 1], BATCH, q.device)
        grid = TokenGrid.infer(latent, latent, tokens)
        masks = region_token_masks(layout, grid).reshape(count, -1).to(q.device, dtype)  # (S, L)
        coverage[count] = float(masks.amax(0).float().mean())

        def anyms(plan=plan):
            out = sdpa_attention(q, k_txt, v_txt, heads)
            return plan.add_image_attention(out, q, site=0, heads=heads, latent_hw=(latent, latent),
                                            cond_or_uncond=[0, 1], sigma=None, attention=sdpa_attention)

        def stacked(k_all=k_all, v_all=v_all, masks=masks, count=count, branch=branch):
            out = sdpa_attention(q, k_txt, v_txt, heads)
            for j in range(count):
                z = sdpa_attention(q, k_all[j][branch], v_all[j][branch], heads)
                out.add_(z * masks[j][None, :, None])
            return out

        fns[f"anyms_{count}"] = anyms
        fns[f"stacked_{count}"] = stacked
    results = measure(fns, rounds, device)
    results["coverage"] = coverage  # type: ignore[assignment]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="default 31, 5 with --quick")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default float32 on CPU, float16 on CUDA (SDXL's inference dtype)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine OpenMP hand-offs swamp small attentions)")
    harness.add_suite_args(parser, "accepted; the default already is SDXL at 1024x1024")
    args = parser.parse_args()
    device = harness.device_from(args)
    args.rounds = args.rounds or (5 if args.quick else 31)
    args.dtype = args.dtype or ("float16" if device.type == "cuda" else "float32")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    start = time.perf_counter()
    figures: dict[str, float] = {}
    totals: dict[str, float] = {}
    where = f"CUDA ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else \
        f"CPU ({torch.get_num_threads()} threads)"
    print(f"AnyMS cross-attention cost, {where}, {args.dtype}, CFG batch {BATCH}, "
          f"{args.rounds} round-robin rounds; ratio = variant / plain text attention (median; fastest run in brackets)")
    for label, side, width, heads in SITES:
        results = bench_site(side, width, heads, args.rounds, dtype, device)
        coverage = results.pop("coverage")
        text, text_fastest = results["text"]
        print(f"\nsite {label}   text attention {text * 1e3:.2f} ms (fastest {text_fastest * 1e3:.2f} ms)")
        print(f"  {'variant':<12}{'ms':>9}{'x text':>9}{'(fastest)':>11}   {'boxes cover':>11}")
        for name, (seconds, fastest) in results.items():
            count = int(name.split("_")[1]) if "_" in name else None
            cover = f"{coverage[count] * 100:.0f}%" if count else ""
            print(f"  {name:<12}{seconds * 1e3:>9.2f}{seconds / text:>9.3f}{f'({fastest / text_fastest:.3f})':>11}   {cover:>11}")
            figures[f"{side}x{side}_{name}_over_text"] = round(seconds / text, 4)
            figures[f"{side}x{side}_{name}_over_text_fastest"] = round(fastest / text_fastest, 4)
            totals[name] = totals.get(name, 0.0) + seconds
    # whole-image figures: per-call times summed over the two site types, weighted by how many of each SDXL has
    # (64x64: 10 sites, 32x32: 60 sites)
    weights = {64: 10, 32: 60}
    weighted = {name: 0.0 for name in totals}
    for label, side, width, heads in SITES:
        for name in totals:
            weighted[name] += weights[side] * figures[f"{side}x{side}_{name}_over_text"]
    text_weight = sum(weights.values())
    print("\nall 70 SDXL sites (ratios weighted by site count: 10 at 64x64, 60 at 32x32)")
    for name in totals:
        print(f"  {name:<12}{weighted[name] / text_weight:>9.3f}")
    s4 = figures["64x64_anyms_4_over_text"] * weights[64] + figures["32x32_anyms_4_over_text"] * weights[32]
    figures["anyms_s4_over_text"] = round(s4 / text_weight, 4)
    figures["anyms_s4_over_text_worst_site"] = max(figures["64x64_anyms_4_over_text"], figures["32x32_anyms_4_over_text"])
    figures["anyms_over_stacked_max"] = round(max(
        figures[f"{side}x{side}_anyms_{s}_over_text"] / figures[f"{side}x{side}_stacked_{s}_over_text"]
        for _, side, _, _ in SITES for s in SUBJECT_COUNTS
    ), 4)
    figures["seconds"] = round(time.perf_counter() - start, 1)
    print(f"\ntargets: AnyMS S=4 <= 1.3x text: {figures['anyms_s4_over_text']:.3f} "
          f"(worst single site {figures['anyms_s4_over_text_worst_site']:.3f}); "
          f"AnyMS faster than stacked at every S and site: max ratio {figures['anyms_over_stacked_max']:.3f}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
