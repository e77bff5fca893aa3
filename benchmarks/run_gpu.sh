#!/usr/bin/env bash
# Prepared GPU runs of the speed/memory tables, one step per device call (docs/PERFORMANCE.md says
# how to call them). Steps in order of importance; each finishes well inside one 10-minute call on
# an H100/H200 (estimates from the H100 reference figures in ../shared/reference/README.md:
# 1.9 s per bare 512² forward, 12.8 s at 720p, about a minute per inductor compile of the block)
# and writes its rows to $OUT/<step>.md as they finish, so a step cut short keeps the rows done.
#
#   bash benchmarks/run_gpu.sh forward-512    # 512²: bare vs ours, fast mode, the 6 GB plan (~4-5 min)
#   bash benchmarks/run_gpu.sh forward-720a   # 720p bf16 resident rows (~3-4 min)
#   bash benchmarks/run_gpu.sh forward-720b   # 720p fast mode (fp8 matmul + compile) (~3-4 min)
#   bash benchmarks/run_gpu.sh forward-720c   # 720p low-VRAM plan, fp8 + block offload (~2-3 min)
#   bash benchmarks/run_gpu.sh encode         # expression encoding, 81 frames (bench_encode.py), < 1 min
#
# `forward` is kept as a name for `forward-512`. Expects the wheels the GPU machine's Python lacks
# in .whl/ (diffusers, importlib_metadata; for `encode` also facenet-pytorch, av and a copy of
# ../shared/data/biden.mp4). Writes each table to $OUT (or /tmp/fp_gpu_out) and to stdout.
set -o pipefail
what=${1:-forward-512}
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
forward() {  # forward STEP ARGS...: one bench_forward.py call, its own table file, a hard time limit
    local step=$1; shift
    timeout 560 python3 benchmarks/bench_forward.py "$@" 2>&1 | tee "$out/$step.md"
}
case "$what" in
    forward|forward-512)
        forward forward-512 --sizes 512x512 --phases A,B,C ;;
    forward-720a)
        forward forward-720a --sizes 1280x720 --phases A ;;
    forward-720b)
        forward forward-720b --sizes 1280x720 --phases B ;;
    forward-720c)
        forward forward-720c --sizes 1280x720 --phases C ;;
    encode)
        video=.whl/biden.mp4
        [ -f "$video" ] || video=../shared/data/biden.mp4
        timeout 120 python3 benchmarks/bench_encode.py --frames 81 --video "$video" 2>&1 | tee "$out/bench_encode.md"
        timeout 120 python3 benchmarks/bench_encode.py --frames 81 --video "$video" --dtype fp16 2>&1 \
            | tee -a "$out/bench_encode.md" ;;
    *)
        echo "usage: bash benchmarks/run_gpu.sh forward-512|forward-720a|forward-720b|forward-720c|encode" >&2; exit 2 ;;
esac
