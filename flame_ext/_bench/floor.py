"""The physical floor of each benchmark case: minimum bytes and FLOPs, and the device rates.

floor time = max(bytes / copy bandwidth, flops / matmul rate), both rates measured on the
same device in the same run (`measure_rates`; on the CPU again in each row's own rounds,
`RateProbes`). The byte and FLOP models below are the
only place where they are defined; every number the benchmark reports against "the
floor" comes from here.

Counting rules (a lower bound, not a model of any implementation):
- every input and every model array the computation needs is read once per call, every
  output is written once; intermediates cost nothing (a perfect fusion keeps them in
  registers). Index arrays are int64, everything else `itemsize` (4 for float32).
- forward+backward is two calls (autograd runs them apart): the backward reads the
  output gradients and the model arrays again and writes the input gradients once. It
  saves nothing from the forward (whatever it needs is counted as recomputed for free),
  so the floor stays below any real implementation.
- FLOPs count multiply and add separately (a multiply-add is 2). Work that is a tiny
  fraction of the total (Rodrigues, the 5-joint chain, the contour bin) is left out and
  said so next to each model.
- Outputs of FRESH_OUTPUT_BYTES or more land on fresh pages on the CPU: glibc's malloc
  maps (and unmaps on free) every block above its largest mmap threshold, 32 MiB on
  64-bit Linux, so each call's first write faults in every page (medusa's (B, V, 4, 4) R
  at B = 256 is 82 MB; FlameTex's output from B = 43). Those bytes are `fresh_bytes` and
  cost fresh_bytes / the measured first-touch rate (allocate, write once) instead of the
  copy rate: what an allocator that maps fresh pages on every call pays (torch's CPU
  allocator, so medusa and the peers). flame_ext's CPU ops keep such a block when its
  tensor is freed and hand it to the next output of its size (csrc/cpu_output.h), so in a
  loop they write those bytes at the copy rate and may beat this term. The rate
  is the faster of two ways to get the pages: torch's allocator (4 KiB pages) and an
  anonymous mapping advised MADV_HUGEPAGE (one fault per 2 MiB where the kernel grants
  transparent huge pages, as flame_ext's own large outputs do: csrc/cpu_output.h). On
  CUDA the caching allocator reuses its blocks, and no first-touch rate is measured.
- The floor uses DRAM bandwidth: at small batches the model arrays (FLAME's shape_dirs is
  24 MB in float32) can stay in a GPU's L2 or a CPU's L3 between calls, so a measured
  time may beat the floor there. The benchmark reports the ratio, never asserts it.
"""

from __future__ import annotations

import mmap
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Dict

import torch

from . import timing

INDEX_BYTES = 8  # int64 face and landmark indices
FRESH_OUTPUT_BYTES = 32 << 20  # glibc's largest mmap threshold (64-bit)


def fresh(output_bytes: float) -> float:
    """The bytes of one output tensor that are first-touched: all of them from
    FRESH_OUTPUT_BYTES on, none below."""
    return output_bytes if output_bytes >= FRESH_OUTPUT_BYTES else 0.0


@dataclass(frozen=True)
class Cost:
    """Minimum traffic of one call: bytes read + written, and floating-point operations;
    `fresh_bytes` of the written bytes go to fresh pages (see `fresh`)."""

    bytes: float
    flops: float
    fresh_bytes: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.bytes + other.bytes, self.flops + other.flops,
                    self.fresh_bytes + other.fresh_bytes)

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class ShapeDims:
    """FlameShape's sizes: vertices, shape/expression components, pose features, joints."""

    V: int
    n_shape: int
    n_expr: int
    P: int
    J: int

    @property
    def K(self) -> int:
        return self.n_shape + self.n_expr


# Per-vertex FLOPs of linear blend skinning: blending the 3x4 non-trivial part of J
# transforms (12 entries x J joints x multiply-add) and applying it to a point (3 rows of
# 3 multiply-adds plus the translation). Writing R adds no arithmetic (the blended 4x4 is
# the same numbers), only bytes.
def _skin_flops_per_vertex(J: int) -> int:
    return 2 * 12 * J + 3 * (2 * 3 + 1)


