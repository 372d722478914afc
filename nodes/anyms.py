"""AnyMS nodes: load an IP-Adapter, encode subjects with it, and patch an SD1.5/SDXL model's cross-attention."""

from __future__ import annotations

import os

import folder_paths
import torch
from comfy_api.latest import io

from ..attention.anyms import (
    AnyMSConfig,
    AnyMSPlan,
    EncodedSubject,
    EncodedSubjects,
    Mode,
    RegionSource,
    average_reference_tokens,
)
from ..attention.ip_adapter import BASE_NAMES, BASE_SITES, IPAdapter, SiteKey, load_adapter_file
from .inputs import check_inputs, model_file
from .types import CATEGORY, ENCODED_SUBJECTS, IPADAPTER, LAYOUT, PREFIX, SUBJECTS

ADAPTER_FOLDER = "ipadapter"  # models/ipadapter, shared with ComfyUI_IPAdapter_plus
if ADAPTER_FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths[ADAPTER_FOLDER] = (
        [os.path.join(folder_paths.models_dir, ADAPTER_FOLDER)], folder_paths.supported_pt_extensions,
    )


class LoadIPAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}LoadIPAdapter",
            display_name="Load IP-Adapter (AnyMS)",
            category=f"{CATEGORY}/anyms",
            description=(
                "Loads an IP-Adapter from models/ipadapter (.safetensors or .bin): ip-adapter_sdxl, "
                "ip-adapter_sdxl_vit-h, ip-adapter-plus_sdxl_vit-h, or their SD1.5 counterparts. The variant is "
                "detected from the file's keys and shapes."
            ),
            inputs=[
                io.Combo.Input(
                    "adapter_name", options=folder_paths.get_filename_list(ADAPTER_FOLDER),
                    tooltip="IP-Adapter file in models/ipadapter. ip-adapter-plus_sdxl_vit-h (16 tokens per subject, "
                    "more identity detail) is the recommended default; it needs the ViT-H CLIP vision encoder.",
                ),
            ],
            outputs=[IPADAPTER.Output(display_name="ipadapter")],
        )

    @classmethod
    def execute(cls, adapter_name) -> io.NodeOutput:
        return io.NodeOutput(load_adapter_file(model_file(ADAPTER_FOLDER, adapter_name, "IP-Adapter")))


class EncodeSubjects(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}EncodeSubjects",
            display_name="Encode Subjects (AnyMS)",
            category=f"{CATEGORY}/anyms",
            description=(
                "Turns each subject's reference image(s) into IP-Adapter image tokens: CLIP vision features -> the "
                "adapter's projection. Several images of one subject are averaged in token space; the CFG negative "
                "uses the tokens of a zero image."
            ),
            inputs=[
                SUBJECTS.Input("subjects", tooltip="The subjects, in the same order as the layout's boxes or masks."),
                io.ClipVision.Input(
                    "clip_vision",
                    tooltip="CLIP vision encoder from ComfyUI's Load CLIP Vision (models/clip_vision). Must be the one "
                    "the adapter was trained with: ViT-H for *_vit-h and SD1.5 adapters, ViT-bigG for ip-adapter_sdxl.",
                ),
                IPADAPTER.Input("ipadapter", tooltip="The adapter from Load IP-Adapter (AnyMS)."),
            ],
            outputs=[ENCODED_SUBJECTS.Output(display_name="encoded_subjects")],
        )

    @classmethod
    def execute(cls, subjects, clip_vision, ipadapter: IPAdapter) -> io.NodeOutput:
        items = []
        uncond = None
        for subject in subjects:
            images = subject.images
            if subject.masks is not None:  # masked subjects are encoded on white, so no background is copied
                images = images * subject.masks[..., None] + (1.0 - subject.masks[..., None])
            cond = average_reference_tokens(ipadapter.project(_features(clip_vision, ipadapter, images)))
            if uncond is None:  # after the first cond: a mismatched encoder fails there with the clearer message
                uncond = ipadapter.project(_zero_image_features(clip_vision, ipadapter))[0].float()
            items.append(EncodedSubject(
                cond.cpu(), uncond.cpu(), label=subject.label, weight=subject.weight,
                start_percent=subject.start_percent, end_percent=subject.end_percent, priority=subject.priority,
            ))
        return io.NodeOutput(EncodedSubjects(ipadapter, tuple(items)))


