"""The benchmark cases of the peer implementations: FLAME layers users would pick
instead of flame_ext, timed against it on the same model file and inputs. Built by
cases.build_cases on its Case and Models.

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
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Callable, Dict, List, Optional

import torch

from . import floor, timing
from .cases import BACKEND, Case, Models, _generator, _input_sets, _shape_case


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


def smplx_case(models: Models, backward: bool) -> Case:
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


def body_models_case(models: Models, backward: bool) -> Case:
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
