"""Hostile values handed straight to the nodes in ComfyUI's process (issue 14): checked before any work."""

import inspect
import os

import pytest
import torch

from multisubject.attention.layout import Layout


def _node(comfy, name):
    return comfy.NODE_CLASS_MAPPINGS[name]


LAYOUT = Layout.from_boxes(64, 64, [(0.1, 0.1, 0.9, 0.9)])


@pytest.mark.parametrize("background, message", [
    (torch.zeros(0, 64, 64, 3), "background is empty"),
    (torch.zeros(1, 64, 64, 2), "background has 2 channel"),
    (torch.full((1, 64, 64, 3), float("nan")), "background holds"),
])
def test_preview_layout_refuses_empty_two_channel_and_nan_backgrounds(comfy, background, message):
    with pytest.raises(ValueError, match=message):
        _node(comfy, "MS_PreviewLayout").execute(LAYOUT, background=background)


def test_preview_layout_of_a_huge_canvas_is_bounded(comfy):
    layout = Layout.from_boxes(16384, 8192, [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 0.5001, 1.0)])
    image = _node(comfy, "MS_PreviewLayout").execute(layout).result[0]
    assert image.shape == (1, 1024, 2048, 3)


@pytest.mark.parametrize("node, inputs, message", [
    ("MS_ApplyAnyMS", {"scale": float("nan"), "mode": "crop_merge", "region_source": "layout"},
     "Apply AnyMS: scale must be a finite number within [0, 5]"),
    ("MS_ApplyAnyMS", {"scale": 1.0, "mode": "everything", "region_source": "layout"}, "mode must be one of"),
    ("MS_ApplyMultiCrafter", {"strength": float("-inf"), "start_percent": 0.0, "end_percent": 1.0},
     "strength must be a finite number within [0, 1]"),
    ("MS_ApplyMultiCrafter", {"strength": 1.0, "start_percent": float("nan"), "end_percent": 1.0},
     "start_percent must be a finite number"),
    ("MS_LayoutFromBoxes", {"boxes": "0,0,1,1", "units": "inches", "width": 64, "height": 64}, "units must be one of"),
    ("MS_LayoutFromBoxes", {"boxes": "0,0,1,1", "units": "pixels", "width": 10**9, "height": 64},
     "width must be within [16, 16384]"),
])
def test_numbers_and_choices_from_the_api_are_checked_before_any_work(comfy, node, inputs, message):
    # no model is passed: the check must come first
    kwargs = {"model": None, "encoded_subjects": None, "layout": None, "references": None}
    params = inspect.signature(_node(comfy, node).execute).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in params}
    with pytest.raises(ValueError) as info:
        _node(comfy, node).execute(**kwargs, **inputs)
    assert message in str(info.value)


def test_model_files_resolve_inside_the_registered_folders_only(comfy, tmp_path):
    import folder_paths

    from multisubject.nodes.inputs import model_file

    inside, outside = tmp_path / "ipadapter", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    (inside / "sub").mkdir()
    (inside / "sub" / "a.safetensors").write_bytes(b"x")
    (outside / "b.safetensors").write_bytes(b"x")
    os.symlink(outside / "b.safetensors", inside / "b.safetensors")
    saved = folder_paths.folder_names_and_paths["ipadapter"]
    folder_paths.folder_names_and_paths["ipadapter"] = ([str(inside)], saved[1])
    try:
        assert model_file("ipadapter", "sub/a.safetensors", "IP-Adapter") == (inside / "sub" / "a.safetensors")
        for name, reason in ((str(outside / "b.safetensors"), "absolute path"), ("sub/../../elsewhere/b.safetensors",
                             "contains '..'"), ("b.safetensors", "outside the 'ipadapter' folders"),
                             ("C:\\models\\x.bin", "absolute path")):
            with pytest.raises(ValueError, match=reason) as info:
                model_file("ipadapter", name, "IP-Adapter")
            assert str(inside) in str(info.value)  # names the folder to use
        folder_paths.folder_names_and_paths["ipadapter"] = ([str(inside), str(outside)], saved[1])
        assert model_file("ipadapter", "b.safetensors", "IP-Adapter") == outside / "b.safetensors"  # both registered
        with pytest.raises(FileNotFoundError, match="not found in the 'ipadapter' folders"):
            model_file("ipadapter", "missing.safetensors", "IP-Adapter")
    finally:
        folder_paths.folder_names_and_paths["ipadapter"] = saved
