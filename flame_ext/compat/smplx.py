"""flame_ext.compat.smplx.FLAME: smplx's FLAME layer (`smplx.FLAME`) on flame_ext's kernels.

A drop-in for the FLAME class of PyPI's `smplx`: the same constructor, forward, output
fields, parameters and buffers (names, shapes and dtypes, so state dicts load both ways),
with the mesh, the joints and the landmarks computed by flame_ext's fused ops (CPU and
CUDA, forward and backward, `torch.compile(fullgraph=True)`), or by flame_ext.reference
where the compiled ops are missing. `flame_ext.compat.patch_smplx()` makes `smplx.FLAME`
and `smplx.create(..., model_type='flame')` build this class.

smplx's rules, kept:

- Files: `model_path` is a folder with FLAME_<GENDER>.<ext> (`ext` 'pkl' or 'npz'),
  flame_static_embedding.pkl and, with `use_face_contour`, flame_dynamic_embedding.npy.
  They are read with flame_ext's loaders: the restricted unpickler (no chumpy needed, no
  code from the file runs) and validation at load time (`flame_ext.ModelFileError`).
- Components: `num_betas` is clamped to the model's shape components (300 for FLAME),
  `num_expression_coeffs` to its expression components (100).
- Tables: the model's arrays are rounded to float32 and then converted to `dtype`, as
  smplx converts them (a float64 layer holds smplx's float64 values); the landmark
  barycentrics are converted to `dtype` directly.
- Forward: an input left out is the module's parameter of that name (created by the
  `create_*` flags, with batch `batch_size`, zeros or the initial values given); betas of
  batch 1 are expanded to the batch. `joints` is the 5 posed joints, the extra vertices
  of `vertex_joint_selector` (none for FLAME), the 51 static landmarks and, with
  `use_face_contour`, the 17 contour landmarks, in this order; then `joint_mapper`
  (when given); then `transl` is added to vertices and joints (when given, or created).
- Contour (smplx's rule, which differs from DECA's and medusa's): the bin comes from the
  Rodrigues rotation of the global orientation alone (smplx's FLAME.NECK_IDX = 0: the
  neck chain is [0]) and the negated yaw, clamped above at 39 degrees, rounded and
  binned as in DECA. With `pose2rot=False` smplx's FLAME still reads the pose as
  axis-angle vectors for the bin, so the bin comes from the first row of the global
  rotation matrix taken as an axis-angle vector: kept, for the same landmarks.
- `pose2rot=False`: each pose is a rotation matrix per sample, (B, 1, 3, 3) or (B, 1, 9)
  ((B, 3, 3) and (B, 9) too), used as given (not re-orthonormalised); `full_pose` is
  their concatenation, (B, 5, 3, 3) (or (B, 5, 9) when every part came flat).

Beyond smplx (keyword-only): `backend=` ('auto', 'ext', 'reference'); inputs of batch 1
broadcast against the batch where smplx would raise; a parameter left out under
`pose2rot=False` enters as the rotation of its axis-angle value; `model_path` may also
be a model file (the landmark files beside it) or 'synthetic' / 'synthetic-small'.
Not kept: smplx's age='kid' (an SMPL template, not FLAME's).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
import torch
from torch import nn

from .. import reference
from .._checks import check_count, check_tensor, refuse_bad_loaded_indices
from .._parametric import MAX_BATCH
from .._derived import DerivedTables, derive_after_load, joint_dirs, joint_template
from ..io import load_dynamic_embedding, load_flame_model, load_static_embedding
from . import _layer

# The parameters smplx's FLAME creates (SMPL's, then FLAME's), with their widths; the
# batch-size rows of each are zeros unless an initial value is given. body_pose is
# SMPL's (23 body joints), unused by FLAME: kept so that state dicts match.
_POSE_PARTS = ("global_orient", "neck_pose", "jaw_pose", "leye_pose", "reye_pose")
_NUM_BODY_JOINTS = 23


@dataclass
class FLAMEOutput:
    """smplx's FLAMEOutput: the fields of smplx.utils.FLAMEOutput, in its order, with its
    dict-like access (`out['joints']`, `keys()`, `values()`, `items()`, `get()`)."""

    vertices: Optional[torch.Tensor] = None
    joints: Optional[torch.Tensor] = None
    full_pose: Optional[torch.Tensor] = None
    global_orient: Optional[torch.Tensor] = None
    transl: Optional[torch.Tensor] = None
    v_shaped: Optional[torch.Tensor] = None
    betas: Optional[torch.Tensor] = None
    expression: Optional[torch.Tensor] = None
    jaw_pose: Optional[torch.Tensor] = None
    neck_pose: Optional[torch.Tensor] = None

    def __getitem__(self, key):
        return getattr(self, key)

    def get(self, key, default=None):
        return getattr(self, key, default)

    def __iter__(self):
        return self.keys()

    def keys(self):
        return iter([f.name for f in fields(self)])

    def values(self):
        return iter([getattr(self, f.name) for f in fields(self)])

    def items(self):
        return iter([(f.name, getattr(self, f.name)) for f in fields(self)])


class _VertexJointSelector(nn.Module):
    """smplx's vertex_joint_selector: extra joints read off vertices (none for FLAME)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("extra_joints_idxs", torch.zeros(0, dtype=torch.long))

    def forward(self, vertices, joints):
        if self.extra_joints_idxs.numel() == 0:
            # FLAME's case: nothing to add (and no dense zero gradient for the vertices)
            return joints
        return torch.cat([joints, vertices.index_select(1, self.extra_joints_idxs)], dim=1)


