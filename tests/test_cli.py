"""The `flame-ext` command: every subcommand through main([...]), error lines and exit
statuses, and one real `python -m flame_ext` process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flame_ext import cli, load_flame_model

ROOT = Path(__file__).resolve().parent.parent


def _error_line(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("flame-ext: warning:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("flame-ext: error: ")
    return lines[0]


def test_info_json_parses_and_reports_build_and_files(capsys):
    assert cli.main(["info", "--json", "--model-path", "synthetic-small"]) == 0
    info = json.loads(capsys.readouterr().out)
    build = info["build"]
    assert isinstance(build["extension_loaded"], bool)
    assert set(build["decoders"]) == {
        "FlameShape", "FlameLandmark", "FlameTex", "FlameShapeLandmark"
    }
    assert build["decoders"]["FlameShape"]["cpu"] in ("ext", "reference")
    files = info["model_files"]["files"]
    assert set(files) == {"model", "landmarks_68", "landmarks_mp", "texture"}
    assert all(entry["found"] and entry["synthetic"] for entry in files.values())
    assert info["model_files"]["synthetic"] == "small"


def test_info_reports_files_in_a_directory_and_why_not(tmp_path, capsys):
    assert cli.main(["synth", "--out", str(tmp_path), "--size", "small"]) == 0
    (tmp_path / "mediapipe_landmark_embedding.npz").unlink()
    capsys.readouterr()
    assert cli.main(["info", "--json", "--model-path", str(tmp_path)]) == 0
    models = json.loads(capsys.readouterr().out)["model_files"]
    assert models["data_dir"] == str(tmp_path)
    assert models["files"]["model"]["path"] == str(tmp_path / "generic_model.pkl")
    missing = models["files"]["landmarks_mp"]
    assert not missing["found"] and "mediapipe_landmark_embedding.npz" in missing["error"]

    assert cli.main(["info", "--model-path", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "compiled ops:" in text and "FlameLandmark" in text
    assert f"data directory: {tmp_path}" in text
    assert "landmarks_mp:   NOT FOUND" in text


def test_info_without_any_data_says_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FLAME_EXT_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.medusa_ext_data here
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "model:          NOT FOUND" in text
    assert ".medusa_ext_data" in text and "FLAME_EXT_DATA" in text


def test_synth_writes_loadable_assets(tmp_path, capsys):
    out = tmp_path / "assets"
    assert cli.main(["synth", "--out", str(out), "--size", "small", "--seed", "4", "--chumpy"]) == 0
    assert "generic_model.pkl" in capsys.readouterr().out
    model = load_flame_model(out)
    assert model.v_template.shape == (67, 3)
    raw = (out / "generic_model.pkl").read_bytes()
    assert b"chumpy.ch" in raw  # written as the official file is


def test_render_writes_a_png(tmp_path, capsys):
    out = tmp_path / "face.png"
    argv = ["render", "--model-path", "synthetic-small", "--out", str(out), "--size", "48",
            "--yaw", "15", "--jaw", "0.2", "--lm-type", "mp", "--seed", "2"]
    assert cli.main(argv) == 0
    assert "105 landmarks" in capsys.readouterr().out
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(data[16:20], "big") == 48 and int.from_bytes(data[20:24], "big") == 48


def test_render_with_params_file(tmp_path, capsys):
    params = tmp_path / "p.json"
    params.write_text(json.dumps({"shape": [1.0, -0.5], "jaw_pose": [0.2, 0, 0]}))
    out = tmp_path / "f.png"
    assert cli.main(["render", "--model-path", "synthetic-small", "--out", str(out),
                     "--size", "32", "--params", str(params)]) == 0
    assert out.is_file()
    npz = tmp_path / "p.npz"
    np.savez(npz, expr=np.ones(2), bogus=np.ones(1))
    assert cli.main(["render", "--model-path", "synthetic-small", "--out", str(out),
                     "--params", str(npz)]) == 1
    assert "unknown parameter(s) ['bogus']" in _error_line(capsys)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["render", "--model-path", "/no/such/dir", "--out", "{tmp}/x.png"], "does not exist"),
        (["render", "--model-path", "synthetic-small", "--out", "{tmp}/x.jpg"], ".png"),
        (["render", "--model-path", "synthetic-small", "--out", "{tmp}/nodir/x.png"], "nodir"),
        (["render", "--model-path", "synthetic-small", "--out", "{tmp}/x.png", "--texture"],
         "n_tex"),
        (["render", "--model-path", "synthetic-small", "--out", "{tmp}/x.png", "--params",
          "{tmp}/none.json"], "none.json"),
        (["synth", "--out", "{tmp}/s", "--size", "small", "--seed", "-1"], "seed"),
    ],
)
def test_errors_are_one_line_with_status_1(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(argv) == 1
    assert message in _error_line(capsys)


def test_debug_variable_keeps_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv(cli.DEBUG_VAR, "1")
    with pytest.raises(FileNotFoundError):
        cli.main(["render", "--model-path", str(tmp_path / "missing"),
                  "--out", str(tmp_path / "x.png")])


@pytest.mark.parametrize(
    "argv", [[], ["paint"], ["render", "--lm-type", "5"], ["synth"], ["render", "--size", "x"]]
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "usage: flame-ext" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["info"], ["synth"], ["render"]])
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(command + ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: flame-ext")
    if command == ["render"]:
        assert "--lm-type" in out and "--texture" in out and "--yaw" in out


def test_bench_forwards_arguments(monkeypatch):
    from flame_ext._bench import run

    seen = {}

    def fake_main(argv=None, prog=None):
        seen.update(argv=argv, prog=prog)
        return 3

    monkeypatch.setattr(run, "main", fake_main)
    assert cli.main(["bench", "--quick", "--help"]) == 3
    assert seen == {"argv": ["--quick", "--help"], "prog": "flame-ext bench"}


def test_bench_runs_from_an_installed_copy(tmp_path):
    """The benchmark ships in the package: `flame-ext bench` needs no source checkout.
    A copy of the package outside the checkout lists the cases and names itself."""
    import shutil

    import flame_ext

    package = Path(flame_ext.__file__).resolve().parent
    shutil.copytree(package, tmp_path / "flame_ext", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-m", "flame_ext", "bench", "--list"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "shape_fwd" in done.stdout and "lmk68_fwd" in done.stdout
    done = subprocess.run(
        [sys.executable, "-c", "from flame_ext._bench import run; "
         "print(run.CHECKOUT, run.DEFAULT_OUT)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.stdout.split() == ["None", "flame_ext_bench_results"], done.stderr


def test_python_dash_m_help():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, "-m", "flame_ext", "--help"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: flame-ext")
    for command in ("info", "bench", "synth", "render"):
        assert command in done.stdout
