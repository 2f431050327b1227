"""Tests of the skin op family: rigid_transforms and skin, forward and backward.

The compiled ops are compared with flame_ext.reference (the oracle), their gradients with
torch.autograd.gradcheck in float64 and with autograd through the reference; then the
registrations (opcheck, torch.compile), argument errors, NaN propagation and determinism.
"""

import pytest
import torch

from flame_ext import reference

FLAME_PARENTS = [-1, 0, 1, 1, 1]

# float32 tolerances. rigid_transforms: a rotation entry is a few products of sin/cos
# (|error| ~ eps32 * |angle| for the argument reduction, up to ~1e-6 at 10 rad) pushed
# through a chain of at most 4 3x3 products and translations of magnitude ~3: 2e-5 is a
# few times that. skin: T_v sums J products w * A (|.| <= ~3) and v adds 3 more products
# with |v_posed| ~ 1: ~20 roundings of eps32 * 3, so 1e-5.
F32_CHAIN_TOL = 2e-5
F32_SKIN_TOL = 1e-5


def _ops():
    from types import SimpleNamespace

    from flame_ext._ops import rigid_transforms, skin

    return SimpleNamespace(rigid_transforms=rigid_transforms.rigid_transforms, skin=skin.skin)


def _parents(values, device="cpu"):
    return torch.tensor(values, dtype=torch.int64, device=device)


def _random_parents(num_joints, gen):
    """A random valid tree: parents[0] = -1, parents[j] uniform in [0, j)."""
    values = [-1] + [int(torch.randint(0, j, (1,), generator=gen)) for j in range(1, num_joints)]
    return values


