"""Benchmark evaluation over manifests: per-sample metrics, per-run tables in the papers' format, plots.

A manifest is a JSON list (or JSON Lines) of samples; paths are relative to the manifest's folder::

    {"id": "s0", "image": "gen/s0.png", "prompt": "a corgi and a teapot on a table",
     "references": ["refs/corgi.png", {"image": "refs/teapot.png", "mask": "refs/teapot_mask.png", "label": "teapot"}],
     "layout": {"width": 1024, "height": 1024, "boxes": [[0.05, 0.2, 0.5, 0.95], [0.5, 0.2, 0.95, 0.95]]}}

A reference is a path, or an object with ``image`` (or ``images``: several views), optional ``mask``
(white = subject; RGBA images use their alpha) and ``label`` (the detector's phrase for the layout
metrics). ``layout`` is optional: ``boxes`` (normalised x0, y0, x1, y1, or {"box": [...], "label": ...})
or ``masks`` (image paths), in reference order. A sample whose files are missing or malformed is
reported with its entry and counted as failed; the rest are still evaluated.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..attention.layout import Layout
from ..attention.subjects import Subject, Subjects
from .confusion import identity_confusion, mean_defined, own_candidates
from .faces import FaceEmbedder
from .identity import IdentityResult, IdentityScorer, check_images, embed_object_references
from .locate import NOT_LOCATED, Candidates, ObjectLocator, object_candidates
from .manifest import ManifestError, load_image, load_mask, read_manifest
from .matching import match_identities
from .metrics import HPSv2Scorer, PhraseDetector, average_precision_50, layout_ious
from .objects import ImageEmbedder

# name -> definition; the CLI help prints this list. Order = table column order. README "Protocol" says more.
METRICS: dict[str, str] = {
    "CLIP-T": "cosine(CLIP image embedding of the whole generated image, CLIP text embedding of the prompt)",
    "Face-Sim": "ArcFace cosine between each face reference (largest face of its reference image) and the generated "
                "face Hungarian-matched to it, averaged over face references; an unmatched reference counts 0",
    "DINO-I": "cosine(DINO CLS embedding of subject k's reference, of the generated image's region k), no "
              "re-matching, averaged over all subjects (negatives count 0). Without a layout: the located subjects "
              "(detector boxes) Hungarian-matched to the references, unmatched 0; without a detector either, the "
              "whole image (objects not located, footnoted)",
    "CLIP-I": "as DINO-I with CLIP image embeddings",
    "AES": "HPSv2 score: cosine(HPSv2 image features, HPSv2 text features of the prompt)",
    "Overall": "MultiCrafter's Overall: arithmetic mean of CLIP-T, Face-Sim, DINO-I, CLIP-I and AES",
    "Multi-ID": "MultiCrafter's Multi-ID reward: faces (ArcFace) and other subjects (DINO, on layout regions or "
                "located boxes) Hungarian-matched in separate problems, summed and divided by the number of subjects",
    "DINO-I (Hungarian)": "as DINO-I, but with a layout the references are Hungarian-matched to the regions (a "
                          "subject in another subject's box still scores); equal to DINO-I without a layout",
    "CLIP-I (Hungarian)": "as DINO-I (Hungarian) with CLIP image embeddings",
    "ID-Conf": "UMO's identity confusion for face references: min(1, (s1 - s2) / s1) over the ArcFace similarities "
               "to the generated faces (s1 best, s2 second; with a layout s1 is the face in the subject's own region, "
               "0 when it is not the best); 1 = no confusion; references facing fewer than 2 faces are left out",
    "IP-Conf": "ID-Conf for every subject with DINO embeddings over the DINO-I candidates (layout regions or "
               "located boxes)",
    "mIoU": "mean over subjects of IoU(target box of the layout region, OWLv2 box for the subject's label), "
            "same-label subjects assigned to boxes by Hungarian matching on IoU; 0 when none is left",
    "AP50": "average precision at IoU >= 0.5 over all subjects of a run, one class; a detection of a label is a "
            "true positive when its best-overlapping unclaimed target box of that label has IoU >= 0.5",
}
OVERALL_OF = ("CLIP-T", "Face-Sim", "DINO-I", "CLIP-I", "AES")
PER_SAMPLE = [m for m in METRICS if m != "AP50"]  # AP50 exists only per run
REFERENCE_CACHE = 512  # reference sets whose embeddings are kept
NOT_LOCATED_NOTE = (f"{NOT_LOCATED} in {{count}} sample(s) of run {{run}}: no layout and no --detector-dir, so "
                    "DINO-I/CLIP-I (and Multi-ID objects) compared each reference with the whole image")


@dataclass(frozen=True)
class Sample:
    index: int
    id: str
    image: Path
    prompt: str
    subjects: Subjects
    layout: Layout | None
    reference_key: str = ""  # identifies the reference files: samples sharing them share embeddings


@dataclass
class SampleResult:
    run: str
    index: int
    id: str
    image: str
    metrics: dict[str, float | None] = field(default_factory=dict)
    per_subject: list[float] = field(default_factory=list)
    error: str = ""
    identity: IdentityResult | None = None
    detections: tuple | None = None  # (per-subject detections, target boxes, labels) for AP50
    objects_located: bool | None = None  # False: subjects were compared with the whole image

    def row(self) -> dict:
        out = {"run": self.run, "index": self.index, "id": self.id, "image": self.image}
        out.update({m: self.metrics.get(m) for m in PER_SAMPLE})
        out["per_subject_identity"] = self.per_subject
        out["objects_located"] = self.objects_located
        out["error"] = self.error
        return out


# manifests


def parse_sample(entry, index: int, root: Path) -> Sample:
    """One manifest entry -> Sample (raises ManifestError naming the problem)."""
    if not isinstance(entry, dict):
        raise ManifestError(f"an entry must be an object with image, prompt, references; got {type(entry).__name__}")
    missing = [k for k in ("image", "references") if k not in entry]
    if missing:
        raise ManifestError(f"entry lacks {', '.join(missing)} (has {', '.join(sorted(entry)) or 'nothing'})")
    sample_id = str(entry.get("id", index))
    refs = entry["references"]
    if not isinstance(refs, list) or not refs:
        raise ManifestError("references must be a non-empty list of paths or {image, mask, label} objects")
    subjects = Subjects()
    for r, ref in enumerate(refs):
        ref = {"image": ref} if isinstance(ref, str) else ref
        if not isinstance(ref, dict) or not ("image" in ref or "images" in ref):
            raise ManifestError(f"reference {r} must be a path or an object with 'image' or 'images', got {ref!r}")
        paths = ref["images"] if "images" in ref else [ref["image"]]
        views = [load_image(root / p, f"reference {r} image") for p in paths]
        if len({tuple(v.shape[:2]) for v in views}) > 1:
            raise ManifestError(f"reference {r}: all views must share one size, got {[tuple(v.shape[:2]) for v in views]}")
        views = [v if v.shape[-1] == 4 else torch.cat([v, torch.ones_like(v[..., :1])], -1) for v in views] \
            if any(v.shape[-1] == 4 for v in views) else views
        mask = load_mask(root / ref["mask"], f"reference {r} mask") if ref.get("mask") else None
        try:
            subjects = subjects.append(Subject.from_image(torch.stack(views), mask, label=str(ref.get("label", ""))))
        except ValueError as e:
            raise ManifestError(f"reference {r}: {e}") from None
    layout = None
    if entry.get("layout") is not None:
        layout = _parse_layout(entry["layout"], root, len(subjects), subjects.labels)
    key = json.dumps([str(root.resolve()), refs], sort_keys=True)
    return Sample(index, sample_id, root / entry["image"], str(entry.get("prompt", "")), subjects, layout, key)


def _parse_layout(spec, root: Path, num_subjects: int, labels: list[str]) -> Layout:
    if not isinstance(spec, dict) or not ("boxes" in spec or "masks" in spec):
        raise ManifestError(f"layout must be an object with 'boxes' (and width, height) or 'masks', got {spec!r}")
    try:
        if "masks" in spec:
            layout = Layout.from_masks(torch.stack([load_mask(root / p, "layout mask") for p in spec["masks"]]))
        else:
            boxes = [b["box"] if isinstance(b, dict) else b for b in spec["boxes"]]
            names = [b.get("label", "") if isinstance(b, dict) else "" for b in spec["boxes"]]
            layout = Layout.from_boxes(int(spec["width"]), int(spec["height"]), [tuple(map(float, b)) for b in boxes],
                                       names)
        layout.check_subject_count(num_subjects)
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"layout: {e}") from None
    return layout.with_labels(labels)


# evaluation


class Evaluator:
    """Computes every metric whose model is loaded; the others stay None (n/a).

    ``dino``: DINO v1 (ViT-S/16, the DreamBench backbone) or DINOv2; it also scores Multi-ID's objects.
    ``detector``: OWLv2 / OWL-ViT; layout accuracy (mIoU, AP50) and, for samples without a layout, locating the
    subjects for DINO-I/CLIP-I/Multi-ID (optionally segmented by ``segmenter``).
    """

    def __init__(self, faces: FaceEmbedder | None = None, dino: ImageEmbedder | None = None,
                 clip: ImageEmbedder | None = None, hps: HPSv2Scorer | None = None,
                 detector: PhraseDetector | None = None, segmenter=None) -> None:
        if not any((faces, dino, clip, hps, detector)):
            raise ValueError(
                "no metric can be computed: give at least one model (--insightface-root/--face-pack, --dino-dir, "
                "--clip-dir, --hps-checkpoint, --detector-dir)"
            )
        if clip is not None and clip.kind != "clip":
            raise ValueError(f"--clip-dir must hold a CLIP model, {clip.folder} holds {clip.name}")
        if dino is not None and dino.kind not in ("vit", "dinov2"):
            raise ValueError(f"--dino-dir must hold a DINO (ViT) or DINOv2 model, {dino.folder} holds {dino.name}")
        self.faces, self.dino, self.clip, self.hps, self.detector = faces, dino, clip, hps, detector
        self.locator = ObjectLocator(detector, segmenter) if detector is not None else None
        self.identity = IdentityScorer(faces=faces, objects=dino, locator=self.locator) if (faces or dino) else None
        self._references: dict[tuple[str, str], object] = {}  # (what, reference_key) -> embeddings

    def _cached(self, what: str, sample: Sample, compute):
        """Reference embeddings are computed once per reference set (runs usually share references)."""
        key = (what, sample.reference_key or str(id(sample)))
        if key not in self._references:
            if len(self._references) >= REFERENCE_CACHE:
                self._references.pop(next(iter(self._references)))
            self._references[key] = compute()
        return self._references[key]

    def available(self) -> list[str]:
        have = {
            "CLIP-T": self.clip is not None and self.clip.tokenizer is not None, "Face-Sim": self.faces is not None,
            "DINO-I": self.dino is not None, "CLIP-I": self.clip is not None, "AES": self.hps is not None,
            "Multi-ID": self.identity is not None, "DINO-I (Hungarian)": self.dino is not None,
            "CLIP-I (Hungarian)": self.clip is not None, "ID-Conf": self.faces is not None,
            "IP-Conf": self.dino is not None, "mIoU": self.detector is not None, "AP50": self.detector is not None,
        }
        have["Overall"] = all(have[m] for m in OVERALL_OF)
        return [m for m in METRICS if have[m]]

    def evaluate(self, sample: Sample, run: str) -> SampleResult:
        image = check_images(load_image(sample.image, "generated image")[..., :3])[0]
        result = SampleResult(run, sample.index, sample.id, str(sample.image))
        m = result.metrics
        located = []
        if self.identity is not None:
            refs = self._cached("identity", sample,
                                lambda: self.identity.embed_references(sample.subjects, unscorable_ok=True))
            identity = self.identity.score_image(image, refs, sample.layout)
            result.identity = identity
            result.per_subject = [round(float(v), 6) for v in identity.per_subject]
            # a subject with no face and no object model cannot be scored: Multi-ID is then n/a
            m["Multi-ID"] = identity.score if "none" not in refs.kinds else None
            m["Face-Sim"] = identity.face_score if self.faces is not None else None
            if identity.face_matching is not None:
                m["ID-Conf"] = self._face_confusion(identity, refs.face_subjects, sample.layout, image)
            if identity.objects_located is not None:
                located.append(identity.objects_located)
        if self.dino is not None or self.clip is not None:
            candidates = object_candidates(image, sample.subjects.labels, sample.layout, self.locator)
            located.append(candidates.located)
            for name, embedder in (("DINO-I", self.dino), ("CLIP-I", self.clip)):
                if embedder is not None:
                    refs = self._cached(name, sample, lambda e=embedder: embed_object_references(
                        e, sample.subjects, range(len(sample.subjects))))
                    self._subject_similarity(m, name, embedder, refs, candidates)
        if self.clip is not None and self.clip.tokenizer is not None:
            m["CLIP-T"] = float(self.clip.embed_images([image])[0] @ self.clip.embed_texts([sample.prompt])[0])
        if self.hps is not None:
            m["AES"] = float(self.hps([image], [sample.prompt])[0])
        if self.detector is not None and sample.layout is not None:
            targets = _target_boxes(sample.layout, image)
            labels = [label or "object" for label in sample.subjects.labels]
            detections = self.detector.detect(image, labels)
            m["mIoU"] = float(layout_ious(detections, targets, labels).mean())
            result.detections = (detections, targets, labels)
        parts = [m.get(k) for k in OVERALL_OF]
        m["Overall"] = sum(parts) / len(parts) if all(p is not None for p in parts) else None
        result.objects_located = all(located) if located else None
        return result

    @staticmethod
    def _subject_similarity(m: dict, name: str, embedder: ImageEmbedder, refs: Tensor, candidates: Candidates) -> None:
        """DINO-I / CLIP-I (reference k vs region k), their Hungarian variant and, for DINO, IP-Conf."""
        similarity = refs @ embedder.embed_images(candidates.crops).T  # (S, K)
        if candidates.source == "layout":  # region k is subject k's: no re-matching
            m[name] = float(similarity.diagonal().clamp(min=0).mean())
            m[f"{name} (Hungarian)"] = match_identities(similarity).score
            own = torch.arange(len(refs))
        elif candidates.source == "detector":  # located: which box is whose is only known by matching
            m[name] = m[f"{name} (Hungarian)"] = match_identities(similarity).score
            own = None
        else:  # not located: each reference against the whole image (DreamBench)
            m[name] = m[f"{name} (Hungarian)"] = float(similarity[:, 0].clamp(min=0).mean())
            own = None
        if name == "DINO-I":
            m["IP-Conf"] = mean_defined(identity_confusion(similarity, own))

    @staticmethod
    def _face_confusion(identity: IdentityResult, face_subjects: list[int], layout: Layout | None,
                        image: Tensor) -> float | None:
        similarity = identity.face_matching.similarity  # (face references, detected faces)
        own = None
        if layout is not None:
            own = own_candidates(identity.face_boxes, _target_boxes(layout, image)[face_subjects])
        return mean_defined(identity_confusion(similarity, own))


def _target_boxes(layout: Layout, image: Tensor) -> Tensor:
    """Shapes: returns (S, 4) pixels: each region's bounding box on ``image``."""
    height, width = image.shape[:2]
    layout.check_aspect(height, width, what="image")
    return torch.tensor([[b[0] * width, b[1] * height, b[2] * width, b[3] * height]
                         for b in (r.bounding_box() for r in layout.regions)])


