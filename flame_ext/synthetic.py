"""Seeded synthetic FLAME asset set (SPEC section 4): the licensed FLAME files, faked.

`build_assets(size, seed)` returns the objects exactly as the real files load
(`generic_model.pkl`, `landmark_embedding.npy`, `mediapipe_landmark_embedding.npz`,
`FLAME_albedo_from_BFM.npz`, `FLAME_texture.npz`), keyed by file name;
`write_assets(out_dir, ...)` writes them in the real file formats, down to the Python 2
pickle opcodes and the `chumpy.ch.Ch` / `scipy.sparse.csc.csc_matrix` globals of the
official model file. `python -m flame_ext.synthetic --out DIR` does the same from a shell.

Two sizes:
- 'full': FLAME's exact dimensions (V=5023, F=9976, 5 joints, 300+100 components,
  36 pose correctives, 51 + 79x17 / 68 / 105 landmarks, 512x512x3 textures with 199 BFM and
  200 FLAME components). Looks exactly like the real file: no extra keys.
- 'small': 67 vertices, 6 shape + 4 expression components, 8x8 textures with 5 / 6
  components, the same joints and landmark counts, so float64 gradcheck is fast. Its model
  dict carries the extra int key 'flame_ext_n_shape' (FLAME files lack it and mean 300).

Geometry. The head is a surface of revolution with elliptic cross-sections (a deformed UV
sphere, y up, face towards +z, subject's left at +x, metres) that narrows into a neck,
plus smooth bumps for nose, chin, lips, brows, ears and eye sockets and a seeded 1 mm
perturbation. Vertex 0 is the top pole; then latitude rings run down to an open neck
boundary. A pole fan over ring 1 gives n_1 triangles and the strip between rings of n_i and
n_{i+1} vertices gives n_i + n_{i+1}, so F = 2 (V - 1) - n_last. FLAME's V=5023, F=9976 thus
need a neck ring of exactly 68 vertices (a closed genus-0 mesh would need F = 2V - 4 =
10042); the other ring sizes follow the circumference and are nudged until they sum to 5022.
Triangles are consistently oriented, normals outwards.

Bases are random smooth fields (low-frequency cosines of the vertex position), made
orthogonal within the shape and within the expression block like PCA columns, component k
scaled to 4 mm / (1 + k) RMS per unit coefficient; expression fields are confined to the
face. Pose correctives are smooth fields, 2 mm RMS, where each joint moves the skin.
Skinning weights are smooth: neck base -> root, lower face -> jaw, eye regions -> eyes, the
rest -> neck. J == J_regressor @ v_template, with J_regressor a sparse nonnegative convex
combination (few vertices per joint) placing root, neck, jaw and eyes where a head has
them. Landmarks are placed in the surface's (angle, height) parameter domain, so every
face index is valid and barycentrics are positive and sum to 1. Textures are
low-frequency DCT patterns with random coefficients.

Everything comes from `numpy.random.default_rng([seed, stream])`, one stream per part: the
same seed gives bit-identical output, and the first k texture components do not depend on
how many were asked for.

`build_assets` returns a read-only mapping whose entries are built on first access and
cached (`functools.lru_cache`): callers get shared arrays and must not mutate them (copy
first).
"""

from __future__ import annotations

import argparse
import copyreg
import functools
import pathlib
import pickle
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.sparse
from scipy.special import expit as _sigmoid
import torch

from flame_ext._checks import check_count

SIZES = ('full', 'small')

_MODEL_FILE = 'generic_model.pkl'
_LMK_FILE = 'landmark_embedding.npy'
_MP_FILE = 'mediapipe_landmark_embedding.npz'
_BFM_FILE = 'FLAME_albedo_from_BFM.npz'
_FLAME_TEX_FILE = 'FLAME_texture.npz'
ASSET_NAMES = (_MODEL_FILE, _LMK_FILE, _MP_FILE, _BFM_FILE, _FLAME_TEX_FILE)

_NUM_JOINTS = 5
_PARENTS = (-1, 0, 1, 1, 1)  # root, neck, jaw, left eye, right eye
_ROOT_PARENT_U32 = 4294967295  # uint32(-1): how FLAME's kintree_table marks the root
_NUM_POSE_FEATURES = 9 * (_NUM_JOINTS - 1)
_NUM_CONTOUR_LMK = 17
_NUM_YAW_BINS = 79
_NUM_MEDIAPIPE_LMK = 105
_MEDIAPIPE_MESH_SIZE = 468

# Random streams, one per part, so that parts are independent of each other.
_STREAM_TEMPLATE, _STREAM_SHAPE, _STREAM_EXPR, _STREAM_POSE = 1, 2, 3, 4
_STREAM_MEDIAPIPE, _STREAM_BFM, _STREAM_FLAME_TEX = 5, 6, 7

# Head profile, metres.
_THETA_MAX = 0.93 * np.pi  # polar angle of the neck boundary ring
_HEAD_Y, _HEAD_AY = 0.02, 0.115  # centre height and vertical semi-axis of the skull
_HEAD_AX, _HEAD_AZ = 0.078, 0.095  # horizontal semi-axes (ear to ear, back to front)
_NECK_RATIO = 0.6  # neck radius relative to the head's widest ring
_NECK_START = 0.6 * np.pi
_NECK_DROP, _NECK_BACK = 0.06, 0.02  # the neck extends down and sits behind the face
_NECK_RING = 68  # boundary length that makes F = 9976 for V = 5023 (module docstring)

