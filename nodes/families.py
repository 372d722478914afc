"""Which model family a ComfyUI MODEL is: the lookup by diffusion-model class name (facts: attention/families.py)."""

from __future__ import annotations

from collections.abc import Sequence

from ..attention.families import FAMILIES, FLUX, ModelFamily, family_for_class


def family_of(model) -> ModelFamily | None:
    """The family of a ModelPatcher's diffusion model, or None."""
    return family_for_class(type(model.model.diffusion_model).__name__)


def require_family(model, node_name: str, allowed: Sequence[ModelFamily] = FAMILIES) -> ModelFamily:
    """The family of ``model`` if it is one of ``allowed``, else a TypeError naming what came and what to use."""
    base = model.model
    diffusion_model = getattr(base, "diffusion_model", None)
    family = family_for_class(type(diffusion_model).__name__)
    if family is FLUX and getattr(getattr(diffusion_model, "params", None), "in_channels", FLUX.latent_channels) != (
            FLUX.latent_channels):
        family = None  # FLUX Fill/Redux-style variants with other input channels
    if family in allowed:
        return family
    kind = "a FLUX.1 model" if tuple(allowed) == (FLUX,) else (
        "an in-context reference model (" + "; ".join(f.display_name for f in allowed) + ")")
    fix = ("for SDXL/SD1.5 subjects use Apply AnyMS (IP-Adapter) instead" if family is None
           else "load a matching model with Load Diffusion Model")
    raise TypeError(
        f"{node_name} needs {kind}, but got {type(base).__name__} (diffusion model {type(diffusion_model).__name__}); "
        f"{fix}"
    )


def require_flux(model, node_name: str):
    """The Flux diffusion model inside ``model``, or a TypeError naming what came instead."""
    require_family(model, node_name, (FLUX,))
    return model.model.diffusion_model


def double_block_calls(family: ModelFamily, diffusion_model) -> int:
    """How many joint attention calls per forward come from dual-stream (double) blocks."""
    return len(getattr(diffusion_model, family.double_blocks)) if family.double_blocks else 0
