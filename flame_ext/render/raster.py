"""Software rasterisation in numpy: camera, z-buffer, shading, dots.

- `Camera` / `fit_camera`: an orthographic or perspective camera on the +z axis framing
  given points;
- `rasterize`: a z-buffer rasteriser, vectorised over buckets of triangles with bounding
  boxes of similar size;
- `render_mesh`: Lambert shading (light from the front-top) of a flat colour or an albedo
  texture read through UV coordinates, with supersampling for smooth edges;
- `draw_points`: anti-aliased dots, for landmarks.

Conventions: world y is up and the camera looks from +z along -z, so the subject's left
(+x) appears on the image's right, as in a photograph. Images are float arrays (H, W, 3)
in 0..1; pixel (row r, column c) has its centre at x = c + 0.5, y = r + 0.5 in pixel
coordinates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from .._checks import check_count

CAMERAS = ("perspective", "orthographic")

SKIN = (0.80, 0.72, 0.66)
BACKGROUND = (1.0, 1.0, 1.0)
LIGHT = (0.35, 0.55, 1.0)  # towards the light: front, above, a little to the image right

# Candidate pixels handled per vectorised step of the rasteriser (bounds its memory).
_RASTER_CHUNK = 1 << 21


# --------------------------------------------------------------------------------------
# Camera


@dataclass(frozen=True)
class Camera:
    """A camera on the +z side looking along -z, with y up; maps world points to pixels.

    kind: 'perspective' or 'orthographic'. `centre` is the world point (x, y) on the view
    axis, `eye_z` the camera's z (perspective only), `focal` pixels per world unit at unit
    distance (perspective) or per world unit (orthographic), `offset` the pixel the view
    axis passes through, `height` and `width` the image size in pixels.
    """

    kind: str
    centre: Tuple[float, float]
    eye_z: float
    focal: float
    offset: Tuple[float, float]
    height: int
    width: int

    def project(self, points) -> Tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates (N, 2) as (x right, y down) and view depth (N,) of points (N, 3).

        Depth grows away from the camera (distance along the view axis for perspective,
        -z for orthographic), so the nearest surface has the smallest depth.
        """
        p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        dx, dy = p[:, 0] - self.centre[0], p[:, 1] - self.centre[1]
        if self.kind == "perspective":
            depth = self.eye_z - p[:, 2]
            scale = self.focal / np.maximum(depth, 1e-9)
        else:
            depth = -p[:, 2]
            scale = np.full_like(depth, self.focal)
        xy = np.stack([self.offset[0] + dx * scale, self.offset[1] - dy * scale], axis=1)
        return xy, depth

    def scaled(self, factor: int) -> "Camera":
        """The same view at `factor` times the resolution (for supersampling)."""
        return Camera(
            self.kind, self.centre, self.eye_z, self.focal * factor,
            (self.offset[0] * factor, self.offset[1] * factor),
            self.height * factor, self.width * factor,
        )


def fit_camera(
    points, size: Union[int, Tuple[int, int]], *, kind: str = "perspective",
    fov_deg: float = 12.0, margin: float = 0.06,
) -> Camera:
    """A camera on the +z axis that frames `points` (N, 3), centred, `margin` of the image
    left free on the tighter side.

    size: an int (square) or (height, width). fov_deg: the perspective camera's vertical
    field of view; the camera stands as far back as that needs (a narrow field gives a
    portrait lens, little distortion).
    """
    if kind not in CAMERAS:
        raise ValueError(f"camera kind must be one of {CAMERAS}, got {kind!r}")
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    height = check_count("height", height, 1, 1 << 15)
    width = check_count("width", width, 1, 1 << 15)
    if not 0.0 <= margin < 0.5:
        raise ValueError(f"margin must be in [0, 0.5), got {margin}")
    if not 0.0 < fov_deg < 170.0:
        raise ValueError(f"fov_deg must be in (0, 170), got {fov_deg}")
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if p.shape[0] == 0 or not np.isfinite(p).all():
        raise ValueError("points to frame must be a non-empty, finite (N, 3) array")
    lo, hi = p.min(0), p.max(0)
    centre = (float(lo[0] + hi[0]) / 2, float(lo[1] + hi[1]) / 2)
    radius = max(float(np.linalg.norm(hi - lo)) / 2, 1e-9)
    eye_z = float(hi[2]) + radius / math.tan(math.radians(fov_deg) / 2)
    probe = Camera(kind, centre, eye_z, 1.0, (0.0, 0.0), height, width)
    xy, _ = probe.project(p)
    extent = np.maximum(xy.max(0) - xy.min(0), 1e-12)
    focal = (1.0 - 2.0 * margin) * min(width / extent[0], height / extent[1])
    # put the middle of the projected box, not of the world box, in the middle of the image
    middle = (xy.max(0) + xy.min(0)) / 2 * focal
    offset = (width / 2 - float(middle[0]), height / 2 - float(middle[1]))
    return Camera(kind, centre, eye_z, float(focal), offset, height, width)


