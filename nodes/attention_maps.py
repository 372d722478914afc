"""Subject Attention Maps: each subject's reference<->image attention on any in-context family, with a leak figure.

An observer of the binding hook (``nodes/binding.py``): it sees every joint call's final q, k and mask (after
Bind Subjects to Layout or Apply MultiCrafter, if the model carries them) and sums per-subject maps
(``attention/attention_maps.py``). Works on every family of the registry: Flux (Kontext, UNO, MultiCrafter),
Qwen-Image(-Edit) and OmniGen2.

The node id stays ``MS_MultiCrafterAttentionMaps`` (it was the FLUX/MultiCrafter-only node): workflows saved with
it load unchanged; the old ``references`` input became optional, next to ``subjects`` and ``layout``.
"""

from __future__ import annotations

import math

import torch
from comfy_api.latest import io, ui

from ..attention.attention_maps import (
    DIRECTIONS,
    caption,
    heat_colours,
    leak_shares,
    maps_to_pixels,
    normalize_maps,
    reference_attention_maps,
)
from ..attention.binding import active_ownership
from ..attention.checks import check_image_batch, quote
from ..attention.families import ModelFamily, TokenLayout
from ..attention.layout import TokenGrid
from .binding import ReferenceBindingPatch
from .families import require_family
from .inputs import check_inputs
from .types import CATEGORY, FLUX_REFERENCES, LAYOUT, PREFIX, SUBJECTS

NODE_NAME = "Subject Attention Maps"


class SubjectMap:
    """Which subject each reference of a call belongs to, with the subjects' labels and priorities.

    From the first of: MultiCrafter references (their own map), subjects (a subject with R images owns R consecutive
    references), a layout (region k <-> reference k), nothing (every reference its own subject).
    """

    def __init__(self, references=None, subjects=None, layout=None) -> None:
        self.fixed: tuple[int, ...] | None = None
        self.per_subject: tuple[int, ...] | None = None
        if references is not None:
            self.fixed = tuple(references.subject_index)
            self.labels = list(references.labels)
            self.priorities = list(references.priorities) or [0] * len(self.labels)
        elif subjects is not None:
            if len(subjects) == 0:
                raise ValueError("subjects is connected but holds no subject; chain at least one Subject node")
            self.per_subject = tuple(int(s.num_images) for s in subjects)
            self.labels = [s.label or f"subject {j}" for j, s in enumerate(subjects)]
            self.priorities = list(subjects.priorities)
        elif layout is not None:
            self.labels = [r.label or f"region {j}" for j, r in enumerate(layout.regions)]
            self.priorities = [0] * len(self.labels)
        else:
            self.labels = []  # one subject per reference, known at the first call
            self.priorities = []
        if layout is not None and self.labels and len(layout) != len(self.labels):
            raise ValueError(f"the layout has {len(layout)} region(s) but there are {len(self.labels)} subject(s); "
                             "give one region per subject, in order")
        self.layout = layout

    def owners(self, num_references: int, sources: str) -> tuple[int, ...]:
        """Subject of each reference in sequence order (-1 = no subject)."""
        if self.fixed is not None:
            if len(self.fixed) != num_references:
                raise ValueError(f"the references input describes {len(self.fixed)} reference(s) but the model got "
                                 f"{num_references}; connect the positive and references of the same MultiCrafter "
                                 "References node")
            return self.fixed
        if self.per_subject is not None:
            if sum(self.per_subject) != num_references:
                raise ValueError(
                    f"the subjects own {sum(self.per_subject)} reference image(s) ({list(self.per_subject)} per "
                    f"subject) but the conditioning carries {num_references} reference latent(s) (added by {sources})"
                    "; give each subject exactly the images that node encoded, in the same order")
            return tuple(j for j, r in enumerate(self.per_subject) for _ in range(r))
        if self.labels:  # region k <-> reference k
            if len(self.labels) > num_references:
                raise ValueError(f"the layout has {len(self.labels)} regions but the conditioning carries "
                                 f"{num_references} reference latent(s) (added by {sources}); region k shows "
                                 "reference k, so add references or remove regions")
            return tuple(range(len(self.labels))) + (-1,) * (num_references - len(self.labels))
        self.labels = [f"reference {j}" for j in range(num_references)]
        self.priorities = [0] * num_references
        return tuple(range(num_references))

    @property
    def num_subjects(self) -> int:
        return len(self.labels)


