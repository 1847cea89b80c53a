#!/usr/bin/env bash
# The short check on the GPU machine, in one call: every GPU-marked test, then the offload bench's int4 (with the
# int4 fused-MoE kernel's check and timing) and column-split entries against the same run's ceilings. It is
# device_session.sh run in the foreground without the depth pipeline.
#
#   bash ops/bench/gpu_check.sh      knobs: TESTS_S (170), DEADLINE_S (420, tests and bench), ONLY (ceil,cpu,hybrid,int4,split)
#
# Carry .whl/ (ops/bench/device_prep.sh). Results go to $RUN (default /tmp/moed-gpu-check) and, when set, $OUT:
# gpu_tests.log, offload.json, offload.log.
set -u
here=$(dirname "$0")
export RUN=${RUN:-/tmp/moed-gpu-check}
SKIP_PIPE=1 SPLIT_ONLY=none OFFLOAD_ONLY=${ONLY:-ceil,cpu,hybrid,int4,split} DEADLINE_S=${DEADLINE_S:-420} \
    bash "$here/device_session.sh" > /dev/null
bash "$here/device_session.sh" --wait 0
