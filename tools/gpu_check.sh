#!/usr/bin/env bash
# GPU validation on a CUDA machine, in stages:
#   env        what we run on (nvidia-smi, torch, nvcc, compute-sanitizer)
#   build      the extension, with the compiler's resource report (registers, spills)
#   tests      the whole test suite, CUDA cases included
#   memcheck racecheck initcheck synccheck   compute-sanitizer over the CUDA tests
#   bench      the benchmark: every case and baseline, CUDA sweep to B=4096
# Logs and JSON land under $OUT (summary.json: rc and seconds per stage; the logs bundled
# in gpu_check_logs.tar.gz; the benchmark's JSON and PNG).
#
#   bash tools/gpu_check.sh                        # every stage (about 20-30 min on an H100)
#   bash tools/gpu_check.sh env build tests        # or some stages at a time, in calls
#   bash tools/gpu_check.sh memcheck racecheck     #   made back to back (the build stays
#   bash tools/gpu_check.sh initcheck synccheck    #   in the checkout; a stage rebuilds
#   bash tools/gpu_check.sh bench                  #   if it is gone)
#   BENCH_ARGS="--no-fit" bash tools/gpu_check.sh bench   # extra benchmark arguments
#
# The build uses the torch already installed, without network access:
# pip install --no-build-isolation --no-deps -e .
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
STAGES=("$@")
[ ${#STAGES[@]} -gt 0 ] || STAGES=(env build tests memcheck racecheck initcheck synccheck bench)
wants() { local s; for s in "${STAGES[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
for s in "${STAGES[@]}"; do
  case $s in env|build|tests|memcheck|racecheck|initcheck|synccheck|bench) ;;
    *) echo "unknown stage '$s'"; exit 2 ;;
  esac
done

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
if wants env; then
  step env 60 bash -c "nvidia-smi; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'; nvcc --version; $SANITIZER --version"
fi

# 2. Build with the ptxas resource report (registers, shared memory, spills per kernel);
#    later stages build first when no library is there (a fresh machine).
if wants build || ! ls flame_ext/_C*.so >/dev/null 2>&1; then
  rm -rf build flame_ext/_C*.so
  export FLAME_EXT_PTXAS_VERBOSE=1
  step build 540 $PY -m pip install -v --no-build-isolation --no-deps -e . || exit 1
  grep -E "Compiling entry|Used [0-9]+ registers|spill|stack frame" "$LOGS/build.log" >"$LOGS/resources.txt"
  step build_info 60 $PY -c "import flame_ext, json; info = flame_ext.build_info(); print(json.dumps(info, indent=1)); assert info['cuda_compiled'] and all(k['CUDA'] for k in info['kernels'].values())"
fi

# 3. The whole test suite, CUDA cases included (they skip only without a GPU).
if wants tests; then
  step tests 540 $PY -m pytest -q -rs --junitxml="$LOGS/pytest.xml" tests
fi

# 4. compute-sanitizer over the CUDA tests. The caching allocator would hide
#    out-of-bounds accesses that stay inside a cached block, so it is off here.
CUDA_TESTS="tests -k cuda -p no:cacheprovider -q -x"
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
for tool in memcheck racecheck initcheck synccheck; do
  if wants $tool; then
    step $tool 540 $SANITIZER --tool $tool --target-processes all --error-exitcode 99 \
      $PY -m pytest $CUDA_TESTS
  fi
done
unset PYTORCH_NO_CUDA_MEMORY_CACHING

# 5. Benchmarks: every case and baseline (torch.compile included), CUDA sweep to 4096.
if wants bench; then
  step bench 570 $PY bench/run.py --device cuda --compile --impls medusa reference flame_ext \
    --out "$OUT" ${BENCH_ARGS:-}
fi
