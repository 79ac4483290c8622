"""2-D convolution (darknet ``[convolutional]``), float32, CHW, single image.

Exact (default) path
--------------------
The convolution is the GEMM ``out[Co, N] = W[Co, K] @ B[K, N]`` with ``K = C*k*k`` (index
``kk = (c*k + ky)*k + kx``, the order of ``weight.reshape(Co, -1)``) and ``N = out_h*out_w``
pixels, where ``B`` is the implicit im2col matrix of the zero-padded input. It is computed with a
hand-written, BLIS-style blocked GEMM:

* ``B`` is packed (im2col on the fly) in blocks of ``KC`` rows x ``NC`` pixels into panels of
  ``NR = 24`` pixels: ``[panel][kk][24]``, the last panel zero-padded to 24.
* ``W`` is read in place, ``MR = 4`` rows (output channels) at a time; only a last partial
  row block is copied, zero-padded to 4 rows. (Packing W on every call cost up to 25% on small
  tiles, whose weights are as large as a full frame's.)
* A 4 x 24 micro-kernel keeps 12 ``<8 x float>`` accumulators in registers and, for each kk,
  does 3 vector loads of ``B``, 4 broadcasts of ``W`` and 12 ``fma`` (see ``_simd.py``). On
  targets with 32 vector registers (AVX-512VL) it is 8 x 24 (``MR = 8``: 24 accumulators), with
  8 x 8 and 8 x 16 variants for a last panel of at most 8 or 16 pixels.
* Where the target has AVX-512F (``ZMM``), a variant runs on ``<16 x float>`` vectors (``zmm``):
  panels of ``NRZ = 48`` pixels, 8 x 48 blocks (24 zmm accumulators), 8 x 16 and 8 x 32 for a
  last panel (:func:`_conv2d_exact_z`). Measured on a Sapphire-Rapids-class Xeon, single
  thread: 1.3-1.6x the 8-lane kernel's speed on YOLOv2's layers.

Two direct paths (no packing) cover the shapes where the GEMM wastes most: grouped
convolutions with at most ``DIRECT_MAX_CG`` input channels per group (depthwise), and, where
``MR = 8``, ungrouped ones with few input channels (``DIRECT8_MAX_C``/``DIRECT8_MAX_K``: the
first layer of every YOLO, C = 3). Both copy the input once into zero-padded, row/column
phase-split planes, so that tap ``kk`` of every output is at a constant offset, and run the
same chain per element (see ``_conv2d_direct``; its blocks are 16-lane where ``ZMM``, which
gains only 2-10%: the depthwise layers are bound by the phase-plane copy, not by the fma).

Why this is bit-exact under tiling: every output element is computed as::

    acc = +0.0
    for kk in 0..K-1:               # always this order, whatever the blocking
        acc = fma(W[co, kk], X[kk, pixel], acc)     # one rounding per step
    out = act(acc + bias[co])

Nothing in that chain depends on where the pixel sits in a panel, on the tile size, on the
blocking, on the register block (4 or 8 rows, 8/16/24/32/48 lanes, 8- or 16-lane vectors) or on
the path (GEMM or direct): ``K`` blocks are consecutive ranges of ``kk`` (the partial sum is stored as float32
between blocks, which is exactly what the register held), every lane of every vector runs the
same ``fma``, the zero padding of the last panel/row block only feeds lanes that are discarded, and
there is no scalar remainder path with different rounding. Two calls that see the same ``X``
values for a pixel therefore produce the same bits, which is what fused-tile inference needs.
BLAS does not give this (its kernels reorder/split the reduction depending on the shape).

Portability of the bits: the path uses only IEEE float32 add/fma and float64 multiply (leaky),
never ``fastmath`` and never a library reduction, so linear/leaky/relu layers give the same bits
on any IEEE machine Numba targets (with or without hardware FMA, AVX2 or NEON). The logistic
activation calls the platform libm's ``exp`` and can differ by an ulp between libm versions.

Design notes (measured, Zen 3, single thread): the micro-kernel reaches 76-90 GFLOP/s with its
operands in cache; packing B costs 3-12% of a 3x3 layer. An "implicit GEMM" variant (no im2col:
the micro-kernel reading a zero-padded copy of the input through a per-kk offset table) was
tried and was 10-30% *slower* on YOLOv2's layers: each tile then gathers from C*k different
input rows, which the hardware prefetchers cannot follow when the input is L3-resident, while
packed panels are read as one sequential stream.

Fast path
---------
``exact=False`` uses im2col (Numba) + BLAS ``sgemm`` (numpy's ``np.dot``) + a bias/activation
pass (Numba). It is *not* tile-invariant and exists for comparison and for callers that do not
tile.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._config import JIT_OPTS
from ._validate import output_array
from ._simd import (target_features, vadd, vbcast, vbcast16, vdeinterleave, vfma, vleaky, vload, vload16,
                    vmaskgather, vmaskload, vmaskload2, vrelu, vrelu6, vstore, vstore16, vstoren, vzero, vzero16)
from .activations import (ACT_LEAKY, ACT_LINEAR, ACT_LOGISTIC, ACT_RELU, ACT_RELU6, _act_code, _activate_flat,
                          _logistic32, act_scalar)

# Register block: MR output channels x NR pixels (NR = 3 AVX2 vectors). 12 accumulators + 3 B
# vectors + 1 broadcast = 16 ymm registers. Where the target has 32 vector registers
# (AVX-512VL: ymm0-31) the block is 8 x 24 (24 accumulators): about half the loads per fma;
# measured on Zen 4 (interleaved, the same process) 11% faster over YOLOv3-tiny's and YOLOv2's
# layer shapes (-5%..+15% per layer). The block size never changes an element's chain of fma, only which
# elements are computed together, so the bits are the same either way (tested).


def _vector_registers() -> int:
    """32 if Numba's target has AVX-512VL (32 ymm registers), else 16 (AVX2; NEON's 32 q
    registers hold 16 <8 x float>)."""
    return 32 if "+avx512vl" in target_features() else 16


MR = 8 if _vector_registers() == 32 else 4
NR = 24
#: Where the target has AVX-512F, the GEMM runs on 16-lane vectors (``zmm``): 48-pixel panels
#: and 8 x 48 register blocks (:func:`_conv2d_exact_z`). Each element's chain of fma is the
#: same, so the bits are; a module switch so tests can force either path on any machine
#: (elsewhere LLVM splits the 16-lane vectors into 8-lane ones, with the same arithmetic).
ZMM = "+avx512f" in target_features() and MR == 8
NRZ = 48  # pixels per panel of the 16-lane variant (3 zmm)
NCZ = NRZ * 4  # pixels per packed B block of the 16-lane variant
# Cache blocking, tuned on Zen 3 (32 KiB L1d, 512 KiB L2 per core, 32 MiB L3) with interleaved
# side-by-side runs of all 12 conv layers of YOLOv2's first 16 (bench/kernels.py shapes):
# * ORDER = 1: for each MR-row W sliver, sweep the B panels of the packed block. It beat the
#   BLIS order (B sliver in L1, W slivers streaming) on every layer, by 2x on the 608x608 layer
#   where K = 27 and the 32 output rows are 608*608*4 bytes apart (a multiple of 4 KiB: every
#   row maps to the same cache sets, so writing few rows at a time matters).
# * KC = 2304: no K blocking up to 512 input channels for 3x3 (K blocks larger than this are
#   split evenly). Splitting K (KC = 256) was ~8% slower overall: each extra K block reloads the
#   partial sums of every tile from L2/L3 at the start of the micro-kernel, which is latency the
#   FMA chains wait for. The packed B block (KC x NC floats, up to 1.7 MiB) is read as
#   sequential streams, which the prefetchers keep up with even from L3.
# * NC = 192 pixels (8 panels) per packed block; 96..768 were within noise of each other.
KC = 2304  # K block (balanced: ceil(K/KC) blocks of equal size)
NC = NR * 8  # pixels per packed B block
MC = 128  # output channels per W block (only matters for ORDER = 0)
ORDER = 1
PACK_GROUP = 16  # B panels packed together, row of B by row of B (see _pack_b)


# --------------------------------------------------------------------------------------------
# Micro-kernel
# --------------------------------------------------------------------------------------------


@njit(inline="always", **JIT_OPTS)
def _mk_4x24(kc, a, ao, lda, bp, bo, c, co, ldc, init, epi, bias, bo_bias):
    """``C[4, 24] (+)= A[4, kc] @ Bp[kc, 24]`` with accumulators in registers.

    Row ``r`` of the W sliver is ``a[ao + r*lda : ao + r*lda + kc]`` (W itself, row-major: no
    packing, so the weights are not copied on every call); ``bp[bo:]`` is a packed B panel
    ``[kk][24]``;
    ``c[co + r*ldc + j]`` the destination. ``init``: start from the values in ``c`` (a previous
    K block) instead of +0.0. ``epi`` (last K block only): 0 = store the raw sum, otherwise add
    ``bias[bo_bias + r]`` and apply the activation (1 linear, 2 leaky, 3 relu; logistic is
    applied by the caller after a linear epilogue).
    """
    if init:
        c00 = vload(c, co)
        c01 = vload(c, co + 8)
        c02 = vload(c, co + 16)
        c10 = vload(c, co + ldc)
        c11 = vload(c, co + ldc + 8)
        c12 = vload(c, co + ldc + 16)
        c20 = vload(c, co + 2 * ldc)
        c21 = vload(c, co + 2 * ldc + 8)
        c22 = vload(c, co + 2 * ldc + 16)
        c30 = vload(c, co + 3 * ldc)
        c31 = vload(c, co + 3 * ldc + 8)
        c32 = vload(c, co + 3 * ldc + 16)
    else:
        c00 = vzero()
        c01 = vzero()
        c02 = vzero()
        c10 = vzero()
        c11 = vzero()
        c12 = vzero()
        c20 = vzero()
        c21 = vzero()
        c22 = vzero()
        c30 = vzero()
        c31 = vzero()
        c32 = vzero()
    for _ in range(kc):
        b0 = vload(bp, bo)
        b1 = vload(bp, bo + 8)
        b2 = vload(bp, bo + 16)
        w = vbcast(a, ao)
        c00 = vfma(w, b0, c00)
        c01 = vfma(w, b1, c01)
        c02 = vfma(w, b2, c02)
        w = vbcast(a, ao + lda)
        c10 = vfma(w, b0, c10)
        c11 = vfma(w, b1, c11)
        c12 = vfma(w, b2, c12)
        w = vbcast(a, ao + 2 * lda)
        c20 = vfma(w, b0, c20)
        c21 = vfma(w, b1, c21)
        c22 = vfma(w, b2, c22)
        w = vbcast(a, ao + 3 * lda)
        c30 = vfma(w, b0, c30)
        c31 = vfma(w, b1, c31)
        c32 = vfma(w, b2, c32)
        ao += 1
        bo += NR
    if epi != 0:
        # Darknet order: the full sum first, then + bias, then the activation.
        bv = vbcast(bias, bo_bias)
        c00 = vadd(c00, bv)
        c01 = vadd(c01, bv)
        c02 = vadd(c02, bv)
        bv = vbcast(bias, bo_bias + 1)
        c10 = vadd(c10, bv)
        c11 = vadd(c11, bv)
        c12 = vadd(c12, bv)
        bv = vbcast(bias, bo_bias + 2)
        c20 = vadd(c20, bv)
        c21 = vadd(c21, bv)
        c22 = vadd(c22, bv)
        bv = vbcast(bias, bo_bias + 3)
        c30 = vadd(c30, bv)
        c31 = vadd(c31, bv)
        c32 = vadd(c32, bv)
        if epi == 2:
            c00 = vleaky(c00)
            c01 = vleaky(c01)
            c02 = vleaky(c02)
            c10 = vleaky(c10)
            c11 = vleaky(c11)
            c12 = vleaky(c12)
            c20 = vleaky(c20)
            c21 = vleaky(c21)
            c22 = vleaky(c22)
            c30 = vleaky(c30)
            c31 = vleaky(c31)
            c32 = vleaky(c32)
        elif epi == 3:
            c00 = vrelu(c00)
            c01 = vrelu(c01)
            c02 = vrelu(c02)
            c10 = vrelu(c10)
            c11 = vrelu(c11)
            c12 = vrelu(c12)
            c20 = vrelu(c20)
            c21 = vrelu(c21)
            c22 = vrelu(c22)
            c30 = vrelu(c30)
            c31 = vrelu(c31)
            c32 = vrelu(c32)
    vstore(c, co, c00)
    vstore(c, co + 8, c01)
    vstore(c, co + 16, c02)
    vstore(c, co + ldc, c10)
    vstore(c, co + ldc + 8, c11)
    vstore(c, co + ldc + 16, c12)
    vstore(c, co + 2 * ldc, c20)
    vstore(c, co + 2 * ldc + 8, c21)
    vstore(c, co + 2 * ldc + 16, c22)
    vstore(c, co + 3 * ldc, c30)
    vstore(c, co + 3 * ldc + 8, c31)
    vstore(c, co + 3 * ldc + 16, c32)


@njit(inline="always", **JIT_OPTS)
def _mk_8x24(kc, a, ao, lda, bp, bo, c, co, ldc, init, epi, bias, bo_bias):
    """:func:`_mk_4x24` with 8 rows: 24 accumulators, for targets with 32 vector registers
    (AVX-512VL's ymm0-31); the same chain of fma per element, so the same bits."""
    if init:
        c00 = vload(c, co)
        c01 = vload(c, co + 8)
        c02 = vload(c, co + 16)
        c10 = vload(c, co + 1 * ldc)
        c11 = vload(c, co + 1 * ldc + 8)
        c12 = vload(c, co + 1 * ldc + 16)
        c20 = vload(c, co + 2 * ldc)
        c21 = vload(c, co + 2 * ldc + 8)
        c22 = vload(c, co + 2 * ldc + 16)
        c30 = vload(c, co + 3 * ldc)
        c31 = vload(c, co + 3 * ldc + 8)
        c32 = vload(c, co + 3 * ldc + 16)
        c40 = vload(c, co + 4 * ldc)
        c41 = vload(c, co + 4 * ldc + 8)
        c42 = vload(c, co + 4 * ldc + 16)
        c50 = vload(c, co + 5 * ldc)
        c51 = vload(c, co + 5 * ldc + 8)
        c52 = vload(c, co + 5 * ldc + 16)
        c60 = vload(c, co + 6 * ldc)
        c61 = vload(c, co + 6 * ldc + 8)
        c62 = vload(c, co + 6 * ldc + 16)
        c70 = vload(c, co + 7 * ldc)
        c71 = vload(c, co + 7 * ldc + 8)
        c72 = vload(c, co + 7 * ldc + 16)
    else:
        c00 = vzero()
        c01 = vzero()
        c02 = vzero()
        c10 = vzero()
        c11 = vzero()
        c12 = vzero()
        c20 = vzero()
        c21 = vzero()
        c22 = vzero()
        c30 = vzero()
        c31 = vzero()
        c32 = vzero()
        c40 = vzero()
        c41 = vzero()
        c42 = vzero()
        c50 = vzero()
        c51 = vzero()
        c52 = vzero()
        c60 = vzero()
        c61 = vzero()
        c62 = vzero()
        c70 = vzero()
        c71 = vzero()
        c72 = vzero()
    for _ in range(kc):
        b0 = vload(bp, bo)
        b1 = vload(bp, bo + 8)
        b2 = vload(bp, bo + 16)
        w = vbcast(a, ao)
        c00 = vfma(w, b0, c00)
        c01 = vfma(w, b1, c01)
        c02 = vfma(w, b2, c02)
        w = vbcast(a, ao + 1 * lda)
        c10 = vfma(w, b0, c10)
        c11 = vfma(w, b1, c11)
        c12 = vfma(w, b2, c12)
        w = vbcast(a, ao + 2 * lda)
        c20 = vfma(w, b0, c20)
        c21 = vfma(w, b1, c21)
        c22 = vfma(w, b2, c22)
        w = vbcast(a, ao + 3 * lda)
        c30 = vfma(w, b0, c30)
        c31 = vfma(w, b1, c31)
        c32 = vfma(w, b2, c32)
        w = vbcast(a, ao + 4 * lda)
        c40 = vfma(w, b0, c40)
        c41 = vfma(w, b1, c41)
        c42 = vfma(w, b2, c42)
        w = vbcast(a, ao + 5 * lda)
        c50 = vfma(w, b0, c50)
        c51 = vfma(w, b1, c51)
        c52 = vfma(w, b2, c52)
        w = vbcast(a, ao + 6 * lda)
        c60 = vfma(w, b0, c60)
        c61 = vfma(w, b1, c61)
        c62 = vfma(w, b2, c62)
        w = vbcast(a, ao + 7 * lda)
        c70 = vfma(w, b0, c70)
        c71 = vfma(w, b1, c71)
        c72 = vfma(w, b2, c72)
        ao += 1
        bo += NR
    if epi != 0:
        bv = vbcast(bias, bo_bias)
        c00 = vadd(c00, bv)
        c01 = vadd(c01, bv)
        c02 = vadd(c02, bv)
        bv = vbcast(bias, bo_bias + 1)
        c10 = vadd(c10, bv)
        c11 = vadd(c11, bv)
        c12 = vadd(c12, bv)
        bv = vbcast(bias, bo_bias + 2)
        c20 = vadd(c20, bv)
        c21 = vadd(c21, bv)
        c22 = vadd(c22, bv)
        bv = vbcast(bias, bo_bias + 3)
        c30 = vadd(c30, bv)
        c31 = vadd(c31, bv)
        c32 = vadd(c32, bv)
        bv = vbcast(bias, bo_bias + 4)
        c40 = vadd(c40, bv)
        c41 = vadd(c41, bv)
        c42 = vadd(c42, bv)
        bv = vbcast(bias, bo_bias + 5)
        c50 = vadd(c50, bv)
        c51 = vadd(c51, bv)
        c52 = vadd(c52, bv)
        bv = vbcast(bias, bo_bias + 6)
        c60 = vadd(c60, bv)
        c61 = vadd(c61, bv)
        c62 = vadd(c62, bv)
        bv = vbcast(bias, bo_bias + 7)
        c70 = vadd(c70, bv)
        c71 = vadd(c71, bv)
        c72 = vadd(c72, bv)
        if epi == 2:
            c00 = vleaky(c00)
            c01 = vleaky(c01)
            c02 = vleaky(c02)
            c10 = vleaky(c10)
            c11 = vleaky(c11)
            c12 = vleaky(c12)
            c20 = vleaky(c20)
            c21 = vleaky(c21)
            c22 = vleaky(c22)
            c30 = vleaky(c30)
            c31 = vleaky(c31)
            c32 = vleaky(c32)
            c40 = vleaky(c40)
            c41 = vleaky(c41)
            c42 = vleaky(c42)
            c50 = vleaky(c50)
            c51 = vleaky(c51)
            c52 = vleaky(c52)
            c60 = vleaky(c60)
            c61 = vleaky(c61)
            c62 = vleaky(c62)
            c70 = vleaky(c70)
            c71 = vleaky(c71)
            c72 = vleaky(c72)
        elif epi == 3:
            c00 = vrelu(c00)
            c01 = vrelu(c01)
            c02 = vrelu(c02)
            c10 = vrelu(c10)
            c11 = vrelu(c11)
            c12 = vrelu(c12)
            c20 = vrelu(c20)
            c21 = vrelu(c21)
            c22 = vrelu(c22)
            c30 = vrelu(c30)
            c31 = vrelu(c31)
            c32 = vrelu(c32)
            c40 = vrelu(c40)
            c41 = vrelu(c41)
            c42 = vrelu(c42)
            c50 = vrelu(c50)
            c51 = vrelu(c51)
            c52 = vrelu(c52)
            c60 = vrelu(c60)
            c61 = vrelu(c61)
            c62 = vrelu(c62)
            c70 = vrelu(c70)
            c71 = vrelu(c71)
            c72 = vrelu(c72)
    vstore(c, co, c00)
    vstore(c, co + 8, c01)
    vstore(c, co + 16, c02)
    vstore(c, co + 1 * ldc, c10)
    vstore(c, co + 1 * ldc + 8, c11)
    vstore(c, co + 1 * ldc + 16, c12)
    vstore(c, co + 2 * ldc, c20)
    vstore(c, co + 2 * ldc + 8, c21)
    vstore(c, co + 2 * ldc + 16, c22)
    vstore(c, co + 3 * ldc, c30)
    vstore(c, co + 3 * ldc + 8, c31)
    vstore(c, co + 3 * ldc + 16, c32)
    vstore(c, co + 4 * ldc, c40)
    vstore(c, co + 4 * ldc + 8, c41)
    vstore(c, co + 4 * ldc + 16, c42)
    vstore(c, co + 5 * ldc, c50)
    vstore(c, co + 5 * ldc + 8, c51)
    vstore(c, co + 5 * ldc + 16, c52)
    vstore(c, co + 6 * ldc, c60)
    vstore(c, co + 6 * ldc + 8, c61)
    vstore(c, co + 6 * ldc + 16, c62)
    vstore(c, co + 7 * ldc, c70)
    vstore(c, co + 7 * ldc + 8, c71)
    vstore(c, co + 7 * ldc + 16, c72)



@njit(inline="always", **JIT_OPTS)
def _mk_8x8(kc, a, ao, lda, bp, bo, c, co, ldc, init, epi, bias, bo_bias):
    """The first 8 lanes of :func:`_mk_8x24` (a last panel with at most 8 pixels: a
    13x13 map is 7 panels and 1 pixel); the same chain of fma per element."""
    if init:
        c00 = vload(c, co)
        c10 = vload(c, co + 1 * ldc)
        c20 = vload(c, co + 2 * ldc)
        c30 = vload(c, co + 3 * ldc)
        c40 = vload(c, co + 4 * ldc)
        c50 = vload(c, co + 5 * ldc)
        c60 = vload(c, co + 6 * ldc)
        c70 = vload(c, co + 7 * ldc)
    else:
        c00 = vzero()
        c10 = vzero()
        c20 = vzero()
        c30 = vzero()
        c40 = vzero()
        c50 = vzero()
        c60 = vzero()
        c70 = vzero()
    for _ in range(kc):
        b0 = vload(bp, bo)
        w = vbcast(a, ao)
        c00 = vfma(w, b0, c00)
        w = vbcast(a, ao + 1 * lda)
        c10 = vfma(w, b0, c10)
        w = vbcast(a, ao + 2 * lda)
        c20 = vfma(w, b0, c20)
        w = vbcast(a, ao + 3 * lda)
        c30 = vfma(w, b0, c30)
        w = vbcast(a, ao + 4 * lda)
        c40 = vfma(w, b0, c40)
        w = vbcast(a, ao + 5 * lda)
        c50 = vfma(w, b0, c50)
        w = vbcast(a, ao + 6 * lda)
        c60 = vfma(w, b0, c60)
        w = vbcast(a, ao + 7 * lda)
        c70 = vfma(w, b0, c70)
        ao += 1
        bo += NR
    if epi != 0:
        bv = vbcast(bias, bo_bias)
        c00 = vadd(c00, bv)
        bv = vbcast(bias, bo_bias + 1)
        c10 = vadd(c10, bv)
        bv = vbcast(bias, bo_bias + 2)
        c20 = vadd(c20, bv)
        bv = vbcast(bias, bo_bias + 3)
        c30 = vadd(c30, bv)
        bv = vbcast(bias, bo_bias + 4)
        c40 = vadd(c40, bv)
        bv = vbcast(bias, bo_bias + 5)
        c50 = vadd(c50, bv)
        bv = vbcast(bias, bo_bias + 6)
        c60 = vadd(c60, bv)
        bv = vbcast(bias, bo_bias + 7)
        c70 = vadd(c70, bv)
        if epi == 2:
            c00 = vleaky(c00)
            c10 = vleaky(c10)
            c20 = vleaky(c20)
            c30 = vleaky(c30)
            c40 = vleaky(c40)
            c50 = vleaky(c50)
            c60 = vleaky(c60)
            c70 = vleaky(c70)
        elif epi == 3:
            c00 = vrelu(c00)
            c10 = vrelu(c10)
            c20 = vrelu(c20)
            c30 = vrelu(c30)
            c40 = vrelu(c40)
            c50 = vrelu(c50)
            c60 = vrelu(c60)
            c70 = vrelu(c70)
    vstore(c, co, c00)
    vstore(c, co + 1 * ldc, c10)
    vstore(c, co + 2 * ldc, c20)
    vstore(c, co + 3 * ldc, c30)
    vstore(c, co + 4 * ldc, c40)
    vstore(c, co + 5 * ldc, c50)
    vstore(c, co + 6 * ldc, c60)
    vstore(c, co + 7 * ldc, c70)


@njit(inline="always", **JIT_OPTS)
def _mk_8x16(kc, a, ao, lda, bp, bo, c, co, ldc, init, epi, bias, bo_bias):
    """The first 16 lanes of :func:`_mk_8x24` (a last panel with at most 16 pixels: a
    13x13 map is 7 panels and 1 pixel); the same chain of fma per element."""
    if init:
        c00 = vload(c, co)
        c01 = vload(c, co + 8)
        c10 = vload(c, co + 1 * ldc)
        c11 = vload(c, co + 1 * ldc + 8)
        c20 = vload(c, co + 2 * ldc)
        c21 = vload(c, co + 2 * ldc + 8)
        c30 = vload(c, co + 3 * ldc)
        c31 = vload(c, co + 3 * ldc + 8)
        c40 = vload(c, co + 4 * ldc)
        c41 = vload(c, co + 4 * ldc + 8)
        c50 = vload(c, co + 5 * ldc)
        c51 = vload(c, co + 5 * ldc + 8)
        c60 = vload(c, co + 6 * ldc)
        c61 = vload(c, co + 6 * ldc + 8)
        c70 = vload(c, co + 7 * ldc)
        c71 = vload(c, co + 7 * ldc + 8)
    else:
        c00 = vzero()
        c01 = vzero()
        c10 = vzero()
        c11 = vzero()
        c20 = vzero()
        c21 = vzero()
        c30 = vzero()
        c31 = vzero()
        c40 = vzero()
        c41 = vzero()
        c50 = vzero()
        c51 = vzero()
        c60 = vzero()
        c61 = vzero()
        c70 = vzero()
        c71 = vzero()
    for _ in range(kc):
        b0 = vload(bp, bo)
        b1 = vload(bp, bo + 8)
        w = vbcast(a, ao)
        c00 = vfma(w, b0, c00)
        c01 = vfma(w, b1, c01)
        w = vbcast(a, ao + 1 * lda)
        c10 = vfma(w, b0, c10)
        c11 = vfma(w, b1, c11)
        w = vbcast(a, ao + 2 * lda)
        c20 = vfma(w, b0, c20)
        c21 = vfma(w, b1, c21)
        w = vbcast(a, ao + 3 * lda)
        c30 = vfma(w, b0, c30)
        c31 = vfma(w, b1, c31)
        w = vbcast(a, ao + 4 * lda)
        c40 = vfma(w, b0, c40)
        c41 = vfma(w, b1, c41)
        w = vbcast(a, ao + 5 * lda)
        c50 = vfma(w, b0, c50)
        c51 = vfma(w, b1, c51)
        w = vbcast(a, ao + 6 * lda)
        c60 = vfma(w, b0, c60)
        c61 = vfma(w, b1, c61)
        w = vbcast(a, ao + 7 * lda)
        c70 = vfma(w, b0, c70)
        c71 = vfma(w, b1, c71)
        ao += 1
        bo += NR
    if epi != 0:
        bv = vbcast(bias, bo_bias)
        c00 = vadd(c00, bv)
        c01 = vadd(c01, bv)
        bv = vbcast(bias, bo_bias + 1)
        c10 = vadd(c10, bv)
        c11 = vadd(c11, bv)
        bv = vbcast(bias, bo_bias + 2)
        c20 = vadd(c20, bv)
        c21 = vadd(c21, bv)
        bv = vbcast(bias, bo_bias + 3)
        c30 = vadd(c30, bv)
        c31 = vadd(c31, bv)
        bv = vbcast(bias, bo_bias + 4)
        c40 = vadd(c40, bv)
        c41 = vadd(c41, bv)
        bv = vbcast(bias, bo_bias + 5)
        c50 = vadd(c50, bv)
        c51 = vadd(c51, bv)
        bv = vbcast(bias, bo_bias + 6)
        c60 = vadd(c60, bv)
        c61 = vadd(c61, bv)
        bv = vbcast(bias, bo_bias + 7)
        c70 = vadd(c70, bv)
        c71 = vadd(c71, bv)
        if epi == 2:
            c00 = vleaky(c00)
            c01 = vleaky(c01)
            c10 = vleaky(c10)
            c11 = vleaky(c11)
            c20 = vleaky(c20)
            c21 = vleaky(c21)
            c30 = vleaky(c30)
            c31 = vleaky(c31)
            c40 = vleaky(c40)
            c41 = vleaky(c41)
            c50 = vleaky(c50)
            c51 = vleaky(c51)
            c60 = vleaky(c60)
            c61 = vleaky(c61)
            c70 = vleaky(c70)
            c71 = vleaky(c71)
        elif epi == 3:
            c00 = vrelu(c00)
            c01 = vrelu(c01)
            c10 = vrelu(c10)
            c11 = vrelu(c11)
            c20 = vrelu(c20)
            c21 = vrelu(c21)
            c30 = vrelu(c30)
            c31 = vrelu(c31)
            c40 = vrelu(c40)
            c41 = vrelu(c41)
            c50 = vrelu(c50)
            c51 = vrelu(c51)
            c60 = vrelu(c60)
            c61 = vrelu(c61)
            c70 = vrelu(c70)
            c71 = vrelu(c71)
    vstore(c, co, c00)
    vstore(c, co + 8, c01)
    vstore(c, co + 1 * ldc, c10)
    vstore(c, co + 1 * ldc + 8, c11)
    vstore(c, co + 2 * ldc, c20)
    vstore(c, co + 2 * ldc + 8, c21)
    vstore(c, co + 3 * ldc, c30)
    vstore(c, co + 3 * ldc + 8, c31)
    vstore(c, co + 4 * ldc, c40)
    vstore(c, co + 4 * ldc + 8, c41)
    vstore(c, co + 5 * ldc, c50)
    vstore(c, co + 5 * ldc + 8, c51)
    vstore(c, co + 6 * ldc, c60)
    vstore(c, co + 6 * ldc + 8, c61)
    vstore(c, co + 7 * ldc, c70)
    vstore(c, co + 7 * ldc + 8, c71)



@njit(inline="always", **JIT_OPTS)
def _mk_z8x48(kc, a, ao, lda, bp, bo, c, co, ldc, init, epi, bias, bo_bias):
    """:func:`_mk_8x24` on a 48-pixel panel with 16-lane vectors (AVX-512F: 24 ``zmm``
    accumulators, 3 B vectors and a broadcast of 32 registers); each element's chain of fma is
    the same as in the 8-lane kernels, so the bits are the same."""
    if init:
        c00 = vload16(c, co)
        c01 = vload16(c, co + 16)
        c02 = vload16(c, co + 32)
        c10 = vload16(c, co + 1 * ldc)
        c11 = vload16(c, co + 1 * ldc + 16)
        c12 = vload16(c, co + 1 * ldc + 32)
        c20 = vload16(c, co + 2 * ldc)
        c21 = vload16(c, co + 2 * ldc + 16)
        c22 = vload16(c, co + 2 * ldc + 32)
        c30 = vload16(c, co + 3 * ldc)
        c31 = vload16(c, co + 3 * ldc + 16)
        c32 = vload16(c, co + 3 * ldc + 32)
        c40 = vload16(c, co + 4 * ldc)
        c41 = vload16(c, co + 4 * ldc + 16)
        c42 = vload16(c, co + 4 * ldc + 32)
        c50 = vload16(c, co + 5 * ldc)
        c51 = vload16(c, co + 5 * ldc + 16)
        c52 = vload16(c, co + 5 * ldc + 32)
        c60 = vload16(c, co + 6 * ldc)
        c61 = vload16(c, co + 6 * ldc + 16)
        c62 = vload16(c, co + 6 * ldc + 32)
        c70 = vload16(c, co + 7 * ldc)
        c71 = vload16(c, co + 7 * ldc + 16)
        c72 = vload16(c, co + 7 * ldc + 32)
    else:
        c00 = vzero16()
        c01 = vzero16()
        c02 = vzero16()
        c10 = vzero16()
        c11 = vzero16()
        c12 = vzero16()
        c20 = vzero16()
        c21 = vzero16()
        c22 = vzero16()
        c30 = vzero16()
        c31 = vzero16()
        c32 = vzero16()
        c40 = vzero16()
        c41 = vzero16()
        c42 = vzero16()
        c50 = vzero16()
        c51 = vzero16()
        c52 = vzero16()
        c60 = vzero16()
        c61 = vzero16()
        c62 = vzero16()
        c70 = vzero16()
        c71 = vzero16()
        c72 = vzero16()
    for _ in range(kc):
        b0 = vload16(bp, bo)
        b1 = vload16(bp, bo + 16)
        b2 = vload16(bp, bo + 32)
        w = vbcast16(a, ao)
        c00 = vfma(w, b0, c00)
        c01 = vfma(w, b1, c01)
        c02 = vfma(w, b2, c02)
        w = vbcast16(a, ao + 1 * lda)
        c10 = vfma(w, b0, c10)
        c11 = vfma(w, b1, c11)
        c12 = vfma(w, b2, c12)
        w = vbcast16(a, ao + 2 * lda)
        c20 = vfma(w, b0, c20)
        c21 = vfma(w, b1, c21)
        c22 = vfma(w, b2, c22)
        w = vbcast16(a, ao + 3 * lda)
        c30 = vfma(w, b0, c30)
        c31 = vfma(w, b1, c31)
        c32 = vfma(w, b2, c32)
        w = vbcast16(a, ao + 4 * lda)
        c40 = vfma(w, b0, c40)
        c41 = vfma(w, b1, c41)
        c42 = vfma(w, b2, c42)
        w = vbcast16(a, ao + 5 * lda)
        c50 = vfma(w, b0, c50)
        c51 = vfma(w, b1, c51)
        c52 = vfma(w, b2, c52)
        w = vbcast16(a, ao + 6 * lda)
        c60 = vfma(w, b0, c60)
        c61 = vfma(w, b1, c61)
        c62 = vfma(w, b2, c62)
        w = vbcast16(a, ao + 7 * lda)
        c70 = vfma(w, b0, c70)
        c71 = vfma(w, b1, c71)
        c72 = vfma(w, b2, c72)
        ao += 1
        bo += NRZ
    if epi != 0:
        bv = vbcast16(bias, bo_bias)
        c00 = vadd(c00, bv)
        c01 = vadd(c01, bv)
        c02 = vadd(c02, bv)
        bv = vbcast16(bias, bo_bias + 1)
        c10 = vadd(c10, bv)
        c11 = vadd(c11, bv)
        c12 = vadd(c12, bv)
        bv = vbcast16(bias, bo_bias + 2)
        c20 = vadd(c20, bv)
        c21 = vadd(c21, bv)
        c22 = vadd(c22, bv)
        bv = vbcast16(bias, bo_bias + 3)
        c30 = vadd(c30, bv)
        c31 = vadd(c31, bv)
        c32 = vadd(c32, bv)
        bv = vbcast16(bias, bo_bias + 4)
        c40 = vadd(c40, bv)
        c41 = vadd(c41, bv)
        c42 = vadd(c42, bv)
        bv = vbcast16(bias, bo_bias + 5)
        c50 = vadd(c50, bv)
        c51 = vadd(c51, bv)
        c52 = vadd(c52, bv)
        bv = vbcast16(bias, bo_bias + 6)
        c60 = vadd(c60, bv)
        c61 = vadd(c61, bv)
        c62 = vadd(c62, bv)
        bv = vbcast16(bias, bo_bias + 7)
        c70 = vadd(c70, bv)
        c71 = vadd(c71, bv)
        c72 = vadd(c72, bv)
        if epi == 2:
            c00 = vleaky(c00)
            c01 = vleaky(c01)
            c02 = vleaky(c02)
            c10 = vleaky(c10)
            c11 = vleaky(c11)
            c12 = vleaky(c12)
            c20 = vleaky(c20)
            c21 = vleaky(c21)
            c22 = vleaky(c22)
            c30 = vleaky(c30)
            c31 = vleaky(c31)
            c32 = vleaky(c32)
            c40 = vleaky(c40)
            c41 = vleaky(c41)
            c42 = vleaky(c42)
            c50 = vleaky(c50)
            c51 = vleaky(c51)
            c52 = vleaky(c52)
            c60 = vleaky(c60)
            c61 = vleaky(c61)
            c62 = vleaky(c62)
            c70 = vleaky(c70)
            c71 = vleaky(c71)
            c72 = vleaky(c72)
        elif epi == 3:
            c00 = vrelu(c00)
            c01 = vrelu(c01)
            c02 = vrelu(c02)
            c10 = vrelu(c10)
            c11 = vrelu(c11)
            c12 = vrelu(c12)
            c20 = vrelu(c20)
            c21 = vrelu(c21)
            c22 = vrelu(c22)
            c30 = vrelu(c30)
            c31 = vrelu(c31)
            c32 = vrelu(c32)
            c40 = vrelu(c40)
            c41 = vrelu(c41)
            c42 = vrelu(c42)
            c50 = vrelu(c50)
            c51 = vrelu(c51)
            c52 = vrelu(c52)
            c60 = vrelu(c60)
            c61 = vrelu(c61)
            c62 = vrelu(c62)
            c70 = vrelu(c70)
            c71 = vrelu(c71)
            c72 = vrelu(c72)
        elif epi == 4:
            c00 = vrelu6(c00)
            c01 = vrelu6(c01)
            c02 = vrelu6(c02)
            c10 = vrelu6(c10)
            c11 = vrelu6(c11)
            c12 = vrelu6(c12)
            c20 = vrelu6(c20)
            c21 = vrelu6(c21)
            c22 = vrelu6(c22)
            c30 = vrelu6(c30)
            c31 = vrelu6(c31)
            c32 = vrelu6(c32)
            c40 = vrelu6(c40)
            c41 = vrelu6(c41)
            c42 = vrelu6(c42)
            c50 = vrelu6(c50)
            c51 = vrelu6(c51)
            c52 = vrelu6(c52)
            c60 = vrelu6(c60)
            c61 = vrelu6(c61)
            c62 = vrelu6(c62)
            c70 = vrelu6(c70)
            c71 = vrelu6(c71)
            c72 = vrelu6(c72)
    vstore16(c, co, c00)
    vstore16(c, co + 16, c01)
    vstore16(c, co + 32, c02)
    vstore16(c, co + 1 * ldc, c10)
    vstore16(c, co + 1 * ldc + 16, c11)
    vstore16(c, co + 1 * ldc + 32, c12)
    vstore16(c, co + 2 * ldc, c20)
    vstore16(c, co + 2 * ldc + 16, c21)
    vstore16(c, co + 2 * ldc + 32, c22)
    vstore16(c, co + 3 * ldc, c30)
    vstore16(c, co + 3 * ldc + 16, c31)
    vstore16(c, co + 3 * ldc + 32, c32)
    vstore16(c, co + 4 * ldc, c40)
    vstore16(c, co + 4 * ldc + 16, c41)
    vstore16(c, co + 4 * ldc + 32, c42)
    vstore16(c, co + 5 * ldc, c50)
    vstore16(c, co + 5 * ldc + 16, c51)
    vstore16(c, co + 5 * ldc + 32, c52)
    vstore16(c, co + 6 * ldc, c60)
    vstore16(c, co + 6 * ldc + 16, c61)
    vstore16(c, co + 6 * ldc + 32, c62)
    vstore16(c, co + 7 * ldc, c70)
    vstore16(c, co + 7 * ldc + 16, c71)
    vstore16(c, co + 7 * ldc + 32, c72)


@njit(inline="always", **JIT_OPTS)
def _mk_z8x32(kc, a, ao, lda, bp, bo, c, co, ldc, init, epi, bias, bo_bias):
    """The first 32 lanes of :func:`_mk_z8x48` (a last panel of at most 32 pixels)."""
    if init:
        c00 = vload16(c, co)
        c01 = vload16(c, co + 16)
        c10 = vload16(c, co + 1 * ldc)
        c11 = vload16(c, co + 1 * ldc + 16)
        c20 = vload16(c, co + 2 * ldc)
        c21 = vload16(c, co + 2 * ldc + 16)
        c30 = vload16(c, co + 3 * ldc)
        c31 = vload16(c, co + 3 * ldc + 16)
        c40 = vload16(c, co + 4 * ldc)
        c41 = vload16(c, co + 4 * ldc + 16)
        c50 = vload16(c, co + 5 * ldc)
        c51 = vload16(c, co + 5 * ldc + 16)
        c60 = vload16(c, co + 6 * ldc)
        c61 = vload16(c, co + 6 * ldc + 16)
        c70 = vload16(c, co + 7 * ldc)
        c71 = vload16(c, co + 7 * ldc + 16)
    else:
        c00 = vzero16()
        c01 = vzero16()
        c10 = vzero16()
        c11 = vzero16()
        c20 = vzero16()
        c21 = vzero16()
        c30 = vzero16()
        c31 = vzero16()
        c40 = vzero16()
        c41 = vzero16()
        c50 = vzero16()
        c51 = vzero16()
        c60 = vzero16()
        c61 = vzero16()
        c70 = vzero16()
        c71 = vzero16()
    for _ in range(kc):
        b0 = vload16(bp, bo)
        b1 = vload16(bp, bo + 16)
        w = vbcast16(a, ao)
        c00 = vfma(w, b0, c00)
        c01 = vfma(w, b1, c01)
        w = vbcast16(a, ao + 1 * lda)
        c10 = vfma(w, b0, c10)
        c11 = vfma(w, b1, c11)
        w = vbcast16(a, ao + 2 * lda)
        c20 = vfma(w, b0, c20)
        c21 = vfma(w, b1, c21)
        w = vbcast16(a, ao + 3 * lda)
        c30 = vfma(w, b0, c30)
        c31 = vfma(w, b1, c31)
        w = vbcast16(a, ao + 4 * lda)
        c40 = vfma(w, b0, c40)
        c41 = vfma(w, b1, c41)
        w = vbcast16(a, ao + 5 * lda)
        c50 = vfma(w, b0, c50)
        c51 = vfma(w, b1, c51)
        w = vbcast16(a, ao + 6 * lda)
        c60 = vfma(w, b0, c60)
        c61 = vfma(w, b1, c61)
        w = vbcast16(a, ao + 7 * lda)
        c70 = vfma(w, b0, c70)
        c71 = vfma(w, b1, c71)
        ao += 1
        bo += NRZ
    if epi != 0:
        bv = vbcast16(bias, bo_bias)
        c00 = vadd(c00, bv)
        c01 = vadd(c01, bv)
        bv = vbcast16(bias, bo_bias + 1)
        c10 = vadd(c10, bv)
        c11 = vadd(c11, bv)
        bv = vbcast16(bias, bo_bias + 2)
        c20 = vadd(c20, bv)
        c21 = vadd(c21, bv)
        bv = vbcast16(bias, bo_bias + 3)
        c30 = vadd(c30, bv)
        c31 = vadd(c31, bv)
        bv = vbcast16(bias, bo_bias + 4)
        c40 = vadd(c40, bv)
        c41 = vadd(c41, bv)
        bv = vbcast16(bias, bo_bias + 5)
        c50 = vadd(c50, bv)
        c51 = vadd(c51, bv)
        bv = vbcast16(bias, bo_bias + 6)
        c60 = vadd(c60, bv)
        c61 = vadd(c61, bv)
        bv = vbcast16(bias, bo_bias + 7)
        c70 = vadd(c70, bv)
        c71 = vadd(c71, bv)
        if epi == 2:
            c00 = vleaky(c00)
            c01 = vleaky(c01)
            c10 = vleaky(c10)
            c11 = vleaky(c11)
            c20 = vleaky(c20)
            c21 = vleaky(c21)
            c30 = vleaky(c30)
            c31 = vleaky(c31)
            c40 = vleaky(c40)
            c41 = vleaky(c41)
            c50 = vleaky(c50)
            c51 = vleaky(c51)
            c60 = vleaky(c60)
            c61 = vleaky(c61)
            c70 = vleaky(c70)
            c71 = vleaky(c71)
        elif epi == 3:
            c00 = vrelu(c00)
            c01 = vrelu(c01)
            c10 = vrelu(c10)
            c11 = vrelu(c11)
            c20 = vrelu(c20)
            c21 = vrelu(c21)
            c30 = vrelu(c30)
            c31 = vrelu(c31)
            c40 = vrelu(c40)
            c41 = vrelu(c41)
            c50 = vrelu(c50)
            c51 = vrelu(c51)
            c60 = vrelu(c60)
            c61 = vrelu(c61)
            c70 = vrelu(c70)
            c71 = vrelu(c71)
        elif epi == 4:
            c00 = vrelu6(c00)
            c01 = vrelu6(c01)
            c10 = vrelu6(c10)
            c11 = vrelu6(c11)
            c20 = vrelu6(c20)
            c21 = vrelu6(c21)
            c30 = vrelu6(c30)
            c31 = vrelu6(c31)
            c40 = vrelu6(c40)
            c41 = vrelu6(c41)
            c50 = vrelu6(c50)
            c51 = vrelu6(c51)
            c60 = vrelu6(c60)
            c61 = vrelu6(c61)
            c70 = vrelu6(c70)
            c71 = vrelu6(c71)
    vstore16(c, co, c00)
    vstore16(c, co + 16, c01)
    vstore16(c, co + 1 * ldc, c10)
    vstore16(c, co + 1 * ldc + 16, c11)
    vstore16(c, co + 2 * ldc, c20)
    vstore16(c, co + 2 * ldc + 16, c21)
    vstore16(c, co + 3 * ldc, c30)
    vstore16(c, co + 3 * ldc + 16, c31)
    vstore16(c, co + 4 * ldc, c40)
    vstore16(c, co + 4 * ldc + 16, c41)
    vstore16(c, co + 5 * ldc, c50)
    vstore16(c, co + 5 * ldc + 16, c51)
    vstore16(c, co + 6 * ldc, c60)
    vstore16(c, co + 6 * ldc + 16, c61)
    vstore16(c, co + 7 * ldc, c70)
    vstore16(c, co + 7 * ldc + 16, c71)


@njit(inline="always", **JIT_OPTS)
def _mk_z8x16(kc, a, ao, lda, bp, bo, c, co, ldc, init, epi, bias, bo_bias):
    """The first 16 lanes of :func:`_mk_z8x48` (a last panel of at most 16 pixels)."""
    if init:
        c00 = vload16(c, co)
        c10 = vload16(c, co + 1 * ldc)
        c20 = vload16(c, co + 2 * ldc)
        c30 = vload16(c, co + 3 * ldc)
        c40 = vload16(c, co + 4 * ldc)
        c50 = vload16(c, co + 5 * ldc)
        c60 = vload16(c, co + 6 * ldc)
        c70 = vload16(c, co + 7 * ldc)
    else:
        c00 = vzero16()
        c10 = vzero16()
        c20 = vzero16()
        c30 = vzero16()
        c40 = vzero16()
        c50 = vzero16()
        c60 = vzero16()
        c70 = vzero16()
    for _ in range(kc):
        b0 = vload16(bp, bo)
        w = vbcast16(a, ao)
        c00 = vfma(w, b0, c00)
        w = vbcast16(a, ao + 1 * lda)
        c10 = vfma(w, b0, c10)
        w = vbcast16(a, ao + 2 * lda)
        c20 = vfma(w, b0, c20)
        w = vbcast16(a, ao + 3 * lda)
        c30 = vfma(w, b0, c30)
        w = vbcast16(a, ao + 4 * lda)
        c40 = vfma(w, b0, c40)
        w = vbcast16(a, ao + 5 * lda)
        c50 = vfma(w, b0, c50)
        w = vbcast16(a, ao + 6 * lda)
        c60 = vfma(w, b0, c60)
        w = vbcast16(a, ao + 7 * lda)
        c70 = vfma(w, b0, c70)
        ao += 1
        bo += NRZ
    if epi != 0:
        bv = vbcast16(bias, bo_bias)
        c00 = vadd(c00, bv)
        bv = vbcast16(bias, bo_bias + 1)
        c10 = vadd(c10, bv)
        bv = vbcast16(bias, bo_bias + 2)
        c20 = vadd(c20, bv)
        bv = vbcast16(bias, bo_bias + 3)
        c30 = vadd(c30, bv)
        bv = vbcast16(bias, bo_bias + 4)
        c40 = vadd(c40, bv)
        bv = vbcast16(bias, bo_bias + 5)
        c50 = vadd(c50, bv)
        bv = vbcast16(bias, bo_bias + 6)
        c60 = vadd(c60, bv)
        bv = vbcast16(bias, bo_bias + 7)
        c70 = vadd(c70, bv)
        if epi == 2:
            c00 = vleaky(c00)
            c10 = vleaky(c10)
            c20 = vleaky(c20)
            c30 = vleaky(c30)
            c40 = vleaky(c40)
            c50 = vleaky(c50)
            c60 = vleaky(c60)
            c70 = vleaky(c70)
        elif epi == 3:
            c00 = vrelu(c00)
            c10 = vrelu(c10)
            c20 = vrelu(c20)
            c30 = vrelu(c30)
            c40 = vrelu(c40)
            c50 = vrelu(c50)
            c60 = vrelu(c60)
            c70 = vrelu(c70)
        elif epi == 4:
            c00 = vrelu6(c00)
            c10 = vrelu6(c10)
            c20 = vrelu6(c20)
            c30 = vrelu6(c30)
            c40 = vrelu6(c40)
            c50 = vrelu6(c50)
            c60 = vrelu6(c60)
            c70 = vrelu6(c70)
    vstore16(c, co, c00)
    vstore16(c, co + 1 * ldc, c10)
    vstore16(c, co + 2 * ldc, c20)
    vstore16(c, co + 3 * ldc, c30)
    vstore16(c, co + 4 * ldc, c40)
    vstore16(c, co + 5 * ldc, c50)
    vstore16(c, co + 6 * ldc, c60)
    vstore16(c, co + 7 * ldc, c70)


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------


@njit(**JIT_OPTS)
def _panel_segments(n0, nc, out_w, pan, seg, g, nr):
    """Split panel ``pan`` (pixels ``n0 + pan*nr + j``, ``j < nr``, clipped to ``nc``) into runs
    of pixels on one output row. ``seg[g, i] = (j0, j1, oy, ox0)``: lanes ``j0..j1-1`` are the
    pixels ``(oy, ox0 + j - j0)``. Returns the number of runs."""
    p = n0 + pan * nr
    end = n0 + min(nc, (pan + 1) * nr)
    oy = p // out_w
    ox = p - oy * out_w
    j = 0
    ns = 0
    while p < end:
        run = min(out_w - ox, end - p)
        seg[g, ns, 0] = j
        seg[g, ns, 1] = j + run
        seg[g, ns, 2] = oy
        seg[g, ns, 3] = ox
        ns += 1
        j += run
        p += run
        oy += 1
        ox = 0
    return ns


@njit(**JIT_OPTS)
def _pack_b(xf, c_n, h, w, k, sy, sx, dil, pt, pl, out_w, n0, nc, kk0, kc, bp, seg, nseg):
    """im2col of pixels ``n0 .. n0+nc-1`` (flat output index) and rows ``kk0 .. kk0+kc-1`` into
    panels ``bp[panel][kl][NR]``; positions outside x and lanes past ``nc`` are zero.

    Panels are packed in groups of ``PACK_GROUP``: for each row kk of B, the group's panels are
    filled one after the other, so the reads walk along an input row (a few streams the hardware
    prefetcher follows) instead of hopping between C*k planes per panel (latency-bound when x
    does not fit in L2). For stride 1 a run of pixels on one output row reads a contiguous
    stretch of an input row, so each 8-lane vector is one masked load (lanes outside the image
    or the run are masked off and read as zero): no per-pixel branches. A column stride of 2
    does the same with stride-2 loads (:func:`_simd.vmaskload2`); other strides take a scalar
    path. All three pack the same values. ``sy``/``sx`` are the row/column strides, ``dil`` the
    dilation: tap ``(ky, kx)`` of output ``(oy, ox)`` reads input
    ``(oy*sy - pt + ky*dil, ox*sx - pl + kx*dil)``.
    """
    s = 1 if sy == 1 and sx == 1 else 0  # 1: the masked-vector path
    hw = h * w
    npan = (nc + NR - 1) // NR
    c0 = kk0 // (k * k)
    r0 = kk0 - c0 * k * k
    ky0 = r0 // k
    kx0 = r0 - ky0 * k
    for g0 in range(0, npan, PACK_GROUP):
        g_n = min(PACK_GROUP, npan - g0)
        for g in range(g_n):
            nseg[g] = _panel_segments(n0, nc, out_w, g0 + g, seg, g, NR)
        c = c0
        ky = ky0
        kx = kx0
        for kl in range(kc):
            for g in range(g_n):
                d = ((g0 + g) * kc + kl) * NR
                if s == 1:
                    if nseg[g] == 1 and seg[g, 0, 1] - seg[g, 0, 0] == NR:
                        # Fast path: the panel is one run on one output row; if its input
                        # stretch is inside the image it is three plain vector copies.
                        iy = seg[g, 0, 2] - pt + ky * dil
                        off = seg[g, 0, 3] - pl + kx * dil
                        if 0 <= iy < h and off >= 0 and off + NR <= w:
                            base = c * hw + iy * w + off
                            vstore(bp, d, vload(xf, base))
                            vstore(bp, d + 8, vload(xf, base + 8))
                            vstore(bp, d + 16, vload(xf, base + 16))
                            continue
                    v0 = vzero()
                    v1 = vzero()
                    v2 = vzero()
                    for i in range(nseg[g]):
                        j0 = seg[g, i, 0]
                        j1 = seg[g, i, 1]
                        iy = seg[g, i, 2] - pt + ky * dil
                        if iy < 0 or iy >= h:
                            continue
                        off = seg[g, i, 3] - pl + kx * dil - j0  # lane j reads input column j + off
                        lo = max(j0, -off)
                        hi = min(j1, w - off)
                        if hi <= lo:
                            continue
                        base = c * hw + iy * w + off  # flat index of lane 0
                        if lo < 8:
                            v0 = vmaskload(v0, xf, base, lo, min(hi, 8))
                        if lo < 16 and hi > 8:
                            v1 = vmaskload(v1, xf, base + 8, max(lo - 8, 0), min(hi - 8, 8))
                        if hi > 16:
                            v2 = vmaskload(v2, xf, base + 16, max(lo - 16, 0), hi - 16)
                    vstore(bp, d, v0)
                    vstore(bp, d + 8, v1)
                    vstore(bp, d + 16, v2)
                elif sx == 2:
                    # the masked-vector path with stride-2 loads (two loads and a shuffle): the
                    # same values as the scalar path below, for YOLOv4-tiny's downsampling convs
                    v0 = vzero()
                    v1 = vzero()
                    v2 = vzero()
                    for i in range(nseg[g]):
                        j0 = seg[g, i, 0]
                        j1 = seg[g, i, 1]
                        iy = seg[g, i, 2] * sy - pt + ky * dil
                        if iy < 0 or iy >= h:
                            continue
                        off = 2 * (seg[g, i, 3] - j0) - pl + kx * dil  # lane j reads column 2*j + off
                        lo = max(j0, (1 - off) // 2)
                        hi = min(j1, (w - off + 1) // 2)
                        if hi <= lo:
                            continue
                        base = c * hw + iy * w + off  # flat index of lane 0
                        if lo < 8:
                            v0 = vmaskload2(v0, xf, base, lo, min(hi, 8))
                        if lo < 16 and hi > 8:
                            v1 = vmaskload2(v1, xf, base + 16, max(lo - 8, 0), min(hi - 8, 8))
                        if hi > 16:
                            v2 = vmaskload2(v2, xf, base + 32, max(lo - 16, 0), hi - 16)
                    vstore(bp, d, v0)
                    vstore(bp, d + 8, v1)
                    vstore(bp, d + 16, v2)
                else:
                    for j in range(NR):
                        bp[d + j] = 0.0
                    for i in range(nseg[g]):
                        iy = seg[g, i, 2] * sy - pt + ky * dil
                        if iy < 0 or iy >= h:
                            continue
                        row = c * hw + iy * w
                        for j in range(seg[g, i, 0], seg[g, i, 1]):
                            ix = (seg[g, i, 3] + j - seg[g, i, 0]) * sx - pl + kx * dil
                            if 0 <= ix < w:
                                bp[d + j] = xf[row + ix]
            kx += 1
            if kx == k:
                kx = 0
                ky += 1
                if ky == k:
                    ky = 0
                    c += 1


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


@njit(**JIT_OPTS)
def _conv2d_exact(x, w2, bias, k, s, pt, pl, out_h, out_w, act, out2, kc_blk, nc_blk, mc_blk, order):
    """:func:`_conv2d_exact_ext` with one stride for both axes, no dilation and the default MR."""
    _conv2d_exact_ext(x, w2, bias, k, s, s, 1, pt, pl, out_h, out_w, act, out2, kc_blk, nc_blk, mc_blk, order, MR)


@njit(**JIT_OPTS)
def _conv2d_exact_ext(x, w2, bias, k, sy, sx, d, pt, pl, out_h, out_w, act, out2, kc_blk, nc_blk, mc_blk,
                      order, mr):
    """Blocked exact GEMM driver with row/column strides ``sy``/``sx`` and dilation ``d``; ``act``
    is a 2017 code (0..3): :func:`conv2d` applies AlexeyAB's float32 activations after it.
    ``x`` (C, H, W), ``w2`` (Co, K), ``out2`` (Co, N), all C order.

    ``kc_blk``, ``nc_blk`` (multiple of NR), ``mc_blk`` (multiple of MR) are the cache blocking
    sizes (arguments rather than constants so tests can force many small blocks). They change
    the order in which *different* output elements are computed, never the order of the terms
    of one element's sum. ``mr`` (4 or 8) is the micro-kernel's row count, likewise.
    """
    mc_blk = max(mr, mc_blk // mr * mr)  # whole row blocks
    c_n, h, w = x.shape
    co_n, k_n = w2.shape
    n_n = out_h * out_w
    xf = x.reshape(c_n * h * w)
    cf = out2.reshape(co_n * n_n)
    mp = (co_n + mr - 1) // mr * mr
    wf = w2.reshape(co_n * k_n)
    # The last row block, if Co is not a multiple of MR, reads a zero-padded copy of its rows
    # (the micro-kernel always computes MR rows; the extra ones are discarded).
    wedge = np.zeros(mr * k_n, np.float32)
    r0 = co_n // mr * mr
    for r in range(co_n - r0):
        for kk in range(k_n):
            wedge[r * k_n + kk] = w2[r0 + r, kk]
    biasp = np.zeros(mp, np.float32)
    biasp[:co_n] = bias
    # micro-kernel epilogue codes: 1 linear, 2 leaky, 3 relu (logistic: linear, then a scalar
    # pass in _tile over the tile just written, while it is in L1; the AlexeyAB activations never
    # reach here, see conv2d)
    epi = 2 if act == ACT_LEAKY else 3 if act == ACT_RELU else 1
    kcb = min(kc_blk, k_n)
    ncb = min(nc_blk, (n_n + NR - 1) // NR * NR)
    bp = np.empty(kcb * ncb, np.float32)
    scratch = np.empty(mr * NR, np.float32)
    seg = np.empty((PACK_GROUP, NR, 4), np.int64)
    nseg = np.empty(PACK_GROUP, np.int64)
    # Balanced K blocks: ceil(K / kc_blk) blocks of near-equal size (a short last block would
    # pay the C-tile reload and store for little work).
    nkb = (k_n + kc_blk - 1) // kc_blk
    kc_size = (k_n + nkb - 1) // nkb
    for jc in range(0, n_n, nc_blk):
        nc = min(nc_blk, n_n - jc)
        npan = (nc + NR - 1) // NR
        for pc in range(0, k_n, kc_size):
            kc = min(kc_size, k_n - pc)
            _pack_b(xf, c_n, h, w, k, sy, sx, d, pt, pl, out_w, jc, nc, pc, kc, bp, seg, nseg)
            init = pc > 0
            last = pc + kc == k_n
            e = epi if last else 0
            for ic in range(0, mp, mc_blk):
                i_end = min(ic + mc_blk, mp)
                if order == 0:
                    # BLIS order: a B sliver (kc x NR) stays in L1 while W slivers stream from L2
                    for jp in range(npan):
                        for ir in range(ic, i_end, mr):
                            _tile(kc, wf, wedge, bp, cf, biasp, scratch, ir, jp, jc, pc, nc, co_n, n_n, k_n,
                                  init, e, act, last, mr)
                else:
                    # One W sliver against all B panels: few output rows written at a time,
                    # which matters when K is small and the output rows alias in cache.
                    for ir in range(ic, i_end, mr):
                        for jp in range(npan):
                            _tile(kc, wf, wedge, bp, cf, biasp, scratch, ir, jp, jc, pc, nc, co_n, n_n, k_n,
                                  init, e, act, last, mr)


@njit(inline="always", **JIT_OPTS)
def _tile(kc, wf, wedge, bp, cf, biasp, scratch, ir, jp, jc, pc, nc, co_n, n_n, k_n, init, e, act, last, mr):
    """One mr x NR output tile for the current K block: row block ``ir``, panel ``jp``."""
    j0 = jp * NR
    nv = min(NR, nc - j0)
    bo = jp * kc * NR
    mv = min(mr, co_n - ir)
    if mv == mr:
        a = wf
        ao = ir * k_n + pc
    else:
        a = wedge
        ao = pc
    if mv == mr and nv == NR:
        if mr == 8:
            _mk_8x24(kc, a, ao, k_n, bp, bo, cf, ir * n_n + jc + j0, n_n, init, e, biasp, ir)
        else:
            _mk_4x24(kc, a, ao, k_n, bp, bo, cf, ir * n_n + jc + j0, n_n, init, e, biasp, ir)
    else:
        # Edge tile: run the same micro-kernel on a scratch tile so edge pixels and channels
        # get exactly the same arithmetic as interior ones.
        if init:
            for r in range(mv):
                for j in range(nv):
                    scratch[r * NR + j] = cf[(ir + r) * n_n + jc + j0 + j]
        if mr == 8 and nv <= 8:
            _mk_8x8(kc, a, ao, k_n, bp, bo, scratch, 0, NR, init, e, biasp, ir)
        elif mr == 8 and nv <= 16:
            _mk_8x16(kc, a, ao, k_n, bp, bo, scratch, 0, NR, init, e, biasp, ir)
        elif mr == 8:
            _mk_8x24(kc, a, ao, k_n, bp, bo, scratch, 0, NR, init, e, biasp, ir)
        else:
            _mk_4x24(kc, a, ao, k_n, bp, bo, scratch, 0, NR, init, e, biasp, ir)
        for r in range(mv):
            for j in range(nv):
                cf[(ir + r) * n_n + jc + j0 + j] = scratch[r * NR + j]
    if last and act == ACT_LOGISTIC:
        for r in range(mv):
            o = (ir + r) * n_n + jc + j0
            for j in range(nv):
                cf[o + j] = _logistic32(cf[o + j])


# --------------------------------------------------------------------------------------------
# 16-lane (AVX-512F) variant: 48-pixel panels, 8 x 48 register blocks
# --------------------------------------------------------------------------------------------


@njit(**JIT_OPTS)
def _pack_bz(xf, c_n, h, w, k, sy, sx, dil, pt, pl, out_w, n0, nc, kk0, kc, bp, seg, nseg):
    """:func:`_pack_b` for panels of ``NRZ = 48`` pixels: ``bp[panel][kl][48]``, the same values.

    The fast path (a panel that is one in-image run of an input row) is three 16-lane copies;
    other panels are zeroed and their runs merged in 8 lanes at a time with masked loads
    (stride 1), stride-2 loads (column stride 2), or scalar copies (other strides).
    """
    s = 1 if sy == 1 and sx == 1 else 0  # 1: the masked-vector path
    hw = h * w
    npan = (nc + NRZ - 1) // NRZ
    c0 = kk0 // (k * k)
    r0 = kk0 - c0 * k * k
    ky0 = r0 // k
    kx0 = r0 - ky0 * k
    z = vzero16()
    for g0 in range(0, npan, PACK_GROUP):
        g_n = min(PACK_GROUP, npan - g0)
        for g in range(g_n):
            nseg[g] = _panel_segments(n0, nc, out_w, g0 + g, seg, g, NRZ)
        c = c0
        ky = ky0
        kx = kx0
        for kl in range(kc):
            for g in range(g_n):
                d = ((g0 + g) * kc + kl) * NRZ
                if s == 1 and nseg[g] == 1 and seg[g, 0, 1] - seg[g, 0, 0] == NRZ:
                    iy = seg[g, 0, 2] - pt + ky * dil
                    off = seg[g, 0, 3] - pl + kx * dil
                    if 0 <= iy < h and off >= 0 and off + NRZ <= w:
                        base = c * hw + iy * w + off
                        vstore16(bp, d, vload16(xf, base))
                        vstore16(bp, d + 16, vload16(xf, base + 16))
                        vstore16(bp, d + 32, vload16(xf, base + 32))
                        continue
                vstore16(bp, d, z)
                vstore16(bp, d + 16, z)
                vstore16(bp, d + 32, z)
                for i in range(nseg[g]):
                    j0 = seg[g, i, 0]
                    j1 = seg[g, i, 1]
                    iy = seg[g, i, 2] * sy - pt + ky * dil
                    if iy < 0 or iy >= h:
                        continue
                    if s == 1:
                        off = seg[g, i, 3] - pl + kx * dil - j0  # lane j reads input column j + off
                        lo = max(j0, -off)
                        hi = min(j1, w - off)
                        if hi <= lo:
                            continue
                        base = c * hw + iy * w + off  # flat index of lane 0
                        for q in range(lo // 8 * 8, hi, 8):
                            vstore(bp, d + q, vmaskload(vload(bp, d + q), xf, base + q, max(lo - q, 0),
                                                        min(hi - q, 8)))
                    elif sx == 2:
                        off = 2 * (seg[g, i, 3] - j0) - pl + kx * dil  # lane j reads column 2*j + off
                        lo = max(j0, (1 - off) // 2)
                        hi = min(j1, (w - off + 1) // 2)
                        if hi <= lo:
                            continue
                        base = c * hw + iy * w + off
                        for q in range(lo // 8 * 8, hi, 8):
                            vstore(bp, d + q, vmaskload2(vload(bp, d + q), xf, base + 2 * q, max(lo - q, 0),
                                                         min(hi - q, 8)))
                    else:
                        row = c * hw + iy * w
                        for j in range(j0, j1):
                            ix = (seg[g, i, 3] + j - j0) * sx - pl + kx * dil
                            if 0 <= ix < w:
                                bp[d + j] = xf[row + ix]
            kx += 1
            if kx == k:
                kx = 0
                ky += 1
                if ky == k:
                    ky = 0
                    c += 1


@njit(inline="always", **JIT_OPTS)
def _tile_z(kc, wf, wedge, bp, cf, biasp, scratch, ir, jp, jc, pc, nc, co_n, n_n, k_n, init, e, act, last):
    """:func:`_tile` for an 8 x 48 tile of the 16-lane variant."""
    j0 = jp * NRZ
    nv = min(NRZ, nc - j0)
    bo = jp * kc * NRZ
    mv = min(8, co_n - ir)
    if mv == 8:
        a = wf
        ao = ir * k_n + pc
    else:
        a = wedge
        ao = pc
    edge = mv < 8 or nv < NRZ
    # one call site per micro-kernel (an edge tile runs on a scratch tile): compile time
    if edge:
        dst = scratch
        do = 0
        ld = NRZ
        if init:
            for r in range(mv):
                for j in range(nv):
                    scratch[r * NRZ + j] = cf[(ir + r) * n_n + jc + j0 + j]
    else:
        dst = cf
        do = ir * n_n + jc + j0
        ld = n_n
    if nv <= 16:
        _mk_z8x16(kc, a, ao, k_n, bp, bo, dst, do, ld, init, e, biasp, ir)
    elif nv <= 32:
        _mk_z8x32(kc, a, ao, k_n, bp, bo, dst, do, ld, init, e, biasp, ir)
    else:
        _mk_z8x48(kc, a, ao, k_n, bp, bo, dst, do, ld, init, e, biasp, ir)
    if edge:
        for r in range(mv):
            for j in range(nv):
                cf[(ir + r) * n_n + jc + j0 + j] = scratch[r * NRZ + j]
    if last and act == ACT_LOGISTIC:
        for r in range(mv):
            o = (ir + r) * n_n + jc + j0
            for j in range(nv):
                cf[o + j] = _logistic32(cf[o + j])


@njit(**JIT_OPTS)
def _conv2d_exact_z(x, w2, bias, k, sy, sx, d, pt, pl, out_h, out_w, act, out2, kc_blk, nc_blk, mc_blk, order):
    """:func:`_conv2d_exact_ext` with 16-lane vectors: 48-pixel panels and 8 x 48 register blocks
    (``nc_blk`` a multiple of ``NRZ``). Each element's chain is the same, so are the bits."""
    mr = 8
    mc_blk = max(mr, mc_blk // mr * mr)
    c_n, h, w = x.shape
    co_n, k_n = w2.shape
    n_n = out_h * out_w
    xf = x.reshape(c_n * h * w)
    cf = out2.reshape(co_n * n_n)
    mp = (co_n + mr - 1) // mr * mr
    wf = w2.reshape(co_n * k_n)
    wedge = np.zeros(mr * k_n, np.float32)
    r0 = co_n // mr * mr
    for r in range(co_n - r0):
        for kk in range(k_n):
            wedge[r * k_n + kk] = w2[r0 + r, kk]
    biasp = np.zeros(mp, np.float32)
    biasp[:co_n] = bias
    epi = 2 if act == ACT_LEAKY else 3 if act == ACT_RELU else 4 if act == ACT_RELU6 else 1
    kcb = min(kc_blk, k_n)
    ncb = min(nc_blk, (n_n + NRZ - 1) // NRZ * NRZ)
    bp = np.empty(kcb * ncb, np.float32)
    scratch = np.empty(mr * NRZ, np.float32)
    seg = np.empty((PACK_GROUP, NRZ, 4), np.int64)
    nseg = np.empty(PACK_GROUP, np.int64)
    nkb = (k_n + kc_blk - 1) // kc_blk
    kc_size = (k_n + nkb - 1) // nkb
    for jc in range(0, n_n, nc_blk):
        nc = min(nc_blk, n_n - jc)
        npan = (nc + NRZ - 1) // NRZ
        for pc in range(0, k_n, kc_size):
            kc = min(kc_size, k_n - pc)
            _pack_bz(xf, c_n, h, w, k, sy, sx, d, pt, pl, out_w, jc, nc, pc, kc, bp, seg, nseg)
            init = pc > 0
            last = pc + kc == k_n
            e = epi if last else 0
            for ic in range(0, mp, mc_blk):
                n_ir = (min(ic + mc_blk, mp) - ic) // mr
                # both loop orders (see _conv2d_exact_ext) in one loop: one inlined copy of the
                # micro-kernels instead of two, which halves this driver's compile time
                for t in range(n_ir * npan):
                    if order == 0:
                        jp = t // n_ir
                        ir = ic + (t - jp * n_ir) * mr
                    else:
                        i = t // npan
                        ir = ic + i * mr
                        jp = t - i * npan
                    _tile_z(kc, wf, wedge, bp, cf, biasp, scratch, ir, jp, jc, pc, nc, co_n, n_n, k_n, init, e, act,
                            last)


# --------------------------------------------------------------------------------------------
# Direct path: grouped convolutions with few input channels per group (depthwise)
# --------------------------------------------------------------------------------------------
# A depthwise layer is ``groups`` GEMMs of one output row each (M = 1 < MR, K = 9): run through
# the blocked GEMM, 3/4 of every micro-kernel is zero padding and each group pays a Python call
# and a packing pass (MobileNetV2's depthwise layers ran at 0.06-0.19x onnxruntime). Here each
# output row is computed straight from a zero-padded, column-deinterleaved copy of the group's
# input ("phase planes", so a stride-sx tap reads consecutive floats), with the same chain per
# element as the GEMM: acc = +0, fma over kk = (c*k + ky)*k + kx in order, + bias, activation.
# Zero padding feeds fma(w, +0.0, acc) exactly as the packed GEMM's zeroed B entries do.

#: Largest ``C/groups`` (input channels per group) that takes the direct path.
DIRECT_MAX_CG = 4
#: Ungrouped convolutions with at most this many input channels and K = C*k*k at most
#: DIRECT8_MAX_K take :func:`_conv2d_direct8` where the 8-row block exists (MR = 8). Measured on
#: Zen 4 against the GEMM: C = 3 1.2-2.3x faster (YOLO's first layers), C = 16 1.2x, C = 32
#: 0.8-0.9x (there packing is a small share and the GEMM's sequential panels win). K = 147 is
#: ResNet's 7x7 first layer (C = 3): 2.40 against the 16-lane GEMM's 2.80 ms (Sapphire Rapids).
DIRECT8_MAX_C = 16
DIRECT8_MAX_K = 147


@njit(**JIT_OPTS)
def _phase_planes(xf, h, w, c0, cg, sy, sx, pt, pl, hq, wq, q):
    """``q[(((c*sy + ry)*sx + rx)*hq + i)*wq + j] = X(c0 + c, i*sy + ry - pt, j*sx + rx - pl)``,
    0 outside x (``xf`` is x flat, (C, h, w)): the group's input, zero-padded and split into its
    sy x sx row/column phases. Plain copies, so the cost is a pass over the group's input."""
    for c in range(cg):
        for ry in range(sy):
            for rx in range(sx):
                base = ((c * sy + ry) * sx + rx) * hq * wq
                # columns j with 0 <= j*sx + rx - pl < w
                j_lo = min(wq, max(0, (pl - rx + sx - 1) // sx))
                j_hi = max(j_lo, min(wq, (w - 1 - rx + pl) // sx + 1)) if w - 1 - rx + pl >= 0 else j_lo
                for i in range(hq):
                    iy = i * sy + ry - pt
                    o = base + i * wq
                    if iy < 0 or iy >= h:
                        for j in range(wq):
                            q[o + j] = 0.0
                        continue
                    src = ((c0 + c) * h + iy) * w + rx - pl
                    # 8 at a time; lanes outside [j_lo, j_hi) are not read and stay 0
                    for j in range(0, wq, 8):
                        lo = min(8, max(0, j_lo - j))
                        hi = max(0, min(8, j_hi - j))
                        if sx == 1:
                            if lo == 0 and hi == 8:
                                v = vload(xf, src + j)
                            else:
                                v = vmaskload(vzero(), xf, src + j, lo, hi)
                        elif sx == 2:
                            if lo == 0 and hi == 8 and src + 2 * j + 16 <= (c0 + c + 1) * h * w:
                                # inside x: two plain loads, the even (rx = 0) or odd columns
                                a = vload(xf, src + 2 * j)
                                b = vload(xf, src + 2 * j + 8)
                                v = vdeinterleave(a, b, 0)
                            else:
                                v = vmaskload2(vzero(), xf, src + 2 * j, lo, hi)
                        else:
                            v = vmaskgather(vzero(), xf, src + j * sx, sx, lo, hi)
                        vstoren(q, o + j, v, wq - j)


@njit(inline="always", **JIT_OPTS)
def _direct_block(kk_n, toff, q, p0, wf, wo, bv, epi, dst, do):
    """32 grid pixels ``p0 .. p0+31`` of one output channel: tap ``kk`` of grid pixel ``n``
    reads ``q[n + toff[kk]]``; ``act(sum + bias)`` stored to ``dst[do:]``."""
    a0 = vzero()
    a1 = vzero()
    a2 = vzero()
    a3 = vzero()
    for kk in range(kk_n):
        p = p0 + toff[kk]
        wv = vbcast(wf, wo + kk)
        a0 = vfma(wv, vload(q, p), a0)
        a1 = vfma(wv, vload(q, p + 8), a1)
        a2 = vfma(wv, vload(q, p + 16), a2)
        a3 = vfma(wv, vload(q, p + 24), a3)
    a0 = vadd(a0, bv)
    a1 = vadd(a1, bv)
    a2 = vadd(a2, bv)
    a3 = vadd(a3, bv)
    if epi == 2:
        a0 = vleaky(a0)
        a1 = vleaky(a1)
        a2 = vleaky(a2)
        a3 = vleaky(a3)
    elif epi == 3:
        a0 = vrelu(a0)
        a1 = vrelu(a1)
        a2 = vrelu(a2)
        a3 = vrelu(a3)
    elif epi == 4:
        a0 = vrelu6(a0)
        a1 = vrelu6(a1)
        a2 = vrelu6(a2)
        a3 = vrelu6(a3)
    vstore(dst, do, a0)
    vstore(dst, do + 8, a1)
    vstore(dst, do + 16, a2)
    vstore(dst, do + 24, a3)


@njit(inline="always", **JIT_OPTS)
def _direct_block_z(kk_n, toff, q, p0, wf, wo, bias, co, epi, dst, do):
    """:func:`_direct_block` on 16-lane vectors: 64 grid pixels ``p0 .. p0+63``, the same chain
    per element (AVX-512F targets; 1.3-1.6x the 8-lane block on MobileNetV2's depthwise layers)."""
    a0 = vzero16()
    a1 = vzero16()
    a2 = vzero16()
    a3 = vzero16()
    for kk in range(kk_n):
        p = p0 + toff[kk]
        wv = vbcast16(wf, wo + kk)
        a0 = vfma(wv, vload16(q, p), a0)
        a1 = vfma(wv, vload16(q, p + 16), a1)
        a2 = vfma(wv, vload16(q, p + 32), a2)
        a3 = vfma(wv, vload16(q, p + 48), a3)
    bv = vbcast16(bias, co)
    a0 = vadd(a0, bv)
    a1 = vadd(a1, bv)
    a2 = vadd(a2, bv)
    a3 = vadd(a3, bv)
    if epi == 2:
        a0 = vleaky(a0)
        a1 = vleaky(a1)
        a2 = vleaky(a2)
        a3 = vleaky(a3)
    elif epi == 3:
        a0 = vrelu(a0)
        a1 = vrelu(a1)
        a2 = vrelu(a2)
        a3 = vrelu(a3)
    elif epi == 4:
        a0 = vrelu6(a0)
        a1 = vrelu6(a1)
        a2 = vrelu6(a2)
        a3 = vrelu6(a3)
    vstore16(dst, do, a0)
    vstore16(dst, do + 16, a1)
    vstore16(dst, do + 32, a2)
    vstore16(dst, do + 48, a3)


@njit(inline="always", **JIT_OPTS)
def _dk_8x24(kk_n, toff, q, p0, a, ao, lda, c, co, ldc, bias, bo_bias, epi):
    """:func:`_mk_8x24` for the direct path: 8 output channels (rows ``a[ao + r*lda:]`` of the
    flat weight) x 24 pixels whose tap ``kk`` is ``q[p0 + toff[kk]:][:24]``; from +0.0, all of
    K, then + bias and the activation, stored to ``c[co + r*ldc:][:24]``."""
    c00 = vzero()
    c01 = vzero()
    c02 = vzero()
    c10 = vzero()
    c11 = vzero()
    c12 = vzero()
    c20 = vzero()
    c21 = vzero()
    c22 = vzero()
    c30 = vzero()
    c31 = vzero()
    c32 = vzero()
    c40 = vzero()
    c41 = vzero()
    c42 = vzero()
    c50 = vzero()
    c51 = vzero()
    c52 = vzero()
    c60 = vzero()
    c61 = vzero()
    c62 = vzero()
    c70 = vzero()
    c71 = vzero()
    c72 = vzero()
    for kk in range(kk_n):
        p = p0 + toff[kk]
        b0 = vload(q, p)
        b1 = vload(q, p + 8)
        b2 = vload(q, p + 16)
        w = vbcast(a, ao + kk)
        c00 = vfma(w, b0, c00)
        c01 = vfma(w, b1, c01)
        c02 = vfma(w, b2, c02)
        w = vbcast(a, ao + 1 * lda + kk)
        c10 = vfma(w, b0, c10)
        c11 = vfma(w, b1, c11)
        c12 = vfma(w, b2, c12)
        w = vbcast(a, ao + 2 * lda + kk)
        c20 = vfma(w, b0, c20)
        c21 = vfma(w, b1, c21)
        c22 = vfma(w, b2, c22)
        w = vbcast(a, ao + 3 * lda + kk)
        c30 = vfma(w, b0, c30)
        c31 = vfma(w, b1, c31)
        c32 = vfma(w, b2, c32)
        w = vbcast(a, ao + 4 * lda + kk)
        c40 = vfma(w, b0, c40)
        c41 = vfma(w, b1, c41)
        c42 = vfma(w, b2, c42)
        w = vbcast(a, ao + 5 * lda + kk)
        c50 = vfma(w, b0, c50)
        c51 = vfma(w, b1, c51)
        c52 = vfma(w, b2, c52)
        w = vbcast(a, ao + 6 * lda + kk)
        c60 = vfma(w, b0, c60)
        c61 = vfma(w, b1, c61)
        c62 = vfma(w, b2, c62)
        w = vbcast(a, ao + 7 * lda + kk)
        c70 = vfma(w, b0, c70)
        c71 = vfma(w, b1, c71)
        c72 = vfma(w, b2, c72)
    bv = vbcast(bias, bo_bias)
    c00 = vadd(c00, bv)
    c01 = vadd(c01, bv)
    c02 = vadd(c02, bv)
    bv = vbcast(bias, bo_bias + 1)
    c10 = vadd(c10, bv)
    c11 = vadd(c11, bv)
    c12 = vadd(c12, bv)
    bv = vbcast(bias, bo_bias + 2)
    c20 = vadd(c20, bv)
    c21 = vadd(c21, bv)
    c22 = vadd(c22, bv)
    bv = vbcast(bias, bo_bias + 3)
    c30 = vadd(c30, bv)
    c31 = vadd(c31, bv)
    c32 = vadd(c32, bv)
    bv = vbcast(bias, bo_bias + 4)
    c40 = vadd(c40, bv)
    c41 = vadd(c41, bv)
    c42 = vadd(c42, bv)
    bv = vbcast(bias, bo_bias + 5)
    c50 = vadd(c50, bv)
    c51 = vadd(c51, bv)
    c52 = vadd(c52, bv)
    bv = vbcast(bias, bo_bias + 6)
    c60 = vadd(c60, bv)
    c61 = vadd(c61, bv)
    c62 = vadd(c62, bv)
    bv = vbcast(bias, bo_bias + 7)
    c70 = vadd(c70, bv)
    c71 = vadd(c71, bv)
    c72 = vadd(c72, bv)
    if epi == 2:
        c00 = vleaky(c00)
        c01 = vleaky(c01)
        c02 = vleaky(c02)
        c10 = vleaky(c10)
        c11 = vleaky(c11)
        c12 = vleaky(c12)
        c20 = vleaky(c20)
        c21 = vleaky(c21)
        c22 = vleaky(c22)
        c30 = vleaky(c30)
        c31 = vleaky(c31)
        c32 = vleaky(c32)
        c40 = vleaky(c40)
        c41 = vleaky(c41)
        c42 = vleaky(c42)
        c50 = vleaky(c50)
        c51 = vleaky(c51)
        c52 = vleaky(c52)
        c60 = vleaky(c60)
        c61 = vleaky(c61)
        c62 = vleaky(c62)
        c70 = vleaky(c70)
        c71 = vleaky(c71)
        c72 = vleaky(c72)
    elif epi == 3:
        c00 = vrelu(c00)
        c01 = vrelu(c01)
        c02 = vrelu(c02)
        c10 = vrelu(c10)
        c11 = vrelu(c11)
        c12 = vrelu(c12)
        c20 = vrelu(c20)
        c21 = vrelu(c21)
        c22 = vrelu(c22)
        c30 = vrelu(c30)
        c31 = vrelu(c31)
        c32 = vrelu(c32)
        c40 = vrelu(c40)
        c41 = vrelu(c41)
        c42 = vrelu(c42)
        c50 = vrelu(c50)
        c51 = vrelu(c51)
        c52 = vrelu(c52)
        c60 = vrelu(c60)
        c61 = vrelu(c61)
        c62 = vrelu(c62)
        c70 = vrelu(c70)
        c71 = vrelu(c71)
        c72 = vrelu(c72)
    elif epi == 4:
        c00 = vrelu6(c00)
        c01 = vrelu6(c01)
        c02 = vrelu6(c02)
        c10 = vrelu6(c10)
        c11 = vrelu6(c11)
        c12 = vrelu6(c12)
        c20 = vrelu6(c20)
        c21 = vrelu6(c21)
        c22 = vrelu6(c22)
        c30 = vrelu6(c30)
        c31 = vrelu6(c31)
        c32 = vrelu6(c32)
        c40 = vrelu6(c40)
        c41 = vrelu6(c41)
        c42 = vrelu6(c42)
        c50 = vrelu6(c50)
        c51 = vrelu6(c51)
        c52 = vrelu6(c52)
        c60 = vrelu6(c60)
        c61 = vrelu6(c61)
        c62 = vrelu6(c62)
        c70 = vrelu6(c70)
        c71 = vrelu6(c71)
        c72 = vrelu6(c72)
    vstore(c, co, c00)
    vstore(c, co + 8, c01)
    vstore(c, co + 16, c02)
    vstore(c, co + 1 * ldc, c10)
    vstore(c, co + 1 * ldc + 8, c11)
    vstore(c, co + 1 * ldc + 16, c12)
    vstore(c, co + 2 * ldc, c20)
    vstore(c, co + 2 * ldc + 8, c21)
    vstore(c, co + 2 * ldc + 16, c22)
    vstore(c, co + 3 * ldc, c30)
    vstore(c, co + 3 * ldc + 8, c31)
    vstore(c, co + 3 * ldc + 16, c32)
    vstore(c, co + 4 * ldc, c40)
    vstore(c, co + 4 * ldc + 8, c41)
    vstore(c, co + 4 * ldc + 16, c42)
    vstore(c, co + 5 * ldc, c50)
    vstore(c, co + 5 * ldc + 8, c51)
    vstore(c, co + 5 * ldc + 16, c52)
    vstore(c, co + 6 * ldc, c60)
    vstore(c, co + 6 * ldc + 8, c61)
    vstore(c, co + 6 * ldc + 16, c62)
    vstore(c, co + 7 * ldc, c70)
    vstore(c, co + 7 * ldc + 8, c71)
    vstore(c, co + 7 * ldc + 16, c72)



@njit(**JIT_OPTS)
def _conv2d_direct8(x, w2, bias, k, sy, sx, d, pt, pl, out_h, out_w, act, out2):
    """Ungrouped convolution with few input channels (K = C*k*k small: the first layers, C = 3),
    without packing: 8 output channels x 24 pixels of one output row per block, every tap read
    from the phase planes at a constant offset (as in :func:`_conv2d_direct`), the weights in
    place. Packing B costs O(K*N) against O(Co*K*N) of fma, a large share when Co and K are
    small and the map is large. ``w2`` (Co, K), ``out2`` (Co, N); ``act`` a 2017 code."""
    c_n, h, w = x.shape
    co_n, kk_n = w2.shape
    xf = x.reshape(c_n * h * w)
    wf = w2.reshape(co_n * kk_n)
    of = out2.reshape(co_n * out_h * out_w)
    n_n = out_h * out_w
    span = (k - 1) * d
    hq = out_h + span // sy
    wq = out_w + span // sx
    plane = hq * wq
    n_q = c_n * sy * sx * plane
    q = np.empty(n_q + wq + 32, np.float32)  # a row's last block reads up to 23 past it
    q[n_q:] = 0.0
    _phase_planes(xf, h, w, 0, c_n, sy, sx, pt, pl, hq, wq, q)
    toff = np.empty(kk_n, np.int64)
    for c in range(c_n):
        for ky in range(k):
            for kx in range(k):
                ty = ky * d
                tx = kx * d
                toff[(c * k + ky) * k + kx] = ((c * sy + ty % sy) * sx + tx % sx) * plane + (ty // sy) * wq + tx // sx
    mp = (co_n + 7) // 8 * 8
    wedge = np.zeros(8 * kk_n, np.float32)  # the last rows if Co is not a multiple of 8
    r0 = co_n // 8 * 8
    for r in range(co_n - r0):
        for kk in range(kk_n):
            wedge[r * kk_n + kk] = w2[r0 + r, kk]
    biasp = np.zeros(mp, np.float32)
    biasp[:co_n] = bias
    scratch = np.empty(8 * NR, np.float32)
    epi = 2 if act == ACT_LEAKY else 3 if act == ACT_RELU else 4 if act == ACT_RELU6 else 1
    for oy in range(out_h):
        for ir in range(0, mp, 8):
            mv = min(8, co_n - ir)
            if mv == 8:
                a = wf
                ao = ir * kk_n
            else:
                a = wedge
                ao = 0
            for ox in range(0, out_w, NR):
                p0 = oy * wq + ox
                nv = min(NR, out_w - ox)
                if mv == 8 and nv == NR:
                    _dk_8x24(kk_n, toff, q, p0, a, ao, kk_n, of, ir * n_n + oy * out_w + ox, n_n, biasp, ir, epi)
                else:
                    _dk_8x24(kk_n, toff, q, p0, a, ao, kk_n, scratch, 0, NR, biasp, ir, epi)
                    for r in range(mv):
                        for j in range(nv):
                            of[(ir + r) * n_n + oy * out_w + ox + j] = scratch[r * NR + j]
    if act == ACT_LOGISTIC:
        for j in range(co_n * n_n):
            of[j] = _logistic32(of[j])


@njit(**JIT_OPTS)
def _conv2d_direct(x, wf, bias, k, sy, sx, d, pt, pl, out_h, out_w, act, groups, og, of, wide):
    """Grouped convolution, one call for all groups: ``wf`` is the flat (Co, C/groups, k, k)
    weight, ``of`` the flat (Co, out_h, out_w) output, ``act`` any activation code (relu6 in
    the vector epilogue; the AlexeyAB ones other than relu6 are left to the caller).

    Outputs are computed on a grid of ``out_h`` rows of ``wq`` pixels (the valid ``out_w``
    first): with the input split into phases, tap ``(c, ky, kx)`` of grid pixel ``n`` is
    ``q[n + toff[kk]]`` for all n, so a channel is one loop over 32-pixel blocks (64 on 16-lane
    vectors if ``wide``) whatever its width, then its valid columns are copied out.
    """
    bw = 64 if wide else 32  # grid pixels per block
    c_n, h, w = x.shape
    xf = x.reshape(c_n * h * w)
    cg = c_n // groups
    kk_n = cg * k * k
    span = (k - 1) * d
    hq = out_h + span // sy
    wq = out_w + span // sx
    plane = hq * wq
    ng = out_h * wq
    nb = (ng + bw - 1) // bw
    # reads of the last block run up to ~wq + bw - 1 past the last plane: zeros there
    n_q = cg * sy * sx * plane
    q = np.empty(n_q + wq + bw, np.float32)
    q[n_q:] = 0.0
    grid = np.empty(nb * bw + 8, np.float32)  # + 8: the copy-out reads whole vectors
    epi = 2 if act == ACT_LEAKY else 3 if act == ACT_RELU else 4 if act == ACT_RELU6 else 1
    toff = np.empty(kk_n, np.int64)
    for c in range(cg):
        for ky in range(k):
            for kx in range(k):
                ty = ky * d
                tx = kx * d
                ph = (c * sy + ty % sy) * sx + tx % sx
                toff[(c * k + ky) * k + kx] = ph * plane + (ty // sy) * wq + tx // sx
    for g in range(groups):
        _phase_planes(xf, h, w, g * cg, cg, sy, sx, pt, pl, hq, wq, q)
        for m in range(og):
            co = g * og + m
            wo = co * kk_n
            if wide:
                for blk in range(nb):
                    _direct_block_z(kk_n, toff, q, blk * bw, wf, wo, bias, co, epi, grid, blk * bw)
            else:
                bv = vbcast(bias, co)
                for blk in range(nb):
                    _direct_block(kk_n, toff, q, blk * bw, wf, wo, bv, epi, grid, blk * bw)
            o = co * out_h * out_w
            for oy in range(out_h):
                for ox in range(0, out_w, 8):
                    vstoren(of, o + oy * out_w + ox, vload(grid, oy * wq + ox), out_w - ox)
            if act == ACT_LOGISTIC:
                for j in range(out_h * out_w):
                    of[o + j] = _logistic32(of[o + j])


@njit(**JIT_OPTS)
def _im2col(x, k, sy, sx, d, pt, pl, out_h, out_w, col):
    """Plain im2col: ``col[kk, oy*out_w + ox] = X(c, oy*sy - pt + ky*d, ox*sx - pl + kx*d)``."""
    c_n, h, w = x.shape
    kk2 = k * k
    for c in range(c_n):
        for ky in range(k):
            for kx in range(k):
                row = c * kk2 + ky * k + kx
                for oy in range(out_h):
                    iy = oy * sy - pt + ky * d
                    base = oy * out_w
                    if iy < 0 or iy >= h:
                        for ox in range(out_w):
                            col[row, base + ox] = 0.0
                    else:
                        for ox in range(out_w):
                            ix = ox * sx - pl + kx * d
                            col[row, base + ox] = x[c, iy, ix] if 0 <= ix < w else 0.0


@njit(**JIT_OPTS)
def _epilogue(out2, bias, act):
    """``out = act(out + bias)`` row by row (fast path only)."""
    co_n, n_n = out2.shape
    for co in range(co_n):
        b = bias[co]
        for j in range(n_n):
            v = out2[co, j] + b
            if act == ACT_LEAKY:
                v = v if v > 0 else np.float32(np.float64(v) * 0.1)
            elif act == ACT_RELU:
                v = np.float32(0.0) if v <= 0 else v
            elif act != ACT_LINEAR:
                v = act_scalar(v, act)
            out2[co, j] = v


def _conv2d_blas(x, w2, bias, k, sy, sx, d, pt, pl, out_h, out_w, act, out2):
    """im2col (Numba) + BLAS sgemm (numpy's ``np.dot``, which releases the GIL), then bias and
    activation (Numba). Not tile-invariant.

    The GEMM is called from Python rather than inside ``njit`` because Numba's ``np.dot`` needs
    SciPy's BLAS bindings, which are not a dependency of this project (without them Numba aborts
    the process); the Python-level call costs microseconds.
    """
    c_n = x.shape[0]
    n_n = out_h * out_w
    if k == 1 and sy == 1 and sx == 1 and pt == 0 and pl == 0 and out_h == x.shape[1] and out_w == x.shape[2]:
        col = x.reshape(c_n, n_n)  # 1x1 conv: the input already is the GEMM operand
    else:
        col = np.empty((c_n * k * k, n_n), np.float32)
        _im2col(x, k, sy, sx, d, pt, pl, out_h, out_w, col)
    np.dot(w2, col, out=out2)
    _epilogue(out2, bias, act)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check_f32(name: str, a, ndim: int, what: str) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype != np.float32:
        raise ValueError(f"{name} must be float32, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {what}, got shape {a.shape}")
    return np.ascontiguousarray(a)


def _check_int(name: str, v, lo: int | None = None) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {v!r}")
    v = int(v)
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return v


def conv2d(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    *,
    stride: int | tuple[int, int] = 1,
    pad_top: int = 0,
    pad_left: int = 0,
    out_h: int | None = None,
    out_w: int | None = None,
    activation: str | int = "linear",
    out: np.ndarray | None = None,
    exact: bool = True,
    dilation: int = 1,
    groups: int = 1,
) -> np.ndarray:
    """2-D convolution with bias and activation, darknet semantics, tile-invariant bits.

    ``out[co, oy, ox] = act(bias[co] + sum_{c,ky,kx} weight[co, c, ky, kx] *
    X(g*Cg + c, oy*sy - pad_top + ky*d, ox*sx - pad_left + kx*d))`` where ``X`` is ``x`` inside
    its bounds and 0 outside, ``g = co // (Co/groups)`` the group of output channel ``co`` and
    ``Cg = C/groups`` the input channels of a group (AlexeyAB darknet's grouped convolution:
    group ``g`` reads input channels ``g*Cg ..`` with filters ``g*Co/groups ..``).

    Parameters
    ----------
    x : ndarray, float32, shape (C, H, W)
        Input map. Made C-contiguous if it is not (a copy).
    weight : ndarray, float32, shape (Co, C/groups, k, k)
        Filters; any square size k >= 1.
    bias : ndarray, float32, shape (Co,)
        Added after the full sum (batch norm is expected to be folded in by the caller).
    stride : int or (sy, sx), default 1
        One stride for both axes, or the row and column strides (darknet's stride_y, stride_x).
    pad_top, pad_left : int, default 0
        Offset of the first window, in input pixels. Only the top/left padding is given; the
        bottom/right edges are padded with as many zeros as ``out_h``/``out_w`` require (so a
        tile can be padded less than the frame, or not at all). Negative values start the
        first window inside ``x``.
    out_h, out_w : int, optional
        Output size (>= 1). Default ``(H + 2*pad_top - span)//sy + 1`` (same for W) with
        ``span = (k - 1)*dilation + 1``.
    activation : str or int code
        One of :data:`kernels.ALL_ACT_NAMES` (see :mod:`kernels.activations` for each formula).
    out : ndarray, float32, shape (Co, out_h, out_w), C-contiguous, optional
        Destination (for example a contiguous channel slice of a bigger buffer). Must not overlap
        ``x``, ``weight`` or ``bias``.
    exact : bool, default True
        True: the exact, tile-invariant blocked GEMM (see module docstring). False: im2col +
        BLAS sgemm (numpy's); usually a little different in the last bits and *not* tile-invariant.
    dilation : int, default 1
        Distance between kernel taps, in input pixels.
    groups : int, default 1
        Both C and Co must be divisible by it; ``groups == C == Co`` is a depthwise convolution.
        Each group is its own exact GEMM, so the bits of an output do not depend on the others.

    Returns
    -------
    ndarray, float32, shape (Co, out_h, out_w)
        ``out`` if it was given, else a new array.

    Raises
    ------
    ValueError
        Wrong type, dtype, number of dimensions or shape; non-positive stride, dilation, groups
        or output size; groups not dividing the channels; unknown activation; unusable ``out``.
    """
    x = _check_f32("x", x, 3, "(C, H, W)")
    weight = _check_f32("weight", weight, 4, "(Co, C/groups, k, k)")
    bias = _check_f32("bias", bias, 1, "(Co,)")
    c_n, h, w = x.shape
    co_n, wc, k, k2 = weight.shape
    if c_n < 1 or h < 1 or w < 1:
        raise ValueError(f"x must be non-empty, got shape {x.shape}")
    if co_n < 1 or k < 1:
        raise ValueError(f"weight must be non-empty, got shape {weight.shape}")
    groups = _check_int("groups", groups, 1)
    dilation = _check_int("dilation", dilation, 1)
    if c_n % groups or co_n % groups:
        raise ValueError(f"groups={groups} must divide the input channels ({c_n}) and the filters ({co_n})")
    cg = c_n // groups
    if wc != cg or k2 != k:
        per_group = f" and groups={groups}" if groups > 1 else ""
        raise ValueError(f"weight shape must be (Co, {cg}, k, k) for x of shape {x.shape}{per_group}, "
                         f"got {weight.shape}")
    if bias.shape != (co_n,):
        raise ValueError(f"bias shape must be ({co_n},) for weight of shape {weight.shape}, got {bias.shape}")
    if isinstance(stride, tuple):
        if len(stride) != 2:
            raise ValueError(f"stride must be an int or (stride_y, stride_x), got {stride!r}")
        sy = _check_int("stride_y", stride[0], 1)
        sx = _check_int("stride_x", stride[1], 1)
    else:
        sy = sx = _check_int("stride", stride, 1)
    pad_top = _check_int("pad_top", pad_top)
    pad_left = _check_int("pad_left", pad_left)
    span = (k - 1) * dilation + 1
    if out_h is None:
        out_h = (h + 2 * pad_top - span) // sy + 1
        if out_h < 1:
            raise ValueError(f"default out_h = (H + 2*pad_top - span)//stride + 1 = {out_h} < 1 "
                             f"(H={h}, pad_top={pad_top}, span={span}, stride={sy}); pass out_h")
    if out_w is None:
        out_w = (w + 2 * pad_left - span) // sx + 1
        if out_w < 1:
            raise ValueError(f"default out_w = (W + 2*pad_left - span)//stride + 1 = {out_w} < 1 "
                             f"(W={w}, pad_left={pad_left}, span={span}, stride={sx}); pass out_w")
    out_h = _check_int("out_h", out_h, 1)
    out_w = _check_int("out_w", out_w, 1)
    act = _act_code(activation)
    out = output_array(out, (co_n, out_h, out_w), x=x, weight=weight, bias=bias)
    og = co_n // groups
    if exact and groups > 1 and cg <= DIRECT_MAX_CG:
        # depthwise and other thin groups: one direct pass over all groups (see above)
        of = out.reshape(-1)
        vec = act <= ACT_RELU or act == ACT_RELU6  # activations of the vector epilogue
        _conv2d_direct(x, weight.reshape(-1), bias, k, sy, sx, dilation, pad_top, pad_left, out_h, out_w,
                       act if vec else ACT_LINEAR, groups, og, of, ZMM)
        if not vec:
            _activate_flat(of, act)
        return out
    if exact and groups == 1 and MR == 8 and c_n <= DIRECT8_MAX_C and c_n * k * k <= DIRECT8_MAX_K:
        vec = act <= ACT_RELU or act == ACT_RELU6
        out2 = out.reshape(co_n, out_h * out_w)
        _conv2d_direct8(x, weight.reshape(co_n, c_n * k * k), bias, k, sy, sx, dilation, pad_top, pad_left, out_h,
                        out_w, act if vec else ACT_LINEAR, out2)
        if not vec:
            _activate_flat(out2.reshape(-1), act)
        return out
    for g in range(groups):
        # channel slices of C-contiguous CHW arrays are C-contiguous views: no copies
        xg = x if groups == 1 else x[g * cg:(g + 1) * cg]
        w2 = weight[g * og:(g + 1) * og].reshape(og, cg * k * k)
        bg = bias if groups == 1 else bias[g * og:(g + 1) * og]
        out2 = out[g * og:(g + 1) * og].reshape(og, out_h * out_w)  # a view: out is C-contiguous
        if exact and act > ACT_RELU and not (ZMM and act == ACT_RELU6):
            # AlexeyAB's float32 activations run as a pass over the finished group rather than in
            # the tile loop: code in that loop (even in a branch never taken) cost YOLOv2's 3x3
            # layers ~8%; the bits are the same, one scalar function of the same sums either way.
            # ReLU6 (MobileNetV2's) is the 16-lane micro-kernels' epilogue 4: a pass over the
            # finished output cost as much as the GEMM of a 1x1 layer with few input channels
            if ZMM:
                _conv2d_exact_z(xg, w2, bg, k, sy, sx, dilation, pad_top, pad_left, out_h, out_w, ACT_LINEAR,
                                out2, KC, NCZ, MC, ORDER)
            else:
                _conv2d_exact_ext(xg, w2, bg, k, sy, sx, dilation, pad_top, pad_left, out_h, out_w, ACT_LINEAR,
                                  out2, KC, NC, MC, ORDER, MR)
            _activate_flat(out2.reshape(-1), act)
        elif exact and ZMM:
            _conv2d_exact_z(xg, w2, bg, k, sy, sx, dilation, pad_top, pad_left, out_h, out_w, act, out2,
                            KC, NCZ, MC, ORDER)
        elif exact:
            _conv2d_exact_ext(xg, w2, bg, k, sy, sx, dilation, pad_top, pad_left, out_h, out_w, act, out2,
                              KC, NC, MC, ORDER, MR)
        else:
            _conv2d_blas(xg, w2, bg, k, sy, sx, dilation, pad_top, pad_left, out_h, out_w, act, out2)
    return out