# Face coordinates (X from the subject's right ear -1 to the left ear +1, Y from chin -0.8
# to brow 0.55) map linearly onto the surface's (angle psi, polar angle theta).
_PSI_PER_X = 1.25
_Y_BROW, _THETA_BROW = 0.55, 0.40 * np.pi
_Y_CHIN, _THETA_CHIN = -0.8, 0.78 * np.pi

# Bumps along the outward normal: (X, Y, sigma_psi, sigma_theta, height in metres).
_FEATURES = (
    (0.0, 0.12, 0.16, 0.16, 0.016),  # nose ridge
    (0.0, -0.02, 0.12, 0.10, 0.010),  # nose tip
    (0.0, -0.72, 0.35, 0.12, 0.008),  # chin
    (0.0, -0.42, 0.30, 0.06, 0.004),  # lips
    (-0.4, 0.32, 0.12, 0.07, -0.007),  # eye sockets
    (0.4, 0.32, 0.12, 0.07, -0.007),
    (-0.4, 0.52, 0.25, 0.05, 0.004),  # brows
    (0.4, 0.52, 0.25, 0.05, 0.004),
    (-np.pi / 2 / _PSI_PER_X, 0.1, 0.12, 0.12, 0.012),  # ears
    (np.pi / 2 / _PSI_PER_X, 0.1, 0.12, 0.12, 0.012),
)
_EYE_FACE_XY = ((0.4, 0.32), (-0.4, 0.32))  # left eye (+x), right eye
_EYEBALL_RADIUS = 0.012
_TEMPLATE_NOISE = 1e-3  # RMS of the seeded perturbation of the template
_BASIS_RMS = 4e-3  # RMS vertex displacement of component 0 per unit coefficient
_POSE_RMS = 2e-3
_TEX_BLOCK = 8  # texture components rendered together


@dataclass(frozen=True)
class _SizeSpec:
    ring_sizes: tuple  # vertices per latitude ring, top to neck; the last is the boundary
    n_shape: int
    n_expr: int
    n_freq: int  # cosine frequencies per axis of the smooth geometric fields
    tex_hw: int
    n_tex_bfm: int
    n_tex_flame: int
    tex_freq: int  # DCT frequencies per image axis (<= tex_hw keeps them orthogonal)


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _profile(theta):
    """Cross-section scale, height and depth offset of the ring at polar angle theta."""
    s = np.sin(theta)
    p = 8.0
    # C1 smooth maximum with the neck radius, only on the lower half so the top stays round
    lower = ((s**p + _NECK_RATIO**p) / (1.0 + _NECK_RATIO**p)) ** (1.0 / p)
    rho = np.where(theta <= np.pi / 2, s, lower)
    neck = _smoothstep((theta - _NECK_START) / (_THETA_MAX - _NECK_START))
    y = _HEAD_Y + _HEAD_AY * np.cos(theta) - _NECK_DROP * neck
    zc = -_NECK_BACK * neck
    return rho, y, zc


