"""FlameShape, FlameLandmark and FlameTex: medusa's decoder API on flame_ext's kernels.

Each decoder keeps medusa's constructor arguments, buffer names and outputs, and adds a
few keyword-only options (`model_path=`, `backend=`, and per decoder `transforms=` or
`contour_rule=`). The computation goes through one of three interchangeable paths:

- ``'ext'``: the compiled ops (flame_ext._ops), fused kernels with hand-written backward;
- ``'reference'``: flame_ext.reference, the same decomposition in plain PyTorch;
- ``'medusa'``: flame_ext.medusa_baseline, medusa's own algorithm (the benchmark baseline).

``backend='auto'`` (the default) takes the compiled ops when they are loaded and have a
kernel for the tensors' device, else the reference, warning once when the library is
missing.
"""

from __future__ import annotations

import threading
import warnings
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch
from torch import nn

from . import _ops, medusa_baseline, reference
from ._checks import FLOAT_DTYPES, check_count, check_tensor
from .io import load_flame_model, load_landmark_embedding, load_texture_space

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

BACKENDS = ("auto", "ext", "reference", "medusa")
POSE_NAMES = ("global_pose", "neck_pose", "jaw_pose", "eye_pose")
INPUT_NAMES = ("shape", "expr") + POSE_NAMES
TRANSFORMS = ("vertex", "joint", "none")
CONTOUR_RULES = ("medusa", "deca")

# Medusa's FlameTex output size (SPEC 2: nearest-neighbour resize to 256x256).
TEXTURE_SIZE = 256

_warn_lock = threading.Lock()
_warned_no_ext = False


def _warn_no_extension() -> None:
    global _warned_no_ext
    with _warn_lock:
        if _warned_no_ext:
            return
        _warned_no_ext = True
    warnings.warn(
        "flame_ext: the compiled ops could not be loaded "
        f"({_ops.load_error()}); using the pure-PyTorch reference, which is slower. "
        "Rebuild with `pip install --no-build-isolation .`.",
        RuntimeWarning,
        stacklevel=3,
    )


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "ext" and not _ops.available():
        raise RuntimeError(
            f"backend='ext' asked for, but the compiled ops did not load: {_ops.load_error()}"
        )
    if backend in ("auto", "ext"):
        _prepare_ext_steps()
    return backend


def resolve_backend(backend: str, device_type: str, ops=("blend",)) -> str:
    """The path a decoder takes for tensors on `device_type` ('cpu' or 'cuda')."""
    if backend != "auto":
        return backend
    if not _ops.available():
        _warn_no_extension()
        return "reference"
    key = "CUDA" if device_type == "cuda" else "CPU"
    if all(_ops.has_kernel(op, key) for op in ops):
        return "ext"
    return "reference"


# The step functions of each path, all with the reference's signatures. Looked up in a
# plain dict that is filled before any forward runs (by _check_backend, in every
# decoder's constructor): torch.compile then reads a constant instead of tracing the
# construction, which would break the graph.
_STEPS = {
    "reference": SimpleNamespace(
        lbs=lambda *args: None,  # no fused form: the reference runs the steps
        blend=reference.blend,
        rigid_transforms=reference.rigid_transforms,
        skin=reference.skin,
        landmarks=reference.landmarks,
    )
}


def _prepare_ext_steps() -> None:
    if "ext" in _STEPS or not _ops.available():
        return
    from ._ops import blend, landmarks, lbs, rigid_transforms, skin

    # Unchecked entries: the decoders check what enters them, and the rest are their
    # own buffers (the checks would cost as much as the kernels at B=1 on a GPU).
    _STEPS["ext"] = SimpleNamespace(
        lbs=lbs.lbs,
        blend=blend.blend_unchecked,
        rigid_transforms=rigid_transforms.rigid_transforms_unchecked,
        skin=skin.skin_unchecked,
        landmarks=landmarks.landmarks_unchecked,
    )


