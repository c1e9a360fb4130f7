#!/usr/bin/env bash
# What only an NVIDIA GPU can check, in one call of 6-7 minutes on an H200 (results/bench/README.md):
#   1. tests/test_gpu.py (channels_last, amp, compile, NCCL, CPU <-> GPU agreement, same seed = same metrics);
#   2. the README's main command with every default, on the GPU, timed;
#   3. benchmarks/bench_gpu.py (images/s per stage at batch 256, peak memory);
#   4. the CPU test suite on that machine (does anything break when CUDA is present?).
# Run from the repository root:  OUT=/tmp/gpu bash benchmarks/gpu_check.sh
# Needs torch with CUDA, numpy, scikit-learn, matplotlib, tqdm, safetensors, pillow, pytest (pytest-xdist for 4).
# agu is used from the checkout (PYTHONPATH), not installed. Shared data: $AGU_THIRD_PARTY_DIR / $AGU_MNIST_DIR,
# else .devdata/third_party and .devdata/mnist in the checkout (a copy of ../shared/data; never committed).
set -u
OUT=${OUT:-/tmp/agu-gpu-check}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export AGU_THIRD_PARTY_DIR=${AGU_THIRD_PARTY_DIR:-$PWD/.devdata/third_party}
export AGU_MNIST_DIR=${AGU_MNIST_DIR:-$PWD/.devdata/mnist}
RUN=$(mktemp -d)

section() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }

section environment
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nproc
  $PY -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

section "1. tests/test_gpu.py"
timeout 240 $PY -m pytest tests/test_gpu.py -q -p no:cacheprovider --durations=0 2>&1 | tee "$OUT/test_gpu.log"

section "2. agu run digits --classifier digits --forget 1, defaults, --device cuda (twice: same metrics?)"
for k in 1 2; do
  start=$(date +%s%N)
  timeout 180 $PY -m agu_lib.cli run digits --classifier digits --forget 1 --out "$RUN/forget-1-$k" --device cuda \
    --quiet 2>&1 | tee -a "$OUT/run.log"
  echo "wall ms: $(( ($(date +%s%N) - start) / 1000000 ))" | tee -a "$OUT/run.log"
done
cp "$RUN/forget-1-1/metrics.json" "$OUT/run_metrics.json" 2>/dev/null
$PY - "$RUN/forget-1-1/metrics.json" "$RUN/forget-1-2/metrics.json" <<'EOF2' 2>&1 | tee -a "$OUT/run.log"
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
a.pop("seconds"), b.pop("seconds")
print("same metrics in both runs:", a == b)
EOF2

section "3. benchmarks/bench_gpu.py"
[ "${BENCH:-1}" = 1 ] && \
timeout 150 $PY benchmarks/bench_gpu.py --steps 20 --reps 2 --amp --json "$OUT/gpu.json" 2>&1 | tail -n 40 | tee "$OUT/bench.log"

section "4. the CPU test suite with CUDA present"
timeout "${SUITE_TIMEOUT:-120}" $PY -m pytest tests -q -p no:cacheprovider -n "${SUITE_JOBS:-12}" \
  --ignore tests/test_gpu.py --ignore tests/test_notebooks.py --ignore tests/test_packaging.py 2>&1 | tail -n 60 \
  | tee "$OUT/suite.log"
section done
