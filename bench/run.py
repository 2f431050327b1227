"""Throughput benchmark of the FLAME decoders: flame_ext against its baselines, in one run.

    python bench/run.py                      # CPU (or CUDA when present), default sweep
    python bench/run.py --quick              # seconds: the CI smoke test
    python bench/run.py --device cuda --batch-sizes 1 64 4096

Every case runs each implementation on the same module buffers and the same inputs:
``medusa`` (flame_ext.medusa_baseline: medusa's algorithm, what users run today),
``reference`` (flame_ext.reference, eager), ``compile`` (torch.compile of the reference,
when --compile) and ``flame_ext`` (the compiled ops). Results: a table on stdout and a
JSON file under --out with the device, versions, git sha and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flame_ext  # noqa: E402
from flame_ext import FlameLandmark, FlameShape, FlameTex  # noqa: E402

IMPLEMENTATIONS = ("medusa", "reference", "compile", "flame_ext")
BACKEND_OF = {"medusa": "medusa", "reference": "reference", "compile": "reference",
              "flame_ext": "ext"}


@dataclass
class Case:
    name: str
    description: str
    batch_sizes: List[int]
    # (impl name, batch size) -> a zero-argument callable doing one timed step
    make: Callable[[str, int], Callable[[], object]]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Callable[[], object], device: torch.device, repeats: int,
              min_seconds: float) -> Dict[str, float]:
    """Median and quartiles of the per-call time (seconds) over `repeats` samples.

    Each sample runs the step enough times to last ~min_seconds / repeats, so that tiny
    steps are not dominated by timer resolution. Warm-up first (allocator, caches, JIT).
    """
    for _ in range(3):
        step()
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    once = max(time.perf_counter() - start, 1e-7)
    inner = max(1, int(min_seconds / repeats / once))
    samples = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(inner):
            step()
        _sync(device)
        samples.append((time.perf_counter() - start) / inner)
    samples.sort()
    quartiles = statistics.quantiles(samples, n=4) if len(samples) > 1 else samples * 3
    return {"median": statistics.median(samples), "q1": quartiles[0], "q3": quartiles[2],
            "samples": len(samples) * inner}


def _input_sets(n_sets, make_one):
    """Rotating input sets, so repeated calls don't read the same (cached) inputs."""
    sets = [make_one(i) for i in range(n_sets)]
    counter = iter(range(10**12))
    return lambda: sets[next(counter) % n_sets]


def build_cases(device, batch_sizes, model_path, transforms_list, use_compile):
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    shape_modules, lmk_modules, tex_modules = {}, {}, {}

    def shape_module(impl, transforms):
        key = (impl, transforms)
        if key not in shape_modules:
            backend = BACKEND_OF[impl]
            module = FlameShape(device=device, model_path=model_path, backend=backend,
                                transforms=transforms if backend != "medusa" else "vertex")
            shape_modules[key] = module
        return shape_modules[key]

    def shape_inputs(batch, shared):
        def one(_):
            return {
                "shape": rand(1 if shared else batch, 300, scale=0.5),
                "expr": rand(batch, 100, scale=0.5),
                "global_pose": rand(batch, 3, scale=0.2),
                "neck_pose": rand(batch, 3, scale=0.1),
                "jaw_pose": rand(batch, 3, scale=0.1),
                "eye_pose": rand(batch, 6, scale=0.1),
            }
        return _input_sets(4, one)

    def maybe_compile(impl, fn):
        return torch.compile(fn) if impl == "compile" else fn

    def shape_case(shared, backward, transforms):
        def make(impl, batch):
            module = shape_module(impl, transforms)
            next_inputs = shape_inputs(batch, shared)
            forward = maybe_compile(impl, module.forward)
            if not backward:
                def step():
                    with torch.no_grad():
                        return forward(**next_inputs())
                return step

            def step():
                inputs = {k: v.requires_grad_(True) for k, v in next_inputs().items()}
                v, R = forward(**inputs)
                # R enters the loss only when the case uses it; medusa computes it anyway.
                loss = v.square().sum() + (R.sum() if transforms == "vertex" else 0)
                loss.backward()
            return step
        return make

    def lmk_case(lm_type, backward):
        def make(impl, batch):
            if (impl, lm_type) not in lmk_modules:
                lmk_modules[(impl, lm_type)] = FlameLandmark(
                    lm_type, device=device, model_path=model_path, backend=BACKEND_OF[impl])
            module = lmk_modules[(impl, lm_type)]
            verts = shape_module("reference", "none")
            def one(_):
                with torch.no_grad():
                    v, _ = verts(batch_size=batch)
                return v + rand(*v.shape, scale=1e-3), rand(batch, 15, scale=0.3)
            next_inputs = _input_sets(4, one)
            forward = maybe_compile(impl, module.forward)
            if not backward:
                def step():
                    with torch.no_grad():
                        return forward(*next_inputs())
                return step

            def step():
                v, poses = next_inputs()
                forward(v.requires_grad_(True), poses).square().sum().backward()
            return step
        return make

    def tex_case():
        def make(impl, batch):
            if impl not in tex_modules:
                tex_modules[impl] = FlameTex(model_path=model_path, n_tex=50,
                                             backend=BACKEND_OF[impl]).to(device)
            module = tex_modules[impl]
            next_inputs = _input_sets(4, lambda _: rand(batch, 50))
            forward = maybe_compile(impl, module.forward)

            def step():
                with torch.no_grad():
                    return forward(next_inputs())
            return step
        return make

    small = [b for b in batch_sizes if b <= 64] or batch_sizes[:1]
    cases = []
    for transforms in transforms_list:
        tag = "R" if transforms == "vertex" else "noR"
        cases += [
            Case(f"shape_fwd_{tag}", f"FlameShape forward, per-sample shape, R={transforms}",
                 batch_sizes, shape_case(False, False, transforms)),
            Case(f"shape_fwdbwd_{tag}", f"FlameShape forward+backward, per-sample, R={transforms}",
                 batch_sizes, shape_case(False, True, transforms)),
            Case(f"shared_fwd_{tag}", f"FlameShape forward, shared identity, R={transforms}",
                 batch_sizes, shape_case(True, False, transforms)),
            Case(f"shared_fwdbwd_{tag}", f"FlameShape forward+backward, shared identity, R={transforms}",
                 batch_sizes, shape_case(True, True, transforms)),
        ]
    cases += [
        Case("lmk68_fwd", "FlameLandmark '68' forward", batch_sizes, lmk_case("68", False)),
        Case("lmk68_fwdbwd", "FlameLandmark '68' forward+backward", batch_sizes, lmk_case("68", True)),
        Case("lmkmp_fwd", "FlameLandmark 'mp' forward", batch_sizes, lmk_case("mp", False)),
        Case("tex_fwd", "FlameTex forward (n_tex=50)", small, tex_case()),
    ]
    return cases


