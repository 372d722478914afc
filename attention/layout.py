"""Layouts: where each subject goes, and how that maps onto a model's token grids.

A ``Layout`` is a canvas size plus one ``Region`` per subject, in subject order. A region is a box
(normalised ``x0, y0, x1, y1``) or a mask at canvas size. Models see the layout as boolean token
masks on their own token grid (``TokenGrid``): SDXL has one grid per attention resolution (latent
/1, /2, /4, rounded up like its stride-2 convolutions), Flux one grid of 2x2 latent patches.

Rounding rules (documented for users in the README):
  * boxes are rounded outward on every grid (floor the start, ceil the end), so every box owns at
    least one token, however coarse the grid;
  * masks are downsampled by exact area: a token belongs to the region when the region covers at
    least ``MASK_AREA_THRESHOLD`` of the token's area inside the canvas. A mask smaller than that
    everywhere keeps the one token it covers most, so it never vanishes;
  * overlaps are resolved by ``composite_ownership``: the highest priority owns a token; among equal
    priorities the smaller region owns it (nested and foreground regions win); among equal priorities
    and equal areas the later subject owns it (see ``overlap_order``).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .checks import quote

log = logging.getLogger("multisubject")

MASK_AREA_THRESHOLD = 0.5  # fraction of a token's in-canvas area a mask must cover to claim it
# bounds on user input, so one prompt cannot take the server down (README "Safety")
MAX_REGIONS = 64  # regions per layout; every method's cost grows with the region count
MAX_BOXES_CHARS = 65536  # box text; 64 boxes with labels and comments fit many times over
MAX_JSON_DEPTH = 8  # nesting of JSON boxes ([{"box": [...]}] is 3 deep)
MAX_MASK_CELLS = 1 << 28  # regions x canvas pixels of a canvas-sized mask batch (1 GiB of float32): 64 regions at 2048^2
Box = tuple[float, float, float, float]  # normalised x0, y0, x1, y1


@dataclass(frozen=True)
class Region:
    """Where one subject goes: a normalised box or a canvas-sized mask (exactly one of them).

    Shapes:
        mask: (H, W) float in [0, 1] at the layout's canvas size
    """

    box: Box | None = None
    mask: Tensor | None = None
    label: str = ""

    def __post_init__(self) -> None:
        if (self.box is None) == (self.mask is None):
            raise ValueError("a region is either a box or a mask; give exactly one")
        if self.box is not None:
            _check_box(self.box, where=f"region '{quote(self.label)}'" if self.label else "region")
        else:
            mask = self.mask
            if not isinstance(mask, Tensor) or mask.ndim != 2:
                got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
                raise ValueError(f"a region mask must be (H, W), got {got}")
            if not torch.isfinite(mask).all():
                raise ValueError("region mask contains NaN or inf values")
            if float(mask.max()) <= 0.0:
                name = f" '{quote(self.label)}'" if self.label else ""
                raise ValueError(
                    f"region mask{name} is all zero, so its subject would have nowhere to go; paint the "
                    "subject's area in the mask or remove the subject"
                )

    @property
    def is_box(self) -> bool:
        return self.box is not None

    def raster(self, height: int, width: int) -> Tensor:
        """This region drawn on a ``height x width`` picture of the canvas: exact pixel coverage for boxes, area
        average for masks (nearest when enlarging). Shapes: returns (height, width) float in [0, 1]."""
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            return _coverage_1d(y0 * height, y1 * height, height)[:, None] * _coverage_1d(x0 * width, x1 * width, width)
        assert self.mask is not None
        mask = self.mask.float()
        if tuple(mask.shape) == (height, width):
            return mask
        shrink = height <= mask.shape[0] and width <= mask.shape[1]
        return torch.nn.functional.interpolate(mask[None, None], size=(height, width),
                                               mode="area" if shrink else "nearest")[0, 0]

    def bounding_box(self) -> Box:
        """The region's normalised bounding box (the box itself for box regions)."""
        if self.box is not None:
            return self.box
        assert self.mask is not None
        height, width = self.mask.shape
        ys, xs = torch.nonzero(self.mask > 0, as_tuple=True)
        return (
            float(xs.min()) / width,
            float(ys.min()) / height,
            float(xs.max() + 1) / width,
            float(ys.max() + 1) / height,
        )


