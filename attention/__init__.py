"""Pure-torch core of multisubject: no ComfyUI imports, relative imports only.

Shape legend (used in every ``Shapes:`` block of this package):
    B   batch                      S   subjects
    R   reference images of one subject
    H, W  pixel height / width     h, w  token-grid height / width
    L   image tokens (= h * w)     C   channels
    D   head dim                   T_txt text tokens
"""

from .attention_maps import normalize_maps, reference_attention_maps
from .binding import BindingConfig, BindingPlan, CallBinding, SubjectBinding
from .families import FAMILIES, FLUX, OMNIGEN2, QWEN_IMAGE, ModelFamily, TokenLayout, family_for_class
from .layout import Layout, Region, TokenGrid, composite_ownership, region_areas, region_token_masks
from .moe_lora import MoELoRA, MoELoRAConfig, MoELoRAFFN, load_balancing_loss
from .reference_attention import ReferenceAttentionConfig
from .subjects import Subject, Subjects
from .unope import FluxReferences, unope_ids
from .weights import (
    LoRAConfig,
    LoRAPair,
    MoEExperts,
    MultiCrafterWeights,
    check_against_model,
    load_multicrafter_weights,
    save_multicrafter_weights,
)

__all__ = [
    "BindingConfig",
    "BindingPlan",
    "CallBinding",
    "SubjectBinding",
    "FAMILIES",
    "FLUX",
    "OMNIGEN2",
    "QWEN_IMAGE",
    "ModelFamily",
    "family_for_class",
    "FluxReferences",
    "ReferenceAttentionConfig",
    "TokenLayout",
    "normalize_maps",
    "reference_attention_maps",
    "unope_ids",
    "LoRAConfig",
    "LoRAPair",
    "MoEExperts",
    "MoELoRA",
    "MoELoRAConfig",
    "MoELoRAFFN",
    "MultiCrafterWeights",
    "check_against_model",
    "load_balancing_loss",
    "load_multicrafter_weights",
    "save_multicrafter_weights",
    "Layout",
    "Region",
    "Subject",
    "Subjects",
    "TokenGrid",
    "composite_ownership",
    "region_areas",
    "region_token_masks",
]
