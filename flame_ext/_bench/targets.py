"""The project's performance targets (docs/PERFORMANCE.md), read off a benchmark run and
printed after its table: never asserted (a shared 2-core machine is too noisy for that).
"""

from __future__ import annotations

from typing import List

from .cases import PEERS as PEER_NAMES
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


# The CPU speed checks (docs/PERFORMANCE.md, "CPU speed on every x86 machine"), read on
# flame_ext over every case of a run:
# - no cliff: the time per sample never rises more than CLIFF_LIMIT from one measured batch
#   size to the next larger one;
# - near the floor: from FLOOR_MIN_BATCH on, the FlameShape cases within FLOOR_LIMIT of
#   their floor, FLOOR_LIMIT_R for those returning medusa's (B, V, 4, 4) R (whose floor
#   counts first-touching it);
# - ahead of the peers: at least PEER_LIMIT times each peer's speed where one ran.
CLIFF_LIMIT = 1.10
FLOOR_MIN_BATCH = 16
FLOOR_LIMIT = 1.5
FLOOR_LIMIT_R = 1.3
PEER_LIMIT = 3.0
_FLOOR_CASES = ("shape_", "shared_", "meanR_", "ids8_")


def speed_checks(results: List[dict], impl: str = "flame_ext") -> dict:
    """What of the CPU speed checks a run shows: the misses of each, and how many
    readings each made."""
    per_case: dict = {}
    checks = {"cliff": [], "floor": [], "peer": []}
    counts = dict.fromkeys(checks, 0)
    for r in results:
        cell = r["impls"].get(impl, {})
        if "median_s" not in cell:
            continue
        per_case.setdefault(r["case"], []).append((r["batch"], cell["median_s"] / r["batch"]))
        if r["case"].startswith(_FLOOR_CASES) and r["batch"] >= FLOOR_MIN_BATCH and "x_floor" in cell:
            limit = FLOOR_LIMIT_R if r["case"].endswith("_R") else FLOOR_LIMIT
            counts["floor"] += 1
            if cell["x_floor"] > limit:
                checks["floor"].append(f"{r['case']} B={r['batch']}: {cell['x_floor']:.2f}x the "
                                       f"floor (limit {limit:g}x)")
        for peer in PEER_NAMES:
            value = cell.get(f"speedup_vs_{peer}")
            if value is None:
                continue
            counts["peer"] += 1
            if value < PEER_LIMIT:
                checks["peer"].append(f"{r['case']} B={r['batch']}: {value:.2f}x {peer} "
                                      f"(limit {PEER_LIMIT:g}x)")
    for case, points in per_case.items():
        points.sort()
        for (b0, t0), (b1, t1) in zip(points, points[1:]):
            counts["cliff"] += 1
            if t1 > CLIFF_LIMIT * t0:
                checks["cliff"].append(f"{case} B={b0}->{b1}: {format_time(t0)} -> "
                                       f"{format_time(t1)} per sample (+{(t1 / t0 - 1) * 100:.0f}%)")
    return {"misses": checks, "readings": counts}


def format_speed_checks(found: dict) -> List[str]:
    titles = {"cliff": f"per-sample time rising over {(CLIFF_LIMIT - 1) * 100:.0f}% with the batch",
              "floor": f"FlameShape from B={FLOOR_MIN_BATCH} over {FLOOR_LIMIT:g}x the floor "
                       f"({FLOOR_LIMIT_R:g}x with R)",
              "peer": f"under {PEER_LIMIT:g}x a peer"}
    lines = []
    for name, title in titles.items():
        readings, misses = found["readings"][name], found["misses"][name]
        if not readings:
            lines.append(f"  {title}: not read (no such cells in this run)")
            continue
        lines.append(f"  {title}: {len(misses)} of {readings}" + (":" if misses else ""))
        lines.extend(f"    {m}" for m in misses)
    return lines