@dataclass(frozen=True)
class Layout:
    """Canvas size in pixels plus one region per subject, in subject order (the ``LAYOUT`` socket)."""

    width: int
    height: int
    regions: tuple[Region, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not (isinstance(self.width, int) and isinstance(self.height, int) and self.width > 0 and self.height > 0):
            raise ValueError(f"layout canvas must be positive integer pixels, got {self.width}x{self.height}")
        check_region_count(len(self.regions))
        for i, region in enumerate(self.regions):
            if region.mask is not None and tuple(region.mask.shape) != (self.height, self.width):
                raise ValueError(
                    f"region {i} mask is {region.mask.shape[1]}x{region.mask.shape[0]} but the layout canvas is "
                    f"{self.width}x{self.height}; masks must be exactly canvas size (they are never resized)"
                )

    def __len__(self) -> int:
        return len(self.regions)

    @property
    def labels(self) -> list[str]:
        return [r.label for r in self.regions]

    def with_labels(self, labels: list[str]) -> Layout:
        """Fill empty region labels from ``labels`` (e.g. the subjects' labels)."""
        regions = tuple(
            Region(box=r.box, mask=r.mask, label=r.label or label) for r, label in zip(self.regions, labels)
        )
        return Layout(self.width, self.height, regions)

    def extend(self, other: Layout) -> Layout:
        """This layout's regions followed by ``other``'s (same canvas required)."""
        if (other.width, other.height) != (self.width, self.height):
            raise ValueError(
                f"cannot chain layouts of different canvas sizes: {self.width}x{self.height} and "
                f"{other.width}x{other.height}; make all masks the same size"
            )
        return Layout(self.width, self.height, self.regions + other.regions)

    def check_subject_count(self, num_subjects: int) -> None:
        if len(self.regions) != num_subjects:
            raise ValueError(
                f"layout has {len(self.regions)} region(s) but {num_subjects} subject(s) are connected; give "
                "exactly one box or mask per subject, in subject order"
            )

    def check_aspect(self, height: int, width: int, what: str = "latent") -> None:
        """Raise unless the canvas has the aspect ratio of a ``height x width`` target.

        One target unit of rounding is tolerated (latents are image sizes divided by 8 or 16).
        """
        expected_height = self.height * width / self.width
        if abs(expected_height - height) > 1.0 and abs(self.width * height / self.height - width) > 1.0:
            raise ValueError(
                f"layout canvas {self.width}x{self.height} (aspect {self.width / self.height:.3f}) does not match the "
                f"{what} {width}x{height} (aspect {width / height:.3f}); set the layout's canvas to the image size "
                "you generate (or the same aspect ratio)"
            )

    def rasterize(self) -> Tensor:
        """Per-region masks at canvas size, boxes drawn with pixel-exact coverage.

        Shapes:
            returns (S, H, W) float in [0, 1]
        """
        masks = torch.zeros(len(self.regions), self.height, self.width)
        for i, region in enumerate(self.regions):
            masks[i] = region.raster(self.height, self.width)
        return masks

    @classmethod
    def from_boxes(cls, width: int, height: int, boxes: list[Box], labels: list[str] | None = None) -> Layout:
        labels = labels or [""] * len(boxes)
        return cls(width, height, tuple(Region(box=b, label=lab) for b, lab in zip(boxes, labels)))

    @classmethod
    def from_masks(cls, masks: Tensor, labels: list[str] | None = None) -> Layout:
        """Shapes: masks (S, H, W) float in [0, 1]."""
        if masks.ndim == 2:
            masks = masks.unsqueeze(0)
        if masks.ndim != 3:
            raise ValueError(f"expected a mask batch (S, H, W), got shape {tuple(masks.shape)}")
        check_region_count(masks.shape[0])
        labels = labels or [""] * masks.shape[0]
        regions = []
        for i, (mask, label) in enumerate(zip(masks, labels)):
            if float(mask.max()) <= 0.0:
                raise ValueError(
                    f"mask {i} of {masks.shape[0]} is all zero, so its subject would have nowhere to go; paint the "
                    "subject's area or remove that mask"
                )
            regions.append(Region(mask=mask.float().clamp(0.0, 1.0), label=label))
        return cls(int(masks.shape[2]), int(masks.shape[1]), tuple(regions))


def check_mask_batch_size(layout: Layout) -> None:
    """Refuse to rasterize ``layout`` into one canvas-sized mask per region when that exceeds ``MAX_MASK_CELLS``."""
    cells = len(layout) * layout.height * layout.width
    if cells > MAX_MASK_CELLS:
        raise ValueError(
            f"{len(layout)} canvas-sized masks of {layout.width}x{layout.height} would take {cells * 4 / 2**30:.1f} GiB; "
            f"at most {MAX_MASK_CELLS * 4 / 2**30:.0f} GiB (regions x width x height <= {MAX_MASK_CELLS}) are made. Use "
            "a canvas the size you generate at, or fewer regions"
        )


def check_region_count(count: int) -> None:
    if count > MAX_REGIONS:
        raise ValueError(
            f"a layout holds at most {MAX_REGIONS} regions (one per subject), got {count}; split the scene into "
            "fewer subjects"
        )


# parsing boxes typed by users or wired in from other packs

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf|infinity)"
PER_MILLE = 1000.0  # Ideogram-style "elements" put boxes on a 0..1000 grid