def _kernels(path: str) -> SimpleNamespace:
    """The step functions of path 'ext' or 'reference'."""
    steps = _STEPS.get(path)
    if steps is None:
        # a decoder whose constructor did not run in this process (unpickled, sent to a
        # spawned worker) or whose backend was changed after construction
        _prepare_ext_steps()
        steps = _STEPS[path]
    return steps


def _rebuild_derived_buffers(module, _incompatible_keys) -> None:
    """load_state_dict post-hook: derive the non-persistent buffers from the loaded ones.

    A module-level function (not a lambda), so the decoders can be pickled."""
    module._register_derived()


def _as_tensor(array: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)


class _ParametricDecoder(nn.Module):
    """FLAME parameters -> posed vertices: what FlameShape and FlameShapeLandmark share.

    The input handling (medusa's inputs, parameters, broadcasting and error messages) and
    the blend -> rigid transforms -> blend -> skinning pipeline. Subclasses define the
    six parameters, ``parameters_``, ``n_shape``, ``transforms`` and the tables
    ``v_template``, ``shape_dirs``, ``pose_dirs``, ``lbs_weights``, ``parents``,
    ``_J_template``, ``_J_dirs`` (FlameShapeLandmark: restricted to a vertex subset).
    """

    def get_full_pose(self) -> torch.Tensor:
        """cat([global_pose, neck_pose, jaw_pose, eye_pose], dim=1): (B, 15)."""
        return torch.cat([self.global_pose, self.neck_pose, self.jaw_pose, self.eye_pose], dim=1)

    def _gather_inputs(self, batch_size, inputs):
        unknown = sorted(set(inputs) - set(INPUT_NAMES))
        if unknown:
            raise ValueError(f"unknown input(s) {unknown}; valid keys are {INPUT_NAMES}")
        if not inputs and batch_size is None:
            raise ValueError("Either inputs or batch_size must be provided!")
        for name in INPUT_NAMES:
            if name in inputs and name in self.parameters_:
                raise ValueError(f"Parameter {name} is also part of inputs!")
        like = self.v_template
        if like.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"the model is {like.dtype}; {type(self).__name__} computes in float32 or "
                "float64 (convert it with .float() or .double())"
            )
        for name, value in inputs.items():
            dim = getattr(self, name).shape[1]
            check_tensor(name, value, shape=(None, dim), floating=True)
            if value.dtype != like.dtype:
                raise TypeError(
                    f"{name} has dtype {value.dtype} but the model is {like.dtype}; "
                    "convert one of them (e.g. model.double())"
                )
            if value.device != like.device:
                raise ValueError(f"{name} is on {value.device} but the model is on {like.device}")
        if batch_size is None:
            # medusa takes the first input's batch size; with batch-1 inputs broadcasting,
            # the first one that is not 1 (the same wherever medusa works).
            sizes = [value.shape[0] for value in inputs.values()]
            batch_size = next((size for size in sizes if size != 1), sizes[0])
        check_count("batch_size", batch_size, 0, 2**62)
        values = {}
        for name in INPUT_NAMES:
            value = inputs[name] if name in inputs else getattr(self, name)
            if value.shape[0] not in (1, batch_size):
                source = "input" if name in inputs else "parameter"
                raise ValueError(
                    f"{source} {name} has batch size {value.shape[0]} but the batch size is "
                    f"{batch_size}; it must be {batch_size} or 1"
                )
            if name not in inputs and (value.dtype != like.dtype or value.device != like.device):
                # a parameter replaced or converted apart from the buffers
                raise TypeError(
                    f"parameter {name} is {value.dtype} on {value.device} but the model's "
                    f"buffers are {like.dtype} on {like.device}; convert the whole module"
                )
            values[name] = value
        return batch_size, values

    def _decode(self, k, shape, expr, pose):
        """SPEC 3 as blend -> rigid transforms -> blend with correctives -> skinning.

        With one shape row for the whole batch (the fitting case) the identity is blended
        once and only expression and pose run per sample.
        """
        batch_size, num_vertices = pose.shape[0], self.v_template.shape[0]
        num_joints = self.parents.shape[0]
        v_dirs = self.shape_dirs.view(num_vertices * 3, -1)
        v_base, j_base = self.v_template.view(-1), self._J_template
        j_dirs = self._J_dirs
        if shape.shape[0] == 1 and batch_size > 1:
            n = self.n_shape
            v_base = k.blend(v_base, v_dirs[:, :n], shape)
            j_base = k.blend(j_base, j_dirs[:, :n], shape)
            v_dirs, j_dirs, coeffs = v_dirs[:, n:], j_dirs[:, n:], expr.expand(batch_size, -1)
        else:
            coeffs = torch.cat(
                [shape.expand(batch_size, -1), expr.expand(batch_size, -1)], dim=1
            )
        pose = pose.view(batch_size, num_joints, 3)
        tables = (self.pose_dirs, self.parents, self.lbs_weights)
        want_vertex_transforms = self.transforms == "vertex"
        # The compiled ops' single autograd node where it applies, else the four steps.
        fused = k.lbs(v_base, v_dirs, j_base, j_dirs, coeffs, pose, *tables, want_vertex_transforms)
        if fused is not None:
            v, vertex_transforms, transforms = fused
        else:
            joints = k.blend(j_base, j_dirs, coeffs).view(batch_size, num_joints, 3)
            transforms, pose_feature = k.rigid_transforms(pose, joints, self.parents)
            v_posed = k.blend(v_base, v_dirs, coeffs, self.pose_dirs, pose_feature)
            v, vertex_transforms = k.skin(
                v_posed.view(batch_size, num_vertices, 3),
                transforms,
                self.lbs_weights,
                want_vertex_transforms,
            )
        if want_vertex_transforms:
            return v, vertex_transforms
        return v, transforms if self.transforms == "joint" else None


