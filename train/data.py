"""Training data: the JSONL manifest, `data validate` / `data build`, aspect buckets, pixel loading,
and the deterministic per-rank batch order that resume restores exactly.

Manifest: one JSON object per line; paths are relative to the manifest's folder::

    {"image": "s1/target.png", "caption": "a corgi and a red mug on a table",
     "references": ["s1/ref_0.png", "s1/ref_1.png"], "masks": ["s1/mask_0.png", "s1/mask_1.png"],
     "labels": ["a corgi", "a red mug"]}

``references[i]`` shows subject i; ``masks[i]`` is subject i's region in the target (white = subject, same size
as the target); ``labels`` is optional. Blank lines and lines starting with ``#`` are skipped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..attention.families import FLUX
from ..attention.layout import TokenGrid, mask_token_coverage
from ..attention.pil import to_pil
from ..attention.preview import region_colour

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
BUCKET_STEP = FLUX.vae_downscale * FLUX.patch  # pixels per token side: VAE /8 then Flux 2x2 patches (16)


@dataclass(frozen=True)
class ManifestRow:
    """One training sample as written in the manifest (paths resolved)."""

    line: int
    image: Path
    caption: str
    references: tuple[Path, ...]
    masks: tuple[Path, ...]
    labels: tuple[str, ...]

    @property
    def num_subjects(self) -> int:
        return len(self.references)


def read_training_manifest(path: str | Path) -> list[ManifestRow]:
    """Parse and check a manifest. Every problem of every line is collected into one ``ValueError``
    (with line numbers), so training refuses to start on a broken dataset."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"manifest {path} does not exist; build one with `python -m multisubject data build`")
    root = path.parent
    rows, problems = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"manifest {path} is not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}); "
                         "save it as UTF-8 (e.g. re-run `data build`, or convert it with iconv)") from None
    for number, text in enumerate(lines, start=1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            item = json.loads(text)
        except json.JSONDecodeError as e:
            problems.append(f"line {number}: not valid JSON ({e.msg})")
            continue
        row, row_problems = _parse_row(item, number, root)
        problems += row_problems
        if row is not None:
            rows.append(row)
    if problems:
        shown = "\n  ".join(problems[:50]) + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else "")
        raise ValueError(f"manifest {path} has {len(problems)} problem(s); fix them before training:\n  {shown}")
    if not rows:
        raise ValueError(f"manifest {path} has no samples")
    return rows


def _parse_row(item: object, number: int, root: Path) -> tuple[ManifestRow | None, list[str]]:
    where = f"line {number}"
    if not isinstance(item, dict):
        return None, [f"{where}: expected a JSON object, got {type(item).__name__}"]
    problems = []
    unknown = sorted(set(item) - {"image", "caption", "references", "masks", "labels"})
    if unknown:
        problems.append(f"{where}: unknown key(s) {unknown}; keys are image, caption, references, masks, labels")
    for key, kind in (("image", str), ("caption", str), ("references", list), ("masks", list)):
        if not isinstance(item.get(key), kind):
            problems.append(f"{where}: '{key}' must be a {kind.__name__}, got {item.get(key)!r}")
    if problems:
        return None, problems
    refs, masks = item["references"], item["masks"]
    labels = item.get("labels", [""] * len(refs))
    if not refs:
        problems.append(f"{where}: 'references' is empty; a sample needs at least one subject")
    if len(masks) != len(refs):
        problems.append(f"{where}: {len(refs)} reference(s) but {len(masks)} mask(s); give one mask per reference")
    if not isinstance(labels, list) or len(labels) != len(refs):
        problems.append(f"{where}: 'labels' must list one label per reference ({len(refs)}), got {labels!r}")
    files = [("image", item["image"])] + [(f"references[{i}]", r) for i, r in enumerate(refs)]
    files += [(f"masks[{i}]", m) for i, m in enumerate(masks)]
    for key, rel in files:
        if not isinstance(rel, str) or not (root / rel).is_file():
            problems.append(f"{where}: {key} file '{rel}' not found (relative to {root})")
    if problems:
        return None, problems
    sizes = {}
    for key, rel in files:
        try:
            sizes[key] = image_size(root / rel)
        except ValueError as e:
            problems.append(f"{where}: {key}: {e}")
    for i in range(len(masks)):
        mask, target = sizes.get(f"masks[{i}]"), sizes.get("image")
        if mask and target and mask != target:
            problems.append(f"{where}: masks[{i}] is {mask[0]}x{mask[1]}, target is {target[0]}x{target[1]}; masks must "
                            "be the target's size (they are never resized to fit)")
    if problems:
        return None, problems
    return ManifestRow(number, root / item["image"], item["caption"], tuple(root / r for r in refs),
                       tuple(root / m for m in masks), tuple(str(x) for x in labels)), []


# checking a dataset

