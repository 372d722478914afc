"""Benchmark metrics besides identity: HPSv2 aesthetics, CLIP-T, and layout accuracy (mIoU, AP50).

Definitions (the evaluation CLI's help prints the same list):
* CLIP-T: cosine(CLIP image embedding of the whole image, CLIP text embedding of the prompt).
* AES: HPSv2 score = cosine(HPSv2 image features, HPSv2 text features of the prompt), open_clip ViT-H-14
  with the HPS_v2(.1)_compressed.pt checkpoint; preprocessing resizes the longest side and pads to square.
* mIoU: the subjects sharing a label are assigned to the boxes an open-vocabulary detector (OWLv2) finds for
  that label (above its threshold) by Hungarian matching on IoU with their target boxes (the layout regions'
  bounding boxes); a subject's IoU is its assigned box's, 0 when none is left; mean over subjects.
* AP50: average precision at IoU >= 0.5 over all subjects of a run, one class (VOC/COCO-style matching): the
  detections of each label are ranked by score; one is a true positive when its best-overlapping unclaimed
  target box among the subjects with that label has IoU >= 0.5 (that box is then claimed), else a false positive.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..attention.files import file_error, read_torch_file, reading
from .deps import require
from .faces import refuse_hub_id
from .objects import REFETCH, check_model_dir, read_model_type

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HPS_ARCH = "ViT-H-14"
# HPS files are read with torch.load(weights_only=True) only; a file that pickles other objects is refused
HPS_CONVERT_HINT = (
    "convert it once, on a machine where you trust the file: load it with torch.load with pickle loading allowed, "
    "then save only its tensors, torch.save(s.get('state_dict', s), 'OUT.pt'), and give OUT.pt"
)
DETECTION_THRESHOLD = 0.1  # OWLv2 score threshold for keeping a box (the processor's default)


def register_open_clip_config(name: str, config: dict) -> None:
    """Make an extra open_clip architecture known by name (for tiny test models)."""
    open_clip = require("open_clip", "the AES (HPSv2) metric")
    folder = Path(tempfile.mkdtemp(prefix="open_clip_cfg_"))
    (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)


def pad_to_square_resize(image: Tensor, size: int) -> Tensor:
    """HPSv2 eval preprocessing: longest side -> ``size`` (bicubic), pad right/bottom with 0, OpenAI norm.

    Shapes:
        image: (H, W, 3) float in [0, 1]
        returns (3, size, size)
    """
    height, width = image.shape[:2]
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    x = image.permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    # ResizeMaxSize pads centred; the padding value 0 is applied before normalisation
    top, left = (size - new_h) // 2, (size - new_w) // 2
    x = F.pad(x, (left, size - new_w - left, top, size - new_h - top), value=0.0)[0]
    mean = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(3, 1, 1)
    return (x - mean) / std


class HPSv2Scorer:
    """HPSv2 / HPSv2.1 (AES): open_clip model built with ``pretrained=None`` and the local checkpoint."""

    def __init__(self, model, tokenizer, image_size: int, device: str) -> None:
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.device = device

    @classmethod
    def load(cls, checkpoint: str | Path, arch: str = HPS_ARCH, device: str | None = None) -> HPSv2Scorer:
        refuse_hub_id(str(checkpoint), "HPSv2 checkpoint", "give the local HPS_v2.1_compressed.pt file")
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"HPSv2 checkpoint {path} not found; expected the file HPS_v2.1_compressed.pt (or HPS_v2_compressed.pt) "
                "from the HPSv2 release"
            )
        state = read_torch_file(path, "HPSv2 checkpoint", convert_hint=HPS_CONVERT_HINT)
        state = state.get("state_dict", state)
        open_clip = require("open_clip", "the AES (HPSv2) metric")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if str(arch).endswith(".json"):  # an open_clip model config file: registered under its file name
            config = Path(arch).expanduser()
            if not config.is_file():
                raise FileNotFoundError(f"open_clip config {config} not found (expected embed_dim, vision_cfg, text_cfg)")
            register_open_clip_config(config.stem, json.loads(config.read_text()))
            arch = config.stem
        model = open_clip.create_model(arch, pretrained=None)
        with reading(path, "HPSv2 checkpoint", f"use HPS_v2(.1)_compressed.pt for open_clip '{arch}'"):
            missing, unexpected = model.load_state_dict(state, strict=False)
        if missing:
            raise file_error(path, "HPSv2 checkpoint", f"does not fit open_clip '{arch}': {len(missing)} missing keys "
                             f"(e.g. {missing[0]})", "use HPS_v2(.1)_compressed.pt for ViT-H-14")
        image_size = model.visual.image_size
        image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
        return cls(model, open_clip.get_tokenizer(arch), image_size, device)

    @torch.no_grad()
    def __call__(self, images: list[Tensor], prompts: list[str]) -> Tensor:
        """Shapes: images N x (H_i, W_i, 3) in [0, 1], prompts N -> (N,) HPS scores (raw cosine)."""
        pixels = torch.stack([pad_to_square_resize(im, self.image_size) for im in images]).to(self.device)
        text = self.tokenizer(prompts).to(self.device)
        image_features = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        text_features = F.normalize(self.model.encode_text(text).float(), dim=-1)
        scores = (image_features * text_features).sum(-1).cpu()
        if not torch.isfinite(scores).all():
            raise ValueError("HPSv2 returned NaN/inf scores; the checkpoint is probably corrupt")
        return scores


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Shapes: a (N, 4), b (M, 4) x0, y0, x1, y1 -> (N, M) IoU."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-9)


class PhraseDetector:
    """Open-vocabulary detector (OWLv2 / OWL-ViT) from a local transformers folder.

    Box coordinates: the model predicts boxes normalised to the image it was fed. OWL-ViT (v1) resizes the image
    to its square input (stretching it), so its boxes are relative to the image itself; OWLv2 first pads the image
    to a square at the bottom/right, so its boxes are relative to that padded square. ``box_scale`` says which.
    """

    def __init__(self, model, processor, device: str, threshold: float = DETECTION_THRESHOLD,
                 text_length: int = 16) -> None:
        self.model = model.eval().to(device)
        self.processor = processor
        self.device = device
        self.threshold = threshold
        self.text_length = text_length  # OWL reads fixed-length queries (16 tokens): every query is padded to it

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, threshold: float = DETECTION_THRESHOLD) -> PhraseDetector:
        folder = check_model_dir(path, "object detector (OWLv2)")
        transformers = require("transformers", "the object detector (OWLv2: object location, mIoU, AP50)")
        model_type = read_model_type(folder, "object detector (OWLv2)")
        if model_type not in ("owlv2", "owlvit"):
            raise ValueError(
                f"object detector: {folder} holds a '{model_type}' model; expected an OWLv2 or OWL-ViT folder "
                "(config.json model_type 'owlv2' or 'owlvit')"
            )
        with reading(folder, "object detector (OWLv2)", REFETCH):
            processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
            model = transformers.AutoModelForZeroShotObjectDetection.from_pretrained(folder, local_files_only=True)
        return cls(model, processor, device or ("cuda" if torch.cuda.is_available() else "cpu"), threshold,
                   int(model.config.text_config.max_position_embeddings))

    def box_scale(self, height: int, width: int) -> tuple[float, float]:
        """(x, y) pixels per normalised box unit: the padded square's side for a padding processor (OWLv2), else
        the image's own width and height (OWL-ViT stretches the image to its square input)."""
        if getattr(self.processor.image_processor, "do_pad", False):
            side = float(max(height, width))
            return side, side
        return float(width), float(height)

    @torch.no_grad()
    def detect(self, image: Tensor, phrases: list[str]) -> list[tuple[Tensor, Tensor]]:
        """Boxes for each phrase (a repeated phrase gets the same boxes: it is queried once).

        Shapes:
            image: (H, W, 3) float in [0, 1]
            returns per phrase: boxes (K_p, 4) pixels x0, y0, x1, y1, scores (K_p,)
        """
        height, width = image.shape[:2]
        queries = list(dict.fromkeys(phrases))  # OWL gives each box to its best query: duplicates would starve
        pil = Image.fromarray((image.clamp(0, 1) * 255).round().byte().cpu().numpy())
        inputs = self.processor(text=[queries], images=pil, return_tensors="pt", padding="max_length",
                                max_length=self.text_length, truncation=True)
        outputs = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        # normalised boxes (target_sizes=None), scaled here: transformers' own scaling differs between versions
        result = self.processor.post_process_grounded_object_detection(outputs, threshold=self.threshold)[0]
        sx, sy = self.box_scale(height, width)
        boxes = result["boxes"].float().cpu() * torch.tensor([sx, sy, sx, sy])
        scores, labels = result["scores"].float().cpu(), result["labels"].cpu()
        per_query = [(boxes[labels == q], scores[labels == q]) for q in range(len(queries))]
        return [per_query[queries.index(p)] for p in phrases]


