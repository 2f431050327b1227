"""The SIMT runtime catches what it claims, and runs every CUDA kernel of csrc/.

Planted defects (tools/build_simt.py PLANTED: copies of real kernels, each with one
defect) must be reported: a missing barrier as a wrong result under some schedule, a
read past the end of a global buffer by AddressSanitizer, a wrong shuffle partner as a
wrong result, a shuffle mask that leaves out its caller and an oversized block as launch
errors naming the kernel. Then: every `__global__` function of csrc/*/*_kernels.cuh runs
under the runtime, and its launch plans name it.
"""

import os
import re
import subprocess
import sys

import pytest
import torch

from _simt import F32, F64, SCHEDULES, configure, kernel_stats, load_simt, rand
from flame_ext import reference

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def planted(name):
    load_simt()
    return getattr(torch.ops, f"flame_ext_planted_{name}")


def _skin_inputs(batch=2, num_verts=300, dtype=F32):
    g = torch.Generator().manual_seed(0)
    v_posed = rand(g, batch, num_verts, 3, dtype=dtype)
    transforms = rand(g, batch, 5, 4, 4, dtype=dtype, scale=0.7)
    weights = rand(g, num_verts, 5, dtype=dtype, low=0.05, scale=0.95)
    return v_posed, transforms, weights


def _blend_inputs(batch=3, n=61, k=37, p=36, dtype=F64):
    g = torch.Generator().manual_seed(0)
    return (rand(g, 1, n, dtype=dtype), rand(g, n, k, dtype=dtype), rand(g, batch, k, dtype=dtype),
            rand(g, p, n, dtype=dtype), rand(g, batch, p, dtype=dtype))


def _schedules_that_differ(call, exact, **tol):
    wrong = []
    for order in SCHEDULES:
        configure(order)
        out = call()
        if not torch.allclose(out.double(), exact, equal_nan=False, **tol):
            wrong.append(order)
    configure()
    return wrong


def test_real_skin_kernel_is_right_under_every_schedule(simt):
    args = _skin_inputs()
    exact = reference.skin(*(a.double() for a in args))[0]
    assert _schedules_that_differ(lambda: simt.skin(*args, False)[0], exact,
                                  rtol=1e-5, atol=1e-5) == []


def test_missing_barrier_is_caught(simt):
    args = _skin_inputs()
    exact = reference.skin(*(a.double() for a in args))[0]
    wrong = _schedules_that_differ(lambda: planted("missing_barrier").skin(*args, False)[0],
                                   exact, rtol=1e-5, atol=1e-5)
    assert wrong, "skin_kernel without its first barrier gave the right result in every order"


def test_wrong_shuffle_partner_is_caught(simt):
    # Batch 1: tiles of 8 dots per warp, whose last butterfly steps are the planted ones.
    args = _blend_inputs(batch=1)
    exact = reference.blend(*args)
    torch.testing.assert_close(simt.blend(*args), exact)
    out = planted("wrong_shuffle_partner").blend(*args)
    assert not torch.allclose(out, exact), "a butterfly reading the wrong lane went unnoticed"


def test_wrong_shuffle_mask_is_a_launch_error(simt):
    with pytest.raises(RuntimeError, match=r"blend_forward_kernel.*lane 31.*does not name it"):
        planted("wrong_shuffle_mask").blend(*_blend_inputs(batch=1))


def test_oversized_block_is_a_launch_error(simt):
    n_verts = 41
    g = torch.Generator().manual_seed(0)
    tris = torch.randint(0, n_verts, (60, 3), generator=g)
    faces = torch.randint(0, 60, (7,), generator=g)
    bary = rand(g, 7, 3, low=0.1, scale=0.9)
    grad = rand(g, 2, 7, 3)
    bins = torch.zeros(2, dtype=torch.int64)
    args = (grad, bins, tris, faces, bary, torch.empty(0, 0, dtype=torch.int64),
            torch.empty(0, 0, 3, dtype=F64), n_verts)
    simt.landmarks_backward(*args)  # the real plan launches
    with pytest.raises(RuntimeError,
                       match=r"landmarks_backward_kernel.*more than 1024 threads per block"):
        planted("oversized_block").landmarks_backward(*args)


