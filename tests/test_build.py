"""Tests of the build and of the layout of csrc/ that the build relies on.

- One list of flags, sources and definitions (setup.py) for every build: setup.py itself,
  CMakeLists.txt (which reads them through setup.write_cmake_flags) and
  tools/dev_build.py; the Makefile and setup.py's dependencies cover every source file.
- One folder per op family, each with its math header, its argument checks, its CUDA
  kernels with their launch plans, its CPU implementation and its CUDA launchers, and
  the rules that let the same kernels and launchers also compile for the CPU: launches
  only through launch.h, shared memory through FLAME_SHARED, launchers that include only
  CPU-safe headers.
- Helpers defined once: the argument checks of common.h and the CPU instruction-set choice
  of cpu_isa.h, whose environment switch reaches every family.

Everything here reads files, except the instruction-set test, which runs the ops.
"""

import fnmatch
import glob
import importlib
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
FAMILIES = ("blend", "landmarks", "normals", "rigid_transforms", "skin")


def _read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def _code(text):
    """C++ source without its comments and string literals."""
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r'"(\\.|[^"\\])*"', '""', text)


def _includes(text):
    return re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', text, flags=re.M)


def _csrc_files(*patterns):
    found = []
    for pattern in patterns:
        found += glob.glob(os.path.join(CSRC, pattern))
    return sorted(os.path.relpath(f, ROOT) for f in found)


@pytest.fixture(scope="module")
def setup_module_():
    """setup.py imported as a module: its lists, without running setup()."""
    sys.path.insert(0, ROOT)
    try:
        return importlib.import_module("setup")
    finally:
        sys.path.remove(ROOT)


# --------------------------------------------------------------------------------------
# One list of flags, sources and definitions


def test_flag_lists(setup_module_):
    s = setup_module_
    assert "-fvisibility=hidden" in s.CXX_FLAGS
    assert "-lineinfo" in s.NVCC_FLAGS
    # the host side of the .cu files hides its symbols too
    assert "-Xcompiler=-fvisibility=hidden" in s.NVCC_FLAGS
    assert "-fopenmp" in s.CXX_FLAGS and "-fopenmp" in s.LINK_FLAGS
    assert not any(f.startswith("-std=") for f in s.CXX_FLAGS + s.NVCC_FLAGS)


def test_sources_and_headers(setup_module_):
    s = setup_module_
    assert set(FAMILIES) <= set(s.families())
    cpu, cuda = s.sources(False), s.sources(True)
    assert cpu[0] == "csrc/registration.cpp"
    assert set(cpu) == {"csrc/registration.cpp"} | set(_csrc_files("*/*_cpu.cpp"))
    assert set(cuda) - set(cpu) == set(_csrc_files("*/*.cu"))
    assert s.sources(True, ["skin"]) == [
        "csrc/registration.cpp", "csrc/skin/skin_cpu.cpp", "csrc/skin/skin.cu"
    ]
    # a change to any header (the .cuh kernels included) rebuilds the extension
    assert set(s.headers()) == set(_csrc_files("*.h", "*/*.h", "*/*.cuh"))
    assert all(h.endswith((".h", ".cuh")) for h in s.headers())


def test_defines(setup_module_):
    s = setup_module_
    assert s.defines("2.0") == [("FLAME_EXT_TORCH_VERSION", '"2.0"')]
    assert s.defines("2.0", "9.0") == [
        ("FLAME_EXT_TORCH_VERSION", '"2.0"'),
        ("FLAME_EXT_WITH_CUDA", None),
        ("FLAME_EXT_CUDA_ARCHS", '"9.0"'),
    ]
    # registration.cpp reads each of them
    registration = _read("csrc/registration.cpp")
    for name, _ in s.defines("2.0", "9.0"):
        assert name in registration


