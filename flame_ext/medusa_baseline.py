"""medusa's FLAME decoding algorithm, reproduced as an eager baseline.

This is what users run today (`medusa.recon.flame.decoders`, itself derived from DECA and
smplx): einsum blend shapes, batched 4x4 products for the kinematic chain and the
skinning, Euler -> 6D -> matrix for the contour yaw, the full-resolution texture resized
afterwards. Benchmarks measure every speed-up against it and tests check
`flame_ext.reference` against it. Written from the behaviour of medusa's code, not copied
from it. Its cost structure (kernel count, the (B, V, 4, 4) and (B, N, K) intermediates,
the host reads of `parents` in the joint loop) is kept on purpose: do not optimise it.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from .reference import euler_xyz_to_matrix  # pytorch3d's Euler "XYZ", as medusa calls it

# medusa's FlameLandmark buffer: the neck joint, then the root.
_NECK_KIN_CHAIN = (1, 0)


def _batch_rodrigues(rot_vecs: torch.Tensor) -> torch.Tensor:
    """(N, 3) axis-angle -> (N, 3, 3), the cross-product matrix assembled with a cat."""
    n = rot_vecs.shape[0]
    angle = torch.norm(rot_vecs + 1e-8, dim=1, keepdim=True)
    direction = rot_vecs / angle
    cos = torch.unsqueeze(torch.cos(angle), dim=1)
    sin = torch.unsqueeze(torch.sin(angle), dim=1)
    rx, ry, rz = torch.split(direction, 1, dim=1)
    zeros = torch.zeros((n, 1), dtype=rot_vecs.dtype, device=rot_vecs.device)
    cross = torch.cat([zeros, -rz, ry, rz, zeros, -rx, -ry, rx, zeros], dim=1)
    cross = cross.view(n, 3, 3)
    eye = torch.eye(3, dtype=rot_vecs.dtype, device=rot_vecs.device).unsqueeze(0)
    return eye + sin * cross + (1 - cos) * torch.bmm(cross, cross)


def _transform_mat(rot: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) rotations and (N, 3, 1) translations -> (N, 4, 4) [R | t; 0 0 0 1]."""
    return torch.cat([F.pad(rot, [0, 0, 0, 1]), F.pad(trans, [0, 0, 0, 1], value=1)], dim=2)


def _batch_rigid_transform(rot, joints, parents):
    """rot (B, J, 3, 3), joints (B, J, 3) -> the relative transforms A (B, J, 4, 4)."""
    joints = joints.unsqueeze(-1)
    rel_joints = joints.clone()
    rel_joints[:, 1:] -= joints[:, parents[1:]]
    batch, n_joints = joints.shape[:2]
    local = _transform_mat(rot.reshape(-1, 3, 3), rel_joints.reshape(-1, 3, 1))
    # Explicit sizes rather than -1 (as elsewhere below): a batch of 0 leaves -1 ambiguous.
    local = local.reshape(batch, n_joints, 4, 4)
    chain = [local[:, 0]]
    for i in range(1, parents.shape[0]):
        # Indexing a Python list with a tensor element reads it back to the host, as
        # medusa does (one sync per joint on CUDA).
        chain.append(torch.matmul(chain[parents[i]], local[:, i]))
    transforms = torch.stack(chain, dim=1)
    joints_homo = F.pad(joints, [0, 0, 0, 1])
    moved_joints = torch.matmul(transforms, joints_homo)
    return transforms - F.pad(moved_joints, [3, 0, 0, 0, 0, 0, 0, 0])


def lbs(beta, pose, v_template, shape_dirs, pose_dirs, J_regressor, parents, lbs_weights):
    """medusa's linear blend skinning. beta (B, K) or (1, K), pose (B, 3J), v_template
    (V, 3), shape_dirs (V, 3, K), pose_dirs (P, 3V), J_regressor (J, V), parents (J,),
    lbs_weights (V, J). Returns (v (B, V, 3), T (B, V, 4, 4)); T is always materialised."""
    batch, n_joints, n_verts = pose.shape[0], J_regressor.shape[0], v_template.shape[0]
    # medusa's FlameShape expands every parameter to the batch before calling lbs.
    beta = beta.expand(batch, -1)
    v_shaped = v_template + torch.einsum("bl,mkl->bmk", beta, shape_dirs)
    joints = torch.einsum("bik,ji->bjk", v_shaped, J_regressor)

    eye = torch.eye(3, dtype=pose.dtype, device=pose.device)
    rot = _batch_rodrigues(pose.reshape(-1, 3)).view(batch, n_joints, 3, 3)
    pose_feature = (rot[:, 1:, :, :] - eye).view(batch, 9 * (n_joints - 1))
    pose_offsets = torch.matmul(pose_feature, pose_dirs).view(batch, n_verts, 3)
    v_posed = v_shaped + pose_offsets

    rel_transforms = _batch_rigid_transform(rot, joints, parents)

    weights = lbs_weights.unsqueeze(dim=0).expand(batch, -1, -1)
    vertex_transforms = torch.matmul(weights, rel_transforms.view(batch, n_joints, 16))
    vertex_transforms = vertex_transforms.view(batch, n_verts, 4, 4)
    ones = torch.ones(
        [batch, v_posed.shape[1], 1], dtype=v_posed.dtype, device=v_posed.device
    )
    v_posed_homo = torch.cat([v_posed, ones], dim=2)
    v_homo = torch.matmul(vertex_transforms, torch.unsqueeze(v_posed_homo, dim=-1))
    return v_homo[:, :, :3, 0], vertex_transforms


