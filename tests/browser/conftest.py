"""Tier 3 (tests/browser/): the canvas editor in a real browser against a real ComfyUI server.

Runs whenever ComfyUI, the Python ``playwright`` package and a Chromium binary are found; otherwise it is skipped
with one loud line naming where it looked. The browser is the system's Chromium (Debian: ``apt-get install
chromium``) driven through ``executable_path``; playwright's own browser downloads are never used
(``scripts/setup.sh`` installs both).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from multisubject.headless import find_comfyui

CHROMIUM_CANDIDATES = ["$CHROMIUM_PATH", "chromium", "chromium-browser", "/usr/bin/chromium", "/usr/lib/chromium/chromium"]


def find_chromium() -> Path | None:
    for name in CHROMIUM_CANDIDATES:
        name = os.environ.get("CHROMIUM_PATH", "") if name == "$CHROMIUM_PATH" else name
        found = name and shutil.which(name)
        if found:
            return Path(found)
    return None


CHROMIUM = find_chromium()
HAS_PLAYWRIGHT = importlib.util.find_spec("playwright") is not None
MISSING = [
    what
    for what, ok in [
        ("ComfyUI (see the ComfyUI tier's line)", find_comfyui() is not None),
        ("Chromium (looked for: " + ", ".join(CHROMIUM_CANDIDATES) + ")", CHROMIUM is not None),
        ("the Python package playwright (in this interpreter)", HAS_PLAYWRIGHT),
    ]
    if not ok
]
_SKIP_LINE = (
    "!!! browser test tier (tests/browser) is SKIPPED: missing " + "; ".join(MISSING)
    + ". Run scripts/setup.sh (as root it installs Chromium with apt) or set CHROMIUM_PATH !!!"
)

if MISSING:
    collect_ignore_glob = ["test_*.py"]


def pytest_terminal_summary(terminalreporter):
    if MISSING:
        terminalreporter.write_line(_SKIP_LINE, red=True, bold=True)


@pytest.fixture(scope="session")
def chromium() -> Path:
    return CHROMIUM
