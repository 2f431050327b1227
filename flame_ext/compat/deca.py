"""flame_ext.compat.deca: DECA's `FLAME` and `FLAMETex` classes on flame_ext's kernels.

Drop-ins for the classes of DECA's decalib/models/FLAME.py, which EMOCA, MICA, SMIRK and
their descendants carry in copies: the same constructors (one config object), forwards,
outputs, parameters and buffers (names, shapes, dtypes: state dicts load both ways),
computed by flame_ext's fused ops (CPU and CUDA, forward and backward,
`torch.compile(fullgraph=True)`), or by flame_ext.reference where the compiled ops are
missing. `flame_ext.compat.patch_deca()` makes decalib build these classes.

DECA's rules, kept:

- `FLAME(config)` reads `config.flame_model_path` (the FLAME pickle) and
  `config.flame_lmk_embedding_path` (landmark_embedding.npy) with flame_ext's loaders
  (restricted unpickler, validation at load time), keeps shape columns
  [:config.n_shape] and expression columns [300:300 + config.n_exp] (the model's shape
  count in place of 300 for a model that declares another), in float32.
- `FLAME.forward(shape_params, expression_params, pose_params, eye_pose_params)` ->
  `(vertices, landmarks2d, landmarks3d)`. pose_params (B, 6) is the global pose then the
  jaw pose; the neck pose is the module's `neck_pose` parameter (zeros, frozen); a
  missing eye pose (and a missing pose_params) is the module's `eye_pose` parameter
  (zeros (1, 6), frozen) expanded to the batch.
- landmarks2d (B, 68, 3): the 17 contour landmarks of the bin DECA's rule picks (the
  Rodrigues rotations of the neck chain [1, 0], R_global @ R_neck, and the positive yaw:
  flame_ext's `contour_rule='deca'`), then the 51 static ones; landmarks3d (B, 68, 3):
  the 68 landmarks of full_lmk_faces_idx / full_lmk_bary_coords. `seletec_3d68(vertices)`
  (DECA's name) is landmarks3d of given vertices.
- `FLAMETex(config)`: `config.tex_type` 'BFM' reads `config.tex_path`
  (FLAME_albedo_from_BFM.npz: MU / PC, flat or image-shaped, on the 0..1 scale, not
  divided), 'FLAME' reads `config.flame_tex_path` (FLAME_texture.npz: mean / tex_dir,
  divided by 255); keeps `config.n_tex` components; forward(texcode) is the texture
  image (B, 3, 256, 256): mean + basis . texcode as (B, H, W, 3), channels first,
  nearest-resized to 256 x 256, channels reversed. It is `flame_ext.FlameTex` (the same
  buffers texture_mean (1, 1, N) and texture_basis (1, N, n_tex)) built from DECA's
  config.

Beyond DECA (keyword-only): `backend=` ('auto', 'ext', 'reference'); inputs of batch 1
broadcast against the batch (one identity for many frames is blended once); a config may
also be a dict. Where DECA would fail later or silently (n_shape beyond the model, a
texture file of the other kind, a missing config entry) these raise at once, naming the
problem.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from typing import Optional

import numpy as np
import torch
from torch import nn

from .._checks import check_count, refuse_bad_loaded_indices
from .._derived import DerivedTables, derive_after_load, joint_dirs, joint_template
from ..decoders import FlameTex
from ..io import ModelFileError, load_flame_model, load_landmark_embedding
from . import _layer

# DECA's FLAMETex: the texture type -> the config entry naming its file, the file's
# keys, and its usual name (the file looked for when the entry names a directory).
_TEXTURES = {
    "BFM": ("tex_path", ("MU", "PC"), "FLAME_albedo_from_BFM.npz"),
    "FLAME": ("flame_tex_path", ("mean", "tex_dir"), "FLAME_texture.npz"),
}


def _config(config, name: str):
    """config.name (DECA's yacs / OmegaConf configs), or config[name] for a dict."""
    if isinstance(config, Mapping):
        if name in config:
            return config[name]
    elif hasattr(config, name):
        return getattr(config, name)
    raise ValueError(f"the config has no {name!r}: DECA's FLAME / FLAMETex read config.{name}")


def _float32(array) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


class FLAME(DerivedTables, nn.Module):
    """DECA's FLAME decoder: parameters -> (vertices, landmarks2d, landmarks3d).

    Args:
        config: an object (or dict) with flame_model_path, flame_lmk_embedding_path,
            n_shape and n_exp, as DECA's model config.
        backend: 'auto', 'ext' or 'reference' (beyond DECA).
    """

    _derived_from = {
        "joint_template": ("J_regressor", "v_template"),
        "joint_dirs": ("J_regressor", "shapedirs"),
    }
    _derived_tables = {"joint_template": ("_J_template",), "joint_dirs": ("_J_dirs",)}

    def __init__(self, config, *, backend: str = "auto"):
        super().__init__()
        self.backend = _layer.check_backend(backend)
        model = load_flame_model(_config(config, "flame_model_path"))
        embedding = load_landmark_embedding(
            "68", _config(config, "flame_lmk_embedding_path"), num_faces=model.faces.shape[0]
        )
        if model.parents.shape[0] != 5:
            raise ValueError(
                f"{model.source}: FLAME has 5 joints (global, neck, jaw, eyes), the model "
                f"has {model.parents.shape[0]}"
            )
        n_shape = check_count("config.n_shape", _config(config, "n_shape"), 0, model.n_shape)
        n_exp = check_count("config.n_exp", _config(config, "n_exp"), 0, model.n_expr)
        self.n_shape, self.n_exp = n_shape, n_exp
        self.dtype = torch.float32
        num_vertices = model.v_template.shape[0]

        columns = np.r_[0:n_shape, model.n_shape : model.n_shape + n_exp]
        self.register_buffer("faces_tensor", torch.from_numpy(model.faces))
        self.register_buffer("v_template", _float32(model.v_template))
        self.register_buffer("shapedirs", _float32(model.shapedirs[:, :, columns]))
        self.register_buffer("posedirs", _float32(model.posedirs.reshape(num_vertices * 3, -1).T))
        self.register_buffer("J_regressor", _float32(model.J_regressor))
        self.register_buffer("parents", torch.from_numpy(model.parents))
        self.register_buffer("lbs_weights", _float32(model.lbs_weights))
        self.register_parameter("eye_pose", nn.Parameter(torch.zeros(1, 6), requires_grad=False))
        self.register_parameter("neck_pose", nn.Parameter(torch.zeros(1, 3), requires_grad=False))

        self.register_buffer("lmk_faces_idx", torch.from_numpy(embedding.static_lmk_faces_idx))
        self.register_buffer("lmk_bary_coords", _float32(embedding.static_lmk_bary_coords))
        self.register_buffer(
            "dynamic_lmk_faces_idx", torch.from_numpy(embedding.dynamic_lmk_faces_idx)
        )
        self.register_buffer(
            "dynamic_lmk_bary_coords", _float32(embedding.dynamic_lmk_bary_coords)
        )
        # DECA keeps the file's leading batch axis: (1, 68) and (1, 68, 3).
        self.register_buffer(
            "full_lmk_faces_idx", torch.from_numpy(embedding.full_lmk_faces_idx)[None].clone()
        )
        self.register_buffer(
            "full_lmk_bary_coords", _float32(embedding.full_lmk_bary_coords)[None].clone()
        )
        self.register_buffer("neck_kin_chain", torch.tensor([1, 0], dtype=torch.long))
        self._start_deriving()
        self.register_load_state_dict_pre_hook(refuse_bad_loaded_indices)

    def _index_tables(self, get):
        return _layer.index_tables(self, get)

    def _compute_derived(self, groups):
        """The joint basis, derived from the buffers (again after .to() / .double() and
        load_state_dict). The blend basis is a view of shapedirs."""
        tables = {}
        if "joint_template" in groups:
            tables["_J_template"] = joint_template(self.J_regressor, self.v_template)
        if "joint_dirs" in groups:
            tables["_J_dirs"] = joint_dirs(self.J_regressor, self.shapedirs)
        return tables

    def forward(
        self,
        shape_params: Optional[torch.Tensor] = None,
        expression_params: Optional[torch.Tensor] = None,
        pose_params: Optional[torch.Tensor] = None,
        eye_pose_params: Optional[torch.Tensor] = None,
    ):
        """DECA's FLAME.forward: shape_params (B, n_shape), expression_params (B, n_exp),
        pose_params (B, 6) (global, jaw), eye_pose_params (B, 6) -> (vertices (B, V, 3),
        landmarks2d (B, 68, 3), landmarks3d (B, 68, 3))."""
        like = self.v_template
        for name, value in (("shape_params", shape_params), ("expression_params",
                                                             expression_params)):
            if value is None:
                raise TypeError(f"{name} is required: DECA's FLAME takes it as a tensor")
        values = {
            "shape_params": _layer.check_input("shape_params", shape_params, self.n_shape, like),
            "expression_params": _layer.check_input(
                "expression_params", expression_params, self.n_exp, like),
            # DECA: a missing pose is the eye pose parameter (zeros) expanded
            "pose_params": _layer.check_input(
                "pose_params", self.eye_pose if pose_params is None else pose_params, 6, like),
            "eye_pose_params": _layer.check_input(
                "eye_pose_params", self.eye_pose if eye_pose_params is None else eye_pose_params,
                6, like),
            "neck_pose": _layer.check_input("neck_pose", self.neck_pose, 3, like),
        }
        batch = _layer.batch_of(values)
        pose = values["pose_params"].expand(batch, -1)
        full_pose = torch.cat([
            pose[:, :3], values["neck_pose"].expand(batch, -1), pose[:, 3:],
            values["eye_pose_params"].expand(batch, -1),
        ], dim=1)
        k = _layer.steps(self.backend, like.device)
        num_vertices = like.shape[0]
        derived = self._derived()
        tables = _layer.Tables(like, self.shapedirs.view(3 * num_vertices, -1),
                               derived["_J_template"], derived["_J_dirs"], self.posedirs,
                               self.parents, self.lbs_weights)
        vertices, _, _ = _layer.decode(
            k, tables, values["shape_params"], values["expression_params"], batch,
            pose=full_pose.view(batch, 5, 3),
        )
        landmarks2d = k.landmarks(
            vertices, full_pose, self.faces_tensor, self.lmk_faces_idx, self.lmk_bary_coords,
            self.dynamic_lmk_faces_idx, self.dynamic_lmk_bary_coords, "deca",
        )
        return vertices, landmarks2d, self._landmarks3d(k, vertices)

    def _landmarks3d(self, k, vertices: torch.Tensor) -> torch.Tensor:
        return k.landmarks(vertices, None, self.faces_tensor, self.full_lmk_faces_idx[0],
                           self.full_lmk_bary_coords[0])

    def seletec_3d68(self, vertices: torch.Tensor) -> torch.Tensor:
        """DECA's (sic): the 68 3D landmarks (B, 68, 3) of vertices (B, V, 3)."""
        _layer.check_input("vertices", vertices, 3, self.v_template,
                           trailing=(self.v_template.shape[0], 3))
        return self._landmarks3d(_layer.steps(self.backend, vertices.device), vertices)


# The post-hook's name in layers pickled before it moved to _derived.
_rebuild_derived = derive_after_load


def _texture_file(config) -> str:
    """The texture file DECA's config names for its tex_type, checked to be that kind."""
    tex_type = _config(config, "tex_type")
    if tex_type not in _TEXTURES:
        raise ValueError(f"texture type {tex_type!r} does not exist: DECA's are 'BFM' and 'FLAME'")
    entry, keys, default_name = _TEXTURES[tex_type]
    path = os.path.expanduser(os.fspath(_config(config, entry)))
    if os.path.isdir(path):
        path = os.path.join(path, default_name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config.{entry} = {path!r} does not exist (tex_type={tex_type!r})")
    try:
        with zipfile.ZipFile(path) as archive:
            names = {name[: -len(".npy")] for name in archive.namelist() if name.endswith(".npy")}
    except (zipfile.BadZipFile, OSError):
        names = set()  # not an archive: the texture loader says what is wrong with it
    if names and not set(keys) <= names:
        kinds = [kind for kind, (_, need, _) in _TEXTURES.items() if set(need) <= names]
        hint = f" (a {kinds[0]} texture: tex_type={kinds[0]!r})" if kinds else ""
        raise ModelFileError(
            f"{path}: tex_type={tex_type!r} reads {' and '.join(keys)}, the file holds "
            f"{sorted(names)}{hint}"
        )
    return path


class FLAMETex(FlameTex):
    """DECA's FLAMETex: texcode (B, n_tex) -> albedo (B, 3, 256, 256), flame_ext.FlameTex
    built from DECA's config (tex_type, tex_path / flame_tex_path, n_tex).

    Args:
        config: an object (or dict) with tex_type and the entries above.
        backend: 'auto', 'ext' or 'reference' (beyond DECA).
    """

    def __init__(self, config, *, backend: str = "auto"):
        _layer.check_backend(backend)
        super().__init__(model_path=_texture_file(config), n_tex=_config(config, "n_tex"),
                         backend=backend)
