"""Layout from Boxes sends the canvas editor its pictures (web/layout_editor.js) through its UI output."""

import io

import numpy as np
from PIL import Image

from multisubject.headless import load_api_workflow
from multisubject.nodes.layout import EDITOR_UI_KEY, THUMBNAIL_SIDE


def _image(server, ref):
    return np.asarray(Image.open(io.BytesIO(server.view(ref))).convert("RGB"))


def test_thumbnails_and_background_reach_the_editor(server):
    prompt = load_api_workflow("layout_preview")
    prompt["1"]["inputs"].update(width=512, height=300)  # a big reference: shrunk, aspect kept
    pictures = server.run(prompt)["outputs"]["5"][EDITOR_UI_KEY][0]
    assert pictures["background"] is None
    first, second = (_image(server, ref) for ref in pictures["thumbnails"])
    assert first.shape == (75, THUMBNAIL_SIDE, 3) and second.shape == (256 // 2, 256 // 2, 3)
    assert np.abs(first[30, 60].astype(int) - [0xD0, 0x40, 0x40]).max() <= 2  # subject 1's red

    prompt["5"]["inputs"]["background"] = ["2", 0]  # subject 2's blue image behind the boxes
    pictures = server.run(prompt)["outputs"]["5"][EDITOR_UI_KEY][0]
    background = _image(server, pictures["background"])
    assert background.shape == (256, 256, 3) and np.abs(background[5, 5].astype(int) - [0x40, 0x60, 0xD0]).max() <= 2
