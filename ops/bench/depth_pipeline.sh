#!/usr/bin/env bash
# GLM-5.1 at its real depth: whole-model figures and llama.cpp beside them, in one detached run on the GPU machine.
#
#   start:  setsid nohup bash ops/bench/depth_pipeline.sh > /tmp/depth.out 2>&1 < /dev/null &
#   wait:   bash ops/bench/depth_pipeline.sh --wait 540   (until done or 540 s pass; then as --poll)
#   poll:   bash ops/bench/depth_pipeline.sh --poll       (stage lines, the latest headline; results into $OUT)
#
# Everything goes to $RUN (default /tmp/depth; $OUT is emptied before each device command, so the run keeps its own
# folder): pipeline.log (every stage's output), report.txt (the latest report), results.json (the report with every
# part), serve_depth.json, spec_check.json. The report runs after each part that adds to it, so a run cut off still
# leaves a report. A failed stage does not stop the ones after it. Skip one with SKIP_<NAME>=1 (DEEP, LLAMA, SLICE,
# INT4, SERVE, SPECCHECK); DEEP_ARGS, SLICE1_ARGS (both batch-1 slices), SLICE_ARGS, SERVE_ARGS, SPEC_ARGS pass
# through; SERVE_MTP (default 0,1) lists the serve runs. BUDGET_S (default 900) caps machine time: a stage whose
# estimate (below) would end past it is skipped with a line saying so, and the ones after it still get their chance.
# SMOKE=1 runs the same stages on a CPU at tiny sizes (tiny preset; llama.cpp only if a llama-bench is carried; no
# budget): a check of this script. QUIET_PID: a process started beside setup and the checkpoint (e.g. the GPU-marked
# tests) that the timed stages wait out first.
#
# Stages, most important figure first (whole-model batch-1 decode, moed FP8 vs llama.cpp Q8_0), in the order the
# host's 125 GiB allow (the full-depth checkpoint, its GGUF and the 256-expert store cannot all be resident); estimated
# machine time on the H100 machine, warm (seconds, as `fits` uses them; the 2026-12-07 run took: setup 8, ckpt 44,
# deep 251, llama_deep 158, slice1 31, slice1_int4 18, llama_slice + llama_slice_q4 215, slice 121, each report 3-4:
# 976 s in all; slice1 and slice have since gained the pinned-placement, MTP-verify and warm-up rows, ~+20 s each):
#   setup         20  carried wheels (.whl/: pyzmq, msgspec), moed importable from this checkout, machine facts;
#                     llama-bench carried (.peers/llama-bench.xz or .peers/bin/) or built here from
#                     .peers/llama.cpp-src.tar.gz in the background (nice 19, ~6 min on 16 cores, beside ckpt, deep
#                     and the conversion; a stage that ran beside it says so in its end line)
#   ckpt          45  `moed checkpoint make --preset glm51 --experts 8` into /dev/shm (78 layers, 44 GB)
#   deep         320  model.py --stage deep: non-MoE step (batch 1-64, from eager and from compiled decode graphs)
#                     and prefill (1k/8k/32k) at full depth, the offload runner in situ (batch 1); then the model
#                     loaded again with its projections kept FP8 and the non-MoE step both ways again
#   llama_deep   170  the full-depth checkpoint -> GGUF Q8_0 (GPU), checkpoint deleted; llama-bench all-GPU (decode,
#                     1k/8k prefill) and -ot exps=CPU (decode: the direct whole-model figure); GGUF deleted
#   slice1        70  model.py --stage slice --batches 1: 256-expert FP8 layers with the deployment's cache, batch 1
#   report            HEADLINE: moed FP8 vs llama.cpp Q8_0 with its experts on the CPU, measured directly at full depth
#   slice1_int4   60  the same at int4 (--expert-dtype int4; 5 GB layers, the cache at int4's bytes): the int4 row
#   report
#   llama_slice  120  1 dense + 2 MoE 256-expert checkpoint -> GGUF Q8_0; llama-bench all-GPU and -ot exps=CPU
#   report            HEADLINE: the same per-layer method for both
#   llama_slice_q4 70 the same checkpoint -> GGUF Q4_0 (llama_peer --qtype q4_0: llama-quantize's Q4_0 mix, written
#                     on the GPU; this machine has no llama-quantize), checkpoint deleted; llama-bench all-GPU and
#                     -ot exps=CPU, decode only
#   report            HEADLINE int4: moed int4 vs llama.cpp Q4_0 (per-layer method on the Q4_0 slice)
#   slice        130  model.py --stage slice: batches 2-64, prefill streaming (now and before), the depth cases
#   report
#   serve    45+165/run  serve_depth.py: moed serve at depth (checkpoint made again), MTP off then on
#   speccheck    300  spec_check.py on the same checkpoint: MTP on with compiled graphs, eager graphs and no graphs
#                     against MTP off, every replay against its step run eagerly (the batched-MTP NaN of 2026-12-07)
#   ~14.5 min to the last report before serve (+~1 if llama-bench is built here and outlasts what it overlaps); serve
#   needs BUDGET_S=1330 (both runs) or SERVE_MTP=0 and BUDGET_S=1130.
set -u
RUN=${RUN:-/tmp/depth}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PEERS=${PEERS:-$REPO/.peers}

