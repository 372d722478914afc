"""Run every benchmark in bench/ and print one table (benchmark, figure, value, target, result); last line one JSON object.

    python bench/run_all.py [--device cpu|cuda] [--real-dims] [--quick] [--only NAME,...] [--strict]
                            [--timeout SECONDS] [--log-dir DIR]

On CPU, ``--quick`` is the few-minute check; on a GPU, ``--device cuda --real-dims`` is the one command to run.
Each benchmark runs in its own subprocess, so a crash or a timeout costs only its own row ("error" with its last
stderr line). The exit code is 0 whatever the figures (this is a report) unless ``--strict``: then 1 when any figure
is FAIL, missing or error.

The convention (a later ``bench/*.py`` that follows it is picked up without touching this file):

* **TARGETS.** A module-level literal ``TARGETS = {figure: target}``. run_all reads it from the source
  (``ast.literal_eval``), never imports the script; a ``bench/*.py`` without it is a helper, not a benchmark, and is
  named under the table. A target is ``(op, bound)`` with op one of ``<=``, ``<``, ``>=``, ``>``; or
  ``{"cpu": (op, bound), "cuda": (op, bound)}`` when it depends on the device (a device left out shows the figure
  without a target); or ``None``: the figure is shown, with no target (and left out when its value is null: a
  figure this device does not measure, such as CUDA peak memory on CPU). ``figure`` names a key of the last JSON line,
  nested objects joined with dots (``{"bound_over_unbound": {"flux": 1.1}}`` is ``bound_over_unbound.flux``), and
  may be a glob (``bound_over_unbound.*``). A declared figure missing from the JSON is a failure ("missing").
* **Command line.** Every benchmark accepts ``--device {cpu,cuda}`` (timings between ``torch.cuda.synchronize``
  calls, peak-memory figures on CUDA), ``--real-dims`` (real model sizes; accepted and a no-op where the default
  already is, saying so in ``--help``) and ``--quick`` (fewer repetitions). ``harness.py`` holds these.
* **Output.** A readable table of its own, then one JSON object on the last stdout line.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

OPS = {"<=": lambda v, b: v <= b, "<": lambda v, b: v < b, ">=": lambda v, b: v >= b, ">": lambda v, b: v > b}
FAILING = ("FAIL", "missing", "error")


def declared_targets(script: Path) -> dict | None:
    """The script's module-level ``TARGETS`` literal, or None when it declares none (a helper module)."""
    tree = ast.parse(script.read_text(), filename=str(script))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "TARGETS" for t in node.targets):
            value = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "TARGETS":
            value = node.value
        else:
            continue
        targets = ast.literal_eval(value)
        if not isinstance(targets, dict):
            raise ValueError(f"{script.name}: TARGETS must be a dict literal {{figure: target}}, got {type(targets).__name__}")
        return targets
    return None


def target_for(spec, device: str) -> tuple[str, float] | None:
    """``(op, bound)`` for this device from one TARGETS value, or None (show without a target)."""
    if isinstance(spec, dict):
        spec = spec.get(device)
    if spec is None:
        return None
    op, bound = spec
    if op not in OPS:
        raise ValueError(f"target operator {op!r} is not one of {', '.join(OPS)}")
    return op, float(bound)


def flatten(obj: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def last_json(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise ValueError("printed nothing; a benchmark's last stdout line must be one JSON object")
    try:
        figures = json.loads(lines[-1])
    except json.JSONDecodeError:
        raise ValueError(f"last stdout line is not JSON: {lines[-1][:120]!r}") from None
    if not isinstance(figures, dict):
        raise ValueError(f"last stdout line is JSON but not an object: {lines[-1][:120]!r}")
    return figures


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@dataclass
class Run:
    name: str
    seconds: float
    figures: dict | None  # the flattened last JSON line; None when the run failed
    error: str | None


def run_benchmark(script: Path, flags: list[str], timeout: float, log_dir: Path | None) -> Run:
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(script), *flags], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        proc, error = None, f"timed out after {timeout:.0f} s (--timeout)"
    else:
        out, err, error = proc.stdout, proc.stderr, None
    seconds = time.perf_counter() - start
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / f"{script.stem}.log").write_text(f"$ {sys.executable} {script} {' '.join(flags)}\n{out}\n"
                                                     f"--- stderr ---\n{err}")
    if proc is not None and proc.returncode != 0:
        error = f"exit {proc.returncode}: {last_line(err) or last_line(out) or 'no output'}"
    if error is not None:
        return Run(script.stem, seconds, None, error)
    try:
        return Run(script.stem, seconds, flatten(last_json(out)), None)
    except ValueError as exc:
        return Run(script.stem, seconds, None, str(exc))


