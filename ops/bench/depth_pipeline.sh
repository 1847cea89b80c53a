#!/usr/bin/env bash
# GLM-5.1 at its real depth, whole-model figures and llama.cpp beside them, in one detached run on the GPU machine.
#
#   start:  setsid nohup bash ops/bench/depth_pipeline.sh > /tmp/depth.out 2>&1 < /dev/null &
#   poll:   bash ops/bench/depth_pipeline.sh --poll        (progress; copies the results into $OUT when done)
#
# Everything goes to $RUN (default /tmp/depth; $OUT is emptied before each device command, so the run keeps its own
# folder): pipeline.log (every stage's output), results.json (the report with every part), and the parts' JSON.
# Stages, in the order the host's 125 GiB allow (the full-depth checkpoint, its GGUF, the 256-expert store and pinned
# stores cannot all be resident): each prints progress, its exit code and elapsed time, and a failed stage does not
# stop the ones after it. Skip one with SKIP_<NAME>=1 (SERVE, DEEP, LLAMA, SLICE); SERVE_MTP (default 0,1: MTP off,
# then on) and SERVE_ARGS / DEEP_ARGS / SLICE_ARGS pass through to the stages (e.g. SLICE_ARGS="--depth-allocs huge").
# Machine time, estimated: setup 0.3 min, ckpt 0.7, llama_deep 3 (+4 if llama-bench is built here), serve 5,
# deep 3, llama_slice 2.5, slice 4, report 0.1: ~19 min (~23 with the build); without the MTP-on serve run ~16.
#   setup        carried wheels (.whl/: pyzmq, msgspec), moed importable from this checkout, machine facts
#                (GPU, RAM, /dev/shm, transparent huge pages), llama.cpp binaries (.peers/: carried, else built here
#                in the background while checkpoints are written, ~6 min on 16 cores)
#   ckpt         `moed checkpoint make --preset glm51 --experts 8` into /dev/shm (78 layers, 44 GB, ~40 s)
#   llama_deep   the full-depth checkpoint -> GGUF Q8_0 (GPU; a llama-bench build, if one runs, overlaps only this),
#                llama-bench all-GPU and -ot exps=CPU; GGUF deleted
#   serve        ops/bench/serve_depth.py: moed serve at depth, MTP off then on, clients at batch 1/8/32 and
#                1k/8k/32k prompts
#   deep         ops/bench/model.py --stage deep: non-MoE step time at depth, the offload runner in situ; then the
#                full-depth checkpoint is deleted
#   llama_slice  a 1-dense + 2-MoE 256-expert checkpoint -> GGUF Q8_0, llama-bench all-GPU, exps=CPU, --n-cpu-moe 1
#   slice        ops/bench/model.py --stage slice: 256-expert MoE layers with the deployment's cache, prefill
#                streaming, the one-layer vs 75-layer cases (torch vs huge-page host slabs)
#   report       ops/bench/model.py --stage report: whole-model tables and the moed / llama.cpp headline
set -u
RUN=${RUN:-/tmp/depth}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PEERS=${PEERS:-$REPO/.peers}

