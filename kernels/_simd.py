"""A minimal 8 x float32 SIMD vector type for Numba, built on LLVM vector types.

Why this exists: the exact convolution needs a register-blocked GEMM micro-kernel (12 vector
accumulators held in registers across the whole reduction loop). Numba's auto-vectorization
cannot be trusted to produce that: with plain arrays LLVM must assume the output may alias the
inputs and keeps the accumulators in memory. Here each accumulator is an SSA value of LLVM type
``<8 x float>``, so ``mem2reg`` puts it in a ``ymm`` register (AVX2) or in two ``q`` registers
(NEON); nothing depends on the optimizer's mood.

Exactness: :func:`vfma` is the ``llvm.fma.v8f32`` intrinsic, i.e. IEEE fused multiply-add with a
single rounding, on every target (in hardware where available, otherwise a correctly rounded
library call). It is the *specified* arithmetic, not a contraction the optimizer may or may not
do, so every lane of every vector computes exactly ``fma(a, b, c)`` and the result of an
accumulation chain depends only on its operands and their order.

:data:`f32x16` (``<16 x float>``: one ``zmm`` register on AVX-512F, two ``ymm`` elsewhere) has
the few operations the 16-lane GEMM needs (:func:`vzero16`, :func:`vload16`, :func:`vstore16`,
:func:`vbcast16`; :func:`vfma`, :func:`vadd`, :func:`vleaky`, :func:`vrelu` take either type);
the per-lane arithmetic is the same IEEE operation at either width.

All memory intrinsics take a C-contiguous float32 array and a *flat* element index into it;
there is no bounds checking (callers guarantee it), as in the rest of the inner loops.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, models, register_model

def target_features() -> list[str]:
    """Numba's target features (``+avx512vl``, ...), as it compiles for them."""
    import numba
    from llvmlite import binding

    cpu_name = getattr(numba.config, "CPU_NAME", None)  # set from NUMBA_CPU_NAME/FEATURES
    cpu_features = getattr(numba.config, "CPU_FEATURES", None)
    if cpu_name:  # an explicit target (portable caches): trust only its features
        feats = cpu_features or ""
    else:
        feats = cpu_features or binding.get_host_cpu_features().flatten()
    return feats.split(",")


#: The target has AVX-512F: elementwise passes run on :data:`f32x16` (one ``zmm``). Elsewhere they
#: stay on 8 lanes (NEON and AVX2 would split 16-lane vectors, and their gathers are slow).
AVX512F = "+avx512f" in target_features()

#: Number of float32 lanes in :data:`f32x8`.
LANES = 8

_F32 = ir.FloatType()
_F64 = ir.DoubleType()
_I32 = ir.IntType(32)
_V8F32 = ir.VectorType(_F32, LANES)
#: Number of float32 lanes in :data:`f32x16`.
LANES16 = 16
_V16F32 = ir.VectorType(_F32, LANES16)
_V8F64 = ir.VectorType(_F64, LANES)
_V8I32 = ir.VectorType(_I32, LANES)
_IOTA = ir.Constant(_V8I32, list(range(LANES)))  # lane numbers 0..7


class F32x8Type(types.Type):
    """Numba type of an ``<8 x float>`` LLVM vector value (lives in registers, not in memory)."""

    def __init__(self) -> None:
        super().__init__(name="f32x8")


f32x8 = F32x8Type()


@register_model(F32x8Type)
class _F32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V8F32)


class F32x16Type(types.Type):
    """Numba type of an ``<16 x float>`` LLVM vector value: one ``zmm`` register on AVX-512F,
    two ``ymm`` (or four ``q``) registers elsewhere (LLVM legalizes it; the arithmetic per lane is
    the same IEEE operation either way)."""

    def __init__(self) -> None:
        super().__init__(name="f32x16")


f32x16 = F32x16Type()
_FVECS = (f32x8, f32x16)  # the types vfma/vadd/vleaky/vrelu accept (all operands of one type)


@register_model(F32x16Type)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V16F32)


def _is_f32_c_array(t) -> bool:
    return isinstance(t, types.Array) and t.dtype == types.float32 and t.layout == "C"


def _elem_ptr(context, builder, arrty, arr, idxty, idx):
    """Pointer to element ``idx`` (flat) of a C-contiguous float32 array."""
    data = context.make_array(arrty)(context, builder, arr).data
    i = context.cast(builder, idx, idxty, types.intp)
    return builder.gep(data, [i])


