"""Property-based tests (hypothesis) of every op and public entry point: SPEC section 7.

Inputs are drawn over shapes (zero sizes included), dtypes, devices, memory layouts and
values; every call either gives flame_ext.reference's answer or raises a ValueError /
TypeError naming the bad argument. Never a crash, a hang, a silent wrong answer or a read
outside the inputs:

- layouts: contiguous, strided (every other element, the gaps filled with NaN, or with an
  out-of-range index for index tensors, so a kernel that ignores the strides gives NaN or
  an index error instead of a plausible answer), column-major, a storage offset of one
  element (misaligned for vector loads), and an expanded (stride 0) batch;
- values: random, plus NaN, +-inf, +-1e30, tiny ones, and poses exactly zero, exactly
  where Rodrigues divides by zero (every component -1e-8, so that pose + 1e-8 = 0) and
  huge (1e4 .. 1e30 rad);
- bad arguments: one argument at a time gets a wrong rank, size, dtype, device ('meta'),
  a sparse layout, or is not a tensor;
- damaged files: random truncations, bit flips, insertions and deletions of each asset
  file either load or are refused with an error naming the file.

Tolerances. A sum of n products computed in floating point in any order is within
n * eps * sum|terms| of the exact sum. The oracle is the reference evaluated in float64
on the same inputs, and `sum|terms|` is that reference evaluated on absolute values
(every op here is multilinear in its float inputs, or has an explicit bound below), so a
comparison is as tight as the conditioning of each output allows: terms of 1e30 that
cancel get a wide tolerance, a well-conditioned output a tight one. Outputs the oracle
gives as NaN / inf must be non-finite in the op too, and finite ones finite (for the
kinematic chain, see `assert_within`: the op may keep finite what the reference's 4x4
products turn into 0 * NaN). The decoders, whole pipelines, are held to fixed tolerances.

Profiles: the default runs ~25 examples per test (CI); FLAME_EXT_HYPOTHESIS=thorough
runs 20x more.
"""

import os
import pickle
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from flame_ext import FlameLandmark, FlameShape, FlameTex, _ops, reference
from flame_ext import io as fio
from flame_ext.decoders import INPUT_NAMES

settings.register_profile(
    "flame_ext",
    max_examples=25,
    deadline=None,
    print_blob=True,
    # `device` is a function-scoped pytest fixture, but it only names a device.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile("thorough", parent=settings.get_profile("flame_ext"), max_examples=500)
settings.load_profile(os.environ.get("FLAME_EXT_HYPOTHESIS", "flame_ext"))

F32, F64 = torch.float32, torch.float64
NAN, INF = float("nan"), float("inf")
SMALL = "synthetic-small"

# Values injected at random positions: non-finite, signed zero, tiny, large, and the
# Rodrigues epsilon (-1e-8 cancels it).
SPECIALS = (NAN, INF, -INF, 0.0, -0.0, 1e-30, -1e-8, 1e4, -1e4, 1e30, -1e30)
LAYOUTS = ("contiguous", "strided", "column_major", "offset", "expanded")
# Index tensors read through a wrong stride land on this: an index error, never a value.
INDEX_PAD = 1 << 40

dtypes = st.sampled_from([F32, F64])
layouts = st.sampled_from(LAYOUTS)
seeds = st.integers(0, 2**31 - 1)
specials = st.lists(
    st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from(SPECIALS)), max_size=3
)


def needs_kernels(device, *ops):
    """CUDA cases need the op families' CUDA kernels in this build (blend's are optional
    while csrc/blend has no .cu)."""
    for op in ops:
        if device.type == "cuda" and not _ops.has_kernel(op, "CUDA"):
            pytest.skip(f"flame_ext::{op} has no CUDA kernel in this build")


@pytest.fixture(scope="module")
def k(ops):
    """The checked op wrappers, imported once the library is known to be loaded."""
    from flame_ext._ops import blend, landmarks, rigid_transforms, skin

    return SimpleNamespace(
        blend=blend.blend,
        rigid_transforms=rigid_transforms.rigid_transforms,
        skin=skin.skin,
        landmarks=landmarks.landmarks,
    )


# --------------------------------------------------------------------------------------
# Building inputs