_OOB_SCRIPT = """
import torch, os
torch.ops.load_library(os.environ["FLAME_EXT_SIMT_LIB"])
g = torch.Generator().manual_seed(0)
v_posed = torch.randn(2, 300, 3, generator=g)
transforms = torch.randn(2, 5, 4, 4, generator=g)
weights = torch.rand(300, 5, generator=g) + 0.05
torch.ops.flame_ext_planted_out_of_bounds.skin(v_posed, transforms, weights, False)
print("no report")
"""


def test_out_of_bounds_read_is_reported_by_the_sanitizer(simt):
    if not simt.simt_sanitized():
        pytest.skip("the SIMT library was built without AddressSanitizer")
    # The report aborts the process: run the defect in a child with the same runtime.
    done = subprocess.run([sys.executable, "-c", _OOB_SCRIPT], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ))
    assert done.returncode != 0, done.stdout + done.stderr
    assert "heap-buffer-overflow" in done.stderr, done.stderr[-3000:]
    assert "skin_kernel" in done.stderr, done.stderr[-3000:]


def _global_kernels():
    """Names of every __global__ function in csrc/*/*_kernels.cuh."""
    names = set()
    for family in sorted(os.listdir(os.path.join(ROOT, "csrc"))):
        path = os.path.join(ROOT, "csrc", family, f"{family}_kernels.cuh")
        if not os.path.exists(path):
            continue
        text = open(path).read()
        for m in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(",
                             text):
            names.add(m.group(1))
    return names


def test_every_global_kernel_runs(simt):
    """One small call of every op and path; then every kernel has run at least once."""
    # blend: forward, backward (three kernels)
    args = _blend_inputs()
    simt.blend(*args)
    simt.blend_backward(rand(torch.Generator().manual_seed(1), 3, 61), args[1], args[3], True,
                        True)
    # rigid_transforms
    pose = rand(torch.Generator().manual_seed(2), 2, 5, 3, scale=0.5)
    parents = torch.tensor([-1, 0, 1, 1, 1])
    t, f = simt.rigid_transforms(pose, pose, parents)
    simt.rigid_transforms_backward(t, f, pose, pose, parents)
    # skin, with the reduction of chunks
    v_posed, transforms, weights = _skin_inputs(num_verts=1100, dtype=F64)
    simt.skin(v_posed, transforms, weights, True)
    simt.skin_backward(v_posed, None, v_posed, transforms, weights)
    # landmarks
    n_verts = 41
    g = torch.Generator().manual_seed(3)
    tris = torch.randint(0, n_verts, (60, 3), generator=g)
    faces = torch.randint(0, 60, (7,), generator=g)
    bary = rand(g, 7, 3, low=0.1, scale=0.9)
    dyn_faces = torch.randint(0, 60, (79, 5), generator=g)
    dyn_bary = rand(g, 79, 5, 3, low=0.1, scale=0.9)
    v = rand(g, 2, n_verts, 3)
    lmk, bins = simt.landmarks(v, rand(g, 2, 15), tris, faces, bary, dyn_faces, dyn_bary, 1)
    simt.landmarks_backward(lmk, bins, tris, faces, bary, dyn_faces, dyn_bary, n_verts)

    kernels = _global_kernels()
    assert len(kernels) >= 10, kernels
    ran = set(kernel_stats())
    assert kernels - ran == set(), f"never executed: {sorted(kernels - ran)}"
    assert ran - kernels == set(), f"launch plans naming no __global__ function: {sorted(ran - kernels)}"


def test_launch_statistics_count_barriers_and_warp_ops(simt):
    before = kernel_stats()
    simt.blend(*_blend_inputs())
    v_posed, transforms, weights = _skin_inputs()
    simt.skin(v_posed, transforms, weights, False)
    after = kernel_stats()
    assert after["blend_forward_kernel"][4] > before.get("blend_forward_kernel", (0,) * 5)[4]
    assert after["skin_kernel"][3] > before.get("skin_kernel", (0,) * 5)[3]
