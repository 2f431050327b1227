"""The GPU check's logic on the CPU: tools/gpu_check.sh --dry-run, the ptxas report, the
smoke script, and the driver's time keeping.

The dry run executes every stage of the default mode with its CPU stand-ins (the same
pytest and bench/run.py commands, the smoke script on the CPU), so that a wrong option, a
case name that no longer exists or a broken parser shows here and not on a GPU.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")


def _tool(name):
    path = os.path.join(TOOLS, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _tool("gpu_check")
ptxas_report = _tool("ptxas_report")
gpu_smoke = _tool("gpu_smoke")

# ptxas -v output of nvcc 13.0 (`nvcc -arch=sm_90 -Xptxas=-v -c`) on small kernels: two
# template instantiations with shared memory, an extern "C" kernel with a local array, a
# kernel that spills heavily; as ninja prints it inside pip's log (status line, output).
PTXAS_SM90 = """\
[2/3] /usr/local/cuda/bin/nvcc --generate-dependencies-with-compile --dependency-output /src/build/temp.linux-x86_64-cpython-312/csrc/skin/skin.o.d -I/src/csrc -c -c /src/csrc/skin/skin.cu -o /src/build/temp.linux-x86_64-cpython-312/csrc/skin/skin.o -O3 -Xptxas=-v -gencode=arch=compute_90,code=sm_90
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN4demo9tiled_sumIdLi128EEEvPKT_PS1_i' for 'sm_90'
ptxas info    : Function properties for _ZN4demo9tiled_sumIdLi128EEEvPKT_PS1_i
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 14 registers, used 1 barriers, 1024 bytes smem
ptxas info    : Compile time = 48.721 ms
ptxas info    : Compiling entry function '_ZN4demo9tiled_sumIfLi256EEEvPKT_PS1_i' for 'sm_90'
ptxas info    : Function properties for _ZN4demo9tiled_sumIfLi256EEEvPKT_PS1_i
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 1 barriers, 1024 bytes smem
ptxas info    : Compile time = 16.715 ms
ptxas info    : Compiling entry function '_Z10uses_constPf' for 'sm_90'
ptxas info    : Function properties for _Z10uses_constPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 0 barriers
ptxas info    : Compile time = 1.534 ms
ptxas info    : Compiling entry function '_Z5heavyPKdPd' for 'sm_90'
ptxas info    : Function properties for _Z5heavyPKdPd
    50048 bytes stack frame, 65896 bytes spill stores, 95176 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 50048 bytes cumulative stack size
ptxas info    : Compile time = 34316.355 ms
ptxas info    : Compiling entry function 'local_array' for 'sm_90'
ptxas info    : Function properties for local_array
    256 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 34 registers, used 0 barriers, 256 bytes cumulative stack size
ptxas info    : Compile time = 11.267 ms
"""

# Two real architectures in one nvcc call (-gencode sm_80 and sm_90, -maxrregcount=24):
# sm_80 still reports constant bank 0, and an out-of-line __noinline__ device function has
# a frame but no 'Used' line. Printed with pip's indentation.
PTXAS_TWO_ARCHS = """\
  [3/3] /usr/local/cuda/bin/nvcc -c /src/csrc/blend/blend.cu -o /src/build/blend.o -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
  ptxas info    : Overriding maximum register limit 256 for '_Z8dyn_smemPf' with  24 of maxrregcount option
  ptxas info    : 0 bytes gmem
  ptxas info    : Compiling entry function '_Z8dyn_smemPf' for 'sm_80'
  ptxas info    : Function properties for _Z8dyn_smemPf
      0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
  ptxas info    : Used 10 registers, used 1 barriers, 360 bytes cmem[0]
  ptxas info    : Compile time = 2.984 ms
  ptxas info    : Compiling entry function '_Z6spillsPKfPfi' for 'sm_80'
  ptxas info    : Function properties for _Z6spillsPKfPfi
      128 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
  ptxas info    : Used 64 registers, used 0 barriers, 128 bytes cumulative stack size, 372 bytes cmem[0]
  ptxas info    : Compile time = 17.372 ms
  ptxas info    : Function properties for _Z6helperPKfi
      0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
  ptxas info    : Overriding maximum register limit 256 for '_Z8dyn_smemPf' with  24 of maxrregcount option
  ptxas info    : 0 bytes gmem
  ptxas info    : Compiling entry function '_Z8dyn_smemPf' for 'sm_90'
  ptxas info    : Function properties for _Z8dyn_smemPf
      0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
  ptxas info    : Used 12 registers, used 1 barriers
  ptxas info    : Compile time = 3.181 ms
  ptxas info    : Compiling entry function '_Z6spillsPKfPfi' for 'sm_90'
  ptxas info    : Function properties for _Z6spillsPKfPfi
      128 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
  ptxas info    : Used 64 registers, used 0 barriers, 128 bytes cumulative stack size
  ptxas info    : Compile time = 20.125 ms
  ptxas info    : Function properties for _Z6helperPKfi
      0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
