"""Tier-2 fixtures: ComfyUI in-process (session) and one real ComfyUI server on loopback (session)."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from workflow_tools import seed_model_placeholders

from multisubject.headless import PACK_DIR, ComfyServer, find_comfyui

FIXTURE_PACK = Path(__file__).resolve().parent / "fixture_nodes"


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """ComfyUI imported in this process on CPU, core nodes registered, this pack loaded as ComfyUI loads it.

    Returns ComfyUI's ``nodes`` module (``nodes.NODE_CLASS_MAPPINGS`` holds our nodes too).
    """
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
    import folder_paths

    base = tmp_path_factory.mktemp("comfy_base")
    for kind in ("output", "temp", "input"):
        (base / kind).mkdir()
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_temp_directory(str(base / "temp"))
    folder_paths.set_input_directory(str(base / "input"))
    # main.py imports ComfyUI's `utils` package first; without that a comfy_extras module binds the
    # name `utils` to comfy/utils.py and nodes_images.py fails to import.
    import nodes
    import utils.install_util  # noqa: F401

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    loaded = asyncio.run(nodes.load_custom_node(str(PACK_DIR)))
    assert loaded, "ComfyUI failed to load the pack in-process; see the log above"
    return nodes


@pytest.fixture(scope="session")
def server():
    """One ComfyUI server for the whole run, with this pack and the test-only fixture pack."""
    base_dir = Path(tempfile.mkdtemp(prefix="multisubject-test-comfy-"))
    srv = ComfyServer(find_comfyui(), base_dir, extra_packs={"multisubject_test_fixtures": FIXTURE_PACK})
    seed_model_placeholders(base_dir)  # shipped workflows name real model files; tests swap in tiny ones
    srv.start()
    yield srv
    srv.stop()
    if os.environ.get("MULTISUBJECT_KEEP_SERVER_DIR"):
        print(f"server dir kept: {base_dir}")
    else:
        shutil.rmtree(base_dir, ignore_errors=True)
