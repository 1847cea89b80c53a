"""The CPU expert kernel (offload/cpu_experts.py, C via ctypes) against its float64 reference on fresh inputs."""

from __future__ import annotations

import pytest
import torch

from moed.model.fp8 import quantize_block_fp8
from moed.offload.cpu_experts import CpuExpertKernel, CpuKernelUnavailable, expert_forward_reference
from moed.offload.host_store import ExpertLayout


def _kernel(layout: ExpertLayout) -> CpuExpertKernel:
    try:
        return CpuExpertKernel(layout, threads=2)
    except CpuKernelUnavailable as e:  # no C compiler on this machine: the runner copies every miss instead
        pytest.skip(str(e))


def _expert(layout: ExpertLayout, g: torch.Generator) -> dict[str, torch.Tensor]:
    K, N = layout.hidden, layout.inter
    w13 = torch.randn(2 * N, K, generator=g) / K**0.5
    w2 = torch.randn(K, N, generator=g) / N**0.5
    if layout.block is None:
        return {"w13": w13.bfloat16(), "w2": w2.bfloat16()}
    bn, bk = layout.block
    q13, s13 = quantize_block_fp8(w13, bn, bk)
    q2, s2 = quantize_block_fp8(w2, bn, bk)
    return {"w13": q13, "w2": q2, "w13_scale": s13.float(), "w2_scale": s2.float()}


# (K, N, block): K = 96 and 80 are not multiples of 128 (partial k-blocks); 80 is not a multiple of 32 (scalar tail).
LAYOUTS = [(256, 128, (128, 128)), (96, 128, (128, 128)), (80, 64, (32, 32)), (64, 48, None), (80, 64, None)]


@pytest.mark.parametrize(("K", "N", "block"), LAYOUTS)
def test_offload_cpu_experts_match_reference(K, N, block):
    layout = ExpertLayout(4, K, N, N, torch.float8_e4m3fn if block else torch.bfloat16, block)
    kern = _kernel(layout)
    g = torch.Generator().manual_seed(K * 7 + N)
    experts = [_expert(layout, g) for _ in range(3)]
    xs = [torch.randn(m, K, generator=g) for m in (1, 3, 6)]  # rows1 (M <= 2) and rows2 (M >= 3) paths
    ys = kern.forward_many(experts, xs)
    for ex, x, y in zip(experts, xs, ys):
        ref = expert_forward_reference(ex, x, layout)
        assert float((y.double() - ref).norm() / ref.norm()) < 1e-5


def test_offload_cpu_experts_reject_bad_inputs():
    layout = ExpertLayout(2, 64, 32, 32, torch.bfloat16, None)
    kern = _kernel(layout)
    ex = _expert(layout, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"fp32 host activations \[M, 64\]"):
        kern.forward_many([ex], [torch.zeros(1, 64, dtype=torch.bfloat16)])
    with pytest.raises(ValueError, match=r"1\.\.256 experts"):
        kern.forward_many([ex, ex], [torch.zeros(1, 64)])


def test_offload_cpu_experts_grouped_call_matches_per_expert_call():
    """forward_grouped (the runner's call: a layer's section views, expert ids, row counts) == forward_many."""
    import numpy as np

    layout = ExpertLayout(6, 256, 128, 128, torch.float8_e4m3fn, (128, 128))
    kern = _kernel(layout)
    g = torch.Generator().manual_seed(3)
    experts = [_expert(layout, g) for _ in range(layout.num_experts)]
    sections = {name: torch.stack([e[name] for e in experts]) for name in experts[0]}
    ids = np.array([4, 1, 5])
    counts = np.array([2, 1, 3])
    x = torch.randn(int(counts.sum()), layout.hidden, generator=g)
    y = torch.empty_like(x)
    kern.forward_grouped(sections, ids, counts, x, y)
    xs = list(x.split(counts.tolist()))
    ref = kern.forward_many([experts[i] for i in ids], [t.contiguous() for t in xs])
    assert torch.equal(y, torch.cat(ref))
    with pytest.raises(ValueError, match="forward_grouped"):
        kern.forward_grouped(sections, ids, counts, x[:2], y)


def test_offload_cpu_experts_worker_sums_routes_per_token():
    """submit_grouped on the worker thread with the per-token reduction: out[m] = sum of w[r] * y[r] over m's routes
    (row order), the runner's hybrid call; the worker refuses a second job before wait()."""
    import numpy as np

    layout = ExpertLayout(6, 256, 128, 128, torch.float8_e4m3fn, (128, 128))
    kern = _kernel(layout)
    g = torch.Generator().manual_seed(5)
    experts = [_expert(layout, g) for _ in range(layout.num_experts)]
    sections = {name: torch.stack([e[name] for e in experts]) for name in experts[0]}
    ids, counts = np.array([2, 0, 5]), np.array([3, 1, 2])
    R, M = int(counts.sum()), 4
    x = torch.randn(R, layout.hidden, generator=g)
    y = torch.empty_like(x)
    tok = torch.tensor([0, 2, 3, 2, 0, 3])  # token 1 has no CPU route: its row of out is 0
    w = torch.rand(R, generator=g)
    out = torch.full((M, layout.hidden), float("nan"))
    kern.submit_grouped(sections, ids, counts, x, y, tok=tok, w=w, out=out)
    with pytest.raises(RuntimeError, match="already queued"):
        kern.submit_grouped(sections, ids, counts, x, y, tok=tok, w=w, out=out)
    assert kern.wait() > 0
    with pytest.raises(RuntimeError, match="without a submitted job"):
        kern.wait()
    ref = torch.zeros(M, layout.hidden)
    for r in range(R):
        ref[tok[r]] += w[r] * y[r]
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-6) and not out[1].any()
    rows = list(x.split(counts.tolist()))
    per_expert = kern.forward_many([experts[i] for i in ids], [t.contiguous() for t in rows])
    assert torch.equal(y, torch.cat(per_expert))
    with pytest.raises(ValueError, match="per-token sum"):
        kern.submit_grouped(sections, ids, counts, x, y, tok=tok.clamp(max=M), w=w, out=out[:3])
    kern.close()
