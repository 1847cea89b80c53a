"""Compile the project's Triton kernels for Hopper (sm_90) on a machine with no GPU, as the GPU would launch them.

Run as a script in a process of its own (it swaps Triton's active driver): every launch made by the kernels' Python
wrappers, called with CPU tensors at GLM-5.1's widths and with the configs the GPU would pick (the shipped H100
tables, the built-in defaults), is compiled for `GPUTarget("cuda", 90, 32)` by Triton's own JIT path (`warmup`:
compile, never launch), and each kernel's shared memory is checked against what one H100 block may use. This
catches what the CPU interpreter never sees (a type the compiler rejects, a layout it cannot lower, a tile that
overflows shared memory) before any device time is spent. Prints one JSON line per compiled specialisation (with
its registers, and for a launch on a fixed grid the programs an H100 SM holds and the waves the grid takes) and
exits non-zero on the first failure with the kernel and config named.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import jit as triton_jit
from triton.runtime.driver import driver

from moed.model.checkpoint import make_config

# Opt-in shared memory per block on sm_90 (227 KB); Triton checks this only when it loads a kernel on a device.
SM90_SHARED_BYTES = 232_448
H100 = "NVIDIA H100 80GB HBM3"
_CFG = make_config("glm51")
# GLM-5.1's widths, from the project's preset of the release config: hidden, expert intermediate, top-k, and the
# ids a fused-MoE table is keyed on (the routed experts and the fused shared expert)
GLM_K, GLM_N = _CFG["hidden_size"], _CFG["moe_intermediate_size"]
TOP_K, NUM_IDS = _CFG["num_experts_per_tok"], _CFG["n_routed_experts"] + 1


class _HopperDriver:
    """The parts of Triton's active driver that its JIT consults before a launch, answering for an H100."""

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers a thread, stack bytes a thread: local arrays and register spills) of the kernel, by the cuobjdump
    Triton ships; (None, None) without it."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.is_file():
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    return (int(regs.group(1)) if regs else None), (int(stack.group(1)) if stack else None)


# The H100 80GB HBM3 (the lent machine's card): SMs, and per SM 64K 32-bit registers (a warp's allocated in units of
# 256), 228 KB of shared memory (1 KB of it reserved a block), at most 64 warps and 32 blocks.
H100_SMS = 132


