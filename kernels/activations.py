"""Darknet activations, elementwise, float32 in and out, computed like darknet does.

Darknet's C code (``activations.h``) evaluates these formulas with C ``double`` constants, so the
arithmetic happens in double and is rounded once to float32 on return:

* linear:   ``x``
* leaky:    ``(x > 0) ? x : .1*x``   ->  ``float32(float64(x) * 0.1)`` for x <= 0
* logistic: ``1./(1. + exp(-x))``    ->  ``float32(1.0 / (1.0 + exp(-float64(x))))``
* relu:     ``max(x, 0)`` with the rule ``x <= 0 ? +0.0 : x`` (NaN passes through). Darknet's
  own ``x*(x>0)`` gives -0.0 for negative x; the two compare equal.

``exp`` is the platform libm's (what Numba's ``math.exp`` lowers to, and what Python's
``math.exp`` calls), so a reference written with ``math.exp`` matches bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._config import JIT_OPTS

ACT_LINEAR = 0
ACT_LEAKY = 1
ACT_LOGISTIC = 2
ACT_RELU = 3

#: Activation names accepted by the kernels, indexed by their integer code.
ACT_NAMES = ("linear", "leaky", "logistic", "relu")


def _act_code(activation) -> int:
    """Map an activation name or int code to the int code; ValueError otherwise."""
    if isinstance(activation, str):
        try:
            return ACT_NAMES.index(activation)
        except ValueError:
            raise ValueError(f"activation must be one of {ACT_NAMES} or 0..3, got {activation!r}") from None
    if isinstance(activation, (int, np.integer)) and not isinstance(activation, (bool, np.bool_)):
        if 0 <= int(activation) < len(ACT_NAMES):
            return int(activation)
    raise ValueError(f"activation must be one of {ACT_NAMES} or 0..3, got {activation!r}")


@njit(inline="always", **JIT_OPTS)
def _logistic32(v):
    """Darknet ``logistic_activate`` in double, rounded to float32."""
    return np.float32(1.0 / (1.0 + math.exp(-np.float64(v))))


@njit(inline="always", **JIT_OPTS)
def _leaky32(v):
    """Darknet ``leaky_activate``: ``.1*x`` is a double product, rounded once to float32."""
    return v if v > 0 else np.float32(np.float64(v) * 0.1)


@njit(inline="always", **JIT_OPTS)
def _relu32(v):
    return np.float32(0.0) if v <= 0 else v


@njit(**JIT_OPTS)
def _activate_flat(xf, act):
    """In-place activation of a 1-D contiguous float32 array."""
    n = xf.shape[0]
    if act == ACT_LEAKY:
        for i in range(n):
            xf[i] = _leaky32(xf[i])
    elif act == ACT_LOGISTIC:
        # exp is scalar libm here (no SVML on our targets); every element goes through the same
        # call, so results do not depend on the element's position.
        for i in range(n):
            xf[i] = _logistic32(xf[i])
    elif act == ACT_RELU:
        for i in range(n):
            xf[i] = _relu32(xf[i])


def activate(x: np.ndarray, activation: str | int) -> np.ndarray:
    """Apply a darknet activation elementwise, in place.

    Parameters
    ----------
    x : ndarray, float32, any shape and memory layout
        Modified in place (non-contiguous arrays go through a contiguous copy that is written back).
    activation : {"linear", "leaky", "logistic", "relu"} or int code 0..3

    Returns
    -------
    ndarray
        ``x`` itself.

    Raises
    ------
    ValueError
        ``x`` is not a float32 ndarray, is read-only, or the activation is unknown.
    """
    if not isinstance(x, np.ndarray):
        raise ValueError(f"x must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise ValueError(f"x must be float32, got {x.dtype}")
    if not x.flags.writeable:
        raise ValueError("x must be writeable (activate works in place)")
    act = _act_code(activation)
    if act == ACT_LINEAR or x.size == 0:
        return x
    if x.flags.c_contiguous or x.flags.f_contiguous:
        # ravel(order="K") of a C- or F-contiguous array is a view of its memory in storage order
        _activate_flat(x.ravel(order="K"), act)
    else:
        tmp = np.ascontiguousarray(x)
        _activate_flat(tmp.reshape(-1), act)
        x[...] = tmp
    return x
