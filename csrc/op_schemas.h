// The schema of every operator of flame_ext, in one place: csrc/registration.cpp defines
// them for the `flame_ext` library, the SIMT test build (csrc/simt/) for its own.
#pragma once

namespace flame_ext {

inline constexpr const char* kOpSchemas[] = {
    // Blendshape accumulation: out = base + coeffs @ dirs^T + pose_coeffs @ pose_dirs.
    "blend(Tensor base, Tensor dirs, Tensor coeffs, Tensor pose_dirs, Tensor pose_coeffs) -> Tensor",
    "blend_backward(Tensor grad_out, Tensor dirs, Tensor pose_dirs, bool need_coeffs, bool need_pose_coeffs) -> (Tensor, Tensor)",
    // The same with one more table whose coefficients are shared by the samples: one row
    // for the whole batch (a shared identity), or S rows and identity (B,) picking one
    // per sample: out[b] = base + shared_coeffs[identity[b]] @ shared_dirs^T + blend's
    // terms. The backward's grad_shared_coeffs is (S, Ks), S = identities.
    "blend_shared(Tensor base, Tensor shared_dirs, Tensor shared_coeffs, Tensor dirs, Tensor coeffs, Tensor pose_dirs, Tensor pose_coeffs, Tensor? identity=None) -> Tensor",
    "blend_shared_backward(Tensor grad_out, Tensor shared_dirs, Tensor dirs, Tensor pose_dirs, bool need_shared_coeffs, bool need_coeffs, bool need_pose_coeffs, Tensor? identity=None, SymInt identities=1) -> (Tensor, Tensor, Tensor)",
    // Rodrigues, kinematic chain and pose-corrective features, per sample.
    "rigid_transforms(Tensor pose, Tensor joints, Tensor parents) -> (Tensor, Tensor)",
    "rigid_transforms_backward(Tensor grad_transforms, Tensor grad_pose_feature, Tensor pose, Tensor joints, Tensor parents) -> (Tensor, Tensor)",
    // Linear blend skinning: per-vertex transform blend and apply, optionally writing T_v.
    "skin(Tensor v_posed, Tensor transforms, Tensor lbs_weights, bool write_vertex_transforms) -> (Tensor, Tensor)",
    "skin_backward(Tensor grad_v, Tensor? grad_vertex_transforms, Tensor v_posed, Tensor transforms, Tensor lbs_weights) -> (Tensor, Tensor)",
    // Barycentric landmark gathering with the contour-bin choice fused in.
    "landmarks(Tensor v, Tensor poses, Tensor tris, Tensor lmk_faces_idx, Tensor lmk_bary_coords, Tensor dynamic_lmk_faces_idx, Tensor dynamic_lmk_bary_coords, int contour_rule) -> (Tensor, Tensor)",
    "landmarks_backward(Tensor grad_lmk, Tensor bins, Tensor tris, Tensor lmk_faces_idx, Tensor lmk_bary_coords, Tensor dynamic_lmk_faces_idx, Tensor dynamic_lmk_bary_coords, SymInt num_vertices) -> Tensor",
    // Area-weighted unit vertex normals, gathered over a vertex-face adjacency (CSR:
    // offsets (V+1,), entries (E,) = 3 * face + corner). The adjacency is built by
    // vertex_face_adjacency, implemented in torch ops in flame_ext/_ops/normals.py.
    "vertex_face_adjacency(Tensor faces, SymInt num_vertices) -> (Tensor, Tensor)",
    "vertex_normals(Tensor v, Tensor faces, Tensor offsets, Tensor entries) -> Tensor",
    "vertex_normals_backward(Tensor grad_n, Tensor v, Tensor faces, Tensor offsets, Tensor entries) -> Tensor",
};

}  // namespace flame_ext