def summarise(results: list[SampleResult]) -> dict:
    """Per-run means over the samples that were evaluated, plus AP50, counts and failures."""
    good = [r for r in results if not r.error]
    summary = {"n": len(good), "failed": len(results) - len(good),
               "not_located": sum(r.objects_located is False for r in good)}
    for metric in PER_SAMPLE:
        values = [r.metrics[metric] for r in good if r.metrics.get(metric) is not None]
        summary[metric] = sum(values) / len(values) if values else None
    queries = [r.detections for r in good if r.detections is not None]
    summary["AP50"] = average_precision_50(queries) if queries else None
    parts = [summary[k] for k in OVERALL_OF]
    # the table's Overall is the mean of its five columns (== mean of per-sample Overall when nothing is missing)
    summary["Overall"] = sum(parts) / len(parts) if all(p is not None for p in parts) else None
    return summary


def format_table(summaries: dict[str, dict], metrics: list[str], scale: float = 1.0) -> str:
    """Markdown table in the papers' format: one row per run, higher is better for every column."""
    columns = [m for m in METRICS if m in metrics]
    lines = ["| Method | " + " | ".join(columns) + " | n | failed |",
             "|---|" + "---|" * len(columns) + "---|---|"]
    for run, summary in summaries.items():
        cells = []
        for metric in columns:
            value = summary.get(metric)
            cells.append("n/a" if value is None or (isinstance(value, float) and math.isnan(value))
                         else f"{value * scale:.{2 if scale != 1 else 4}f}")
        lines.append(f"| {run} | " + " | ".join(cells) + f" | {summary['n']} | {summary['failed']} |")
    notes = [NOT_LOCATED_NOTE.format(count=s["not_located"], run=run)
             for run, s in summaries.items() if s.get("not_located")]
    return "\n".join(lines) + "\n" + "".join(f"\nNote: {note}.\n" for note in notes)