@dataclass(frozen=True)
class ValidationReport:
    num_samples: int
    subjects_histogram: dict[int, int]  # subjects per sample -> count
    buckets_histogram: dict[str, int]  # "WxH" -> count
    problems: tuple[str, ...]  # things that make samples unusable (wrong mask size, empty mask)
    warnings: tuple[str, ...]  # things the spec filters out (area outside range, overlapping masks)

    def summary(self) -> str:
        lines = [f"samples: {self.num_samples}",
                 "subjects per sample: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.subjects_histogram.items())),
                 "buckets: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.buckets_histogram.items())),
                 f"problems: {len(self.problems)}", *("  " + p for p in self.problems),
                 f"warnings: {len(self.warnings)}", *("  " + w for w in self.warnings)]
        return "\n".join(lines)


def validate_dataset(manifest: str | Path, resolution: int = 512, max_aspect: float = 2.0,
                     min_area: float = 0.02, max_area: float = 0.6, max_overlap: float = 0.2,
                     min_side: int = 256, preview: str | Path | None = None, preview_rows: int = 8) -> ValidationReport:
    """Check files, sizes, mask/reference counts, mask area and pairwise overlap (IoU); optionally write a preview
    grid PNG (target with tinted masks, then the references). Manifest errors raise ``ValueError``."""
    rows = read_training_manifest(manifest)
    buckets = make_buckets(resolution, max_aspect)
    problems, warnings, tiles = [], [], []
    subjects, bucket_counts = {}, {}
    for row in rows:
        where = f"line {row.line}"
        size = image_size(row.image)
        if min(size) < min_side:
            warnings.append(f"{where}: target {size[0]}x{size[1]} is smaller than {min_side} px on one side")
        bucket = assign_bucket(*size, buckets)
        bucket_counts[f"{bucket[0]}x{bucket[1]}"] = bucket_counts.get(f"{bucket[0]}x{bucket[1]}", 0) + 1
        subjects[row.num_subjects] = subjects.get(row.num_subjects, 0) + 1
        masks = []
        for i, mask_path in enumerate(row.masks):
            mask = load_mask(mask_path)  # the target's size (read_training_manifest checks)
            area = float(mask.mean())
            if area == 0:
                problems.append(f"{where}: masks[{i}] is empty (all black)")
            elif not min_area <= area <= max_area:
                warnings.append(f"{where}: masks[{i}] covers {area:.1%} of the target (expected {min_area:.0%}-{max_area:.0%})")
            masks.append(mask)
        for a in range(len(masks)):
            for b in range(a + 1, len(masks)):
                inter = float((masks[a] * masks[b]).sum())
                union = float(torch.maximum(masks[a], masks[b]).sum())
                if union and inter / union > max_overlap:
                    warnings.append(f"{where}: masks[{a}] and masks[{b}] overlap (IoU {inter / union:.2f} > {max_overlap})")
        if preview is not None and len(tiles) < preview_rows:
            tiles.append(_preview_tile(row, masks))
    if preview is not None:
        _save_grid(tiles, Path(preview))
    return ValidationReport(len(rows), subjects, bucket_counts, tuple(problems), tuple(warnings))


def _preview_tile(row: ManifestRow, masks: list[Tensor], height: int = 192) -> Image.Image:
    target = load_image(row.image)  # (3, H, W) in [-1, 1]
    image = (target.permute(1, 2, 0) + 1) / 2  # (H, W, 3)
    for i, mask in enumerate(masks):
        colour = torch.tensor(region_colour(i))
        image = image * (1 - 0.5 * mask[..., None]) + colour * 0.5 * mask[..., None]
    parts = [to_pil(image)] + [to_pil((load_image(r).permute(1, 2, 0) + 1) / 2) for r in row.references]
    parts = [p.resize((max(1, round(p.width * height / p.height)), height)) for p in parts]
    tile = Image.new("RGB", (sum(p.width for p in parts) + 4 * len(parts), height), (20, 20, 20))
    x = 0
    for p in parts:
        tile.paste(p, (x, 0))
        x += p.width + 4
    return tile


