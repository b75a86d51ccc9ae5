#!/usr/bin/env bash
# Issue 20, every core: bench.engine at 1M x 128 on a many-core machine (the 16-core GPU
# machine), realistic near, realistic fresh and Gaussian fresh, the engine on THREADS
# threads (default 16) against numpy float32 brute force on all cores, same run.
# Also times the same indexes' searches on 2 threads (the sweep), so scaling is measured
# on one machine. Writes JSON and the log to $OUT. About 3 minutes on 16 cores.
#
#   bash bench/cpu_device.sh            (from the repository root; needs only numpy,
#                                        numba and threadpoolctl besides the source)
set -euo pipefail
OUT="${OUT:-/tmp/radcrypt-cpu}"
THREADS="${THREADS:-16}"
N="${N:-1000000}"  # a smaller N for a smoke test
QUERIES="${QUERIES:-60}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

# The realistic vectors follow real image features: the shipped sample, named for
# bench/realistic.py; a bare machine has no platformdirs, so a stand-in module answers
# its one question (where the user cache is) with a directory holding the same sample.
export RADCRYPT_BENCH_FEATURES="$PWD/bench/data/real-features-v1.npy"
shim="$(mktemp -d)"
mkdir -p "$shim/cache/radcrypt"
cp "$RADCRYPT_BENCH_FEATURES" "$shim/cache/radcrypt/bench-real-features-v1.npy"
if ! "$PY" -c "import platformdirs" 2>/dev/null; then
  printf 'def user_cache_dir(name: str) -> str:\n    return %s + "/" + name\n' \
    "'$shim/cache'" > "$shim/platformdirs.py"
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi

{
  echo "== $(date -u +%FT%TZ) $(uname -n): $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
  "$PY" -c "import numpy, numba, threadpoolctl; print('numpy', numpy.__version__, 'numba', numba.__version__)"
  "$PY" -m bench.engine --n "$N" --d 128 --queries "$QUERIES" --batch 64 \
    --cases realistic/near,realistic/fresh,gaussian/fresh \
    --threads "$THREADS" --sweep "${SWEEP:-2,4,8}" --json "$OUT/engine-${THREADS}threads.json"
  echo "== done $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
} 2>&1 | tee "$OUT/cpu_device.log"
rm -rf "$shim"
