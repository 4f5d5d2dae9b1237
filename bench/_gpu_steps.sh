# Sourced by gpu_tests.sh and gpu_bench.sh (not run on its own): makes $OUT, sets
# `status` (1 once any step fails) and `t0`, and defines `step`. $STEP_PREFIX names the
# logs: $OUT/${STEP_PREFIX}NAME.log per step and $OUT/${STEP_PREFIX}steps.txt for all.
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
t0=$(date +%s)

step() {  # step NAME SECONDS CMD...: run with a limit, log to $OUT
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "=== $name (limit ${limit}s): $*"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/${STEP_PREFIX:-}$name.log"
  rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $(( $(date +%s) - start ))s" \
    | tee -a "$OUT/${STEP_PREFIX:-}steps.txt"
  [ "$rc" -eq 0 ] || status=1
}
