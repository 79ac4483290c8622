"""Fully connected layer (2017 darknet ``[connected]``), float32, one input vector.

Every output is computed exactly as the exact convolution computes one output element (see
:mod:`kernels.conv`), so a connected layer gives the same bits as a 1x1 convolution of the
input seen as an (inputs, 1, 1) map::

    acc = +0.0
    for i in 0..inputs-1:                 # always this order
        acc = fma(W[o, i], x[i], acc)     # one rounding per step (llvm.fma.f32)
    pre = acc + bias[o]                   # float32 add
    out = act(pre)

The chain of one output depends only on its own row of ``W``, ``x`` and ``bias[o]``: neither the
number of rows computed in one call, nor where the row sits in the block of rows computed
together, changes its bits. That is what lets a layer be split by output channels across devices
(:mod:`stealer.shard`) and gathered bit-identical to the unsplit layer.

Darknet's own ``gemm_nt`` sums the products in float32 without FMA, in the same order; with FMA
each step rounds once instead of twice, as the convolution does (its bits are the convolution's,
not darknet's ``gemm``'s; darknet itself differs between builds with and without FMA contraction).

Rows are computed 8 at a time: 8 independent FMA chains keep the FMA units busy where one chain
would wait out each FMA's latency; each chain is the scalar chain above.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import cgutils, types
from numba.extending import intrinsic

from ._config import JIT_OPTS
from ._validate import output_array
from .activations import _act_code, act_scalar
from .conv import _check_f32

#: Output rows computed together (independent accumulation chains).
ROWS = 8


@intrinsic
def _fma32(typingctx, a, b, c):
    """``a * b + c`` with a single rounding (``llvm.fma.f32``): the scalar twin of ``vfma``."""
    if not (a == types.float32 and b == types.float32 and c == types.float32):
        return None
    sig = types.float32(a, b, c)

    def codegen(context, builder, sig, args):
        f32 = ir.FloatType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32] * 3), "llvm.fma.f32")
        return builder.call(fn, list(args))

    return sig, codegen


@njit(inline="always", **JIT_OPTS)
def _rows8(x, wf, k, r, acc):
    """Inner loop: the FMA chains of rows ``r .. r+7`` of ``wf`` (flat, row length ``k``) into ``acc``."""
    a0 = np.float32(0.0)
    a1 = np.float32(0.0)
    a2 = np.float32(0.0)
    a3 = np.float32(0.0)
    a4 = np.float32(0.0)
    a5 = np.float32(0.0)
    a6 = np.float32(0.0)
    a7 = np.float32(0.0)
    o = r * k
    for i in range(k):
        xi = x[i]
        a0 = _fma32(wf[o + i], xi, a0)
        a1 = _fma32(wf[o + k + i], xi, a1)
        a2 = _fma32(wf[o + 2 * k + i], xi, a2)
        a3 = _fma32(wf[o + 3 * k + i], xi, a3)
        a4 = _fma32(wf[o + 4 * k + i], xi, a4)
        a5 = _fma32(wf[o + 5 * k + i], xi, a5)
        a6 = _fma32(wf[o + 6 * k + i], xi, a6)
        a7 = _fma32(wf[o + 7 * k + i], xi, a7)
    acc[0] = a0
    acc[1] = a1
    acc[2] = a2
    acc[3] = a3
    acc[4] = a4
    acc[5] = a5
    acc[6] = a6
    acc[7] = a7


@njit(**JIT_OPTS)
def _connected(x, wf, bias, act, out):
    """Driver: ``out[o] = act(chain(o) + bias[o])`` for every row, 8 rows per pass, the last
    rows (fewer than 8) one chain each (the same chain, so the same bits)."""
    n = out.shape[0]
    k = x.shape[0]
    acc = np.empty(ROWS, np.float32)
    r = 0
    while r + ROWS <= n:
        _rows8(x, wf, k, r, acc)
        for j in range(ROWS):
            out[r + j] = act_scalar(acc[j] + bias[r + j], act)
        r += ROWS
    while r < n:
        a = np.float32(0.0)
        o = r * k
        for i in range(k):
            a = _fma32(wf[o + i], x[i], a)
        out[r] = act_scalar(a + bias[r], act)
        r += 1


def connected(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, *, activation: str | int = "linear",
              out: np.ndarray | None = None) -> np.ndarray:
    """Fully connected layer: ``out[o] = act(bias[o] + sum_i weight[o, i] * x.flat[i])``.

    Parameters
    ----------
    x : ndarray, float32, any shape with ``weight.shape[1]`` elements
        Read in C order (darknet's flat CHW buffer); a non-contiguous input is copied.
    weight : ndarray, float32, shape (outputs, inputs)
        Row ``o`` is output ``o``'s weights (darknet's file order; batch norm folded by the caller).
    bias : ndarray, float32, shape (outputs,)
    activation : str or int code
        One of :data:`kernels.ALL_ACT_NAMES`; ``"linear"`` gives the pre-activation values, and
        :func:`kernels.activate` on them afterwards gives the same bits as passing the activation.
    out : ndarray, float32, shape (outputs,), C-contiguous, optional

    Returns
    -------
    ndarray, float32, shape (outputs,)

    Raises
    ------
    ValueError
        Wrong type, dtype, shape or sizes; unknown activation; unusable ``out``.
    """
    if not isinstance(x, np.ndarray):
        raise ValueError(f"x must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise ValueError(f"x must be float32, got {x.dtype}")
    weight = _check_f32("weight", weight, 2, "(outputs, inputs)")
    bias = _check_f32("bias", bias, 1, "(outputs,)")
    n, k = weight.shape
    if n < 1 or k < 1:
        raise ValueError(f"weight must be non-empty, got shape {weight.shape}")
    if x.size != k:
        raise ValueError(f"x has {x.size} elements, weight of shape {weight.shape} needs {k}")
    if bias.shape != (n,):
        raise ValueError(f"bias shape must be ({n},) for weight of shape {weight.shape}, got {bias.shape}")
    act = _act_code(activation)
    xf = np.ascontiguousarray(x).reshape(k)
    out = output_array(out, (n,), x=xf, weight=weight, bias=bias)
    _connected(xf, weight.reshape(n * k), bias, act, out)
    return out
