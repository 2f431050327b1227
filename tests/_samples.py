"""Random inputs for the tests: the model names, decoder inputs, op inputs.

Every builder draws float64 normal (or uniform) values on the CPU from its own seeded
generator, then converts to the dtype and device asked for, so a case is the same numbers
on every device and in either precision.
"""

import torch

from flame_ext.decoders import INPUT_NAMES

F32, F64 = torch.float32, torch.float64

# The synthetic models: a few dozen vertices (float64 gradcheck stays fast), and FLAME's
# full dimensions (the kernels' real launch shapes).
SMALL = "synthetic-small"
FULL = "synthetic"


def _generator(seed) -> torch.Generator:
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)


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
