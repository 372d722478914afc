"""Test-only ComfyUI node pack, loaded next to multisubject by the server tier.

Tiny-model loaders (and other fixtures that must never ship) live here, so the API workflows can run
through a real server without real weights. Each ``fx_*.py`` module defines ``NODES``; node ids use
the ``MSTest_`` prefix.
"""

import importlib
import pkgutil

from comfy_api.latest import ComfyExtension, io


def _collect() -> list[type[io.ComfyNode]]:
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("fx_"):
            found += importlib.import_module(f"{__name__}.{info.name}").NODES
    return found


class FixtureExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return _collect()


async def comfy_entrypoint():
    return FixtureExtension()