class FlameShape(_ParametricDecoder):
    """Generates FLAME meshes from shape, expression and pose parameters (medusa's API).

    Args:
        n_shape: shape components used, 0..(the model's count, 300 for FLAME).
        n_expr: expression components used, 0..(the model's count, 100 for FLAME).
        parameters: names of the parameters that are trainable (requires_grad=True);
            every other parameter is frozen. Kept as ``self.parameters_``.
        device: where the module lives (default ``flame_ext.DEVICE``).
        model_path: FLAME model file or directory, or 'synthetic' / 'synthetic-small';
            None runs the discovery of SPEC section 4.
        transforms: what ``forward`` returns as ``R``: 'vertex' (medusa's (B,V,4,4)
            per-vertex blended transforms, the default), 'joint' (the (B,J,4,4) per-joint
            transforms A_j, 1/1000 of the bytes) or 'none' (None).
        backend: 'auto', 'ext', 'reference' or 'medusa' (see the module docstring).
        **init_parameters: initial values replacing the zero parameters of those names.
    """

    def __init__(
        self,
        n_shape: int = 300,
        n_expr: int = 100,
        parameters=None,
        device=DEVICE,
        *,
        model_path=None,
        transforms: str = "vertex",
        backend: str = "auto",
        **init_parameters,
    ):
        super().__init__()
        self.backend = _check_backend(backend)
        if transforms not in TRANSFORMS:
            raise ValueError(f"transforms must be one of {TRANSFORMS}, got {transforms!r}")
        if backend == "medusa" and transforms != "vertex":
            raise ValueError("backend='medusa' computes medusa's outputs only: transforms='vertex'")
        self.transforms = transforms

        model = load_flame_model(model_path)
        if model.parents.shape[0] != len(POSE_NAMES) + 1:
            # medusa's pose parameters (global, neck, jaw, two eyes) address FLAME's joints
            raise ValueError(
                f"{model.source}: FlameShape needs FLAME's 5 joints (global, neck, jaw, "
                f"eyes), the model has {model.parents.shape[0]} joints"
            )
        self.n_shape = check_count("n_shape", n_shape, 0, model.n_shape)
        self.n_expr = check_count("n_expr", n_expr, 0, model.n_expr)
        self.parameters_ = [] if parameters is None else list(parameters)
        for name in self.parameters_:
            if name not in INPUT_NAMES:
                raise ValueError(
                    f"parameters contains unknown name {name!r}; valid names are {INPUT_NAMES}"
                )

        columns = np.r_[0:n_shape, model.n_shape : model.n_shape + n_expr]
        shape_dirs = model.shapedirs[:, :, columns]
        num_vertices = model.v_template.shape[0]
        self.register_buffer("tris", torch.from_numpy(model.faces.astype(np.int64)))
        self.register_buffer("v_template", _as_tensor(model.v_template))
        self.register_buffer("shape_dirs", _as_tensor(shape_dirs))
        self.register_buffer(
            "pose_dirs", _as_tensor(model.posedirs.reshape(num_vertices * 3, -1).T)
        )
        self.register_buffer("J_regressor", _as_tensor(model.J_regressor))
        self.register_buffer("parents", torch.from_numpy(model.parents.astype(np.int64)))
        self.register_buffer("lbs_weights", _as_tensor(model.lbs_weights))
        self._register_derived()
        self.register_load_state_dict_post_hook(_rebuild_derived_buffers)

        sizes = {"shape": n_shape, "expr": n_expr, "eye_pose": 6}
        for name in INPUT_NAMES:
            value = torch.zeros(1, sizes.get(name, 3))
            if name in init_parameters:
                value = self._check_init(name, init_parameters.pop(name), sizes.get(name, 3))
            setattr(self, name, nn.Parameter(value, requires_grad=name in self.parameters_))
        if init_parameters:
            raise ValueError(
                f"unknown init parameter(s) {sorted(init_parameters)}; valid names are "
                f"{INPUT_NAMES}"
            )
        self.to(device)

    @staticmethod
    def _check_init(name, value, dim):
        value = torch.as_tensor(value)
        check_tensor(name, value, shape=(None, dim), floating=True)
        return value.detach().clone()

    def _register_derived(self) -> None:
        """Precomputes joints = J_template + J_dirs . beta (SPEC 3 step 2, second form).

        Derived from the buffers, so it is recomputed after load_state_dict; computed in
        float64 and stored in the buffers' dtype. Not part of the state_dict.
        """
        regressor = self.J_regressor.double()
        template = regressor @ self.v_template.double()
        dirs = torch.einsum("jv,vck->jck", regressor, self.shape_dirs.double())
        dtype = self.v_template.dtype
        self.register_buffer("_J_template", template.reshape(-1).to(dtype), persistent=False)
        self.register_buffer(
            "_J_dirs", dirs.reshape(dirs.shape[0] * 3, dirs.shape[-1]).to(dtype), persistent=False
        )

    def _apply(self, fn, *args, **kwargs):
        # .double()/.to(): derive the joint basis again from the converted buffers, so it
        # carries no rounding of the old dtype (float32 rounding would show in float64).
        super()._apply(fn, *args, **kwargs)
        self._register_derived()
        return self

    def forward(self, batch_size: Optional[int] = None, **inputs):
        """Decodes a batch: returns ``(v, R)``.

        ``inputs`` may hold shape, expr, global_pose, neck_pose, jaw_pose, eye_pose, each
        (B, dim); missing ones come from the module's parameters, and batch-1 values are
        broadcast. ``v`` is (B, V, 3); ``R`` depends on ``transforms`` (see the class).
        """
        batch_size, values = self._gather_inputs(batch_size, inputs)
        pose = torch.cat([values[name].expand(batch_size, -1) for name in POSE_NAMES], dim=1)
        path = resolve_backend(self.backend, self.v_template.device.type, ("blend", "skin"))
        if path == "medusa":
            beta = torch.cat(
                [values["shape"].expand(batch_size, -1), values["expr"].expand(batch_size, -1)],
                dim=1,
            )
            return medusa_baseline.lbs(
                beta, pose, self.v_template, self.shape_dirs, self.pose_dirs,
                self.J_regressor, self.parents, self.lbs_weights,
            )
        return self._decode(_kernels(path), values["shape"], values["expr"], pose)


