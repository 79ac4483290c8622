"""Numba compute kernels for stealer: float32, CHW, one image, single-threaded, ``nogil``.

Public API::

    conv2d(x, weight, bias, *, stride=1, pad_top=0, pad_left=0, out_h=None, out_w=None,
           activation="linear", out=None, exact=True)
    maxpool2d(x, *, size, stride, pad_top=0, pad_left=0, out_h=None, out_w=None, out=None)
    reorg(x, stride)
    region_activate(x, *, num, coords, classes, softmax=True)
    activate(x, activation)            # in place

``conv2d`` (exact path) gives bit-identical results for any tiling of its output; see
:mod:`kernels.conv`. Invalid arguments raise ``ValueError`` naming what was expected and got.
"""

from __future__ import annotations

from .activations import ACT_LEAKY, ACT_LINEAR, ACT_LOGISTIC, ACT_NAMES, ACT_RELU, activate
from .conv import conv2d
from .pool import maxpool2d
from .region import region_activate
from .reorg import reorg

__all__ = [
    "ACT_LEAKY",
    "ACT_LINEAR",
    "ACT_LOGISTIC",
    "ACT_NAMES",
    "ACT_RELU",
    "activate",
    "conv2d",
    "maxpool2d",
    "region_activate",
    "reorg",
]
