#!/usr/bin/env bash
# Issue 20, GPU backend: checks and figures on the GPU machine in one call (about 3 to 4
# minutes on an H100 with 16 cores). From the repository root:
#
#   bash bench/gpu_device.sh
#
# Needs only numpy, threadpoolctl and cupy besides the source. Runs bench.gpu: a self-check
# of every mode against float64 plaintext and against numpy running the same code, then
# 1M and 4M realistic vectors (as bench.engine draws them), near and fresh queries, single
# queries and batches of 64, numpy float32 on every core in the same run, the bare device
# scans, and segment files loaded into GPU memory. JSON and the log go to $OUT.
set -uo pipefail
OUT="${OUT:-/tmp/radcrypt-gpu}"
PY="${PYTHON:-python3}"
N="${N:-1000000,4000000}"  # a smaller N for a smoke test
QUERIES="${QUERIES:-100}"
LIMIT="${LIMIT:-400}"      # seconds: the JSON is written after every stage
DEVICE="${DEVICE:-cuda}"
SKIP="${SKIP:-}"           # e.g. load,raw: stages to leave out (bench/gpu.py --skip)
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
FEATURES=""
for f in bench/data/real-features-v1.npy .gpu-carry/real-features-v1.npy; do
  if [ -f "$f" ]; then FEATURES="--features $f"; break; fi
done
{
  echo "== $(date -u +%FT%TZ) $(uname -n): $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem \
    --format=csv 2>&1 || true
  "$PY" -c "import numpy, threadpoolctl, cupy; print('numpy', numpy.__version__, 'cupy', cupy.__version__)"
  timeout "$LIMIT" "$PY" -m bench.gpu --device "$DEVICE" --n "$N" --queries "$QUERIES" \
    --batch 64 --skip "$SKIP" $FEATURES --json "$OUT/gpu.json"
  echo "== exit $? at $(date -u +%FT%TZ)"
} 2>&1 | tee "$OUT/gpu_device.log"
