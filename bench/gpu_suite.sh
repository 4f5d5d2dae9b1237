#!/usr/bin/env bash
# Everything a GPU session runs, in one call: build, the whole test suite (CUDA
# tests included), every benchmark; results land in bench/results/ and, when $OUT
# is set, are copied there too. Needs torch, triton, pytest, scikit-build-core,
# pybind11, cmake and ninja already installed (no network is assumed).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
python3 -m fastencdec.cli info

python3 -m pytest -q tests -x --durations=15 || status=1

# Each script picks CUDA when it is present (bench_cpu_attention measures the host CPU).
for script in bench/bench_*.py; do
  echo "=== $script"
  python3 "$script" || status=1
done

if [ -n "${OUT:-}" ]; then
  cp bench/results/*.json bench/results/*.png "$OUT"/ 2>/dev/null || true
fi
exit $status
