"""The FLAME chain of ops: rigid_transforms feeding skin, the fused node that runs the chain
(flame_ext/_ops/lbs.py), and the decoders on it under torch.compile.

FusedLbs runs the four ops of FlameShape (blend, rigid_transforms, blend, skin) as one
autograd node. Its forward calls the same kernels as the op-by-op path, so outputs must
be bitwise equal; its backward chains the backward ops by hand, so gradients are checked
with float64 gradcheck and against the op-by-op path (whose backward is the ops' own
registered autograd) for every subset of inputs that needs a gradient.
"""

import itertools
from types import SimpleNamespace

import pytest
import torch

from _samples import FLAME_PARENTS, SMALL, chain_inputs, flame_inputs, parents_tensor, skin_inputs
from flame_ext import FlameLandmark, FlameShape, FlameShapeLandmark, FlameTex, load_flame_model
from flame_ext import _backend
from flame_ext.decoders import INPUT_NAMES


def _shape(device, transforms="vertex", **kwargs):
    model = load_flame_model(SMALL)
    return FlameShape(model.n_shape, model.n_expr, device=device, model_path=SMALL,
                      backend="ext", transforms=transforms, **kwargs).double()


def _inputs(module, batch, seed, shared):
    return flame_inputs(module, batch, seed, scale=0.4, shared=shared)


def _decode_both(module, values):
    """(fused, op-by-op) outputs of module's decode on the same inputs."""
    batch, gathered, _ = module._gather_inputs(None, values)  # no identity index
    pose = torch.cat([gathered[n].expand(batch, -1) for n in INPUT_NAMES[2:]], dim=1)
    ext = _backend.steps("ext")
    steps = SimpleNamespace(**{**vars(ext), "lbs": lambda *args: None})
    return (
        module._decode(ext, module._derived(), gathered["shape"], gathered["expr"], pose),
        module._decode(steps, module._derived(), gathered["shape"], gathered["expr"], pose),
    )