def _face_to_param(x, y):
    """Face coordinates -> (psi, theta) on the surface."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    slope = (_THETA_CHIN - _THETA_BROW) / (_Y_BROW - _Y_CHIN)
    return _PSI_PER_X * x, _THETA_BROW + (_Y_BROW - y) * slope


def _surface(psi, theta):
    """Points (N,3) and outward horizontal normals (N,3) of the head at (psi, theta)."""
    rho, y, zc = _profile(theta)
    nx, nz = np.sin(psi) / _HEAD_AX, np.cos(psi) / _HEAD_AZ
    norm = np.hypot(nx, nz)
    normal = np.stack([nx / norm, np.zeros_like(nx), nz / norm], axis=-1)
    height = np.zeros_like(psi)
    for fx, fy, s_psi, s_theta, h in _FEATURES:
        c_psi, c_theta = _face_to_param(fx, fy)
        height += h * np.exp(
            -0.5 * ((psi - c_psi) / s_psi) ** 2 - 0.5 * ((theta - c_theta) / s_theta) ** 2
        )
    points = np.stack(
        [_HEAD_AX * rho * np.sin(psi), y, zc + _HEAD_AZ * rho * np.cos(psi)], axis=-1
    )
    return points + height[..., None] * normal, normal


def _full_ring_sizes(n_vertices=5023):
    """Ring sizes following the circumference, with the neck ring 68, summing to V - 1."""
    best = None
    for n_rings in range(30, 120):
        rho, _, _ = _profile(_THETA_MAX * np.arange(1, n_rings + 1) / n_rings)
        sizes = np.maximum(6, np.rint(_NECK_RING * rho / rho[-1])).astype(np.int64)
        sizes[-1] = _NECK_RING
        residual = (n_vertices - 1) - int(sizes.sum())
        if best is None or abs(residual) < abs(best[0]):
            best = (residual, sizes)
    residual, sizes = best
    # one vertex more (or less) on each of the widest rings, where it changes least
    widest = np.argsort(-sizes[:-1], kind='stable')[: abs(residual)]
    sizes[widest] += int(np.sign(residual))
    if sizes.sum() != n_vertices - 1 or len(widest) != abs(residual):
        raise RuntimeError(f'could not fit the synthetic rings to {n_vertices} vertices')
    return tuple(int(n) for n in sizes)


@functools.lru_cache(maxsize=None)
def _size_spec(size: str) -> _SizeSpec:
    if size == 'full':
        return _SizeSpec(_full_ring_sizes(), 300, 100, 8, 512, 199, 200, 12)
    if size == 'small':
        return _SizeSpec((5, 9, 11, 12, 11, 10, 8), 6, 4, 3, 8, 5, 6, 8)
    raise ValueError(f"size must be one of {SIZES}, got {size!r}")


@dataclass(frozen=True)
class _Mesh:
    psi: np.ndarray  # (V,) angle around the vertical axis, 0 at the front
    theta: np.ndarray  # (V,) polar angle, 0 at the top pole
    faces: np.ndarray  # (F,3) int64, outward orientation
    corner_uv: np.ndarray  # (F,3,2) parameter coordinates per face corner, seam unwrapped
    vt: np.ndarray  # (NVT,2) texture coordinates
    ft: np.ndarray  # (F,3) int64 indices into vt


def _ring_strip(upper, lower):
    """Triangles between two closed rings of vertex ids (both start at the seam)."""
    m, n = len(upper), len(lower)
    tris = []
    i = j = 0
    while i < m or j < n:
        # advance on the ring whose next vertex comes first in angle (integer compare)
        if j == n or (i < m and (i + 1) * n <= (j + 1) * m):
            tris.append((upper[i], upper[(i + 1) % m], lower[j % n]))
            i += 1
        else:
            tris.append((lower[(j + 1) % n], lower[j], upper[i % m]))
            j += 1
    return tris


@functools.lru_cache(maxsize=None)
def _mesh(size: str) -> _Mesh:
    spec = _size_spec(size)
    n_rings = len(spec.ring_sizes)
    psi, theta, rings = [0.0], [0.0], []
    start = 1
    for r, n in enumerate(spec.ring_sizes):
        rings.append(list(range(start, start + n)))
        start += n
        # k = 0 sits on the seam at the back of the head
        psi.extend(-np.pi + 2.0 * np.pi * np.arange(n) / n)
        theta.extend([_THETA_MAX * (r + 1) / n_rings] * n)
    psi, theta = np.asarray(psi), np.asarray(theta)
    u_of = np.concatenate([[0.5]] + [np.arange(n) / n for n in spec.ring_sizes])

    first = rings[0]
    tris = [(first[(k + 1) % len(first)], first[k], 0) for k in range(len(first))]
    for upper, lower in zip(rings[:-1], rings[1:]):
        tris.extend(_ring_strip(upper, lower))
    faces = np.asarray(tris, dtype=np.int64)

    points, _ = _surface(psi, theta)
    if _signed_volume(points, faces, rings[-1]) < 0:
        faces = faces[:, [0, 2, 1]]

    # Unwrap the seam: a face spanning it gets u + 1 on its corners near u = 0. The pole
    # takes, per face, the mean u of its other corners, so the domain is tiled without folds.
    u = u_of[faces]
    pole = faces == 0
    spread = np.where(pole, -np.inf, u).max(1) - np.where(pole, np.inf, u).min(1)
    u = np.where((spread > 0.5)[:, None] & (u < 0.5) & ~pole, u + 1.0, u)
    u[pole] = np.where(pole, 0.0, u)[pole.any(1)].sum(1) / 2.0
    corner_uv = np.stack([u, theta[faces] / _THETA_MAX], axis=-1)

    keys = np.stack([faces.ravel().astype(np.float64), u.ravel()], axis=1)
    unique, ft = np.unique(keys, axis=0, return_inverse=True)
    vt = np.stack([unique[:, 1], 1.0 - theta[unique[:, 0].astype(np.int64)] / _THETA_MAX], 1)
    return _Mesh(psi, theta, faces, corner_uv, vt, ft.reshape(-1, 3).astype(np.int64))


def _signed_volume(points, faces, boundary):
    """Volume enclosed by the surface closed with a fan over its boundary ring."""
    centre = points[boundary].mean(0)
    a, b, c = (points[faces[:, k]] - centre for k in range(3))
    return float(np.einsum('ij,ij->i', a, np.cross(b, c)).sum() / 6.0)


def _smooth_fields(pos01, n_fields, n_freq, rng, mask=None, orthogonal=False):
    """n_fields random smooth displacement fields (V,3,n_fields), each of unit RMS per vertex.

    A field is a random combination of cos(pi a x) cos(pi b y) cos(pi c z) over the unit
    box, with lower frequencies weighted more; the constant (a rigid shift) is left out.
    orthogonal: Gram-Schmidt the fields in order (as the columns of a PCA basis are), so
    later ones keep the finer detail the earlier ones miss.
    """
    a, b, c = np.meshgrid(*(np.arange(n_freq),) * 3, indexing='ij')
    a, b, c = a.ravel()[1:], b.ravel()[1:], c.ravel()[1:]
    waves = [np.cos(np.pi * pos01[:, k : k + 1] * np.arange(n_freq)) for k in range(3)]
    phi = waves[0][:, a] * waves[1][:, b] * waves[2][:, c]
    decay = (1.0 + a + b + c) ** -3.0
    coef = rng.standard_normal((len(a), 3 * n_fields)) * decay[:, None]
    fields = (phi @ coef).reshape(len(pos01), 3, n_fields)
    if mask is not None:
        fields *= mask[:, None, :] if mask.ndim == 2 else mask[:, None, None]
    if orthogonal:
        # Gram-Schmidt through the Cholesky factor of the Gram matrix (fields = Q L^T):
        # the same Q as a QR with positive diagonal, several times faster here
        flat = fields.reshape(-1, n_fields)
        chol = np.linalg.cholesky(flat.T @ flat)
        q = scipy.linalg.solve_triangular(chol, flat.T, lower=True).T
        fields = np.ascontiguousarray(q).reshape(fields.shape)
    rms = np.sqrt((fields**2).sum(1).mean(0))
    return fields / rms


def _skinning_weights(psi, theta, spacing):
    """Smooth (V,5) weights: neck base -> root, lower face -> jaw, eye regions -> eyes,
    everything else -> neck (a head turns with the neck joint).

    spacing: (psi, theta) distance between neighbouring vertices; the eye regions are
    widened to it on coarse meshes, else no vertex would follow the eyes.
    """
    root = _smoothstep((theta - 0.83 * np.pi) / (_THETA_MAX - 0.83 * np.pi))
    _, theta_lip = _face_to_param(0.0, -0.42)
    edge = theta_lip - 0.15 * (np.abs(psi) / _PSI_PER_X) ** 2  # rises towards the ears
    jaw = (
        _sigmoid((theta - edge) / 0.03)
        * _sigmoid((1.3 - np.abs(psi)) / 0.12)
        * (1.0 - root)
    )
    s_psi, s_theta = max(0.1, 0.7 * spacing[0]), max(0.06, 0.7 * spacing[1])
    eyes = []
    for ex, ey in _EYE_FACE_XY:
        c_psi, c_theta = _face_to_param(ex, ey)
        eyes.append(
            np.exp(-0.5 * ((psi - c_psi) / s_psi) ** 2 - 0.5 * ((theta - c_theta) / s_theta) ** 2)
        )
    # a small floor keeps the neck everywhere, so no row is ever all zeros
    neck = 0.02 + (1 - root) * (1 - jaw) * (1 - eyes[0]) * (1 - eyes[1])
    w = np.stack([root, neck, jaw, eyes[0], eyes[1]], axis=1)
    # Gaussian and sigmoid tails reach 1e-300; below 1e-8 a weight moves nothing, and
    # as float32 such values are denormals that slow every CPU kernel (and medusa's) ~6x.
    w[w < 1e-8] = 0.0
    return w / w.sum(1, keepdims=True)


def _joint_targets():
    """Where a head's joints sit, as points on the head's axis or inside the eyes."""
    targets = []
    for theta in (0.9 * np.pi, 0.72 * np.pi):  # root at the neck base, neck at the skull base
        _, y, zc = _profile(theta)
        targets.append((theta, np.array([0.0, float(y), float(zc)])))
    _, theta_jaw = _face_to_param(0.0, -0.05)  # between the ears, level with the nose base
    _, y, zc = _profile(theta_jaw)
    targets.append((float(theta_jaw), np.array([0.0, float(y), float(zc) + 0.01])))
    for ex, ey in _EYE_FACE_XY:
        c_psi, c_theta = _face_to_param(ex, ey)
        point, normal = _surface(np.array([c_psi]), np.array([c_theta]))
        targets.append((float(c_theta), point[0] - _EYEBALL_RADIUS * normal[0]))
    return targets


def _joint_regressor(v_template, theta, n_rings):
    """Sparse (5,V) regressor: per joint, nonnegative weights summing to 1 over vertices of
    the rings around the joint's height (their hull encloses it), found by NNLS."""
    n_vertices = len(v_template)
    rows, cols, vals = [], [], []
    for j, (t_theta, target) in enumerate(_joint_targets()):
        near = np.abs(theta - t_theta) <= 1.5 * _THETA_MAX / n_rings
        near[0] = False  # the pole
        idx = np.flatnonzero(near)
        lam = 10.0  # weight of the sum-to-one row
        a = np.vstack([v_template[idx].T, lam * np.ones(len(idx))])
        w, _ = scipy.optimize.nnls(a, np.append(target, lam))
        keep = w > 1e-6
        w = w[keep] / w[keep].sum()
        rows.extend([j] * len(w))
        cols.extend(idx[keep])
        vals.extend(w)
    reg = scipy.sparse.csc_matrix(
        (np.asarray(vals), (np.asarray(rows), np.asarray(cols))),
        shape=(_NUM_JOINTS, n_vertices),
    )
    reg.sort_indices()
    return reg


