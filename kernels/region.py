"""Darknet 2017 ``[region]`` activations (YOLOv2 output layer), float32, CHW."""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._config import JIT_OPTS
from .activations import _logistic32
from .conv import _check_f32, _check_int

_NEG_FLT_MAX = np.float32(-np.finfo(np.float32).max)


@njit(**JIT_OPTS)
def _region(xf, of, num, coords, classes, hw, softmax):
    """Darknet's ``forward_region_layer`` (CPU, batch 1, no tree/background) on flat buffers."""
    ent = coords + 1 + classes
    for n in range(num):
        base = n * ent * hw
        # x, y (entries 0, 1) and objectness (entry coords): logistic; tw, th: raw copy
        for e in range(coords + 1):
            o = base + e * hw
            if e == 0 or e == 1 or e == coords:
                for p in range(hw):
                    of[o + p] = _logistic32(xf[o + p])
            else:
                for p in range(hw):
                    of[o + p] = xf[o + p]
        cb = base + (coords + 1) * hw
        if not softmax:
            # darknet: classes get the logistic when the layer has no softmax
            for i in range(classes * hw):
                of[cb + i] = _logistic32(xf[cb + i])
            continue
        for p in range(hw):
            # darknet softmax(): float largest/sum, exp in double stored to float
            largest = _NEG_FLT_MAX
            for i in range(classes):
                v = xf[cb + i * hw + p]
                if v > largest:
                    largest = v
            total = np.float32(0.0)
            for i in range(classes):
                # input/temp - largest/temp with temp = 1.0f: a float32 subtraction
                d = xf[cb + i * hw + p] - largest
                ev = np.float32(math.exp(np.float64(d)))
                total = np.float32(total + ev)
                of[cb + i * hw + p] = ev
            for i in range(classes):
                of[cb + i * hw + p] = np.float32(of[cb + i * hw + p] / total)


def region_activate(x: np.ndarray, *, num: int, coords: int, classes: int, softmax: bool = True) -> np.ndarray:
    """Darknet 2017 ``[region]`` forward activations.

    Per anchor ``n`` the channels ``n*(coords+1+classes) + e`` hold: ``e = 0, 1`` box x, y
    (logistic), ``e = 2 .. coords-1`` box w, h (raw), ``e = coords`` objectness (logistic),
    ``e = coords+1 ..`` class scores: softmax over the classes per anchor and pixel if
    ``softmax`` (darknet's float32 sum, exp in double), else the logistic (as darknet does when
    the cfg has no ``softmax``).

    Parameters
    ----------
    x : ndarray, float32, shape (num*(coords+1+classes), H, W)
    num : int
        Anchors (>= 1).
    coords : int
        Box coordinates per anchor (>= 2; YOLOv2 uses 4).
    classes : int
        >= 0.
    softmax : bool, default True

    Returns
    -------
    ndarray, float32, same shape as ``x``
        A new array; ``x`` is not modified.

    Raises
    ------
    ValueError
        Wrong type/dtype/dimensions or a channel count that does not match num, coords, classes.
    """
    x = _check_f32("x", x, 3, "(C, H, W)")
    num = _check_int("num", num, 1)
    coords = _check_int("coords", coords, 2)
    classes = _check_int("classes", classes, 0)
    c, h, w = x.shape
    if c != num * (coords + 1 + classes):
        raise ValueError(
            f"region: x must have num*(coords+1+classes) = {num}*({coords}+1+{classes}) = "
            f"{num * (coords + 1 + classes)} channels, got {c}"
        )
    out = np.empty_like(x)
    _region(x.reshape(-1), out.reshape(-1), num, coords, classes, h * w, bool(softmax))
    return out
