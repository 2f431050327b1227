"""FLAME -> picture: `render_flame` decodes one face with flame_ext's decoders and draws
it with its landmarks (and, if asked, its albedo through the mesh's texture coordinates).

World y is up and the face looks along +z (FLAME and the synthetic model); the camera
looks from +z, so the subject's left appears on the image's right.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Tuple

import numpy as np
import torch

from .._checks import check_count, check_finite
from .raster import CAMERAS, Camera, draw_points, fit_camera, render_mesh

LANDMARK_TYPES = ("68", "mp", "none")

CONTOUR_COLOR = (0.05, 0.70, 1.00)  # the 17 jaw-contour points of the 68
STATIC_COLOR = (1.00, 0.20, 0.15)  # the 51 static points of the 68
MEDIAPIPE_COLOR = (0.10, 0.85, 0.25)  # the 105 MediaPipe points


@dataclass
class FaceRender:
    """What `render_flame` drew: the `image` (H, W, 3) in 0..1, the posed `vertices`
    (V, 3), the `faces` (F, 3), the 3D `landmarks` (L, 3) and their pixel positions
    `landmarks_xy` (L, 2) (both empty for lm_type 'none'), the `camera`, and the
    `parameters` used (name -> (1, dim) tensor)."""

    image: np.ndarray
    vertices: np.ndarray
    faces: np.ndarray
    landmarks: np.ndarray
    landmarks_xy: np.ndarray
    camera: Camera
    parameters: dict


def euler_to_axis_angle(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0) -> torch.Tensor:
    """Axis-angle (3,) float64 of R = Ry(yaw) @ Rx(pitch) @ Rz(roll), angles in degrees.

    Right-handed about the world axes (y up, face along +z): positive yaw turns the face
    towards the subject's left (+x), positive pitch tilts it down, positive roll tilts the
    top of the head towards the subject's right.
    """

    def quaternion(axis, degrees):
        half = math.radians(degrees) / 2
        return np.concatenate([[math.cos(half)], math.sin(half) * np.asarray(axis, float)])

    def multiply(a, b):
        w1, v1, w2, v2 = a[0], a[1:], b[0], b[1:]
        return np.concatenate([[w1 * w2 - v1 @ v2], w1 * v2 + w2 * v1 + np.cross(v1, v2)])

    q = multiply(
        multiply(quaternion((0, 1, 0), yaw), quaternion((1, 0, 0), pitch)),
        quaternion((0, 0, 1), roll),
    )
    q = q if q[0] >= 0 else -q  # the shorter of the two equal rotations
    sin_half = float(np.linalg.norm(q[1:]))
    if sin_half < 1e-12:
        return torch.zeros(3, dtype=torch.float64)
    angle = 2.0 * math.atan2(sin_half, float(q[0]))
    return torch.from_numpy(q[1:] / sin_half * angle)


_PARAMETER_DIMS = {"global_pose": 3, "neck_pose": 3, "jaw_pose": 3, "eye_pose": 6}


def _as_row(name: str, value, dim: int) -> torch.Tensor:
    """A given parameter as a (1, dim) float32 row; shorter vectors are zero-padded (the
    first components of a basis matter most)."""
    array = np.asarray(value)
    if array.dtype.kind not in "iuf":
        raise TypeError(f"parameter {name} must hold real numbers, got dtype {array.dtype}")
    if array.ndim == 0 or array.ndim > 2 or (array.ndim == 2 and array.shape[0] != 1):
        raise ValueError(
            f"parameter {name} must be a vector or one (1, n) row, got shape {array.shape}"
        )
    t = torch.as_tensor(array.astype(np.float64)).reshape(-1)
    if t.numel() > dim:
        raise ValueError(f"parameter {name} has {t.numel()} values, the model takes at most {dim}")
    if not torch.isfinite(t).all():
        raise ValueError(f"parameter {name} has non-finite values")
    row = torch.zeros(1, dim, dtype=torch.float64)
    row[0, : t.numel()] = t
    return row.float()


def _uv_layout(model_path, num_faces: int) -> Tuple[np.ndarray, np.ndarray]:
    """Texture coordinates (vt, ft) of the FLAME topology: FLAME_texture.npz's, or those
    of DECA's head_template.obj, beside the model."""
    from .. import io, synthetic

    size = _synthetic_size(model_path)
    if size is not None:
        # n_tex=1: the UVs live beside a texture basis; build the smallest one
        arrays = synthetic.build_assets(size, n_tex=1)["FLAME_texture.npz"]
        vt, ft, source = arrays["vt"], arrays["ft"], f"synthetic:{size}"
    else:
        directory = io.find_data_dir(model_path)
        npz, obj = directory / "FLAME_texture.npz", directory / "head_template.obj"
        if npz.is_file():
            with np.load(npz, allow_pickle=False) as archive:
                if "vt" not in archive or "ft" not in archive:
                    raise ValueError(f"{npz} holds no texture coordinates (vt, ft)")
                vt, ft, source = archive["vt"], archive["ft"], str(npz)
        elif obj.is_file():
            vt, ft = _read_obj_uv(obj)
            source = str(obj)
        else:
            raise FileNotFoundError(
                f"--texture needs the texture coordinates of the FLAME mesh: neither "
                f"FLAME_texture.npz (vt, ft) nor head_template.obj is in {str(directory)!r}"
            )
    vt, ft = np.asarray(vt, dtype=np.float64), np.asarray(ft, dtype=np.int64)
    if vt.ndim != 2 or vt.shape[1] != 2 or not np.isfinite(vt).all():
        raise ValueError(f"{source}: vt must be a finite (NVT, 2) array, got shape {vt.shape}")
    if ft.shape != (num_faces, 3):
        raise ValueError(
            f"{source}: ft must have shape ({num_faces}, 3) like the model's faces, got {ft.shape}"
        )
    if ft.min() < 0 or ft.max() >= vt.shape[0]:
        raise ValueError(f"{source}: ft indexes past the {vt.shape[0]} texture coordinates")
    return vt, ft


