"""Kernels against the slow references in ``tests/naive.py``, plus the tile-invariance property.

Shapes are small so the whole file runs in well under a minute once Numba's cache is warm (the
first run on a machine compiles the kernels, ~30 s).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels
from kernels import activate, conv2d, maxpool2d, region_activate, reorg
from kernels import conv as conv_mod

from . import naive

def examples(n: int) -> settings:
    """Hypothesis settings: ``n`` examples, no per-example deadline (the first call compiles)."""
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ACTS = ["linear", "leaky", "logistic", "relu"]


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint32)


def assert_same_bits(a: np.ndarray, b: np.ndarray, msg: str = "") -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = bits(a) != bits(b)
    assert not diff.any(), f"{msg}: {int(diff.sum())} of {diff.size} elements differ, first at {np.argwhere(diff)[0]}"


def rand(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Convolution vs the float64 reference
# ----------------------------------------------------------------------------------------------


def conv_tolerance(mag: np.ndarray, k_terms: int, ref: np.ndarray) -> np.ndarray:
    """Error bound for ``act(bias + sum)`` computed in float32, against ``ref`` = the activation
    of the exact (float64) pre-activation value.

    Recursive summation of K products with fma has a first-order error of at most
    ``K * u * sum|w*x|`` (u = 2**-24, one rounding per step: Higham's gamma_K); the bias add and
    the reference's own rounding to float32 are two more roundings, each <= u * mag (``+ 3``
    leaves one spare). ``mag`` = ``sum|w*x| + |b|`` per output (from the reference). The
    activations are 1-Lipschitz, then both sides round the result: ``2 u |ref|``. This cannot be
    exceeded by a correct float32 kernel whatever the cancellation, yet a flipped kernel fails it
    (see below).
    """
    return (k_terms + 3) * 2.0**-24 * mag + 2.0 * 2.0**-24 * np.abs(ref) + 1e-35


@st.composite
def conv_cases(draw):
    c = draw(st.integers(1, 5))
    co = draw(st.integers(1, 10))  # not always a multiple of the 4-row register block
    k = draw(st.sampled_from([1, 2, 3, 5]))
    stride = draw(st.sampled_from([1, 2]))
    h = draw(st.integers(1, 11))
    w = draw(st.integers(1, 11))
    pad_top = draw(st.integers(0, k))
    pad_left = draw(st.integers(0, k))
    d_h = naive.conv_default_out(h, k, stride, pad_top)
    d_w = naive.conv_default_out(w, k, stride, pad_left)
    out_h = draw(st.one_of(st.none(), st.integers(1, max(1, d_h) + 3)))
    out_w = draw(st.one_of(st.none(), st.integers(1, max(1, d_w) + 3)))
    if out_h is None and d_h < 1 or out_w is None and d_w < 1:
        out_h, out_w = max(1, d_h), max(1, d_w)
    act = draw(st.sampled_from(ACTS))
    seed = draw(st.integers(0, 2**32 - 1))
    return c, co, k, stride, h, w, pad_top, pad_left, out_h, out_w, act, seed


@examples(250)
@given(conv_cases())
def test_conv2d_matches_reference(case):
    c, co, k, stride, h, w, pt, pl, out_h, out_w, act, seed = case
    rng = np.random.default_rng(seed)
    x, wt, b = rand(rng, (c, h, w)), rand(rng, (co, c, k, k)), rand(rng, co)
    y = conv2d(x, wt, b, stride=stride, pad_top=pt, pad_left=pl, out_h=out_h, out_w=out_w, activation=act)
    oh = out_h if out_h is not None else naive.conv_default_out(h, k, stride, pt)
    ow = out_w if out_w is not None else naive.conv_default_out(w, k, stride, pl)
    assert y.shape == (co, oh, ow) and y.dtype == np.float32
    val, mag = naive.conv2d(x, wt, b, stride, pt, pl, oh, ow)
    ref = naive.activate(val.astype(np.float32), act).astype(np.float64)
    # the activation is applied to the float32-rounded reference; allow its rounding in the bound
    err = np.abs(y.astype(np.float64) - ref)
    tol = conv_tolerance(mag, c * k * k, ref)
    assert (err <= tol).all(), f"max err {err.max():.3g}, tol there {tol.flat[err.argmax()]:.3g}"
    # the BLAS path computes the same function (not the same bits)
    y2 = conv2d(x, wt, b, stride=stride, pad_top=pt, pad_left=pl, out_h=out_h, out_w=out_w,
                activation=act, exact=False)
    assert (np.abs(y2.astype(np.float64) - ref) <= tol).all()


def test_conv_tolerance_catches_a_wrong_reference():
    """The tolerance is tight enough to fail a plausible bug: a flipped kernel (true convolution
    instead of darknet's cross-correlation) on a 3x3 layer."""
    rng = np.random.default_rng(1)
    x, wt, b = rand(rng, (4, 9, 9)), rand(rng, (5, 4, 3, 3)), rand(rng, 5)
    y = conv2d(x, wt, b, pad_top=1, pad_left=1)
    val, mag = naive.conv2d(x, wt, b, 1, 1, 1, 9, 9)
    tol = conv_tolerance(mag, 36, val)
    assert (np.abs(y - val) <= tol).all()
    wrong, _ = naive.conv2d(x, wt[:, :, ::-1, ::-1].copy(), b, 1, 1, 1, 9, 9)
    assert (np.abs(y - wrong) > tol).mean() > 0.9


def test_conv2d_tiny_maps_and_large_kernels():
    rng = np.random.default_rng(2)
    for (c, h, w, co, k, pad) in [(1, 1, 1, 1, 1, 0), (3, 2, 3, 7, 3, 1), (2, 1, 1, 5, 7, 3), (1, 3, 2, 9, 5, 2)]:
        x, wt, b = rand(rng, (c, h, w)), rand(rng, (co, c, k, k)), rand(rng, co)
        y = conv2d(x, wt, b, pad_top=pad, pad_left=pad, activation="leaky")
        val, mag = naive.conv2d(x, wt, b, 1, pad, pad, y.shape[1], y.shape[2])
        ref = naive.activate(val.astype(np.float32), "leaky")
        assert (np.abs(y.astype(np.float64) - ref) <= conv_tolerance(mag, c * k * k, ref)).all()


def test_conv2d_out_argument_and_noncontiguous_inputs():
    rng = np.random.default_rng(3)
    x = rand(rng, (3, 10, 12))[:, :, ::2]  # non-contiguous view, (3, 10, 6)
    wt, b = rand(rng, (8, 3, 3, 3)), rand(rng, 8)
    y = conv2d(x, wt, b, pad_top=1, pad_left=1, activation="leaky")
    big = np.full((12, 10, 6), 7.0, np.float32)
    r = conv2d(x, wt, b, pad_top=1, pad_left=1, activation=kernels.ACT_LEAKY, out=big[2:10])
    assert r.base is big or np.shares_memory(r, big)
    assert_same_bits(big[2:10], y, "out= slice")
    assert (big[:2] == 7).all() and (big[10:] == 7).all()


def test_conv2d_default_path_is_blocking_invariant():
    """Tiny cache blocks (many K blocks, N blocks, both loop orders) give the same bits as the
    default blocking: splitting K stores the float32 partial sum, which is what the register held."""
    rng = np.random.default_rng(4)
    x, wt, b = rand(rng, (7, 13, 11)), rand(rng, (10, 7, 3, 3)), rand(rng, 10)
    ref = conv2d(x, wt, b, pad_top=1, pad_left=1, activation="leaky")
    w2 = wt.reshape(10, -1)
    for kc, nc, mc, order in [(5, 24, 4, 0), (5, 24, 4, 1), (17, 48, 8, 0), (63, 72, 12, 1), (1000, 24 * 200, 400, 0)]:
        out = np.empty((10, 13 * 11), np.float32)
        conv_mod._conv2d_exact(x, w2, b, 3, 1, 1, 1, 13, 11, kernels.ACT_LEAKY, out, kc, nc, mc, order)
        assert_same_bits(out.reshape(10, 13, 11), ref, f"blocking {kc, nc, mc, order}")
    # the 16-lane (AVX-512F) variant: 48-pixel panels, so multiples of 48 pixels per block
    for kc, nc, mc, order in [(5, 48, 4, 0), (5, 48, 8, 1), (17, 96, 8, 0), (63, 144, 16, 1), (1000, 48 * 100, 400, 0)]:
        out = np.empty((10, 13 * 11), np.float32)
        conv_mod._conv2d_exact_z(x, w2, b, 3, 1, 1, 1, 1, 1, 13, 11, kernels.ACT_LEAKY, out, kc, nc, mc, order)
        assert_same_bits(out.reshape(10, 13, 11), ref, f"16 lanes, blocking {kc, nc, mc, order}")


# ----------------------------------------------------------------------------------------------
# Tile invariance: the property fused-tile inference relies on
# ----------------------------------------------------------------------------------------------


@st.composite
def tile_cases(draw):
    c = draw(st.integers(1, 6))
    co = draw(st.integers(1, 9))
    k = draw(st.sampled_from([1, 2, 3, 5]))
    stride = draw(st.sampled_from([1, 2]))
    h = draw(st.integers(k, 30))
    w = draw(st.integers(k, 30))
    pad = draw(st.integers(0, k // 2 + 1))
    out_h = naive.conv_default_out(h, k, stride, pad) + draw(st.integers(0, 2))
    out_w = naive.conv_default_out(w, k, stride, pad) + draw(st.integers(0, 2))
    # an output window; the borders (0 and out_*) are drawn often
    oy0 = draw(st.one_of(st.just(0), st.integers(0, out_h - 1)))
    oy1 = draw(st.one_of(st.just(out_h), st.integers(oy0 + 1, out_h)))
    ox0 = draw(st.one_of(st.just(0), st.integers(0, out_w - 1)))
    ox1 = draw(st.one_of(st.just(out_w), st.integers(ox0 + 1, out_w)))
    margin = draw(st.integers(0, 2))  # extra input rows/cols given to the tile (negative pad)
    act = draw(st.sampled_from(ACTS))
    # cache blocking of the tile's call (K block, pixel block, channel block, loop order)
    blocking = (draw(st.integers(1, 40)), 24 * draw(st.integers(1, 4)), 4 * draw(st.integers(1, 3)),
                draw(st.integers(0, 1)))
    seed = draw(st.integers(0, 2**32 - 1))
    return c, co, k, stride, h, w, pad, out_h, out_w, (oy0, oy1, ox0, ox1), margin, act, blocking, seed


def _tile_input_range(o0, o1, stride, pad, k, size, margin):
    """Input rows/cols [a, b) to give a tile of outputs [o0, o1): all in-map rows its windows
    read, plus up to ``margin`` more on each side, and at least one row."""
    a = min(max(o0 * stride - pad - margin, 0), size - 1)
    b = min(max((o1 - 1) * stride - pad + k + margin, a + 1), size)
    return a, b


@examples(400)
@given(tile_cases())
def test_conv2d_tile_invariance(case):
    c, co, k, stride, h, w, pad, out_h, out_w, win, margin, act, blocking, seed = case
    oy0, oy1, ox0, ox1 = win
    rng = np.random.default_rng(seed)
    # values spanning magnitudes so that a changed summation order would show in the bits
    x = (rand(rng, (c, h, w)) * np.exp(rng.uniform(-4, 4, (c, h, w)))).astype(np.float32)
    wt, b = rand(rng, (co, c, k, k)), rand(rng, co)
    full = conv2d(x, wt, b, stride=stride, pad_top=pad, pad_left=pad, out_h=out_h, out_w=out_w, activation=act)
    ya, yb = _tile_input_range(oy0, oy1, stride, pad, k, h, margin)
    xa, xb = _tile_input_range(ox0, ox1, stride, pad, k, w, margin)
    tile = conv2d(x[:, ya:yb, xa:xb], wt, b, stride=stride,
                  pad_top=pad - oy0 * stride + ya, pad_left=pad - ox0 * stride + xa,
                  out_h=oy1 - oy0, out_w=ox1 - ox0, activation=act)
    assert_same_bits(tile, full[:, oy0:oy1, ox0:ox1], f"window {win}")
    # the same tile through the driver with small, random cache blocks: same bits again
    xt = np.ascontiguousarray(x[:, ya:yb, xa:xb])
    out = np.empty((co, (oy1 - oy0) * (ox1 - ox0)), np.float32)
    conv_mod._conv2d_exact(xt, wt.reshape(co, -1), b, k, stride, pad - oy0 * stride + ya, pad - ox0 * stride + xa,
                           oy1 - oy0, ox1 - ox0, kernels.activations._act_code(act), out, *blocking)
    assert_same_bits(out.reshape(tile.shape), tile, f"window {win}, blocking {blocking}")
    # and through the 16-lane variant's driver (48-pixel panels), whichever one conv2d took
    kc, nc, mc, order = blocking
    conv_mod._conv2d_exact_z(xt, wt.reshape(co, -1), b, k, stride, stride, 1, pad - oy0 * stride + ya,
                             pad - ox0 * stride + xa, oy1 - oy0, ox1 - ox0, kernels.activations._act_code(act),
                             out, kc, 2 * nc, mc, order)
    assert_same_bits(out.reshape(tile.shape), tile, f"window {win}, 16 lanes, blocking {blocking}")


def test_tile_invariance_data_is_sensitive_to_summation_order():
    """The bit comparisons above have teeth: on data like theirs, summing the same products in
    another order (here: reversed K, float32) changes the bits of most outputs, so a kernel whose
    order depended on the tile would be caught."""
    rng = np.random.default_rng(11)
    x = (rand(rng, (6, 10, 10)) * np.exp(rng.uniform(-4, 4, (6, 10, 10)))).astype(np.float32)
    wt, b = rand(rng, (4, 6, 3, 3)), np.zeros(4, np.float32)
    y = conv2d(x, wt, b, pad_top=1, pad_left=1)
    # the same products X[kk] * W[kk] (from the float64 reference's patch), summed in reverse
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    rev = np.zeros((4, 10, 10), np.float32)
    for c in reversed(range(6)):
        for ky in reversed(range(3)):
            for kx in reversed(range(3)):
                rev += wt[:, c, ky, kx, None, None] * xp[None, c, ky:ky + 10, kx:kx + 10]
    assert (bits(rev) != bits(y)).mean() > 0.5


def test_tile_invariance_on_a_yolo_like_layer():
    """A 3x3 layer with K > one K block (C = 40: K = 360) cut in a 3 x 2 grid of tiles."""
    rng = np.random.default_rng(5)
    x, wt, b = rand(rng, (40, 26, 26)), rand(rng, (13, 40, 3, 3), 0.1), rand(rng, 13)
    full = conv2d(x, wt, b, pad_top=1, pad_left=1, activation="leaky")
    out = np.empty_like(full)
    for y0, y1 in [(0, 9), (9, 17), (17, 26)]:
        for x0, x1 in [(0, 13), (13, 26)]:
            a, bb = max(0, y0 - 1), min(26, y1 + 1)
            c0, c1 = max(0, x0 - 1), min(26, x1 + 1)
            out[:, y0:y1, x0:x1] = conv2d(x[:, a:bb, c0:c1], wt, b, pad_top=1 - y0 + a, pad_left=1 - x0 + c0,
                                          out_h=y1 - y0, out_w=x1 - x0, activation="leaky")
    assert_same_bits(out, full, "stitched tiles")


def test_conv2d_concurrent_calls_from_threads():
    """Kernels release the GIL and share no state: concurrent calls give the serial result."""
    rng = np.random.default_rng(6)
    x, wt, b = rand(rng, (16, 40, 40)), rand(rng, (32, 16, 3, 3)), rand(rng, 32)
    ref = conv2d(x, wt, b, pad_top=1, pad_left=1, activation="leaky")
    outs = [np.empty_like(ref) for _ in range(4)]
    threads = [threading.Thread(target=conv2d, args=(x, wt, b),
                                kwargs=dict(pad_top=1, pad_left=1, activation="leaky", out=o)) for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for o in outs:
        assert_same_bits(o, ref, "threaded")


# ----------------------------------------------------------------------------------------------
# Max pooling
# ----------------------------------------------------------------------------------------------


@st.composite
def pool_cases(draw):
    size = draw(st.integers(1, 5))
    stride = draw(st.integers(1, 3))
    c = draw(st.integers(1, 4))
    h = draw(st.integers(1, 14))
    w = draw(st.integers(1, 14))
    pt = draw(st.integers(0, size))
    pl = draw(st.integers(0, size))
    out_h = draw(st.one_of(st.none(), st.integers(1, 9)))
    out_w = draw(st.one_of(st.none(), st.integers(1, 9)))
    if out_h is None and (h + 2 * pt) // stride < 1:
        out_h = 1
    if out_w is None and (w + 2 * pl) // stride < 1:
        out_w = 1
    seed = draw(st.integers(0, 2**32 - 1))
    return size, stride, c, h, w, pt, pl, out_h, out_w, seed


@examples(150)
@given(pool_cases())
def test_maxpool2d_matches_reference(case):
    size, stride, c, h, w, pt, pl, out_h, out_w, seed = case
    rng = np.random.default_rng(seed)
    x = rand(rng, (c, h, w))
    # sprinkle values where darknet's rule matters: signed zeros (first one wins) and NaN (never wins)
    flat = x.reshape(-1)
    flat[rng.random(flat.size) < 0.15] = 0.0
    flat[rng.random(flat.size) < 0.15] = -0.0
    flat[rng.random(flat.size) < 0.05] = np.nan
    y = maxpool2d(x, size=size, stride=stride, pad_top=pt, pad_left=pl, out_h=out_h, out_w=out_w)
    oh = out_h if out_h is not None else (h + 2 * pt) // stride
    ow = out_w if out_w is not None else (w + 2 * pl) // stride
    assert_same_bits(y, naive.maxpool2d(x, size, stride, pt, pl, oh, ow), "maxpool")


def test_maxpool2d_yolo_cases():
    rng = np.random.default_rng(7)
    x = rand(rng, (5, 13, 13))
    # yolov2-tiny's last pool: size 2 stride 1 keeps 13x13; the last window reads outside and skips it
    y = maxpool2d(x, size=2, stride=1, pad_top=0, pad_left=0, out_h=13, out_w=13)
    assert y.shape == (5, 13, 13)
    assert_same_bits(y, naive.maxpool2d(x, 2, 1, 0, 0, 13, 13), "2/1")
    assert_same_bits(y[:, 12, 12], x[:, 12, 12], "corner window has one in-bounds pixel")
    x = rand(rng, (4, 38, 38))
    assert_same_bits(maxpool2d(x, size=2, stride=2), naive.maxpool2d(x, 2, 2, 0, 0, 19, 19), "2/2")
    assert_same_bits(maxpool2d(x, size=3, stride=2, pad_top=1, pad_left=1),
                     naive.maxpool2d(x, 3, 2, 1, 1, 20, 20), "3/2 pad 1")
    # all-negative input with a window half outside: skipped positions are not zeros
    neg = -np.abs(rand(rng, (1, 3, 3))) - 1
    assert (maxpool2d(neg, size=2, stride=2, out_h=2, out_w=2) < 0).all()
    # a window entirely outside gives darknet's -FLT_MAX
    far = maxpool2d(neg, size=2, stride=2, out_h=4, out_w=4)
    assert far[0, 3, 3] == -np.finfo(np.float32).max


# ----------------------------------------------------------------------------------------------
# Reorg
# ----------------------------------------------------------------------------------------------


@examples(40)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_reorg_matches_darknet_transcription(s, cq, hq, wq, seed):
    rng = np.random.default_rng(seed)
    x = rand(rng, (cq * s * s, hq * s, wq * s))
    y = reorg(x, s)
    assert y.shape == (cq * s**4, hq, wq)
    assert_same_bits(y, naive.reorg(x, s), "reorg")


def test_reorg_is_not_textbook_space_to_depth():
    """The check above could pass with a wrong reference; this one shows the two permutations
    really differ (so a textbook implementation would have failed), on YOLOv2's own shape."""
    x = np.arange(64 * 26 * 26, dtype=np.float32).reshape(64, 26, 26)
    y = reorg(x, 2)
    std = naive.space_to_depth(x, 2)
    assert y.shape == std.shape == (256, 13, 13)
    assert not np.array_equal(y, std)
    assert_same_bits(y, naive.reorg(x, 2), "reorg yolov2")
    assert sorted(y.reshape(-1)) == sorted(x.reshape(-1))  # still a permutation


# ----------------------------------------------------------------------------------------------
# Activations and region
# ----------------------------------------------------------------------------------------------


SPECIAL = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-38, -1e-38, 88.7, -88.7, 103.0, -104.0, 3e38, -3e38,
                    np.inf, -np.inf, np.nan, 1.0, -1.0, 0.5, -0.5], np.float32)


def assert_same_or_both_nan(a, b, msg):
    nan = np.isnan(a)
    assert (nan == np.isnan(b)).all(), msg
    assert_same_bits(np.where(nan, 0, a).astype(np.float32), np.where(nan, 0, b).astype(np.float32), msg)


@pytest.mark.parametrize("act", ACTS)
def test_activate_exact(act):
    rng = np.random.default_rng(8)
    x = np.concatenate([SPECIAL, rand(rng, 3000, 5.0), rand(rng, 1000, 40.0)])
    ref = naive.activate(x, act)
    y = x.copy()
    assert activate(y, act) is y
    assert_same_or_both_nan(y, ref, act)
    # non-contiguous and Fortran-ordered inputs are modified in place as well
    buf = np.zeros((40, 200), np.float32)
    buf[:, ::2] = x[:4000].reshape(40, 100)
    z = buf[:, ::2]
    activate(z, act)
    assert (buf[:, 1::2] == 0).all()
    assert_same_or_both_nan(z, ref[:4000].reshape(40, 100), act + " strided")
    f = np.asfortranarray(x[:4000].reshape(40, 100))
    activate(f, act)
    assert_same_or_both_nan(f, ref[:4000].reshape(40, 100), act + " fortran")


def test_leaky_is_computed_in_double():
    """Darknet's ``.1*x`` is a double product; in float32 some results differ. The kernel must
    match the double one, and such inputs exist (else this distinction would be untested)."""
    rng = np.random.default_rng(9)
    x = -np.abs(rand(rng, 20000, 10.0))
    in_double = (x.astype(np.float64) * 0.1).astype(np.float32)
    in_float = x * np.float32(0.1)
    assert (in_double != in_float).any()
    y = activate(x.copy(), "leaky")
    assert_same_bits(y, in_double, "leaky")
    # and the conv epilogue (vector code) agrees with the elementwise kernel
    wt = np.ones((1, 1, 1, 1), np.float32)
    yc = conv2d(x.reshape(1, 1, -1), wt, np.zeros(1, np.float32), activation="leaky")
    assert_same_bits(yc.reshape(-1), in_double, "conv leaky epilogue")


@examples(30)
@given(st.integers(1, 5), st.sampled_from([2, 4]), st.integers(0, 7), st.integers(1, 5), st.integers(1, 5),
       st.booleans(), st.integers(0, 2**32 - 1))
def test_region_activate_matches_darknet(num, coords, classes, h, w, sm, seed):
    rng = np.random.default_rng(seed)
    x = rand(rng, (num * (coords + 1 + classes), h, w), 4.0)
    y = region_activate(x, num=num, coords=coords, classes=classes, softmax=sm)
    assert y is not x
    assert_same_bits(y, naive.region(x, num, coords, classes, sm), "region")


def test_region_yolov2_shape():
    rng = np.random.default_rng(10)
    x = rand(rng, (425, 13, 13), 3.0)
    x0 = x.copy()
    y = region_activate(x, num=5, coords=4, classes=80)
    assert_same_bits(x, x0, "input untouched")
    assert_same_bits(y, naive.region(x, 5, 4, 80, True), "yolov2 region")
    probs = y.reshape(5, 85, 169)[:, 5:, :].astype(np.float64).sum(axis=1)
    assert np.allclose(probs, 1.0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def _conv_ok():
    return np.zeros((3, 8, 8), np.float32), np.zeros((4, 3, 3, 3), np.float32), np.zeros(4, np.float32)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda x, w, b: (x.astype(np.float64), w, b), "x must be float32, got float64"),
        (lambda x, w, b: (x[0], w, b), r"x must have 3 dimensions \(C, H, W\), got shape \(8, 8\)"),
        (lambda x, w, b: (x, w[:, :2], b),
         r"weight shape must be \(Co, 3, k, k\) for x of shape \(3, 8, 8\), got \(4, 2, 3, 3\)"),
        (lambda x, w, b: (x, w[:, :, :, :2], b), r"got \(4, 3, 3, 2\)"),
        (lambda x, w, b: (x, w, b[:3]), r"bias shape must be \(4,\) .* got \(3,\)"),
        (lambda x, w, b: (x, w.astype(np.float16), b), "weight must be float32, got float16"),
        (lambda x, w, b: (x.tolist(), w, b), "x must be a numpy.ndarray, got list"),
    ],
)
def test_conv2d_rejects_bad_arrays(mutate, match):
    x, w, b = mutate(*_conv_ok())
    with pytest.raises(ValueError, match=match):
        conv2d(x, w, b)