def random_values(seed, shape, scale=1.0, inject=()):
    """float64 normal values on the CPU, with `inject` = [(position in [0, 1), value)]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=F64) * scale
    flat = x.view(-1)
    for where, value in inject:
        if flat.numel():
            flat[int(where * flat.numel())] = value
    return x


def lay_out(x, layout, device, pad=NAN):
    """x moved to `device` with the given memory layout (values unchanged, except that
    'expanded' repeats the first row along dim 0). Strided gaps hold `pad`."""
    x = x.to(device)
    if layout == "expanded" and x.dim() >= 1 and x.shape[0] > 0:
        return x[:1].expand_as(x)
    if layout == "strided" and x.dim() >= 1:
        buf = torch.full((*x.shape[:-1], 2 * x.shape[-1] + 1), pad, dtype=x.dtype, device=device)
        view = buf[..., 1::2]
        view.copy_(x)
        return view
    if layout == "column_major" and x.dim() >= 2:
        return x.mT.contiguous().mT
    if layout == "offset":
        buf = torch.full((x.numel() + 1,), pad, dtype=x.dtype, device=device)
        buf[1:].copy_(x.reshape(-1))
        return buf[1:].view(x.shape)
    return x.contiguous()


def random_parents(seed, num_joints):
    gen = torch.Generator().manual_seed(seed)
    return torch.tensor(
        [-1] + [int(torch.randint(0, j, (1,), generator=gen)) for j in range(1, num_joints)]
    )


def d64(x):
    return None if x is None else x.detach().to("cpu", F64)


def a64(x):
    return None if x is None else x.detach().to("cpu", F64).abs()


def assert_matches(actual, exact, magnitude, terms, what, **kwargs):
    """actual (any dtype/device) against the float64 oracle `exact`, within
    2 * terms * eps * magnitude (see the module docstring); kwargs as assert_within."""
    eps = torch.finfo(actual.dtype).eps
    bound = 2 * terms * eps * magnitude.nan_to_num(nan=INF) + torch.finfo(actual.dtype).tiny
    assert_within(actual, exact, bound, what, **kwargs)


def assert_within(actual, exact, bound, what, finite=None, exact_nan=True, keep_sample_nan=True,
                  ignore=None):
    """|actual - exact| <= bound where both are finite, and a matching non-finite pattern.

    `ignore` (a mask) leaves entries unchecked: where an intermediate of the computation
    is past the dtype's range (inf in float32) while the float64 output is not.

    `finite` (default: where `exact` is finite) is where the op must give finite values.
    With exact_nan, it must give non-finite values everywhere else; without, it may give
    a finite value where the oracle's NaN comes from a 0 * NaN of its own formulation
    (a rotation entry does not depend on a joint location, but a 4x4 product multiplies
    it by 0), as long as (keep_sample_nan) every sample with a non-finite oracle output
    has one too.
    """
    assert actual.shape == exact.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    got = actual.detach().to("cpu", F64)
    finite = exact.isfinite() if finite is None else finite & exact.isfinite()
    # float32 outputs of finite float64 values beyond float32's range overflow to inf.
    representable = finite & (exact.abs() < torch.finfo(actual.dtype).max / 2)
    mismatch = (got.isfinite() != finite) if exact_nan else (finite & ~got.isfinite())
    mismatch &= ~(finite & ~representable)
    if ignore is not None:
        mismatch &= ~ignore
        representable = representable & ~ignore
    assert not mismatch.any(), (
        f"{what}: finite where the reference is not (or the reverse) at "
        f"{mismatch.nonzero()[:3].tolist()}: got {got[mismatch][:3].tolist()}, "
        f"reference {exact[mismatch][:3].tolist()}"
    )
    if not exact_nan and keep_sample_nan and got.dim() and got.numel():
        lost = ~finite.flatten(1).all(dim=1) & got.flatten(1).isfinite().all(dim=1)
        assert not lost.any(), f"{what}: samples {lost.nonzero().flatten().tolist()} lost their NaN"
    bound = torch.as_tensor(bound, dtype=F64).expand_as(exact)
    err = (got - exact).abs()
    bad = representable & got.isfinite() & ~(err <= bound)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} values beyond the tolerance, e.g. got "
        f"{got[bad][:3].tolist()}, reference {exact[bad][:3].tolist()}, bound "
        f"{bound[bad][:3].tolist()}"
    )


def assert_error_names(exc_info, *names):
    message = str(exc_info.value)
    assert any(name in message for name in names), f"{names} not named in: {message}"


# --------------------------------------------------------------------------------------
# blend


@st.composite
def blend_cases(draw):
    batch = draw(st.sampled_from([0, 1, 2, 3, 5, 8, 9, 17, 33]))  # both sides of the BLAS switch
    return dict(
        batch=batch,
        n=draw(st.integers(0, 70)),
        k=draw(st.integers(0, 40)),
        p=draw(st.sampled_from([None, 0, 1, 9, 36])),
        base_kind=draw(st.sampled_from(["flat", "shared", "batched"])),
        dtype=draw(dtypes),
        seed=draw(seeds),
        layouts=draw(st.lists(layouts, min_size=5, max_size=5)),
        inject=draw(st.lists(specials, min_size=5, max_size=5)),
        grad=draw(st.booleans()),
    )


def make_blend(case, device):
    b, n, kk, p = case["batch"], case["n"], case["k"], case["p"]
    base_shape = {"flat": (n,), "shared": (1, n), "batched": (b, n)}[case["base_kind"]]
    shapes = [base_shape, (n, kk), (b, kk), (p or 0, n), (b, p or 0)]
    args = []
    for i, shape in enumerate(shapes):
        x = random_values(case["seed"] + i, shape, inject=case["inject"][i])
        args.append(lay_out(x.to(case["dtype"]), case["layouts"][i], device))
    if p is None:
        args[3] = args[4] = None
    return args


@given(case=blend_cases())
def test_blend_matches_reference(k, device, case):
    needs_kernels(device, "blend")
    base, dirs, coeffs, pose_dirs, pose_coeffs = make_blend(case, device)
    grad = case["grad"]
    leaves = [x.detach().requires_grad_(grad) if x is not None else None for x in
              (base, dirs, coeffs, pose_dirs, pose_coeffs)]
    out = k.blend(*leaves)
    assert out.dtype == case["dtype"] and out.device == coeffs.device
    exact = reference.blend(*map(d64, leaves))
    magnitude = reference.blend(*map(a64, leaves))
    terms = case["k"] + (case["p"] or 0) + 1
    assert_matches(out, exact, magnitude, terms, "blend")
    if not grad or out.numel() == 0:
        return
    g = random_values(case["seed"] + 9, out.shape).to(out)
    got = torch.autograd.grad(out, [x for x in leaves if x is not None], g, allow_unused=True)
    ref_leaves = [d64(x).requires_grad_(True) if x is not None else None for x in leaves]
    want = torch.autograd.grad(
        reference.blend(*ref_leaves), [x for x in ref_leaves if x is not None], d64(g)
    )
    abs_leaves = [a64(x).requires_grad_(True) if x is not None else None for x in leaves]
    mags = torch.autograd.grad(
        reference.blend(*abs_leaves), [x for x in abs_leaves if x is not None], a64(g)
    )
    # Each gradient sums over the batch and / or the N rows.
    terms = max(case["batch"], case["n"], 1) + 1
    for name, a, e, m in zip(["base", "dirs", "coeffs", "pose_dirs", "pose_coeffs"], got, want, mags):
        assert_matches(a, e, m, terms, f"grad {name}")


# --------------------------------------------------------------------------------------
# rigid_transforms


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
def test_rigid_transforms_matches_reference(k, device, case):
    pose, joints, parents = make_chain(case, device)
    transforms, feature = k.rigid_transforms(pose, joints, parents)
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
def test_rigid_transforms_grad_matches_reference(k, device, case):
    assume(case["batch"] > 0)
    pose, joints, parents = make_chain(case, device)
    p, jt = (x.detach().requires_grad_(True) for x in (pose, joints))
    transforms, feature = k.rigid_transforms(p, jt, parents)
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


# --------------------------------------------------------------------------------------
# skin


@st.composite
def skin_cases(draw):
    return dict(
        batch=draw(st.sampled_from([0, 1, 2, 3, 6])),
        num_verts=draw(st.sampled_from([0, 1, 7, 64, 513, 1100])),  # CPU chunks of 512
        num_joints=draw(st.integers(1, 16)),
        dtype=draw(dtypes),
        seed=draw(seeds),
        write=draw(st.booleans()),
        layouts=draw(st.lists(layouts, min_size=3, max_size=3)),
        inject=draw(st.lists(specials, min_size=3, max_size=3)),
        grad_weights=draw(st.booleans()),
        use_t=draw(st.booleans()),
    )


def make_skin(case, device):
    b, v, j = case["batch"], case["num_verts"], case["num_joints"]
    shapes = [(b, v, 3), (b, j, 4, 4), (v, j)]
    return [
        lay_out(random_values(case["seed"] + i, s, inject=case["inject"][i]).to(case["dtype"]),
                case["layouts"][i], device)
        for i, s in enumerate(shapes)
    ]


@given(case=skin_cases())
def test_skin_matches_reference(k, device, case):
    v_posed, transforms, weights = make_skin(case, device)
    leaves = [x.detach().requires_grad_(True) for x in (v_posed, transforms)]
    leaves.append(weights.detach().requires_grad_(case["grad_weights"]))
    v, vt = k.skin(*leaves, case["write"])
    assert (vt is None) == (not case["write"])
    exact_v, exact_t = reference.skin(*map(d64, leaves), True)
    mag_v, mag_t = reference.skin(*map(a64, leaves), True)
    terms = case["num_joints"] + 4
    # T_v = sum_j w[v, j] A_j is formed before it is applied: in float32 an entry past the
    # range is inf, and the row of v that reads it is not finite (inf * 0, inf - inf) even
    # where the float64 v is representable (1e30 weights and transforms, a zero point).
    big = torch.finfo(case["dtype"]).max / 2
    t_overflow = mag_t.nan_to_num(nan=0.0) >= big
    v_overflow = t_overflow[..., :3, :].any(-1)
    assert_matches(v, exact_v, mag_v, terms, "v", ignore=v_overflow)
    if case["write"]:
        assert_matches(vt, exact_t, mag_t, terms, "vertex_transforms", ignore=t_overflow)
    if v.numel() == 0:
        return
    outputs, grads = [v], [random_values(case["seed"] + 7, v.shape).to(v)]
    if case["write"] and case["use_t"]:
        outputs.append(vt)
        grads.append(random_values(case["seed"] + 8, vt.shape).to(vt))
    wanted = [x for x in leaves if x.requires_grad]
    got = torch.autograd.grad(outputs, wanted, grads)

    def reference_grads(convert):
        # Without a gradient for T, no gradient reaches the bottom rows of the
        # transforms: exactly zero, even where a weight is NaN (so the reference skins
        # with the top rows only, as the op's backward does).
        ref = [convert(x).requires_grad_(x.requires_grad) for x in leaves]
        rv, rt = reference.skin(*ref, len(outputs) == 2)
        outs = [rv, rt][: len(outputs)]
        return torch.autograd.grad(outs, [x for x in ref if x.requires_grad],
                                   [convert(g) for g in grads])

    want, mags = reference_grads(d64), reference_grads(a64)
    # Gradients of transforms and weights sum over the vertices (and the batch); that of
    # v_posed is T_v^T grad, which reads the overflowing entries of T_v (above).
    terms = max(case["num_verts"], 1) * max(case["batch"], 1) + case["num_joints"] + 4
    ignores = [t_overflow[..., :3, :3].any(-2), None, None]
    for a, e, m, ignore in zip(got, want, mags, [i for i, x in zip(ignores, leaves)
                                                  if x.requires_grad]):
        assert_matches(a, e, m, terms, "skin gradient", ignore=ignore)


# --------------------------------------------------------------------------------------
# landmarks


@st.composite
def landmark_cases(draw):
    num_verts = draw(st.integers(1, 30))
    return dict(
        batch=draw(st.sampled_from([0, 1, 2, 5, 40])),
        num_verts=num_verts,
        num_faces=draw(st.integers(1, 20)),
        n_static=draw(st.integers(0, 10)),
        n_bins=draw(st.sampled_from([None, 1, 5, 79])),  # None: no contour
        n_contour=draw(st.integers(0, 5)),
        num_joints=draw(st.integers(2, 5)),
        rule=draw(st.sampled_from(["medusa", "deca"])),
        dtype=draw(dtypes),
        seed=draw(seeds),
        pose_scale=draw(st.sampled_from([0.3, 2.0, 1e4])),
        layouts=draw(st.lists(layouts, min_size=8, max_size=8)),
        inject=draw(st.lists(specials, min_size=2, max_size=2)),
    )


def make_landmarks(case, device):
    gen = torch.Generator().manual_seed(case["seed"])
    b, nv, nf, dtype = case["batch"], case["num_verts"], case["num_faces"], case["dtype"]
    lay = case["layouts"]

    def index(high, shape, i):
        return lay_out(torch.randint(0, high, shape, generator=gen), lay[i], device, INDEX_PAD)

    def weights(shape, i):
        return lay_out(torch.rand(shape, generator=gen, dtype=F64).to(dtype), lay[i], device)

    args = dict(
        v=lay_out(random_values(case["seed"], (b, nv, 3), inject=case["inject"][0]).to(dtype),
                  lay[0], device),
        poses=None,
        tris=index(nv, (nf, 3), 1),
        lmk_faces_idx=index(nf, (case["n_static"],), 2),
        lmk_bary_coords=weights((case["n_static"], 3), 3),
        dynamic_lmk_faces_idx=None,
        dynamic_lmk_bary_coords=None,
        contour_rule=case["rule"],
    )
    if case["n_bins"] is not None:
        nb, nc = case["n_bins"], case["n_contour"]
        poses = random_values(case["seed"] + 1, (b, 3 * case["num_joints"]),
                              case["pose_scale"], case["inject"][1])
        args.update(
            poses=lay_out(poses.to(dtype), lay[4], device),
            dynamic_lmk_faces_idx=index(nf, (nb, nc), 5),
            dynamic_lmk_bary_coords=weights((nb, nc, 3), 6),
        )
    return args


def landmarks_oracle(v64, args, convert, rows=None):
    """The landmarks of float64 vertices `v64` with the tables of `args` (weights through
    `convert`), in plain torch ops; `rows` = (faces (B, Ld), bary (B, Ld, 3)) are the
    contour rows each sample uses (None: static landmarks only)."""
    tris = args["tris"].cpu()
    static = reference.landmarks(
        v64, None, tris, args["lmk_faces_idx"].cpu(), convert(args["lmk_bary_coords"])
    )
    if rows is None:
        return static
    faces, bary = rows[0].cpu(), convert(rows[1])
    batch, n_contour = faces.shape
    corners = tris[faces.reshape(-1)].view(batch, 3 * n_contour, 1).expand(-1, -1, 3)
    points = v64.gather(1, corners).view(batch, n_contour, 3, 3)
    contour = torch.einsum("blkc,blk->blc", points, bary)
    return torch.cat([contour, static], dim=1)


@given(case=landmark_cases())
def test_landmarks_match_reference(k, device, case):
    args = make_landmarks(case, device)
    v = args["v"].detach().requires_grad_(True)
    args["v"] = v
    lmk = k.landmarks(**args)
    contour = case["n_bins"] is not None
    n_contour = case["n_contour"] if contour else 0
    n_lmk = n_contour + case["n_static"]
    assert lmk.shape == (case["batch"], n_lmk, 3)
    assert lmk.dtype == case["dtype"] and lmk.device == v.device
    rows = None
    if contour:
        # The bins come from the op itself (it returns them): a yaw within rounding of a
        # .5 tie, or from a huge angle whose last bits decide sin and cos, may fall on
        # either side, and both sides are right. Where the yaw is clear of that, the bins
        # must be the reference's (clamped to the table, as the op documents).
        names = ("v", "poses", "tris", "lmk_faces_idx", "lmk_bary_coords",
                 "dynamic_lmk_faces_idx", "dynamic_lmk_bary_coords")
        rule = 1 if case["rule"] == "medusa" else 2
        _, bins = torch.ops.flame_ext.landmarks(*(args[n].detach() for n in names), rule)
        bins = bins.cpu()
        assert ((0 <= bins) & (bins < case["n_bins"])).all(), bins
        poses = d64(args["poses"])
        want = reference.contour_bins(poses, case["rule"]).clamp(max=case["n_bins"] - 1)
        clear = ~_near_tie(poses, case["rule"], case["dtype"])
        assert torch.equal(bins[clear], want[clear]), (bins, want)
        rows = (args["dynamic_lmk_faces_idx"].cpu()[bins],
                args["dynamic_lmk_bary_coords"].cpu()[bins])
    exact = landmarks_oracle(d64(v), args, d64, rows)
    assert_matches(lmk, exact, landmarks_oracle(a64(v), args, a64, rows), 3, "landmarks")
    if lmk.numel() == 0:
        return
    g = random_values(case["seed"] + 5, lmk.shape).to(lmk)
    (got,) = torch.autograd.grad(lmk, v, g)
    rv = d64(v).requires_grad_(True)
    (want,) = torch.autograd.grad(landmarks_oracle(rv, args, d64, rows), rv, d64(g))
    av = a64(v).requires_grad_(True)
    (mag,) = torch.autograd.grad(landmarks_oracle(av, args, a64, rows), av, a64(g))
    assert_matches(got, want, mag, 3 * n_lmk + 1, "grad v")


def _near_tie(poses, rule, dtype):
    """Samples whose continuous yaw is within float rounding of a .5 bin boundary, or whose
    angles are so large that the rounding of sin / cos / the norm moves the yaw."""
    to_matrix = reference.euler_xyz_to_matrix if rule == "medusa" else reference.rodrigues
    rel = to_matrix(poses[:, 0:3]) @ to_matrix(poses[:, 3:6])
    yaw = torch.rad2deg(torch.atan2(-rel[:, 2, 0], torch.hypot(rel[:, 0, 0], rel[:, 1, 0])))
    yaw = -yaw if rule == "medusa" else yaw
    margin = 1e4 * torch.finfo(dtype).eps * (1 + poses[:, :6].abs().amax(dim=1))
    tie = (yaw - yaw.floor() - 0.5).abs() < margin
    return tie | ~yaw.isfinite() | ~poses[:, :6].isfinite().all(dim=1) | (margin > 0.1)


# --------------------------------------------------------------------------------------
# Decoders: every path against the reference path in float64


@pytest.fixture(scope="module")
def decoders():
    """get(kind, backend, dtype, device, option): modules built once per combination
    (construction loads the model, which these tests are not about)."""
    cache = {}

    def get(kind, backend, dtype, device, option):
        key = (kind, backend, dtype, str(device), option)
        if key not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the synthetic-model notice
                if kind == "shape":
                    module = FlameShape(6, 4, device=device, model_path=SMALL, backend=backend,
                                        transforms=option)
                elif kind == "landmark":
                    lm_type, lm_dim, rule = option
                    module = FlameLandmark(lm_type, lm_dim, device=device, model_path=SMALL,
                                           backend=backend, contour_rule=rule)
                else:
                    module = FlameTex(SMALL, n_tex=option, backend=backend).to(device)
            cache[key] = module.to(dtype)
        return cache[key]

    return get


# Decoder tolerances against the float64 reference path. float64: the two paths differ
# only in summation order, ~1e-15 relative on coordinates of ~1. float32: the blend sums
# 10 products, the chain multiplies 3 rotations of angles up to ~5 rad (argument
# reduction loses ~eps * angle) and translations of ~1: a few 1e-6 absolute, so 5e-5 and
# 1e-4 relative leave headroom without hiding a wrong term (those are O(0.01..1)).
DECODER_TOL = {F64: (1e-9, 1e-10), F32: (1e-4, 5e-5)}


def decoder_bound(exact, dtype, scale=1.0):
    rtol, atol = DECODER_TOL[dtype]
    return atol * scale + rtol * exact.abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


@st.composite
def shape_cases(draw):
    return dict(
        batch=draw(st.sampled_from([0, 1, 2, 5])),
        names=draw(st.lists(st.sampled_from(INPUT_NAMES), unique=True, max_size=6)),
        broadcast=draw(st.lists(st.booleans(), min_size=6, max_size=6)),
        layouts=draw(st.lists(layouts, min_size=6, max_size=6)),
        dtype=draw(dtypes),
        seed=draw(seeds),
        scale=draw(st.sampled_from([0.05, 0.5, 1.5])),
        transforms=draw(st.sampled_from(["vertex", "joint", "none"])),
        backend=draw(st.sampled_from(["ext", "medusa"])),
        # NaN inputs on the compiled path only: the medusa baseline reproduces medusa's
        # NaN spreading (a NaN joint reaches R's constant bottom row through 0 * NaN).
        nan_input=draw(st.one_of(st.none(), st.integers(0, 5))),
        grad=draw(st.booleans()),
    )


@given(case=shape_cases())
def test_flame_shape_matches_reference(decoders, device, case):
    needs_kernels(device, "blend", "skin")
    transforms = "vertex" if case["backend"] == "medusa" else case["transforms"]
    module = decoders("shape", case["backend"], case["dtype"], device, transforms)
    oracle = decoders("shape", "reference", F64, "cpu", transforms)
    batch, inputs = case["batch"], {}
    for i, name in enumerate(case["names"]):
        rows = 1 if case["broadcast"][i] else batch
        x = random_values(case["seed"] + i, (rows, getattr(module, name).shape[1]), case["scale"])
        if case["nan_input"] == i and case["backend"] == "ext" and x.numel():
            x.view(-1)[-1] = NAN
        x = lay_out(x.to(case["dtype"]), case["layouts"][i], device)
        inputs[name] = x.detach().requires_grad_(case["grad"])
    # medusa takes the batch from the first input; all of batch 1 (or none) need it given.
    explicit = all(x.shape[0] == 1 for x in inputs.values()) and batch != 1
    kwargs = dict(batch_size=batch) if explicit or not inputs else {}
    v, R = module(**kwargs, **inputs)
    v0, R0 = oracle(**kwargs, **{n: d64(x).requires_grad_(case["grad"]) for n, x in inputs.items()})
    assert v.shape == (batch, module.v_template.shape[0], 3) and v.dtype == case["dtype"]
    assert (R is None) == (transforms == "none")
    outputs = [(v, v0, "v")] + ([(R, R0, "R")] if R is not None else [])
    for got, exact, what in outputs:
        assert_within(got, exact.detach(), decoder_bound(exact.detach(), case["dtype"]), what,
                      exact_nan=False)
    if not case["grad"] or not inputs:
        return
    # batch 0 included: the backward of an empty batch must run too (empty gradients)
    grads = [random_values(case["seed"] + 20 + i, got.shape) for i, (got, _, _) in enumerate(outputs)]
    got_g = torch.autograd.grad([o[0] for o in outputs], list(inputs.values()),
                                [g.to(v) for g in grads])
    oracle_inputs = [d64(x).requires_grad_(True) for x in inputs.values()]
    v0, R0 = oracle(**kwargs, **dict(zip(inputs, oracle_inputs)))
    want_g = torch.autograd.grad([v0, R0][: len(outputs)], oracle_inputs, grads)
    for name, got, exact in zip(inputs, got_g, want_g):
        # A gradient sums over every vertex (and sample, for a broadcast input).
        magnitude = exact.abs().nan_to_num(nan=0.0, posinf=0.0)
        scale = (magnitude.amax().item() if magnitude.numel() else 0.0) + 1.0
        assert_within(got, exact, decoder_bound(exact, case["dtype"], scale) * 10,
                      f"grad {name}", exact_nan=False, keep_sample_nan=False)


@st.composite
def landmark_decoder_cases(draw):
    return dict(
        batch=draw(st.sampled_from([0, 1, 3, 8])),
        option=draw(st.sampled_from([("68", "2d", "medusa"), ("68", "2d", "deca"),
                                     ("68", "3d", "medusa"), ("mp", "2d", "medusa"),
                                     ("mp", "3d", "medusa")])),
        backend=draw(st.sampled_from(["ext", "medusa"])),
        broadcast_poses=draw(st.booleans()),
        layouts=draw(st.lists(layouts, min_size=2, max_size=2)),
        dtype=draw(dtypes),
        seed=draw(seeds),
        pose_scale=draw(st.sampled_from([0.2, 1.0, 3.0])),
        inject=draw(st.lists(specials, min_size=2, max_size=2)),
    )


@given(case=landmark_decoder_cases())
def test_flame_landmark_matches_reference(decoders, device, case):
    option = case["option"]
    backend = case["backend"] if option[2] == "medusa" else "ext"
    module = decoders("landmark", backend, case["dtype"], device, option)
    oracle = decoders("landmark", "reference", F64, "cpu", option)
    batch = case["batch"]
    v = random_values(case["seed"], (batch, module.num_vertices, 3), inject=case["inject"][0])
    v = lay_out(v.to(case["dtype"]), case["layouts"][0], device).requires_grad_(True)
    poses = random_values(case["seed"] + 1, (1 if case["broadcast_poses"] else batch, 15),
                          case["pose_scale"], case["inject"][1])
    poses = lay_out(poses.to(case["dtype"]), case["layouts"][1], device)
    lmk = module(v, poses)
    exact = oracle(d64(v), d64(poses))
    assert lmk.shape == exact.shape and lmk.dtype == case["dtype"]
    # Samples whose yaw is within rounding of a bin boundary may take either bin.
    keep = torch.ones(batch, dtype=torch.bool)
    if option[:2] == ("68", "2d") and batch:
        keep = ~_near_tie(d64(poses).expand(batch, -1), option[2], case["dtype"])
    magnitude = oracle(a64(v), d64(poses)).abs()
    assert_matches(lmk[keep.to(lmk.device)], exact[keep], magnitude[keep], 3, "landmarks")
    if batch and keep.any():
        g = random_values(case["seed"] + 2, lmk.shape)
        (got,) = torch.autograd.grad(lmk, v, g.to(lmk))
        rv = d64(v).requires_grad_(True)
        (want,) = torch.autograd.grad(oracle(rv, d64(poses)), rv, g)
        bound = 3 * 2 * torch.finfo(case["dtype"]).eps * 68 * g.abs().amax() + 1e-300
        assert_within(got[keep.to(got.device)], want[keep], bound, "grad v")


@st.composite
def texture_cases(draw):
    return dict(
        batch=draw(st.sampled_from([0, 1, 2, 4])),
        n_tex=draw(st.sampled_from([0, 1, 3, 5])),  # the small BFM basis has 5
        backend=draw(st.sampled_from(["ext", "medusa"])),
        layout=draw(layouts),
        dtype=draw(dtypes),
        seed=draw(seeds),
        inject=draw(specials),
    )


@given(case=texture_cases())
def test_flame_tex_matches_reference(decoders, device, case):
    needs_kernels(device, "blend")
    module = decoders("tex", case["backend"], case["dtype"], device, case["n_tex"])
    oracle = decoders("tex", "reference", F64, "cpu", case["n_tex"])
    code = random_values(case["seed"], (case["batch"], case["n_tex"]), inject=case["inject"])
    code = lay_out(code.to(case["dtype"]), case["layout"], device)
    out = module(code)
    assert out.shape == (case["batch"], 3, 256, 256) and out.dtype == case["dtype"]
    exact = oracle(d64(code))
    magnitude = reference.blend(oracle._gathered_mean.abs(), oracle._gathered_basis.abs(),
                                a64(code)).view_as(exact)
    assert_matches(out, exact, magnitude, case["n_tex"] + 1, "texture")


# --------------------------------------------------------------------------------------
# Bad arguments: a ValueError or TypeError that names the argument


BAD_FLOAT_DTYPES = (torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.complex64,
                    torch.bool)
BAD_INDEX_DTYPES = (torch.int32, torch.float32, torch.uint8)
CORRUPTIONS = ("rank_up", "rank_down", "size", "dtype", "device", "not_tensor", "sparse")


def corrupt(x, how, size_dims, draw_index):
    """x made invalid in one way (size_dims: the dims whose size is checked against other
    arguments; draw_index picks among the variants)."""
    if how == "not_tensor":
        return [x.detach().cpu().numpy(), x.tolist(), None, 1.0][draw_index % 4]
    if how == "rank_up":
        return x.unsqueeze(-1).expand(*x.shape, 2)
    if how == "rank_down":
        return x[..., 0] if x.dim() else x.unsqueeze(0)
    if how == "dtype":
        bad = BAD_INDEX_DTYPES if x.dtype == torch.int64 else BAD_FLOAT_DTYPES
        bad = [d for d in bad if d != x.dtype]
        return x.to(bad[draw_index % len(bad)])
    if how == "device":
        return x.to("meta")
    if how == "sparse":
        return x.detach().to_sparse()
    dim = size_dims[draw_index % len(size_dims)]
    return torch.cat([x, x.narrow(dim, 0, 1)], dim=dim)


def bad_op_cases(device):
    """op name -> (good arguments, {argument: dims whose size is checked},
    {argument: other arguments a size error may name instead})."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.rand(shape, generator=gen).to(device)

    def index(high, *shape):
        return torch.randint(0, high, shape, generator=gen).to(device)

    return {
        "blend": (
            dict(base=rand(1, 7), dirs=rand(7, 4), coeffs=rand(3, 4), pose_dirs=rand(9, 7),
                 pose_coeffs=rand(3, 9)),
            dict(base=(1,), dirs=(0, 1), coeffs=(1,), pose_dirs=(1,), pose_coeffs=(0, 1)),
            # K is set by coeffs and checked on dirs: either may be named.
            dict(coeffs=("dirs",)),
        ),
        "rigid_transforms": (
            dict(pose=rand(3, 5, 3), joints=rand(3, 5, 3),
                 parents=torch.tensor([-1, 0, 1, 1, 1])),
            dict(pose=(2,), joints=(0, 1, 2), parents=(0,)), {},
        ),
        "skin": (
            dict(v_posed=rand(2, 10, 3), transforms=rand(2, 5, 4, 4), lbs_weights=rand(10, 5)),
            dict(v_posed=(2,), transforms=(0, 2, 3), lbs_weights=(0, 1)), {},
        ),
        "landmarks": (
            dict(v=rand(2, 12, 3), poses=rand(2, 15), tris=index(12, 9, 3),
                 lmk_faces_idx=index(9, 4), lmk_bary_coords=rand(4, 3),
                 dynamic_lmk_faces_idx=index(9, 6, 2), dynamic_lmk_bary_coords=rand(6, 2, 3)),
            dict(v=(2,), poses=(0, 1), tris=(1,), lmk_faces_idx=(), lmk_bary_coords=(0, 1),
                 dynamic_lmk_faces_idx=(), dynamic_lmk_bary_coords=(0, 1, 2)), {},
        ),
    }


