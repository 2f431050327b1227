"""Benchmark of FLAME decoding: flame_ext against medusa's algorithm and the floor, in one run.

    python bench/run.py                  # default sweep (CPU: B=1..256, a few minutes)
    python bench/run.py --quick          # ~1 minute: the CI smoke run
    python bench/run.py --compile        # + torch.compile(reference) (slow to compile on CPU)
    python bench/run.py --device cuda    # B=1..4096, torch.compile and CUDA graphs included
    python bench/run.py --cases shape_fwd lmk --batch-sizes 1 64 --impls medusa flame_ext
    python bench/run.py --list           # the cases

Cases (cases.py): FlameShape forward and forward+backward, per-sample and shared
identity, with and without R; FlameLandmark '68' and 'mp', forward and forward+backward;
FlameTex forward; smplx's FLAME layer against `smplx.FLAME` (smplx_*); FlameShape against
body-models' FLAME (body_models_*); and the fitting loop (fit.py). Implementations:
`medusa` (medusa's algorithm, eager: the baseline), `smplx` (smplx.FLAME, in the smplx
cases), `body_models` / `body_models_warp` (body-models' FLAME with its torch / NVIDIA
Warp kernels, in the body_models cases), `reference` (flame_ext's pure-PyTorch path),
`compile` (torch.compile of the reference), `flame_ext` (the compiled ops),
`flame_ext_graph` (the same replayed from CUDA graphs, small batches, CUDA only). The
floor (floor.py) is max(bytes / copy bandwidth, FLOPs / matmul rate), both rates
measured on the device at the start of the run and, on the CPU (--rates alongside, the
default there), again in each row's own interleaved rounds, where that row's floor takes
them from: a shared machine's memory bandwidth moves with its neighbours' load.

Timing (timing.py): a timed first call (torch.compile's compilation shows there,
never in the statistics), warm-up, then the median and interquartile spread of
repeated samples; CUDA events on the GPU; inputs rotate through several sets.
Also `flame-ext bench` (same options). Output: a table on stdout, `bench_<device>_<date>.json` (every number, the device:
CPU model, cores, threads and the instruction set of the CPU loops; versions, git sha and
date) and a `.png` of the same name under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from typing import Dict, List, Optional

import torch

# The source checkout this package sits in (bench/ and setup.py beside it), or None for an
# installed package: results then go to the working directory and carry no git sha.
_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHECKOUT = (
    _PARENT
    if os.path.isdir(os.path.join(_PARENT, "bench")) and os.path.isfile(os.path.join(_PARENT, "setup.py"))
    else None
)
DEFAULT_OUT = (
    os.path.join(CHECKOUT, "bench", "results") if CHECKOUT else "flame_ext_bench_results"
)

import flame_ext

from . import cases as bench_cases
from . import fit as bench_fit
from . import floor, timing
from .._checks import count_option, device_option, positive_option
from .targets import evaluate_targets, format_speed_checks, format_target, speed_checks
from .timing import format_time

SCHEMA = "flame_ext-bench/1"
DEFAULT_BATCHES = {"cpu": [1, 16, 64, 256], "cuda": [1, 4, 16, 64, 256, 1024, 4096]}
QUICK_BATCHES = [1, 4]
# what each row records of the rates its floor used ('measured': 'alongside' or 'start')
FLOOR_RATE_KEYS = ("copy_bytes_per_s", "matmul_flops_per_s", "first_touch_bytes_per_s",
                   "measured")
# CPU: torch.compile takes ~15 s per case and batch regime on 2 cores: opt-in (--compile).
DEFAULT_IMPLS = {"cpu": ["medusa", "smplx", "body_models", "body_models_warp", "reference",
                         "flame_ext"],
                 "cuda": ["medusa", "smplx", "body_models", "body_models_warp", "reference",
                          "compile", "flame_ext"]}
# Per-measurement time budgets (seconds) and repeats.
BUDGET = {"cpu": 0.5, "cuda": 0.3, "quick": 0.04}
FIT_SIZE = {"cpu": (32, 50), "cuda": (256, 100), "quick": (8, 3)}  # (frames, iterations)



def parse_args(argv=None, prog: str = "python bench/run.py") -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:8]))
    parser.add_argument("--device", default=flame_ext.DEVICE, type=device_option,
                        help="cpu or cuda[:N]")
    parser.add_argument("--quick", action="store_true",
                        help="B=1,4, short timings, tiny fitting loop (CI smoke run)")
    parser.add_argument("--batch-sizes", type=count_option(1, bench_fit.MAX_COUNT), nargs="+",
                        metavar="B")
    parser.add_argument("--cases", nargs="+", metavar="NAME",
                        help="cases to run: full names, or parts of names ('lmk', 'fwdbwd'); "
                             "'fit' is the fitting loop")
    parser.add_argument("--impls", nargs="+", choices=bench_cases.IMPLS,
                        help="implementations (default CPU: medusa smplx body_models "
                             "body_models_warp reference flame_ext; CUDA: + compile)")
    parser.add_argument("--compile", action="store_true", help="add torch.compile(reference)")
    parser.add_argument("--no-graphs", action="store_true",
                        help="on CUDA, do not add the flame_ext CUDA-graph line")
    parser.add_argument("--graph-max-batch", type=count_option(0, bench_fit.MAX_COUNT),
                        default=256, help="largest batch replayed from CUDA graphs")
    parser.add_argument("--headline", default="flame_ext", choices=bench_cases.IMPLS,
                        help="the implementation of the GB/s, floor and speed-up columns")
    parser.add_argument("--model-path", default="synthetic",
                        help="FLAME data: a directory, 'synthetic' (full size, default) or "
                             "'synthetic-small'")
    parser.add_argument("--n-tex", type=count_option(1, 10**6), default=50,
                        help="FlameTex components")
    parser.add_argument("--repeats", type=count_option(1, 10**6), default=7,
                        help="samples per measurement")
    parser.add_argument("--budget", type=positive_option,
                        help="seconds of samples per measurement (default CPU 0.5, CUDA 0.3)")
    parser.add_argument("--rates", choices=("alongside", "start"),
                        help="the floor's rates: measured again in each row's rounds "
                             "(default on the CPU) or once at the start (default on CUDA)")
    parser.add_argument("--threads", type=count_option(1, 4096),
                        help="torch.set_num_threads (default: torch's, all cores)")
    parser.add_argument("--fit-frames", type=count_option(1, bench_fit.MAX_COUNT))
    parser.add_argument("--fit-iterations", type=count_option(1, 10**7))
    parser.add_argument("--no-fit", action="store_true", help="skip the fitting loop")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="directory of the JSON and PNG")
    return parser.parse_args(argv)


def _git(*args) -> Optional[str]:
    if CHECKOUT is None:
        return None
    try:
        # --no-optional-locks: read-only, never touches the index of a checkout in use.
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=CHECKOUT, text=True,
                              capture_output=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


# The /proc/cpuinfo fields that tell CPU generations apart where a virtual machine shows
# only a generic model name ("AMD EPYC"): the same name covers Zen 4 (family 25) and Zen 5
# (family 26), whose loops run at different rates.
_CPU_ID_FIELDS = {"vendor_id": "vendor", "cpu family": "family", "model": "model",
                  "stepping": "stepping", "cache size": "cache"}


def _first_cpuinfo_block() -> Dict[str, str]:
    """The fields of the first processor in /proc/cpuinfo ({} where there is none)."""
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the end of the first processor's block
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    return (_first_cpuinfo_block().get("model name") or platform.processor()
            or platform.machine())


def cpu_identity() -> Dict[str, str]:
    """Vendor, family, model, stepping and cache of the first CPU, those cpuinfo gives."""
    fields = _first_cpuinfo_block()
    return {name: fields[key] for key, name in _CPU_ID_FIELDS.items() if key in fields}


def cpu_generation(env: dict) -> str:
    """', family F model M' of a results environment's CPU, or '' where it was not read
    (results written before it was recorded, or no /proc/cpuinfo)."""
    cpu_id = env.get("cpu_id", {})
    if "family" in cpu_id and "model" in cpu_id:
        return f", family {cpu_id['family']} model {cpu_id['model']}"
    return ""


def _load_average() -> Optional[List[float]]:
    """The 1, 5 and 15 minute load averages: how much else ran on the machine."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(device: torch.device, model_path) -> dict:
    """Everything needed to tell where and with what the numbers were taken."""
    import numpy

    status = _git("status", "--porcelain", "--untracked-files=no")
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": _git("rev-parse", "HEAD") or "unknown",
        "git_dirty": None if status is None else bool(status),
        "device_type": device.type,
        "cpu": cpu_model(),
        "cpu_id": cpu_identity(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "numpy": numpy.__version__,
        "model_path": str(model_path),
        # A development build of the ops (tools/dev_build.py) instead of flame_ext._C.
        "flame_ext_lib": os.environ.get("FLAME_EXT_LIB"),
        "dtype": "float32",
        "build_info": flame_ext.build_info(),
        "load_average_start": _load_average(),
    }
    # The build of the hand-vectorised CPU loops this process runs (csrc/cpu_isa.h):
    # 'avx512', 'avx2' or 'baseline'; None without the compiled ops.
    env["cpu_isa"] = env["build_info"].get("cpu_isa")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device=props.name,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_memory_bytes=props.total_memory,
            gpu_sms=props.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
    else:
        threads = torch.get_num_threads()
        env["device"] = f"{env['cpu']} ({threads} thread{'s' if threads != 1 else ''})"
    return env


