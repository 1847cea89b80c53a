"""Shared fixtures. Without CUDA, Triton kernels run in the interpreter and `gpu` tests are skipped."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# The daemon harness and worker double (tests/daemon_harness.py) serve the daemon, client and ops tests alike.
sys.path.insert(0, str(Path(__file__).resolve().parent))

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """The built-in tiny GLM-5.1-architecture checkpoint (bf16), made once per test session."""
    from moed.model.checkpoint import make_checkpoint

    return str(make_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", dtype="bf16", seed=0, device="cpu"))


@pytest.fixture(scope="session")
def tiny_fp8_checkpoint(tmp_path_factory) -> str:
    from moed.model.checkpoint import make_checkpoint

    return str(make_checkpoint(tmp_path_factory.mktemp("tiny_fp8"), "tiny", dtype="fp8", seed=0, device="cpu"))


@pytest.fixture(scope="session")
def tiny_int4_checkpoint(tmp_path_factory) -> str:
    """The tiny checkpoint with its routed experts in compressed-tensors pack-quantized int4 (W4A16_ASYM)."""
    from moed.model.checkpoint import make_checkpoint

    return str(make_checkpoint(tmp_path_factory.mktemp("tiny_int4"), "tiny", dtype="int4", seed=0, device="cpu"))
