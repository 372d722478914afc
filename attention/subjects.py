"""Subject records: the reference image(s) of one subject plus how strongly and when it applies.

A subject may carry several reference images (``R > 1``): they are kept, in order, and the
encoders downstream combine them (AnyMS averages adapter tokens; MultiCrafter appends one
reference per image). Images are normalised once, here: RGB float in [0, 1]; an RGBA image's
alpha becomes the subject mask when no mask is given; grayscale is repeated to RGB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

WEIGHT_RANGE = (0.0, 5.0)  # 0 disables a subject; above ~1.5 identity usually overpowers the prompt


@dataclass(frozen=True)
class Subject:
    """One user-given subject.

    Shapes:
        images: (R, H, W, 3) float in [0, 1]
        masks:  (R, H, W) float in [0, 1], 1 = the subject, or None (whole image is the subject)
    """

    images: Tensor
    masks: Tensor | None = None
    label: str = ""  # phrase naming the subject in the prompt, e.g. "a corgi"; used for previews and scoring
    weight: float = 1.0  # strength multiplier; 0 = off
    start_percent: float = 0.0  # fraction of the denoising schedule where the subject switches on
    end_percent: float = 1.0  # fraction where it switches off; 1 = until the end
    # overlap order: higher wins where regions overlap; on equal priority the smaller region wins (nested boxes),
    # on equal priority and area the later subject (layout.overlap_order)
    priority: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.images, Tensor) or self.images.ndim != 4 or self.images.shape[-1] != 3:
            shape = tuple(self.images.shape) if isinstance(self.images, Tensor) else type(self.images).__name__
            problems.append(
                f"images must be (R, H, W, 3) RGB, got {shape}; build subjects with Subject.from_image(), "
                "which converts RGBA and grayscale"
            )
        elif self.images.shape[0] == 0 or 0 in self.images.shape[1:3]:
            problems.append(f"a subject needs at least one non-empty reference image, got {tuple(self.images.shape)}")
        elif not bool(torch.isfinite(self.images).all()):
            problems.append("the reference image holds NaN or inf values; the node that made it produced invalid "
                            "numbers (check its inputs) - connect a valid image")
        if self.masks is not None and isinstance(self.images, Tensor) and self.images.ndim == 4:
            expected = tuple(self.images.shape[:3])
            if tuple(self.masks.shape) != expected:
                problems.append(
                    f"masks must match the reference images: expected {expected} (R, H, W), got "
                    f"{tuple(self.masks.shape)}"
                )
            elif not bool(torch.isfinite(self.masks).all()):
                problems.append("the subject mask holds NaN or inf values; the node that made it produced invalid "
                                "numbers (check its inputs) - connect a valid mask")
            elif bool((self.masks.flatten(1).amax(1) <= 0).any()):
                empty = [i for i, m in enumerate(self.masks) if float(m.max()) <= 0]
                problems.append(
                    f"the mask of reference image(s) {empty} is all zero, so nothing of the subject is visible; "
                    "if the mask comes from LoadImage of a cut-out PNG (which marks the background), turn on invert_mask"
                )
        lo, hi = WEIGHT_RANGE
        if not (math.isfinite(self.weight) and lo <= self.weight <= hi):
            problems.append(f"weight must be within [{lo}, {hi}], got {self.weight}")
        for name in ("start_percent", "end_percent"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                problems.append(f"{name} must be within [0, 1], got {value}")
        if self.start_percent > self.end_percent:
            problems.append(
                f"start_percent ({self.start_percent}) is after end_percent ({self.end_percent}); "
                "the subject would never be active. Swap them or lower start_percent"
            )
        if problems:
            label = f" '{self.label}'" if self.label else ""
            raise ValueError(f"invalid subject{label}: " + "; ".join(problems))

    @classmethod
    def from_image(
        cls, image: Tensor, mask: Tensor | None = None, *, invert_mask: bool = False, **fields: object
    ) -> Subject:
        """Build a subject from an image batch in any common channel layout.

        Shapes:
            image: (R, H, W, C) or (H, W, C), C in {1, 3, 4}, float in [0, 1]
            mask:  (R, H, W), (1, H, W) or (H, W); a single mask applies to every reference image
        """
        images, alpha = to_rgb(image)
        masks = None
        if mask is not None:
            masks = _expand_mask(mask, images)
        elif alpha is not None:
            masks = alpha
        if masks is not None and invert_mask:
            masks = 1.0 - masks
        return cls(images=images, masks=masks, **fields)  # type: ignore[arg-type]

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])


def to_rgb(image: Tensor) -> tuple[Tensor, Tensor | None]:
    """Split an image batch into RGB and (if present) alpha.

    Shapes:
        image: (R, H, W, C) or (H, W, C) with C in {1, 3, 4}
        returns (R, H, W, 3) float RGB and (R, H, W) alpha or None
    """
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"expected an image batch (R, H, W, C) with 1, 3 or 4 channels, got shape {tuple(image.shape)}"
        )
    image = image.float()
    channels = image.shape[-1]
    if channels == 1:
        return image.expand(-1, -1, -1, 3).contiguous(), None
    if channels == 4:
        return image[..., :3].contiguous(), image[..., 3].contiguous()
    return image, None


def _expand_mask(mask: Tensor, images: Tensor) -> Tensor:
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    num_images, height, width = images.shape[:3]
    if mask.ndim != 3 or tuple(mask.shape[1:]) != (height, width):
        raise ValueError(
            f"subject mask must be the size of its reference image: expected (R, {height}, {width}), got "
            f"{tuple(mask.shape)}. Make the mask from the same image (e.g. LoadImage's MASK output) or resize "
            "the mask yourself before connecting it"
        )
    if mask.shape[0] == 1:
        mask = mask.expand(num_images, -1, -1)
    elif mask.shape[0] != num_images:
        raise ValueError(
            f"subject has {num_images} reference images but {mask.shape[0]} masks; give one mask per image or "
            "a single mask for all of them"
        )
    return mask.float().clamp(0.0, 1.0).contiguous()


@dataclass(frozen=True)
class Subjects:
    """An ordered, immutable chain of subjects (the ``SUBJECTS`` socket value)."""

    items: tuple[Subject, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not all(isinstance(s, Subject) for s in self.items):
            raise TypeError("Subjects holds Subject records only")

    def append(self, subject: Subject) -> Subjects:
        return Subjects(self.items + (subject,))

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def __getitem__(self, index: int) -> Subject:
        return self.items[index]

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.items]

    @property
    def priorities(self) -> list[int]:
        return [s.priority for s in self.items]

    def describe(self) -> str:
        """One line per subject, for logs and error messages."""
        lines = []
        for i, s in enumerate(self.items):
            name = s.label or f"subject {i}"
            lines.append(
                f"#{i} {name}: {s.num_images} image(s), weight {s.weight:g}, "
                f"steps {s.start_percent:g}-{s.end_percent:g}, priority {s.priority}"
            )
        return "\n".join(lines)
