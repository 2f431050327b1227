"""Builds flame_ext and its compiled ops (flame_ext._C) through torch.utils.cpp_extension.

CUDA sources are compiled when a CUDA toolkit is found next to a CUDA build of torch, or
when FORCE_CUDA=1; otherwise the extension is CPU-only. Build with
`pip install --no-build-isolation .` so the extension compiles against the torch that is
already installed (an isolated build would fetch another torch and produce a binary that
does not load).

The flag lists, sources and definitions below are the build's single source:
CMakeLists.txt and tools/dev_build.py import this file for them (setup() runs only when
this file is the main script).
"""

import glob
import os
import re
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

# The compile and link flags of every build of the op library: this file,
# CMakeLists.txt (which reads them through write_cmake_flags at configure time) and
# tools/dev_build.py. No -std flag: torch.utils.cpp_extension picks the standard its
# headers need (C++20), and CMakeLists.txt sets the same.
CXX_FLAGS = ["-O3", "-fopenmp", "-fvisibility=hidden"]
# -lineinfo maps kernel code to source lines for profilers and compute-sanitizer at no
# run-time cost; the host side of the .cu files hides its symbols as the C++ side does.
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-Xcompiler=-fvisibility=hidden"]
LINK_FLAGS = ["-fopenmp"]


def defines(torch_version: str, cuda_archs=None) -> list:
    """The preprocessor definitions, (name, value or None), that registration.cpp reports
    through build_config(): the torch built against and, when the CUDA sources are
    compiled (cuda_archs not None), the CUDA architectures."""
    macros = [("FLAME_EXT_TORCH_VERSION", '"%s"' % torch_version)]
    if cuda_archs is not None:
        macros += [("FLAME_EXT_WITH_CUDA", None), ("FLAME_EXT_CUDA_ARCHS", '"%s"' % cuda_archs)]
    return macros


def families() -> list:
    """The op families: one folder of csrc/ each."""
    return sorted(
        name for name in os.listdir(os.path.join(ROOT, "csrc"))
        if os.path.isdir(os.path.join(ROOT, "csrc", name))
    )


def sources(with_cuda: bool, only=None) -> list:
    """The translation units, relative to the repository root: the op schemas
    (registration.cpp), each family's CPU sources and, with_cuda, each family's CUDA
    launchers. `only` restricts them to some families."""

    def matching(pattern):
        found = []
        for family in families() if only is None else only:
            found += glob.glob(os.path.join(ROOT, "csrc", family, pattern))
        return sorted(os.path.relpath(f, ROOT) for f in found)

    cuda = matching("*.cu") if with_cuda else []
    return ["csrc/registration.cpp"] + matching("*_cpu.cpp") + cuda


def headers() -> list:
    """The headers the sources include (shared ones, each family's math, checks and
    kernels): a change to one rebuilds the extension."""
    found = []
    for pattern in ("csrc/*.h", "csrc/*/*.h", "csrc/*/*.cuh"):
        found += glob.glob(os.path.join(ROOT, pattern))
    return sorted(os.path.relpath(f, ROOT) for f in found)


def write_cmake_flags(path: str) -> None:
    """Writes the flag lists and the sources as CMake variables (CMakeLists.txt includes
    the file), so that the CMake build compiles the same files with the same flags."""

    def cmake_list(values):
        return '"%s"' % ";".join(values)

    lines = [
        "# Generated from setup.py at configure time; do not edit.",
        "set(FLAME_EXT_CXX_FLAGS %s)" % cmake_list(CXX_FLAGS),
        "set(FLAME_EXT_CUDA_FLAGS %s)" % cmake_list(NVCC_FLAGS),
        "set(FLAME_EXT_LINK_FLAGS %s)" % cmake_list(LINK_FLAGS),
        "set(FLAME_EXT_CPU_SOURCES %s)" % cmake_list(sources(False)),
        "set(FLAME_EXT_CUDA_SOURCES %s)"
        % cmake_list([f for f in sources(True) if f.endswith(".cu")]),
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


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
    with_cuda = _want_cuda()
    if not with_cuda:
        return cpp_extension.CppExtension(
            "flame_ext._C",
            sources(False),
            include_dirs=[os.path.join(ROOT, "csrc")],
            depends=headers(),
            define_macros=defines(torch.__version__),
            extra_compile_args={"cxx": list(CXX_FLAGS)},
            extra_link_args=list(LINK_FLAGS),
        )
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        # No GPU to read the arch from: build for the usual data-centre/desktop
        # generations rather than torch's full list (each arch adds build time).
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "native")
    nvcc = list(NVCC_FLAGS)
    if os.environ.get("FLAME_EXT_PTXAS_VERBOSE") == "1":
        nvcc.append("-Xptxas=-v")  # per-kernel registers / shared memory / spills
    return cpp_extension.CUDAExtension(
        "flame_ext._C",
        sources(True),
        include_dirs=[os.path.join(ROOT, "csrc")] + _nvidia_wheel_includes(),
        depends=headers(),
        define_macros=defines(torch.__version__, archs),
        extra_compile_args={"cxx": list(CXX_FLAGS), "nvcc": nvcc},
        extra_link_args=list(LINK_FLAGS),
    )


def version() -> str:
    """flame_ext.__version__, read from the package without importing it (one source)."""
    text = open(os.path.join(ROOT, "flame_ext", "__init__.py")).read()
    return re.search(r'^__version__ = "([^"]+)"', text, flags=re.M).group(1)


def main() -> None:
    here = os.path.join(ROOT, "README.md")
    setup(
        name="flame_ext",
        version=version(),
        description="Fast, drop-in FLAME decoders (FlameShape, FlameLandmark, FlameTex) "
        "with fused C++/CUDA kernels",
        long_description=open(here).read() if os.path.exists(here) else "",
        long_description_content_type="text/markdown",
        python_requires=">=3.11",
        packages=find_packages(include=["flame_ext", "flame_ext.*"]),
        install_requires=["torch>=2.13", "numpy", "scipy"],
        extras_require={"test": ["pytest", "hypothesis"], "bench": ["matplotlib", "tqdm"]},
        entry_points={"console_scripts": ["flame-ext = flame_ext.cli:main"]},
        ext_modules=[_extension()],
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
        zip_safe=False,
    )


if __name__ == "__main__":  # pip runs this file; tools/dev_build.py and CMake import it
    main()
