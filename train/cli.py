"""``python -m multisubject train ...`` and ``python -m multisubject data ...`` (wired in the root ``__main__``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_commands(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="headless trainers (see README: Training)")
    train_cmds = train.add_subparsers(dest="trainer", required=True)
    idar = train_cmds.add_parser("idar", help="MultiCrafter stage 1: flow + IDAR Dice loss, MoE-LoRA + attention LoRA")
    idar.add_argument("--config", type=Path, help="TOML config; further --section.key=value arguments override it")
    ippo = train_cmds.add_parser("ippo", help="MultiCrafter stage 2: online RL (GSPO) with the Multi-ID, CLIP and HPSv2 rewards")
    ippo.add_argument("--config", type=Path, help="TOML config; further --section.key=value arguments override it")
    export = train_cmds.add_parser("export", help="export a checkpoint's adapters as a MultiCrafter weight file")
    export.add_argument("--config", type=Path, help="the run's TOML config (IDAR or IPPO); --section.key=value overrides apply too")
    export.add_argument("--checkpoint", type=Path, required=True, help="a folder <out_dir>/checkpoints/step_<N>")
    export.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")

    data = commands.add_parser("data", help="dataset tools: validate, build a manifest, cache latents and text")
    data_cmds = data.add_subparsers(dest="data_command", required=True)
    validate = data_cmds.add_parser("validate", help="check a manifest; print a summary; write a preview grid PNG")
    validate.add_argument("manifest", type=Path)
    validate.add_argument("--preview", type=Path, help="preview grid PNG (default: <manifest folder>/preview.png)")
    validate.add_argument("--resolution", type=int, default=512, help="bucket resolution (default: %(default)s)")
    validate.add_argument("--max-aspect", type=float, default=2.0, help="largest bucket aspect (default: %(default)s)")
    build = data_cmds.add_parser("build", help="write manifest.jsonl from <folder>/<sample>/{target,caption.txt,ref_i,mask_i}")
    build.add_argument("folder", type=Path)
    build.add_argument("--out", type=Path, help="manifest path (default: <folder>/manifest.jsonl)")
    cache = data_cmds.add_parser("cache", help="encode latents and text once (VAE, CLIP-L, T5) for training")
    cache.add_argument("--config", type=Path, help="the training TOML config (model and data sections)")


def run_command(args: argparse.Namespace, extra: list[str]) -> int:
    """Run a parsed ``train``/``data`` command; ``extra`` holds the ``--section.key=value`` overrides."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "data":
            return _data(args, extra)
        return _train(args, extra)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _data(args, extra: list[str]) -> int:
    from .data import build_manifest, validate_dataset

    if args.data_command == "build":
        print(build_manifest(args.folder, args.out))
        return 0
    if args.data_command == "validate":
        preview = args.preview or args.manifest.parent / "preview.png"
        report = validate_dataset(args.manifest, args.resolution, args.max_aspect, preview=preview)
        print(report.summary())
        print(f"preview: {preview}")
        return 1 if report.problems else 0
    from .cache import TinyEncoder, build_cache, file_hash
    from .data import read_manifest

    cfg = load_any_config(args.config, extra)
    rows = read_manifest(cfg.data.manifest)
    if cfg.model.tiny:
        encoder = TinyEncoder(cfg.model.tiny_context_dim, cfg.model.tiny_vec_dim)
    else:
        from .comfy_backend import ComfyEncoder

        encoder = ComfyEncoder(cfg.model)
    cache_dir = cfg.data.cache_dir or Path(cfg.data.manifest).parent / "cache"
    added, reused = build_cache(rows, file_hash(Path(cfg.data.manifest)), cfg.data, encoder, cache_dir)
    print(f"cache {cache_dir}: {added} entries encoded, {reused} reused")
    return 0


def _train(args, extra: list[str]) -> int:
    from .idar import export_checkpoint, train_idar

    if args.trainer == "ippo":
        from .ippo_config import load_ippo_config
        from .ippo_trainer import train_ippo

        print(train_ippo(load_ippo_config(args.config, extra)))
        return 0
    if args.trainer == "export":  # IDAR or IPPO checkpoint: the same adapters, the same format
        print(export_checkpoint(load_any_config(args.config, extra), args.checkpoint, args.out))
        return 0
    from .config import load_config

    print(train_idar(load_config(args.config, extra)))
    return 0


IPPO_SECTIONS = ("init", "sampler", "gspo", "reward")  # sections only the IPPO config has


def load_any_config(path: Path | None, extra: list[str]):
    """The IDAR or the IPPO config, whichever the file (or the overrides) describe: an IPPO config is one with any
    of the sections ``IPPO_SECTIONS``."""
    import tomllib

    from .config import load_config
    from .ippo_config import load_ippo_config

    sections = set()
    if path is not None and Path(path).is_file():
        with open(path, "rb") as fh:
            try:
                sections = set(tomllib.load(fh))
            except tomllib.TOMLDecodeError:
                pass  # the loader reports it
    sections |= {item.lstrip("-").split(".")[0] for item in extra}
    if sections & set(IPPO_SECTIONS):
        return load_ippo_config(path, extra)
    return load_config(path, extra)
