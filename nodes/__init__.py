"""ComfyUI adapters: the only package that imports comfy / comfy_api."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from .anyms import ApplyAnyMS, EncodeSubjects, LoadIPAdapter
from .binding import BindReferences
from .layout import LayoutFromBoxes, LayoutFromMasks, LayoutToMasks, PreviewLayout
from .moe_lora import LoadMoELoRA
from .multicrafter import ApplyMultiCrafter, MultiCrafterAttentionMaps, MultiCrafterReferences
from .scoring import ScoreIdentity
from .subjects import SubjectNode

NODES: list[type[io.ComfyNode]] = [
    SubjectNode,
    LayoutFromBoxes,
    LayoutFromMasks,
    PreviewLayout,
    LayoutToMasks,
    LoadIPAdapter,
    EncodeSubjects,
    ApplyAnyMS,
    MultiCrafterReferences,
    LoadMoELoRA,
    ApplyMultiCrafter,
    MultiCrafterAttentionMaps,
    BindReferences,
    ScoreIdentity,
]


class MultisubjectExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