def _ibug68_face_xy():
    """The 68 iBUG landmarks in face coordinates, in iBUG order (0-16 jaw from the
    subject's right ear to the left, brows, nose, eyes, mouth)."""
    s = np.pi * np.arange(17) / 16
    jaw = np.stack([-np.cos(s), 0.15 - 0.95 * np.sin(s)], 1)
    arch = 0.06 * np.sin(np.pi * np.arange(5) / 4)
    brow_r = np.stack([np.linspace(-0.75, -0.15, 5), 0.52 + arch], 1)
    brow_l = np.stack([np.linspace(0.15, 0.75, 5), 0.52 + arch[::-1]], 1)
    bridge = np.stack([np.zeros(4), np.linspace(0.40, 0.02, 4)], 1)
    nx = np.linspace(-0.2, 0.2, 5)
    nostrils = np.stack([nx, -0.1 + 0.15 * np.abs(nx)], 1)
    # corner, upper lid, corner, lower lid: iBUG goes clockwise in the image
    lid = np.array([np.pi, 2 * np.pi / 3, np.pi / 3, 0, -np.pi / 3, -2 * np.pi / 3])
    eye_r = np.stack([-0.4 + 0.15 * np.cos(lid), 0.32 + 0.05 * np.sin(lid)], 1)
    eye_l = np.stack([0.4 + 0.15 * np.cos(lid), 0.32 + 0.05 * np.sin(lid)], 1)
    outer = np.pi - 2 * np.pi * np.arange(12) / 12
    inner = np.pi - 2 * np.pi * np.arange(8) / 8
    mouth_o = np.stack([0.35 * np.cos(outer), -0.42 + 0.14 * np.sin(outer)], 1)
    mouth_i = np.stack([0.22 * np.cos(inner), -0.42 + 0.03 * np.sin(inner)], 1)
    return np.concatenate(
        [jaw, brow_r, brow_l, bridge, nostrils, eye_r, eye_l, mouth_o, mouth_i]
    )


