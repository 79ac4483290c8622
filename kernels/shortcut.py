"""AlexeyAB darknet ``[shortcut]`` without weights: flat-buffer sum, then an activation."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from numba import njit

from ._config import JIT_OPTS
from .activations import _act_code, _activate_flat
from .conv import _check_f32


@njit(**JIT_OPTS)
def _add_prefix(of, af):
    """``of[i] += af[i]`` for ``i < min(len(of), len(af))`` (``shortcut_multilayer_cpu``'s
    ``if (src_i < add_outputs)``), one float32 addition per element."""
    n = min(of.shape[0], af.shape[0])
    for i in range(n):
        of[i] = of[i] + af[i]


def shortcut(x: np.ndarray, adds: Sequence[np.ndarray], activation: str | int = "linear") -> np.ndarray:
    """``act(x + adds[0] + adds[1] + ...)`` over the flat CHW buffers, left to right.

    Each added map contributes to the first ``min(x.size, add.size)`` elements of the flat
    buffer (so maps with other channel counts add over their common prefix, as darknet does);
    the output has ``x``'s shape.

    Parameters
    ----------
    x : ndarray, float32, shape (C, H, W)
        The previous layer's output.
    adds : sequence of float32 (C', H', W') arrays
        The ``from`` layers' outputs, in the cfg's order.
    activation : str or int code
        Applied after the sum (see :mod:`kernels.activations`).

    Returns
    -------
    ndarray, float32, same shape as ``x``
        A new array.

    Raises
    ------
    ValueError
        Wrong type, dtype or dimensions, no ``adds``, unknown activation.
    """
    x = _check_f32("x", x, 3, "(C, H, W)")
    act = _act_code(activation)
    if len(adds) < 1:
        raise ValueError("shortcut needs at least one map to add")
    out = x.copy()
    of = out.reshape(-1)
    for k, a in enumerate(adds):
        a = _check_f32(f"adds[{k}]", a, 3, "(C, H, W)")
        _add_prefix(of, a.reshape(-1))
    if act != 0:
        _activate_flat(of, act)
    return out
