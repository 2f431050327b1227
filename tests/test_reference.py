"""Tests of flame_ext.reference (the oracle) and flame_ext.medusa_baseline (the baseline).

Small random models are built inline (V = 30, K = 8, J = 5, P = 36), so float64 gradcheck
stays fast. The reference is checked against independent constructions (matrix_exp,
plain-Python scalar math, explicit index rules) and against medusa's algorithm.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from _samples import yaw_degrees
from flame_ext import medusa_baseline, reference

F64 = torch.float64
PARENTS = [-1, 0, 1, 1, 1]
N_VERTS, N_COMP, N_JOINTS = 30, 8, 5
N_POSE_FEAT = 9 * (N_JOINTS - 1)
N_FACES, N_STATIC, N_CONTOUR, N_BINS = 40, 6, 4, 79


def random_model(dtype=F64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(
            dtype=dtype, device=device
        )

    # Non-negative rows summing to 1, like FLAME's regressor and skinning weights; the
    # temperature keeps them smooth (no single dominant entry).
    j_regressor = torch.softmax(torch.randn(N_JOINTS, N_VERTS, generator=g, dtype=F64), 1)
    weights = torch.softmax(torch.randn(N_VERTS, N_JOINTS, generator=g, dtype=F64), 1)
    return dict(
        v_template=randn(N_VERTS, 3),
        shape_dirs=randn(N_VERTS, 3, N_COMP, scale=0.1),
        pose_dirs=randn(N_POSE_FEAT, 3 * N_VERTS, scale=0.1),
        J_regressor=j_regressor.to(dtype=dtype, device=device),
        parents=torch.tensor(PARENTS, dtype=torch.int64, device=device),
        lbs_weights=weights.to(dtype=dtype, device=device),
    )


def random_pose(batch, n_joints=N_JOINTS, dtype=F64, device="cpu", seed=1):
    """Axis-angle poses with random axes and angles in [0.3, 1] rad (never zero)."""
    g = torch.Generator().manual_seed(seed)
    axis = F.normalize(torch.randn(batch, n_joints, 3, generator=g, dtype=F64), dim=-1)
    angle = 0.3 + 0.7 * torch.rand(batch, n_joints, 1, generator=g, dtype=F64)
    return (axis * angle).reshape(batch, 3 * n_joints).to(dtype=dtype, device=device)


def random_beta(batch, dtype=F64, device="cpu", seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, N_COMP, generator=g, dtype=F64).to(dtype=dtype, device=device)


def random_embedding(dtype=F64, device="cpu", seed=3):
    g = torch.Generator().manual_seed(seed)

    def bary(*shape):
        w = torch.rand(*shape, 3, generator=g, dtype=F64) + 0.1
        return (w / w.sum(-1, keepdim=True)).to(dtype=dtype, device=device)

    def ints(high, *shape):
        return torch.randint(high, shape, generator=g).to(device=device)

    return dict(
        tris=ints(N_VERTS, N_FACES, 3),
        lmk_faces_idx=ints(N_FACES, N_STATIC),
        lmk_bary_coords=bary(N_STATIC),
        dynamic_lmk_faces_idx=ints(N_FACES, N_BINS, N_CONTOUR),
        dynamic_lmk_bary_coords=bary(N_BINS, N_CONTOUR),
    )


def skew(w):
    x, y, z = w.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).unflatten(-1, (3, 3))


def homogeneous(points):
    return torch.cat([points, torch.ones_like(points[..., :1])], -1)


# ---------------------------------------------------------------- rodrigues


def test_rodrigues_matches_matrix_exp():
    g = torch.Generator().manual_seed(0)
    axis = F.normalize(torch.randn(4, 50, 3, generator=g, dtype=F64), dim=-1)
    vecs = axis * (0.3 + 2.7 * torch.rand(4, 50, 1, generator=g, dtype=F64))
    rot = reference.rodrigues(vecs)
    assert rot.shape == (4, 50, 3, 3) and rot.dtype == torch.float64
    # The 1e-8 added to each component changes the angle and the axis by O(1e-8) for
    # angles >= 0.3, so R differs from the exact exponential by at most a few 1e-8.
    torch.testing.assert_close(rot, torch.linalg.matrix_exp(skew(vecs)), rtol=0, atol=1e-7)
    # The same eps leaves the axis of norm 1 - O(1e-8 / angle), so R is orthonormal only
    # to ~1e-7 (angle >= 0.3); a wrong formula would be off by O(1).
    eye = torch.eye(3, dtype=F64)
    torch.testing.assert_close(rot @ rot.mT, eye.expand_as(rot), rtol=0, atol=2e-7)
    torch.testing.assert_close(
        torch.linalg.det(rot), torch.ones(4, 50, dtype=F64), rtol=0, atol=2e-7
    )


def test_rodrigues_epsilon_numerics():
    # A zero vector gets a zero axis, hence exactly I; a tiny vector keeps the eps bias
    # (angle = ||v + 1e-8||), the smplx behaviour other engineers must reproduce.
    zero = torch.zeros(2, 3, dtype=F64)
    assert torch.equal(reference.rodrigues(zero), torch.eye(3, dtype=F64).expand(2, 3, 3))
    v = torch.tensor([0.4, -0.2, 0.7], dtype=F64)
    angle = torch.linalg.vector_norm(v + 1e-8)
    axis = v / angle
    k = skew(axis)
    expected = torch.eye(3, dtype=F64) + torch.sin(angle) * k + (1 - torch.cos(angle)) * (k @ k)
    torch.testing.assert_close(reference.rodrigues(v), expected, rtol=0, atol=1e-15)


def test_rodrigues_matches_baseline(dtype):
    vecs = random_pose(6, dtype=dtype).view(-1, 3)
    torch.testing.assert_close(
        reference.rodrigues(vecs), medusa_baseline._batch_rodrigues(vecs)
    )


# ---------------------------------------------------------------- blend


@pytest.mark.parametrize("base_batch", [None, 1, 3])
def test_blend(base_batch):
    g = torch.Generator().manual_seed(0)
    n, k, p, b = 12, 5, 4, 3
    base = torch.randn(n if base_batch is None else (base_batch, n), generator=g, dtype=F64)
    dirs = torch.randn(n, k, generator=g, dtype=F64)
    coeffs = torch.randn(b, k, generator=g, dtype=F64)
    pose_dirs = torch.randn(p, n, generator=g, dtype=F64)
    pose_coeffs = torch.randn(b, p, generator=g, dtype=F64)
    expected = torch.stack(
        [
            (base if base.dim() == 1 else base[i % base.shape[0]])
            + sum(coeffs[i, c] * dirs[:, c] for c in range(k))
            + sum(pose_coeffs[i, q] * pose_dirs[q] for q in range(p))
            for i in range(b)
        ]
    )
    out = reference.blend(base, dirs, coeffs, pose_dirs, pose_coeffs)
    assert out.shape == (b, n)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-13)
    without_pose = reference.blend(base, dirs, coeffs)
    torch.testing.assert_close(
        without_pose, expected - pose_coeffs @ pose_dirs, rtol=0, atol=1e-13
    )


def test_blend_errors():
    base = torch.randn(6, dtype=F64)
    dirs = torch.randn(6, 2, dtype=F64)
    coeffs = torch.randn(3, 2, dtype=F64)
    with pytest.raises(ValueError, match="pose_dirs and pose_coeffs"):
        reference.blend(base, dirs, coeffs, pose_dirs=torch.randn(4, 6, dtype=F64))
    with pytest.raises(ValueError, match="coeffs"):
        reference.blend(base, dirs, torch.randn(3, 5, dtype=F64))
    with pytest.raises(TypeError, match="coeffs"):
        reference.blend(base, dirs, coeffs.float())


# ---------------------------------------------------------------- lbs


def test_lbs_is_the_composed_steps():
    model = random_model()
    beta, pose = random_beta(3), random_pose(3)
    v, vertex_transforms = reference.lbs(beta, pose, **model)

    # Steps 1, 2 and 4 written independently of the reference's blend.
    v_shaped = model["v_template"] + torch.einsum("vck,bk->bvc", model["shape_dirs"], beta)
    joints = torch.einsum("jv,bvc->bjc", model["J_regressor"], v_shaped)
    pose_3 = pose.view(3, N_JOINTS, 3)
    transforms, pose_feature = reference.rigid_transforms(pose_3, joints, model["parents"])
    rot = reference.rodrigues(pose_3)
    torch.testing.assert_close(
        pose_feature, (rot[:, 1:] - torch.eye(3, dtype=F64)).reshape(3, -1), rtol=0, atol=0
    )
    v_posed = v_shaped + (pose_feature @ model["pose_dirs"]).view(3, N_VERTS, 3)
    v_skin, t_skin = reference.skin(v_posed, transforms, model["lbs_weights"])
    torch.testing.assert_close(v, v_skin, rtol=0, atol=1e-13)
    torch.testing.assert_close(vertex_transforms, t_skin, rtol=0, atol=1e-13)

    # T_v @ [v_posed; 1] == v, and T_v's bottom row is [0, 0, 0, 1] (weights sum to 1).
    moved = (vertex_transforms @ homogeneous(v_posed).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(moved[..., :3], v, rtol=0, atol=1e-13)
    bottom = torch.tensor([0, 0, 0, 1], dtype=F64).expand(3, N_VERTS, 4)
    torch.testing.assert_close(vertex_transforms[..., 3, :], bottom, rtol=0, atol=1e-15)

    v_only, none = reference.lbs(beta, pose, **model, return_vertex_transforms=False)
    assert none is None
    torch.testing.assert_close(v_only, v, rtol=0, atol=1e-13)


def test_rigid_transforms_chain():
    """A_j (the chain with each translation replaced by t_j - R^w_j J_j) written out joint
    by joint with matrix_exp rotations."""
    model = random_model()
    pose = random_pose(2).view(2, N_JOINTS, 3)
    joints = torch.randn(2, N_JOINTS, 3, dtype=F64)
    transforms, _ = reference.rigid_transforms(pose, joints, model["parents"])
    assert transforms.shape == (2, N_JOINTS, 4, 4)
    for b in range(2):
        world = []
        for j, parent in enumerate(PARENTS):
            local = torch.eye(4, dtype=F64)
            local[:3, :3] = torch.linalg.matrix_exp(skew(pose[b, j]))
            local[:3, 3] = joints[b, j] - (joints[b, parent] if parent >= 0 else 0)
            world.append(local if parent < 0 else world[parent] @ local)
            expected = world[j].clone()
            expected[:3, 3] -= world[j][:3, :3] @ joints[b, j]
            torch.testing.assert_close(transforms[b, j], expected, rtol=0, atol=1e-7)


def test_lbs_zero_pose_gives_shaped_mesh():
    model = random_model()
    beta = random_beta(2)
    zero_pose = torch.zeros(2, 3 * N_JOINTS, dtype=F64)
    v, vertex_transforms = reference.lbs(beta, zero_pose, **model)
    v_shaped = model["v_template"] + torch.einsum("vck,bk->bvc", model["shape_dirs"], beta)
    # R_j is exactly I (zero axis), so only the rounding of the chain's translations
    # (J_0 + sum of joint differences - J_j) remains.
    torch.testing.assert_close(v, v_shaped, rtol=0, atol=1e-14)
    eye = torch.eye(4, dtype=F64).expand_as(vertex_transforms)
    torch.testing.assert_close(vertex_transforms, eye, rtol=0, atol=1e-14)


def test_lbs_global_rotation_rotates_about_root_joint():
    model = random_model()
    beta = random_beta(2)
    pose = torch.zeros(2, 3 * N_JOINTS, dtype=F64)
    pose[:, :3] = torch.tensor([[0.3, -0.8, 0.5], [-0.9, 0.2, 0.1]], dtype=F64)
    v, _ = reference.lbs(beta, pose, **model)
    v_shaped = model["v_template"] + torch.einsum("vck,bk->bvc", model["shape_dirs"], beta)
    root = (model["J_regressor"] @ v_shaped)[:, :1]
    rot = torch.linalg.matrix_exp(skew(pose[:, :3]))
    expected = (v_shaped - root) @ rot.mT + root
    torch.testing.assert_close(v, expected, rtol=0, atol=1e-7)


def test_skin_without_vertex_transforms():
    model = random_model()
    v_posed = torch.randn(3, N_VERTS, 3, dtype=F64)
    joints = torch.randn(3, N_JOINTS, 3, dtype=F64)
    pose = random_pose(3).view(3, N_JOINTS, 3)
    transforms, _ = reference.rigid_transforms(pose, joints, model["parents"])
    weights = model["lbs_weights"]
    v, vertex_transforms = reference.skin(v_posed, transforms, weights)
    v_only, none = reference.skin(v_posed, transforms, weights, write_vertex_transforms=False)
    assert none is None and vertex_transforms.shape == (3, N_VERTS, 4, 4)
    torch.testing.assert_close(v_only, v, rtol=0, atol=1e-14)


def test_lbs_beta_broadcast():
    model = random_model()
    beta, pose = random_beta(1), random_pose(4)
    v, vertex_transforms = reference.lbs(beta, pose, **model)
    v_expanded, t_expanded = reference.lbs(beta.expand(4, -1), pose, **model)
    assert v.shape == (4, N_VERTS, 3)
    torch.testing.assert_close(v, v_expanded, rtol=0, atol=1e-14)
    torch.testing.assert_close(vertex_transforms, t_expanded, rtol=0, atol=1e-14)


def test_lbs_errors():
    model = random_model()
    with pytest.raises(ValueError, match="pose"):
        reference.lbs(random_beta(2), random_pose(2)[:, :12], **model)
    with pytest.raises(ValueError, match="beta"):
        reference.lbs(random_beta(2), random_pose(3), **model)
    with pytest.raises(TypeError, match="pose"):
        reference.lbs(random_beta(2), random_pose(2).float(), **model)
    with pytest.raises(TypeError, match="parents"):
        model["parents"] = model["parents"].int()
        reference.lbs(random_beta(2), random_pose(2), **model)


def test_lbs_float32_matches_float64():
    model64, model32 = random_model(), random_model(torch.float32)
    beta, pose = random_beta(5), random_pose(5)
    v64, t64 = reference.lbs(beta, pose, **model64)
    v32, t32 = reference.lbs(beta.float(), pose.float(), **model32)
    assert v32.dtype == t32.dtype == torch.float32
    # The inputs are the float64 ones rounded (relative 6e-8), values are O(1) (|v| <= 5
    # here). Each output is a short sum: 8 shape terms, 36 pose correctives, a 3-deep
    # chain of 4x4 products, a 5-term blend, so ~60 roundings of eps32 = 1.2e-7 on terms
    # of size <= ~5: a worst-case bound of ~4e-5 (typical errors are ~1e-6). A float32
    # path that lost precision (e.g. through a half cast) would exceed it by far.
    assert v64.abs().max() < 5
    torch.testing.assert_close(v32.double(), v64, rtol=0, atol=4e-5)
    torch.testing.assert_close(t32.double(), t64, rtol=0, atol=4e-5)


# ---------------------------------------------------------------- vs medusa


# Both sides compute in float64 and differ only in summation order, so they agree to
# ~1e-15; rtol 1e-10 is far inside the 1e-6 contract and also catches a silent float32
# downcast on either side (which would show as ~1e-7 relative).
F64_CLOSE = dict(rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batch", [1, 3, 7])
@pytest.mark.parametrize("shared_shape", [False, True], ids=["per-sample", "shared"])
def test_lbs_matches_medusa(batch, shared_shape, device):
    model = random_model(device=device)
    beta = random_beta(1 if shared_shape else batch, device=device)
    pose = random_pose(batch, device=device)
    v, vertex_transforms = reference.lbs(beta, pose, **model)
    v_medusa, t_medusa = medusa_baseline.lbs(beta, pose, **model)
    assert v.dtype == v_medusa.dtype == torch.float64
    torch.testing.assert_close(v, v_medusa, **F64_CLOSE)
    torch.testing.assert_close(vertex_transforms, t_medusa, **F64_CLOSE)


def test_lbs_gradients_match_medusa():
    model = random_model()
    beta = random_beta(3).requires_grad_()
    pose = random_pose(3).requires_grad_()
    g = torch.Generator().manual_seed(9)
    grad_v = torch.randn(3, N_VERTS, 3, generator=g, dtype=F64)
    grad_t = torch.randn(3, N_VERTS, 4, 4, generator=g, dtype=F64)
    grads = []
    for impl in (reference, medusa_baseline):
        v, vertex_transforms = impl.lbs(beta, pose, **model)
        loss = (v * grad_v).sum() + (vertex_transforms * grad_t).sum()
        grads.append(torch.autograd.grad(loss, (beta, pose)))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, **F64_CLOSE)


def medusa_bins(poses):
    """Bins from the baseline's Euler -> 6D -> matrix path: a table whose row b is [b]."""
    table = torch.arange(N_BINS).view(N_BINS, 1)
    bary = torch.zeros(N_BINS, 1, 3, dtype=poses.dtype)
    faces, _ = medusa_baseline._find_dynamic_lmk_idx_and_bcoords(poses, table, bary)
    return faces[:, 0]


