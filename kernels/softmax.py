"""2017 darknet ``[softmax]`` (no tree): darknet's ``softmax`` over ``groups`` flat chunks."""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._config import JIT_OPTS

_NEG_FLT_MAX = np.float32(-np.finfo(np.float32).max)


@njit(**JIT_OPTS)
def _softmax(xf, of, n, groups, temp):
    """``blas.c softmax`` per chunk: float32 ``largest`` and ``sum``, ``e = exp(in/temp -
    largest/temp)`` with float32 divisions and subtraction and the double ``exp``, stored as
    float32; then each ``e / sum`` in float32."""
    for g in range(groups):
        base = g * n
        largest = _NEG_FLT_MAX
        for i in range(n):
            if xf[base + i] > largest:
                largest = xf[base + i]
        total = np.float32(0.0)
        lt = largest / temp
        for i in range(n):
            d = xf[base + i] / temp - lt
            e = np.float32(math.exp(np.float64(d)))
            total = np.float32(total + e)
            of[base + i] = e
        for i in range(n):
            of[base + i] = np.float32(of[base + i] / total)


def softmax(x: np.ndarray, *, groups: int = 1, temperature: float = 1.0) -> np.ndarray:
    """Darknet's softmax over each of ``groups`` consecutive chunks of ``x``'s flat (C order) values.

    Parameters
    ----------
    x : ndarray, float32, any shape; its size must be a multiple of ``groups``
    groups : int, default 1
    temperature : float, default 1.0 (as a float32, non-zero)

    Returns
    -------
    ndarray, float32, the shape of ``x`` (a new array)

    Raises
    ------
    ValueError
        Not a float32 array, groups not dividing its size, a zero temperature.
    """
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise ValueError(f"x must be a float32 numpy.ndarray, got {getattr(x, 'dtype', type(x).__name__)}")
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1 or x.size % groups:
        raise ValueError(f"groups must be an int >= 1 dividing x's {x.size} values, got {groups!r}")
    temp = np.float32(temperature)
    if temp == 0 or not np.isfinite(temp):
        raise ValueError(f"temperature must be finite and non-zero, got {temperature!r}")
    xf = np.ascontiguousarray(x).reshape(-1)
    out = np.empty(x.shape, np.float32)
    _softmax(xf, out.reshape(-1), x.size // int(groups), int(groups), temp)
    return out