poll() {
    grep -E "^=== " "$RUN/pipeline.log" 2>/dev/null | tail -n 24
    grep -E "^HEADLINE" "$RUN/report.txt" 2>/dev/null
    tail -n 3 "$RUN/pipeline.log" 2>/dev/null
    if [ -n "${OUT:-}" ]; then
        for f in pipeline.log report.txt results.json serve_depth.json spec_check.json; do [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/"; done
    fi
    [ -f "$RUN/done" ] && echo "PIPELINE DONE after $(cat "$RUN/done") s" || echo "pipeline still running"
}

if [ "${1:-}" = "--poll" ]; then poll; exit 0; fi
if [ "${1:-}" = "--wait" ]; then
    end=$((SECONDS + ${2:-540}))
    while [ ! -f "$RUN/done" ] && [ $SECONDS -lt $end ]; do sleep 5; done
    poll
    exit 0
fi

mkdir -p "$RUN"
rm -f "$RUN/done"
exec > >(tee -a "$RUN/pipeline.log") 2>&1
export PYTHONUNBUFFERED=1
SHM=/dev/shm
DEVICE=cuda
DEEP_MAKE="--preset glm51 --experts 8"
SLICE_MAKE="--preset glm51-slice --layers 3 --experts 256"
DEEP_SIZES="--deep-batches 1,2,8,16,32,64 --deep-offload-batches 1 --prompts 1024,8192,32768"
SLICE_SIZES=""
SLICE_REST="--batches 2,8,16,32,64 --prefill-tokens 1024,2048,8192,32768 --depth-layers 75"
LLAMA_PROMPTS=1024,8192
SERVE_SIZES=""
SPEC_SIZES=""
BUDGET_S=${BUDGET_S:-900}
if [ "${SMOKE:-0}" = 1 ]; then
    BUDGET_S=${BUDGET_S_SMOKE:-100000}  # a CPU runs the tiny sizes slower than the estimates assume
    SHM=$RUN/shm && mkdir -p "$SHM"
    DEVICE=cpu
    export TRITON_INTERPRET=1
    DEEP_MAKE="--preset tiny --experts 16"
    SLICE_MAKE="--preset tiny --layers 3 --experts 16"
    DEEP_SIZES="--deep-batches 1,2 --deep-offload-batches 1 --prompts 32 --deep-prompt 8 --deep-gen 3 \
--deep-cache-gb 0.001 --deep-step-tokens 32"
    SLICE_SIZES="--preset tiny --experts 16 --slots 5 --steps 2 --warm-steps 2 --pin-prefix 4 --pin-every 2 \
--max-slice-layers 2 --cpu-threads 1"
    SLICE_REST="--batches 2 --prefill-tokens 16 --depth-layers 2"
    LLAMA_PROMPTS=32
    SERVE_SIZES="--batches 1 --prompts 32 --prompt-len 8 --gen 3 --prefill-gen 2 --chunk 32 --slots 4"
    SPEC_SIZES="--streams 3 --prompt-len 8 --gen 4"
fi
DEEP=$SHM/glm51-deep
SLICE=$SHM/glm51-slice256

stage() {  # stage NAME COMMAND...: run it, log rc and time; never stop the pipeline
    local name=$1 t0=$SECONDS rc
    shift
    echo "=== [$(date +%T) +${SECONDS}s] $name: start"
    "$@"
    rc=$?
    echo "=== [$(date +%T) +${SECONDS}s] $name: rc=$rc in $((SECONDS - t0)) s$(build_note)$(mem_note)"
    return 0
}

mem_note() {  # host memory after a stage: the full-depth checkpoint, its GGUF and the build share 125 GiB
    awk '/^MemTotal/ {t = $2} /^MemAvailable/ {a = $2} /^Shmem:/ {s = $2}
        END {if (t) printf "; host memory: %.0f GiB available of %.0f, shared %.0f", a / 1048576, t / 1048576, s / 1048576}' \
        /proc/meminfo 2> /dev/null
}

skip() { local v="SKIP_$1"; [ "${!v:-0}" = 1 ]; }

fits() {  # fits NAME EST_S: whether a stage estimated to take EST_S seconds still fits BUDGET_S; else say so
    local left=$((BUDGET_S - SECONDS))
    [ "$2" -le "$left" ] && return 0
    echo "=== [$(date +%T) +${SECONDS}s] $1: skipped (estimated $2 s, $left s left of BUDGET_S=$BUDGET_S)"
    return 1
}

build_note() {  # a stage that ran beside the llama.cpp build says so (its CPU figures shared the cores)
    if [ -n "${LLAMA_BUILD_PID:-}" ] && kill -0 "$LLAMA_BUILD_PID" 2> /dev/null; then echo " (llama.cpp build running)"; fi
}

setup() {
    if ls "$REPO"/.whl/*.whl > /dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$REPO"/.whl/*.whl || echo "wheel install failed"
    fi
    # moed.<folder> = this checkout's folders (PEP 420 portions, as pyproject's package-dir maps them), no install.
    rm -rf /tmp/moedpath && mkdir -p /tmp/moedpath/moed
    python3 - "$REPO" <<'EOF'
import os, sys, tomllib
repo = sys.argv[1]
dirs = tomllib.load(open(os.path.join(repo, "pyproject.toml"), "rb"))["tool"]["setuptools"]["package-dir"]
for name, folder in dirs.items():
    if name.count(".") == 1:
        os.symlink(os.path.join(repo, folder), os.path.join("/tmp/moedpath", *name.split(".")))
EOF
    export PYTHONPATH=/tmp/site:/tmp/moedpath${PYTHONPATH:+:$PYTHONPATH}
    python3 -c "import moed.ops.bench.model_deep, moed.ops.bench.model_slice, moed.daemon.server, zmq, msgspec; \
print('moed importable; pyzmq', zmq.__version__)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    free -g | head -2
    if [ "${SMOKE:-0}" != 1 ]; then
        mount -o remount,size=118G /dev/shm 2> /dev/null && echo "/dev/shm resized to 118G" || echo "/dev/shm not resized"
    fi
    df -h /dev/shm /tmp | tail -n 2
    echo "THP: $(cat /sys/kernel/mm/transparent_hugepage/enabled 2> /dev/null) defrag: \
$(cat /sys/kernel/mm/transparent_hugepage/defrag 2> /dev/null)"
    ulimit -l unlimited 2> /dev/null; echo "memlock: $(ulimit -l)"
    # cuBLAS for llama.cpp: the CUDA 13 libraries torch ships (nvidia/cu13/lib), else the toolkit's.
    CUDA_LIBS=$(python3 -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'lib'))" 2> /dev/null)
    export LD_LIBRARY_PATH=${CUDA_LIBS}:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    LLAMA_BENCH=""
    # copied out of the checkout (a later device call may re-sync it while this run goes on); carried xz-compressed
    # (71 MB stripped: the device's working tree may not exceed 64 MiB)
    mkdir -p /tmp/llama-bin
    if [ -f "$PEERS/llama-bench.xz" ]; then
        xz -dc "$PEERS/llama-bench.xz" > /tmp/llama-bin/llama-bench && chmod +x /tmp/llama-bin/llama-bench
    elif [ -x "$PEERS/bin/llama-bench" ]; then
        cp "$PEERS"/bin/* /tmp/llama-bin/
    fi
    if [ -x /tmp/llama-bin/llama-bench ]; then
        LLAMA_BENCH=/tmp/llama-bin/llama-bench
        ldd "$LLAMA_BENCH" | grep -E "not found|cublas|cudart|libcuda"
        if ldd "$LLAMA_BENCH" | grep -q "not found"; then echo "carried llama-bench lacks libraries"; LLAMA_BENCH=""; fi
    fi
    # llama.cpp's source: the whole tree when llama-bench must be built here, else its converter's Python parts.
    LLAMA_SRC=/tmp/llama.cpp
    if [ -z "$LLAMA_BENCH" ] && [ -f "$PEERS/llama.cpp-src.tar.gz" ] && [ "${SMOKE:-0}" != 1 ]; then
        tar xzf "$PEERS/llama.cpp-src.tar.gz" -C /tmp
    elif [ -f "$PEERS/llama.cpp-py.tar.gz" ]; then
        tar xzf "$PEERS/llama.cpp-py.tar.gz" -C /tmp
    elif [ -f "$PEERS/llama.cpp-src.tar.gz" ]; then
        tar xzf "$PEERS/llama.cpp-src.tar.gz" -C /tmp
    fi
    export LLAMA_CPP_DIR=$LLAMA_SRC
    if [ -z "$LLAMA_BENCH" ] && [ -f "$LLAMA_SRC/CMakeLists.txt" ] && ! skip LLAMA && [ "${SMOKE:-0}" != 1 ]; then
        echo "building llama-bench in the background (nice 19, ~6 min)"
        ( cd "$LLAMA_SRC" && nice -n 19 cmake -B /tmp/llama-build -G Ninja -DGGML_CUDA=ON \
            -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
            -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_CUDA_NCCL=OFF -DCMAKE_BUILD_TYPE=Release \
            > /tmp/llama-build.log 2>&1 \
            && nice -n 19 cmake --build /tmp/llama-build --target llama-bench -j16 >> /tmp/llama-build.log 2>&1 ) &
        LLAMA_BUILD_PID=$!
        LLAMA_BENCH=/tmp/llama-build/bin/llama-bench
    fi
    echo "llama-bench: ${LLAMA_BENCH:-none}; llama.cpp source: $LLAMA_SRC"
}

wait_llama_build() {
    if [ -n "${LLAMA_BUILD_PID:-}" ]; then
        echo "waiting for the llama-bench build"; wait "$LLAMA_BUILD_PID"; echo "build rc=$?"; tail -n 2 /tmp/llama-build.log
        LLAMA_BUILD_PID=""
    fi
}

make_deep() {
    [ -f "$DEEP/config.json" ] && return 0
    # shellcheck disable=SC2086  # the *_MAKE, *_SIZES and *_ARGS are word lists
    python3 -m moed.daemon.cli checkpoint make $DEEP_MAKE --dtype fp8 --out "$DEEP" --device "$DEVICE" && du -sh "$DEEP"
}

llama_deep() {
    local gguf=$SHM/glm51-deep-q8_0.gguf
    # beside the 44 GB checkpoint the 47 GB GGUF needs a resized /dev/shm; else it goes to the disk
    [ "$(df --output=avail -B1G $SHM | tail -n 1)" -gt 52 ] || gguf=/tmp/glm51-deep-q8_0.gguf
    python3 -m moed.ops.bench.llama_peer convert "$DEEP" "$gguf" || { rm -f "$gguf"; return 1; }
    rm -rf "$DEEP"
    wait_llama_build
    [ -x "$LLAMA_BENCH" ] || { echo "no llama-bench"; rm -f "$gguf"; return 1; }
    python3 -m moed.ops.bench.llama_peer bench --llama-bench "$LLAMA_BENCH" --deep "$gguf" --prompts "$LLAMA_PROMPTS" \
        --cpu-prompts "" --out "$RUN/llama_deep.json"
    rm -f "$gguf"
}

make_slice() {  # kept for llama_slice_q4, which deletes it
    [ -f "$SLICE/config.json" ] && return 0
    # shellcheck disable=SC2086
    python3 -m moed.daemon.cli checkpoint make $SLICE_MAKE --dtype fp8 --mtp-layers 0 --out "$SLICE" \
        --device "$DEVICE" && du -sh "$SLICE"
}

llama_slice() {
    wait_llama_build
    [ -x "$LLAMA_BENCH" ] || { echo "no llama-bench"; return 1; }
    local gguf=$SHM/glm51-slice256-q8_0.gguf
    make_slice || return 1
    python3 -m moed.ops.bench.llama_peer convert "$SLICE" "$gguf" || { rm -f "$gguf"; return 1; }
    python3 -m moed.ops.bench.llama_peer bench --llama-bench "$LLAMA_BENCH" --slice "$gguf" --prompts "$LLAMA_PROMPTS" \
        --out "$RUN/llama_slice.json"
    rm -f "$gguf"
}

llama_slice_q4() {  # converts before it looks for llama-bench: a run without one (SMOKE) still checks the conversion
    local gguf=$SHM/glm51-slice256-q4_0.gguf
    make_slice || return 1
    python3 -m moed.ops.bench.llama_peer convert "$SLICE" "$gguf" --qtype q4_0 || { rm -f "$gguf"; return 1; }
    rm -rf "$SLICE"
    wait_llama_build
    [ -x "$LLAMA_BENCH" ] || { echo "no llama-bench"; rm -f "$gguf"; return 1; }
    python3 -m moed.ops.bench.llama_peer bench --llama-bench "$LLAMA_BENCH" --slice-q4 "$gguf" --prompts "" \
        --out "$RUN/llama_slice_q4.json"
    rm -f "$gguf"
}

merge_llama() { python3 -m moed.ops.bench.llama_peer merge "$RUN/llama_deep.json" "$RUN/llama_slice.json" \
    "$RUN/llama_slice_q4.json" --out "$RUN/llama.json"; }

report() {
    skip LLAMA || merge_llama > /dev/null
    python3 -m moed.ops.bench.model --stage report --work "$RUN" --llama "$RUN/llama.json" > "$RUN/report.txt.tmp"
    local rc=$?
    mv "$RUN/report.txt.tmp" "$RUN/report.txt"
    cat "$RUN/report.txt"
    return $rc
}

stage setup setup
skip DEEP && skip LLAMA || { fits ckpt 45 && stage ckpt make_deep; }
if [ -n "${QUIET_PID:-}" ] && kill -0 "$QUIET_PID" 2> /dev/null; then
    echo "=== [$(date +%T) +${SECONDS}s] waiting for process $QUIET_PID before the timed stages"
    while kill -0 "$QUIET_PID" 2> /dev/null; do sleep 1; done
fi
MODEL="python3 -m moed.ops.bench.model --device $DEVICE --work $RUN"
# shellcheck disable=SC2086
skip DEEP || { fits deep 320 && MOED_HOST_ALLOC=huge stage deep $MODEL --stage deep --ckpt "$DEEP" $DEEP_SIZES \
    ${DEEP_ARGS:-}; }
skip LLAMA || { fits llama_deep 170 && stage llama_deep llama_deep; }
rm -rf "$DEEP"
# shellcheck disable=SC2086
skip SLICE || { fits slice1 70 && stage slice1 $MODEL --stage slice --batches 1 --prefill-tokens "" --depth-layers 0 \
    $SLICE_SIZES ${SLICE1_ARGS:-}; }
stage report report
# shellcheck disable=SC2086
skip INT4 || skip SLICE || { fits slice1_int4 60 && stage slice1_int4 $MODEL --stage slice --expert-dtype int4 \
    --batches 1 --prefill-tokens "" --depth-layers 0 $SLICE_SIZES ${SLICE1_ARGS:-} && stage report report; }
skip LLAMA || { fits llama_slice 120 && stage llama_slice llama_slice && stage report report; }
skip LLAMA || { fits llama_slice_q4 70 && stage llama_slice_q4 llama_slice_q4 && stage report report; }
rm -rf "$SLICE"
# shellcheck disable=SC2086
skip SLICE || { fits slice 130 && stage slice $MODEL --stage slice --keep-decode --depth-allocs huge $SLICE_SIZES \
    $SLICE_REST ${SLICE_ARGS:-} && stage report report; }
if ! skip SERVE && fits serve $((45 + 165 * $(echo "${SERVE_MTP:-0,1}" | tr ',' '\n' | grep -c .))); then
    stage ckpt_again make_deep
    # shellcheck disable=SC2086
    MOED_HOST_ALLOC=huge stage serve python3 -m moed.ops.bench.serve_depth --model "$DEEP" --device "$DEVICE" \
        --out "$RUN/serve_depth.json" --mtp "${SERVE_MTP:-0,1}" $SERVE_SIZES ${SERVE_ARGS:-}
fi
if ! skip SPECCHECK && fits speccheck 300; then
    [ -f "$DEEP/config.json" ] || stage ckpt_again make_deep
    # shellcheck disable=SC2086
    MOED_HOST_ALLOC=huge stage speccheck python3 -m moed.ops.bench.spec_check --model "$DEEP" --device "$DEVICE" \
        --out "$RUN/spec_check.json" $SPEC_SIZES ${SPEC_ARGS:-}
fi
rm -rf "$DEEP"
echo "$SECONDS" > "$RUN/done"
echo "=== pipeline done in $SECONDS s; results: $RUN/results.json"
