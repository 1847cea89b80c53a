#!/usr/bin/env bash
# The short check on the GPU machine, in one call: every GPU-marked test, then the offload bench's int4 (with the
# int4 fused-MoE kernel's check and timing) and column-split entries against the same run's ceilings.
#
#   bash ops/bench/gpu_check.sh      knobs: TESTS_S (150), BENCH_S (240), ONLY (ceil,cpu,hybrid,int4,split)
#
# Wheels carried in .whl/ (pyzmq, msgspec: the device image lacks them) are installed into /tmp/site first.
# Results go to $OUT (default /tmp/moed-gpu-check): gpu_tests.log, offload.json, offload.log.
set -u
OUT=${OUT:-/tmp/moed-gpu-check}
mkdir -p "$OUT"
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        > "$OUT/wheels.log" 2>&1 || echo "wheel install failed: $OUT/wheels.log"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || tail -5 "$OUT/install.log"
t0=$SECONDS
timeout "${TESTS_S:-150}" python3 -m pytest -p no:cacheprovider -rfE -v -m gpu tests > "$OUT/gpu_tests.log" 2>&1
echo "GPU-marked tests: rc=$? in $((SECONDS - t0)) s"
grep -E "FAILED|ERROR" "$OUT/gpu_tests.log" | sed 's/ *\[.*%\]//' | head -30
tail -n 2 "$OUT/gpu_tests.log"
t0=$SECONDS
# from /tmp, so nothing imports the checkout's folders by their bare names
(cd /tmp && timeout "${BENCH_S:-240}" python3 -m moed.ops.bench.offload --only "${ONLY:-ceil,cpu,hybrid,int4,split}" \
    --int4-kernel --steps 16 --out "$OUT/offload.json") > "$OUT/offload.log" 2>&1
echo "offload bench: rc=$? in $((SECONDS - t0)) s"
tail -n 60 "$OUT/offload.log"
