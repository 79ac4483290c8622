"""Numba compute kernels for stealer: float32, CHW, one image, single-threaded, ``nogil``.

Public API::

    conv2d(x, weight, bias, *, stride=1, pad_top=0, pad_left=0, out_h=None, out_w=None,
           activation="linear", out=None, exact=True, dilation=1, groups=1)
    maxpool2d(x, *, size, stride, pad_top=0, pad_left=0, out_h=None, out_w=None, out=None)
    reorg(x, stride)
    region_activate(x, *, num, coords, classes, softmax=True)
    activate(x, activation)            # in place
    upsample2d(x, stride, scale=1.0)   # AlexeyAB [upsample]
    shortcut(x, adds, activation)      # AlexeyAB [shortcut] (no weights)
    yolo_activate(x, *, num, classes, scale_x_y=1.0, new_coords=False)
    connected(x, weight, bias, *, activation="linear", out=None)   # [connected]
    softmax(x, *, groups=1, temperature=1.0)                       # [softmax]

``conv2d`` (exact path) gives bit-identical results for any tiling of its output; see
:mod:`kernels.conv`. Invalid arguments raise ``ValueError`` naming what was expected and got.
"""

from __future__ import annotations

from .activations import (ACT_F32_CODES, ACT_HARDSWISH, ACT_LEAKY, ACT_LINEAR, ACT_LOGISTIC, ACT_LOGISTIC32, ACT_MISH,
                          ACT_NAMES, ACT_ONNX_CODES, ACT_RELU, ACT_RELU6, ACT_SWISH, ALL_ACT_NAMES, activate)
from .connected import connected
from .conv import conv2d
from .pool import maxpool2d
from .region import region_activate
from .reorg import reorg
from .shortcut import shortcut
from .softmax import softmax
from .upsample import upsample2d
from .yolo import yolo_activate

__all__ = [
    "ACT_F32_CODES",
    "ACT_HARDSWISH",
    "ACT_ONNX_CODES",
    "ACT_LEAKY",
    "ACT_LOGISTIC32",
    "ACT_MISH",
    "ACT_RELU6",
    "ACT_SWISH",
    "ALL_ACT_NAMES",
    "ACT_LINEAR",
    "ACT_LOGISTIC",
    "ACT_NAMES",
    "ACT_RELU",
    "activate",
    "connected",
    "conv2d",
    "maxpool2d",
    "region_activate",
    "reorg",
    "shortcut",
    "softmax",
    "upsample2d",
    "yolo_activate",
]