def _features(clip_vision, adapter: IPAdapter, images: torch.Tensor) -> torch.Tensor:
    """Shapes: images (R, H, W, 3) -> (R, D) image embeds or (R, P, W) penultimate hidden states."""
    return clip_vision.encode_image(images, crop=True)[adapter.encoder_features].float()


def _zero_image_features(clip_vision, adapter: IPAdapter) -> torch.Tensor:
    """Features of the reference implementation's negative: a zero (already normalised) image; zero embeds for
    global adapters. Shapes: returns (1, D) or (1, P, W)."""
    import comfy.model_management

    if adapter.kind == "global":
        return torch.zeros(1, adapter.clip_dim)
    comfy.model_management.load_model_gpu(clip_vision.patcher)
    size = clip_vision.image_size
    pixels = torch.zeros(1, 3, size, size, device=clip_vision.load_device)
    out = clip_vision.model(pixel_values=pixels, intermediate_output=-2)
    return out[1].to(comfy.model_management.intermediate_device()).float()


class ApplyAnyMS(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}ApplyAnyMS",
            display_name="Apply AnyMS",
            category=f"{CATEGORY}/anyms",
            description=(
                "AnyMS (training-free multi-subject customization): text cross-attention stays global, and at every "
                "cross-attention layer each subject's image tokens are attended to only by the tokens of its region; "
                "overlaps go to the higher-priority subject, the background gets text only. Returns a patched copy "
                "of the model for the stock KSampler."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An SDXL (or SD1.5) model matching the adapter. It is cloned, not changed."),
                ENCODED_SUBJECTS.Input("encoded_subjects", tooltip="Subjects from Encode Subjects (AnyMS)."),
                LAYOUT.Input(
                    "layout",
                    tooltip="One box or mask per subject, in subject order; its canvas must have the aspect ratio of "
                    "the image you generate.",
                ),
                io.Float.Input(
                    "scale", default=1.0, min=0.0, max=5.0, step=0.05,
                    tooltip="Adapter scale lambda in Z = Z_text + lambda * Z_image. 1 is the paper; try 0.6-0.8 if the "
                    "subjects overpower the prompt. 0 = text only.",
                ),
                io.Combo.Input(
                    "mode", options=[m.value for m in Mode], default=Mode.CROP_MERGE.value,
                    tooltip="crop_merge: the paper (each region attends only to its subject, overlaps owned by "
                    "priority). masked_sum: the paper's Eq. 7 ablation (full attention per subject, masked, summed - "
                    "what masked IP-Adapters do). global: no regions, every subject everywhere.",
                ),
                io.Combo.Input(
                    "region_source", options=[r.value for r in RegionSource], default=RegionSource.LAYOUT.value,
                    tooltip="layout: use each region as drawn (box, or the mask's own shape). bounding_box: use the "
                    "bounding box of mask regions instead (the paper's boxes).",
                ),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, encoded_subjects: EncodedSubjects, layout, scale, mode, region_source) -> io.NodeOutput:
        check_inputs(cls, scale=scale, mode=mode, region_source=region_source)
        adapter = encoded_subjects.adapter
        check_model_fits_adapter(model, adapter)
        config = AnyMSConfig(scale=float(scale), mode=mode, region_source=region_source)
        sampling = model.get_model_object("model_sampling")
        sigma_ranges = [
            (sampling.percent_to_sigma(s.start_percent), sampling.percent_to_sigma(s.end_percent))
            for s in encoded_subjects.items
        ]
        plan = AnyMSPlan(encoded_subjects, layout, config, sigma_ranges)
        patched = model.clone()
        previous = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
        for site, key in enumerate(adapter.sites):
            patched.set_model_attn2_replace(AnyMSAttn2(plan, site, previous.get(key)), *key)
        return io.NodeOutput(patched)