def _synthetic_size(model_path) -> Optional[str]:
    """'full' / 'small' when `model_path` (or, for None, $FLAME_EXT_DATA) selects the
    synthetic model, else None."""
    from ..io import ENV_VAR

    if model_path is None:
        model_path = os.environ.get(ENV_VAR, "").strip()
    if not isinstance(model_path, str):
        return None
    return {"synthetic": "full", "synthetic-small": "small"}.get(model_path)


def _read_obj_uv(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """vt and the per-corner texture indices (ft, 0-based) of a triangle OBJ file."""
    vt, ft = [], []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "vt":
                vt.append([float(parts[1]), float(parts[2])])
            elif parts[0] == "f":
                corners = [p.split("/") for p in parts[1:]]
                if len(corners) != 3 or any(len(c) < 2 or not c[1] for c in corners):
                    raise ValueError(
                        f"{path}: faces must be triangles with texture indices (f v/vt ...)"
                    )
                ft.append([int(c[1]) - 1 for c in corners])
    vt = np.asarray(vt, dtype=np.float64).reshape(-1, 2)
    return vt, np.asarray(ft, dtype=np.int64).reshape(-1, 3)


def render_flame(
    model_path=None,
    *,
    seed: int = 0,
    parameters: Optional[Mapping[str, object]] = None,
    shape_scale: float = 1.0,
    expr_scale: float = 0.5,
    yaw: float = 0.0,
    pitch: float = 0.0,
    roll: float = 0.0,
    jaw: float = 0.0,
    lm_type: str = "68",
    texture: bool = False,
    n_tex: int = 50,
    tex_scale: float = 1.0,
    size: int = 512,
    camera: str = "perspective",
    supersample: int = 2,
    backend: str = "auto",
) -> FaceRender:
    """Decodes one face with flame_ext's decoders and draws it with its landmarks.

    model_path: FLAME files as for the decoders (None: discovery; 'synthetic' /
    'synthetic-small'). Parameters not given in `parameters` (name -> values; shape,
    expr, global_pose, neck_pose, jaw_pose, eye_pose; shorter vectors are zero-padded)
    are drawn from `seed`: shape ~ N(0, shape_scale^2), expr ~ N(0, expr_scale^2).
    yaw / pitch / roll (degrees, see `euler_to_axis_angle`) set global_pose and `jaw`
    (radians, positive opens the mouth) the first jaw_pose component, unless given.
    lm_type: '68' (17 contour points in one colour, 51 static in another), 'mp' (105) or
    'none'. texture: paint the albedo of FlameTex(n_tex) for texcode ~ N(0, tex_scale^2),
    through the mesh's texture coordinates. Returns a `FaceRender`.
    """
    from ..decoders import FlameLandmark, FlameShape, FlameTex
    from ..io import load_flame_model
    from ..io.discovery import _texture_location

    if lm_type not in LANDMARK_TYPES:
        raise ValueError(f"lm_type must be one of {LANDMARK_TYPES}, got {lm_type!r}")
    if camera not in CAMERAS:
        raise ValueError(f"camera must be one of {CAMERAS}, got {camera!r}")
    seed = check_count("seed", seed, 0, 2**63 - 1)
    size = check_count("size", size, 16, 8192)
    shape_scale, expr_scale = check_finite("shape_scale", shape_scale), check_finite(
        "expr_scale", expr_scale)
    yaw, pitch = check_finite("yaw", yaw), check_finite("pitch", pitch)
    roll, jaw = check_finite("roll", roll), check_finite("jaw", jaw)
    tex_scale = check_finite("tex_scale", tex_scale)
    given = dict(parameters or {})
    unknown = sorted(set(given) - {"shape", "expr", *_PARAMETER_DIMS})
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown}; valid names are "
            f"{['shape', 'expr', *_PARAMETER_DIMS]}"
        )

    model = load_flame_model(model_path)
    dims = {"shape": model.n_shape, "expr": model.n_expr, **_PARAMETER_DIMS}
    generator = torch.Generator().manual_seed(seed)
    values = {
        "shape": torch.randn(1, model.n_shape, generator=generator) * shape_scale,
        "expr": torch.randn(1, model.n_expr, generator=generator) * expr_scale,
        "global_pose": euler_to_axis_angle(yaw, pitch, roll).float().view(1, 3),
        "jaw_pose": torch.tensor([[float(jaw), 0.0, 0.0]]),
    }
    for name, value in given.items():
        values[name] = _as_row(name, value, dims[name])

    flame = FlameShape(
        model.n_shape, model.n_expr, device="cpu", model_path=model_path,
        # R is not drawn; medusa's algorithm always computes it
        transforms="vertex" if backend == "medusa" else "none", backend=backend, **values,
    )
    with torch.no_grad():
        v, _ = flame(batch_size=1)
        poses = flame.get_full_pose()
        if lm_type == "none":
            landmarks = torch.zeros(1, 0, 3)
        else:
            lmk = FlameLandmark(lm_type, "2d", device="cpu", model_path=model_path, backend=backend)
            landmarks = lmk(v, poses)
        albedo = None
        if texture:
            # model_path names the model; the texture is the one beside it
            tex = FlameTex(_texture_location(model_path), n_tex, backend=backend)
            code = torch.randn(1, tex.n_tex, generator=generator) * tex_scale
            albedo = tex(code)[0].permute(1, 2, 0).clamp(0, 1).double().numpy()
    vertices = v[0].double().numpy()
    faces = flame.tris.numpy()
    points = landmarks[0].double().numpy()

    cam = fit_camera(vertices, size, kind=camera)
    uv = uv_faces = None
    if albedo is not None:
        uv, uv_faces = _uv_layout(model_path, faces.shape[0])
    image = render_mesh(
        vertices, faces, cam, texture=albedo, uv=uv, uv_faces=uv_faces,
        supersample=supersample,
    )
    xy, _ = cam.project(points)
    radius = max(1.5, size / 200)
    if lm_type == "68" and points.shape[0] > 51:
        n_contour = points.shape[0] - 51
        image = draw_points(image, xy[:n_contour], CONTOUR_COLOR, radius=radius)
        image = draw_points(image, xy[n_contour:], STATIC_COLOR, radius=radius)
    elif points.shape[0]:
        color = MEDIAPIPE_COLOR if lm_type == "mp" else STATIC_COLOR
        image = draw_points(image, xy, color, radius=radius)
    return FaceRender(
        image=image, vertices=vertices, faces=faces, landmarks=points, landmarks_xy=xy,
        camera=cam, parameters={k: getattr(flame, k).detach().clone() for k in dims},
    )