def test_contour_bins_match_medusa():
    g = torch.Generator().manual_seed(4)
    poses = (torch.rand(400, 15, generator=g, dtype=F64) * 2 - 1) * 1.2
    away_from_ties = ((yaw_degrees(poses, "medusa") % 1) - 0.5).abs() > 1e-6
    bins = reference.contour_bins(poses, "medusa")
    assert bins.dtype == torch.int64
    assert len(set(bins.tolist())) > 30  # the sample spans most of the bins
    assert torch.equal(bins[away_from_ties], medusa_bins(poses)[away_from_ties])


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_landmarks_match_medusa(batch):
    emb = random_embedding()
    v = torch.randn(batch, N_VERTS, 3, dtype=F64)
    poses = random_pose(batch, seed=batch)
    ours = reference.landmarks(v, poses, **emb)
    theirs = medusa_baseline.landmarks(v, poses, **emb)
    assert ours.shape == (batch, N_CONTOUR + N_STATIC, 3)
    torch.testing.assert_close(ours, theirs, **F64_CLOSE)

    static = {k: emb[k] for k in ("tris", "lmk_faces_idx", "lmk_bary_coords")}
    plain = reference.landmarks(v, None, **static)
    assert plain.shape == (batch, N_STATIC, 3)
    plain_medusa = medusa_baseline.landmarks(v, None, **static)
    torch.testing.assert_close(plain, plain_medusa, **F64_CLOSE)
    torch.testing.assert_close(plain, ours[:, N_CONTOUR:], rtol=0, atol=0)


