"""AlexeyAB darknet (YOLOv3/v4): kernels against slow references written from its C source, the
parser on the shipped cfgs and on malformed ones, the weights file, whole small networks against
the float64 reference, and the decode + NMS of several heads against a loop-by-loop transcription.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels
from stealer.darknet import parse_cfg, parse_cfg_text, random_weights, read_weights, write_weights
from stealer.errors import CfgError, StealerError
from stealer.layers import ConvSpec, MaxPoolSpec, RouteSpec, ShortcutSpec, UpsampleSpec, YoloSpec
from stealer.network import Network, builtin_cfg, output_digest
from stealer.yolo import detect_yolo, nms, yolo_boxes

from . import darknet_ref as ref
from . import naive
from .test_kernels import assert_same_bits, conv_tolerance, rand


def examples(n: int) -> settings:
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


F32_ACTS = ["logistic_f32", "relu6", "swish_f32", "mish_f32"]


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


def test_f32_activations_are_alexeyabs_bit_for_bit():
    rng = np.random.default_rng(0)
    x = np.concatenate([rand(rng, 3000, 8.0), rand(rng, 500, 30.0),
                        np.array([0, -0.0, 20, -20, np.nextafter(20, 30), 6, 7, -1e-30, 1e30, -1e30, np.inf, -np.inf],
                                 np.float32)]).astype(np.float32)
    for act in F32_ACTS:
        got = kernels.activate(x.copy(), act)
        want = naive.activate_f32(x, act)
        same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
        assert same.all(), (act, x[~same][:4], got[~same][:4], want[~same][:4])


@st.composite
def ext_conv_cases(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    depthwise = draw(st.booleans())
    cg = 1 if depthwise else draw(st.integers(1, 3))
    og = 1 if depthwise else draw(st.integers(1, 5))
    k = draw(st.sampled_from([1, 2, 3]))
    dilation = draw(st.sampled_from([1, 2, 3]))
    sy, sx = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    span = (k - 1) * dilation + 1
    pt, pl = draw(st.integers(0, span)), draw(st.integers(0, span))
    oh = max(1, (h + 2 * pt - span) // sy + 1)
    ow = max(1, (w + 2 * pl - span) // sx + 1)
    act = draw(st.sampled_from(["linear", "leaky"] + F32_ACTS))
    return groups, cg, og, k, dilation, sy, sx, h, w, pt, pl, oh, ow, act, draw(st.integers(0, 2**31))


@examples(120)
@given(ext_conv_cases())
def test_grouped_dilated_strided_conv_matches_reference(case):
    groups, cg, og, k, d, sy, sx, h, w, pt, pl, oh, ow, act, seed = case
    rng = np.random.default_rng(seed)
    x, wt, b = rand(rng, (groups * cg, h, w)), rand(rng, (groups * og, cg, k, k)), rand(rng, groups * og)
    y = kernels.conv2d(x, wt, b, stride=(sy, sx), pad_top=pt, pad_left=pl, out_h=oh, out_w=ow, activation=act,
                       dilation=d, groups=groups)
    val, mag = naive.conv2d_ext(x, wt, b, sy, sx, d, groups, pt, pl, oh, ow)
    pre = np.abs(y.astype(np.float64) - naive.activate_f32(val.astype(np.float32), act).astype(np.float64))
    # mish/swish/logistic have derivative at most 1.1 in magnitude: the pre-activation bound,
    # widened by that, plus a few float32 ulps of the activation's own roundings
    tol = 1.1 * conv_tolerance(mag, cg * k * k, val) + 8 * 2.0**-24 * np.abs(y) + 1e-30
    assert (pre <= tol).all(), f"max err {pre.max():.3g}"
    # the BLAS path agrees within the same bound
    z = kernels.conv2d(x, wt, b, stride=(sy, sx), pad_top=pt, pad_left=pl, out_h=oh, out_w=ow, activation=act,
                       dilation=d, groups=groups, exact=False)
    assert (np.abs(z.astype(np.float64) - y) <= 2 * tol).all()


@examples(60)
@given(ext_conv_cases(), st.data())
def test_grouped_dilated_conv_is_tile_invariant(case, data):
    """Any output window computed from a cut of the input is the same bits as the whole map's."""
    groups, cg, og, k, d, sy, sx, h, w, pt, pl, oh, ow, act, seed = case
    rng = np.random.default_rng(seed)
    x, wt, b = rand(rng, (groups * cg, h, w)), rand(rng, (groups * og, cg, k, k)), rand(rng, groups * og)
    full = kernels.conv2d(x, wt, b, stride=(sy, sx), pad_top=pt, pad_left=pl, out_h=oh, out_w=ow, activation=act,
                          dilation=d, groups=groups)
    y0 = data.draw(st.integers(0, oh - 1))
    y1 = data.draw(st.integers(y0 + 1, oh))
    x0 = data.draw(st.integers(0, ow - 1))
    x1 = data.draw(st.integers(x0 + 1, ow))
    span = (k - 1) * d + 1
    iy0, iy1 = max(0, y0 * sy - pt), min(h, (y1 - 1) * sy - pt + span)
    ix0, ix1 = max(0, x0 * sx - pl), min(w, (x1 - 1) * sx - pl + span)
    if iy1 <= iy0 or ix1 <= ix0:
        return  # the window reads only padding
    cut = x[:, iy0:iy1, ix0:ix1]
    part = kernels.conv2d(cut, wt, b, stride=(sy, sx), pad_top=iy0 - (y0 * sy - pt), pad_left=ix0 - (x0 * sx - pl),
                          out_h=y1 - y0, out_w=x1 - x0, activation=act, dilation=d, groups=groups)
    assert_same_bits(part, full[:, y0:y1, x0:x1], "tile")


