"""The benchmark cases: what each one decodes, with which inputs, for each implementation.

An implementation is a decoder backend plus a way of calling it:

| impl              | decoder backend | called as                                        |
| ----------------- | --------------- | ------------------------------------------------ |
| `medusa`          | 'medusa'        | eager: medusa's algorithm, what users run today  |
| `reference`       | 'reference'     | eager: flame_ext's pure-PyTorch decomposition    |
| `compile`         | 'reference'     | `torch.compile(module.forward)` (inductor)       |
| `flame_ext`       | 'ext'           | eager: the compiled ops                          |
| `flame_ext_graph` | 'ext'           | one CUDA graph per input set, replayed           |
| `reference_graph` | 'reference'     | the same, for the reference                      |
| `smplx`           | (a peer)        | eager `smplx.FLAME` (PyPI smplx), the smplx cases |
| `body_models`     | (a peer)        | eager body-models FLAME, torch kernels, its cases |
| `body_models_warp`| (a peer)        | the same with its NVIDIA Warp skinning kernels    |

Every implementation of a case runs on the same model (one load, buffers built per
backend) and reads the very same input sets and upstream gradients (built once per case
and batch). Forward+backward
cases call `torch.autograd.grad` with fixed random output gradients: the backward the
decoders would see inside a loss, without the loss's own kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from flame_ext import FlameLandmark, FlameShape, FlameTex, load_flame_model
from flame_ext.io.discovery import _texture_location

from . import floor, timing

IMPLS = ("medusa", "smplx", "body_models", "body_models_warp", "reference", "compile",
         "flame_ext", "flame_ext_graph", "reference_graph")
BACKEND = {
    "medusa": "medusa",
    "smplx": "smplx",
    "body_models": "body_models",
    "body_models_warp": "body_models",
    "reference": "reference",
    "compile": "reference",
    "flame_ext": "ext",
    "flame_ext_graph": "ext",
    "reference_graph": "reference",
}
# The implementations speed-ups are read against (derive() in run.py): each case's
# baseline, and torch.compile of the reference.
BASELINES = ("medusa", "compile", "smplx", "body_models", "body_models_warp")
# Peers run only in the cases that name them (Case.peers; their cases are in peers.py): each peer with the name its
# cases start with.
PEERS = {"smplx": "smplx", "body_models": "body_models", "body_models_warp": "body_models"}
GRAPH_IMPLS = ("flame_ext_graph", "reference_graph")

# Parameter scales of the random inputs: unit-variance identity/expression codes as the
# FLAME encoders produce, and head poses of tens of degrees, so that the 68-point contour
# falls in many different yaw bins across a batch.
INPUT_SCALE = {"shape": 1.0, "expr": 1.0, "global_pose": 0.3, "neck_pose": 0.15,
               "jaw_pose": 0.1, "eye_pose": 0.1}
POSE_NAMES = ("global_pose", "neck_pose", "jaw_pose", "eye_pose")


@dataclass
class Case:
    """One row group of the table: a decoder call, its floor, and how to build its work."""

    name: str
    description: str
    # batch -> the minimum bytes/FLOPs of one step (floor.py)
    cost: Callable[[int], floor.Cost]
    # batch -> the input sets to rotate through, shared by every implementation
    inputs: Callable[[int], List[dict]]
    # (impl, batch) -> one step on one input set
    runner: Callable[[str, int], Callable[[dict], object]]
    # (impl, batch) -> why this pair is not run (memory), or None
    skip: Callable[[str, int], Optional[str]] = lambda impl, batch: None
    # the peer implementations this case compares against (PEERS), besides medusa
    peers: Tuple[str, ...] = ()

    def why_not(self, impl: str, batch: int) -> Optional[str]:
        """Why (impl, batch) is not run in this case, or None: a peer runs only in its
        own cases, then the case's own reasons (skip)."""
        if impl in PEERS and impl not in self.peers:
            return f"{impl} runs in its own cases only ({PEERS[impl]}_*)"
        return self.skip(impl, batch)


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _input_sets(make_one: Callable[[], dict], device: torch.device) -> List[dict]:
    first = make_one()
    count = timing.input_set_count(_tensor_bytes(first), device)
    return [first] + [make_one() for _ in range(count - 1)]