def test_conv2d_rejects_bad_options():
    x, w, b = _conv_ok()
    with pytest.raises(ValueError, match="stride must be >= 1, got 0"):
        conv2d(x, w, b, stride=0)
    with pytest.raises(ValueError, match="out_h must be >= 1, got 0"):
        conv2d(x, w, b, out_h=0)
    with pytest.raises(ValueError, match=r"default out_w = .* = -1 < 1"):
        conv2d(x[:, :, :1], w, b)
    with pytest.raises(ValueError, match="activation must be one of"):
        conv2d(x, w, b, activation="swish")
    with pytest.raises(ValueError, match="activation must be one of"):
        conv2d(x, w, b, activation=7)
    with pytest.raises(ValueError, match=r"out shape must be \(4, 6, 6\), got \(4, 6, 5\)"):
        conv2d(x, w, b, out=np.empty((4, 6, 5), np.float32))
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        conv2d(x, w, b, out=np.empty((4, 6, 12), np.float32)[:, :, ::2])
    with pytest.raises(ValueError, match="out must be a float32 ndarray, got float64"):
        conv2d(x, w, b, out=np.empty((4, 6, 6)))
    with pytest.raises(ValueError, match="pad_top must be an int"):
        conv2d(x, w, b, pad_top=1.5)