# --------------------------------------------------------------------------------------
# Rasteriser


def rasterize(xy, depth, faces, height: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
    """The nearest triangle at every pixel centre, and where in it the centre lies.

    xy: (V, 2) pixel coordinates of the vertices; depth: (V,) (smaller is nearer); faces:
    (F, 3) vertex indices. Returns `face_index` (H, W) int64, -1 where no triangle covers
    the pixel, and `bary` (H, W, 3) screen-space barycentric weights of the covering
    triangle's corners (zeros on the background). Both orientations are drawn.
    """
    xy = np.asarray(xy, dtype=np.float64)
    depth = np.asarray(depth, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"xy must have shape (V, 2), got {xy.shape}")
    if depth.shape != xy.shape[:1]:
        raise ValueError(f"depth must have shape ({xy.shape[0]},), got {depth.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must have shape (F, 3), got {faces.shape}")
    if faces.size and (faces.min() < 0 or faces.max() >= xy.shape[0]):
        raise ValueError(
            f"faces must index the {xy.shape[0]} vertices, got {faces.min()}..{faces.max()}"
        )
    height = check_count("height", height, 1, 1 << 15)
    width = check_count("width", width, 1, 1 << 15)

    tri = xy[faces]  # (F, 3, 2)
    keep = np.isfinite(tri).all((1, 2)) & np.isfinite(depth[faces]).all(1)
    # first and last pixel whose centre (index + 0.5) can be inside the triangle
    cmin = np.ceil(tri[..., 0].min(1) - 0.5).astype(np.int64).clip(0, width)
    cmax = np.floor(tri[..., 0].max(1) - 0.5).astype(np.int64).clip(-1, width - 1)
    rmin = np.ceil(tri[..., 1].min(1) - 0.5).astype(np.int64).clip(0, height)
    rmax = np.floor(tri[..., 1].max(1) - 0.5).astype(np.int64).clip(-1, height - 1)
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    area = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    keep &= (cmax >= cmin) & (rmax >= rmin) & (np.abs(area) > 1e-12)

    extent = np.maximum(cmax - cmin, rmax - rmin) + 1
    pixels, depths, owners, weights = [], [], [], []
    # Triangles in buckets of bounding-box size 2^k: each bucket tests a 2^k x 2^k grid of
    # candidate pixels per triangle at once, so small triangles waste little work.
    bucket = np.ceil(np.log2(np.maximum(extent, 1))).astype(np.int64)
    for k in np.unique(bucket[keep]):
        side = 1 << int(k)
        oy, ox = np.divmod(np.arange(side * side), side)
        ids = np.flatnonzero(keep & (bucket == k))
        step = max(1, _RASTER_CHUNK // (side * side))
        for lo in range(0, ids.size, step):
            f = ids[lo : lo + step]
            px = cmin[f, None] + ox[None]
            py = rmin[f, None] + oy[None]
            valid = (px <= cmax[f, None]) & (py <= rmax[f, None])
            qx = px + 0.5 - tri[f, 0, 0, None]
            qy = py + 0.5 - tri[f, 0, 1, None]
            inv = 1.0 / area[f, None]
            w1 = (qx * e2[f, 1, None] - qy * e2[f, 0, None]) * inv
            w2 = (e1[f, 0, None] * qy - e1[f, 1, None] * qx) * inv
            w0 = 1.0 - w1 - w2
            inside = valid & (w0 >= -1e-9) & (w1 >= -1e-9) & (w2 >= -1e-9)
            rows, cols = np.nonzero(inside)
            if rows.size == 0:
                continue
            w = np.stack([w0[rows, cols], w1[rows, cols], w2[rows, cols]], axis=1)
            owner = f[rows]
            pixels.append(py[rows, cols] * width + px[rows, cols])
            depths.append((w * depth[faces[owner]]).sum(1))
            owners.append(owner)
            weights.append(w)

    face_index = np.full(height * width, -1, dtype=np.int64)
    bary = np.zeros((height * width, 3))
    if pixels:
        pixel, z = np.concatenate(pixels), np.concatenate(depths)
        owner, w = np.concatenate(owners), np.concatenate(weights)
        # z-buffer: sort by pixel, then depth; the first entry of each pixel is the nearest
        order = np.lexsort((z, pixel))
        pixel = pixel[order]
        first = np.ones(pixel.size, dtype=bool)
        first[1:] = pixel[1:] != pixel[:-1]
        winners = order[first]
        face_index[pixel[first]] = owner[winners]
        bary[pixel[first]] = w[winners]
    return face_index.reshape(height, width), bary.reshape(height, width, 3)


def vertex_normals(vertices, faces) -> np.ndarray:
    """Unit normals (V, 3): the area-weighted sum of the normals of the faces around each
    vertex (faces wound counter-clockwise seen from outside point outwards)."""
    v = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
    face_normals = np.cross(b - a, c - a)  # length = twice the area: area weighting
    normals = np.zeros_like(v)
    for k in range(3):
        np.add.at(normals, faces[:, k], face_normals)
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    return normals / np.where(length > 0, length, 1.0)


# --------------------------------------------------------------------------------------
# Shading


def _sample_bilinear(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Colours (N, 3) of `texture` (H, W, 3) at OBJ-style UVs (N, 2): u right, v up."""
    h, w = texture.shape[:2]
    u = uv[:, 0] - np.floor(uv[:, 0]) * (uv[:, 0] > 1.0)  # wrap seams unwrapped past 1
    x = np.clip(u, 0.0, 1.0) * (w - 1)
    y = (1.0 - np.clip(uv[:, 1], 0.0, 1.0)) * (h - 1)
    x0 = np.minimum(np.floor(x).astype(np.int64), w - 1)
    y0 = np.minimum(np.floor(y).astype(np.int64), h - 1)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    top = texture[y0, x0] * (1 - fx) + texture[y0, x1] * fx
    bottom = texture[y1, x0] * (1 - fx) + texture[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def render_mesh(
    vertices,
    faces,
    camera: Camera,
    *,
    color: Sequence[float] = SKIN,
    texture: Optional[np.ndarray] = None,
    uv: Optional[np.ndarray] = None,
    uv_faces: Optional[np.ndarray] = None,
    light: Sequence[float] = LIGHT,
    ambient: float = 0.28,
    background: Sequence[float] = BACKGROUND,
    supersample: int = 2,
) -> np.ndarray:
    """A shaded picture (H, W, 3) in 0..1 of the mesh `vertices` (V, 3) / `faces` (F, 3).

    Smooth (interpolated vertex normal) Lambert shading, two-sided, with `light` the
    direction towards the light and `ambient` the light every surface gets. The surface
    colour is `color`, or `texture` (Ht, Wt, 3) in 0..1 read at the texture coordinates
    `uv` (NVT, 2, OBJ convention: v = 0 is the image's bottom row) of the corners
    `uv_faces` (F, 3). `supersample` renders at that factor and averages, for smooth
    silhouettes.
    """
    v = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"vertices must have shape (V, 3), got {v.shape}")
    supersample = check_count("supersample", supersample, 1, 8)
    if texture is not None:
        texture = np.asarray(texture, dtype=np.float64)
        if texture.ndim != 3 or texture.shape[2] != 3:
            raise ValueError(f"texture must have shape (H, W, 3), got {texture.shape}")
        if uv is None or uv_faces is None:
            raise ValueError("a texture needs uv (NVT, 2) and uv_faces (F, 3)")
        uv = np.asarray(uv, dtype=np.float64)
        uv_faces = np.asarray(uv_faces, dtype=np.int64)
        if uv.ndim != 2 or uv.shape[1] != 2:
            raise ValueError(f"uv must have shape (NVT, 2), got {uv.shape}")
        if uv_faces.shape != faces.shape:
            raise ValueError(
                f"uv_faces must have the shape of faces {faces.shape}, got {uv_faces.shape}"
            )
        if uv_faces.size and (uv_faces.min() < 0 or uv_faces.max() >= uv.shape[0]):
            raise ValueError(f"uv_faces must index the {uv.shape[0]} texture coordinates")

    cam = camera.scaled(supersample)
    xy, depth = cam.project(v)
    face_index, bary = rasterize(xy, depth, faces, cam.height, cam.width)
    image = np.empty((cam.height, cam.width, 3))
    image[:] = np.asarray(background, dtype=np.float64)
    hit = face_index >= 0
    if hit.any():
        f = face_index[hit]
        w = bary[hit]
        if cam.kind == "perspective":  # screen-space weights -> perspective-correct ones
            w = w / depth[faces[f]]
            w /= w.sum(1, keepdims=True)
        n = np.einsum("pk,pkc->pc", w, vertex_normals(v, faces)[faces[f]])
        # two-sided: a surface seen from behind (inside the neck) is lit like its front
        toward_eye = np.array([0.0, 0.0, 1.0])
        n *= np.where(n @ toward_eye < 0, -1.0, 1.0)[:, None]
        n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
        to_light = np.asarray(light, dtype=np.float64)
        to_light = to_light / np.linalg.norm(to_light)
        intensity = ambient + (1.0 - ambient) * np.clip(n @ to_light, 0.0, None)
        if texture is None:
            albedo = np.broadcast_to(np.asarray(color, dtype=np.float64), (f.size, 3))
        else:
            corner_uv = uv[uv_faces[f]]  # (P, 3, 2)
            albedo = _sample_bilinear(texture, np.einsum("pk,pkc->pc", w, corner_uv))
        image[hit] = np.clip(albedo * intensity[:, None], 0.0, 1.0)
    if supersample > 1:
        s = supersample
        image = image.reshape(camera.height, s, camera.width, s, 3).mean((1, 3))
    return image


def draw_points(
    image: np.ndarray, xy, color: Sequence[float], *, radius: float = 3.0,
    outline: Optional[Sequence[float]] = (0.0, 0.0, 0.0), outline_width: float = 1.0,
) -> np.ndarray:
    """A copy of `image` (H, W, 3) with anti-aliased dots of `radius` pixels at `xy`
    (N, 2) pixel coordinates (x right, y down), ringed by `outline` (None: no ring)."""
    out = np.array(image, dtype=np.float64, copy=True)
    height, width = out.shape[:2]
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    fill = np.asarray(color, dtype=np.float64)
    ring = None if outline is None else np.asarray(outline, dtype=np.float64)
    outer = radius + (outline_width if ring is not None else 0.0)
    reach = int(math.ceil(outer + 1))
    for x, y in xy:
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        c0, r0 = max(int(x) - reach, 0), max(int(y) - reach, 0)
        c1, r1 = min(int(x) + reach + 1, width), min(int(y) + reach + 1, height)
        if c0 >= c1 or r0 >= r1:
            continue
        rr, cc = np.mgrid[r0:r1, c0:c1]
        dist = np.hypot(cc + 0.5 - x, rr + 0.5 - y)
        patch = out[r0:r1, c0:c1]
        if ring is not None:  # coverage of a disc = clip(radius + 1/2 - distance, 0, 1)
            a = np.clip(outer + 0.5 - dist, 0.0, 1.0)[..., None]
            patch[:] = patch * (1 - a) + ring * a
        a = np.clip(radius + 0.5 - dist, 0.0, 1.0)[..., None]
        patch[:] = patch * (1 - a) + fill * a
    return out
