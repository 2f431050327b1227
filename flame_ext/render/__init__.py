"""Pictures of FLAME meshes without a GPU or a display: the `flame-ext render` command.

- `raster`: `fit_camera`, an orthographic or perspective camera on the +z axis framing
  given points; `rasterize`, a z-buffer rasteriser in numpy; `render_mesh`, Lambert
  shading of a flat colour or an albedo texture through UV coordinates, supersampled;
  `draw_points`, anti-aliased dots for landmarks;
- `png`: `save_png`, a dependency-free PNG writer;
- `face`: `render_flame`, all of it on the decoders: parameters -> mesh + landmarks ->
  image.

Conventions: world y is up and the face looks along +z (FLAME and the synthetic model).
The camera looks from +z at the mesh, so the subject's left (+x) appears on the image's
right, as in a photograph. Images are float arrays (H, W, 3) in 0..1 until saved; pixel
(row r, column c) has its centre at x = c + 0.5, y = r + 0.5 in pixel coordinates.
"""

from .face import (
    CONTOUR_COLOR,
    LANDMARK_TYPES,
    MEDIAPIPE_COLOR,
    STATIC_COLOR,
    FaceRender,
    euler_to_axis_angle,
    render_flame,
)
from .png import save_png
from .raster import (
    BACKGROUND,
    CAMERAS,
    LIGHT,
    SKIN,
    Camera,
    draw_points,
    fit_camera,
    rasterize,
    render_mesh,
    vertex_normals,
)

__all__ = [
    "BACKGROUND",
    "CAMERAS",
    "CONTOUR_COLOR",
    "LANDMARK_TYPES",
    "LIGHT",
    "MEDIAPIPE_COLOR",
    "SKIN",
    "STATIC_COLOR",
    "Camera",
    "FaceRender",
    "draw_points",
    "euler_to_axis_angle",
    "fit_camera",
    "rasterize",
    "render_flame",
    "render_mesh",
    "save_png",
    "vertex_normals",
]
