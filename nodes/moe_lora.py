"""Load MultiCrafter weights: MoE-LoRA branches on the FFNs (object patches) + the plain attention LoRA."""

from __future__ import annotations

from comfy_api.latest import io

from ..attention.moe_lora import MoELoRAFFN
from ..attention.weights import (
    LORA_PREFIX,
    check_against_model,
    load_multicrafter_weights,
    module_features,
    to_state_dict,
)
from .families import require_flux
from .inputs import check_inputs, model_file
from .types import CATEGORY, PREFIX

FOLDER = "loras"  # MultiCrafter files live next to other LoRAs (models/loras)


def apply_multicrafter_weights(model, weights, strength: float, attention_strength: float):
    """A clone of ``model`` with the MoE-LoRA wrappers (object patches) and the attention LoRA (weight patches)."""
    import comfy.sd

    diffusion_model = require_flux(model, "Load MultiCrafter MoE-LoRA")
    stacked = [p for p in weights.moe if hasattr(model.object_patches.get(f"diffusion_model.{p}"), MoELoRAFFN.MOE_NAME)]
    if stacked:
        raise ValueError(
            f"{stacked[0]} already carries a MoE-LoRA (a MultiCrafter loader ran before this one); load one "
            "MultiCrafter file per model"
        )
    check_against_model(weights, module_features(diffusion_model, weights),
                        f"this FLUX model (hidden {diffusion_model.hidden_size}, {len(diffusion_model.double_blocks)} "
                        "double blocks)")
    m = model.clone()
    for path, experts in weights.moe.items():
        name = f"diffusion_model.{path}"
        m.add_object_patch(name, MoELoRAFFN(m.get_model_object(name), experts.to_module(weights.moe_config), strength))
    if weights.lora and attention_strength != 0.0:
        tensors, _ = to_state_dict(weights)
        lora_sd = {k: v for k, v in tensors.items() if k.startswith(LORA_PREFIX)}
        m, _ = comfy.sd.load_lora_for_models(m, None, lora_sd, attention_strength, 0.0)  # the stock LoraLoader path
    return m


class LoadMoELoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import folder_paths

        return io.Schema(
            node_id=f"{PREFIX}LoadMoELoRA",
            display_name="Load MultiCrafter MoE-LoRA (FLUX)",
            category=f"{CATEGORY}/multicrafter",
            description=(
                "Loads a MultiCrafter weight file (models/loras): adds the routed MoE-LoRA experts to the FFNs and "
                "applies the file's attention LoRA. The router depends on each token, so the experts run at "
                "inference time and cannot be merged into the weights."
            ),
            inputs=[
                io.Model.Input("model", tooltip="A FLUX.1 model."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="A MultiCrafter .safetensors file in models/loras (format multisubject."
                               "multicrafter v1)."),
                io.Float.Input("strength", default=1.0, min=-2.0, max=2.0, step=0.05,
                               tooltip="Multiplier of the MoE-LoRA experts' output; 0 = FFNs unchanged."),
                io.Float.Input("attention_strength", default=1.0, min=-2.0, max=2.0, step=0.05,
                               tooltip="Strength of the file's plain attention LoRA; set 0 if you load the same file "
                               "with ComfyUI's LoraLoader instead."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, lora_name, strength, attention_strength) -> io.NodeOutput:
        check_inputs(cls, strength=strength, attention_strength=attention_strength)
        weights = load_multicrafter_weights(model_file(FOLDER, lora_name, "MultiCrafter weight"))
        return io.NodeOutput(apply_multicrafter_weights(model, weights, float(strength), float(attention_strength)))