BOX_FORMATS = (
    "one box per line 'x0, y0, x1, y1' or 'label: x0, y0, x1, y1' (units as set)",
    "JSON [[x0, y0, x1, y1], ...] or [{\"box\": [x0, y0, x1, y1], \"label\": \"...\"}, ...] (units as set)",
    "JSON [{\"x\": .., \"y\": .., \"width\": .., \"height\": ..}, ...] in pixels (core Create Bounding Boxes, "
    "BOUNDING_BOX lists; a one-frame list of such lists too)",
    "JSON [{\"bbox\": [ymin, xmin, ymax, xmax], \"desc\": \"...\"}, ...] on a 0..1000 grid (Ideogram-style elements)",
)


def parse_boxes(text: str, *, units: str = "normalized", width: int = 1, height: int = 1) -> list[tuple[Box, str]]:
    """Parse boxes typed in a text widget (or wired in as JSON text) into normalised boxes with optional labels.

    Accepted forms (``BOX_FORMATS``), one box per line (blank lines and lines starting with ``#`` are skipped)::

        0.05, 0.20, 0.50, 0.95
        corgi: 0.50, 0.10, 0.95, 0.90

    or a JSON list: ``[[x0, y0, x1, y1], ...]`` or ``[{"box": [x0, y0, x1, y1], "label": "corgi"}, ...]``, read in
    ``units``; ``[{"x", "y", "width", "height"}, ...]`` in pixels of the canvas (what core ``CreateBoundingBoxes``
    and other packs' BOUNDING_BOX lists hold, label from ``label``/``text``/``desc`` or their ``metadata``); or
    Ideogram-style ``[{"bbox": [ymin, xmin, ymax, xmax], "desc": "corgi"}, ...]`` on a 0..1000 grid.
    ``units="pixels"`` reads the first forms' numbers as pixels of a ``width x height`` canvas.
    """
    if units not in ("normalized", "pixels"):
        raise ValueError(f"units must be 'normalized' or 'pixels', got {units!r}")
    if len(text) > MAX_BOXES_CHARS:
        raise ValueError(
            f"box text is {len(text)} characters; at most {MAX_BOXES_CHARS} are read (up to {MAX_REGIONS} boxes). "
            "Give one line per subject"
        )
    stripped = text.strip()
    if not stripped:
        raise ValueError(
            "no boxes given: the text is empty. Write one box per line as 'x0, y0, x1, y1' (optionally "
            "'label: x0, y0, x1, y1'), or a JSON list of boxes"
        )
    raw = _parse_json_boxes(stripped) if stripped[0] in "[{" else _parse_line_boxes(stripped)
    if not raw:
        raise ValueError("no boxes given: every line is blank or a comment")
    check_region_count(len(raw))
    result = []
    for where, numbers, label, box_units in raw:
        box_units = box_units or units
        if box_units == "pixels":
            _check_pixel_box(numbers, width, height, where)
        scale = {"pixels": (width, height, width, height), "per_mille": (PER_MILLE,) * 4}.get(box_units, (1,) * 4)
        box = tuple(n / s for n, s in zip(numbers, scale))
        _check_box(box, where=where)  # type: ignore[arg-type]
        result.append((box, label))
    return result  # type: ignore[return-value]


def _formats_hint() -> str:
    return "Layout from Boxes reads: " + "; ".join(BOX_FORMATS)


