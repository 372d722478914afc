"""Test tiers.

Tier 1 (everything outside tests/comfy/): pure tests, no ComfyUI needed.
Tier 2 (tests/comfy/): runs whenever a ComfyUI checkout is found (see comfyui_locator.comfyui_candidates);
otherwise it is skipped with one loud line naming where we looked.
"""

from __future__ import annotations

import sys

from multisubject.comfyui_locator import comfyui_candidates, find_comfyui

COMFYUI = find_comfyui()
_SKIP_LINE = (
    "!!! ComfyUI not found: the ComfyUI test tier (tests/comfy) is SKIPPED. Looked in: "
    + ", ".join(str(p) for p in comfyui_candidates())
    + " (set COMFYUI_PATH) !!!"
)

if COMFYUI is None:
    collect_ignore_glob = ["comfy/*"]
else:
    # ComfyUI's root must come first: its modules `import nodes`, `import utils`, ... by top-level name.
    # The pack is imported as `multisubject.*`, so its own `nodes/` never shadows ComfyUI's nodes.py.
    sys.path.insert(0, str(COMFYUI))
    # main.py imports ComfyUI's `utils` package first; without that, importing comfy_api during collection
    # binds the name `utils` to comfy/utils.py and comfy_extras/nodes_images.py later fails to import.
    import utils.install_util  # noqa: F401,E402


def pytest_report_header(config):
    return f"ComfyUI tier: {COMFYUI}" if COMFYUI else _SKIP_LINE


def pytest_terminal_summary(terminalreporter):
    if COMFYUI is None:
        terminalreporter.write_line(_SKIP_LINE, red=True, bold=True)
