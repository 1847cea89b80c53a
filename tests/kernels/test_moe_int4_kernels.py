"""The int4 (w4a16) fused-MoE kernels against their torch twin, on fresh random experts.

Without CUDA the kernels run in the Triton interpreter at small shapes; `gpu` tests use GLM-5.1's widths.
"""

from __future__ import annotations

import pytest
import torch

from moed.formats import int4
from moed.kernels import fused_moe_int4 as fi
from moed.kernels import fused_moe_reference as fmr
from moed.kernels.moe_align import moe_align_block_size

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def make_int4(
    S: int, out_f: int, in_f: int, gen: torch.Generator, symmetric: bool = False, group: int = 128, device: str = DEV
):
    """S experts' [out_f, in_f] weights quantised by moed.formats.int4, stacked: (qweight, scales, zeros or None)."""
    ws = [
        int4.quantize_int4(torch.randn((out_f, in_f), generator=gen, device=device) / in_f**0.5, group)
        for _ in range(S)
    ]
    zeros = None if symmetric else torch.stack([w.zeros for w in ws])
    return torch.stack([w.qweight for w in ws]), torch.stack([w.scales for w in ws]), zeros


def experts(
    S: int, N: int, K: int, gen: torch.Generator, symmetric: bool = False, group: int = 128, device: str = DEV
) -> dict:
    w13, s13, z13 = make_int4(S, 2 * N, K, gen, symmetric, group, device)
    w2, s2, z2 = make_int4(S, K, N, gen, symmetric, group, device)
    return {"w13": w13, "w2": w2, "w13_scale": s13, "w2_scale": s2, "w13_zeros": z13, "w2_zeros": z2, "group": group}


