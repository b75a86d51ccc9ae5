#!/usr/bin/env bash
# The second device call of session 29 (after bench/device_session.sh): where a CPU
# query's time goes on 16 threads (bench/stages.py), and the CKKS scorer at 100,000
# vectors with one worker per block up to 16 (the worker rule lifted) and with one
# worker, to split a query's cost into the query's rotations and the blocks' products.
set -uo pipefail
OUT="${OUT:-/tmp/radcrypt-device2}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 RADCRYPT_BENCH_FEATURES="$PWD/bench/data/real-features-v1.npy"
[ -d vendor/py312 ] && export PYTHONPATH="$PWD/vendor/py312${PYTHONPATH:+:$PYTHONPATH}"
N="${N:-1000000}" CKKS_N="${CKKS_N:-100000}"
echo "== $(date -u +%FT%TZ) $(nproc) CPUs"
timeout 120 "$PY" -m bench.stages --n "$N" --threads 16,8,2 --queries 15 \
  --features bench/data/real-features-v1.npy --json "$OUT/stages.json"
echo "== exit $? at $(date -u +%T)"
timeout 75 "$PY" -c "
import runpy, sys
import cloud.ckks_engine as engine
engine.BLOCKS_PER_WORKER = 1  # one worker per block, up to --workers
sys.argv = ['bench.ckks', '--n', '$CKKS_N', '--queries', '10', '--workers', '16',
            '--json', '$OUT/ckks-lifted.json']
runpy.run_module('bench.ckks', run_name='__main__')"
echo "== exit $? at $(date -u +%T)"
timeout 60 "$PY" -m bench.ckks --n "$CKKS_N" --queries 5 --workers 1 --json "$OUT/ckks-1w.json"
echo "== exit $? at $(date -u +%T)"
