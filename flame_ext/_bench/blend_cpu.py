"""The blend op's CPU hand loops against BLAS at the decoders' sizes, one process.

`python -m flame_ext._bench.blend_cpu [--threads 1 2] [--batch-sizes ...] [--shapes ...]`
times, for each shape and batch size, flame_ext::blend against torch.addmm (base +
coeffs @ dirs^T, then + pose_coeffs @ pose_dirs) and flame_ext::blend_backward against
torch.mm (grad_out @ dirs and grad_out @ pose_dirs^T), sampled in interleaved rounds
(`timing.measure`), medians. BLAS is whatever torch was built with (MKL on x86 wheels).
It prints milliseconds per call, BLAS time / hand time, and microseconds per sample: the
per-sample time of the hand loops should not rise with the batch. The numbers in
docs/PERFORMANCE.md come from this script.
"""

from __future__ import annotations

import argparse

import torch

from . import timing
from .run import cpu_model

# name: (N rows of dirs, K columns, P pose rows)
SHAPES = {
    "shape": (15069, 400, 36),   # FlameShape: 3 x 5023 vertices, 300 shape + 100 expression
    "shared": (15069, 100, 36),  # shared identity: the 100 expression columns per frame
    "tex": (196608, 50, 0),      # FlameTex: 3 x 256 x 256 texels, 50 components
}
BATCHES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)


def sweep(shape: str, batches, threads: int, repeats: int, budget_s: float) -> None:
    ops = torch.ops.flame_ext
    N, K, P = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    dirs = torch.randn(N, K, generator=gen)
    pose_dirs = torch.randn(P, N, generator=gen)
    base = torch.randn(N, generator=gen)
    torch.set_num_threads(threads)
    print(f"# {shape}: N={N} K={K} P={P}, {threads} thread(s); ms per call (median), "
          "blas/hand, us per sample")
    print(f"{'B':>4} {'fwd hand':>9} {'fwd blas':>9} {'ratio':>6} {'bwd hand':>9} "
          f"{'bwd blas':>9} {'ratio':>6} {'fwd us/B':>9} {'bwd us/B':>9}")
    for B in batches:
        coeffs = torch.randn(B, K, generator=gen)
        pose_coeffs = torch.randn(B, P, generator=gen)
        grad_out = torch.randn(B, N, generator=gen)

        def blas_forward():
            out = torch.addmm(base, coeffs, dirs.t())
            return out.addmm_(pose_coeffs, pose_dirs) if P else out

        def blas_backward():
            return torch.mm(grad_out, dirs), torch.mm(grad_out, pose_dirs.t()) if P else None

        steps = {
            "fwd hand": lambda: ops.blend(base, dirs, coeffs, pose_dirs, pose_coeffs),
            "fwd blas": blas_forward,
            "bwd hand": lambda: ops.blend_backward(grad_out, dirs, pose_dirs, True, P > 0),
            "bwd blas": blas_backward,
        }
        res = timing.measure(steps, torch.device("cpu"), repeats=repeats, budget_s=budget_s)
        ms = {name: r["median_s"] * 1e3 for name, r in res.items()}
        print(f"{B:>4} {ms['fwd hand']:9.3f} {ms['fwd blas']:9.3f} "
              f"{ms['fwd blas'] / ms['fwd hand']:6.2f} {ms['bwd hand']:9.3f} "
              f"{ms['bwd blas']:9.3f} {ms['bwd blas'] / ms['bwd hand']:6.2f} "
              f"{ms['fwd hand'] * 1e3 / B:9.1f} {ms['bwd hand'] * 1e3 / B:9.1f}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--budget", type=float, default=0.3, help="seconds per step")
    args = parser.parse_args(argv)
    from flame_ext import _ops

    if not _ops.available():
        raise SystemExit(f"flame_ext's compiled ops are not available: {_ops.load_error()}")
    try:
        import os

        load = f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    except (AttributeError, OSError):
        load = ""
    print(f"# {cpu_model()} | torch {torch.__version__}{load}")
    for shape in args.shapes:
        for threads in args.threads:
            sweep(shape, args.batch_sizes, threads, args.repeats, args.budget)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
