"""llama_drift's llama-perplexity file format and statistics, on random logits (no llama.cpp needed)."""

from __future__ import annotations

import numpy as np
import pytest

from moed.ops.bench.llama_drift import (
    decode_logprobs,
    encode_logprobs,
    kld_stats,
    parse_llama_kld,
    read_base,
    row_width,
    summarise,
    write_base,
)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(1, keepdims=True))


def test_encoded_logprobs_round_trip_within_a_step():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((7, 101)) * 3).astype(np.float32)
    rows = encode_logprobs(logits)
    assert rows.shape == (7, row_width(101)) and row_width(101) == 106
    back = decode_logprobs(rows, 101)
    want = _log_softmax(logits)
    keep = want > want.max(1, keepdims=True) - 16  # below the 16-nat window the file keeps only the floor
    step = (logits.max(1) - np.maximum(logits.min(1), logits.max(1) - 16)) / 65535
    assert np.all(np.abs(back - want)[keep] <= (step[:, None] * 0.5 + 1e-5).repeat(101, 1)[keep])


def test_file_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    n_ctx, V = 16, 33
    tokens = rng.integers(0, V, (3, n_ctx), dtype=np.int32)
    logits = [rng.standard_normal((n_ctx - 1 - n_ctx // 2, V)).astype(np.float32) for _ in range(3)]
    write_base(tmp_path / "b.kld", n_ctx, tokens, logits)
    base = read_base(tmp_path / "b.kld")
    assert (base.n_ctx, base.n_vocab, base.first) == (n_ctx, V, 8)
    np.testing.assert_array_equal(base.tokens, tokens)
    np.testing.assert_array_equal(base.rows[1], encode_logprobs(logits[1]))
    (tmp_path / "bad.kld").write_bytes(b"_logits_" + np.array([n_ctx, V, 9], dtype=np.int32).tobytes())
    with pytest.raises(ValueError, match="expected for 9 chunks"):
        read_base(tmp_path / "bad.kld")
    (tmp_path / "text.kld").write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a llama-perplexity"):
        read_base(tmp_path / "text.kld")


def test_kld_stats_against_float64():
    rng = np.random.default_rng(2)
    n, V = 200, 64
    base_logits = (rng.standard_normal((n, V)) * 2).astype(np.float32)
    other = base_logits + 0.3 * rng.standard_normal((n, V)).astype(np.float32)
    nxt = rng.integers(0, V, n)
    per = kld_stats(other, encode_logprobs(base_logits), nxt, V)
    lp, lq = _log_softmax(base_logits), _log_softmax(other)
    kl = (np.exp(lp) * (lp - lq)).sum(1)  # every base log-prob is within 16 nats here
    np.testing.assert_allclose(per["kld"], kl, atol=2e-4)
    np.testing.assert_array_equal(per["same_top"], base_logits.argmax(1) == other.argmax(1))
    idx = np.arange(n)
    np.testing.assert_allclose(per["p_diff"], np.exp(lq[idx, nxt]) - np.exp(lp[idx, nxt]), atol=1e-5)
    s = summarise(per)
    assert s["positions"] == n and 0 < s["mean_kld"] < s["max_kld"]
    assert s["same_top_pct"] == pytest.approx(100 * per["same_top"].mean())
    same = summarise(kld_stats(base_logits, encode_logprobs(base_logits), nxt, V))
    assert abs(same["mean_kld"]) < 1e-4 and same["same_top_pct"] == 100.0


def test_parse_llama_kld():
    text = """
Mean ln(PPL(Q)/PPL(base))     :   0.012345 ±   0.000100
====== KL divergence statistics ======
Mean    KLD:   0.041220 ±   0.000300
Maximum KLD:   0.301000
99.0%   KLD:   0.098500
====== Token probability statistics ======
RMS Δp    :  0.012 ± 0.001 %
Same top p: 58.929 ± 2.194 %
"""
    got = parse_llama_kld(text)
    assert got == {
        "mean_kld": 0.04122,
        "kld_99": 0.0985,
        "max_kld": 0.301,
        "rms_dp_pct": 0.012,
        "same_top_pct": 58.929,
        "ln_ppl_ratio": 0.012345,
    }
    assert parse_llama_kld("failed") == {}


def test_moed_logits_on_tiny():
    """The moed side of the bench: each variant's logits at the scored positions of each chunk, BOS put first."""
    from moed.model.checkpoint import builtin_checkpoint
    from moed.ops.bench.llama_drift import moed_logits

    ckpt = builtin_checkpoint("tiny")
    tokens = np.random.default_rng(3).integers(20, 800, (2, 8), dtype=np.int32)
    out = moed_logits(ckpt, ["ref", "int4", "int4_a8"], tokens, add_bos=True, bos=2)
    assert {k: [r.shape for r in v] for k, v in out.items()} == {k: [(3, 1024)] * 2 for k in out}
    ref, q = np.concatenate(out["ref"]), np.concatenate(out["int4"])
    assert np.isfinite(q).all() and 0 < np.abs(q - ref).max() < np.abs(ref).max()
    assert not np.array_equal(out["int4"][0], out["int4_a8"][0])  # int8 activations change the answer, a little
    no_bos = moed_logits(ckpt, ["ref"], tokens, add_bos=False, bos=2)["ref"]
    assert not np.array_equal(no_bos[0], out["ref"][0])  # the first token was replaced by BOS above
