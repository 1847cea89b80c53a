"""No top-level folder of the repo may shadow an installed module.

`python -m ...` and `python -c` run from the repo root put the root first on sys.path, so a top-level folder
that is a regular package (has `__init__.py`) wins over any installed module of the same name: the repo's
`kernels/` once hid Hugging Face's `kernels`, which transformers imports. The folders are namespace portions
instead (PEP 420): a namespace portion never wins over a regular package or module found anywhere on
sys.path, whatever gets installed later, and `moed.<folder>` still maps onto them through pyproject.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _top_level_names() -> list[str]:
    """Names importable from the repo root: its folders (other than hidden ones) and its .py files."""
    names = [p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))]
    names += [p.stem for p in ROOT.glob("*.py")]
    return sorted(n for n in names if n.isidentifier())


def test_no_top_level_regular_package_or_module():
    regular = [p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()]
    modules = [p.name for p in ROOT.glob("*.py")]
    assert not regular, f"top-level folders with __init__.py shadow installed modules of the same name: {regular}"
    assert not modules, f"top-level modules shadow installed modules of the same name: {modules}"


def test_installed_modules_win_over_repo_folders(tmp_path):
    # Stand-ins for installed regular packages named like every top-level folder, on PYTHONPATH (after the
    # repo root, which `-c` puts first like `-m` does): each must be the one imported.
    names = _top_level_names()
    assert {"kernels", "model", "client", "engine"} <= set(names)
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    code = (
        "import importlib.util, json\n"
        f"print(json.dumps({{n: importlib.util.find_spec(n).origin for n in {names!r}}}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(tmp_path), "PATH": ""},
    )
    assert out.returncode == 0, out.stderr
    origins = json.loads(out.stdout)
    wrong = {n: o for n, o in origins.items() if not str(o).startswith(str(tmp_path))}
    assert not wrong, f"repo folders shadow installed modules when run from the repo root: {wrong}"


def test_moed_packages_still_resolve_into_the_repo():
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    code = (
        "import importlib, json\n"
        f"print(json.dumps({{n: list(importlib.import_module(n).__path__) for n in {sorted(mapping)!r}}}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    paths = json.loads(out.stdout)
    for name, folder in mapping.items():
        assert str((ROOT / folder).resolve()) in [str(Path(p).resolve()) for p in paths[name]], (name, paths[name])