def _files(model_path, gender: str, ext: str):
    """(the model file, where the landmark files are) for smplx's model_path."""
    if isinstance(model_path, str) and model_path in ("synthetic", "synthetic-small"):
        return model_path, model_path
    if not isinstance(model_path, (str, os.PathLike)):
        raise TypeError(
            f"model_path must be a folder (str or Path), got {type(model_path).__name__}"
        )
    if ext not in ("pkl", "npz"):
        raise ValueError(f"Unknown extension: {ext}")
    path = os.path.expanduser(os.fspath(model_path))
    if os.path.isfile(path):
        return path, os.path.dirname(path) or "."
    model_file = os.path.join(path, f"FLAME_{str(gender).upper()}.{ext}")
    if not os.path.isfile(model_file):
        raise FileNotFoundError(
            f"{model_file} does not exist: smplx's FLAME reads FLAME_<GENDER>.{ext} "
            f"(gender={gender!r}) from the folder model_path"
        )
    return model_file, path


def _smplx_table(array, dtype) -> torch.Tensor:
    # smplx converts every model array to float32 first (utils.to_np), then to `dtype`.
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(dtype)


def _initial(name: str, value, width: int, dtype) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        value = value.detach().clone()
    else:
        value = torch.as_tensor(np.asarray(value))
    value = value.to(dtype)
    check_tensor(name, value, shape=(None, width))
    return value