"""

# -Xptxas=-v,-warn-spills -maxrregcount=16: warnings before the kernel's info lines.
PTXAS_WARNINGS = """\
ptxas warning : For profile sm_90 adjusting per thread register count of 16 to lower bound of 24
ptxas info    : Overriding maximum register limit 256 for '_Z7squeezePKfPfi' with  24 of maxrregcount option
ptxas warning : Registers are spilled to local memory in function '_Z7squeezePKfPfi', 28 bytes spill stores, 28 bytes spill loads
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z7squeezePKfPfi' for 'sm_90'
ptxas info    : Function properties for _Z7squeezePKfPfi
    32 bytes stack frame, 28 bytes spill stores, 28 bytes spill loads
ptxas info    : Used 24 registers, used 0 barriers, 32 bytes cumulative stack size
ptxas info    : Compile time = 24.258 ms
"""


def _by_name(kernels, name, arch):
    (found,) = [k for k in kernels if k["kernel"] == name and k["arch"] == arch]
    return found


def test_ptxas_parser_reads_every_kernel_field():
    kernels = ptxas_report.parse(PTXAS_SM90)["kernels"]
    assert [k["kernel"] for k in kernels] == [
        "_ZN4demo9tiled_sumIdLi128EEEvPKT_PS1_i", "_ZN4demo9tiled_sumIfLi256EEEvPKT_PS1_i",
        "_Z10uses_constPf", "_Z5heavyPKdPd", "local_array"]
    tiled = _by_name(kernels, "_ZN4demo9tiled_sumIdLi128EEEvPKT_PS1_i", "sm_90")
    assert tiled == {
        "kernel": "_ZN4demo9tiled_sumIdLi128EEEvPKT_PS1_i", "arch": "sm_90", "entry": True,
        "source": "csrc/skin/skin.cu", "registers": 14, "stack_frame_bytes": 0,
        "spill_stores_bytes": 0, "spill_loads_bytes": 0, "barriers": 1, "smem_bytes": 1024,
        "compile_ms": 48.721}
    heavy = _by_name(kernels, "_Z5heavyPKdPd", "sm_90")
    assert (heavy["registers"], heavy["stack_frame_bytes"], heavy["spill_stores_bytes"],
            heavy["spill_loads_bytes"], heavy["cumulative_stack_bytes"]) == (
                32, 50048, 65896, 95176, 50048)
    assert "smem_bytes" not in heavy
    assert _by_name(kernels, "local_array", "sm_90")["stack_frame_bytes"] == 256


def test_ptxas_parser_two_archs_device_functions_and_constant_banks():
    kernels = ptxas_report.parse(PTXAS_TWO_ARCHS)["kernels"]
    assert [(k["kernel"], k["arch"], k["entry"]) for k in kernels] == [
        ("_Z8dyn_smemPf", "sm_80", True), ("_Z6spillsPKfPfi", "sm_80", True),
        ("_Z6helperPKfi", "sm_80", False), ("_Z8dyn_smemPf", "sm_90", True),
        ("_Z6spillsPKfPfi", "sm_90", True), ("_Z6helperPKfi", "sm_90", False)]
    assert {k["source"] for k in kernels} == {"csrc/blend/blend.cu"}
    spills80 = _by_name(kernels, "_Z6spillsPKfPfi", "sm_80")
    assert spills80["registers"] == 64 and spills80["cmem_bytes"] == {"cmem[0]": 372}
    assert "cmem_bytes" not in _by_name(kernels, "_Z6spillsPKfPfi", "sm_90")
    helper = _by_name(kernels, "_Z6helperPKfi", "sm_90")
    assert helper["registers"] is None and helper["stack_frame_bytes"] == 0


def test_ptxas_parser_keeps_warnings():
    parsed = ptxas_report.parse(PTXAS_WARNINGS)
    assert len(parsed["warnings"]) == 2
    assert "Registers are spilled" in parsed["warnings"][1]
    (kernel,) = parsed["kernels"]
    assert (kernel["registers"], kernel["spill_stores_bytes"]) == (24, 28)


def test_ptxas_report_summary_names_and_markdown(tmp_path):
    data = ptxas_report.report(PTXAS_SM90 + PTXAS_TWO_ARCHS,
                               {"device": "test device", "torch": "x"})
    summary = data["summary"]
    assert summary["kernels"] == 9 and summary["device_functions"] == 2
    assert summary["archs"] == ["sm_80", "sm_90"]
    assert summary["max_registers"] == 64 and summary["max_stack_frame_bytes"] == 50048
    if shutil.which("c++filt") or shutil.which("cu++filt"):
        names = {k["name"] for k in data["kernels"]}
        assert {"demo::tiled_sum<double, 128>", "heavy", "local_array", "helper"} <= names
        assert summary["spilling"] == ["heavy (sm_90)"]
    table = ptxas_report.markdown(data)
    assert "device: test device" in table and "## sm_80" in table and "## sm_90" in table
    assert table.count("| `") == 11
    log = tmp_path / "build.log"
    log.write_text(PTXAS_SM90)
    assert ptxas_report.main([str(log), "--json", str(tmp_path / "p.json"),
                              "--md", str(tmp_path / "p.md")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["summary"]["kernels"] == 5
    twice = ptxas_report.report(PTXAS_SM90 + PTXAS_SM90)  # a retried build: each once
    assert twice["summary"]["kernels"] == 5
    empty = tmp_path / "empty.log"
    empty.write_text("nothing compiled\n")
    assert ptxas_report.main([str(empty), "--json", str(tmp_path / "e.json")]) == 1


def test_short_name():
    assert ptxas_report.short_name(
        "void flame_ext::(anonymous namespace)::blend_forward_kernel<float, 8>"
        "(float const*, long, float*)") == "flame_ext::blend_forward_kernel<float, 8>"
    assert ptxas_report.short_name("local_array") == "local_array"


# ---------------------------------------------------------------------------------------
# The smoke script (its full CPU run is part of the dry run below).


def test_smoke_arguments_of_the_sanitizer_runs_parse_and_run_on_cpu(tmp_path):
    """Exactly the smoke arguments the sanitizer runs use, minus the sanitizer, one check."""
    check = gpu_check.Check(gpu_check.parse_args(["--dry-run", "--out", str(tmp_path)]))
    argv = gpu_check._sanitizer_argv(check, "racecheck") + gpu_check._smoke_argv(
        check, "smoke_racecheck.json", "cpu", "--no-coverage")
    smoke_args = argv[argv.index("tools/gpu_smoke.py") + 1:]
    assert gpu_smoke.main(smoke_args + ["--only", "blend f32 B=1 "]) == 0
    report = json.loads((tmp_path / "smoke_racecheck.json").read_text())
    assert report["checks"] == 1 and report["failed"] == [] and report["ops_dispatched"] is None


def test_smoke_fails_on_a_mismatch(monkeypatch, tmp_path):
    # No tolerance at all: the float32 kernels round differently from the reference.
    monkeypatch.setitem(gpu_smoke.TOLERANCE, torch.float32, (0.0, 0.0))
    out = tmp_path / "smoke.json"
    assert gpu_smoke.main(["--device", "cpu", "--only", "skin f32 B=1 ", "--json",
                           str(out)]) == gpu_smoke.FAILED
    (result,) = json.loads(out.read_text())["results"]
    assert not result["ok"] and "max |err|" in result["mismatches"][0]


def test_smoke_selection_that_matches_nothing_fails():
    assert gpu_smoke.main(["--device", "cpu", "--only", "no such check"]) == gpu_smoke.FAILED


# ---------------------------------------------------------------------------------------
# The driver.


def test_default_budget_fits_one_nine_minute_call():
    for mode, budget in gpu_check.BUDGET_S.items():
        assert list(budget) == list(gpu_check.STAGES[mode])
        assert sum(budget.values()) + gpu_check.END_RESERVE_S <= gpu_check.DEADLINE_S <= 540


def _alive(pid: int) -> bool:
    """Whether process pid exists and is not a zombie (killed, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_hanging_step_is_killed_at_its_limit(tmp_path):
    args = gpu_check.parse_args(["--dry-run", "--out", str(tmp_path)])
    check = gpu_check.Check(args)
    stage = {"log": "logs/hang.log", "steps": []}
    start = time.monotonic()
    pid_file = tmp_path / "child.pid"
    # A background child that ignores the interrupt and the termination (as its sleep
    # does, by inheritance) outlives the shell: the final kill of the group must take it.
    # It writes its pid before it sleeps, far longer than the test waits for it to go.
    child = f"(trap '' INT TERM; echo $BASHPID > {pid_file}; sleep 120) & sleep 60"
    step = check.run(stage, ["bash", "-c", child], limit=1.0)
    assert time.monotonic() - start < gpu_check.KILL_GRACE_S + 5
    assert step["rc"] == 124 and step["timed_out"] and not step["ok"]
    assert "timed out" in (tmp_path / "logs" / "hang.log").read_text()
    text = pid_file.read_text().strip() if pid_file.exists() else ""
    if not text:
        return  # killed before its pid was written: nothing of the group is left
    pid = int(text)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    assert not _alive(pid), "the background child outlived the kill"


def test_stage_limits_leave_the_later_stages_their_budgets(tmp_path):
    args = gpu_check.parse_args(["--out", str(tmp_path)])
    check = gpu_check.Check(args)
    budget = gpu_check.BUDGET_S["default"]
    later = sum(budget.values()) - budget["env"]
    assert check.stage_limit("env") == pytest.approx(
        gpu_check.DEADLINE_S - later - gpu_check.END_RESERVE_S, abs=1)
    assert check.stage_limit("bench") == pytest.approx(
        gpu_check.DEADLINE_S - gpu_check.END_RESERVE_S, abs=1)


def test_dry_bench_substitutes_device_sizes_and_model():
    argv = ["--device", "cuda", "--cases", "shape_fwd", "--batch-sizes", "1", "64", "4096",
            "--impls", "medusa", "--repeats", "7", "--budget", "0.2", "--no-plot"]
    assert gpu_check._dry_bench(argv) == [
        "--device", "cpu", "--cases", "shape_fwd", "--batch-sizes", "1", "--impls",
        "medusa", "--repeats", "3", "--budget", "0.01", "--no-plot", "--model-path",
        "synthetic-small", "--fit-frames", "4", "--fit-iterations", "2"]
    assert "--batch-sizes" in gpu_check._dry_bench(["--device", "cuda", "--cases", "fit"])


def test_sanitizer_summaries_are_read():
    assert gpu_check._sanitizer_summary(
        ["========= COMPUTE-SANITIZER", "========= ERROR SUMMARY: 3 errors"])["errors"] == 3
    race = gpu_check._sanitizer_summary(
        ["========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)"])
    assert (race["hazards"], race["errors"], race["warnings"]) == (2, 1, 1)


def test_junit_counts(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="4" failures="1" '
        'errors="0" skipped="1"><testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_a" name="test_skip"><skipped/></testcase>'
        '<testcase classname="tests.test_a" name="test_ok2"/></testsuite></testsuites>')
    counts = gpu_check._junit_counts(str(xml))
    assert (counts["passed"], counts["failures"], counts["skipped"]) == (2, 1, 1)
    assert counts["failed_tests"] == ["tests.test_a::test_bad"]


def test_bench_check_fails_flame_ext_cells_only(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({
        "environment": {"device": "d"}, "impls": ["compile", "flame_ext"],
        "cases": [{"name": "shape_fwd"}], "files": {"png": None}, "targets": [],
        "results": [{"case": "shape_fwd", "batch": 1, "impls": {
            "compile": {"error": "inductor failed"}, "flame_ext": {"error": "CUDA error"}}}]}))
    result = gpu_check._bench_check(str(path), ["shape_fwd", "lmk68_fwd"])
    assert result["flame_ext_errors"] == ["shape_fwd B=1 flame_ext: CUDA error"]
    assert result["baseline_errors"] == ["shape_fwd B=1 compile: inductor failed"]
    assert result["missing_cases"] == ["lmk68_fwd"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(TOOLS, "gpu_check.sh"), "--dry-run",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    return proc, out


def test_dry_run_passes_every_stage(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["ok"] and summary["first_failed"] is None
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages) == list(gpu_check.STAGES["default"])
    for name, stage in stages.items():
        assert (stage["status"], stage["rc"]) == ("ok", 0), (name, stage)
        assert (out / stage["log"]).is_file()
    assert "first failed stage: none" in proc.stdout
    for name in ("env.json", "build_info.json", "tests.xml", "smoke.json"):
        assert (out / name).is_file(), name
    assert summary["results_files"] and all((out / p).is_file()
                                            for p in summary["results_files"])


def test_dry_run_stage_details(dry_run):
    _, out = dry_run
    stages = {s["stage"]: s for s in json.loads((out / "summary.json").read_text())["stages"]}
    tests = stages["tests"]["details"]
    assert "collected" in tests["tests"]["collected"]
    smoke = stages["memcheck"]["details"]["smoke"]
    from flame_ext import _ops

    assert smoke["failed_checks"] == [] and smoke["checks"] >= 40
    assert set(smoke["ops_dispatched"]) == set(_ops.OPS)
    assert "compute-sanitizer --tool memcheck" in stages["memcheck"]["details"]["memcheck"][
        "command"]
    bench = stages["bench"]["details"]
    assert bench["core"]["cases"] == gpu_check.CORE_CASES
    assert bench["compile"]["cases"] == gpu_check.COMPILE_CASES
    assert "compile" in bench["compile"]["impls"]
    for run in bench.values():
        assert run["flame_ext_errors"] == [] and run["batches"] == [1]
    if stages["build"]["details"].get("ptxas"):  # nvcc present
        assert stages["build"]["details"]["ptxas"]["kernels"] >= 1
        assert (out / "ptxas.md").is_file()
