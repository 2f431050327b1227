// Vertex-normal math shared by the CPU loops and the CUDA kernels: a face's area-weighted
// normal, the normalisation and its backward, and the adjoint of the face normal with
// respect to one of its corners. Plain values and pointers, no tensors.
//
// Every vertex is computed by one thread that walks its incident faces in the order of
// the vertex-face adjacency (CSR: offsets (V+1,), entries (E,) with entry = 3 * face +
// corner), so each sum runs in a fixed order on every device and thread count: no
// atomics, the same bits on every run.
#pragma once

#include <cstdint>

#include "common.h"

namespace flame_ext {

// The sizes of one call, as the launchers check them and the kernels read them.
struct NormalSizes {
  int64_t batch;
  int64_t num_vertices;
  int64_t num_faces;
  int64_t num_entries;  // E, the adjacency's length (3F for a valid table)
};

// The faces and their vertex-face adjacency, as the loops and the kernels read them.
struct Adjacency {
  const int64_t* faces;    // (F, 3)
  const int64_t* offsets;  // (V + 1,)
  const int64_t* entries;  // (E,)
};

// The range [begin, end) of vertex i's entries, or false when the offsets are not a valid
// range of the entries (never followed: the caller answers NaN or no gradient).
FLAME_HD bool adjacency_range(const int64_t* offsets, int64_t i, int64_t num_entries,
                              int64_t* begin, int64_t* end) {
  *begin = offsets[i];
  *end = offsets[i + 1];
  return *begin >= 0 && *begin <= *end && *end <= num_entries;
}

// Whether the three corners of a face are vertices of a mesh of num_vertices.
FLAME_HD bool corners_in_range(const int64_t* corners, int64_t num_vertices) {
  return in_range(corners[0], num_vertices) && in_range(corners[1], num_vertices) &&
         in_range(corners[2], num_vertices);
}

// The three vertex indices of the face of vertex i's entry, or false when the entry is
// out of range, one of the face's corners is, or the entry's corner is not vertex i (a
// table that does not belong to these faces).
FLAME_HD bool entry_face(const int64_t* faces, int64_t entry, const NormalSizes& s, int64_t i,
                         int64_t* corners) {
  if (!in_range(entry, 3 * s.num_faces)) return false;
  const int64_t face = entry / 3;
  for (int k = 0; k < 3; ++k) corners[k] = faces[3 * face + k];
  return faces[entry] == i && corners_in_range(corners, s.num_vertices);
}

// c = (p1 - p0) x (p2 - p0): twice the face's area along its normal. Computed from the
// corners in face order whichever corner asks, so every vertex of a face adds the same
// bits.
template <typename scalar_t>
FLAME_HD void face_normal(const scalar_t* v, const int64_t* corners, scalar_t* c) {
  const scalar_t* p0 = v + 3 * corners[0];
  const scalar_t* p1 = v + 3 * corners[1];
  const scalar_t* p2 = v + 3 * corners[2];
  const scalar_t a[3] = {p1[0] - p0[0], p1[1] - p0[1], p1[2] - p0[2]};
  const scalar_t b[3] = {p2[0] - p0[0], p2[1] - p0[1], p2[2] - p0[2]};
  c[0] = a[1] * b[2] - a[2] * b[1];
  c[1] = a[2] * b[0] - a[0] * b[2];
  c[2] = a[0] * b[1] - a[1] * b[0];
}

// |s| of the summed normal. sqrt(x*x + y*y + z*z) in that order (the reference's
// torch.linalg.vector_norm may round its last bit differently).
template <typename scalar_t>
FLAME_HD scalar_t normal_length(const scalar_t* s) {
  return hd_sqrt(s[0] * s[0] + s[1] * s[1] + s[2] * s[2]);
}

// n = s / |s|, and zero where |s| == 0 (no faces, or only degenerate ones). A NaN in s
// gives NaN (the comparison is false), never a silent zero.
template <typename scalar_t>
FLAME_HD void normalize_normal(const scalar_t* s, scalar_t* n) {
  const scalar_t r = normal_length(s);
  for (int c = 0; c < 3; ++c) n[c] = r == scalar_t(0) ? scalar_t(0) : s[c] / r;
}

// The normalisation's backward: g_s = (g - n (n . g)) / |s| with n = s / |s|; zero where
// |s| == 0 (n is constant zero there).
template <typename scalar_t>
FLAME_HD void normalize_backward(const scalar_t* s, const scalar_t* g, scalar_t* g_s) {
  const scalar_t r = normal_length(s);
  if (r == scalar_t(0)) {
    for (int c = 0; c < 3; ++c) g_s[c] = scalar_t(0);
    return;
  }
  const scalar_t n[3] = {s[0] / r, s[1] / r, s[2] / r};
  const scalar_t ng = n[0] * g[0] + n[1] * g[1] + n[2] * g[2];
  for (int c = 0; c < 3; ++c) g_s[c] = (g[c] - n[c] * ng) / r;
}

// The adjoint of face_normal for corner k, given G, the face's summed gradient (the g_s of
// its three corners): d(c . G)/d p_k = (p_{k+1} - p_{k+2}) x G, corners cyclic.
template <typename scalar_t>
FLAME_HD void face_normal_backward(const scalar_t* v, const int64_t* corners, int k,
                                   const scalar_t* G, scalar_t* out) {
  // Picked by comparisons, not by indexing with (k + 1) % 3: a run-time index into
  // corners would put the array on a CUDA thread's stack.
  const int64_t ia = k == 0 ? corners[1] : (k == 1 ? corners[2] : corners[0]);
  const int64_t ib = k == 0 ? corners[2] : (k == 1 ? corners[0] : corners[1]);
  const scalar_t* pa = v + 3 * ia;
  const scalar_t* pb = v + 3 * ib;
  const scalar_t d[3] = {pa[0] - pb[0], pa[1] - pb[1], pa[2] - pb[2]};
  out[0] = d[1] * G[2] - d[2] * G[1];
  out[1] = d[2] * G[0] - d[0] * G[2];
  out[2] = d[0] * G[1] - d[1] * G[0];
}

// The three per-vertex steps, for vertex i of one sample (vb, its (V, 3) vertices).

// s_i = sum of the incident faces' normals; false on a bad adjacency.
template <typename scalar_t>
FLAME_HD bool summed_normal(const scalar_t* vb, const Adjacency& a, const NormalSizes& s,
                            int64_t i, scalar_t* sum) {
  for (int c = 0; c < 3; ++c) sum[c] = scalar_t(0);
  int64_t begin, end;
  if (!adjacency_range(a.offsets, i, s.num_entries, &begin, &end)) return false;
  for (int64_t e = begin; e < end; ++e) {
    int64_t corners[3];
    if (!entry_face(a.faces, a.entries[e], s, i, corners)) return false;
    scalar_t c[3];
    face_normal(vb, corners, c);
    for (int k = 0; k < 3; ++k) sum[k] += c[k];
  }
  return true;
}

// n_i; NaN for a vertex whose adjacency is bad (never a read out of bounds).
template <typename scalar_t>
FLAME_HD void vertex_normal(const scalar_t* vb, const Adjacency& a, const NormalSizes& s,
                            int64_t i, scalar_t* n) {
  scalar_t sum[3];
  if (summed_normal(vb, a, s, i, sum)) {
    normalize_normal(sum, n);
  } else {
    for (int c = 0; c < 3; ++c) n[c] = static_cast<scalar_t>(NAN);
  }
}

// Backward, first pass: g_s of vertex i from the gradient of its normal (zero on a bad
// adjacency: its normal was NaN without gradient).
template <typename scalar_t>
FLAME_HD void vertex_sum_gradient(const scalar_t* vb, const scalar_t* gb, const Adjacency& a,
                                  const NormalSizes& s, int64_t i, scalar_t* g_s) {
  scalar_t sum[3];
  if (summed_normal(vb, a, s, i, sum)) {
    normalize_backward(sum, gb + 3 * i, g_s);
  } else {
    for (int c = 0; c < 3; ++c) g_s[c] = scalar_t(0);
  }
}

// Backward, second pass: grad_v of vertex i, gathering each incident face's adjoint for
// the corner that i is (gsb: the sample's g_s). A bad entry adds nothing.
template <typename scalar_t>
FLAME_HD void vertex_gradient(const scalar_t* vb, const scalar_t* gsb, const Adjacency& a,
                              const NormalSizes& s, int64_t i, scalar_t* grad) {
  for (int c = 0; c < 3; ++c) grad[c] = scalar_t(0);
  int64_t begin, end;
  if (!adjacency_range(a.offsets, i, s.num_entries, &begin, &end)) return;
  for (int64_t e = begin; e < end; ++e) {
    const int64_t entry = a.entries[e];
    int64_t corners[3];
    if (!entry_face(a.faces, entry, s, i, corners)) continue;
    // The face's G in corner order, the same bits for each of its corners.
    scalar_t G[3];
    for (int c = 0; c < 3; ++c)
      G[c] = gsb[3 * corners[0] + c] + gsb[3 * corners[1] + c] + gsb[3 * corners[2] + c];
    scalar_t d[3];
    face_normal_backward(vb, corners, static_cast<int>(entry % 3), G, d);
    for (int c = 0; c < 3; ++c) grad[c] += d[c];
  }
}

// The same steps with the per-face values formed once per face of a sample (the CPU loops:
// one thread per sample), for an adjacency the caller has checked: the same terms added
// in the same order as in the per-vertex forms above.

// face_normal of face f, or zero when one of its corners is out of range (such a face is
// named by no valid entry: its value is never read).
template <typename scalar_t>
FLAME_HD void face_normal_of(const scalar_t* vb, const int64_t* faces, int64_t f,
                             int64_t num_vertices, scalar_t* c) {
  const int64_t* corners = faces + 3 * f;
  if (corners_in_range(corners, num_vertices)) {
    face_normal(vb, corners, c);
  } else {
    for (int k = 0; k < 3; ++k) c[k] = scalar_t(0);
  }
}

// The face's G, the sum of its corners' g_s in corner order (zero for a face out of range).
template <typename scalar_t>
FLAME_HD void face_sum_gradient(const scalar_t* gsb, const int64_t* faces, int64_t f,
                                int64_t num_vertices, scalar_t* G) {
  const int64_t* corners = faces + 3 * f;
  if (!corners_in_range(corners, num_vertices)) {
    for (int c = 0; c < 3; ++c) G[c] = scalar_t(0);
    return;
  }
  for (int c = 0; c < 3; ++c)
    G[c] = gsb[3 * corners[0] + c] + gsb[3 * corners[1] + c] + gsb[3 * corners[2] + c];
}

// s_i from the face normals fn (F, 3) of the sample.
template <typename scalar_t>
FLAME_HD void summed_face_normals(const scalar_t* fn, const Adjacency& a, int64_t i,
                                  scalar_t* sum) {
  for (int c = 0; c < 3; ++c) sum[c] = scalar_t(0);
  for (int64_t e = a.offsets[i]; e < a.offsets[i + 1]; ++e) {
    const scalar_t* c = fn + 3 * (a.entries[e] / 3);
    for (int k = 0; k < 3; ++k) sum[k] += c[k];
  }
}

// grad_v of vertex i from the faces' G (F, 3) of the sample.
template <typename scalar_t>
FLAME_HD void vertex_gradient_of_faces(const scalar_t* vb, const scalar_t* G, const Adjacency& a,
                                       int64_t i, scalar_t* grad) {
  for (int c = 0; c < 3; ++c) grad[c] = scalar_t(0);
  for (int64_t e = a.offsets[i]; e < a.offsets[i + 1]; ++e) {
    const int64_t entry = a.entries[e], face = entry / 3;
    scalar_t d[3];
    face_normal_backward(vb, a.faces + 3 * face, static_cast<int>(entry % 3), G + 3 * face, d);
    for (int c = 0; c < 3; ++c) grad[c] += d[c];
  }
}

}  // namespace flame_ext
