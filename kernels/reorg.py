"""Darknet 2017 ``[reorg]`` forward pass, float32, CHW."""

from __future__ import annotations

import numpy as np
from numba import njit

from ._config import JIT_OPTS
from .conv import _check_f32, _check_int


@njit(**JIT_OPTS)
def _reorg(xf, c, h, w, s, of):
    """Darknet's ``reorg_cpu(x, w, h, c, batch=1, stride, forward=0, out)``, loops unchanged
    except that the index arithmetic is hoisted: ``out[in_index] = x[out_index]``."""
    out_c = c // (s * s)
    for k in range(c):
        c2 = k % out_c
        offset = k // out_c
        for j in range(h):
            h2 = j * s + offset // s
            in_row = w * (j + h * k)
            out_row = w * s * (h2 + h * s * c2)
            for i in range(w):
                w2 = i * s + offset % s
                of[in_row + i] = xf[out_row + w2]


def reorg(x: np.ndarray, stride: int) -> np.ndarray:
    """Darknet 2017 ``[reorg]`` as its forward pass runs it.

    Darknet's ``forward_reorg_layer`` calls ``reorg_cpu(input, w, h, c, batch, stride, 0, output)``
    with the layer's *input* dims, i.e. the routine's backward direction::

        out_c = c / (stride*stride)
        for k < c, j < h, i < w:
            in_index  = i + w*(j + h*k)
            c2 = k % out_c;  offset = k / out_c
            w2 = i*stride + offset % stride;  h2 = j*stride + offset / stride
            out_index = w2 + w*stride*(h2 + h*stride*c2)
            out[in_index] = x[out_index]

    and the buffer is then read as (C*stride², H/stride, W/stride). This is *not* the textbook
    space-to-depth (``x.reshape(C, H/s, s, W/s, s).transpose(2, 4, 0, 1, 3)``); YOLOv2 weights
    were trained with this permutation, so it is reproduced exactly.

    Parameters
    ----------
    x : ndarray, float32, shape (C, H, W)
        C divisible by stride², H and W divisible by stride.
    stride : int
        >= 1.

    Returns
    -------
    ndarray, float32, shape (C*stride², H//stride, W//stride)
        A new array.

    Raises
    ------
    ValueError
        Wrong type/dtype/dimensions, stride < 1, or sizes not divisible as required.
    """
    x = _check_f32("x", x, 3, "(C, H, W)")
    s = _check_int("stride", stride, 1)
    c, h, w = x.shape
    if c < 1 or h < 1 or w < 1:
        raise ValueError(f"x must be non-empty, got shape {x.shape}")
    if c % (s * s):
        raise ValueError(f"reorg: C={c} must be divisible by stride**2={s * s}")
    if h % s or w % s:
        raise ValueError(f"reorg: H={h} and W={w} must be divisible by stride={s}")
    out = np.empty((c * s * s, h // s, w // s), np.float32)
    _reorg(x.reshape(-1), c, h, w, s, out.reshape(-1))
    return out
