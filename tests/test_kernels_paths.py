"""The kernels' special paths give the general path's bits.

``kernels.conv2d`` takes a direct path for grouped convolutions with few input channels per
group (depthwise), and ``kernels.maxpool2d`` separable/specialised loops for stride-1 pools. Each
must produce exactly the bits of the general path (the blocked GEMM / the plain window scan),
whatever the shape, padding, tile offset or activation, since tiled and whole-frame inference
may take different paths for the same output. Each test forces the general path through the
module switch and compares bit for bit (the general paths themselves are checked against slow
references in test_kernels.py and test_darknet_v4.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels
from kernels import conv as conv_mod

ACTS = list(kernels.ALL_ACT_NAMES)


def examples(n: int) -> settings:
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_same_bits(a: np.ndarray, b: np.ndarray, msg: str = "") -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = a.view(np.uint32) != b.view(np.uint32)
    assert not diff.any(), f"{msg}: {int(diff.sum())} of {diff.size} differ, first at {np.argwhere(diff)[0]}"


def general_conv(monkeypatch: pytest.MonkeyPatch, *args, **kw) -> np.ndarray:
    """``kernels.conv2d`` through the blocked GEMM only (the direct paths switched off)."""
    with monkeypatch.context() as m:
        m.setattr(conv_mod, "DIRECT_MAX_CG", 0)
        m.setattr(conv_mod, "DIRECT8_MAX_C", 0)
        return kernels.conv2d(*args, **kw)


@st.composite
def grouped_cases(draw):
    groups = draw(st.integers(2, 7))
    cg = draw(st.integers(1, conv_mod.DIRECT_MAX_CG))
    og = draw(st.integers(1, 5))
    k = draw(st.sampled_from([1, 2, 3, 5]))
    sy, sx = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    d = draw(st.integers(1, 2))
    h, w = draw(st.integers(1, 30)), draw(st.integers(1, 40))
    pt, pl = draw(st.integers(-2, k + 1)), draw(st.integers(-2, k + 1))
    oh, ow = draw(st.integers(1, 12)), draw(st.integers(1, 35))  # widths across 8/24-lane blocks
    act = draw(st.sampled_from(ACTS))
    seed = draw(st.integers(0, 2**32 - 1))
    return groups, cg, og, k, sy, sx, d, h, w, pt, pl, oh, ow, act, seed


@examples(150)
@given(grouped_cases())
def test_direct_grouped_conv_has_the_gemm_bits(case):
    groups, cg, og, k, sy, sx, d, h, w, pt, pl, oh, ow, act, seed = case
    rng = np.random.default_rng(seed)
    # magnitudes spread so that another summation order would show in the bits
    x = (rng.standard_normal((groups * cg, h, w)) * np.exp(rng.uniform(-4, 4, (groups * cg, h, w))))
    x = x.astype(np.float32)
    wt = rng.standard_normal((groups * og, cg, k, k)).astype(np.float32)
    b = rng.standard_normal(groups * og).astype(np.float32)
    kw = dict(stride=(sy, sx), pad_top=pt, pad_left=pl, out_h=oh, out_w=ow, activation=act, dilation=d,
              groups=groups)
    with pytest.MonkeyPatch.context() as mp:
        want = general_conv(mp, x, wt, b, **kw)
    got = kernels.conv2d(x, wt, b, **kw)
    assert_same_bits(got, want, str(case))
    # the direct kernel on 8- and 16-lane blocks (32 or 64 grid pixels; conv2d picks by conv.ZMM)
    code = kernels.activations._act_code(act)
    vec = code <= kernels.ACT_RELU or code == kernels.ACT_RELU6
    for wide in (False, True):
        out = np.empty_like(want)
        conv_mod._conv2d_direct(x, wt.reshape(-1), b, k, sy, sx, d, pt, pl, oh, ow, code if vec else 0, groups, og,
                                out.reshape(-1), wide)
        if not vec:
            kernels.activate(out, act)
        assert_same_bits(out, want, f"{case}, wide={wide}")


def test_depthwise_layers_run_the_direct_kernel_at_the_targets_width(monkeypatch):
    """conv2d sends a depthwise layer to :func:`_conv2d_direct` with ``wide = conv.ZMM`` (the
    16-lane block where the target has AVX-512F)."""
    calls = []
    real = conv_mod._conv2d_direct

    def spy(*args):
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(conv_mod, "_conv2d_direct", spy)
    x = np.random.default_rng(2).standard_normal((8, 9, 9)).astype(np.float32)
    for zmm in (False, True):
        monkeypatch.setattr(conv_mod, "ZMM", zmm)
        kernels.conv2d(x, np.ones((8, 1, 3, 3), np.float32), np.zeros(8, np.float32), pad_top=1, pad_left=1,
                       groups=8, activation="relu6")
    assert calls == [False, True]


def test_direct_path_is_taken_and_catches_a_reordered_sum(monkeypatch):
    """The comparison has teeth: the direct kernel is what runs for a depthwise layer (a wrong
    tap order in it is visible), and summing its taps in reverse changes most bits."""
    rng = np.random.default_rng(3)
    c = 16
    x = (rng.standard_normal((c, 20, 20)) * np.exp(rng.uniform(-4, 4, (c, 20, 20)))).astype(np.float32)
    wt = rng.standard_normal((c, 1, 3, 3)).astype(np.float32)
    b = np.zeros(c, np.float32)
    got = kernels.conv2d(x, wt, b, pad_top=1, pad_left=1, groups=c)
    # the direct path with the taps flipped computes another function: it is the code that ran
    flipped = kernels.conv2d(x, np.ascontiguousarray(wt[:, :, ::-1, ::-1]), b, pad_top=1, pad_left=1, groups=c)
    assert not np.array_equal(got, flipped)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    rev = np.zeros((c, 20, 20), np.float32)
    for ky in reversed(range(3)):
        for kx in reversed(range(3)):
            rev += wt[:, 0, ky, kx, None, None] * xp[:, ky:ky + 20, kx:kx + 20]
    assert (rev.view(np.uint32) != got.view(np.uint32)).mean() > 0.3
    assert_same_bits(got, general_conv(monkeypatch, x, wt, b, pad_top=1, pad_left=1, groups=c))


def test_mobilenet_like_depthwise_layer_tiles_exactly():
    """A depthwise 3x3/2 relu6 layer cut in 2 x 3 tiles equals the whole layer bit for bit."""
    rng = np.random.default_rng(8)
    c, h = 24, 29
    x = rng.standard_normal((c, h, h)).astype(np.float32)
    wt = rng.standard_normal((c, 1, 3, 3)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    full = kernels.conv2d(x, wt, b, stride=2, pad_top=1, pad_left=1, activation="relu6", groups=c)
    oh = full.shape[1]
    out = np.empty_like(full)
    for y0, y1 in [(0, 6), (6, oh)]:
        for x0, x1 in [(0, 4), (4, 11), (11, oh)]:
            a, z = max(0, 2 * y0 - 1), min(h, 2 * (y1 - 1) + 2)
            p, q = max(0, 2 * x0 - 1), min(h, 2 * (x1 - 1) + 2)
            out[:, y0:y1, x0:x1] = kernels.conv2d(x[:, a:z, p:q], wt, b, stride=2, pad_top=1 - 2 * y0 + a,
                                                  pad_left=1 - 2 * x0 + p, out_h=y1 - y0, out_w=x1 - x0,
                                                  activation="relu6", groups=c)
    assert_same_bits(out, full, "stitched depthwise tiles")


@st.composite
def strided_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cg = draw(st.integers(1, 6))
    og = draw(st.integers(1, 6))
    k = draw(st.sampled_from([1, 2, 3, 5]))
    sy, sx = draw(st.sampled_from([(2, 2), (1, 2), (2, 1), (3, 3), (2, 3)]))
    d = draw(st.integers(1, 2))
    h, w = draw(st.integers(1, 30)), draw(st.integers(1, 60))
    pt, pl = draw(st.integers(-2, k + 1)), draw(st.integers(-2, k + 1))
    oh, ow = draw(st.integers(1, 10)), draw(st.integers(1, 40))
    act = draw(st.sampled_from(ACTS))
    seed = draw(st.integers(0, 2**32 - 1))
    return groups, cg, og, k, sy, sx, d, h, w, pt, pl, oh, ow, act, seed


@examples(150)
@given(strided_cases())
def test_strided_conv_is_the_stride1_conv_subsampled(case):
    """A strided conv's output (oy, ox) is the stride-1 conv's (oy*sy, ox*sx): the same window,
    the same chain of fma, so the same bits. This checks the stride-2 vector packing of the GEMM
    (and the stride phases of the direct path) against the stride-1 vector path, bit for bit."""
    groups, cg, og, k, sy, sx, d, h, w, pt, pl, oh, ow, act, seed = case
    rng = np.random.default_rng(seed)
    c = groups * cg
    x = (rng.standard_normal((c, h, w)) * np.exp(rng.uniform(-4, 4, (c, h, w)))).astype(np.float32)
    wt = rng.standard_normal((groups * og, cg, k, k)).astype(np.float32)
    b = rng.standard_normal(groups * og).astype(np.float32)
    kw = dict(pad_top=pt, pad_left=pl, activation=act, dilation=d, groups=groups)
    got = kernels.conv2d(x, wt, b, stride=(sy, sx), out_h=oh, out_w=ow, **kw)
    dense = kernels.conv2d(x, wt, b, stride=1, out_h=(oh - 1) * sy + 1, out_w=(ow - 1) * sx + 1, **kw)
    assert_same_bits(got, np.ascontiguousarray(dense[:, ::sy, ::sx]), str(case))
    # and through the GEMM driver with small random cache blocks and both register blocks (4 and
    # 8 rows): the same bits again
    if groups == 1 and act in ("linear", "leaky", "relu", "relu6"):
        code = kernels.activations._act_code(act)
        kc, nc = int(rng.integers(1, 30)), 24 * int(rng.integers(1, 3))
        for mr in (4, 8) if act != "relu6" else ():  # the 8-lane driver has no relu6 epilogue
            out = np.empty((og, oh * ow), np.float32)
            conv_mod._conv2d_exact_ext(x, wt.reshape(og, -1), b, k, sy, sx, d, pt, pl, oh, ow, code, out, kc, nc,
                                       8, int(rng.integers(0, 2)), mr)
            assert_same_bits(out.reshape(got.shape), got, f"{case} blocking {kc, nc}, mr {mr}")
        out = np.empty((og, oh * ow), np.float32)  # the 16-lane variant (48-pixel panels)
        conv_mod._conv2d_exact_z(x, wt.reshape(og, -1), b, k, sy, sx, d, pt, pl, oh, ow, code, out, kc, 2 * nc, 8,
                                 int(rng.integers(0, 2)))
        assert_same_bits(out.reshape(got.shape), got, f"{case} blocking {kc, 2 * nc}, 16 lanes")


@examples(60)
@given(st.integers(1, 40), st.integers(1, 20), st.sampled_from([1, 3]), st.integers(1, 40), st.integers(1, 40),
       st.sampled_from(["linear", "leaky", "relu", "logistic"]), st.integers(0, 2**32 - 1))
def test_register_blocks_of_4_and_8_rows_give_the_same_bits(co, c, k, h, w, act, seed):
    """The 8 x 24 micro-kernel (targets with 32 vector registers) and the 4 x 24 one compute each
    element with the same chain: any Co (edge row blocks), any N (edge panels), K blocks."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((c, h, w)) * np.exp(rng.uniform(-4, 4, (c, h, w)))).astype(np.float32)
    wt = rng.standard_normal((co, c * k * k)).astype(np.float32)
    b = rng.standard_normal(co).astype(np.float32)
    code = kernels.activations._act_code(act)
    outs = []
    for mr, kc in ((4, 2304), (8, 2304), (8, 7)):
        out = np.empty((co, h * w), np.float32)
        conv_mod._conv2d_exact_ext(x, wt, b, k, 1, 1, 1, k // 2, k // 2, h, w, code, out, kc, 48, 16, 1, mr)
        outs.append(out)
    for kc in (2304, 7):  # 16-lane vectors, 8 x 48 blocks: edge panels of 1..48 pixels
        out = np.empty((co, h * w), np.float32)
        conv_mod._conv2d_exact_z(x, wt, b, k, 1, 1, 1, k // 2, k // 2, h, w, code, out, kc, 96, 16, 1)
        outs.append(out)
    assert_same_bits(outs[1], outs[0], "mr 8 vs 4")
    assert_same_bits(outs[2], outs[0], "mr 8, K blocks of 7, vs 4")
    assert_same_bits(outs[3], outs[0], "16 lanes vs 8 lanes, mr 4")
    assert_same_bits(outs[4], outs[0], "16 lanes, K blocks of 7, vs 8 lanes, mr 4")


@examples(40)
@given(st.integers(1, 20), st.integers(1, 12), st.sampled_from([1, 3]), st.sampled_from([(1, 1), (2, 2)]),
       st.integers(1, 30), st.integers(1, 60), st.sampled_from(ACTS), st.integers(0, 2**32 - 1))
def test_conv2d_on_16_and_8_lane_vectors_gives_the_same_bits(co, c, k, s, h, w, act, seed):
    """``kernels.conv2d`` with the 16-lane GEMM (``conv.ZMM``, the default where the target has
    AVX-512F) forced on and off: the same bits for every activation (the AlexeyAB ones run after
    the driver), any Co, N and stride. Elsewhere LLVM splits the 16-lane vectors in two; the
    arithmetic per lane is the same, so this holds on any machine."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((c, h, w)) * np.exp(rng.uniform(-4, 4, (c, h, w)))).astype(np.float32)
    wt = rng.standard_normal((co, c, k, k)).astype(np.float32)
    b = rng.standard_normal(co).astype(np.float32)
    kw = dict(stride=s, pad_top=k // 2, pad_left=k // 2, activation=act)
    outs = []
    for zmm in (False, True):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(conv_mod, "ZMM", zmm)
            outs.append(general_conv(mp, x, wt, b, **kw))
    assert_same_bits(outs[1], outs[0], "16 lanes vs 8")


@st.composite
def pool_cases(draw):
    c = draw(st.integers(1, 4))
    size = draw(st.sampled_from([1, 2, 3, 5, 9, 13]))
    h, w = draw(st.integers(1, 20)), draw(st.integers(1, 30))
    pt, pl = draw(st.integers(-2, size)), draw(st.integers(-2, size))
    oh, ow = draw(st.integers(1, 22)), draw(st.integers(1, 33))
    # few distinct values, signed zeros, NaN and infinities: ties and the "first wins" rule matter
    special = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    return c, size, h, w, pt, pl, oh, ow, special, seed


@examples(200)
@given(pool_cases(), st.sampled_from([1, 2]))
def test_stride1_and_2_maxpools_have_the_scan_bits(case, stride):
    c, size, h, w, pt, pl, oh, ow, special, seed = case
    rng = np.random.default_rng(seed)
    if special:
        vals = np.array([0.0, -0.0, 1.0, -1.0, np.nan, np.inf, -np.inf, -np.finfo(np.float32).max], np.float32)
        x = vals[rng.integers(0, len(vals), (c, h, w))]
    else:
        x = rng.standard_normal((c, h, w)).astype(np.float32)
    got = kernels.maxpool2d(x, size=size, stride=stride, pad_top=pt, pad_left=pl, out_h=oh, out_w=ow)
    want = np.empty_like(got)
    kernels.pool._maxpool2d(x, size, stride, pt, pl, want)
    assert_same_bits(got, want, str(case))


def test_stride1_maxpool_keeps_the_first_of_equal_values():
    """+0.0 before -0.0 in scan order gives +0.0 and the other way round -0.0 (darknet's ``>``),
    also when the two are in different rows of the window; a NaN never wins."""
    x = np.array([[[0.0, -0.0], [np.nan, -1.0]]], np.float32)
    y = kernels.maxpool2d(x, size=2, stride=1, pad_top=0, pad_left=0, out_h=1, out_w=1)
    assert np.signbit(y[0, 0, 0]) == np.False_
    x = np.array([[[-0.0, -1.0], [0.0, np.nan]]], np.float32)
    y = kernels.maxpool2d(x, size=2, stride=1, pad_top=0, pad_left=0, out_h=1, out_w=1)
    assert np.signbit(y[0, 0, 0]) == np.True_


@st.composite
def small_k_cases(draw):
    k = draw(st.sampled_from([1, 2, 3, 3, 7]))
    c = draw(st.integers(1, 3 if k == 7 else conv_mod.DIRECT8_MAX_C))  # 7x7, C = 3: ResNet's first layer
    co = draw(st.integers(1, 20))  # edge row blocks of 8
    sy, sx = draw(st.sampled_from([(1, 1), (2, 2), (1, 2), (3, 1)]))
    d = draw(st.integers(1, 2))
    h, w = draw(st.integers(1, 20)), draw(st.integers(1, 60))
    pt, pl = draw(st.integers(-2, k + 1)), draw(st.integers(-2, k + 1))
    oh, ow = draw(st.integers(1, 8)), draw(st.integers(1, 60))  # rows of 1..2 blocks and tails
    act = draw(st.sampled_from(ACTS))
    seed = draw(st.integers(0, 2**32 - 1))
    return c, k, co, sy, sx, d, h, w, pt, pl, oh, ow, act, seed


@examples(120)
@given(small_k_cases())
def test_direct_small_k_conv_has_the_gemm_bits(case):
    """The first layers' direct path (no packing, 8 x 24 blocks on one output row) against the
    GEMM: same bits for any shape, stride, dilation, padding, tile offset and activation."""
    c, k, co, sy, sx, d, h, w, pt, pl, oh, ow, act, seed = case
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((c, h, w)) * np.exp(rng.uniform(-4, 4, (c, h, w)))).astype(np.float32)
    wt = rng.standard_normal((co, c, k, k)).astype(np.float32)
    b = rng.standard_normal(co).astype(np.float32)
    kw = dict(stride=(sy, sx), pad_top=pt, pad_left=pl, out_h=oh, out_w=ow, activation=act, dilation=d)
    with pytest.MonkeyPatch.context() as mp:
        want = general_conv(mp, x, wt, b, **kw)
    if c * k * k <= conv_mod.DIRECT8_MAX_K:  # the direct kernel itself, whatever the target's MR
        got = np.empty_like(want)
        code = kernels.activations._act_code(act)
        vec = code <= kernels.ACT_RELU or code == kernels.ACT_RELU6  # the vector epilogues
        conv_mod._conv2d_direct8(x, wt.reshape(co, -1), b, k, sy, sx, d, pt, pl, oh, ow, code if vec else 0,
                                 got.reshape(co, -1))
        if not vec:
            kernels.activate(got, act)
        assert_same_bits(got, want, str(case))
    assert_same_bits(kernels.conv2d(x, wt, b, **kw), want, str(case))



def test_first_layers_take_the_direct_path(monkeypatch):
    """YOLO's 3x3 and ResNet's 7x7 first layers (C = 3) run :func:`_conv2d_direct8` where MR = 8
    (the tests above compare it with the GEMM; this checks that it is what conv2d runs)."""
    calls = []
    real = conv_mod._conv2d_direct8

    def spy(*args):
        calls.append(args[3])
        return real(*args)

    monkeypatch.setattr(conv_mod, "_conv2d_direct8", spy)
    x = np.random.default_rng(1).standard_normal((3, 30, 30)).astype(np.float32)
    for k in (3, 7):
        wt = np.ones((8, 3, k, k), np.float32)
        kernels.conv2d(x, wt, np.zeros(8, np.float32), stride=2, pad_top=k // 2, pad_left=k // 2)
    assert calls == ([3, 7] if conv_mod.MR == 8 else [])


def _libm_activation(x: np.ndarray, act: str) -> np.ndarray:
    """The scalar formulas through the libm's expf (Numba's ``math.exp`` of a float32), one
    element at a time: what the vector path must reproduce."""
    from kernels.activations import _act_code, act_scalar
    from numba import njit

    @njit(cache=False)
    def run(xf, code):
        for i in range(xf.shape[0]):
            xf[i] = act_scalar(xf[i], code)

    y = x.copy()
    run(y, _act_code(act))
    return y


@pytest.mark.parametrize("act", ["swish_f32", "logistic_f32"])
def test_vector_expf_activations_have_the_libm_bits(act):
    """swish and logistic_f32 run 16 lanes (AVX-512F targets: the table looked up by a gather)
    and 8 lanes at a time with glibc's expf algorithm in vector form (kernels._simd.vexpf): the
    libm's bits on 2^20 values over the whole main path (|x| < 88), both sides of its edge,
    blocks with inf / NaN / huge values (the libm, element by element) and a tail that is not a
    multiple of 8 or 16, and the two floats where a reduction without fma rounds differently,
    through both widths. (Checked once over every float32 in [-104, 89] too.)"""
    from kernels.activations import _expf_act_flat

    rng = np.random.default_rng(7)
    parts = [rng.standard_normal(1 << 19) * 8, rng.uniform(-88, 88, 1 << 19),
             np.array([np.inf, -np.inf, np.nan, 88.0, -88.0, np.nextafter(88, 0), -np.nextafter(88, 0), 1e30,
                       -1e30, 0.0, -0.0, 1e-45, -1e-45, 103.0, -104.0,
                       32.564632, -63.09946, 63.09946, -32.564632], np.float64),  # an unfused reduction misses these
             rng.uniform(-120, 120, 1000)]  # 19 + 1000 = 63*16 + 8 + 3: a block of 8 after the 16s, then 3
    x = np.concatenate(parts).astype(np.float32)
    want = _libm_activation(x, act)
    got = x.copy()
    kernels.activate(got, act)
    assert_same_bits(got, want, act)
    for wide in (False, True):
        got = x.copy()
        _expf_act_flat(got, act == "swish_f32", wide)
        assert_same_bits(got, want, f"{act}, wide={wide}")
    # a perturbed lane breaks the comparison: the check is not vacuous
    bad = got.copy()
    bad[5] = np.nextafter(bad[5], np.float32(np.inf))
    assert (bad.view(np.uint32) != want.view(np.uint32)).sum() == 1
