"""Random inputs for the tests: model names, decoder and op inputs, property-test inputs.

Every builder draws float64 values on the CPU from its own seeded generator, then converts
to the dtype and device asked for, so a case is the same numbers on every device and (up
to rounding) in either precision.

Property tests (hypothesis) draw over shapes (zero sizes included), dtypes, memory layouts
and values:

- layouts (`lay_out`): contiguous, strided (every other element, the gaps filled with NaN,
  or with an out-of-range index for index tensors, so a kernel that ignores the strides
  gives NaN or an index error instead of a plausible answer), column-major, a storage
  offset of one element (misaligned for vector loads), and an expanded (stride 0) batch;
- values (`random_values`): random, plus NaN, +-inf, +-1e30, tiny ones, and the Rodrigues
  epsilon (-1e-8 cancels it) injected at random positions;
- bad arguments (`corrupt`): one argument at a time gets a wrong rank, size, dtype, device
  ('meta'), a sparse layout, or is not a tensor.
"""

import mmap
import pickle

import numpy as np
import pytest
import torch
from hypothesis import strategies as st

from flame_ext import io as fio
from flame_ext.decoders import INPUT_NAMES

F32, F64 = torch.float32, torch.float64
NAN, INF = float("nan"), float("inf")

# The synthetic models: a few dozen vertices (float64 gradcheck stays fast), and FLAME's
# full dimensions (the kernels' real launch shapes).
SMALL = "synthetic-small"
FULL = "synthetic"

# FLAME's kinematic tree: root, neck, then jaw and both eyes on the neck.
FLAME_PARENTS = [-1, 0, 1, 1, 1]


def _generator(seed) -> torch.Generator:
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)


# --- decoders --------------------------------------------------------------------------------


def flame_inputs(module, batch, seed=0, *, scale=0.3, dtype=None, device=None, shared=False,
                 requires_grad=False):
    """FlameShape's six inputs for `module` (sizes from its parameters), (batch, dim) each.

    seed: an int or a torch.Generator (then drawn from, in INPUT_NAMES order). dtype and
    device default to the module's. shared: `shape` of batch 1 (one identity). Each value
    is a leaf; requires_grad makes it require grad.
    """
    gen = _generator(seed)
    like = module.v_template
    dtype = like.dtype if dtype is None else dtype
    device = like.device if device is None else device
    values = {
        name: scale * torch.randn(batch, getattr(module, name).shape[1], generator=gen, dtype=F64)
        for name in INPUT_NAMES
    }
    if shared:
        values["shape"] = values["shape"][:1]
    return {
        name: x.to(device=device, dtype=dtype).requires_grad_(requires_grad)
        for name, x in values.items()
    }


def full_poses(inputs):
    """(B, 15) full pose of FlameShape inputs, as get_full_pose() orders it."""
    batch = inputs["expr"].shape[0]
    return torch.cat([inputs[name].expand(batch, -1) for name in INPUT_NAMES[2:]], dim=1)


def model_raw(seed=0, V=12, F=10, S=4, E=3, J=5):
    """A small valid model dict, laid out as generic_model.pkl holds it."""
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.1, 1.0, (V, J))
    regressor = rng.uniform(0.1, 1.0, (J, V))
    parents = np.array([4294967295] + [max(0, j - 1) for j in range(1, J)], dtype=np.int64)
    return {
        "f": rng.integers(0, V, (F, 3)).astype(np.uint32),
        "v_template": rng.normal(size=(V, 3)),
        "shapedirs": rng.normal(size=(V, 3, S + E)),
        "posedirs": rng.normal(size=(V, 3, 9 * (J - 1))),
        "J_regressor": regressor / regressor.sum(1, keepdims=True),
        "kintree_table": np.stack([parents, np.arange(J)]),
        "weights": weights / weights.sum(1, keepdims=True),
        fio.N_SHAPE_KEY: S,
    }


def write_pickle(path, obj, protocol=2):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


# --- ops ---------------------------------------------------------------------------------------


def blend_inputs(batch, n, k, p, dtype, device, *, base_kind="shared", column_offset=3, seed=0):
    """Random blend arguments (never zeros): base, dirs, coeffs, pose_dirs, pose_coeffs.

    dirs is a column slice of a wider matrix, as in the decoder; base is (n,), (1, n) or
    (batch, n) for base_kind 'flat', 'shared', 'batched'; no pose terms (None) when p is 0.
    """
    gen = _generator(seed)

    def rand(*shape):
        values = torch.randn(*shape, generator=gen, dtype=F64)
        return values.to(dtype=dtype, device=device)

    wide = rand(n, k + column_offset + 5)
    dirs = wide[:, column_offset : column_offset + k]
    coeffs = rand(batch, k)
    base = {"flat": rand(n), "shared": rand(1, n), "batched": rand(batch, n)}[base_kind]
    pose_dirs = rand(p, n) if p else None
    pose_coeffs = rand(batch, p) if p else None
    return base, dirs, coeffs, pose_dirs, pose_coeffs


