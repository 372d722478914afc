"""Crash-safe checkpoints that hold no pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder ``<out_dir>/checkpoints/step_<N>/``:

    tensors.safetensors   every tensor of the state (adapters, optimizer moments, RNG states), keyed by its place
    state.json            the rest (step, data position, scheduler, optimizer hyper-parameters, python/numpy RNG
                          state) with each tensor replaced by {"$tensor": key}
    config.json           the resolved config
    COMPLETE              written last: a folder without it does not count

It is written into a temporary folder (``.tmp-step_<N>-<pid>``), every file fsynced, then renamed into place.
Folders leave the listing by a rename before they are deleted (``.trash-...``), and a step that is saved again is
first moved aside (``.old-step_<N>-...``) and restored by ``recover`` if a crash came before its replacement was
in place, so a kill at any moment leaves every complete checkpoint either listed or recoverable, never half of one.
Nothing here unpickles: checkpoints of the earlier ``state.pt`` format are refused with the one-time converter's
command (``convert_legacy``, the only reader of a pickle, with ``weights_only=True`` and an explicit allowlist).
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
from torch import Tensor

from .config import config_diff

STEP_DIR = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"  # the completion marker, written last
TENSORS, STATE, CONFIG = "tensors.safetensors", "state.json", "config.json"
LEGACY_STATE = "state.pt"  # the pickled format before this one
FORMAT = 1
# keys that may change between a run and its resumption (they steer the run, not the model or the data)
RESUMABLE_KEYS = ("run.max_steps", "run.resume", "run.save_every", "run.keep_last", "run.log_every",
                  "run.sample_every", "run.sample_steps", "run.progress", "run.out_dir", "data.manifest",
                  "data.cache_dir", "model.comfyui", "model.diffusion_model", "model.vae", "model.clip_l", "model.t5")
CONVERT_HINT = "python -m multisubject train convert-checkpoint"


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints (marker present), oldest first; temporary, retired and unfinished folders are ignored."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / COMPLETE).is_file())


def legacy_checkpoints(out_dir: str | Path) -> list[Path]:
    """Checkpoints in the pickled ``state.pt`` format (to be converted once with ``convert_legacy``)."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / LEGACY_STATE).is_file()
                  and not (p / COMPLETE).is_file())


# RNG

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


# saving

def save_checkpoint(out_dir: str | Path, step: int, state: dict[str, Any], config: dict[str, Any], keep_last: int) -> Path:
    """Write ``state`` (+ step, RNG states) and ``config`` as checkpoint ``step``; keep the newest ``keep_last``.

    ``state`` may hold tensors, numpy arrays, dicts (any hashable JSON-able keys), lists, tuples, str, int, float,
    bool and None; anything else is refused (so nothing ever needs a pickle)."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint_dir(tmp, {**state, "step": step, "rng": rng_state()}, config)
    _install(tmp, final)
    for old in list_checkpoints(out_dir)[:-keep_last]:
        retire(old)
    return final


def write_checkpoint_dir(folder: Path, state: dict[str, Any], config: dict[str, Any]) -> None:
    """The checkpoint files in a new ``folder``, each fsynced, the completion marker last."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    tensors: dict[str, Tensor] = {}
    encoded = _encode(state, "", tensors)
    save_file(tensors, str(folder / TENSORS), metadata={"format": f"multisubject-checkpoint/{FORMAT}"})
    _fsync_file(folder / TENSORS)
    _write_synced(folder / STATE, json.dumps(encoded).encode())
    _write_synced(folder / CONFIG, json.dumps(config, indent=2, sort_keys=True).encode())
    _write_synced(folder / COMPLETE, json.dumps({"format": FORMAT, "step": state.get("step")}).encode())
    _fsync_dir(folder)


