"""How the whole-model bench times its work, on a GPU and on a CPU.

On CUDA: CUDA events, steps replayed from CUDA graphs, and the ceilings of ops/bench/offload_common.py (host read, the
copy engine, the UVA copy kernel, HBM). On a CPU: the wall clock, the same steps run eagerly, and the ceilings a
CPU has (host read, memcpy for every copy path), so every stage of the bench also runs on a CPU at tiny sizes
(tests/ops/test_bench_model.py) and a GPU run cannot die on a stage nobody ran. Also the CPU expert server's job log as
per-layer figures, and host memory housekeeping between stages.
"""

from __future__ import annotations

import gc
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Span:
    """Elapsed milliseconds between start() and stop(): CUDA events on a GPU (device time), else the wall clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._a: torch.cuda.Event | float | None = None
        self._b: torch.cuda.Event | float | None = None

    def start(self) -> Span:
        if self.cuda:
            self._a = torch.cuda.Event(enable_timing=True)
            self._a.record()
        else:
            self._a = time.perf_counter()
        return self

    def stop(self) -> Span:
        if self.cuda:
            self._b = torch.cuda.Event(enable_timing=True)
            self._b.record()
        else:
            self._b = time.perf_counter()
        return self

    def ms(self) -> float:
        if self.cuda:
            assert isinstance(self._a, torch.cuda.Event) and isinstance(self._b, torch.cuda.Event)
            self._b.synchronize()
            return self._a.elapsed_time(self._b)
        assert isinstance(self._a, float) and isinstance(self._b, float)
        return (self._b - self._a) * 1e3


def time_ms(fn: Callable[[], object], device: torch.device, reps: int = 3) -> float:
    """Median of `reps` timed calls after one untimed call."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        span = Span(device).start()
        fn()
        times.append(span.stop().ms())
    return float(np.median(times))


T = TypeVar("T")


def peak_bytes(fn: Callable[[], T], device: torch.device) -> tuple[T, int | None]:
    """fn's result, and the device memory it allocates at its peak beyond what was allocated before it (None off
    CUDA): the activations a step needs, which the automatic expert-cache budget must leave free."""
    if device.type != "cuda":
        return fn(), None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    return result, torch.cuda.max_memory_allocated(device) - base


def graphed(step: Callable[[], None], device: torch.device) -> tuple[Callable[[], None], Callable[[], None]]:
    """(replay, release): `step` captured in a CUDA graph on a GPU (run twice eagerly first); itself on a CPU."""
    if device.type != "cuda":
        return step, lambda: None
    for _ in range(2):  # Triton specialisation, allocator and server threads settled outside the capture
        step()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        step()
    torch.cuda.current_stream(device).wait_stream(stream)
    holder = [graph]

    def release() -> None:
        holder.clear()

    return (lambda: holder[0].replay()), release


def job_breakdown(jobs: list[dict]) -> dict | None:
    """Per MoE layer from the CPU expert server's job log (CLOCK_MONOTONIC): the CPU job's time and the time from one
    job's end to the next job's start (the GPU's work between two CPU jobs and the hand-over), within a step
    (consecutive layers) and overall."""
    if not jobs:
        return None
    busy = [j["cpu_s"] for j in jobs]
    gaps = [b["t_start"] - a["t_end"] for a, b in itertools.pairwise(jobs) if b["layer"] > a["layer"]]
    return {
        "jobs": len(jobs),
        "cpu_job_ms": 1e3 * float(np.mean(busy)),
        "cpu_job_p90_ms": 1e3 * float(np.percentile(busy, 90)),
        "gap_ms": 1e3 * float(np.mean(gaps)) if gaps else None,
        "gap_p90_ms": 1e3 * float(np.percentile(gaps, 90)) if gaps else None,
        "cpu_experts_per_job": float(np.mean([j["cpu"] for j in jobs])),
        "copied_per_job": float(np.mean([j["copy"] for j in jobs])),
    }


def ceilings(store, layer: int, device: torch.device, host_read_numel: int = 1 << 30) -> dict:
    """Ceilings a miss's bytes meet, measured on `layer`'s slab of `store`: host read, host->device by the copy
    engine and by the UVA copy kernel, device memory (GB/s). On a CPU every copy path is a memcpy."""
    if device.type == "cuda":
        from moed.ops.bench.offload_common import ceilings as offload_ceilings

        return offload_ceilings(_OneSlab(store, layer))
    slab = store.slabs[layer]
    host = torch.ones(host_read_numel, dtype=torch.float32)
    host.sum()
    t = min(_wall(host.sum) for _ in range(3))
    host_read = host.numel() * 4 / t / 1e9
    n = min(slab.numel(), 64 << 20)
    dst = torch.empty(n, dtype=torch.uint8)
    dst.copy_(slab[:n])
    copy = n / min(_wall(lambda: dst.copy_(slab[:n])) for _ in range(3)) / 1e9
    return {
        "host_read_GBps": host_read,
        "ce_GBps": copy,
        "uva_GBps": copy,
        "hbm_GBps": copy,
        "host_read_methods_GBps": {"torch_sum": host_read},
    }


class _OneSlab:
    """offload.py's ceilings() read `store.slabs[1]` and `section_bytes_of(1)` (its slice's one MoE layer): give it
    this store's `layer`."""

    def __init__(self, store, layer: int) -> None:
        self.layout, self.slabs = store.layout, {1: store.slabs[layer]}
        self._store, self._layer = store, layer

    def section_bytes_of(self, layer: int):
        return self._store.section_bytes_of(self._layer)


def _wall(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def mem_available() -> int:
    """The kernel's MemAvailable (bytes); 0 where /proc/meminfo is missing."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def release_pinned() -> None:
    """torch keeps freed pinned blocks cached: give them back before the next store is pinned."""
    gc.collect()
    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_json(path: Path, obj: dict) -> None:
    """Written whole to a temporary name first: a run cut off mid-write leaves the previous complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    tmp.replace(path)