OP_ARGUMENTS = [(op, name) for op, names in (
    ("blend", ("base", "dirs", "coeffs", "pose_dirs", "pose_coeffs")),
    ("rigid_transforms", ("pose", "joints", "parents")),
    ("skin", ("v_posed", "transforms", "lbs_weights")),
    ("landmarks", ("v", "poses", "tris", "lmk_faces_idx", "lmk_bary_coords",
                   "dynamic_lmk_faces_idx", "dynamic_lmk_bary_coords")),
) for name in names]


@pytest.mark.parametrize("op, name", OP_ARGUMENTS, ids=[f"{o}-{n}" for o, n in OP_ARGUMENTS])
@given(how=st.sampled_from(CORRUPTIONS), variant=st.integers(0, 11))
def test_op_bad_argument_is_named(k, device, op, name, how, variant):
    good, size_dims, partners = bad_op_cases(device)[op]
    dims = size_dims[name]
    assume(how != "size" or dims)
    if how == "rank_down" and good[name].dim() == 1:
        assume(name != "parents")  # parents () is caught as a shape error too; see below
    args = dict(good, **{name: corrupt(good[name], how, dims, variant)})
    if args[name] is None and name in ("pose_dirs", "pose_coeffs", "dynamic_lmk_faces_idx",
                                       "dynamic_lmk_bary_coords"):
        # Optional in pairs: one of the pair without the other is the error.
        names = {"pose_dirs": "pose_coeffs", "pose_coeffs": "pose_dirs",
                 "dynamic_lmk_faces_idx": "dynamic_lmk_bary_coords",
                 "dynamic_lmk_bary_coords": "dynamic_lmk_faces_idx"}
        with pytest.raises(ValueError) as info:
            getattr(k, op)(**args)
        assert_error_names(info, name, names[name])
        return
    with pytest.raises((ValueError, TypeError)) as info:
        getattr(k, op)(**args)
    assert_error_names(info, name, *(partners.get(name, ()) if how == "size" else ()))