def test_conv_rejects_groups_that_do_not_divide():
    x = np.zeros((4, 5, 5), np.float32)
    with pytest.raises(ValueError, match="groups=3 must divide"):
        kernels.conv2d(x, np.zeros((3, 1, 3, 3), np.float32), np.zeros(3, np.float32), groups=3)
    with pytest.raises(ValueError, match=r"weight shape must be \(Co, 2, k, k\).*groups=2"):
        kernels.conv2d(x, np.zeros((4, 4, 3, 3), np.float32), np.zeros(4, np.float32), groups=2)


@examples(80)
@given(st.integers(1, 4), st.integers(1, 14), st.integers(1, 14), st.sampled_from([(2, 2), (2, 1), (3, 2), (5, 1),
                                                                                     (9, 1), (13, 1), (3, 1)]),
       st.integers(0, 2**31))
def test_maxpool_alexeyab_rule_matches_darknets_loop(c, h, w, size_stride, seed):
    size, stride = size_stride
    padding = size - 1
    if h + padding < size or w + padding < size:
        return
    x = rand(np.random.default_rng(seed), (c, h, w))
    x[x > 1.5] = -np.inf  # -inf never wins, as in darknet
    spec = parse_cfg_text(f"[net]\ndarknet=alexeyab\nwidth={w}\nheight={h}\nchannels={c}\n[maxpool]\nsize={size}\n"
                          f"stride={stride}\n")
    layer = spec.layers[0]
    assert isinstance(layer, MaxPoolSpec)
    want = naive.maxpool_alexeyab(x, size, stride, padding)
    assert layer.out_shape == want.shape
    got = kernels.maxpool2d(x, size=size, stride=stride, pad_top=layer.pad, pad_left=layer.pad,
                            out_h=layer.out_shape[1], out_w=layer.out_shape[2])
    assert_same_bits(got, want, f"maxpool {size}/{stride}")


@pytest.mark.parametrize("h, size, stride, two017, alexeyab", [
    (13, 2, 2, 6, 7),    # odd input to a stride-2 pool: the two rules differ
    (12, 2, 2, 6, 6),
    (13, 2, 1, 13, 13),  # yolov3-tiny's size-2 stride-1 pool keeps the size under both
    (19, 5, 1, 23, 19),  # SPP: 2017 pads (size-1)//2 on each side and grows the map; AlexeyAB keeps it
    (19, 13, 1, 31, 19),
])
def test_maxpool_shapes_of_both_rules(h, size, stride, two017, alexeyab):
    for flavour, expect in (("2017", two017), ("alexeyab", alexeyab)):
        spec = parse_cfg_text(f"[net]\ndarknet={flavour}\nwidth={h}\nheight={h}\nchannels=1\n[maxpool]\nsize={size}\n"
                              f"stride={stride}\n")
        assert spec.layers[0].out_shape == (1, expect, expect), flavour


@examples(40)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.sampled_from([1, 2, 3]),
       st.sampled_from([1.0, 0.5, 1.7]), st.integers(0, 2**31))
def test_upsample_matches_darknet(c, h, w, stride, scale, seed):
    x = rand(np.random.default_rng(seed), (c, h, w))
    assert_same_bits(kernels.upsample2d(x, stride, scale), naive.upsample(x, stride, scale), "upsample")


