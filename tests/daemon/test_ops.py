"""Ops files: the systemd unit verifies, and the dashboard and alert rules query metrics that exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moed.daemon.metrics import Metrics

yaml = pytest.importorskip("yaml")  # a dependency of transformers (dev extra)

OPS = Path(__file__).resolve().parents[2] / "ops"


def exposed_names() -> set[str]:
    names = set()
    for family in Metrics("m").registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [""])
        names |= {family.name + s for s in suffixes}
    return names


def referenced(expr: str) -> set[str]:
    return set(re.findall(r"\bmoed_[a-z0-9_]+", expr))


def balanced(expr: str) -> bool:
    depth = 0
    for ch in expr:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_unit_verifies(tmp_path):
    unit = (OPS / "systemd" / "moed.service").read_text()
    for key in (
        "Type=notify",
        "LimitMEMLOCK=infinity",
        "EnvironmentFile=",
        "TimeoutStartSec=",
        "WatchdogSec=",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ):
        assert key in unit
    # verify checks that ExecStart's binary exists: point it at this Python instead of /usr/local/bin/moed.
    assert "ExecStart=/usr/local/bin/moed serve" in unit
    (tmp_path / "moed.service").write_text(unit.replace("/usr/local/bin/moed", sys.executable))
    out = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "moed.service")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr
    # verify does fail on a bad line (so the check above can fail).
    (tmp_path / "moed.service").write_text(
        unit.replace("/usr/local/bin/moed", sys.executable).replace("LimitMEMLOCK=infinity", "LimitMEMLOCK=lots")
    )
    out = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "moed.service")], capture_output=True, text=True, timeout=60
    )
    assert "LimitMEMLOCK" in out.stdout + out.stderr or "lots" in out.stdout + out.stderr


def test_dashboard_queries_exposed_metrics():
    dash = json.loads((OPS / "grafana" / "moed.json").read_text())
    names = exposed_names()
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) > 20
    used = set().union(*(referenced(e) for e in exprs))
    assert used and used <= names, sorted(used - names)
    assert all(balanced(e) for e in exprs)
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in (
        "first token",
        "inter-token",
        "tokens / s",
        "queue",
        "kv",
        "hit ratio by layer",
        "pcie",
        "acceptance",
    ):
        assert topic in titles, topic
    assert any(p["type"] == "heatmap" for p in dash["panels"])
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_alert_rules_are_well_formed():
    rules = yaml.safe_load((OPS / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    names = exposed_names() | {"up"}
    alerts = {r["alert"] for r in rules}
    assert {
        "MoedDown",
        "MoedHighErrorRate",
        "MoedTTFTP99High",
        "MoedExpertHitRatioCollapse",
        "MoedWorkerRestarts",
    } <= alerts
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical") and r["annotations"]["summary"]
        assert referenced(r["expr"]) <= names, (r["alert"], referenced(r["expr"]) - names)
        assert balanced(r["expr"])