def _chain_inputs(batch, num_joints, dtype, device, scale=0.7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pose = torch.randn(batch, num_joints, 3, generator=gen, dtype=torch.float64) * scale
    joints = torch.randn(batch, num_joints, 3, generator=gen, dtype=torch.float64)
    return pose.to(device, dtype), joints.to(device, dtype)


def _skin_inputs(batch, num_verts, num_joints, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    v_posed = torch.randn(batch, num_verts, 3, generator=gen, dtype=torch.float64)
    # A full 4x4 (bottom row not 0 0 0 1): the op must treat it as given.
    transforms = torch.randn(batch, num_joints, 4, 4, generator=gen, dtype=torch.float64)
    weights = torch.rand(num_verts, num_joints, generator=gen, dtype=torch.float64) + 0.1
    weights = weights / weights.sum(1, keepdim=True)
    return tuple(x.to(device, dtype) for x in (v_posed, transforms, weights))


def _assert_close_to_reference(got, want, dtype, f32_tol):
    """float64: agreement to rounding (1e-10 relative to the magnitudes involved);
    float32 (want computed in float64 from the same inputs): f32_tol."""
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(got.double(), want, rtol=f32_tol, atol=f32_tol)


# rigid_transforms: forward


@pytest.mark.parametrize("batch", [0, 1, 3, 300])
def test_rigid_transforms_matches_reference(ops, device, dtype, batch):
    pose, joints = _chain_inputs(batch, 5, dtype, device)
    parents = _parents(FLAME_PARENTS)
    transforms, feature = _ops().rigid_transforms(pose, joints, parents)
    assert transforms.shape == (batch, 5, 4, 4) and feature.shape == (batch, 36)
    assert transforms.dtype == dtype and transforms.device == pose.device
    want_t, want_f = reference.rigid_transforms(pose.double(), joints.double(), parents)
    _assert_close_to_reference(transforms, want_t, dtype, F32_CHAIN_TOL)
    _assert_close_to_reference(feature, want_f, dtype, F32_CHAIN_TOL)


@pytest.mark.parametrize("scale", [1e-4, 3.0, 10.0])
def test_rigid_transforms_angles(ops, device, dtype, scale):
    """Small angles, and large ones (3 and 10 rad, beyond pi: the formula has no branch)."""
    pose, joints = _chain_inputs(4, 5, dtype, device, scale=1.0, seed=1)
    pose = pose / pose.norm(dim=-1, keepdim=True) * scale
    parents = _parents(FLAME_PARENTS)
    transforms, feature = _ops().rigid_transforms(pose, joints, parents)
    want_t, want_f = reference.rigid_transforms(pose.double(), joints.double(), parents)
    _assert_close_to_reference(transforms, want_t, dtype, F32_CHAIN_TOL)
    _assert_close_to_reference(feature, want_f, dtype, F32_CHAIN_TOL)


def test_rigid_transforms_zero_pose_is_identity(ops, device, dtype):
    """pose = 0 takes the epsilon path: the rotations are exactly I, the features exactly
    0, and A_j moves nothing (translation 0 up to the rounding of J_j - J_p + J_p)."""
    _, joints = _chain_inputs(2, 5, dtype, device)
    pose = torch.zeros(2, 5, 3, dtype=dtype, device=device)
    transforms, feature = _ops().rigid_transforms(pose, joints, _parents(FLAME_PARENTS))
    eye = torch.eye(3, dtype=dtype, device=device).expand(2, 5, 3, 3)
    assert torch.equal(transforms[..., :3, :3], eye)
    assert torch.equal(feature, torch.zeros_like(feature))
    bottom = torch.tensor([0, 0, 0, 1], dtype=dtype, device=device).expand(2, 5, 4)
    assert torch.equal(transforms[:, :, 3], bottom)
    tol = 10 * torch.finfo(dtype).eps * joints.abs().max()
    assert transforms[..., :3, 3].abs().max() <= tol


@pytest.mark.parametrize("num_joints", [1, 2, 7, 16])
def test_rigid_transforms_random_trees(ops, device, dtype, num_joints):
    gen = torch.Generator().manual_seed(num_joints)
    for seed in range(3):
        values = _random_parents(num_joints, gen)
        pose, joints = _chain_inputs(5, num_joints, dtype, device, seed=seed)
        parents = _parents(values)
        transforms, feature = _ops().rigid_transforms(pose, joints, parents)
        assert feature.shape == (5, 9 * (num_joints - 1))
        want_t, want_f = reference.rigid_transforms(pose.double(), joints.double(), parents)
        # Deeper chains (up to 15 products at J = 16) accumulate proportionally more.
        tol = F32_CHAIN_TOL * max(1, num_joints / 4)
        _assert_close_to_reference(transforms, want_t, dtype, tol)
        _assert_close_to_reference(feature, want_f, dtype, tol)


def test_rigid_transforms_parents_on_device_and_expanded_joints(ops, device):
    """parents may live on the device of pose; joints may be an expanded view."""
    pose, joints = _chain_inputs(4, 5, torch.float64, device)
    joints = joints[:1].expand(4, 5, 3)
    parents = _parents(FLAME_PARENTS, device)
    transforms, feature = _ops().rigid_transforms(pose, joints, parents)
    want_t, want_f = reference.rigid_transforms(pose, joints, parents)
    torch.testing.assert_close(transforms, want_t, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(feature, want_f, rtol=1e-10, atol=1e-12)


# rigid_transforms: gradients


@pytest.mark.parametrize(
    "parents_values,scale",
    [(FLAME_PARENTS, 0.7), (FLAME_PARENTS, 0.0), (FLAME_PARENTS, 10.0), ([-1, 0, 0, 2, 1, 4], 2.0)],
    ids=["flame", "zero-pose", "10rad", "tree"],
)
def test_rigid_transforms_gradcheck(ops, device, parents_values, scale):
    num_joints = len(parents_values)
    pose, joints = _chain_inputs(2, num_joints, torch.float64, device, scale=scale, seed=3)
    pose.requires_grad_(True)
    joints.requires_grad_(True)
    parents = _parents(parents_values)
    fn = lambda p, j: _ops().rigid_transforms(p, j, parents)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (pose, joints))


@pytest.mark.parametrize("scale", [0.0, 1e-3, 1.0, 3.0, 10.0])
def test_rigid_transforms_grad_matches_reference(ops, device, scale):
    """The hand-written reverse mode against autograd through the reference, tighter than
    gradcheck's finite differences; scale 0 is the exact-zero (epsilon) path."""
    pose, joints = _chain_inputs(3, 5, torch.float64, device, scale=scale, seed=4)
    parents = _parents(FLAME_PARENTS)
    gen = torch.Generator().manual_seed(5)
    grad_t = torch.randn(3, 5, 4, 4, generator=gen, dtype=torch.float64).to(device)
    grad_f = torch.randn(3, 36, generator=gen, dtype=torch.float64).to(device)

    def grads(fn):
        p = pose.clone().requires_grad_(True)
        j = joints.clone().requires_grad_(True)
        t, f = fn(p, j, parents)
        return torch.autograd.grad((t, f), (p, j), (grad_t, grad_f))

    got = grads(_ops().rigid_transforms)
    want = grads(reference.rigid_transforms)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_rigid_transforms_backward_ignores_bottom_row(ops, device):
    """The bottom row of A_j is constant, so its gradient reaches nothing."""
    pose, joints = _chain_inputs(2, 5, torch.float64, device)
    parents = _parents(FLAME_PARENTS)
    grad_t = torch.zeros(2, 5, 4, 4, dtype=torch.float64, device=device)
    grad_t[:, :, 3] = 1.0
    grad_f = torch.zeros(2, 36, dtype=torch.float64, device=device)
    gp, gj = ops.rigid_transforms_backward(grad_t, grad_f, pose, joints, parents)
    assert torch.equal(gp, torch.zeros_like(gp)) and torch.equal(gj, torch.zeros_like(gj))


# skin: forward


@pytest.mark.parametrize("batch", [0, 1, 3, 300])
@pytest.mark.parametrize("write", [True, False], ids=["T", "noT"])
def test_skin_matches_reference(ops, device, dtype, batch, write):
    # 600 vertices: more than one reduction chunk of the CPU backward, and a partial one.
    v_posed, transforms, weights = _skin_inputs(batch, 600 if batch < 300 else 40, 5, dtype, device)
    v, vertex_transforms = _ops().skin(v_posed, transforms, weights, write)
    want_v, want_t = reference.skin(v_posed.double(), transforms.double(), weights.double())
    assert v.shape == v_posed.shape and v.dtype == dtype
    _assert_close_to_reference(v, want_v, dtype, F32_SKIN_TOL)
    if write:
        assert vertex_transforms.shape == (batch, v_posed.shape[1], 4, 4)
        _assert_close_to_reference(vertex_transforms, want_t, dtype, F32_SKIN_TOL)
    else:
        assert vertex_transforms is None
        raw = ops.skin(v_posed, transforms, weights, False)[1]
        assert raw.shape == (0,)


@pytest.mark.parametrize("num_joints", [1, 16])
def test_skin_joint_counts_and_views(ops, device, num_joints):
    """Any joint count up to 16; non-contiguous v_posed and transforms are accepted."""
    v_posed, transforms, weights = _skin_inputs(3, 50, num_joints, torch.float64, device)
    v_view = v_posed.transpose(0, 1).contiguous().transpose(0, 1)
    t_view = transforms.transpose(2, 3).contiguous().transpose(2, 3)
    assert not v_view.is_contiguous() and not t_view.is_contiguous()
    v, vertex_transforms = _ops().skin(v_view, t_view, weights)
    want_v, want_t = reference.skin(v_posed, transforms, weights)
    torch.testing.assert_close(v, want_v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(vertex_transforms, want_t, rtol=1e-10, atol=1e-12)


def test_skin_no_vertices(ops, device, dtype):
    v_posed, transforms, weights = _skin_inputs(2, 0, 5, dtype, device)
    v, vertex_transforms = _ops().skin(v_posed, transforms, weights)
    assert v.shape == (2, 0, 3) and vertex_transforms.shape == (2, 0, 4, 4)
    v_posed.requires_grad_(True)
    transforms.requires_grad_(True)
    v, vertex_transforms = _ops().skin(v_posed, transforms, weights)
    (grad_t,) = torch.autograd.grad(v.sum() + vertex_transforms.sum(), (transforms,))
    assert torch.equal(grad_t, torch.zeros_like(grad_t))


# skin: gradients


@pytest.mark.parametrize("write", [True, False], ids=["T", "noT"])
@pytest.mark.parametrize("outputs", ["v", "T", "both"])
def test_skin_gradcheck(ops, device, write, outputs):
    if outputs != "v" and not write:
        pytest.skip("T is not an output without write_vertex_transforms")
    v_posed, transforms, weights = _skin_inputs(2, 6, 5, torch.float64, device)
    for x in (v_posed, transforms, weights):
        x.requires_grad_(True)

    def fn(v_posed, transforms, weights):
        v, vertex_transforms = _ops().skin(v_posed, transforms, weights, write)
        return {"v": (v,), "T": (vertex_transforms,), "both": (v, vertex_transforms)}[outputs]

    assert torch.autograd.gradcheck(fn, (v_posed, transforms, weights))


def test_skin_grad_matches_reference(ops, device):
    v_posed, transforms, weights = _skin_inputs(3, 600, 5, torch.float64, device)
    gen = torch.Generator().manual_seed(7)
    grad_v = torch.randn(3, 600, 3, generator=gen, dtype=torch.float64).to(device)
    grad_t = torch.randn(3, 600, 4, 4, generator=gen, dtype=torch.float64).to(device)

    def grads(fn):
        inputs = [x.clone().requires_grad_(True) for x in (v_posed, transforms, weights)]
        v, vertex_transforms = fn(*inputs)
        return torch.autograd.grad((v, vertex_transforms), inputs, (grad_v, grad_t))

    for g, w in zip(grads(_ops().skin), grads(reference.skin)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_lbs_chain_gradcheck(ops, device):
    """rigid_transforms feeding skin, as FlameShape does: gradients reach pose and joints
    through both ops."""
    pose, joints = _chain_inputs(2, 5, torch.float64, device, seed=8)
    v_posed, _, weights = _skin_inputs(2, 5, 5, torch.float64, device, seed=9)
    parents = _parents(FLAME_PARENTS)
    inputs = [x.requires_grad_(True) for x in (pose, joints, v_posed)]

    def fn(pose, joints, v_posed):
        transforms, feature = _ops().rigid_transforms(pose, joints, parents)
        v, vertex_transforms = _ops().skin(v_posed, transforms, weights)
        return v, vertex_transforms, feature

    assert torch.autograd.gradcheck(fn, inputs)


def test_double_backward_is_a_clear_error(ops, device):
    pose, joints = _chain_inputs(2, 5, torch.float64, device)
    pose.requires_grad_(True)
    transforms, _ = _ops().rigid_transforms(pose, joints, _parents(FLAME_PARENTS))
    (g,) = torch.autograd.grad(transforms.square().sum(), pose, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through flame_ext::rigid_transforms_backward"):
        g.sum().backward()

    v_posed, transforms, weights = _skin_inputs(2, 6, 5, torch.float64, device)
    v_posed.requires_grad_(True)
    v, _ = _ops().skin(v_posed, transforms, weights)
    (g,) = torch.autograd.grad(v.square().sum(), v_posed, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through flame_ext::skin_backward"):
        g.sum().backward()


# Registrations


def test_opcheck(ops, device):
    pose, joints = _chain_inputs(3, 5, torch.float64, device)
    parents = _parents(FLAME_PARENTS)
    v_posed, transforms, weights = _skin_inputs(3, 20, 5, torch.float64, device)
    grad_t = torch.randn(3, 5, 4, 4, dtype=torch.float64, device=device)
    grad_f = torch.randn(3, 36, dtype=torch.float64, device=device)
    grad_v = torch.randn(3, 20, 3, dtype=torch.float64, device=device)
    grad_vt = torch.randn(3, 20, 4, 4, dtype=torch.float64, device=device)
    cases = [
        (ops.rigid_transforms, (pose.requires_grad_(True), joints.requires_grad_(True), parents)),
        (ops.rigid_transforms_backward, (grad_t, grad_f, pose.detach(), joints.detach(), parents)),
        (ops.skin, (v_posed.requires_grad_(True), transforms.requires_grad_(True), weights, True)),
        (ops.skin, (v_posed, transforms, weights, False)),
        (ops.skin_backward, (grad_v, grad_vt, v_posed.detach(), transforms.detach(), weights)),
        (ops.skin_backward, (grad_v, None, v_posed.detach(), transforms.detach(), weights)),
    ]
    for op, args in cases:
        torch.library.opcheck(op.default, args)


def test_torch_compile_fullgraph(ops, device):
    pose, joints = _chain_inputs(2, 5, torch.float32, device)
    v_posed, _, weights = _skin_inputs(2, 30, 5, torch.float32, device)
    parents = _parents(FLAME_PARENTS)
    skin_ops = _ops()

    def lbs(pose, joints, v_posed):
        transforms, feature = skin_ops.rigid_transforms(pose, joints, parents)
        v, vertex_transforms = skin_ops.skin(v_posed + feature.sum(), transforms, weights)
        return v.square().sum() + vertex_transforms.mean()

    compiled = torch.compile(lbs, fullgraph=True, backend="aot_eager")
    inputs = [x.clone().requires_grad_(True) for x in (pose, joints, v_posed)]
    want_inputs = [x.clone().requires_grad_(True) for x in (pose, joints, v_posed)]
    got = compiled(*inputs)
    want = lbs(*want_inputs)
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    for a, b in zip(inputs, want_inputs):
        torch.testing.assert_close(a.grad, b.grad)


# Bad input


def _bad_chain_calls(device):
    pose, joints = _chain_inputs(2, 5, torch.float32, device)
    parents = _parents(FLAME_PARENTS)
    return [
        ((pose.view(2, 15), joints, parents), ValueError, "pose must have 3 dimensions"),
        ((pose[..., :2], joints, parents), ValueError, r"pose must have shape \(2, 5, 3\)"),
        ((pose, joints[:, :4], parents), ValueError, "joints must have shape"),
        ((pose, joints.double(), parents), TypeError, "joints has dtype"),
        ((pose.int(), joints, parents), TypeError, "pose must be float32 or float64"),
        ((pose, joints.to("meta"), parents), ValueError, "joints is on meta"),
        ((pose, joints, parents.int()), TypeError, "parents must have dtype torch.int64"),
        ((pose, joints, parents[:4]), ValueError, r"parents must have shape \(5,\)"),
        ((pose, joints, _parents([0, 0, 1, 1, 1])), ValueError, "parents\\[0\\] = -1"),
        ((pose, joints, _parents([-1, 0, 2, 1, 1])), ValueError, "0 <= parents\\[j\\] < j"),
        ((pose, joints, _parents([-1, 0, 1, -1, 1])), ValueError, "0 <= parents\\[j\\] < j"),
        ((pose, joints, "parents"), TypeError, "parents must be a torch.Tensor"),
        (
            (torch.zeros(1, 17, 3), torch.zeros(1, 17, 3), _parents([-1] + list(range(16)))),
            ValueError,
            "1 to 16 joints",
        ),
    ]


def test_rigid_transforms_argument_errors(ops, device):
    for args, error, message in _bad_chain_calls(device):
        with pytest.raises(error, match=message):
            _ops().rigid_transforms(*args)


def test_skin_argument_errors(ops, device):
    v_posed, transforms, weights = _skin_inputs(2, 10, 5, torch.float32, device)
    bad = [
        ((v_posed[0], transforms, weights), ValueError, "v_posed must have 3 dimensions"),
        ((v_posed[..., :2], transforms, weights), ValueError, "v_posed must have shape"),
        ((v_posed, transforms[:1], weights), ValueError, r"transforms must have shape \(2, '?\*'?, 4, 4\)"),
        ((v_posed, transforms[..., :3, :], weights), ValueError, "transforms must have shape"),
        ((v_posed, transforms, weights[:9]), ValueError, r"lbs_weights must have shape \(10, 5\)"),
        ((v_posed, transforms, weights[:, :4]), ValueError, r"lbs_weights must have shape \(10, 5\)"),
        ((v_posed, transforms.double(), weights), TypeError, "transforms has dtype"),
        ((v_posed, transforms, weights.double()), TypeError, "lbs_weights has dtype"),
        ((v_posed.half(), transforms, weights), TypeError, "v_posed must be float32 or float64"),
        ((v_posed, transforms.to("meta"), weights), ValueError, "transforms is on meta"),
        ((v_posed, transforms, weights, 1), TypeError, "write_vertex_transforms must be a bool"),
    ]
    for args, error, message in bad:
        with pytest.raises(error, match=message):
            _ops().skin(*args)


def test_kernels_check_their_inputs(ops):
    """Direct torch.ops calls skip the Python checks: the CPU kernels refuse bad trees and
    shapes with a RuntimeError instead of reading out of bounds."""
    pose, joints = _chain_inputs(2, 5, torch.float32, "cpu")
    for values in ([-1, 0, 1, 7, 1], [-1, 0, 1, 3, 1], [0, 0, 1, 1, 1], [-1, -5, 0, 0, 0]):
        with pytest.raises(RuntimeError, match="parents"):
            ops.rigid_transforms(pose, joints, _parents(values))
    with pytest.raises(RuntimeError, match="parents"):
        ops.rigid_transforms(pose, joints, _parents([-1, 0, 1]))
    grad_f = torch.zeros(2, 36)
    with pytest.raises(RuntimeError, match="grad_transforms must have shape"):
        ops.rigid_transforms_backward(torch.zeros(2, 5, 4), grad_f, pose, joints, _parents(FLAME_PARENTS))
    v_posed, transforms, weights = _skin_inputs(2, 10, 5, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="lbs_weights must have shape"):
        ops.skin(v_posed, transforms, weights[:5], True)
    with pytest.raises(RuntimeError, match="grad_vertex_transforms must have shape"):
        ops.skin_backward(v_posed, torch.zeros(2, 10, 4), v_posed, transforms, weights)


# NaN, determinism


def test_nan_propagates_through_the_chain(ops, device, dtype):
    pose, joints = _chain_inputs(2, 5, dtype, device)
    pose[0, 1, 0] = float("nan")  # the neck of sample 0: neck, jaw and eyes become NaN
    transforms, feature = _ops().rigid_transforms(pose, joints, _parents(FLAME_PARENTS))
    assert transforms[0, 1:, :3].isnan().all()
    assert not transforms[0, 0].isnan().any() and not transforms[1].isnan().any()
    assert feature[0, :9].isnan().all() and not feature[0, 9:].isnan().any()
    grad_t = torch.ones_like(transforms)
    gp, gj = ops.rigid_transforms_backward(grad_t, torch.ones_like(feature), pose, joints, _parents(FLAME_PARENTS))
    assert gp[0].isnan().any() and not gp[1].isnan().any() and not gj[1].isnan().any()


def test_nan_propagates_through_skin(ops, device, dtype):
    v_posed, transforms, weights = _skin_inputs(2, 30, 5, dtype, device)
    v_posed[0, 3, 1] = float("nan")
    transforms[1, 2, 0, 0] = float("nan")
    v, vertex_transforms = _ops().skin(v_posed, transforms, weights)
    assert v[0, 3].isnan().all() and v[0].isnan().sum() == 3
    assert not vertex_transforms[0].isnan().any()
    # A NaN in joint 2 of sample 1 reaches every vertex of that sample (weights > 0).
    assert v[1, :, 0].isnan().all() and vertex_transforms[1, :, 0, 0].isnan().all()
    grad_vp, grad_t = ops.skin_backward(torch.ones_like(v), None, v_posed, transforms, weights)
    # Vertex 3's y is NaN: column 1 of every joint's gradient (grad_v (x) [v_posed; 1]).
    assert grad_t[0, :, :3, 1].isnan().all() and not grad_t[0, :, :3, 0].isnan().any()
    assert not grad_vp[0].isnan().any()
    assert grad_vp[1].isnan().any()


def test_backward_is_deterministic(ops, device):
    """Repeated runs give bit-identical gradients (fixed-order reductions over V)."""
    v_posed, transforms, weights = _skin_inputs(8, 3000, 5, torch.float32, device)
    grad_v = torch.randn_like(v_posed)
    grad_vt = torch.randn(8, 3000, 4, 4, device=device)
    for grad in (None, grad_vt):
        first = ops.skin_backward(grad_v, grad, v_posed, transforms, weights)
        for _ in range(3):
            again = ops.skin_backward(grad_v, grad, v_posed, transforms, weights)
            assert all(torch.equal(a, b) for a, b in zip(first, again))


# CUDA only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_invalid_device_parents_give_nan(ops):
    """A parents tensor on the GPU cannot be checked on the host without a sync: the
    kernel writes NaN for a tree it cannot walk instead of reading out of bounds."""
    pose, joints = _chain_inputs(3, 5, torch.float32, "cuda")
    for values in ([-1, 0, 1, 9, 1], [0, 0, 1, 1, 1], [-1, 0, 2, 1, 1]):
        transforms, feature = ops.rigid_transforms(pose, joints, _parents(values, "cuda"))
        assert transforms.isnan().all() and feature.isnan().all()
    good = ops.rigid_transforms(pose, joints, _parents(FLAME_PARENTS, "cuda"))
    assert torch.isfinite(good[0]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_graph_capture(ops):
    """Forward and backward ops launch no host-device synchronisation: they capture into a
    CUDA graph (with parents on the CPU and on the device) and replay correctly."""
    pose, joints = _chain_inputs(4, 5, torch.float32, "cuda")
    v_posed, _, weights = _skin_inputs(4, 700, 5, torch.float32, "cuda")
    grad_v = torch.randn_like(v_posed)
    grad_vt = torch.randn(4, 700, 4, 4, device="cuda")

    def step(parents):
        transforms, feature = ops.rigid_transforms(pose, joints, parents)
        v, vertex_transforms = ops.skin(v_posed, transforms, weights, True)
        grad_p, grad_t = ops.skin_backward(grad_v, grad_vt, v_posed, transforms, weights)
        grads = ops.rigid_transforms_backward(grad_t, feature, pose, joints, parents)
        return (v, vertex_transforms, grad_p) + tuple(grads)

    for parents in (_parents(FLAME_PARENTS), _parents(FLAME_PARENTS, "cuda")):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step(parents)  # warm-up outside the graph
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = step(parents)
        pose.add_(0.1)  # new inputs in the captured buffers
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(outs, step(parents)):
            assert torch.equal(got, want)
