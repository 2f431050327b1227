"""Builds the op library from a chosen subset of op families, for development.

Each family (csrc/<family>/) can be built and tested alone while the others are being
written:

    python tools/dev_build.py blend --out /tmp/fe_blend
    FLAME_EXT_LIB=/tmp/fe_blend/flame_ext_dev.so python -m pytest tests/test_ops_blend.py

`--cuda` adds the family's .cu files (needs a CUDA build of torch and CUDA_HOME).
The shipped build is setup.py; this only saves rebuilding unrelated families, with the
same flags and definitions (imported from setup.py).
"""

import argparse
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_arguments(families, cuda: bool, out: str) -> dict:
    """The keyword arguments of torch.utils.cpp_extension.load for these families."""
    import torch

    sys.path.insert(0, ROOT)
    import setup  # the build's flags, sources and helpers; setup() itself does not run

    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "native") if cuda else None
    # load() hands the flags to a shell unquoted: quote the string-valued definitions.
    define_flags = [
        shlex.quote("-D%s" % name if value is None else "-D%s=%s" % (name, value))
        for name, value in setup.defines(torch.__version__, archs)
    ]
    return dict(
        name="flame_ext_dev",
        sources=[os.path.join(ROOT, f) for f in setup.sources(cuda, families or None)],
        extra_include_paths=[os.path.join(ROOT, "csrc")] + setup._nvidia_wheel_includes(),
        extra_cflags=list(setup.CXX_FLAGS) + define_flags,
        extra_cuda_cflags=list(setup.NVCC_FLAGS),
        extra_ldflags=list(setup.LINK_FLAGS),
        build_directory=out,
        is_python_module=False,
        verbose=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help="op families (default: all)")
    parser.add_argument("--out", required=True, help="build directory")
    parser.add_argument("--cuda", action="store_true", help="also compile .cu sources")
    args = parser.parse_args()

    from torch.utils import cpp_extension

    os.makedirs(args.out, exist_ok=True)
    cpp_extension.load(**load_arguments(args.families, args.cuda, args.out))
    print(os.path.join(args.out, "flame_ext_dev.so"))


if __name__ == "__main__":
    sys.exit(main())
