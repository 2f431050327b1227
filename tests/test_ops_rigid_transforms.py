"""Tests of the rigid_transforms op family: rigid_transforms and rigid_transforms_backward
(Rodrigues, the kinematic chain and the pose-corrective features).

The compiled ops are compared with flame_ext.reference (the oracle), their gradients with
torch.autograd.gradcheck in float64 and with autograd through the reference; properties
over any tree, angle, layout and value; then the registrations (opcheck), argument errors,
NaN propagation, determinism and the CUDA kernels' own behaviour. The chain feeding skin
is tested in tests/test_ops_lbs.py.
"""

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from _oracle import (
    assert_close_to_reference,
    a64,
    assert_bad_argument_is_named,
    assert_deterministic_and_fully_written,
    assert_independent_of_thread_count,
    assert_matches,
    d64,
)
from _samples import (
    CORRUPTIONS,
    F32,
    F64,
    FLAME_PARENTS,
    INF,
    NAN,
    chain_inputs,
    dtypes,
    lay_out,
    layouts,
    parents_tensor,
    random_parents,
    random_tree,
    random_values,
    seeds,
    specials,
)
from flame_ext import reference

# float32 tolerance: a rotation entry is a few products of sin/cos (|error| ~ eps32 *
# |angle| for the argument reduction, up to ~1e-6 at 10 rad) pushed through a chain of at
# most 4 3x3 products and translations of magnitude ~3: 2e-5 is a few times that.
F32_CHAIN_TOL = 2e-5


def _ops():
    """The Python wrappers (checks and autograd) of the rigid_transforms ops."""
    from flame_ext._ops import rigid_transforms

    return rigid_transforms


# --- forward ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [0, 1, 3, 300])
def test_rigid_transforms_matches_reference(ops, device, dtype, batch):
    pose, joints = chain_inputs(batch, 5, dtype, device)
    parents = parents_tensor(FLAME_PARENTS)
    transforms, feature = _ops().rigid_transforms(pose, joints, parents)
    assert transforms.shape == (batch, 5, 4, 4) and feature.shape == (batch, 36)
    assert transforms.dtype == dtype and transforms.device == pose.device
    want_t, want_f = reference.rigid_transforms(pose.double(), joints.double(), parents)
    assert_close_to_reference(transforms, want_t, dtype, F32_CHAIN_TOL)
    assert_close_to_reference(feature, want_f, dtype, F32_CHAIN_TOL)


@pytest.mark.parametrize("scale", [1e-4, 3.0, 10.0])
def test_rigid_transforms_angles(ops, device, dtype, scale):
    """Small angles, and large ones (3 and 10 rad, beyond pi: the formula has no branch)."""
    pose, joints = chain_inputs(4, 5, dtype, device, scale=1.0, seed=1)
    pose = pose / pose.norm(dim=-1, keepdim=True) * scale
    parents = parents_tensor(FLAME_PARENTS)
    transforms, feature = _ops().rigid_transforms(pose, joints, parents)
    want_t, want_f = reference.rigid_transforms(pose.double(), joints.double(), parents)
    assert_close_to_reference(transforms, want_t, dtype, F32_CHAIN_TOL)
    assert_close_to_reference(feature, want_f, dtype, F32_CHAIN_TOL)


def test_rigid_transforms_zero_pose_is_identity(ops, device, dtype):
    """pose = 0 takes the epsilon path: the rotations are exactly I, the features exactly
    0, and A_j moves nothing (translation 0 up to the rounding of J_j - J_p + J_p)."""
    _, joints = chain_inputs(2, 5, dtype, device)
    pose = torch.zeros(2, 5, 3, dtype=dtype, device=device)
    transforms, feature = _ops().rigid_transforms(pose, joints, parents_tensor(FLAME_PARENTS))
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
        values = random_tree(num_joints, gen)
        pose, joints = chain_inputs(5, num_joints, dtype, device, seed=seed)
        parents = parents_tensor(values)
        transforms, feature = _ops().rigid_transforms(pose, joints, parents)
        assert feature.shape == (5, 9 * (num_joints - 1))
        want_t, want_f = reference.rigid_transforms(pose.double(), joints.double(), parents)
        # Deeper chains (up to 15 products at J = 16) accumulate proportionally more.
        tol = F32_CHAIN_TOL * max(1, num_joints / 4)
        assert_close_to_reference(transforms, want_t, dtype, tol)
        assert_close_to_reference(feature, want_f, dtype, tol)


