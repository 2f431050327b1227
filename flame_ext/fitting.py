"""FlameShapeLandmark: FLAME parameters straight to landmarks, the decoder of fitting loops.

Landmark fitting (Adam over shape, expression and pose until the model's 68 or 105
landmarks match detected ones, per video frame, hundreds of iterations) is the heaviest use
of the decoders. FlameShape followed by FlameLandmark evaluates all V vertices (medusa also
all V 4x4 transforms) to read the few hundred that the landmark faces touch. This module
runs FlameShape's pipeline on those vertices only:

- once per model: U, the sorted union of the corners of every landmark face (for the
  68-point set the faces of all contour bins, since the bin is picked per sample at run
  time); the rows of v_template, shape_dirs, pose_dirs and lbs_weights for U; the
  landmark faces renumbered into U. The joints still come from the whole mesh, through
  the joint basis J_regressor . [v_template | shape_dirs] that FlameShape precomputes.
- per call: blend (joints) -> rigid_transforms -> blend with pose correctives (U) ->
  skin (U, no per-vertex transforms) -> landmarks (contour bin fused), through the step
  functions of the decoders' paths (`flame_ext._backend.steps`), so the compiled CPU and
  CUDA ops and the pure-PyTorch reference serve it unchanged.

Every landmark is the same arithmetic as in FlameShape + FlameLandmark on a subset of the
rows, so values and gradients agree to rounding. On the full-size synthetic model |U| is
536 of the 5023 vertices for the 68-point set (all contour bins), 194 for its 3D variant
and 263 for MediaPipe's 105 points.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import _backend
from ._derived import DerivedTables, joint_dirs, joint_template
from ._parametric import INPUT_NAMES, POSE_NAMES, ParametricDecoder
from .decoders import DEVICE, FlameLandmark, FlameShape

# medusa's algorithm computes the whole mesh: there is no 'medusa' landmark-only path.
BACKENDS = ("auto", "ext", "reference")


class FlameShapeLandmark(DerivedTables, ParametricDecoder):
    """FLAME parameters to landmarks: FlameShape followed by FlameLandmark, fused.

    Computes ``FlameLandmark(lm_type, lm_dim)(FlameShape(n_shape, n_expr)(**inputs)[0],
    poses)`` with ``poses`` the full pose of the same inputs, evaluating blend shapes,
    pose correctives and skinning only on the vertices of the landmark faces. Values
    and gradients are FlameShape + FlameLandmark's.

    Args:
        n_shape, n_expr, parameters, device, model_path, **init_parameters: as
            FlameShape. The parameters ``shape``, ``expr``, ``global_pose``,
            ``neck_pose``, ``jaw_pose``, ``eye_pose`` (batch 1, zeros unless given) are
            the module's; ``parameters`` names the trainable ones (``self.parameters_``).
        lm_type, lm_dim, contour_rule: as FlameLandmark ('68' or 'mp'; '2d' or '3d';
            'medusa' or 'deca').
        backend: 'auto' (compiled ops when loaded, else the reference with one warning),
            'ext' or 'reference'.

    ``forward(batch_size=None, **inputs)`` takes FlameShape's inputs with FlameShape's
    rules (a shape of batch 1 is one identity for the whole batch, blended once) and
    returns the landmarks (B, L, 3), contour points first for '68' / '2d'.

    The state_dict holds the six parameters only, under FlameShape's names: the model
    tables are derived from the model files (non-persistent buffers), so a fit saved from
    here loads into a FlameShape with ``strict=False`` and back. The tables are copies
    taken at construction; the joint basis among them comes from the whole mesh, so a
    write to this module's own ``v_template`` or ``shape_dirs`` (read at the next call)
    moves the landmark vertices, not the joints.
    """

    def __init__(
        self,
        n_shape: int = 300,
        n_expr: int = 100,
        lm_type: str = "68",
        lm_dim: str = "2d",
        parameters=None,
        device=DEVICE,
        *,
        model_path=None,
        contour_rule: str = "medusa",
        backend: str = "auto",
        **init_parameters,
    ):
        super().__init__()
        self.backend = _check_fit_backend(backend)
        # Built on the CPU in float32 exactly as the decoders build themselves, so that the
        # argument checks, the column selection and the rounding of every table are
        # theirs; only the subset and the parameters are kept.
        landmark = FlameLandmark(
            lm_type, lm_dim, "cpu", model_path=model_path, contour_rule=contour_rule,
            backend="reference",
        )
        shape = FlameShape(
            n_shape, n_expr, parameters, "cpu", model_path=model_path, transforms="none",
            backend="reference", **init_parameters,
        )
        self._adopt(shape, landmark)
        self.to(device)
        self._start_deriving()  # on the device: once

    @classmethod
    def from_decoders(
        cls, shape: FlameShape, landmark: FlameLandmark, *, backend: str = "auto"
    ) -> "FlameShapeLandmark":
        """The landmark path of an existing FlameShape and FlameLandmark pair.

        The tables come from their buffers (so a FlameShape loaded from a state_dict, or
        converted to float64, is reproduced exactly), on ``shape``'s device and dtype. The
        parameters are SHARED with ``shape``: an optimizer over ``shape.parameters()``
        fits through this module's forward, and ``shape`` then decodes the fitted mesh.
        Move or convert the two modules together.
        """
        if not isinstance(shape, FlameShape):
            raise TypeError(f"shape must be a FlameShape, got {type(shape).__name__}")
        if not isinstance(landmark, FlameLandmark):
            raise TypeError(f"landmark must be a FlameLandmark, got {type(landmark).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.backend = _check_fit_backend(backend)
        self._adopt(shape, landmark)
        self._start_deriving()
        return self

    def _adopt(self, shape: FlameShape, landmark: FlameLandmark) -> None:
        """Derives the landmark-vertex tables from the two decoders, takes their parameters.

        The tables are copies without a graph, even of a table that requires grad there:
        they are this module's constants (make one require grad here to fit it)."""
        with torch.no_grad():
            self._adopt_tables(shape, landmark)
        self.parameters_ = list(shape.parameters_)
        for name in INPUT_NAMES:
            setattr(self, name, getattr(shape, name))

    def _adopt_tables(self, shape: FlameShape, landmark: FlameLandmark) -> None:
        num_vertices = shape.v_template.shape[0]
        device, dtype = shape.v_template.device, shape.v_template.dtype
        if landmark.num_vertices != num_vertices or not torch.equal(
            landmark.tris.cpu(), shape.tris.cpu()
        ):
            raise ValueError(
                "shape and landmark were built on different FLAME models: shape has "
                f"{num_vertices} vertices and {shape.tris.shape[0]} faces, landmark "
                f"{landmark.num_vertices} vertices and {landmark.tris.shape[0]} faces"
            )
        self.n_shape, self.n_expr = shape.n_shape, shape.n_expr
        self.lm_type, self.lm_dim = landmark.lm_type, landmark.lm_dim
        self.contour_rule = landmark.contour_rule
        self.num_vertices = num_vertices
        # _decode's option: skinning writes no per-vertex transforms.
        self.transforms = "none"

        # Landmark faces, static then contour, renumbered: the landmark op then runs on
        # the subset exactly as on the mesh.
        static_faces = landmark.lmk_faces_idx.to(device)
        faces = static_faces
        if self._dynamic:
            dynamic_faces = landmark.dynamic_lmk_faces_idx.to(device)
            faces = torch.cat([static_faces, dynamic_faces.reshape(-1)])
        lmk_faces, face_slot = torch.unique(faces, return_inverse=True)
        vertex_idx, lmk_tris = torch.unique(
            shape.tris.index_select(0, lmk_faces), return_inverse=True
        )
        self.register_buffer("lmk_vertex_idx", vertex_idx, persistent=False)
        self.register_buffer("tris", lmk_tris, persistent=False)
        n_static = static_faces.shape[0]
        self.register_buffer("lmk_faces_idx", face_slot[:n_static], persistent=False)
        self.register_buffer(
            "lmk_bary_coords", landmark.lmk_bary_coords.to(device, dtype), persistent=False
        )
        if self._dynamic:
            self.register_buffer(
                "dynamic_lmk_faces_idx",
                face_slot[n_static:].view(dynamic_faces.shape),
                persistent=False,
            )
            self.register_buffer(
                "dynamic_lmk_bary_coords",
                landmark.dynamic_lmk_bary_coords.to(device, dtype),
                persistent=False,
            )
        if landmark.lm_type == "mp":
            self.register_buffer(
                "landmark_indices", landmark.landmark_indices.to(device), persistent=False
            )

        # FlameShape's tables, rows of U only (pose_dirs: the x, y, z columns of U).
        xyz = (3 * vertex_idx[:, None] + torch.arange(3, device=device)).reshape(-1)
        self.register_buffer("v_template", shape.v_template[vertex_idx], persistent=False)
        self.register_buffer("shape_dirs", shape.shape_dirs[vertex_idx], persistent=False)
        self.register_buffer("pose_dirs", shape.pose_dirs[:, xyz], persistent=False)
        self.register_buffer("lbs_weights", shape.lbs_weights[vertex_idx], persistent=False)
        self.register_buffer("parents", shape.parents.clone(), persistent=False)

        # The joints need the whole mesh: keep FlameShape's joint basis, computed as it
        # computes it (float64, from its buffers). Kept in float64 beside the buffers, so
        # that .double() gives FlameShape's float64 values, not float32 ones widened.
        self._joint_basis64 = (joint_template(shape.J_regressor, shape.v_template.double()),
                               joint_dirs(shape.J_regressor, shape.shape_dirs.double()))

    # The basis' columns apart, from this module's rows of shape_dirs; the joint basis,
    # from the whole mesh, taken at construction (no sources here: derived again only
    # after .to() / .double(), in the tables' dtype and device).
    _derived_from = {"split_dirs": ("shape_dirs",), "joint_basis": ()}
    _derived_tables = {"split_dirs": ("_identity_dirs", "_expr_dirs"),
                       "joint_basis": ("_J_template", "_J_dirs")}

    def _compute_derived(self, groups):
        tables = {}
        if "split_dirs" in groups:
            tables["_identity_dirs"], tables["_expr_dirs"] = self._split_dirs()
        if "joint_basis" in groups:
            like = self.v_template
            template, dirs = (t.to(like.device, like.dtype) for t in self._joint_basis64)
            tables["_J_template"], tables["_J_dirs"] = template, dirs
        return tables

    @property
    def _dynamic(self) -> bool:
        return self.lm_type == "68" and self.lm_dim == "2d"

    def extra_repr(self) -> str:
        return (
            f"n_shape={self.n_shape}, n_expr={self.n_expr}, lm_type={self.lm_type!r}, "
            f"lm_dim={self.lm_dim!r}, contour_rule={self.contour_rule!r}, "
            f"vertices={self.lmk_vertex_idx.shape[0]} of {self.num_vertices}, "
            f"backend={self.backend!r}"
        )

    def forward(self, batch_size: Optional[int] = None, identity=None, **inputs) -> torch.Tensor:
        """Landmarks (B, L, 3) of the FLAME parameters (FlameShape's inputs and rules,
        identity-indexed batches included)."""
        batch_size, values, identity = self._gather_inputs(batch_size, inputs, identity)
        pose = torch.cat([values[name].expand(batch_size, -1) for name in POSE_NAMES], dim=1)
        path = _backend.resolve(self.backend, self.v_template.device.type, "FlameShapeLandmark")
        k = _backend.steps(path)
        v, _ = self._decode(k, self._derived(), values["shape"], values["expr"], pose, identity)
        if self._dynamic:
            return k.landmarks(
                v, pose, self.tris, self.lmk_faces_idx, self.lmk_bary_coords,
                self.dynamic_lmk_faces_idx, self.dynamic_lmk_bary_coords, self.contour_rule,
            )
        return k.landmarks(
            v, None, self.tris, self.lmk_faces_idx, self.lmk_bary_coords,
            contour_rule=self.contour_rule,
        )


def _check_fit_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(
            f"backend must be one of {BACKENDS} (medusa's algorithm has no landmark-only "
            f"path: use FlameShape + FlameLandmark with backend='medusa'), got {backend!r}"
        )
    return _backend.check_backend(backend, BACKENDS)
