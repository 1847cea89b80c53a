"""The code is ruff-clean and ruff-formatted (pyproject's [tool.ruff]; ruff pinned in the dev extra so that every
machine formats alike)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=["check", "format"])
def test_ruff(args):
    out = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"ruff {' '.join(args)}:\n{out.stdout[-4000:]}{out.stderr[-2000:]}"
