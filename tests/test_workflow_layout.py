"""Every shipped UI workflow reads like a guide: stage groups left to right, one note, no overlaps, no backward links.

Geometry only (no ComfyUI needed), so it holds any workflow added later to workflows/. Node boxes include the
title bar LiteGraph draws above ``pos``.
"""

import pytest
from workflow_tools import NOTE_TYPES, STAGES, TITLE_HEIGHT, ui_workflows

NAMES = sorted(ui_workflows())


def _box(node):
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_HEIGHT, x + w, y + h


def _overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _inside(inner, outer):
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def _group_box(group):
    x, y, w, h = group["bounding"]
    return x, y, x + w, y + h


@pytest.mark.parametrize("name", NAMES)
def test_no_nodes_overlap(name):
    nodes = ui_workflows()[name]["nodes"]
    clashes = [(a["id"], b["id"]) for i, a in enumerate(nodes) for b in nodes[i + 1:] if _overlap(_box(a), _box(b))]
    assert clashes == []


@pytest.mark.parametrize("name", NAMES)
def test_every_link_runs_left_to_right(name):
    ui = ui_workflows()[name]
    by_id = {n["id"]: n for n in ui["nodes"]}
    backwards = [
        (src, dst) for _, src, _, dst, *_ in ui["links"] if _box(by_id[src])[2] >= _box(by_id[dst])[0]
    ]
    assert backwards == []


@pytest.mark.parametrize("name", NAMES)
def test_stage_groups_in_order_hold_every_node_and_one_note_says_what_to_swap(name):
    ui = ui_workflows()[name]
    groups = ui["groups"]
    titles = [g["title"] for g in groups]
    assert titles == [t for t in STAGES if t in titles] and {"Subjects", "Generate"} & set(titles)
    boxes = [_group_box(g) for g in groups]
    assert all(a[2] < b[0] for a, b in zip(boxes, boxes[1:]))  # side by side, left to right, apart
    notes = [n for n in ui["nodes"] if n["type"] in NOTE_TYPES]
    assert len(notes) == 1 and notes[0]["widgets_values"][0].strip()
    for node in ui["nodes"]:
        if node["type"] in NOTE_TYPES:
            assert not any(_overlap(_box(node), g) for g in boxes)
        else:
            assert sum(_inside(_box(node), g) for g in boxes) == 1, f"node {node['id']} is not in exactly one group"
