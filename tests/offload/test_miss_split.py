"""The hybrid split kernel (kernels/miss_split.py) against its plain-torch reference on fresh random inputs."""

from __future__ import annotations

import pytest
import torch

from moed.kernels.miss_split import split_misses, split_misses_reference


def _outputs(E: int, M: int, k: int, K: int, device: str) -> dict[str, torch.Tensor]:
    R = M * k
    return {
        "header": torch.full((7,), -7, dtype=torch.int32),
        "cpu_experts": torch.full((R,), -7, dtype=torch.int32),
        "ids_out": torch.full((R,), -7, dtype=torch.int32),
        "w_out": torch.full((R,), -7.0),
        "x_out": torch.full((M, K), -7.0),
        "exclude": torch.full((E,), 7, dtype=torch.int8, device=device),
        "gpu_weights": torch.full((R,), -7.0, device=device),
        "sort_scratch": torch.zeros(1 << max(0, E - 1).bit_length(), dtype=torch.int64, device=device),
    }


@pytest.mark.parametrize("column_split", [False, True])
@pytest.mark.parametrize(
    ("E", "M", "k", "cached", "seed"),
    [(16, 1, 4, 0, 0), (16, 3, 4, 5, 1), (64, 8, 8, 20, 2), (256, 2, 8, 0, 3), (24, 4, 2, 24, 4)],
)
def test_offload_split_kernel_matches_reference(E, M, k, cached, seed, column_split):
    """The kernel against its reference; with a column split, the expert after the CPU's whole ones goes last in
    the CPU's list, keeps its GPU weights, and is named to the partial copy (split_info, split_ids)."""
    g = torch.Generator().manual_seed(seed)
    K = 96
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(M)]).to(torch.int32)
    weights = torch.rand(M, k, generator=g)
    hidden = torch.randn(M, K, generator=g).bfloat16()
    e2s = torch.full((E + 1,), -1, dtype=torch.int32)
    e2s[torch.randperm(E, generator=g)[:cached]] = torch.arange(cached, dtype=torch.int32)
    e2s[E] = 0
    freq = (torch.rand(E, generator=g) * 4).round()  # ties: the id decides
    counts = torch.randint(0, M * k + 1, (M * k + 1,), generator=g, dtype=torch.int32)
    got, want = _outputs(E, M, k, K, "cpu"), _outputs(E, M, k, K, "cpu")
    if column_split:
        cols = torch.randint(0, 3, (M * k + 1,), generator=g, dtype=torch.int32) * 64  # 0: no split
        for bufs in (got, want):
            bufs.update(
                split_cols=cols,
                split_info=torch.full((2,), -7, dtype=torch.int32),
                split_ids=torch.full((M * k,), -7, dtype=torch.int32),
            )
    split_misses(ids, weights, hidden, e2s, freq, counts, layer_index=3, **got)
    split_misses_reference(ids, weights, hidden, e2s, freq, counts, layer_index=3, **want)
    n_cpu, n_miss = int(want["header"][1]), int(want["header"][2])
    split_cols = int(want["header"][6])
    if column_split:
        for name in ("split_info", "split_ids"):
            assert torch.equal(got[name], want[name]), name
        c = min(int(counts[n_miss]), n_miss)
        assert split_cols == (int(cols[n_miss]) if c < n_miss else 0) and n_cpu == c + (split_cols > 0)
        split_e = int(want["cpu_experts"][n_cpu - 1]) if split_cols else -1
        assert want["split_info"].tolist() == [split_e, split_cols]
        assert want["split_ids"].tolist() == [0 if e == split_e else 1 for e in ids.flatten().tolist()]
        on_split = ids.flatten() == split_e
        assert torch.equal(want["gpu_weights"][on_split], weights.flatten()[on_split])
    else:
        assert split_cols == 0
    misses = {e for e in ids.flatten().tolist() if e2s[e] < 0}
    assert n_miss == len(misses) and 0 <= n_cpu <= n_miss
    assert torch.equal(got["header"], want["header"]) and list(want["header"][[0, 3, 4, 5]]) == [3, M, M * k, k]
    assert torch.equal(got["cpu_experts"][:n_cpu], want["cpu_experts"][:n_cpu])
    for name in ("ids_out", "w_out", "exclude", "gpu_weights"):
        assert torch.equal(got[name], want[name]), name
    if n_cpu:
        assert torch.equal(got["x_out"], want["x_out"])
    chosen = want["cpu_experts"][:n_cpu].tolist()
    flag = {e: 1 + (split_cols > 0 and i == n_cpu - 1) for i, e in enumerate(chosen)}
    assert set(chosen) <= misses and all(want["exclude"][e] == flag.get(e, 0) for e in range(E))
    # The CPU takes the least-used misses.
    rest = misses - set(chosen)
    assert not chosen or not rest or max((float(freq[e]), e) for e in chosen) < min((float(freq[e]), e) for e in rest)


def test_offload_split_kernel_rejects_bad_buffers():
    E, M, k, K = 8, 2, 2, 32
    bufs = _outputs(E, M, k, K, "cpu")
    ids = torch.zeros(M, k, dtype=torch.int64)
    with pytest.raises(ValueError, match="topk_ids must be contiguous int32"):
        split_misses(
            ids,
            torch.rand(M, k),
            torch.randn(M, K),
            torch.zeros(E + 1, dtype=torch.int32),
            torch.zeros(E),
            torch.zeros(M * k + 1, dtype=torch.int32),
            layer_index=0,
            **bufs,
        )
    bufs["x_out"] = torch.zeros(M, K + 1)
    with pytest.raises(ValueError, match=r"x_out must be fp32 \[>= 2, 32\]"):
        split_misses(
            ids.int(),
            torch.rand(M, k),
            torch.randn(M, K),
            torch.zeros(E + 1, dtype=torch.int32),
            torch.zeros(E),
            torch.zeros(M * k + 1, dtype=torch.int32),
            layer_index=0,
            **bufs,
        )
