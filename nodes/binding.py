"""Bind subjects to layout regions on in-context models: the thin ComfyUI hook around ``attention.binding``.

* an ``APPLY_MODEL`` wrapper (the one entry all three families share; OmniGen2 has no DIFFUSION_MODEL wrapper)
  reads ``ref_latents`` / ``ref_latents_method`` by name, computes the call's token layout from the family
  registry and its sigma, and leaves the call's state in the per-call ``transformer_options``;
* an ``optimized_attention_override`` finds the joint calls (the registry says which), applies the plan's
  binding (float bias into the host backend, or the split + log-sum-exp attention) and lets an observer
  (the attention-map recorder) see the final q/k/mask. Other overrides already on the model run after ours.

cond and uncond may carry different reference lists (or none): everything is computed per call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from comfy_api.latest import io

from ..attention.binding import (
    DIRECTIONS,
    BindingConfig,
    BindingPlan,
    CallBinding,
    SubjectBinding,
    choose_implementation,
    combine_with_mask,
)
from ..attention.families import ModelFamily, TokenLayout
from .families import double_block_calls, require_family
from .types import CATEGORY, LAYOUT, PREFIX, SUBJECTS

WRAPPER_KEY = "multisubject_binding"
OVERRIDE = "optimized_attention_override"

# observer(q, k, layout, mask, is_double): q, k (B, H, N, D) post-RoPE, mask additive or None
Observer = Callable[[torch.Tensor, torch.Tensor, TokenLayout, "torch.Tensor | None", bool], None]


class BindingCall:
    """State of one model call: its token layout, latent size, sigma and how many joint calls it made."""

    def __init__(self, layout: TokenLayout, latent_hw: tuple[int, int], sigma: float) -> None:
        self.layout = layout
        self.latent_hw = latent_hw
        self.sigma = sigma
        self.joint_calls = 0


class ReferenceBindingPatch:
    """APPLY_MODEL wrapper + attention override. Stored in ``model_options`` (deep-copied on every clone), so it
    returns itself from ``__deepcopy__``: the plan's cache and an observer stay shared by one node's clones."""

    def __init__(self, family: ModelFamily, plan: BindingPlan | None, double_calls: int = 0,
                 observer: Observer | None = None, previous_override=None) -> None:
        self.family = family
        self.plan = plan
        self.double_calls = double_calls
        self.observer = observer
        self.previous_override = previous_override
        self.key = f"{WRAPPER_KEY}_{id(self)}"

    def __deepcopy__(self, memo):
        return self

    @classmethod
    def install(cls, model, node_name: str, plan: BindingPlan | None, observer: Observer | None = None):
        """A clone of ``model`` carrying a new patch; returns (clone, patch)."""
        import comfy.patcher_extension

        family = require_family(model, node_name)
        m = model.clone()
        options = m.model_options.setdefault("transformer_options", {})
        patch = cls(family, plan, double_block_calls(family, m.model.diffusion_model), observer, options.get(OVERRIDE))
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, patch.key, patch.wrapper)
        options[OVERRIDE] = patch
        return m, patch

    # APPLY_MODEL wrapper: BaseModel.apply_model(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    def wrapper(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                **kwargs):
        refs = kwargs.get("ref_latents")
        if not refs or c_crossattn is None:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        family = self.family
        family.check_method(kwargs.get("ref_latents_method"))
        for ref in refs:
            family.check_latent(ref.shape, "reference latent")
        latent_hw = (int(x.shape[-2]), int(x.shape[-1]))
        layout = family.token_layout(int(c_crossattn.shape[1]), latent_hw,
                                     [(int(r.shape[-2]), int(r.shape[-1])) for r in refs])
        if self.plan is not None:
            self.plan.reference_owners(len(refs), family.reference_sources)  # a count mismatch fails before the model runs
        options = dict(transformer_options or {})
        options[self.key] = BindingCall(layout, latent_hw, float(torch.as_tensor(t).max()))
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)

    # optimized_attention_override(func, q, k, v, heads, [mask], skip_reshape=..., transformer_options=...)
    def __call__(self, func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        call = options.get(self.key)
        if call is not None:
            q, k, v, heads = args[:4]
            skip = kwargs.get("skip_reshape", False)
            if self.family.is_joint_call(int(q.shape[2] if skip else q.shape[1]), call.layout):
                block = options.get("block_type")
                is_double = block == "double" if block is not None else call.joint_calls < self.double_calls
                call.joint_calls += 1
                if len(args) > 4:  # Qwen-Image and OmniGen2 pass the mask positionally
                    kwargs["mask"] = args[4]
                    args = args[:4]
                mask = kwargs.get("mask")
                binding = None if self.plan is None else self.plan.for_call(
                    call.layout, call.latent_hw, self.family.patch, call.sigma, q.dtype, q.device,
                    self.family.reference_sources)
                if binding is not None:
                    impl = choose_implementation(self.plan.config, q.device, mask is not None)
                    # the split computes attention itself: only where nobody later in the chain must see the call
                    observed = self.observer is not None or getattr(func, "observes_attention", False)
                    if impl == "split" and not observed and self.previous_override is None:
                        return _split(binding, q, k, v, heads, skip)
                    kwargs["mask"] = combine_with_mask(binding.bias(), mask)
                if self.observer is not None:
                    func = self._observing(func, call, is_double)
        if self.previous_override is not None:
            return self.previous_override(func, *args, **kwargs)
        return func(*args, **kwargs)

    def _observing(self, func, call: BindingCall, is_double: bool):
        """``func`` that first shows the observer q/k and the final mask (after every override in the chain)."""

        def observe_then_attend(q, k, v, heads, *rest, **kw):
            q4, k4 = (_heads_first(t, heads, kw.get("skip_reshape", False)) for t in (q, k))
            with torch.no_grad():
                self.observer(q4, k4, call.layout, kw.get("mask"), is_double)
            return func(q, k, v, heads, *rest, **kw)

        observe_then_attend.observes_attention = True  # an earlier patch in the chain must keep the float-mask path
        return observe_then_attend


def _heads_first(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    """(B, N, H*D) -> (B, H, N, D); already (B, H, N, D) when the host passed ``skip_reshape``."""
    if skip_reshape:
        return t
    b, n, _ = t.shape
    return t.view(b, n, heads, -1).transpose(1, 2)


def _split(binding: CallBinding, q, k, v, heads: int, skip_reshape: bool) -> torch.Tensor:
    q4, k4, v4 = (_heads_first(t, heads, skip_reshape) for t in (q, k, v))
    out = binding.attend_split(q4, k4, v4)  # (B, H, N, D)
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


# the node


def subject_bindings(model, subjects) -> list[SubjectBinding]:
    """Subject records -> bindings, start/end percents mapped to sigmas with the model's own schedule."""
    sampling = model.get_model_object("model_sampling")
    return [SubjectBinding(references=s.num_images, weight=float(s.weight),
                           sigma_start=float(sampling.percent_to_sigma(s.start_percent)),
                           sigma_end=float(sampling.percent_to_sigma(s.end_percent)),
                           priority=int(s.priority), label=s.label or f"subject {i}")
            for i, s in enumerate(subjects)]


