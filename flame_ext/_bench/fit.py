"""End-to-end fitting loop: Adam over FLAME parameters towards target landmarks.

The workload the decoders exist for: N video frames of one face, shape shared (one row)
or per frame, expression and pose per frame, optimised with Adam for a fixed number of
iterations against 68-point landmarks. The targets are decoded from known random
parameters and perturbed with noise, so the final landmark error says how well each
implementation optimised (every implementation starts from the same zeros and sees the
same targets, so their errors must agree) and the throughput is frames x iterations
per second.

    python bench/fit.py                                   # CPU: 64 frames x 100 iterations
    python bench/fit.py --device cuda --frames 256 --impls medusa flame_ext
    python bench/fit.py --per-frame-identity --json fit.json

`medusa` runs medusa's algorithm (backend='medusa': R is computed, as in medusa, though
the loss never reads it); `reference`, `compile` and `flame_ext` skip R
(transforms='none'), as a fitting loop that does not use it would; `flame_ext_lmk` is
flame_ext.fitting.FlameShapeLandmark (compiled ops), which decodes only the vertices
of the landmark faces.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

import flame_ext
from flame_ext import FlameLandmark, FlameShape, load_flame_model

from . import timing
from .._checks import count_option, device_option, positive_option

# The largest batch or frame count the benchmark's options take (run.py's too): a
# FlameShape forward at 2**24 would need ~1 TB.
MAX_COUNT = 2**24

# flame_ext_lmk: flame_ext.fitting.FlameShapeLandmark on the compiled ops, the decoder
# that evaluates only the vertices the landmarks read.
FIT_IMPLS = ("medusa", "reference", "compile", "flame_ext", "flame_ext_lmk")
BACKEND = {"medusa": "medusa", "reference": "reference", "compile": "reference",
           "flame_ext": "ext", "flame_ext_lmk": "ext"}
POSE_NAMES = ("global_pose", "neck_pose", "jaw_pose", "eye_pose")
# Ground-truth parameter scales (unit-variance codes, head turns of ~15 degrees).
TRUTH_SCALE = {"shape": 1.0, "expr": 1.0, "global_pose": 0.25, "neck_pose": 0.1,
               "jaw_pose": 0.1, "eye_pose": 0.05}
# A weak prior on the codes: 68 landmarks do not determine 400 coefficients, and
# without it the problem has no unique optimum. The same for every implementation.
CODE_PRIOR = 1e-4


@dataclass
class Problem:
    """Targets of one fitting run and what produced them."""

    target: torch.Tensor        # (frames, 68, 3)
    spread: float               # RMS distance of target landmarks from their frame's centroid
    noise: float                # std of the noise added to the targets, relative to spread
    truth_error: float          # mean landmark error of the true parameters (the noise)
    sizes: Dict[str, int]       # parameter name -> columns
    frames: int
    shared_identity: bool


def _components(model_path):
    """(n_shape, n_expr): every component the model holds (FLAME: 300, 100)."""
    model = load_flame_model(model_path)
    return model.n_shape, model.n_expr


def _landmark_error(landmarks: torch.Tensor, target: torch.Tensor, spread: float) -> float:
    """Mean Euclidean landmark distance, relative to the spread of the targets."""
    return float((landmarks - target).norm(dim=-1).mean()) / spread


def make_problem(model_path, frames: int, device, *, shared_identity: bool = True,
                 noise: float = 0.01, seed: int = 0) -> Problem:
    """Target landmarks of `frames` frames from random parameters, plus Gaussian noise."""
    device = torch.device(device)
    shape_model = FlameShape(*_components(model_path), device=device, model_path=model_path,
                             backend="reference", transforms="none")
    landmark_model = FlameLandmark("68", device=device, model_path=model_path,
                                   backend="reference")
    sizes = {"shape": shape_model.n_shape, "expr": shape_model.n_expr, "global_pose": 3,
             "neck_pose": 3, "jaw_pose": 3, "eye_pose": 6}
    generator = torch.Generator(device).manual_seed(seed)
    truth = {
        name: TRUTH_SCALE[name] * torch.randn(
            1 if (shared_identity and name == "shape") else frames, size,
            generator=generator, device=device)
        for name, size in sizes.items()
    }
    with torch.no_grad():
        v, _ = shape_model(**truth)
        clean = landmark_model(v, torch.cat([truth[n] for n in POSE_NAMES], dim=1))
    centred = clean - clean.mean(dim=1, keepdim=True)
    spread = float(centred.square().sum(-1).mean().sqrt())
    target = clean + noise * spread * torch.randn(clean.shape, generator=generator,
                                                  device=device)
    return Problem(target, spread, noise, _landmark_error(clean, target, spread), sizes,
                   frames, shared_identity)


def _decoder(impl: str, model_path, device):
    """parameters -> landmarks (frames, 68, 3) through the decoders of `impl`."""
    backend = BACKEND[impl]
    if impl == "flame_ext_lmk":
        from flame_ext.fitting import FlameShapeLandmark

        fused = FlameShapeLandmark(*_components(model_path), "68", device=device,
                                   model_path=model_path, backend=backend)
        return lambda params: fused(**params)
    shape_model = FlameShape(*_components(model_path), device=device, model_path=model_path,
                             backend=backend,
                             transforms="vertex" if backend == "medusa" else "none")
    landmark_model = FlameLandmark("68", device=device, model_path=model_path, backend=backend)
    decode, landmarks_of = shape_model.forward, landmark_model.forward
    if impl == "compile":
        decode, landmarks_of = torch.compile(decode), torch.compile(landmarks_of)

    def landmarks(params):
        v, _ = decode(**params)
        return landmarks_of(v, torch.cat([params[n] for n in POSE_NAMES], dim=1))
    return landmarks


def run_fit(impl: str, problem: Problem, iterations: int, *, model_path, device,
            lr: float = 0.02, warmup: int = 2) -> dict:
    """Fits `problem` with `impl`; returns throughput and landmark errors.

    `warmup` iterations run first on a throwaway copy of the parameters (allocator, JIT,
    torch.compile's compilation: reported as warmup_s); the timed run starts from zeros.
    """
    if impl not in FIT_IMPLS:
        raise ValueError(f"impl must be one of {FIT_IMPLS}, got {impl!r}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    device = torch.device(device)
    landmarks = _decoder(impl, model_path, device)
    target, spread = problem.target, problem.spread

    def fresh():
        params = {
            name: torch.zeros(1 if (problem.shared_identity and name == "shape")
                              else problem.frames, size, device=device, requires_grad=True)
            for name, size in problem.sizes.items()
        }
        return params, torch.optim.Adam(params.values(), lr=lr)

    def step(params, optimizer):
        optimizer.zero_grad(set_to_none=True)
        data = (landmarks(params) - target).square().sum(-1).mean() / spread**2
        prior = CODE_PRIOR * (params["shape"].square().mean() + params["expr"].square().mean())
        (data + prior).backward()
        optimizer.step()

    def timed_steps(params, optimizer, count) -> float:
        timing.synchronize(device)
        start = time.perf_counter()
        for _ in range(count):
            step(params, optimizer)
        timing.synchronize(device)
        return time.perf_counter() - start

    warmup_s = timed_steps(*fresh(), warmup)
    params, optimizer = fresh()
    with torch.no_grad():
        initial = _landmark_error(landmarks(params), target, spread)
    seconds = timed_steps(params, optimizer, iterations)
    with torch.no_grad():
        final = _landmark_error(landmarks(params), target, spread)
    return {
        "impl": impl,
        "frames": problem.frames,
        "iterations": iterations,
        "shared_identity": problem.shared_identity,
        "lr": lr,
        "seconds": seconds,
        "warmup_s": warmup_s,
        "frames_iters_per_s": problem.frames * iterations / seconds,
        "ms_per_iteration": 1e3 * seconds / iterations,
        "initial_lmk_error": initial,
        "final_lmk_error": final,
        "truth_lmk_error": problem.truth_error,
    }


def run_all(impls: List[str], *, model_path, device, frames: int, iterations: int,
            shared_identity: bool = True, lr: float = 0.02,
            on_result=None) -> List[dict]:
    """Runs every implementation on one problem; an implementation that cannot run is
    reported as {'impl', 'error'} and the others go on."""
    problem = make_problem(model_path, frames, device, shared_identity=shared_identity)
    results = []
    for impl in impls:
        try:
            result = run_fit(impl, problem, iterations, model_path=model_path, device=device,
                             lr=lr)
        except Exception as exc:  # reported per implementation, never fatal
            result = {"impl": impl, "frames": frames, "iterations": iterations,
                      "shared_identity": shared_identity,
                      "error": f"{type(exc).__name__}: {exc}"[:500]}
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def format_row(result: dict, baseline: Optional[dict] = None) -> str:
    """One line of the fitting table."""
    name = result["impl"]
    if "error" in result:
        return f"{name:<12} {'n/a':>12}  {result['error'][:90]}"
    speedup = ""
    if baseline is not None and "frames_iters_per_s" in baseline:
        speedup = f"{result['frames_iters_per_s'] / baseline['frames_iters_per_s']:.2f}x"
    return (f"{name:<12} {result['frames_iters_per_s']:>12,.0f} {result['ms_per_iteration']:>10.2f}"
            f" {speedup:>8} {result['initial_lmk_error']:>9.4f} -> {result['final_lmk_error']:.4f}"
            f"   (noise {result['truth_lmk_error']:.4f})")


FIT_HEADER = (f"{'impl':<12} {'frames*it/s':>12} {'ms/iter':>10} {'vs medusa':>8} "
              f"{'lmk error (relative to face size): start -> end':>9}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=flame_ext.DEVICE, type=device_option)
    parser.add_argument("--model-path", default="synthetic")
    parser.add_argument("--frames", type=count_option(1, MAX_COUNT))
    parser.add_argument("--iterations", type=count_option(1, 10**7), default=100)
    parser.add_argument("--per-frame-identity", action="store_true",
                        help="one shape row per frame instead of one for all frames")
    parser.add_argument("--impls", nargs="+",
                        default=["medusa", "reference", "flame_ext", "flame_ext_lmk"],
                        choices=FIT_IMPLS)
    parser.add_argument("--lr", type=positive_option, default=0.02)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    frames = args.frames or (256 if device.type == "cuda" else 64)
    print(f"# fitting loop: {frames} frames x {args.iterations} iterations, Adam lr {args.lr}, "
          f"{'per-frame' if args.per_frame_identity else 'shared'} identity, on {device}")
    print(FIT_HEADER)
    results: List[dict] = []

    def show(result):
        baseline = next((r for r in results if r["impl"] == "medusa"), None)
        print(format_row(result, baseline), flush=True)

    def collect(result):
        results.append(result)
        show(result)

    run_all(args.impls, model_path=args.model_path, device=device, frames=frames,
            iterations=args.iterations, shared_identity=not args.per_frame_identity,
            lr=args.lr, on_result=collect)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
