"""Max pooling with darknet 2017 semantics, float32, CHW."""

from __future__ import annotations

import numpy as np
from numba import njit

from ._config import JIT_OPTS
from ._simd import vdeinterleave, vload, vmaskload, vmaskload2, vmaxgt, vsplatf, vstore, vstoren
from ._validate import output_array
from .conv import _check_f32, _check_int

#: Darknet starts every window from ``-FLT_MAX``; a window entirely outside ``x`` yields it.
NEG_FLT_MAX = np.float32(-np.finfo(np.float32).max)


@njit(inline="always", **JIT_OPTS)
def _window_max(x, c, iy0, ix0, ky_lo, ky_hi, size, w):
    """Max over the in-bounds part of one window, darknet's update rule and order."""
    m = NEG_FLT_MAX
    kx_lo = max(0, -ix0)
    kx_hi = min(size, w - ix0)
    for ky in range(ky_lo, ky_hi):
        for kx in range(kx_lo, kx_hi):
            v = x[c, iy0 + ky, ix0 + kx]
            if v > m:
                m = v
    return m


@njit(**JIT_OPTS)
def _maxpool2d(x, size, s, pt, pl, out):
    """``out[c, oy, ox] = max`` over the in-bounds part of the window.

    Darknet's update ``max = (val > max) ? val : max`` from ``-FLT_MAX``, ky-major, kx-minor:
    order matters for bits (the first of +0.0/-0.0 wins, NaN never wins), so every path here
    keeps it. Windows fully inside the map on a row take a straight-line path (size 2 stride 2
    specialised: YOLO's pools), the rest a bounds-clipped loop.
    """
    c_n, h, w = x.shape
    _, out_h, out_w = out.shape
    # ox range whose whole window is inside [0, w) horizontally
    ox_lo = min(out_w, max(0, (pl + s - 1) // s))
    ox_hi = max(ox_lo, min(out_w, (w - size + pl) // s + 1)) if w - size + pl >= 0 else ox_lo
    for c in range(c_n):
        for oy in range(out_h):
            iy0 = oy * s - pt
            ky_lo = max(0, -iy0)
            ky_hi = min(size, h - iy0)
            if ky_hi <= ky_lo:
                for ox in range(out_w):
                    out[c, oy, ox] = NEG_FLT_MAX  # window entirely outside the map
                continue
            for ox in range(ox_lo):
                out[c, oy, ox] = _window_max(x, c, iy0, ox * s - pl, ky_lo, ky_hi, size, w)
            if size == 2 and s == 2 and ky_lo == 0 and ky_hi == 2:
                for ox in range(ox_lo, ox_hi):
                    ix = 2 * ox - pl
                    m = NEG_FLT_MAX
                    v = x[c, iy0, ix]
                    m = v if v > m else m
                    v = x[c, iy0, ix + 1]
                    m = v if v > m else m
                    v = x[c, iy0 + 1, ix]
                    m = v if v > m else m
                    v = x[c, iy0 + 1, ix + 1]
                    m = v if v > m else m
                    out[c, oy, ox] = m
            else:
                for ox in range(ox_lo, ox_hi):
                    ix0 = ox * s - pl
                    m = NEG_FLT_MAX
                    for ky in range(ky_lo, ky_hi):
                        for kx in range(size):
                            v = x[c, iy0 + ky, ix0 + kx]
                            m = v if v > m else m
                    out[c, oy, ox] = m
            for ox in range(ox_hi, out_w):
                out[c, oy, ox] = _window_max(x, c, iy0, ox * s - pl, ky_lo, ky_hi, size, w)


@njit(**JIT_OPTS)
def _maxpool2d_s1(x, size, pt, pl, out):
    """Stride 1 (SPP's 5/9/13 pools, YOLOv3-tiny's 2x2/1), separable and 8 lanes at a time.

    Darknet's scan keeps the *first* value, in ky-major kx-minor order, that is greater than
    everything before it; that is the first of the window's maximal elements in that order. A
    row pass (the kx scan, from -FLT_MAX, for each input row) then a column pass (the ky scan of
    the row results, from -FLT_MAX) finds the same element: the first row holding the maximum,
    then its first position. A position outside the map is skipped in darknet and reads as
    -FLT_MAX here, which never wins against a running max that starts at -FLT_MAX. So the bits
    are those of :func:`_maxpool2d`, at 2*size instead of size**2 compares per output.
    """
    c_n, h, w = x.shape
    _, out_h, out_w = out.shape
    xf = x.reshape(c_n * h * w)
    of = out.reshape(c_n * out_h * out_w)
    neg = vsplatf(NEG_FLT_MAX)
    wr = (out_w + 7) // 8 * 8  # row pass buffer pitch (whole vectors)
    rows = np.empty(h * wr, np.float32)
    for c in range(c_n):
        # row pass: rows[iy, ox] = max over kx of x[c, iy, ox - pl + kx] (in-map positions)
        for iy in range(h):
            src = (c * h + iy) * w - pl
            for ox in range(0, out_w, 8):
                m = neg
                for kx in range(size):
                    o = ox + kx  # lane l reads column o + l - pl
                    lo = min(8, max(0, pl - o))
                    hi = max(0, min(8, w + pl - o))
                    m = vmaxgt(vmaskload(neg, xf, src + o, lo, hi), m)
                vstore(rows, iy * wr + ox, m)
        # column pass over the in-map rows of each window
        for oy in range(out_h):
            iy0 = oy - pt
            ky_lo = max(0, -iy0)
            ky_hi = min(size, h - iy0)
            dst = (c * out_h + oy) * out_w
            for ox in range(0, out_w, 8):
                m = neg
                for ky in range(ky_lo, ky_hi):
                    m = vmaxgt(vload(rows, (iy0 + ky) * wr + ox), m)
                vstoren(of, dst + ox, m, out_w - ox)


@njit(**JIT_OPTS)
def _maxpool2d_s2(x, size, pt, pl, out):
    """Stride 2 (YOLO's 2x2/2 pools), 8 outputs at a time with stride-2 loads: lane ``l`` of tap
    ``(ky, kx)`` reads column ``2*(ox + l) - pl + kx``; the taps are scanned in darknet's order
    (ky-major, kx-minor) with its update rule, and a column outside the map reads as -FLT_MAX,
    which never wins (see :func:`_maxpool2d_s1`): the bits of :func:`_maxpool2d`."""
    c_n, h, w = x.shape
    _, out_h, out_w = out.shape
    xf = x.reshape(c_n * h * w)
    of = out.reshape(c_n * out_h * out_w)
    neg = vsplatf(NEG_FLT_MAX)
    for c in range(c_n):
        for oy in range(out_h):
            iy0 = 2 * oy - pt
            ky_lo = max(0, -iy0)
            ky_hi = min(size, h - iy0)
            dst = (c * out_h + oy) * out_w
            for ox in range(0, out_w, 8):
                m = neg
                o = 2 * ox - pl
                if size == 2 and o >= 0 and o + 16 <= w:
                    # inside the map: two plain loads per row give both taps (even, odd columns)
                    for ky in range(ky_lo, ky_hi):
                        row = (c * h + iy0 + ky) * w + o
                        a = vload(xf, row)
                        b = vload(xf, row + 8)
                        m = vmaxgt(vdeinterleave(a, b, 0), m)
                        m = vmaxgt(vdeinterleave(a, b, 1), m)
                    vstoren(of, dst + ox, m, out_w - ox)
                    continue
                for ky in range(ky_lo, ky_hi):
                    row = (c * h + iy0 + ky) * w
                    for kx in range(size):
                        o = 2 * ox - pl + kx  # lane l reads column o + 2*l
                        lo = min(8, max(0, (1 - o) // 2))
                        hi = max(0, min(8, (w - o + 1) // 2))
                        m = vmaxgt(vmaskload2(neg, xf, row + o, lo, hi), m)
                vstoren(of, dst + ox, m, out_w - ox)


def maxpool2d(
    x: np.ndarray,
    *,
    size: int,
    stride: int,
    pad_top: int = 0,
    pad_left: int = 0,
    out_h: int | None = None,
    out_w: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Darknet (2017) ``[maxpool]``.

    ``out[c, oy, ox] = max_{ky, kx in [0, size)} x[c, oy*stride - pad_top + ky,
    ox*stride - pad_left + kx]``; window positions outside ``x`` are skipped (the running max
    starts from ``-FLT_MAX``, as in darknet), never treated as zeros.

    Parameters
    ----------
    x : ndarray, float32, shape (C, H, W)
        Made C-contiguous if needed.
    size, stride : int
        Window size and stride (>= 1). Size 2 stride 1 (yolov2-tiny's last pool, whose last
        window reads past the map) and any odd size work.
    pad_top, pad_left : int, default 0
        The first window starts at ``(-pad_top, -pad_left)``. For a darknet 2017 layer pass its
        ``padding`` (default ``(size - 1)//2``): its forward pass offsets windows by ``-l.pad``.
    out_h, out_w : int, optional
        Output size (>= 1). Default ``(H + 2*pad_top) // stride`` (same for W), darknet 2017's
        ``(h + 2*padding)/stride`` with ``padding`` = the offset given here.
    out : ndarray, float32, shape (C, out_h, out_w), C-contiguous, optional
        Destination; must not overlap ``x``.

    Returns
    -------
    ndarray, float32, shape (C, out_h, out_w)

    Raises
    ------
    ValueError
        Wrong type, dtype, dimensions, non-positive size/stride/output size, unusable ``out``.
    """
    x = _check_f32("x", x, 3, "(C, H, W)")
    c_n, h, w = x.shape
    if c_n < 1 or h < 1 or w < 1:
        raise ValueError(f"x must be non-empty, got shape {x.shape}")
    size = _check_int("size", size, 1)
    stride = _check_int("stride", stride, 1)
    pad_top = _check_int("pad_top", pad_top)
    pad_left = _check_int("pad_left", pad_left)
    if out_h is None:
        out_h = (h + 2 * pad_top) // stride
        if out_h < 1:
            raise ValueError(f"default out_h = (H + 2*pad_top)//stride = {out_h} < 1 "
                             f"(H={h}, pad_top={pad_top}, stride={stride}); pass out_h")
    if out_w is None:
        out_w = (w + 2 * pad_left) // stride
        if out_w < 1:
            raise ValueError(f"default out_w = (W + 2*pad_left)//stride = {out_w} < 1 "
                             f"(W={w}, pad_left={pad_left}, stride={stride}); pass out_w")
    out_h = _check_int("out_h", out_h, 1)
    out_w = _check_int("out_w", out_w, 1)
    out = output_array(out, (c_n, out_h, out_w), x=x)
    if stride == 1 and size > 1:  # same bits as _maxpool2d (see _maxpool2d_s1)
        _maxpool2d_s1(x, size, pad_top, pad_left, out)
    elif stride == 2:  # likewise (see _maxpool2d_s2)
        _maxpool2d_s2(x, size, pad_top, pad_left, out)
    else:
        _maxpool2d(x, size, stride, pad_top, pad_left, out)
    return out