class AttentionRecorder:
    """Sums per-subject reference attention maps over the joint calls it is shown (an observer of the hook)."""

    def __init__(self, family: ModelFamily, subjects: SubjectMap, direction: str, include_single_blocks: bool) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        self.family = family
        self.subjects = subjects
        self.direction = direction
        # Flux's single-stream blocks are joint too but the maps usually read the double blocks; families without
        # double blocks (OmniGen2) record every joint call
        self.all_blocks = include_single_blocks or family.double_blocks is None
        self.total: torch.Tensor | None = None  # (B, S, L) raw maps summed over calls
        self.count = 0
        self.image_grid: tuple[int, int] | None = None

    def __call__(self, q, k, layout: TokenLayout, mask, is_double: bool) -> None:
        """q, k (B, H, N, D) post-RoPE; ``mask`` the call's final additive mask (or None)."""
        if not (is_double or self.all_blocks):
            return
        owners = self.subjects.owners(len(layout.reference_grids), self.family.reference_sources)
        maps = reference_attention_maps(q, k, layout, owners, self.subjects.num_subjects, self.direction, bias=mask)
        maps = maps.detach().float().cpu()
        if self.total is not None and self.total.shape != maps.shape:
            raise RuntimeError(
                f"attention maps changed shape during one capture ({tuple(self.total.shape)} -> {tuple(maps.shape)})"
            )
        self.total = maps if self.total is None else self.total + maps
        self.image_grid = layout.image_grid
        self.count += 1

    def mean(self) -> torch.Tensor:
        """Shapes: returns (B, S, L) raw maps averaged over the recorded calls."""
        if self.total is None:
            raise RuntimeError(
                f"no attention was recorded: the model ran without reference tokens; connect the positive "
                f"conditioning that carries the references ({self.family.reference_sources})"
            )
        return self.total / self.count


def parse_percents(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"at_percent must be numbers separated by commas, e.g. '0.25, 0.5', got {quote(repr(text))}") from None
    if not values or not all(0.0 <= v < 1.0 for v in values):
        raise ValueError(f"at_percent needs at least one value in [0, 1) (0 = first step), got {quote(repr(text))}")
    return values


def leak_captions(maps: torch.Tensor, subjects: SubjectMap, family: ModelFamily,
                  latent_hw: tuple[int, int]) -> tuple[torch.Tensor | None, list[str]]:
    """Leak share per (sample, subject) and one caption per heatmap (batch-major).

    Shapes: maps (B, S, L); returns (B, S) or None without a layout, and B * S captions
    """
    batch, num = maps.shape[:2]
    leaks = None
    if subjects.layout is not None:
        subjects.layout.check_aspect(*latent_hw, what="latent")
        grid = TokenGrid.from_latent(*latent_hw, downscale=family.patch)
        owned = active_ownership(subjects.layout, grid, subjects.priorities, [True] * num).flatten(1)  # (S, L)
        leaks = leak_shares(maps, owned)
    texts = []
    for b in range(batch):
        for j in range(num):
            text = subjects.labels[j]
            if leaks is not None:
                leak = float(leaks[b, j])
                text += ": leak n/a (no attention)" if math.isnan(leak) else f": leak {leak * 100:.1f}%"
            texts.append(text)
    return leaks, texts


def _check_image(image, batch: int, height: int, width: int) -> None:
    if tuple(image.shape[1:3]) != (height, width) or image.shape[0] != batch:
        raise ValueError(
            f"image batch is {image.shape[0]} x {image.shape[2]}x{image.shape[1]} but the latent decodes to "
            f"{batch} x {width}x{height}; connect the VAE Decode output of the same latent"
        )


class SubjectAttentionMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}MultiCrafterAttentionMaps",  # the id of the FLUX-only node it replaces: old workflows load
            display_name=NODE_NAME,
            category=f"{CATEGORY}/references",
            description=(
                "Shows where each subject's references attend in the image, on any in-context model (FLUX.1 Kontext, "
                "FLUX.1-dev + UNO, MultiCrafter, Qwen-Image-Edit, OmniGen2): re-noises the latent at the chosen "
                "points of the schedule, runs the model once per point and averages each subject's reference<->image "
                "attention over the joint blocks. With a layout, each heatmap is captioned with the subject's leak: "
                "the share of its attention mass outside its region (0% = perfectly bound)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model used for sampling (after Bind Subjects to Layout or Apply "
                               "MultiCrafter, to see their effect)."),
                io.Conditioning.Input("positive", tooltip="The positive conditioning carrying the references "
                                      "(ReferenceLatent, TextEncodeQwenImageEditPlus, MultiCrafter References...)."),
                io.Latent.Input("latent", tooltip="The sampled latent (KSampler output) to probe."),
                io.String.Input("at_percent", default="0.25, 0.5, 0.75",
                                tooltip="Points of the schedule to probe, comma separated, each in [0, 1) "
                                "(0 = first step, pure noise). Maps are averaged over them."),
                io.Combo.Input("direction", options=list(DIRECTIONS), default="image_to_reference",
                               tooltip="image_to_reference: how much each image token looks at each subject's "
                               "references (what Bind Subjects to Layout controls; its leak is 0% at strength 1). "
                               "reference_to_image: where each subject's reference tokens look (MultiCrafter's IDAR "
                               "map; only direction 'both' binds it)."),
                io.Boolean.Input("include_single_blocks", default=False,
                                 tooltip="FLUX only: also average over the single-stream blocks (MultiCrafter's maps "
                                 "use the double blocks). Qwen-Image and OmniGen2 always use all their joint blocks."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the re-noising."),
                FLUX_REFERENCES.Input("references", optional=True,
                                      tooltip="MultiCrafter only: the references output of MultiCrafter References "
                                      "(which subject each reference is)."),
                SUBJECTS.Input("subjects", optional=True,
                               tooltip="The subjects whose images the references are, in order (a subject with R "
                               "images owns R consecutive references). Without it, region k (or reference k) is one "
                               "subject."),
                LAYOUT.Input("layout", optional=True,
                             tooltip="One region per subject: adds each subject's leak figure (share of its attention "
                             "mass outside its region) to its heatmap."),
                io.Image.Input("image", optional=True,
                               tooltip="Optional decoded image (same size) to draw the heatmaps over."),
            ],
            outputs=[io.Image.Output(display_name="heatmaps"), io.Mask.Output(display_name="masks")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, positive, latent, at_percent, direction, include_single_blocks, seed, references=None,
                subjects=None, layout=None, image=None) -> io.NodeOutput:
        check_inputs(cls, direction=direction, seed=seed)
        if image is not None:
            check_image_batch("image", image)
        heat, pixels, _ = subject_attention_maps(model, positive, latent, at_percent, direction,
                                                 include_single_blocks, seed, references, subjects, layout, image)
        return io.NodeOutput(heat, pixels, ui=ui.PreviewImage(heat, cls=cls))


def subject_attention_maps(model, positive, latent, at_percent: str, direction: str, include_single_blocks: bool,
                           seed: int, references=None, subjects=None, layout=None, image=None):
    """The node's work: (heatmaps (B*S, H, W, 3) batch-major, masks (B*S, H, W), leaks (B, S) or None)."""
    import comfy.sample
    import comfy.samplers

    percents = parse_percents(at_percent)
    family = require_family(model, NODE_NAME)
    recorder = AttentionRecorder(family, SubjectMap(references, subjects, layout), direction,
                                 bool(include_single_blocks))
    patched, _ = ReferenceBindingPatch.install(model, NODE_NAME, None, observer=recorder)
    latent_image = comfy.sample.fix_empty_latent_channels(patched, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed)
    sampling = patched.get_model_object("model_sampling")
    euler = comfy.samplers.sampler_object("euler")
    for percent in percents:
        sigmas = torch.tensor([min(sampling.percent_to_sigma(percent), float(sampling.sigma_max)), 0.0])
        comfy.sample.sample_custom(patched, noise, 1.0, euler, sigmas, positive, positive, latent_image,
                                   disable_pbar=True, seed=seed)
    raw = recorder.mean()  # (B, S, L)
    latent_hw = (int(latent_image.shape[-2]), int(latent_image.shape[-1]))
    leaks, texts = leak_captions(raw, recorder.subjects, family, latent_hw)
    maps = normalize_maps(raw).view(*raw.shape[:2], *recorder.image_grid)  # (B, S, h, w)
    height, width = latent_hw[0] * family.vae_downscale, latent_hw[1] * family.vae_downscale
    pixels = maps_to_pixels(maps, family.patch * family.vae_downscale, height, width).flatten(0, 1)
    heat = heat_colours(pixels)
    if image is not None:
        _check_image(image, maps.shape[0], height, width)
        base = image[..., :3].float().repeat_interleave(maps.shape[1], 0)
        heat = base * 0.45 + heat * 0.55
    return caption(heat, texts), pixels, leaks
