"""The import graph points down the layers and has no cycle (every import, lazy ones inside functions included).

Layers, top to bottom: ops -> daemon -> engine -> attention / offload -> model / kernels -> formats / moe_configs;
client stands alone (the daemon imports its protocol). A folder imports only folders of a lower layer, never one
of its own layer or above, and no two modules import each other, directly or around a loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYER = {
    "formats": 0,
    "moe_configs": 0,
    "client": 0,
    "kernels": 1,
    "model": 1,
    "attention": 2,
    "offload": 2,
    "engine": 3,
    "daemon": 4,
    "ops": 5,
}


def _imports() -> dict[str, set[str]]:
    """moed module -> the moed modules it imports."""
    modules = {
        "moed." + ".".join(p.relative_to(ROOT).with_suffix("").parts): p
        for folder in LAYER
        for p in (ROOT / folder).rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_every_folder_is_in_a_layer():
    # Hidden folders (.venv, .git) are the machine's, not the project's.
    folders = {
        p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith((".", "_")) and any(p.rglob("*.py"))
    } - {"tests"}
    assert folders == set(LAYER), f"folders and layers differ: {sorted(folders ^ set(LAYER))}"


def test_imports_point_down_the_layers():
    against = sorted(
        f"{a} -> {b}"
        for a, bs in _imports().items()
        for b in bs
        if a.split(".")[1] != b.split(".")[1] and LAYER[b.split(".")[1]] >= LAYER[a.split(".")[1]]
    )
    assert not against, "imports against the layers:\n" + "\n".join(against)


def test_no_import_cycle():
    graph = _imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append([*path[path.index(n) :], n])
            elif n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