def slot_table(num_ids: int, S: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    have = torch.randperm(num_ids, generator=gen)[:S]
    table = torch.full((num_ids,), -1, dtype=torch.int32)
    table[have] = torch.randperm(S, generator=gen).to(torch.int32)
    return table.to(DEV), have


def routing(M: int, k: int, allowed: torch.Tensor, gen: torch.Generator):
    pick = torch.stack([torch.randperm(allowed.numel(), generator=gen)[:k] for _ in range(M)])
    ids = allowed[pick].to(torch.int32).reshape(M, k)
    return ids.contiguous().to(DEV), torch.rand((M, k), generator=gen).to(DEV)


def _run(ex: dict, x, ids, w, table, **kw):
    weights = {k: v for k, v in ex.items() if k not in ("w13", "w2")}
    return fi.fused_moe_int4(x, ex["w13"], ex["w2"], ids, w, table, **weights, **kw)


def _ref(ex: dict, x, ids, w, table, int8_steps=(None, None)):
    weights = {k: v for k, v in ex.items() if k not in ("w13", "w2")}
    return fmr.fused_moe_reference(x, ex["w13"], ex["w2"], ids, w, table, **weights, int8_steps=int8_steps)


def _int8_steps(config: dict, down_config: dict) -> tuple[int | None, int | None]:
    """The K steps in which the A8 tiles of these configs quantise each GEMM's activations (None: bf16)."""
    return tuple(c["BLOCK_SIZE_K"] if c.get("A8") else None for c in (config, down_config))


def _problem(gen, N: int, K: int, S: int, k: int, M: int, num_ids: int, symmetric: bool, group: int = 128):
    """Fresh experts, a slot table over `num_ids` ids, M tokens routed to k slotted ids: ex, x, ids, w, table, ref."""
    ex = experts(S, N, K, gen, symmetric, group)
    table, have = slot_table(num_ids, S, gen)
    ids, w = routing(M, k, have, gen)
    x = torch.randn((M, K), generator=gen).to(torch.bfloat16).to(DEV)
    return ex, x, ids, w, table, _ref(ex, x, ids, w, table)


def _run_poisoned(ex: dict, x, ids, w, table, config: dict, down_config: dict) -> torch.Tensor:
    """The kernels into an output poisoned with NaN, which every row must overwrite."""
    out = torch.full(x.shape, float("nan"), dtype=torch.bfloat16, device=DEV)
    _run(ex, x, ids, w, table, config=config, down_config=down_config, out=out)
    assert torch.isfinite(out.float()).all()
    return out


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("M", [1, 5, 33])
def test_moe_int4_matches_reference(M, symmetric):
    gen = torch.Generator().manual_seed(10 * M + symmetric)
    N, K, S, k = 64, 256, 5, 3
    ex = experts(S, N, K, gen, symmetric)
    table, have = slot_table(9, S, gen)  # 4 ids without a slot; slots permuted
    ids, w = routing(M, k, have, gen)
    x = torch.randn((M, K), generator=gen).to(torch.bfloat16).to(DEV)
    out = torch.full((M, K), float("nan"), dtype=torch.bfloat16, device=DEV)  # poisoned: all must be written
    _run(ex, x, ids, w, table, config=SMALL, out=out)
    assert torch.isfinite(out.float()).all()
    assert rel(out, _ref(ex, x, ids, w, table)) < 1e-2


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("M", [1, 3, 9])
def test_moe_int4_gemv_tiles_match_reference(M, rows):
    """GEMV_ROWS: routes computed `rows` at a time on the CUDA cores; a block with more real rows than that takes
    several passes (M = 9: up to 9 routes on one expert), and a partial K step and symmetric weights are covered."""
    gen = torch.Generator().manual_seed(100 * M + rows)
    N, K, S, k = 64, 192, 3, 3
    for symmetric in (False, True):
        ex, x, ids, w, table, want = _problem(gen, N, K, S, k, M, 5, symmetric)
        gemv = {**SMALL, "GEMV_ROWS": rows}
        out = _run_poisoned(ex, x, ids, w, table, gemv, gemv)
        assert rel(out, want) < 1e-2, (M, rows, symmetric)
        # one GEMV GEMM beside a tensor-core one: each stage stands alone
        mixed = _run(ex, x, ids, w, table, config=SMALL, down_config=gemv)
        assert rel(mixed, want) < 1e-2
    with pytest.raises(ValueError, match="GEMV_ROWS"):
        _run(ex, x, ids, w, table, config={**SMALL, "GEMV_ROWS": 3})
    with pytest.raises(ValueError, match=r"'SPLIT_K'\] = 2 needs GEMV_ROWS"):
        _run(ex, x, ids, w, table, config={**SMALL, "SPLIT_K": 2})
    with pytest.raises(ValueError, match=r"'SPLIT_K'\] = 3; must be a power of two"):
        _run(ex, x, ids, w, table, config={**SMALL, "GEMV_ROWS": 1, "SPLIT_K": 3})
    with pytest.raises(ValueError, match="GEMV_ROWS"):
        _run(ex, x, ids, w, table, config={**SMALL, "GEMV_ROWS": 32})


@pytest.mark.parametrize("split, programs", [(2, 2), (4, 3), (8, 5)])
def test_moe_int4_split_k_matches_reference(split, programs, monkeypatch):
    """SPLIT_K: the CUDA-core tiles' K steps shared by several programs, summed in a second pass (down's with the
    top-k sum where the caller wants token sums). K = 320 at BLOCK_K 64 is 5 gate-up steps: SPLIT_K 2 runs 3 + 2, 4
    runs 2 + 2 + 1, 8 is cut to 5 programs of one step; N = 96 is 2 down steps. Routes whose id has no slot keep what
    their rows held, as without the split."""
    from moed.kernels import int4_gemv

    gen = torch.Generator().manual_seed(300 + split)
    N, K, S, k, M = 96, 320, 3, 3, 4
    ex = experts(S, N, K, gen, group=64)
    weights = {n: v for n, v in ex.items() if n not in ("w13", "w2")}
    table, have = slot_table(5, S, gen)
    ids, w = routing(M, k, have, gen)
    x = torch.randn((M, K), generator=gen).to(torch.bfloat16).to(DEV)
    want = _ref(ex, x, ids, w, table)
    whole = {**SMALL, "GEMV_ROWS": 2}
    cut = {**whole, "SPLIT_K": split}
    assert int4_gemv.split_k(cut, K, (1, 1), DEV)[1] == programs
    sums, token_sums = [], []
    monkeypatch.setattr(fi, "split_k_sum", lambda *a, **kw: sums.append(a[5]) or int4_gemv.split_k_sum(*a, **kw))
    monkeypatch.setattr(fi, "split_k_topk_sum", lambda *a: token_sums.append(a[5]) or int4_gemv.split_k_topk_sum(*a))
    out = torch.full((M, K), float("nan"), dtype=torch.bfloat16, device=DEV)
    _run(ex, x, ids, w, table, config=cut, down_config=cut, out=out)
    assert (sums, token_sums) == ([programs], [2])  # gate-up's split pass, then down's with the top-k sum
    assert torch.isfinite(out.float()).all()
    assert rel(out, want) < 1e-2
    assert rel(out, _run(ex, x, ids, w, table, config=whole, down_config=whole)) < 1e-2
    ids[1, 0] = int(torch.nonzero(table.cpu() < 0)[0])  # an id without a slot this round: its row stays as it was
    rows = torch.full((M * k, K), float("nan"), dtype=torch.bfloat16, device=DEV)
    fi.fused_moe_int4_routes(x, ex["w13"], ex["w2"], ids, w.view(-1), table, out=rows, config=cut, **weights)
    assert sums[-1] == 2  # per-route outputs: down's own split pass
    skipped = torch.zeros(M * k, dtype=torch.bool, device=DEV)
    skipped[k] = True
    assert torch.isnan(rows[skipped].float()).all() and torch.isfinite(rows[~skipped].float()).all()


@pytest.mark.parametrize("M, splits", [(1, 4), (5, 2)])
def test_split_k_topk_sum_matches_reference(M, splits):
    """Down's split sums and the top-k sum in one pass, against its torch twin: routes of ids with no slot or out of
    range are not read (their workspace rows hold NaN), H not a multiple of the pass's block."""
    from moed.kernels import int4_gemv

    gen = torch.Generator().manual_seed(40 + M)
    k, H = 3, 1100
    table, have = slot_table(9, 5, gen)
    ids, w = routing(M, k, have, gen)
    ids[0, 1] = int(torch.nonzero(table.cpu() < 0)[0])
    ids[-1, 2] = 9  # outside the table
    ws = torch.randn((splits, M * k, H), generator=gen).to(DEV)
    dead = (table[ids.clamp(max=8).long()] < 0) | (ids >= 9)
    ws[:, dead.view(-1)] = float("nan")
    out, want = (torch.full((M, H), float("nan"), dtype=torch.bfloat16, device=DEV) for _ in range(2))
    int4_gemv.split_k_topk_sum(ws, out, w.view(-1), ids, table, splits)
    int4_gemv.split_k_topk_sum_reference(ws, want, w.view(-1), ids, table, splits)
    assert torch.isfinite(out.float()).all()
    assert rel(out, want) < 1e-2


@pytest.mark.parametrize("M", [1, 5])
def test_moe_int4_bf16_unpack_matches_reference(M):
    """UNPACK_BF16: the tensor-core tiles read nibbles as bf16 bits (128 + w, less 128 + z in bf16), asymmetric and
    symmetric, in both GEMMs or in one beside the plain unpack; refused with the CUDA-core tiles."""
    gen = torch.Generator().manual_seed(500 + M)
    N, K, S, k = 64, 256, 4, 3
    for symmetric in (False, True):
        ex, x, ids, w, table, want = _problem(gen, N, K, S, k, M, 7, symmetric)
        bf16 = {**SMALL, "UNPACK_BF16": True}
        out = _run_poisoned(ex, x, ids, w, table, bf16, bf16)
        assert rel(out, want) < 1e-2, (M, symmetric)
        plain = _run(ex, x, ids, w, table, config=SMALL, down_config=SMALL)
        assert rel(out, plain) < 1e-2
        assert rel(_run(ex, x, ids, w, table, config=SMALL, down_config=bf16), want) < 1e-2
    with pytest.raises(ValueError, match="UNPACK_BF16"):
        _run(ex, x, ids, w, table, config={**SMALL, "GEMV_ROWS": 1, "UNPACK_BF16": True})
    with pytest.raises(ValueError, match="UNPACK_BF16"):
        _run(ex, x, ids, w, table, config={**SMALL, "UNPACK_BF16": 1})


@pytest.mark.parametrize("M", [1, 6])
def test_moe_int4_a8_tiles_match_reference(M):
    """A8: int8 activations (per token and K step) against the int4 nibbles on the int8 tensor cores, asymmetric and
    symmetric, a partial last K step (K = 320 at BLOCK_K 64; N = 96), finer weight groups than the K step's scale
    (group 64 at BLOCK_K 64 and 128-wide steps over 128 groups), routes without a slot, a poisoned output, K split
    among programs, two K steps a pass (PAIRS) and each step's scales loaded a step ahead or in the step (16-row
    tiles either way by AHEAD, 32-row tiles in the step); within the outputs' bf16 rounding of the reference that
    quantises the activations alike. Refused with the CUDA-core tiles, with UNPACK_BF16, below a 64-wide K step, PAIRS
    or AHEAD without A8, AHEAD with PAIRS or past 16 rows; dropped from a table's entry for 32-wide groups."""
    gen = torch.Generator().manual_seed(900 + M)
    for N, K, group, bk in ((96, 320, 64, 64), (128, 256, 128, 128)):
        for symmetric in (False, True):
            ex, x, ids, w, table, want = _problem(gen, N, K, 4, 3, M, 7, symmetric, group=group)
            a8 = {**SMALL, "BLOCK_SIZE_K": bk, "A8": True}
            out = _run_poisoned(ex, x, ids, w, table, a8, a8)
            assert rel(out, want) < 2e-2, (N, K, symmetric)
            # the same int8 activations in the reference: what is left is the outputs' bf16 rounding (2.7e-3 here,
            # as for the w4a16 tiles against the plain reference; 1.5e-2 without the activations' rounding)
            assert rel(out, _ref(ex, x, ids, w, table, (bk, bk))) < 5e-3, (N, K, symmetric)
            # K steps shared by programs (5 steps of 64 in 3 programs; 2 of 128 in 2), summed in a fixed order, with
            # the top-k sum in fp32 (no route's bf16 rounding: compared with the reference, not the unsplit tiles)
            split = {**a8, "SPLIT_K": 4}
            cut = _run_poisoned(ex, x, ids, w, table, split, split)
            assert rel(cut, _ref(ex, x, ids, w, table, (bk, bk))) < 5e-3, (N, K, symmetric)
            # two K steps a pass: 5 steps end on a lone one, and the split programs' 2, 2, 1 too
            for pairs, same in (({**a8, "PAIRS": True}, out), ({**split, "PAIRS": True}, cut)):
                assert rel(_run_poisoned(ex, x, ids, w, table, pairs, pairs), same) < 2e-3, pairs
            # the 16-row tiles above load each step's scales and sums a step ahead (AHEAD); 32-row tiles in the step,
            # and the 16-row ones too with AHEAD False: the same sums in the same order
            tall = {**a8, "BLOCK_SIZE_M": 32}
            assert rel(_run_poisoned(ex, x, ids, w, table, tall, tall), out) < 2e-3
            for in_step, same in (({**a8, "AHEAD": False}, out), ({**split, "AHEAD": False}, cut)):
                assert torch.equal(_run_poisoned(ex, x, ids, w, table, in_step, in_step), same), in_step
            w4a16 = {**SMALL, "BLOCK_SIZE_K": bk}
            assert rel(out, _run(ex, x, ids, w, table, config=w4a16, down_config=w4a16)) < 2e-2
            mixed = _run(ex, x, ids, w, table, config=w4a16, down_config=a8)
            assert rel(mixed, _ref(ex, x, ids, w, table, (None, bk))) < 5e-3
    for bad in ({"GEMV_ROWS": 1}, {"UNPACK_BF16": True}, {"BLOCK_SIZE_K": 32}, {"A8": 1}):
        with pytest.raises(ValueError, match="A8"):
            _run(ex, x, ids, w, table, config={**SMALL, "A8": True, **bad})
    for bad in ({"A8": False}, {"PAIRS": 1}):
        with pytest.raises(ValueError, match="PAIRS"):
            _run(ex, x, ids, w, table, config={**SMALL, "A8": True, "PAIRS": True, **bad})
    for bad in ({"A8": False}, {"AHEAD": 1}, {"PAIRS": True}, {"BLOCK_SIZE_M": 32}):
        with pytest.raises(ValueError, match="AHEAD"):
            _run(ex, x, ids, w, table, config={**SMALL, "A8": True, "AHEAD": True, **bad})
    with pytest.raises(ValueError, match="AHEAD"):  # nothing to keep in the step without the int8 tiles
        _run(ex, x, ids, w, table, config={**SMALL, "AHEAD": False})
    assert "A8" not in fi._for_group({**SMALL, "BLOCK_SIZE_K": 128, "A8": True}, 32)
    assert fi._for_group({**SMALL, "BLOCK_SIZE_K": 128, "A8": True}, 64)["A8"]


def test_int8_group_quant_matches_reference():
    """The int8 activation quant: split even/odd layout, per-step scale and sum of q, against its torch twin (q may
    differ by one where a value lands on a rounding boundary in one and not the other), a partial last group."""
    from moed.kernels import act_quant as aq

    gen = torch.Generator().manual_seed(12)
    x = (torch.randn((19, 200), generator=gen) * torch.rand((19, 1), generator=gen) * 5).to(torch.bfloat16).to(DEV)
    x[3] = 0  # a row of zeros: scale at its floor, q = 0
    q, s, qs = aq.per_token_group_quant_int8(x, 64)
    rq, rs, rqs = aq.per_token_group_quant_int8_reference(x.cpu(), 64)
    assert q.shape == (19, 2, 100) and s.shape == qs.shape == (19, 4)
    torch.testing.assert_close(s.cpu(), rs)
    assert (q.cpu().int() - rq.int()).abs().max() <= 1 and (qs.cpu() - rqs).abs().max() <= 4
    assert int(q.abs().max()) == 127 and bool((q[3] == 0).all())
    back = aq.dequantize_groups_int8(q, s, 64).cpu()
    assert float((back - x.cpu().float()).abs().max()) <= float(rs.max()) * 0.51 + 1e-6
    with pytest.raises(ValueError, match="even"):
        aq.per_token_group_quant_int8(x[:, :199], 64)


@pytest.mark.parametrize("rows, split", [(1, 1), (2, 4)])
def test_moe_int4_gemv_words_match_reference(rows, split):
    """GEMV_WORDS: the CUDA-core tiles read 32-bit words of eight nibbles (1 + w/16 by shift and and-or, the zero
    point and scale taken off once a word), asymmetric and symmetric, with K splits, a partial last K step (K = 320
    at BLOCK_K 64: 5 steps; N = 96: the down GEMM's second step half full) and routes without a slot; the same
    result as the byte unpack within rounding. Refused with the tensor-core tiles and at BLOCK_K 32."""
    gen = torch.Generator().manual_seed(700 + rows)
    N, K, S, k, M = 96, 320, 3, 3, 5
    for symmetric in (False, True):
        ex, x, ids, w, table, want = _problem(gen, N, K, S, k, M, 5, symmetric, group=64)
        bytes_ = {**SMALL, "GEMV_ROWS": rows, **({"SPLIT_K": split} if split > 1 else {})}
        words = {**bytes_, "GEMV_WORDS": True}
        out = _run_poisoned(ex, x, ids, w, table, words, words)
        assert rel(out, want) < 1e-2, (rows, split, symmetric)
        assert rel(out, _run(ex, x, ids, w, table, config=bytes_, down_config=bytes_)) < 5e-3
        assert rel(_run(ex, x, ids, w, table, config=SMALL, down_config=words), want) < 1e-2
    with pytest.raises(ValueError, match="GEMV_WORDS"):
        _run(ex, x, ids, w, table, config={**SMALL, "GEMV_WORDS": True})
    with pytest.raises(ValueError, match="GEMV_WORDS"):
        _run(ex, x, ids, w, table, config={**SMALL, "GEMV_ROWS": 1, "BLOCK_SIZE_K": 32, "GEMV_WORDS": True})


def test_moe_int4_routes_computes_only_ids_in_the_table():
    """fused_moe_int4_routes (the expert cache's rounds at int4): one output row per route, written only for ids in
    [0, num_ids), the other rows kept; and the summed kernel is the routes' weighted sum."""
    gen = torch.Generator().manual_seed(21)
    N, K, S, k, M = 64, 256, 5, 3, 6
    ex = experts(S, N, K, gen)
    weights = {n: v for n, v in ex.items() if n not in ("w13", "w2")}
    table = torch.randperm(S, generator=gen).to(torch.int32).to(DEV)
    ids, _ = routing(M, k, torch.arange(S), gen)
    ids[0, 1] = ids[3, 0] = ids[5, 2] = S  # not this round's
    w = torch.rand(M * k, generator=gen).to(DEV)
    x = torch.randn((M, K), generator=gen).to(torch.bfloat16).to(DEV)
    out = torch.full((M * k, K), float("nan"), dtype=torch.bfloat16, device=DEV)
    fi.fused_moe_int4_routes(x, ex["w13"], ex["w2"], ids, w, table, out=out, config=SMALL, **weights)
    ref = torch.full_like(out, float("nan"))
    fmr.fused_moe_routes_reference(x, ex["w13"], ex["w2"], ids, w, table, out=ref, **weights)
    skipped = (ids.view(-1) == S).to(DEV)
    assert torch.isnan(out[skipped].float()).all() and torch.isnan(ref[skipped].float()).all()
    assert torch.isfinite(out[~skipped].float()).all()
    assert rel(out[~skipped], ref[~skipped]) < 1e-2
    ids_all = torch.where(ids == S, 0, ids)
    summed = _run(ex, x, ids_all, w.view(M, k), table, config=SMALL)
    routes = fi.fused_moe_int4_routes(x, ex["w13"], ex["w2"], ids_all, w, table, config=SMALL, **weights)
    assert torch.equal(summed, routes.view(M, k, K).float().sum(dim=1).bfloat16())


def test_moe_int4_partial_groups_and_small_group():
    """K and N that are not multiples of the group (a partial last group), and 32-wide groups with BLOCK_K 32 (passed,
    or the looked-up 128 narrowed to the group)."""
    gen = torch.Generator().manual_seed(4)
    for N, K, group, bk in ((48, 192, 128, 64), (64, 96, 32, 32)):
        ex = experts(3, N, K, gen, group=group)
        table = torch.tensor([1, 2, 0], dtype=torch.int32, device=DEV)
        ids = torch.tensor([[0, 1], [2, 0], [1, 2]], dtype=torch.int32, device=DEV)
        w = torch.rand((3, 2), generator=gen).to(DEV)
        x = torch.randn((3, K), generator=gen).to(torch.bfloat16).to(DEV)
        out = _run(ex, x, ids, w, table, config={**SMALL, "BLOCK_SIZE_K": bk})
        assert rel(out, _ref(ex, x, ids, w, table)) < 1e-2
        if group == 32:
            assert rel(_run(ex, x, ids, w, table), _ref(ex, x, ids, w, table)) < 1e-2


def test_moe_int4_gate_up_stage_is_tight():
    """The gate-up GEMM alone against torch on the same dequantised weights (fp32 products, one bf16 rounding)."""
    gen = torch.Generator().manual_seed(3)
    N, K = 64, 384
    ex = experts(2, N, K, gen)
    ids = torch.tensor([[1], [0], [1]], dtype=torch.int32, device=DEV)
    table = torch.tensor([0, 1], dtype=torch.int32, device=DEV)
    x = torch.randn((3, K), generator=gen).to(torch.bfloat16).to(DEV)
    h = torch.empty((3, N), dtype=torch.bfloat16, device=DEV)
    fi.launch_gate_up(
        x,
        int4.Int4Weight(ex["w13"], ex["w13_scale"], ex["w13_zeros"], 128),
        h,
        moe_align_block_size(ids, table, 16),
        1,
        SMALL,
    )
    for t in range(3):
        w13 = int4.Int4Weight(ex["w13"], ex["w13_scale"], ex["w13_zeros"], 128)
        wgu = int4.dequantize_int4(w13.slot(int(ids[t, 0])))
        g, u = x[t].float() @ wgu[:N].T, x[t].float() @ wgu[N:].T
        torch.testing.assert_close(
            h[t].float(), (torch.nn.functional.silu(g) * u).bfloat16().float(), rtol=1e-2, atol=1e-3
        )


def test_moe_int4_config_lookup_and_bad_inputs():
    gen = torch.Generator().manual_seed(5)
    ex = experts(2, 64, 128, gen)
    table = torch.arange(2, dtype=torch.int32, device=DEV)
    ids = torch.tensor([[0, 1]], dtype=torch.int32, device=DEV)
    w = torch.rand((1, 2), generator=gen).to(DEV)
    x = torch.randn((1, 128), generator=gen).to(torch.bfloat16).to(DEV)
    out = _run(ex, x, ids, w, table)  # no int4 table for E=2, N=64: built-in defaults
    assert rel(out, _ref(ex, x, ids, w, table)) < 1e-2
    with pytest.raises(ValueError, match="BLOCK_SIZE_K"):
        _run(ex, x, ids, w, table, config={**SMALL, "BLOCK_SIZE_K": 256})
    with pytest.raises(ValueError, match="w13_scale"):
        _run({**ex, "w13_scale": ex["w13_scale"][:, :, :0]}, x, ids, w, table)
    with pytest.raises(ValueError, match="zero points"):
        _run({**ex, "w2_zeros": None}, x, ids, w, table)
    with pytest.raises(ValueError, match="w2_zeros"):
        _run({**ex, "w2_zeros": ex["w2_zeros"].transpose(1, 2)}, x, ids, w, table)
    with pytest.raises(ValueError, match="uint8"):
        _run({**ex, "w13": ex["w13"].view(torch.int8)}, x, ids, w, table)


# ---- GPU, GLM-5.1 widths ------------------------------------------------------------------------------------

GLM_K = 6144


@pytest.mark.gpu
@pytest.mark.parametrize("N,M", [(2048, 1), (2048, 64), (2048, 300), (256, 33)])
def test_moe_int4_gpu_glm_shapes(N, M):
    gen = torch.Generator(device="cuda").manual_seed(N + M)
    cpu_gen = torch.Generator().manual_seed(N + M)
    ex = experts(24, N, GLM_K, gen, device="cuda")
    table, have = slot_table(257, 24, cpu_gen)
    ids, w = routing(M, 9, have, cpu_gen)
    x = torch.randn((M, GLM_K), generator=cpu_gen).to(torch.bfloat16).cuda()
    out = _run(ex, x, ids, w, table)
    # the shipped table's tiles: int8 activations (A8) where it picks them, held to the reference that quantises
    # them alike, and to the bf16-activation answer within the tuner's own acceptance
    steps = _int8_steps(*fi.get_moe_config(257, N, M, x.device))
    assert rel(out, _ref(ex, x, ids, w, table, steps)) < 5e-3, steps
    assert rel(out, _ref(ex, x, ids, w, table)) < (3e-2 if any(steps) else 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4, 9])
