"""``python -m multisubject eval``: the benchmark CLI (argument parsing and model loading only)."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path


def metric_help() -> str:
    from .evaluate import METRICS

    lines = ["metrics (higher is better; each needs the model named in brackets):"]
    needs = {"CLIP-T": "--clip-dir", "Face-Sim": "--face-pack", "DINO-I": "--dino-dir", "CLIP-I": "--clip-dir",
             "AES": "--hps-checkpoint", "Overall": "all five", "Multi-ID": "--face-pack and/or --dino-dir",
             "DINO-I (Hungarian)": "--dino-dir", "CLIP-I (Hungarian)": "--clip-dir", "ID-Conf": "--face-pack",
             "IP-Conf": "--dino-dir", "mIoU": "--detector-dir + layouts", "AP50": "--detector-dir + layouts"}
    for name, definition in METRICS.items():
        lines += textwrap.wrap(f"{name} [{needs[name]}]: {definition}", width=100, initial_indent="  ",
                               subsequent_indent="      ")
    return "\n".join(lines)


EPILOG = """
outputs in --out: per_sample.json, per_sample.csv, table.md (one row per run, the papers' format),
summary.json, plots/metrics.png (per-metric bars across runs), plots/worst_samples.png.
Models are local folders or files only; nothing is downloaded. Samples without a layout need --detector-dir
to locate their subjects; otherwise DINO-I/CLIP-I compare each reference with the whole image, and table.md
says so in a note ("objects not located"). The README's "Protocol" section states how each number is computed.
example:
  python -m multisubject eval ours=runs/ours.json uno=runs/uno.json --out eval_out \\
      --insightface-root ComfyUI/models/insightface --face-pack antelopev2 \\
      --dino-dir models/reward_models/dino-vits16 --clip-dir models/reward_models/clip-vit-large-patch14 \\
      --hps-checkpoint models/reward_models/HPS_v2.1_compressed.pt --detector-dir models/reward_models/owlv2-base
"""


def add_eval_parser(commands) -> argparse.ArgumentParser:
    from .metrics import DETECTION_THRESHOLD, HPS_ARCH

    parser = commands.add_parser(
        "eval",
        help="evaluate generated images against their references (Face-Sim, DINO-I, CLIP-I, CLIP-T, AES, Overall, "
             "Multi-ID, ID-Conf, IP-Conf, mIoU, AP50)",
        description="Evaluate one or more runs (methods) from manifests and tabulate them side by side.\n\n"
                    + metric_help(),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", metavar="[NAME=]MANIFEST",
                        help="a manifest per run (JSON list or JSON Lines of samples); NAME defaults to the file stem")
    parser.add_argument("--out", type=Path, default=Path("eval_out"), help="output folder (default: %(default)s)")
    parser.add_argument("--insightface-root", action="append", default=[], type=Path,
                        help="folder holding models/<pack>/*.onnx (ComfyUI: models/insightface); repeatable")
    parser.add_argument("--face-pack", help="insightface pack name under the roots (antelopev2, buffalo_l) or its folder")
    parser.add_argument("--face-threshold", type=float, default=0.5, help="face detection score threshold (default: %(default)s)")
    parser.add_argument("--dino-dir", "--dinov2-dir", dest="dino_dir",
                        help="local DINO folder (save_pretrained layout) for DINO-I, IP-Conf and Multi-ID objects: "
                             "DINO v1 ViT-S/16 (facebook/dino-vits16, the DreamBench backbone) or DINOv2")
    parser.add_argument("--clip-dir", help="local CLIP folder with tokenizer files for CLIP-I and CLIP-T")
    parser.add_argument("--hps-checkpoint", help="local HPS_v2.1_compressed.pt for AES")
    parser.add_argument("--hps-arch", default=HPS_ARCH, help="open_clip architecture of the HPS checkpoint (default: %(default)s)")
    parser.add_argument("--detector-dir", help="local OWLv2 (or OWL-ViT) folder: mIoU and AP50, and locating the "
                                               "subjects of samples without a layout")
    parser.add_argument("--segmenter-dir", help="local SAM folder (SamModel, e.g. facebook/sam-vit-base): located "
                                                "subjects are embedded as masked crops instead of boxes")
    parser.add_argument("--detection-threshold", type=float, default=DETECTION_THRESHOLD,
                        help="detector score threshold (default: %(default)s)")
    parser.add_argument("--scale", type=float, default=1.0, choices=[1.0, 100.0],
                        help="multiply table values: 1 (MultiCrafter style) or 100 (AnyMS style)")
    parser.add_argument("--worst", type=int, default=8, help="samples in plots/worst_samples.png (default: %(default)s)")
    parser.add_argument("--device", default=None, help="torch device for the HF/open_clip models (default: cuda if available)")
    parser.add_argument("--title", default="", help="title printed on the plots (e.g. the benchmark's name)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def parse_runs(specs: list[str]) -> dict[str, Path]:
    runs: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        if name in runs:
            raise ValueError(f"run name '{name}' given twice; name runs explicitly as NAME=MANIFEST")
        runs[name] = Path(path)
    return runs


def run_eval(args: argparse.Namespace, log=print) -> int:
    from .evaluate import Evaluator, evaluate_runs
    from .faces import FaceEmbedder
    from .metrics import HPSv2Scorer, PhraseDetector
    from .objects import ImageEmbedder

    runs = parse_runs(args.runs)
    try:  # transformers draws a progress bar per model it loads; ours is enough
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    for name, path in runs.items():
        if not path.is_file():
            raise FileNotFoundError(f"run '{name}': manifest {path} not found")
    faces = FaceEmbedder.load(args.face_pack, roots=args.insightface_root, det_threshold=args.face_threshold) \
        if args.face_pack else None
    dino = ImageEmbedder.load(args.dino_dir, args.device, what="--dino-dir") if args.dino_dir else None
    clip = ImageEmbedder.load(args.clip_dir, args.device, what="--clip-dir") if args.clip_dir else None
    hps = HPSv2Scorer.load(args.hps_checkpoint, args.hps_arch, args.device) if args.hps_checkpoint else None
    detector = PhraseDetector.load(args.detector_dir, args.device, args.detection_threshold) \
        if args.detector_dir else None
    if args.segmenter_dir and detector is None:
        raise ValueError("--segmenter-dir masks the subjects the detector locates; give --detector-dir as well")
    from .segment import BoxSegmenter

    segmenter = BoxSegmenter.load(args.segmenter_dir, args.device) if args.segmenter_dir else None
    evaluator = Evaluator(faces=faces, dino=dino, clip=clip, hps=hps, detector=detector, segmenter=segmenter)
    summaries = evaluate_runs(runs, evaluator, args.out, scale=args.scale, worst=args.worst,
                              progress=not args.no_progress, title=args.title, log=log)
    log((args.out / "table.md").read_text().rstrip())
    log(f"wrote {args.out}/per_sample.json, per_sample.csv, table.md, summary.json, plots/")
    return 1 if all(s["n"] == 0 for s in summaries.values()) else 0
