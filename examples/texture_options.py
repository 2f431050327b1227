"""FlameTex's options on the synthetic model: AlbedoMM's specular part, a half-precision
basis and the compact buffers, each against the default float32 module.

    python examples/texture_options.py            # full-size synthetic textures (512x512)
    python examples/texture_options.py --small    # the tiny synthetic model, instantly

Prints per option the module's buffer bytes and the largest difference from the float32
module's output (zero for compact=True: it is the same computation on the same rows).
With the real files, pass the texture (or its directory) as --model-path; specular=True
needs AlbedoMM's albedoModel2020_FLAME_albedoPart.npz.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from flame_ext import FlameTex


def buffer_mib(module: torch.nn.Module) -> float:
    return sum(b.numel() * b.element_size() for b in module.buffers()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--small", action="store_true", help="the tiny synthetic model")
    parser.add_argument("--n-tex", type=int, default=None)
    args = parser.parse_args()
    path = args.model_path or ("synthetic-small" if args.small else "synthetic")
    n_tex = args.n_tex or (5 if args.small else 50)
    warnings.simplefilter("ignore")  # the synthetic-model notice

    code = torch.randn(4, n_tex, generator=torch.Generator().manual_seed(0))
    default = FlameTex(path, n_tex)
    albedo = default(code)  # (4, 3, 256, 256), medusa's layout
    print(f"default float32: {buffer_mib(default):8.1f} MiB of buffers")
    for options in ({"basis_dtype": torch.float16}, {"basis_dtype": torch.bfloat16},
                    {"compact": True}, {"compact": True, "basis_dtype": torch.float16}):
        module = FlameTex(path, n_tex, **options)
        err = (module(code) - albedo).abs().max().item()
        name = ", ".join(f"{k}={v}" for k, v in options.items())
        print(f"{name:<40} {buffer_mib(module):8.1f} MiB, max |diff| {err:.2e}")
    # a full state dict loads into a compact module: its pre-hook gathers the rows
    compact = FlameTex(path, n_tex, compact=True)
    compact.load_state_dict(default.state_dict())
    assert torch.equal(compact(code), albedo)

    try:
        specular_module = FlameTex(path, n_tex, specular=True)
    except (OSError, ValueError) as exc:
        print(f"specular=True: {exc}")
        return
    diffuse, specular = specular_module(code)  # two (4, 3, 256, 256) images
    print(f"specular=True: diffuse {tuple(diffuse.shape)} mean {diffuse.mean():.3f}, "
          f"specular {tuple(specular.shape)} mean {specular.mean():.3f}, "
          f"{buffer_mib(specular_module):.1f} MiB")


if __name__ == "__main__":
    main()