def test_landmarks_explicit():
    """Landmark l = sum_k bary[l, k] v[tris[face[l], k]], contour rows from the bin."""
    emb = random_embedding()
    v = torch.randn(3, N_VERTS, 3, dtype=F64)
    poses = random_pose(3, seed=11)
    for rule in reference.CONTOUR_RULES:
        out = reference.landmarks(v, poses, **emb, contour_rule=rule)
        bins = reference.contour_bins(poses, rule)
        for b in range(3):
            faces = list(emb["dynamic_lmk_faces_idx"][bins[b]]) + list(emb["lmk_faces_idx"])
            contour_bary = emb["dynamic_lmk_bary_coords"][bins[b]]
            bary = torch.cat([contour_bary, emb["lmk_bary_coords"]])
            for l, face in enumerate(faces):
                expected = sum(bary[l, k] * v[b, emb["tris"][face, k]] for k in range(3))
                torch.testing.assert_close(out[b, l], expected, rtol=0, atol=1e-14)


def test_landmarks_errors():
    emb = random_embedding()
    v = torch.randn(2, N_VERTS, 3, dtype=F64)
    with pytest.raises(ValueError, match="poses"):
        reference.landmarks(v, None, **emb)
    with pytest.raises(ValueError, match="dynamic_lmk_faces_idx"):
        reference.landmarks(v, random_pose(2), **{**emb, "dynamic_lmk_bary_coords": None})
    with pytest.raises(ValueError, match="rule"):
        reference.landmarks(v, random_pose(2), **emb, contour_rule="smirk")