class AnyMSAttn2:
    """ComfyUI ``attn2`` replace patch of one cross-attention site: text attention + AnyMS image attention.

    A replace patch already at this site (another pack's) computes the text part, so patches chain.
    """

    def __init__(self, plan: AnyMSPlan, site: int, previous=None) -> None:
        self.plan = plan
        self.site = site
        self.previous = previous

    def __deepcopy__(self, memo):
        return self  # ModelPatcher.clone() deep-copies model_options; the plan's caches are shared on purpose

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules import attention as comfy_attention  # imported late: it picks the device on import

        optimized_attention = comfy_attention.optimized_attention
        heads = extra_options["n_heads"]
        precision = extra_options.get("attn_precision")

        def attention(q_, k_, v_, heads_):
            return optimized_attention(q_, k_, v_, heads_, attn_precision=precision, transformer_options=extra_options)

        out = self.previous(q, k, v, extra_options) if self.previous is not None else attention(q, k, v, heads)
        shape = extra_options["original_shape"]  # latent (B, C, H, W)
        return self.plan.add_image_attention(
            out, q, site=self.site, heads=heads, latent_hw=(int(shape[-2]), int(shape[-1])),
            cond_or_uncond=extra_options.get("cond_or_uncond"), sigma=extra_options.get("sigmas"), attention=attention,
        )


def unet_cross_attention_sites(diffusion_model) -> dict[SiteKey, torch.nn.Module]:
    """Every attn2 of a UNet keyed as ComfyUI's replace patches are: (block, id, transformer index)."""
    sites = {}
    groups = [("input", diffusion_model.input_blocks), ("middle", [diffusion_model.middle_block]),
              ("output", diffusion_model.output_blocks)]
    for name, blocks in groups:
        for block_id, block in enumerate(blocks):
            for layer in block:
                for index, transformer in enumerate(getattr(layer, "transformer_blocks", [])):
                    if getattr(transformer, "attn2", None) is not None:
                        sites[(name, block_id, index)] = transformer.attn2
    return sites


def check_model_fits_adapter(model, adapter: IPAdapter) -> None:
    """Raise unless ``model`` is an SD UNet with exactly the adapter's cross-attention sites and widths."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    network = model.get_model_object("diffusion_model")
    model_class = type(model.model).__name__
    if not isinstance(network, UNetModel):
        raise RuntimeError(
            f"Apply AnyMS patches the cross-attention of SD1.5/SDXL UNets, but this model is {model_class} "
            f"({type(network).__name__}). Connect an SDXL checkpoint (with an SDXL IP-Adapter) or an SD1.5 one"
        )
    sites = unet_cross_attention_sites(network)
    if set(sites) != set(adapter.sites):
        family = next((BASE_NAMES[b] for b, s in BASE_SITES.items() if set(s) == set(sites)), "unknown")
        raise ValueError(
            f"{adapter.describe()} is an {adapter.base_name} adapter ({len(adapter.sites)} cross-attention sites), but "
            f"this {model_class} UNet has {len(sites)} cross-attention sites ({family} layout). Load the "
            f"{family} version of the IP-Adapter, or a {adapter.base_name} checkpoint"
        )
    for site, key in enumerate(adapter.sites):
        attn2 = sites[key]
        want = tuple(adapter.to_k_ip[site].shape)
        got = (attn2.to_k.out_features, attn2.to_k.in_features)
        if want != got:
            raise ValueError(
                f"{adapter.describe()} does not fit this {model_class}: at cross-attention site {key} the adapter's "
                f"to_k_ip maps {want[1]}-wide context to {want[0]} channels, the model's to_k maps {got[1]} to "
                f"{got[0]}. Use the adapter made for this base model"
            )


