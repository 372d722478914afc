"""Socket types and the one place ComfyUI values become core values.

ComfyUI layouts: IMAGE (B, H, W, C) float in [0, 1]; MASK (B, H, W) or (H, W) float in [0, 1].
"""

from __future__ import annotations

from comfy_api.latest import io

PREFIX = "MS_"  # node ids and socket types
CATEGORY = "multisubject"

SUBJECTS = io.Custom(f"{PREFIX}SUBJECTS")  # attention.Subjects: ordered subject records
LAYOUT = io.Custom(f"{PREFIX}LAYOUT")  # attention.Layout: canvas + one region per subject
FLUX_REFERENCES = io.Custom(f"{PREFIX}FLUX_REFERENCES")  # attention.unope.FluxReferences: refs appended to a cond
IPADAPTER = io.Custom(f"{PREFIX}IPADAPTER")  # attention.ip_adapter.IPAdapter: projection model + per-site K/V weights
ENCODED_SUBJECTS = io.Custom(f"{PREFIX}ENCODED_SUBJECTS")  # attention.anyms.EncodedSubjects: adapter tokens per subject


def mask_batch(mask):
    """Shapes: MASK (B, H, W) or (H, W) -> (B, H, W) float."""
    return (mask.unsqueeze(0) if mask.ndim == 2 else mask).float()