def resolve_impls(args, device: torch.device) -> List[str]:
    impls = list(args.impls or DEFAULT_IMPLS["cuda" if device.type == "cuda" else "cpu"])
    if args.quick and not args.impls and not args.compile and "compile" in impls:
        impls.remove("compile")  # minutes of compilation have no place in a smoke run
    if args.compile and "compile" not in impls:
        impls.insert(impls.index("flame_ext") if "flame_ext" in impls else len(impls), "compile")
    if (device.type == "cuda" and not args.no_graphs and "flame_ext" in impls
            and "flame_ext_graph" not in impls):
        impls.insert(impls.index("flame_ext") + 1, "flame_ext_graph")
    return list(dict.fromkeys(impls))


def not_run(case, impl: str, batch: int, device: torch.device, args,
            failed: Dict[tuple, str]) -> Optional[dict]:
    """Why (case, impl, batch) is not measured, as its result cell; None to measure it."""
    if impl in bench_cases.GRAPH_IMPLS:
        if device.type != "cuda":
            return {"skipped": "CUDA graphs need a CUDA device"}
        if batch > args.graph_max_batch:
            return {"skipped": f"graphs are run up to B={args.graph_max_batch}"}
    if bench_cases.BACKEND[impl] == "ext" and bench_cases.ext_status():
        return {"error": f"flame_ext not available: {bench_cases.ext_status()}"}
    if (case.name, impl) in failed:
        return {"skipped": f"failed at a smaller batch: {failed[(case.name, impl)]}"}
    reason = case.why_not(impl, batch)
    return {"skipped": reason} if reason else None


