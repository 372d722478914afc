"""Atomic checkpoints: write into a temp folder, fsync every file, rename into place, fsync the parent.

A checkpoint is a folder ``<out_dir>/checkpoints/step_<N>/`` holding ``state.pt`` (trainable weights, optimizer,
scheduler, RNG states, step, data position) and ``config.json`` (the resolved config). A crash at any moment
leaves either the previous checkpoints or the new one complete, never a half-written one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import config_diff

STEP_DIR = re.compile(r"^step_(\d{8})$")
# keys that may change between a run and its resumption (they steer the run, not the model or the data)
RESUMABLE_KEYS = ("run.max_steps", "run.resume", "run.save_every", "run.keep_last", "run.log_every",
                  "run.sample_every", "run.sample_steps", "run.progress", "run.out_dir", "data.manifest",
                  "data.cache_dir", "model.comfyui", "model.diffusion_model", "model.vae", "model.clip_l", "model.t5")


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp folders of interrupted writes are ignored)."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "state.pt").is_file())


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: str | Path, step: int, state: dict[str, Any], config: dict[str, Any], keep_last: int) -> Path:
    """Write ``state`` (+ RNG states) and ``config`` atomically as checkpoint ``step``; keep the newest ``keep_last``."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _write_synced(tmp / "state.pt", lambda fh: torch.save({**state, "step": step, "rng": rng_state()}, fh))
    _write_synced(tmp / "config.json", lambda fh: fh.write(json.dumps(config, indent=2, sort_keys=True).encode()))
    if final.exists():  # re-saving the same step (e.g. SIGTERM right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, config: dict[str, Any], resumable: tuple[str, ...] = RESUMABLE_KEYS) -> dict[str, Any]:
    """Load a checkpoint folder; refuses one written with a different config (naming the differing keys), except
    keys starting with one of ``resumable``. The caller restores RNG with ``set_rng_state(state["rng"])`` after
    rebuilding everything else."""
    path = Path(path)
    if not (path / "state.pt").is_file():
        raise ValueError(f"{path} is not a checkpoint folder (no state.pt); pick one under <out_dir>/checkpoints/")
    saved = json.loads((path / "config.json").read_text())
    diff = [d for d in config_diff(saved, config) if not d.startswith(resumable)]
    if diff:
        raise ValueError(f"checkpoint {path} was made with a different config; differing keys:\n  " + "\n  ".join(diff)
                         + "\nresume with the original config, or start fresh with --run.resume=\"\" and a new run.out_dir")
    return torch.load(path / "state.pt", map_location="cpu", weights_only=False)


def _write_synced(path: Path, write) -> None:
    with open(path, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