def available_memory(device: torch.device) -> int:
    """Bytes the benchmark lets one measurement's biggest intermediate take."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 2
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024 // 4
    except (OSError, KeyError, ValueError):
        return 4 * 2**30


class Models:
    """Decoders built once per backend and option, and the compiled forwards."""

    def __init__(self, device: torch.device, model_path, n_tex: int):
        self.device, self.model_path, self.n_tex = device, model_path, n_tex
        model = load_flame_model(model_path)
        # Every component the file holds (FLAME: 300 shape, 100 expression).
        self.n_shape, self.n_expr = model.n_shape, model.n_expr
        self._modules: Dict[tuple, torch.nn.Module] = {}
        self._compiled: Dict[object, Callable] = {}
        self._vertices: Dict[int, torch.Tensor] = {}

    def _get(self, key, build):
        if key not in self._modules:
            self._modules[key] = build()
        return self._modules[key]

    def shape(self, backend: str, transforms: str) -> FlameShape:
        # medusa always materialises R: its module exists in one variant only.
        transforms = "vertex" if backend == "medusa" else transforms
        return self._get(("shape", backend, transforms), lambda: FlameShape(
            self.n_shape, self.n_expr, device=self.device, model_path=self.model_path,
            backend=backend,
            transforms=transforms))

    def landmark(self, backend: str, lm_type: str) -> FlameLandmark:
        return self._get(("lmk", backend, lm_type), lambda: FlameLandmark(
            lm_type, device=self.device, model_path=self.model_path, backend=backend))

    def shape_landmark(self, backend: str) -> torch.nn.Module:
        """FlameShapeLandmark '68' (parameters -> landmarks on the landmark-face vertices)."""
        from flame_ext.fitting import FlameShapeLandmark

        return self._get(("shape_lmk", backend), lambda: FlameShapeLandmark(
            self.n_shape, self.n_expr, "68", device=self.device, model_path=self.model_path,
            backend=backend))

    def texture(self, backend: str, **options) -> FlameTex:
        """FlameTex on this backend; `options` are its keyword options (specular,
        basis_dtype, compact)."""
        return self._get(("tex", backend, tuple(sorted(options.items(), key=str))),
                         lambda: FlameTex(
            model_path=_texture_location(self.model_path), n_tex=self.n_tex,
            backend=backend, **options).to(self.device))

    def forward(self, impl: str, module: torch.nn.Module) -> Callable:
        """module.forward, or its torch.compile for impl 'compile' (one per module)."""
        if impl != "compile":
            return module.forward
        if id(module) not in self._compiled:
            self._compiled[id(module)] = torch.compile(module.forward)
        return self._compiled[id(module)]

    def compiled(self, key, fn: Callable) -> Callable:
        """torch.compile(fn), one per key."""
        if key not in self._compiled:
            self._compiled[key] = torch.compile(fn)
        return self._compiled[key]

    def shape_dims(self) -> floor.ShapeDims:
        m = self.shape("reference", "none")
        return floor.ShapeDims(V=m.v_template.shape[0], n_shape=m.n_shape, n_expr=m.n_expr,
                               P=m.pose_dirs.shape[0], J=m.parents.shape[0])

    def random_inputs(self, batch: int, shared: bool, generator: torch.Generator) -> dict:
        m = self.shape("reference", "none")
        sizes = {"shape": m.n_shape, "expr": m.n_expr, "global_pose": 3, "neck_pose": 3,
                 "jaw_pose": 3, "eye_pose": 6}
        return {
            name: INPUT_SCALE[name] * torch.randn(
                1 if (shared and name == "shape") else batch, size, generator=generator,
                device=self.device)
            for name, size in sizes.items()
        }

    def posed_vertices(self, batch: int) -> torch.Tensor:
        """(batch, V, 3) meshes decoded from random parameters: the landmark inputs."""
        if batch not in self._vertices:
            generator = torch.Generator(self.device).manual_seed(1000 + batch)
            with torch.no_grad():
                v, _ = self.shape("reference", "none")(
                    **self.random_inputs(batch, False, generator))
            self._vertices[batch] = v
        return self._vertices[batch]


def _generator(models: Models, seed: int) -> torch.Generator:
    return torch.Generator(models.device).manual_seed(seed)


def _shape_case(models: Models, shared: bool, backward: bool, with_R: bool) -> Case:
    transforms = "vertex" if with_R else "none"
    prefix = "shared" if shared else "shape"
    suffix = ("_fwdbwd" if backward else "_fwd") + ("_R" if with_R else "")
    identity = ("shared identity (1 shape row, B expression/pose)" if shared
                else "per-sample identity")
    description = (f"FlameShape {'forward+backward' if backward else 'forward'}, {identity}, "
                   f"{'with R (B,V,4,4)' if with_R else 'no R'}")

    num_vertices = models.shape_dims().V

    def inputs(batch: int) -> List[dict]:
        generator = _generator(models, batch)

        def make_one() -> dict:
            values = models.random_inputs(batch, shared, generator)
            if not backward:
                return {"inputs": values}
            grads = [torch.randn(batch, num_vertices, 3, generator=generator,
                                 device=models.device)]
            if with_R:
                grads.append(torch.randn(batch, num_vertices, 4, 4, generator=generator,
                                         device=models.device))
            return {"inputs": {k: v.requires_grad_(True) for k, v in values.items()},
                    "grads": grads}
        return _input_sets(make_one, models.device)

    def runner(impl: str, batch: int) -> Callable[[dict], object]:
        forward = models.forward(impl, models.shape(BACKEND[impl], transforms))
        if not backward:
            def run(s):
                with torch.no_grad():
                    return forward(**s["inputs"])
        else:
            def run(s):
                v, R = forward(**s["inputs"])
                outputs = [v, R] if with_R else [v]
                return torch.autograd.grad(outputs, list(s["inputs"].values()), s["grads"])
        return run

    dims = models.shape_dims()
    return Case(prefix + suffix, description,
                lambda batch: floor.shape_cost(dims, batch, shared=shared, backward=backward,
                                               with_R=with_R),
                inputs, runner)


def _landmark_case(models: Models, lm_type: str, backward: bool) -> Case:
    probe = models.landmark("reference", lm_type)
    num_vertices = probe.num_vertices
    dynamic = probe.dynamic_lmk_faces_idx.shape[1] if lm_type == "68" else 0
    num_landmarks = probe.lmk_faces_idx.shape[0] + dynamic
    description = (f"FlameLandmark '{lm_type}' ({num_landmarks} points"
                   f"{', contour bin per sample' if dynamic else ''}) "
                   f"{'forward+backward' if backward else 'forward'}")

    def inputs(batch: int) -> List[dict]:
        generator = _generator(models, 2000 + batch)
        base = models.posed_vertices(batch)

        def make_one() -> dict:
            v = base + 1e-3 * torch.randn(base.shape, generator=generator, device=models.device)
            poses = torch.cat([INPUT_SCALE[name] * torch.randn(
                batch, 6 if name == "eye_pose" else 3, generator=generator,
                device=models.device) for name in POSE_NAMES], dim=1)
            if not backward:
                return {"v": v, "poses": poses}
            return {"v": v.requires_grad_(True), "poses": poses,
                    "grad": torch.randn(batch, num_landmarks, 3, generator=generator,
                                        device=models.device)}
        return _input_sets(make_one, models.device)

    def runner(impl: str, batch: int) -> Callable[[dict], object]:
        forward = models.forward(impl, models.landmark(BACKEND[impl], lm_type))
        if not backward:
            def run(s):
                with torch.no_grad():
                    return forward(s["v"], s["poses"])
        else:
            def run(s):
                return torch.autograd.grad(forward(s["v"], s["poses"]), s["v"], s["grad"])
        return run

    name = f"lmk{lm_type}_{'fwdbwd' if backward else 'fwd'}"
    return Case(name, description,
                lambda batch: floor.landmark_cost(num_vertices, num_landmarks, batch,
                                                  backward=backward, dynamic=dynamic),
                inputs, runner)


def _fit_case(models: Models) -> Case:
    """The fitting step: FLAME parameters -> 68 landmarks, forward+backward, shared
    identity. medusa has no landmark-only path: its column is FlameShape (with R, as
    medusa computes it) + FlameLandmark; the others are FlameShapeLandmark, which
    evaluates only the vertices of the landmark faces, on each backend."""
    probe = models.shape_landmark("reference")
    subset = probe.lmk_vertex_idx.shape[0]
    dynamic = probe.dynamic_lmk_faces_idx.shape[1]
    num_landmarks = probe.lmk_faces_idx.shape[0] + dynamic
    description = (f"parameters -> {num_landmarks} landmarks forward+backward, shared "
                   f"identity: FlameShapeLandmark ({subset} of {models.shape_dims().V} "
                   "vertices); medusa: FlameShape + FlameLandmark")

    def inputs(batch: int) -> List[dict]:
        generator = _generator(models, 4000 + batch)

        def make_one() -> dict:
            values = models.random_inputs(batch, True, generator)
            return {"inputs": {k: v.requires_grad_(True) for k, v in values.items()},
                    "grad": torch.randn(batch, num_landmarks, 3, generator=generator,
                                        device=models.device)}
        return _input_sets(make_one, models.device)

    def runner(impl: str, batch: int) -> Callable[[dict], object]:
        if BACKEND[impl] == "medusa":
            shape = models.shape("medusa", "vertex")
            landmark = models.landmark("medusa", "68")

            def forward(**inputs):
                v, _ = shape(**inputs)
                poses = torch.cat([inputs[n].expand(v.shape[0], -1) for n in POSE_NAMES], 1)
                return landmark(v, poses)
        else:
            forward = models.forward(impl, models.shape_landmark(BACKEND[impl]))

        def run(s):
            return torch.autograd.grad(forward(**s["inputs"]), list(s["inputs"].values()),
                                       s["grad"])
        return run

    dims = models.shape_dims()
    subset_dims = floor.ShapeDims(V=subset, n_shape=dims.n_shape, n_expr=dims.n_expr,
                                  P=dims.P, J=dims.J)
    return Case("fit68_fwdbwd", description,
                lambda batch: floor.shape_cost(subset_dims, batch, shared=True, backward=True,
                                               with_R=False)
                + floor.landmark_cost(subset, num_landmarks, batch, backward=True,
                                      dynamic=dynamic),
                inputs, runner)


def _texture_case(models: Models) -> Case:
    probe = models.texture("reference")
    texels, n_tex = probe._gathered_basis.shape
    full_texels = probe.texture_basis.shape[1]
    budget = available_memory(models.device)

    def skip(impl: str, batch: int) -> Optional[str]:
        # medusa multiplies the whole basis by the codes before summing: a
        # (B, H*W*3, n_tex) intermediate.
        need = batch * full_texels * n_tex * 4
        if BACKEND[impl] == "medusa" and need > budget:
            return (f"not run: medusa's (B, {full_texels}, {n_tex}) float32 intermediate "
                    f"would exceed {budget / 2**30:.1f} GiB (B={batch}: {need / 2**30:.1f} GiB)")
        return None

    def inputs(batch: int) -> List[dict]:
        generator = _generator(models, 3000 + batch)
        return _input_sets(lambda: {"texcode": torch.randn(
            batch, n_tex, generator=generator, device=models.device)}, models.device)

    def runner(impl: str, batch: int) -> Callable[[dict], object]:
        forward = models.forward(impl, models.texture(BACKEND[impl]))

        def run(s):
            with torch.no_grad():
                return forward(s["texcode"])
        return run

    return Case("tex_fwd", f"FlameTex forward (n_tex={n_tex}, 3x256x256 output)",
                lambda batch: floor.texture_cost(texels, n_tex, batch), inputs, runner, skip)


def build_cases(models: Models, impls: Optional[List[str]] = None) -> List[Case]:
    from . import options, peers  # they build on this module's Case and Models

    """Every case, in the order of the table: FlameShape, its mean transform, identity-
    indexed batches, landmarks, texture, fitting step, vertex normals,
    then the peers' cases (smplx's FLAME layer, body-models' FLAME) when `impls` is None
    or holds the peer."""
    cases = []
    for shared in (False, True):
        for backward in (False, True):
            for with_R in (False, True):
                cases.append(_shape_case(models, shared, backward, with_R))
    cases.append(options.mean_transform_case(models))
    cases.append(options.identities_case(models))
    for lm_type in ("68", "mp"):
        for backward in (False, True):
            cases.append(_landmark_case(models, lm_type, backward))
    cases.append(_texture_case(models))
    cases += [options.texture_options_case(models, name) for name in options.TEXTURE_OPTIONS]
    cases.append(_fit_case(models))
    for backward in (False, True):
        cases.append(options.normals_case(models, backward))
    if impls is None or "smplx" in impls:
        cases += [peers.smplx_case(models, backward) for backward in (False, True)]
    if impls is None or any(i in impls for i in peers.BODY_MODELS_KERNELS):
        cases += [peers.body_models_case(models, backward) for backward in (False, True)]
    return cases


def make_step(case: Case, impl: str, batch: int, sets: List[dict],
              device: torch.device) -> Callable[[], object]:
    """The zero-argument step that timing.measure calls: one call on the next input set."""
    run = case.runner(impl, batch)
    if impl in GRAPH_IMPLS:
        return timing.graphed(run, sets, device)
    next_set = timing.rotating(sets)
    return lambda: run(next_set())


def ext_status() -> Optional[str]:
    """None when backend='ext' can be built, else why not."""
    from flame_ext import _ops

    if _ops.available():
        return None
    return f"compiled ops not loaded ({_ops.load_error()})"
