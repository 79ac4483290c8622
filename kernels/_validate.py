"""Argument checks shared by the kernels' public functions (plain Python, run before compiled code)."""

from __future__ import annotations

import numpy as np


def output_array(out: np.ndarray | None, shape: tuple[int, ...], **inputs: np.ndarray) -> np.ndarray:
    """A float32 C-contiguous output of ``shape``: ``out`` after checking it, or a new array.

    ``out`` must not overlap any of ``inputs`` (named in the error), since the kernels read their
    inputs while writing the output.
    """
    if out is None:
        return np.empty(shape, np.float32)
    if not isinstance(out, np.ndarray) or out.dtype != np.float32:
        got = out.dtype if isinstance(out, np.ndarray) else type(out).__name__
        raise ValueError(f"out must be a float32 ndarray, got {got}")
    if out.shape != shape:
        raise ValueError(f"out shape must be {shape}, got {out.shape}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be C-contiguous and writeable")
    for name, a in inputs.items():
        if np.may_share_memory(out, a):
            raise ValueError(f"out must not overlap {name}")
    return out