def _parse_line_boxes(text: str) -> list[tuple[str, list[float], str, str | None]]:
    raw = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        label, _, numbers_text = line.rpartition(":")
        where = f"line {lineno} ('{quote(line)}')"
        tokens = [t for t in re.split(r"[,\s]+", numbers_text.strip()) if t]
        bad = [t for t in tokens if not re.fullmatch(_NUMBER, t, flags=re.IGNORECASE)]
        if bad:
            raise ValueError(
                f"{where}: '{quote(bad[0], 20)}' is not a number. Write 'x0, y0, x1, y1' or 'label: x0, y0, x1, y1'"
            )
        if len(tokens) != 4:
            raise ValueError(
                f"{where}: expected 4 numbers x0, y0, x1, y1, got {len(tokens)}. Write one box per line"
            )
        raw.append((where, [float(t) for t in tokens], label.strip(), None))
    return raw


def _parse_json_boxes(text: str) -> list[tuple[str, list[float], str, str | None]]:
    """(where, numbers as x0, y0, x1, y1, label, units or None for the widget's units) per JSON box."""
    _check_json_depth(text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"boxes look like JSON but do not parse: {e.msg} at line {e.lineno} column {e.colno}. "
            + _formats_hint()
        ) from None
    except ValueError as e:  # e.g. an integer longer than Python's digit limit
        raise ValueError(f"JSON boxes hold a value that cannot be read: {quote(e)}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"JSON boxes must be a list of boxes, got {type(data).__name__}. " + _formats_hint())
    if len(data) == 1 and isinstance(data[0], list) and data[0] and all(
        isinstance(item, dict) for item in data[0]
    ):
        data = data[0]  # a BOUNDING_BOX frame list holding one frame
    return [_json_box(item, f"JSON box {i}") for i, item in enumerate(data)]


def _json_box(item, where: str) -> tuple[str, list[float], str, str | None]:
    label = ""
    if isinstance(item, dict):
        label = _json_label(item)
        if "box" in item:
            item = item["box"]
        elif all(k in item for k in ("x", "y", "width", "height")):
            numbers = _json_numbers([item["x"], item["y"], item["width"], item["height"]], where, "x, y, width, height")
            x, y, w, h = numbers
            return where, [x, y, x + w, y + h], label, "pixels"
        elif "bbox" in item:
            ymin, xmin, ymax, xmax = _json_numbers(item["bbox"], where, "ymin, xmin, ymax, xmax")
            return where, [xmin, ymin, xmax, ymax], label, "per_mille"
        else:
            raise ValueError(
                f"{where}: an object needs 'box', 'x'/'y'/'width'/'height' or 'bbox' keys, got keys {quote(sorted(item))}. "
                + _formats_hint()
            )
    return where, _json_numbers(item, where, "x0, y0, x1, y1"), label, None


def _json_label(item: dict) -> str:
    metadata = item.get("metadata") if isinstance(item.get("metadata"), dict) else {}
    for source in (item, metadata):
        for key in ("label", "text", "desc"):
            if isinstance(source.get(key), str) and source[key]:
                return source[key]
    return ""


def _json_numbers(value, where: str, names: str) -> list[float]:
    if not isinstance(value, list) or not all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in value):
        raise ValueError(f"{where}: expected a list of 4 numbers [{names}], got {quote(repr(value))}. " + _formats_hint())
    if len(value) != 4:
        raise ValueError(f"{where}: expected 4 numbers {names}, got {len(value)}")
    try:
        return [float(n) for n in value]
    except OverflowError:
        raise ValueError(f"{where}: a number is too large: {quote(repr(value))}; coordinates are fractions "
                         "0..1 or pixels of the canvas") from None


def _check_json_depth(text: str) -> None:
    """Refuse JSON nested deeper than ``MAX_JSON_DEPTH`` before parsing it (deep nesting exhausts the stack)."""
    depth = 0
    for char in re.sub(r'"(?:[^"\\]|\\.)*"', '""', text):  # brackets inside strings do not nest
        if char in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise ValueError(
                    f"JSON boxes are nested more than {MAX_JSON_DEPTH} levels deep; expected a list like "
                    '[[0.1, 0.2, 0.5, 0.9], ...] or [{"box": [...], "label": "corgi"}, ...]'
                )
        elif char in "]}":
            depth -= 1


