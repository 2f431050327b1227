"""The skin op's CPU loops at FlameShape's sizes, against the pure-PyTorch reference.

`python -m flame_ext._bench.skin_cpu [--isa avx512 avx2 baseline] [--batch-sizes ...]`
times, for each batch size, flame_ext::skin (v only, and with the vertex transforms R)
and flame_ext::skin_backward (from v only, and from v and R) against `reference.skin`
forward and its autograd backward on the same inputs, sampled in interleaved rounds
(`timing.measure`), medians. The CPU loops' instruction set is chosen once per process
(csrc/cpu_isa.h), so each `--isa` runs in its own process with $FLAME_EXT_CPU_ISA set
(the widest the CPU has when not given); the reference column is each process's
in-run baseline. The skin numbers in docs/PERFORMANCE.md come from this script.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

from . import timing
from .run import cpu_model

NUM_VERTS, NUM_JOINTS = 5023, 5  # FLAME
BATCHES = (1, 16, 64, 256)


def sweep(batches, threads: int, repeats: int, budget_s: float) -> None:
    from flame_ext import build_info, reference

    ops = torch.ops.flame_ext
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    weights = torch.softmax(torch.randn(NUM_VERTS, NUM_JOINTS, generator=gen), -1)
    print(f"# CPU loops {build_info().get('cpu_isa')}, {threads} thread(s), V={NUM_VERTS} "
          f"J={NUM_JOINTS}; ms per call (median), reference / flame_ext")
    names = ("fwd", "fwd R", "bwd", "bwd R")
    print(f"{'B':>4} " + " ".join(f"{n:>8} {'ref':>8} {'x':>5}" for n in names))
    for B in batches:
        v_posed = torch.randn(B, NUM_VERTS, 3, generator=gen)
        transforms = torch.randn(B, NUM_JOINTS, 4, 4, generator=gen)
        grad_v = torch.randn(B, NUM_VERTS, 3, generator=gen)
        grad_t = torch.randn(B, NUM_VERTS, 4, 4, generator=gen)
        leaves = [x.clone().requires_grad_(True) for x in (v_posed, transforms)]

        def reference_backward(with_t):
            v, t = reference.skin(*leaves, weights, with_t)
            outs, grads = ([v, t], [grad_v, grad_t]) if with_t else ([v], [grad_v])
            return torch.autograd.grad(outs, leaves, grads)

        steps = {
            "fwd": lambda: ops.skin(v_posed, transforms, weights, False),
            "fwd ref": lambda: reference.skin(v_posed, transforms, weights, False),
            "fwd R": lambda: ops.skin(v_posed, transforms, weights, True),
            "fwd R ref": lambda: reference.skin(v_posed, transforms, weights, True),
            "bwd": lambda: ops.skin_backward(grad_v, None, v_posed, transforms, weights),
            "bwd ref": lambda: reference_backward(False),
            "bwd R": lambda: ops.skin_backward(grad_v, grad_t, v_posed, transforms, weights),
            "bwd R ref": lambda: reference_backward(True),
        }
        res = timing.measure(steps, torch.device("cpu"), repeats=repeats, budget_s=budget_s)
        ms = {name: r["median_s"] * 1e3 for name, r in res.items()}
        cells = [f"{ms[n]:8.3f} {ms[n + ' ref']:8.3f} {ms[n + ' ref'] / ms[n]:5.1f}"
                 for n in names]
        print(f"{B:>4} " + " ".join(cells), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isa", nargs="+", choices=["avx512", "avx2", "baseline"],
                        help="builds of the CPU loops to run, one process each (default: "
                             "the widest this CPU has)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--budget", type=float, default=0.3, help="seconds per step")
    args = parser.parse_args(argv)
    if args.isa:
        # One process per build: $FLAME_EXT_CPU_ISA only narrows ("avx512" is the widest,
        # so it is run with the variable unset).
        rest = ["--batch-sizes", *map(str, args.batch_sizes), "--threads", str(args.threads),
                "--repeats", str(args.repeats), "--budget", str(args.budget)]
        for isa in args.isa:
            env = dict(os.environ)
            env.pop("FLAME_EXT_CPU_ISA", None)
            if isa != "avx512":
                env["FLAME_EXT_CPU_ISA"] = isa
            done = subprocess.run([sys.executable, "-m", __spec__.name, *rest], env=env)
            if done.returncode != 0:
                return done.returncode
        return 0
    from flame_ext import _ops

    if not _ops.available():
        raise SystemExit(f"flame_ext's compiled ops are not available: {_ops.load_error()}")
    print(f"# {cpu_model()} | torch {torch.__version__}")
    sweep(args.batch_sizes, args.threads, args.repeats, args.budget)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
