"""bench/run_all.py on a fake bench folder: discovery by TARGETS, flags passed, targets judged, a crash isolated.

Never runs the real benchmarks (they take minutes); the fake scripts import nothing but the standard library.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

RUN_ALL = Path(__file__).resolve().parents[2] / "bench" / "run_all.py"

GOOD = '''
import json, sys
TARGETS = {
    "speed_ratio": ("<=", 1.5),
    "memory_ratio": {"cpu": ("<=", 1.0), "cuda": ("<=", 2.0)},
    "seconds": None,
    "cuda_peak_mib": None,
    "bound.*": (">=", 1),
    "absent": ("<=", 1),
}
print("| path | ms |")  # a benchmark's own table comes first
print(json.dumps({"speed_ratio": 1.2, "memory_ratio": 1.1, "seconds": 3, "cuda_peak_mib": None, "bound": {"flux": 2, "qwen": 0.5},
                  "argv": sys.argv[1:]}))
'''

BROKEN = '''
import sys
TARGETS = {"ratio": ("<=", 1.0)}
print("started")
print("Traceback (most recent call last):", file=sys.stderr)
raise SystemExit("RuntimeError: CUDA out of memory (fake)")
'''

HELPER = '''
raise SystemExit("a helper without TARGETS must not be run")
'''


def run_all(bench: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUN_ALL), "--bench-dir", str(bench), "--device", "cpu", *flags],
                          capture_output=True, text=True, timeout=120)


def test_run_all_table_and_json(tmp_path):
    for name, source in {"good": GOOD, "broken": BROKEN, "helper": HELPER}.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))

    proc = run_all(tmp_path, "--quick")
    assert proc.returncode == 0, proc.stderr  # a report: failing targets do not fail the command
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    results = {(r["benchmark"], r["figure"]): r["result"] for r in report["results"]}
    assert results == {
        ("broken", "-"): "error",
        ("good", "speed_ratio"): "pass",
        ("good", "memory_ratio"): "FAIL",  # the cpu target applies, not the cuda one
        ("good", "seconds"): "info",
        ("good", "bound.flux"): "pass",  # nested JSON flattened, glob expanded
        ("good", "bound.qwen"): "FAIL",
        ("good", "absent"): "missing",
    }
    assert report["counts"] == {"pass": 2, "FAIL": 2, "missing": 1, "error": 1, "info": 1}
    assert report["benchmarks"]["good"]["figures"]["argv"] == ["--device", "cpu", "--quick"]
    assert "helper" not in report["benchmarks"]
    assert "not benchmarks (no TARGETS): helper.py" in proc.stdout
    assert "| good | memory_ratio | 1.1 | <= 1 | FAIL |" in lines
    assert "| broken | - | - | - | error: exit 1: RuntimeError: CUDA out of memory (fake) |" in lines

    strict = run_all(tmp_path, "--strict", "--only", "good")
    assert strict.returncode == 1
    only = json.loads(strict.stdout.strip().splitlines()[-1])
    assert set(only["benchmarks"]) == {"good"} and only["quick"] is False