@given(value=st.one_of(st.integers(-2, 3), st.none(), st.text(max_size=3), st.floats(),
                       st.just(np.bool_(True)), st.just(torch.tensor(True))))
def test_skin_write_flag_must_be_a_bool(k, device, value):
    good = bad_op_cases(device)["skin"][0]
    with pytest.raises(TypeError) as info:
        k.skin(**good, write_vertex_transforms=value)
    assert_error_names(info, "write_vertex_transforms")


@given(value=st.one_of(st.text(max_size=8), st.integers(), st.none()))
def test_landmarks_contour_rule_is_checked(k, device, value):
    assume(value not in ("medusa", "deca"))
    good = bad_op_cases(device)["landmarks"][0]
    with pytest.raises((ValueError, TypeError)) as info:
        k.landmarks(**good, contour_rule=value)
    assert_error_names(info, "contour_rule")


DECODER_ARGUMENTS = [("shape", name) for name in INPUT_NAMES] + [
    ("landmark", "v"), ("landmark", "poses"), ("tex", "texcode")]


@pytest.mark.parametrize("kind, name", DECODER_ARGUMENTS,
                         ids=[f"{k}-{n}" for k, n in DECODER_ARGUMENTS])
@given(how=st.sampled_from(CORRUPTIONS + ("batch",)), variant=st.integers(0, 11),
       backend=st.sampled_from(["ext", "reference", "medusa"]))
