"""Workflow files: validation against a server's /object_info, and UI <-> API conversion.

Each ``workflows/<name>.json`` (ComfyUI's UI format, shown in the template browser) has an API twin
``workflows/api/<name>.json`` (what headless clients POST to /prompt). The twin is the source of
truth; regenerate the UI files after editing it::

    python tests/workflow_tools.py        # starts ComfyUI headless, rewrites workflows/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
COLUMN_WIDTH, ROW_GAP = 400, 40


def api_workflows() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((WORKFLOWS / "api").glob("*.json"))}


def ui_workflows() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(WORKFLOWS.glob("*.json"))}


# loader inputs that name model files: node type -> {input: ComfyUI model folder}
MODEL_FILE_INPUTS = {
    "CheckpointLoaderSimple": {"ckpt_name": "checkpoints"},
    "CLIPLoader": {"clip_name": "text_encoders"},
    "CLIPVisionLoader": {"clip_name": "clip_vision"},
    "DualCLIPLoader": {"clip_name1": "text_encoders", "clip_name2": "text_encoders"},
    "MS_LoadMoELoRA": {"lora_name": "loras"},
    "MS_LoadIPAdapter": {"adapter_name": "ipadapter"},
    "LoraLoader": {"lora_name": "loras"},
    "LoraLoaderModelOnly": {"lora_name": "loras"},
    "UNETLoader": {"unet_name": "diffusion_models"},
    "VAELoader": {"vae_name": "vae"},
}


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


def ui_from_api(api: dict, object_info: dict) -> dict:
    """Build a UI-format workflow (litegraph JSON) with a left-to-right layout from an API workflow."""
    depth: dict[str, int] = {}

    def node_depth(node_id: str) -> int:
        if node_id not in depth:
            links = [v for v in api[node_id]["inputs"].values() if isinstance(v, list)]
            depth[node_id] = 1 + max((node_depth(str(v[0])) for v in links), default=-1)
        return depth[node_id]

    ids = sorted(api, key=int)
    for node_id in ids:
        node_depth(node_id)
    nodes, column_y = [], {}
    link_rows, link_counter = [], 0
    for order, node_id in enumerate(sorted(ids, key=lambda i: (depth[i], int(i)))):
        node = api[node_id]
        info = object_info[node["class_type"]]
        inputs, widgets = [], []
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
            else:
                inputs.append({"name": name, "type": _type_name(spec), "link": None})
        outs = [
            {"name": out_name, "type": out_type, "links": [], "slot_index": slot}
            for slot, (out_type, out_name) in enumerate(zip(info["output"], info["output_name"]))
        ]
        height = 60 + 26 * (len(inputs) + len(widgets)) + (80 if "\n" in "".join(map(str, widgets)) else 0)
        x = 40 + depth[node_id] * COLUMN_WIDTH
        y = column_y.get(depth[node_id], 40)
        column_y[depth[node_id]] = y + height + ROW_GAP
        entry = {
            "id": int(node_id), "type": node["class_type"], "pos": [x, y], "size": [340, height], "flags": {},
            "order": order, "mode": 0, "inputs": inputs, "outputs": outs,
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
        }
        if "_meta" in node and "title" in node["_meta"]:
            entry["title"] = node["_meta"]["title"]
        nodes.append(entry)
    # fill each output's link list from the links made above
    by_source: dict[tuple[int, int], list[int]] = {}
    for link_id, src, slot, *_ in link_rows:
        by_source.setdefault((src, slot), []).append(link_id)
    for entry in nodes:
        for out in entry["outputs"]:
            out["links"] = by_source.get((entry["id"], out["slot_index"]), [])
    return {
        "last_node_id": max(int(i) for i in ids), "last_link_id": len(link_rows), "nodes": nodes,
        "links": link_rows, "groups": [], "config": {}, "extra": {}, "version": 0.4,
    }


def api_from_ui(ui: dict, object_info: dict) -> dict:
    """The API prompt a UI-format workflow stands for (what the frontend would POST)."""
    links = {row[0]: row for row in ui["links"]}
    api = {}
    for entry in ui["nodes"]:
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
        (WORKFLOWS / f"{name}.json").write_text(json.dumps(ui_from_api(api, object_info), indent=1) + "\n")
        print(f"wrote workflows/{name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
