"""Values that arrive through ComfyUI's API, checked before a node does any work.

ComfyUI does not check everything a prompt posts to ``/prompt``: V3 combo values are not compared with
their options, and NaN passes every min/max check. So nodes resolve file and folder inputs through
``model_file`` / ``model_folder`` (a file inside one of ComfyUI's registered model folders, never an
absolute path, a ``..`` or a symlink leading out), and check numbers with ``check_inputs`` against
the ranges their own schema declares.
"""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths
from comfy_api.latest import io

from ..attention.checks import check_number, quote


def _where_to_put(folder: str) -> str:
    roots = folder_paths.get_folder_paths(folder)
    return (f"put it in {roots[0] if roots else 'models/' + folder} (ComfyUI's '{folder}' folder; extra_model_paths.yaml "
            "can register more folders) and choose it by its name there")


def _refuse(folder: str, what: str, name: str, reason: str) -> ValueError:
    return ValueError(f"{what} '{quote(name)}' is refused: {reason}; {_where_to_put(folder)}")


def check_name(folder: str, name: object, what: str) -> str:
    """``name`` unless it could reach outside the folder: absolute paths, drive letters and ``..`` are refused."""
    if not isinstance(name, str) or not name.strip():
        raise _refuse(folder, what, str(name), "it is not a file name")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\", "~")) or (len(name) > 1 and name[1] == ":"):
        raise _refuse(folder, what, name, "it is an absolute path, and files are only read from the model folders")
    if ".." in parts:
        raise _refuse(folder, what, name, "it contains '..', and files are only read from the model folders")
    return name


def require_inside(path: str | Path, folder: str, what: str, name: str) -> Path:
    """The real path of ``path`` if it lies inside a registered ``folder`` root (after following symlinks)."""
    real = Path(os.path.realpath(path))
    for root in folder_paths.get_folder_paths(folder):
        root_real = os.path.realpath(root)
        if os.path.commonpath([str(real), root_real]) == root_real:
            return real
    raise _refuse(folder, what, name, f"it is a link to {quote(real)}, outside the '{folder}' folders")


def model_file(folder: str, name: object, what: str) -> Path:
    """The file ``name`` inside one of ComfyUI's registered ``folder`` folders (e.g. ``loras``, ``ipadapter``)."""
    name = check_name(folder, name, what)
    for root in folder_paths.get_folder_paths(folder):
        candidate = os.path.join(root, name)
        if os.path.isfile(candidate):
            return require_inside(candidate, folder, what, name)
    raise FileNotFoundError(f"{what} '{quote(name)}' not found in the '{folder}' folders "
                            f"({', '.join(folder_paths.get_folder_paths(folder))}); {_where_to_put(folder)}")


def model_folder(folder: str, name: object, what: str, sub: str = "") -> Path:
    """The sub-folder ``name`` of a registered ``folder`` root (``<root>/<sub>/<name>``), e.g. a model folder."""
    name = check_name(folder, name, what)
    for root in folder_paths.get_folder_paths(folder):
        candidate = os.path.join(root, sub, name)
        if os.path.isdir(candidate):
            return require_inside(candidate, folder, what, name)
    raise FileNotFoundError(f"{what} '{quote(name)}' not found in the '{folder}' folders "
                            f"({', '.join(folder_paths.get_folder_paths(folder))}); {_where_to_put(folder)}")


def check_inputs(node: type[io.ComfyNode], **values: object) -> None:
    """Check each value against its input in ``node``'s schema: numbers finite and within min/max, combos listed.

    Raises one ValueError naming the node, the input, the allowed range or options, and what came.
    """
    schema = node.define_schema()
    inputs = {i.id: i for i in schema.inputs}
    for key, value in values.items():
        spec = inputs[key]
        where = f"{schema.display_name}: {key}"
        if isinstance(spec, (io.Float.Input, io.Int.Input)):
            check_number(where, value, spec.min, spec.max)
        elif isinstance(spec, io.Combo.Input) and value not in spec.options:
            raise ValueError(f"{where} must be one of {', '.join(map(str, spec.options))}; got {quote(repr(value))}")
