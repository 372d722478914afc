"""Where this pack's ComfyUI is: the one place that answers it, for the setup script, the trainers and the tests.

Standard library only, so it also runs as a plain script before the pack is installed:
``python3 comfyui_locator.py`` prints the folder (exit 0) or nothing (exit 1); the setup script uses it.

Where ComfyUI is looked for, in order: ``$COMFYUI_PATH``; the ComfyUI that holds this pack
(``<ComfyUI>/custom_nodes/<pack>``); ``~/comfy/ComfyUI`` (the comfy-cli default).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent


def comfyui_candidates() -> list[Path]:
    """Places ComfyUI is looked for, in order."""
    places = []
    if os.environ.get("COMFYUI_PATH"):
        places.append(Path(os.environ["COMFYUI_PATH"]).expanduser())
    if PACK_DIR.parent.name == "custom_nodes":
        places.append(PACK_DIR.parent.parent)
    places.append(Path.home() / "comfy" / "ComfyUI")
    return places


def find_comfyui() -> Path | None:
    """The first candidate that holds a ComfyUI checkout (its ``main.py`` and ``comfy/``), or None."""
    for place in comfyui_candidates():
        if (place / "main.py").is_file() and (place / "comfy").is_dir():
            return place.resolve()
    return None


def require_comfyui() -> Path:
    path = find_comfyui()
    if path is None:
        looked = ", ".join(str(p) for p in comfyui_candidates())
        raise RuntimeError(
            f"ComfyUI not found (looked in: {looked}). Set COMFYUI_PATH to your ComfyUI folder, or install this "
            "pack into ComfyUI/custom_nodes"
        )
    return path


if __name__ == "__main__":
    found = find_comfyui()
    print(found or "")  # noqa: T201 -- the setup script reads this line
    sys.exit(0 if found else 1)