def measure_row(case, batch: int, impls: List[str], device: torch.device, args,
                failed: Dict[tuple, str], probes: Optional["floor.RateProbes"],
                start_rates: Dict[str, float]) -> tuple:
    """Every implementation of one (case, batch), on one shared set of inputs, sampled
    in interleaved rounds (timing.py), with the floor's rate probes among them when
    `probes` is given. Failures are cells, never fatal. Returns (cells, the rates of this
    row's floor: the probes' where they ran, else `start_rates`)."""
    cells: Dict[str, dict] = {}
    steps = {}
    try:
        sets = case.inputs(batch)
    except Exception as exc:
        error = {"error": f"building the inputs: {timing.describe_error(exc)}"}
        return {impl: dict(error) for impl in impls}
    for impl in impls:
        cell = not_run(case, impl, batch, device, args, failed)
        if cell is not None:
            cells[impl] = cell
            continue
        try:
            steps[impl] = bench_cases.make_step(case, impl, batch, sets, device)
        except Exception as exc:  # e.g. a CUDA graph capture that fails
            cells[impl] = {"error": timing.describe_error(exc)}
    extra = probes.steps if probes is not None and steps else {}
    measured = timing.measure({**steps, **extra}, device, repeats=args.repeats,
                              budget_s=args.budget, budgets=probes.budgets if extra else None)
    rates = dict(start_rates, measured="start")
    if extra and not any("error" in measured[name] for name in extra):
        rates.update(probes.rates(measured), measured="alongside")
    cells.update({impl: measured[impl] for impl in steps})
    for impl, cell in cells.items():
        if "error" in cell:
            failed.setdefault((case.name, impl), cell["error"][:120])
    del steps, sets
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {impl: cells[impl] for impl in impls}, rates


