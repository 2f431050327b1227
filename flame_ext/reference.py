"""Pure-PyTorch FLAME math (SPEC.md section 3) and the landmark and texture rules.

One function per step, written to be read. It is the CPU fallback of the decoders, the
oracle every compiled op is tested against, and a benchmark baseline (eager and under
`torch.compile`). Every function keeps the dtype and device of its inputs (float32 or
float64, any device), is differentiable, and has no host-device synchronisation and no
data-dependent Python control flow, so it compiles without graph breaks and can be
captured in a CUDA graph.

Shapes: B batch, V vertices, K components, J joints, P = 9 (J - 1) pose-corrective
features, L static landmarks, Ld contour landmarks, NB contour bins.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_count, check_same, check_tensor

# The contour-bin rules (docs/SPEC.md section 2): medusa's (the default) and DECA's.
CONTOUR_RULES = ("medusa", "deca")

# medusa / smplx add this to every component of the axis-angle vector before the norm.
RODRIGUES_EPS = 1e-8

# The contour yaw is clamped to +39 degrees; bins 0..39 are yaw 0..39 and 40..78 are
# yaw -1..-39, with everything below -39 in the last bin.
_MAX_YAW = 39
_LAST_BIN = 78
# The bin of a sample whose global or neck pose is not finite: NaN contour points.
NO_CONTOUR_BIN = -1


def _eye3(like: torch.Tensor) -> torch.Tensor:
    return torch.eye(3, dtype=like.dtype, device=like.device)


def _check_vectors3(name: str, value) -> torch.Tensor:
    check_tensor(name, value, floating=True)
    if value.dim() < 1 or value.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (..., 3), got {tuple(value.shape)}")
    return value


def rodrigues(rot_vecs: torch.Tensor) -> torch.Tensor:
    """Axis-angle vectors (..., 3) to rotation matrices (..., 3, 3).

    medusa/smplx numerics: angle = ||rot_vecs + 1e-8||, axis = rot_vecs / angle,
    R = I + sin(angle) K + (1 - cos(angle)) K @ K with K the cross-product matrix of axis.
    Adding the epsilon before the norm keeps the angle non-zero, so a zero vector gets a
    zero axis and exactly the identity, with no branch. 1 - cos(angle) is computed as
    2 sin^2(angle / 2), the same number without the cancellation at small angles (in
    float32 at angle 1e-3, 1 - cos carries a 12% error, which the pose gradient, divided
    by the angle, shows); the compiled kernels do the same (csrc/rotation.h).
    """
    _check_vectors3("rot_vecs", rot_vecs)
    angle = torch.linalg.vector_norm(rot_vecs + RODRIGUES_EPS, dim=-1, keepdim=True)
    axis = rot_vecs / angle
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    cross = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1)
    cross = cross.unflatten(-1, (3, 3))
    angle = angle.unsqueeze(-1)
    return (
        _eye3(rot_vecs)
        + torch.sin(angle) * cross
        + 2 * torch.sin(angle / 2).square() * (cross @ cross)
    )


def blend(base, dirs, coeffs, pose_dirs=None, pose_coeffs=None) -> torch.Tensor:
    """Linear basis blend: base + coeffs @ dirs.T (+ pose_coeffs @ pose_dirs).

    base (N,), (1, N) or (B, N); dirs (N, K); coeffs (B, K); pose_dirs (P, N) and
    pose_coeffs (B, P), both or neither. Returns (B, N). Serves the shape/expression
    blend (SPEC.md section 3 step 1), the pose correctives (step 4) and the texture.
    """
    check_tensor("base", base, floating=True)
    if base.dim() not in (1, 2):
        raise ValueError(f"base must have shape (N,) or (B, N), got {tuple(base.shape)}")
    n = base.shape[-1]
    check_tensor("dirs", dirs, shape=(n, None))
    check_tensor("coeffs", coeffs, shape=(None, dirs.shape[1]))
    check_same("dirs", dirs, base, "base")
    check_same("coeffs", coeffs, base, "base")
    out = base + coeffs @ dirs.mT
    if (pose_dirs is None) != (pose_coeffs is None):
        raise ValueError("pose_dirs and pose_coeffs must be given together or not at all")
    if pose_dirs is not None:
        check_tensor("pose_dirs", pose_dirs, shape=(None, n))
        check_tensor("pose_coeffs", pose_coeffs, shape=(None, pose_dirs.shape[0]))
        check_same("pose_dirs", pose_dirs, base, "base")
        check_same("pose_coeffs", pose_coeffs, base, "base")
        out = out + pose_coeffs @ pose_dirs
    return out


def _homogeneous(rot: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    """[R | t] with the bottom row [0, 0, 0, 1]: rot (..., 3, 3), trans (..., 3) -> (..., 4, 4)."""
    top = torch.cat([rot, trans.unsqueeze(-1)], dim=-1)
    bottom = torch.zeros(4, dtype=rot.dtype, device=rot.device)
    bottom[3] = 1
    return torch.cat([top, bottom.expand(*top.shape[:-2], 1, 4)], dim=-2)


def rigid_transforms(pose, joints, parents):
    """The kinematic chain (SPEC.md section 3 steps 3-5).

    pose (B, J, 3) axis-angle, joints (B, J, 3) rest-pose joint locations, parents (J,)
    int64 with parents[0] = -1 and parents[j] < j. Returns
    transforms (B, J, 4, 4): A_j = G_j with its translation replaced by t_j - R^w_j J_j,
    where G_0 = [R_0 | J_0] and G_j = G_parent(j) @ [R_j | J_j - J_parent(j)]; and
    pose_feature (B, 9 (J - 1)): flatten(R_1 - I, ..., R_{J-1} - I), row-major per joint.
    """
    _check_vectors3("pose", pose)
    check_tensor("pose", pose, ndim=3)
    batch, n_joints = pose.shape[:2]
    check_tensor("joints", joints, shape=(batch, n_joints, 3))
    check_same("joints", joints, pose, "pose")
    check_tensor("parents", parents, shape=(n_joints,), dtype=torch.int64)
    rot = rodrigues(pose)
    return kinematic_chain(rot, joints, parents), (rot[:, 1:] - _eye3(pose)).flatten(1)


def kinematic_chain(rot, joints, parents):
    """The transforms A_j of `rigid_transforms` from the joint rotations themselves.

    rot (B, J, 3, 3) any matrices (rotations from axis-angle, or taken as given, as
    smplx's ``pose2rot=False`` does), joints (B, J, 3), parents (J,) as in
    rigid_transforms. Returns transforms (B, J, 4, 4).
    """
    check_tensor("rot", rot, shape=(None, None, 3, 3), floating=True)
    batch, n_joints = rot.shape[:2]
    check_tensor("joints", joints, shape=(batch, n_joints, 3))
    check_same("joints", joints, rot, "rot")
    check_tensor("parents", parents, shape=(n_joints,), dtype=torch.int64)
    # parents lives with the model; index with it as a tensor so that nothing is read
    # back to the host (no sync per joint on CUDA).
    parents = parents.to(rot.device)

    parent_joints = joints.index_select(1, parents[1:])
    rel_joints = torch.cat([joints[:, :1], joints[:, 1:] - parent_joints], dim=1)
    local = _homogeneous(rot, rel_joints)

    chain = [local[:, 0]]
    for j in range(1, n_joints):
        done = torch.stack(chain, dim=1)
        parent = done.index_select(1, parents[j : j + 1]).squeeze(1)
        chain.append(parent @ local[:, j])
    world = torch.stack(chain, dim=1)

    world_rot = world[..., :3, :3]
    # Skinning moves rest-pose vertices, so the rest-pose joint location is removed.
    trans = world[..., :3, 3] - (world_rot @ joints.unsqueeze(-1)).squeeze(-1)
    return _homogeneous(world_rot, trans)


def skin(v_posed, transforms, lbs_weights, write_vertex_transforms=True):
    """Linear blend skinning (SPEC.md section 3 step 6).

    v_posed (B, V, 3), transforms (B, J, 4, 4), lbs_weights (V, J). Returns v (B, V, 3)
    and T (B, V, 4, 4) with T_v = sum_j lbs_weights[v, j] A_j, or None when
    write_vertex_transforms is False (then only the top 3x4 rows are blended).
    """
    check_tensor("v_posed", v_posed, ndim=3, floating=True)
    batch, n_verts = v_posed.shape[:2]
    check_tensor("v_posed", v_posed, shape=(batch, n_verts, 3))
    check_tensor("transforms", transforms, shape=(None, None, 4, 4))
    n_joints = transforms.shape[1]
    if transforms.shape[0] != batch:
        raise ValueError(
            f"transforms has batch {transforms.shape[0]} but v_posed has batch {batch}"
        )
    check_tensor("lbs_weights", lbs_weights, shape=(n_verts, n_joints))
    check_same("transforms", transforms, v_posed, "v_posed")
    check_same("lbs_weights", lbs_weights, v_posed, "v_posed")

    rows = transforms if write_vertex_transforms else transforms[:, :, :3]
    vertex_transforms = torch.einsum("vj,bjmn->bvmn", lbs_weights, rows)
    v = (vertex_transforms[..., :3, :3] @ v_posed.unsqueeze(-1)).squeeze(-1)
    v = v + vertex_transforms[..., :3, 3]
    return v, (vertex_transforms if write_vertex_transforms else None)


def lbs(
    beta,
    pose,
    v_template,
    shape_dirs,
    pose_dirs,
    J_regressor,
    parents,
    lbs_weights,
    return_vertex_transforms=True,
):
    """The whole of SPEC.md section 3: FLAME parameters to posed vertices.

    beta (B, K) or (1, K) (broadcast over the batch); pose (B, 3J); v_template (V, 3);
    shape_dirs (V, 3, K); pose_dirs (P, 3V); J_regressor (J, V) dense; parents (J,);
    lbs_weights (V, J). Returns (v (B, V, 3), T (B, V, 4, 4) or None).
    """
    check_tensor("v_template", v_template, ndim=2, floating=True)
    n_verts = v_template.shape[0]
    check_tensor("v_template", v_template, shape=(n_verts, 3))
    check_tensor("J_regressor", J_regressor, shape=(None, n_verts))
    n_joints = J_regressor.shape[0]
    check_tensor("pose", pose, shape=(None, 3 * n_joints))
    batch = pose.shape[0]
    check_tensor("shape_dirs", shape_dirs, shape=(n_verts, 3, None))
    check_tensor("beta", beta, shape=(None, shape_dirs.shape[2]))
    if beta.shape[0] not in (1, batch):
        raise ValueError(
            f"beta must have batch 1 or {batch} (the batch of pose), got {beta.shape[0]}"
        )
    check_tensor("pose_dirs", pose_dirs, shape=(9 * (n_joints - 1), 3 * n_verts))
    for name, value in (
        ("pose", pose),
        ("shape_dirs", shape_dirs),
        ("beta", beta),
        ("pose_dirs", pose_dirs),
        ("J_regressor", J_regressor),
    ):
        check_same(name, value, v_template, "v_template")

    v_shaped = blend(v_template.reshape(-1), shape_dirs.reshape(3 * n_verts, -1), beta)
    v_shaped = v_shaped.view(-1, n_verts, 3)
    joints = (J_regressor @ v_shaped).expand(batch, -1, -1)
    transforms, pose_feature = rigid_transforms(
        pose.view(batch, n_joints, 3), joints, parents
    )
    v_posed = v_shaped + (pose_feature @ pose_dirs).view(batch, n_verts, 3)
    return skin(v_posed, transforms, lbs_weights, return_vertex_transforms)


def _axis_rotation(angle: torch.Tensor, axis: str) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) about one coordinate axis, as SPEC.md section 2 writes them."""
    c, s = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(angle), torch.zeros_like(angle)
    if axis == "x":
        rows = (one, zero, zero, zero, c, -s, zero, s, c)
    elif axis == "y":
        rows = (c, zero, s, zero, one, zero, -s, zero, c)
    else:
        rows = (c, -s, zero, s, c, zero, zero, zero, one)
    return torch.stack(rows, dim=-1).unflatten(-1, (3, 3))


def euler_xyz_to_matrix(angles: torch.Tensor) -> torch.Tensor:
    """Euler angles (..., 3) in the 'XYZ' convention to R = Rx(a0) @ Ry(a1) @ Rz(a2)."""
    _check_vectors3("angles", angles)
    a0, a1, a2 = angles.unbind(-1)
    return (
        _axis_rotation(a0, "x") @ _axis_rotation(a1, "y") @ _axis_rotation(a2, "z")
    )


def contour_bins(poses: torch.Tensor, rule: str = "medusa") -> torch.Tensor:
    """The contour-landmark bin of each sample (SPEC.md section 2), (B, 3J) poses -> (B,) int64.

    poses as FlameShape.get_full_pose(): global, neck, jaw, eyes. rel = R_global @ R_neck
    (the neck chain [1, 0]). 'medusa' reads each pose as Euler 'XYZ' angles and negates
    the yaw; 'deca' uses Rodrigues and the positive yaw. Computed in float64 whatever the
    dtype of poses (as the kernels do, so every backend picks the same bin). A sample whose
    global or neck pose is not finite has no bin: NO_CONTOUR_BIN. No gradient.
    """
    if rule not in CONTOUR_RULES:
        raise ValueError(f"rule must be one of {CONTOUR_RULES}, got {rule!r}")
    check_tensor("poses", poses, ndim=2, floating=True)
    if poses.shape[1] < 6 or poses.shape[1] % 3:
        raise ValueError(
            f"poses must have shape (B, 3J) with J >= 2 (global, neck, ...), "
            f"got {tuple(poses.shape)}"
        )
    poses = poses.detach().double()
    to_matrix = euler_xyz_to_matrix if rule == "medusa" else rodrigues
    rel = to_matrix(poses[:, 0:3]) @ to_matrix(poses[:, 3:6])
    yaw = torch.atan2(-rel[:, 2, 0], torch.sqrt(rel[:, 0, 0] ** 2 + rel[:, 1, 0] ** 2))
    if rule == "medusa":
        yaw = -yaw
    # Same operation order as medusa (x * 180 / pi, not x * (180 / pi)): the rounding
    # differs in the last bit, which matters next to a .5 tie.
    degrees = yaw * 180.0 / math.pi
    # Clamping below changes no bin (all of them land in the last one); NaN is mapped
    # to -40 only to keep the cast to int64 defined, and then to NO_CONTOUR_BIN.
    finite = ~torch.isnan(degrees)
    degrees = torch.nan_to_num(degrees, nan=-40.0).clamp(min=-40.0, max=float(_MAX_YAW))
    y = torch.round(degrees).to(torch.int64)
    bins = torch.where(
        y >= 0,
        y,
        torch.where(y >= -_MAX_YAW, _MAX_YAW - y, torch.full_like(y, _LAST_BIN)),
    )
    return torch.where(finite, bins, torch.full_like(bins, NO_CONTOUR_BIN))


def _barycentric(v, face_vertices, bary):
    """sum_k bary[b, l, k] * v[b, face_vertices[b, l, k]]: v (B, V, 3),
    face_vertices (B, L, 3) int64, bary (B, L, 3) -> (B, L, 3)."""
    batch, n_lmk = face_vertices.shape[:2]
    index = face_vertices.reshape(batch, 3 * n_lmk, 1).expand(-1, -1, 3)
    corners = v.gather(1, index).view(batch, n_lmk, 3, 3)
    return torch.einsum("blkc,blk->blc", corners, bary)


def landmarks(
    v,
    poses,
    tris,
    lmk_faces_idx,
    lmk_bary_coords,
    dynamic_lmk_faces_idx=None,
    dynamic_lmk_bary_coords=None,
    contour_rule="medusa",
):
    """Barycentric landmarks on the mesh (SPEC.md section 2, FlameLandmark).

    v (B, V, 3); poses (B, 3J) (only read for the contour; may be None without one);
    tris (F, 3) int64; lmk_faces_idx (L,) int64; lmk_bary_coords (L, 3);
    dynamic_lmk_faces_idx (NB, Ld) and dynamic_lmk_bary_coords (NB, Ld, 3), both or
    neither. Returns (B, Ld + L, 3), the contour points (bin chosen per sample by
    contour_bins(poses, contour_rule)) first. Gradients flow to v only.
    """
    check_tensor("v", v, ndim=3, floating=True)
    batch = v.shape[0]
    check_tensor("v", v, shape=(batch, None, 3))
    check_tensor("tris", tris, shape=(None, 3), dtype=torch.int64)
    check_tensor("lmk_faces_idx", lmk_faces_idx, ndim=1, dtype=torch.int64)
    check_tensor("lmk_bary_coords", lmk_bary_coords, shape=(lmk_faces_idx.shape[0], 3))
    check_same("lmk_bary_coords", lmk_bary_coords, v, "v")

    n_lmk = lmk_faces_idx.shape[0]
    face_vertices = tris.index_select(0, lmk_faces_idx).expand(batch, n_lmk, 3)
    bary = lmk_bary_coords.expand(batch, n_lmk, 3)
    static = _barycentric(v, face_vertices, bary)

    if (dynamic_lmk_faces_idx is None) != (dynamic_lmk_bary_coords is None):
        raise ValueError(
            "dynamic_lmk_faces_idx and dynamic_lmk_bary_coords must be given together "
            "or not at all"
        )
    if dynamic_lmk_faces_idx is None:
        return static

    check_tensor("dynamic_lmk_faces_idx", dynamic_lmk_faces_idx, ndim=2, dtype=torch.int64)
    n_bins, n_contour = dynamic_lmk_faces_idx.shape
    check_tensor(
        "dynamic_lmk_bary_coords", dynamic_lmk_bary_coords, shape=(n_bins, n_contour, 3)
    )
    check_same("dynamic_lmk_bary_coords", dynamic_lmk_bary_coords, v, "v")
    if n_bins != _LAST_BIN + 1:
        raise ValueError(
            f"dynamic_lmk_faces_idx must have {_LAST_BIN + 1} bins (rows), got {n_bins}"
        )
    if poses is None:
        raise ValueError("poses is required when dynamic (contour) landmarks are given")
    check_tensor("poses", poses, ndim=2)
    if poses.shape[0] != batch:
        raise ValueError(f"poses has batch {poses.shape[0]} but v has batch {batch}")
    check_same("poses", poses, v, "v")

    bins = contour_bins(poses, contour_rule)
    rows = bins.clamp(min=0)
    faces = dynamic_lmk_faces_idx.index_select(0, rows)
    face_vertices = tris.index_select(0, faces.reshape(-1)).view(batch, n_contour, 3)
    bary = dynamic_lmk_bary_coords.index_select(0, rows)
    contour = _barycentric(v, face_vertices, bary)
    # No bin (a non-finite global or neck pose): NaN contour points, without gradient.
    has_bin = (bins >= 0).view(batch, 1, 1)
    contour = torch.where(has_bin, contour, torch.full_like(contour, float("nan")))
    return torch.cat([contour, static], dim=1)


def _nearest_source(in_size: int, out_size: int, device) -> torch.Tensor:
    """Source index floor(i * in_size / out_size) of each output index (F.interpolate's
    default 'nearest'), in exact integer arithmetic."""
    return torch.arange(out_size, device=device) * in_size // out_size


def _check_texture_size(height, width, out_size):
    limit = 1 << 20
    check_count("height", height, 1, limit)
    check_count("width", width, 1, limit)
    check_count("out_size", out_size, 1, limit)


def texture_gather_index(height, width, out_size=256, *, device=None) -> torch.Tensor:
    """Flat source index (into the h, w, c order) of each output element of texture().

    Returns an int64 tensor (3 * out_size * out_size,) in (c, i, j) order, channel flip
    included, so that texture(mean, basis, code, H, W, out) ==
    (mean[idx] + code @ basis[idx].T).view(B, 3, out, out).
    """
    _check_texture_size(height, width, out_size)
    rows = _nearest_source(height, out_size, device)
    cols = _nearest_source(width, out_size, device)
    channels = torch.arange(2, -1, -1, device=device)
    pixel = rows[:, None] * width + cols[None, :]
    return (pixel[None] * 3 + channels[:, None, None]).reshape(-1)


def texture(mean, basis, texcode, height, width, out_size=256):
    """The albedo texture (SPEC.md section 2, FlameTex): (B, 3, out_size, out_size).

    mean (H*W*3,) and basis (H*W*3, K) in flat h, w, c order; texcode (B, K). The image
    mean + basis @ code, as (B, 3, H, W), nearest-resized to out_size (source index
    floor(i * H / out_size)) with the channels reversed. Not clamped.
    """
    _check_texture_size(height, width, out_size)
    size = height * width * 3
    check_tensor("mean", mean, shape=(size,), floating=True)
    check_tensor("basis", basis, shape=(size, None))
    check_tensor("texcode", texcode, shape=(None, basis.shape[1]))
    batch = texcode.shape[0]

    image = blend(mean, basis, texcode).view(batch, height, width, 3).permute(0, 3, 1, 2)
    rows = _nearest_source(height, out_size, image.device)
    cols = _nearest_source(width, out_size, image.device)
    return image.index_select(2, rows).index_select(3, cols).flip(1)


def _cross(a, b):
    """a x b over the last dimension, written out: exactly 0 for two equal vectors, where
    torch.linalg.cross's kernel may leave a rounding residue (whose direction the
    normalisation would then turn into an arbitrary unit normal)."""
    a0, a1, a2 = a.unbind(-1)
    b0, b1, b2 = b.unbind(-1)
    return torch.stack((a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0), dim=-1)


def vertex_normals(v, faces):
    """Area-weighted unit vertex normals (pytorch3d's ``verts_normals``), index_add style.

    v (B, V, 3) or (V, 3), float32/float64; faces (F, 3) int64 (int32 accepted), values in
    [0, V). n_i = normalize(sum over the faces incident to vertex i of
    cross(v1 - v0, v2 - v0)), of v's shape. A vertex without faces, or whose sum is zero
    (only degenerate faces), gets a zero normal and zero gradient; a NaN in v gives NaN.
    The face normals are scattered with index_add (what pipelines write today), so the
    sums' order (and the last bits) differ from flame_ext's op, which gathers per vertex.
    """
    check_tensor("v", v, floating=True)
    if v.dim() not in (2, 3) or v.shape[-1] != 3:
        raise ValueError(f"v must have shape (B, V, 3) or (V, 3), got {tuple(v.shape)}")
    check_tensor("faces", faces, shape=(None, 3), dtype=(torch.int64, torch.int32))
    if faces.device != v.device:
        raise ValueError(
            f"faces is on {faces.device} but v is on {v.device}; they must be on the same device"
        )
    faces = faces.long()
    p0, p1, p2 = (v.index_select(-2, faces[:, k]) for k in range(3))
    face_normals = _cross(p1 - p0, p2 - p0)
    summed = torch.zeros_like(v)
    for k in range(3):
        summed = summed.index_add(-2, faces[:, k], face_normals)
    length = torch.linalg.vector_norm(summed, dim=-1, keepdim=True)
    # A zero sum has no direction: zero, without the 0/0 of s / |s| in the forward or in
    # the backward (the where's other branch divides by 1 there).
    zero = length == 0
    safe = torch.where(zero, torch.ones_like(length), length)
    return torch.where(zero, torch.zeros_like(summed), summed / safe)