# ---------------------------------------------------------------- contour bins


def _matmul3(a, b):
    return [[sum(a[i][k] * b[k][j] for k in range(3)) for j in range(3)] for i in range(3)]


def _euler_py(a0, a1, a2):
    (c0, s0), (c1, s1), (c2, s2) = ((math.cos(a), math.sin(a)) for a in (a0, a1, a2))
    rx = [[1, 0, 0], [0, c0, -s0], [0, s0, c0]]
    ry = [[c1, 0, s1], [0, 1, 0], [-s1, 0, c1]]
    rz = [[c2, -s2, 0], [s2, c2, 0], [0, 0, 1]]
    return _matmul3(_matmul3(rx, ry), rz)


def _rodrigues_py(v):
    angle = math.sqrt(sum((c + 1e-8) ** 2 for c in v))
    x, y, z = (c / angle for c in v)
    k = [[0, -z, y], [z, 0, -x], [-y, x, 0]]
    k2 = _matmul3(k, k)
    s, c = math.sin(angle), math.cos(angle)
    return [[(i == j) + s * k[i][j] + (1 - c) * k2[i][j] for j in range(3)] for i in range(3)]


def scalar_bin(pose_global, pose_neck, rule):
    """The contour rule for one sample, in plain Python floats. Also returns the
    unrounded yaw so that callers can skip exact .5 ties."""
    to_matrix = (lambda p: _euler_py(*p)) if rule == "medusa" else _rodrigues_py
    rel = _matmul3(to_matrix(pose_global), to_matrix(pose_neck))
    yaw = math.degrees(math.atan2(-rel[2][0], math.hypot(rel[0][0], rel[1][0])))
    if rule == "medusa":
        yaw = -yaw
    y = round(min(yaw, 39.0))  # Python's round is half-to-even, like torch.round
    if y >= 0:
        return y, yaw
    return (39 - y if y >= -39 else 78), yaw