def test_decoder_bad_input_is_named(decoders, device, kind, name, how, variant, backend):
    needs_kernels(device, "blend")  # building the modules runs no kernel, but keep it simple
    gen = torch.Generator().manual_seed(variant)
    if kind == "shape":
        module = decoders("shape", backend, F32, device, "vertex")
        good = {n: torch.rand(3, getattr(module, n).shape[1], generator=gen).to(device)
                for n in INPUT_NAMES}
        call = lambda args: module(**args)  # noqa: E731
    elif kind == "landmark":
        module = decoders("landmark", backend, F32, device, ("68", "2d", "medusa"))
        good = dict(v=torch.rand(3, module.num_vertices, 3, generator=gen).to(device),
                    poses=torch.rand(3, 15, generator=gen).to(device))
        call = lambda args: module(args["v"], args["poses"])  # noqa: E731
    else:
        module = decoders("tex", backend, F32, device, 5)
        good = dict(texcode=torch.rand(3, 5, generator=gen).to(device))
        call = lambda args: module(args["texcode"])  # noqa: E731
    x = good[name]
    assume(not (how == "batch" and kind == "tex"))  # one input: any batch is fine
    if how == "batch":  # 2 samples where the others have 3: neither 3 nor 1
        bad = x[:2]
    elif how == "dtype" and variant % 2:
        bad = x.double()  # float64 into a float32 module
    else:
        bad = corrupt(x, how, (x.dim() - 1,), variant)
    if name == "v" and how == "rank_up":
        bad = x.unsqueeze(0)  # (1, B, V, 3): rank 4
    with pytest.raises((ValueError, TypeError)) as info:
        call(dict(good, **{name: bad}))
    if how == "batch":  # medusa's rule: the first input sets the batch, a later one is wrong
        assert_error_names(info, name, "batch size")
    else:
        assert_error_names(info, name)