def test_cmake_reads_the_lists_of_setup(setup_module_, tmp_path):
    s = setup_module_
    path = tmp_path / "flags.cmake"
    s.write_cmake_flags(str(path))
    values = dict(re.findall(r'^set\((\w+) "([^"]*)"\)$', path.read_text(), flags=re.M))
    assert values["FLAME_EXT_CXX_FLAGS"].split(";") == s.CXX_FLAGS
    assert values["FLAME_EXT_CUDA_FLAGS"].split(";") == s.NVCC_FLAGS
    assert values["FLAME_EXT_LINK_FLAGS"].split(";") == s.LINK_FLAGS
    assert values["FLAME_EXT_CPU_SOURCES"].split(";") == s.sources(False)
    assert values["FLAME_EXT_CUDA_SOURCES"].split(";") == [
        f for f in s.sources(True) if f.endswith(".cu")
    ]

    cmake = _read("CMakeLists.txt")
    assert "setup.write_cmake_flags" in cmake
    for variable in values:
        assert "${%s}" % variable in cmake, variable
    # no flag or source list of its own that could drift from setup.py's
    commands = re.sub(r"#[^\n]*", "", cmake)
    for flag in set(s.CXX_FLAGS + s.NVCC_FLAGS + s.LINK_FLAGS):
        assert flag not in commands, flag
    assert "GLOB" not in commands
    # the same definitions, with the CMake build's values
    for name, _ in s.defines("2.0", "9.0"):
        assert name in commands, name


def test_dev_build_uses_the_lists_of_setup(setup_module_):
    s = setup_module_
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        dev_build = importlib.import_module("dev_build")
    finally:
        sys.path.pop(0)
    args = dev_build.load_arguments(["blend"], True, "/unused")
    assert args["extra_cflags"][: len(s.CXX_FLAGS)] == s.CXX_FLAGS
    assert args["extra_cuda_cflags"] == s.NVCC_FLAGS
    assert args["extra_ldflags"] == s.LINK_FLAGS
    assert [os.path.relpath(f, ROOT) for f in args["sources"]] == s.sources(True, ["blend"])
    defines = " ".join(args["extra_cflags"][len(s.CXX_FLAGS):])
    for name, _ in s.defines("2.0", "9.0"):
        assert "-D" + name in defines
    every = dev_build.load_arguments([], False, "/unused")
    assert [os.path.relpath(f, ROOT) for f in every["sources"]] == s.sources(False)


def _makefile_patterns(variable):
    line = re.search(rf"^{variable} := (.*)$", _read("Makefile"), flags=re.M).group(1)
    return re.search(r"\$\(wildcard ([^)]*)\)", line).group(1).split()


def test_makefile_sources_cover_csrc():
    """The extension's sources (SOURCES) and the SIMT test library's (SIMT_SOURCES, every
    launcher and kernel plus csrc/simt/) cover every file of csrc/."""
    patterns = _makefile_patterns("SOURCES")
    simt = _makefile_patterns("SIMT_SOURCES")
    files = _csrc_files("*", "*/*")
    files = [f for f in files if os.path.isfile(os.path.join(ROOT, f))]
    missed = [f for f in files
              if not any(fnmatch.fnmatch(f, p) for p in patterns)
              and not (f.startswith("csrc/simt/") and "csrc/simt/*" in simt)]
    assert not missed
    assert any(p.endswith(".cuh") for p in patterns)
    for family in FAMILIES:
        for suffix in (".cu", "_kernels.cuh"):
            assert any(fnmatch.fnmatch(f"csrc/{family}/{family}{suffix}", p) for p in simt)


# --------------------------------------------------------------------------------------
# One folder per op family


@pytest.mark.parametrize("family", FAMILIES)
def test_family_folder(family):
    folder = os.path.join(CSRC, family)
    for suffix in (".h", "_checks.h", "_kernels.cuh", "_cpu.cpp", ".cu"):
        assert os.path.isfile(os.path.join(folder, family + suffix)), family + suffix
    # each file says what it holds
    for path in glob.glob(os.path.join(folder, "*")):
        assert open(path).read().startswith("//"), path


# Ops whose family folder has another name, and ops implemented in torch ops (by the
# Python module of their family) rather than by C++ kernels.
FAMILY_OF_OP = {"vertex_normals": "normals", "blend_shared": "blend"}
TORCH_OPS_IMPLS = {"vertex_face_adjacency": "normals"}