class FlameLandmark(nn.Module):
    """Barycentric landmarks on FLAME meshes (medusa's API).

    Args:
        lm_type: '68' (iBUG 68: 17 contour points chosen per sample by head yaw, then 51
            static) or 'mp' (105 MediaPipe points).
        lm_dim: '2d' (medusa's landmarks) or '3d' (the 68 static landmarks, as DECA's
            landmarks3d; for 'mp' the same 105).
        device: where the module lives.
        model_path: FLAME model file or directory, or 'synthetic' / 'synthetic-small'.
        contour_rule: 'medusa' (default: poses read as Euler angles, negative yaw) or
            'deca' (Rodrigues, positive yaw, as DECA/EMOCA/MICA).
        backend: 'auto', 'ext', 'reference' or 'medusa'.
    """

    def __init__(
        self,
        lm_type: str = "68",
        lm_dim: str = "2d",
        device=DEVICE,
        *,
        model_path=None,
        contour_rule: str = "medusa",
        backend: str = "auto",
    ):
        super().__init__()
        if lm_type not in ("68", "mp"):
            raise ValueError(f"lm_type must be '68' or 'mp', got {lm_type!r}")
        if lm_dim not in ("2d", "3d"):
            raise ValueError(f"lm_dim must be '2d' or '3d', got {lm_dim!r}")
        if contour_rule not in CONTOUR_RULES:
            raise ValueError(f"contour_rule must be one of {CONTOUR_RULES}, got {contour_rule!r}")
        self.backend = _check_backend(backend)
        if backend == "medusa" and contour_rule != "medusa":
            raise ValueError("backend='medusa' implements contour_rule='medusa' only")
        self.lm_type, self.lm_dim, self.contour_rule = lm_type, lm_dim, contour_rule

        model = load_flame_model(model_path)
        embedding = load_landmark_embedding(lm_type, model_path, num_faces=model.faces.shape[0])
        self.register_buffer("tris", torch.from_numpy(model.faces.astype(np.int64)))
        self.register_buffer("neck_kin_chain", torch.as_tensor(_chain_to_root(model.parents, 1)))
        if lm_type == "68":
            if lm_dim == "2d":
                faces, bary = embedding.static_lmk_faces_idx, embedding.static_lmk_bary_coords
            else:
                faces, bary = embedding.full_lmk_faces_idx, embedding.full_lmk_bary_coords
            self.register_buffer(
                "dynamic_lmk_faces_idx", torch.from_numpy(embedding.dynamic_lmk_faces_idx)
            )
            self.register_buffer(
                "dynamic_lmk_bary_coords", _as_tensor(embedding.dynamic_lmk_bary_coords)
            )
        else:
            faces, bary = embedding.lmk_faces_idx, embedding.lmk_bary_coords
            self.register_buffer("landmark_indices", torch.from_numpy(embedding.landmark_indices))
        self.register_buffer("lmk_faces_idx", torch.from_numpy(faces.astype(np.int64)))
        self.register_buffer("lmk_bary_coords", _as_tensor(bary))
        self.num_vertices = model.v_template.shape[0]
        self.num_joints = model.parents.shape[0]
        self.device = device
        self.to(device)

    @property
    def _dynamic(self) -> bool:
        return self.lm_type == "68" and self.lm_dim == "2d"

    def forward(self, v: torch.Tensor, poses: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Landmarks (B, L, 3) of vertices ``v`` (B, V, 3).

        ``poses`` (B, 15) as from ``FlameShape.get_full_pose()`` chooses the contour bin
        (lm_type '68', lm_dim '2d' only; ignored otherwise). Gradients flow to ``v``.
        """
        check_tensor("v", v, shape=(None, self.num_vertices, 3), floating=True)
        if v.device != self.tris.device:
            raise ValueError(f"v is on {v.device} but the module is on {self.tris.device}")
        batch_size = v.shape[0]
        if self._dynamic:
            check_tensor("poses", poses, shape=(None, 3 * self.num_joints), dtype=v.dtype)
            if poses.shape[0] not in (1, batch_size):
                raise ValueError(
                    f"poses has batch size {poses.shape[0]} but v has {batch_size}"
                )
            if poses.device != v.device:
                raise ValueError(f"poses is on {poses.device} but v is on {v.device}")
            poses = poses.expand(batch_size, -1)
            dynamic_faces, dynamic_bary = (
                self.dynamic_lmk_faces_idx,
                self.dynamic_lmk_bary_coords.to(v.dtype),
            )
        else:
            dynamic_faces = dynamic_bary = None
        bary = self.lmk_bary_coords.to(v.dtype)
        path = resolve_backend(self.backend, v.device.type, ("landmarks",))
        if path == "medusa":
            return medusa_baseline.landmarks(
                v, poses, self.tris, self.lmk_faces_idx, bary, dynamic_faces, dynamic_bary
            )
        return _kernels(path).landmarks(
            v, poses, self.tris, self.lmk_faces_idx, bary, dynamic_faces, dynamic_bary,
            self.contour_rule,
        )


def _chain_to_root(parents: np.ndarray, joint: int) -> list:
    """[joint, parent(joint), ..., root]: medusa's neck_kin_chain for joint 1 is [1, 0]."""
    chain = []
    while joint != -1:
        chain.append(int(joint))
        joint = int(parents[joint])
    return chain


class FlameTex(nn.Module):
    """FLAME's linear albedo model (medusa's API): texcode (B, n_tex) -> (B, 3, 256, 256).

    Args:
        model_path: FLAME_albedo_from_BFM.npz or FLAME_texture.npz (flat or image-shaped
            arrays), a directory holding one, 'synthetic' / 'synthetic-small', or None
            for discovery.
        n_tex: components kept, 0..(the file's count).
        backend: 'auto', 'ext', 'reference' or 'medusa'.

    Buffers ``texture_mean`` (1, 1, H*W*3) and ``texture_basis`` (1, H*W*3, n_tex) are
    medusa's. The output only reads 256x256 of the HxW pixels, so the module also keeps
    (not in the state_dict) the mean and basis rows of exactly those pixels, in output
    order with the channel flip applied: the fast paths then are a single blend.
    """

    def __init__(self, model_path=None, n_tex: int = 50, *, backend: str = "auto"):
        super().__init__()
        self.backend = _check_backend(backend)
        space = load_texture_space(model_path, n_tex)
        self.n_tex = space.basis.shape[1]
        self.height, self.width = space.height, space.width
        self.register_buffer("texture_mean", torch.from_numpy(space.mean).view(1, 1, -1))
        self.register_buffer("texture_basis", torch.from_numpy(space.basis).unsqueeze(0))
        self._register_derived()
        self.register_load_state_dict_post_hook(_rebuild_derived_buffers)

    def _register_derived(self) -> None:
        index = reference.texture_gather_index(self.height, self.width, TEXTURE_SIZE)
        index = index.to(self.texture_mean.device)
        self.register_buffer("_gathered_mean", self.texture_mean[0, 0, index], persistent=False)
        self.register_buffer(
            "_gathered_basis", self.texture_basis[0, index].contiguous(), persistent=False
        )

    def forward(self, texcode: torch.Tensor) -> torch.Tensor:
        """Albedo images (B, 3, 256, 256), channels in medusa's (reversed) order."""
        check_tensor("texcode", texcode, shape=(None, self.n_tex), floating=True)
        like = self.texture_mean
        if texcode.dtype != like.dtype:
            raise TypeError(f"texcode has dtype {texcode.dtype} but the model is {like.dtype}")
        if texcode.device != like.device:
            raise ValueError(f"texcode is on {texcode.device} but the model is on {like.device}")
        path = resolve_backend(self.backend, texcode.device.type, ("blend",))
        if path == "medusa":
            return medusa_baseline.texture(
                self.texture_mean, self.texture_basis, texcode, self.height, self.width
            )
        out = _kernels(path).blend(self._gathered_mean, self._gathered_basis, texcode)
        return out.view(texcode.shape[0], 3, TEXTURE_SIZE, TEXTURE_SIZE)