def _contour_params(yaw_deg):
    """(17,2) (psi, theta) of the jaw contour seen at a head yaw: it slides around the
    head, the side turning away sliding further."""
    jaw = _ibug68_face_xy()[:_NUM_CONTOUR_LMK]
    psi, theta = _face_to_param(jaw[:, 0], jaw[:, 1])
    yaw = np.deg2rad(yaw_deg)
    psi = psi + yaw * (0.55 + 0.25 * jaw[:, 0] * np.sign(yaw))
    return np.stack([psi, theta], 1)


def _locate(mesh, params, floor=0.01):
    """Face index (N,) and barycentrics (N,3) of points (psi, theta) on the mesh.

    Point location in the parameter domain; barycentrics are floored at `floor` and
    renormalised, so they are strictly positive (a point on an edge moves by ~1% of its
    triangle).
    """
    uv = np.stack([(params[:, 0] + np.pi) / (2 * np.pi), params[:, 1] / _THETA_MAX], 1)
    usable = np.flatnonzero(~(mesh.faces == 0).any(1))  # no pole fan (landmarks never go there)
    tri = mesh.corner_uv[usable]
    a, e1, e2 = tri[:, 0], tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    faces = np.empty(len(uv), np.int64)
    bary = np.empty((len(uv), 3))
    for lo in range(0, len(uv), 64):
        p = uv[lo : lo + 64, None, :] - a[None]
        beta = (p[..., 0] * e2[:, 1] - p[..., 1] * e2[:, 0]) / det
        gamma = (e1[:, 0] * p[..., 1] - e1[:, 1] * p[..., 0]) / det
        alpha = 1.0 - beta - gamma
        inside = np.minimum(np.minimum(alpha, beta), gamma) >= -1e-12
        if not inside.any(1).all():
            raise RuntimeError('a synthetic landmark fell outside the mesh')
        hit = inside.argmax(1)
        rows = np.arange(len(hit))
        faces[lo : lo + 64] = usable[hit]
        bary[lo : lo + 64] = np.stack(
            [alpha[rows, hit], beta[rows, hit], gamma[rows, hit]], 1
        )
    bary = np.maximum(bary, floor)
    return faces, bary / bary.sum(1, keepdims=True)


def _landmark_embedding(mesh):
    full_faces, full_bary = _locate(mesh, np.stack(_face_to_param(*_ibug68_face_xy().T), 1))
    # medusa's bin rule: bin y for yaw y in [0, 39], bin 39 - y for yaw y in [-39, -1]
    yaws = [b if b < 40 else 39 - b for b in range(_NUM_YAW_BINS)]
    contour = np.concatenate([_contour_params(y) for y in yaws])
    dyn_faces, dyn_bary = _locate(mesh, contour)
    shape = (_NUM_YAW_BINS, _NUM_CONTOUR_LMK)
    return {
        'static_lmk_faces_idx': full_faces[_NUM_CONTOUR_LMK:].copy(),
        'static_lmk_bary_coords': full_bary[_NUM_CONTOUR_LMK:].copy(),
        'dynamic_lmk_faces_idx': torch.tensor(dyn_faces.reshape(shape), dtype=torch.int64),
        'dynamic_lmk_bary_coords': torch.tensor(
            dyn_bary.reshape(shape + (3,)), dtype=torch.float32
        ),
        'full_lmk_faces_idx': full_faces[None],
        'full_lmk_bary_coords': full_bary[None],
    }


def _mediapipe_embedding(mesh, rng):
    points = []
    while len(points) < _NUM_MEDIAPIPE_LMK:
        x, y = rng.uniform(-0.85, 0.85), rng.uniform(-0.85, 0.65)
        if (x / 0.85) ** 2 + ((y + 0.1) / 0.75) ** 2 < 1.0:
            points.append((x, y))
    xy = np.asarray(points)
    faces, bary = _locate(mesh, np.stack(_face_to_param(xy[:, 0], xy[:, 1]), 1))
    indices = np.sort(rng.choice(_MEDIAPIPE_MESH_SIZE, _NUM_MEDIAPIPE_LMK, replace=False))
    return {
        'lmk_face_idx': faces.astype(np.uint32),
        'lmk_b_coords': bary,
        'landmark_indices': indices.astype(np.int64),
    }


def _rng(seed, stream):
    return np.random.default_rng([seed, stream])


