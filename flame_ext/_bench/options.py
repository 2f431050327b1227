"""The benchmark cases of flame_ext's options beyond medusa, each against what users
write today: the mean transform (against medusa's FlameShape followed by R.mean(1)),
identity-indexed batches (against per-frame shape rows), FlameTex's half-precision,
compact and specular options (against medusa's float32 texture) and vertex normals
(against the index_add reference; medusa computes none). Built by cases.build_cases on
its Case and Models.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch

from . import floor, timing
from .cases import BACKEND, Case, Models, _generator, _input_sets, available_memory


def mean_transform_case(models: Models) -> Case:
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


def identities_case(models: Models) -> Case:
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
                                               with_R=False,
                                               identities=min(identities, max(batch, 1))),
                inputs, runner)


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


def texture_options_case(models: Models, name: str) -> Case:
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


def normals_case(models: Models, backward: bool) -> Case:
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