class FLAME(DerivedTables, nn.Module):
    """smplx's FLAME layer on flame_ext's ops (see the module docstring for the rules).

    Args (smplx's): model_path, data_struct (ignored, as smplx's FLAME ignores it),
    num_expression_coeffs, create_expression / expression, create_neck_pose /
    neck_pose, create_jaw_pose / jaw_pose, create_leye_pose / leye_pose,
    create_reye_pose / reye_pose, use_face_contour, batch_size, gender, dtype, ext, and
    SMPL's create_betas / betas, num_betas, create_global_orient / global_orient,
    create_body_pose / body_pose, create_transl / transl, joint_mapper, v_template.
    Other keyword arguments are ignored, as smplx ignores them. Beyond smplx:
    backend ('auto', 'ext' or 'reference').
    """

    _derived_from = {
        "dirs": ("shapedirs", "expr_dirs"),
        "joint_template": ("J_regressor", "v_template"),
        "joint_dirs": ("J_regressor", "shapedirs", "expr_dirs"),
    }
    _derived_tables = {"dirs": ("_dirs",), "joint_template": ("_J_template",),
                       "joint_dirs": ("_J_dirs",)}

    NUM_JOINTS = 5
    NUM_BODY_JOINTS = _NUM_BODY_JOINTS
    SHAPE_SPACE_DIM = 300
    EXPRESSION_SPACE_DIM = 100
    NECK_IDX = 0

    def __init__(
        self,
        model_path,
        data_struct=None,
        num_expression_coeffs: int = 10,
        create_expression: bool = True,
        expression=None,
        create_neck_pose: bool = True,
        neck_pose=None,
        create_jaw_pose: bool = True,
        jaw_pose=None,
        create_leye_pose: bool = True,
        leye_pose=None,
        create_reye_pose: bool = True,
        reye_pose=None,
        use_face_contour: bool = False,
        batch_size: int = 1,
        gender: str = "neutral",
        dtype: torch.dtype = torch.float32,
        ext: str = "pkl",
        *,
        create_betas: bool = True,
        betas=None,
        num_betas: int = 10,
        create_global_orient: bool = True,
        global_orient=None,
        create_body_pose: bool = True,
        body_pose=None,
        create_transl: bool = True,
        transl=None,
        joint_mapper=None,
        v_template=None,
        age: str = "adult",
        backend: str = "auto",
        **kwargs,
    ):
        super().__init__()
        self.backend = _layer.check_backend(backend)
        if age != "adult":
            raise ValueError(f"age={age!r}: smplx's kid template is SMPL's; FLAME has none")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        batch_size = check_count("batch_size", batch_size, 1, MAX_BATCH)
        num_betas = check_count("num_betas", num_betas, 0, 2**31)
        num_expression_coeffs = check_count(
            "num_expression_coeffs", num_expression_coeffs, 0, 2**31
        )
        self.gender, self.age, self.dtype = gender, age, dtype
        self.batch_size = batch_size
        self.use_face_contour = bool(use_face_contour)
        self.joint_mapper = joint_mapper

        model_file, landmark_files = _files(model_path, gender, ext)
        model = load_flame_model(model_file)
        if model.parents.shape[0] != self.NUM_JOINTS:
            raise ValueError(
                f"{model.source}: FLAME has 5 joints (global, neck, jaw, eyes), the model "
                f"has {model.parents.shape[0]}"
            )
        # smplx takes min(requested, what the model holds) for both counts.
        self._num_betas = min(num_betas, model.n_shape)
        self._num_expression_coeffs = min(num_expression_coeffs, model.n_expr)
        n_shape, num_vertices = model.n_shape, model.v_template.shape[0]
        expr_columns = slice(n_shape, n_shape + self._num_expression_coeffs)

        # Registered in smplx's order, so that state dicts list the same keys in turn.
        self.faces = model.faces.astype(np.uint32)
        shape_columns = slice(0, self._num_betas)
        self.register_buffer("shapedirs", _smplx_table(model.shapedirs[:, :, shape_columns], dtype))
        self.register_buffer("faces_tensor", torch.from_numpy(model.faces))
        if v_template is None:
            template = _smplx_table(model.v_template, dtype)
        elif isinstance(v_template, torch.Tensor):
            template = v_template.detach().clone().to(dtype)
        else:
            template = _smplx_table(v_template, dtype)
        check_tensor("v_template", template, shape=(num_vertices, 3))
        self.register_buffer("v_template", template)
        self.register_buffer("J_regressor", _smplx_table(model.J_regressor, dtype))
        self.register_buffer(
            "posedirs", _smplx_table(model.posedirs.reshape(num_vertices * 3, -1).T, dtype)
        )
        self.register_buffer("parents", torch.from_numpy(model.parents))
        self.register_buffer("lbs_weights", _smplx_table(model.lbs_weights, dtype))
        self.register_buffer("expr_dirs", _smplx_table(model.shapedirs[:, :, expr_columns], dtype))

        widths = {"betas": self._num_betas, "global_orient": 3,
                  "body_pose": 3 * _NUM_BODY_JOINTS, "transl": 3, "neck_pose": 3,
                  "jaw_pose": 3, "leye_pose": 3, "reye_pose": 3,
                  "expression": self._num_expression_coeffs}
        created = {"betas": (create_betas, betas),
                   "global_orient": (create_global_orient, global_orient),
                   "body_pose": (create_body_pose, body_pose),
                   "transl": (create_transl, transl),
                   "neck_pose": (create_neck_pose, neck_pose),
                   "jaw_pose": (create_jaw_pose, jaw_pose),
                   "leye_pose": (create_leye_pose, leye_pose),
                   "reye_pose": (create_reye_pose, reye_pose),
                   "expression": (create_expression, expression)}
        for name, (create, value) in created.items():
            if not create:
                continue
            width = widths[name]
            if value is None:
                value = torch.zeros(batch_size, width, dtype=dtype)
            else:
                value = _initial(name, value, width, dtype)
            self.register_parameter(name, nn.Parameter(value, requires_grad=True))

        num_faces = model.faces.shape[0]
        static = load_static_embedding(landmark_files, num_faces=num_faces)
        self.register_buffer("lmk_faces_idx", torch.from_numpy(static.lmk_faces_idx))
        self.register_buffer("lmk_bary_coords", torch.from_numpy(static.lmk_bary_coords).to(dtype))
        if self.use_face_contour:
            dynamic = load_dynamic_embedding(landmark_files, num_faces=num_faces)
            self.register_buffer("dynamic_lmk_faces_idx", torch.from_numpy(dynamic.lmk_faces_idx))
            self.register_buffer(
                "dynamic_lmk_bary_coords", torch.from_numpy(dynamic.lmk_bary_coords).to(dtype)
            )
            self.register_buffer("neck_kin_chain", torch.tensor([self.NECK_IDX], dtype=torch.long))
        self.vertex_joint_selector = _VertexJointSelector()
        self._start_deriving()
        self.register_load_state_dict_pre_hook(refuse_bad_loaded_indices)

    def _index_tables(self, get):
        return _layer.index_tables(self, get)

    # ----------------------------------------------------------------------------------
    # smplx's attributes and helpers

    @property
    def num_betas(self) -> int:
        return self._num_betas

    @property
    def num_expression_coeffs(self) -> int:
        return self._num_expression_coeffs

    def name(self) -> str:
        return "FLAME"

    def get_num_verts(self) -> int:
        return self.v_template.shape[0]

    def get_num_faces(self) -> int:
        return self.faces.shape[0]

    def extra_repr(self) -> str:
        return "\n".join([
            f"Gender: {str(self.gender).upper()}",
            f"Number of joints: {self.J_regressor.shape[0]}",
            f"Betas: {self.num_betas}",
            f"Number of Expression Coefficients: {self.num_expression_coeffs}",
            f"Use face contour: {self.use_face_contour}",
        ])

    @torch.no_grad()
    def reset_params(self, **params_dict) -> None:
        """smplx's: the named parameters set to the given values, every other one zeroed."""
        for param_name, param in self.named_parameters():
            if param_name in params_dict:
                param[:] = torch.as_tensor(params_dict[param_name])
            else:
                param.fill_(0)

    # ----------------------------------------------------------------------------------
    # The tables the ops read

    def _compute_derived(self, groups):
        """The (3V, K) blend basis [shapedirs | expr_dirs] and the joint basis, derived
        from the buffers (again after .to() / .double() and load_state_dict)."""
        tables = {}
        if "dirs" in groups or "joint_dirs" in groups:
            dirs = torch.cat([self.shapedirs, self.expr_dirs], dim=2)
        if "dirs" in groups:
            tables["_dirs"] = dirs.reshape(-1, dirs.shape[2])
        if "joint_template" in groups:
            tables["_J_template"] = joint_template(self.J_regressor, self.v_template)
        if "joint_dirs" in groups:
            tables["_J_dirs"] = joint_dirs(self.J_regressor, dirs)
        return tables

    def _tables(self) -> _layer.Tables:
        # smplx keeps the betas' and the expression's columns apart already.
        derived = self._derived()
        num_rows = 3 * self.v_template.shape[0]
        return _layer.Tables(self.v_template, derived["_dirs"], derived["_J_template"],
                             derived["_J_dirs"], self.posedirs, self.parents, self.lbs_weights,
                             self.shapedirs.reshape(num_rows, -1),
                             self.expr_dirs.reshape(num_rows, -1))

    # ----------------------------------------------------------------------------------
    # Forward

    def _value(self, name: str, value, width: int):
        """The input, or the module's parameter of that name when it is left out."""
        if value is None:
            value = getattr(self, name, None)
            if value is None:
                raise ValueError(
                    f"{name} was not given and the module has no {name} parameter "
                    f"(built with create_{name}=False): pass {name}=..."
                )
        return _layer.check_input(name, value, width, self.v_template)

    def _rotation(self, name: str, value) -> torch.Tensor:
        """A pose part for pose2rot=False as (N, 3, 3): a given matrix as it is, a left-out
        part as the rotation of the module's axis-angle parameter."""
        if value is None:
            return reference.rodrigues(self._value(name, None, 3))
        check_tensor(name, value, floating=True)
        if value.dim() == 4 and value.shape[1:] == (1, 3, 3):
            value = value[:, 0]
        elif value.dim() == 3 and value.shape[1:] == (1, 9):
            value = value[:, 0]
        if value.dim() == 2 and value.shape[1] == 9:
            value = value.unflatten(1, (3, 3))
        return _layer.check_input(name, value, 3, self.v_template, trailing=(3, 3))

    def forward(
        self,
        betas: Optional[torch.Tensor] = None,
        global_orient: Optional[torch.Tensor] = None,
        neck_pose: Optional[torch.Tensor] = None,
        transl: Optional[torch.Tensor] = None,
        expression: Optional[torch.Tensor] = None,
        jaw_pose: Optional[torch.Tensor] = None,
        leye_pose: Optional[torch.Tensor] = None,
        reye_pose: Optional[torch.Tensor] = None,
        return_verts: bool = True,
        return_full_pose: bool = False,
        pose2rot: bool = True,
        **kwargs,
    ) -> FLAMEOutput:
        """smplx's FLAME.forward: returns a FLAMEOutput (vertices (B, V, 3), joints
        (B, 5 + 51 (+ 17), 3), full_pose with return_full_pose, and the parameters used).
        Other keyword arguments are ignored, as smplx ignores them."""
        given = {"global_orient": global_orient, "neck_pose": neck_pose, "jaw_pose": jaw_pose,
                 "leye_pose": leye_pose, "reye_pose": reye_pose}
        betas = self._value("betas", betas, self.num_betas)
        expression = self._value("expression", expression, self.num_expression_coeffs)
        if pose2rot:
            parts = {name: self._value(name, given[name], 3) for name in _POSE_PARTS}
        else:
            parts = {name: self._rotation(name, given[name]) for name in _POSE_PARTS}
        apply_trans = transl is not None or getattr(self, "transl", None) is not None
        values = dict(parts, betas=betas, expression=expression)
        if apply_trans:
            transl = values["transl"] = self._value("transl", transl, 3)
        batch = _layer.batch_of(values)

        k = _layer.steps(self.backend, self.v_template.device)
        if pose2rot:
            full_pose = torch.cat([parts[n].expand(batch, -1) for n in _POSE_PARTS], dim=1)
            v, transforms, joints = _layer.decode(
                k, self._tables(), betas, expression, batch,
                pose=full_pose.view(batch, self.NUM_JOINTS, 3), need_joints=True,
            )
            contour_pose = full_pose[:, :3]
        else:
            rotations = torch.stack([parts[n].expand(batch, -1, -1) for n in _POSE_PARTS], 1)
            v, transforms, joints = _layer.decode(
                k, self._tables(), betas, expression, batch, rotations=rotations,
                need_joints=True,
            )
            # smplx's FLAME reads the flattened matrices three numbers at a time as
            # axis-angle vectors for the bin: the first row of the global rotation.
            contour_pose = rotations[:, 0, 0]
            flat = all(given[n] is not None and given[n].shape[-1] == 9 for n in _POSE_PARTS)
            full_pose = rotations.flatten(2) if flat else rotations

        fused = None
        if self.joint_mapper is None and self.vertex_joint_selector.extra_joints_idxs.numel() == 0:
            fused = _layer.posed_outputs(k, v, transforms, joints, transl if apply_trans else None,
                                         *self._landmark_tables(v, contour_pose))
        if fused is not None:
            joints, v = fused
        else:
            joints = self.vertex_joint_selector(v, _layer.posed_joints(transforms, joints))
            joints = torch.cat([joints, self._landmarks(k, v, contour_pose)], dim=1)
            if self.joint_mapper is not None:
                joints = self.joint_mapper(joints=joints, vertices=v)
            if apply_trans:
                joints = _layer.translate(joints, transl)
                v = _layer.translate(v, transl)
        if betas.shape[0] == 1 and batch > 1:
            betas = betas.expand(batch, -1)  # smplx reports the betas expanded
        return FLAMEOutput(
            vertices=v if return_verts else None,
            joints=joints,
            betas=betas,
            expression=expression,
            global_orient=self._reported("global_orient", given),
            neck_pose=self._reported("neck_pose", given),
            jaw_pose=self._reported("jaw_pose", given),
            full_pose=full_pose if return_full_pose else None,
        )

    def _reported(self, name: str, given: dict):
        """What smplx's output holds for a pose part: the input, else the parameter."""
        return given[name] if given[name] is not None else getattr(self, name, None)

    def _landmark_tables(self, v: torch.Tensor, contour_pose: torch.Tensor) -> tuple:
        """The landmark op's (poses, tris, lmk_faces_idx, lmk_bary_coords[, dynamic tables,
        'deca']) for the 51 static landmarks and (use_face_contour) the 17 contour ones."""
        static = (self.faces_tensor, self.lmk_faces_idx, self.lmk_bary_coords)
        if not self.use_face_contour:
            return (None,) + static
        # The landmark op's 'deca' rule reads the yaw of R(global) @ R(neck) positively;
        # smplx's reads the negated yaw of R(global) alone. Conjugating by the reflection
        # M = diag(-1, 1, 1) negates the yaw (yaw(M R M) = -yaw(R)) and is itself a
        # rotation of the reflected axis: M R(w) M = R(w0, -w1, -w2). A zero neck is
        # exactly the identity (the op reads the global and neck poses only).
        reflected = contour_pose.detach() * contour_pose.new_tensor([1.0, -1.0, -1.0])
        poses = torch.cat([reflected, reflected.new_zeros(v.shape[0], 3)], dim=1)
        return (poses,) + static + (self.dynamic_lmk_faces_idx,
                                    self.dynamic_lmk_bary_coords, "deca")

    def _landmarks(self, k, v: torch.Tensor, contour_pose: torch.Tensor) -> torch.Tensor:
        """The 51 static landmarks, then (use_face_contour) the 17 contour ones."""
        poses, *tables = self._landmark_tables(v, contour_pose)
        lmk = k.landmarks(v, poses, *tables)
        if not self.use_face_contour:
            return lmk
        n_contour = self.dynamic_lmk_faces_idx.shape[1]
        return torch.cat([lmk[:, n_contour:], lmk[:, :n_contour]], dim=1)

    def forward_shape(self, betas: Optional[torch.Tensor] = None) -> FLAMEOutput:
        """smplx's forward_shape: the shaped template v_template + shapedirs . betas (no
        expression, no pose) as vertices and v_shaped."""
        betas = self._value("betas", betas, self.num_betas)
        k = _layer.steps(self.backend, self.v_template.device)
        num_vertices = self.v_template.shape[0]
        v_shaped = k.blend(self.v_template.reshape(-1),
                           self.shapedirs.reshape(3 * num_vertices, -1), betas)
        v_shaped = v_shaped.view(betas.shape[0], num_vertices, 3)
        return FLAMEOutput(vertices=v_shaped, betas=betas, v_shaped=v_shaped)


# The post-hook's name in layers pickled before it moved to _derived.
_rebuild_derived = derive_after_load
