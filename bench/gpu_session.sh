#!/usr/bin/env bash
# Everything a GPU check needs, in one call on a machine with a CUDA GPU and PyTorch/Triton
# installed: build the extensions, check the fused backends against the reference, time
# layers and SuperNet steps (bench/gpu_report.py), run the GPU tests. Each stage has a time cap,
# and the whole run keeps inside SECONDS, so a slow stage cannot starve the ones after it.
#
#   bash bench/gpu_session.sh OUTDIR [SECONDS] [STAGES]
#   STAGES (default "env build check supernet time tests profile"; also "tiles", "compile",
#   "big"); SUPERNET_BATCHES (default 64,128) sets the supernet stage's batch sizes
#
# The SuperNet step, the kernel profile and the depthwise tiles come before the layers: the
# layers' stage is the one that runs out of time (its 240 s cover about nine of the twelve
# shapes on an H200 with four providers; LAYER_PROVIDERS picks fewer).
#
# Writes OUTDIR/session.log (every stage's full output), check.json, supernet.json,
# report.json, and profile.json / dw_tiles*.json / compile.json / big.json when those stages
# run.
set -u
OUT=${1:?usage: gpu_session.sh OUTDIR [SECONDS] [STAGES]}
BUDGET=${2:-480}
STAGES=${3:-env build check supernet time tests profile}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/session.log"
START=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}

stage() {  # stage NAME CAP_SECONDS COMMAND...: run unless skipped; cap at the time left
    local name=$1 cap=$2; shift 2
    [[ " $STAGES " == *" $name "* ]] || return 0
    local left=$(( BUDGET - ($(date +%s) - START) ))
    (( cap > left )) && cap=$left
    if (( cap < 15 )); then echo "== $name: skipped, ${left}s left"; return 0; fi
    echo "== $name (cap ${cap}s, at $(( $(date +%s) - START ))s)" | tee -a "$LOG"
    local t0=$(date +%s) rc
    timeout -k 5 "$cap" bash -c '"$@"' stage "$@" >> "$LOG" 2>&1; rc=$?
    echo "== $name: rc $rc in $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
}

env_info() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    "$PY" -c "import torch, triton, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
    nvcc --version | tail -n 2
    nproc
}

build() {
    "$PY" - <<'PYEOF'
import time
t = time.time()
from fbnet_fast.backends import jit, fused_cuda, fused_triton
print("cpu extension:", jit.load(), jit.why_unavailable(), f"{time.time() - t:.0f}s")
t = time.time()
print("cuda ops:", fused_cuda.load_cuda_ops(), fused_cuda.CUDA_LIBRARY.why_unavailable(),
      f"{time.time() - t:.0f}s")
print("triton:", fused_triton.why_unavailable("cuda"), "cuda:", fused_cuda.why_unavailable("cuda"))
PYEOF
}

export -f env_info build
export PY
REPORT="$PY bench/gpu_report.py"
stage env 30 env_info
stage build 150 build
stage check 120 $REPORT --check-only --out "$OUT/check.json"
stage supernet 200 $REPORT --no-check --no-compile --no-layers --supernet-batches "${SUPERNET_BATCHES:-64,128}" \
    --supernet-reps 5 --providers eager_channels_last,triton --out "$OUT/supernet.json"
stage profile 60 "$PY" bench/gpu_profile.py --out "$OUT/profile.json"
stage tiles 120 bash -c "$PY bench/gpu_dw_tiles.py --out $OUT/dw_tiles.json && \
    $PY bench/gpu_dw_tiles.py --shape 24,1,56 --out $OUT/dw_tiles_24.json"
stage time 240 $REPORT --no-check --no-compile --no-supernet --reps 10 \
    --providers "${LAYER_PROVIDERS:-eager_nchw,eager_channels_last,triton,cuda}" --out "$OUT/report.json"
stage tests 130 "$PY" -m pytest -q -rs -n 8 --timeout 150 tests/test_backends.py \
    tests/test_triton_kernels.py tests/test_fused_triton.py tests/test_compile.py -k "triton or cuda"
stage compile 300 $REPORT --no-check --providers eager_channels_last,compile_default,triton \
    --no-layers --supernet-batches 128 --supernet-reps 5 --out "$OUT/compile.json"
stage big 200 $REPORT --no-check --no-compile --no-layers --supernet-batches 128,256 \
    --supernet-reps 5 --providers eager_channels_last,triton --out "$OUT/big.json"
grep -E "^(== |correctness|  (triton|cuda) |layer |supernet |[0-9]+ (passed|failed)|FAILED|ERROR|cpu extension|cuda ops|triton:)" "$LOG" | tail -n 150