def fmt(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.4g}"


def judge(run: Run, targets: dict, device: str) -> list[dict]:
    """One row per declared figure (globs expanded); a failed run is one "error" row."""
    if run.figures is None:
        return [{"benchmark": run.name, "figure": "-", "value": None, "target": None, "result": "error",
                 "error": run.error}]
    rows = []
    for pattern, spec in targets.items():
        target = target_for(spec, device)
        names = sorted(fnmatch.filter(run.figures, pattern)) if any(c in pattern for c in "*?[") else [pattern]
        names = [n for n in names if n in run.figures] or [pattern]
        for name in names:
            value = run.figures.get(name)
            if value is None and target is None and name in run.figures:
                continue  # a figure this device does not measure (e.g. CUDA peak memory on CPU)
            if name not in run.figures:
                result = "missing"
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                result = "FAIL" if target else "info"
            elif target is None:
                result = "info"
            else:
                result = "pass" if OPS[target[0]](value, target[1]) else "FAIL"
            rows.append({"benchmark": run.name, "figure": name, "value": value,
                         "target": f"{target[0]} {fmt(target[1])}" if target else None, "result": result})
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = ["| benchmark | figure | value | target | result |", "|---|---|---|---|---|"]
    for r in rows:
        result = f"error: {r['error']}" if r["result"] == "error" else r["result"]
        value = "-" if r["value"] is None else fmt(r["value"])
        lines.append(f"| {r['benchmark']} | {r['figure']} | {value} | {r['target'] or '-'} | {result} |")
    return lines


def default_device() -> str:
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="The benchmark convention is in this file's docstring.")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--real-dims", action="store_true", help="real model sizes where a benchmark reduces them")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions in every benchmark")
    parser.add_argument("--only", default="", help="comma-separated benchmark names (file stems) to run")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any figure is FAIL, missing or error")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per benchmark (default %(default)s)")
    parser.add_argument("--log-dir", type=Path, default=None, help="write each benchmark's full output here")
    parser.add_argument("--bench-dir", type=Path, default=Path(__file__).resolve().parent, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = args.device or default_device()
    flags = ["--device", device] + ["--real-dims"] * args.real_dims + ["--quick"] * args.quick

    benchmarks, helpers = {}, []
    for script in sorted(args.bench_dir.glob("*.py")):
        if script.resolve() == Path(__file__).resolve():
            continue
        targets = declared_targets(script)
        if targets is None:
            helpers.append(script.name)
        else:
            benchmarks[script.stem] = (script, targets)
    only = [name for name in args.only.split(",") if name]
    unknown = sorted(set(only) - set(benchmarks))
    if unknown:
        parser.error(f"--only {','.join(unknown)}: no such benchmark; have {', '.join(benchmarks)}")
    names = only or list(benchmarks)

    start = time.perf_counter()
    rows, runs = [], {}
    for i, name in enumerate(names, 1):
        script, targets = benchmarks[name]
        print(f"[{i}/{len(names)}] {name} {' '.join(flags)} ...", file=sys.stderr, flush=True)
        run = run_benchmark(script, flags, args.timeout, args.log_dir)
        print(f"[{i}/{len(names)}] {name}: {'error' if run.error else 'ok'} in {run.seconds:.0f} s",
              file=sys.stderr, flush=True)
        runs[name] = {"seconds": round(run.seconds, 1), "error": run.error, "figures": run.figures}
        rows += judge(run, targets, device)

    counts = {kind: sum(r["result"] == kind for r in rows) for kind in ("pass", "FAIL", "missing", "error", "info")}
    mode = f"device {device}{', real dims' if args.real_dims else ''}{', quick' if args.quick else ''}"
    print(f"benchmarks: {len(names)} ({mode}), {time.perf_counter() - start:.0f} s")
    print("\n".join(table(rows)))
    print(", ".join(f"{n} {kind}" for kind, n in counts.items() if n) or "no figures")
    if helpers:
        print(f"not benchmarks (no TARGETS): {', '.join(helpers)}")
    print(json.dumps({"device": device, "real_dims": args.real_dims, "quick": args.quick, "counts": counts,
                      "results": rows, "benchmarks": runs}))
    return 1 if args.strict and any(r["result"] in FAILING for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
