"""The w8a16 FP8 linear kernel against its torch reference on fresh random weights (Triton interpreter at small
shapes without CUDA; GLM-5.1's projection shapes on a GPU), and the dispatching `fp8_linear`."""

from __future__ import annotations

import pytest
import torch

from moed.formats.fp8 import dequantize_block_fp8, quantize_block_fp8
from moed.kernels.fp8_linear import MAX_KERNEL_ROWS, fp8_linear, fp8_linear_kernel, fp8_linear_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _weights(N: int, K: int, seed: int, device: str = DEV) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn((N, K), generator=g, device=device) / K**0.5
    # blocks of different magnitudes (x1/4 .. x4), so a scale applied to the wrong block shows
    rows, cols = -(-N // 128), -(-K // 128)
    i, j = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    mag = 2.0 ** ((i + 2 * j) % 5 - 2).float()
    w = w * mag.repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :K]
    q, s = quantize_block_fp8(w, 128, 128)
    return q.to(device), s.to(device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize(("M", "N", "K"), [(1, 48, 256), (5, 200, 384), (17, 96, 200), (40, 72, 256), (3, 4100, 128)])
def test_fp8_linear_kernel_matches_reference(M, N, K):
    # ragged N and K (partial scale blocks), M across a 16-row tile boundary, and a wide N (64-column tiles)
    w, s = _weights(N, K, seed=M + N + K)
    x = torch.randn((M, K), generator=torch.Generator().manual_seed(M)).bfloat16().to(DEV)
    got = fp8_linear_kernel(x, w, s)
    want = fp8_linear_reference(x, w, s)
    assert got.shape == (M, N) and got.dtype == torch.bfloat16
    # fp32 accumulation both ways; the reference rounds once at the end, the kernel too (bf16 output)
    assert _rel(got, want) < 1e-2
    # one scale for every block is far off: the blocks' magnitudes differ by up to 16x
    wrong = (x.float() @ (w.float() * s.float().mean()).t()).bfloat16()
    assert _rel(wrong, want) > 5e-2


@pytest.mark.parametrize("splits", [2, 3])
def test_fp8_linear_split_k_matches_reference(splits):
    """K ranges per output tile summed in fp32 after: the reference's result, with a K range that is partial
    (7 scale blocks in 3 ranges) and a split that leaves a range empty (2 blocks of K=200 in 3)."""
    for M, N, K in ((3, 80, 7 * 128), (2, 40, 200)):
        w, s = _weights(N, K, seed=splits + K)
        x = torch.randn((M, K), generator=torch.Generator().manual_seed(K)).bfloat16().to(DEV)
        got = fp8_linear_kernel(x, w, s, splits=splits)
        assert _rel(got, fp8_linear_reference(x, w, s)) < 1e-2
        assert torch.equal(got, fp8_linear_kernel(x, w, s, splits=splits))  # the same bits again


def test_fp8_linear_splits_k_only_where_programs_are_few():
    from moed.kernels.fp8_linear import split_k

    # GLM-5.1 on a 132-SM H100 at batch 1: kv_a (36 tiles of 16 columns, 48 scale blocks), o_proj (96 tiles, 128)
    assert split_k(36, 48, 132) == 12 and split_k(96, 128, 132) == 6
    assert split_k(1024, 48, 132) == 1  # enough programs already
    assert split_k(8, 6, 132) == 1  # too short a K to split into ranges of >= 4 blocks


def test_fp8_linear_equals_dequantised_gemm_where_the_kernel_does_not_run():
    w, s = _weights(64, 256, seed=1, device="cpu")
    x = torch.randn((MAX_KERNEL_ROWS + 3, 256), generator=torch.Generator().manual_seed(2)).float()
    y = fp8_linear(x, w, s)
    assert torch.equal(y, x @ dequantize_block_fp8(w, s, 128, 128).t())
    # leading dimensions are kept
    assert fp8_linear(x.reshape(1, -1, 256), w, s).shape == (1, MAX_KERNEL_ROWS + 3, 64)


def test_fp8_linear_names_bad_inputs():
    w, s = _weights(64, 256, seed=3, device="cpu")
    x = torch.randn(2, 256).bfloat16()
    with pytest.raises(ValueError, match="weight must be float8_e4m3fn"):
        fp8_linear_reference(x, w.float(), s)
    with pytest.raises(ValueError, match=r"scale must be fp32 \[1, 2\]"):
        fp8_linear_reference(x, w, s[:, :1])
    with pytest.raises(ValueError, match="x \\[M, K\\] and weight \\[N, K\\]"):
        fp8_linear(torch.randn(2, 128), w, s)
    with pytest.raises(ValueError, match="must be bf16"):
        fp8_linear_kernel(x.float(), w, s)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 8, 64])
@pytest.mark.parametrize(("N", "K"), [(2048, 6144), (576, 6144), (16384, 2048), (6144, 16384)])
def test_fp8_linear_gpu_glm_shapes(M, N, K):
    # q_a, kv_a (with its rope part), q_b and o_proj of GLM-5.1, at decode batch sizes
    w, s = _weights(N, K, seed=N)
    x = torch.randn((M, K), device="cuda").bfloat16()
    assert _rel(fp8_linear(x, w, s), fp8_linear_reference(x, w, s)) < 1e-2
