"""A dependency-free PNG writer (8-bit greyscale or truecolour, no imaging library)."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def save_png(path, image) -> Path:
    """Writes `image` (H, W, 3) or (H, W) as an 8-bit PNG; floats are read as 0..1
    (clipped), uint8 as is. Returns the path. Needs no imaging library."""
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise ValueError(f"image must have shape (H, W), (H, W, 1) or (H, W, 3), got {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image is empty: shape {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"image must be float (0..1) or uint8, got {array.dtype}")
        array = np.round(np.clip(np.nan_to_num(array), 0.0, 1.0) * 255).astype(np.uint8)
    height, width, channels = array.shape
    color_type = 2 if channels == 3 else 0  # truecolour or greyscale
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    # every scanline starts with its filter type; 0 = none
    rows = np.concatenate(
        [np.zeros((height, 1), np.uint8), array.reshape(height, width * channels)], axis=1
    )
    path = Path(os.fspath(path))
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + _png_chunk(b"IEND", b"")
    )
    path.write_bytes(data)
    return path