def environment(device) -> dict:
    try:
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return {
        "device": name, "device_type": device.type, "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "git_sha": sha,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "build_info": flame_ext.build_info(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=flame_ext.DEVICE)
    parser.add_argument("--quick", action="store_true", help="tiny sweep (CI smoke test)")
    parser.add_argument("--batch-sizes", type=int, nargs="+")
    parser.add_argument("--cases", nargs="+", help="substrings of case names to run")
    parser.add_argument("--impls", nargs="+", default=["medusa", "flame_ext"],
                        choices=IMPLEMENTATIONS)
    parser.add_argument("--compile", action="store_true", help="add torch.compile(reference)")
    parser.add_argument("--model-path", default="synthetic",
                        help="FLAME data (default: the full-size synthetic model)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--min-seconds", type=float, default=0.5,
                        help="time budget per measurement")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    impls = list(args.impls) + (["compile"] if args.compile and "compile" not in args.impls else [])
    if args.quick:
        batch_sizes = args.batch_sizes or [1, 4]
        args.repeats, args.min_seconds = 3, 0.05
    else:
        batch_sizes = args.batch_sizes or ([1, 16, 64, 256] if device.type == "cpu"
                                           else [1, 16, 64, 256, 1024, 4096])
    transforms_list = ["vertex"] if args.quick else ["vertex", "none"]
    warnings.filterwarnings("once")
    cases = build_cases(device, batch_sizes, args.model_path, transforms_list,
                        "compile" in impls)
    if args.cases:
        cases = [c for c in cases if any(s in c.name for s in args.cases)]

    env = environment(device)
    print(f"# flame_ext benchmark on {env['device']} | torch {env['torch']} | "
          f"threads {env['threads']} | {env['date']}")
    header = f"{'case':<22}{'B':>6}" + "".join(f"{i:>14}" for i in impls) + "   speed-up vs medusa"
    print(header)
    results = []
    for case in cases:
        for batch in case.batch_sizes:
            row = {"case": case.name, "description": case.description, "batch": batch}
            for impl in impls:
                try:
                    row[impl] = time_step(case.make(impl, batch), device, args.repeats,
                                          args.min_seconds)
                except Exception as exc:  # a baseline that cannot run is reported, not fatal
                    row[impl] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            cells = "".join(
                f"{row[i]['median'] * 1e3:>12.3f}ms" if "median" in row[i] else f"{'error':>14}"
                for i in impls)
            speedup = ""
            if "median" in row.get("medusa", {}) and "median" in row.get("flame_ext", {}):
                speedup = f"{row['medusa']['median'] / row['flame_ext']['median']:>8.2f}x"
                row["speedup_vs_medusa"] = row["medusa"]["median"] / row["flame_ext"]["median"]
            print(f"{case.name:<22}{batch:>6}{cells}   {speedup}", flush=True)
            results.append(row)

    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(args.out, f"bench_{device.type}_{stamp}.json")
    with open(path, "w") as f:
        json.dump({"environment": env, "args": vars(args), "results": results}, f, indent=1)
    print(f"# results written to {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