def shape_cost(d: ShapeDims, batch: int, *, shared: bool, backward: bool, with_R: bool,
               itemsize: int = 4, identities: int = 1) -> Cost:
    """FlameShape forward (and backward) for `batch` samples.

    Forward reads: shape_dirs (3V x K), pose_dirs (P x 3V), v_template (3V), lbs_weights
    (V x J), the joint basis (3J x K + 3J), the inputs (per-sample: B x (K + 3J);
    shared identity: n_shape + B x (n_expr + 3J); `identities` S > 1 shared rows, one
    picked per frame: S x n_shape + B x (n_expr + 3J) and the B int64 indices). Writes v
    (B x 3V) and, with R, the per-vertex transforms (B x 16V).
    Forward FLOPs: the blend 2 B 3V K (shared: 2 3V n_shape per identity + 2 B 3V n_expr),
    the pose correctives 2 B 3V P, the joints 2 B 3J K, skinning B V (24J + 21).
    Backward reads grad v (and grad R) and the same model arrays, writes the input
    gradients; FLOPs mirror the forward (the transposed blends, the skinning adjoint,
    and with R the 16-entry per-joint accumulation 2 B V 16 J; shared: the sum over each
    identity's frames of grad v_shaped, B 3V, before one 2 3V n_shape product per
    identity).
    Left out: Rodrigues and the joint chain (~300 FLOPs per sample).
    """
    V3, K, B = 3 * d.V, d.K, batch
    model_bytes = (V3 * K + d.P * V3 + V3 + d.V * d.J + 3 * d.J * K + 3 * d.J) * itemsize
    S = identities
    if shared:
        input_floats = S * d.n_shape + B * (d.n_expr + 3 * d.J)
        blend_flops = 2 * V3 * d.n_shape * S + 2 * B * V3 * d.n_expr
    else:
        input_floats = B * (K + 3 * d.J)
        blend_flops = 2 * B * V3 * K
    output_floats = B * V3 + (B * 16 * d.V if with_R else 0)
    fresh_bytes = fresh(B * V3 * itemsize) + (fresh(B * 16 * d.V * itemsize) if with_R else 0.0)
    per_sample_flops = 2 * V3 * d.P + 2 * 3 * d.J * K + d.V * _skin_flops_per_vertex(d.J)
    index_bytes = B * INDEX_BYTES if shared and S > 1 else 0
    forward = Cost(
        bytes=model_bytes + (input_floats + output_floats) * itemsize + index_bytes,
        flops=blend_flops + B * per_sample_flops,
        fresh_bytes=fresh_bytes,
    )
    if not backward:
        return forward
    grad_flops = blend_flops + (B * V3 if shared else 0) + B * per_sample_flops
    if with_R:
        grad_flops += B * d.V * 2 * 16 * d.J
    back = Cost(
        bytes=model_bytes + (output_floats + input_floats) * itemsize + index_bytes,
        flops=grad_flops,
    )
    return forward + back


def landmark_cost(V: int, L: int, batch: int, *, backward: bool, dynamic: int = 0,
                  itemsize: int = 4) -> Cost:
    """FlameLandmark forward (and backward): L landmarks, `dynamic` of them contour points.

    Forward reads the 3 vertices of each landmark's face (B L 9 floats), the barycentric
    coordinates and face indices (per sample for the contour points, which depend on the
    bin: B x dynamic; once for the static ones) and the poses when there is a contour
    (B x 15); writes B L 3. FLOPs: 15 per landmark (3 coordinates x (3 mul + 2 add)).
    Backward reads grad (B L 3) and the same indices and weights, and writes the dense
    grad v (B x 3V): every vertex gets a gradient entry, zero or not, so at any batch the
    backward floor is the B 3V write. FLOPs: 9 multiply-adds per landmark.
    Left out: the contour bin (~60 FLOPs per sample).
    """
    B, static = batch, L - dynamic
    index_bytes = (static + B * dynamic) * (4 * INDEX_BYTES + 3 * itemsize)
    pose_bytes = B * 15 * itemsize if dynamic else 0
    forward = Cost(
        bytes=(B * L * 9 + B * L * 3) * itemsize + index_bytes + pose_bytes,
        flops=B * L * 15,
    )
    if not backward:
        return forward
    back = Cost(bytes=(B * L * 3 + B * 3 * V) * itemsize + index_bytes, flops=B * L * 18)
    return forward + back


def normals_cost(V: int, F: int, batch: int, *, backward: bool, itemsize: int = 4) -> Cost:
    """Vertex normals forward (and backward) of B meshes of V vertices and F faces.

    Forward reads the vertices (B x 3V) and the faces and their vertex-face adjacency
    once (3F faces + V + 1 offsets + 3F entries, int64), writes B x 3V. FLOPs: 15 per
    face normal (6 subtractions, 6 multiplications, 3 subtractions) and 9 per corner for
    the sums (each vertex adds its faces' normals), 12 per vertex to normalise: the
    minimum of a method that forms each face normal once.
    Backward reads the gradient and the vertices (2 x B x 3V), writes the gradient of v
    (B x 3V), and the tables again; FLOPs: ~20 per vertex for the normalisation's
    backward, per face 9 to sum its corners' gradients and 3 x 15 for the three corners'
    cross products, 9 per corner to gather them.
    """
    B = batch
    index_bytes = (6 * F + V + 1) * INDEX_BYTES
    forward = Cost(bytes=2 * B * 3 * V * itemsize + index_bytes,
                   flops=B * (15 * F + 27 * F + 12 * V))
    if not backward:
        return forward
    back = Cost(bytes=3 * B * 3 * V * itemsize + index_bytes,
                flops=B * (20 * V + 9 * F + 45 * F + 27 * F))
    return forward + back