@pytest.mark.parametrize("rule", reference.CONTOUR_RULES)
def test_contour_bins_yaw_sweep(rule):
    # Steps of 0.25 deg offset by 0.1: every integer yaw from -90 to 90 is visited and no
    # sample sits on a .5 tie.
    yaw = torch.deg2rad(torch.arange(-90.0, 90.0, 0.25, dtype=F64) + 0.1)
    n = yaw.shape[0]
    g = torch.Generator().manual_seed(5)
    poses = torch.zeros(n, 15, dtype=F64)
    poses[:, 1] = yaw  # Euler a1 for medusa, the y component of the axis for deca
    bins = reference.contour_bins(poses, rule)
    assert set(bins.tolist()) == set(range(N_BINS))  # pure yaw reaches every bin

    # With the other rotation components and the neck random, checked sample by sample.
    poses[:, [0, 2]] = (torch.rand(n, 2, generator=g, dtype=F64) - 0.5) * 0.6
    poses[:, 3:] = (torch.rand(n, 12, generator=g, dtype=F64) - 0.5) * 0.6
    bins = reference.contour_bins(poses, rule).tolist()
    checked = 0
    for i in range(n):
        expected, raw = scalar_bin(poses[i, :3].tolist(), poses[i, 3:6].tolist(), rule)
        if abs(raw % 1 - 0.5) < 1e-6:
            continue
        assert bins[i] == expected, (i, raw)
        checked += 1
    assert checked > n - 5


