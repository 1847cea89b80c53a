"""The MoE-side custom ops (`moed::act_quant_fp8`, `moed::fused_moe`) of kernels/torch_ops.py.

On the CPU: torch.library.opcheck (schema, fake vs real, autograd registration, AOT dispatch with dynamic
shapes), the CPU implementation against the torch references and the Triton kernel (interpreter), and
torch.compile(fullgraph=True) tracing the ops without a graph break. `gpu`: the CUDA op against a direct kernel
call, inside a CUDA graph, and compiled by Inductor.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from moed.formats.fp8 import quantize_block_fp8
from moed.kernels import act_quant, torch_ops
from moed.kernels import fused_moe as fm
from moed.kernels import fused_moe_reference as fmr

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton kernel itself runs (interpreted on a CPU)
SMALL_BF16 = {
    "BLOCK_SIZE_M": 16,
    "BLOCK_SIZE_N": 32,
    "BLOCK_SIZE_K": 32,
    "GROUP_SIZE_M": 1,
    "num_warps": 4,
    "num_stages": 2,
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def experts(S: int, N: int, K: int, fp8: bool, seed: int, device: str = "cpu") -> dict:
    """Weights of S slots as fused_moe's keyword arguments (FP8: block-quantised by moed.formats.fp8)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    w13 = torch.randn((S, 2 * N, K), generator=gen, device=device) / K**0.5
    w2 = torch.randn((S, K, N), generator=gen, device=device) / N**0.5
    if not fp8:
        return dict(w13=w13.bfloat16(), w2=w2.bfloat16(), w13_scale=None, w2_scale=None, block_shape=None)
    q13, s13 = zip(*(quantize_block_fp8(w, 128, 128) for w in w13))
    q2, s2 = zip(*(quantize_block_fp8(w, 128, 128) for w in w2))
    return dict(
        w13=torch.stack(q13),
        w2=torch.stack(q2),
        w13_scale=torch.stack(s13),
        w2_scale=torch.stack(s2),
        block_shape=[128, 128],
    )


def routes(M: int, k: int, table: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct expert ids per token among the ids with a slot; fp32 router weights."""
    gen = torch.Generator().manual_seed(seed)
    have = torch.nonzero(table >= 0).flatten()
    pick = torch.stack([torch.randperm(have.numel(), generator=gen)[:k] for _ in range(M)])
    return have[pick].to(torch.int32).contiguous(), torch.rand((M, k), generator=gen)


def opcheck(op, args: tuple) -> None:
    """torch.library.opcheck; its schema test is left out when an input is FP8: SchemaCheckMode detects mutation
    with torch.allclose, which torch does not implement for float8 (the bf16 cases check the same schema)."""
    fp8 = any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn for a in args)
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(op, args, test_utils=utils if fp8 else ("test_schema", *utils))


def moe_args(fp8: bool, M: int = 5, seed: int = 0) -> tuple:
    N, K = (128, 256) if fp8 else (32, 64)
    w = experts(4, N, K, fp8, seed)
    table = torch.tensor([2, -1, 0, 3, -1, 1], dtype=torch.int32)  # 6 ids, 4 slots, permuted, two holes
    ids, weights = routes(M, 3, table, seed)
    x = torch.randn((M, K), generator=torch.Generator().manual_seed(seed + 1)).bfloat16()
    return (x, w["w13"], w["w2"], ids, weights, table, w["w13_scale"], w["w2_scale"], w["block_shape"])


# ---- registration ---------------------------------------------------------------------------------------------


def test_moe_ops_registered_with_their_schemas_and_reload_is_idempotent():
    before = {n: str(getattr(torch.ops.moed, n).default._schema) for n in torch_ops.SCHEMAS}
    x = torch.randn(3, 128)
    q0, s0 = torch.ops.moed.act_quant_fp8(x, 128)
    importlib.reload(torch_ops)  # a second import must neither raise nor replace the live registration
    importlib.reload(torch_ops)
    for name, schema in torch_ops.SCHEMAS.items():
        assert before[name] == f"moed::{name}{schema}"
        assert str(getattr(torch.ops.moed, name).default._schema) == before[name]
    q1, s1 = torch_ops.per_token_group_quant_fp8(x)
    assert torch.equal(q0.view(torch.uint8), q1.view(torch.uint8)) and torch.equal(s0, s1)


@pytest.mark.parametrize(
    "ours,kernel",
    [(torch_ops.per_token_group_quant_fp8, act_quant.per_token_group_quant_fp8), (torch_ops.fused_moe, fm.fused_moe)],
)
def test_moe_op_functions_keep_the_kernel_signatures(ours, kernel):
    """Each op function takes the kernel function's parameters (same names, kinds, defaults), minus tuning and out."""
    want = inspect.signature(kernel).parameters
    for name, p in inspect.signature(ours).parameters.items():
        assert name in want, f"{ours.__name__}: parameter {name} is not the kernel's"
        assert (p.kind, p.default) == (want[name].kind, want[name].default), name
    assert [n for n in want if n not in ("config", "down_config", "out")] == list(inspect.signature(ours).parameters)


# ---- activation quant -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,group", [((5, 200), 128), ((3, 64), 32), ((0, 128), 128)])
def test_moe_act_quant_op_opcheck_and_reference(shape, group):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(shape[1])) * 3).bfloat16()
    if shape[0]:
        x[0, :group] = 0.0  # an all-zero group
    opcheck(torch.ops.moed.act_quant_fp8.default, (x, group))
    q, s = torch_ops.per_token_group_quant_fp8(x, group)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and s.shape == (shape[0], -(-shape[1] // group))
    q_ref, s_ref = act_quant.per_token_group_quant_fp8_reference(x, group)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)


def test_moe_act_quant_op_rejects_bad_inputs():
    with pytest.raises(ValueError, match="group_size 100"):
        torch_ops.per_token_group_quant_fp8(torch.zeros(2, 200), 100)
    with pytest.raises(ValueError, match=r"must be \[M, K\]"):
        torch_ops.per_token_group_quant_fp8(torch.zeros(2, 3, 128))
    # The fake rejects it too, at trace time (dynamo wraps the fake's ValueError).
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError, match=r"x dtype torch\.int32 unsupported"):
        torch.compile(torch_ops.per_token_group_quant_fp8, backend="eager", fullgraph=True)(
            torch.zeros(2, 128, dtype=torch.int32)
        )


