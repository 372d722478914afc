"""Command line: ``python -m multisubject <command>``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multisubject", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run-workflow",
        help="start ComfyUI headless with this pack, run a shipped API workflow and save its images",
    )
    run.add_argument(
        "name", nargs="?", default=None,
        help="workflow in workflows/api (default: anyms_sdxl when its model files are in ComfyUI's models folders, "
        "else layout_preview, after listing the missing files and their folders)",
    )
    run.add_argument("--out", type=Path, default=Path("output"), help="folder for the images (default: %(default)s)")
    from .scoring.cli import add_eval_parser
    from .train.cli import add_commands, run_command

    add_eval_parser(commands)
    add_commands(commands)
    args, extra = parser.parse_known_args(argv)
    if args.command in ("train", "data"):
        return run_command(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")

    if args.command == "run-workflow":
        from .headless import run_main_job, run_workflow_to_files

        try:
            paths = run_workflow_to_files(args.name, args.out) if args.name else run_main_job(args.out)
        except (RuntimeError, FileNotFoundError, TimeoutError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        for path in paths:
            print(path.resolve())
    elif args.command == "eval":
        from .scoring.cli import run_eval
        from .scoring.deps import MissingDependency

        try:
            return run_eval(args)
        except (MissingDependency, FileNotFoundError, ValueError) as e:
            print(f"eval: error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