def _install(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first and deleted only once replaced."""
    aside = None
    if final.exists():  # re-saving the same step (e.g. SIGTERM right after a periodic save)
        aside = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def retire(path: Path) -> None:
    """Delete a checkpoint folder: renamed out of the listing first, so a kill mid-delete leaves no half folder."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    _fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def retire_after(out_dir: str | Path, step: int) -> list[Path]:
    """Roll back: retire the complete checkpoints newer than ``step`` (an earlier run's future), newest first, so
    that auto-resume and pruning follow the resumed run. Returns the retired folders."""
    newer = [p for p in list_checkpoints(out_dir) if step_of(p) > step]
    for path in reversed(newer):
        retire(path)
    return newer


def recover(out_dir: str | Path) -> None:
    """Tidy the checkpoint folder after a crash (call at start, on one process): a step moved aside for a re-save
    whose replacement never landed is put back; temporary and retired folders of killed writes are removed."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        if path.name.startswith(".old-step_"):
            final = root / path.name[len(".old-"):].rsplit("-", 1)[0]
            if not final.exists() and (path / COMPLETE).is_file():
                os.replace(path, final)
                continue
        if path.name.startswith((".tmp-step_", ".trash-step_", ".old-step_")):
            shutil.rmtree(path, ignore_errors=True)
    _fsync_dir(root)


# loading

def load_checkpoint(path: str | Path, config: dict[str, Any], resumable: tuple[str, ...] = RESUMABLE_KEYS) -> dict[str, Any]:
    """Load a checkpoint folder; refuses one written with a different config (naming the differing keys), except
    keys starting with one of ``resumable``. The caller restores RNG with ``set_rng_state(state["rng"])`` after
    rebuilding everything else. Reads safetensors and JSON only."""
    path = Path(path)
    saved = read_checkpoint_config(path)
    diff = [d for d in config_diff(saved, config) if not d.startswith(resumable)]
    if diff:
        raise ValueError(f"checkpoint {path} was made with a different config; differing keys:\n  " + "\n  ".join(diff)
                         + "\nresume with the original config, or start fresh with --run.resume=\"\" and a new run.out_dir")
    return read_state(path)


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    """The resolved config a checkpoint was written with (checks that ``path`` is a complete checkpoint)."""
    path = Path(path)
    if (path / LEGACY_STATE).is_file() and not (path / COMPLETE).is_file():
        raise ValueError(f"checkpoint {path} is in the old pickled format (state.pt), which this version never loads; "
                         f"convert it once with `{CONVERT_HINT} {path}`")
    if not (path / COMPLETE).is_file():
        raise ValueError(f"{path} is not a complete checkpoint folder (no {COMPLETE} marker: not a checkpoint, or a "
                         "write that was interrupted); pick one under <out_dir>/checkpoints/")
    try:
        return json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path}: {CONFIG} is unreadable ({e}); pick another checkpoint") from None


def read_state(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path / TENSORS), device="cpu")
        encoded = json.loads((path / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError, SafetensorError) as e:
        raise ValueError(f"checkpoint {path} is damaged ({type(e).__name__}: {e}); pick another checkpoint") from None
    return _decode(encoded, tensors)


# tensors <-> JSON

def _encode(obj: Any, key: str, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, Tensor):
        tensors[key] = obj.detach().cpu().clone().contiguous()  # clone: safetensors refuses shared storage
        return {"$tensor": key}
    if isinstance(obj, np.ndarray):
        tensors[key] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "iu" else obj.copy())
        return {"$ndarray": key, "dtype": obj.dtype.str}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode(v, f"{key}/{k}", tensors) for k, v in obj.items()}
        return {"$items": [[k, _encode(v, f"{key}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    raise TypeError(f"checkpoint state {key or '/'} is a {type(obj).__name__}; checkpoints hold tensors and JSON "
                    "values only")


def _decode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "$tensor" in obj:
        return tensors[obj["$tensor"]]
    if "$ndarray" in obj:
        return tensors[obj["$ndarray"]].numpy().astype(np.dtype(obj["dtype"]))
    if "$tuple" in obj:
        return tuple(_decode(v, tensors) for v in obj["$tuple"])
    if "$items" in obj:
        return {k: _decode(v, tensors) for k, v in obj["$items"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


# the one-time converter

def convert_legacy(path: str | Path, upgrade_config=None) -> list[Path]:
    """Rewrite checkpoints of the pickled ``state.pt`` format in this format. ``path``: one checkpoint folder, a
    run's ``checkpoints`` folder or its ``out_dir``. The pickle is read with ``weights_only=True`` and only the
    numpy types of an RNG state allowed; anything else in it is refused. ``upgrade_config`` (dict -> dict) brings
    the saved config up to date. Returns the converted folders."""
    path = Path(path)
    folders = [path] if (path / LEGACY_STATE).is_file() else legacy_checkpoints(path) or legacy_checkpoints(path.parent)
    if not folders:
        raise ValueError(f"{path} holds no checkpoint in the old state.pt format; give a step_<N> folder, its "
                         "checkpoints folder or the run's out_dir")
    for folder in folders:
        state = _read_legacy(folder / LEGACY_STATE)
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        if upgrade_config is not None:
            config = upgrade_config(config)
        tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        write_checkpoint_dir(tmp, state, config)
        _install(tmp, folder)
    return folders


def _read_legacy(file: Path) -> dict[str, Any]:
    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 / 1
    reconstruct = core.multiarray._reconstruct
    try:
        with torch.serialization.safe_globals([reconstruct, *allowed]):
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ... for a refused pickle
        raise ValueError(f"{file} holds more than tensors, numbers and numpy RNG state, so it is not converted (it may "
                         f"be a planted or foreign file; nothing in it was run): {str(e).splitlines()[0][:200]}") from None


# files

def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
