"""Workflow files: validation against a server's /object_info, and UI <-> API conversion.

Each ``workflows/<name>.json`` (ComfyUI's UI format, shown in the template browser) has an API twin
``workflows/api/<name>.json`` (what headless clients POST to /prompt). The twin is the source of
truth; regenerate the UI files after editing it::

    python scripts/workflow_tools.py        # starts ComfyUI headless, rewrites workflows/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from multisubject.headless import MODEL_FILE_INPUTS

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
NOTE_TYPES = {"Note", "MarkdownNote"}  # frontend-only nodes: in the UI file, never in the API prompt


def api_workflows() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((WORKFLOWS / "api").glob("*.json"))}


def ui_workflows() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(WORKFLOWS.glob("*.json"))}


def seed_model_placeholders(base_dir: Path) -> list[Path]:
    """Empty files under ``<base_dir>/models`` for every model file a shipped workflow names.

    A test server has no real weights; with these its loader combos list the names, so the shipped workflows pass
    the server's own /prompt validation and ``validate_api``. Tests swap the loaders
    for tiny fixtures, or overwrite a placeholder with a tiny file to run a real loader node under the real name.
    """
    made = []
    for api in api_workflows().values():
        for node in api.values():
            for name, folder in MODEL_FILE_INPUTS.get(node["class_type"], {}).items():
                path = base_dir / "models" / folder / node["inputs"][name]
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(b"")
                    made.append(path)
    return made


def _inputs(info: dict) -> list[tuple[str, list, bool]]:
    """(name, [type, options], required) in the node's declared order."""
    order = info.get("input_order", {})
    out = []
    for section in ("required", "optional"):
        spec = info["input"].get(section, {})
        for name in order.get(section, list(spec)):
            out.append((name, spec[name], section == "required"))
    return out


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput")


def _widget_values(name: str, spec: list, value) -> list:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return [value, "fixed"] if options.get("control_after_generate") else [value]


def _type_name(spec: list) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def validate_api(api: dict, object_info: dict) -> list[str]:
    """Problems with an API workflow: unknown nodes, missing or unknown inputs, bad links, values out of range."""
    problems = []
    for node_id, node in api.items():
        kind = node.get("class_type")
        if kind not in object_info:
            problems.append(f"node {node_id}: unknown node type {kind!r}")
            continue
        info = object_info[kind]
        declared = {name: (spec, required) for name, spec, required in _inputs(info)}
        for name in node["inputs"]:
            if name not in declared:
                problems.append(f"node {node_id} ({kind}): unknown input {name!r}")
        for name, (spec, required) in declared.items():
            value = node["inputs"].get(name)
            if value is None:
                if required:
                    problems.append(f"node {node_id} ({kind}): required input {name!r} missing")
                continue
            if isinstance(value, list):
                source = api.get(str(value[0]))
                if source is None:
                    problems.append(f"node {node_id} ({kind}): input {name!r} links to missing node {value[0]}")
                    continue
                out_type = object_info[source["class_type"]]["output"][value[1]]
                if out_type != _type_name(spec) and "*" not in (out_type, spec[0]):
                    problems.append(f"node {node_id} ({kind}): input {name!r} wants {spec[0]}, gets {out_type}")
                continue
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            choices = spec[0] if isinstance(spec[0], list) else options.get("options")
            if choices is not None and value not in choices:
                problems.append(f"node {node_id} ({kind}): {name}={value!r} not in {choices}")
            if "min" in options and value < options["min"] or "max" in options and value > options["max"]:
                problems.append(f"node {node_id} ({kind}): {name}={value!r} outside [{options.get('min')}, {options.get('max')}]")
    return problems


# Stage layout: the UI file reads left to right like a guide. Each node belongs to a stage (its `_meta.stage` in
# the API file, else guessed from its type); a stage is a titled group, its nodes in columns by link depth.
STAGES = ("Models", "Subjects", "Layout", "Generate")
STAGE_COLOURS = {"Models": "#3f789e", "Subjects": "#8A8", "Layout": "#b58b2a", "Generate": "#a1309b"}
SUBJECT_TYPES = {"EmptyImage", "LoadImage", "MS_Subject", "ImageScale", "LoadImageMask", "SolidMask"}
# the frontend widens a node to fit its widgets; the browser tier checks no shipped node renders bigger than this
NODE_WIDTH, WIDE_NODES = 340, {"MS_LayoutFromBoxes": 480, "MS_MultiCrafterAttentionMaps": 420}
EDITOR_HEIGHT = 380  # room for the canvas box editor (web/layout_editor.js) under Layout from Boxes' widgets
COLUMN_GAP, ROW_GAP, STAGE_GAP = 60, 50, 80  # between columns, stacked nodes (title bar included), stage groups
GROUP_PAD, GROUP_HEADER, TITLE_HEIGHT = 20, 40, 30
DEFAULT_NOTE = ("Swap the coloured EmptyImage nodes for Load Image with your subjects, set each subject's label, "
                "then draw one box per subject on Layout from Boxes (drag to move, drag on empty space to add).")