def derive(row: dict, impls: List[str]) -> None:
    """Adds achieved GB/s, the ratio to the floor and the speed-ups to a result row."""
    floor_row = row["floor"]
    for impl in impls:
        cell = row["impls"][impl]
        if "median_s" not in cell:
            continue
        cell["GBps"] = floor_row["bytes"] / cell["median_s"] / 1e9
        cell["GFLOPs"] = floor_row["flops"] / cell["median_s"] / 1e9
        cell["x_floor"] = cell["median_s"] / floor_row["time_s"]
        for base in bench_cases.BASELINES:
            reference_cell = row["impls"].get(base, {})
            if base != impl and "median_s" in reference_cell:
                cell[f"speedup_vs_{base}"] = reference_cell["median_s"] / cell["median_s"]


class Table:
    """The stdout table: one line per (case, batch), errors as numbered footnotes."""

    def __init__(self, impls: List[str], headline: str, write):
        self.impls, self.headline, self.write = impls, headline, write
        self.notes: Dict[str, int] = {}
        self.width = max(16, max(len(i) for i in impls) + 2)
        # speed-up columns: medusa's and compile's always, the peers' when they run
        self.versus = ["medusa", "compile"] + [p for p in bench_cases.PEERS if p in impls]
        self.versus_widths = [max(11, len(b) + 5) for b in self.versus]

    def header(self) -> None:
        cells = "".join(f"{i:>{self.width}}" for i in self.impls)
        versus = "".join(f"{'vs ' + b:>{w}}" for b, w in zip(self.versus, self.versus_widths))
        self.write(f"{'case':<18}{'B':>5}{cells}{'floor':>10} {'bound':<7}"
                   f"{'GB/s':>8}{'x floor':>9}{versus}")
        self.write(f"{'':<23}{'(median ±IQR/median)':>{self.width * len(self.impls)}}"
                   f"{'':>17}{'(' + self.headline + ')':>{17 + sum(self.versus_widths)}}")

    def _note(self, text: str) -> str:
        key = re.sub(r" ?\(B=[^)]*\)", "", text)[:160]
        if key not in self.notes:
            self.notes[key] = len(self.notes) + 1
        return f"[{self.notes[key]}]"

    def _cell(self, cell: dict) -> str:
        if "median_s" in cell:
            return f"{format_time(cell['median_s'])} ±{min(100 * cell['spread'], 999):.0f}%"
        return self._note(cell.get("error") or cell.get("skipped", "?"))

    def row(self, row: dict) -> None:
        cells = "".join(f"{self._cell(row['impls'][i]):>{self.width}}" for i in self.impls)
        head = row["impls"].get(self.headline, {})
        fl = row["floor"]
        extra = "".join([
            f"{format_time(fl['time_s']):>10} {'mem' if fl['bound'] == 'memory' else 'flop':<7}",
            f"{head['GBps']:>8.1f}" if "GBps" in head else f"{'-':>8}",
            f"{head['x_floor']:>8.1f}x" if "x_floor" in head else f"{'-':>9}",
            *(f"{head['speedup_vs_' + b]:>{w - 1}.2f}x"
              if "speedup_vs_" + b in head else f"{'-':>{w}}"
              for b, w in zip(self.versus, self.versus_widths)),
        ])
        self.write(f"{row['case']:<18}{row['batch']:>5}{cells}{extra}")

    def footnotes(self) -> None:
        for text, number in self.notes.items():
            self.write(f"  [{number}] {text}")


class Progress:
    """tqdm when installed and on a terminal; otherwise nothing (rows print as they come)."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="run", file=sys.stderr, leave=False,
                                dynamic_ncols=True, disable=None)
            except ImportError:
                self.bar = None

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def label(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text)

    def advance(self, count: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _stamp_name(env: dict) -> str:
    device = re.sub(r"[^A-Za-z0-9.]+", "-", env["device"].split(" (")[0]).strip("-")[:40]
    date = env["date"].replace("-", "").replace(":", "").replace("+0000", "Z")
    return f"bench_{env['device_type']}-{device}_{date}"


def _selected(name: str, patterns: List[str], names: List[str]) -> bool:
    """A pattern that is a case's full name selects that case; others match substrings."""
    return any(p == name if p in names else p in name for p in patterns)


