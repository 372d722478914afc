"""Optional dependencies of scoring: imported lazily, a missing one gets one clear line."""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRA = "eval"
# import name -> PyPI distribution
DISTRIBUTIONS = {
    "insightface": "insightface",
    "onnxruntime": "onnxruntime (or onnxruntime-gpu)",
    "cv2": "opencv-python",
    "transformers": "transformers",
    "open_clip": "open_clip_torch",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
}


class MissingDependency(RuntimeError):
    """An optional package needed by identity scoring or the evaluation CLI is not installed."""


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise one line naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        dist = DISTRIBUTIONS.get(module.split(".")[0], module.split(".")[0])
        raise MissingDependency(
            f"{purpose} needs the optional package {dist}, which is not installed ({e}); install the evaluation "
            f"extra: pip install 'multisubject[{EXTRA}]' (from the pack folder: pip install -e '.[{EXTRA}]')"
        ) from None
