"""The synthetic head: size variants, the surface and its triangulation, UVs, point location.

The head is a surface of revolution with elliptic cross-sections (a deformed UV sphere,
y up, face towards +z, subject's left at +x, metres) that narrows into a neck, plus
smooth bumps for nose, chin, lips, brows, ears and eye sockets. Vertex 0 is the top pole;
then latitude rings run down to an open neck boundary. A pole fan over ring 1 gives n_1
triangles and the strip between rings of n_i and n_{i+1} vertices gives n_i + n_{i+1}, so
F = 2 (V - 1) - n_last. FLAME's V=5023, F=9976 thus need a neck ring of exactly 68
vertices (a closed genus-0 mesh would need F = 2V - 4 = 10042); the other ring sizes
follow the circumference and are nudged until they sum to 5022. Triangles are
consistently oriented, normals outwards.

Every part of the asset set draws from `_rng(seed, stream)`, one stream per part, so
parts are independent of each other.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

SIZES = ('full', 'small')

# Random streams, one per part, so that parts are independent of each other.
_STREAM_TEMPLATE, _STREAM_SHAPE, _STREAM_EXPR, _STREAM_POSE = 1, 2, 3, 4
_STREAM_MEDIAPIPE, _STREAM_BFM, _STREAM_FLAME_TEX = 5, 6, 7
_STREAM_ALBEDOMM_DIFFUSE, _STREAM_ALBEDOMM_SPECULAR = 8, 9

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
    n_tex_albedomm: int  # AlbedoMM's diffuse and specular components (145 published)


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
        return _SizeSpec(_full_ring_sizes(), 300, 100, 8, 512, 199, 200, 12, 145)
    if size == 'small':
        return _SizeSpec((5, 9, 11, 12, 11, 10, 8), 6, 4, 3, 8, 5, 6, 8, 7)
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


def _rng(seed, stream):
    return np.random.default_rng([seed, stream])