def test_moe_int4_gpu_gemv_tiles_glm_shapes(M):
    """Every CUDA-core tile the tuner may pick, compiled for this GPU at GLM-5.1's widths, against the reference."""
    from moed.kernels.fused_moe_tuner import gemv_candidates

    gen = torch.Generator(device="cuda").manual_seed(M)
    cpu_gen = torch.Generator().manual_seed(M)
    ex = experts(12, 2048, GLM_K, gen, device="cuda")
    table, have = slot_table(257, 12, cpu_gen)
    ids, w = routing(M, 8, have, cpu_gen)
    x = torch.randn((M, GLM_K), generator=cpu_gen).to(torch.bfloat16).cuda()
    want = _ref(ex, x, ids, w, table)
    for cfg in gemv_candidates(4):
        assert rel(_run(ex, x, ids, w, table, config=cfg, down_config=cfg), want) < 1e-2, cfg


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 64, 300])
def test_moe_int4_gpu_a8_tiles_glm_shapes(M):
    """The int8 tensor-core tiles (A8) the tuner may pick at this M, compiled for this GPU (the inline PTX nibble split
    runs only here) at GLM-5.1's widths, against the reference."""
    from moed.kernels.fused_moe_tuner import candidates

    gen = torch.Generator(device="cuda").manual_seed(20 + M)
    cpu_gen = torch.Generator().manual_seed(20 + M)
    ex = experts(12, 2048, GLM_K, gen, device="cuda")
    table, have = slot_table(257, 12, cpu_gen)
    ids, w = routing(M, 8, have, cpu_gen)
    x = torch.randn((M, GLM_K), generator=cpu_gen).to(torch.bfloat16).cuda()
    want = _ref(ex, x, ids, w, table)
    tiles = [c for c in candidates(M, "int4_w4a16") if c.get("A8") and c["num_stages"] == 3]
    assert tiles
    for cfg in tiles:
        out = _run(ex, x, ids, w, table, config=cfg, down_config=cfg)
        assert rel(out, want) < 3e-2, cfg
        assert rel(out, _ref(ex, x, ids, w, table, _int8_steps(cfg, cfg))) < 5e-3, cfg


