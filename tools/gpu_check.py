"""The GPU validation of flame_ext in one call: stages under their own time limits, a summary.

Run through tools/gpu_check.sh (its header says what each mode does, the time budget and
what to commit). This driver only needs the standard library; every stage runs its
commands as child processes with `--python`, each in its own process group, killed
(TERM, then KILL) when its limit passes, so a hang costs one stage its budget and the
next stages still run. A stage's limit is what is left before the deadline minus the
budgets of the stages after it: time saved early flows to later stages, and the call
ends before the deadline even when every stage runs out its time.

Stages (default mode):
  env       nvidia-smi, torch/CUDA/cuDNN, nvcc, compute-sanitizer, ninja, git sha -> env.json
  build     pip install -v -e . with the ptxas report -> build_info.json, ptxas.json/.md
  tests     the CUDA tests (-k cuda) of tests/ and tests/kernels -> tests.xml, tests_kernels.xml
  memcheck  tools/gpu_smoke.py plain, under memcheck, and under racecheck when time allows
  bench     the core benchmark cases -> bench/*.json
full mode: the CUDA tests under CUDA_LAUNCH_BLOCKING=1, `sanitizers` (memcheck, racecheck,
synccheck, initcheck over the smoke script) and the whole benchmark with its plots, after
env and a build that is reused when it already holds the CUDA kernels.

--dry-run walks the same stages on a machine without a GPU, with stand-ins: nvidia-smi
recorded as absent; build = the installed extension imports with every CPU kernel,
setup.py honours FLAME_EXT_PTXAS_VERBOSE, and (with nvcc) a small kernel compiled with
-Xptxas=-v goes through the ptxas report; tests = the same pytest commands with
--collect-only; memcheck = the smoke script on the CPU, without the sanitizer; bench =
the same bench/run.py commands on the CPU at B=1, on the small synthetic model, with
torch.compile disabled (TORCH_COMPILE_DISABLE=1) so `compile` runs eagerly. It writes the
same files and summary and exits non-zero when a stage failed.

Exit status: 0 when every stage passed, 1 when one failed or timed out, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = "flame_ext-gpu-check/1"

STAGES = {
    "default": ("env", "build", "tests", "memcheck", "bench"),
    "full": ("env", "build", "tests", "sanitizers", "bench"),
}
# Seconds per stage: what each may take at most when every stage before it used all of
# its own. Default mode on an H200 (16 cores), expected times in brackets: env [5-15: a
# first nvidia-smi and CUDA initialisation can take seconds];
# build [60-100: the .cu files compile in parallel, one arch]; tests [60-120: ~450 CUDA
# cases, gradchecks, opchecks and one inductor compile among them]; memcheck [plain smoke
# ~10, memcheck 30-50, racecheck 30-50 if time is left]; bench [eager cases 40-60,
# torch.compile of FlameShape forward 50-90].
BUDGET_S = {
    "default": {"env": 30, "build": 150, "tests": 120, "memcheck": 90, "bench": 135},
    # full: the build is normally reused (seconds), which leaves its budget to the
    # sanitizers and the benchmark.
    "full": {"env": 30, "build": 150, "tests": 100, "sanitizers": 130, "bench": 115},
}
DEADLINE_S = 530  # 8 min 50 s: within a 9-minute call
DRY_RUN_BUDGET_S = 150  # per stage: a stalled stand-in, not a schedule
DRY_RUN_DEADLINE_S = 900
NEEDS_BUILD = ("tests", "memcheck", "sanitizers", "bench")
# A step past its time is interrupted, then terminated, then killed, waiting this long
# after each signal; the interrupt comes early enough that all of it ends by the limit.
KILL_WAITS_S = (8, 4, 3)
KILL_GRACE_S = sum(KILL_WAITS_S[:2])
END_RESERVE_S = 5  # writing the summary

# Benchmark of the default mode: the cases with targets, at the batch sizes of a
# per-frame call, a fitting batch and a large offline batch. torch.compile (20-40 s of
# compilation per case and batch regime) only for FlameShape forward, the case whose
# target is read against it; its run comes second, so a timeout there loses nothing else.
CORE_CASES = ["shape_fwd", "shape_fwdbwd", "lmk68_fwd", "lmk68_fwdbwd", "tex_fwd"]
CORE_BATCHES = ["1", "64", "4096"]
COMPILE_CASES = ["shape_fwd"]
# Full mode: every case in three runs (one JSON and plot each), so a timeout in the
# last loses only that one; torch.compile of every case would take longer than a call.
FULL_GROUPS = [("shape", ["shape", "shared"]), ("landmarks_texture", ["lmk", "tex"]),
               ("fit", ["fit"])]
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")

ENV_PROBE = r"""
import json, os, platform, sys, sysconfig
info = {"python": platform.python_version(), "executable": sys.executable,
        "scripts_dirs": [d for d in {sysconfig.get_path("scripts"),
                                     sysconfig.get_path("scripts", os.name + "_user")} if d]}
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                cuda_available=torch.cuda.is_available(),
                cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}",
                    sms=props.multi_processor_count, memory_bytes=props.total_memory,
                    device_count=torch.cuda.device_count())
except Exception as exc:
    info["torch_error"] = f"{type(exc).__name__}: {exc}"