def _save_grid(tiles: list[Image.Image], path: Path) -> None:
    width = max((t.width for t in tiles), default=1)
    grid = Image.new("RGB", (width, max(1, sum(t.height + 4 for t in tiles))), (20, 20, 20))
    y = 0
    for t in tiles:
        grid.paste(t, (0, y))
        y += t.height + 4
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def build_manifest(folder: str | Path, out: str | Path | None = None) -> Path:
    """Write a manifest from the folder convention ``<folder>/<sample>/{target.*, caption.txt, ref_<i>.*, mask_<i>.*,
    labels.txt (optional, one label per line)}``. Returns the manifest path (default ``<folder>/manifest.jsonl``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"dataset folder {folder} does not exist")
    out = Path(out) if out is not None else folder / "manifest.jsonl"
    lines, problems = [], []
    for sample in sorted(p for p in folder.iterdir() if p.is_dir()):
        def find(stem: str) -> Path | None:
            return next((sample / f"{stem}{s}" for s in IMAGE_SUFFIXES if (sample / f"{stem}{s}").is_file()), None)

        target, caption = find("target"), sample / "caption.txt"
        refs, masks = [], []
        while (ref := find(f"ref_{len(refs)}")) is not None:
            refs.append(ref)
        while (mask := find(f"mask_{len(masks)}")) is not None:
            masks.append(mask)
        if target is None or not caption.is_file() or not refs or len(refs) != len(masks):
            problems.append(f"{sample.name}: needs target.png, caption.txt and ref_<i>/mask_<i> pairs from 0 "
                            f"(found target={target is not None}, caption={caption.is_file()}, "
                            f"{len(refs)} ref(s), {len(masks)} mask(s))")
            continue
        item = {"image": str(target.relative_to(out.parent)), "caption": caption.read_text(encoding="utf-8").strip(),
                "references": [str(r.relative_to(out.parent)) for r in refs],
                "masks": [str(m.relative_to(out.parent)) for m in masks]}
        if (sample / "labels.txt").is_file():
            item["labels"] = [x.strip() for x in (sample / "labels.txt").read_text(encoding="utf-8").splitlines() if x.strip()]
        lines.append(json.dumps(item))
    if problems:
        raise ValueError(f"{len(problems)} sample folder(s) in {folder} do not follow the convention:\n  " + "\n  ".join(problems))
    if not lines:
        raise ValueError(f"no sample folders found in {folder}")
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


# buckets and pixels

def make_buckets(resolution: int, max_aspect: float, step: int = BUCKET_STEP) -> list[tuple[int, int]]:
    """(width, height) buckets with area close to ``resolution**2``, sides multiples of ``step``."""
    area, buckets = resolution * resolution, set()
    width = step
    while width <= resolution * math.sqrt(max_aspect) + step:
        height = max(step, round(area / width / step) * step)
        if max(width, height) / min(width, height) <= max_aspect + 1e-9:
            buckets.add((width, height))
        width += step
    return sorted(buckets)


def assign_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log space) to ``width / height``."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header; an unreadable file raises ``ValueError`` naming it."""
    return _read_image(path, lambda im: im.size)


def load_image(path: Path) -> Tensor:
    """Shapes: returns (3, H, W) float in [-1, 1] (alpha dropped, grayscale expanded)."""
    array = _read_image(path, lambda im: np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_mask(path: Path) -> Tensor:
    """Shapes: returns (H, W) float, 1 where the mask is brighter than half."""
    array = _read_image(path, lambda im: np.asarray(im.convert("L"), dtype=np.float32) / 255.0)
    return torch.from_numpy((array >= 0.5).astype(np.float32))


def _read_image(path: Path, read):
    try:
        with Image.open(path) as im:
            return read(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # PIL's ways to say "not an image"
        raise ValueError(f"image file {path} cannot be read ({type(e).__name__}: {str(e)[:120]}); it is not an image "
                         "PIL can open, or it is truncated: replace the file or remove its manifest line") from None


def fit_to_bucket(image: Tensor, width: int, height: int, mode: str = "bicubic") -> Tensor:
    """Scale to cover ``width x height`` keeping the aspect, then center-crop (documented training preprocessing).
    ``mode`` "area" is for masks.

    Shapes:
        image: (C, H, W); returns (C, height, width)
    """
    _, h, w = image.shape
    scale = max(width / w, height / h)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    extra = {"align_corners": False, "antialias": True} if mode == "bicubic" else {}
    resized = torch.nn.functional.interpolate(image[None].float(), size=(new_h, new_w), mode=mode, **extra)[0]
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return resized[:, top:top + height, left:left + width].clamp(-1, 1)


def mask_tokens(mask: Tensor, latent_h: int, latent_w: int) -> Tensor:
    """Ground-truth mask on the Flux token grid: exact area coverage, binarized at 0.5 (spec §3.2). May be empty.

    Shapes:
        mask: (H, W) float in [0, 1]; returns (L,) float in {0, 1}, L = ceil(latent_h/2) * ceil(latent_w/2)
    """
    coverage = mask_token_coverage(mask, TokenGrid.from_latent(latent_h, latent_w, FLUX.patch))
    return (coverage >= 0.5).float().flatten()


# batch order

def epoch_batches(groups: dict[object, list[int]], global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """All global batches of one epoch: samples are shuffled inside each group (same bucket and subject count,
    so they stack), cut into ``global_batch``-sized batches (the remainder is dropped), and the batches shuffled.
    A pure function of (seed, epoch): resume recomputes it and skips the batches already done."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    batches = []
    for key in sorted(groups, key=str):
        members = groups[key]
        order = [members[i] for i in torch.randperm(len(members), generator=gen).tolist()]
        batches += [order[i:i + global_batch] for i in range(0, len(order) - global_batch + 1, global_batch)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def rank_slice(batch: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's contiguous share of a global batch (each rank reads only its own samples)."""
    per_rank = len(batch) // world_size
    return batch[rank * per_rank:(rank + 1) * per_rank]
