"""multisubject: multi-subject personalized image generation for ComfyUI.

ComfyUI loads this file and calls ``comfy_entrypoint``. Nothing else lives here on purpose: a
``NODE_CLASS_MAPPINGS`` would make ComfyUI skip the V3 path, and heavy imports here would slow down
anything that imports a submodule (tests, trainers, the CLI).
"""


async def comfy_entrypoint():
    from .nodes import MultisubjectExtension

    return MultisubjectExtension()