def test_every_op_registered_by_its_family():
    registration = _read("csrc/registration.cpp")
    assert "for (const char* schema : kOpSchemas) m.def(schema);" in registration
    schemas = re.findall(r'^\s*"(\w+)\(', _read("csrc/op_schemas.h"), flags=re.M)
    assert len(schemas) == 13
    for op in schemas:
        if op in TORCH_OPS_IMPLS:
            # written in torch ops, registered for every device by its Python module
            module = _read(f"flame_ext/_ops/{TORCH_OPS_IMPLS[op]}.py")
            assert f'@torch.library.impl("flame_ext::{op}", "CompositeExplicitAutograd")' in module
            continue
        family = op[: -len("_backward")] if op.endswith("_backward") else op
        family = FAMILY_OF_OP.get(family, family)
        cpu = _read(f"csrc/{family}/{family}_cpu.cpp")
        cuda = _read(f"csrc/{family}/{family}.cu")
        assert f'm.impl("{op}", ' in cpu and f'm.impl("{op}", ' in cuda, op
        assert "TORCH_LIBRARY_IMPL(flame_ext, CPU, m)" in cpu
        assert "TORCH_LIBRARY_IMPL(FLAME_EXT_KERNEL_LIB, FLAME_EXT_KERNEL_KEY, m)" in cuda


def _standard(name):
    return "/" not in name and "." not in name  # <cstdint>, <tuple>, ...


def _allowed_in_launcher(name, family):
    return (
        _standard(name)
        or name in ("launch.h", "ATen/Dispatch.h", "ATen/core/Tensor.h", "ATen/Context.h",
                    "torch/library.h")
        or name.startswith(("ATen/ops/", family + "/"))
    )


def _allowed_in_kernels(name, family):
    # c10's half-precision types are host and device code alike (a half-precision dirs)
    return (_standard(name) or name in ("common.h", "launch.h", "c10/util/BFloat16.h",
                                        "c10/util/Half.h")
            or name.startswith(family + "/"))


@pytest.mark.parametrize("family", FAMILIES)
def test_launchers_and_kernels_compile_for_the_cpu(family):
    """What lets the kernels and launchers also build with g++ against a CPU runtime."""
    launcher = _read(f"csrc/{family}/{family}.cu")
    kernels = _read(f"csrc/{family}/{family}_kernels.cuh")
    for name in _includes(launcher):
        assert _allowed_in_launcher(name, family), name
    assert "launch.h" in _includes(launcher)
    for name in _includes(kernels):
        assert _allowed_in_kernels(name, family), name
    # the family's own headers are CPU-safe too: its math and its checks
    for name in _includes(launcher) + _includes(kernels):
        if name.startswith(family + "/"):
            assert name.endswith(("_checks.h", "_kernels.cuh")) or name == f"{family}/{family}.h"
    # the launchers hold no kernels, the kernels header holds all of them
    assert "__global__" not in _code(launcher)
    assert "__global__" in _code(kernels)
    for text in (launcher, kernels):
        code = _code(text)
        assert "<<<" not in code
        assert "__shared__" not in code
        assert "cuda" not in " ".join(_includes(text)).lower()
        assert not re.search(r"\bcuda\w*\(", code)  # no CUDA runtime calls
        assert not re.search(r"\b(float|double|int)[234]\b", code)  # no CUDA vector types


def test_only_launch_h_launches():
    for path in _csrc_files("*.h", "*/*.h", "*/*.cuh", "*/*.cu", "*/*.cpp", "*.cpp"):
        if path != "csrc/launch.h":
            assert "<<<" not in _code(_read(path)), path


@pytest.mark.parametrize("family", FAMILIES)
def test_every_kernel_has_a_launch_plan(family):
    """Each __global__ kernel is named by a LaunchPlan of its header and launched through
    launch() by the family's launcher."""
    kernels = _read(f"csrc/{family}/{family}_kernels.cuh")
    launcher = _read(f"csrc/{family}/{family}.cu")
    names = re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)", kernels)
    assert names
    for name in names:
        assert f'{{"{name}"' in kernels or f'"{name}", ' in kernels, name
        assert name in _code(launcher), name
    assert "launch(" in _code(launcher)
    # the plans read every limit from DeviceLimits rather than from a constant
    for constant in ("65535", "INT32_MAX", "numeric_limits<int32_t>"):
        assert constant not in _code(kernels) and constant not in _code(launcher), constant
    assert "const DeviceLimits& limits" in kernels


