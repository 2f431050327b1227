"""The benchmark figure: time per call against batch size, one panel per case.

Log-log axes, one line per implementation (the band is the interquartile range of the
repeats), the floor of floor.py as a dashed black line; a last panel with the
fitting loop's throughput when it ran. Written with matplotlib's Agg backend (no
display needed).

    python -m flame_ext._bench.plot bench/results/bench_cpu-....json      # rewrites the .png beside it
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Optional

# One colour per implementation, the same in every figure.
COLORS = {
    "medusa": "#d62728",
    "smplx": "#8c564b",
    "body_models": "#e377c2",
    "body_models_warp": "#bcbd22",
    "reference": "#7f7f7f",
    "compile": "#ff7f0e",
    "flame_ext": "#1f77b4",
    "flame_ext_graph": "#2ca02c",
    "reference_graph": "#9467bd",
    "flame_ext_lmk": "#17becf",
}


def plot_results(data: dict, path: str) -> str:
    """Draws the figure of one results JSON (as written by run.py) into `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    env = data["environment"]
    impls = data["impls"]
    case_names = list(dict.fromkeys(row["case"] for row in data["results"]))
    fit = data.get("fit") or {}
    fit_results = [r for r in fit.get("results", []) if "frames_iters_per_s" in r]
    panels = len(case_names) + (1 if fit_results else 0)
    cols = min(4, max(panels, 1))
    rows = max(1, math.ceil(panels / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    flat = [ax for line in axes for ax in line]

    for ax, case in zip(flat, case_names):
        case_rows = sorted((r for r in data["results"] if r["case"] == case),
                           key=lambda r: r["batch"])
        for impl in impls:
            points = [(r["batch"], r["impls"][impl]) for r in case_rows
                      if "median_s" in r["impls"].get(impl, {})]
            if not points:
                continue
            xs = [b for b, _ in points]
            ax.plot(xs, [m["median_s"] for _, m in points], marker="o", ms=3, lw=1.4,
                    color=COLORS.get(impl), label=impl)
            ax.fill_between(xs, [m["q1_s"] for _, m in points], [m["q3_s"] for _, m in points],
                            color=COLORS.get(impl), alpha=0.2, lw=0)
        floor_points = [(r["batch"], r["floor"]["time_s"]) for r in case_rows if r.get("floor")]
        if floor_points:
            ax.plot([b for b, _ in floor_points], [t for _, t in floor_points], "k--", lw=1,
                    label="floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.set_title(case, fontsize=9)
        ax.set_xlabel("batch size", fontsize=8)
        ax.set_ylabel("seconds per call", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="both", alpha=0.25)

    if fit_results:
        ax = flat[len(case_names)]
        names = [r["impl"] for r in fit_results]
        values = [r["frames_iters_per_s"] for r in fit_results]
        ax.bar(names, values, color=[COLORS.get(n, "#333333") for n in names])
        ax.set_yscale("log")
        ax.set_title(f"fitting loop: {fit.get('frames')} frames x {fit.get('iterations')} it",
                     fontsize=9)
        ax.set_ylabel("frames x iterations / s", fontsize=8)
        ax.tick_params(labelsize=7)
        for label in ax.get_xticklabels():
            label.set_rotation(20)
    for ax in flat[panels:]:
        ax.axis("off")

    legend = {}
    for ax in flat[:len(case_names)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    labels, handles = list(legend), list(legend.values())
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8,
                   bbox_to_anchor=(0.5, 1.0))
    fig.suptitle(f"flame_ext benchmark: {env.get('device')} | torch {env.get('torch')} | "
                 f"{env.get('date')} | {env.get('git_sha', '')[:10]}", fontsize=9, y=1.03)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    tmp = path + ".tmp"
    fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a results JSON written by bench/run.py")
    parser.add_argument("--out", help="PNG path (default: beside the JSON)")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        data = json.load(f)
    out = args.out or os.path.splitext(args.results)[0] + ".png"
    print(plot_results(data, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
