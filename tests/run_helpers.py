"""Helpers for tests that run the trainers as subprocesses (CLI, torchrun, SIGKILL/SIGTERM)."""

from __future__ import annotations

import os
from pathlib import Path

import multisubject

_PACK = Path(multisubject.__file__).parent  # not resolved: a `.../multisubject` symlink counts as the pack's name


def subprocess_env(*extra_paths: str) -> dict[str, str]:
    """``os.environ`` plus one torch thread and, on PYTHONPATH, ``extra_paths`` and -- only when the pack's folder is
    itself named ``multisubject`` -- its parent. Otherwise the pack is importable through its editable install, and
    adding its parent (say /tmp for a clone in /tmp/x) would put unrelated modules on the path."""
    paths = list(extra_paths)
    if _PACK.name == "multisubject":
        paths.insert(0, str(_PACK.parent))
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}


def checkpoint_reached(out_dir: Path, step: int) -> bool:
    """Whether a trainer writing to ``out_dir`` has saved a checkpoint at ``step`` or later.

    Poll this rather than the existence of one ``step_N`` folder: with ``keep_last`` small, that folder is pruned a
    few steps later, and a poll that misses the window would wait for a run that has already finished.
    """
    steps = [int(p.name.split("_")[1]) for p in (out_dir / "checkpoints").glob("step_*")]
    return max(steps, default=-1) >= step