def test_other_kernels_reject_bad_input():
    x = np.zeros((8, 4, 6), np.float32)
    with pytest.raises(ValueError, match="x must be float32, got int64"):
        maxpool2d(x.astype(np.int64), size=2, stride=2)
    with pytest.raises(ValueError, match="size must be >= 1, got 0"):
        maxpool2d(x, size=0, stride=2)
    with pytest.raises(ValueError, match=r"out shape must be \(8, 2, 3\)"):
        maxpool2d(x, size=2, stride=2, out=np.empty((8, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"C=8 must be divisible by stride\*\*2=9"):
        reorg(x, 3)
    with pytest.raises(ValueError, match="H=4 and W=6 must be divisible by stride=4"):
        reorg(np.zeros((16, 4, 6), np.float32), 4)
    with pytest.raises(ValueError, match=r"x must have 3 dimensions"):
        reorg(x[0], 2)
    with pytest.raises(ValueError, match=r"num\*\(coords\+1\+classes\) = 2\*\(4\+1\+3\) = 16 channels, got 8"):
        region_activate(x, num=2, coords=4, classes=3)
    with pytest.raises(ValueError, match="x must be float32, got float64"):
        activate(np.zeros(3), "leaky")
    with pytest.raises(ValueError, match="activation must be one of"):
        activate(np.zeros(3, np.float32), "tanh")
