"""flame_ext.render: rasteriser against a per-pixel brute force, camera, rotations, PNG
writer, and whole pictures of the small synthetic model."""

import math
import struct
import zlib

import numpy as np
import pytest
import torch

from flame_ext import render, synthetic
from flame_ext.reference import rodrigues


def _brute_force_raster(xy, depth, faces, height, width):
    """Nearest covering triangle per pixel centre, one pixel and triangle at a time."""
    face_index = np.full((height, width), -1)
    best = np.full((height, width), np.inf)
    for f, (a, b, c) in enumerate(faces):
        pa, pb, pc = xy[a], xy[b], xy[c]
        area = (pb[0] - pa[0]) * (pc[1] - pa[1]) - (pb[1] - pa[1]) * (pc[0] - pa[0])
        for r in range(height):
            for col in range(width):
                p = np.array([col + 0.5, r + 0.5])
                w1 = ((p[0] - pa[0]) * (pc[1] - pa[1]) - (p[1] - pa[1]) * (pc[0] - pa[0])) / area
                w2 = ((pb[0] - pa[0]) * (p[1] - pa[1]) - (pb[1] - pa[1]) * (p[0] - pa[0])) / area
                w0 = 1 - w1 - w2
                if min(w0, w1, w2) < 0:
                    continue
                z = w0 * depth[a] + w1 * depth[b] + w2 * depth[c]
                if z < best[r, col]:
                    best[r, col], face_index[r, col] = z, f
    return face_index


