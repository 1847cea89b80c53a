"""Every `module.name` the code reads exists in the module installed here.

Code that runs only on a GPU (device queries, CUDA graphs, kernels' launch paths) is never executed by the CPU
suite, so a misspelt `torch.cuda.get_device_name` there fails first on the GPU machine, after minutes of set-up.
This check reads every file's imports and resolves each attribute chain that starts at an imported module, through
modules only (an attribute of a class or an object is not checked: it may be set at run time). An access written
under a version test (`hasattr`/`getattr` in an enclosing `if`, or a `try` that catches AttributeError or
ImportError) is skipped: it is meant to be missing on some versions."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", ".git", "build", ".whl", ".peers"}
GUARD_EXCEPTIONS = {"AttributeError", "ImportError", "ModuleNotFoundError", "Exception"}


def _files() -> list[Path]:
    # the project's own files only: not a virtual environment or anything else under a hidden or build folder
    return sorted(
        p
        for p in ROOT.rglob("*.py")
        if not any(part in SKIP_DIRS or part.startswith(".") for part in p.relative_to(ROOT).parts[:-1])
    )


def _module_name(path: Path) -> str:
    """The dotted name a relative import in `path` starts from (moed.<folder>...; tests are not a package)."""
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(("moed", *rel.parts[:-1]))


def _import(name: str) -> types.ModuleType | None:
    try:
        return importlib.import_module(name)
    except Exception:  # a module that needs what this machine lacks (e.g. flashinfer) is not checked
        return None


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, AttributeError, ValueError):  # a parent that is not a package
        return False


def _aliases(tree: ast.Module, path: Path) -> dict[str, types.ModuleType]:
    """Names the file binds to modules by its imports (anywhere in the file)."""
    out: dict[str, types.ModuleType] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    mod = _import(a.name)
                    if mod is not None:
                        out[a.asname] = mod
                else:
                    root = a.name.split(".")[0]
                    mod = _import(root)
                    if mod is not None and _import(a.name) is not None:
                        out[root] = mod
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = _module_name(path).split(".")
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            parent = _import(base) if base else None
            if parent is None:
                continue
            for a in node.names:
                obj = getattr(parent, a.name, None)
                if obj is None and _is_module(f"{base}.{a.name}"):
                    obj = _import(f"{base}.{a.name}")
                if isinstance(obj, types.ModuleType):
                    out[a.asname or a.name] = obj
    return out


def _registered_later(mod: types.ModuleType) -> bool:
    """A torch.ops namespace nothing has registered an op in yet: its ops are registered by a call at run time."""
    import torch

    return isinstance(mod, torch._ops._OpNamespace) and not list(mod)


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    child, p = node, parents.get(node)
    while p is not None:
        if (
            isinstance(p, ast.If | ast.IfExp)
            and child is not p.test
            and any(isinstance(n, ast.Name) and n.id in ("hasattr", "getattr") for n in ast.walk(p.test))
        ):
            return True
        if isinstance(p, ast.Try) and child in p.body:
            for h in p.handlers:
                names = [] if h.type is None else [n.id for n in ast.walk(h.type) if isinstance(n, ast.Name)]
                if h.type is None or GUARD_EXCEPTIONS & set(names):
                    return True
        child, p = p, parents.get(p)
    return False


def _chain(node: ast.Attribute) -> tuple[str, list[str]] | None:
    attrs = []
    cur: ast.AST = node
    while isinstance(cur, ast.Attribute):
        attrs.append(cur.attr)
        cur = cur.value
    return (cur.id, attrs[::-1]) if isinstance(cur, ast.Name) else None


def _missing(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    if path.parts[len(ROOT.parts)] != "tests":
        _import(f"{_module_name(path)}.{path.stem}")  # its own registrations (torch.ops.moed.*) first
    aliases = _aliases(tree, path)
    if not aliases:
        return []
    parents = {child: p for p in ast.walk(tree) for child in ast.iter_child_nodes(p)}
    # Names also bound otherwise (assigned, parameters) are not trusted to mean the module.
    rebound = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    rebound |= {a.arg for n in ast.walk(tree) if isinstance(n, ast.arguments) for a in (*n.args, *n.kwonlyargs)}
    problems = []
    for node in ast.walk(tree):
        # only the outermost attribute of a chain: a.b.c, not a.b again
        if not isinstance(node, ast.Attribute) or isinstance(parents.get(node), ast.Attribute):
            continue
        chain = _chain(node)
        if chain is None or chain[0] not in aliases or chain[0] in rebound:
            continue
        obj: object = aliases[chain[0]]
        for i, attr in enumerate(chain[1]):
            if not isinstance(obj, types.ModuleType) or _registered_later(obj):
                break
            nxt = getattr(obj, attr, None)
            if nxt is None and not hasattr(obj, attr):
                nxt = _import(f"{obj.__name__}.{attr}")
            if nxt is None and not hasattr(obj, attr):
                if not _guarded(node, parents):
                    dotted = ".".join([chain[0], *chain[1][: i + 1]])
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: {dotted} ({obj.__name__} has no {attr})")
                break
            obj = nxt
    return problems


def test_every_module_attribute_read_exists():
    problems = [p for f in _files() for p in _missing(f)]
    assert not problems, "attributes the installed modules lack:\n" + "\n".join(problems)


def test_the_check_finds_a_misspelt_gpu_only_call(tmp_path):
    bad = ROOT / "tests" / "_misspelt_probe.py"
    bad.write_text("import torch\n\n\ndef name(i):\n    return torch.cuda.getdevice_name(i)\n")
    try:
        assert _missing(bad) == [
            "tests/_misspelt_probe.py:5: torch.cuda.getdevice_name (torch.cuda has no getdevice_name)"
        ]
    finally:
        bad.unlink()