def _check_pixel_box(numbers: list[float], width: int, height: int, where: str) -> None:
    if not all(math.isfinite(n) for n in numbers):
        raise ValueError(f"{where}: box has NaN or inf: {numbers}")
    x0, y0, x1, y1 = numbers
    if min(x0, x1) < 0 or min(y0, y1) < 0 or max(x0, x1) > width or max(y0, y1) > height:
        raise ValueError(
            f"{where}: pixel box {numbers} lies outside the {width}x{height} canvas; pixel boxes must be "
            f"within 0..{width} horizontally and 0..{height} vertically"
        )


def _check_box(box: Box, where: str) -> None:
    if len(box) != 4:
        raise ValueError(f"{where}: a box has 4 numbers x0, y0, x1, y1, got {len(box)}")
    if not all(isinstance(n, (int, float)) and math.isfinite(n) for n in box):
        raise ValueError(f"{where}: box has NaN or inf: {list(box)}")
    x0, y0, x1, y1 = box
    if min(box) < 0.0 or max(box) > 1.0:
        raise ValueError(
            f"{where}: normalised box {list(box)} lies outside [0, 1]; use fractions of the canvas, or set "
            "units to pixels"
        )
    if x1 <= x0 or y1 <= y0:
        what = "zero area" if (x1 == x0 or y1 == y0) else "inverted corners"
        raise ValueError(
            f"{where}: box {list(box)} has {what}; need x1 > x0 and y1 > y0 (top-left corner first, then "
            "bottom-right)"
        )


def _coverage_1d(start: float, end: float, size: int) -> Tensor:
    """Fraction of each unit cell 0..size-1 covered by the interval [start, end). Shapes: returns (size,)."""
    cells = torch.arange(size, dtype=torch.float64)
    return ((torch.clamp(cells + 1, max=end) - torch.clamp(cells, min=start)).clamp(min=0.0)).float()


# token grids


