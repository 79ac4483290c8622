"""Slow, obviously-right references for the kernels in :mod:`kernels`.

Plain Python loops and numpy, written straight from the definitions (and, where the kernels
reproduce darknet, from darknet's C code), with no attempt at speed. Sums are accumulated in
float64 where a rounding-free sum is the obviously-right thing; darknet's float32 steps (softmax)
are kept in float32 because the kernel must reproduce them bit for bit.
"""

from __future__ import annotations

import math

import numpy as np

FLT_MAX = float(np.finfo(np.float32).max)


# ----------------------------------------------------------------------------------------------
# Activations: darknet evaluates them in double (C double constants) and returns float.
# ----------------------------------------------------------------------------------------------


def _exp(v: float) -> float:
    """libm exp in double; C returns +inf on overflow where Python raises."""
    try:
        return math.exp(v)
    except OverflowError:
        return math.inf


def act_scalar(v: float, activation: str) -> np.float32:
    """One activation on one float32 value, computed in float64 and rounded once to float32."""
    v = float(np.float32(v))  # exact: every float32 is a float64
    if activation == "linear":
        r = v
    elif activation == "leaky":
        r = v if v > 0 else 0.1 * v  # darknet: (x>0) ? x : .1*x, .1 a double
    elif activation == "logistic":
        r = 1.0 / (1.0 + _exp(-v))  # darknet: 1./(1. + exp(-x))
    elif activation == "relu":
        r = 0.0 if v <= 0 else v  # kernels' documented rule (NaN passes through)
    else:
        raise ValueError(activation)
    return np.float32(r)


def activate(x: np.ndarray, activation: str) -> np.ndarray:
    """Elementwise :func:`act_scalar` on a copy of ``x``."""
    out = np.empty_like(x)
    for i, v in np.ndenumerate(x):
        out[i] = act_scalar(v, activation)
    return out


# ----------------------------------------------------------------------------------------------
# Convolution
# ----------------------------------------------------------------------------------------------


def conv_default_out(h: int, k: int, stride: int, pad: int) -> int:
    return (h + 2 * pad - k) // stride + 1


def conv2d(x, weight, bias, stride, pad_top, pad_left, out_h, out_w):
    """Pre-activation convolution in float64, and the bound ``sum |w * X| + |b|`` per output.

    ``out[co, oy, ox] = bias[co] + sum_{c, ky, kx} weight[co, c, ky, kx] *
    X(c, oy*stride - pad_top + ky, ox*stride - pad_left + kx)``, X = 0 outside x.
    Returns (value, magnitude), both float64 arrays of shape (Co, out_h, out_w).
    """
    c_n, h, w = x.shape
    co_n, _, k, _ = weight.shape
    x64 = x.astype(np.float64)
    w64 = weight.astype(np.float64)
    val = np.zeros((co_n, out_h, out_w))
    mag = np.zeros((co_n, out_h, out_w))
    for oy in range(out_h):
        for ox in range(out_w):
            patch = np.zeros((c_n, k, k))
            for ky in range(k):
                for kx in range(k):
                    iy = oy * stride - pad_top + ky
                    ix = ox * stride - pad_left + kx
                    if 0 <= iy < h and 0 <= ix < w:
                        patch[:, ky, kx] = x64[:, iy, ix]
            for co in range(co_n):
                prod = w64[co] * patch
                val[co, oy, ox] = prod.sum() + float(bias[co])
                mag[co, oy, ox] = np.abs(prod).sum() + abs(float(bias[co]))
    return val, mag


# ----------------------------------------------------------------------------------------------
# Max pooling (darknet 2017 forward_maxpool_layer)
# ----------------------------------------------------------------------------------------------


def maxpool2d(x, size, stride, pad_top, pad_left, out_h, out_w):
    """Darknet's loop: start at -FLT_MAX, skip positions outside x, ``max = (val > max) ? val : max``."""
    c_n, h, w = x.shape
    out = np.empty((c_n, out_h, out_w), np.float32)
    for c in range(c_n):
        for oy in range(out_h):
            for ox in range(out_w):
                m = np.float32(-FLT_MAX)
                for ky in range(size):
                    for kx in range(size):
                        iy = oy * stride - pad_top + ky
                        ix = ox * stride - pad_left + kx
                        if 0 <= iy < h and 0 <= ix < w:
                            v = x[c, iy, ix]
                            m = v if v > m else m
                out[c, oy, ox] = m
    return out


