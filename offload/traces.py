"""Synthetic routing traces for benchmarks and tests, and the four statistics DESIGN.md §4 compares.

`uniform_trace`: every token picks k distinct experts uniformly (the worst case for any cache).
`skewed_trace`: each sequence is a chain of tokens; a token's k experts are drawn one at a time:
  with probability `p_prev` from the previous token's experts, else with probability `p_recent`
  from the experts of the 8 tokens before it, else from a popularity law
  p(e) = uniform_mix / E + (1 - uniform_mix) * zipf(rank(e), alpha) over a per-layer random ranking
  (repeats are redrawn from the popularity law). DESIGN.md §4's targets: 240-248 of 256 experts
  used over a few hundred tokens, top 4% of experts carry ~46% of activations, ~45% of a token's
  experts used by the previous token, ~80% within the last 8. A stronger head lowers coverage, so
  the defaults (alpha 1.8, mix 0.2, p_prev 0.36, p_recent 0.55) compromise. `trace_statistics`
  measures all four on any trace; benchmarks print them next to every hit rate (docs/benchmarks.md).
  With `p_prev = p_recent = 0` only the popularity law is left: tokens independent of each other.
  `ranking_seed` draws the per-layer ranking apart from the chains, so traces of other seeds can share
  one layer's popularity (a restart that meets the same experts hot, or more chains of one layer).
Traces are [steps, batch, k] int32 per layer (numpy), one independent chain per batch row.
`verify_steps` groups a chain's consecutive tokens into steps of `n` tokens per sequence, as MTP's
verify steps (1 + spec_steps tokens per sequence) and chunked decode see them.
"""

from __future__ import annotations

import numpy as np

WINDOW = 512


def uniform_trace(steps: int, batch: int, num_experts: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keys = rng.random((steps, batch, num_experts))
    return np.argpartition(keys, k, axis=-1)[..., :k].astype(np.int32)


def skewed_trace(
    steps: int,
    batch: int,
    num_experts: int,
    k: int,
    seed: int = 0,
    alpha: float = 1.8,
    uniform_mix: float = 0.2,
    p_prev: float = 0.36,
    p_recent: float = 0.55,
    ranking_seed: int | None = None,
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rank = rng.permutation(num_experts)
    if ranking_seed is not None:
        rank = np.random.default_rng([ranking_seed, 1]).permutation(num_experts)
    zipf = 1.0 / np.arange(1, num_experts + 1) ** alpha
    pop = uniform_mix / num_experts + (1 - uniform_mix) * zipf[rank] / zipf.sum()
    cdf = np.cumsum(pop)
    cdf /= cdf[-1]
    out = np.empty((steps, batch, k), dtype=np.int32)
    for b in range(batch):
        history: list[np.ndarray] = []
        for t in range(steps):
            chosen: list[int] = []
            prev = history[-1] if history else None
            recent = np.unique(np.concatenate(history[-8:])) if history else None
            u = rng.random(k)
            for i in range(k):
                e = -1
                if prev is not None and u[i] < p_prev:
                    e = int(prev[rng.integers(len(prev))])
                elif recent is not None and u[i] < p_prev + (1 - p_prev) * p_recent:
                    e = int(recent[rng.integers(len(recent))])
                while e < 0 or e in chosen:
                    e = int(np.searchsorted(cdf, rng.random()))
                chosen.append(e)
            row = np.array(chosen, dtype=np.int32)
            out[t, b] = row
            history.append(row)
            if len(history) > 8:
                history.pop(0)
    return out


def verify_steps(trace: np.ndarray, n: int) -> np.ndarray:
    """[steps, batch, k] -> [steps // n, batch * n, k]: each step holds n consecutive tokens of every chain
    (rows b * n .. b * n + n - 1 are chain b's); a trailing partial step is dropped."""
    steps, batch, k = trace.shape
    if n < 1:
        raise ValueError(f"verify_steps: {n} tokens per sequence and step; need >= 1")
    t = trace[: steps // n * n].reshape(steps // n, n, batch, k)
    return np.ascontiguousarray(t.transpose(0, 2, 1, 3)).reshape(steps // n, batch * n, k)


def trace_statistics(trace: np.ndarray, num_experts: int) -> dict[str, float]:
    """The four statistics of DESIGN.md §4, over the chains of a [steps, batch, k] trace."""
    steps, batch, k = trace.shape
    distinct = []
    for b in range(batch):
        for t0 in range(0, max(steps - WINDOW + 1, 1), WINDOW):
            distinct.append(len(np.unique(trace[t0 : t0 + WINDOW, b])))
    counts = np.bincount(trace.reshape(-1), minlength=num_experts)
    top = max(1, round(0.04 * num_experts))
    top_share = np.sort(counts)[::-1][:top].sum() / counts.sum()
    prev_hits, recent_hits, n = 0, 0, 0
    for b in range(batch):
        for t in range(1, steps):
            cur = set(trace[t, b].tolist())
            prev_hits += len(cur & set(trace[t - 1, b].tolist()))
            recent_hits += len(cur & set(trace[max(0, t - 8) : t, b].reshape(-1).tolist()))
            n += k
    return {
        f"distinct_in_{WINDOW}_tokens": float(np.mean(distinct)),
        "top4pct_share": float(top_share),
        "reuse_prev": prev_hits / max(n, 1),
        "reuse_last8": recent_hits / max(n, 1),
    }