def parents_tensor(values, device="cpu"):
    return torch.tensor(values, dtype=torch.int64, device=device)


def random_tree(num_joints, seed):
    """A random valid kinematic tree: parents[0] = -1, parents[j] uniform in [0, j)."""
    gen = _generator(seed)
    return [-1] + [int(torch.randint(0, j, (1,), generator=gen)) for j in range(1, num_joints)]


def chain_inputs(batch, num_joints, dtype, device, scale=0.7, seed=0):
    """rigid_transforms' pose (axis-angle, ~scale rad) and joints, (batch, num_joints, 3)."""
    gen = _generator(seed)
    pose = torch.randn(batch, num_joints, 3, generator=gen, dtype=F64) * scale
    joints = torch.randn(batch, num_joints, 3, generator=gen, dtype=F64)
    return pose.to(device, dtype), joints.to(device, dtype)


def skin_inputs(batch, num_verts, num_joints, dtype, device, seed=0):
    """skin's v_posed, transforms and lbs_weights (rows summing to 1)."""
    gen = _generator(seed)
    v_posed = torch.randn(batch, num_verts, 3, generator=gen, dtype=F64)
    # A full 4x4 (bottom row not 0 0 0 1): the op must treat it as given.
    transforms = torch.randn(batch, num_joints, 4, 4, generator=gen, dtype=F64)
    weights = torch.rand(num_verts, num_joints, generator=gen, dtype=F64) + 0.1
    weights = weights / weights.sum(1, keepdim=True)
    return tuple(x.to(device, dtype) for x in (v_posed, transforms, weights))


def yaw_degrees(poses, rule):
    """The continuous contour yaw (before clamping and rounding) of (B, >=6) poses, in
    float64 on the CPU: global then neck rotation, read as Euler angles ('medusa', negated)
    or axis-angle ('deca')."""
    from flame_ext import reference

    poses = poses.detach().to(device="cpu", dtype=F64)
    to_matrix = reference.euler_xyz_to_matrix if rule == "medusa" else reference.rodrigues
    rel = to_matrix(poses[:, 0:3]) @ to_matrix(poses[:, 3:6])
    yaw = torch.atan2(-rel[:, 2, 0], torch.hypot(rel[:, 0, 0], rel[:, 1, 0]))
    return torch.rad2deg(-yaw if rule == "medusa" else yaw)


def big_zeros(shape, dtype, device):
    """A zero tensor of `shape` that costs (almost) no memory until written, on the CPU:
    an anonymous private map, which reads as zeros and is committed page by page. On a
    GPU, real (zeroed) memory, when the device has it (else the test is skipped)."""
    numel = 1
    for size in shape:
        numel *= size
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda":
        if torch.cuda.mem_get_info(device)[0] < nbytes + (2 << 30):
            pytest.skip(f"needs {nbytes / 2**30:.1f} GiB of free GPU memory")
        return torch.zeros(shape, dtype=dtype, device=device)
    try:
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, OverflowError) as e:
        pytest.skip(f"cannot reserve {nbytes / 2**30:.1f} GiB of address space: {e}")
    # frombuffer keeps `buf` alive as long as the tensor.
    return torch.frombuffer(buf, dtype=dtype).view(shape)


# --- property tests: strategies and layouts ------------------------------------------------------

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


def random_values(seed, shape, scale=1.0, inject=()):
    """float64 normal values on the CPU, with `inject` = [(position in [0, 1), value)]."""
    gen = _generator(seed)
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
    """random_tree as an int64 tensor on the CPU."""
    return torch.tensor(random_tree(num_joints, seed))


# --- property tests: bad arguments -------------------------------------------------------------

BAD_FLOAT_DTYPES = (torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.complex64,
                    torch.bool)
BAD_INDEX_DTYPES = (torch.int32, torch.float32, torch.uint8)
CORRUPTIONS = ("rank_up", "rank_down", "size", "dtype", "device", "not_tensor", "sparse")
# (op, argument) -> the dtypes of BAD_FLOAT_DTYPES that argument also takes: blend's dirs
# may be stored in half precision.
ALSO_ACCEPTED = {("blend", "dirs"): (torch.float16, torch.bfloat16)}


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


# Optional in pairs: one of the pair without the other is the error.
OPTIONAL_PAIRS = {"pose_dirs": "pose_coeffs", "pose_coeffs": "pose_dirs",
                  "dynamic_lmk_faces_idx": "dynamic_lmk_bary_coords",
                  "dynamic_lmk_bary_coords": "dynamic_lmk_faces_idx"}
