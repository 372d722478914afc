"""MultiCrafter on FLUX: references (UnoPE) and layout-guided reference attention.

The Flux-specific math lives in ``attention/unope.py``; Apply MultiCrafter is reference binding (``nodes/binding.py``
around ``attention/binding.py``) with MultiCrafter's defaults: one window for every subject, weight 1, image ->
reference direction. Its attention maps are the family-generic Subject Attention Maps (``nodes/attention_maps.py``).
"""

from __future__ import annotations

from comfy_api.latest import io

from ..attention.binding import BindingConfig, BindingPlan, SubjectBinding
from ..attention.reference_attention import ReferenceAttentionConfig
from ..attention.unope import (
    LATENT_CHANNELS,
    REFERENCE_MULTIPLE_PX,
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