@functools.lru_cache(maxsize=4)
def _build_model(size: str, seed: int) -> dict:
    """Model pickle dict, 68-point and MediaPipe embeddings (uncached: `.__wrapped__`)."""
    spec = _size_spec(size)
    mesh = _mesh(size)
    n_rings = len(spec.ring_sizes)
    base, _ = _surface(mesh.psi, mesh.theta)
    lo, hi = base.min(0), base.max(0)
    pos01 = (base - lo) / (hi - lo)
    noise = _smooth_fields(pos01, 1, spec.n_freq, _rng(seed, _STREAM_TEMPLATE))[..., 0]
    v_template = base + _TEMPLATE_NOISE * noise

    spacing = (2 * np.pi / max(spec.ring_sizes), _THETA_MAX / n_rings)
    weights = _skinning_weights(mesh.psi, mesh.theta, spacing)
    shape = _smooth_fields(
        pos01, spec.n_shape, spec.n_freq, _rng(seed, _STREAM_SHAPE), orthogonal=True
    )
    face = (
        _sigmoid((1.5 - np.abs(mesh.psi)) / 0.15)
        * _sigmoid((mesh.theta - 0.32 * np.pi) / (0.05 * np.pi))
        * _sigmoid((0.85 * np.pi - mesh.theta) / (0.05 * np.pi))
    )
    expr = _smooth_fields(
        pos01, spec.n_expr, spec.n_freq, _rng(seed, _STREAM_EXPR), face, orthogonal=True
    )
    shapedirs = np.concatenate(
        [
            shape * (_BASIS_RMS / (1.0 + np.arange(spec.n_shape))),
            expr * (_BASIS_RMS / (1.0 + np.arange(spec.n_expr))),
        ],
        axis=2,
    )
    # each joint's correctives act where that joint moves the skin
    joint_of_feature = 1 + np.arange(_NUM_POSE_FEATURES) // 9
    pose_mask = 0.05 + weights[:, joint_of_feature]
    posedirs = _POSE_RMS * _smooth_fields(
        pos01, _NUM_POSE_FEATURES, spec.n_freq, _rng(seed, _STREAM_POSE), pose_mask
    )

    j_regressor = _joint_regressor(v_template, mesh.theta, n_rings)
    kintree = np.array(
        [[_ROOT_PARENT_U32] + list(_PARENTS[1:]), list(range(_NUM_JOINTS))], dtype=np.int64
    )
    model = {
        'f': mesh.faces.astype(np.uint32),
        'v_template': v_template,
        'shapedirs': np.ascontiguousarray(shapedirs),
        'posedirs': np.ascontiguousarray(posedirs),
        'J_regressor': j_regressor,
        'kintree_table': kintree,
        'weights': weights,
        'J': np.asarray(j_regressor @ v_template),
        'bs_style': 'lbs',
        'bs_type': 'lrotmin',
    }
    if size != 'full':  # real files lack the key: they always hold 300 shape columns
        model['flame_ext_n_shape'] = spec.n_shape
    return {
        _MODEL_FILE: model,
        _LMK_FILE: _landmark_embedding(mesh),
        _MP_FILE: _mediapipe_embedding(mesh, _rng(seed, _STREAM_MEDIAPIPE)),
    }


def _dct_texture(hw, n_freq, n_total, n_keep, rng, base, mean_rms, basis_rms, dtype):
    """Mean (H,W,3) and the first n_keep of n_total basis images (H,W,3,n_keep).

    Images are sums of DCT-II patterns cos(pi a (h + 1/2) / H) cos(pi b (w + 1/2) / W)
    with random coefficients; the patterns are orthogonal, which gives each image's RMS in
    closed form. All coefficients are drawn, so component k never depends on n_keep.
    """
    decay = (1.0 + np.add.outer(np.arange(n_freq), np.arange(n_freq))) ** -1.5
    mean_coef = rng.standard_normal((n_freq, n_freq, 3)) * decay[..., None]
    coef = rng.standard_normal((n_freq, n_freq, 3, n_total)) * decay[..., None, None]
    # mean over pixels of a squared pattern: 1 when both frequencies are 0, else 1/2 or 1/4
    axis = np.where(np.arange(n_freq) == 0, 1.0, 0.5)
    energy = np.multiply.outer(axis, axis)

    def normalised(c, rms):
        return c * (rms / np.sqrt(np.einsum('ab,abck->k', energy, c**2) / 3.0))

    mean_coef = normalised(mean_coef[..., None], np.array([mean_rms]))
    # all n_total normalised at once, so that the arithmetic does not depend on n_keep
    coef = normalised(coef, basis_rms / (1.0 + np.arange(n_total)))[..., :n_keep]
    wave = np.cos(np.pi * np.outer(np.arange(hw) + 0.5, np.arange(n_freq)) / hw)

    def render(c):
        # Fixed-size blocks of components, zero-padded: the BLAS calls then have the same
        # shapes whatever n_keep is, so component k comes out bit-identical.
        out = np.empty((hw, hw, 3, c.shape[-1]), dtype)
        for k0 in range(0, c.shape[-1], _TEX_BLOCK):
            block = np.zeros(c.shape[:3] + (_TEX_BLOCK,))
            n = min(_TEX_BLOCK, c.shape[-1] - k0)
            block[..., :n] = c[..., k0 : k0 + n]
            cols = np.einsum('wb,abck->awck', wave, block).reshape(n_freq, -1)
            for lo in range(0, hw, 32):  # row chunks keep the float64 temporaries small
                rows = (wave[lo : lo + 32] @ cols).reshape(-1, hw, 3, _TEX_BLOCK)
                out[lo : lo + 32, :, :, k0 : k0 + n] = rows[..., :n]
        return out

    mean = render(mean_coef)[..., 0] + np.asarray(base, dtype)
    return mean, render(coef)