@pytest.mark.parametrize("family", FAMILIES)
def test_launchers_in_one_form(family):
    """Checks, device check, guard, stream, then launches, in every CUDA launcher; inputs
    read through const_data_ptr, outputs written through mutable_data_ptr (the CPU
    launchers too)."""
    launcher = _code(_read(f"csrc/{family}/{family}.cu"))
    bodies = re.split(r"\n(?=\S[^\n]*_cuda\()", launcher)[1:]
    assert bodies
    for body in bodies:
        steps = [
            body.index("check_kernel_device("),
            body.index("const DeviceGuard guard("),
            body.index("const Stream stream = current_stream();"),
            body.index("AT_DISPATCH_FLOATING_TYPES("),
        ]
        assert steps == sorted(steps)
    for path in (f"csrc/{family}/{family}.cu", f"csrc/{family}/{family}_cpu.cpp"):
        assert not re.search(r"(?<![\w])data_ptr\b", _code(_read(path))), path


# --------------------------------------------------------------------------------------
# Helpers defined once


def test_shared_helpers_defined_once():
    everything = {p: _code(_read(p)) for p in _csrc_files("*.h", "*/*.h", "*/*.cuh", "*/*.cu",
                                                          "*/*.cpp", "*.cpp")}

    def defining(pattern):
        return [p for p, code in everything.items() if re.search(pattern, code)]

    assert defining(r"void\s+check_float\s*\(") == ["csrc/common.h"]
    assert defining(r"bool\s+in_range\s*\(") == ["csrc/common.h"]
    assert defining(r"__builtin_cpu_supports") == ["csrc/cpu_isa.h"]
    assert [p for p in everything if '"FLAME_EXT_CPU_ISA"' in _read(p)] == ["csrc/cpu_isa.h"]
    assert defining(r"enum\s+class\s+Isa\b") == ["csrc/cpu_isa.h"]
    # no second, compile-time switch
    assert not defining(r"FLAME_EXT_NO_AVX2")


_ISA_SCRIPT = r"""
import torch
from flame_ext import _ops, reference
assert _ops.available(), _ops.load_error()
ops = torch.ops.flame_ext
gen = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.float64):
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    pose = 0.3 * torch.randn(3, 5, 3, generator=gen, dtype=dtype)
    joints = torch.randn(3, 5, 3, generator=gen, dtype=dtype)
    parents = torch.tensor([-1, 0, 1, 1, 1])
    transforms, _ = ops.rigid_transforms(pose, joints, parents)
    v_posed = torch.randn(3, 1100, 3, generator=gen, dtype=dtype)
    weights = torch.softmax(torch.randn(1100, 5, generator=gen, dtype=dtype), -1)
    v, vertex_transforms = ops.skin(v_posed, transforms, weights, True)
    want_v, want_t = reference.skin(v_posed.double(), transforms.double(), weights.double())
    torch.testing.assert_close(v.double(), want_v, **tol)
    torch.testing.assert_close(vertex_transforms.double(), want_t, **tol)
    grad_v = torch.randn(3, 1100, 3, generator=gen, dtype=dtype)
    got = ops.skin_backward(grad_v, None, v_posed, transforms, weights)
    leaves = [x.double().requires_grad_(True) for x in (v_posed, transforms)]
    want = torch.autograd.grad(reference.skin(leaves[0], leaves[1], weights.double())[0],
                               leaves, grad_v.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, **tol)
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_cpu_isa_switch_reaches_skin(ops, isa):
    """$FLAME_EXT_CPU_ISA narrows the instruction set of every family's CPU loops (blend's
    variants are tested in test_ops_blend.py): skin's vertex loops on each build."""
    env = dict(os.environ, FLAME_EXT_CPU_ISA=isa)
    result = subprocess.run(
        [sys.executable, "-c", _ISA_SCRIPT], env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_version_has_one_source(setup_module_):
    import flame_ext

    assert setup_module_.version() == flame_ext.__version__


def test_import_registers_every_op(ops):
    """A bare `import flame_ext` registers the compiled ops with torch.ops."""
    script = ("import torch, flame_ext\n"
              "from flame_ext._ops import OPS\n"
              "print(all(hasattr(torch.ops.flame_ext, op) for op in OPS))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr[-2000:]
