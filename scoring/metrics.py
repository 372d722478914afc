"""Benchmark metrics besides identity: HPSv2 aesthetics, CLIP-T, and layout accuracy (mIoU, AP50).

Definitions (the evaluation CLI's help prints the same list):
* CLIP-T: cosine(CLIP image embedding of the whole image, CLIP text embedding of the prompt).
* AES: HPSv2 score = cosine(HPSv2 image features, HPSv2 text features of the prompt), open_clip ViT-H-14
  with the HPS_v2(.1)_compressed.pt checkpoint; preprocessing resizes the longest side and pads to square.
* mIoU: for each subject, the IoU between its target box (layout region's bounding box) and the
  highest-scoring box an open-vocabulary detector (OWLv2) finds for the subject's label; 0 when none.
* AP50: average precision at IoU >= 0.5 over all (image, subject) queries of a run, one class: every
  detection of a subject's label is ranked by score; it is a true positive when it overlaps that subject's
  target box with IoU >= 0.5 and the box was not already claimed by a higher-scoring detection.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
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
    """Open-vocabulary detector (OWLv2 / OWL-ViT) from a local transformers folder."""

    def __init__(self, model, processor, device: str, threshold: float = DETECTION_THRESHOLD) -> None:
        self.model = model.eval().to(device)
        self.processor = processor
        self.device = device
        self.threshold = threshold

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, threshold: float = DETECTION_THRESHOLD) -> PhraseDetector:
        folder = check_model_dir(path, "layout detector (OWLv2)")
        transformers = require("transformers", "the layout metrics (mIoU, AP50)")
        model_type = read_model_type(folder, "layout detector (OWLv2)")
        if model_type not in ("owlv2", "owlvit"):
            raise ValueError(
                f"layout detector: {folder} holds a '{model_type}' model; expected an OWLv2 or OWL-ViT folder "
                "(config.json model_type 'owlv2' or 'owlvit')"
            )
        with reading(folder, "layout detector (OWLv2)", REFETCH):
            processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
            model = transformers.AutoModelForZeroShotObjectDetection.from_pretrained(folder, local_files_only=True)
        return cls(model, processor, device or ("cuda" if torch.cuda.is_available() else "cpu"), threshold)

    @torch.no_grad()
    def detect(self, image: Tensor, phrases: list[str]) -> list[tuple[Tensor, Tensor]]:
        """Boxes for each phrase.

        Shapes:
            image: (H, W, 3) float in [0, 1]
            returns per phrase: boxes (K_p, 4) pixels x0, y0, x1, y1, scores (K_p,)
        """
        height, width = image.shape[:2]
        pil = Image.fromarray((image.clamp(0, 1) * 255).round().byte().cpu().numpy())
        inputs = self.processor(text=[phrases], images=pil, return_tensors="pt")
        outputs = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        side = max(height, width)  # OWLv2 pads to a square at the bottom/right: boxes live on that square
        result = self.processor.post_process_grounded_object_detection(
            outputs, threshold=self.threshold, target_sizes=[(side, side)]
        )[0]
        boxes, scores, labels = result["boxes"].float().cpu(), result["scores"].float().cpu(), result["labels"].cpu()
        return [(boxes[labels == p], scores[labels == p]) for p in range(len(phrases))]


def layout_ious(detections: list[tuple[Tensor, Tensor]], targets: Tensor) -> Tensor:
    """IoU of each subject's best-scoring detection with its target box, 0 when nothing was detected.

    Shapes:
        targets: (S, 4) pixels; returns (S,)
    """
    ious = torch.zeros(len(detections))
    for s, (boxes, scores) in enumerate(detections):
        if len(scores):
            ious[s] = box_iou(boxes[int(torch.argmax(scores))][None], targets[s][None])[0, 0]
    return ious


def average_precision_50(queries: list[tuple[list[tuple[Tensor, Tensor]], Tensor]]) -> float:
    """AP at IoU 0.5 over every (image, subject) query; one target box per query (see module docstring).

    ``queries``: per image, (detections per subject, target boxes (S, 4)). AP = area under the
    precision-recall curve with all-point interpolation (as in VOC2010+ / COCO's per-threshold AP).
    """
    records = []  # (score, is_true_positive)
    num_targets = 0
    for detections, targets in queries:
        num_targets += len(detections)
        for s, (boxes, scores) in enumerate(detections):
            claimed = False
            for k in torch.argsort(scores, descending=True).tolist():
                hit = float(box_iou(boxes[k][None], targets[s][None])[0, 0]) >= 0.5 and not claimed
                claimed |= hit
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