@intrinsic
def vzero(typingctx):
    """``<0, 0, ..., 0>`` (+0.0 in every lane)."""
    sig = f32x8()

    def codegen(context, builder, sig, args):
        return ir.Constant(_V8F32, [0.0] * LANES)

    return sig, codegen


@intrinsic
def vload(typingctx, arr, idx):
    """Unaligned load of ``arr.flat[idx : idx + 8]``."""
    if not (_is_f32_c_array(arr) and isinstance(idx, types.Integer)):
        return None
    sig = f32x8(arr, idx)

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        return builder.load(builder.bitcast(p, _V8F32.as_pointer()), align=4)

    return sig, codegen


@intrinsic
def vstore(typingctx, arr, idx, v):
    """Unaligned store of ``v`` to ``arr.flat[idx : idx + 8]``."""
    if not (_is_f32_c_array(arr) and isinstance(idx, types.Integer) and v == f32x8):
        return None
    sig = types.void(arr, idx, v)

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        builder.store(args[2], builder.bitcast(p, _V8F32.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


def _splat(builder, scalar, vty=_V8F32):
    """Broadcast an LLVM scalar to all lanes of vector type ``vty`` (insertelement + shuffle)."""
    undef = ir.Constant(vty, ir.Undefined)
    v = builder.insert_element(undef, scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, undef, ir.Constant(_V8I32, [0] * LANES))


@intrinsic
def vbcast(typingctx, arr, idx):
    """Load the scalar ``arr.flat[idx]`` and broadcast it to all lanes (``vbroadcastss``)."""
    if not (_is_f32_c_array(arr) and isinstance(idx, types.Integer)):
        return None
    sig = f32x8(arr, idx)

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        return _splat(builder, builder.load(p, align=4))

    return sig, codegen


@intrinsic
def vsplat(typingctx, s):
    """Broadcast a float32 scalar to all lanes."""
    if s != types.float32:
        return None
    sig = f32x8(s)

    def codegen(context, builder, sig, args):
        return _splat(builder, args[0])

    return sig, codegen


@intrinsic
def vzero16(typingctx):
    """:func:`vzero` for :data:`f32x16`."""
    sig = f32x16()

    def codegen(context, builder, sig, args):
        return ir.Constant(_V16F32, [0.0] * LANES16)

    return sig, codegen


@intrinsic
def vload16(typingctx, arr, idx):
    """Unaligned load of ``arr.flat[idx : idx + 16]``."""
    if not (_is_f32_c_array(arr) and isinstance(idx, types.Integer)):
        return None
    sig = f32x16(arr, idx)

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        return builder.load(builder.bitcast(p, _V16F32.as_pointer()), align=4)

    return sig, codegen


@intrinsic
def vstore16(typingctx, arr, idx, v):
    """Unaligned store of ``v`` to ``arr.flat[idx : idx + 16]``."""
    if not (_is_f32_c_array(arr) and isinstance(idx, types.Integer) and v == f32x16):
        return None
    sig = types.void(arr, idx, v)

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        builder.store(args[2], builder.bitcast(p, _V16F32.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def vbcast16(typingctx, arr, idx):
    """:func:`vbcast` for :data:`f32x16` (``vbroadcastss zmm``, or an embedded ``{1to16}``)."""
    if not (_is_f32_c_array(arr) and isinstance(idx, types.Integer)):
        return None
    sig = f32x16(arr, idx)

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        undef = ir.Constant(_V16F32, ir.Undefined)
        v = builder.insert_element(undef, builder.load(p, align=4), ir.Constant(_I32, 0))
        return builder.shuffle_vector(v, undef, ir.Constant(ir.VectorType(_I32, LANES16), [0] * LANES16))

    return sig, codegen


@intrinsic
def vfma(typingctx, a, b, c):
    """``a * b + c`` per lane with a single rounding (``llvm.fma.v8f32``/``llvm.fma.v16f32``)."""
    if not (a in _FVECS and b == a and c == a):
        return None
    sig = a(a, b, c)
    vty = _V8F32 if a == f32x8 else _V16F32

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                            f"llvm.fma.v{vty.count}f32")
        return builder.call(fn, list(args))

    return sig, codegen


@intrinsic
def vadd(typingctx, a, b):
    """``a + b`` per lane (IEEE float32 addition)."""
    if not (a in _FVECS and b == a):
        return None
    sig = a(a, b)

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])

    return sig, codegen


@intrinsic
def vleaky(typingctx, v):
    """Darknet leaky ReLU per lane: ``x > 0 ? x : float32(double(x) * 0.1)``.

    The multiply is done in double, like darknet's ``.1*x`` (``.1`` is a C double), then rounded
    once to float32; this is not the same as ``x * 0.1f`` in float32 for every x.
    """
    if v not in _FVECS:
        return None
    sig = v(v)
    n = LANES if v == f32x8 else LANES16

    def codegen(context, builder, sig, args):
        x = args[0]
        xd = builder.fpext(x, ir.VectorType(_F64, n))
        yd = builder.fmul(xd, ir.Constant(ir.VectorType(_F64, n), [0.1] * n))
        y = builder.fptrunc(yd, ir.VectorType(_F32, n))
        pos = builder.fcmp_ordered(">", x, ir.Constant(ir.VectorType(_F32, n), [0.0] * n))
        return builder.select(pos, x, y)

    return sig, codegen


@intrinsic
def vrelu(typingctx, v):
    """ReLU per lane with the package's rule ``x <= 0 ? +0.0 : x`` (NaN passes through)."""
    if v not in _FVECS:
        return None
    sig = v(v)
    n = LANES if v == f32x8 else LANES16

    def codegen(context, builder, sig, args):
        x = args[0]
        zero = ir.Constant(ir.VectorType(_F32, n), [0.0] * n)
        le0 = builder.fcmp_ordered("<=", x, zero)
        return builder.select(le0, zero, x)

    return sig, codegen


@intrinsic
def vmaskload(typingctx, prev, arr, idx, lo, hi):
    """Lanes ``l`` with ``lo <= l < hi`` loaded from ``arr.flat[idx + l]``, the others from ``prev``.

    Masked-off lanes are not accessed (``llvm.masked.load``: ``vmaskmovps`` on AVX2), so ``idx``
    may point before or after the array as long as the enabled lanes are inside it. This is what
    makes im2col packing branch-free at the image borders.
    """
    if not (prev == f32x8 and _is_f32_c_array(arr) and all(isinstance(t, types.Integer) for t in (idx, lo, hi))):
        return None
    sig = f32x8(prev, arr, idx, lo, hi)

    def codegen(context, builder, sig, args):
        prev_v, arr_v, idx_v, lo_v, hi_v = args
        data = context.make_array(sig.args[1])(context, builder, arr_v).data
        i = context.cast(builder, idx_v, sig.args[2], types.intp)
        p = builder.bitcast(builder.gep(data, [i]), _V8F32.as_pointer())  # not inbounds on purpose

        def splat_i32(v, t):  # lane bounds are in [0, 24] (callers clip them), so int32 is safe
            return _splat(builder, context.cast(builder, v, t, types.int32), _V8I32)

        m = builder.and_(builder.icmp_signed(">=", _IOTA, splat_i32(lo_v, sig.args[3])),
                         builder.icmp_signed("<", _IOTA, splat_i32(hi_v, sig.args[4])))
        fnty = ir.FunctionType(_V8F32, [_V8F32.as_pointer(), _I32, ir.VectorType(ir.IntType(1), LANES), _V8F32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.masked.load.v8f32.p0")
        return builder.call(fn, [p, ir.Constant(_I32, 4), m, prev_v])

    return sig, codegen


@intrinsic
def vrelu6(typingctx, v):
    """ReLU6 per lane as :func:`kernels.activations._relu6_32`: ``m = x > 0 ? x : 0`` (NaN gives
    0), then ``m < 6 ? m : 6``."""
    if v not in _FVECS:
        return None
    sig = v(v)

    def codegen(context, builder, sig, args):
        x = args[0]
        zero = ir.Constant(x.type, [0.0] * x.type.count)
        six = ir.Constant(x.type, [6.0] * x.type.count)
        m = builder.select(builder.fcmp_ordered(">", x, zero), x, zero)
        return builder.select(builder.fcmp_ordered("<", m, six), m, six)

    return sig, codegen


@intrinsic
def vmaskstore(typingctx, arr, idx, v, lo, hi):
    """Store lanes ``l`` with ``lo <= l < hi`` of ``v`` to ``arr.flat[idx + l]``; the other lanes'
    memory is not accessed (``llvm.masked.store``), as for :func:`vmaskload`."""
    if not (_is_f32_c_array(arr) and v == f32x8 and all(isinstance(t, types.Integer) for t in (idx, lo, hi))):
        return None
    sig = types.void(arr, idx, v, lo, hi)

    def codegen(context, builder, sig, args):
        arr_v, idx_v, v_v, lo_v, hi_v = args
        data = context.make_array(sig.args[0])(context, builder, arr_v).data
        i = context.cast(builder, idx_v, sig.args[1], types.intp)
        p = builder.bitcast(builder.gep(data, [i]), _V8F32.as_pointer())

        def splat_i32(val, t):  # lane bounds: callers clip them to [0, 8]
            return _splat(builder, context.cast(builder, val, t, types.int32), _V8I32)

        m = builder.and_(builder.icmp_signed(">=", _IOTA, splat_i32(lo_v, sig.args[3])),
                         builder.icmp_signed("<", _IOTA, splat_i32(hi_v, sig.args[4])))
        fnty = ir.FunctionType(ir.VoidType(), [_V8F32, _V8F32.as_pointer(), _I32, ir.VectorType(ir.IntType(1), LANES)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.masked.store.v8f32.p0")
        builder.call(fn, [v_v, p, ir.Constant(_I32, 4), m])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def vmaskgather(typingctx, prev, arr, idx, stride, lo, hi):
    """Lanes ``l`` with ``lo <= l < hi`` loaded from ``arr.flat[idx + l*stride]``, the others from
    ``prev`` (``llvm.masked.gather``: ``vgatherdps`` on AVX2); masked-off lanes are not accessed."""
    if not (prev == f32x8 and _is_f32_c_array(arr)
            and all(isinstance(t, types.Integer) for t in (idx, stride, lo, hi))):
        return None
    sig = f32x8(prev, arr, idx, stride, lo, hi)

    def codegen(context, builder, sig, args):
        prev_v, arr_v, idx_v, st_v, lo_v, hi_v = args
        data = context.make_array(sig.args[1])(context, builder, arr_v).data
        i = context.cast(builder, idx_v, sig.args[2], types.intp)
        st = context.cast(builder, st_v, sig.args[3], types.intp)
        i64 = i.type
        v64 = ir.VectorType(i64, LANES)
        lanes = ir.Constant(v64, list(range(LANES)))
        offs = builder.add(_splat(builder, i, v64), builder.mul(lanes, _splat(builder, st, v64)))
        # a vector of lane addresses (llvmlite's gep takes no vector index): base + 4*offset
        base = _splat(builder, builder.ptrtoint(data, i64), v64)
        addr = builder.add(base, builder.mul(offs, ir.Constant(v64, [4] * LANES)))
        ptrs = builder.inttoptr(addr, ir.VectorType(_F32.as_pointer(), LANES))

        def splat_i32(val, t):  # lane bounds: callers clip them to [0, 8]
            return _splat(builder, context.cast(builder, val, t, types.int32), _V8I32)

        m = builder.and_(builder.icmp_signed(">=", _IOTA, splat_i32(lo_v, sig.args[4])),
                         builder.icmp_signed("<", _IOTA, splat_i32(hi_v, sig.args[5])))
        pty = ir.VectorType(_F32.as_pointer(), LANES)
        fnty = ir.FunctionType(_V8F32, [pty, _I32, ir.VectorType(ir.IntType(1), LANES), _V8F32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.masked.gather.v8f32.v8p0")
        return builder.call(fn, [ptrs, ir.Constant(_I32, 4), m, prev_v])

    return sig, codegen


@intrinsic
def vmaskload2(typingctx, prev, arr, idx, lo, hi):
    """Stride-2 load: lanes ``l`` with ``lo <= l < hi`` from ``arr.flat[idx + 2*l]``, the others
    from ``prev``. Two masked 8-wide loads (only the even elements of enabled lanes are
    accessed) and one shuffle, instead of a gather: what stride-2 im2col needs."""
    if not (prev == f32x8 and _is_f32_c_array(arr) and all(isinstance(t, types.Integer) for t in (idx, lo, hi))):
        return None
    sig = f32x8(prev, arr, idx, lo, hi)

    def codegen(context, builder, sig, args):
        prev_v, arr_v, idx_v, lo_v, hi_v = args
        data = context.make_array(sig.args[1])(context, builder, arr_v).data
        i = context.cast(builder, idx_v, sig.args[2], types.intp)
        fnty = ir.FunctionType(_V8F32, [_V8F32.as_pointer(), _I32, ir.VectorType(ir.IntType(1), LANES), _V8F32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.masked.load.v8f32.p0")
        lo32 = _splat(builder, context.cast(builder, lo_v, sig.args[3], types.int32), _V8I32)
        hi32 = _splat(builder, context.cast(builder, hi_v, sig.args[4], types.int32), _V8I32)
        even = ir.Constant(ir.VectorType(ir.IntType(1), LANES), [1, 0] * (LANES // 2))
        zero = ir.Constant(_V8F32, [0.0] * LANES)
        halves = []
        for h in range(2):
            lane = ir.Constant(_V8I32, [h * 4 + e // 2 for e in range(LANES)])  # output lane of element e
            m = builder.and_(builder.and_(builder.icmp_signed(">=", lane, lo32), builder.icmp_signed("<", lane, hi32)),
                             even)
            p = builder.bitcast(builder.gep(data, [builder.add(i, ir.Constant(i.type, 8 * h))]), _V8F32.as_pointer())
            halves.append(builder.call(fn, [p, ir.Constant(_I32, 4), m, zero]))
        v = builder.shuffle_vector(halves[0], halves[1], ir.Constant(_V8I32, list(range(0, 2 * LANES, 2))))
        lane_all = _IOTA
        keep = builder.and_(builder.icmp_signed(">=", lane_all, lo32), builder.icmp_signed("<", lane_all, hi32))
        return builder.select(keep, v, prev_v)

    return sig, codegen


@intrinsic
def vsplatf(typingctx, s):
    """Broadcast a float32 or float64 constant (rounded to float32) to all lanes."""
    if not isinstance(s, types.Float):
        return None
    sig = f32x8(s)

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], sig.args[0], types.float32)
        return _splat(builder, v)

    return sig, codegen


@intrinsic
def vmaxgt(typingctx, v, m):
    """Darknet's max update per lane: ``v > m ? v : m`` (NaN in ``v`` never wins; of equal values,
    such as +0.0 and -0.0, ``m`` is kept)."""
    if not (v == f32x8 and m == f32x8):
        return None
    sig = f32x8(v, m)

    def codegen(context, builder, sig, args):
        return builder.select(builder.fcmp_ordered(">", args[0], args[1]), args[0], args[1])

    return sig, codegen


@intrinsic
def vdeinterleave(typingctx, a, b, odd):
    """Lanes ``2*l + odd`` of the 16 lanes ``a ++ b`` (``odd`` a literal 0 or 1): with ``a``,
    ``b`` two consecutive vectors of a row, the even or the odd columns."""
    if not (a == f32x8 and b == f32x8 and isinstance(odd, types.IntegerLiteral)):
        return None
    sig = f32x8(a, b, odd)
    phase = odd.literal_value

    def codegen(context, builder, sig, args):
        mask = ir.Constant(_V8I32, [2 * l + phase for l in range(LANES)])
        return builder.shuffle_vector(args[0], args[1], mask)

    return sig, codegen


@intrinsic
def vstoren(typingctx, arr, idx, v, n):
    """Store the first ``min(n, 8)`` lanes of ``v`` to ``arr.flat[idx:]``: a plain store when all
    8 fit (masked stores are microcoded and slow on AMD Zen), else :func:`vmaskstore`."""
    if not (_is_f32_c_array(arr) and isinstance(idx, types.Integer) and v == f32x8 and isinstance(n, types.Integer)):
        return None
    sig = types.void(arr, idx, v, n)

    def codegen(context, builder, sig, args):
        arr_v, idx_v, v_v, n_v = args
        data = context.make_array(sig.args[0])(context, builder, arr_v).data
        i = context.cast(builder, idx_v, sig.args[1], types.intp)
        p = builder.bitcast(builder.gep(data, [i]), _V8F32.as_pointer())
        n32 = context.cast(builder, n_v, sig.args[3], types.int64)
        full = builder.icmp_signed(">=", n32, ir.Constant(ir.IntType(64), LANES))
        with builder.if_else(full) as (then, otherwise):
            with then:
                builder.store(v_v, p, align=4)
            with otherwise:
                nn = builder.trunc(n32, _I32)
                m = builder.icmp_signed("<", _IOTA, _splat(builder, nn, _V8I32))
                fnty = ir.FunctionType(ir.VoidType(), [_V8F32, _V8F32.as_pointer(), _I32,
                                                       ir.VectorType(ir.IntType(1), LANES)])
                fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.masked.store.v8f32.p0")
                builder.call(fn, [v_v, p, ir.Constant(_I32, 4), m])
        return context.get_dummy_value()

    return sig, codegen


# ------------------------------------------------------------------------------------ expf
# glibc's expf (2.28 and later; the Arm optimized-routines algorithm, also musl's and LLVM libc's),
# lane by lane: x*N/ln2 = k + r, 2^(k/N) from a 32-entry table, a cubic in r, all in double, one
# rounding to float at the end. Only its main path (|x| < 88): callers send other values to the
# libm. The constants are the library's (``__exp2f_data``); the table is
# ``bits(2^(i/32)) - (i << 47)``. The reduction ``r = x*N/ln2 - k`` is one fma, as in the FMA
# build glibc picks on x86-64 (with a separate multiply and subtract 2 of the 2.1e9 floats in
# [-104, 89] differ: 32.564632 and -63.09946); the cubic's fmas change no result there. Checked
# against the libm over every float32 in [-104, 89] (glibc 2.36, x86-64) and in
# tests/test_kernels_paths.py on a sample.
_EXPF_TAB = (
    0x3ff0000000000000, 0x3fefd9b0d3158574, 0x3fefb5586cf9890f, 0x3fef9301d0125b51,
    0x3fef72b83c7d517b, 0x3fef54873168b9aa, 0x3fef387a6e756238, 0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715, 0x3feef1a7373aa9cb, 0x3feedea64c123422, 0x3feece086061892d,
    0x3feebfdad5362a27, 0x3feeb42b569d4f82, 0x3feeab07dd485429, 0x3feea47eb03a5585,
    0x3feea09e667f3bcd, 0x3fee9f75e8ec5f74, 0x3feea11473eb0187, 0x3feea589994cce13,
    0x3feeace5422aa0db, 0x3feeb737b0cdc5e5, 0x3feec49182a3f090, 0x3feed503b23e255d,
    0x3feee89f995ad3ad, 0x3feeff76f2fb5e47, 0x3fef199bdd85529c, 0x3fef3720dcef9069,
    0x3fef5818dcfba487, 0x3fef7c97337b9b5f, 0x3fefa4afa2a490da, 0x3fefd0765b6e4540,
)
_EXPF_N = 32
_EXPF_INVLN2N = float.fromhex("0x1.71547652b82fep+0") * _EXPF_N
_EXPF_SHIFT = float.fromhex("0x1.8p+52")
_EXPF_C = (float.fromhex("0x1.c6af84b912394p-5") / _EXPF_N ** 3, float.fromhex("0x1.ebfce50fac4f3p-3") / _EXPF_N ** 2,
           float.fromhex("0x1.62e42ff0c52d6p-1") / _EXPF_N)
_I64 = ir.IntType(64)
_V8I64 = ir.VectorType(_I64, LANES)


def _vexpf_ir(builder, v):
    """LLVM IR of :data:`_EXPF_TAB`'s expf on an ``<8 x float>`` or ``<16 x float>`` (main path:
    |x| < 88). The 16-lane form looks the table up with one gather (``vpgatherqq`` on AVX-512),
    the 8-lane form lane by lane (gathers are slow on the AVX2/NEON targets it serves); either
    way each lane gets the same table entry, so the same bits."""
    n = v.type.count
    vf64 = ir.VectorType(_F64, n)
    vi64 = ir.VectorType(_I64, n)

    def dsplat(c: float):
        return ir.Constant(vf64, [c] * n)

    mod = builder.module
    name = "stealer_expf_tab"
    try:
        tab = mod.get_global(name)
    except KeyError:
        tab = cgutils.global_constant(mod, name, ir.Constant(ir.ArrayType(_I64, _EXPF_N), list(_EXPF_TAB)))
    xd = builder.fpext(v, vf64)
    z = builder.fmul(dsplat(_EXPF_INVLN2N), xd)
    kd = builder.fadd(z, dsplat(_EXPF_SHIFT))
    ki = builder.bitcast(kd, vi64)
    kd = builder.fsub(kd, dsplat(_EXPF_SHIFT))
    fma = cgutils.get_or_insert_function(mod, ir.FunctionType(vf64, [vf64] * 3), f"llvm.fma.v{n}f64")
    r = builder.call(fma, [dsplat(_EXPF_INVLN2N), xd, builder.fneg(kd)])  # z - kd, fused as the library's
    idx = builder.and_(ki, ir.Constant(vi64, [_EXPF_N - 1] * n))
    zero = ir.Constant(_I32, 0)
    if n == LANES16:
        base = builder.ptrtoint(builder.gep(tab, [zero, zero]), _I64)
        addr = builder.add(_splat_n(builder, base, vi64), builder.shl(idx, ir.Constant(vi64, [3] * n)))
        ptrs = builder.inttoptr(addr, ir.VectorType(_I64.as_pointer(), n))
        mask = ir.Constant(ir.VectorType(ir.IntType(1), n), [1] * n)
        gty = ir.FunctionType(vi64, [ptrs.type, _I32, mask.type, vi64])
        gather = cgutils.get_or_insert_function(mod, gty, f"llvm.masked.gather.v{n}i64.v{n}p0")
        t = builder.call(gather, [ptrs, ir.Constant(_I32, 8), mask, ir.Constant(vi64, ir.Undefined)])
    else:
        t = ir.Constant(vi64, ir.Undefined)
        for j in range(n):
            lane = ir.Constant(_I32, j)
            e = builder.load(builder.gep(tab, [zero, builder.extract_element(idx, lane)]))
            t = builder.insert_element(t, e, lane)
    t = builder.add(t, builder.shl(ki, ir.Constant(vi64, [52 - 5] * n)))
    s = builder.bitcast(t, vf64)
    c0, c1, c2 = _EXPF_C
    zz = builder.call(fma, [dsplat(c0), r, dsplat(c1)])
    r2 = builder.fmul(r, r)
    y = builder.call(fma, [dsplat(c2), r, dsplat(1.0)])
    y = builder.call(fma, [zz, r2, y])
    y = builder.fmul(y, s)
    return builder.fptrunc(y, ir.VectorType(_F32, n))


def _splat_n(builder, scalar, vty):
    """Broadcast an LLVM scalar to every lane of ``vty`` (any lane count)."""
    undef = ir.Constant(vty, ir.Undefined)
    w = builder.insert_element(undef, scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(w, undef, ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count))


@intrinsic
def vexpf(typingctx, v):
    """``expf`` per lane, glibc's bits, for lanes with |x| < 88 (others: undefined)."""
    if v != f32x8:
        return None
    sig = f32x8(v)

    def codegen(context, builder, sig, args):
        return _vexpf_ir(builder, args[0])

    return sig, codegen


@intrinsic
def vswish(typingctx, v):
    """AlexeyAB's swish per lane, ``x * (1.f / (1.f + expf(-x)))`` in float32, for |x| < 88."""
    if v not in _FVECS:
        return None
    sig = v(v)

    def codegen(context, builder, sig, args):
        one = ir.Constant(args[0].type, [1.0] * args[0].type.count)
        e = _vexpf_ir(builder, builder.fneg(args[0]))
        return builder.fmul(args[0], builder.fdiv(one, builder.fadd(one, e)))

    return sig, codegen


@intrinsic
def vlogistic_f32(typingctx, v):
    """AlexeyAB's logistic per lane, ``1.f / (1.f + expf(-x))`` in float32, for |x| < 88."""
    if v not in _FVECS:
        return None
    sig = v(v)

    def codegen(context, builder, sig, args):
        one = ir.Constant(args[0].type, [1.0] * args[0].type.count)
        return builder.fdiv(one, builder.fadd(one, _vexpf_ir(builder, builder.fneg(args[0]))))

    return sig, codegen


@intrinsic
def vall_abs_below(typingctx, v, c):
    """True when every lane of ``v`` has ``|x| < c`` (False for any NaN lane)."""
    if not (v in _FVECS and c == types.float32):
        return None
    sig = types.boolean(v, c)

    def codegen(context, builder, sig, args):
        vty = args[0].type
        n = vty.count
        fabs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty]), f"llvm.fabs.v{n}f32")
        below = builder.fcmp_ordered("<", builder.call(fabs, [args[0]]), _splat_n(builder, args[1], vty))
        bits = builder.bitcast(below, ir.IntType(n))
        return builder.icmp_unsigned("==", bits, ir.Constant(ir.IntType(n), (1 << n) - 1))

    return sig, codegen
