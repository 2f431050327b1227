"""Smoke test of the benchmark suite (flame_ext/_bench, run as bench/run.py): the --quick run end to end on the small
synthetic model, the JSON it writes, the plot, and the byte/FLOP models of the floor.

No timing is asserted: only that every number is there, positive and consistent.
"""

import importlib.util
import json
import os
import platform
import statistics

import pytest
import torch

from flame_ext import _ops
from flame_ext._bench import cases, floor, peers, run, timing

CASES = {
    "shape_fwd", "shape_fwd_R", "shape_fwdbwd", "shape_fwdbwd_R",
    "shared_fwd", "shared_fwd_R", "shared_fwdbwd", "shared_fwdbwd_R",
    "meanR_fwd", "ids8_fwdbwd", "lmk68_fwd", "lmk68_fwdbwd", "lmkmp_fwd", "lmkmp_fwdbwd",
    "tex_fwd", "fit68_fwdbwd", "normals_fwd", "normals_fwdbwd",
    "tex_half_fwd", "tex_bf16_fwd", "tex_compact_fwd", "tex_specular_fwd",
}
# Cases medusa has no counterpart for: the reference is their baseline.
NO_MEDUSA = {"normals_fwd", "normals_fwdbwd"}
IMPLS = ["medusa", "reference", "flame_ext"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = run.main(["--quick", "--device", "cpu", "--model-path", "synthetic-small",
                     "--impls", *IMPLS, "--no-progress", "--out", str(out)])
    assert code == 0
    files = sorted(os.listdir(out))
    jsons = [f for f in files if f.endswith(".json")]
    assert len(jsons) == 1, files
    with open(out / jsons[0]) as f:
        return out, files, json.load(f)


def test_quick_run_writes_the_environment(quick_run):
    _, files, data = quick_run
    assert data["schema"] == run.SCHEMA
    env = data["environment"]
    for key in ("device", "device_type", "torch", "cuda", "git_sha", "date", "python",
                "cpu", "cpu_count", "threads", "cpu_isa", "build_info"):
        assert key in env, key
    assert env["device_type"] == "cpu"
    # The machine: CPU model, threads, and the build of the CPU loops that ran.
    assert env["cpu"] and env["cpu"] in env["device"] and env["threads"] >= 1
    assert env["cpu_isa"] == env["build_info"]["cpu_isa"]
    # The generation behind a generic name: vendor, family and model read from cpuinfo.
    if os.path.exists("/proc/cpuinfo") and platform.machine() == "x86_64":
        cpu_id = env["cpu_id"]
        assert cpu_id["vendor"] and cpu_id["family"].isdigit() and cpu_id["model"].isdigit()
        assert run.cpu_generation(env) == f", family {cpu_id['family']} model {cpu_id['model']}"
    assert env["cpu_isa"] in (("avx512", "avx2", "baseline") if _ops.available() else (None,))
    assert env["torch"] == torch.__version__
    # The file name carries the device and the date.
    assert files[0].startswith("bench_cpu-") and env["date"][:4] in files[0]
    assert data["impls"] == IMPLS
    assert data["args"]["batch_sizes"] == run.QUICK_BATCHES
    rates = data["device_rates"]
    assert rates["copy_bytes_per_s"] > 0 and rates["matmul_flops_per_s"] > 0
    # First touch: both ways measured, the floor taking the faster.
    ways = {way: rates[f"first_touch_{way}_bytes_per_s"] for way in ("torch", "huge_pages")}
    assert rates["first_touch_way"] in ways
    assert rates["first_touch_bytes_per_s"] == max(ways.values()) > 0


def test_quick_run_measures_every_case(quick_run):
    _, _, data = quick_run
    assert {c["name"] for c in data["cases"]} == CASES
    rows = {(r["case"], r["batch"]): r for r in data["results"]}
    assert set(rows) == {(c, b) for c in CASES for b in run.QUICK_BATCHES}
    for (case, batch), row in rows.items():
        fl = row["floor"]
        assert fl["bytes"] > 0 and fl["flops"] > 0, case
        assert fl["time_s"] == max(fl["memory_s"], fl["compute_s"])
        # The floor divides by the rates probed in this row's own rounds (the CPU default).
        rates = row["floor_rates"]
        assert rates["measured"] == "alongside", (case, batch)
        assert fl["compute_s"] == pytest.approx(fl["flops"] / rates["matmul_flops_per_s"])
        assert fl["memory_s"] == pytest.approx(
            (fl["bytes"] - fl["fresh_bytes"]) / rates["copy_bytes_per_s"]
            + fl["fresh_bytes"] / rates["first_touch_bytes_per_s"])
        assert fl["bound"] in ("memory", "compute")
        assert set(row["impls"]) == set(IMPLS)
        # The baselines always run; every timed cell carries its statistics.
        if case in NO_MEDUSA:
            assert "skipped" in row["impls"]["medusa"]
            assert "speedup_vs_medusa" not in row["impls"]["reference"]
        for impl in ("reference",) if case in NO_MEDUSA else ("medusa", "reference"):
            cell = row["impls"][impl]
            assert "median_s" in cell, (case, batch, impl, cell)
            assert 0 < cell["min_s"] <= cell["q1_s"] <= cell["median_s"] <= cell["q3_s"]
            assert cell["q3_s"] <= cell["max_s"] and cell["repeats"] >= 3
            assert cell["GBps"] == pytest.approx(fl["bytes"] / cell["median_s"] / 1e9)
            assert cell["x_floor"] == pytest.approx(cell["median_s"] / fl["time_s"])
        if case not in NO_MEDUSA:
            assert row["impls"]["reference"]["speedup_vs_medusa"] == pytest.approx(
                row["impls"]["medusa"]["median_s"] / row["impls"]["reference"]["median_s"])
        ext = row["impls"]["flame_ext"]
        if _ops.available():
            assert "median_s" in ext, ext
        else:  # reported per cell, and the run went on
            assert "flame_ext" in ext["error"] and "median_s" not in ext


def test_quick_run_fits_landmarks(quick_run):
    _, _, data = quick_run
    fit = data["fit"]
    assert fit["frames"] == run.FIT_SIZE["quick"][0]
    results = {r["impl"]: r for r in fit["results"]}
    # flame_ext brings FlameShapeLandmark (the landmark-only decoder) into the fit.
    assert set(results) == set(IMPLS) | {"flame_ext_lmk"}
    for impl in ("medusa", "reference"):
        r = results[impl]
        assert r["frames_iters_per_s"] > 0 and r["seconds"] > 0
        assert r["final_lmk_error"] < r["initial_lmk_error"]
    # Same model, targets, start and optimiser: the two paths optimise the same thing.
    # Not bitwise (float32 sums in another order; Adam's first steps are lr * sign(g)),
    # hence a few percent.
    assert results["reference"]["final_lmk_error"] == pytest.approx(
        results["medusa"]["final_lmk_error"], rel=0.05)


def test_quick_run_writes_the_plot(quick_run):
    out, files, data = quick_run
    pytest.importorskip("matplotlib")
    png = data["files"]["png"]
    assert png is not None and os.path.basename(png) in files
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_shape_floor_counts_each_array_once():
    d = floor.ShapeDims(V=2, n_shape=1, n_expr=2, P=9, J=2)
    # model: shape_dirs 6x3, pose_dirs 9x6, v_template 6, lbs_weights 2x2, joints 6x3 + 6
    model = 18 + 54 + 6 + 4 + 18 + 6
    fwd = floor.shape_cost(d, 4, shared=False, backward=False, with_R=False)
    assert fwd.bytes == 4 * (model + 4 * (3 + 6) + 4 * 6)
    skin = 24 * 2 + 21
    assert fwd.flops == 2 * 4 * 6 * 3 + 4 * (2 * 6 * 9 + 2 * 6 * 3 + 2 * skin)
    with_R = floor.shape_cost(d, 4, shared=False, backward=False, with_R=True)
    assert with_R.bytes - fwd.bytes == 4 * 4 * 16 * 2 and with_R.flops == fwd.flops
    shared = floor.shape_cost(d, 4, shared=True, backward=False, with_R=False)
    assert shared.bytes == 4 * (model + 1 + 4 * (2 + 6) + 4 * 6)
    # 3 identity rows, one picked per frame: 3 shape rows, 4 int64 indices, 3 blends
    ids = floor.shape_cost(d, 4, shared=True, backward=False, with_R=False, identities=3)
    assert ids.bytes == shared.bytes + 4 * 2 * d.n_shape + 4 * floor.INDEX_BYTES
    assert ids.flops == shared.flops + 2 * 2 * 6 * d.n_shape
    both = floor.shape_cost(d, 4, shared=False, backward=True, with_R=False)
    assert both.bytes == 2 * fwd.bytes and both.flops == 2 * fwd.flops


def test_landmark_and_texture_floors():
    lmk = floor.landmark_cost(V=10, L=5, batch=2, backward=False)
    assert lmk.bytes == 4 * (2 * 5 * 9 + 2 * 5 * 3) + 5 * (4 * 8 + 3 * 4)
    back = floor.landmark_cost(V=10, L=5, batch=2, backward=True)
    # The backward writes the dense vertex gradient.
    assert back.bytes - lmk.bytes == 4 * (2 * 5 * 3 + 2 * 3 * 10) + 5 * (4 * 8 + 3 * 4)
    tex = floor.texture_cost(N=100, K=3, batch=2)
    assert tex.bytes == 4 * (300 + 100 + 6 + 200) and tex.flops == 2 * 2 * 100 * 3


def test_normals_floor():
    fwd = floor.normals_cost(V=10, F=16, batch=2, backward=False)
    # v in, n out (2 x 3V floats per sample), the faces and the adjacency once
    assert fwd.bytes == 2 * 2 * 30 * 4 + (6 * 16 + 11) * 8
    assert fwd.flops == 2 * (42 * 16 + 12 * 10)
    both = floor.normals_cost(V=10, F=16, batch=2, backward=True)
    assert both.bytes > fwd.bytes and both.flops > fwd.flops


def test_rate_probes_time_the_start_measurements_again():
    start = floor.measure_rates(torch.device("cpu"), quick=True)
    probes = floor.RateProbes(torch.device("cpu"), start, quick=True)
    # The copy, the matmul and the first touch the way the start found faster.
    assert set(probes.steps) == set(probes.budgets) == {
        "rate:copy", "rate:matmul", "rate:first_touch"}
    measured = timing.measure(probes.steps, torch.device("cpu"), repeats=3, budget_s=0.01,
                              budgets=probes.budgets)
    rates = probes.rates(measured)
    copy_bytes = 2 * start["copy_tensor_bytes"]
    assert rates["copy_bytes_per_s"] == copy_bytes / measured["rate:copy"]["min_s"]
    n = start["matmul_n"]
    assert rates["matmul_flops_per_s"] == 2 * n**3 / measured["rate:matmul"]["min_s"]
    assert rates["first_touch_bytes_per_s"] > 0
    # Each probe sampled on its own budget, not the steps' budget_s.
    for name, cell in measured.items():
        assert cell["repeats"] >= 3 and cell["calls_per_sample"] >= 1, name


def test_floor_time_takes_the_binding_resource():
    rates = {"copy_bytes_per_s": 1e9, "matmul_flops_per_s": 1e10}
    memory = floor.floor_time(floor.Cost(bytes=2e9, flops=1e9), rates)
    assert memory["time_s"] == pytest.approx(2.0) and memory["bound"] == "memory"
    compute = floor.floor_time(floor.Cost(bytes=1e6, flops=5e10), rates)
    assert compute["time_s"] == pytest.approx(5.0) and compute["bound"] == "compute"


def test_fresh_outputs_cost_the_first_touch_rate():
    """Outputs of 32 MiB and more are first-touched (fresh pages): with a first-touch rate
    they cost it, without one (CUDA) the copy rate; smaller outputs never do."""
    d = floor.ShapeDims(V=5023, n_shape=300, n_expr=100, P=36, J=5)
    small = floor.shape_cost(d, 16, shared=False, backward=False, with_R=True)
    assert small.fresh_bytes == 0
    big = floor.shape_cost(d, 256, shared=False, backward=False, with_R=True)
    assert big.fresh_bytes == 256 * 16 * 5023 * 4  # R; v (15 MB) stays below the threshold
    rates = {"copy_bytes_per_s": 1e10, "matmul_flops_per_s": 1e15}
    plain = floor.floor_time(big, rates)
    touched = floor.floor_time(big, dict(rates, first_touch_bytes_per_s=1e9))
    assert plain["time_s"] == pytest.approx(big.bytes / 1e10)
    expected = (big.bytes - big.fresh_bytes) / 1e10 + big.fresh_bytes / 1e9
    assert touched["time_s"] == pytest.approx(expected) and touched["bound"] == "memory"
    assert touched["first_touch_s"] == pytest.approx(big.fresh_bytes / 1e9)
    tex = floor.texture_cost(N=196608, K=50, batch=64)
    assert tex.fresh_bytes == 64 * 196608 * 4
    assert floor.texture_cost(N=196608, K=50, batch=16).fresh_bytes == 0


def _cell(median_s, **more):
    return {"median_s": median_s, **more}


def test_speed_checks_find_cliffs_floor_and_peer_misses():
    from flame_ext._bench import targets

    results = [
        {"case": "shape_fwd", "batch": 8, "impls": {"flame_ext": _cell(8e-3, x_floor=3.0)}},
        {"case": "shape_fwd", "batch": 16, "impls": {"flame_ext": _cell(14e-3, x_floor=1.4)}},
        # 1.2 ms -> 1.5 ms per sample: a cliff; 1.6x the floor at B >= 16: a miss.
        {"case": "shape_fwd", "batch": 24, "impls": {"flame_ext": _cell(36e-3, x_floor=1.6)}},
        {"case": "shape_fwd_R", "batch": 64, "impls": {"flame_ext": _cell(1.0, x_floor=1.25)}},
        {"case": "body_models_fwd", "batch": 1,
         "impls": {"flame_ext": _cell(1e-3, speedup_vs_body_models=3.5,
                                      speedup_vs_body_models_warp=2.0)}},
        {"case": "tex_fwd", "batch": 1, "impls": {"medusa": _cell(1.0)}},  # flame_ext absent
    ]
    found = targets.speed_checks(results)
    misses = found["misses"]
    assert len(misses["cliff"]) == 1 and "shape_fwd B=16->24" in misses["cliff"][0]
    assert len(misses["floor"]) == 1 and "shape_fwd B=24" in misses["floor"][0]
    assert len(misses["peer"]) == 1 and "body_models_warp" in misses["peer"][0]
    # B=8 is below the floor check's batches; shape_fwd_R is within its 1.3x.
    assert found["readings"] == {"cliff": 2, "floor": 3, "peer": 2}
    lines = targets.format_speed_checks(found)
    assert any("1 of 2" in line for line in lines)
    level = [dict(r, impls={"flame_ext": _cell(r["batch"] * 1e-3, x_floor=1.0)})
             for r in results[:3]]
    assert targets.speed_checks(level)["misses"] == {"cliff": [], "floor": [], "peer": []}


def test_summarize_and_rotation():
    stats = timing.summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert stats["median_s"] == 3.0 and (stats["q1_s"], stats["q3_s"]) == (2.0, 4.0)
    assert stats["spread"] == pytest.approx(2 / 3) and stats["repeats"] == 5
    assert stats["median_s"] == statistics.median([1, 2, 3, 4, 5])
    nxt = timing.rotating(["a", "b", "c"])
    assert [nxt() for _ in range(5)] == ["a", "b", "c", "a", "b"]
    cpu = torch.device("cpu")
    assert timing.input_set_count(10, cpu) == 8
    assert timing.input_set_count(2**40, cpu) == 2


def test_measure_interleaves_and_reports_failures():
    calls = []

    def fast():
        calls.append("fast")

    def slow():
        calls.append("slow")
        sum(range(2000))

    def broken():
        raise RuntimeError("no kernel")

    results = timing.measure({"fast": fast, "broken": broken, "slow": slow},
                             torch.device("cpu"), repeats=3, budget_s=0.01)
    assert list(results) == ["fast", "broken", "slow"]
    assert results["broken"] == {"error": "RuntimeError: no kernel"}
    for name in ("fast", "slow"):
        assert results[name]["repeats"] == 3 and results[name]["median_s"] > 0
        assert results[name]["first_call_s"] > 0 and results[name]["calls_per_sample"] >= 1
    # Sampling alternates between the steps instead of finishing one before the other.
    sampled = calls[-(results["fast"]["calls_per_sample"] * 3
                      + results["slow"]["calls_per_sample"] * 3):]
    switches = sum(a != b for a, b in zip(sampled, sampled[1:]))
    assert switches >= 3


@pytest.mark.parametrize("option, value", [
    ("--budget", "nan"), ("--budget", "inf"), ("--budget", "0"), ("--batch-sizes", "0"),
    ("--batch-sizes", "-1"), ("--batch-sizes", "100000000000"), ("--threads", "-3"),
    ("--device", "tpu"), ("--repeats", "0"), ("--fit-frames", "0"), ("--n-tex", "x"),
])
def test_bad_options_are_usage_errors_naming_the_option(option, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.parse_args([option, value])
    assert exit_info.value.code == 2
    assert f"argument {option}:" in capsys.readouterr().err


def test_unknown_case_names_the_cases(capsys):
    with pytest.raises(SystemExit, match="match no case.*shape_fwd"):
        run.main(["--cases", "bogus", "--model-path", "synthetic-small", "--no-fit"])


def _smplx_run(tmp_path, model_path, batches):
    code = run.main(["--quick", "--device", "cpu", "--model-path", model_path, "--cases", "smplx",
                     "--impls", "medusa", "smplx", "reference", "flame_ext", "--batch-sizes",
                     *map(str, batches), "--no-progress", "--no-plot", "--out", str(tmp_path)])
    assert code == 0
    (name,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    with open(tmp_path / name) as f:
        return json.load(f)


def test_smplx_cases_against_smplx(tmp_path):
    """The smplx cases time smplx.FLAME (its own column, the speed-ups read against it)
    and flame_ext.compat.smplx.FLAME on each backend, on the full-size synthetic model
    written in smplx's folder layout; medusa has no such layer."""
    pytest.importorskip("smplx")
    data = _smplx_run(tmp_path, "synthetic", [1])
    assert {c["name"] for c in data["cases"]} == {"smplx_fwd", "smplx_fwdbwd"}
    for row in data["results"]:
        cells = row["impls"]
        assert "medusa has no smplx layer" in cells["medusa"]["skipped"]
        for impl in ("smplx", "reference"):
            assert cells[impl]["median_s"] > 0, (row["case"], impl, cells[impl])
        assert cells["reference"]["speedup_vs_smplx"] == pytest.approx(
            cells["smplx"]["median_s"] / cells["reference"]["median_s"])
        if _ops.available():
            assert "speedup_vs_smplx" in cells["flame_ext"]


def test_smplx_cases_say_why_smplx_cannot_run(tmp_path):
    """On the small model (6 + 4 components) smplx.FLAME cannot run (it reads the
    expression columns at 300..400): its cells say so, the compat layer still runs; the
    other cases have no smplx column, and without the smplx implementation no smplx
    cases are built."""
    data = _smplx_run(tmp_path, "synthetic-small", [1])
    for row in data["results"]:
        assert "300 + 100 components" in row["impls"]["smplx"]["skipped"]
        assert row["impls"]["reference"]["median_s"] > 0
    models = cases.Models(torch.device("cpu"), "synthetic-small", 5)
    built = cases.build_cases(models, ["medusa", "smplx", "flame_ext"])
    shape = next(c for c in built if c.name == "shape_fwd")
    assert "own cases only" in shape.why_not("smplx", 1)
    names = [c.name for c in cases.build_cases(models, ["medusa", "reference"])]
    assert "smplx_fwd" not in names and "shape_fwd" in names


def test_body_models_inputs_are_flame_ext_inputs_in_its_layout():
    """body-models' FLAME takes the same values: global_pose as head_rotation, neck, jaw
    and the two eyes stacked as head_pose (B, 4, 3), as new leaves."""
    gen = torch.Generator().manual_seed(0)
    inputs = {"shape": torch.randn(3, 7, generator=gen), "expr": torch.randn(3, 5, generator=gen),
              **{name: torch.randn(3, 6 if name == "eye_pose" else 3, generator=gen)
                 for name in cases.POSE_NAMES}}
    mapped = peers.body_models_inputs(inputs, requires_grad=True)
    assert list(mapped) == ["shape", "expression", "head_rotation", "head_pose"]
    assert torch.equal(mapped["shape"], inputs["shape"])
    assert torch.equal(mapped["expression"], inputs["expr"])
    assert torch.equal(mapped["head_rotation"], inputs["global_pose"])
    assert mapped["head_pose"].shape == (3, 4, 3)
    for slot, expected in enumerate([inputs["neck_pose"], inputs["jaw_pose"],
                                     inputs["eye_pose"][:, :3], inputs["eye_pose"][:, 3:]]):
        assert torch.equal(mapped["head_pose"][:, slot], expected)
    assert all(v.is_leaf and v.requires_grad for v in mapped.values())
    assert not any(v.requires_grad for v in peers.body_models_inputs(inputs).values())


@pytest.fixture(scope="module")
def full_models():
    return cases.Models(torch.device("cpu"), "synthetic", 50)


def test_body_models_agrees_with_the_reference(full_models, monkeypatch):
    """On the full-size synthetic model (the file body-models reads, the arrays flame_ext
    reads) and the same parameters, body-models' vertices are the reference's to float32
    rounding; a pose in the wrong slot is caught by the same check, which the cases run
    before timing."""
    pytest.importorskip("body_models")
    layer = peers.body_models_layer(full_models, "body_models")
    assert peers.body_models_agreement(full_models, layer) <= peers.BODY_MODELS_RTOL

    real = peers.body_models_inputs

    def neck_and_jaw_swapped(inputs, requires_grad=False):
        mapped = real(inputs, requires_grad)
        mapped["head_pose"] = mapped["head_pose"][:, [1, 0, 2, 3]]
        return mapped

    monkeypatch.setattr(peers, "body_models_inputs", neck_and_jaw_swapped)
    assert peers.body_models_agreement(full_models, layer) > 100 * peers.BODY_MODELS_RTOL
    case = next(c for c in cases.build_cases(full_models, ["body_models"])
                if c.name == "body_models_fwd")
    with pytest.raises(ValueError, match="not the same computation"):
        case.runner("body_models", 1)


def _body_models_run(tmp_path, model_path):
    code = run.main(["--quick", "--device", "cpu", "--model-path", model_path,
                     "--cases", "body_models", "--impls", "medusa", "body_models",
                     "body_models_warp", "reference", "flame_ext", "--batch-sizes", "1",
                     "--no-progress", "--no-plot", "--out", str(tmp_path)])
    assert code == 0
    (name,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    with open(tmp_path / name) as f:
        return json.load(f)


def test_body_models_cases_in_quick_mode(tmp_path):
    """The body-models cases time its FLAME (torch kernels, and Warp's when installed)
    beside FlameShape on every backend, the speed-ups read against it."""
    pytest.importorskip("body_models")
    data = _body_models_run(tmp_path, "synthetic")
    assert {c["name"] for c in data["cases"]} == {"body_models_fwd", "body_models_fwdbwd"}
    try:
        import warp  # noqa: F401
        peers = ["body_models", "body_models_warp"]
    except ImportError:
        peers = ["body_models"]
    for row in data["results"]:
        cells = row["impls"]
        for impl in ["medusa", "reference"] + peers:
            assert cells[impl]["median_s"] > 0, (row["case"], impl, cells[impl])
        if "body_models_warp" not in peers:
            assert "pip install warp-lang" in cells["body_models_warp"]["skipped"]
        for impl in peers:
            assert cells["reference"][f"speedup_vs_{impl}"] == pytest.approx(
                cells[impl]["median_s"] / cells["reference"]["median_s"])
        if _ops.available():
            assert "speedup_vs_body_models" in cells["flame_ext"]


def test_body_models_cases_say_why_they_cannot_run(tmp_path, capsys):
    """On the small model (6 + 4 components) body-models' FLAME cannot run (it splits the
    basis at column 300), nor without body-models installed: the cells say which, the
    other columns still run; the peers stay out of the other cases."""
    data = _body_models_run(tmp_path, "synthetic-small")
    header = next(line for line in capsys.readouterr().out.splitlines()
                  if line.startswith("# flame_ext benchmark"))
    env = data["environment"]
    assert f"{env['cpu']} ({env['threads']} thread" in header
    if _ops.available():
        assert f"CPU loops: {env['cpu_isa']}" in header
    for row in data["results"]:
        for impl in ("body_models", "body_models_warp"):
            reason = row["impls"][impl]["skipped"]
            assert "300 shape columns" in reason or "not installed" in reason, reason
        assert row["impls"]["reference"]["median_s"] > 0
    models = cases.Models(torch.device("cpu"), "synthetic-small", 5)
    built = cases.build_cases(models, ["medusa", "body_models_warp", "flame_ext"])
    shape = next(c for c in built if c.name == "shape_fwd")
    assert "own cases only (body_models_*)" in shape.why_not("body_models_warp", 1)
    names = [c.name for c in cases.build_cases(models, ["medusa", "reference"])]
    assert "body_models_fwd" not in names


def test_body_models_status_says_what_is_missing(monkeypatch):
    """Without body-models, or without Warp, the cells name the package to install."""
    import sys

    models = cases.Models(torch.device("cpu"), "synthetic-small", 5)
    monkeypatch.setitem(sys.modules, "warp", None)  # import warp raises ImportError
    if importlib.util.find_spec("body_models") is not None:
        assert "pip install warp-lang" in peers.body_models_status(models, "body_models_warp")
    monkeypatch.setitem(sys.modules, "body_models.flame.torch", None)
    for impl in ("body_models", "body_models_warp"):
        assert "pip install body-models" in peers.body_models_status(models, impl)


@pytest.mark.skipif(not _ops.available(), reason="compiled ops not built")
def test_blend_cpu_sweep_prints_every_batch(capsys):
    """python -m flame_ext._bench.blend_cpu: one row per batch size, hand and BLAS times."""
    from flame_ext._bench import blend_cpu

    threads = torch.get_num_threads()
    try:
        assert blend_cpu.main(["--shapes", "shared", "--batch-sizes", "1", "5", "--threads",
                               "1", "--repeats", "3", "--budget", "0.01"]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.strip() and line.split()[0].isdigit()]
    assert [row[0] for row in rows] == ["1", "5"]
    assert all(len(row) == 9 and all(float(x) > 0 for x in row) for row in rows)


@pytest.mark.skipif(not _ops.available(), reason="compiled ops not built")
def test_skin_cpu_sweep_prints_every_batch(capsys):
    """python -m flame_ext._bench.skin_cpu: one row per batch size, four ops, each with
    the reference's time and the ratio."""
    from flame_ext._bench import skin_cpu

    threads = torch.get_num_threads()
    try:
        assert skin_cpu.main(["--batch-sizes", "1", "3", "--threads", "1", "--repeats", "3",
                              "--budget", "0.01"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "CPU loops " in out
    rows = [line.split() for line in out.splitlines()
            if line.strip() and line.split()[0].isdigit()]
    assert [row[0] for row in rows] == ["1", "3"]
    assert all(len(row) == 13 and all(float(x) > 0 for x in row) for row in rows)


@pytest.mark.skipif(not _ops.available(), reason="compiled ops not built")
def test_skin_cpu_sweep_runs_each_isa_in_its_own_process(capfd):
    from flame_ext._bench import skin_cpu

    assert skin_cpu.main(["--isa", "avx2", "baseline", "--batch-sizes", "2", "--threads",
                          "1", "--repeats", "3", "--budget", "0.01"]) == 0
    out = capfd.readouterr().out
    assert out.count("# CPU loops ") == 2 and "CPU loops baseline" in out