@given(
    n_shape=st.one_of(st.integers(-3, 9), st.floats(0, 6), st.booleans(), st.none(), st.text(max_size=2)),
    n_expr=st.one_of(st.integers(-3, 6), st.none()),
)
def test_flame_shape_counts_are_checked(n_shape, n_expr):
    valid = lambda n, high: isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= high  # noqa: E731
    # No components at all: test_hardening.py::test_flame_shape_without_components.
    assume((n_shape, n_expr) != (0, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if valid(n_shape, 6) and valid(n_expr, 4):
            module = FlameShape(n_shape, n_expr, device="cpu", model_path=SMALL)
            assert module.shape_dirs.shape[2] == n_shape + n_expr
            return
        with pytest.raises((ValueError, TypeError)) as info:
            FlameShape(n_shape, n_expr, device="cpu", model_path=SMALL)
    assert_error_names(info, "n_shape" if not valid(n_shape, 6) else "n_expr")


@given(n_tex=st.one_of(st.integers(-3, 250), st.floats(0, 6), st.booleans(), st.none()))
def test_flame_tex_count_is_checked(n_tex):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(n_tex, int) and not isinstance(n_tex, bool) and 0 <= n_tex <= 5:
            assert FlameTex(SMALL, n_tex=n_tex).n_tex == n_tex
            return
        with pytest.raises((ValueError, TypeError)) as info:
            FlameTex(SMALL, n_tex=n_tex)
    assert_error_names(info, "n_tex")


@given(option=st.sampled_from(["lm_type", "lm_dim", "contour_rule", "backend"]),
       value=st.one_of(st.text(max_size=4), st.integers(), st.none()))
def test_flame_landmark_options_are_checked(option, value):
    valid = {"lm_type": ("68", "mp"), "lm_dim": ("2d", "3d"), "contour_rule": ("medusa", "deca"),
             "backend": ("auto", "ext", "reference", "medusa")}[option]
    assume(value not in valid)
    kwargs = dict(lm_type="68", lm_dim="2d", device="cpu", model_path=SMALL)
    kwargs[option] = value
    with pytest.raises((ValueError, TypeError)) as info:
        FlameLandmark(**kwargs)
    assert_error_names(info, option)


any_value = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6),
                     st.binary(max_size=4), st.lists(st.integers(), max_size=2))


