"""Argument checks shared by the decoders, the op wrappers and the command lines.

Every check raises where the bad value enters, with the argument's name and what was
expected versus what was received (docs/SPEC.md section 5). The command lines' option
types (`count_option`, `positive_option`, `device_option`) are argparse `type`s: argparse
names the option in their message.
"""

from __future__ import annotations

import argparse
import math
import numbers
from typing import Optional, Sequence

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.float64)


def check_tensor(
    name: str,
    value,
    *,
    ndim: Optional[int] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    dtype=None,
    device: Optional[torch.device] = None,
    floating: bool = False,
) -> torch.Tensor:
    """Checks that `value` is a tensor of the given rank, shape, dtype and device.

    `shape` entries that are None match any size. `dtype` may be one dtype or a tuple.
    `floating=True` requires float32 or float64. Returns the tensor unchanged.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    # Sparse and nested tensors have no kernels here; caught before their shape is read
    # (a nested tensor's raises an internal error).
    if value.is_nested:
        raise TypeError(f"{name} must be a dense tensor, got a nested tensor")
    if value.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {value.layout}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and value.dim() != ndim:
        raise ValueError(
            f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}"
        )
    if shape is not None:
        for want, got in zip(shape, value.shape):
            if want is not None and want != got:
                expected = ", ".join("*" if s is None else str(s) for s in shape)
                expected += "," if len(shape) == 1 else ""
                raise ValueError(
                    f"{name} must have shape ({expected}), got {tuple(value.shape)}"
                )
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {value.dtype}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        if value.dtype not in allowed:
            names = " or ".join(str(d) for d in allowed)
            raise TypeError(f"{name} must have dtype {names}, got {value.dtype}")
    if device is not None and value.device != torch.device(device):
        raise ValueError(f"{name} must be on {device}, got {value.device}")
    return value


def check_same(name: str, value: torch.Tensor, like: torch.Tensor, like_name: str,
               dtype: bool = True):
    """Checks that `value` has the dtype (unless dtype=False) and device of `like`."""
    if dtype and value.dtype != like.dtype:
        raise TypeError(
            f"{name} has dtype {value.dtype} but {like_name} has {like.dtype}; "
            "they must match"
        )
    if value.device != like.device:
        raise ValueError(
            f"{name} is on {value.device} but {like_name} is on {like.device}; "
            "they must be on the same device"
        )
    return value


def check_count(name: str, value, low: int, high: int) -> int:
    """Checks that `value` is an integer (an int or a numpy integer, not a bool) with
    low <= value <= high; returns it as an int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return int(value)


def check_finite(name: str, value) -> float:
    """Checks that `value` is a real, finite number (not a bool; a 0-d numpy array or
    tensor of a real dtype is one); returns it as a float."""
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
        is_real = (value.dtype.kind in "iuf" if isinstance(value, np.ndarray)
                   else not (value.is_complex() or value.dtype == torch.bool))
        if is_real:
            value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def count_option(low: int, high: int):
    """An argparse type: an int in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        return value

    return parse


def positive_option(text: str) -> float:
    """An argparse type: a finite number above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def device_option(text: str) -> str:
    """An argparse type: 'cpu', 'cuda' or 'cuda:N'."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


# `_index_tables` bound of a kinematic tree's parents: parents[0] = -1, 0 <= parents[j] < j.
TREE = "tree"


def check_index_table(name: str, table: torch.Tensor, upper) -> None:
    """An index table's values: integers in [0, upper), or (upper=TREE) the parents of a
    kinematic tree. TypeError / ValueError naming `name`; one host read of the values."""
    if table.is_floating_point() or table.is_complex() or table.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer indices, got dtype {table.dtype}")
    if table.numel() == 0:
        return
    values = table.detach().reshape(-1).to("cpu", torch.int64)
    if upper == TREE:
        joints = torch.arange(values.numel())
        bad = torch.nonzero(((values < 0) | (values >= joints))[1:]).flatten()
        if int(values[0]) != -1 or bad.numel():
            j = 0 if int(values[0]) != -1 else int(bad[0]) + 1
            raise ValueError(f"{name} must be a kinematic tree (parents[0] = -1, "
                             f"0 <= parents[j] < j), got parents[{j}] = {int(values[j])}")
        return
    low, high = (int(x) for x in torch.aminmax(values))
    if low < 0 or high >= upper:
        raise ValueError(f"{name} holds index {low if low < 0 else high}, out of range for "
                         f"{upper} entries")


def refuse_bad_loaded_indices(module, state_dict, prefix, *_args) -> None:
    """load_state_dict pre-hook: the module's index tables (its `_index_tables(get)`:
    (name, bound) pairs, bound an int or TREE) as the state dict would leave them, checked
    before anything is copied, so that a bad table is refused at the load, not at the next
    forward. A table missing from the state dict, or of another shape (which
    load_state_dict reports itself), is read from the module. Module-level, so the
    modules pickle."""

    def get(name: str) -> torch.Tensor:
        current = getattr(module, name)
        incoming = state_dict.get(prefix + name)
        if isinstance(incoming, torch.Tensor) and incoming.shape == current.shape:
            return incoming
        return current

    for name, bound in module._index_tables(get):
        check_index_table(f"state_dict entry {prefix + name!r}", get(name), bound)
