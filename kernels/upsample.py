"""AlexeyAB darknet ``[upsample]`` (nearest neighbour), float32, CHW."""

from __future__ import annotations

import numpy as np
from numba import njit

from ._config import JIT_OPTS
from .conv import _check_f32, _check_int


@njit(**JIT_OPTS)
def _upsample(x, s, scale, out):
    """``upsample_cpu(forward=1)``: ``out[c, j, i] = scale * x[c, j / s, i / s]``, a float32 product."""
    c_n, h, w = x.shape
    for c in range(c_n):
        for j in range(h * s):
            for i in range(w * s):
                out[c, j, i] = scale * x[c, j // s, i // s]


def upsample2d(x: np.ndarray, stride: int, scale: float = 1.0) -> np.ndarray:
    """Nearest-neighbour upsampling by an integer ``stride``, times ``scale`` (AlexeyAB's layer).

    Parameters
    ----------
    x : ndarray, float32, shape (C, H, W)
    stride : int
        >= 1; the output is (C, H*stride, W*stride).
    scale : float
        Rounded to float32 first, as darknet's ``float scale``; 1 copies the values unchanged.

    Returns
    -------
    ndarray, float32, shape (C, H*stride, W*stride)

    Raises
    ------
    ValueError
        Wrong type, dtype or dimensions, empty ``x``, stride < 1.
    """
    x = _check_f32("x", x, 3, "(C, H, W)")
    s = _check_int("stride", stride, 1)
    c, h, w = x.shape
    if c < 1 or h < 1 or w < 1:
        raise ValueError(f"x must be non-empty, got shape {x.shape}")
    out = np.empty((c, h * s, w * s), np.float32)
    _upsample(x, s, np.float32(scale), out)
    return out