def texture_cost(N: int, K: int, batch: int, itemsize: int = 4) -> Cost:
    """FlameTex forward: the output reads only N = 3 x 256 x 256 texels of the basis.

    Reads the gathered basis (N x K) and mean (N) once and the codes (B x K); writes the
    images (B x N). FLOPs: 2 B N K.
    """
    return Cost(bytes=(N * K + N + batch * K + batch * N) * itemsize, flops=2 * batch * N * K,
                fresh_bytes=fresh(batch * N * itemsize))


def floor_time(cost: Cost, rates: Dict[str, float]) -> Dict[str, float]:
    """The floor of one call, and which resource bounds it ('memory' or 'compute').

    Fresh bytes cost the first-touch rate where one was measured (the CPU), the copy rate
    elsewhere."""
    fresh_rate = rates.get("first_touch_bytes_per_s")
    fresh_bytes = cost.fresh_bytes if fresh_rate else 0.0
    first_touch_s = fresh_bytes / fresh_rate if fresh_rate else 0.0
    memory_s = (cost.bytes - fresh_bytes) / rates["copy_bytes_per_s"] + first_touch_s
    compute_s = cost.flops / rates["matmul_flops_per_s"]
    return {
        "bytes": cost.bytes,
        "flops": cost.flops,
        "fresh_bytes": fresh_bytes,
        "first_touch_s": first_touch_s,
        "memory_s": memory_s,
        "compute_s": compute_s,
        "time_s": max(memory_s, compute_s),
        "bound": "memory" if memory_s >= compute_s else "compute",
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_of(fn, device: torch.device, repeats: int) -> list:
    fn()  # warm-up: first-touch page faults on the CPU, allocator and cuBLAS heuristics
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _copy_bytes(device: torch.device, quick: bool) -> int:
    """Bytes of the copied tensor: at least twice the last-level cache (GPU >= 1 GB, CPU
    256 MB to 2 GB; --quick: 256 MB / 64 MB, which a big cache may flatter)."""
    cache = timing.last_level_cache_bytes(device)
    if device.type == "cuda":
        return 2**28 if quick else max(2**30, 2 * cache)
    return 2**26 if quick else min(2**31, max(2**28, 2 * cache))


def _matmul_n(device: torch.device, quick: bool) -> int:
    if device.type == "cuda":
        return 1024 if quick else 8192
    return 512 if quick else 2048


class _Probes:
    """The device's rate measurements as zero-argument steps, each with the amount of
    work one call does (bytes copied, FLOPs, bytes first-touched): `measure_rates` and
    `RateProbes` time the same steps."""

    FRESH = 128 << 20  # the first-touch block: above FRESH_OUTPUT_BYTES, mapped anew

    def __init__(self, device: torch.device, quick: bool):
        elements = _copy_bytes(device, quick) // 4
        self.src = torch.rand(elements, device=device)
        self.dst = torch.empty_like(self.src)
        n = _matmul_n(device, quick)
        self.a = torch.rand(n, n, device=device)
        self.b = torch.rand(n, n, device=device)
        self.steps = {"copy": lambda: self.dst.copy_(self.src),
                      "matmul": lambda: torch.mm(self.a, self.b)}
        self.work = {"copy": 2 * elements * 4, "matmul": 2 * n**3}
        if device.type == "cpu":
            self.steps["first_touch_torch"] = lambda: torch.empty(self.FRESH // 4).fill_(1.0)
            self.steps["first_touch_huge_pages"] = lambda: _touch_huge_pages(self.FRESH)
            self.work.update(first_touch_torch=self.FRESH, first_touch_huge_pages=self.FRESH)


def _fp32_highest(fn):
    """fn run with matmuls at full fp32 precision (TF32 off: the decoders compute in
    fp32)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        return fn()
    finally:
        torch.set_float32_matmul_precision(previous)


def measure_rates(device: torch.device, quick: bool = False) -> Dict[str, float]:
    """Copy bandwidth and fp32 matmul rate of `device`, measured now.

    Copy: `dst.copy_(src)` of a tensor larger than the last-level cache (`_copy_bytes`),
    counted as bytes read + written. Matmul: an n x n fp32 product (CPU n=2048, GPU
    n=8192; --quick 512 / 1024) at full fp32 precision, 2 n^3 FLOPs. The rate is the best of the
    repeats: a floor must use the fastest the device was seen to go (on a shared machine
    the median is lower); the median is kept too. First touch (CPU only): a fresh block
    of 128 MiB (above FRESH_OUTPUT_BYTES, so its pages are mapped anew each time)
    allocated and written once, bytes written per second; the faster of a torch tensor
    and a huge-page mapping (`_touch_huge_pages`), both kept. The benchmark measures the
    same rates again beside every row on the CPU (`RateProbes`).
    """
    if device.type == "cuda":
        repeats = 5 if quick else 10
    else:
        repeats = 3 if quick else 5
    probes = _Probes(device, quick)
    times = {name: _fp32_highest(lambda: _best_of(step, device, repeats))
             for name, step in probes.steps.items()}
    rate = {name: probes.work[name] / min(t) for name, t in times.items()}
    median = {name: probes.work[name] / statistics.median(t) for name, t in times.items()}
    first_touch = {}
    if device.type == "cpu":
        ways = ("torch", "huge_pages")
        best = max(ways, key=lambda way: rate[f"first_touch_{way}"])
        first_touch = {
            "first_touch_bytes_per_s": rate[f"first_touch_{best}"],
            "first_touch_bytes_per_s_median": median[f"first_touch_{best}"],
            "first_touch_way": best,
            **{f"first_touch_{way}_bytes_per_s": rate[f"first_touch_{way}"] for way in ways},
        }
    return {
        "copy_bytes_per_s": rate["copy"],
        "copy_bytes_per_s_median": median["copy"],
        "copy_tensor_bytes": probes.work["copy"] // 2,
        "matmul_flops_per_s": rate["matmul"],
        "matmul_flops_per_s_median": median["matmul"],
        "matmul_n": probes.a.shape[0],
        "repeats": repeats,
        **first_touch,
    }


class RateProbes:
    """The floor's rates measured again in the rounds of every row (the CPU benchmark).

    On a shared machine the memory bandwidth moves with the load of its neighbours: on
    a 2-core cloud VM one process read 37 to 74 GB/s (the copy below) in successive
    seconds. A floor from the rates of the run's start then compares a row against
    conditions it did not run under, and its ratio measures the neighbours as much as
    the code. So the copy, the matmul and the first touch of `measure_rates` (same sizes,
    the first touch the way that was faster at the start) are steps of each row's own
    interleaved rounds (`timing.measure`), beside the implementations, and that row's
    floor takes the best rate each reached there.

    Costs of measuring this way: the probes' tensors (the copy's two, at least twice the
    last-level cache, and the matmul's) stay allocated for the whole run, and a copy
    step evicts the caches, so the step after it in a round finds its inputs in memory,
    as the implementations' own rotation of input sets (`timing.input_set_count`)
    already arranges.
    """

    # seconds of samples of each probe per row (the 2048 matmul's one call is ~0.1 s on
    # 2 cores); --quick a quarter
    BUDGET_S = {"copy": 0.1, "matmul": 0.25, "first_touch": 0.1}

    def __init__(self, device: torch.device, start: Dict[str, float], quick: bool = False):
        probes = _Probes(device, quick)
        way = start.get("first_touch_way")
        self._names = {"copy": "copy", "matmul": "matmul"}
        if way:
            self._names["first_touch"] = f"first_touch_{way}"
        self._probes = probes
        self.steps = {f"rate:{kind}": _fp32_highest_step(probes.steps[name])
                      for kind, name in self._names.items()}
        scale = 0.25 if quick else 1.0
        self.budgets = {f"rate:{kind}": scale * self.BUDGET_S[kind] for kind in self._names}

    def rates(self, measured: Dict[str, dict]) -> Dict[str, float]:
        """The rates of one row from the probes' statistics (timing.measure's cells):
        work per call over the best sample."""
        keys = {"copy": "copy_bytes_per_s", "matmul": "matmul_flops_per_s",
                "first_touch": "first_touch_bytes_per_s"}
        return {keys[kind]: self._probes.work[name] / measured[f"rate:{kind}"]["min_s"]
                for kind, name in self._names.items()}


def _fp32_highest_step(step):
    return lambda: _fp32_highest(step)


def _touch_huge_pages(nbytes: int) -> None:
    """Maps nbytes of fresh anonymous memory, advises transparent huge pages (where this
    Python and system have them), writes every byte once through a tensor, unmaps."""
    # Private: an anonymous mapping is shared memory by default, which huge-page advice
    # does not reach.
    block = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        if hasattr(mmap, "MADV_HUGEPAGE"):
            block.madvise(mmap.MADV_HUGEPAGE)
        view = torch.frombuffer(block, dtype=torch.float32)
        view.fill_(1.0)
        del view
    finally:
        block.close()


def describe_rates(rates: Dict[str, float]) -> str:
    touch = rates.get("first_touch_bytes_per_s")
    return (f"copy {rates['copy_bytes_per_s'] / 1e9:.1f} GB/s, "
            f"fp32 matmul {rates['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s"
            + (f", first touch {touch / 1e9:.1f} GB/s" if touch else ""))
