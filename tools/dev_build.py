"""Builds the op library from a chosen subset of op families, for development.

Each family (csrc/<family>/) can be built and tested alone while the others are being
written:

    python tools/dev_build.py blend --out /tmp/fe_blend
    FLAME_EXT_LIB=/tmp/fe_blend/flame_ext_dev.so python -m pytest tests/test_ops_blend.py

`--cuda` adds the family's .cu files (needs a CUDA build of torch and CUDA_HOME).
The shipped build is setup.py; this only saves rebuilding unrelated families.
"""

import argparse
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help="op families (default: all)")
    parser.add_argument("--out", required=True, help="build directory")
    parser.add_argument("--cuda", action="store_true", help="also compile .cu sources")
    args = parser.parse_args()

    from torch.utils import cpp_extension

    sys.path.insert(0, ROOT)
    import setup  # the build's helpers (CUDA header paths); setup() itself does not run

    families = args.families or sorted(
        os.path.basename(d) for d in glob.glob(os.path.join(ROOT, "csrc", "*")) if os.path.isdir(d)
    )
    sources = [os.path.join(ROOT, "csrc", "registration.cpp")]
    for family in families:
        sources += sorted(glob.glob(os.path.join(ROOT, "csrc", family, "*_cpu.cpp")))
        if args.cuda:
            sources += sorted(glob.glob(os.path.join(ROOT, "csrc", family, "*.cu")))
    os.makedirs(args.out, exist_ok=True)
    cflags = ["-O3", "-fopenmp"]
    if args.cuda:
        cflags.append("-DFLAME_EXT_WITH_CUDA")
    cpp_extension.load(
        name="flame_ext_dev",
        sources=sources,
        extra_include_paths=[os.path.join(ROOT, "csrc")] + setup._nvidia_wheel_includes(),
        extra_cflags=cflags,
        extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr"],
        extra_ldflags=["-fopenmp"],
        build_directory=args.out,
        is_python_module=False,
        verbose=False,
    )
    print(os.path.join(args.out, "flame_ext_dev.so"))


if __name__ == "__main__":
    sys.exit(main())
