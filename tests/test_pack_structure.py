"""The shape of the pack: no module imports another module's private (``_x``) names, and the import graph of its
modules (every package and the top-level modules) has no cycle. A small AST walk; imports inside functions count too
(a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import multisubject

PACK = Path(multisubject.__file__).parent
PACKAGES = ("attention", "nodes", "scoring", "train")


def _modules() -> dict[str, Path]:
    """Dotted name relative to the pack -> file, for every package's modules and the top-level modules."""
    found = {f"{package}.{path.stem}": path for package in PACKAGES for path in sorted((PACK / package).glob("*.py"))}
    return found | {path.stem: path for path in sorted(PACK.glob("*.py"))}


def test_every_package_is_walked():
    packages = {p.name for p in PACK.iterdir() if (p / "__init__.py").is_file() and p.name != "tests"}
    assert packages == set(PACKAGES), f"add the new package(s) {sorted(packages - set(PACKAGES))} to PACKAGES"


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module relative to the pack, imported names, line) for every import in the file."""
    package = name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("multisubject."):
                module = node.module[len("multisubject."):]
            else:
                continue
            names = [a.name for a in node.names]
            if not node.module:  # `from . import x`: x is a module
                out += [(f"{module}.{n}".strip("."), [], node.lineno) for n in names]
            else:
                out.append((module, names, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name[len("multisubject."):], [], node.lineno) for a in node.names
                    if a.name.startswith("multisubject.")]
    return out


def test_no_module_imports_a_private_name_of_another():
    bad = [f"{path.relative_to(PACK)}:{line} imports {n} from {module}"
           for name, path in _modules().items() for module, names, line in _imports(name, path)
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def _graph(modules: dict[str, Path]) -> dict[str, list[str]]:
    return {name: sorted({m for m, _, _ in _imports(name, path) if m in modules and m != name})
            for name, path in modules.items()}


def _cycles(graph: dict[str, list[str]]) -> list[str]:
    state: dict[str, str] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [node, nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [])
    return cycles


def test_the_import_graph_has_no_cycle():
    graph = _graph(_modules())
    cycles = _cycles(graph)
    assert not cycles, "\n".join(cycles)
    assert graph["train.idar"] and "train.idar" not in graph["train.ippo_trainer"]  # the walk sees real edges
    assert "attention.families" in graph["attention.weights"] and "comfyui_locator" in graph["train.comfy_backend"]


def test_the_walk_finds_a_private_import_and_a_cycle(tmp_path):
    """The checks above can fail: the same walk on two planted modules."""
    (tmp_path / "a.py").write_text("from .b import _hidden\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import g\n")
    a, b = _imports("train.a", tmp_path / "a.py"), _imports("train.b", tmp_path / "b.py")
    assert a == [("train.b", ["_hidden"], 1)] and b == [("train.a", ["g"], 2)]
    assert _cycles(_graph({"train.a": tmp_path / "a.py", "train.b": tmp_path / "b.py"})) == ["train.a -> train.b -> train.a"]
