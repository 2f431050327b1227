"""How the benchmark times a step: warm-up, rotating inputs, CUDA events, CUDA graphs.

A measurement is `repeats` samples; each sample runs the step `calls` times back to back
and divides, so that microsecond steps are not lost in timer resolution and launch
jitter; the implementations of one case are sampled in interleaved rounds. On CUDA a
sample is bracketed by CUDA events (GPU time between the first launch and the last
kernel, which equals wall time when the host is the bottleneck); on the CPU by
perf_counter. The first call is timed on its own (for torch.compile it holds the
compilation) and never enters the statistics.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(samples: Sequence[float]) -> Dict[str, float]:
    """Median, quartiles (inclusive method), extremes and relative spread of `samples`."""
    ordered = sorted(samples)
    if len(ordered) > 1:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    median = statistics.median(ordered)
    return {
        "median_s": median,
        "q1_s": q1,
        "q3_s": q3,
        "min_s": ordered[0],
        "max_s": ordered[-1],
        "spread": (q3 - q1) / median if median > 0 else 0.0,
        "repeats": len(ordered),
    }


def rotating(items: Sequence) -> Callable[[], object]:
    """A function returning items[0], items[1], ..., cycling.

    Successive calls read different inputs, so a step never finds all of its inputs in
    cache just because the previous call used them (see `input_set_count`).
    """
    cycle = itertools.cycle(items)
    return lambda: next(cycle)


def last_level_cache_bytes(device: torch.device) -> int:
    """The GPU's L2 or the CPU's largest cache (sysfs), 64 MB when unknown."""
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        return int(size) or 64 * 2**20
    best = 0
    for index in range(8):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip()
        except OSError:
            break
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            best = max(best, int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return best or 64 * 2**20


def input_set_count(set_bytes: int, device: torch.device) -> int:
    """How many input sets to rotate through: enough for their total to exceed the
    last-level cache (at least 64 MB), at most 8, within 2 GB (CPU 512 MB) of inputs in
    all unless one set is larger, and never fewer than 2."""
    overflow = max(64 * 2**20, last_level_cache_bytes(device))
    budget = 2 * 2**30 if device.type == "cuda" else 512 * 2**20
    count = math.ceil(overflow / max(set_bytes, 1))
    return int(max(2, min(8, count, budget // max(set_bytes, 1))))


def _warm(step: Callable[[], object], device: torch.device, warmup: int,
          budget_s: float) -> Tuple[float, float]:
    """Runs the first call and the warm-up: (first call seconds, last warm-up seconds).

    Warm-up is at least `warmup` calls and half the budget (the first calls of a step
    still page-fault fresh allocations in and settle malloc's thresholds); a slow step is
    warm after one call, its warm-up would cost more than the samples.
    """
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    first_call = time.perf_counter() - start
    warm_s, calls_done, warm_start = budget_s / 2, 0, time.perf_counter()
    while True:
        start = time.perf_counter()
        step()
        synchronize(device)
        once = max(time.perf_counter() - start, 1e-7)
        calls_done += 1
        if once > warm_s or (calls_done >= max(1, warmup)
                             and time.perf_counter() - warm_start >= warm_s):
            return first_call, once


def _sample(step: Callable[[], object], calls: int, device: torch.device) -> float:
    """Seconds per call over `calls` back-to-back calls."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(calls):
            step()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3 / calls
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - start) / calls


def measure(steps: Dict[str, Callable[[], object]], device: torch.device, *, repeats: int,
            budget_s: float, warmup: int = 2, max_calls: int = 10000,
            budgets: Optional[Dict[str, float]] = None) -> Dict[str, dict]:
    """Times each step (which rotates its own inputs): statistics of seconds per call.

    The steps are the implementations of one case and batch. They are sampled in
    interleaved rounds (A B C, B C A, C A B, ...), so that a change of machine load
    during the measurement (other processes on a shared machine) hits every
    implementation alike and their ratios stay fair. `budget_s` is the time one step's
    samples should take together; a step slower than budget_s / 3 gets 3 samples of one
    call each, so long steps do not stall a sweep. A step that raises gets
    {'error': ...} and the others go on.
    """
    results: Dict[str, dict] = {}
    plans = {}
    for name, step in steps.items():
        budget = (budgets or {}).get(name, budget_s)
        try:
            first_call, once = _warm(step, device, warmup, budget)
        except Exception as exc:  # reported per implementation, never fatal
            results[name] = {"error": describe_error(exc)}
            continue
        count = max(3, min(repeats, int(budget / once)))
        calls = int(max(1, min(max_calls, round(budget / count / once))))
        plans[name] = {"step": step, "count": count, "calls": calls, "first": first_call,
                       "samples": []}
    names = list(plans)
    for round_ in range(max((p["count"] for p in plans.values()), default=0)):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            plan = plans[name]
            if name in results or len(plan["samples"]) >= plan["count"]:
                continue
            try:
                plan["samples"].append(_sample(plan["step"], plan["calls"], device))
            except Exception as exc:
                results[name] = {"error": describe_error(exc)}
    for name, plan in plans.items():
        if name not in results:
            results[name] = summarize(plan["samples"])
            results[name].update(calls_per_sample=plan["calls"], first_call_s=plan["first"])
    return {name: results[name] for name in steps}


def describe_error(exc: BaseException) -> str:
    """One line naming the exception, short enough for a table footnote and the JSON."""
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]


def graphed(run: Callable[[object], object], sets: Sequence, device: torch.device,
            warmup: int = 3) -> Callable[[], object]:
    """A step that replays one CUDA graph per input set, rotating.

    Each set gets its own graph (captured with its own memory pool, so no graph's
    outputs alias another's), so replays rotate inputs without copying them into a
    static buffer. Warm-up runs on a side stream before capture, as CUDA graphs need.
    Raises whatever the capture raises (a host synchronisation inside the step makes
    capture fail: medusa's algorithm is not capturable).
    """
    if device.type != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            for inputs in sets:
                run(inputs)
    torch.cuda.current_stream(device).wait_stream(side)
    synchronize(device)
    graphs = []
    for inputs in sets:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = run(inputs)
        graphs.append((graph, outputs))  # the outputs are the graph's static buffers
    next_graph = rotating(graphs)
    return lambda: next_graph()[0].replay()


def format_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f}us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f}ms"
    return f"{seconds:.2f}s"