@examples(40)
@given(st.integers(1, 4), st.lists(st.integers(1, 6), min_size=1, max_size=3), st.integers(1, 5),
       st.sampled_from(["linear", "leaky"] + F32_ACTS), st.integers(0, 2**31))
def test_shortcut_adds_flat_prefixes_then_activates(c, add_channels, hw, act, seed):
    rng = np.random.default_rng(seed)
    x = rand(rng, (c, hw, hw))
    adds = [rand(rng, (ca, hw, hw)) for ca in add_channels]
    assert_same_bits(kernels.shortcut(x, adds, act), naive.shortcut(x, adds, act), "shortcut")


@examples(40)
@given(st.integers(1, 3), st.integers(0, 4), st.integers(1, 5), st.sampled_from([1.0, 1.05, 1.1, 1.2, 2.0]),
       st.booleans(), st.integers(0, 2**31))
def test_yolo_activations_match_darknet(num, classes, hw, scale, new_coords, seed):
    x = rand(np.random.default_rng(seed), (num * (5 + classes), hw, hw), 3.0)
    got = kernels.yolo_activate(x, num=num, classes=classes, scale_x_y=scale, new_coords=new_coords)
    assert_same_bits(got, naive.yolo(x, num, classes, scale, new_coords), "yolo")


# ----------------------------------------------------------------------------------------------
# The shipped cfgs
# ----------------------------------------------------------------------------------------------


def _heads(spec):
    return [l.out_shape for l in spec.layers if isinstance(l, YoloSpec)]


def test_shipped_cfgs_parse_with_darknets_shapes():
    v3t = parse_cfg(builtin_cfg("yolov3-tiny"))
    assert v3t.flavour == "alexeyab" and len(v3t.layers) == 24
    assert _heads(v3t) == [(255, 13, 13), (255, 26, 26)]
    pool = v3t.layers[11]
    assert isinstance(pool, MaxPoolSpec) and (pool.size, pool.stride) == (2, 1) and pool.out_shape == (512, 13, 13)
    assert isinstance(v3t.layers[19], UpsampleSpec) and v3t.layers[19].out_shape == (128, 26, 26)
    assert isinstance(v3t.layers[20], RouteSpec) and v3t.layers[20].sources == (19, 8)
    assert v3t.layers[20].out_shape == (384, 26, 26)
    assert round(sum(l.flops for l in v3t.layers) / 1e9, 2) == 5.56 and v3t.n_params() == 8858734

    v4t = parse_cfg(builtin_cfg("yolov4-tiny"))
    assert _heads(v4t) == [(255, 13, 13), (255, 26, 26)] and len(v4t.layers) == 38
    csp = v4t.layers[3]
    assert isinstance(csp, RouteSpec) and (csp.groups, csp.group_id, csp.sources) == (2, 1, (2,))
    assert csp.out_shape == (32, 104, 104)
    yolo = [l for l in v4t.layers if isinstance(l, YoloSpec)]
    assert [y.mask for y in yolo] == [(3, 4, 5), (1, 2, 3)]  # yes, 1,2,3: AlexeyAB's cfg
    assert all(y.scale_x_y == 1.05 and y.nms_kind == "greedynms" for y in yolo)
    assert round(sum(l.flops for l in v4t.layers) / 1e9, 2) == 6.91 and v4t.n_params() == 6062814

    v3 = parse_cfg(builtin_cfg("yolov3"))
    assert _heads(v3) == [(255, 19, 19), (255, 38, 38), (255, 76, 76)] and len(v3.layers) == 107
    assert sum(isinstance(l, ShortcutSpec) for l in v3.layers) == 23
    assert v3.n_params() == 62001757 and round(sum(l.flops for l in v3.layers) / 1e9, 2) == 140.69

    v4 = parse_cfg(builtin_cfg("yolov4"))
    assert _heads(v4) == [(255, 76, 76), (255, 38, 38), (255, 19, 19)] and len(v4.layers) == 162
    assert v4.layers[0].activation == "mish_f32"
    spp = [l for l in v4.layers if isinstance(l, MaxPoolSpec) and l.stride == 1]
    assert [(l.size, l.pad, l.out_shape) for l in spp] == [(5, 2, (512, 19, 19)), (9, 4, (512, 19, 19)),
                                                            (13, 6, (512, 19, 19))]
    spp_route = v4.layers[spp[-1].index + 1]
    assert isinstance(spp_route, RouteSpec) and spp_route.out_shape == (2048, 19, 19)
    assert [v4.layers[s].kind for s in spp_route.sources] == ["maxpool", "maxpool", "maxpool", "conv"]
    assert [v4.layers[s].size for s in spp_route.sources[:3]] == [13, 9, 5]  # 13, 9, 5, conv in that order
    assert all(l.nms_kind == "greedynms" for l in v4.layers if isinstance(l, YoloSpec))
    assert v4.n_params() == 64429405 and round(sum(l.flops for l in v4.layers) / 1e9, 1) == 128.4


