"""What every benchmark in bench/ shares: the suite's command line, device selection and CUDA-aware timing.

Not a benchmark itself (it declares no ``TARGETS``); ``run_all.py`` documents the convention. The scripts run as
``python bench/<name>.py``, so bench/ is on ``sys.path`` and they ``import harness``.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch


def add_suite_args(parser: argparse.ArgumentParser, real_dims: str) -> None:
    """``--device``, ``--real-dims`` and ``--quick``, which run_all passes to every benchmark.

    ``real_dims`` is the help text: what the switch changes, or why the default already is real dims.
    """
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--real-dims", action="store_true", help=real_dims)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (the CPU suite run by run_all)")


def device_from(args: argparse.Namespace) -> torch.device:
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: torch {torch.__version__} sees no CUDA device; run with --device cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call of ``fn``; on CUDA the queued kernels before and inside the call are waited for."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    """CUDA memory allocated at the peak since ``reset_peak``, in MiB; None on CPU (no allocator statistics)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