def _matrix_to_rotation_6d(matrix: torch.Tensor) -> torch.Tensor:
    """pytorch3d's convention: the first two rows."""
    return matrix[..., :2, :].clone().reshape(matrix.shape[:-2] + (6,))


def _rotation_6d_to_matrix(d6: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt on the two rows, the third their cross product; stacked as rows."""
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = F.normalize(a1, dim=-1)
    b2 = a2 - (b1 * a2).sum(-1, keepdim=True) * b1
    b2 = F.normalize(b2, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack((b1, b2, b3), dim=-2)


def _rot_mat_to_euler(rot: torch.Tensor) -> torch.Tensor:
    """The y Euler angle of (B, 3, 3) matrices."""
    sy = torch.sqrt(rot[:, 0, 0] * rot[:, 0, 0] + rot[:, 1, 0] * rot[:, 1, 0])
    return torch.atan2(-rot[:, 2, 0], sy)


@functools.lru_cache(maxsize=None)
def _neck_kin_chain(device: torch.device) -> torch.Tensor:
    # medusa keeps this as a module buffer: built once per device, not per call.
    return torch.tensor(_NECK_KIN_CHAIN, dtype=torch.long, device=device)


def _find_dynamic_lmk_idx_and_bcoords(poses, dynamic_lmk_faces_idx, dynamic_lmk_bary_coords):
    batch = poses.shape[0]
    pose_6d = torch.cat(
        [_matrix_to_rotation_6d(euler_xyz_to_matrix(p)) for p in poses.split(3, dim=1)],
        dim=1,
    )
    neck_kin_chain = _neck_kin_chain(poses.device)
    with torch.no_grad():
        chain_6d = torch.index_select(pose_6d.view(batch, poses.shape[1] // 3, 6), 1,
                                      neck_kin_chain)
        rot = _rotation_6d_to_matrix(chain_6d.reshape(-1, 6)).view(
            batch, len(_NECK_KIN_CHAIN), 3, 3
        )
        rel = torch.eye(3, dtype=poses.dtype, device=poses.device).unsqueeze(0)
        rel = rel.expand(batch, -1, -1)
        for k in range(len(neck_kin_chain)):
            rel = torch.bmm(rot[:, k], rel)
        yaw = torch.round(torch.clamp(-_rot_mat_to_euler(rel) * 180.0 / np.pi, max=39))
        yaw = yaw.to(dtype=torch.long)
        neg_mask = yaw.lt(0).to(dtype=torch.long)
        mask = yaw.lt(-39).to(dtype=torch.long)
        neg_vals = mask * 78 + (1 - mask) * (39 - yaw)
        yaw = neg_mask * neg_vals + (1 - neg_mask) * yaw
        faces = torch.index_select(dynamic_lmk_faces_idx, 0, yaw)
        bary = torch.index_select(dynamic_lmk_bary_coords, 0, yaw)
    return faces, bary


def _vertices2landmarks(v, tris, lmk_faces_idx, lmk_bary_coords):
    """v (B, V, 3), lmk_faces_idx (B, L), lmk_bary_coords (B, L, 3) -> (B, L, 3)."""
    batch, n_verts = v.shape[:2]
    n_lmk = lmk_faces_idx.shape[1]
    lmk_faces = torch.index_select(tris, 0, lmk_faces_idx.reshape(-1)).view(batch, n_lmk, 3)
    offsets = torch.arange(batch, dtype=torch.long, device=v.device).view(-1, 1, 1)
    lmk_faces = lmk_faces + offsets * n_verts
    lmk_vertices = v.reshape(-1, 3)[lmk_faces].view(batch, n_lmk, 3, 3)
    return torch.einsum("blfi,blf->bli", [lmk_vertices, lmk_bary_coords])


def landmarks(
    v,
    poses,
    tris,
    lmk_faces_idx,
    lmk_bary_coords,
    dynamic_lmk_faces_idx=None,
    dynamic_lmk_bary_coords=None,
):
    """medusa's FlameLandmark.forward. With dynamic_* ('68'): the contour points chosen
    by medusa's Euler/6D yaw rule, then the static ones. Without ('mp'): the gather."""
    batch = v.shape[0]
    faces_idx = lmk_faces_idx.unsqueeze(dim=0).expand(batch, -1)
    bary = lmk_bary_coords.unsqueeze(dim=0).expand(batch, -1, -1)
    if dynamic_lmk_faces_idx is not None:
        dyn_faces, dyn_bary = _find_dynamic_lmk_idx_and_bcoords(
            poses, dynamic_lmk_faces_idx, dynamic_lmk_bary_coords
        )
        faces_idx = torch.cat([dyn_faces, faces_idx], 1)
        bary = torch.cat([dyn_bary, bary], 1)
    return _vertices2landmarks(v, tris, faces_idx, bary)


def texture(texture_mean, texture_basis, texcode, height=512, width=512):
    """medusa's FlameTex.forward: texture_mean (1, 1, N), texture_basis (1, N, K),
    texcode (B, K) -> (B, 3, 256, 256). Materialises basis * code, (B, N, K)."""
    tex = texture_mean + (texture_basis * texcode[:, None, :]).sum(-1)
    tex = tex.reshape(texcode.shape[0], height, width, 3).permute(0, 3, 1, 2)
    tex = F.interpolate(tex, [256, 256])
    return tex[:, [2, 1, 0], :, :]