@given(model_path=any_value)
def test_loader_model_path_is_checked(model_path):
    """Anything but a path (str / PathLike) or None is a TypeError naming model_path; a
    string that names no file is a FileNotFoundError naming it."""
    assume(model_path is not None and model_path not in ("synthetic", "synthetic-small"))
    for load in (fio.load_flame_model, lambda p: fio.load_landmark_embedding("68", p),
                 lambda p: fio.load_texture_space(p, n_tex=1)):
        expected = FileNotFoundError if isinstance(model_path, str) else TypeError
        with pytest.raises(expected) as info:
            load(model_path)
        assert_error_names(info, "model_path")


@given(lm_type=any_value, num_faces=any_value)
def test_landmark_loader_arguments_are_checked(lm_type, num_faces):
    valid_faces = num_faces is None or (
        isinstance(num_faces, int) and not isinstance(num_faces, bool) and num_faces >= 1)
    assume(not (lm_type in ("68", "mp") and valid_faces))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises((ValueError, TypeError)) as info:
            fio.load_landmark_embedding(lm_type, SMALL, num_faces=num_faces)
    assert_error_names(info, "lm_type" if lm_type not in ("68", "mp") else "num_faces",
                       "sits on face")  # a valid count too small for the embedding


@given(size=st.one_of(st.sampled_from(["small", "full"]), any_value),
       seed=st.one_of(st.integers(-3, 3), any_value))
