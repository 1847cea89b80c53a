#!/usr/bin/env bash
# What a GPU-machine call carries, made here (a machine with the package registry) from a fresh checkout:
#   .whl/    wheels for the device image's Python (3.12) of what the image lacks: the daemon's protocol (pyzmq,
#            msgspec), the HTTP front end, the test plugins and the
#            OpenAI client the HTTP tests drive; ~9 MB
#   .peers/  llama.cpp's source from the llama-cpp-python sdist (vendor/llama.cpp), trimmed to what a CUDA build of
#            llama-bench and the GGUF converter need; ~6 MB (depth_pipeline.sh builds llama-bench from it there)
# Both folders are git-ignored; name them in the call's `carry`. Usage: bash ops/bench/device_prep.sh [--no-llama]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
# The image has torch, triton, transformers, safetensors, numpy, uvloop, prometheus-client, pytest, jinja2, tqdm.
# These are the rest, each with the dependencies the image lacks (no resolver: `--no-deps` keeps numpy and friends
# from being shadowed by other builds).
WHEELS="pyzmq msgspec fastapi starlette pydantic pydantic-core annotated-types annotated-doc typing-inspection
typing-extensions opentelemetry-api importlib-metadata zipp lazy-importer uvicorn h11 httptools anyio idna sniffio
pytest-asyncio hypothesis sortedcontainers gguf openai httpx2 httpcore2 truststore jiter pyyaml"
mkdir -p .whl
for p in $WHEELS; do
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
        --platform manylinux1_x86_64 -d .whl "$p" 2>&1 | grep -v "^WARNING: Location" || true
done
echo ".whl: $(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1)"
[ "${1:-}" = "--no-llama" ] && exit 0
# 0.3.36 vendors llama.cpp 0c1e57098, the first with GLM-5.1's glm-dsa architecture
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$PY -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==${LLAMA_CPP_PYTHON:-0.3.36}" -d "$tmp" 2>&1 \
    | grep -v "^WARNING: Location" || true
tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
src=$(echo "$tmp"/llama_cpp_python-*/vendor/llama.cpp)
# CMake adds a backend's folder only when it is enabled, and tools/ui only for the server
(cd "$src" && rm -rf models docs media tests examples pocs ci benches .github .devops tools/ui \
    ggml/src/ggml-{metal,hexagon,sycl,vulkan,opencl,cann,webgpu,zdnn,musa})
mkdir -p .peers
tar czf .peers/llama.cpp-src.tar.gz -C "$(dirname "$src")" llama.cpp
echo ".peers/llama.cpp-src.tar.gz: $(du -h .peers/llama.cpp-src.tar.gz | cut -f1)"
