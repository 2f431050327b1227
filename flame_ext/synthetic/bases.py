"""The synthetic model's arrays and landmark embeddings, as generic_model.pkl and the
landmark files hold them.

Bases are random smooth fields (low-frequency cosines of the vertex position), made
orthogonal within the shape and within the expression block like PCA columns, component k
scaled to 4 mm / (1 + k) RMS per unit coefficient; expression fields are confined to the
face. Pose correctives are smooth fields, 2 mm RMS, where each joint moves the skin.
Skinning weights are smooth: neck base -> root, lower face -> jaw, eye regions -> eyes, the
rest -> neck. J == J_regressor @ v_template, with J_regressor a sparse nonnegative convex
combination (few vertices per joint) placing root, neck, jaw and eyes where a head has
them. Landmarks are placed in the surface's (angle, height) parameter domain, so every
face index is valid and barycentrics are positive and sum to 1. The template carries a
seeded 1 mm perturbation.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.sparse
from scipy.special import expit as _sigmoid
import torch

from .mesh import (
    _PSI_PER_X, _STREAM_EXPR, _STREAM_MEDIAPIPE, _STREAM_POSE, _STREAM_SHAPE, _STREAM_TEMPLATE,
    _THETA_MAX, _face_to_param, _locate, _mesh, _profile, _rng, _size_spec, _smoothstep,
    _surface,
)

_MODEL_FILE = 'generic_model.pkl'
_LMK_FILE = 'landmark_embedding.npy'
_MP_FILE = 'mediapipe_landmark_embedding.npz'

_NUM_JOINTS = 5
_PARENTS = (-1, 0, 1, 1, 1)  # root, neck, jaw, left eye, right eye
_ROOT_PARENT_U32 = 4294967295  # uint32(-1): how FLAME's kintree_table marks the root
_NUM_POSE_FEATURES = 9 * (_NUM_JOINTS - 1)
_NUM_CONTOUR_LMK = 17
_NUM_YAW_BINS = 79
_NUM_MEDIAPIPE_LMK = 105
_MEDIAPIPE_MESH_SIZE = 468

_EYE_FACE_XY = ((0.4, 0.32), (-0.4, 0.32))  # left eye (+x), right eye
_EYEBALL_RADIUS = 0.012
_TEMPLATE_NOISE = 1e-3  # RMS of the seeded perturbation of the template
_BASIS_RMS = 4e-3  # RMS vertex displacement of component 0 per unit coefficient
_POSE_RMS = 2e-3


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
