"""The validated contents of FLAME's files: one frozen dataclass per file kind.

`FlameModel`, `LandmarkEmbedding68`, `MediapipeEmbedding`, smplx's
`StaticLandmarkEmbedding` / `DynamicLandmarkEmbedding` and `TextureSpace` hold plain
numpy arrays and check their own consistency on construction (every array agrees on V,
F, the joint count, the component counts; indices in range; values finite), whether they
come from a file or from the in-memory synthetic assets. Every error names the source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .errors import _fail, _fail_type

# The largest float32: model values beyond it would become inf in the float32 decoders.
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# Rows of the contour table of landmark_embedding.npy: medusa's and DECA's yaw-bin rules
# map every pose to a bin in 0..78, so a table of any other size does not fit them.
_NUM_YAW_BINS = 79
_NUM_LMK68 = 68  # points of the iBUG-68 set: static + contour, and the full set


def _expect_array(source: str, name: str, value, dtype, ndim: int) -> None:
    if not isinstance(value, np.ndarray):
        raise _fail_type(source, f"{name} must be a numpy array, got {type(value).__name__}")
    if value.dtype != dtype:
        raise _fail_type(source, f"{name} must have dtype {np.dtype(dtype)}, got {value.dtype}")
    if value.ndim != ndim:
        raise _fail(source, f"{name} must have {ndim} dimensions, got shape {value.shape}")


def _expect_shape(source: str, name: str, value: np.ndarray, expected, label: str) -> None:
    """`expected` entries that are None match any size; `label` names the sizes."""
    ok = len(expected) == value.ndim and all(
        want is None or want == got for want, got in zip(expected, value.shape)
    )
    if not ok:
        sizes = "(" + ", ".join("*" if s is None else str(s) for s in expected) + ")"
        raise _fail(source, f"{name} must have shape {label} = {sizes}, got {value.shape}")


def _expect_finite(source: str, name: str, value: np.ndarray) -> None:
    finite = np.isfinite(value)
    if not finite.all():
        bad = value.size - int(np.count_nonzero(finite))
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise _fail(source, f"{name} holds {bad} non-finite values (NaN or inf), first at {first}")
    # The decoders compute in float32 by default, where these would be inf.
    huge = np.abs(value) > _FLOAT32_MAX
    if huge.any():
        first = tuple(int(i) for i in np.argwhere(huge)[0])
        raise _fail(
            source,
            f"{name} holds {int(np.count_nonzero(huge))} values beyond the float32 range "
            f"(|x| > {_FLOAT32_MAX:.4g}), first {value[first]!r} at {first}",
        )


def _expect_indices(source: str, name: str, value: np.ndarray, upper: Optional[int], what: str):
    if value.size == 0:
        return
    low, high = int(value.min()), int(value.max())
    if low < 0:
        raise _fail(source, f"{name} holds a negative index ({low})")
    if upper is not None and high >= upper:
        raise _fail(source, f"{name} holds index {high}, but there are only {upper} {what}")


def _expect_int(source: str, name: str, value, low: int, high: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise _fail_type(source, f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise _fail(source, f"{name} must be in [{low}, {high}], got {value}")
    return int(value)


@dataclass(frozen=True, eq=False)
class FlameModel:
    """The FLAME model arrays, validated: every array agrees on V, F and the joint count J."""

    faces: np.ndarray  # (F, 3) int64, 0 <= faces < V
    v_template: np.ndarray  # (V, 3) float64
    shapedirs: np.ndarray  # (V, 3, S + E) float64, the S shape columns first
    n_shape: int  # S
    posedirs: np.ndarray  # (V, 3, 9 * (J - 1)) float64
    J_regressor: np.ndarray  # (J, V) float64, dense
    parents: np.ndarray  # (J,) int64, parents[0] = -1, 0 <= parents[j] < j
    lbs_weights: np.ndarray  # (V, J) float64
    source: str  # the file, or 'synthetic:full' / 'synthetic:small'

    @property
    def n_expr(self) -> int:
        return self.shapedirs.shape[2] - self.n_shape

    def __post_init__(self):
        src = self.source
        _expect_array(src, "v_template", self.v_template, np.float64, 2)
        V = self.v_template.shape[0]
        _expect_shape(src, "v_template", self.v_template, (V, 3), "(V, 3)")
        if V == 0:
            raise _fail(src, "v_template has no vertices")
        _expect_array(src, "faces (f)", self.faces, np.int64, 2)
        _expect_shape(src, "faces (f)", self.faces, (None, 3), "(F, 3)")
        if self.faces.shape[0] == 0:
            raise _fail(src, "faces (f) has no faces")
        _expect_indices(src, "faces (f)", self.faces, V, "vertices in v_template")
        _expect_array(src, "shapedirs", self.shapedirs, np.float64, 3)
        _expect_shape(src, "shapedirs", self.shapedirs, (V, 3, None), "(V, 3, K)")
        _expect_int(src, "n_shape", self.n_shape, 0, self.shapedirs.shape[2])
        _expect_array(src, "parents (kintree_table)", self.parents, np.int64, 1)
        J = self.parents.shape[0]
        if J == 0:
            raise _fail(src, "the kinematic tree (kintree_table) has no joints")
        if self.parents[0] != -1:
            raise _fail(src, f"the root joint's parent must be -1, got {self.parents[0]}")
        children = np.arange(1, J)
        bad = np.flatnonzero((self.parents[1:] < 0) | (self.parents[1:] >= children))
        if bad.size:
            j = int(children[bad[0]])
            raise _fail(
                src,
                f"joint {j} has parent {self.parents[j]}; parents must come before their "
                "children (0 <= parent < joint)",
            )
        _expect_array(src, "posedirs", self.posedirs, np.float64, 3)
        _expect_shape(src, "posedirs", self.posedirs, (V, 3, 9 * (J - 1)), "(V, 3, 9*(J-1))")
        _expect_array(src, "J_regressor", self.J_regressor, np.float64, 2)
        _expect_shape(src, "J_regressor", self.J_regressor, (J, V), "(J, V)")
        _expect_array(src, "lbs_weights (weights)", self.lbs_weights, np.float64, 2)
        _expect_shape(src, "lbs_weights (weights)", self.lbs_weights, (V, J), "(V, J)")
        for name in ("v_template", "shapedirs", "posedirs", "J_regressor", "lbs_weights"):
            _expect_finite(src, name, getattr(self, name))


def _check_embedding(src: str, prefix: str, faces: np.ndarray, bary: np.ndarray, ndim: int):
    _expect_array(src, f"{prefix}_faces_idx", faces, np.int64, ndim)
    _expect_array(src, f"{prefix}_bary_coords", bary, np.float64, ndim + 1)
    _expect_shape(
        src, f"{prefix}_bary_coords", bary, faces.shape + (3,), f"{prefix}_faces_idx.shape + (3,)"
    )
    _expect_indices(src, f"{prefix}_faces_idx", faces, None, "faces")
    _expect_finite(src, f"{prefix}_bary_coords", bary)


@dataclass(frozen=True, eq=False)
class LandmarkEmbedding68:
    """iBUG-68 landmark embedding: static points, contour points per yaw bin, full 68 set."""

    static_lmk_faces_idx: np.ndarray  # (L,) int64
    static_lmk_bary_coords: np.ndarray  # (L, 3) float64
    dynamic_lmk_faces_idx: np.ndarray  # (79, Ld) int64: one row per yaw bin
    dynamic_lmk_bary_coords: np.ndarray  # (79, Ld, 3) float64
    full_lmk_faces_idx: np.ndarray  # (68,) int64
    full_lmk_bary_coords: np.ndarray  # (68, 3) float64
    source: str

    def __post_init__(self):
        for prefix, ndim in (("static_lmk", 1), ("dynamic_lmk", 2), ("full_lmk", 1)):
            faces = getattr(self, f"{prefix}_faces_idx")
            bary = getattr(self, f"{prefix}_bary_coords")
            _check_embedding(self.source, prefix, faces, bary, ndim)
        static, contour = self.static_lmk_faces_idx.shape[0], self.dynamic_lmk_faces_idx.shape[1]
        if static + contour != _NUM_LMK68:
            raise _fail(
                self.source,
                f"static_lmk_faces_idx has {static} points and dynamic_lmk_faces_idx {contour} "
                f"contour points per bin: {static + contour} landmarks, not the {_NUM_LMK68} "
                "of the iBUG-68 set",
            )
        full = self.full_lmk_faces_idx.shape[0]
        if full != _NUM_LMK68:
            raise _fail(
                self.source,
                f"full_lmk_faces_idx has {full} points, not the {_NUM_LMK68} of the iBUG-68 set",
            )
        bins = self.dynamic_lmk_faces_idx.shape[0]
        if bins != _NUM_YAW_BINS:
            raise _fail(
                self.source,
                f"the contour table dynamic_lmk_faces_idx has {bins} yaw bins (shape "
                f"{self.dynamic_lmk_faces_idx.shape}); it must have {_NUM_YAW_BINS}, one per "
                f"bin 0..{_NUM_YAW_BINS - 1} of the contour-bin rules",
            )

    def max_face_index(self) -> int:
        arrays = (self.static_lmk_faces_idx, self.dynamic_lmk_faces_idx, self.full_lmk_faces_idx)
        return max((int(a.max()) for a in arrays if a.size), default=-1)


@dataclass(frozen=True, eq=False)
class MediapipeEmbedding:
    """MediaPipe landmark embedding: one face and barycentric weights per landmark."""

    lmk_faces_idx: np.ndarray  # (L,) int64 (file: lmk_face_idx)
    lmk_bary_coords: np.ndarray  # (L, 3) float64 (file: lmk_b_coords)
    landmark_indices: np.ndarray  # (L,) int64: the MediaPipe point each landmark is
    source: str

    def __post_init__(self):
        _check_embedding(self.source, "lmk", self.lmk_faces_idx, self.lmk_bary_coords, 1)
        _expect_array(self.source, "landmark_indices", self.landmark_indices, np.int64, 1)
        _expect_shape(
            self.source, "landmark_indices", self.landmark_indices,
            self.lmk_faces_idx.shape, "(L,) like lmk_faces_idx",
        )
        _expect_indices(self.source, "landmark_indices", self.landmark_indices, None, "")

    def max_face_index(self) -> int:
        return int(self.lmk_faces_idx.max()) if self.lmk_faces_idx.size else -1


@dataclass(frozen=True, eq=False)
class StaticLandmarkEmbedding:
    """smplx's flame_static_embedding.pkl: one face and barycentric weights per landmark
    (the 51 static iBUG points, in smplx's order)."""

    lmk_faces_idx: np.ndarray  # (L,) int64 (file: lmk_face_idx)
    lmk_bary_coords: np.ndarray  # (L, 3) float64 (file: lmk_b_coords)
    source: str

    def __post_init__(self):
        _check_embedding(self.source, "lmk", self.lmk_faces_idx, self.lmk_bary_coords, 1)

    def max_face_index(self) -> int:
        return int(self.lmk_faces_idx.max()) if self.lmk_faces_idx.size else -1


@dataclass(frozen=True, eq=False)
class DynamicLandmarkEmbedding:
    """smplx's flame_dynamic_embedding.npy: the contour landmarks of each yaw bin."""

    lmk_faces_idx: np.ndarray  # (79, Ld) int64 (file: lmk_face_idx)
    lmk_bary_coords: np.ndarray  # (79, Ld, 3) float64 (file: lmk_b_coords)
    source: str

    def __post_init__(self):
        _check_embedding(self.source, "lmk", self.lmk_faces_idx, self.lmk_bary_coords, 2)
        bins = self.lmk_faces_idx.shape[0]
        if bins != _NUM_YAW_BINS:
            raise _fail(
                self.source,
                f"the contour table lmk_face_idx has {bins} yaw bins (shape "
                f"{self.lmk_faces_idx.shape}); it must have {_NUM_YAW_BINS}, one per bin "
                f"0..{_NUM_YAW_BINS - 1} of the contour-bin rule",
            )

    def max_face_index(self) -> int:
        return int(self.lmk_faces_idx.max()) if self.lmk_faces_idx.size else -1


@dataclass(frozen=True, eq=False)
class TextureSpace:
    """Linear albedo model, flat in (h, w, c) order, values on the 0..1 scale."""

    mean: np.ndarray  # (H*W*3,) float32
    basis: np.ndarray  # (H*W*3, n_tex) float32
    height: int
    width: int
    source: str
    # AlbedoMM's specular part (specMU / specPC), same layout and n_tex; None when it was
    # not asked for or the file has none
    specular_mean: Optional[np.ndarray] = None  # (H*W*3,) float32
    specular_basis: Optional[np.ndarray] = None  # (H*W*3, n_tex) float32

    @property
    def n_tex(self) -> int:
        return self.basis.shape[1]

    def __post_init__(self):
        src = self.source
        for name in ("height", "width"):
            _expect_int(src, name, getattr(self, name), 1, 1 << 20)
        n = self.height * self.width * 3
        _expect_array(src, "mean", self.mean, np.float32, 1)
        _expect_shape(src, "mean", self.mean, (n,), "(H*W*3,)")
        _expect_array(src, "basis", self.basis, np.float32, 2)
        _expect_shape(src, "basis", self.basis, (n, None), "(H*W*3, n_tex)")
        _expect_finite(src, "mean", self.mean)
        _expect_finite(src, "basis", self.basis)
        if (self.specular_mean is None) != (self.specular_basis is None):
            raise _fail(src, "specular_mean and specular_basis come together or not at all")
        if self.specular_mean is not None:
            _expect_array(src, "specular_mean", self.specular_mean, np.float32, 1)
            _expect_shape(src, "specular_mean", self.specular_mean, (n,), "(H*W*3,)")
            _expect_array(src, "specular_basis", self.specular_basis, np.float32, 2)
            _expect_shape(src, "specular_basis", self.specular_basis, self.basis.shape,
                          "(H*W*3, n_tex), as basis")
            _expect_finite(src, "specular_mean", self.specular_mean)
            _expect_finite(src, "specular_basis", self.specular_basis)