def node_stage(api: dict, node_id: str) -> int:
    """Index into STAGES; never before the stage of a node feeding it, so no link runs backwards."""
    node = api[node_id]
    kind = node["class_type"]
    named = node.get("_meta", {}).get("stage")
    if named is not None:
        own = STAGES.index(named)
    elif kind in MODEL_FILE_INPUTS or kind.endswith("Loader") or kind.startswith("MS_Load"):
        own = 0
    elif kind in SUBJECT_TYPES:
        own = 1
    elif kind.startswith("MS_Layout") or kind == "MS_PreviewLayout":
        own = 2
    else:
        own = 3
    sources = [str(v[0]) for v in node["inputs"].values() if isinstance(v, list)]
    return max([own] + [node_stage(api, src) for src in sources])


def note_text(name: str) -> str:
    """The workflow's note: ``workflows/api/<name>.note.txt`` if present (say what to swap in)."""
    path = WORKFLOWS / "api" / f"{name}.note.txt"
    return path.read_text().strip() if path.is_file() else DEFAULT_NOTE


def _node_height(inputs: list, outputs: list, widgets: list, kind: str, multiline: bool) -> int:
    sockets = max(len([i for i in inputs if "widget" not in i]), len(outputs))
    height = 20 + 22 * sockets + 26 * len(widgets) + (120 if multiline else 0)
    return height + (EDITOR_HEIGHT if kind == "MS_LayoutFromBoxes" else 0)


