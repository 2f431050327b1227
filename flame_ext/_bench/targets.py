"""The project's performance targets (docs/PERFORMANCE.md), read off a benchmark run and
printed after its table: never asserted (a shared 2-core machine is too noisy for that).
"""

from __future__ import annotations

from typing import List

from .timing import format_time

# (device, case, batch, metric, bound):
# speed-ups are lower bounds, times and ratios to the floor upper bounds. The FlameShape
# ones are read on both variants, without R (a fitting loop) and with R (medusa's outputs).
TARGETS = [
    ("cpu", "shape_fwd", 1, "speedup_vs_medusa", 1.0),
    ("cpu", "shape_fwd", 16, "speedup_vs_medusa", 1.3),
    ("cpu", "shape_fwd", 256, "speedup_vs_medusa", 1.5),
    ("cpu", "shape_fwdbwd", 1, "speedup_vs_medusa", 1.1),
    ("cpu", "shape_fwdbwd", 64, "speedup_vs_medusa", 1.3),
    ("cpu", "shared_fwdbwd", 64, "speedup_vs_medusa", 2.5),
    ("cpu", "shared_fwd", 256, "speedup_vs_medusa", 2.5),
    ("cpu", "lmk68_fwd", 16, "speedup_vs_medusa", 5.0),
    ("cpu", "lmkmp_fwd", 16, "speedup_vs_medusa", 2.0),
    ("cpu", "tex_fwd", 1, "speedup_vs_medusa", 3.0),
    ("cpu", "tex_fwd", 16, "speedup_vs_medusa", 3.0),
    ("cpu", "fit68_fwdbwd", 256, "speedup_vs_medusa", 10.0),
    ("cpu", "meanR_fwd", 256, "speedup_vs_medusa", 2.5),
    ("cuda", "shape_fwd", 1, "median_s", 20e-6),
    ("cuda", "shape_fwdbwd", 1, "median_s", 50e-6),
    ("cuda", "shape_fwd", 1, "speedup_vs_compile", 5.0),
    ("cuda", "shape_fwd", 4096, "x_floor", 1.4),
]


def evaluate_targets(results: List[dict], kind: str, impls: List[str]) -> List[dict]:
    """The TARGETS of this device kind that the run measured, with the values read."""
    rows = {(r["case"], r["batch"]): r for r in results}
    candidates = [i for i in ("flame_ext", "flame_ext_graph") if i in impls]
    read = []
    for device, case, batch, metric, bound in TARGETS:
        if device != kind:
            continue
        variants = [case, case + "_R"] if case.startswith(("shape", "shared")) else [case]
        for name in variants:
            row = rows.get((name, batch))
            if row is None:
                continue
            values = {i: row["impls"][i][metric] for i in candidates
                      if metric in row["impls"].get(i, {})}
            upper = metric in ("median_s", "x_floor")
            met = {i: (v <= bound if upper else v >= bound) for i, v in values.items()}
            read.append({"case": name, "batch": batch, "metric": metric,
                         "bound": ("<= " if upper else ">= ") + f"{bound:g}",
                         "values": values, "met": met})
    return read


def format_target(target: dict) -> str:
    def value(v):
        return format_time(v) if target["metric"] == "median_s" else f"{v:.2f}"

    if not target["values"]:
        measured = "not measured (flame_ext did not run)"
    else:
        measured = ", ".join(
            f"{impl} {value(v)} {'met' if target['met'][impl] else 'MISSED'}"
            for impl, v in target["values"].items())
    bound = target["bound"]
    if target["metric"] == "median_s":
        bound = bound[:3] + format_time(float(bound[3:]))
    return f"  {target['case']:<16} B={target['batch']:<5} {target['metric']} {bound}: {measured}"
