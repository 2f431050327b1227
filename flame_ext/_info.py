"""`build_info()`: what the compiled library holds and which path each decoder takes;
`cpu_output_cache_info()` / `empty_cpu_output_cache()`: the blocks the CPU ops keep for
their large outputs."""

from __future__ import annotations

import torch

from . import _backend, _ops


def build_info() -> dict:
    """A dict describing the build and the runtime choice of kernels.

    Keys: ``extension_loaded`` and ``load_error``; ``cuda_compiled``, ``cuda_archs`` and
    ``built_with_torch`` (from the library); ``cpu_isa``: the instruction set the CPU
    loops run with in this process, 'avx512', 'avx2' or 'baseline' (csrc/cpu_isa.h: the
    widest the CPU has, or a narrower one named by $FLAME_EXT_CPU_ISA; each family with
    hand-vectorised loops runs it up to the widest build it compiled: blend AVX-512, skin
    AVX2), None without the library; ``torch`` and ``cuda_available`` (now);
    ``kernels``: for every op, whether a CPU and a CUDA kernel is registered;
    ``decoders``: for each decoder and device type, the path ``backend='auto'`` takes
    ('ext' or 'reference').
    """
    config = _ops.build_config()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "extension_loaded": _ops.available(),
        "load_error": _ops.load_error(),
        "cuda_compiled": bool(config["cuda"]),
        "cuda_archs": config["cuda_archs"],
        "built_with_torch": config["torch"],
        "cpu_isa": config["cpu_isa"],
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "kernels": {
            op: {key: _ops.has_kernel(op, key) for key in ("CPU", "CUDA")} for op in _ops.OPS
        },
        "decoders": {
            name: {device: _backend.resolve("auto", device, name) for device in devices}
            for name in _backend.DECODER_OPS
        },
    }


def cpu_output_cache_info() -> dict:
    """The blocks the CPU ops keep for reuse by their large outputs.

    A CPU output of 4 MiB or more (medusa's (B, V, 4, 4) R from B = 14, FlameTex images
    from B = 6, FlameShape's vertices from B = 70) is put on transparent huge pages, and
    when its tensor is freed the block is kept for the next output of about its size, so
    that a decoder called in a loop maps and zeroes those pages once instead of on every
    call (as torch's CUDA allocator keeps its blocks). At most ``limit_bytes`` are kept
    per process, the most recently freed blocks: 1 GiB, or $FLAME_EXT_CPU_OUTPUT_CACHE_MB
    MiB (a whole number, read once per process; 0 keeps none). Blocks are whole 2 MiB
    pages: an output just over 4 MiB takes 6 MiB. A forked child starts with none kept.
    Keys: ``cached_bytes``, ``cached_blocks``, ``limit_bytes``, ``reused`` (outputs that got a
    kept block) and ``mapped`` (outputs that got a new one), all 0 without the library or
    off Linux.
    """
    return _ops.cpu_output_cache_stats()


def empty_cpu_output_cache() -> int:
    """Frees the blocks `cpu_output_cache_info` counts; returns the bytes freed. Blocks of
    tensors still alive are not touched (they return to the cache when freed)."""
    return _ops.empty_cpu_output_cache()