if [ "${1:-}" = "--poll" ]; then
    grep -E "^=== " "$RUN/pipeline.log" 2>/dev/null | tail -n 20
    tail -n 4 "$RUN/pipeline.log" 2>/dev/null
    if [ -n "${OUT:-}" ]; then
        cp "$RUN/pipeline.log" "$OUT/" 2>/dev/null
        for f in results.json serve_depth.json llama.json; do [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/"; done
    fi
    [ -f "$RUN/done" ] && echo "PIPELINE DONE after $(cat "$RUN/done") s" || echo "pipeline still running"
    exit 0
fi

mkdir -p "$RUN"
rm -f "$RUN/done"
exec > >(tee -a "$RUN/pipeline.log") 2>&1
export PYTHONUNBUFFERED=1
SHM=/dev/shm
DEEP=$SHM/glm51-deep
SLICE=$SHM/glm51-slice256

stage() {  # stage NAME COMMAND...: run it, log rc and time; never stop the pipeline
    local name=$1 t0=$SECONDS rc
    shift
    echo "=== [$(date +%T) +${SECONDS}s] $name: start"
    "$@"
    rc=$?
    echo "=== [$(date +%T) +${SECONDS}s] $name: rc=$rc in $((SECONDS - t0)) s"
    return 0
}

skip() { local v="SKIP_$1"; [ "${!v:-0}" = 1 ]; }

setup() {
    if ls "$REPO"/.whl/*.whl > /dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$REPO"/.whl/*.whl || echo "wheel install failed"
    fi
    # moed.<folder> = this checkout's folders (PEP 420 portions), without an install.
    mkdir -p /tmp/moedpath/moed
    for d in model attention kernels moe_configs offload engine daemon client ops; do
        ln -sfn "$REPO/$d" "/tmp/moedpath/moed/$d"
    done
    export PYTHONPATH=/tmp/site:/tmp/moedpath${PYTHONPATH:+:$PYTHONPATH}
    python3 -c "import moed.ops.bench.model, zmq, msgspec; print('moed importable; pyzmq', zmq.__version__)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    free -g | head -2
    mount -o remount,size=118G /dev/shm 2> /dev/null && echo "/dev/shm resized to 118G" || echo "/dev/shm not resized"
    df -h /dev/shm /tmp | tail -n 2
    echo "THP: $(cat /sys/kernel/mm/transparent_hugepage/enabled 2> /dev/null) defrag: \
$(cat /sys/kernel/mm/transparent_hugepage/defrag 2> /dev/null)"
    ulimit -l unlimited 2> /dev/null; echo "memlock: $(ulimit -l)"
    # cuBLAS for llama.cpp: the CUDA 13 libraries torch ships (nvidia/cu13/lib), else the toolkit's.
    CUDA_LIBS=$(python3 -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'lib'))" 2> /dev/null)
    export LD_LIBRARY_PATH=${CUDA_LIBS}:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    LLAMA_BENCH=""
    if [ -x "$PEERS/bin/llama-bench" ]; then
        # copied out of the checkout: a later device call may re-sync it while this run goes on
        mkdir -p /tmp/llama-bin && cp "$PEERS"/bin/* /tmp/llama-bin/
        LLAMA_BENCH=/tmp/llama-bin/llama-bench
        ldd "$LLAMA_BENCH" | grep -E "not found|cublas|cudart|libcuda"
        if ldd "$LLAMA_BENCH" | grep -q "not found"; then echo "carried llama-bench lacks libraries"; LLAMA_BENCH=""; fi
    fi
    # llama.cpp's source: the whole tree when llama-bench must be built here, else its converter's Python parts.
    LLAMA_SRC=/tmp/llama.cpp
    if [ -z "$LLAMA_BENCH" ] && [ -f "$PEERS/llama.cpp-src.tar.gz" ]; then
        tar xzf "$PEERS/llama.cpp-src.tar.gz" -C /tmp
    elif [ -f "$PEERS/llama.cpp-py.tar.gz" ]; then
        tar xzf "$PEERS/llama.cpp-py.tar.gz" -C /tmp
    elif [ -f "$PEERS/llama.cpp-src.tar.gz" ]; then
        tar xzf "$PEERS/llama.cpp-src.tar.gz" -C /tmp
    fi
    export LLAMA_CPP_DIR=$LLAMA_SRC
    if [ -z "$LLAMA_BENCH" ] && [ -f "$LLAMA_SRC/CMakeLists.txt" ] && ! skip LLAMA; then
        echo "building llama-bench in the background (~6 min)"
        ( cd "$LLAMA_SRC" && cmake -B /tmp/llama-build -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
            -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
            -DLLAMA_BUILD_SERVER=OFF -DGGML_CUDA_NCCL=OFF -DCMAKE_BUILD_TYPE=Release > /tmp/llama-build.log 2>&1 \
            && nice -n 5 cmake --build /tmp/llama-build --target llama-bench -j14 >> /tmp/llama-build.log 2>&1 ) &
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

make_deep() { python3 -m moed.daemon.cli checkpoint make --preset glm51 --dtype fp8 --experts 8 --out "$DEEP" --device cuda \
    && du -sh "$DEEP"; }

llama_deep() {
    local gguf=$SHM/glm51-deep-q8_0.gguf
    # beside the 44 GB checkpoint the 47 GB GGUF needs a resized /dev/shm; else it goes to the disk
    [ "$(df --output=avail -B1G $SHM | tail -n 1)" -gt 52 ] || gguf=/tmp/glm51-deep-q8_0.gguf
    python3 -m moed.ops.bench.llama_peer convert "$DEEP" "$gguf" || return 1  # overlaps a llama-bench build
    wait_llama_build
    [ -x "$LLAMA_BENCH" ] || { echo "no llama-bench"; rm -f "$gguf"; return 1; }
    python3 -m moed.ops.bench.llama_peer bench --llama-bench "$LLAMA_BENCH" --deep "$gguf" --out "$RUN/llama_deep.json"
    rm -f "$gguf"
}

llama_slice() {
    [ -x "$LLAMA_BENCH" ] || { echo "no llama-bench"; return 1; }
    local gguf=$SHM/glm51-slice256-q8_0.gguf
    python3 -m moed.daemon.cli checkpoint make --preset glm51-slice --dtype fp8 --layers 3 --experts 256 \
        --mtp-layers 0 --out "$SLICE" --device cuda || return 1
    python3 -m moed.ops.bench.llama_peer convert "$SLICE" "$gguf"
    rm -rf "$SLICE"
    python3 -m moed.ops.bench.llama_peer bench --llama-bench "$LLAMA_BENCH" --slice "$gguf" --out "$RUN/llama_slice.json"
    rm -f "$gguf"
}

merge_llama() { python3 -m moed.ops.bench.llama_peer merge "$RUN/llama_deep.json" "$RUN/llama_slice.json" \
    --out "$RUN/llama.json"; }

stage setup setup
if ! skip SERVE || ! skip DEEP || ! skip LLAMA; then stage ckpt make_deep; fi
skip LLAMA || stage llama_deep llama_deep
# shellcheck disable=SC2086  # the *_ARGS are word lists
skip SERVE || stage serve python3 -m moed.ops.bench.serve_depth --model "$DEEP" --out "$RUN/serve_depth.json" \
    --mtp "${SERVE_MTP:-0,1}" ${SERVE_ARGS:-}
# shellcheck disable=SC2086
skip DEEP || stage deep python3 -m moed.ops.bench.model --stage deep --ckpt "$DEEP" --work "$RUN" ${DEEP_ARGS:-}
rm -rf "$DEEP"
skip LLAMA || stage llama_slice llama_slice
skip LLAMA || stage llama_merge merge_llama
# shellcheck disable=SC2086
skip SLICE || stage slice python3 -m moed.ops.bench.model --stage slice --work "$RUN" ${SLICE_ARGS:-}
stage report python3 -m moed.ops.bench.model --stage report --work "$RUN" --llama "$RUN/llama.json"
echo "$SECONDS" > "$RUN/done"
echo "=== pipeline done in $SECONDS s; results: $RUN/results.json"
