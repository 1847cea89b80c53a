"""The client install: `pip install moed` brings what moed.client needs (pyzmq, msgspec) and neither torch nor triton.

The runtime check builds a new virtual environment without pip whose site-packages hold only pyzmq and msgspec
(linked from this environment, no network) and moed's own folders laid out as an install lays them out, then
imports the client and runs `moed client --help` there; `moed serve` must name the extra it lacks.
"""

from __future__ import annotations

import importlib.metadata
import re
import socket
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from moed.daemon.cli import SERVE_MODULES

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CLIENT_DISTRIBUTIONS = ("pyzmq", "msgspec")
IMPORT_NAMES = {"prometheus-client": "prometheus_client"}  # distribution -> module, where they differ


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


def test_base_dependencies_are_the_clients():
    assert sorted(_name(r) for r in PYPROJECT["project"]["dependencies"]) == sorted(CLIENT_DISTRIBUTIONS)
    try:
        installed = importlib.metadata.requires("moed") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("moed is not installed (only its source is on the path)")
    # What pip installs for a bare `pip install moed`: requirements without an extra marker.
    assert sorted(_name(r) for r in installed if "extra ==" not in r) == sorted(CLIENT_DISTRIBUTIONS)


def test_serve_modules_are_the_serve_extra():
    extra = [_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["serve"]]
    optional = ("uvloop", "httptools")  # used when present
    assert sorted(IMPORT_NAMES.get(n, n) for n in extra if n not in optional) == sorted(SERVE_MODULES)
    for name in ("dev", "gpu"):
        assert "moed[serve]" in PYPROJECT["project"]["optional-dependencies"][name]


def _client_only_env(root: Path) -> Path:
    """A venv whose only packages are the client's distributions and moed's folders; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    site = Path(purelib)
    for dist in CLIENT_DISTRIBUTIONS:
        files = importlib.metadata.distribution(dist).files or []
        for top in {f.parts[0] for f in files if not f.parts[0].endswith(".pth")}:
            src = Path(sysconfig.get_paths()["purelib"]) / top
            src = src if src.exists() else Path(sysconfig.get_paths()["platlib"]) / top
            if src.exists() and not (site / top).exists():
                (site / top).symlink_to(src)
    # moed's packages where an install puts them: moed/<folder> for each `moed.<folder>` of the package-dir map.
    (site / "moed").mkdir()
    for package, folder in PYPROJECT["tool"]["setuptools"]["package-dir"].items():
        if package.count(".") == 1:
            (site / "moed" / package.split(".")[1]).symlink_to(ROOT / folder)
    return python


def test_client_runs_without_torch_or_triton(tmp_path):
    python = _client_only_env(tmp_path / "venv")

    def run(*args: str) -> subprocess.CompletedProcess:
        # From an empty directory and isolated (-I): nothing of the repo or this environment leaks in.
        return subprocess.run(
            [str(python), "-I", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin"},
        )

    probe = run(
        "-c",
        "import importlib.util, sys; import moed.client.api, moed.client.cli\n"
        "print([m for m in ('torch', 'triton', 'numpy') if importlib.util.find_spec(m)],"
        " sorted(m for m in ('torch', 'triton') if m in sys.modules))",
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[] []"
    helped = run("-m", "moed.daemon.cli", "client", "--help")  # the `moed` console script's own entry point
    assert helped.returncode == 0, helped.stderr
    assert "--address" in helped.stdout and "MOED_ADDRESS" in helped.stdout and "(default: 256)" in helped.stdout
    served = run("-m", "moed.daemon.cli", "serve", "--model", "tiny")
    assert served.returncode == 2
    assert "needs the 'serve' extra" in served.stderr and "pip install 'moed[serve]'" in served.stderr
    assert "torch" in served.stderr and "triton" in served.stderr
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nobody = run("-m", "moed.daemon.cli", "client", "hi", "--address", f"tcp://127.0.0.1:{port}")
    assert nobody.returncode == 2
    assert f"no daemon at tcp://127.0.0.1:{port}" in nobody.stderr and "moed serve" in nobody.stderr