def test_rigid_transforms_parents_on_device_and_expanded_joints(ops, device):
    """parents may live on the device of pose; joints may be an expanded view."""
    pose, joints = chain_inputs(4, 5, torch.float64, device)
    joints = joints[:1].expand(4, 5, 3)
    parents = parents_tensor(FLAME_PARENTS, device)
    transforms, feature = _ops().rigid_transforms(pose, joints, parents)
    want_t, want_f = reference.rigid_transforms(pose, joints, parents)
    torch.testing.assert_close(transforms, want_t, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(feature, want_f, rtol=1e-10, atol=1e-12)


# --- gradients ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "parents_values,scale",
    [(FLAME_PARENTS, 0.7), (FLAME_PARENTS, 0.0), (FLAME_PARENTS, 10.0), ([-1, 0, 0, 2, 1, 4], 2.0)],
    ids=["flame", "zero-pose", "10rad", "tree"],
)
def test_rigid_transforms_gradcheck(ops, device, parents_values, scale):
    num_joints = len(parents_values)
    pose, joints = chain_inputs(2, num_joints, torch.float64, device, scale=scale, seed=3)
    pose.requires_grad_(True)
    joints.requires_grad_(True)
    parents = parents_tensor(parents_values)
    fn = lambda p, j: _ops().rigid_transforms(p, j, parents)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (pose, joints))


@pytest.mark.parametrize("scale", [0.0, 1e-3, 1.0, 3.0, 10.0])
def test_rigid_transforms_grad_matches_reference(ops, device, scale):
    """The hand-written reverse mode against autograd through the reference, tighter than
    gradcheck's finite differences; scale 0 is the exact-zero (epsilon) path."""
    pose, joints = chain_inputs(3, 5, torch.float64, device, scale=scale, seed=4)
    parents = parents_tensor(FLAME_PARENTS)
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
    pose, joints = chain_inputs(2, 5, torch.float64, device)
    parents = parents_tensor(FLAME_PARENTS)
    grad_t = torch.zeros(2, 5, 4, 4, dtype=torch.float64, device=device)
    grad_t[:, :, 3] = 1.0
    grad_f = torch.zeros(2, 36, dtype=torch.float64, device=device)
    gp, gj = ops.rigid_transforms_backward(grad_t, grad_f, pose, joints, parents)
    assert torch.equal(gp, torch.zeros_like(gp)) and torch.equal(gj, torch.zeros_like(gj))


