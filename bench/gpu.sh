#!/bin/bash
# How the GPU figures in docs/performance.md are taken, on a machine with an NVIDIA GPU, a CUDA
# build of torch and the engine extra (run from the repository root):
#
#   bench/gpu.sh [first|second|all] [OUTDIR]
#
# `first`: the engine on the GPU with every sampler (bench/gpu_smoke.py), then real-size SD1.5
# (512x512, 20 steps): our engine against bare diffusers at batch 1, 8 compatible jobs through the
# API one at a time and as one batch, and compiled (ENGINE_COMPILE) in the `default` and
# `reduce-overhead` modes. `second`: real-size SDXL (1024x1024, 30 steps), the same without
# compiling. The models are random-weight (timing equals real weights), built once under
# $KEEP (default /tmp/a1111-proxy-bench) and reused. Each step has a time limit and its own log
# in OUTDIR; a failing step does not stop the next.
set -u
phase=${1:-all}
out=${2:-${OUT:-/tmp/a1111-proxy-gpu}}
keep=${KEEP:-/tmp/a1111-proxy-bench}
py=${PYTHON:-python3}
mkdir -p "$out" "$keep"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"

step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s) $(date +%T)"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    grep -v -e Warning -e warn -e deprecat "$out/$name.log" | tail -n 40
    echo "== $name: exit $rc $(date +%T)"
}

real=("$py" bench/engine.py --real --skip-tiny --keep "$keep")  # on the kept models

if [ "$phase" = first ] || [ "$phase" = all ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$py" -c 'import torch, diffusers, transformers; print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)'
    # The real-size models are built (on the CPU) while the smoke run goes; nothing is timed then.
    "${real[@]}" --build-only >"$out/build.log" 2>&1 &
    builder=$!
    step smoke 100 "$py" bench/gpu_smoke.py
    wait $builder
    echo "== models built: exit $? $(date +%T)"
    step sd15 150 "${real[@]}" --only sd15 --runs 3 --jobs 8
    step sd15-compile 100 "${real[@]}" --only sd15 --no-api --no-batch4 --runs 3 --compile
    step sd15-compile-ro 100 "${real[@]}" --only sd15 --no-api --no-batch4 --runs 3 --compile \
        --compile-mode reduce-overhead
fi
if [ "$phase" = second ]; then  # the batching scenario again, after a first run that had none
    step sd15-api 130 "${real[@]}" --only sd15 --no-batch4 --runs 3 --jobs 8
fi
if [ "$phase" = compiled ] || [ "$phase" = all ]; then  # batching on the compiled UNet
    step sd15-api-compiled 250 "${real[@]}" --only sd15 --api-only --runs 3 --jobs 8 --compile \
        --compile-mode reduce-overhead
fi
if [ "$phase" = second ] || [ "$phase" = all ]; then
    step sdxl 290 "${real[@]}" --only sdxl --no-batch4 --runs 2 --jobs 8
fi
