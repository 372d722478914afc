"""Tiny SDXL fixtures built from ComfyUI's real classes at tiny config (test-only; never shipped).

* UNet: ``comfy.supported_models.SDXL`` -> ``model_base.SDXL`` with SDXL's exact block/transformer layout
  (so its 70 cross-attention sites have the real keys) at 32 base channels, 16-wide heads, context 32;
* CLIP vision: ``comfy.clip_vision.ClipVisionModel`` from a tiny ViT json config (28 px, 2x2 patches);
* VAE: ``comfy.sd.VAE`` around a randomly initialised TAESD;
* text: random conditioning with an SDXL pooled output (SDXL text encoders cannot be built tiny here).

All weights are seeded, so the same fixture always gives the same model.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch
from comfy_api.latest import io

CONTEXT_DIM = 32
MODEL_CHANNELS = 32
CLIP_HIDDEN = 48  # penultimate hidden-state width (what plus adapters read)
CLIP_PROJECTION = 24  # image_embeds width (what global adapters read)
TINY_CLIP = io.Custom("MSTEST_TINY_CLIP")


def _init(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """comfy.ops layers are created without initialisation: give every parameter seeded, scale-aware values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif name.endswith("weight") or name.endswith("scale"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return module


def tiny_sdxl(seed: int = 0):
    """A ModelPatcher around a tiny ``model_base.SDXL`` with SDXL's 70 cross-attention sites."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
        "model_channels": MODEL_CHANNELS, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
        "context_dim": CONTEXT_DIM, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }
    model_config = comfy.supported_models.SDXL(config)
    model_config.unet_config["num_head_channels"] = 16  # SDXL's 64 would leave a tiny UNet with 0 heads
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    _init(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(
        model, comfy.model_management.get_torch_device(), comfy.model_management.unet_offload_device()
    )


_CLIP_DIR = Path(tempfile.mkdtemp(prefix="mstest-clip-vision-"))


def tiny_clip_vision(seed: int = 0, hidden: int = CLIP_HIDDEN, projection: int = CLIP_PROJECTION):
    """A real ``ClipVisionModel`` (ViT with projection) at tiny size."""
    import comfy.clip_vision

    config = {
        "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "gelu", "hidden_size": hidden, "image_size": 28,
        "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 2 * hidden,
        "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 4, "num_channels": 3,
        "num_hidden_layers": 3, "patch_size": 14, "projection_dim": projection, "torch_dtype": "float32",
    }
    path = _CLIP_DIR / f"tiny_{hidden}_{projection}.json"
    path.write_text(json.dumps(config))
    clip_vision = comfy.clip_vision.ClipVisionModel(str(path))
    _init(clip_vision.model, seed)
    return clip_vision


def tiny_vae(seed: int = 0):
    import comfy.sd
    import comfy.taesd.taesd

    torch.manual_seed(seed)
    return comfy.sd.VAE(sd=comfy.taesd.taesd.TAESD(latent_channels=4).state_dict())


def tiny_conditioning(text: str, batch: int = 1):
    """Seeded-by-text random SDXL conditioning: context (B, 77, 32) and a pooled (B, 1280) output."""
    gen = torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(text)))
    context = torch.randn(batch, 77, CONTEXT_DIM, generator=gen)
    pooled = torch.randn(batch, 1280, generator=gen) * 0.1
    return [[context, {"pooled_output": pooled}]]


class TinySDXLCheckpoint(io.ComfyNode):
    """Stands in for CheckpointLoaderSimple: MODEL, a placeholder for CLIP, VAE (same output order)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MSTest_TinySDXLCheckpoint",
            category="_for_testing/multisubject",
            inputs=[io.String.Input("ckpt_name", default="tiny"), io.Int.Input("seed", default=0)],
            outputs=[io.Model.Output(), TINY_CLIP.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls, ckpt_name, seed) -> io.NodeOutput:
        # test server only: tiny models are hundreds of small ops; OpenMP hand-offs on a shared CPU dominate them
        torch.set_num_threads(1)
        return io.NodeOutput(tiny_sdxl(seed), None, tiny_vae(seed))


class TinyTextEncode(io.ComfyNode):
    """Stands in for CLIPTextEncode on the tiny checkpoint."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MSTest_TinyTextEncode",
            category="_for_testing/multisubject",
            inputs=[io.String.Input("text", multiline=True), TINY_CLIP.Input("clip", optional=True)],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, text, clip=None) -> io.NodeOutput:
        return io.NodeOutput(tiny_conditioning(text))


class TinyCLIPVision(io.ComfyNode):
    """Stands in for CLIPVisionLoader."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MSTest_TinyCLIPVision",
            category="_for_testing/multisubject",
            inputs=[io.String.Input("clip_name", default="tiny"), io.Int.Input("hidden", default=CLIP_HIDDEN)],
            outputs=[io.ClipVision.Output()],
        )

    @classmethod
    def execute(cls, clip_name, hidden) -> io.NodeOutput:
        return io.NodeOutput(tiny_clip_vision(hidden=hidden))


class LatentChecksum(io.ComfyNode):
    """Reports a latent's exact values (ui key ``latent``: sum, abs-sum, shape, and the raw floats' hex)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MSTest_LatentChecksum",
            category="_for_testing/multisubject",
            inputs=[io.Latent.Input("samples")],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, samples) -> io.NodeOutput:
        x = samples["samples"].float()
        digest = x.numpy().tobytes().hex()
        return io.NodeOutput(ui={"latent": [{"sum": float(x.sum()), "abs": float(x.abs().sum()),
                                             "shape": list(x.shape), "hex": digest}]})


class ModelPassthrough(io.ComfyNode):
    """Returns its MODEL unchanged; a new ``tag`` makes everything downstream run again on the same object."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MSTest_ModelPassthrough",
            category="_for_testing/multisubject",
            inputs=[io.Model.Input("model"), io.String.Input("tag", default="")],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, tag) -> io.NodeOutput:
        return io.NodeOutput(model)


NODES = [TinySDXLCheckpoint, TinyTextEncode, TinyCLIPVision, LatentChecksum, ModelPassthrough]
