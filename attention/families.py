"""Model-family facts: how each in-context DiT turns latents and reference latents into one token sequence.

One frozen ``ModelFamily`` record per family (pure data plus small arithmetic, no ComfyUI). Everything that
depends on "which model is this" reads from here: token grids, the joint token order, tokens per reference
for every reference method the host implements, which attention calls are joint ones, the resolution
time shift, and the module names of the versioned weight format. Adding a family is one entry here plus
its tests (``tests/test_families.py`` and a tiny instance of the host's class in ``tests/comfy/``).

Facts read from ComfyUI v0.3.64 (paths relative to ComfyUI), each checked by a test that reads the
model's own concatenated sequence:

* Flux (``comfy/ldm/flux/model.py``): FLUX.1 dev/schnell, Kontext, UNO LoRA, MultiCrafter. Sequence
  ``[txt | img | ref_0 ... ref_R]`` in double and single blocks alike; every attention call is joint.
* Qwen-Image (``comfy/ldm/qwen_image/model.py``): Qwen-Image-Edit(-2509). ``[txt | img | refs]``; latents
  are 5-D Wan latents ``(B, 16, 1, h, w)``; every attention call is joint.
* OmniGen2 (``comfy/ldm/omnigen/omnigen2.py``): ``[txt | refs | img]`` in the main layers; the context,
  noise and reference refiners attend over txt, img or refs alone and are not joint calls.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum


class TokenOrder(str, Enum):
    TXT_IMG_REFS = "txt_img_refs"  # Flux, Qwen-Image
    TXT_REFS_IMG = "txt_refs_img"  # OmniGen2 main layers


@dataclass(frozen=True)
class TimeShift:
    """Resolution-dependent time shift ``t' = e^mu / (e^mu + 1/t - 1)``, ``mu`` linear in the image tokens
    through ``(base_tokens, base_shift)`` and ``(max_tokens, max_shift)`` (FLUX/UNO training schedule)."""

    base_tokens: int
    base_shift: float
    max_tokens: int
    max_shift: float

    def mu(self, image_tokens: int) -> float:
        slope = (self.max_shift - self.base_shift) / (self.max_tokens - self.base_tokens)
        return self.base_shift + slope * (image_tokens - self.base_tokens)

    def shift(self, t: float, image_tokens: int) -> float:
        """t in (0, 1] -> shifted t."""
        e = math.exp(self.mu(image_tokens))
        return e / (e + (1.0 / t - 1.0))


@dataclass(frozen=True)
class WeightFormat:
    """Module names the versioned weight format (``attention/weights.py``) writes for a family."""

    base_model: str  # metadata ``multisubject.base_model``
    lora_prefix: str  # state-dict prefix of the model's modules in ComfyUI
    lora_leaves: tuple[str, ...]  # per-block Linear names that may carry an attention LoRA
    lora_target: re.Pattern  # full module path of an attention LoRA target
    moe_target: re.Pattern  # full module path of a MoE-LoRA FFN target


@dataclass(frozen=True)
class TokenLayout:
    """Where text, image and reference tokens sit in one joint attention call.

    ``order`` is the family's joint order; spans are half-open ``(start, end)`` in the joint sequence.
    """

    num_txt: int  # T_txt
    image_grid: tuple[int, int]  # (h, w) image token grid
    reference_grids: tuple[tuple[int, int], ...]  # (h_k, w_k) per reference, in sequence order
    order: TokenOrder = TokenOrder.TXT_IMG_REFS

    def __post_init__(self) -> None:
        if self.num_txt < 0 or min(self.image_grid) <= 0 or any(min(g) <= 0 for g in self.reference_grids):
            raise ValueError(f"invalid token layout {self}")
        object.__setattr__(self, "order", TokenOrder(self.order))

    @classmethod
    def from_latents(cls, num_txt: int, latent_hw: tuple[int, int],
                     reference_latent_hws: Sequence[tuple[int, int]]) -> TokenLayout:
        """Flux layout from latent sizes (kept for callers that predate the registry; same as ``FLUX.token_layout``)."""
        return FLUX.token_layout(num_txt, latent_hw, reference_latent_hws)

    @property
    def num_img(self) -> int:
        return self.image_grid[0] * self.image_grid[1]

    @property
    def reference_lengths(self) -> tuple[int, ...]:
        return tuple(h * w for h, w in self.reference_grids)

    @property
    def num_ref(self) -> int:
        return sum(self.reference_lengths)

    @property
    def image_span(self) -> tuple[int, int]:
        start = self.num_txt if self.order is TokenOrder.TXT_IMG_REFS else self.num_txt + self.num_ref
        return start, start + self.num_img

    @property
    def reference_spans(self) -> list[tuple[int, int]]:
        start = self.num_txt + self.num_img if self.order is TokenOrder.TXT_IMG_REFS else self.num_txt
        spans = []
        for length in self.reference_lengths:
            spans.append((start, start + length))
            start += length
        return spans

    @property
    def total(self) -> int:
        return self.num_txt + self.num_img + self.num_ref

    def subject_key_mask(self, subject_index: Sequence[int], num_subjects: int):
        """Which joint-sequence tokens are reference tokens of each subject.

        Shapes:
            returns (S, N) bool, N = total tokens
        """
        import torch

        if len(subject_index) != len(self.reference_grids):
            raise ValueError(
                f"the model got {len(self.reference_grids)} reference latent(s) but {len(subject_index)} "
                "reference(s) were described; feed the sampler the conditioning from the same references node "
                "whose references output you connected"
            )
        out = torch.zeros(num_subjects, self.total, dtype=torch.bool)
        for (start, end), subject in zip(self.reference_spans, subject_index):
            if subject >= 0:
                out[subject, start:end] = True
        return out


@dataclass(frozen=True)
class ModelFamily:
    """Facts about one family of in-context DiTs as ComfyUI runs them."""

    name: str  # registry key
    display_name: str  # for messages: which models this is
    host_classes: tuple[str, ...]  # ComfyUI diffusion-model class names of this family
    patch: int  # latent pixels per token side
    latent_channels: int
    latent_ndim: int  # 4: (B, C, h, w); 5: (B, C, t, h, w) with t = 1
    vae_downscale: int  # image pixels per latent pixel
    order: TokenOrder
    reference_methods: tuple[str, ...]  # ``ref_latents_method`` values the host implements; () = it ignores the key
    default_method: str | None
    reference_sources: str  # the ComfyUI nodes that put references on a conditioning, for error messages
    max_references: int | None = None
    refiner_calls: bool = False  # attention calls over txt, img or refs alone (OmniGen2's refiners) happen per forward
    double_blocks: str | None = None  # attribute listing the dual-stream blocks; their joint calls come first per forward
    time_shift: TimeShift | None = None
    weight_format: WeightFormat | None = None

    # arithmetic

    def token_grid(self, latent_h: int, latent_w: int) -> tuple[int, int]:
        """Token grid of a latent: ``patch x patch`` patches, odd sizes padded up (all three hosts pad)."""
        return -(-latent_h // self.patch), -(-latent_w // self.patch)

    def reference_tokens(self, latent_shape: Sequence[int], method: str | None = None) -> int:
        """Tokens one reference latent becomes under ``method`` (every method of these hosts only moves position ids).

        Shapes:
            latent_shape: (B, C, h, w) or, for 5-D families, (B, C, 1, h, w)
        """
        self.check_method(method)
        self.check_latent(latent_shape, "reference latent")
        h, w = self.token_grid(int(latent_shape[-2]), int(latent_shape[-1]))
        return h * w

    def check_method(self, method: str | None) -> str | None:
        method = method or self.default_method
        if self.reference_methods and method not in self.reference_methods:
            raise ValueError(
                f"{self.display_name} has no reference method {method!r}; it implements {list(self.reference_methods)}"
            )
        return method

    def check_latent(self, shape: Sequence[int], what: str) -> None:
        if len(shape) != self.latent_ndim or int(shape[1]) != self.latent_channels or (
                self.latent_ndim == 5 and int(shape[2]) != 1):
            want = "(B, %d, 1, h, w)" % self.latent_channels if self.latent_ndim == 5 else (
                "(B, %d, h, w)" % self.latent_channels)
            raise ValueError(
                f"{self.display_name} needs every {what} shaped {want}, got {tuple(int(s) for s in shape)}; encode "
                f"each image on its own with this model's VAE ({self.reference_sources})"
            )

    def token_layout(self, num_txt: int, latent_hw: tuple[int, int],
                     reference_latent_hws: Sequence[tuple[int, int]]) -> TokenLayout:
        """The joint layout of one call from the text length and latent sizes (latent pixels)."""
        return TokenLayout(int(num_txt), self.token_grid(*latent_hw),
                           tuple(self.token_grid(h, w) for h, w in reference_latent_hws), self.order)

    def is_joint_call(self, seq_len: int, layout: TokenLayout) -> bool:
        """Whether an attention call of ``seq_len`` tokens is a joint call of ``layout``; raise when it is neither
        joint nor a known single-stream (refiner) call, which means another patch changed the token sequence."""
        if seq_len == layout.total:
            return True
        if self.refiner_calls and seq_len in (layout.num_txt, layout.num_img, layout.num_ref):
            return False
        refs = list(layout.reference_lengths)
        raise RuntimeError(
            f"an attention call of {self.display_name} sees {seq_len} tokens, but text {layout.num_txt} + image "
            f"{layout.num_img} + references {refs} = {layout.total}; another patch changed the token sequence (e.g. "
            "a post_input patch or an extra-token adapter), so the references cannot be located. Bind subjects "
            "before/without that patch"
        )


FLUX_LORA_LEAVES = ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "linear1", "linear2")

FLUX = ModelFamily(
    name="flux",
    display_name="FLUX.1 (dev/schnell, Kontext, UNO, MultiCrafter)",
    host_classes=("Flux",),
    patch=2,
    latent_channels=16,
    latent_ndim=4,
    vae_downscale=8,
    order=TokenOrder.TXT_IMG_REFS,
    reference_methods=("offset", "index", "uxo"),
    default_method="offset",
    reference_sources="ReferenceLatent (Kontext), FluxKontextMultiReferenceLatentMethod, MultiCrafter References",
    double_blocks="double_blocks",
    time_shift=TimeShift(256, 0.5, 4096, 1.15),
    weight_format=WeightFormat(
        base_model="flux1",
        lora_prefix="diffusion_model.",
        lora_leaves=FLUX_LORA_LEAVES,
        lora_target=re.compile(r"^(double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)|single_blocks\.\d+\.linear[12])$"),
        moe_target=re.compile(r"^double_blocks\.\d+\.(img|txt)_mlp$"),
    ),
)

QWEN_IMAGE = ModelFamily(
    name="qwen_image",
    display_name="Qwen-Image (Edit, Edit-2509)",
    host_classes=("QwenImageTransformer2DModel",),
    patch=2,
    latent_channels=16,
    latent_ndim=5,
    vae_downscale=8,
    order=TokenOrder.TXT_IMG_REFS,
    reference_methods=("index", "offset"),
    default_method="index",
    reference_sources="TextEncodeQwenImageEditPlus (image1..3), ReferenceLatent",
    double_blocks="transformer_blocks",
)

OMNIGEN2 = ModelFamily(
    name="omnigen2",
    display_name="OmniGen2",
    host_classes=("OmniGen2Transformer2DModel",),
    patch=2,
    latent_channels=16,
    latent_ndim=4,
    vae_downscale=8,
    order=TokenOrder.TXT_REFS_IMG,
    reference_methods=(),  # the host ignores reference_latents_method
    default_method=None,
    reference_sources="ReferenceLatent (OmniGen2's reference images)",
    max_references=5,  # image_index_embedding is (5, hidden)
    refiner_calls=True,
)

FAMILIES: tuple[ModelFamily, ...] = (FLUX, QWEN_IMAGE, OMNIGEN2)


def family_for_class(class_name: str) -> ModelFamily | None:
    """The family whose host class is ``class_name`` (a ComfyUI diffusion-model class name), or None."""
    return next((f for f in FAMILIES if class_name in f.host_classes), None)
