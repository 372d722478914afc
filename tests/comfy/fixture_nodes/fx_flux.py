"""Tiny FLUX fixtures: a real ``comfy.ldm.flux`` model at a tiny config, a 16-channel VAE, and text conditioning.

UNETLoader cannot load a tiny Flux (model detection hard-codes hidden 3072), so the model is built
in-process from ComfyUI's own classes (comfyui.md §6). The VAE is ComfyUI's TAESD with Flux's 16
latent channels (the real taef1 architecture), randomly initialised. The builders are shared by the
in-process tests and the server-side loader nodes below.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

TINY_FLUX = dict(
    image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=64,
    mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000, patch_size=2,
    qkv_bias=True, guidance_embed=True,
)
NUM_TXT = 8  # text tokens of the fixture conditioning


def build_tiny_flux(seed: int = 0, dtype: torch.dtype = torch.float32, compute_dtype: torch.dtype | None = None):
    """A ModelPatcher around a ``comfy.model_base.Flux`` with 2 double + 1 single blocks, hidden 64.

    ``dtype`` is the weight dtype (e.g. float8_e4m3fn) and ``compute_dtype`` the manual-cast dtype, as
    UNETLoader's weight_dtype options set them.
    """
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher

    config = comfy.model_detection.model_config_from_unet_config(dict(TINY_FLUX))
    config.set_inference_dtype(dtype, compute_dtype)
    model = config.get_model({}, "")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.diffusion_model.named_parameters():
            if name.endswith(".scale"):  # RMSNorm scales
                param.copy_(torch.ones(param.shape))
            else:  # comfy.ops leaves weights uninitialised
                param.copy_(torch.randn(param.shape, generator=generator) * 0.08)
    return comfy.model_patcher.ModelPatcher(
        model, comfy.model_management.get_torch_device(), comfy.model_management.unet_offload_device()
    )


def build_tiny_flux_vae(seed: int = 0):
    """``comfy.sd.VAE`` holding a TAESD with 16 latent channels (Flux's), random weights."""
    import comfy.sd
    import comfy.taesd.taesd

    generator = torch.Generator().manual_seed(seed)
    state = comfy.taesd.taesd.TAESD(latent_channels=16).state_dict()
    for name, value in state.items():  # comfy.ops convolutions are created without init
        if name in ("vae_scale", "vae_shift"):
            continue
        if value.ndim == 4:
            fan_in = value.shape[1] * value.shape[2] * value.shape[3]
            state[name] = torch.randn(value.shape, generator=generator) * (1.0 / fan_in) ** 0.5
        else:
            state[name] = torch.zeros_like(value)
    return comfy.sd.VAE(sd=state)


def tiny_flux_conditioning(seed: int = 0, batch: int = 1, guidance: float = 3.5):
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, NUM_TXT, TINY_FLUX["context_in_dim"], generator=generator)
    pooled = torch.randn(batch, TINY_FLUX["vec_in_dim"], generator=generator)
    return [[context, {"pooled_output": pooled, "guidance": guidance}]]


class TinyFluxLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MSTest_TinyFluxLoader", category="_for_testing/multisubject",
            inputs=[io.Int.Input("seed", default=0)], outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, seed) -> io.NodeOutput:
        return io.NodeOutput(build_tiny_flux(seed))


class TinyFluxVAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MSTest_TinyFluxVAELoader", category="_for_testing/multisubject",
            inputs=[io.Int.Input("seed", default=0)], outputs=[io.Vae.Output()],
        )

    @classmethod
    def execute(cls, seed) -> io.NodeOutput:
        return io.NodeOutput(build_tiny_flux_vae(seed))


class TinyFluxConditioning(io.ComfyNode):
    """Stands in for CLIPTextEncode on the tiny model: random context seeded by the text."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MSTest_TinyFluxConditioning", category="_for_testing/multisubject",
            inputs=[io.String.Input("text", default="")], outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, text) -> io.NodeOutput:
        return io.NodeOutput(tiny_flux_conditioning(sum(map(ord, text)) % 9973))


NODES = [TinyFluxLoader, TinyFluxVAELoader, TinyFluxConditioning]