def _configure_compile() -> None:
    # Every FlameShape case recompiles FlameShape.forward (grad mode, input shapes): far
    # more than dynamo's default limit of 8 per code object, past which it would
    # silently run eager and the 'compile' column would measure the reference.
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))


def main(argv=None, prog: str = "python bench/run.py") -> int:
    """The benchmark; `prog` is how it was invoked (usage lines, the results' command)."""
    started = time.perf_counter()
    args = parse_args(argv, prog)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    kind = "cuda" if device.type == "cuda" else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        batch_sizes = args.batch_sizes or QUICK_BATCHES
        args.repeats = min(args.repeats, 3)
    else:
        batch_sizes = args.batch_sizes or DEFAULT_BATCHES[kind]
    if args.budget is None:
        args.budget = BUDGET["quick" if args.quick else kind]
    fit_frames, fit_iterations = FIT_SIZE["quick" if args.quick else kind]
    fit_frames = args.fit_frames or fit_frames
    fit_iterations = args.fit_iterations or fit_iterations
    impls = resolve_impls(args, device)
    if "compile" in impls:
        _configure_compile()
    warnings.filterwarnings("once")

    # The small synthetic model holds 5 texture components, FLAME's albedo 199-200.
    n_tex = min(args.n_tex, 5) if args.model_path == "synthetic-small" else args.n_tex
    models = bench_cases.Models(device, args.model_path, n_tex)
    all_cases = bench_cases.build_cases(models, impls)
    if args.list:
        for case in all_cases:
            print(f"{case.name:<18} {case.description}")
        print(f"{'fit':<18} fitting loop (fit.py): Adam on 68-point landmarks")
        return 0
    selected = [c for c in all_cases if not args.cases or _selected(c.name, args.cases,
                                                                 [c.name for c in all_cases])]
    run_fit = not args.no_fit and (not args.cases or "fit" in args.cases)
    names = [c.name for c in all_cases]
    unmatched = [p for p in args.cases or () if p != "fit" and not any(
        _selected(name, [p], names) for name in names)]
    if unmatched:
        raise SystemExit(f"--cases: {unmatched} match no case; the cases are "
                         f"{', '.join(names)} and fit (--list describes them)")
    fit_impls = [i for i in impls if i in bench_fit.FIT_IMPLS]
    if "flame_ext" in fit_impls:
        fit_impls.append("flame_ext_lmk")

    env = environment(device, args.model_path)
    rates = floor.measure_rates(device, quick=args.quick)
    rates_mode = args.rates or ("alongside" if kind == "cpu" else "start")
    probes = floor.RateProbes(device, rates, quick=args.quick) if rates_mode == "alongside" else None
    progress = Progress(len(selected) * len(batch_sizes) * len(impls)
                        + (len(fit_impls) if run_fit else 0),
                        enabled=not args.no_progress)
    out = progress.write
    machine = env["device"]
    if kind == "cpu":
        machine += (f"{cpu_generation(env)}, {env['cpu_count']} cores | CPU loops: "
                    f"{env['cpu_isa'] or 'none (compiled ops not loaded)'}")
    out(f"# flame_ext benchmark | {machine} | torch {env['torch']}"
        f"{' cuda ' + env['cuda'] if env['cuda'] and kind == 'cuda' else ''} | "
        f"git {env['git_sha'][:10]}{'+dirty' if env['git_dirty'] else ''} | {env['date']}")
    out(f"# model {args.model_path}, float32 | floor rates at the start: "
        f"{floor.describe_rates(rates)}"
        + (" | each row's floor: the rates measured in its own rounds" if probes else ""))
    load = env["load_average_start"]
    if load and kind == "cpu" and load[0] > 0.5 * (os.cpu_count() or 1):
        out(f"# warning: load average {load[0]:.1f} on {os.cpu_count()} cores: other processes "
            "compete for the CPU and the timings will be noisy"
            + ("" if torch.get_num_threads() == 1 else
               " (the threads of one op wait for each other at every parallel region; "
               "--threads 1 is steadier on a busy machine)"))
    ext_problem = bench_cases.ext_status()
    if ext_problem and any(bench_cases.BACKEND[i] == "ext" for i in impls):
        out(f"# flame_ext: {ext_problem}")
    table = Table(impls, args.headline, out)
    table.header()

    results, failed = [], {}
    for case in selected:
        for batch in batch_sizes:
            progress.label(f"{case.name} B={batch}")
            cells, row_rates = measure_row(case, batch, impls, device, args, failed, probes,
                                           rates)
            row = {"case": case.name, "batch": batch,
                   "floor": floor.floor_time(case.cost(batch), row_rates),
                   "floor_rates": {key: row_rates[key] for key in FLOOR_RATE_KEYS
                                   if key in row_rates},
                   "impls": cells}
            progress.advance(len(impls))
            derive(row, impls)
            table.row(row)
            results.append(row)

    fit_section = None
    if run_fit and fit_impls:
        out("")
        out(f"# fitting loop (fit.py): {fit_frames} frames x {fit_iterations} Adam "
            f"iterations, shared identity, 68 landmarks")
        out(bench_fit.FIT_HEADER)
        fit_results: List[dict] = []

        def on_result(result):
            progress.advance()
            fit_results.append(result)
            baseline = next((r for r in fit_results if r["impl"] == "medusa"), None)
            out(bench_fit.format_row(result, baseline))

        progress.label("fitting loop")
        bench_fit.run_all(fit_impls, model_path=args.model_path, device=device,
                          frames=fit_frames, iterations=fit_iterations, on_result=on_result)
        baseline = next((r for r in fit_results if r["impl"] == "medusa"
                         and "frames_iters_per_s" in r), None)
        if baseline:
            for r in fit_results:
                if "frames_iters_per_s" in r:
                    r["speedup_vs_medusa"] = (r["frames_iters_per_s"]
                                              / baseline["frames_iters_per_s"])
        fit_section = {"frames": fit_frames, "iterations": fit_iterations,
                       "shared_identity": True, "results": fit_results}
    progress.close()

    if table.notes:
        out("")
        table.footnotes()
    compile_times: Dict[str, float] = {}
    for r in results:
        first = r["impls"].get("compile", {}).get("first_call_s")
        if first is not None:
            compile_times[r["case"]] = compile_times.get(r["case"], 0.0) + first
    if compile_times:
        out("# torch.compile: first calls (compilation and recompilation), summed over the "
            "batch sizes, excluded from the timings: "
            + ", ".join(f"{c} {t:.1f}s" for c, t in compile_times.items()))
    targets = evaluate_targets(results, kind, impls)
    if targets and not any(t["values"] for t in targets):
        out("# performance targets (docs/PERFORMANCE.md): not read, flame_ext did not run")
    elif targets:
        out("# performance targets (docs/PERFORMANCE.md), read off this run, never asserted:")
        for target in targets:
            out(format_target(target))
    checks = speed_checks(results) if kind == "cpu" else None
    if checks is not None:
        out("# CPU speed checks (docs/PERFORMANCE.md), read off this run, never asserted:")
        for line in format_speed_checks(checks):
            out(line)

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, _stamp_name(env))
    data = {
        "schema": SCHEMA,
        "command": f"{prog} " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "environment": env,
        "args": {**vars(args), "batch_sizes": batch_sizes, "impls": impls},
        "impls": impls,
        "headline": args.headline,
        "device_rates": rates,
        "cases": [{"name": c.name, "description": c.description} for c in selected],
        "results": results,
        "fit": fit_section,
        "targets": targets,
        "speed_checks": checks,
        "files": {"json": stem + ".json", "png": None},
        "elapsed_s": None,
    }
    if not args.no_plot:
        try:
            from . import plot

            data["files"]["png"] = plot.plot_results(data, stem + ".png")
        except Exception as exc:  # no matplotlib: the JSON still holds every number
            data["files"]["plot_error"] = f"{type(exc).__name__}: {exc}"
            out(f"# no plot: {data['files']['plot_error']}")
    data["elapsed_s"] = time.perf_counter() - started
    env["load_average_end"] = _load_average()
    with open(stem + ".json", "w") as f:
        json.dump(data, f, indent=1)
    written = [p for p in (data["files"]["json"], data["files"]["png"]) if p]
    out(f"# {data['elapsed_s']:.0f} s; written: " + ", ".join(
        os.path.relpath(p) if CHECKOUT and p.startswith(CHECKOUT) else p for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
