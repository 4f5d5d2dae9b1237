#!/usr/bin/env bash
# GPU session, script 1 of 2 (about 3-4 min on one H100/H200): build, the GPU-marked
# tests, selfcheck on CUDA. Each step has a time limit and writes its log to $OUT as it
# finishes (default bench/results/gpu_tests_<stamp>/), so a timeout still returns
# everything done before it. No network needed: torch, triton, pytest, scikit-build-core,
# pybind11, cmake and ninja must already be installed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu_tests_$(date +%Y%m%d-%H%M%S)}"
# Tests run each kernel at its first autotune config only: one compile per shape instead
# of a tuning sweep (the benchmarks tune).
export FASTENCDEC_AUTOTUNE_ONE=1
STEP_PREFIX=""
source bench/_gpu_steps.sh

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/nvidia-smi.txt" 2>&1
cat "$OUT/nvidia-smi.txt"
step build 150 python3 -m pip install -q --no-build-isolation --no-deps -e .
step info 30 python3 -m fastencdec.cli info
# No -x: every GPU test reports. junit XML for the per-test record.
step gpu_tests 200 python3 -m pytest -q -m gpu tests -p no:cacheprovider --durations=20 \
  --junitxml="$OUT/gpu_tests.xml"
step selfcheck 60 python3 -m fastencdec.cli selfcheck --device cuda
echo "gpu_tests.sh: exit $status after $(( $(date +%s) - t0 ))s; results in $OUT" | tee -a "$OUT/steps.txt"
exit $status
