#!/usr/bin/env bash
# GPU validation in one call on a lent machine (see the device tool's README):
#   build the extension there, run the whole test suite on CUDA, compute-sanitizer
#   (memcheck, racecheck, initcheck, synccheck) over the CUDA tests, the benchmarks, and the
#   compiler's resource report (registers, spills). Logs and JSON land under $OUT.
#
#   bash bench/gpu_check.sh            # everything (~10 min on an H100)
#   QUICK=1 bash bench/gpu_check.sh    # build + CUDA tests + memcheck only
#
# The machine has torch 2.11+cu130 and Python 3.12 and no registry access, so the build
# uses what is installed: pip install --no-build-isolation --no-deps -e .
# Files coming back are limited in number: logs are bundled in gpu_check_logs.tar.gz,
# next to summary.json (pass/fail per step) and the benchmark JSON / PNG.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flame_ext_gpu_check}
LOGS="$OUT/logs"
mkdir -p "$LOGS"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
SANITIZER=${SANITIZER:-compute-sanitizer}
declare -A RESULT

step() {  # step NAME TIMEOUT_S CMD...: runs CMD with its output in $LOGS/NAME.log
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "=== $name: $*"
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  RESULT[$name]="rc=$rc, $((SECONDS - start)) s"
  echo "--- $name: rc=$rc in $((SECONDS - start)) s"
  tail -n 4 "$LOGS/$name.log"
  return $rc
}

finish() {
  {
    echo "{"
    echo "  \"date\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\","
    echo "  \"git_sha\": \"$(git rev-parse HEAD 2>/dev/null || echo unknown)\","
    echo "  \"device\": \"$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)\","
    echo "  \"torch\": \"$($PY -c 'import torch; print(torch.__version__)' 2>/dev/null)\","
    echo "  \"steps\": {"
    local first=1
    for name in "${!RESULT[@]}"; do
      [ $first = 1 ] || echo ","
      printf '    "%s": "%s"' "$name" "${RESULT[$name]}"
      first=0
    done
    echo; echo "  }"; echo "}"
  } >"$OUT/summary.json"
  tar -czf "$OUT/gpu_check_logs.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"
  cat "$OUT/summary.json"
}
trap finish EXIT

# 1. What we run on.
step env 60 bash -c "nvidia-smi; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'; nvcc --version; $SANITIZER --version"

# 2. Build with the ptxas resource report (registers, shared memory, spills per kernel).
rm -rf build flame_ext/_C*.so
export FLAME_EXT_PTXAS_VERBOSE=1
step build 900 $PY -m pip install -v --no-build-isolation --no-deps -e . || exit 1
grep -E "Compiling entry|Used [0-9]+ registers|spill|stack frame" "$LOGS/build.log" >"$LOGS/resources.txt"
step build_info 120 $PY -c "import flame_ext, json; info = flame_ext.build_info(); print(json.dumps(info, indent=1)); assert info['cuda_compiled'] and all(k['CUDA'] for k in info['kernels'].values())"

# 3. The whole test suite, CUDA cases included (they skip only without a GPU).
step tests 1200 $PY -m pytest -q -rs --junitxml="$LOGS/pytest.xml" tests

# 4. compute-sanitizer over the CUDA tests. The caching allocator would hide
#    out-of-bounds accesses that stay inside a cached block, so it is off here.
CUDA_TESTS="tests -k cuda -p no:cacheprovider -q -x"
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
step memcheck 1200 $SANITIZER --tool memcheck --target-processes all --error-exitcode 99 $PY -m pytest $CUDA_TESTS
if [ "${QUICK:-0}" != 1 ]; then
  step racecheck 1200 $SANITIZER --tool racecheck --target-processes all --error-exitcode 99 $PY -m pytest $CUDA_TESTS
  step initcheck 1200 $SANITIZER --tool initcheck --target-processes all --error-exitcode 99 $PY -m pytest $CUDA_TESTS
  step synccheck 1200 $SANITIZER --tool synccheck --target-processes all --error-exitcode 99 $PY -m pytest $CUDA_TESTS
fi
unset PYTORCH_NO_CUDA_MEMORY_CACHING

# 5. Benchmarks: every case and baseline (torch.compile included), CUDA sweep to 4096.
if [ "${QUICK:-0}" != 1 ]; then
  step bench 1500 $PY bench/run.py --device cuda --compile --impls medusa reference flame_ext --out "$OUT"
fi
