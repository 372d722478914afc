"""MultiCrafter on FLUX: references (UnoPE), layout-guided reference attention, attention maps.

The Flux-specific math lives in ``attention/unope.py`` and ``attention/attention_maps.py``; Apply MultiCrafter
is reference binding (``nodes/binding.py`` around ``attention/binding.py``) with MultiCrafter's defaults: one
window for every subject, weight 1, image -> reference direction. The attention-map node observes the same hook.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..attention.attention_maps import (
    DIRECTIONS,
    heat_colours,
    maps_to_pixels,
    normalize_maps,
    reference_attention_maps,
)
from ..attention.binding import BindingConfig, BindingPlan, SubjectBinding
from ..attention.checks import check_image_batch, quote
from ..attention.reference_attention import ReferenceAttentionConfig
from ..attention.unope import (
    LATENT_CHANNELS,
    PATCH,
    REFERENCE_MULTIPLE_PX,
    VAE_DOWNSCALE,
    FluxReferences,
    reference_size,
    resize_reference,
)
from .binding import ReferenceBindingPatch
from .families import require_flux
from .inputs import check_inputs
from .types import CATEGORY, FLUX_REFERENCES, LAYOUT, PREFIX, SUBJECTS

# references


def encode_references(subjects, vae, long_side: int, keep_aspect: bool):
    """VAE-encode every reference image of every subject. Returns latents (1, 16, h, w) and a FluxReferences."""
    channels = getattr(vae, "latent_channels", None)
    if channels != LATENT_CHANNELS:
        raise ValueError(
            f"MultiCrafter references need FLUX's VAE ({LATENT_CHANNELS} latent channels), but this VAE has {channels} "
            "latent channels (SD1.5/SDXL VAEs have 4); connect the VAE loaded from FLUX's ae.safetensors"
        )
    if len(subjects) == 0:
        raise ValueError("no subjects connected; chain at least one Subject node into subjects")
    latents, sizes, owners = [], [], []
    for j, subject in enumerate(subjects):
        for image in subject.images:
            height, width = reference_size(int(image.shape[0]), int(image.shape[1]), long_side, keep_aspect)
            latent = vae.encode(resize_reference(image, height, width).unsqueeze(0))  # (1, 16, h, w)
            latents.append(latent)
            sizes.append((int(latent.shape[-2]), int(latent.shape[-1])))
            owners.append(j)
    refs = FluxReferences(tuple(sizes), tuple(owners), tuple(subjects.labels), tuple(subjects.priorities))
    return latents, refs


def attach_references(conditioning, latents, which: str):
    import node_helpers

    for _, options in conditioning:
        if options.get("reference_latents"):
            raise ValueError(
                f"the {which} conditioning already carries {len(options['reference_latents'])} reference latent(s) "
                "(from ReferenceLatent or another references node); connect the plain text conditioning so the "
                "reference order matches the subjects"
            )
    return node_helpers.conditioning_set_values(
        conditioning, {"reference_latents": list(latents), "reference_latents_method": "uxo"}
    )


class MultiCrafterReferences(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}MultiCrafterReferences",
            display_name="MultiCrafter References (FLUX)",
            category=f"{CATEGORY}/multicrafter",
            description=(
                "Encodes every subject's reference image(s) with FLUX's VAE and appends them to both conditionings "
                "as in-context tokens with UNO's diagonal position offsets (UnoPE, ComfyUI's 'uxo' method)."
            ),
            inputs=[
                io.Conditioning.Input("positive", tooltip="Text conditioning (after FluxGuidance) that gets the references."),
                io.Conditioning.Input(
                    "negative",
                    tooltip="Negative conditioning; it gets the same references, so cond and uncond batch together "
                    "and CFG compares like with like.",
                ),
                SUBJECTS.Input("subjects", tooltip="The subjects, in order; each reference image becomes one reference."),
                io.Vae.Input("vae", tooltip="FLUX's VAE (16 latent channels)."),
                io.Int.Input(
                    "reference_size", default=320, min=REFERENCE_MULTIPLE_PX, max=2048, step=REFERENCE_MULTIPLE_PX,
                    tooltip="Long side of each reference in pixels, a multiple of 16. MultiCrafter and UNO use 320 "
                    "for several subjects (400 tokens each); larger costs attention time quadratically.",
                ),
                io.Boolean.Input(
                    "keep_aspect", default=False,
                    tooltip="Off: references become reference_size square (as trained). On: keep each image's aspect "
                    "ratio, short side rounded to a multiple of 16.",
                ),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive"),
                io.Conditioning.Output(display_name="negative"),
                FLUX_REFERENCES.Output(display_name="references"),
            ],
        )

    @classmethod
    def execute(cls, positive, negative, subjects, vae, reference_size, keep_aspect) -> io.NodeOutput:
        check_inputs(cls, reference_size=reference_size)
        latents, refs = encode_references(subjects, vae, int(reference_size), bool(keep_aspect))
        return io.NodeOutput(
            attach_references(positive, latents, "positive"), attach_references(negative, latents, "negative"), refs
        )


# attention-map recorder (an observer of the binding hook)


class AttentionRecorder:
    """Sums per-subject reference attention maps over the attention calls it is shown."""

    def __init__(self, direction: str, include_single_blocks: bool, refs: FluxReferences) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        self.direction = direction
        self.include_single_blocks = include_single_blocks
        self.refs = refs
        self.total: torch.Tensor | None = None  # (B, S, L)
        self.count = 0
        self.image_grid: tuple[int, int] | None = None

    def __call__(self, q, k, layout, mask, is_double: bool) -> None:
        """The binding hook's observer: q, k (B, H, N, D) post-RoPE, ``mask`` the call's final additive mask."""
        if is_double or self.include_single_blocks:
            maps = reference_attention_maps(q, k, layout, self.refs.subject_index, self.refs.num_subjects,
                                            self.direction, bias=mask)
            self.add(maps, layout.image_grid)

    def add(self, maps: torch.Tensor, image_grid: tuple[int, int]) -> None:
        maps = maps.detach().float().cpu()
        if self.total is not None and self.total.shape != maps.shape:
            raise RuntimeError(
                f"attention maps changed shape during one capture ({tuple(self.total.shape)} -> {tuple(maps.shape)})"
            )
        self.total = maps if self.total is None else self.total + maps
        self.image_grid = image_grid
        self.count += 1

    def result(self) -> torch.Tensor:
        """Shapes: returns (B, S, h, w) normalised to [0, 1] per sample and subject."""
        if self.total is None or self.image_grid is None:
            raise RuntimeError(
                "no attention was recorded: the model ran without reference tokens; connect the positive output "
                "of MultiCrafter References"
            )
        maps = normalize_maps(self.total / self.count)
        return maps.view(*maps.shape[:2], *self.image_grid)


def multicrafter_plan(model, refs: FluxReferences, layout, config: ReferenceAttentionConfig) -> BindingPlan:
    """The binding plan of Apply MultiCrafter: every subject shares the node's window, weight 1."""
    owners = list(refs.subject_index)
    if owners != sorted(owners):
        raise ValueError(f"references must be grouped by subject (got subject order {owners}); connect the references "
                         "output of MultiCrafter References unchanged")
    sampling = model.get_model_object("model_sampling")
    window = dict(sigma_start=float(sampling.percent_to_sigma(config.start_percent)),
                  sigma_end=float(sampling.percent_to_sigma(config.end_percent)))
    priorities = list(refs.priorities) or [0] * refs.num_subjects
    subjects = [SubjectBinding(references=owners.count(j), priority=priorities[j], label=label, **window)
                for j, label in enumerate(refs.labels)]
    return BindingPlan(layout, subjects, BindingConfig(config.strength))