def test_rigid_transforms_double_backward_is_a_clear_error(ops, device):
    pose, joints = chain_inputs(2, 5, torch.float64, device)
    pose.requires_grad_(True)
    transforms, _ = _ops().rigid_transforms(pose, joints, parents_tensor(FLAME_PARENTS))
    (g,) = torch.autograd.grad(transforms.square().sum(), pose, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through flame_ext::rigid_transforms_backward"):
        g.sum().backward()


# --- properties: any tree, angle, layout and value ----------------------------------------


POSE_KINDS = ("random", "zero", "singular", "huge", "vast", "inf", "nan")


@st.composite
def chain_cases(draw, kinds=POSE_KINDS, scales=(1e-9, 1e-3, 0.5, 3.0, 30.0)):
    num_joints = draw(st.integers(1, 16))
    return dict(
        batch=draw(st.sampled_from([0, 1, 2, 3, 7, 65])),
        num_joints=num_joints,
        dtype=draw(dtypes),
        seed=draw(seeds),
        scale=draw(st.sampled_from(scales)),
        # One joint set to an exact special rotation vector.
        pose_kind=draw(st.sampled_from(kinds)),
        special_joint=draw(st.integers(0, num_joints - 1)),
        layouts=draw(st.lists(layouts, min_size=2, max_size=2)),
        inject=draw(specials),
        parents_on_device=draw(st.booleans()),
    )


POSE_VALUES = {"zero": 0.0, "singular": -1e-8, "huge": 1e4, "vast": 1e30, "inf": INF, "nan": NAN}


def make_chain(case, device):
    b, j, dtype = case["batch"], case["num_joints"], case["dtype"]
    pose = random_values(case["seed"], (b, j, 3), case["scale"]).to(dtype)
    if case["pose_kind"] != "random" and b:
        pose[:, case["special_joint"]] = POSE_VALUES[case["pose_kind"]]
    joints = random_values(case["seed"] + 1, (b, j, 3), inject=case["inject"]).to(dtype)
    parents = random_parents(case["seed"], j)
    if case["parents_on_device"]:
        parents = parents.to(device)
    return (
        lay_out(pose, case["layouts"][0], device),
        lay_out(joints, case["layouts"][1], device),
        parents,
    )


def chain_bound(pose, joints, num_joints):
    """Rounding bound of the chain: a rotation entry is off by ~eps * (1 + angle) (the
    angle's own rounding moves sin / cos by that much), the chain multiplies up to J of
    them, and translations scale with the joint locations."""
    angle = a64(pose).norm(dim=-1).nan_to_num(nan=0.0, posinf=0.0).amax(dim=-1)
    reach = a64(joints).nan_to_num(nan=0.0, posinf=0.0).amax(dim=(-1, -2))
    per_sample = 8 * num_joints * (1 + angle) * (1 + reach)
    return per_sample.view(-1, 1, 1, 1)


@given(case=chain_cases())
def test_rigid_transforms_any_input_matches_reference(ops, device, case):
    pose, joints, parents = make_chain(case, device)
    transforms, feature = _ops().rigid_transforms(pose, joints, parents)
    exact_t, exact_f = reference.rigid_transforms(d64(pose), d64(joints), parents.cpu())
    # Where the result is finite is decided in the op's dtype: a float32 pose of exactly
    # -1e-8 cancels float32's epsilon (angle 0, NaN), but not float64's.
    same_t, same_f = reference.rigid_transforms(pose.cpu(), joints.cpu(), parents.cpu())
    bound = chain_bound(pose, joints, case["num_joints"])
    assert_matches(transforms, exact_t, bound.expand_as(exact_t), 1, "transforms",
                   finite=same_t.isfinite(), exact_nan=False)
    assert_matches(feature, exact_f, bound.view(-1, 1).expand_as(exact_f), 1, "pose_feature",
                   finite=same_f.isfinite(), exact_nan=False)
    for t in (transforms, feature):
        assert t.dtype == case["dtype"] and t.device == pose.device


# Gradients at moderate angles: at huge ones they are as ill-conditioned as the values.
@given(case=chain_cases(kinds=("random", "zero", "singular"), scales=(1e-9, 1e-3, 0.5, 3.0)))
def test_rigid_transforms_any_input_grad_matches_reference(ops, device, case):
    assume(case["batch"] > 0)
    pose, joints, parents = make_chain(case, device)
    p, jt = (x.detach().requires_grad_(True) for x in (pose, joints))
    transforms, feature = _ops().rigid_transforms(p, jt, parents)
    gt = random_values(case["seed"] + 2, transforms.shape).to(transforms)
    gf = random_values(case["seed"] + 3, feature.shape).to(feature)
    got = torch.autograd.grad((transforms, feature), (p, jt), (gt, gf))
    def reference_grads(dtype):
        rp, rj = (x.detach().to("cpu", dtype).requires_grad_(True) for x in (pose, joints))
        out = reference.rigid_transforms(rp, rj, parents.cpu())
        return torch.autograd.grad(out, (rp, rj), (gt.to("cpu", dtype), gf.to("cpu", dtype)))

    want, same = reference_grads(F64), reference_grads(case["dtype"])
    # The reverse mode of the chain sums ~16 J terms per entry, each a product of
    # rotations, joint locations and the incoming gradient.
    bound = chain_bound(pose, joints, case["num_joints"]).view(-1, 1, 1)
    gmax = a64(torch.cat([gt.flatten(1), gf], dim=1)).amax(dim=1).view(-1, 1, 1)
    for name, a, e, s in zip(("pose", "joints"), got, want, same):
        magnitude = (16 * case["num_joints"] * bound * gmax).expand_as(e)
        # A gradient w.r.t. joints does not depend on the joints' values (A_j is linear
        # in them): a NaN joint leaves it finite, where the reference multiplies 0 by NaN.
        assert_matches(a, e, magnitude, 1, f"grad {name}", finite=s.isfinite(), exact_nan=False,
                       keep_sample_nan=False)


# --- registrations ------------------------------------------------------------------------


def test_rigid_transforms_opcheck(ops, device):
    pose, joints = chain_inputs(3, 5, torch.float64, device)
    parents = parents_tensor(FLAME_PARENTS)
    grad_t = torch.randn(3, 5, 4, 4, dtype=torch.float64, device=device)
    grad_f = torch.randn(3, 36, dtype=torch.float64, device=device)
    cases = [
        (ops.rigid_transforms, (pose.requires_grad_(True), joints.requires_grad_(True), parents)),
        (ops.rigid_transforms_backward, (grad_t, grad_f, pose.detach(), joints.detach(), parents)),
    ]
    for op, args in cases:
        torch.library.opcheck(op.default, args)


# --- bad input ----------------------------------------------------------------------------


def _bad_chain_calls(device):
    pose, joints = chain_inputs(2, 5, torch.float32, device)
    parents = parents_tensor(FLAME_PARENTS)
    return [
        ((pose.view(2, 15), joints, parents), ValueError, "pose must have 3 dimensions"),
        ((pose[..., :2], joints, parents), ValueError, r"pose must have shape \(2, 5, 3\)"),
        ((pose, joints[:, :4], parents), ValueError, "joints must have shape"),
        ((pose, joints.double(), parents), TypeError, "joints has dtype"),
        ((pose.int(), joints, parents), TypeError, "pose must be float32 or float64"),
        ((pose, joints.to("meta"), parents), ValueError, "joints is on meta"),
        ((pose, joints, parents.int()), TypeError, "parents must have dtype torch.int64"),
        ((pose, joints, parents[:4]), ValueError, r"parents must have shape \(5,\)"),
        ((pose, joints, parents_tensor([0, 0, 1, 1, 1])), ValueError, "parents\\[0\\] = -1"),
        ((pose, joints, parents_tensor([-1, 0, 2, 1, 1])), ValueError, "0 <= parents\\[j\\] < j"),
        ((pose, joints, parents_tensor([-1, 0, 1, -1, 1])), ValueError, "0 <= parents\\[j\\] < j"),
        ((pose, joints, "parents"), TypeError, "parents must be a torch.Tensor"),
        (
            (torch.zeros(1, 17, 3), torch.zeros(1, 17, 3), parents_tensor([-1] + list(range(16)))),
            ValueError,
            "1 to 16 joints",
        ),
    ]


def test_rigid_transforms_argument_errors(ops, device):
    for args, error, message in _bad_chain_calls(device):
        with pytest.raises(error, match=message):
            _ops().rigid_transforms(*args)


@pytest.mark.parametrize("name", ["pose", "joints", "parents"])
@given(how=st.sampled_from(CORRUPTIONS), variant=st.integers(0, 11))
def test_rigid_transforms_bad_argument_is_named(ops, device, name, how, variant):
    assert_bad_argument_is_named(_ops().rigid_transforms, "rigid_transforms", name, how,
                                 variant, device)


def test_rigid_transforms_kernels_check_their_inputs(ops):
    """Direct torch.ops calls skip the Python checks: the CPU kernels refuse bad trees and
    shapes with a RuntimeError instead of reading out of bounds."""
    pose, joints = chain_inputs(2, 5, torch.float32, "cpu")
    for values in ([-1, 0, 1, 7, 1], [-1, 0, 1, 3, 1], [0, 0, 1, 1, 1], [-1, -5, 0, 0, 0]):
        with pytest.raises(RuntimeError, match="parents"):
            ops.rigid_transforms(pose, joints, parents_tensor(values))
    with pytest.raises(RuntimeError, match="parents"):
        ops.rigid_transforms(pose, joints, parents_tensor([-1, 0, 1]))
    grad_f = torch.zeros(2, 36)
    with pytest.raises(RuntimeError, match="grad_transforms must have shape"):
        ops.rigid_transforms_backward(torch.zeros(2, 5, 4), grad_f, pose, joints,
                                      parents_tensor(FLAME_PARENTS))


# --- NaN, determinism ---------------------------------------------------------------------


def test_rigid_transforms_nan_propagates_through_the_chain(ops, device, dtype):
    pose, joints = chain_inputs(2, 5, dtype, device)
    pose[0, 1, 0] = float("nan")  # the neck of sample 0: neck, jaw and eyes become NaN
    transforms, feature = _ops().rigid_transforms(pose, joints, parents_tensor(FLAME_PARENTS))
    assert transforms[0, 1:, :3].isnan().all()
    assert not transforms[0, 0].isnan().any() and not transforms[1].isnan().any()
    assert feature[0, :9].isnan().all() and not feature[0, 9:].isnan().any()
    grad_t = torch.ones_like(transforms)
    gp, gj = ops.rigid_transforms_backward(grad_t, torch.ones_like(feature), pose, joints, parents_tensor(FLAME_PARENTS))
    assert gp[0].isnan().any() and not gp[1].isnan().any() and not gj[1].isnan().any()


def _determinism_cases(device, dtype):
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).to(device, dtype).requires_grad_(True)

    parents = torch.tensor(FLAME_PARENTS)
    return [
        (f"rigid_transforms B={batch}", lambda p, j: _ops().rigid_transforms(p, j, parents),
         [rand(batch, 5, 3), rand(batch, 5, 3)])
        for batch in (0, 5)
    ]


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_rigid_transforms_deterministic_and_fully_written(ops, device, dtype, deterministic):
    """Under torch.use_deterministic_algorithms(True): runs, repeats bit for bit, and
    writes every output element."""
    assert_deterministic_and_fully_written(_determinism_cases(device, dtype))