@pytest.mark.parametrize(
    "yaw_deg, medusa_bin, deca_bin",
    [
        (0.0, 0, 0),
        (-10.0, 10, 49),  # medusa negates the yaw
        (1.0, 40, 1),  # y = -1 -> 40 (medusa); y = +1 -> 1 (deca)
        (-39.2, 39, 78),  # y = 39.2 -> 39
        (-50.0, 39, 78),  # the +39 clamp; y = -50 < -39 -> 78
        (39.0, 78, 39),  # y = -39 -> 39 - (-39) = 78
        (45.0, 78, 39),
    ],
)
def test_contour_bins_known_values(yaw_deg, medusa_bin, deca_bin):
    poses = torch.zeros(1, 15, dtype=F64)
    poses[0, 1] = math.radians(yaw_deg)
    assert reference.contour_bins(poses, "medusa").tolist() == [medusa_bin]
    assert reference.contour_bins(poses, "deca").tolist() == [deca_bin]
    assert reference.contour_bins(poses.float(), "medusa").tolist() == [medusa_bin]


def test_contour_bins_nan_and_errors():
    poses = torch.full((2, 15), float("nan"), dtype=F64)
    assert reference.contour_bins(poses).tolist() == [-1, -1]  # no bin: NaN contour
    poses = torch.zeros(3, 15, dtype=F64)
    poses[0, 0], poses[1, 5], poses[2, 6] = float("inf"), float("nan"), float("nan")
    assert reference.contour_bins(poses).tolist() == [-1, -1, 0]  # the jaw is not read
    with pytest.raises(ValueError, match="rule"):
        reference.contour_bins(poses, rule="pytorch3d")
    with pytest.raises(ValueError, match="poses"):
        reference.contour_bins(poses[:, :3])


