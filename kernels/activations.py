"""Darknet activations, elementwise, float32 in and out, computed like darknet does.

Darknet's C code (``activations.h``) evaluates these formulas with C ``double`` constants, so the
arithmetic happens in double and is rounded once to float32 on return:

* linear:   ``x``
* leaky:    ``(x > 0) ? x : .1*x``   ->  ``float32(float64(x) * 0.1)`` for x <= 0
* logistic: ``1./(1. + exp(-x))``    ->  ``float32(1.0 / (1.0 + exp(-float64(x))))``
* relu:     ``max(x, 0)`` with the rule ``x <= 0 ? +0.0 : x`` (NaN passes through). Darknet's
  own ``x*(x>0)`` gives -0.0 for negative x; the two compare equal.

AlexeyAB darknet (the YOLOv3/v4 models, ``activations.h`` there) writes its activations with
``float`` constants and ``expf``/``logf``, so these are float32 arithmetic step by step:

* logistic_f32: ``1.f/(1.f + expf(-x))`` (the 2017 ``logistic`` above is done in double; the two
  differ in the last bit for some x, so each model family gets its own);
* relu6:    ``min(max(x, 0), 6)`` (AlexeyAB's CPU ``activate()`` has no case for RELU6 and
  returns 0, a bug; we follow the definition, as its GPU kernel does);
* swish_f32: ``x * logistic_f32(x)``;
* mish_f32: ``x * tanh_activate(softplus(x, 20))`` with ``softplus(x, t) = x if x > t, expf(x) if
  x < -t, else logf(expf(x) + 1)`` and ``tanh_activate(y) = 2/(1 + expf(-2*y)) - 1``, all float.

AlexeyAB's leaky in a conv layer is ``.1f*x`` in AVX blocks of 8 and ``.1*x`` (double) for the
last up-to-8 elements of the layer: position-dependent, which no tiling can reproduce. We keep the
double ``.1*x`` of its scalar path (and of 2017 darknet) everywhere.

ONNX imports (:mod:`stealer.onnx_import`) add, float32 step by step as onnxruntime evaluates it:

* hardswish: ONNX ``HardSwish``, ``x * max(0, min(1, alpha*x + beta))`` with alpha = 1/6 and
  beta = 0.5 rounded to float32: ``t = x*f32(1/6) + 0.5`` (two roundings, no fma), clamped to
  [0, 1], times ``x``.

Numba lowers ``math.exp``/``math.log`` of a float32 to the platform's ``expf``/``logf`` (what a
reference calls through ctypes), so the float32 formulas match bit for bit on one libm.

``exp`` is the platform libm's (what Numba's ``math.exp`` lowers to, and what Python's
``math.exp`` calls), so a reference written with ``math.exp`` matches bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._config import JIT_OPTS
from ._simd import (AVX512F, LANES, LANES16, vall_abs_below, vload, vload16, vlogistic_f32, vstore, vstore16,
                    vswish)

ACT_LINEAR = 0
ACT_LEAKY = 1
ACT_LOGISTIC = 2
ACT_RELU = 3
# AlexeyAB darknet's float32 activations have their own range of codes (and ``_f32`` names where
# a 2017 activation of the same cfg name exists), so a 2017 model's codes and names keep their
# meaning and an AlexeyAB formula is only ever chosen on purpose (by the cfg parser's flavour).
ACT_LOGISTIC32 = 8
ACT_RELU6 = 9
ACT_SWISH = 10
ACT_MISH = 11
# ONNX activations that fuse into a convolution (see the module docstring)
ACT_HARDSWISH = 12

#: 2017 darknet's activation names, indexed by their integer code.
ACT_NAMES = ("linear", "leaky", "logistic", "relu")
#: AlexeyAB darknet's float32 activations: name -> code.
ACT_F32_CODES = {"logistic_f32": ACT_LOGISTIC32, "relu6": ACT_RELU6, "swish_f32": ACT_SWISH, "mish_f32": ACT_MISH}
#: Activations of ONNX models with no darknet counterpart: name -> code.
ACT_ONNX_CODES = {"hardswish": ACT_HARDSWISH}
#: Every activation name the kernels accept.
ALL_ACT_NAMES = ACT_NAMES + tuple(ACT_F32_CODES) + tuple(ACT_ONNX_CODES)
#: AlexeyAB's softplus threshold inside mish (``MISH_THRESHOLD``).
MISH_THRESHOLD = np.float32(20.0)


def _act_code(activation) -> int:
    """Map an activation name or int code to the int code; ValueError otherwise."""
    codes = {**{n: i for i, n in enumerate(ACT_NAMES)}, **ACT_F32_CODES, **ACT_ONNX_CODES}
    if isinstance(activation, str):
        if activation in codes:
            return codes[activation]
    elif isinstance(activation, (int, np.integer)) and not isinstance(activation, (bool, np.bool_)):
        if int(activation) in codes.values():
            return int(activation)
    raise ValueError(f"activation must be one of {ALL_ACT_NAMES} or their codes "
                     f"{sorted(codes.values())}, got {activation!r}")


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


@njit(inline="always", **JIT_OPTS)
def _logistic_f32(v):
    """AlexeyAB ``logistic_activate``: ``1.f/(1.f + expf(-x))``, float32 throughout."""
    one = np.float32(1.0)
    return one / (one + math.exp(-v))


@njit(inline="always", **JIT_OPTS)
def _relu6_32(v):
    """``min_val_cmp(max_val_cmp(x, 0), 6)``: ``(x > 0 ? x : 0)`` then ``(m < 6 ? m : 6)``."""
    m = v if v > 0 else np.float32(0.0)
    return m if m < 6 else np.float32(6.0)


@njit(inline="always", **JIT_OPTS)
def _mish32(v):
    """AlexeyAB ``activate_array_mish`` for one value (float32 throughout)."""
    if v > MISH_THRESHOLD:
        sp = v
    elif v < -MISH_THRESHOLD:
        sp = math.exp(v)
    else:
        sp = math.log(math.exp(v) + np.float32(1.0))
    t = np.float32(2.0) / (np.float32(1.0) + math.exp(np.float32(-2.0) * sp)) - np.float32(1.0)
    return v * t


@njit(inline="always", **JIT_OPTS)
def _hardswish32(v):
    """ONNX ``HardSwish``: ``x * clamp(x * f32(1/6) + 0.5, 0, 1)``, float32 throughout."""
    t = v * np.float32(1.0 / 6.0) + np.float32(0.5)
    t = t if t > 0 else np.float32(0.0)
    t = t if t < 1 else np.float32(1.0)
    return v * t


@njit(inline="always", **JIT_OPTS)
def act_scalar(v, act):
    """One float32 value through activation code ``act`` (the scalar form every path shares)."""
    if act == ACT_LEAKY:
        return _leaky32(v)
    if act == ACT_LOGISTIC:
        return _logistic32(v)
    if act == ACT_RELU:
        return _relu32(v)
    if act == ACT_LOGISTIC32:
        return _logistic_f32(v)
    if act == ACT_RELU6:
        return _relu6_32(v)
    if act == ACT_SWISH:
        return v * _logistic_f32(v)
    if act == ACT_MISH:
        return _mish32(v)
    if act == ACT_HARDSWISH:
        return _hardswish32(v)
    return v


#: Below this magnitude expf takes its main path, which :func:`kernels._simd.vexpf` computes
#: (glibc's ``abstop < top12(88.0f)``); a block of 8 with any other value (large, inf, NaN) goes
#: through the libm's expf, element by element.
_EXPF_MAIN = np.float32(88.0)


@njit(inline="always", **JIT_OPTS)
def _expf_act_scalar(xf, i0, i1, swish):
    """Elements ``i0 .. i1-1`` through the libm's expf: a block with a value outside the vector
    main path, and the tail."""
    for j in range(i0, i1):
        xf[j] = xf[j] * _logistic_f32(xf[j]) if swish else _logistic_f32(xf[j])


@njit(**JIT_OPTS)
def _expf_act_flat(xf, swish, wide):
    """``x * _logistic_f32(x)`` (``swish``) or :func:`_logistic_f32` in place, vectors at a time
    with glibc's expf in vector form (the same bits as the libm's expf, see
    ``tests/test_kernels_paths.py``): the scalar libm call was 2.3 ns a value, a third of
    YOLOv8n's time. ``wide`` (AVX-512F targets): 16 lanes first (half the time of 8 on a
    Sapphire-Rapids-class Xeon), then 8; the function of each element is the same either way."""
    n = xf.shape[0]
    i = 0
    if wide:
        for i in range(0, n - n % LANES16, LANES16):
            v = vload16(xf, i)
            if vall_abs_below(v, _EXPF_MAIN):
                vstore16(xf, i, vswish(v) if swish else vlogistic_f32(v))
            else:
                _expf_act_scalar(xf, i, i + LANES16, swish)
        i = n - n % LANES16
    for i in range(i, n - n % LANES, LANES):
        v = vload(xf, i)
        if vall_abs_below(v, _EXPF_MAIN):
            vstore(xf, i, vswish(v) if swish else vlogistic_f32(v))
        else:
            _expf_act_scalar(xf, i, i + LANES, swish)
    _expf_act_scalar(xf, n - n % LANES, n, swish)


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
    # one loop per activation (the same scalar functions as act_scalar), so that each is compiled
    # on its own: the generic loop below re-dispatches per element and ran relu6 at 4 ns a value
    elif act == ACT_RELU6:
        for i in range(n):
            xf[i] = _relu6_32(xf[i])
    elif act == ACT_SWISH or act == ACT_LOGISTIC32:
        _expf_act_flat(xf, act == ACT_SWISH, AVX512F)
    elif act == ACT_HARDSWISH:
        for i in range(n):
            xf[i] = _hardswish32(xf[i])
    elif act != ACT_LINEAR:
        for i in range(n):
            xf[i] = act_scalar(xf[i], act)


def activate(x: np.ndarray, activation: str | int) -> np.ndarray:
    """Apply a darknet activation elementwise, in place.

    Parameters
    ----------
    x : ndarray, float32, any shape and memory layout
        Modified in place (non-contiguous arrays go through a contiguous copy that is written back).
    activation : one of :data:`ALL_ACT_NAMES` or its int code

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
