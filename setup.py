"""Builds flame_ext and its compiled ops (flame_ext._C) through torch.utils.cpp_extension.

CUDA sources are compiled when a CUDA toolkit is found next to a CUDA build of torch, or
when FORCE_CUDA=1; otherwise the extension is CPU-only. Build with
`pip install --no-build-isolation .` so the extension compiles against the torch that is
already installed (an isolated build would fetch another torch and produce a binary that
does not load).
"""

import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - the message is the point
    sys.exit(
        "flame_ext: torch must be installed before building, and the build must see it: "
        "pip install torch && pip install --no-build-isolation ."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "7.0;7.5;8.0;8.6;8.9;9.0+PTX"


def _want_cuda() -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    if os.environ.get("FLAME_EXT_CPU_ONLY", "0") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _nvidia_wheel_includes() -> list:
    """cuBLAS/cuSPARSE headers of the nvidia-* pip wheels that the CUDA torch pulls in."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    dirs = []
    for base in getattr(nvidia, "__path__", []):
        dirs += glob.glob(os.path.join(base, "*", "include"))
        dirs += glob.glob(os.path.join(base, "cu*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def _extension():
    cpu_sources = ["csrc/registration.cpp"] + sorted(glob.glob("csrc/*/*_cpu.cpp"))
    cuda_sources = sorted(glob.glob("csrc/*/*.cu"))
    with_cuda = _want_cuda()
    # No -std flag: torch.utils.cpp_extension picks the standard its headers need (C++20).
    cxx = ["-O3", "-fopenmp", "-fvisibility=hidden"]
    define = [("FLAME_EXT_TORCH_VERSION", '"%s"' % torch.__version__)]
    if with_cuda:
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            # No GPU to read the arch from: build for the usual data-centre/desktop
            # generations rather than torch's full list (each arch adds build time).
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "native")
        define += [("FLAME_EXT_WITH_CUDA", None), ("FLAME_EXT_CUDA_ARCHS", '"%s"' % archs)]
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        if os.environ.get("FLAME_EXT_PTXAS_VERBOSE") == "1":
            nvcc.append("-Xptxas=-v")  # per-kernel registers / shared memory / spills
        return cpp_extension.CUDAExtension(
            "flame_ext._C",
            cpu_sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")] + _nvidia_wheel_includes(),
            define_macros=define,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "flame_ext._C",
        cpu_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


def main() -> None:
    here = os.path.join(ROOT, "README.md")
    setup(
        name="flame_ext",
        version="0.1.0",
        description="Fast, drop-in FLAME decoders (FlameShape, FlameLandmark, FlameTex) "
        "with fused C++/CUDA kernels",
        long_description=open(here).read() if os.path.exists(here) else "",
        long_description_content_type="text/markdown",
        python_requires=">=3.9",
        packages=find_packages(include=["flame_ext", "flame_ext.*"]),
        install_requires=["torch>=2.4", "numpy", "scipy"],
        extras_require={"test": ["pytest", "hypothesis"], "bench": ["matplotlib", "tqdm"]},
        entry_points={"console_scripts": ["flame-ext = flame_ext.cli:main"]},
        ext_modules=[_extension()],
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
        zip_safe=False,
    )


if __name__ == "__main__":  # pip runs this file as __main__; tools/dev_build.py imports it
    main()