# ---- fused MoE ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_moe_fused_op_opcheck_and_reference(fp8):
    args = moe_args(fp8)
    args = (
        torch.cat([args[0], args[0]], dim=1)[:, : args[0].shape[1]],
        *args[1:],
    )  # rows strided, as the kernel allows
    opcheck(torch.ops.moed.fused_moe.default, args)
    x, w13, w2, ids, weights, table, s13, s2, block = args
    out = torch_ops.fused_moe(x, w13, w2, ids, weights, table, w13_scale=s13, w2_scale=s2, block_shape=block)
    ref = fmr.fused_moe_reference(
        x,
        w13,
        w2,
        ids,
        weights,
        table,
        w13_scale=s13,
        w2_scale=s2,
        block_shape=None if block is None else tuple(block),
        quantize_activations=fp8,
    )
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert torch.equal(out, ref)


def test_moe_fused_op_drops_unserved_ids_as_the_kernel_does():
    """Ids without a slot or outside the table add nothing (the offload runner relies on it); the CPU op must agree
    with the Triton kernel (interpreted without a GPU) on that, which the reference alone rejects."""
    x, w13, w2, ids, weights, table, *_ = moe_args(False, M=4, seed=3)
    ids = ids.clone()
    ids[0, 1] = 1  # no slot
    ids[1, 0] = 6  # outside the table
    ids[2, :] = torch.tensor([4, 1, -1], dtype=torch.int32)  # nothing served: the row is exactly zero
    out = torch_ops.fused_moe(x, w13, w2, ids, weights, table)
    kernel = fm.fused_moe(*(t.to(DEV) for t in (x, w13, w2, ids, weights, table)), config=SMALL_BF16).cpu()
    assert not out[2].any() and not kernel[2].any()
    assert rel(out, kernel) < 1e-2
    served = ids.clone()
    served[0, 1], served[1, 0], served[2] = ids[0, 0], ids[1, 1], ids[3]
    w = weights.clone()
    w[0, 1] = w[1, 0] = 0.0
    w[2] = 0.0
    assert torch.equal(out, fmr.fused_moe_reference(x, w13, w2, served, w, table))


