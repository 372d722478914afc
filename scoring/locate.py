"""Locate, then match: where object subjects are looked for in a generated image.

MultiCrafter scores objects by finding each subject first (Florence-2 grounding + SAM2 masks, then DINOv2 on the
masked crops; spec §5.4). Here the candidates of one image come from, in this order:

* ``"layout"``: the layout's regions (masked crops), when the caller knows where the subjects were asked to be;
* ``"detector"``: an open-vocabulary detector (OWLv2 / OWL-ViT, ``metrics.PhraseDetector``) queried with every
  object subject's label (``FALLBACK_QUERY`` for a subject without one). Boxes above its threshold are the
  candidates; a box proposed for several labels (IoU >= ``DUPLICATE_IOU``) is kept once, with its best score, so
  one object in the image can never stand in for two references. With a segmenter the crop is masked (white
  background), otherwise it is the box;
* ``"whole image"``: neither is available. Every reference is compared with the whole image (DreamBench); the
  objects were NOT located, which the log, the node's report and the eval table all say (``NOT_LOCATED``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ..attention.layout import Layout
from .metrics import box_iou
from .objects import box_to_pixels, masked_crop

FALLBACK_QUERY = "an object"
DUPLICATE_IOU = 0.7  # boxes of two labels overlapping this much are one object
NOT_LOCATED = "objects not located"
SOURCES = ("layout", "detector", "whole image")


class Detector(Protocol):
    def detect(self, image: Tensor, phrases: list[str]) -> list[tuple[Tensor, Tensor]]:
        """Shapes: image (H, W, 3) -> per phrase: boxes (K_p, 4) pixels x0, y0, x1, y1, scores (K_p,)."""


class Segmenter(Protocol):
    def segment(self, image: Tensor, boxes: Tensor) -> Tensor:
        """Shapes: image (H, W, 3), boxes (K, 4) pixels -> masks (K, H, W) float in [0, 1]."""


@dataclass(frozen=True)
class Candidates:
    """Where the object subjects of one generated image may be.

    Shapes:
        crops: K crops (h_k, w_k, 3); boxes: (K, 4) float pixels x0, y0, x1, y1
    """

    crops: list[Tensor]
    boxes: Tensor
    source: str  # one of SOURCES

    @property
    def located(self) -> bool:
        return self.source != "whole image"


def detector_queries(labels: Sequence[str]) -> list[str]:
    """The detector's phrases for some subjects: their labels, once each, in order ("" -> FALLBACK_QUERY)."""
    return list(dict.fromkeys((label.strip() or FALLBACK_QUERY) for label in labels))


def keep_distinct(boxes: Tensor, scores: Tensor, iou: float = DUPLICATE_IOU) -> Tensor:
    """Indices of the boxes to keep, best score first: a box overlapping a better one by >= ``iou`` is dropped.

    Shapes: boxes (K, 4), scores (K,) -> (K',) long
    """
    order = torch.argsort(scores, descending=True)
    kept: list[int] = []
    for k in order.tolist():
        if not kept or float(box_iou(boxes[k][None], boxes[kept]).max()) < iou:
            kept.append(k)
    return torch.tensor(kept, dtype=torch.long)


class ObjectLocator:
    """Candidate boxes (and crops) of object subjects from an open-vocabulary detector, optionally segmented."""

    def __init__(self, detector: Detector, segmenter: Segmenter | None = None) -> None:
        self.detector = detector
        self.segmenter = segmenter

    def locate(self, image: Tensor, labels: Sequence[str]) -> Candidates:
        """Shapes: image (H, W, 3) float in [0, 1]; labels: the object subjects' labels."""
        height, width = image.shape[:2]
        found = self.detector.detect(image, detector_queries(labels))
        boxes = torch.cat([b.reshape(-1, 4).float() for b, _ in found]) if found else torch.zeros(0, 4)
        scores = torch.cat([s.reshape(-1).float() for _, s in found]) if found else torch.zeros(0)
        if len(boxes):
            boxes = boxes[keep_distinct(boxes, scores)]
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        masks = self.segmenter.segment(image, boxes) if self.segmenter is not None and len(boxes) else None
        crops, pixel_boxes = [], []
        for k, box in enumerate(boxes.tolist()):
            px = box_to_pixels((box[0] / width, box[1] / height, box[2] / width, box[3] / height), height, width)
            crops.append(masked_crop(image, px, None if masks is None else masks[k]))
            pixel_boxes.append([float(v) for v in px])
        return Candidates(crops, torch.tensor(pixel_boxes).reshape(-1, 4), "detector")


def layout_candidates(image: Tensor, layout: Layout) -> Candidates:
    """One candidate per layout region (masked crop for a mask region), in region order.

    Shapes:
        image: (H, W, 3) with the layout's aspect
    """
    height, width = image.shape[:2]
    layout.check_aspect(height, width, what="image")
    masks = layout.rasterize()
    if tuple(masks.shape[1:]) != (height, width):  # same aspect, other size: resample the masks, not the image
        masks = torch.nn.functional.interpolate(masks[None], size=(height, width), mode="bilinear")[0]
    crops, boxes = [], []
    for region, mask in zip(layout.regions, masks):
        box = box_to_pixels(region.bounding_box(), height, width)
        crops.append(masked_crop(image, box, None if region.is_box else mask))
        boxes.append([float(v) for v in box])
    return Candidates(crops, torch.tensor(boxes), "layout")


def whole_image(image: Tensor) -> Candidates:
    height, width = image.shape[:2]
    return Candidates([image], torch.tensor([[0.0, 0.0, float(width), float(height)]]), "whole image")


def object_candidates(image: Tensor, labels: Sequence[str], layout: Layout | None = None,
                      locator: ObjectLocator | None = None) -> Candidates:
    """The layout's regions when given, else the located objects when a locator is configured, else the whole image."""
    if layout is not None:
        return layout_candidates(image, layout)
    if locator is not None:
        return locator.locate(image, labels)
    return whole_image(image)
