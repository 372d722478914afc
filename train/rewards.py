"""IPPO rewards behind one signature: ``reward(inputs: RewardInputs) -> (B,) scores`` (multicrafter.md §5.4).

Three rewards are built from the config, each from local files only (nothing is downloaded):
  * ``multi_id``: the Multi-ID Alignment Reward, Hungarian-matched identity similarity (``scoring.identity``);
  * ``clip_text``: CLIP image-text cosine from a local HF CLIP folder. By default a different CLIP from the one
    the CLIP-T metric uses, so the metric is not inflated by optimizing it;
  * ``hpsv2``: HPSv2(.1) from its local checkpoint in an open_clip ViT-H-14 (``scoring.metrics``).
Extra rewards (tests, experiments) are passed in by name. Heavy packages are imported only when a reward is built.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import torch
from torch import Tensor

from ..attention.layout import Layout
from ..attention.subjects import Subjects

REFERENCE_CACHE_SIZE = 4096  # prompt groups whose embedded references the multi_id reward keeps


@dataclass(frozen=True)
class RewardInputs:
    """What every reward sees: a batch of generated images with the prompt group each came from.

    Shapes:
        images: (B, H, W, 3) float RGB in [0, 1] (the ComfyUI IMAGE layout the scoring package takes)
        prompts, subjects, layouts: B entries, one per image (images of one group repeat their group's entry)
    """

    images: Tensor
    prompts: tuple[str, ...]
    subjects: tuple[Subjects, ...]
    layouts: tuple[Layout | None, ...] = ()

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"reward images must be (B, H, W, 3) RGB in [0, 1], got {tuple(self.images.shape)}")
        batch = self.images.shape[0]
        if not self.layouts:
            object.__setattr__(self, "layouts", (None,) * batch)
        counts = {"prompts": len(self.prompts), "subjects": len(self.subjects), "layouts": len(self.layouts)}
        wrong = {k: n for k, n in counts.items() if n != batch}
        if wrong:
            raise ValueError(f"reward inputs hold {batch} images but {wrong}; give one entry per image")


Reward = Callable[[RewardInputs], Tensor]  # -> (B,) float scores


@dataclass(frozen=True)
class RewardConfig:
    """Which rewards to compute, their weights in Eq. 11, and where their models are on disk."""

    # reward name -> weight; normalized to sum to 1. Names: multi_id, clip_text, hpsv2 (+ extras passed by code)
    weights: Mapping[str, float] = field(
        default_factory=lambda: MappingProxyType({"multi_id": 1.0, "clip_text": 1.0, "hpsv2": 1.0})
    )
    # clip_text: HF CLIP folder (config.json, model.safetensors, preprocessor_config.json, tokenizer files).
    # Use a different CLIP from the CLIP-T metric's (e.g. DFN5B-CLIP-ViT-H-14-384 as MixGRPO, not CLIP-ViT-L/14).
    clip_dir: str = ""
    hps_checkpoint: str = ""  # hpsv2: HPS_v2.1_compressed.pt (or HPS_v2_compressed.pt)
    hps_arch: str = "ViT-H-14"  # hpsv2: open_clip architecture the checkpoint belongs to
    insightface_root: str = ""  # multi_id faces: folder holding models/<face_pack>/*.onnx; "" = no face scoring
    face_pack: str = "antelopev2"  # multi_id faces: insightface pack name
    object_model_dir: str = ""  # multi_id objects: HF DINOv2 (or CLIP) folder; "" = no object scoring
    # multi_id objects: OWLv2 / OWL-ViT folder that locates each object subject (by its label) in the generated image
    # before matching; "" = objects are compared with the whole image ("objects not located", logged)
    detector_dir: str = ""
    detection_threshold: float = 0.1  # detector score threshold for a candidate box
    segmenter_dir: str = ""  # multi_id objects: SAM folder masking each located box; "" = box crops
    device: str = ""  # device of the reward models; "" = cuda when available, else cpu
    # extra rewards, each "name=package.module:function" with function(RewardInputs) -> (B,) scores; weight them
    # in `weights` like the built-ins (e.g. a toy reward in tests, or your own aesthetic model)
    plugins: tuple[str, ...] = ()
    ranks: int = 0  # the last N ranks only score (reward models live there) while the others generate; 0 = none

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", MappingProxyType({str(k): float(v) for k, v in dict(self.weights).items()}))
        bad = {k: v for k, v in self.weights.items() if v < 0}
        if bad:
            raise ValueError(f"reward weights must be >= 0 (0 turns a reward off), got {bad}")
        if not any(v > 0 for v in self.weights.values()):
            raise ValueError(f"at least one reward needs a positive weight, got {dict(self.weights)}")

        for entry in self.plugins:
            name, _, target = entry.partition("=")
            if not name or ":" not in target:
                raise ValueError(f"reward plugin {entry!r} must look like name=package.module:function")

    def active(self) -> dict[str, float]:
        """Rewards with a positive weight."""
        return {k: v for k, v in self.weights.items() if v > 0}


# building


def _require_path(value: str, reward: str, key: str, expected: str, is_dir: bool) -> Path:
    if not value:
        raise ValueError(f"reward '{reward}' has a positive weight but `{key}` is not set; point it at {expected} "
                         f"or set the weight of '{reward}' to 0")
    path = Path(value).expanduser()
    if not (path.is_dir() if is_dir else path.is_file()):
        raise FileNotFoundError(f"reward '{reward}': {key} = {path} does not exist; expected {expected}")
    return path


def check_reward_config(config: RewardConfig, extra: Mapping[str, Reward] | None = None) -> None:
    """Every weighted reward is known and its model files exist (before any model is loaded).

    Raises ValueError for unknown names or unset paths and FileNotFoundError (naming the path) for missing files.
    """
    known = set(BUILTIN_REWARDS) | set(extra or {})
    unknown = sorted(set(config.weights) - known)
    if unknown:
        raise ValueError(
            f"reward weights name {unknown}, which are not configured rewards; configured: {sorted(known)}. "
            "Fix the name or remove the weight"
        )
    problems: list[str] = []
    for name in config.active():
        if name in (extra or {}):
            continue
        try:
            BUILTIN_REWARDS[name].check_paths(config)
        except ValueError as e:  # gather every unset path; a missing file (FileNotFoundError) stops at once
            problems.append(str(e))
    if problems:
        raise ValueError("; ".join(problems))


def build_rewards(config: RewardConfig, extra: Mapping[str, Reward] | None = None) -> dict[str, Reward]:
    """The weighted rewards, loaded from disk (built-ins) or taken from ``extra`` (name -> reward callable)."""
    extra = {**load_plugins(config.plugins), **(extra or {})}
    check_reward_config(config, extra)
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rewards: dict[str, Reward] = {}
    for name in config.active():
        rewards[name] = extra[name] if extra and name in extra else BUILTIN_REWARDS[name].build(config, device)
    return rewards


def load_plugins(entries: Sequence[str]) -> dict[str, Reward]:
    """``"name=package.module:function"`` entries -> reward callables (imported now, so typos fail at start)."""
    out = {}
    for entry in entries:
        name, _, target = entry.partition("=")
        module_name, _, attr = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"reward plugin '{name}': cannot import {module_name} ({e}); check the module path "
                             "and that it is on PYTHONPATH") from None
        if not callable(getattr(module, attr, None)):
            raise ValueError(f"reward plugin '{name}': {module_name} has no function '{attr}'")
        out[name] = getattr(module, attr)
    return out


def _multi_id_reward(config: RewardConfig, device: str) -> Reward:
    from ..scoring.faces import FaceEmbedder
    from ..scoring.identity import IdentityScorer
    from ..scoring.locate import ObjectLocator
    from ..scoring.metrics import PhraseDetector
    from ..scoring.objects import ImageEmbedder
    from ..scoring.segment import BoxSegmenter

    faces = FaceEmbedder.load(config.face_pack, roots=[config.insightface_root]) if config.insightface_root else None
    objects = ImageEmbedder.load(config.object_model_dir, device=device) if config.object_model_dir else None
    segmenter = BoxSegmenter.load(config.segmenter_dir, device) if config.segmenter_dir else None
    locator = ObjectLocator(PhraseDetector.load(config.detector_dir, device, config.detection_threshold),
                            segmenter) if config.detector_dir else None
    scorer = IdentityScorer(faces=faces, objects=objects, locator=locator)
    embedded: dict[int, tuple[Subjects, object]] = {}  # references are embedded once per prompt, not per iteration

    def references(subjects: Subjects):
        if id(subjects) not in embedded:
            if len(embedded) >= REFERENCE_CACHE_SIZE:
                embedded.pop(next(iter(embedded)))
            embedded[id(subjects)] = (subjects, scorer.embed_references(subjects))  # keeps `subjects` alive
        return embedded[id(subjects)][1]

    def multi_id(inputs: RewardInputs) -> Tensor:
        return scorer(inputs.images, [references(s) for s in inputs.subjects], list(inputs.layouts))

    return multi_id


def _clip_text_reward(config: RewardConfig, device: str) -> Reward:
    from ..scoring.objects import ImageEmbedder

    clip = ImageEmbedder.load(config.clip_dir, device=device, what="CLIP text-alignment reward")
    if clip.kind != "clip":
        raise ValueError(f"reward 'clip_text': clip_dir = {config.clip_dir} holds a {clip.name} model; expected CLIP")

    def clip_text(inputs: RewardInputs) -> Tensor:
        image_embeddings = clip.embed_images(list(inputs.images))  # (B, D) normalized
        text_embeddings = clip.embed_texts(list(inputs.prompts))  # (B, D) normalized
        return (image_embeddings * text_embeddings).sum(-1)

    return clip_text


def _hpsv2_reward(config: RewardConfig, device: str) -> Reward:
    from ..scoring.metrics import HPSv2Scorer

    hps = HPSv2Scorer.load(config.hps_checkpoint, arch=config.hps_arch, device=device)

    def hpsv2(inputs: RewardInputs) -> Tensor:
        return hps(list(inputs.images), list(inputs.prompts))

    return hpsv2


def _clip_text_paths(config: RewardConfig) -> None:
    _require_path(config.clip_dir, "clip_text", "clip_dir", "a local HF CLIP folder (config.json, model weights, "
                  "preprocessor_config.json, tokenizer files)", is_dir=True)


def _hpsv2_paths(config: RewardConfig) -> None:
    _require_path(config.hps_checkpoint, "hpsv2", "hps_checkpoint", "the file HPS_v2.1_compressed.pt", is_dir=False)


def _multi_id_paths(config: RewardConfig) -> None:
    if not config.insightface_root and not config.object_model_dir:
        raise ValueError(
            "reward 'multi_id' has a positive weight but neither `insightface_root` (faces) nor "
            "`object_model_dir` (objects, DINOv2) is set; set one or both, or set the weight of 'multi_id' to 0"
        )
    if config.insightface_root:
        _require_path(config.insightface_root, "multi_id", "insightface_root",
                      f"a folder holding models/{config.face_pack}/*.onnx", is_dir=True)
    if config.object_model_dir:
        _require_path(config.object_model_dir, "multi_id", "object_model_dir", "a local HF DINOv2 folder", is_dir=True)
    if config.detector_dir:
        _require_path(config.detector_dir, "multi_id", "detector_dir", "a local HF OWLv2 folder", is_dir=True)
    if config.segmenter_dir:
        _require_path(config.segmenter_dir, "multi_id", "segmenter_dir", "a local HF SAM folder", is_dir=True)
        if not config.detector_dir:
            raise ValueError("reward 'multi_id': segmenter_dir masks the objects detector_dir locates; set "
                             "detector_dir too, or leave segmenter_dir empty")


@dataclass(frozen=True)
class BuiltinReward:
    """A reward the pack ships: how to build it, how to check its files before anything loads, and which of its
    config keys may change when a run resumes (where its model files are)."""

    build: Callable[[RewardConfig, str], Reward]  # (config, device) -> reward
    check_paths: Callable[[RewardConfig], None]  # raises ValueError (unset) / FileNotFoundError (missing)
    resumable: tuple[str, ...]


# the built-in rewards: adding one is one entry here (plugins need none: `reward.plugins`)
BUILTIN_REWARDS: Mapping[str, BuiltinReward] = MappingProxyType({
    "multi_id": BuiltinReward(_multi_id_reward, _multi_id_paths, ("reward.insightface_root", "reward.object_model_dir",
                                                              "reward.detector_dir", "reward.segmenter_dir")),
    "clip_text": BuiltinReward(_clip_text_reward, _clip_text_paths, ("reward.clip_dir",)),
    "hpsv2": BuiltinReward(_hpsv2_reward, _hpsv2_paths, ("reward.hps_checkpoint",)),
})
REWARD_RESUMABLE_KEYS = tuple(key for reward in BUILTIN_REWARDS.values() for key in reward.resumable)


# computing


@dataclass(frozen=True)
class RewardResult:
    """Per-reward scores and how long each took.

    Shapes:
        scores: name -> (B,) float32 on the CPU
    """

    scores: dict[str, Tensor]
    seconds: dict[str, float]


def compute_rewards(rewards: Mapping[str, Reward], inputs: RewardInputs) -> RewardResult:
    """Run every reward on the batch, timing each one (CUDA work is synchronized so the times are real)."""
    scores, seconds = {}, {}
    batch = inputs.images.shape[0]
    for name, reward in rewards.items():
        _synchronize(inputs.images)
        start = time.perf_counter()
        value = reward(inputs)
        _synchronize(inputs.images)
        seconds[name] = time.perf_counter() - start
        value = torch.as_tensor(value).detach().float().cpu().reshape(-1)
        if value.shape != (batch,):
            raise ValueError(f"reward '{name}' returned {tuple(value.shape)} scores for {batch} images; expected ({batch},)")
        if not torch.isfinite(value).all():
            raise ValueError(f"reward '{name}' returned NaN/inf scores: {value.tolist()}")
        scores[name] = value
    return RewardResult(scores=scores, seconds=seconds)


def _synchronize(t: Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def repeat_per_image(values: Sequence, group_size: int) -> tuple:
    """One entry per prompt group -> one entry per image (groups are consecutive)."""
    return tuple(v for v in values for _ in range(group_size))