def _label_groups(count: int, labels: list[str] | None) -> list[list[int]]:
    """Subjects sharing a label, as index lists (each subject alone when no labels are given)."""
    if labels is None:
        return [[s] for s in range(count)]
    groups: dict[str, list[int]] = {}
    for s, label in enumerate(labels):
        groups.setdefault(label, []).append(s)
    return list(groups.values())


def layout_ious(detections: list[tuple[Tensor, Tensor]], targets: Tensor, labels: list[str] | None = None) -> Tensor:
    """IoU of each subject's assigned detection with its target box, 0 when it got none.

    Subjects with the same label share their detections (those of the group's first subject) and are assigned
    to them one-to-one by Hungarian matching on IoU, so two perfectly placed dogs both score 1.

    Shapes:
        detections: per subject (boxes (K, 4), scores (K,)); targets: (S, 4) pixels; returns (S,)
    """
    ious = torch.zeros(len(detections))
    for group in _label_groups(len(detections), labels):
        boxes = detections[group[0]][0]
        if not len(boxes):
            continue
        iou = box_iou(targets[group], boxes)  # (G, K)
        rows, cols = linear_sum_assignment(iou.double().numpy(), maximize=True)
        ious[torch.tensor([group[r] for r in rows])] = iou[rows, cols].float()
    return ious