for name in ("numpy", "scipy", "pytest", "hypothesis", "matplotlib", "tqdm", "ninja",
             "triton", "setuptools", "wheel", "pip"):
    try:
        info[name] = __import__(name).__version__
    except Exception:
        info[name] = None
with open(sys.argv[1], "w") as f:
    json.dump(info, f, indent=1)
print(json.dumps(info))
"""

BUILD_PROBE = r"""
import json, sys
import flame_ext
from flame_ext import _ops
key = sys.argv[1]
info = flame_ext.build_info()
info["missing_kernels"] = [op for op in _ops.OPS if not _ops.has_kernel(op, key)]
with open(sys.argv[2], "w") as f:
    json.dump(info, f, indent=1)
print(json.dumps({k: info[k] for k in ("extension_loaded", "load_error", "cuda_compiled",
                                       "cuda_archs", "built_with_torch", "torch",
                                       "cuda_available", "missing_kernels", "decoders")}))
ok = info["extension_loaded"] and not info["missing_kernels"]
if key == "CUDA":
    ok = ok and info["cuda_compiled"] and info["cuda_available"]
sys.exit(0 if ok else 1)
"""

# A kernel for the dry run's pass through nvcc -Xptxas=-v and the ptxas report.
PTXAS_PROBE_CU = r"""
template <typename T, int N>
__global__ void probe_tile_sum(const T* __restrict__ x, T* __restrict__ out, int n) {
  __shared__ T tile[N];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  tile[threadIdx.x] = i < n ? x[i] : T(0);
  __syncthreads();
  for (int s = N / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) tile[threadIdx.x] += tile[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = tile[0];
}
template __global__ void probe_tile_sum<float, 256>(const float*, float*, int);
"""


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _quote(argv: List[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def _tail(path: str, lines: int) -> List[str]:
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()[-lines:]
    except OSError:
        return []


def _which(name: str, cuda_home: Optional[str]) -> Optional[str]:
    found = shutil.which(name)
    if found:
        return found
    for sub in ("bin", name):
        path = os.path.join(cuda_home or "", sub, name)
        if cuda_home and os.access(path, os.X_OK):
            return path
    return None


class StageFailed(Exception):
    """A stage's own check failed (not a command): message, rc."""

    def __init__(self, message: str, rc: int = 1):
        super().__init__(message)
        self.rc = rc


class Check:
    """One call of the driver: options, time keeping, the stages' results."""

    def __init__(self, args):
        self.args = args
        self.mode = args.mode
        self.dry = args.dry_run
        # An absolute path: compute-sanitizer is handed it as the program to start.
        python = shutil.which(args.python) or args.python
        self.python = os.path.abspath(python) if os.sep in python else python
        self.out = os.path.abspath(args.out)
        self.logs = os.path.join(self.out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.stages = args.stages or list(STAGES[self.mode])
        self.budget = ({s: DRY_RUN_BUDGET_S for s in STAGES[self.mode]} if self.dry
                       else dict(BUDGET_S[self.mode]))
        self.started = time.monotonic()
        self.started_iso = _now_iso()
        self.stamp = _stamp()
        self.deadline = self.started + (args.deadline or (DRY_RUN_DEADLINE_S if self.dry
                                                          else DEADLINE_S))
        self.cuda_home = os.environ.get("CUDA_HOME") or (
            "/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None)
        if self.cuda_home is None and shutil.which("nvcc"):
            self.cuda_home = os.path.dirname(os.path.dirname(shutil.which("nvcc")))
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.cuda_home:
            self.env["CUDA_HOME"] = self.cuda_home
        self.results: List[dict] = []
        self.environment: dict = {}
        self.built: Optional[bool] = None  # None: not known yet
        self.stage_end = self.deadline

    # ---- time -------------------------------------------------------------------------
    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def stage_limit(self, name: str) -> float:
        later = self.stages[self.stages.index(name) + 1:]
        reserve = sum(self.budget[s] for s in later) + END_RESERVE_S
        return max(5.0, self.remaining() - reserve)

    def step_limit(self, reserve_after: float = 0.0, cap: Optional[float] = None) -> float:
        """Seconds a step may take: what is left of the stage, less `reserve_after` for
        the steps after it, at most `cap`."""
        left = self.stage_end - time.monotonic() - reserve_after
        if cap is not None:
            left = min(left, cap)
        return max(3.0, left)

    # ---- commands ---------------------------------------------------------------------
    def run(self, stage: dict, argv: List[str], *, limit: float, env: Optional[dict] = None,
            ok_codes=(0,), label: Optional[str] = None) -> dict:
        """Runs argv with its output appended to the stage's log; returns the step."""
        log = os.path.join(self.out, stage["log"])
        step = {"label": label or os.path.basename(argv[0]), "command": _quote(argv),
                "limit_s": round(limit, 1)}
        # The probes' inline programs stay in the log, not on the console.
        shown = (_quote(argv[:2]) + " <" + step["label"] + " probe> " + _quote(argv[3:])
                 if argv[1:2] == ["-c"] else step["command"])
        print(f"  $ {shown[:400]}", flush=True)
        start = time.monotonic()
        with open(log, "a") as f:
            f.write(f"\n### {step['label']}: {step['command']}\n### limit {limit:.0f} s, "
                    f"{_now_iso()}\n")
            f.flush()
            try:
                proc = subprocess.Popen(argv, cwd=ROOT, env=env or self.env, stdout=f,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
            except OSError as exc:
                f.write(f"### could not start: {exc}\n")
                step.update(rc=127, seconds=0.0, timed_out=False, ok=False, error=str(exc))
                stage["steps"].append(step)
                print(f"    -> could not start: {exc}", flush=True)
                return step
            timed_out = False
            try:
                rc = proc.wait(timeout=max(0.5 * limit, limit - KILL_GRACE_S))
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                rc = 124
            seconds = time.monotonic() - start
            f.write(f"\n### rc {rc}{' (timed out)' if timed_out else ''} in {seconds:.1f} s\n")
        step.update(rc=rc, seconds=round(seconds, 1), timed_out=timed_out,
                    ok=rc in ok_codes and not timed_out)
        stage["steps"].append(step)
        print(f"    -> rc {rc}{' TIMED OUT' if timed_out else ''} in {seconds:.1f} s", flush=True)
        if not step["ok"]:
            for line in _tail(log, 12):
                print(f"    | {line[:300]}", flush=True)
        return step

    def py(self, *args: str) -> List[str]:
        return [self.python, *args]

    def note(self, stage: dict, text: str) -> None:
        stage["notes"].append(text)
        print(f"  note: {text}", flush=True)

    # ---- the build, when the build stage was not run ------------------------------------
    def ensure_built(self, stage: dict) -> bool:
        if self.built is None:
            key = "CPU" if self.dry else "CUDA"
            step = self.run(stage, self.py("-c", BUILD_PROBE, key,
                                           os.path.join(self.out, "build_info.json")),
                            limit=self.step_limit(cap=90), label="build_info")
            self.built = step["ok"]
        return self.built

    # ---- results ----------------------------------------------------------------------
    def summary(self) -> dict:
        failed = [r["stage"] for r in self.results if r["status"] in ("failed", "timeout")]
        return {
            "schema": SCHEMA,
            "mode": self.mode,
            "dry_run": self.dry,
            "started": self.started_iso,
            "elapsed_s": round(time.monotonic() - self.started, 1),
            "deadline_s": round(self.deadline - self.started),
            "out": self.out,
            "python": self.python,
            "environment": self.environment,
            "stages": self.results,
            "first_failed": failed[0] if failed else None,
            "ok": not failed and len(self.results) == len(self.stages),
        }

    def write_summary(self) -> dict:
        data = self.summary()
        _write_json(os.path.join(self.out, "summary.json"), data)
        return data


def _kill_group(proc: subprocess.Popen) -> None:
    """Interrupts the step's process group (pytest then still writes its junit XML and
    summary), terminates it, kills it; then kills whatever of the group is left."""
    for sig, wait in zip((signal.SIGINT, signal.SIGTERM, signal.SIGKILL), KILL_WAITS_S):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _write_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------
# env


def stage_env(c: Check, stage: dict) -> None:
    env_json = os.path.join(c.out, "env.json")
    probe_json = os.path.join(c.logs, "python_env.json")
    info: Dict[str, object] = {"date": c.started_iso, "mode": c.mode, "dry_run": c.dry,
                               "cuda_home": c.cuda_home, "cpu_count": os.cpu_count()}
    smi = shutil.which("nvidia-smi")
    if smi:
        fields = ("name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,"
                  "clocks.max.mem,power.limit")
        query = os.path.join(c.logs, "nvidia_smi.csv")
        step = c.run(stage, ["bash", "-c", f"{shlex.quote(smi)} --query-gpu={fields} "
                             f"--format=csv,noheader | tee {shlex.quote(query)}; "
                             f"{shlex.quote(smi)}"],
                     limit=c.step_limit(reserve_after=15, cap=20), label="nvidia-smi")
        names = fields.split(",")
        rows = [line.split(", ") for line in _tail(query, 16) if line.strip()]
        rows = [row for row in rows if len(row) == len(names)]  # not an error message
        info["gpus"] = [dict(zip(names, row)) for row in rows]
        if not step["ok"] or not rows:
            c.note(stage, "nvidia-smi failed: see the log")
            if not c.dry:
                stage["failed"] = "nvidia-smi failed"
    else:
        info["gpus"] = None
        c.note(stage, "nvidia-smi: absent" + ("" if c.dry else " (no GPU driver?)"))
        if not c.dry:
            stage["failed"] = "nvidia-smi absent"

    step = c.run(stage, c.py("-c", ENV_PROBE, probe_json),
                 limit=c.step_limit(reserve_after=5, cap=60), label="python")
    info["python_env"] = _read_json(probe_json)
    if not step["ok"] or info["python_env"] is None:
        stage["failed"] = "the Python/torch probe failed"
    else:
        # ninja from the interpreter's scripts folder: without it on PATH torch's
        # extension build falls back to one compiler process at a time.
        scripts = [d for d in info["python_env"].get("scripts_dirs", []) if os.path.isdir(d)]
        c.env["PATH"] = os.pathsep.join(scripts + [c.env.get("PATH", "")])
        if not c.dry and info["python_env"].get("cuda_available") is not True:
            stage["failed"] = "torch.cuda.is_available() is not True"

    versions = {}
    for name, argv, pick in (
            ("nvcc", ["--version"], "release"),
            ("compute-sanitizer", ["--version"], "Version"),
            ("ninja", ["--version"], ""),
            ("c++", ["--version"], "")):
        tool = _which(name, c.cuda_home) if name != "ninja" else shutil.which(
            name, path=c.env["PATH"])
        if tool is None:
            versions[name] = None
            continue
        try:
            out = subprocess.run([tool, *argv], capture_output=True, text=True,
                                 timeout=c.step_limit(cap=15), env=c.env).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            versions[name] = f"error: {exc}"
            continue
        lines = [l.strip() for l in out.splitlines() if l.strip()]
        chosen = next((l for l in lines if pick and pick in l), lines[0] if lines else "")
        versions[name] = {"path": tool, "version": chosen}
    info["tools"] = versions
    for name in ("nvcc", "compute-sanitizer", "ninja"):
        if versions.get(name) is None:
            c.note(stage, f"{name}: absent")
            if not c.dry and name != "ninja":
                stage["failed"] = f"{name} absent"
    if versions.get("ninja") is None and not c.dry:
        c.note(stage, "without ninja the build compiles one file at a time (slow)")

    info["git"] = _git_info()
    _write_json(env_json, info)
    gpus = info.get("gpus") or []
    py_env = info.get("python_env") or {}
    c.environment = {
        "device": (gpus[0].get("name") if gpus else None) or py_env.get("device") or "cpu",
        "driver": gpus[0].get("driver_version") if gpus else None,
        "clocks_sm": gpus[0].get("clocks.sm") if gpus else None,
        "clocks_max_sm": gpus[0].get("clocks.max.sm") if gpus else None,
        "torch": py_env.get("torch"),
        "torch_cuda": py_env.get("torch_cuda"),
        "cudnn": py_env.get("cudnn"),
        "capability": py_env.get("capability"),
        "nvcc": (versions.get("nvcc") or {}).get("version"),
        "compute_sanitizer": (versions.get("compute-sanitizer") or {}).get("version"),
        "git_sha": info["git"]["sha"],
        "date": c.started_iso,
    }
    stage["details"] = {"env_json": "env.json", **c.environment}


def _git_info() -> dict:
    """The checkout's commit: FLAME_EXT_GIT_SHA when set (a copy of the tree without
    .git), else git's answer, else 'unknown'."""
    sha = os.environ.get("FLAME_EXT_GIT_SHA")
    dirty = None
    if not sha:
        try:
            sha = subprocess.run(["git", "--no-optional-locks", "rev-parse", "HEAD"],
                                 cwd=ROOT, capture_output=True, text=True, timeout=10,
                                 check=True).stdout.strip()
            dirty = bool(subprocess.run(
                ["git", "--no-optional-locks", "status", "--porcelain",
                 "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True,
                timeout=10).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            sha = None
    return {"sha": sha or "unknown", "dirty": dirty}


# ---------------------------------------------------------------------------------------
# build


def _ptxas_report(c: Check, stage: dict, log_path: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import ptxas_report

    with open(log_path, errors="replace") as f:
        text = f.read()
    meta = {k: c.environment.get(k) for k in ("device", "torch", "torch_cuda", "nvcc",
                                               "git_sha", "date")}
    meta["TORCH_CUDA_ARCH_LIST"] = c.env.get("TORCH_CUDA_ARCH_LIST")
    data = ptxas_report.report(text, meta)
    _write_json(os.path.join(c.out, "ptxas.json"), data)
    with open(os.path.join(c.out, "ptxas.md"), "w") as f:
        f.write(ptxas_report.markdown(data))
    stage["details"]["ptxas"] = data["summary"]
    if not data["kernels"]:
        raise StageFailed("no ptxas -v output in the build log (a cached build? "
                          "FLAME_EXT_PTXAS_VERBOSE not honoured?)")


def stage_build(c: Check, stage: dict) -> None:
    stage["details"] = {"build_info": "build_info.json"}
    build_info = os.path.join(c.out, "build_info.json")
    log_path = os.path.join(c.out, stage["log"])
    if c.dry:
        step = c.run(stage, c.py("-c", BUILD_PROBE, "CPU", build_info),
                     limit=c.step_limit(reserve_after=30, cap=90), label="build_info")
        c.built = step["ok"]
        with open(os.path.join(ROOT, "setup.py")) as f:
            setup_py = f.read()
        if "FLAME_EXT_PTXAS_VERBOSE" not in setup_py or "-Xptxas=-v" not in setup_py:
            raise StageFailed("setup.py no longer adds -Xptxas=-v for FLAME_EXT_PTXAS_VERBOSE=1")
        c.note(stage, "would run: " + _quote(_pip_install(c)))
        nvcc = _which("nvcc", c.cuda_home)
        if nvcc is None:
            c.note(stage, "nvcc absent: the ptxas report is not exercised")
        else:
            scratch = tempfile.mkdtemp(prefix="flame_ext_ptxas_")
            try:
                source = os.path.join(scratch, "probe.cu")
                with open(source, "w") as f:
                    f.write(PTXAS_PROBE_CU)
                step = c.run(stage, [nvcc, "-arch=sm_90", "-Xptxas=-v", "-c", source, "-o",
                                     os.path.join(scratch, "probe.o")],
                             limit=c.step_limit(cap=60), label="nvcc -Xptxas=-v")
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            if step["ok"]:
                _ptxas_report(c, stage, log_path)
        if not c.built:
            raise StageFailed("the installed extension does not load with every CPU kernel")
        return

    if c.mode == "full" and not c.args.rebuild:
        step = c.run(stage, c.py("-c", BUILD_PROBE, "CUDA", build_info),
                     limit=c.step_limit(cap=90), label="build_info (reuse?)")
        if step["ok"]:
            c.built = True
            c.note(stage, "reused the existing CUDA build (ptxas report: see the default mode)")
            return
        c.note(stage, "no usable CUDA build: building")

    # A clean build, so that ninja compiles (and ptxas reports) every kernel.
    removed = []
    for pattern in ("build/temp.*", "build/lib.*", "flame_ext/_C*.so"):
        for path in glob.glob(os.path.join(ROOT, pattern)):
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
            removed.append(os.path.relpath(path, ROOT))
    if removed:
        c.note(stage, f"removed the previous build: {', '.join(removed)}")
    env = dict(c.env, FLAME_EXT_PTXAS_VERBOSE="1", FORCE_CUDA="1",
               TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"),
               MAX_JOBS=os.environ.get("MAX_JOBS", str(min(16, os.cpu_count() or 1))))
    c.env["TORCH_CUDA_ARCH_LIST"] = env["TORCH_CUDA_ARCH_LIST"]
    step = c.run(stage, _pip_install(c), limit=c.step_limit(reserve_after=40), env=env,
                 label="pip install")
    if not step["ok"] and not step["timed_out"]:
        # E.g. an old setuptools without PEP 660 editable wheels: the same compilation in
        # place, which every stage finds from the checkout's root.
        c.note(stage, f"pip install failed (rc {step['rc']}): setup.py build_ext --inplace")
        step = c.run(stage, c.py("setup.py", "build_ext", "--inplace"),
                     limit=c.step_limit(reserve_after=40), env=env, label="build_ext --inplace")
    if not step["ok"]:
        c.built = False
        raise StageFailed("the build failed", step["rc"])
    step = c.run(stage, c.py("-c", BUILD_PROBE, "CUDA", build_info),
                 limit=c.step_limit(cap=90), label="build_info")
    c.built = step["ok"]
    if not c.built:
        raise StageFailed("the built extension does not load with every CUDA kernel")
    _ptxas_report(c, stage, log_path)


def _pip_install(c: Check) -> List[str]:
    return c.py("-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "-e", ".")


# ---------------------------------------------------------------------------------------
# tests


def _junit_counts(path: str) -> Optional[dict]:
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites)
              for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["failed_tests"] = failed[:30]
    return counts


def _collected(log_path: str) -> Optional[str]:
    for line in reversed(_tail(log_path, 40)):
        if "collected" in line or "no tests ran" in line:
            return line.strip()
    return None


def stage_tests(c: Check, stage: dict) -> None:
    env = dict(c.env)
    if c.mode == "full":
        env["CUDA_LAUNCH_BLOCKING"] = "1"
        c.note(stage, "CUDA_LAUNCH_BLOCKING=1")
    common = ["-q", "-k", "cuda", "-p", "no:cacheprovider", "-rfE"]
    # tests/kernels is its own run (the Makefile's split): run once, not twice.
    runs = [("tests", c.py("-m", "pytest", "tests", *common, "--ignore=tests/kernels",
                           "--durations=15"), "tests.xml", 35),
            ("tests/kernels", c.py("-m", "pytest", "tests/kernels", *common),
             "tests_kernels.xml", 0)]
    failures = []
    log_path = os.path.join(c.out, stage["log"])
    for label, argv, junit, reserve in runs:
        argv = argv + [f"--junitxml={os.path.join(c.out, junit)}"]
        if c.dry:
            argv.append("--collect-only")
        before = len(_tail(log_path, 10**6))
        # 5: no test collected (a folder without CUDA cases yet) is not a failure.
        step = c.run(stage, argv, limit=c.step_limit(reserve_after=reserve), env=env,
                     ok_codes=(0, 5), label=f"pytest {label}")
        result = {"rc": step["rc"], "junit": junit}
        if c.dry:
            lines = _tail(log_path, 10**6)[before:]
            result["collected"] = next((l.strip() for l in reversed(lines)
                                        if "collected" in l or "no tests ran" in l), None)
        else:
            result.update(_junit_counts(os.path.join(c.out, junit)) or {"junit": None})
        if step["rc"] == 5:
            result["note"] = "no tests collected"
        stage["details"][label] = result
        if not step["ok"]:
            failures.append(f"{label}: rc {step['rc']}")
    if failures:
        raise StageFailed("; ".join(failures), next(s["rc"] for s in stage["steps"]
                                                   if not s["ok"]))


# ---------------------------------------------------------------------------------------
# compute-sanitizer over the smoke script


_ERROR_SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) errors?")
_RACE_SUMMARY = re.compile(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, "
                           r"(\d+) warnings?\)")


def _sanitizer_summary(lines: List[str]) -> dict:
    found = {}
    for line in lines:
        match = _ERROR_SUMMARY.search(line)
        if match:
            found.update(errors=int(match.group(1)), summary=line.strip("= \n"))
        match = _RACE_SUMMARY.search(line)
        if match:
            found.update(hazards=int(match.group(1)), errors=int(match.group(2)),
                         warnings=int(match.group(3)), summary=line.strip("= \n"))
    return found


def _smoke_argv(c: Check, json_name: str, device: str, *extra: str) -> List[str]:
    return c.py("tools/gpu_smoke.py", "--device", device,
                "--json", os.path.join(c.out, json_name), *extra)


def _smoke_result(c: Check, json_name: str) -> dict:
    data = _read_json(os.path.join(c.out, json_name)) or {}
    return {"smoke_json": json_name, "checks": data.get("checks"),
            "failed_checks": data.get("failed"), "ops_dispatched": data.get("ops_dispatched")}


def _sanitizer_argv(c: Check, tool: str) -> List[str]:
    sanitizer = _which("compute-sanitizer", c.cuda_home) or "compute-sanitizer"
    argv = [sanitizer, "--tool", tool, "--error-exitcode", "1"]
    if tool == "racecheck":
        argv += ["--racecheck-report", "all"]
    return argv


def _run_sanitizers(c: Check, stage: dict, tools: List[str], optional: List[str]) -> None:
    """The smoke script once plain (its numbers and which ops ran), then under each tool.
    Tools in `optional` run only when the time left is at least 1.5 x what the previous
    sanitizer run took (their cost is of the same order)."""
    failures = []
    device = "cpu" if c.dry else "cuda"
    required = [t for t in tools if t not in optional]
    step = c.run(stage, _smoke_argv(c, "smoke.json", device),
                 limit=c.step_limit(reserve_after=0 if c.dry else 30.0 * len(required),
                                    cap=120 if c.dry else 45),
                 label="smoke")
    stage["details"]["smoke"] = {"rc": step["rc"], **_smoke_result(c, "smoke.json")}
    if not step["ok"]:
        failures.append(f"smoke: rc {step['rc']}")
    # The caching allocator would hide an out-of-bounds access that stays inside one of
    # its cached blocks; the profiler (the smoke's op coverage) stays out of the
    # sanitizer's way: the plain run above recorded it.
    env = dict(c.env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    previous = None
    for index, tool in enumerate(tools):
        name = f"smoke_{tool}.json"
        argv = _sanitizer_argv(c, tool) + _smoke_argv(c, name, device, "--no-coverage")
        if c.dry:
            # Without the sanitizer this would repeat the plain run above.
            c.note(stage, f"would run: {_quote(argv)}")
            stage["details"][tool] = {"dry_run": True, "command": _quote(argv)}
            continue
        later = [t for t in tools[index + 1:] if t not in optional]
        left = c.step_limit(reserve_after=30.0 * len(later))
        if tool in optional and previous is not None and left < 1.5 * previous:
            c.note(stage, f"{tool} not run: {left:.0f} s left, the previous sanitizer run "
                          f"took {previous:.0f} s")
            stage["details"][tool] = {"skipped": "no time left"}
            continue
        log_path = os.path.join(c.out, stage["log"])
        before = len(_tail(log_path, 10**6))
        step = c.run(stage, argv, limit=left, env=env, label=tool)
        previous = step["seconds"]
        found = _sanitizer_summary(_tail(log_path, 10**6)[before:])
        stage["details"][tool] = {"rc": step["rc"], "timed_out": step["timed_out"],
                                  **found, **_smoke_result(c, name)}
        if not step["ok"]:
            failures.append(f"{tool}: rc {step['rc']}"
                            + (f" ({found['summary']})" if "summary" in found else ""))
    if failures:
        raise StageFailed("; ".join(failures))


def stage_memcheck(c: Check, stage: dict) -> None:
    optional = [] if c.args.no_racecheck else ["racecheck"]
    _run_sanitizers(c, stage, ["memcheck"] + optional, optional)


def stage_sanitizers(c: Check, stage: dict) -> None:
    _run_sanitizers(c, stage, list(SANITIZER_TOOLS), [])


# ---------------------------------------------------------------------------------------
# bench


def _bench_runs(c: Check) -> List[tuple]:
    """(label, bench/run.py arguments, expected case patterns) of this mode."""
    out = ["--out", os.path.join(c.out, "bench"), "--no-progress"]
    if c.mode == "default":
        return [
            ("core", ["--device", "cuda", "--cases", *CORE_CASES, "--batch-sizes",
                      *CORE_BATCHES, "--impls", "medusa", "reference", "flame_ext",
                      "--graph-max-batch", "64", "--repeats", "7", "--budget", "0.2",
                      "--no-fit", "--no-plot", *out], CORE_CASES),
            ("compile", ["--device", "cuda", "--cases", *COMPILE_CASES, "--batch-sizes",
                         *CORE_BATCHES, "--impls", "reference", "compile", "flame_ext",
                         "--no-graphs", "--repeats", "7", "--budget", "0.2", "--no-fit",
                         "--no-plot", *out], COMPILE_CASES),
        ]
    runs = []
    for label, patterns in FULL_GROUPS:
        runs.append((label, ["--device", "cuda", "--cases", *patterns, "--impls", "medusa",
                             "reference", "flame_ext", "--repeats", "5", "--budget", "0.1",
                             *out], patterns))
    return runs


DRY_BENCH_VALUES = {"--device": "cpu", "--budget": "0.01", "--repeats": "3"}


def _dry_bench(argv: List[str]) -> List[str]:
    """The CPU stand-in of a benchmark command: B=1, short samples, the small model and
    a tiny fitting loop; every other argument as given."""
    result, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in DRY_BENCH_VALUES:
            result += [arg, DRY_BENCH_VALUES[arg]]
            i += 2
        elif arg == "--batch-sizes":
            result += [arg, "1"]
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                i += 1
        else:
            result.append(arg)
            i += 1
    if "--batch-sizes" not in result:  # the full sweep's default sizes
        result += ["--batch-sizes", "1"]
    return result + ["--model-path", "synthetic-small", "--fit-frames", "4",
                     "--fit-iterations", "2"]


def _bench_check(path: str, patterns: List[str]) -> dict:
    """What a benchmark JSON holds, and the flame_ext cells that failed."""
    data = _read_json(path)
    if data is None:
        return {"error": f"unreadable: {path}"}
    errors, others = [], []
    for row in data.get("results", []):
        for impl, cell in row.get("impls", {}).items():
            if "error" in cell:
                text = f"{row['case']} B={row['batch']} {impl}: {cell['error'][:200]}"
                (errors if impl.startswith("flame_ext") else others).append(text)
    cases = [case["name"] for case in data.get("cases", [])]
    missing = [p for p in patterns if p != "fit" and not any(p in name for name in cases)]
    return {
        "device": data.get("environment", {}).get("device"),
        "cases": cases,
        "batches": sorted({row["batch"] for row in data.get("results", [])}),
        "impls": data.get("impls"),
        "fit": bool(data.get("fit")),
        "png": data.get("files", {}).get("png"),
        "flame_ext_errors": errors[:20],
        # A baseline that fails (e.g. torch.compile) is reported, not a failure of the check.
        "baseline_errors": others[:20],
        "missing_cases": missing,
        "targets": [{k: t[k] for k in ("case", "batch", "metric", "bound", "values", "met")}
                    for t in data.get("targets", [])],
        "elapsed_s": data.get("elapsed_s"),
    }


def stage_bench(c: Check, stage: dict) -> None:
    bench_dir = os.path.join(c.out, "bench")
    os.makedirs(bench_dir, exist_ok=True)
    runs = _bench_runs(c)
    env = dict(c.env)
    if c.dry:
        env["TORCH_COMPILE_DISABLE"] = "1"  # 'compile' runs eagerly: options, not minutes
    failures = []
    for index, (label, args, patterns) in enumerate(runs):
        args = args + (c.args.bench_args or [])
        argv = c.py("bench/run.py", *(_dry_bench(args) if c.dry else args))
        before = set(glob.glob(os.path.join(bench_dir, "*.json")))
        # Earlier runs leave the later ones a share of the stage (the compile run, last in
        # the default mode, takes what is left).
        share = 0 if index == len(runs) - 1 else 25.0 * (len(runs) - index - 1)
        step = c.run(stage, argv, limit=c.step_limit(reserve_after=share), env=env,
                     label=f"bench {label}")
        written = sorted(set(glob.glob(os.path.join(bench_dir, "*.json"))) - before)
        result = {"rc": step["rc"], "timed_out": step["timed_out"],
                  "json": [os.path.relpath(p, c.out) for p in written]}
        if written:
            result.update(_bench_check(written[-1], patterns))
        stage["details"][label] = result
        if not step["ok"]:
            failures.append(f"{label}: rc {step['rc']}")
        elif not written:
            failures.append(f"{label}: no JSON written")
        elif result.get("flame_ext_errors") or result.get("missing_cases"):
            failures.append(f"{label}: {len(result['flame_ext_errors'])} flame_ext cells "
                            f"failed, missing cases {result['missing_cases']}")
    if failures:
        raise StageFailed("; ".join(failures))


# ---------------------------------------------------------------------------------------
# the run


STAGE_FUNCTIONS: Dict[str, Callable[[Check, dict], None]] = {
    "env": stage_env, "build": stage_build, "tests": stage_tests,
    "memcheck": stage_memcheck, "sanitizers": stage_sanitizers, "bench": stage_bench,
}


def run_stage(c: Check, name: str) -> dict:
    stage = {"stage": name, "status": "running", "rc": None, "seconds": 0.0,
             "limit_s": None, "log": f"logs/{name}.log", "notes": [], "steps": [],
             "details": {}}
    limit = c.stage_limit(name)
    stage["limit_s"] = round(limit)
    c.stage_end = time.monotonic() + limit
    print(f"=== {name} (limit {limit:.0f} s, {c.remaining():.0f} s to the deadline)", flush=True)
    start = time.monotonic()
    try:
        if c.remaining() - END_RESERVE_S < 10:
            stage.update(status="skipped", notes=["skipped: no time left before the deadline"])
        elif name in NEEDS_BUILD and not c.ensure_built(stage):
            stage.update(status="skipped",
                         notes=stage["notes"] + ["skipped: no usable build of the extension "
                                                 "(the build failed or was not run; see "
                                                 "logs/build.log)"])
        else:
            STAGE_FUNCTIONS[name](c, stage)
            reason = stage.pop("failed", None)
            if reason:
                raise StageFailed(reason)
            stage.update(status="ok", rc=0)
    except StageFailed as exc:
        stage.update(status="failed", rc=exc.rc, error=str(exc))
    except Exception as exc:  # a fault of this driver: recorded, the next stage runs
        stage.update(status="failed", rc=1, error=f"driver error: {type(exc).__name__}: {exc}",
                     traceback=traceback.format_exc(limit=8))
    stage.pop("failed", None)
    if any(step.get("timed_out") for step in stage["steps"]) and stage["status"] == "failed":
        stage["status"] = "timeout"
    stage["seconds"] = round(time.monotonic() - start, 1)
    if stage.get("error"):
        print(f"  error: {stage['error']}", flush=True)
    print(f"--- {name}: {stage['status']} (rc {stage['rc']}) in {stage['seconds']:.0f} s",
          flush=True)
    return stage


def _device_tag(c: Check) -> str:
    device = c.environment.get("device") or "cpu"
    return re.sub(r"[^A-Za-z0-9.]+", "-", device).strip("-")[:40] or "unknown"


def write_results(c: Check, summary: dict) -> List[str]:
    """Copies of the summary and the ptxas report, named by device and date, for
    bench/results/ (the benchmark's own files already are)."""
    results = os.path.join(c.out, "results")
    os.makedirs(results, exist_ok=True)
    # A dry run's files say so in their names: they are never results to commit.
    stem = f"{_device_tag(c)}_{c.stamp}{'_dry_run' if c.dry else ''}"
    written = []
    name = os.path.join(results, f"gpu_check_{c.mode}_{stem}.json")
    _write_json(name, summary)
    written.append(name)
    for ext in ("md", "json"):
        source = os.path.join(c.out, f"ptxas.{ext}")
        if os.path.exists(source) and any(r["stage"] == "build" and r["status"] == "ok"
                                          for r in c.results):
            target = os.path.join(results, f"ptxas_{stem}.{ext}")
            shutil.copyfile(source, target)
            written.append(target)
    return [os.path.relpath(p, c.out) for p in written]


def print_table(summary: dict) -> None:
    print("", flush=True)
    print(f"{'stage':<12}{'status':<9}{'rc':>5}{'seconds':>9}{'limit':>7}  log", flush=True)
    for r in summary["stages"]:
        rc = "-" if r["rc"] is None else str(r["rc"])
        print(f"{r['stage']:<12}{r['status']:<9}{rc:>5}{r['seconds']:>9.1f}"
              f"{r['limit_s'] or 0:>7}  {r['log']}", flush=True)
    print(f"first failed stage: {summary['first_failed'] or 'none'} | "
          f"{summary['elapsed_s']:.0f} s of {summary['deadline_s']} s | "
          f"{'OK' if summary['ok'] else 'FAILED'} | {summary['out']}/summary.json", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tools/gpu_check.sh", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("mode", nargs="?", default="default", choices=sorted(STAGES),
                        help="default (one call) or full (the rest, a second call)")
    parser.add_argument("--dry-run", action="store_true",
                        help="walk every stage on a machine without a GPU (stand-ins)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "/tmp/flame_ext_gpu_check",
                        help="output folder (default: $OUT, else /tmp/flame_ext_gpu_check)")
    parser.add_argument("--stages", type=lambda s: [x for x in s.split(",") if x],
                        help="comma-separated subset of the mode's stages, in order")
    parser.add_argument("--deadline", type=float,
                        help=f"seconds for the whole call (default {DEADLINE_S}; "
                             f"dry run {DRY_RUN_DEADLINE_S})")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter of the stages (default: this one)")
    parser.add_argument("--no-racecheck", action="store_true",
                        help="default mode: memcheck only")
    parser.add_argument("--bench-args", type=shlex.split,
                        help="extra bench/run.py arguments for every benchmark run, one "
                             "quoted string (e.g. \"--compile\")")
    parser.add_argument("--rebuild", action="store_true",
                        help="full mode: build even when a usable build exists")
    args = parser.parse_args(argv)
    for stage in args.stages or []:
        if stage not in STAGES[args.mode]:
            parser.error(f"--stages: {stage!r} is not a stage of the {args.mode} mode "
                         f"({', '.join(STAGES[args.mode])})")
    if args.stages:
        args.stages = [s for s in STAGES[args.mode] if s in args.stages]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    c = Check(args)
    print(f"# flame_ext GPU check: {c.mode} mode{' (dry run)' if c.dry else ''}, stages "
          f"{', '.join(c.stages)}, deadline {c.deadline - c.started:.0f} s, out {c.out}",
          flush=True)
    for name in c.stages:
        c.results.append(run_stage(c, name))
        c.write_summary()  # after every stage: a call cut short still leaves one
    summary = c.summary()
    summary["results_files"] = write_results(c, summary)
    _write_json(os.path.join(c.out, "summary.json"), summary)
    print_table(summary)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