def test_yolov2_models_keep_the_2017_semantics():
    for name in ("yolov2", "yolov2-tiny"):
        assert parse_cfg(builtin_cfg(name)).flavour == "2017"


# ----------------------------------------------------------------------------------------------
# Malformed cfgs: a clear StealerError naming the line or layer, never a traceback
# ----------------------------------------------------------------------------------------------

V4 = "[net]\nwidth=16\nheight=16\nchannels=3\n[convolutional]\nfilters=4\nsize=3\npad=1\nactivation=leaky\n"


@pytest.mark.parametrize("body, needle", [
    ("[convolutional]\nfilters=2\nsize=1\ngroups=2\nactivation=gelu\n", "t.cfg:14: [conv] activation='gelu' is not supported"),
    ("[route]\nlayers=3\n[upsample]\n", "layer 1: route to layer 3 (= 3) is out of range (a later layer or itself)"),
    ("[route]\nlayers=1\n[upsample]\n", "route to layer 1 (= 1) is out of range"),
    ("[shortcut]\nfrom=-5\n", "t.cfg:11: [shortcut] layer 1: shortcut to layer -5 (= -4) is out of range"),
    ("[shortcut]\nfrom=-1\nweights_type=per_channel\n", "layer 1: shortcut weights_type=per_channel is not supported"),
    ("[shortcut]\nfrom=-1\nweights_normalization=softmax\n", "weights_normalization=softmax is not supported"),
    ("[convolutional]\nfilters=6\nsize=3\ngroups=3\n", "layer 1: groups=3 must divide the 4 input channels"),
    ("[route]\nlayers=-1\ngroups=3\n", "layer 1: route groups=3 does not divide layer 0's 4 channels"),
    ("[route]\nlayers=-1\ngroups=2\ngroup_id=2\n", "group_id=2 must be below groups=2"),
    ("[upsample]\nstride=-2\n", "upsample stride=-2"),
    ("[convolutional]\nfilters=18\nsize=1\n[yolo]\nclasses=2\nmask=0,1\nnum=3\n", "yolo expects 2*(4+1+2) = 14 input"),
    ("[convolutional]\nfilters=7\nsize=1\n[yolo]\nclasses=2\nmask=0,3\nnum=3\n", "mask=0,3 must name anchors 0..2"),
    ("[convolutional]\nfilters=7\nsize=1\n[yolo]\nclasses=2\nnum=1\nnms_kind=cornersnms\n", "nms_kind=cornersnms"),
    ("[upsample]\n[region]\nclasses=1\n", "mixes AlexeyAB darknet's [upsample] (line 10)"),
    ("[convolutional]\nfilters=4\nsize=3\ndilation=2\npad=0\npadding=0\n", "computes inconsistently"),
])
def test_malformed_alexeyab_cfgs_name_the_line_or_layer(body, needle):
    with pytest.raises(CfgError) as info:
        parse_cfg_text(V4 + body, "t.cfg")
    assert isinstance(info.value, StealerError)
    assert needle in str(info.value), str(info.value)
    assert "t.cfg" in str(info.value)


def test_2017_models_refuse_alexeyab_activations_with_a_hint():
    with pytest.raises(CfgError, match="add darknet=alexeyab"):
        parse_cfg_text("[net]\nwidth=8\nheight=8\nchannels=1\n[convolutional]\nfilters=1\nsize=1\nactivation=mish\n")
    spec = parse_cfg_text("[net]\ndarknet=alexeyab\nwidth=8\nheight=8\nchannels=1\n[convolutional]\nfilters=1\n"
                          "size=1\nactivation=mish\n")
    assert spec.layers[0].activation == "mish_f32" and spec.flavour == "alexeyab"
    with pytest.raises(CfgError, match="darknet='2018' is not one of"):
        parse_cfg_text("[net]\ndarknet=2018\nwidth=8\nheight=8\nchannels=1\n[maxpool]\n")


def test_cli_reports_a_bad_cfg_in_one_line(tmp_path):
    from stealer.cli import main

    bad = tmp_path / "bad.cfg"
    bad.write_text(V4 + "[shortcut]\nfrom=7\n")
    assert main(["info", "--cfg", str(bad)]) == 2
