"""AlexeyAB darknet ``[yolo]`` forward activations (YOLOv3/v4 output layers), float32, CHW."""

from __future__ import annotations

import numpy as np
from numba import njit

from ._config import JIT_OPTS
from .activations import _logistic_f32
from .conv import _check_f32, _check_int


@njit(**JIT_OPTS)
def _yolo(xf, of, num, classes, hw, alpha, beta, new_coords):
    """``forward_yolo_layer`` (CPU, batch 1, inference) on flat buffers."""
    ent = 4 + 1 + classes
    for i in range(xf.shape[0]):
        of[i] = xf[i]
    for n in range(num):
        base = n * ent * hw
        if not new_coords:
            # activate_array(x, y: 2*w*h, LOGISTIC) and (objectness + classes, LOGISTIC)
            for p in range(2 * hw):
                of[base + p] = _logistic_f32(of[base + p])
            for p in range(4 * hw, ent * hw):
                of[base + p] = _logistic_f32(of[base + p])
        # scal_add_cpu(2*w*h, scale_x_y, -0.5*(scale_x_y - 1)): x*ALPHA + BETA in float, not fused
        for p in range(2 * hw):
            of[base + p] = np.float32(of[base + p] * alpha) + beta


def yolo_activate(x: np.ndarray, *, num: int, classes: int, scale_x_y: float = 1.0,
                  new_coords: bool = False) -> np.ndarray:
    """AlexeyAB ``[yolo]`` forward activations.

    Per anchor ``n`` (``num`` = the layer's mask length) the channels ``n*(5+classes) + e`` hold
    ``e = 0, 1`` box x, y, ``e = 2, 3`` w, h (raw), ``e = 4`` objectness, ``e = 5 ..`` classes.
    Unless ``new_coords``, x, y, objectness and every class go through AlexeyAB's float32
    logistic; then x and y become ``v*scale_x_y + (-0.5*(scale_x_y - 1))``, the two constants
    rounded to float32 as darknet passes them, a float32 multiply then a float32 add.

    Parameters
    ----------
    x : ndarray, float32, shape (num*(5+classes), H, W)
    num, classes : int
    scale_x_y : float
    new_coords : bool
        Scaled-YOLOv4's coordinates: no logistic at all (the conv before applies it).

    Returns
    -------
    ndarray, float32, same shape as ``x``
        A new array.

    Raises
    ------
    ValueError
        Wrong type/dtype/dimensions or a channel count that does not match num and classes.
    """
    x = _check_f32("x", x, 3, "(C, H, W)")
    num = _check_int("num", num, 1)
    classes = _check_int("classes", classes, 0)
    c, h, w = x.shape
    if c != num * (5 + classes):
        raise ValueError(f"yolo: x must have num*(5+classes) = {num}*(5+{classes}) = {num * (5 + classes)} "
                         f"channels, got {c}")
    out = np.empty_like(x)
    alpha = np.float32(scale_x_y)
    # darknet: -0.5*(l.scale_x_y - 1): a float subtraction, a double product, passed as float
    beta = np.float32(-0.5 * float(np.float32(alpha - np.float32(1.0))))
    _yolo(x.reshape(-1), out.reshape(-1), num, classes, h * w, alpha, beta, bool(new_coords))
    return out
