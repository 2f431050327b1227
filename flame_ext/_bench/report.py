"""Markdown tables of a results JSON (as written by bench/run.py), for the README.

    python -m flame_ext._bench.report bench/results/bench_cpu-....json
    python -m flame_ext._bench.report RESULTS.json --cases shape_fwd shared_fwdbwd --batches 1 64 256

Prints the machine, the command, the floor rates, one row per (case, batch) with every
implementation's median time and spread, the floor, the headline implementation's ratio
to the floor and its speed-ups, then the fitting loop. Cells that did not run are "n/a"
(an error, see the JSON) or "-" (not run by design: memory, or graphs at large batches).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from .cases import PEERS
from .floor import describe_rates
from .run import cpu_generation
from .targets import format_speed_checks
from .timing import format_time


def _cell(cell: dict) -> str:
    if "median_s" in cell:
        return f"{format_time(cell['median_s'])} ±{min(100 * cell['spread'], 999):.0f}%"
    return "n/a" if "error" in cell else "-"


def _ratio(cell: dict, key: str) -> str:
    return f"{cell[key]:.2f}x" if key in cell else "-"


def markdown(data: dict, cases: Optional[List[str]] = None,
             batches: Optional[List[int]] = None) -> str:
    env, impls, head = data["environment"], data["impls"], data.get("headline", "flame_ext")
    rates = data["device_rates"]
    dirty = "+dirty" if env.get("git_dirty") else ""
    lines = [
        f"Machine: {env['device']}{cpu_generation(env)}"
        + (f", {env['cpu_count']} cores" if env["device_type"] == "cpu" else "")
        + (f", CPU loops {env['cpu_isa']}"
           if env["device_type"] == "cpu" and env.get("cpu_isa") else "")
        + f"; torch {env['torch']}"
        + (f", CUDA {env['cuda']}" if env["device_type"] == "cuda" else "")
        + f"; flame_ext {env['git_sha'][:10]}{dirty}; {env['date']}"
        + (f"; load average {env['load_average_start'][0]:.1f} at the start"
           if env.get("load_average_start") else ""),
        "",
        f"Command: `{data.get('command', 'python bench/run.py')}`",
        "",
        f"Floor rates measured in the same run: {describe_rates(rates)}. Times: median ± "
        f"interquartile range / median.",
        "",
    ]
    with_compile = "compile" in impls
    peers = [p for p in PEERS if p in impls]
    header = (["case", "B"] + impls + ["floor", f"{head} / floor", f"{head} vs medusa"]
              + ([f"{head} vs compile"] if with_compile else [])
              + [f"{head} vs {p}" for p in peers])
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for row in data["results"]:
        if cases and row["case"] not in cases:
            continue
        if batches and row["batch"] not in batches:
            continue
        h = row["impls"].get(head, {})
        cells = ([row["case"], str(row["batch"])]
                 + [_cell(row["impls"][i]) for i in impls]
                 + [format_time(row["floor"]["time_s"]), _ratio(h, "x_floor"),
                    _ratio(h, "speedup_vs_medusa")]
                 + ([_ratio(h, "speedup_vs_compile")] if with_compile else [])
                 + [_ratio(h, f"speedup_vs_{p}") for p in peers])
        lines.append("| " + " | ".join(cells) + " |")

    fit = data.get("fit")
    if fit and fit.get("results"):
        lines += [
            "",
            f"Fitting loop (bench/fit.py): {fit['frames']} frames x {fit['iterations']} Adam "
            f"iterations, {'shared' if fit['shared_identity'] else 'per-frame'} identity, "
            "68 landmarks.",
            "",
            "| impl | frames x iterations / s | ms / iteration | vs medusa | "
            "landmark error, start -> end (noise) |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in fit["results"]:
            if "frames_iters_per_s" not in r:
                lines.append(f"| {r['impl']} | n/a | | | |")
                continue
            lines.append(
                f"| {r['impl']} | {r['frames_iters_per_s']:,.0f} | {r['ms_per_iteration']:.1f} | "
                f"{_ratio(r, 'speedup_vs_medusa')} | {r['initial_lmk_error']:.3f} -> "
                f"{r['final_lmk_error']:.4f} ({r['truth_lmk_error']:.4f}) |")
    if data.get("speed_checks"):
        lines += ["", "CPU speed checks (docs/PERFORMANCE.md), read off this run:", "", "```"]
        lines += format_speed_checks(data["speed_checks"]) + ["```"]
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a results JSON written by bench/run.py")
    parser.add_argument("--cases", nargs="+", help="only these cases (full names)")
    parser.add_argument("--batches", type=int, nargs="+", help="only these batch sizes")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        data = json.load(f)
    print(markdown(data, args.cases, args.batches))
    return 0


if __name__ == "__main__":
    sys.exit(main())
