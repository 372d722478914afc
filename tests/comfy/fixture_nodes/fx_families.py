"""Tiny in-context reference models of every family the binding supports, built from ComfyUI's own classes.

Flux comes from ``fx_flux``; Qwen-Image (``QwenImageTransformer2DModel``, 5-D Wan latents) and OmniGen2
(``OmniGen2Transformer2DModel``, refiners + ``[txt | refs | img]``) are built here the same way: the real
class at a tiny config, weights initialised (comfy.ops leaves them empty). The server-side nodes give a tiny
model of a family and a conditioning carrying random references in that family's latent shape.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from .fx_flux import NUM_TXT, TINY_FLUX, build_tiny_flux

TINY_QWEN = dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                 attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 12, 12))
TINY_OMNIGEN2 = dict(image_model="omnigen2", patch_size=2, in_channels=16, hidden_size=64, num_layers=2,
                     num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
                     axes_dim_rope=(8, 12, 12), axes_lens=(300, 512, 512), text_feat_dim=32)
CONTEXT_DIM = {"flux": TINY_FLUX["context_in_dim"], "qwen_image": 32, "omnigen2": 32}
FAMILY_NAMES = ("flux", "qwen_image", "omnigen2")


def _build(unet_config: dict, seed: int):
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher

    config = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.diffusion_model.named_parameters():
            is_norm = param.ndim == 1 and ("norm" in name) and not name.endswith("bias")
            param.copy_(torch.ones(param.shape) if is_norm else torch.randn(param.shape, generator=generator) * 0.08)
    return comfy.model_patcher.ModelPatcher(
        model, comfy.model_management.get_torch_device(), comfy.model_management.unet_offload_device()
    )


def build_tiny(family: str, seed: int = 0):
    if family == "flux":
        return build_tiny_flux(seed)
    return _build(TINY_QWEN if family == "qwen_image" else TINY_OMNIGEN2, seed)


def latent_shape(family: str, batch: int, h: int, w: int) -> tuple[int, ...]:
    return (batch, 16, 1, h, w) if family == "qwen_image" else (batch, 16, h, w)


def tiny_conditioning(family: str, seed: int = 0, batch: int = 1, ref_sizes=(), method: str | None = None,
                      num_txt: int = NUM_TXT):
    """Random text conditioning for ``family`` with one random reference latent per ``(h, w)`` in ``ref_sizes``."""
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, num_txt, CONTEXT_DIM[family], generator=generator)
    options: dict = {}
    if family == "flux":
        options.update(pooled_output=torch.randn(batch, TINY_FLUX["vec_in_dim"], generator=generator), guidance=3.5)
    if family == "omnigen2":
        options["attention_mask"] = torch.ones(batch, num_txt, dtype=torch.long)  # the forward needs num_tokens
    if ref_sizes:
        options["reference_latents"] = [torch.randn(latent_shape(family, 1, h, w), generator=generator)
                                        for h, w in ref_sizes]
    if method:
        options["reference_latents_method"] = method
    return [[context, options]]


class TinyFamilyLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MSTest_TinyFamilyLoader", category="_for_testing/multisubject",
            inputs=[io.Combo.Input("family", options=list(FAMILY_NAMES)), io.Int.Input("seed", default=0)],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, family, seed) -> io.NodeOutput:
        return io.NodeOutput(build_tiny(family, seed))


class TinyReferenceConditioning(io.ComfyNode):
    """Random text conditioning with random references (``"8x8, 4x6"`` latent sizes; empty = none)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MSTest_TinyReferenceConditioning", category="_for_testing/multisubject",
            inputs=[io.Combo.Input("family", options=list(FAMILY_NAMES)), io.Int.Input("seed", default=0),
                    io.String.Input("references", default=""), io.String.Input("method", default="")],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, family, seed, references, method) -> io.NodeOutput:
        sizes = [tuple(int(n) for n in part.split("x")) for part in references.replace(" ", "").split(",") if part]
        return io.NodeOutput(tiny_conditioning(family, seed, ref_sizes=sizes, method=method or None))


class TinyLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MSTest_TinyLatent", category="_for_testing/multisubject",
            inputs=[io.Combo.Input("family", options=list(FAMILY_NAMES)), io.Int.Input("height", default=8),
                    io.Int.Input("width", default=8), io.Int.Input("batch", default=1)],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, family, height, width, batch) -> io.NodeOutput:
        return io.NodeOutput({"samples": torch.zeros(latent_shape(family, batch, height, width))})


NODES = [TinyFamilyLoader, TinyReferenceConditioning, TinyLatent]