def test_euler_xyz_to_matrix():
    angles = torch.tensor([[0.3, -0.7, 1.1], [2.0, 0.1, -0.4]], dtype=F64)
    rot = reference.euler_xyz_to_matrix(angles)
    for b in range(2):
        expected = torch.tensor(_euler_py(*angles[b].tolist()), dtype=F64)
        torch.testing.assert_close(rot[b], expected, rtol=0, atol=1e-15)


# ---------------------------------------------------------------- texture


def random_texture(height, width, n_tex, batch, seed=6):
    g = torch.Generator().manual_seed(seed)
    n = height * width * 3
    mean = torch.rand(n, generator=g, dtype=F64)
    basis = torch.randn(n, n_tex, generator=g, dtype=F64)
    code = torch.randn(batch, n_tex, generator=g, dtype=F64)
    return mean, basis, code


@pytest.mark.parametrize("size", [(8, 8), (512, 512), (6, 10)])
def test_texture_nearest_rule_and_channel_flip(size):
    height, width = size
    mean, basis, code = random_texture(height, width, 2, 2)
    out = reference.texture(mean, basis, code, height, width)
    assert out.shape == (2, 3, 256, 256)
    image = (mean + code @ basis.T).view(2, height, width, 3)
    rows = torch.tensor([i * height // 256 for i in range(256)])
    cols = torch.tensor([j * width // 256 for j in range(256)])
    for c in range(3):
        expected = image[:, rows][:, :, cols][..., 2 - c]
        torch.testing.assert_close(out[:, c], expected, rtol=0, atol=0)
    # The same rule as F.interpolate's default 'nearest'.
    resized = F.interpolate(image.permute(0, 3, 1, 2), [256, 256])
    torch.testing.assert_close(out, resized.flip(1), rtol=0, atol=0)


def test_texture_spot_values():
    mean, basis, code = random_texture(8, 8, 3, 1)
    out = reference.texture(mean, basis, code, 8, 8)
    image = mean + code[0] @ basis.T
    # Output (c=0, i=100, j=37) reads source pixel (100*8//256, 37*8//256) = (3, 1),
    # channel 2: flat index (3*8 + 1)*3 + 2 = 77.
    assert out[0, 0, 100, 37] == image[77]
    assert out[0, 2, 255, 0] == image[(7 * 8 + 0) * 3 + 0]


@pytest.mark.parametrize(
    "size, out_size", [((8, 8), 256), ((512, 512), 256), ((6, 10), 16)]
)
def test_texture_gather_index_identity(size, out_size):
    height, width = size
    mean, basis, code = random_texture(height, width, 3, 2)
    idx = reference.texture_gather_index(height, width, out_size)
    assert idx.dtype == torch.int64 and idx.shape == (3 * out_size * out_size,)
    gathered = (mean[idx] + code @ basis[idx].T).view(2, 3, out_size, out_size)
    out = reference.texture(mean, basis, code, height, width, out_size)
    torch.testing.assert_close(out, gathered, rtol=0, atol=1e-13)


@pytest.mark.parametrize("size", [(8, 8), (512, 512)])
def test_texture_matches_medusa(size):
    height, width = size
    mean, basis, code = random_texture(height, width, 2, 3)
    ours = reference.texture(mean, basis, code, height, width)
    theirs = medusa_baseline.texture(
        mean.view(1, 1, -1), basis.unsqueeze(0), code, height, width
    )
    torch.testing.assert_close(ours, theirs, **F64_CLOSE)


def test_texture_errors():
    mean, basis, code = random_texture(8, 8, 2, 2)
    with pytest.raises(ValueError, match="mean"):
        reference.texture(mean, basis, code, 8, 9)
    with pytest.raises(ValueError, match="texcode"):
        reference.texture(mean, basis, code[:, :1], 8, 8)


# ---------------------------------------------------------------- gradients


def test_gradcheck_lbs():
    model = random_model()
    beta = random_beta(2).requires_grad_()
    pose = random_pose(2).requires_grad_()
    assert torch.autograd.gradcheck(lambda b, p: reference.lbs(b, p, **model), (beta, pose))
    assert torch.autograd.gradcheck(
        lambda b, p: reference.lbs(b, p, **model, return_vertex_transforms=False)[0],
        (beta[:1].detach().requires_grad_(), pose),
    )


def test_gradcheck_rigid_transforms():
    parents = torch.tensor(PARENTS)
    pose = random_pose(2).view(2, N_JOINTS, 3).requires_grad_()
    joints = torch.randn(2, N_JOINTS, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda p, j: reference.rigid_transforms(p, j, parents), (pose, joints)
    )


@pytest.mark.parametrize("write", [True, False])
def test_gradcheck_skin(write):
    model = random_model()
    v_posed = torch.randn(2, N_VERTS, 3, dtype=F64, requires_grad=True)
    transforms = torch.randn(2, N_JOINTS, 4, 4, dtype=F64, requires_grad=True)

    def fn(v, t):
        out, vertex_transforms = reference.skin(v, t, model["lbs_weights"], write)
        return (out, vertex_transforms) if write else out

    assert torch.autograd.gradcheck(fn, (v_posed, transforms))


def test_gradcheck_blend():
    g = torch.Generator().manual_seed(7)
    base = torch.randn(10, generator=g, dtype=F64)
    dirs = torch.randn(10, 4, generator=g, dtype=F64)
    pose_dirs = torch.randn(3, 10, generator=g, dtype=F64)
    coeffs = torch.randn(2, 4, generator=g, dtype=F64, requires_grad=True)
    pose_coeffs = torch.randn(2, 3, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda c, pc: reference.blend(base, dirs, c, pose_dirs, pc), (coeffs, pose_coeffs)
    )


def test_gradcheck_landmarks():
    emb = random_embedding()
    poses = random_pose(2, seed=12)
    v = torch.randn(2, N_VERTS, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: reference.landmarks(x, poses, **emb), (v,))


def test_landmarks_no_gradient_to_poses():
    emb = random_embedding()
    poses = random_pose(2, seed=12).requires_grad_()
    v = torch.randn(2, N_VERTS, 3, dtype=F64, requires_grad=True)
    out = reference.landmarks(v, poses, **emb)
    grad_v, grad_poses = torch.autograd.grad(out.sum(), (v, poses), allow_unused=True)
    assert grad_poses is None and grad_v.abs().sum() > 0


def test_gradcheck_texture():
    mean, basis, code = random_texture(4, 6, 3, 2)
    code.requires_grad_()
    # A small out_size: gradcheck builds the Jacobian one output element at a time.
    assert torch.autograd.gradcheck(
        lambda c: reference.texture(mean, basis, c, 4, 6, out_size=8), (code,)
    )


# ---------------------------------------------------------------- torch.compile


def test_compiles_without_graph_breaks():
    """fullgraph=True fails on any graph break (.item(), data-dependent Python control
    flow), the things that also break CUDA-graph capture. The 'eager' backend checks the
    trace without paying for code generation."""
    torch._dynamo.reset()
    model = random_model()
    beta, pose = random_beta(2), random_pose(2)
    emb = random_embedding()
    v = torch.randn(2, N_VERTS, 3, dtype=F64)
    mean, basis, code = random_texture(8, 8, 2, 2)
    compiled = lambda fn: torch.compile(fn, backend="eager", fullgraph=True)  # noqa: E731
    torch.testing.assert_close(
        compiled(reference.lbs)(beta, pose, **model), reference.lbs(beta, pose, **model)
    )
    torch.testing.assert_close(
        compiled(reference.landmarks)(v, pose, **emb), reference.landmarks(v, pose, **emb)
    )
    torch.testing.assert_close(
        compiled(reference.texture)(mean, basis, code, 8, 8),
        reference.texture(mean, basis, code, 8, 8),
    )
