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

The smplx cases (`smplx_fwd`, `smplx_fwdbwd`: the FLAME layer of smplx, vertices and
joints with the 68 landmarks) run `flame_ext.compat.smplx.FLAME` on each backend against
`smplx.FLAME` itself on the same files (the synthetic model written in smplx's folder
layout) and inputs; medusa has no such layer, and the other cases have no smplx column.
They are built when the `smplx` implementation is asked for (it is by default); its
cells say why not when smplx is not installed.

The body-models cases (`body_models_fwd`, `body_models_fwdbwd`) are `shape_fwd` and
`shape_fwdbwd` (FlameShape without R, per-sample identity, the same inputs) with two more
columns: the FLAME model of body-models (PyPI body-models) read from the same model file,
eager, with its torch kernels (`body_models`) and with its NVIDIA Warp skinning kernels
(`body_models_warp`, PyPI warp-lang, which runs on the CPU too). Its inputs are flame_ext's
mapped once per input set, outside the timed step (`body_models_inputs`); before timing,
its vertices are checked against the reference's on the first input set
(`body_models_agreement`), so that its column computes what the others do. They are
built when either implementation is asked for (by default on the CPU); the cells say
why not when body-models or Warp is not installed.

Every implementation of a case runs on the same model (one load, buffers built per
backend) and reads the very same input sets and upstream gradients (built once per case
and batch). Forward+backward
cases call `torch.autograd.grad` with fixed random output gradients: the backward the
decoders would see inside a loss, without the loss's own kernels.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
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
# Peers run only in the cases that name them (Case.peers): each peer with the name its
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


def _mean_transform_case(models: Models) -> Case:
    """What medusa's DECA pipeline keeps of R: medusa's FlameShape followed by
    R.mean(1), against FlameShape(transforms='mean') on the other backends."""
    description = ("FlameShape forward to (v, mean over vertices of R (B,4,4)), per-sample "
                   "identity; medusa: FlameShape then R.mean(1)")

    def inputs(batch: int) -> List[dict]:
        generator = _generator(models, 6000 + batch)
        return _input_sets(lambda: {"inputs": models.random_inputs(batch, False, generator)},
                           models.device)

    def runner(impl: str, batch: int) -> Callable[[dict], object]:
        if BACKEND[impl] == "medusa":
            shape = models.shape("medusa", "vertex")

            def forward(**inputs):
                v, R = shape(**inputs)
                return v, R.mean(1)
        else:
            forward = models.forward(impl, models.shape(BACKEND[impl], "mean"))

        def run(s):
            with torch.no_grad():
                return forward(**s["inputs"])
        return run

    dims = models.shape_dims()
    return Case("meanR_fwd", description,
                lambda batch: floor.shape_cost(dims, batch, shared=False, backward=False,
                                               with_R=False),
                inputs, runner)


