#!/usr/bin/env bash
# Issue 19: what a 16-core server gives in the CKKS mode (bench.ckks, scheme level: the
# service's scorer on every core against one worker, same run). The GPU machine's Python
# 3.12 has numpy and threadpoolctl but not TenSEAL, and reaches no network: carry it.
# Here, once (the wheel is Apache-2.0):
#   .venv/bin/pip download tenseal==0.3.18 --only-binary=:all: --python-version 3.12 \
#       --no-deps -d /tmp/tenseal-wheel     (a manylinux_2_28 wheel, about 5 MB; 14 MB
#                                           unpacked)
#   mkdir -p vendor/py312 && python3 -m zipfile -e /tmp/tenseal-wheel/tenseal-*.whl vendor/py312
# Then with the run tool: command "OUT=$OUT bash bench/ckks_device.sh", carry
# ["vendor/py312"], timeout_s 560. Writes $OUT/ckks-16cores.json, ckks-1worker.json and
# the log. About 6 minutes on 16 cores at the default sizes.
#   N=10000 QUERIES=20 bash bench/ckks_device.sh     (a smoke test, here or there)
set -euo pipefail
OUT="${OUT:-/tmp/radcrypt-ckks}"
N="${N:-10000,100000}"
QUERIES="${QUERIES:-200}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
# The realistic vectors: the shipped sample of real image features (bench/realistic.py
# asks platformdirs for its cache otherwise, which a bare machine lacks).
export RADCRYPT_BENCH_FEATURES="$PWD/bench/data/real-features-v1.npy"
if [ -d vendor/py312 ]; then
  export PYTHONPATH="$PWD/vendor/py312${PYTHONPATH:+:$PYTHONPATH}"
fi
{
  echo "== $(date -u +%FT%TZ) $(uname -n): $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
  "$PY" -c "import numpy, tenseal; print('numpy', numpy.__version__, 'tenseal', tenseal.__version__)"
  "$PY" -m bench.ckks --n "$N" --queries "$QUERIES" --json "$OUT/ckks-$(nproc)cores.json"
  "$PY" -m bench.ckks --n "$N" --queries "$QUERIES" --workers 1 --json "$OUT/ckks-1worker.json"
  echo "== done $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
} 2>&1 | tee "$OUT/ckks_device.log"