# BGR like the published files (FlameTex flips the channels on output).
@functools.lru_cache(maxsize=2)
def _build_bfm(size: str, seed: int, n_tex: int) -> dict:
    spec = _size_spec(size)
    mu, pc = _dct_texture(
        spec.tex_hw, spec.tex_freq, spec.n_tex_bfm, n_tex, _rng(seed, _STREAM_BFM),
        (0.42, 0.52, 0.70), 0.04, 0.06, np.float64,
    )
    return {'MU': mu.reshape(-1), 'PC': pc.reshape(-1, n_tex)}


@functools.lru_cache(maxsize=2)
def _build_flame_texture(size: str, seed: int, n_tex: int) -> dict:
    spec = _size_spec(size)
    mean, tex_dir = _dct_texture(
        spec.tex_hw, spec.tex_freq, spec.n_tex_flame, n_tex, _rng(seed, _STREAM_FLAME_TEX),
        (105.0, 135.0, 180.0), 10.0, 15.0, np.float32,
    )
    mesh = _mesh(size)
    return {'mean': mean, 'tex_dir': tex_dir, 'vt': mesh.vt, 'ft': mesh.ft}


class _AssetSet(Mapping):
    """The asset set by file name; each file's objects are built on first access."""

    def __init__(self, size, seed, n_bfm, n_flame):
        self._args = (size, seed, n_bfm, n_flame)

    def __getitem__(self, name):
        size, seed, n_bfm, n_flame = self._args
        if name in (_MODEL_FILE, _LMK_FILE, _MP_FILE):
            return _build_model(size, seed)[name]
        if name == _BFM_FILE:
            return _build_bfm(size, seed, n_bfm)
        if name == _FLAME_TEX_FILE:
            return _build_flame_texture(size, seed, n_flame)
        raise KeyError(name)

    def __iter__(self):
        return iter(ASSET_NAMES)

    def __len__(self):
        return len(ASSET_NAMES)

    def __repr__(self):
        size, seed, n_bfm, n_flame = self._args
        return f"<synthetic FLAME assets size={size!r} seed={seed} n_tex={n_bfm}/{n_flame}>"


def _check_size_seed(size, seed):
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return int(seed)


def build_assets(
    size: str = 'full', seed: int = 0, *, n_tex: Optional[int] = None
) -> Mapping[str, object]:
    """The synthetic asset set as the real files load: a read-only mapping from file name
    (ASSET_NAMES) to the object that file holds. Each file's objects are built on first
    access, so asking for the model never builds the (large) texture spaces.

    - 'generic_model.pkl': the unpickled model dict (plain numpy arrays, J_regressor a
      scipy.sparse.csc_matrix, kintree_table int64 with 4294967295 as the root's parent;
      'small' adds 'flame_ext_n_shape').
    - 'landmark_embedding.npy': the dict np.load(...)[()] gives (dynamic entries are torch
      tensors, the rest numpy).
    - 'mediapipe_landmark_embedding.npz': dict of its arrays.
    - 'FLAME_albedo_from_BFM.npz': {'MU': (H*W*3,), 'PC': (H*W*3, P)} float64, flat, BGR.
    - 'FLAME_texture.npz': {'mean': (H,W,3), 'tex_dir': (H,W,3,P)} float32 in 0..255,
      'vt' (NVT,2), 'ft' (F,3).

    n_tex: keep only the first n_tex texture components of each texture file (all by
    default; the full-size BFM basis alone is 1.25 GB, so ask for few when texture is not
    the point). Component k is the same whatever n_tex is.

    The objects are cached and shared between calls: do not mutate them (copy what you
    change). size: 'full' or 'small'; seed: int >= 0.
    """
    seed = _check_size_seed(size, seed)
    spec = _size_spec(size)
    n_max = max(spec.n_tex_bfm, spec.n_tex_flame)
    if n_tex is not None:
        check_count('n_tex', n_tex, 1, n_max)
    n_bfm = spec.n_tex_bfm if n_tex is None else min(n_tex, spec.n_tex_bfm)
    n_flame = spec.n_tex_flame if n_tex is None else min(n_tex, spec.n_tex_flame)
    return _AssetSet(size, seed, n_bfm, n_flame)


class _ChumpyCh:
    """Stand-in pickled as `chumpy.ch.Ch` (see _Py2Pickler)."""

    def __init__(self, x):
        # What chumpy's Ch.__getstate__ returns for a plain Ch holding an array.
        self.state = {
            'x': np.ascontiguousarray(x, dtype=np.float64),
            '_dirty_vars': set(),
            '_itr': None,
            '_depends_on_deps': {},
            '_make_dense': False,
            '_make_sparse': False,
        }