# ----------------------------------------------------------------------------------------------
# Reorg: a literal transcription of darknet's reorg_cpu, called as forward_reorg_layer calls it
# ----------------------------------------------------------------------------------------------


def reorg_cpu(x, w, h, c, batch, stride, forward, out):
    """darknet/src/blas.c ``reorg_cpu``, loops and index expressions unchanged (flat buffers)."""
    out_c = c // (stride * stride)
    for b in range(batch):
        for k in range(c):
            for j in range(h):
                for i in range(w):
                    in_index = i + w * (j + h * (k + c * b))
                    c2 = k % out_c
                    offset = k // out_c
                    w2 = i * stride + offset % stride
                    h2 = j * stride + offset // stride
                    out_index = w2 + w * stride * (h2 + h * stride * (c2 + out_c * b))
                    if forward:
                        out[out_index] = x[in_index]
                    else:
                        out[in_index] = x[out_index]


def reorg(x, stride):
    """``forward_reorg_layer`` (2017): ``reorg_cpu(input, l.w, l.h, l.c, batch, stride, 0, output)``
    with the layer's *input* dims, output read as (c*stride², h/stride, w/stride)."""
    c, h, w = x.shape
    out = np.empty(c * h * w, np.float32)
    reorg_cpu(x.reshape(-1), w, h, c, 1, stride, 0, out)
    return out.reshape(c * stride * stride, h // stride, w // stride)


def space_to_depth(x, stride):
    """The textbook space-to-depth (TensorFlow's), which darknet's reorg is *not*."""
    c, h, w = x.shape
    s = stride
    return x.reshape(c, h // s, s, w // s, s).transpose(2, 4, 0, 1, 3).reshape(c * s * s, h // s, w // s)


# ----------------------------------------------------------------------------------------------
# Region layer (darknet 2017 forward_region_layer, CPU, batch 1)
# ----------------------------------------------------------------------------------------------


def softmax(inp, n, temp, stride, out):
    """darknet/src/blas.c ``softmax`` with float32 variables where C has ``float``."""
    total = np.float32(0)
    largest = np.float32(-FLT_MAX)
    temp = np.float32(temp)
    for i in range(n):
        if inp[i * stride] > largest:
            largest = inp[i * stride]
    for i in range(n):
        # float/float - float/float is float arithmetic; exp() is the double libm function
        e = np.float32(_exp(float(inp[i * stride] / temp - largest / temp)))
        total = np.float32(total + e)
        out[i * stride] = e
    for i in range(n):
        out[i * stride] = np.float32(out[i * stride] / total)


def region(x, num, coords, classes, softmax_on=True):
    """Region activations: logistic on x, y, objectness; softmax (or logistic) on the classes."""
    c, h, w = x.shape
    hw = h * w
    flat = x.reshape(-1).copy()
    out = flat.copy()
    ent = coords + 1 + classes
    for n in range(num):
        base = n * ent * hw
        for i in range(2 * hw):  # activate_array(l.output + index, 2*l.w*l.h, LOGISTIC)
            out[base + i] = act_scalar(flat[base + i], "logistic")
        for i in range(hw):  # objectness
            out[base + coords * hw + i] = act_scalar(flat[base + coords * hw + i], "logistic")
        if not softmax_on:
            for i in range(classes * hw):
                j = base + (coords + 1) * hw + i
                out[j] = act_scalar(flat[j], "logistic")
    if softmax_on:
        # softmax_cpu(input + index, classes, batch*n, inputs/n, w*h, 1, w*h, 1, output + index)
        for n in range(num):
            for p in range(hw):
                o = n * ent * hw + (coords + 1) * hw + p
                view_in = flat[o:]
                view_out = out[o:]
                softmax(view_in, classes, 1.0, hw, view_out)
    return out.reshape(c, h, w)


# ----------------------------------------------------------------------------------------------
# AlexeyAB darknet (YOLOv3/v4): float32 activations through the C library's expf/logf, grouped /
# dilated / strided convolution, its maxpool rule, upsample, shortcut, yolo activations.
# ----------------------------------------------------------------------------------------------

import ctypes  # noqa: E402
import ctypes.util  # noqa: E402

_libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
for _name in ("expf", "logf"):
    getattr(_libm, _name).restype = ctypes.c_float
    getattr(_libm, _name).argtypes = [ctypes.c_float]

F = np.float32


def expf(v) -> np.float32:
    return F(_libm.expf(float(F(v))))


def logf(v) -> np.float32:
    return F(_libm.logf(float(F(v))))


def act_f32(v, activation: str) -> np.float32:
    """AlexeyAB ``activations.h`` for one value, float32 step by step (``activation`` is the
    kernel name: logistic_f32, relu6, swish_f32, mish_f32, or a 2017 one)."""
    v = F(v)
    one = F(1)
    if activation == "logistic_f32":
        return F(one / F(one + expf(-v)))
    if activation == "relu6":
        m = v if v > 0 else F(0)
        return m if m < 6 else F(6)
    if activation == "swish_f32":
        return F(v * act_f32(v, "logistic_f32"))
    if activation == "mish_f32":
        if v > 20:
            sp = v
        elif v < -20:
            sp = expf(v)
        else:
            sp = logf(F(expf(v) + one))
        t = F(F(F(2) / F(one + expf(F(F(-2) * sp)))) - one)  # tanh_activate: 2/(1 + expf(-2*x)) - 1
        return F(v * t)
    if activation == "hardswish":  # ONNX HardSwish: x * max(0, min(1, alpha*x + beta)), float32 steps
        t = F(F(v * F(1.0 / 6.0)) + F(0.5))
        t = min(max(t, F(0)), one)
        return F(v * t)
    return act_scalar(v, activation)


def activate_f32(x: np.ndarray, activation: str) -> np.ndarray:
    out = np.empty_like(x)
    with np.errstate(all="ignore"):
        for i, v in np.ndenumerate(x):
            out[i] = act_f32(v, activation)
    return out


def conv2d_ext(x, weight, bias, sy, sx, dilation, groups, pad_top, pad_left, out_h, out_w):
    """:func:`conv2d` with row/column strides, dilation and groups: group ``g`` of output channels
    ``[g*Co/groups, ...)`` reads input channels ``[g*C/groups, ...)``; tap ``(ky, kx)`` reads
    ``X(c, oy*sy - pad_top + ky*dilation, ox*sx - pad_left + kx*dilation)``."""
    c_n, h, w = x.shape
    co_n, cg, k, _ = weight.shape
    og = co_n // groups
    x64 = x.astype(np.float64)
    w64 = weight.astype(np.float64)
    val = np.zeros((co_n, out_h, out_w))
    mag = np.zeros((co_n, out_h, out_w))
    for oy in range(out_h):
        for ox in range(out_w):
            patch = np.zeros((c_n, k, k))
            for ky in range(k):
                for kx in range(k):
                    iy = oy * sy - pad_top + ky * dilation
                    ix = ox * sx - pad_left + kx * dilation
                    if 0 <= iy < h and 0 <= ix < w:
                        patch[:, ky, kx] = x64[:, iy, ix]
            for co in range(co_n):
                g = co // og
                prod = w64[co] * patch[g * cg:(g + 1) * cg]
                val[co, oy, ox] = prod.sum() + float(bias[co])
                mag[co, oy, ox] = np.abs(prod).sum() + abs(float(bias[co]))
    return val, mag


def maxpool_alexeyab(x, size, stride, padding):
    """AlexeyAB ``forward_maxpool_layer``: out = (h + padding - size)/stride + 1, offsets
    ``-padding/2`` (C division), ``val = valid ? input : -FLT_MAX``, ``max = (val > max) ? val : max``."""
    c_n, h, w = x.shape
    out_h = (h + padding - size) // stride + 1
    out_w = (w + padding - size) // stride + 1
    off = -(padding // 2)  # C: -l.pad / 2 truncates toward zero
    out = np.empty((c_n, out_h, out_w), np.float32)
    for k in range(c_n):
        for i in range(out_h):
            for j in range(out_w):
                m = F(-FLT_MAX)
                for n in range(size):
                    for mm in range(size):
                        cur_h = off + i * stride + n
                        cur_w = off + j * stride + mm
                        valid = 0 <= cur_h < h and 0 <= cur_w < w
                        val = x[k, cur_h, cur_w] if valid else F(-FLT_MAX)
                        m = val if val > m else m
                out[k, i, j] = m
    return out


def upsample(x, stride, scale):
    """``upsample_cpu(forward=1)``, loops and indices unchanged (flat buffers)."""
    c, h, w = x.shape
    flat = x.reshape(-1)
    out = np.empty(c * h * w * stride * stride, np.float32)
    for k in range(c):
        for j in range(h * stride):
            for i in range(w * stride):
                in_index = k * w * h + (j // stride) * w + i // stride
                out_index = k * w * h * stride * stride + j * w * stride + i
                out[out_index] = F(F(scale) * flat[in_index])
    return out.reshape(c, h * stride, w * stride)


def shortcut(x, adds, activation):
    """``shortcut_multilayer_cpu`` without weights, then the activation."""
    src = x.reshape(-1)
    out = np.empty_like(src)
    for i in range(src.size):
        v = src[i]
        for a in adds:
            af = a.reshape(-1)
            if i < af.size:
                v = F(v + af[i])
        out[i] = v
    return activate_f32(out, activation).reshape(x.shape)


def yolo(x, num, classes, scale_x_y, new_coords):
    """``forward_yolo_layer`` (CPU, inference): logistic on x, y and objectness + classes unless
    new_coords, then ``scal_add_cpu(2*w*h, scale_x_y, -0.5*(scale_x_y - 1))`` on x, y."""
    c, h, w = x.shape
    hw = h * w
    out = x.reshape(-1).copy()
    alpha = F(scale_x_y)
    beta = F(-0.5 * float(F(alpha - F(1))))
    ent = 5 + classes
    for n in range(num):
        base = n * ent * hw
        if not new_coords:
            for i in range(2 * hw):
                out[base + i] = act_f32(out[base + i], "logistic_f32")
            for i in range((1 + classes) * hw):
                out[base + 4 * hw + i] = act_f32(out[base + 4 * hw + i], "logistic_f32")
        for i in range(2 * hw):
            out[base + i] = F(F(out[base + i] * alpha) + beta)
    return out.reshape(c, h, w)


# ----------------------------------------------------------------------------------------------
# Fully connected (2017 [connected]) as the kernel specifies it: one fma chain per output
# ----------------------------------------------------------------------------------------------


def fma32(a, b, c) -> np.float32:
    """IEEE float32 ``fma(a, b, c)``, correctly rounded, from exact float64 pieces.

    ``a*b`` of two float32 is exact in float64; ``s = p + c`` is rounded once to float64 with its
    exact error ``e`` (Knuth's two-sum). Rounding ``s`` to float32 is then correct except when
    ``s`` lies exactly halfway between two float32, where the sign of ``e`` says which way the exact
    sum lies (the only place double rounding could differ from one rounding).
    """
    p = float(np.float32(a)) * float(np.float32(b))
    c = float(np.float32(c))
    s = p + c
    bb = s - p
    e = (p - (s - bb)) + (c - bb)
    r = np.float32(s)
    if e != 0 and np.isfinite(r):
        lo, hi = (r, np.nextafter(r, np.float32(np.inf))) if float(r) <= s else (np.nextafter(r, np.float32(-np.inf)), r)
        if float(hi) - s == s - float(lo):  # s is a float32 midpoint: the exact value is off it by e
            r = hi if e > 0 else lo
    return np.float32(r)


def connected(x, weight, bias):
    """Pre-activation ``connected`` outputs: ``acc = fma(w[o, i], x[i], acc)`` from +0.0 over i in
    order, then ``acc + bias[o]`` in float32 (the kernel's specified arithmetic)."""
    xf = np.asarray(x, np.float32).reshape(-1)
    out = np.empty(weight.shape[0], np.float32)
    for o in range(weight.shape[0]):
        acc = np.float32(0.0)
        for i in range(xf.size):
            acc = fma32(weight[o, i], xf[i], acc)
        out[o] = np.float32(acc + bias[o])
    return out