@pytest.mark.gpu
def test_moe_int4_gpu_graph_capture_without_host_sync():
    gen = torch.Generator(device="cuda").manual_seed(11)
    cpu_gen = torch.Generator().manual_seed(11)
    ex = experts(16, 512, GLM_K, gen, device="cuda")
    table, have = slot_table(257, 16, cpu_gen)
    ids, w = routing(4, 9, have, cpu_gen)
    x = torch.randn((4, GLM_K), generator=cpu_gen).to(torch.bfloat16).cuda()
    out = torch.empty_like(x)
    _run(ex, x, ids, w, table, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            _run(ex, x, ids, w, table, out=out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ids2, w2 = routing(4, 9, have, cpu_gen)
    ids.copy_(ids2)
    w.copy_(w2)
    x.copy_(torch.randn((4, GLM_K), generator=cpu_gen).to(torch.bfloat16))
    graph.replay()
    assert rel(out, _ref(ex, x, ids, w, table)) < 1e-2


def test_moe_int4_tuner_pieces_on_cpu(tmp_path):
    """The tuner's int4 path without a GPU: experts, launches and the reference rows it checks candidates against,
    its candidates' validity, and the table file name `--from-log` writes."""
    from moed.kernels import fused_moe_tuner as tm
    from moed.moe_configs import lookup

    experts = tm.make_experts(3, 64, 128, "int4_w4a16", DEV)
    M, E, topk = 3, 3, 2
    gen = torch.Generator(device=DEV).manual_seed(0)
    ids, wts = tm.make_routing(M, E, topk, DEV, gen)
    x = torch.randn((M, 128), generator=gen, device=DEV).bfloat16()
    align = moe_align_block_size(ids, torch.arange(E, dtype=torch.int32, device=DEV), 16)
    h = torch.empty((M * topk, 64), dtype=torch.bfloat16, device=DEV)
    tm.launch_up("int4_w4a16", x, experts, h, align, topk, SMALL)
    part = torch.empty((M * topk, 128), dtype=torch.bfloat16, device=DEV)
    tm.launch_down("int4_w4a16", h, experts, part, wts, align, SMALL)
    ref_h, ref_y = tm._reference_rows(x, experts, ids, wts, "int4_w4a16", M, h_in=h)
    assert rel(h, ref_h) < 1e-2 and rel(part, ref_y) < 1e-2
    for m in (1, 64, 4096):
        for cfg in tm.candidates(m, "int4_w4a16"):
            fi.check_int4_config(cfg, 128, "candidate")
    cfg = {
        "BLOCK_SIZE_M": 16,
        "BLOCK_SIZE_N": 64,
        "BLOCK_SIZE_K": 128,
        "GROUP_SIZE_M": 1,
        "num_warps": 4,
        "num_stages": 4,
    }
    log = "\n".join(
        [
            "tune-moe on NVIDIA H100 80GB HBM3, Triton 3.6.0, torch 2.11.0+cu130; writing /x",
            "[int4_w4a16 E=257 N=2048 K=6144] 1 of 1 batch sizes to tune",
            f"  M=    1: gate_up     20.0 us {tm._short(cfg)} | down     10.0 us {tm._short(cfg)}  (1.0s)",
        ]
    )
    (tmp_path / "tune.log").write_text(log)
    assert tm.main(["--from-log", str(tmp_path / "tune.log"), "--batch-sizes", "1", "--out-dir", str(tmp_path)]) == 0
    name = "E=257,N=2048,device_name=NVIDIA_H100_80GB_HBM3,dtype=int4_w4a16.json"
    assert lookup.load_table(tmp_path / name) == {1: cfg}
    assert name == lookup.file_name(257, 2048, "NVIDIA H100 80GB HBM3", fi.DTYPE_NAME, None)