class BindReferences(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}BindReferences",
            display_name="Bind Subjects to Layout",
            category=f"{CATEGORY}/references",
            description=(
                "On in-context reference models (FLUX.1 Kontext, FLUX.1-dev + UNO, MultiCrafter, Qwen-Image-Edit, "
                "OmniGen2): image tokens outside subject k's region stop attending to subject k's reference tokens. "
                "Binds whatever references the conditioning carries (ReferenceLatent, TextEncodeQwenImageEditPlus, "
                "MultiCrafter References...). A subject with R reference images owns R consecutive references; "
                "without subjects, region k binds reference k."
            ),
            inputs=[
                io.Model.Input("model", tooltip="FLUX.1 (Kontext / dev + UNO / MultiCrafter), Qwen-Image(-Edit) or "
                               "OmniGen2."),
                LAYOUT.Input("layout", tooltip="One box or mask per subject (or per reference when no subjects are "
                             "connected), in order."),
                SUBJECTS.Input("subjects", optional=True,
                               tooltip="Optional: the subjects whose images the references are, in order. Their "
                               "weight (reference strength: 0 = ignored), start/end percent and priority apply."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="1 = hard binding (no attention to a subject's references outside its "
                               "region); between = additive bias log(1 - strength); 0 = off."),
                io.Combo.Input("direction", options=list(DIRECTIONS), default=DIRECTIONS[0],
                               tooltip="image_to_reference: only image tokens are kept off other subjects' "
                               "references. both: also a subject's reference tokens off the image outside its "
                               "region (what MultiCrafter's IDAR trains)."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, layout, strength, direction, subjects=None) -> io.NodeOutput:
        name = "Bind Subjects to Layout"
        require_family(model, name)
        config = BindingConfig(float(strength), direction)
        if subjects is not None:
            if len(subjects) == 0:
                raise ValueError("subjects is connected but holds no subject; chain at least one Subject node")
            layout.check_subject_count(len(subjects))
            plan = BindingPlan(layout, subject_bindings(model, subjects), config)
        else:
            if len(layout) == 0:
                raise ValueError("the layout has no regions; draw one box or mask per reference")
            plan = BindingPlan(layout, [SubjectBinding(label=r.label) for r in layout.regions], config,
                               one_reference_per_region=True)
        patched, _ = ReferenceBindingPatch.install(model, name, plan)
        return io.NodeOutput(patched)