@dataclass(frozen=True)
class TokenGrid:
    """A model's token grid over the canvas.

    ``cell_h``/``cell_w`` are the normalised height/width of one token. When the latent is not a
    multiple of the downscale factor the last row/column of tokens reaches past the canvas, exactly
    as in the model (stride-2 convolutions and Flux's patchify round up).
    """

    h: int
    w: int
    cell_h: float
    cell_w: float

    def __post_init__(self) -> None:
        if self.h <= 0 or self.w <= 0:
            raise ValueError(f"token grid must be non-empty, got {self.h}x{self.w}")

    @property
    def num_tokens(self) -> int:
        return self.h * self.w

    @classmethod
    def from_latent(cls, latent_h: int, latent_w: int, downscale: int = 1) -> TokenGrid:
        """Grid of a ``latent_h x latent_w`` latent seen through ``downscale`` (SDXL: 1, 2, 4; Flux: 2)."""
        if latent_h <= 0 or latent_w <= 0 or downscale <= 0:
            raise ValueError(f"latent size and downscale must be positive, got {latent_h}x{latent_w} /{downscale}")
        return cls(
            h=-(-latent_h // downscale),
            w=-(-latent_w // downscale),
            cell_h=downscale / latent_h,
            cell_w=downscale / latent_w,
        )

    @classmethod
    def infer(cls, latent_h: int, latent_w: int, num_tokens: int, base: int = 1) -> TokenGrid:
        """Find the grid with ``num_tokens`` tokens among downscales ``base * 2**k``.

        This is how an attention call learns its resolution from the latent shape and its sequence
        length (never from ``sqrt``, which is wrong for non-square images).
        """
        downscale = base
        tried = []
        while downscale <= max(latent_h, latent_w) * 2:
            grid = cls.from_latent(latent_h, latent_w, downscale)
            if grid.num_tokens == num_tokens:
                return grid
            tried.append(f"/{downscale}: {grid.h}x{grid.w}={grid.num_tokens}")
            downscale *= 2
        raise ValueError(
            f"no token grid of a {latent_h}x{latent_w} latent has {num_tokens} tokens (tried {', '.join(tried)}); "
            "the attention call does not belong to this latent"
        )


def region_token_masks(layout: Layout, grid: TokenGrid, threshold: float = MASK_AREA_THRESHOLD) -> Tensor:
    """Which tokens of ``grid`` each region covers.

    Shapes:
        returns (S, h, w) bool; every row has at least one True
    """
    out = torch.zeros(len(layout.regions), grid.h, grid.w, dtype=torch.bool)
    for i, region in enumerate(layout.regions):
        if region.box is not None:
            out[i] = _box_tokens(region.box, grid, label=region.label or f"region {i}")
        else:
            assert region.mask is not None
            coverage = mask_token_coverage(region.mask, grid)
            tokens = coverage >= threshold
            if not tokens.any():
                flat = int(torch.argmax(coverage))
                tokens.view(-1)[flat] = True
                log.warning(
                    "multisubject: mask of %s covers less than %.0f%% of any %dx%d token; kept its best-covered token",
                    region.label or f"region {i}", threshold * 100, grid.h, grid.w,
                )
            out[i] = tokens
    return out


def _box_tokens(box: Box, grid: TokenGrid, label: str) -> Tensor:
    x0, y0, x1, y1 = box
    r0 = min(int(math.floor(y0 / grid.cell_h + 1e-9)), grid.h - 1)
    c0 = min(int(math.floor(x0 / grid.cell_w + 1e-9)), grid.w - 1)
    r1 = max(min(int(math.ceil(y1 / grid.cell_h - 1e-9)), grid.h), r0 + 1)
    c1 = max(min(int(math.ceil(x1 / grid.cell_w - 1e-9)), grid.w), c0 + 1)
    if (y1 - y0) < grid.cell_h or (x1 - x0) < grid.cell_w:
        log.warning(
            "multisubject: box of %s is smaller than one token of the %dx%d grid; kept at %dx%d token(s)",
            label, grid.h, grid.w, r1 - r0, c1 - c0,
        )
    tokens = torch.zeros(grid.h, grid.w, dtype=torch.bool)
    tokens[r0:r1, c0:c1] = True
    return tokens


def mask_token_coverage(mask: Tensor, grid: TokenGrid) -> Tensor:
    """Exact fraction of each token's in-canvas area covered by ``mask`` (values weighted).

    The integral of a pixel-constant image is bilinear inside each pixel, so sampling its 2-D
    prefix sum at fractional token edges gives exact areas for any canvas/grid ratio.

    Shapes:
        mask: (H, W) float in [0, 1]
        returns (h, w) float in [0, 1]
    """
    height, width = mask.shape
    prefix = torch.zeros(height + 1, width + 1, dtype=torch.float64)
    prefix[1:, 1:] = mask.double().cumsum(0).cumsum(1)
    y_edges = (torch.arange(grid.h + 1, dtype=torch.float64) * grid.cell_h * height).clamp(max=height)
    x_edges = (torch.arange(grid.w + 1, dtype=torch.float64) * grid.cell_w * width).clamp(max=width)
    at_edges = _interp(_interp(prefix, y_edges, dim=0), x_edges, dim=1)  # (h+1, w+1)
    area = at_edges[1:, 1:] - at_edges[:-1, 1:] - at_edges[1:, :-1] + at_edges[:-1, :-1]
    cell_area = (y_edges[1:] - y_edges[:-1])[:, None] * (x_edges[1:] - x_edges[:-1])[None, :]
    return (area / cell_area.clamp(min=1e-12)).clamp(0.0, 1.0).float()


def _interp(values: Tensor, positions: Tensor, dim: int) -> Tensor:
    """Linear interpolation of ``values`` along ``dim`` at fractional ``positions`` within [0, size-1]."""
    size = values.shape[dim]
    lo = positions.floor().long().clamp(0, size - 1)
    hi = (lo + 1).clamp(max=size - 1)
    frac = positions - lo.double()
    shape = [1] * values.ndim
    shape[dim] = -1
    frac = frac.view(shape)
    return values.index_select(dim, lo) * (1 - frac) + values.index_select(dim, hi) * frac


# priority compositing

AREA_TIE_DECIMALS = 9  # areas (fractions of the canvas) equal to this many decimals tie: float noise never breaks a tie


def region_areas(layout: Layout) -> list[float]:
    """Each region's area as a fraction of the canvas: a box's width x height, a mask's mean value.

    This is the default overlap order's key (``overlap_order``); it is measured on the canvas, not on
    a token grid, so every attention resolution ranks the regions the same way.
    """
    areas = []
    for region in layout.regions:
        if region.box is not None:
            x0, y0, x1, y1 = region.box
            areas.append((x1 - x0) * (y1 - y0))
        else:
            assert region.mask is not None
            areas.append(float(region.mask.double().mean()))
    return areas


def overlap_order(priorities: Sequence[int], areas: Sequence[float]) -> list[int]:
    """Subject indices in painting order: where regions overlap, the subject painted last owns the tokens.

    Sorted by priority (low first), then by area (large first, so smaller and nested regions are
    painted over the regions they sit in), then by subject order (earlier first, so among equal
    priorities and equal areas the later subject wins). This is AnyMS's "merge in descending box
    area, ties follow input order", with an explicit priority overriding area.
    """
    if len(priorities) != len(areas):
        raise ValueError(f"got {len(priorities)} priorities for {len(areas)} region areas; give one of each per subject")
    return sorted(range(len(areas)), key=lambda j: (priorities[j], -round(areas[j], AREA_TIE_DECIMALS), j))


@dataclass(frozen=True)
class Ownership:
    """Exclusive assignment of tokens to the active subjects.

    Shapes (``*G`` is the grid, e.g. ``h, w`` or ``L``):
        owner:      (*G) long, subject index (into all S subjects) or -1 for background
        exclusive:  (S, *G) bool, one-hot over subjects where owned; all False for inactive subjects
        background: (*G) bool, tokens no active subject covers
    """

    owner: Tensor
    exclusive: Tensor
    background: Tensor
    active: tuple[int, ...]

    def unowned(self) -> list[int]:
        """Active subjects that own no token at all (they have no effect on this grid)."""
        counts = self.exclusive.flatten(1).sum(1).tolist()
        return [j for j in self.active if counts[j] == 0]


def composite_ownership(
    token_masks: Tensor,
    priorities: Sequence[int],
    areas: Sequence[float],
    active: Sequence[int] | None = None,
) -> Ownership:
    """Resolve overlaps among the ``active`` subjects: each token goes to the one painted last by ``overlap_order``.

    Inactive subjects (weight 0, outside their start/end window) take no part: the result for the
    active subjects is exactly the result of calling this with the inactive subjects left out.
    Callers cache the result per active set; this function is not for a per-call hot path.

    Shapes:
        token_masks: (S, *G) bool, each subject's region on one token grid (``region_token_masks``)
        priorities:  S ints, higher wins an overlap (the Subject node's ``priority``)
        areas:       S floats, region area as a fraction of the canvas (``region_areas``); smaller wins a tie
        active:      indices into S, in any order; None = all subjects
        returns an ``Ownership`` over all S subjects (rows of inactive subjects are empty)
    """
    num_subjects = token_masks.shape[0]
    if len(priorities) != num_subjects or len(areas) != num_subjects:
        raise ValueError(
            f"got {len(priorities)} priorities and {len(areas)} areas for {num_subjects} subject masks; "
            "give one of each per subject"
        )
    active = tuple(range(num_subjects)) if active is None else tuple(sorted(set(active)))
    if active and not (0 <= active[0] and active[-1] < num_subjects):
        raise ValueError(f"active subjects {list(active)} are not all indices of {num_subjects} subjects")
    is_active = set(active)
    owner = torch.full(token_masks.shape[1:], -1, dtype=torch.long, device=token_masks.device)
    for i in overlap_order(priorities, areas):
        if i in is_active:
            owner[token_masks[i]] = i
    subject_ids = torch.arange(num_subjects, device=token_masks.device).view(-1, *([1] * (token_masks.ndim - 1)))
    exclusive = owner.unsqueeze(0) == subject_ids
    return Ownership(owner=owner, exclusive=exclusive, background=owner < 0, active=active)


def describe_unowned(
    ownership: Ownership, token_masks: Tensor, labels: Sequence[str], where: str
) -> dict[int, str]:
    """A sentence for each active subject that owns no token, naming who took its tokens (for logs and previews).

    Shapes: token_masks (S, *G) bool, as given to ``composite_ownership``.
    """
    def name(j: int) -> str:
        return f"'{labels[j]}'" if j < len(labels) and labels[j] else f"subject {j + 1}"

    messages = {}
    for j in ownership.unowned():
        takers = sorted(set(ownership.owner[token_masks[j]].tolist()) - {-1, j})
        messages[j] = (
            f"{name(j)} owns no token {where}: {', '.join(name(k) for k in takers)} cover(s) all of its region "
            "there, so it has no effect; give it a higher priority or a region that reaches past theirs"
        )
    return messages
