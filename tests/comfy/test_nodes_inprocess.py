"""The pack inside ComfyUI's own process: registration, schemas, and nodes on real inputs."""

import pytest
import torch

from multisubject.nodes import NODES

FOUNDATION = {"MS_Subject", "MS_LayoutFromBoxes", "MS_LayoutFromMasks", "MS_PreviewLayout", "MS_LayoutToMasks"}
EXPECTED = {cls.GET_SCHEMA().node_id for cls in NODES}


def test_comfyui_registers_every_node_under_one_prefix_and_category(comfy):
    ours = {k: v for k, v in comfy.NODE_CLASS_MAPPINGS.items() if k.startswith("MS_")}
    assert set(ours) == EXPECTED
    for node_id, cls in ours.items():
        schema = cls.GET_SCHEMA()
        schema.validate()
        assert schema.category.split("/")[0] == "multisubject"
        for item in schema.inputs:
            assert item.tooltip, f"{node_id}.{item.id} has no tooltip"
        custom = [t for t in (i.io_type for i in schema.inputs + schema.outputs) if t.startswith("MS_")]
        assert all(t in ("MS_SUBJECTS", "MS_LAYOUT", "MS_FLUX_REFERENCES", "MS_IPADAPTER", "MS_ENCODED_SUBJECTS")
                   for t in custom)


def test_node_list_holds_the_foundation_nodes_once():
    assert FOUNDATION <= EXPECTED and len(EXPECTED) == len(NODES)


def _node(comfy, name):
    return comfy.NODE_CLASS_MAPPINGS[name]


def _subjects(comfy, count=2, size=32):
    subject = _node(comfy, "MS_Subject")
    chain = None
    for i in range(count):
        image = torch.zeros(1, size, size, 3)
        image[..., i % 3] = 1.0
        chain = subject.execute(image, f"s{i}", 1.0, 0.0, 1.0, 0, False, subjects=chain).result[0]
    return chain


def test_subject_chain_layout_preview_and_masks_execute(comfy):
    subjects = _subjects(comfy)
    layout = _node(comfy, "MS_LayoutFromBoxes").execute(
        "0, 0, 0.5, 1\nright: 0.5, 0, 1, 1", "normalized", 128, 64, subjects=subjects
    ).result[0]
    assert layout.labels == ["s0", "right"]
    out = _node(comfy, "MS_PreviewLayout").execute(layout, subjects=subjects)
    image = out.result[0]
    assert image.shape == (1, 64, 128, 3)
    assert out.ui.as_dict()["images"][0]["type"] == "temp"
    masks = _node(comfy, "MS_LayoutToMasks").execute(layout, True).result[0]
    assert masks.shape == (2, 64, 128) and masks.sum(0).max() == 1


def test_layout_from_masks_chains_and_checks_subject_count(comfy):
    node = _node(comfy, "MS_LayoutFromMasks")
    masks = torch.zeros(2, 48, 64)
    masks[0, :, :32] = 1
    masks[1, :, 32:] = 1
    first = node.execute(masks[:1]).result[0]
    both = node.execute(masks[1:], layout=first, subjects=_subjects(comfy)).result[0]
    assert (both.width, both.height, both.labels) == (64, 48, ["s0", "s1"])
    with pytest.raises(ValueError, match=r"layout has 2 region\(s\) but 3 subject\(s\)"):
        node.execute(masks, subjects=_subjects(comfy, 3))


def test_rgba_and_grayscale_subjects_through_the_node(comfy):
    subject = _node(comfy, "MS_Subject")
    rgba = subject.execute(torch.rand(2, 16, 16, 4), "a", 1.0, 0.0, 1.0, 0, False).result[0]
    assert rgba[0].images.shape == (2, 16, 16, 3) and rgba[0].masks.shape == (2, 16, 16)
    gray = subject.execute(torch.rand(1, 16, 16, 1), "g", 1.0, 0.0, 1.0, 0, False, subjects=rgba).result[0]
    assert len(gray) == 2 and gray[1].images.shape[-1] == 3