def _decode_png(data: bytes) -> np.ndarray:
    """Reads back the PNGs save_png writes (8-bit, filter type 0, one IDAT)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks[kind] = body
        pos += 12 + length
    width, height, depth, color_type = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 8
    channels = {0: 1, 2: 3}[color_type]
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, -1)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(height, width, channels)


def test_rasterize_matches_brute_force():
    rng = np.random.default_rng(7)
    height, width = 19, 23
    # triangles of very different sizes (several rasteriser buckets), overlapping,
    # some reaching outside the image
    xy = rng.uniform(-4, 27, size=(30, 2))
    xy[:6] = rng.uniform(5, 9, size=(6, 2))
    depth = rng.uniform(1, 5, size=30)
    faces = rng.choice(30, size=(14, 3), replace=True)
    faces = faces[np.array([len(set(f)) == 3 for f in faces])]
    face_index, bary = render.rasterize(xy, depth, faces, height, width)
    expected = _brute_force_raster(xy, depth, faces, height, width)
    # a pixel centre exactly on an edge may go either way; random floats avoid that
    np.testing.assert_array_equal(face_index, expected)
    assert (face_index >= 0).sum() > 50, "the test triangles cover too little to test"
    hit = face_index >= 0
    np.testing.assert_allclose(bary[hit].sum(1), 1.0, atol=1e-12)
    assert (bary[hit] >= -1e-9).all() and (bary[~hit] == 0).all()
    # barycentrics reproduce the pixel centres
    rows, cols = np.nonzero(hit)
    corners = xy[faces[face_index[hit]]]
    centres = np.einsum("pk,pkc->pc", bary[hit], corners)
    np.testing.assert_allclose(centres, np.stack([cols + 0.5, rows + 0.5], 1), atol=1e-9)


def test_rasterize_nearest_wins_in_either_order():
    xy = np.array([[0, 0], [10, 0], [0, 10], [0, 0], [10, 0], [0, 10]], float) + 0.25
    depth = np.array([2.0, 2.0, 2.0, 1.0, 1.0, 1.0])
    for faces in ([[0, 1, 2], [3, 4, 5]], [[3, 4, 5], [0, 1, 2]]):
        face_index, _ = render.rasterize(xy, depth, np.array(faces), 12, 12)
        near = faces.index([3, 4, 5])
        assert (face_index[face_index >= 0] == near).all()
        assert (face_index >= 0).sum() > 30


def test_rasterize_rejects_bad_faces():
    with pytest.raises(ValueError, match="faces must index"):
        render.rasterize(np.zeros((3, 2)), np.zeros(3), np.array([[0, 1, 3]]), 4, 4)
    with pytest.raises(ValueError, match="xy must have shape"):
        render.rasterize(np.zeros((3, 3)), np.zeros(3), np.array([[0, 1, 2]]), 4, 4)


def test_vertex_normals_point_outwards_on_a_sphere():
    # the small synthetic head is star-shaped around its centre above the neck
    model = synthetic.build_assets("small")["generic_model.pkl"]
    v, faces = model["v_template"], model["f"].astype(np.int64)
    normals = render.vertex_normals(v, faces)
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-12)
    top = v[:, 1] > np.median(v[:, 1])
    outward = np.einsum("vc,vc->v", normals[top], v[top] - v.mean(0))
    assert (outward > 0).all()


@pytest.mark.parametrize("kind", render.CAMERAS)
def test_fit_camera_frames_the_points(kind):
    rng = np.random.default_rng(3)
    points = rng.normal(size=(200, 3)) * [0.08, 0.12, 0.1] + [0.01, 0.02, 0.0]
    camera = render.fit_camera(points, (120, 160), kind=kind, margin=0.1)
    xy, depth = camera.project(points)
    assert (depth > 0).all() if kind == "perspective" else np.isfinite(depth).all()
    lo, hi = xy.min(0), xy.max(0)
    # centred, and the tighter side (height) filled to the margin
    np.testing.assert_allclose((lo + hi) / 2, [80, 60], atol=1e-6)
    np.testing.assert_allclose(hi[1] - lo[1], 0.8 * 120, rtol=1e-6)
    assert lo[0] >= 0.1 * 160 - 1e-6 and hi[0] <= 0.9 * 160 + 1e-6
    # y up in the world is up in the image; +x (subject's left) is on the image's right
    top, right = np.argmax(points[:, 1]), np.argmax(points[:, 0])
    assert xy[top, 1] == pytest.approx(lo[1], abs=5) and xy[right, 0] == pytest.approx(hi[0], abs=5)


def test_euler_to_axis_angle_composes_yaw_pitch_roll():
    rng = np.random.default_rng(11)
    for yaw, pitch, roll in rng.uniform(-170, 170, size=(20, 3)):
        aa = render.euler_to_axis_angle(yaw, pitch, roll)
        c, s = math.cos, math.sin
        y, p, r = (math.radians(a) for a in (yaw, pitch, roll))
        ry = np.array([[c(y), 0, s(y)], [0, 1, 0], [-s(y), 0, c(y)]])
        rx = np.array([[1, 0, 0], [0, c(p), -s(p)], [0, s(p), c(p)]])
        rz = np.array([[c(r), -s(r), 0], [s(r), c(r), 0], [0, 0, 1]])
        got = rodrigues(aa.view(1, 3)).view(3, 3).numpy()
        # float64 throughout; the 1e-8 epsilon of the Rodrigues numerics bounds the error
        np.testing.assert_allclose(got, ry @ rx @ rz, atol=1e-7)
    assert torch.equal(render.euler_to_axis_angle(0, 0, 0), torch.zeros(3, dtype=torch.float64))


def test_positive_yaw_turns_the_face_to_the_image_right():
    front = render.euler_to_axis_angle(yaw=30)
    nose = rodrigues(front.view(1, 3)).view(3, 3).numpy() @ np.array([0.0, 0.0, 1.0])
    assert nose[0] > 0.4  # +x: the subject's left, the image's right


def test_save_png_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    image = rng.uniform(size=(13, 17, 3))
    path = render.save_png(tmp_path / "x.png", image)
    pixels = _decode_png(path.read_bytes())
    np.testing.assert_array_equal(pixels, np.round(image * 255).astype(np.uint8))
    grey = (rng.uniform(size=(5, 4)) * 255).astype(np.uint8)
    written = render.save_png(tmp_path / "g.png", grey)
    np.testing.assert_array_equal(_decode_png(written.read_bytes())[..., 0], grey)
    with pytest.raises(ValueError, match="image must have shape"):
        render.save_png(tmp_path / "bad.png", np.zeros((4, 4, 2)))


def test_save_png_readable_by_pillow(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    image = np.random.default_rng(2).uniform(size=(9, 6, 3))
    render.save_png(tmp_path / "x.png", image)
    with Image.open(tmp_path / "x.png") as png:
        assert png.size == (6, 9) and png.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(png), np.round(image * 255).astype(np.uint8))


def test_texture_sampling_is_bilinear_with_obj_convention():
    # a texture linear in (column, row) is reproduced exactly by bilinear sampling
    h, w = 6, 9
    rows, cols = np.mgrid[0:h, 0:w]
    texture = np.stack([cols / (w - 1), rows / (h - 1), np.full((h, w), 0.5)], -1)
    uv = np.random.default_rng(1).uniform(size=(50, 2))
    colours = render.raster._sample_bilinear(texture, uv)
    np.testing.assert_allclose(colours[:, 0], uv[:, 0], atol=1e-12)
    np.testing.assert_allclose(colours[:, 1], 1 - uv[:, 1], atol=1e-12)  # v = 1: top row


@pytest.mark.parametrize("kind", render.CAMERAS)
def test_texture_is_perspective_correct_on_a_tilted_plane(kind):
    # a quad on the plane z = slope * x, u = (x + 1) / 2, under a wide-angle camera; the
    # texture's red channel equals u, so every pixel must show u where its ray meets the plane
    slope = 0.8
    x, y = np.array([-1.0, 1.0, 1.0, -1.0]), np.array([-1.0, -1.0, 1.0, 1.0])
    vertices = np.stack([x, y, slope * x], 1)
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    uv = np.stack([(x + 1) / 2, (y + 1) / 2], 1)
    cols = np.arange(16) / 15
    texture = np.stack([np.tile(cols, (16, 1)), np.zeros((16, 16)), np.zeros((16, 16))], -1)
    camera = render.fit_camera(vertices, 40, kind=kind, fov_deg=70)
    image = render.render_mesh(
        vertices, faces, camera, texture=texture, uv=uv, uv_faces=faces,
        ambient=1.0, background=(-1, -1, -1), supersample=1,
    )
    rows, columns = np.nonzero(image[..., 0] >= 0)
    assert rows.size > 400
    dx = (columns + 0.5 - camera.offset[0]) / camera.focal
    if kind == "perspective":
        world_x = (camera.centre[0] + dx * camera.eye_z) / (1 + slope * dx)
    else:
        world_x = camera.centre[0] + dx
    np.testing.assert_allclose(image[rows, columns, 0], (world_x + 1) / 2, atol=1e-9)


def test_uniform_texture_equals_flat_colour():
    model = synthetic.build_assets("small", n_tex=1)
    v, faces = model["generic_model.pkl"]["v_template"], model["generic_model.pkl"]["f"]
    uvs = model["FLAME_texture.npz"]
    camera = render.fit_camera(v, 48)
    colour = (0.3, 0.6, 0.9)
    flat = render.render_mesh(v, faces, camera, color=colour)
    textured = render.render_mesh(
        v, faces, camera, texture=np.broadcast_to(colour, (8, 8, 3)),
        uv=uvs["vt"], uv_faces=uvs["ft"],
    )
    np.testing.assert_allclose(textured, flat, atol=1e-12)
    assert flat.std() > 0.05


def _colour_pixels(image, colour, tol=0.06):
    return (np.abs(image - np.asarray(colour)).max(-1) < tol).sum()


@pytest.mark.parametrize("lm_type", ["68", "mp"])
def test_render_flame_small_model(tmp_path, lm_type):
    result = render.render_flame(
        "synthetic-small", seed=3, size=96, lm_type=lm_type, yaw=10, jaw=0.1,
    )
    image = result.image
    assert image.shape == (96, 96, 3) and image.min() >= 0 and image.max() <= 1
    assert image.std() > 0.1, "the picture is (nearly) blank"
    background = (np.abs(image - 1.0).max(-1) < 1e-9).mean()
    assert 0.2 < background < 0.9, "the head must be framed with background around it"
    n = {"68": 68, "mp": 105}[lm_type]
    assert result.landmarks.shape == (n, 3) and result.landmarks_xy.shape == (n, 2)
    # landmarks are on the face: inside the picture, where the mesh is drawn
    xy = result.landmarks_xy
    assert ((xy > 0) & (xy < 96)).all()
    mesh = render.render_mesh(result.vertices, result.faces, result.camera, color=(0, 0, 0))
    covered = mesh.max(-1) < 0.5
    inside = covered[xy[:, 1].astype(int), xy[:, 0].astype(int)]
    assert inside.mean() > 0.95
    if lm_type == "68":
        assert _colour_pixels(image, render.CONTOUR_COLOR) > 5
        assert _colour_pixels(image, render.STATIC_COLOR) > 5
    else:
        assert _colour_pixels(image, render.MEDIAPIPE_COLOR) > 5
    path = render.save_png(tmp_path / "face.png", image)
    assert _decode_png(path.read_bytes()).shape == (96, 96, 3)


def test_render_flame_given_parameters_and_texture():
    shape = np.random.default_rng(0).normal(size=3)
    result = render.render_flame(
        "synthetic-small", parameters={"shape": shape}, size=64, lm_type="none",
        texture=True, n_tex=3,
    )
    np.testing.assert_allclose(result.parameters["shape"][0, :3].numpy(), shape, rtol=1e-6)
    assert (result.parameters["shape"][0, 3:] == 0).all()  # zero-padded
    assert result.landmarks.shape == (0, 3)
    assert result.image.std() > 0.05
    # seeded: the same call draws the same picture
    again = render.render_flame(
        "synthetic-small", parameters={"shape": shape}, size=64, lm_type="none",
        texture=True, n_tex=3,
    )
    np.testing.assert_array_equal(result.image, again.image)


def test_render_flame_texture_without_uvs_says_so(tmp_path):
    synthetic.write_assets(tmp_path, "small")
    (tmp_path / "FLAME_texture.npz").unlink()
    with pytest.raises(FileNotFoundError, match="texture coordinates"):
        render.render_flame(tmp_path, size=32, texture=True, n_tex=2)


def test_render_flame_texture_beside_a_model_file(tmp_path):
    """render_flame's model_path names the model; its texture is the one in the model's
    directory, whether the path is the directory or the model file."""
    synthetic.write_assets(tmp_path, "small", model_name="flame2023.pkl")
    by_file = render.render_flame(tmp_path / "flame2023.pkl", size=32, texture=True, n_tex=2)
    by_dir = render.render_flame(tmp_path, size=32, texture=True, n_tex=2)
    np.testing.assert_array_equal(by_file.image, by_dir.image)
    assert by_file.image.std() > 0.05


def test_render_flame_rejects_bad_arguments():
    with pytest.raises(ValueError, match="lm_type"):
        render.render_flame("synthetic-small", lm_type="5")
    with pytest.raises(ValueError, match="unknown parameter"):
        render.render_flame("synthetic-small", parameters={"shapes": [1.0]})
    with pytest.raises(ValueError, match="at most 6"):
        render.render_flame("synthetic-small", parameters={"shape": np.ones(7)})
    with pytest.raises(ValueError, match="camera"):
        render.render_flame("synthetic-small", camera="fisheye")
    for name in ("yaw", "pitch", "roll", "jaw", "shape_scale", "expr_scale", "tex_scale"):
        for value in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match=f"^{name} must be finite"):
                render.render_flame("synthetic-small", **{name: value})
    for value in ("10", True, torch.tensor([1.0, 2.0]), np.array(1 + 2j)):
        with pytest.raises(TypeError, match="^yaw must be a real number"):
            render.render_flame("synthetic-small", yaw=value)
    for value in (np.array([1 + 2j, 0.5]), ["a"], [True]):
        with pytest.raises(TypeError, match="parameter shape must hold real numbers"):
            render.render_flame("synthetic-small", parameters={"shape": value})
    for value in (1.0, np.ones((2, 3))):
        with pytest.raises(ValueError, match="parameter shape must be a vector"):
            render.render_flame("synthetic-small", parameters={"shape": value})
    # 0-d arrays and tensors are numbers
    by_array = render.render_flame("synthetic-small", yaw=np.array(10.0), size=16)
    by_tensor = render.render_flame("synthetic-small", yaw=torch.tensor(10.0), size=16)
    np.testing.assert_array_equal(by_array.image, render.render_flame(
        "synthetic-small", yaw=10.0, size=16).image)
    np.testing.assert_array_equal(by_tensor.image, by_array.image)
    scaled = render.render_flame("synthetic-small", shape_scale=np.array(0.7), size=16)
    np.testing.assert_array_equal(scaled.image, render.render_flame(
        "synthetic-small", shape_scale=0.7, size=16).image)
