"""The per-kernel resource report of a CUDA build: ptxas `-v` output as JSON and Markdown.

    FLAME_EXT_PTXAS_VERBOSE=1 pip install -v --no-build-isolation --no-deps -e . > build.log 2>&1
    python tools/ptxas_report.py build.log --json ptxas.json --md ptxas.md

setup.py adds `-Xptxas=-v` to nvcc when FLAME_EXT_PTXAS_VERBOSE=1; ptxas then prints, for
every kernel and every real architecture it is compiled for, the registers per thread,
the stack frame, the bytes spilled to local memory, static shared memory, barriers and
constant banks. This parser reads those lines wherever they sit in a longer log (pip's,
ninja's), attributes each kernel to the source file of the nvcc command that printed it
(ninja prints a command's status line and then its output when it finishes), and
demangles the names with c++filt (or cu++filt) when one is installed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Optional

SCHEMA = "flame_ext-ptxas/1"

_PREFIX = re.compile(r"^\s*ptxas\s+(info|warning|error)\s*:\s*(.*)$")
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_FIELDS = {
    "barriers": re.compile(r"used (\d+) barriers"),
    "smem_bytes": re.compile(r"(\d+) bytes smem"),
    "cumulative_stack_bytes": re.compile(r"(\d+) bytes cumulative stack size"),
    "lmem_bytes": re.compile(r"(\d+) bytes lmem"),
}
_CMEM = re.compile(r"(\d+) bytes cmem\[(\d+)\]")
_COMPILE_TIME = re.compile(r"Compile time = ([\d.]+) ms")
# A compiler command line (a ninja status line or a bare command): its .cu source.
_SOURCE = re.compile(r"\bnvcc\b.*?\s-c\s+(?:-c\s+)?(\S+\.cu)\b")


def _source_name(path: str) -> str:
    """csrc/<family>/<file>.cu when the path runs through csrc/, else the path itself."""
    marker = path.rfind("csrc/")
    return path[marker:] if marker >= 0 else path


def parse(text: str) -> dict:
    """Kernels and warnings of a log: {'kernels': [...], 'warnings': [...]}.

    A kernel record: kernel (mangled name), arch, entry (a __global__ function, False for
    a non-inlined device function), source, registers, barriers, stack_frame_bytes,
    spill_stores_bytes, spill_loads_bytes, smem_bytes, cmem_bytes ({bank: bytes}),
    cumulative_stack_bytes, compile_ms; fields ptxas did not print are absent or None.
    """
    kernels: List[dict] = []
    warnings: List[str] = []
    source: Optional[str] = None
    arch: Optional[str] = None
    current: Optional[dict] = None  # the record the next 'Used' / frame line belongs to
    expect_frame: Optional[dict] = None

    for raw in text.splitlines():
        line = raw.strip()
        if expect_frame is not None:
            frame = _FRAME.search(line)
            expect_frame, target = None, expect_frame
            if frame:
                target.update(stack_frame_bytes=int(frame.group(1)),
                              spill_stores_bytes=int(frame.group(2)),
                              spill_loads_bytes=int(frame.group(3)))
                continue
        match = _PREFIX.match(line)
        if not match:
            command = _SOURCE.search(line)
            if command:
                source = _source_name(command.group(1))
            continue
        level, message = match.groups()
        if level != "info":
            warnings.append(f"ptxas {level}: {message}")
            continue
        entry = _ENTRY.search(message)
        if entry:
            arch = entry.group(2)
            current = {"kernel": entry.group(1), "arch": arch, "entry": True,
                       "source": source, "registers": None, "stack_frame_bytes": None,
                       "spill_stores_bytes": None, "spill_loads_bytes": None}
            kernels.append(current)
            continue
        properties = _PROPERTIES.search(message)
        if properties:
            name = properties.group(1)
            if current is None or current["kernel"] != name or "stack_frame_bytes_seen" in current:
                # A device function that ptxas kept out of line: it has a frame, no 'Used'.
                current = {"kernel": name, "arch": arch, "entry": False, "source": source,
                           "registers": None, "stack_frame_bytes": None,
                           "spill_stores_bytes": None, "spill_loads_bytes": None}
                kernels.append(current)
            current["stack_frame_bytes_seen"] = True
            expect_frame = current
            continue
        used = _USED.search(message)
        if used and current is not None:
            current["registers"] = int(used.group(1))
            for key, pattern in _FIELDS.items():
                found = pattern.search(message)
                if found:
                    current[key] = int(found.group(1))
            banks = {f"cmem[{b}]": int(n) for n, b in _CMEM.findall(message)}
            if banks:
                current["cmem_bytes"] = banks
            continue
        compile_time = _COMPILE_TIME.search(message)
        if compile_time and current is not None:
            current["compile_ms"] = float(compile_time.group(1))
    for kernel in kernels:
        kernel.pop("stack_frame_bytes_seen", None)
    return {"kernels": kernels, "warnings": warnings}


def demangle(names: List[str]) -> Dict[str, str]:
    """{mangled: demangled} through one c++filt (or cu++filt) process; names it cannot
    demangle, or all of them when neither tool is installed, map to themselves."""
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    unique = sorted(set(names))
    if not tool or not unique:
        return {n: n for n in unique}
    try:
        out = subprocess.run([tool], input="\n".join(unique) + "\n", text=True,
                             capture_output=True, timeout=30, check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {n: n for n in unique}
    if len(out) != len(unique):
        return {n: n for n in unique}
    return dict(zip(unique, out))


def short_name(demangled: str) -> str:
    """A demangled signature without its return type, argument list and anonymous
    namespaces: 'void ns::(anonymous namespace)::k<float, 8>(float const*, long)' ->
    'ns::k<float, 8>'."""
    name = demangled.strip()
    if name.endswith(")"):
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    name = name.replace("(anonymous namespace)::", "")
    if name.startswith("void "):
        name = name[len("void "):]
    return name


def report(text: str, meta: Optional[dict] = None) -> dict:
    """parse() plus demangled names and a summary, with `meta` (device, torch, date...)."""
    parsed = parse(text)
    # A log holding two builds (a retried one) reports each kernel once: the last.
    last = {(k["kernel"], k["arch"]): k for k in parsed["kernels"]}
    parsed["kernels"] = [k for k in parsed["kernels"] if last[(k["kernel"], k["arch"])] is k]
    names = demangle([k["kernel"] for k in parsed["kernels"]])
    for kernel in parsed["kernels"]:
        kernel["name"] = short_name(names.get(kernel["kernel"], kernel["kernel"]))
        kernel["demangled"] = names.get(kernel["kernel"], kernel["kernel"])
    entries = [k for k in parsed["kernels"] if k["entry"]]
    spilling = sorted({f"{k['name']} ({k['arch']})" for k in parsed["kernels"]
                       if (k.get("spill_stores_bytes") or 0) + (k.get("spill_loads_bytes") or 0)})
    summary = {
        "kernels": len(entries),
        "device_functions": len(parsed["kernels"]) - len(entries),
        "archs": sorted({k["arch"] for k in parsed["kernels"] if k["arch"]}),
        "max_registers": max((k["registers"] or 0 for k in entries), default=0),
        "max_stack_frame_bytes": max((k.get("stack_frame_bytes") or 0 for k in entries),
                                     default=0),
        "spilling": spilling,
        "warnings": len(parsed["warnings"]),
    }
    return {"schema": SCHEMA, "meta": meta or {}, "summary": summary, **parsed}


def _cell(value) -> str:
    return "-" if value is None else str(value)


def markdown(data: dict) -> str:
    """The report as a Markdown table per architecture, kernels sorted by source and name."""
    meta, summary = data.get("meta", {}), data["summary"]
    lines = ["# ptxas resource usage of the flame_ext CUDA kernels", ""]
    described = ", ".join(f"{k}: {v}" for k, v in meta.items() if v not in (None, ""))
    if described:
        lines += [described, ""]
    lines += [
        f"{summary['kernels']} kernel instantiations ({summary['device_functions']} out-of-line "
        f"device functions) for {', '.join(summary['archs']) or 'no architecture'}; at most "
        f"{summary['max_registers']} registers per thread and a "
        f"{summary['max_stack_frame_bytes']}-byte stack frame; "
        + (f"spills in: {', '.join(summary['spilling'])}." if summary["spilling"]
           else "no spills."),
        "",
    ]
    for arch in summary["archs"] or [None]:
        rows = sorted((k for k in data["kernels"] if k["arch"] == arch),
                      key=lambda k: (k["source"] or "", not k["entry"], k["name"]))
        if not rows:
            continue
        lines += [f"## {arch}", "",
                  "| kernel | source | registers | stack frame (B) | spill stores (B) "
                  "| spill loads (B) | smem (B) | barriers | cmem (B) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for k in rows:
            name = k["name"] if k["entry"] else f"{k['name']} (device function)"
            cmem = ", ".join(f"{bank} {n}" for bank, n in k.get("cmem_bytes", {}).items())
            # ptxas leaves out 'N bytes smem' when a kernel has none.
            smem = k.get("smem_bytes", 0) if k["entry"] else None
            cells = [f"`{name.replace('|', '/')}`", k["source"], k["registers"],
                     k.get("stack_frame_bytes"), k.get("spill_stores_bytes"),
                     k.get("spill_loads_bytes"), smem, k.get("barriers"), cmem or None]
            lines.append("| " + " | ".join(_cell(v) for v in cells) + " |")
        lines.append("")
    if data["warnings"]:
        lines += ["## ptxas warnings", ""] + [f"- {w}" for w in data["warnings"]] + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", help="a build log holding ptxas -v output")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--md", help="write the Markdown tables here")
    parser.add_argument("--meta", help="a JSON file of facts to put in the header "
                                       "(device, torch, nvcc, date)")
    args = parser.parse_args(argv)
    with open(args.log, errors="replace") as f:
        text = f.read()
    meta = None
    if args.meta:
        with open(args.meta) as f:
            meta = json.load(f)
    data = report(text, meta)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    table = markdown(data)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table)
    if not (args.json or args.md):
        print(table)
    return 0 if data["kernels"] else 1


if __name__ == "__main__":
    sys.exit(main())
