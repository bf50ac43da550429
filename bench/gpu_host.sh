#!/usr/bin/env bash
# Run bench/gpu.py on a GPU host that has JAX (and PyTorch) but no TensorFlow and no network.
#
# Two steps, both from the repository root:
#
#   1. Here, on a machine with network access: fetch the wheels the host lacks into .whl/
#      (Keras and its deps that such hosts usually miss; pure Python except optree):
#          bench/gpu_host.sh fetch
#      Copy the repository, .whl/ included, to the GPU host (or carry .whl along).
#
#   2. On the GPU host (no network needed):
#          bench/gpu_host.sh run                # KERAS_BACKEND=jax
#          bench/gpu_host.sh run jax torch      # one run per backend
#      Results: $RESULTS (default bench/results/)/gpu-<backend>.json and .md; paste the table
#      into docs/benchmarks.md with the card named.
#
# Environment: PYTHON (default python3; on the lent H100/H200 image that is Python 3.12 with
# jax 0.11 + CUDA 13 and torch 2.11), PY_VERSION (3.12) and PLATFORMS for fetch, RESULTS,
# SITE (where the wheels are installed, default /tmp/retrain-site), BENCH_ARGS (extra
# arguments for bench/gpu.py, e.g. "--steps 100").
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/retrain-site}
RESULTS=${RESULTS:-bench/results}
# Keras 3 and what the GPU image lacks of its requirements (absl-py, h5py, ml-dtypes, numpy,
# packaging and rich are already there). Same Keras version as requirements.txt.
PACKAGES=(keras==3.15.1 namex==0.1.0 optree==0.20.0)

fetch() {
    local py=${PY_VERSION:-3.12}
    local platforms=${PLATFORMS:-"manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64"}
    local args=()
    for p in $platforms; do args+=(--platform "$p"); done
    mkdir -p "$WHEELS"
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "$py" \
        --implementation cp "${args[@]}" -d "$WHEELS" "${PACKAGES[@]}"
    ls -l "$WHEELS"
}

run() {
    local backends=("$@")
    [ ${#backends[@]} -gt 0 ] || backends=(jax)
    if ! "$PYTHON" -c "import keras" 2>/dev/null; then
        ls "$WHEELS"/*.whl >/dev/null 2>&1 || {
            echo "Keras is not installed and $WHEELS/ holds no wheels: run 'bench/gpu_host.sh fetch' on a machine with network first." >&2
            exit 2
        }
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$SITE" "$WHEELS"/*.whl
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
    mkdir -p "$RESULTS"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
    for backend in "${backends[@]}"; do
        echo "== KERAS_BACKEND=$backend" >&2
        # shellcheck disable=SC2086  # BENCH_ARGS is a list of words on purpose
        KERAS_BACKEND=$backend PYTHONUNBUFFERED=1 "$PYTHON" bench/gpu.py --backend "$backend" \
            --out "$RESULTS/gpu-$backend.json" ${BENCH_ARGS:-} | tee "$RESULTS/gpu-$backend.md"
    done
}

case "${1:-}" in
    fetch) fetch ;;
    run) shift; run "$@" ;;
    *)
        echo "usage: bench/gpu_host.sh fetch | run [jax] [torch]" >&2
        exit 2
        ;;
esac
