#!/usr/bin/env bash
# A change's check on the GPU machine in one call: the GPU-marked tests on this tree, then the offload and the
# engine benchmarks on an older tree and on this one (same machine, same checkpoints, ceilings measured in each
# run), and a table of the figures that moved. Everything lands in $OUT; the table is the last thing printed.
#
#   bash ops/bench/before_after.sh BEFORE_DIR
#
# BEFORE_DIR: the older tree, e.g. made beside this one with `git archive main | tar -x -C before` (an untracked,
# unignored folder travels to the device with the working tree). Each tree is installed in turn (pip -e, no deps).
# Both trees read the same checkpoints, made first on the GPU by this tree (OFFLOAD_CKPT, ENGINE_CKPT; an older
# offload bench generates on the host, which takes minutes).
# Knobs: PYTHON (python3), OFFLOAD_ARGS, ENGINE_ARGS (both trees), AFTER_ENGINE_ARGS (this tree only, after
# ENGINE_ARGS: settings whose default changed since, so that both trees run the same engine; default
# --compile-decode off), BENCHES (offload,engine: which pairs run), SKIP_TESTS=1, CLEAN=1 (delete the checkpoints at
# the end).
set -uo pipefail
BEFORE=$(realpath "${1:?usage: before_after.sh BEFORE_DIR}")
AFTER=$(realpath "$(dirname "$0")/../..")
OUT=${OUT:-/tmp/moed-before-after}
PY=${PYTHON:-python3}
OFFLOAD_ARGS=${OFFLOAD_ARGS:---experts 128 --steps 10 --warm-steps 6 --only ceil,cpu,hybrid,decode}
ENGINE_ARGS=${ENGINE_ARGS:---concurrency 1,8 --spec-steps 2 --overlap on --miss-service hybrid}
AFTER_ENGINE_ARGS=${AFTER_ENGINE_ARGS:---compile-decode off}
OFFLOAD_CKPT=${OFFLOAD_CKPT:-/dev/shm/moed-offload}
ENGINE_CKPT=${ENGINE_CKPT:-/dev/shm/moed-glm51-slice}
BENCHES=${BENCHES:-offload,engine}
mkdir -p "$OUT"

install() {  # tree
    (cd "$1" && $PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1) \
        || { echo "pip install -e $1 failed: $OUT/install.log"; tail -20 "$OUT/install.log"; exit 1; }
}

make_checkpoints() {  # as both trees' benches would make them, once
    install "$AFTER"
    (cd /tmp && $PY - "$OFFLOAD_CKPT" "$ENGINE_CKPT" "$OFFLOAD_ARGS" <<'EOF'
import sys
from pathlib import Path

from moed.model.checkpoint import make_checkpoint

offload, engine, offload_args = sys.argv[1:]
words = offload_args.split()
experts = int(words[words.index("--experts") + 1]) if "--experts" in words else 128  # the offload bench's default
if not (Path(offload) / "model.safetensors.index.json").exists():
    make_checkpoint(offload, "glm51-slice", dtype="fp8", layers=2, experts=experts, mtp_layers=0, device="cuda")
if not (Path(engine) / "config.json").exists():
    make_checkpoint(engine, "glm51-slice", dtype="fp8", seed=0, device="cuda")
EOF
    ) >"$OUT/checkpoints.log" 2>&1 || { echo "checkpoints failed: $OUT/checkpoints.log"; tail -5 "$OUT/checkpoints.log"; }
}

# One bench on each tree in turn (offload, then engine), so a run cut short still has one complete comparison.
offload_bench() {  # name tree
    install "$2"
    # From /tmp so that nothing imports the tree's folders by their bare names.
    # shellcheck disable=SC2086
    (cd /tmp && timeout 900 $PY -m moed.ops.bench.offload $OFFLOAD_ARGS --ckpt "$OFFLOAD_CKPT" \
        --out "$OUT/$1_offload.json") >"$OUT/$1_offload.log" 2>&1 \
        || echo "$1 offload bench failed (rc $?): $OUT/$1_offload.log"
}

engine_bench() {  # name tree [engine args for this tree only]
    install "$2"
    # shellcheck disable=SC2086
    (cd /tmp && timeout 900 $PY -m moed.ops.bench.engine $ENGINE_ARGS ${3:-} --ckpt "$ENGINE_CKPT" \
        --out "$OUT/$1_engine.json") >"$OUT/$1_engine.log" 2>&1 \
        || echo "$1 engine bench failed (rc $?): $OUT/$1_engine.log"
}

if [ "${SKIP_TESTS:-0}" != 1 ]; then
    install "$AFTER"
    (cd "$AFTER" && $PY -m pytest -q -m gpu tests) >"$OUT/gpu_tests.log" 2>&1
    echo "GPU-marked tests (after): rc $?; $(tail -1 "$OUT/gpu_tests.log")"
fi
make_checkpoints
if [[ ",$BENCHES," == *,offload,* ]]; then
    offload_bench before "$BEFORE"
    offload_bench after "$AFTER"
fi
if [[ ",$BENCHES," == *,engine,* ]]; then
    engine_bench before "$BEFORE"
    engine_bench after "$AFTER" "$AFTER_ENGINE_ARGS"
fi
install "$AFTER"
[ "${CLEAN:-0}" = 1 ] && rm -rf "$OFFLOAD_CKPT" "$ENGINE_CKPT"

$PY - "$OUT" <<'EOF'
"""Figures of both runs side by side: times (ms), rates (GB/s, tok/s) and hit rates, after / before."""
import json
import re
import sys
from pathlib import Path

out = Path(sys.argv[1])
WANTED = re.compile(r"(^|\.)(ms|graph_ms|step_ms|ms_per_token|decode_tok_s|hit_rate|[a-z_]*GBps|vs_host_read)$")


def flat(v, key=""):
    if isinstance(v, dict):
        for k, x in v.items():
            yield from flat(x, f"{key}.{k}" if key else str(k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            label = ",".join(f"{k}={x[k]}" for k in ("spec_steps", "graphs", "overlap", "concurrency", "trace",
                                                      "policy", "batch", "cache_pct") if isinstance(x, dict) and k in x)
            yield from flat(x, f"{key}[{label or i}]")
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
        yield key, float(v)


for bench in ("offload", "engine"):
    paths = [out / f"{side}_{bench}.json" for side in ("before", "after")]
    if not all(p.exists() for p in paths):
        print(f"{bench}: missing {[str(p) for p in paths if not p.exists()]}")
        continue
    before, after = (dict(flat(json.loads(p.read_text()))) for p in paths)
    rows = [(k, before[k], after[k]) for k in after if k in before and WANTED.search(k) and before[k]]
    print(f"\n== {bench}: after / before ({len(rows)} figures) ==")
    for k, b, a in rows:
        print(f"{a / b:6.3f}  {b:12.4f} -> {a:12.4f}  {k}")
EOF