def blocks_per_sm(regs: int, warps: int, shared: int) -> int:
    """How many programs of a kernel one sm_90 SM holds at once, from its registers, warps and shared memory."""
    by_regs = 65536 // (math.ceil(regs * 32 / 256) * 256 * warps)
    return min(by_regs, 233_472 // (shared + 1024), 64 // warps, 32)


COMPILED: list[dict] = []
_run = triton_jit.JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    regs, stack = _resource_usage(kernel.asm["cubin"])
    record = {
        "kernel": self.fn.__name__,
        "shared": kernel.metadata.shared,
        "regs": regs,
        "stack": stack,
        "grid": list(grid) if isinstance(grid, (tuple, list)) else None,
        "num_warps": kernel.metadata.num_warps,
        "num_stages": kernel.metadata.num_stages,
        "constexprs": {k: v for k, v in kwargs.items() if k.isupper()},
    }
    if regs and isinstance(grid, (tuple, list)):
        # programs resident at once, and the launch in waves of them on an H100: at decode a GEMM reads its weights
        # once, so what one wave keeps in flight bounds its bandwidth (docs/benchmarks.md, int4 at M = 1)
        record["blocks_per_sm"] = blocks_per_sm(regs, record["num_warps"], record["shared"])
        record["waves"] = round(math.prod(grid) / (record["blocks_per_sm"] * H100_SMS), 2)
    if record["shared"] > SM90_SHARED_BYTES:
        raise RuntimeError(f"{record}: {record['shared']} bytes of shared memory, sm_90 allows {SM90_SHARED_BYTES}")
    COMPILED.append(record)
    return kernel


def _table_pairs(N: int, dtype: str | None, block: tuple[int, int] | None) -> list[tuple[int, dict, dict]]:
    """(M, up config, down config) for every entry of the tables an H100 would use, and the defaults."""
    from moed.moe_configs import lookup

    pairs = []
    for E in (NUM_IDS, NUM_IDS - 1):
        tables = lookup.get_tables(E, N, dtype, block, H100, "3.6.0")
        ms = sorted(set(tables.up or {}) | set(tables.down or {}) | {1, 64, 512})
        pairs += [(m, *tables.pick(m)) for m in ms]
    pairs += [(m, *lookup.MoETables(None, None, None, None, dtype, block).pick(m)) for m in (1, 64, 512)]
    out, seen = [], set()
    for m, up, down in pairs:
        key = json.dumps([up, down], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append((m, up, down))
    return out


def _routing(M: int, S: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = (torch.arange(M * TOP_K, dtype=torch.int32) % S).view(M, TOP_K)
    table = torch.full((NUM_IDS,), -1, dtype=torch.int32)
    table[:S] = torch.arange(S, dtype=torch.int32)
    return ids, torch.full((M, TOP_K), 1.0 / TOP_K), table


def fp8_moe() -> None:
    from moed.kernels.fused_moe import fused_moe

    S, N = 8, GLM_N
    w13 = torch.zeros((S, 2 * N, GLM_K), dtype=torch.float8_e4m3fn)
    w2 = torch.zeros((S, GLM_K, N), dtype=torch.float8_e4m3fn)
    s13 = torch.ones((S, 2 * N // 128, GLM_K // 128))
    s2 = torch.ones((S, GLM_K // 128, N // 128))
    for m, up, down in _table_pairs(N, "fp8_w8a8", (128, 128)):
        M = min(m, 64)  # the sizes specialise nothing the config does not; keep the tensors small
        ids, wts, table = _routing(M, S)
        x = torch.zeros((M, GLM_K), dtype=torch.bfloat16)
        fused_moe(
            x, w13, w2, ids, wts, table, w13_scale=s13, w2_scale=s2, block_shape=(128, 128), config=up, down_config=down
        )


def fp8_linear() -> None:
    from moed.kernels.fp8_linear import fp8_linear_kernel

    # GLM-5.1's FP8 projections (q_a, kv_a, q_b, o_proj, shared expert down), at a decode size per tile width
    for N, K in ((2048, 6144), (576, 6144), (16384, 2048), (6144, 16384), (6144, 2048)):
        w = torch.zeros((N, K), dtype=torch.float8_e4m3fn)
        s = torch.ones((-(-N // 128), K // 128))
        for M in (8, 32, 64):  # 16-, 32- and 64-row blocks
            fp8_linear_kernel(torch.zeros((M, K), dtype=torch.bfloat16), w, s)


def int4_moe() -> None:
    from moed.formats import int4
    from moed.kernels.fused_moe_int4 import fused_moe_int4
    from moed.kernels.fused_moe_tuner import GEMV_MAX_TOKENS, candidates, gemv_candidates

    S, N, g = 8, GLM_N, 128
    w13 = torch.zeros((S, 2 * N, GLM_K // 2), dtype=torch.uint8)
    w2 = torch.zeros((S, GLM_K, N // 2), dtype=torch.uint8)
    s13 = torch.ones((S, 2 * N, int4.num_groups(GLM_K, g)), dtype=torch.bfloat16)
    s2 = torch.ones((S, GLM_K, int4.num_groups(N, g)), dtype=torch.bfloat16)
    z13 = torch.zeros((S, 2 * N // 8, int4.num_groups(GLM_K, g)), dtype=torch.int32)
    z2 = torch.zeros((S, GLM_K // 8, int4.num_groups(N, g)), dtype=torch.int32)
    # the CUDA-core (GEMV_ROWS) tiles the tuner tries for decode, beside the tables' and the defaults'; one split
    # stands for all (SPLIT_K > 1 is one binary, its count a launch argument) and adds the summing pass
    gemv = [(1, c, c) for c in gemv_candidates(GEMV_MAX_TOKENS) if c.get("SPLIT_K", 1) <= 2]
    # and the tensor-core decode tiles with the bf16-bit unpack (UNPACK_BF16), at one stage count
    gemv += [(1, c, c) for c in candidates(1, "int4_w4a16") if c.get("UNPACK_BF16") and c["num_stages"] == 3]
    # and the int8 tensor-core tiles (A8) at decode and prefill sizes
    a8 = [c for m in (1, 128, 512) for c in candidates(m, "int4_w4a16") if c.get("A8") and c["num_stages"] == 3]
    gemv += [(1, c, c) for c in a8]
    for (m, up, down), zeros in itertools.product(_table_pairs(N, "int4_w4a16", None) + gemv, (True, False)):
        M = min(m, 64)
        ids, wts, table = _routing(M, S)
        x = torch.zeros((M, GLM_K), dtype=torch.bfloat16)
        fused_moe_int4(
            x,
            w13,
            w2,
            ids,
            wts,
            table,
            w13_scale=s13,
            w2_scale=s2,
            w13_zeros=z13 if zeros else None,
            w2_zeros=z2 if zeros else None,
            group=g,
            config=up,
            down_config=down,
        )


def offload_kernels() -> None:
    from moed.kernels.expert_claim import LFU, LRU, SlotTables, claim_slots
    from moed.kernels.expert_copy import copy_expert_columns, copy_experts, upload_no_ce
    from moed.kernels.miss_split import split_misses

    E, S, M = 256, 12, 4
    R = M * TOP_K
    ids = (torch.arange(R, dtype=torch.int32) % E).view(M, TOP_K)
    t = SlotTables.allocate(E, S, "cpu")
    for policy in (LRU, LFU):
        claim_slots(
            t,
            ids,
            0,
            torch.empty_like(ids),
            torch.empty((M, TOP_K), dtype=torch.int8),
            policy=policy,
            exclude=torch.zeros(E, dtype=torch.int8),
        )
    long_ids = (torch.arange(1024 * TOP_K, dtype=torch.int32) % E).view(1024, TOP_K)  # a prefill step's routes
    claim_slots(t, long_ids, 0, torch.empty_like(long_ids), torch.empty((1024, TOP_K), dtype=torch.int8))
    # FP8 sections (w13, w2, their scales) and int4's six, row bytes of GLM-5.1's experts
    fp8 = [2 * GLM_N * GLM_K, GLM_K * GLM_N, 2 * GLM_N // 128 * GLM_K // 128 * 4, GLM_K // 128 * GLM_N // 128 * 4]
    for sizes in (fp8[:2], fp8, fp8 + fp8[2:]):
        src = [torch.zeros((4, b), dtype=torch.uint8) for b in sizes]
        dst = [torch.zeros((2, b), dtype=torch.uint8) for b in sizes]
        copy_experts(t, src, dst, num_programs=32)
    src = [torch.zeros((4, b), dtype=torch.uint8) for b in fp8]
    dst = [torch.zeros((1, b), dtype=torch.uint8) for b in fp8]
    copy_expert_columns(
        torch.tensor([1, 256], dtype=torch.int32),
        src,
        dst,
        [2, GLM_K, 2, GLM_K // 128],
        [False, False, True, False],
        GLM_N,
        granule=128,  # FP8's column granule (offload.cpu_experts.column_granule)
        num_programs=32,
    )
    upload_no_ce(torch.zeros(4096, dtype=torch.uint8), torch.zeros(4096, dtype=torch.uint8))
    weights = torch.full((M, TOP_K), 1.0 / TOP_K)
    hidden = torch.zeros((M, GLM_K), dtype=torch.bfloat16)
    e2s = torch.full((E + 1,), -1, dtype=torch.int32)
    for column_split in (False, True):
        split = {}
        if column_split:
            split = {
                "split_cols": torch.zeros(R + 1, dtype=torch.int32),
                "split_info": torch.zeros(2, dtype=torch.int32),
                "split_ids": torch.zeros(R, dtype=torch.int32),
            }
        split_misses(
            ids,
            weights,
            hidden,
            e2s,
            torch.zeros(E),
            torch.zeros(R + 1, dtype=torch.int32),
            header=torch.zeros(7, dtype=torch.int32),
            cpu_experts=torch.zeros(R, dtype=torch.int32),
            ids_out=torch.zeros(R, dtype=torch.int32),
            w_out=torch.zeros(R),
            x_out=torch.zeros((M, GLM_K)),
            exclude=torch.zeros(E, dtype=torch.int8),
            gpu_weights=torch.zeros(R),
            sort_scratch=torch.zeros(E, dtype=torch.int64),
            layer_index=3,
            **split,
        )


def attention_kernels() -> None:
    from moed.attention.paged_kv import PagedKVPool, PagedSequence, build_paged_step
    from moed.kernels.index_k_gather import gather_paged_rows
    from moed.kernels.indexer import indexer_topk
    from moed.kernels.sparse_mla import sparse_mla
    from moed.model.attention_interface import SequenceStep
    from moed.model.config import GlmMoeDsaConfig

    cfg = GlmMoeDsaConfig.from_dict(_CFG)
    H, C, R = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    page = 64
    # decode (two sequences past top-k, one new token each) and a prefill chunk; FP8 and bf16 pools
    for steps, latent_dtype in itertools.product(([(3000, 1), (2500, 1)], [(0, 256)]), ("fp8", "bf16")):
        pool = PagedKVPool(cfg, 128, page, latent_dtype, "fp8", "cpu")
        seqs = [SequenceStep(c, n, PagedSequence(pool)) for c, n in steps]
        paged = build_paged_step(seqs, page, "cpu")
        T = sum(n for _, n in steps)
        positions = torch.cat([torch.arange(c, c + n) for c, n in steps])
        iv, lv = pool.index_view(0), pool.latent_view(0)
        q = torch.zeros((T, cfg.index_n_heads, cfg.index_head_dim), dtype=torch.bfloat16)
        idx = indexer_topk(
            q,
            torch.zeros((T, cfg.index_n_heads)),
            iv.k,
            iv.scale,
            paged.page_table,
            paged.query_start,
            positions,
            paged.max_new,
            paged.max_context,
            cfg.index_topk,
        )
        q_lat = torch.zeros((T, H, C), dtype=torch.bfloat16)
        q_rope = torch.zeros((T, H, R), dtype=torch.bfloat16)
        for indices in (idx, None):
            sparse_mla(
                q_lat,
                q_rope,
                lv.nope,
                lv.rope,
                lv.scale,
                paged.page_table,
                paged.token_seq,
                positions,
                indices,
                0.1,
                max_context=paged.max_context,
            )
        rows = torch.zeros((paged.max_context * len(steps), cfg.index_head_dim), dtype=iv.k.dtype)
        start = torch.zeros(len(steps), dtype=torch.int32)
        gather_paged_rows(iv.k, iv.scale, paged.page_table, paged.seq_lens, start, paged.max_context, rows)


GROUPS = {
    "fp8_moe": fp8_moe,
    "fp8_linear": fp8_linear,
    "int4_moe": int4_moe,
    "offload": offload_kernels,
    "attention": attention_kernels,
}


def main(names: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("sm90_compile: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)", file=sys.stderr)
        return 2
    driver.set_active(_HopperDriver())
    triton_jit.JITFunction.run = _compile_only
    for name in names or list(GROUPS):
        before = len(COMPILED)
        GROUPS[name]()
        for rec in COMPILED[before:]:
            print(json.dumps({"group": name, **rec}), flush=True)
        if len(COMPILED) == before:
            print(f"sm90_compile: {name} launched no kernel", file=sys.stderr)
            return 1
    print(f"sm90_compile: {len(COMPILED)} launches compiled for sm_90 with Triton {triton.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