def ui_from_api(api: dict, object_info: dict, note: str = DEFAULT_NOTE) -> dict:
    """Build a UI-format workflow (litegraph JSON) laid out in stage groups, left to right, plus one note."""
    stage = {node_id: node_stage(api, node_id) for node_id in api}
    column: dict[str, int] = {}

    def node_column(node_id: str) -> int:  # link depth inside its stage
        if node_id not in column:
            sources = [str(v[0]) for v in api[node_id]["inputs"].values() if isinstance(v, list)]
            column[node_id] = 1 + max((node_column(s) for s in sources if stage[s] == stage[node_id]), default=-1)
        return column[node_id]

    ids = sorted(api, key=int)
    nodes, link_rows, link_counter = [], [], 0
    for order, node_id in enumerate(sorted(ids, key=lambda i: (stage[i], node_column(i), int(i)))):
        node = api[node_id]
        info = object_info[node["class_type"]]
        inputs, widgets, multiline = [], [], False
        for name, spec, _ in _inputs(info):
            value = node["inputs"].get(name)
            if isinstance(value, list):
                link_counter += 1
                link_rows.append([link_counter, int(value[0]), value[1], int(node_id), len(inputs), _type_name(spec)])
                entry = {"name": name, "type": _type_name(spec), "link": link_counter}
                if _is_widget(spec):
                    entry["widget"] = {"name": name}
                inputs.append(entry)
            elif _is_widget(spec):
                widgets += _widget_values(name, spec, value if value is not None else spec[1].get("default"))
                multiline |= len(spec) > 1 and isinstance(spec[1], dict) and bool(spec[1].get("multiline"))
            else:
                inputs.append({"name": name, "type": _type_name(spec), "link": None})
        outs = [
            {"name": out_name, "type": out_type, "links": [], "slot_index": slot}
            for slot, (out_type, out_name) in enumerate(zip(info["output"], info["output_name"]))
        ]
        height = _node_height(inputs, outs, widgets, node["class_type"], multiline)
        size = [WIDE_NODES.get(node["class_type"], NODE_WIDTH), height]
        entry = {
            "id": int(node_id), "type": node["class_type"], "pos": [0, 0], "size": size, "flags": {},
            "order": order, "mode": 0, "inputs": inputs, "outputs": outs,
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
        }
        if "_meta" in node and "title" in node["_meta"]:
            entry["title"] = node["_meta"]["title"]
        nodes.append(entry)
    groups = _place_in_stages(nodes, stage, column)
    # fill each output's link list from the links made above
    by_source: dict[tuple[int, int], list[int]] = {}
    for link_id, src, slot, *_ in link_rows:
        by_source.setdefault((src, slot), []).append(link_id)
    for entry in nodes:
        for out in entry["outputs"]:
            out["links"] = by_source.get((entry["id"], out["slot_index"]), [])
    last_id = max(int(i) for i in ids) + 1
    nodes.append({
        "id": last_id, "type": "Note", "pos": [GROUP_PAD, GROUP_PAD + TITLE_HEIGHT], "size": [520, 100], "flags": {},
        "order": len(nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {}, "widgets_values": [note],
        "title": "Start here", "color": "#432", "bgcolor": "#653",
    })
    return {
        "last_node_id": last_id, "last_link_id": len(link_rows), "nodes": nodes,
        "links": link_rows, "groups": groups, "config": {}, "extra": {}, "version": 0.4,
    }


def _place_in_stages(nodes: list[dict], stage: dict[str, int], column: dict[str, int]) -> list[dict]:
    """Set every node's pos: stages left to right under the note, columns inside a stage, nodes stacked."""
    top = GROUP_PAD + TITLE_HEIGHT + 100 + STAGE_GAP  # under the note
    groups, x = [], 0
    for index, title in enumerate(STAGES):
        members = [n for n in nodes if stage[str(n["id"])] == index]
        if not members:
            continue
        left = x + GROUP_PAD
        bottom = top
        for col in sorted({column[str(n["id"])] for n in members}):
            in_column = [n for n in members if column[str(n["id"])] == col]
            y = top + GROUP_HEADER + TITLE_HEIGHT
            for n in in_column:
                n["pos"] = [left, y]
                y += n["size"][1] + TITLE_HEIGHT + ROW_GAP
            bottom = max(bottom, y - ROW_GAP)
            left += max(n["size"][0] for n in in_column) + COLUMN_GAP
        right = left - COLUMN_GAP + GROUP_PAD
        groups.append({"title": title, "bounding": [x, top, right - x, bottom + GROUP_PAD - top],
                       "color": STAGE_COLOURS[title], "font_size": 24, "flags": {}})
        x = right + STAGE_GAP
    return groups


def api_from_ui(ui: dict, object_info: dict) -> dict:
    """The API prompt a UI-format workflow stands for (what the frontend would POST)."""
    links = {row[0]: row for row in ui["links"]}
    api = {}
    for entry in ui["nodes"]:
        if entry["type"] in NOTE_TYPES:
            continue
        info = object_info[entry["type"]]
        values = list(entry.get("widgets_values", []))
        linked = {i["name"]: links[i["link"]] for i in entry.get("inputs", []) if i.get("link") is not None}
        inputs = {}
        for name, spec, _ in _inputs(info):
            if name in linked:
                row = linked[name]
                inputs[name] = [str(row[1]), row[2]]
                if _is_widget(spec):
                    del values[: len(_widget_values(name, spec, None))]
            elif _is_widget(spec):
                taken = len(_widget_values(name, spec, None))
                if len(values) < taken:
                    raise ValueError(f"node {entry['id']} ({entry['type']}): too few widgets_values for {name!r}")
                inputs[name] = values[0]
                del values[:taken]
        if values:
            raise ValueError(f"node {entry['id']} ({entry['type']}): {len(values)} widgets_values left over")
        api[str(entry["id"])] = {"class_type": entry["type"], "inputs": inputs}
    return api


def strip_meta(api: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


def main() -> int:
    import shutil
    import tempfile

    from multisubject.headless import ComfyServer, require_comfyui

    base_dir = Path(tempfile.mkdtemp(prefix="multisubject-workflows-"))
    seed_model_placeholders(base_dir)
    server = ComfyServer(require_comfyui(), base_dir).start()
    try:
        object_info = server.get("/object_info")
    finally:
        server.stop()
        shutil.rmtree(base_dir, ignore_errors=True)
    for name, api in api_workflows().items():
        problems = validate_api(api, object_info)
        if problems:
            print(f"{name}: " + "; ".join(problems), file=sys.stderr)
            return 1
        ui = ui_from_api(api, object_info, note_text(name))
        (WORKFLOWS / f"{name}.json").write_text(json.dumps(ui, indent=1) + "\n")
        print(f"wrote workflows/{name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