def test_rigid_transforms_results_do_not_depend_on_the_thread_count(ops):
    assert_independent_of_thread_count(_determinism_cases("cpu", F32))


# --- CUDA only ----------------------------------------------------------------------------


@pytest.mark.cuda
def test_invalid_device_parents_give_nan(ops):
    """A parents tensor on the GPU cannot be checked on the host without a sync: the
    kernel writes NaN for a tree it cannot walk instead of reading out of bounds."""
    pose, joints = chain_inputs(3, 5, torch.float32, "cuda")
    for values in ([-1, 0, 1, 9, 1], [0, 0, 1, 1, 1], [-1, 0, 2, 1, 1]):
        transforms, feature = ops.rigid_transforms(pose, joints, parents_tensor(values, "cuda"))
        assert transforms.isnan().all() and feature.isnan().all()
    good = ops.rigid_transforms(pose, joints, parents_tensor(FLAME_PARENTS, "cuda"))
    assert torch.isfinite(good[0]).all()


@pytest.mark.cuda
@pytest.mark.parametrize("num_joints", [5, 16])
def test_rigid_transforms_cuda_float32_matches_cpu(ops, num_joints):
    """float32 on one GPU against the CPU kernel, forward and backward: within twice the
    float32 tolerance against the float64 reference (deeper trees accumulate more)."""
    parents = parents_tensor(FLAME_PARENTS if num_joints == 5 else random_tree(num_joints, 3))
    pose, joints = chain_inputs(33, num_joints, F32, "cpu", seed=13)
    gen = torch.Generator().manual_seed(14)
    grad_t = torch.randn(33, num_joints, 4, 4, generator=gen)
    grad_f = torch.randn(33, 9 * (num_joints - 1), generator=gen)
    tol = 2 * F32_CHAIN_TOL * max(1, num_joints / 4)
    got = ops.rigid_transforms(pose.cuda(), joints.cuda(), parents.cuda())
    want = ops.rigid_transforms(pose, joints, parents)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=tol, atol=tol)
    got = ops.rigid_transforms_backward(grad_t.cuda(), grad_f.cuda(), pose.cuda(), joints.cuda(),
                                        parents.cuda())
    want = ops.rigid_transforms_backward(grad_t, grad_f, pose, joints, parents)
    for a, b in zip(got, want):
        # the reverse mode sums ~16 J products of rotations, joints (~3) and gradients
        # (~3) per entry
        torch.testing.assert_close(a.cpu(), b, rtol=16 * tol, atol=16 * tol)
