"""Run bookkeeping shared by the trainers: where the run is (``Position``), which checkpoint it resumes from, saving
and restoring checkpoints on every rank, the learning-rate schedule, per-sample randomness, observers
(TensorBoard, progress bar) and the SIGTERM guard. A trainer's file holds its loop; everything around the loop that
is the same for every trainer lives here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .backend import load_trainable
from .checkpoint import (
    CONVERT_HINT,
    checkpoint_root,
    legacy_checkpoints,
    list_checkpoints,
    load_checkpoint,
    recover,
    retire_after,
    save_checkpoint,
    set_rng_state,
    step_of,
)
from .config import OptimConfig, RunConfig
from .distributed import DistInfo, barrier, full_optimizer_state, full_trainable_state, is_sharded, load_optimizer_state

log = logging.getLogger("multisubject.train")


@dataclass
class Position:
    step: int = 0  # optimizer steps (IPPO: iterations) done
    epoch: int = 0
    batch: int = 0  # global batches of this epoch already consumed


def sample_generator(seed: int, step: int, slot: int) -> torch.Generator:
    """Randomness of one sample of one step, a pure function of (seed, step, position in the global batch): the
    same sample draws the same noise however the batch is split over ranks and micro-batches, and resume needs no
    generator state."""
    digest = hashlib.sha256(f"{seed}/{step}/{slot}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def lr_factor(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Linear warmup, then constant / cosine / linear decay to 0 at ``max_steps``."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
    return 0.5 * (1 + math.cos(math.pi * progress)) if optim.schedule == "cosine" else 1.0 - progress


def optimizer_and_schedule(params: list, optim: OptimConfig, max_steps: int):
    """AdamW over ``params`` and its warmup/decay schedule (``lr_factor``)."""
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, optim, max_steps))
    return optimizer, scheduler


# checkpoints

def resume_path(run: RunConfig) -> Path | None:
    """The checkpoint this run starts from: ``run.resume`` = "auto" (newest complete one in ``run.out_dir``, if
    any), a checkpoint folder, or "" (fresh start)."""
    out_dir = Path(run.out_dir)
    if run.resume == "":
        return None
    if run.resume == "auto":
        legacy = legacy_checkpoints(out_dir)
        if legacy:
            raise ValueError(f"{checkpoint_root(out_dir)} holds checkpoints in the old pickled format, which this "
                             f"version never loads; convert them once with `{CONVERT_HINT} {out_dir}`, or start fresh "
                             "with --run.resume=\"\" and a new run.out_dir")
        found = list_checkpoints(out_dir)
        return found[-1] if found else None
    path = Path(run.resume)
    if not path.is_dir():
        raise ValueError(f"run.resume {path} does not exist; give a folder under {checkpoint_root(out_dir)}, 'auto' or ''")
    return path


def prepare_checkpoints(run: RunConfig, resume: Path | None, info: DistInfo) -> None:
    """On the main rank: tidy what a crash left (``checkpoint.recover``), and when resuming from a checkpoint of
    this run older than its newest, retire the newer ones so that pruning and auto-resume follow this run."""
    if info.is_main:
        recover(run.out_dir)
        if resume is not None and resume.resolve().parent == checkpoint_root(run.out_dir).resolve():
            retired = retire_after(run.out_dir, step_of(resume))
            if retired:
                log.info("rolled back to %s: removed the newer checkpoints %s", resume.name, [p.name for p in retired])
    barrier(info)


def restore(path: Path, config: dict[str, Any], resumable: tuple[str, ...], backend, optimizer, scheduler) -> Position:
    """Load checkpoint ``path`` into the adapters, optimizer and scheduler; restore the RNG states last."""
    state = load_checkpoint(path, config, resumable)
    load_trainable(backend, state["trainable"], path)
    params = [p for _, p in backend.trainable_parameters()]
    load_optimizer_state(backend, optimizer, state["optimizer"], is_sharded(params))
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return Position(**state["position"])


def save(backend, optimizer, scheduler, pos: Position, config: dict[str, Any], run: RunConfig, info: DistInfo) -> Path:
    """Checkpoint at ``pos`` (every rank calls this: FSDP gathers the state; all ranks wait for the write)."""
    named = backend.trainable_parameters()
    trainable = full_trainable_state(named)
    optim_state = full_optimizer_state(backend, optimizer, is_sharded([p for _, p in named]))
    if info.is_main:
        save_checkpoint(run.out_dir, pos.step, {"trainable": trainable, "optimizer": optim_state,
                                                "scheduler": scheduler.state_dict(), "position": vars(pos).copy()},
                        config, run.keep_last)
    barrier(info)
    return checkpoint_root(run.out_dir) / f"step_{pos.step:08d}"


# signals

class SigtermGuard:
    """``with SigtermGuard() as guard:`` a SIGTERM sets ``guard.requested`` instead of killing the process, so the
    loop can finish its step and save; the previous handler is restored on exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> SigtermGuard:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, *_) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)


# observers

class Observers:
    """TensorBoard writer, tqdm bar and preview paths of the main rank (the writer and bar are absent on the other
    ranks, or when not installed). ``with Observers(...) as obs:``; the run's resolved config is written to
    ``out_dir/config.json``."""

    def __init__(self, config: dict[str, Any], run: RunConfig, info: DistInfo, step: int, desc: str) -> None:
        self.writer = self.bar = None
        self.run, self.is_main = run, info.is_main
        if not info.is_main:
            return
        out_dir = Path(run.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config, indent=2))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=step or None)
        except ImportError:
            log.warning("tensorboard not installed (pip install '.[train]'); scalars are not logged")
        if run.progress:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=run.max_steps, initial=step, desc=desc, dynamic_ncols=True)
            except ImportError:
                pass

    def __enter__(self) -> Observers:
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()

    def progress(self, **shown: str) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(shown)

    def scalars(self, values: Mapping[str, Tensor | float], step: int) -> None:
        """Write scalar ``values`` at ``step`` when ``run.log_every`` says so."""
        if self.writer is None or not self.run.log_every or step % self.run.log_every:
            return
        for key, value in values.items():
            self.writer.add_scalar(key, float(value), step)

    def preview_path(self, step: int, prefix: str) -> Path | None:
        """Where this step's preview PNG goes (``out_dir/samples/<prefix>_<step>.png``) when ``run.sample_every``
        says one is due and this is the main rank; else None."""
        if not self.is_main or not self.run.sample_every or step % self.run.sample_every:
            return None
        return Path(self.run.out_dir) / "samples" / f"{prefix}_{step:08d}.png"
