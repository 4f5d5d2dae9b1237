#!/usr/bin/env bash
# GPU session, script 2 of 2 (about 4.5 min on one H100/H200): every GPU benchmark, each
# with a time limit, each writing its JSON to $OUT (default bench/results/) the moment it
# finishes (a benchmark stopped by its limit writes the rows it measured). Run
# bench/gpu_tests.sh first on the same machine: its build is reused, and so are the
# kernels it compiled (Triton's cache).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
STEP_PREFIX="bench_"
source bench/_gpu_steps.sh

python3 -c "import fastencdec" 2>/dev/null || \
  step build 150 python3 -m pip install -q --no-build-isolation --no-deps -e .

# Liger-Kernel (the distillation peer): a wheel named by $LIGER_WHEEL or found in
# shared/wheels/, else the package index; a machine without either skips the Liger row.
if ! python3 -c "import liger_kernel" 2>/dev/null; then
  wheel="${LIGER_WHEEL:-$(ls shared/wheels/liger_kernel-*.whl 2>/dev/null | head -n 1)}"
  if [ -n "$wheel" ]; then
    timeout 60 python3 -m pip install -q --no-deps "$wheel" || echo "liger: $wheel did not install"
  else
    timeout 30 python3 -m pip install -q --no-deps --retries 0 --timeout 5 liger-kernel \
      || echo "liger-kernel is not installable here: the Liger row is skipped"
  fi
fi

step decode 45 python3 bench/bench_decode.py --preset suite --results-dir "$OUT"
step distill 60 python3 bench/bench_distill_loss.py --results-dir "$OUT"
step attention 150 python3 bench/bench_attention.py --preset suite --results-dir "$OUT"
step generate 50 python3 bench/bench_generate.py --device cuda --preset mu-330m \
  --batch-sizes 1 8 --input-len 512 --new-tokens 64 --formats bf16 --rounds 1 --no-plot \
  --results-dir "$OUT"
echo "gpu_bench.sh: exit $status after $(( $(date +%s) - t0 ))s; results in $OUT" \
  | tee -a "$OUT/bench_steps.txt"
exit $status
