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


def load_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_weights_close(a: dict, b: dict, atol: float) -> None:
    assert set(a) == set(b)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, f"largest difference {worst}"


def loader_node_predictions(comfy_nodes, exported: Path, model_cfg, seed: int, trained):
    """One tiny-Flux prediction three ways: the base model, the base patched by ``MS_LoadMoELoRA`` with the exported
    file, and the in-memory trained backend. Returns ``(base, patched, trained)`` outputs, each (1, 16, 8, 8)."""
    import folder_paths
    import torch
    from comfy import model_management

    from multisubject.train.comfy_backend import FluxInputs, load_flux

    folder_paths.add_model_folder_path("loras", str(exported.parent))
    base = load_flux(model_cfg, seed=seed)
    patched = comfy_nodes.NODE_CLASS_MAPPINGS["MS_LoadMoELoRA"].execute(base, exported.name, 1.0, 1.0).result[0]
    gen = torch.Generator().manual_seed(3)
    x, refs = torch.randn(1, 16, 8, 8, generator=gen), [torch.randn(1, 16, 4, 4, generator=gen) for _ in range(2)]
    context, pooled, t = torch.randn(1, 8, 32, generator=gen), torch.randn(1, 32, generator=gen), torch.tensor([0.6])
    outs = []
    for model in (base, patched):
        model_management.load_models_gpu([model])
        with torch.no_grad():
            outs.append(model.model.diffusion_model(x, t, context, y=pooled, guidance=torch.ones(1), ref_latents=refs,
                                                    ref_latents_method="uxo"))
    model_management.unload_all_models()
    with torch.no_grad():
        mine, _ = trained(FluxInputs(x, t, context, pooled, refs))
    return outs[0], outs[1], mine


def stop_after_checkpoint(cli_args: list[str], out_dir: Path, step: int, env: dict[str, str],
                          sig: str = "SIGKILL", settle: float = 0.0) -> int:
    """Start ``python -m multisubject *cli_args``, send it ``sig`` ``settle`` seconds after it has saved a
    checkpoint at ``step`` or later; returns its exit code."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "multisubject", *cli_args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not checkpoint_reached(out_dir, step) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(settle)
    proc.send_signal(getattr(signal, sig))
    return proc.wait(timeout=60)


class _Planted:
    """What a copied checkpoint folder may hold: a pickle whose loading runs code (here: makes a marker folder)."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def plant_legacy_checkpoint(folder: Path, marker: Path, config: dict) -> None:
    """A checkpoint folder of the old format whose state.pt runs code (creates ``marker``) when unpickled with
    ``weights_only=False``."""
    import json

    import torch

    folder.mkdir(parents=True)
    torch.save({"trainable": _Planted(marker), "step": 1}, folder / "state.pt")
    (folder / "config.json").write_text(json.dumps(config))