def _csv_value(value):
    if isinstance(value, list):
        return " ".join(f"{v:.4f}" for v in value)
    if isinstance(value, float):
        return f"{value:.6f}"
    return "" if value is None else value


def evaluate_runs(runs: dict[str, Path], evaluator: Evaluator, out_dir: Path, *, scale: float = 1.0,
                  worst: int = 8, progress: bool = True, title: str = "", log=print) -> dict[str, dict]:
    """Evaluate every run's manifest, write per-sample JSON + CSV, table.md, summary.json and plots/.

    Returns {run: summary}. A bad entry is logged with its run, index and id, counted as failed, and skipped.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = {run: read_manifest(path) for run, path in runs.items()}
    total = sum(len(e) for e in entries.values())
    bar = _progress(total, progress)
    results: dict[str, list[SampleResult]] = {}
    samples: dict[tuple[str, int], Sample] = {}
    started = time.monotonic()
    for run, path in runs.items():
        results[run] = []
        for index, entry in enumerate(entries[run]):
            label = entry.get("id", index) if isinstance(entry, dict) else index
            try:
                sample = parse_sample(entry, index, Path(path).parent)
                results[run].append(evaluator.evaluate(sample, run))
                samples[(run, index)] = sample
            except (ManifestError, ValueError, FileNotFoundError) as e:
                message = f"{run} entry {index} (id {label}): {e}"
                log(f"eval: FAILED {message}")
                image = str(entry.get("image", "")) if isinstance(entry, dict) else ""
                results[run].append(SampleResult(run, index, str(label), image, error=message))
            bar.update(1)
    bar.close()
    summaries = {run: summarise(rs) for run, rs in results.items()}
    metrics = evaluator.available()
    rows = [r.row() for rs in results.values() for r in rs]
    (out_dir / "per_sample.json").write_text(json.dumps(rows, indent=1))
    with open(out_dir / "per_sample.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["run"])
        writer.writeheader()
        writer.writerows({k: _csv_value(v) for k, v in row.items()} for row in rows)
    table = format_table(summaries, metrics, scale)
    (out_dir / "table.md").write_text(table)
    (out_dir / "summary.json").write_text(json.dumps(
        {"metrics": {m: METRICS[m] for m in metrics}, "scale": scale, "runs": summaries,
         "seconds": round(time.monotonic() - started, 2)}, indent=1))
    from .plots import plot_metric_bars, plot_worst_samples

    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    plot_metric_bars(summaries, metrics, plots / "metrics.png", title=title)
    all_results = [r for rs in results.values() for r in rs if not r.error]
    plot_worst_samples(all_results, samples, plots / "worst_samples.png", count=worst, title=title)
    failed = sum(s["failed"] for s in summaries.values())
    if failed:
        log(f"eval: {failed} of {total} entries failed (listed above and in per_sample.json)")
    return summaries


def _progress(total: int, enabled: bool):
    from .deps import require

    tqdm = require("tqdm", "the evaluation progress bar").tqdm
    return tqdm(total=total, unit="image", desc="eval", disable=not enabled, dynamic_ncols=True)