def average_precision_50(queries: list[tuple]) -> float:
    """AP at IoU 0.5 over every subject of every image (see module docstring).

    ``queries``: per image, (detections per subject, target boxes (S, 4)[, labels per subject]); subjects sharing
    a label share the detections of the group's first subject. AP = area under the precision-recall curve with
    all-point interpolation (as in VOC2010+ / COCO's per-threshold AP).
    """
    records = []  # (score, is_true_positive)
    num_targets = 0
    for query in queries:
        detections, targets = query[0], query[1]
        labels = query[2] if len(query) > 2 else None
        num_targets += len(detections)
        for group in _label_groups(len(detections), labels):
            boxes, scores = detections[group[0]]
            claimed: set[int] = set()
            for k in torch.argsort(scores, descending=True).tolist():
                overlap = box_iou(boxes[k][None], targets[group])[0]
                free = [g for g in range(len(group)) if g not in claimed]
                best = max(free, key=lambda g: float(overlap[g])) if free else None
                hit = best is not None and float(overlap[best]) >= 0.5
                if hit:
                    claimed.add(best)
                records.append((float(scores[k]), hit))
    if num_targets == 0:
        return float("nan")
    records.sort(key=lambda r: -r[0])
    tp = torch.tensor([float(hit) for _, hit in records]).cumsum(0) if records else torch.zeros(0)
    if not len(tp):
        return 0.0
    precision = tp / torch.arange(1, len(tp) + 1)
    recall = tp / num_targets
    # all-point interpolation: precision envelope, integrated over recall steps
    envelope = torch.flip(torch.cummax(torch.flip(precision, [0]), 0).values, [0])
    recall_steps = torch.cat([torch.zeros(1), recall])
    return float(((recall_steps[1:] - recall_steps[:-1]) * envelope).sum())
