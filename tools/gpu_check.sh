#!/usr/bin/env bash
# GPU validation of flame_ext on a machine with an NVIDIA GPU, in one call of at most
# 9 minutes (the stages and their logic live in tools/gpu_check.py).
#
#   bash tools/gpu_check.sh                 # default mode: one call, <= 8 min 50 s
#   bash tools/gpu_check.sh full            # the rest, as a second call (same limit)
#   bash tools/gpu_check.sh --dry-run       # on a machine without a GPU: every stage's logic
#   bash tools/gpu_check.sh full --dry-run
#   options: --out DIR (default $OUT, else /tmp/flame_ext_gpu_check), --stages env,build,...
#            (a subset, in order), --deadline S, --no-racecheck, --rebuild (full mode),
#            --bench-args "..." (added to every bench/run.py command), --python PY
#
# Default mode, in order; each stage runs under its own limit and the next stages still
# run after a failure or a timeout. A stage's limit is the time left before the deadline
# (530 s) minus the budgets of the stages after it, so time one stage saves goes to the
# next. Budgets (the most a stage may take when all before it used theirs) and the times
# expected on an H200 with 16 cores:
#   env       30 s  [5-15]    nvidia-smi (name, driver, clocks), torch / CUDA / cuDNN,
#                             nvcc, compute-sanitizer, ninja, git sha, date -> env.json
#   build    150 s  [60-100]  FLAME_EXT_PTXAS_VERBOSE=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
#                             FORCE_CUDA=1 pip install -v --no-build-isolation --no-deps -e .
#                             from clean -> build_info.json (every op has a CUDA kernel),
#                             ptxas.json and ptxas.md (registers, stack frame, spills, shared
#                             memory per kernel and arch, demangled)
#   tests    120 s  [60-120]  pytest tests -k cuda (tests/kernels apart, as in the
#                             Makefile), then pytest tests/kernels -k cuda; exit code 5 (no
#                             test collected) is a pass -> tests.xml, tests_kernels.xml
#                             (a step that runs out of time is interrupted first: pytest
#                             still writes its report)
#   memcheck  90 s  [50-110]  tools/gpu_smoke.py (every op forward and backward against the
#                             reference, and which ops ran), then under compute-sanitizer
#                             memcheck; racecheck (--racecheck-report all) follows when the
#                             time left is at least 1.5x what memcheck took
#   bench    135 s  [90-150]  bench/run.py --device cuda: FlameShape forward and
#                             forward+backward, landmarks '68' forward and forward+backward,
#                             texture, at B = 1, 64, 4096; medusa's algorithm, the reference,
#                             flame_ext, CUDA-graph replay (B <= 64) and the floor; then
#                             torch.compile of the reference for FlameShape forward only
#                             (20-40 s of compilation per batch regime; its speed-up target
#                             is the one read against compile) -> bench/*.json
# full mode: env; build (reused when it loads with every CUDA kernel, else as above: 150 s);
# the CUDA tests under CUDA_LAUNCH_BLOCKING=1 (100 s); sanitizers: the smoke script under
# memcheck, racecheck, synccheck and initcheck (130 s); the whole benchmark without
# torch.compile (every case, B = 1 ... 4096, the fitting loop, a plot per run; 115 s, and
# the budget a reused build leaves). torch.compile of every case would take more than a
# call: measure other cases in a further call, e.g.
# python3 bench/run.py --device cuda --compile --cases shape_fwdbwd lmk68_fwd --out "$OUT".
#
# --dry-run runs the same driver on a CPU machine (it exits non-zero when a stage's logic
# failed): nvidia-smi and compute-sanitizer recorded as absent; build: the installed
# extension loads with every CPU kernel, setup.py still honours FLAME_EXT_PTXAS_VERBOSE,
# and a small kernel compiled with nvcc -Xptxas=-v goes through the ptxas report; tests:
# the same pytest commands with --collect-only; memcheck: the smoke script on the CPU;
# bench: the same bench/run.py commands on the CPU at B=1, short samples, the small
# synthetic model, torch.compile disabled. tests/test_gpu_check.py runs it.
#
# The machine needs Python 3 with a CUDA build of torch, numpy, scipy, pytest, hypothesis,
# matplotlib, tqdm and ninja, the CUDA toolkit (nvcc, compute-sanitizer); it needs no network:
# the build uses what is installed (--no-build-isolation --no-deps). Without .git in the
# copy of the tree, FLAME_EXT_GIT_SHA=<sha> records the commit.
#
# Results, under $OUT: summary.json (mode, environment, per stage: status, rc, seconds,
# limit, log, notes, steps, details such as test counts, sanitizer error summaries,
# benchmark targets; first_failed), logs/<stage>.log, env.json, build_info.json,
# ptxas.json/.md, tests*.xml, smoke*.json, bench/*.json (+ .png in full mode), and
# results/: gpu_check_<mode>_<device>_<date>.json (the summary) and
# ptxas_<device>_<date>.md/.json. To commit a run: copy results/* and bench/* into
# bench/results/ (every file names the device, torch version and date inside), and
# update the README's GPU section from them.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  PY=python3
  # A dry run uses the development environment of `make install` when there is one.
  for arg in "$@"; do
    if [ "$arg" = "--dry-run" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
  done
fi
exec "$PY" tools/gpu_check.py --python "$PY" "$@"
