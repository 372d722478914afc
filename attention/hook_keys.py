"""Every name this pack writes into ComfyUI's model and UI state, next to each other with one prefix.

ComfyUI keeps wrappers, ``transformer_options`` entries, object-patch modules and UI outputs of every
pack in shared dictionaries; one prefix keeps ours apart from other packs' and from each other.
Node ids and socket types use ``MS_`` instead (``nodes/types.py``), as ComfyUI's node list shows them.
"""

PREFIX = "multisubject_"

BINDING_WRAPPER = PREFIX + "binding"  # APPLY_MODEL wrapper key of a reference-binding patch (suffixed with its id)
IDAR_BLOCK = PREFIX + "idar_block"  # transformer_options: the double-block index the trainer's block tagger sets
MOE_LORA_MODULE = PREFIX + "moe_lora"  # child module name of the MoE-LoRA branch inside a patched FFN
EDITOR_UI = PREFIX + "canvas"  # Layout from Boxes' UI output that web/layout_editor.js draws behind the boxes