class ApplyMultiCrafter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}ApplyMultiCrafter",
            display_name="Apply MultiCrafter (FLUX)",
            category=f"{CATEGORY}/multicrafter",
            description=(
                "Prepares a FLUX model for MultiCrafter references. With a layout, image tokens outside a subject's "
                "region are kept from attending to that subject's reference tokens (beyond the paper, which needs "
                "no layout). Load the MultiCrafter weights before this node."
            ),
            inputs=[
                io.Model.Input("model", tooltip="A FLUX.1 model (with the MultiCrafter MoE-LoRA loaded)."),
                FLUX_REFERENCES.Input("references", tooltip="The references output of MultiCrafter References."),
                LAYOUT.Input("layout", optional=True,
                             tooltip="Optional: one box or mask per subject, in subject order. Without it the model "
                             "places subjects itself, as in the paper."),
                io.Float.Input(
                    "strength", default=1.0, min=0.0, max=1.0, step=0.05,
                    tooltip="How strongly tokens outside a subject's region are kept off its references: 1 = hard "
                    "block; below 1 = additive bias log(1 - strength), scaling those attention weights by "
                    "(1 - strength); 0 = off.",
                ),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where in the schedule layout masking starts (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where layout masking stops (1 = last step)."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, references, strength, start_percent, end_percent, layout=None) -> io.NodeOutput:
        check_inputs(cls, strength=strength, start_percent=start_percent, end_percent=end_percent)
        config = ReferenceAttentionConfig(float(strength), float(start_percent), float(end_percent))
        require_flux(model, "Apply MultiCrafter")
        if layout is not None:
            layout.check_subject_count(references.num_subjects)
        plan = None if layout is None else multicrafter_plan(model, references, layout, config)
        patched, _ = ReferenceBindingPatch.install(model, "Apply MultiCrafter", plan)
        return io.NodeOutput(patched)


# attention maps

def parse_percents(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"at_percent must be numbers separated by commas, e.g. '0.25, 0.5', got {quote(repr(text))}") from None
    if not values or not all(0.0 <= v < 1.0 for v in values):
        raise ValueError(f"at_percent needs at least one value in [0, 1) (0 = first step), got {quote(repr(text))}")
    return values


class MultiCrafterAttentionMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}MultiCrafterAttentionMaps",
            display_name="MultiCrafter Attention Maps (FLUX)",
            category=f"{CATEGORY}/multicrafter",
            description=(
                "Shows where each subject's references attend in the image: re-noises the latent at the chosen "
                "points of the schedule, runs the model once per point and averages each subject's reference<->image "
                "attention over the double blocks. Bleeding shows up as heat outside a subject's place."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model used for sampling (after Apply MultiCrafter)."),
                io.Conditioning.Input("positive", tooltip="The positive output of MultiCrafter References."),
                io.Latent.Input("latent", tooltip="The sampled latent (KSampler output) to probe."),
                FLUX_REFERENCES.Input("references", tooltip="The references output of MultiCrafter References."),
                io.String.Input("at_percent", default="0.25, 0.5, 0.75",
                                tooltip="Points of the schedule to probe, comma separated, each in [0, 1) "
                                "(0 = first step, pure noise). Maps are averaged over them."),
                io.Combo.Input("direction", options=list(DIRECTIONS), default=DIRECTIONS[0],
                               tooltip="reference_to_image: where each subject's reference tokens look (IDAR's map). "
                               "image_to_reference: how much each image token looks at each subject."),
                io.Boolean.Input("include_single_blocks", default=False,
                                 tooltip="Also average over the single-stream blocks (the paper uses double blocks)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the re-noising."),
                io.Image.Input("image", optional=True,
                               tooltip="Optional decoded image (same size) to draw the heatmaps over."),
            ],
            outputs=[io.Image.Output(display_name="heatmaps"), io.Mask.Output(display_name="masks")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, positive, latent, references, at_percent, direction, include_single_blocks, seed,
                image=None) -> io.NodeOutput:
        import comfy.sample
        import comfy.samplers

        check_inputs(cls, direction=direction, seed=seed)
        if image is not None:
            check_image_batch("image", image)
        percents = parse_percents(at_percent)
        require_flux(model, "MultiCrafter Attention Maps")
        recorder = AttentionRecorder(direction, bool(include_single_blocks), references)
        patched, _ = ReferenceBindingPatch.install(model, "MultiCrafter Attention Maps", None, observer=recorder)
        latent_image = comfy.sample.fix_empty_latent_channels(patched, latent["samples"])
        noise = comfy.sample.prepare_noise(latent_image, seed)
        sampling = patched.get_model_object("model_sampling")
        euler = comfy.samplers.sampler_object("euler")
        for percent in percents:
            sigmas = torch.tensor([min(sampling.percent_to_sigma(percent), float(sampling.sigma_max)), 0.0])
            comfy.sample.sample_custom(patched, noise, 1.0, euler, sigmas, positive, positive, latent_image,
                                       disable_pbar=True, seed=seed)
        maps = recorder.result()  # (B, S, h, w)
        height, width = latent_image.shape[-2] * VAE_DOWNSCALE, latent_image.shape[-1] * VAE_DOWNSCALE
        pixels = maps_to_pixels(maps, PATCH * VAE_DOWNSCALE, height, width).flatten(0, 1)  # (B*S, H, W) batch-major
        heat = heat_colours(pixels)
        if image is not None:
            if tuple(image.shape[1:3]) != (height, width) or image.shape[0] != maps.shape[0]:
                raise ValueError(
                    f"image batch is {image.shape[0]} x {image.shape[2]}x{image.shape[1]} but the latent decodes to "
                    f"{maps.shape[0]} x {width}x{height}; connect the VAE Decode output of the same latent"
                )
            base = image[..., :3].float().repeat_interleave(maps.shape[1], 0)
            heat = base * 0.45 + heat * 0.55
        return io.NodeOutput(heat, pixels, ui=ui.PreviewImage(heat, cls=cls))
