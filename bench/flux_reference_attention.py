"""Layout-masked reference attention vs plain SDPA at FLUX.1 shapes (24 heads x 128, 512 text + 1024 image + 2x400 refs).

The masked path is what Apply MultiCrafter adds to every attention call: the cached additive bias
(``CallBinding.bias`` of ``attention/binding.py``, built once per layout) passed as a float mask to the same SDPA kernel.
Both run side by side in one process, interleaved, median of ``--reps``. Last line: JSON figures.

    python bench/flux_reference_attention.py [--device cpu|cuda] [--quick] [--reps 7] [--dtype float32|bfloat16]

These are MultiCrafter's own sizes (512 px output, 320 px references), so ``--real-dims`` changes nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import harness
import torch
import torch.nn.functional as F

from multisubject.attention.binding import BindingConfig, BindingPlan, SubjectBinding
from multisubject.attention.families import FLUX
from multisubject.attention.layout import Layout

TARGETS = {"masked_over_unmasked": {"cpu": ("<=", 1.5), "cuda": ("<=", 1.15)}, "masked_peak_mib": None,
           "unmasked_peak_mib": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=None, help="default 7, 3 with --quick")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default float32 on CPU, bfloat16 on CUDA")
    harness.add_suite_args(parser, "accepted; the default already is MultiCrafter's 512 px output, 320 px references")
    args = parser.parse_args()
    device = harness.device_from(args)
    args.reps = args.reps or (3 if args.quick else 7)
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, args.dtype)
    heads, head_dim = 24, 128
    layout = FLUX.token_layout(512, (64, 64), [(40, 40), (40, 40)])  # 1024 image + 2 x 400 reference tokens
    plan = BindingPlan(Layout.from_boxes(512, 512, [(0, 0, 0.5, 1), (0.5, 0, 1, 1)]),
                       [SubjectBinding(1), SubjectBinding(1)], BindingConfig())
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, layout.total, head_dim, dtype=dtype, device=device) for _ in range(3))

    start = time.perf_counter()
    bias = plan.for_call(layout, (64, 64), FLUX.patch, 1.0, dtype, device).bias()
    harness.synchronize(device)
    build_s = time.perf_counter() - start

    def unmasked():
        return F.scaled_dot_product_attention(q, k, v)

    def masked():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    unmasked(), masked()  # warm-up
    peak = {"unmasked": None, "masked": None}
    for name, fn in (("unmasked", unmasked), ("masked", masked)) if device.type == "cuda" else ():
        harness.reset_peak(device)
        fn()
        peak[name] = harness.peak_mib(device)  # includes q, k, v and the cached bias
    plain_t, masked_t = [], []
    for _ in range(args.reps):  # interleave so drift hits both alike
        plain_t.append(harness.timed(unmasked, device))
        masked_t.append(harness.timed(masked, device))
    plain, mask = statistics.median(plain_t), statistics.median(masked_t)
    ratio = statistics.median(m / p for m, p in zip(masked_t, plain_t))  # paired per rep: robust to load drift
    print(f"device {device.type}, dtype {args.dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"shapes: B=1, H={heads}, D={head_dim}, N={layout.total} (512 txt + 1024 img + 2x400 ref)")
    print(f"{'path':<28}{'median ms':>12}{'ratio':>8}")
    print(f"{'SDPA, no mask':<28}{plain * 1e3:>12.1f}{1.0:>8.2f}")
    print(f"{'SDPA + cached layout bias':<28}{mask * 1e3:>12.1f}{ratio:>8.2f}  (median of paired per-rep ratios)")
    print(f"bias build (once per layout/dtype/device, cached): {build_s * 1e3:.1f} ms, "
          f"{bias.numel() * bias.element_size() / 2**20:.1f} MiB")
    if device.type == "cuda":
        print(f"peak CUDA memory per call: unmasked {peak['unmasked']} MiB, masked {peak['masked']} MiB")
    op, target = TARGETS["masked_over_unmasked"][device.type]
    print(f"target masked/unmasked {op} {target} on {device.type}: {'met' if ratio <= target else 'MISSED'}")
    print(json.dumps({"masked_over_unmasked": round(ratio, 3), "masked_ms": round(mask * 1e3, 2),
                      "unmasked_ms": round(plain * 1e3, 2), "bias_build_ms": round(build_s * 1e3, 2),
                      "masked_peak_mib": peak["masked"], "unmasked_peak_mib": peak["unmasked"],
                      "device": device.type, "dtype": args.dtype, "reps": args.reps}))


if __name__ == "__main__":
    main()