def test_moe_fused_op_rejects_bad_inputs():
    x, w13, w2, ids, weights, table, *_ = moe_args(False)
    with pytest.raises(ValueError, match="topk_ids"):
        torch_ops.fused_moe(x, w13, w2, ids.long(), weights, table)
    with pytest.raises(ValueError, match="block_shape"):
        torch_ops.fused_moe(x, w13, w2, ids, weights, table, block_shape=(128, 128))


# ---- tracing --------------------------------------------------------------------------------------------------


def _moe_step(x: torch.Tensor, w13, w2, ids, weights, table) -> torch.Tensor:
    """A small MoE block: norm, routed experts through the op, a residual; activation quant on the result."""
    h = torch.nn.functional.rms_norm(x.float(), (x.shape[1],)).to(x.dtype)
    y = x + torch_ops.fused_moe(h, w13, w2, ids, weights, table)
    q, s = torch_ops.per_token_group_quant_fp8(y, 32)
    return q.float() * s.repeat_interleave(32, dim=1)


@pytest.mark.parametrize("dynamic", [False, True])
def test_moe_ops_compile_fullgraph_without_graph_breaks(dynamic):
    x, w13, w2, ids, weights, table, *_ = moe_args(False)
    explained = torch._dynamo.explain(_moe_step)(x, w13, w2, ids, weights, table)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    ops = [n.target for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert torch.ops.moed.fused_moe.default in ops or torch.ops.moed.fused_moe in ops
    torch._dynamo.reset()
    compiled = torch.compile(_moe_step, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    assert torch.equal(compiled(x, w13, w2, ids, weights, table), _moe_step(x, w13, w2, ids, weights, table))
    x2, *_ = moe_args(False, M=9, seed=4)
    ids2, weights2 = routes(9, 3, table, 4)
    assert torch.equal(compiled(x2, w13, w2, ids2, weights2, table), _moe_step(x2, w13, w2, ids2, weights2, table))


# ---- GPU -----------------------------------------------------------------------------------------------------


def _cuda_moe_args(fp8: bool, M: int, seed: int = 0) -> tuple:
    N, K, S, num_ids = (512, 1024, 16, 40) if fp8 else (256, 512, 16, 40)
    w = experts(S, N, K, fp8, seed, "cuda")
    gen = torch.Generator().manual_seed(seed)
    table = torch.full((num_ids,), -1, dtype=torch.int32)
    table[torch.randperm(num_ids, generator=gen)[:S]] = torch.randperm(S, generator=gen).to(torch.int32)
    ids, weights = routes(M, 8, table, seed)
    x = torch.randn((M, K), generator=gen).bfloat16()
    return tuple(
        t.cuda() if isinstance(t, torch.Tensor) else t
        for t in (x, w["w13"], w["w2"], ids, weights, table, w["w13_scale"], w["w2_scale"], w["block_shape"])
    )


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("M", [1, 300])
def test_moe_gpu_ops_equal_direct_kernel_calls(fp8, M):
    x, w13, w2, ids, weights, table, s13, s2, block = _cuda_moe_args(fp8, M)
    kw = dict(w13_scale=s13, w2_scale=s2, block_shape=None if block is None else tuple(block))
    assert torch.equal(
        torch_ops.fused_moe(x, w13, w2, ids, weights, table, **kw), fm.fused_moe(x, w13, w2, ids, weights, table, **kw)
    )
    q, s = torch_ops.per_token_group_quant_fp8(x)
    q_k, s_k = act_quant.per_token_group_quant_fp8(x)
    assert torch.equal(q.view(torch.uint8), q_k.view(torch.uint8)) and torch.equal(s, s_k)
    opcheck(torch.ops.moed.fused_moe.default, (x, w13, w2, ids, weights, table, s13, s2, block))


@pytest.mark.gpu
def test_moe_gpu_op_in_cuda_graph_and_inductor():
    x, w13, w2, ids, weights, table, s13, s2, block = _cuda_moe_args(True, 8, seed=1)

    def step(x, ids, weights):
        return torch_ops.fused_moe(x, w13, w2, ids, weights, table, w13_scale=s13, w2_scale=s2, block_shape=block)

    want = step(x, ids, weights)
    compiled = torch.compile(step, fullgraph=True)  # Inductor around the opaque op
    assert torch.equal(compiled(x, ids, weights), want)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = step(x, ids, weights)
    x2, *_ = _cuda_moe_args(True, 8, seed=2)
    x.copy_(x2)
    graph.replay()
    assert torch.equal(got, step(x, ids, weights))
