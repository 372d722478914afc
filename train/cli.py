"""``python -m multisubject train ...`` and ``python -m multisubject data ...`` (wired in the root ``__main__``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("multisubject.train")


def add_commands(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="headless trainers (see README: Training)")
    train_cmds = train.add_subparsers(dest="trainer", required=True)
    idar = train_cmds.add_parser("idar", help="MultiCrafter stage 1: flow + IDAR Dice loss, MoE-LoRA + attention LoRA")
    idar.add_argument("--config", type=Path, help="TOML config; further --section.key=value arguments override it")
    ippo = train_cmds.add_parser("ippo", help="MultiCrafter stage 2: online RL (GSPO) with the Multi-ID, CLIP and HPSv2 rewards")
    ippo.add_argument("--config", type=Path, help="TOML config; further --section.key=value arguments override it")
    export = train_cmds.add_parser("export", help="export a checkpoint's adapters as a MultiCrafter weight file")
    export.add_argument("--config", type=Path, help="the run's TOML config (default: the config saved in the "
                        "checkpoint); --section.key=value overrides apply too")
    export.add_argument("--checkpoint", type=Path, required=True, help="a folder <out_dir>/checkpoints/step_<N>")
    export.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    convert = train_cmds.add_parser("convert-checkpoint", help="rewrite checkpoints of the old pickled state.pt "
                                    "format (pack versions before safetensors checkpoints) once, without running code")
    convert.add_argument("path", type=Path, help="a checkpoint folder, a run's checkpoints folder or its out_dir")

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
    from .data import read_training_manifest

    cfg = load_trainer_config(args.config, extra)
    rows = read_training_manifest(cfg.data.manifest)
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
    if args.trainer == "convert-checkpoint":
        from .checkpoint import convert_legacy

        for folder in convert_legacy(args.path, upgrade_config=upgrade_config_dict):
            print(f"converted {folder}")
        return 0
    if args.trainer == "export":  # IDAR or IPPO checkpoint: the same adapters, the same format
        from .backend import export_checkpoint

        if args.config is None:
            cfg = config_from_checkpoint(args.checkpoint, extra)
        else:
            cfg = load_trainer_config(args.config, extra)
        print(export_checkpoint(cfg, args.checkpoint, args.out))
        return 0
    cfg = load_trainer_config(args.config, extra, expected=args.trainer)
    if args.trainer == "ippo":
        from .ippo_trainer import train_ippo

        print(train_ippo(cfg))
        return 0
    from .idar import train_idar

    print(train_idar(cfg))
    return 0


IPPO_SECTIONS = ("init", "sampler", "gspo", "reward")  # sections only the IPPO config has (for configs without `trainer`)


def config_class(trainer: str) -> type:
    from .config import TRAINERS, IDARConfig
    from .ippo_config import IPPOConfig

    classes = {"idar": IDARConfig, "ippo": IPPOConfig}
    if trainer not in classes:
        raise ValueError(f"trainer = {trainer!r} is not a trainer; use one of {list(TRAINERS)}")
    return classes[trainer]


def load_trainer_config(path: Path | None, extra: list[str], expected: str | None = None):
    """The IDAR or the IPPO config, as its ``trainer`` key says (from the file or an override). Without the key:
    ``expected`` (the command's trainer), else guessed from the sections with a deprecation message."""
    from .config import load_config, parse_override, read_toml

    raw = read_toml(path) if path is not None else {}
    overrides = dict(parse_override(item) for item in extra)
    trainer = overrides.get("trainer", raw.get("trainer"))
    if trainer is None:
        sections = set(raw) | {key.split(".")[0] for key in overrides}
        trainer = expected or ("ippo" if sections & set(IPPO_SECTIONS) else "idar")
        if path is not None:
            log.warning("config %s has no `trainer` key; reading it as the %s trainer's config. Add `trainer = \"%s\"` "
                        "at its top: configs without it stop being accepted in a later version", path, trainer, trainer)
        extra = [*extra, f"--trainer={trainer}"]
    return load_config(path, extra, cls=config_class(expected or trainer))  # a mismatch is refused by the config


def config_from_checkpoint(checkpoint: Path, extra: list[str]):
    """The config a checkpoint was written with (+ overrides), of the trainer it names."""
    from .checkpoint import read_checkpoint_config
    from .config import load_config

    saved = read_checkpoint_config(checkpoint)
    return load_config(None, extra, cls=config_class(saved.get("trainer", "idar")), base=saved)


def upgrade_config_dict(saved: dict) -> dict:
    """A config saved by an earlier version, as this version writes it: the `trainer` key added (from the
    sections), renamed keys moved (with their deprecation messages), removed keys dropped, and keys added since
    set to what that version did where their default now does something else (``gspo.minibatches`` = 1: it took
    one optimizer step per rollout batch), so a resumed run is refused on the difference rather than changed."""
    from .config import from_dict

    trainer = saved.get("trainer") or ("ippo" if set(saved) & set(IPPO_SECTIONS) else "idar")
    saved = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
    if trainer == "ippo":
        if saved.get("reward", {}).pop("use_layout", False):
            log.warning("reward.use_layout is gone: rewards get no layout (the identity reward locates object "
                        "subjects with reward.detector_dir instead); dropped from the saved config")
        if "gspo" in saved:
            saved["gspo"].setdefault("minibatches", 1)
    return from_dict(config_class(trainer), {**saved, "trainer": trainer}).to_dict()
