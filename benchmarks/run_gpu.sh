#!/usr/bin/env bash
# One prepared GPU run of the speed/memory tables (docs/PERFORMANCE.md says how to call it).
#
#   bash benchmarks/run_gpu.sh forward    # the forward table (bench_forward.py), < 8 min on an H100/H200
#   bash benchmarks/run_gpu.sh encode     # expression encoding, 81 frames (bench_encode.py), < 1 min
#
# Expects the wheels the GPU machine's Python lacks in .whl/ (diffusers, importlib_metadata; for
# `encode` also facenet-pytorch, av and a copy of ../shared/data/biden.mp4). Writes each table to
# $OUT (or /tmp/fp_gpu_out) as well as to stdout.
set -o pipefail
what=${1:-forward}
out=${OUT:-/tmp/fp_gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, \
'capability', torch.cuda.get_device_capability())" | tee -a "$out/gpu.txt" || exit 1
case "$what" in
    forward)
        timeout 540 python3 benchmarks/bench_forward.py 2>&1 | tee "$out/bench_forward.md" ;;
    encode)
        video=.whl/biden.mp4
        [ -f "$video" ] || video=../shared/data/biden.mp4
        timeout 120 python3 benchmarks/bench_encode.py --frames 81 --video "$video" 2>&1 | tee "$out/bench_encode.md"
        timeout 120 python3 benchmarks/bench_encode.py --frames 81 --video "$video" --dtype fp16 2>&1 \
            | tee -a "$out/bench_encode.md" ;;
    *)
        echo "usage: bash benchmarks/run_gpu.sh forward|encode" >&2; exit 2 ;;
esac
