"""daemon/ and client/ never import torch (DESIGN.md §3), not even transitively."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_daemon_and_client_do_not_import_torch():
    modules = [f"moed.daemon.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "daemon")]) if m.name != "cli"]
    modules += [f"moed.client.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "client")])]
    assert "moed.daemon.server" in modules and "moed.client.sync_client" in modules
    code = (
        "import sys, importlib\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "heavy = ('torch', 'triton', 'transformers', 'numpy')\n"
        # moed.model.config (the settings' expert formats) is standard library only; the rest of model/ is not.
        "heavy += tuple(n for n in sys.modules if n.startswith('moed.model.') and n != 'moed.model.config')\n"
        "print(','.join(sorted(n for n in heavy if n in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"imported: {out.stdout.strip()}"
