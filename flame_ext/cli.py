"""The `flame-ext` command (also `python -m flame_ext`).

    flame-ext info [--json] [--model-path P]   build, kernels per decoder, model files found
    flame-ext bench [ARGS...]                  the benchmark (its own --help; as python bench/run.py)
    flame-ext synth --out DIR [--size small]   the synthetic FLAME asset set, as files
    flame-ext render --out face.png [...]      a shaded mesh with its landmarks, as a PNG

`main(argv)` returns the exit status: 0 on success, 1 for an error the user can act on
(printed as one line, ``flame-ext: error: ...``, on stderr), 2 for a usage error
(argparse's own message and exit, raised as SystemExit).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

PROG = "flame-ext"

# Errors a user can act on (a missing or unsafe file, a bad value): one line, exit
# status 1. Anything else is a bug and keeps its traceback; so do these with
# FLAME_EXT_DEBUG=1.
_USER_ERRORS = (OSError, ValueError, TypeError, RuntimeError, ImportError,
                pickle.UnpicklingError)
DEBUG_VAR = "FLAME_EXT_DEBUG"


def _fail_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # warnings as one line each, without the source line python would quote
    text = " ".join(str(message).split())
    text = text[len("flame_ext: "):] if text.startswith("flame_ext: ") else text
    print(f"{PROG}: warning: {text}", file=file or sys.stderr)


# --------------------------------------------------------------------------------------
# info


def _model_files(model_path) -> dict:
    """Where each FLAME asset would be read from, or why it cannot be.

    Goes through the decoders' own discovery, so it reports exactly what a decoder
    constructed with this `model_path` would open.
    """
    from . import io

    report = {"model_path": None if model_path is None else str(model_path),
              "FLAME_EXT_DATA": os.environ.get(io.ENV_VAR) or None}
    try:
        report["data_dir"] = str(io.find_data_dir(model_path))
    except (FileNotFoundError, ValueError, TypeError) as err:
        report["data_dir"] = None
        report["data_dir_error"] = _fail_line(err)
    assets = {
        "model": (io.MODEL_FILE_NAMES, False),
        "landmarks_68": ((io.LANDMARK_FILE_NAMES["68"],), True),
        "landmarks_mp": ((io.LANDMARK_FILE_NAMES["mp"],), True),
        "texture": (io.TEXTURE_FILE_NAMES, False),
    }
    files = {}
    for key, (names, landmarks) in assets.items():
        try:
            where = io._locate(names, model_path, pkl_means_directory=key != "model",
                               landmarks=landmarks)
        except (FileNotFoundError, ValueError, TypeError) as err:
            files[key] = {"found": False, "error": _fail_line(err)}
            continue
        if isinstance(where, io._Synthetic):
            files[key] = {"found": True, "path": where.source, "synthetic": True}
        else:
            files[key] = {"found": True, "path": str(where)}
    report["files"] = files
    if files["model"].get("synthetic"):
        report["synthetic"] = files["model"]["path"].split(":", 1)[1]
        report.pop("data_dir_error", None)  # in memory: no directory to find
    return report


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _print_info(info: dict) -> None:
    build, models = info["build"], info["model_files"]
    print(f"flame_ext {info['version']} ({info['package_dir']})")
    if build["extension_loaded"]:
        print("compiled ops:  loaded")
    else:
        print(f"compiled ops:  NOT loaded: {build['load_error']}")
        print("               the decoders run on the pure-PyTorch reference (slower)")
    archs = build["cuda_archs"] or "-"
    print(f"CUDA kernels:  {'compiled for ' + archs if build['cuda_compiled'] else 'not compiled'}")
    built_with = build["built_with_torch"] or "-"
    print(f"torch:         {build['torch']} (extension built with {built_with}); "
          f"CUDA available: {_yes(build['cuda_available'])}")
    print("kernels registered:")
    width = max(len(op) for op in build["kernels"]) if build["kernels"] else 0
    print(f"  {'op':<{width}}  CPU  CUDA")
    for op, keys in build["kernels"].items():
        print(f"  {op:<{width}}  {_yes(keys['CPU']):<3}  {_yes(keys['CUDA'])}")
    print("decoders, backend='auto' takes:")
    for name, paths in build["decoders"].items():
        where = ", ".join(f"{device}: {path}" for device, path in paths.items())
        print(f"  {name:<14} {where}")
    print("model files:")
    print(f"  model_path:     {models['model_path'] or '(none: discovery)'}")
    print(f"  FLAME_EXT_DATA: {models['FLAME_EXT_DATA'] or '(not set)'}")
    errors = [models.get("data_dir_error")]
    errors += [entry.get("error") for entry in models["files"].values()]
    short, hint = _split_common_tail([e for e in errors if e])
    if models.get("synthetic"):
        print(f"  data directory: none: the {models['synthetic']} SYNTHETIC model, in "
              "memory (seeded random data, not a real face model)")
    elif models["data_dir"]:
        print(f"  data directory: {models['data_dir']}")
    else:
        print(f"  data directory: none: {short[models['data_dir_error']]}")
    for key, entry in models["files"].items():
        status = entry["path"] if entry["found"] else f"NOT FOUND: {short[entry['error']]}"
        print(f"  {key + ':':<15} {status}")
    if hint:
        print(f"  {hint}")


def _split_common_tail(messages):
    """({message: message without the sentences all share at their end}, those sentences).

    Every discovery error ends with the same advice; it is printed once.
    """
    split = [re.split(r"(?<=\.) ", m) for m in messages]
    tail = 0
    if len(split) > 1:
        while all(len(s) > tail + 1 for s in split):
            if len({tuple(s[-tail - 1:]) for s in split}) != 1:
                break
            tail += 1
    shortened = {m: " ".join(s[: len(s) - tail]) for m, s in zip(messages, split)}
    return shortened, " ".join(split[0][len(split[0]) - tail:]) if tail else ""


def _cmd_info(args) -> int:
    import flame_ext

    with warnings.catch_warnings():
        # build_info() reports the load error itself: no warning on top
        warnings.simplefilter("ignore", RuntimeWarning)
        build = flame_ext.build_info()
    info = {
        "version": flame_ext.__version__,
        "package_dir": str(Path(flame_ext.__file__).resolve().parent),
        "build": build,
        "model_files": _model_files(args.model_path),
    }
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        _print_info(info)
    return 0


# --------------------------------------------------------------------------------------
# bench


def _cmd_bench(argv: Sequence[str]) -> int:
    from ._bench import run

    status = run.main(list(argv), prog=f"{PROG} bench")
    return 0 if status is None else int(status)


# --------------------------------------------------------------------------------------
# synth


def _cmd_synth(args) -> int:
    from . import synthetic

    out = synthetic.write_assets(
        args.out, args.size, args.seed, chumpy=args.chumpy, n_tex=args.n_tex,
        texture_layout=args.texture_layout,
    )
    print(f"synthetic FLAME assets ({args.size}, seed {args.seed}) written to {out}:")
    for name in synthetic.ASSET_NAMES:
        path = out / name
        if path.is_file():
            print(f"  {name:<36} {path.stat().st_size / 2**20:9.1f} MiB")
    print(f"use them with model_path={str(out)!r} or FLAME_EXT_DATA={out}")
    return 0


# --------------------------------------------------------------------------------------
# render


def _load_params(path: str) -> dict:
    """FLAME parameters from a .json (name -> list of numbers) or .npz (name -> array)."""
    import numpy as np

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--params file {path!r} does not exist")
    if file.suffix.lower() == ".json":
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"--params {path}: not valid JSON ({err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"--params {path}: expected a JSON object name -> numbers")
        return {name: np.asarray(value, dtype=np.float64) for name, value in data.items()}
    if file.suffix.lower() == ".npz":
        with np.load(file, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    raise ValueError(f"--params must be a .json or .npz file, got {path!r}")


def _cmd_render(args) -> int:
    from .render import render_flame, save_png

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {args.out!r}")
    if not out.parent.exists():
        raise FileNotFoundError(f"--out: the directory {str(out.parent)!r} does not exist")
    parameters = _load_params(args.params) if args.params else None
    result = render_flame(
        args.model_path,
        seed=args.seed, parameters=parameters,
        shape_scale=args.shape_scale, expr_scale=args.expr_scale,
        yaw=args.yaw, pitch=args.pitch, roll=args.roll, jaw=args.jaw,
        lm_type=args.lm_type, texture=args.texture, n_tex=args.n_tex,
        tex_scale=args.tex_scale, size=args.size, camera=args.camera,
        supersample=args.supersample, backend=args.backend,
    )
    save_png(out, result.image)
    n = result.landmarks.shape[0]
    split = " (17 contour + 51 static)" if args.lm_type == "68" and n == 68 else ""
    print(f"{out}: {args.size}x{args.size}, {result.vertices.shape[0]} vertices, "
          f"{n} landmarks{split}")
    return 0


# --------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `flame-ext` and its subcommands."""
    from . import __version__
    from .render import CAMERAS, LANDMARK_TYPES

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="flame_ext: fast drop-in FLAME decoders (FlameShape, FlameLandmark, "
        "FlameTex). Inspect the build, benchmark, write synthetic assets, render a face.",
        epilog=f"'{PROG} COMMAND --help' describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"flame_ext {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    info = commands.add_parser(
        "info", help="build, kernels and model files",
        description="What was compiled (CUDA or not, for which archs, with which torch), "
        "which kernels each decoder uses, and where the FLAME files are found (or why not).",
    )
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--model-path", help="check this file/directory instead of discovery "
                      "('synthetic' / 'synthetic-small' for the synthetic model)")

    commands.add_parser(
        "bench", help="the benchmark ('bench --help' lists its options)",
        description="Forwards every argument to the benchmark (flame_ext/_bench/run.py).",
        add_help=False,
    )

    synth = commands.add_parser(
        "synth", help="write the synthetic FLAME asset set as files",
        description="Writes the seeded synthetic FLAME asset set in the real file formats "
        "(generic_model.pkl, landmark_embedding.npy, mediapipe_landmark_embedding.npz, "
        "FLAME_albedo_from_BFM.npz, FLAME_texture.npz). The full-size textures are ~1.9 GB "
        "with all components: --n-tex 50 keeps them small.",
    )
    synth.add_argument("--out", required=True, help="output directory (created)")
    synth.add_argument("--size", choices=("full", "small"), default="full",
                       help="'full': FLAME's dimensions; 'small': a few dozen vertices")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--chumpy", action="store_true",
                       help="pickle arrays as chumpy objects, as the official model file does")
    synth.add_argument("--n-tex", type=int, default=None,
                       help="texture components written (default: all, as the real files)")
    synth.add_argument("--texture-layout", choices=("flat", "image"), default="flat",
                       help="FLAME_albedo_from_BFM.npz arrays flat (as published) or image-shaped")

    render = commands.add_parser(
        "render", help="draw a shaded mesh with its landmarks (PNG)",
        description="Decodes one face (random or given parameters) with flame_ext's "
        "decoders and draws it with a small software rasteriser: Lambert-shaded mesh, "
        "landmarks on top (68: contour points blue, static red; mp: 105 green), "
        "optionally the albedo texture. No GPU or display needed.",
    )
    render.add_argument("--out", default="face.png", help="output PNG (default face.png)")
    render.add_argument("--model-path", help="FLAME file or directory; 'synthetic' or "
                        "'synthetic-small' for the synthetic model (default: discovery)")
    render.add_argument("--seed", type=int, default=0, help="seed of the random parameters")
    render.add_argument("--params", help=".json or .npz with any of shape, expr, global_pose, "
                        "neck_pose, jaw_pose, eye_pose (shorter vectors are zero-padded)")
    render.add_argument("--shape-scale", type=float, default=1.0,
                        help="std of the random shape coefficients (default 1)")
    render.add_argument("--expr-scale", type=float, default=0.5,
                        help="std of the random expression coefficients (default 0.5)")
    render.add_argument("--yaw", type=float, default=0.0,
                        help="head yaw, degrees (positive: towards the subject's left)")
    render.add_argument("--pitch", type=float, default=0.0,
                        help="head pitch, degrees (positive: down)")
    render.add_argument("--roll", type=float, default=0.0, help="head roll, degrees")
    render.add_argument("--jaw", type=float, default=0.0,
                        help="jaw opening, radians (e.g. 0.2)")
    render.add_argument("--lm-type", choices=LANDMARK_TYPES, default="68",
                        help="landmarks drawn: 68 (iBUG), mp (105 MediaPipe) or none")
    render.add_argument("--texture", action="store_true",
                        help="paint a random albedo (needs the texture space and UVs)")
    render.add_argument("--n-tex", type=int, default=50, help="texture components (default 50)")
    render.add_argument("--tex-scale", type=float, default=1.0,
                        help="std of the random texture coefficients (default 1)")
    render.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    render.add_argument("--camera", choices=CAMERAS, default="perspective")
    render.add_argument("--supersample", type=int, default=2,
                        help="render at this factor and average, for smooth edges (default 2)")
    render.add_argument("--backend", choices=("auto", "ext", "reference", "medusa"),
                        default="auto", help="decoder path (default auto)")
    return parser


_HANDLERS = {"info": _cmd_info, "synth": _cmd_synth, "render": _cmd_render}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs `flame-ext` with `argv` (default sys.argv[1:]); returns the exit status.

    Usage errors raise SystemExit(2) through argparse, as --help and --version raise
    SystemExit(0).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            if argv and argv[0] == "bench":
                # everything after 'bench' is the benchmark's, --help included
                return _cmd_bench(argv[1:])
            args = build_parser().parse_args(argv)
            return _HANDLERS[args.command](args)
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except _USER_ERRORS as err:
            if os.environ.get(DEBUG_VAR, "") not in ("", "0"):
                raise
            print(f"{PROG}: error: {_fail_line(err)}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