def test_synthetic_arguments_are_checked(size, seed):
    from flame_ext import synthetic

    valid = size in ("small", "full") and isinstance(seed, int) and not isinstance(
        seed, bool) and seed >= 0
    if valid:
        assert len(synthetic.build_assets(size, seed)) == 5  # builds lazily: cheap
        return
    with pytest.raises((ValueError, TypeError)) as info:
        synthetic.build_assets(size, seed)
    assert_error_names(info, "size" if size not in ("small", "full") else "seed")


# --------------------------------------------------------------------------------------
# Damaged files: any mutation of a valid file loads or is refused naming the file


class _Files(dict):
    """File name -> bytes, with a short repr for hypothesis' failure reports."""

    def __repr__(self):
        return f"<{len(self)} synthetic-small asset files>"


@pytest.fixture(scope="module")
def asset_files(tmp_path_factory):
    from flame_ext import synthetic

    directory = tmp_path_factory.mktemp("assets")
    synthetic.write_assets(directory, "small", chumpy=True, kintree_dtype="uint32")
    return _Files({path.name: path.read_bytes() for path in directory.iterdir()})


LOADERS = {
    "generic_model.pkl": lambda path: fio.load_flame_model(path),
    "landmark_embedding.npy": lambda path: fio.load_landmark_embedding("68", path),
    "mediapipe_landmark_embedding.npz": lambda path: fio.load_landmark_embedding("mp", path),
    "FLAME_albedo_from_BFM.npz": lambda path: fio.load_texture_space(path, n_tex=3),
    "FLAME_texture.npz": lambda path: fio.load_texture_space(path, n_tex=3),
}


@st.composite
def mutations(draw):
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "delete"]))
    return kind, draw(st.floats(0, 1, exclude_max=True)), draw(st.binary(min_size=1, max_size=8))


def mutate(data, mutation):
    kind, where, payload = mutation
    if not data:
        return payload
    i = int(where * len(data))
    if kind == "truncate":
        return data[:i]
    if kind == "flip":
        return data[:i] + bytes([data[i] ^ (payload[0] or 0xFF)]) + data[i + 1:]
    if kind == "overwrite":
        return data[:i] + payload + data[i + len(payload):]
    if kind == "insert":
        return data[:i] + payload + data[i:]
    return data[:i] + data[i + len(payload):]


@pytest.mark.parametrize("name", sorted(LOADERS))
@given(changes=st.lists(mutations(), min_size=1, max_size=3))
def test_damaged_files_load_or_name_the_file(asset_files, tmp_path_factory, name, changes):
    data = asset_files[name]
    for change in changes:
        data = mutate(data, change)
    path = tmp_path_factory.mktemp("damaged") / name
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's TypedStorage notice
        try:
            LOADERS[name](path)
        except (ValueError, TypeError, pickle.UnpicklingError) as e:
            assert str(path) in str(e), f"{type(e).__name__} does not name the file: {e}"