@pytest.mark.parametrize("transforms", ["vertex", "joint", "none"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("batch", [0, 1, 3])
def test_fused_matches_op_by_op(ops, device, transforms, shared, batch):
    module = _shape(device, transforms)
    values = _inputs(module, batch, 0, shared and batch > 0)
    # every non-empty subset of the inputs needing a gradient (the backward skips the
    # chain pieces nobody needs: each subset takes a different branch)
    for names in itertools.chain.from_iterable(
        itertools.combinations(INPUT_NAMES, r) for r in (1, 2, len(INPUT_NAMES))
    ):
        leaves = {n: v.clone().requires_grad_(n in names) for n, v in values.items()}
        (v, R), (v_ref, R_ref) = _decode_both(module, leaves)
        torch.testing.assert_close(v, v_ref, rtol=0, atol=0)
        if R is not None:
            torch.testing.assert_close(R, R_ref, rtol=0, atol=0)
        gen = torch.Generator().manual_seed(1)
        weight = torch.randn(v.shape, generator=gen, dtype=v.dtype).to(device)
        outputs = [(v * weight).sum() + (R.sum() if R is not None else 0)]
        outputs_ref = [(v_ref * weight).sum() + (R_ref.sum() if R_ref is not None else 0)]
        wrt = [leaves[n] for n in names]
        got = torch.autograd.grad(outputs, wrt)
        want = torch.autograd.grad(outputs_ref, wrt)
        for name, g, w in zip(names, got, want):
            # same kernels, different summation order of the two coeff contributions
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("transforms", ["vertex", "joint"])
@pytest.mark.parametrize("shared", [False, True])
def test_fused_gradcheck(ops, device, transforms, shared):
    module = _shape(device, transforms)
    values = _inputs(module, 2, 2, shared)
    names = list(values)

    def decode(*leaves):
        (v, R), _ = _decode_both(module, dict(zip(names, leaves)))
        return v, R

    leaves = tuple(v.requires_grad_(True) for v in values.values())
    assert torch.autograd.gradcheck(decode, leaves, eps=1e-6, atol=1e-7)


def test_fused_only_where_it_applies(ops):
    module = _shape("cpu")
    values = _inputs(module, 2, 3, False)
    v, R = module(**values)
    assert type(v.grad_fn).__name__ == "FusedLbsBackward" or v.grad_fn is None
    leaf = values["expr"].clone().requires_grad_(True)
    v, _ = module(**{**values, "expr": leaf})
    assert type(v.grad_fn).__name__ == "FusedLbsBackward"
    # a model table that needs a gradient: the op-by-op path, which has that gradient
    module.lbs_weights.requires_grad_(True)
    v, _ = module(**values)
    assert type(v.grad_fn).__name__ != "FusedLbsBackward"
    (grad,) = torch.autograd.grad(v.sum(), module.lbs_weights)
    assert torch.count_nonzero(grad) > 0


def test_decoders_compile_without_graph_breaks(ops, device):
    """fullgraph=True fails on any graph break; 'aot_eager' traces forward and backward
    (the ops' fake kernels and registered autograd) without code generation."""
    torch._dynamo.reset()
    compile_ = lambda m: torch.compile(m, fullgraph=True, backend="aot_eager")  # noqa: E731
    model = load_flame_model(SMALL)
    kwargs = dict(device=device, model_path=SMALL, backend="ext")
    shape = FlameShape(model.n_shape, model.n_expr, **kwargs).double()
    values = _inputs(shape, 3, 5, shared=True)
    leaf = values["expr"].requires_grad_(True)
    for module in (shape, FlameShapeLandmark(model.n_shape, model.n_expr, **kwargs).double()):
        got, want = compile_(module)(**values), module(**values)
        got, want = (got[0], want[0]) if isinstance(got, tuple) else (got, want)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(
            torch.autograd.grad(got.square().sum(), leaf)[0],
            torch.autograd.grad(want.square().sum(), leaf)[0],
        )
    v, _ = shape(**values)
    landmark = FlameLandmark(**kwargs).double()
    poses = shape.get_full_pose().expand(3, -1).contiguous()
    torch.testing.assert_close(compile_(landmark)(v, poses), landmark(v, poses))
    texture = FlameTex(SMALL, n_tex=5, backend="ext").double().to(device)
    code = torch.randn(2, 5, dtype=torch.float64, device=device)
    torch.testing.assert_close(compile_(texture)(code), texture(code))


def test_vmap_runs_the_ops_one_by_one(ops):
    """torch.func.vmap refuses an autograd.Function without a vmap rule: under functorch
    transforms the decoders take the op-by-op path (functorch's batching fallback)."""
    import warnings

    module = _shape("cpu")
    expr = _inputs(module, 3, 6, False)["expr"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's "no batching rule" notice
        got = torch.func.vmap(lambda e: module(expr=e[None])[0][0])(expr)
    torch.testing.assert_close(got, module(expr=expr)[0], rtol=1e-12, atol=1e-12)


# --- rigid_transforms feeding skin, op by op ----------------------------------------------


def _skin_ops():
    """The Python wrappers (checks and autograd) of rigid_transforms and skin."""
    from types import SimpleNamespace

    from flame_ext._ops import rigid_transforms, skin

    return SimpleNamespace(rigid_transforms=rigid_transforms.rigid_transforms, skin=skin.skin)


def test_lbs_chain_gradcheck(ops, device):
    """rigid_transforms feeding skin, as FlameShape does: gradients reach pose and joints
    through both ops."""
    pose, joints = chain_inputs(2, 5, torch.float64, device, seed=8)
    v_posed, _, weights = skin_inputs(2, 5, 5, torch.float64, device, seed=9)
    parents = parents_tensor(FLAME_PARENTS)
    inputs = [x.requires_grad_(True) for x in (pose, joints, v_posed)]

    def fn(pose, joints, v_posed):
        transforms, feature = _skin_ops().rigid_transforms(pose, joints, parents)
        v, vertex_transforms = _skin_ops().skin(v_posed, transforms, weights)
        return v, vertex_transforms, feature

    assert torch.autograd.gradcheck(fn, inputs)


def test_chain_and_skin_compile_fullgraph(ops, device):
    pose, joints = chain_inputs(2, 5, torch.float32, device)
    v_posed, _, weights = skin_inputs(2, 30, 5, torch.float32, device)
    parents = parents_tensor(FLAME_PARENTS)
    skin_ops = _skin_ops()

    def lbs(pose, joints, v_posed):
        transforms, feature = skin_ops.rigid_transforms(pose, joints, parents)
        v, vertex_transforms = skin_ops.skin(v_posed + feature.sum(), transforms, weights)
        return v.square().sum() + vertex_transforms.mean()

    compiled = torch.compile(lbs, fullgraph=True, backend="aot_eager")
    inputs = [x.clone().requires_grad_(True) for x in (pose, joints, v_posed)]
    want_inputs = [x.clone().requires_grad_(True) for x in (pose, joints, v_posed)]
    got = compiled(*inputs)
    want = lbs(*want_inputs)
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    for a, b in zip(inputs, want_inputs):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.cuda
def test_chain_and_skin_capture_in_a_cuda_graph(ops):
    """Forward and backward ops launch no host-device synchronisation: they capture into a
    CUDA graph (with parents on the CPU and on the device) and replay correctly."""
    pose, joints = chain_inputs(4, 5, torch.float32, "cuda")
    v_posed, _, weights = skin_inputs(4, 700, 5, torch.float32, "cuda")
    grad_v = torch.randn_like(v_posed)
    grad_vt = torch.randn(4, 700, 4, 4, device="cuda")

    def step(parents):
        transforms, feature = ops.rigid_transforms(pose, joints, parents)
        v, vertex_transforms = ops.skin(v_posed, transforms, weights, True)
        grad_p, grad_t = ops.skin_backward(grad_v, grad_vt, v_posed, transforms, weights)
        grads = ops.rigid_transforms_backward(grad_t, feature, pose, joints, parents)
        return (v, vertex_transforms, grad_p) + tuple(grads)

    for parents in (parents_tensor(FLAME_PARENTS), parents_tensor(FLAME_PARENTS, "cuda")):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step(parents)  # warm-up outside the graph
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = step(parents)
        pose.add_(0.1)  # new inputs in the captured buffers
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(outs, step(parents)):
            assert torch.equal(got, want)


def test_create_graph_through_the_fused_node_is_a_clear_error(ops):
    """create_graph=True through the fused node raises, also where the outer gradient is a
    constant (v.sum()): it used to return a first-order gradient without its second-order
    part, silently."""
    from flame_ext import FlameShape

    m = FlameShape(6, 4, model_path="synthetic-small", device="cpu", backend="ext")
    pose = torch.randn(2, 3, dtype=torch.float32, requires_grad=True)
    for loss in (lambda v: v.sum(), lambda v: v.square().sum()):
        v, _ = m(jaw_pose=pose)
        with pytest.raises(RuntimeError, match="create_graph=True"):
            torch.autograd.grad(loss(v), pose, create_graph=True)
    v, _ = m(jaw_pose=pose)
    assert torch.autograd.grad(v.sum(), pose)[0].shape == (2, 3)  # first order still works


@pytest.mark.parametrize("shared", [False, True])
def test_fused_joints_carry_their_gradient(ops, tmp_path, shared):
    """The fused node returns the rest-pose joints as well (the smplx layer's joints come
    from it): the same values as the op-by-op path, and their gradient, alone or with
    v's, reaches the coefficients as the op-by-op path's does."""
    from flame_ext import synthetic
    from flame_ext.compat import _layer
    from flame_ext.compat.smplx import FLAME

    layer = FLAME(str(synthetic.write_smplx_assets(tmp_path, "small", 0)), dtype=torch.float64)
    tables = layer._tables()
    gen = torch.Generator().manual_seed(5)
    batch = 3
    identity = torch.randn(1 if shared else batch, layer.num_betas, generator=gen,
                           dtype=torch.float64)
    rest = torch.randn(batch, layer.num_expression_coeffs, generator=gen, dtype=torch.float64)
    pose = 0.3 * torch.randn(batch, 5, 3, generator=gen, dtype=torch.float64)
    ext = _backend.steps("ext")
    one_by_one = SimpleNamespace(**{**vars(ext), "lbs": lambda *args: None})
    for with_v in (False, True):
        results = []
        for k in (ext, one_by_one):
            leaves = [t.clone().requires_grad_(True) for t in (identity, rest, pose)]
            v, _, joints = _layer.decode(k, tables, leaves[0], leaves[1], batch,
                                         pose=leaves[2], need_joints=True)
            weight = torch.randn(joints.shape, generator=torch.Generator().manual_seed(6),
                                 dtype=torch.float64)
            loss = (joints * weight).sum() + (v.sum() if with_v else 0)
            # the rest-pose joints do not depend on the pose: with them alone, no (or a
            # zero) pose gradient
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            results.append((joints, [torch.zeros_like(t) if g is None else g
                                     for t, g in zip(leaves, grads)]))
        (joints, got), (joints_ref, want) = results
        torch.testing.assert_close(joints, joints_ref, rtol=0, atol=0)
        for name, g, w in zip(("identity", "rest", "pose"), got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=name)
        assert got[0].abs().max() > 0
