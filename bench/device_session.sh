#!/usr/bin/env bash
# Every check that needs the 16-core GPU machine, in one call of the run tool (a session
# has 15 minutes of device time, one start of which costs one or two): the figures the
# issues still lack first, each stage capped so that a slow one cannot starve the next,
# every stage writing its JSON as it goes (what is under $OUT comes back even when the
# call runs out of time). From the repository root, with the run tool:
#
#   command "bash bench/device_session.sh", carry ["vendor/py312"] (TenSEAL for Python
#   3.12: see bench/ckks_device.sh), timeout_s 600
#
# 1. GPU at 1M (issue 20): self-check against numpy, single queries and batches near and
#    fresh, the segment files into device memory by the loader and by the service's own
#    path (bench/gpu.py segment_load).                                  ~2-3 minutes
# 2. CKKS on every core against one worker (issue 19: "what a 16-core server gives").
#                                                                       ~2 minutes
# 3. The CPU engine on 16 threads against numpy float32 on 16 cores, and the same
#    indexes on 2, 4 and 8 threads (issue 20).                          ~3 minutes
# 4. GPU at 4M (issue 20), in whatever time is left.
# Files back (8 at most): gpu_device.log, gpu.json, ckks-<cores>cores.json,
# ckks-1worker.json, ckks_device.log, engine-16threads.json, cpu_device.log, gpu-4m.json.
set -uo pipefail
OUT="${OUT:-/tmp/radcrypt-device}"
BUDGET="${BUDGET:-585}"  # seconds for the whole script
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
started=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - started) )); }
capped() {  # capped SECONDS command...: at most SECONDS, never past the budget
  local cap=$1; shift
  local remaining; remaining=$(left)
  (( remaining < cap )) && cap=$remaining
  if (( cap < 20 )); then echo "== skipped (budget spent): $*"; return 0; fi
  echo "== $(date -u +%T) up to ${cap}s: $*"
  timeout "$cap" "$@"
  echo "== exit $? after $(( $(date +%s) - started ))s"
}

echo "== $(date -u +%FT%TZ) $(uname -n): $(nproc) CPUs"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
# A smoke test here (no GPU): SMOKE=1 PYTHON=.venv/bin/python bash bench/device_session.sh
if [ -n "${SMOKE:-}" ]; then
  sizes=(DEVICE=cpu N=20000 QUERIES=5) ckks=(N=2000 QUERIES=3) cpu=(N=50000 QUERIES=5)
  big=(--device cpu --n 40000)
else
  sizes=(N=1000000 QUERIES=100) ckks=(N=10000,100000 QUERIES=30) cpu=()
  big=(--n 4000000)
fi
capped 200 env OUT="$OUT" "${sizes[@]}" LIMIT=195 bash bench/gpu_device.sh
capped 150 env OUT="$OUT" "${ckks[@]}" bash bench/ckks_device.sh
capped 200 env OUT="$OUT" "${cpu[@]}" SWEEP=2,4,8 bash bench/cpu_device.sh
capped 300 "${PYTHON:-python3}" -m bench.gpu "${big[@]}" --queries 64 --batch 64 \
  --skip selfcheck,load --features bench/data/real-features-v1.npy --json "$OUT/gpu-4m.json"
echo "== done after $(( $(date +%s) - started ))s"