class _Py2Pickler(pickle._Pickler):
    """Protocol-2 pickler that writes what FLAME's Python 2 pickler wrote.

    Byte strings and ASCII str go out as Python 2 `str` (SHORT_BINSTRING / BINSTRING,
    which Python 3 reads back with encoding='latin1'), not through `_codecs.encode`. Class
    and function globals are renamed to their old paths: numpy's `_reconstruct` to
    `numpy.core.multiarray`, `csc_matrix` to `scipy.sparse.csc`, _ChumpyCh to
    `chumpy.ch.Ch`. The pure-Python pickler is used because the C one cannot be told how
    to write bytes.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    _RENAMES = {
        np.array(0.0).__reduce__()[0]: ('numpy.core.multiarray', '_reconstruct'),
        scipy.sparse.csc_matrix: ('scipy.sparse.csc', 'csc_matrix'),
        _ChumpyCh: ('chumpy.ch', 'Ch'),
    }

    def __init__(self, file):
        super().__init__(file, protocol=2, fix_imports=True)

    def _save_py2_str(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode('ascii')
        n = len(data)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + data)
        elif n < 2**31:
            self.write(pickle.BINSTRING + struct.pack('<i', n) + data)
        else:
            raise ValueError(f"cannot write a {n}-byte string in a protocol-2 pickle")
        self.memoize(obj)

    def _save_str(self, obj):
        if obj.isascii():
            self._save_py2_str(obj)
        else:
            pickle._Pickler.save_str(self, obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_str

    def reducer_override(self, obj):
        if isinstance(obj, _ChumpyCh):
            return copyreg.__newobj__, (_ChumpyCh,), obj.state
        if isinstance(obj, scipy.sparse.csc_matrix):
            # the instance __dict__ of a csc_matrix, which BUILD restores
            state = {
                '_shape': tuple(int(s) for s in obj.shape),
                'maxprint': 50,
                'indptr': obj.indptr,
                'indices': obj.indices,
                'data': obj.data,
            }
            return copyreg.__newobj__, (type(obj),), state
        return NotImplemented

    def save_global(self, obj, name=None):
        target = self._RENAMES.get(obj)
        if target is None:
            return super().save_global(obj, name)
        self.write(pickle.GLOBAL + f'{target[0]}\n{target[1]}\n'.encode('ascii'))
        self.memoize(obj)


# Arrays that the official model file holds as chumpy objects.
_CHUMPY_KEYS = ('v_template', 'shapedirs', 'posedirs', 'weights', 'J')


def _write_model_pickle(path: pathlib.Path, model: dict, chumpy: bool, kintree_dtype: str):
    model = dict(model)
    model['kintree_table'] = model['kintree_table'].astype(kintree_dtype)
    if chumpy:
        for key in _CHUMPY_KEYS:
            model[key] = _ChumpyCh(model[key])
    with open(path, 'wb') as fh:
        _Py2Pickler(fh).dump(model)


def write_assets(
    out_dir,
    size: str = 'full',
    seed: int = 0,
    *,
    chumpy: bool = False,
    kintree_dtype: str = 'int64',
    model_name: str = _MODEL_FILE,
    texture_layout: str = 'flat',
    n_tex: Optional[int] = None,
) -> pathlib.Path:
    """Writes the synthetic asset set in the real file formats into out_dir (created).

    chumpy: pickle v_template, shapedirs, posedirs, weights and J as `chumpy.ch.Ch`
    objects, as the official file does. kintree_dtype: 'int64' or 'uint32'. model_name:
    file name of the model pickle (generic_model.pkl, FLAME_NEUTRAL.pkl, flame2023.pkl...).
    texture_layout: 'flat' (MU (H*W*3,), PC (H*W*3,P), as published) or 'image'
    (MU (H,W,3), PC (H,W,3,P)) for FLAME_albedo_from_BFM.npz; FLAME_texture.npz is always
    image-shaped. n_tex: write only the first n_tex texture components (default all:
    199 BFM / 200 FLAME for 'full'). Returns out_dir as a Path.
    """
    if kintree_dtype not in ('int64', 'uint32'):
        raise ValueError(f"kintree_dtype must be 'int64' or 'uint32', got {kintree_dtype!r}")
    if texture_layout not in ('flat', 'image'):
        raise ValueError(f"texture_layout must be 'flat' or 'image', got {texture_layout!r}")
    plain = isinstance(model_name, str) and pathlib.Path(model_name).name == model_name
    if not plain or model_name in ('', '.', '..'):
        raise ValueError(f"model_name must be a plain file name, got {model_name!r}")
    assets = build_assets(size, seed, n_tex=n_tex)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    _write_model_pickle(out / model_name, assets[_MODEL_FILE], chumpy, kintree_dtype)
    np.save(out / _LMK_FILE, assets[_LMK_FILE], allow_pickle=True)
    np.savez(out / _MP_FILE, **assets[_MP_FILE])
    bfm = assets[_BFM_FILE]
    if texture_layout == 'image':
        hw = _size_spec(size).tex_hw
        bfm = {'MU': bfm['MU'].reshape(hw, hw, 3), 'PC': bfm['PC'].reshape(hw, hw, 3, -1)}
    np.savez(out / _BFM_FILE, **bfm)
    np.savez(out / _FLAME_TEX_FILE, **assets[_FLAME_TEX_FILE])
    return out


def _main(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m flame_ext.synthetic',
        description='Write the seeded synthetic FLAME asset set in the real file formats.',
    )
    parser.add_argument('--out', required=True, help='output directory (created)')
    parser.add_argument('--size', choices=SIZES, default='full')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--chumpy', action='store_true', help='pickle arrays as chumpy.ch.Ch')
    parser.add_argument('--kintree-dtype', choices=('int64', 'uint32'), default='int64')
    parser.add_argument('--model-name', default=_MODEL_FILE)
    parser.add_argument('--texture-layout', choices=('flat', 'image'), default='flat')
    parser.add_argument('--n-tex', type=int, default=None, help='texture components kept')
    args = parser.parse_args(argv)
    try:
        out = write_assets(
            args.out, args.size, args.seed, chumpy=args.chumpy,
            kintree_dtype=args.kintree_dtype, model_name=args.model_name,
            texture_layout=args.texture_layout, n_tex=args.n_tex,
        )
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    print(out)


if __name__ == '__main__':
    _main()
