"""FlameShape, FlameLandmark and FlameTex: medusa's decoder API on flame_ext's kernels.

Each decoder keeps medusa's constructor arguments, buffer names and outputs, and adds a
few keyword-only options (`model_path=`, `backend=`, and per decoder `transforms=` or
`contour_rule=`). The computation goes through one of three interchangeable paths, chosen
by flame_ext._backend: ``'ext'`` (the compiled ops), ``'reference'`` (flame_ext.reference,
plain PyTorch) or ``'medusa'`` (medusa's own algorithm, the benchmark baseline).
``backend='auto'`` (the default) takes the compiled ops when they are loaded and have
kernels for the tensors' device, else the reference, warning once when the library is
missing.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from . import _backend, geometry, medusa_baseline, reference
from ._backend import CONTOUR_RULES
from ._checks import TREE, check_count, check_tensor, refuse_bad_loaded_indices
from ._derived import DerivedTables, derive_after_load, joint_dirs, joint_template
from ._ops import half_blend
from ._parametric import INPUT_NAMES, POSE_NAMES, ParametricDecoder, identity_rows
from .io import load_flame_model, load_landmark_embedding, load_texture_space

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

TRANSFORMS = ("vertex", "joint", "mean", "none")

# Medusa's FlameTex output size (a nearest-neighbour resize to 256x256).
TEXTURE_SIZE = 256


# The post-hook's name in modules pickled before it moved to _derived.
_rebuild_derived_buffers = derive_after_load


def _as_tensor(array: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)


class FlameShape(DerivedTables, ParametricDecoder):
    """Generates FLAME meshes from shape, expression and pose parameters (medusa's API).

    Args:
        n_shape: shape components used, 0..(the model's count, 300 for FLAME).
        n_expr: expression components used, 0..(the model's count, 100 for FLAME).
        parameters: names of the parameters that are trainable (requires_grad=True);
            every other parameter is frozen. Kept as ``self.parameters_``.
        device: where the module lives (default ``flame_ext.DEVICE``).
        model_path: FLAME model file or directory, or 'synthetic' / 'synthetic-small';
            None runs flame_ext.io's discovery ($FLAME_EXT_DATA, then
            ~/.medusa_ext_data/FLAME/).
        transforms: what ``forward`` returns as ``R``: 'vertex' (medusa's (B,V,4,4)
            per-vertex blended transforms, the default), 'joint' (the (B,J,4,4) per-joint
            transforms A_j, 1/1000 of the bytes), 'mean' (the (B,4,4) mean over vertices
            of the per-vertex transforms, ``R.mean(1)`` of 'vertex', computed as
            sum_j wbar_j A_j with wbar the column means of ``lbs_weights``: what medusa's
            own pipeline keeps of R) or 'none' (None).
        backend: 'auto', 'ext', 'reference' or 'medusa' (see the module docstring).
        **init_parameters: initial values replacing the zero parameters of those names.
    """

    _derived_from = {
        "joint_template": ("J_regressor", "v_template"),
        "joint_dirs": ("J_regressor", "shape_dirs"),
        "mean_weights": ("lbs_weights",),
        "split_dirs": ("shape_dirs",),
    }
    _derived_tables = {
        "joint_template": ("_J_template",),
        "joint_dirs": ("_J_dirs",),
        "mean_weights": ("_mean_weights",),
        "split_dirs": ("_identity_dirs", "_expr_dirs"),
    }

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
        self.backend = _backend.check_backend(backend)
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
        self._reset_adjacency()

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
        self._start_deriving()  # on the device: once
        self.register_load_state_dict_pre_hook(refuse_bad_loaded_indices)

    @staticmethod
    def _check_init(name, value, dim):
        value = torch.as_tensor(value)
        check_tensor(name, value, shape=(None, dim), floating=True)
        return value.detach().clone()

    def _compute_derived(self, groups):
        """joints = J_template + J_dirs . beta (J_regressor applied to the basis), the mean
        skinning weight of each joint (transforms='mean') and the basis' shape and
        expression columns apart (`_split_dirs`): the groups of `_derived_from` named in
        `groups`, computed in float64 and stored in the buffers' dtype. Not part of the
        state_dict."""
        tables = {}
        if "joint_template" in groups:
            tables["_J_template"] = joint_template(self.J_regressor, self.v_template)
        if "joint_dirs" in groups:
            tables["_J_dirs"] = joint_dirs(self.J_regressor, self.shape_dirs)
        if "mean_weights" in groups:
            # transforms='mean': mean_v T_v = sum_j (mean_v W_vj) A_j.
            weights = self.lbs_weights
            tables["_mean_weights"] = weights.double().mean(0).to(weights.dtype)
        if "split_dirs" in groups:
            tables["_identity_dirs"], tables["_expr_dirs"] = self._split_dirs()
        return tables

    @staticmethod
    def _index_tables(get):
        return (("tris", get("v_template").shape[0]), ("parents", TREE))

    def _after_load(self) -> None:
        # the loaded tris may differ
        self._reset_adjacency()

    def _reset_adjacency(self) -> None:
        """Forgets the vertex-face adjacency of ``tris`` (built on the first
        ``vertex_normals`` call, kept as non-persistent buffers with the ``tris`` tensor and
        version they were built from: a ``tris`` replaced, moved or changed in place gets
        its own)."""
        self.register_buffer("_normal_offsets", None, persistent=False)
        self.register_buffer("_normal_entries", None, persistent=False)
        self._normal_source = None

    def vertex_normals(self, v: torch.Tensor) -> torch.Tensor:
        """Unit area-weighted vertex normals of meshes ``v`` (B, V, 3) or (V, 3) on this
        model's faces (``tris``), as ``flame_ext.vertex_normals(v, self.tris)``; the
        vertex-face adjacency is built once and kept on the module."""
        check_tensor("v", v, floating=True)
        if v.dim() not in (2, 3) or v.shape[-2:] != (self.v_template.shape[0], 3):
            raise ValueError(
                f"v must have shape (B, {self.v_template.shape[0]}, 3) or "
                f"({self.v_template.shape[0]}, 3), got {tuple(v.shape)}"
            )
        if v.device != self.tris.device:
            raise ValueError(f"v is on {v.device} but the module is on {self.tris.device}")
        path = self.backend
        if path == "auto":
            path = "ext" if geometry._use_ops(v.device.type) else "reference"
        elif path == "ext":
            _backend.check_no_tangents("FlameShape.vertex_normals", v, self.tris)
        if path != "ext":
            return reference.vertex_normals(v, self.tris)
        from ._ops import normals

        tris, num_vertices = self.tris, self.v_template.shape[0]
        # the kept table was built from this tris and for its face count (`.data` may swap
        # in more faces without a new version)
        kept = getattr(self, "_normal_source", None)
        fits = (self._normal_entries is not None and kept is not None and kept[0] is tris
                and self._normal_entries.shape[0] == tris.numel())
        if torch.compiler.is_compiling():
            # traced: the kept table where it fits (a version is no graph value), else one
            # built in the graph
            if not fits:
                return normals.vertex_normals(v, tris)
            return normals.vertex_normals_with_adjacency(
                v, tris, self._normal_offsets, self._normal_entries
            )

        def rebuild():
            try:
                version = tris._version
            except RuntimeError:  # an inference tensor tracks no version
                version = None
            offsets, entries = normals.vertex_face_adjacency(tris, num_vertices)
            self._normal_offsets, self._normal_entries = offsets, entries
            self._normal_source = (tris, version)
            return tris, offsets, entries

        if not fits or (kept[1] is not None and kept[1] != tris._version):
            rebuild()
        return normals.normals_with_kept_adjacency(
            v, tris, self._normal_offsets, self._normal_entries, rebuild
        )

    def forward(self, batch_size: Optional[int] = None, identity=None, **inputs):
        """Decodes a batch: returns ``(v, R)``.

        ``inputs`` may hold shape, expr, global_pose, neck_pose, jaw_pose, eye_pose, each
        (B, dim); missing ones come from the module's parameters, and batch-1 values are
        broadcast. ``v`` is (B, V, 3); ``R`` depends on ``transforms`` (see the class).

        Many identities in one batch: ``shape`` (S, n_shape) and ``identity`` (B,) int64
        in [0, S) give the same outputs and gradients as ``shape=shape[identity]``, with
        each identity's mesh blended once (see the README). An index out of range is a
        ValueError on the CPU; on CUDA (no host sync) that frame's outputs are NaN.
        """
        batch_size, values, identity = self._gather_inputs(batch_size, inputs, identity)
        pose = torch.cat([values[name].expand(batch_size, -1) for name in POSE_NAMES], dim=1)
        path = _backend.resolve(self.backend, self.v_template.device.type, "FlameShape")
        if path == "medusa":
            shape = values["shape"]
            if identity is not None:
                shape = identity_rows(shape, identity)
            beta = torch.cat(
                [shape.expand(batch_size, -1), values["expr"].expand(batch_size, -1)],
                dim=1,
            )
            return medusa_baseline.lbs(
                beta, pose, self.v_template, self.shape_dirs, self.pose_dirs,
                self.J_regressor, self.parents, self.lbs_weights,
            )
        return self._decode(_backend.steps(path), self._derived(), values["shape"],
                            values["expr"], pose, identity)


class FlameLandmark(_backend.DecoderModule):
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
        self.backend = _backend.check_backend(backend)
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
        self.register_load_state_dict_pre_hook(refuse_bad_loaded_indices)

    def _index_tables(self, get):
        faces = get("tris").shape[0]
        tables = [("tris", self.num_vertices), ("lmk_faces_idx", faces)]
        if self.lm_type == "68":
            tables.append(("dynamic_lmk_faces_idx", faces))
        return tables

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
        path = _backend.resolve(self.backend, v.device.type, "FlameLandmark")
        if path == "medusa":
            return medusa_baseline.landmarks(
                v, poses, self.tris, self.lmk_faces_idx, bary, dynamic_faces, dynamic_bary
            )
        return _backend.steps(path).landmarks(
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


# What FlameTex(basis_dtype=...) accepts: float32 (medusa's), or a half basis, read by the
# compiled blend op (or, on the reference path, by flame_ext._ops.half_blend) with float32
# sums.
BASIS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_basis_dtype(basis_dtype) -> torch.dtype:
    if basis_dtype is None:
        return torch.float32
    if not isinstance(basis_dtype, torch.dtype):
        raise TypeError(
            f"basis_dtype must be a torch.dtype (torch.float32, torch.float16 or "
            f"torch.bfloat16), got {type(basis_dtype).__name__} ({basis_dtype!r})"
        )
    if basis_dtype not in BASIS_DTYPES:
        raise ValueError(
            f"basis_dtype must be torch.float32, torch.float16 or torch.bfloat16, got "
            f"{basis_dtype}"
        )
    return basis_dtype


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
    return value


def _half_basis(array: np.ndarray, dtype: torch.dtype, source: str) -> torch.Tensor:
    """The float32 basis as `dtype`, refused when a value is beyond its finite range
    (float16 tops out at 65504; an albedo basis is O(1))."""
    basis = torch.from_numpy(array)
    if dtype == torch.float32:
        return basis
    limit = torch.finfo(dtype).max
    if basis.numel() and float(basis.abs().max()) > limit:
        raise ValueError(
            f"basis_dtype={dtype}: {source} has basis values of magnitude "
            f"{float(basis.abs().max()):.4g}, beyond {dtype}'s largest finite {limit:.4g}"
        )
    return basis.to(dtype)


def _gather_full_state(module, state_dict, prefix, local_metadata, strict, missing_keys,
                       unexpected_keys, error_msgs) -> None:
    """load_state_dict pre-hook of a compact FlameTex: a full (non-compact) state dict
    (texture_mean / texture_basis, and specular_* for specular modules) is gathered into
    the compact buffers before loading. A module-level function, so the decoders pickle."""
    module._gather_state_dict(state_dict, prefix)


class FlameTex(DerivedTables, _backend.DecoderModule):
    """FLAME's linear albedo model (medusa's API): texcode (B, n_tex) -> (B, 3, 256, 256).

    Args:
        model_path: FLAME_albedo_from_BFM.npz, FLAME_texture.npz or AlbedoMM's
            albedoModel2020_FLAME_albedoPart.npz (flat or image-shaped arrays), a
            directory holding one, 'synthetic' / 'synthetic-small', or None for discovery.
        n_tex: components kept, 0..(the file's count).
        backend: 'auto', 'ext', 'reference' or 'medusa'.
        specular: also decode AlbedoMM's specular albedo (specMU / specPC): forward then
            returns (diffuse, specular). Needs a file with a specular part (ValueError
            naming it otherwise); a directory or 'synthetic...' then means the AlbedoMM
            file.
        basis_dtype: torch.float32 (default), torch.float16 or torch.bfloat16: the basis
            is stored in that dtype (half the bytes) and blended with float32 sums; codes
            and output stay float32.
        compact: keep only the mean and basis rows the 256x256 output reads (1/4 of a
            512x512 texture's), not the full H*W*3 buffers; the output is the same bit
            for bit. Its state_dict holds ``gathered_mean`` / ``gathered_basis``.

    Buffers ``texture_mean`` (1, 1, H*W*3) and ``texture_basis`` (1, H*W*3, n_tex) are
    medusa's (with specular=True also ``specular_mean`` / ``specular_basis``, the same
    shapes). The output only reads 256x256 of the HxW pixels, so the module also keeps
    (not in the state_dict) the mean and basis rows of exactly those pixels, in output
    order with the channel flip applied (diffuse rows, then specular rows): the fast
    paths then are a single blend. A compact module keeps only those, persistent.
    """

    _derived_from = {
        "gathered_mean": ("texture_mean", "specular_mean"),
        "gathered_basis": ("texture_basis", "specular_basis"),
    }
    _derived_tables = {
        "gathered_mean": ("_gathered_mean",),
        "gathered_basis": ("_gathered_basis",),
    }

    def __init__(self, model_path=None, n_tex: int = 50, *, backend: str = "auto",
                 specular: bool = False, basis_dtype: Optional[torch.dtype] = None,
                 compact: bool = False):
        super().__init__()
        self.backend = _backend.check_backend(backend)
        self.specular = _check_flag("specular", specular)
        self.compact = _check_flag("compact", compact)
        self.basis_dtype = _check_basis_dtype(basis_dtype)
        if self.compact and self.backend == "medusa":
            raise ValueError(
                "compact=True keeps only the gathered 256x256 rows; backend='medusa' "
                "(medusa's algorithm) needs the full H*W*3 basis: use compact=False"
            )
        space = load_texture_space(model_path, n_tex, specular=self.specular)
        self.n_tex = space.basis.shape[1]
        self.height, self.width = space.height, space.width
        parts = [("texture", space.mean, space.basis)]
        if self.specular:
            parts.append(("specular", space.specular_mean, space.specular_basis))
        if not self.compact:
            for name, mean, basis in parts:
                self.register_buffer(f"{name}_mean", torch.from_numpy(mean).view(1, 1, -1))
                self.register_buffer(
                    f"{name}_basis",
                    _half_basis(basis, self.basis_dtype, space.source).unsqueeze(0),
                )
            self._start_deriving()
            return
        index = self._gather_index()
        self.register_buffer("gathered_mean", torch.cat(
            [torch.from_numpy(mean)[index] for _, mean, _ in parts]))
        self.register_buffer("gathered_basis", torch.cat(
            [_half_basis(basis[index.numpy()], self.basis_dtype, space.source)
             for _, _, basis in parts]))
        self.register_load_state_dict_pre_hook(_gather_full_state)

    def _gather_index(self, device=None) -> torch.Tensor:
        return reference.texture_gather_index(self.height, self.width, TEXTURE_SIZE,
                                              device=device)

    def _parts(self):
        return ("texture", "specular") if self.specular else ("texture",)

    def _compute_derived(self, groups):
        if self.compact:
            return {}
        index = self._gather_index(self.texture_mean.device)
        tables = {}
        if "gathered_mean" in groups:
            means = [getattr(self, f"{p}_mean")[0, 0, index] for p in self._parts()]
            tables["_gathered_mean"] = torch.cat(means)
        if "gathered_basis" in groups:
            bases = [getattr(self, f"{p}_basis")[0, index] for p in self._parts()]
            tables["_gathered_basis"] = torch.cat(bases).contiguous()
        return tables

    def _gather_state_dict(self, state_dict, prefix) -> None:
        """Replaces the full buffers of a non-compact state dict by their gathered rows."""
        full = [f"{prefix}{p}_{what}" for p in self._parts() for what in ("mean", "basis")]
        if not any(key in state_dict for key in full):
            return  # a compact state dict (or an incomplete one, which loading reports)
        for key in full:
            if key not in state_dict:
                raise ValueError(f"state_dict has full texture buffers but no {key!r}")
        n = self.height * self.width * 3
        index = None
        means, bases = [], []
        for p in self._parts():
            mean = state_dict.pop(f"{prefix}{p}_mean")
            basis = state_dict.pop(f"{prefix}{p}_basis")
            for key, value, shape in ((f"{prefix}{p}_mean", mean, (1, 1, n)),
                                      (f"{prefix}{p}_basis", basis, (1, n, self.n_tex))):
                if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
                    got = tuple(value.shape) if isinstance(value, torch.Tensor) else value
                    raise ValueError(
                        f"state_dict[{key!r}] must have shape {shape} for this module "
                        f"({self.height}x{self.width} texture, n_tex={self.n_tex}), got {got}"
                    )
            if index is None:
                index = self._gather_index(mean.device)
            means.append(mean[0, 0, index])
            bases.append(basis[0, index])
        state_dict[f"{prefix}gathered_mean"] = torch.cat(means)
        state_dict[f"{prefix}gathered_basis"] = torch.cat(bases)

    def _tables(self):
        """(mean (M,), basis (M, n_tex)) in output order: M = 3*256*256 per part."""
        if self.compact:
            return self.gathered_mean, self.gathered_basis
        tables = self._derived()
        return tables["_gathered_mean"], tables["_gathered_basis"]

    def forward(self, texcode: torch.Tensor):
        """Albedo images (B, 3, 256, 256), channels in medusa's (reversed) order; with
        specular=True the pair (diffuse, specular), views into one (B, 2, 3, 256, 256)
        result."""
        check_tensor("texcode", texcode, shape=(None, self.n_tex), floating=True)
        mean, basis = self._tables()
        if texcode.dtype != mean.dtype:
            raise TypeError(f"texcode has dtype {texcode.dtype} but the model is {mean.dtype}")
        if texcode.device != mean.device:
            raise ValueError(f"texcode is on {texcode.device} but the model is on {mean.device}")
        path = _backend.resolve(self.backend, texcode.device.type, "FlameTex")
        batch = texcode.shape[0]
        if path == "medusa":
            outs = tuple(
                medusa_baseline.texture(
                    getattr(self, f"{p}_mean"), getattr(self, f"{p}_basis").to(mean.dtype),
                    texcode, self.height, self.width)
                for p in self._parts()
            )
            return outs if self.specular else outs[0]
        if basis.dtype in half_blend.HALF_DTYPES and path == "reference":
            out = half_blend.half_blend_unchecked(mean, basis, texcode)
        else:
            out = _backend.steps(path).blend(mean, basis, texcode)
        if not self.specular:
            return out.view(batch, 3, TEXTURE_SIZE, TEXTURE_SIZE)
        out = out.view(batch, 2, 3, TEXTURE_SIZE, TEXTURE_SIZE)
        return out[:, 0], out[:, 1]