def _identities_case(models: Models) -> Case:
    """Many videos in one batch: 8 identities, B/8 frames each, forward+backward (no R).
    medusa takes per-frame shape rows (shape[identity], what users pass today); the other
    backends the identity-indexed call, which blends each identity once."""
    identities = 8
    num_vertices = models.shape_dims().V
    description = (f"FlameShape forward+backward, {identities} identities x B/{identities} "
                   "frames: shape (8, n_shape) + identity (B,); medusa: per-frame shape rows")

    def inputs(batch: int) -> List[dict]:
        generator = _generator(models, 7000 + batch)
        rows = min(identities, max(batch, 1))

        def make_one() -> dict:
            values = models.random_inputs(batch, False, generator)
            values["shape"] = values["shape"][:rows].clone()
            identity = torch.arange(batch, device=models.device) * rows // max(batch, 1)
            grad = torch.randn(batch, num_vertices, 3, generator=generator,
                               device=models.device)
            return {"inputs": {k: v.requires_grad_(True) for k, v in values.items()},
                    "identity": identity, "grad": grad}
        return _input_sets(make_one, models.device)

    def runner(impl: str, batch: int) -> Callable[[dict], object]:
        if BACKEND[impl] == "medusa":
            shape = models.shape("medusa", "vertex")

            def forward(identity, **inputs):
                inputs = dict(inputs, shape=inputs["shape"][identity])
                return shape(**inputs)
        else:
            forward = models.forward(impl, models.shape(BACKEND[impl], "none"))

        def run(s):
            v, _ = forward(identity=s["identity"], **s["inputs"])
            return torch.autograd.grad(v, list(s["inputs"].values()), s["grad"])
        return run

    dims = models.shape_dims()
    return Case(f"ids{identities}_fwdbwd", description,
                lambda batch: floor.shape_cost(dims, batch, shared=True, backward=True,
                                               with_R=False),
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


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


# The FlameTex options cases: name -> (what, the module's options). Their medusa column is
# medusa's float32 algorithm on the full texture (the baseline); the other columns run
# the module with the options on each backend.
TEXTURE_OPTIONS = {
    "tex_half_fwd": ("basis_dtype=float16", {"basis_dtype": torch.float16}),
    "tex_bf16_fwd": ("basis_dtype=bfloat16", {"basis_dtype": torch.bfloat16}),
    "tex_compact_fwd": ("compact=True", {"compact": True}),
    "tex_specular_fwd": ("specular=True (AlbedoMM: diffuse + specular)", {"specular": True}),
}


def _texture_options_case(models: Models, name: str) -> Case:
    what, options = TEXTURE_OPTIONS[name]
    specular = options.get("specular", False)
    built: dict = {}  # the module on the reference backend, or why there is none

    def probe():
        if "module" not in built:
            try:
                built["module"] = models.texture("reference", **options)
                built["error"] = None
            except (OSError, ValueError) as exc:  # no AlbedoMM file beside the model
                built["module"], built["error"] = None, timing.describe_error(exc)
        return built["module"]

    def skip(impl: str, batch: int) -> Optional[str]:
        if probe() is None:
            return f"not run: {built['error']}"
        if BACKEND[impl] == "medusa":
            full = models.texture("medusa", **({"specular": True} if specular else {}))
            need = batch * full.texture_basis.shape[1] * full.n_tex * 4
            if need > available_memory(models.device):
                return (f"not run: medusa's float32 (B, H*W*3, n_tex) intermediate would "
                        f"take {need / 2**30:.1f} GiB")
        return None

    def inputs(batch: int) -> List[dict]:
        generator = _generator(models, 3100 + batch)
        return _input_sets(lambda: {"texcode": torch.randn(
            batch, models.n_tex, generator=generator, device=models.device)}, models.device)

    def runner(impl: str, batch: int) -> Callable[[dict], object]:
        if BACKEND[impl] == "medusa":
            module = models.texture("medusa", **({"specular": True} if specular else {}))
        else:
            module = models.texture(BACKEND[impl], **options)
        forward = models.forward(impl, module)

        def run(s):
            with torch.no_grad():
                return forward(s["texcode"])
        return run

    def cost(batch: int) -> floor.Cost:
        module = probe()
        texels = 2 * 3 * 256 * 256 if specular else 3 * 256 * 256
        itemsize = 4 if module is None else module._tables()[1].element_size()
        base = floor.texture_cost(texels, models.n_tex, batch)
        # the basis is read at its own width; mean, codes and images stay float32
        return floor.Cost(bytes=base.bytes - texels * models.n_tex * (4 - itemsize),
                          flops=base.flops)

    module = probe()
    memory = ""
    if module is not None:
        default = models.texture("reference", **({"specular": True} if specular else {}))
        memory = (f"; module buffers {_module_bytes(module) / 2**20:.1f} MiB vs "
                  f"{_module_bytes(default) / 2**20:.1f} MiB float32 full")
    return Case(name, f"FlameTex {what} forward (n_tex={models.n_tex}, 3x256x256 output"
                f"{'s' if specular else ''}){memory}; medusa: its float32 algorithm",
                cost, inputs, runner, skip)


def _normals_case(models: Models, backward: bool) -> Case:
    """Vertex normals of decoded FLAME meshes: flame_ext's op (FlameShape.vertex_normals,
    the gather kernels over the adjacency it keeps) against the index_add reference (what
    pipelines write today) and its torch.compile; medusa computes none."""
    probe = models.shape("reference", "none")
    num_vertices, num_faces = probe.v_template.shape[0], probe.tris.shape[0]
    description = (f"vertex normals ({num_vertices} vertices, {num_faces} faces) "
                   f"{'forward+backward' if backward else 'forward'}; reference: index_add")

    def skip(impl: str, batch: int) -> Optional[str]:
        if impl == "medusa":
            return "medusa computes no vertex normals"
        return None

    def inputs(batch: int) -> List[dict]:
        generator = _generator(models, 5000 + batch)
        base = models.posed_vertices(batch)

        def make_one() -> dict:
            v = base + 1e-3 * torch.randn(base.shape, generator=generator, device=models.device)
            if not backward:
                return {"v": v}
            return {"v": v.requires_grad_(True),
                    "grad": torch.randn(base.shape, generator=generator, device=models.device)}
        return _input_sets(make_one, models.device)

    def runner(impl: str, batch: int) -> Callable[[dict], object]:
        module = models.shape(BACKEND[impl], "none")
        normals = module.vertex_normals
        if impl == "compile":
            normals = models.compiled(("normals", BACKEND[impl]), normals)
        # The op path builds its adjacency on the first call: here, not inside a timed
        # step or a CUDA graph capture.
        with torch.no_grad():
            normals(module.v_template)
        if not backward:
            def run(s):
                with torch.no_grad():
                    return normals(s["v"])
        else:
            def run(s):
                return torch.autograd.grad(normals(s["v"]), s["v"], s["grad"])
        return run

    return Case(f"normals_{'fwdbwd' if backward else 'fwd'}", description,
                lambda batch: floor.normals_cost(num_vertices, num_faces, batch,
                                                 backward=backward),
                inputs, runner, skip)


def _smplx_folder(models: Models):
    """(smplx's FLAME folder for this model, None) or (None, why there is none). The
    synthetic model is written in that layout once per run (a temporary directory)."""
    path = models.model_path
    if path in ("synthetic", "synthetic-small"):
        if not hasattr(models, "_smplx_folder"):
            from flame_ext import synthetic

            models._smplx_folder = tempfile.mkdtemp(prefix="flame_ext_bench_smplx_")
            atexit.register(shutil.rmtree, models._smplx_folder, ignore_errors=True)
            size = "full" if path == "synthetic" else "small"
            synthetic.write_smplx_assets(models._smplx_folder, size, 0)
        return models._smplx_folder, None
    names = ("FLAME_NEUTRAL.pkl", "flame_static_embedding.pkl", "flame_dynamic_embedding.npy")
    if path is not None and all(os.path.isfile(os.path.join(path, n)) for n in names):
        return str(path), None
    return None, f"no smplx FLAME folder ({', '.join(names)}) at model_path {path!r}"


def _smplx_case(models: Models, backward: bool) -> Case:
    """smplx's FLAME layer: per-sample betas (all shape components), expression, the five
    poses and transl -> vertices and joints (5 joints + 51 static + 17 contour landmarks):
    smplx.FLAME against flame_ext.compat.smplx.FLAME on each backend."""
    located: list = []  # (folder, why not), found on first use: --list writes no files

    def where():
        if not located:
            located.append(_smplx_folder(models))
        return located[0]

    dims = models.shape_dims()
    layers: Dict[str, torch.nn.Module] = {}
    try:
        import smplx  # noqa: F401
        no_smplx = None
    except ImportError as exc:
        no_smplx = f"smplx is not installed (pip install smplx): {timing.describe_error(exc)}"
    if dims.n_shape != 300 or dims.n_expr < 100:
        # smplx.FLAME reads the expression columns at 300..400 of a 400-column model
        no_smplx = no_smplx or (f"smplx.FLAME needs FLAME's 300 + 100 components; this model "
                                f"has {dims.n_shape} + {dims.n_expr}")
    counts = {"num_betas": dims.n_shape, "num_expression_coeffs": min(dims.n_expr, 100),
              "use_face_contour": True}

    def layer(impl: str) -> torch.nn.Module:
        backend = BACKEND[impl]
        if backend not in layers:
            folder = where()[0]
            if backend == "smplx":
                import smplx

                layers[backend] = smplx.FLAME(folder, **counts).to(models.device)
            else:
                from flame_ext.compat.smplx import FLAME

                layers[backend] = FLAME(folder, backend=backend, **counts).to(models.device)
        return layers[backend]

    def skip(impl: str, batch: int) -> Optional[str]:
        if impl == "medusa":
            return "medusa has no smplx layer: the smplx column is this case's baseline"
        no_folder = where()[1]
        if no_folder:
            return no_folder
        return no_smplx if impl == "smplx" else None

    num_joints = 5 + 51 + 17

    def inputs(batch: int) -> List[dict]:
        generator = _generator(models, 5000 + batch)
        sizes = {"betas": counts["num_betas"], "expression": counts["num_expression_coeffs"],
                 "global_orient": 3, "neck_pose": 3, "jaw_pose": 3, "leye_pose": 3,
                 "reye_pose": 3, "transl": 3}
        scale = {"global_orient": 0.3, "neck_pose": 0.15, "jaw_pose": 0.1, "leye_pose": 0.1,
                 "reye_pose": 0.1, "transl": 0.05}

        def make_one() -> dict:
            values = {name: scale.get(name, 1.0) * torch.randn(
                batch, size, generator=generator, device=models.device)
                for name, size in sizes.items()}
            if not backward:
                return {"inputs": values}
            grads = [torch.randn(batch, shape, 3, generator=generator, device=models.device)
                     for shape in (dims.V, num_joints)]
            return {"inputs": {k: v.requires_grad_(True) for k, v in values.items()},
                    "grads": grads}
        return _input_sets(make_one, models.device)

    def runner(impl: str, batch: int) -> Callable[[dict], object]:
        forward = models.forward(impl, layer(impl))
        if not backward:
            def run(s):
                with torch.no_grad():
                    return forward(**s["inputs"])
        else:
            def run(s):
                out = forward(**s["inputs"])
                return torch.autograd.grad([out.vertices, out.joints],
                                           list(s["inputs"].values()), s["grads"])
        return run

    description = (f"smplx's FLAME layer {'forward+backward' if backward else 'forward'}: "
                   f"vertices + {num_joints} joints (5 + 68 landmarks), per-sample "
                   "parameters; smplx.FLAME vs flame_ext.compat.smplx.FLAME")
    return Case(f"smplx_{'fwdbwd' if backward else 'fwd'}", description,
                lambda batch: floor.shape_cost(dims, batch, shared=False, backward=backward,
                                               with_R=False)
                + floor.landmark_cost(dims.V, 68, batch, backward=backward, dynamic=17),
                inputs, runner, skip, peers=("smplx",))


# body-models' kernel backend of each of its implementations.
BODY_MODELS_KERNELS = {"body_models": "torch", "body_models_warp": "warp"}
# body-models' FLAME splits the model's shape basis at this column: identity before,
# expression after.
BODY_MODELS_SHAPE_COLUMNS = 300
# Agreement of body-models' vertices with the reference's, both float32: the largest
# difference relative to the largest vertex coordinate. A 400-term blend and the pose
# chain summed in another order differ by a few float32 ulps (~1e-7); a convention
# mismatch (a pose in another slot, an expression column off) by 1e-2 and more.
BODY_MODELS_RTOL = 1e-5


def body_models_inputs(inputs: dict, requires_grad: bool = False) -> dict:
    """FlameShape's inputs as body-models' `FLAME.forward_vertices` takes them, the same
    values: shape and expression as they are; global_pose, the root joint's rotation, as
    `head_rotation`; neck, jaw and the two eye rotations (eye_pose's first and last three
    values) stacked as `head_pose` (B, 4, 3), in the order of FLAME's joints 1..4 that
    both read. New tensors (leaves of their own with requires_grad)."""
    eye = inputs["eye_pose"]
    mapped = {
        "shape": inputs["shape"],
        "expression": inputs["expr"],
        "head_rotation": inputs["global_pose"],
        "head_pose": torch.stack([inputs["neck_pose"], inputs["jaw_pose"], eye[:, :3],
                                  eye[:, 3:]], dim=1),
    }
    return {k: v.detach().clone().requires_grad_(requires_grad) for k, v in mapped.items()}


def _body_models_file(models: Models):
    """(the FLAME model file body-models reads, None) or (None, why there is none): the
    synthetic model is the pickle of smplx's folder (_smplx_folder), the same arrays in
    the official file's layout; otherwise the model file flame_ext reads itself."""
    path = models.model_path
    if path in ("synthetic", "synthetic-small"):
        folder, why = _smplx_folder(models)
        return os.path.join(folder, "FLAME_NEUTRAL.pkl"), why
    from flame_ext.io import discovery

    try:
        found = discovery._locate(discovery.MODEL_FILE_NAMES, path, pkl_means_directory=False)
    except (OSError, ValueError) as exc:
        return None, f"no FLAME model file for body-models: {timing.describe_error(exc)}"
    if getattr(found, "suffix", None) not in (".pkl", ".npz"):
        return None, f"body-models reads a FLAME .pkl or .npz file; model_path is {path!r}"
    return str(found), None


def body_models_status(models: Models, impl: str) -> Optional[str]:
    """None when `impl` (a BODY_MODELS_KERNELS key) can run on this model, else why not."""
    try:
        import body_models.flame.torch  # noqa: F401
    except ImportError as exc:
        return ("body-models is not installed (pip install body-models warp-lang): "
                f"{timing.describe_error(exc)}")
    if BODY_MODELS_KERNELS[impl] == "warp":
        try:
            import warp  # noqa: F401
        except ImportError as exc:
            return ("NVIDIA Warp is not installed (pip install warp-lang): "
                    f"{timing.describe_error(exc)}")
    dims = models.shape_dims()
    if dims.n_shape != BODY_MODELS_SHAPE_COLUMNS:
        return (f"body-models' FLAME reads the first {BODY_MODELS_SHAPE_COLUMNS} shape "
                "columns as identity and the rest as expression; this model has "
                f"{dims.n_shape} + {dims.n_expr}")
    return None


def body_models_layer(models: Models, impl: str) -> torch.nn.Module:
    """body-models' FLAME on the model file, with the kernels of `impl`."""
    from body_models.flame.torch import FLAME

    path, why = _body_models_file(models)
    if why:
        raise FileNotFoundError(why)
    if BODY_MODELS_KERNELS[impl] == "warp":
        import warp

        # Warp logs each module load on stdout, inside the table: warnings only.
        warp.config.quiet = True
        warp.config.log_level = max(warp.config.log_level, warp.LOG_WARNING)
    return FLAME(model_path=path, kernel_backend=BODY_MODELS_KERNELS[impl]).to(models.device)


def body_models_agreement(models: Models, layer: torch.nn.Module, batch: int = 4,
                          seed: int = 8000) -> float:
    """The largest difference between body-models' vertices and the reference
    FlameShape's on random parameters (float32 both), relative to the largest vertex
    coordinate: ~1e-7 when both compute the same mesh."""
    values = models.random_inputs(batch, False, _generator(models, seed))
    with torch.no_grad():
        expected, _ = models.shape("reference", "none")(**values)
        got = layer.forward_vertices(**body_models_inputs(values))
    if got.shape != expected.shape:
        raise ValueError(f"body-models' vertices are {tuple(got.shape)}, the reference's "
                         f"{tuple(expected.shape)}")
    return ((got - expected).abs().max() / expected.abs().max()).item()


def _body_models_case(models: Models, backward: bool) -> Case:
    """shape_fwd / shape_fwdbwd (FlameShape, no R, per-sample identity) with body-models'
    FLAME beside it: its torch and its Warp kernels, on the same model file and inputs."""
    base = _shape_case(models, shared=False, backward=backward, with_R=False)
    layers: Dict[str, torch.nn.Module] = {}

    def layer(impl: str) -> torch.nn.Module:
        if impl not in layers:
            built = body_models_layer(models, impl)
            error = body_models_agreement(models, built)
            if not error <= BODY_MODELS_RTOL:
                raise ValueError(f"body-models' vertices differ from the reference's by "
                                 f"{error:.2g} of the mesh's extent (tolerance "
                                 f"{BODY_MODELS_RTOL:g}): not the same computation")
            layers[impl] = built
        return layers[impl]

    def skip(impl: str, batch: int) -> Optional[str]:
        if impl not in BODY_MODELS_KERNELS:
            return None
        return body_models_status(models, impl) or _body_models_file(models)[1]

    def inputs(batch: int) -> List[dict]:
        return [dict(s, body_models=body_models_inputs(s["inputs"], backward))
                for s in base.inputs(batch)]

    def runner(impl: str, batch: int) -> Callable[[dict], object]:
        if impl not in BODY_MODELS_KERNELS:
            return base.runner(impl, batch)
        forward = layer(impl).forward_vertices
        if not backward:
            def run(s):
                with torch.no_grad():
                    return forward(**s["body_models"])
        else:
            def run(s):
                leaves = s["body_models"]
                return torch.autograd.grad(forward(**leaves), list(leaves.values()),
                                           s["grads"])
        return run

    description = (f"{base.description}; + body-models' FLAME (torch / Warp kernels) on the "
                   "same model file and inputs (global_pose as head_rotation, neck, jaw, "
                   "eyes as head_pose (B,4,3)), checked against the reference first")
    return Case(f"body_models_{'fwdbwd' if backward else 'fwd'}", description, base.cost,
                inputs, runner, skip, peers=tuple(BODY_MODELS_KERNELS))


def build_cases(models: Models, impls: Optional[List[str]] = None) -> List[Case]:
    """Every case, in the order of the table: FlameShape, its mean transform, identity-
    indexed batches, landmarks, texture, fitting step, vertex normals,
    then the peers' cases (smplx's FLAME layer, body-models' FLAME) when `impls` is None
    or holds the peer."""
    cases = []
    for shared in (False, True):
        for backward in (False, True):
            for with_R in (False, True):
                cases.append(_shape_case(models, shared, backward, with_R))
    cases.append(_mean_transform_case(models))
    cases.append(_identities_case(models))
    for lm_type in ("68", "mp"):
        for backward in (False, True):
            cases.append(_landmark_case(models, lm_type, backward))
    cases.append(_texture_case(models))
    cases += [_texture_options_case(models, name) for name in TEXTURE_OPTIONS]
    cases.append(_fit_case(models))
    for backward in (False, True):
        cases.append(_normals_case(models, backward))
    if impls is None or "smplx" in impls:
        cases += [_smplx_case(models, backward) for backward in (False, True)]
    if impls is None or any(i in impls for i in BODY_MODELS_KERNELS):
        cases += [_body_models_case(models, backward) for backward in (False, True)]
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
