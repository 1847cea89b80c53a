"""The engine bench's summary of the hybrid service's CPU jobs: by step size, and time shared with the draft's jobs."""

from __future__ import annotations

import pytest

from moed.ops.bench.engine import _job_summary


def _job(tokens: int, cpu: int, t0: float, t1: float, rows: int = 0, misses: int = 8) -> dict:
    return {"tokens": tokens, "cpu": cpu, "rows": rows, "misses": misses, "cpu_s": t1 - t0, "t_start": t0, "t_end": t1}


def test_job_summary_by_step_size_and_overlap():
    jobs = [_job(1, 4, 0.0, 0.002, rows=4), _job(3, 2, 0.010, 0.014, rows=5), _job(3, 0, 0.020, 0.0201)]
    draft = [_job(1, 1, 0.013, 0.016)]  # overlaps the second target job for 1 ms
    s = _job_summary(jobs, expert_bytes=10**6, others=draft)
    assert s is not None and s["jobs"] == 3 and s["with_cpu_work"] == 2
    assert s["by_tokens"][1] == {"jobs": 1, "cpu_experts": 4.0, "rows": 4.0, "busy_job_ms": pytest.approx(2.0),
                                 "cpu_GBps": pytest.approx(2.0)}  # fmt: skip
    assert s["by_tokens"][3]["cpu_GBps"] == pytest.approx(0.5)  # 2 experts of 1 MB in 4 ms; the idle job not counted
    assert s["overlap_with_other_ms"] == pytest.approx(1.0)
    assert "overlap_with_other_ms" not in _job_summary(jobs, 10**6)
    assert _job_summary([], 10**6) is None
