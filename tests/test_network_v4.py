"""YOLOv3-tiny- and YOLOv4-tiny-shaped networks end to end: the weights file, the DAG forward pass
against AlexeyAB's (float64 transcription), batch norm by each model's rule, the decode + NMS of
all heads against a loop-by-loop transcription, tiles equal to the whole map, and memory kept only
while a later layer reads it."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stealer.darknet import ConvParams, parse_cfg_text, random_weights, read_weights, write_weights
from stealer.errors import CfgError, WeightsError
from stealer.ftp.execute import run_frame
from stealer.ftp.plan import SCHEMES, fusable_prefix, make_plan, runnable_prefix
from stealer.images import synthetic_frame
from stealer.layers import ConvSpec, YoloSpec
from stealer.network import Network, builtin_cfg, output_digest
from stealer.yolo import detect_yolo, nms, yolo_boxes

from . import darknet_ref as ref


def small_cfg(name: str, size: int, classes: int = 3, shrink: int = 8) -> str:
    """A built-in cfg at ``size`` with 1/``shrink`` of the filters and ``classes`` classes: the real
    layer graph (routes, groups, upsample, heads) at a test's cost."""
    text = builtin_cfg(name).read_text()
    text = re.sub(r"(?m)^(width|height)=\d+", lambda m: f"{m.group(1)}={size}", text)
    text = re.sub(r"(?m)^classes=\d+", f"classes={classes}", text)
    text = re.sub(r"(?m)^filters=255$", f"filters={3 * (classes + 5)}", text)
    return re.sub(r"(?m)^filters=(\d+)$", lambda m: f"filters={max(2, int(m.group(1)) // shrink)}"
                  if int(m.group(1)) != 3 * (classes + 5) else m.group(0), text)


def assert_head_close(got: np.ndarray, want: np.ndarray, rtol: float) -> None:
    """float32 kernels against the float64 reference, each (anchor, entry) plane relative to its
    own scale: the raw w, h planes of a deep random network reach 1e4 while x, y, objectness and
    classes stay in [0, 1], so one scale for the whole head would hide errors in the latter."""
    assert got.shape == want.shape and got.dtype == np.float32
    g = got.reshape(-1, 8, got.shape[1] * got.shape[2])  # 3 classes: 8 entries per anchor
    w = want.reshape(g.shape)
    scale = np.maximum(np.abs(w).max(axis=2, keepdims=True), 1e-3)
    err = np.abs(g - w) / scale
    assert (err <= rtol + rtol * np.abs(w) / scale).all(), float(err.max())


_NETS: dict[tuple[str, int], tuple[Network, dict[int, ConvParams]]] = {}


def small_net(name: str, size: int = 96) -> tuple[Network, dict[int, ConvParams]]:
    if (name, size) not in _NETS:
        spec = parse_cfg_text(small_cfg(name, size), f"small-{name}@{size}")
        params = random_weights(spec, 11)
        _NETS[(name, size)] = (Network(spec, params, f"test-{name}"), params)
    return _NETS[(name, size)]


@pytest.mark.parametrize("name, heads", [("yolov4-tiny", [(24, 3, 3), (24, 6, 6)]),
                                         ("yolov3-tiny", [(24, 3, 3), (24, 6, 6)])])
def test_weights_file_roundtrip_and_forward_match_darknet(tmp_path, name, heads):
    net0, params = small_net(name)
    spec = net0.spec
    path = tmp_path / f"{name}.weights"
    n = write_weights(path, spec, params)
    assert n == 20 + 4 * spec.n_params()
    back = read_weights(path, spec)
    assert all(np.array_equal(back[i].weights, params[i].weights) for i in params)
    net = Network.from_darknet(_write_cfg(tmp_path, spec, name), path)
    x = synthetic_frame(2, 0, spec.input_shape)
    outs = net.outputs(x)
    assert [o.shape for o in outs] == heads
    want = ref.forward_alexeyab(spec, params, x)
    for got, w in zip(outs, want):
        assert_head_close(got, w, 2e-4)
    # the last head is forward()'s output, and a file one float short is refused
    assert np.array_equal(net.forward(x), outs[-1])
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(WeightsError, match=f"expected {n} bytes"):
        read_weights(path, spec)


@pytest.mark.parametrize("name, heads", [("yolov3", [(24, 2, 2), (24, 4, 4), (24, 8, 8)]),
                                         ("yolov4", [(24, 8, 8), (24, 4, 4), (24, 2, 2)])])
def test_yolov3_and_yolov4_shapes_match_darknet(name, heads):
    """Shortcuts (flat add, then the activation), mish, the SPP pools of size 5/9/13 at stride 1
    (on a 2x2 map: every window reaches far outside it) and three heads, at 64x64 with 1/16 of
    the filters. Through ~100-160 float32 layers the agreement is relative to each head's scale."""
    spec = parse_cfg_text(small_cfg(name, 64, shrink=16), f"small-{name}")
    params = random_weights(spec, 5)
    net = Network(spec, params, name)
    x = synthetic_frame(1, 0, spec.input_shape)
    outs = net.outputs(x)
    assert [o.shape for o in outs] == heads
    for got, w in zip(outs, ref.forward_alexeyab(spec, params, x)):
        assert_head_close(got, w, 1e-3)


def _write_cfg(tmp_path, spec, name):
    p = tmp_path / f"{name}.cfg"
    p.write_text(small_cfg(name, spec.input_shape[1]))
    return p


def test_grouped_conv_weights_have_darknets_count(tmp_path):
    text = ("[net]\nwidth=8\nheight=8\nchannels=4\n[convolutional]\nbatch_normalize=1\nfilters=6\nsize=3\npad=1\n"
            "groups=2\nactivation=mish\n[convolutional]\nfilters=6\nsize=3\npad=1\ngroups=6\nactivation=linear\n")
    spec = parse_cfg_text(text)
    a, b = spec.layers
    assert isinstance(a, ConvSpec) and a.weight_shape == (6, 2, 3, 3) and a.n_params == 6 * 2 * 9 + 6 * 4
    assert b.weight_shape == (6, 1, 3, 3) and b.n_params == 6 * 9 + 6  # depthwise
    params = random_weights(spec, 0)
    write_weights(tmp_path / "g.weights", spec, params)
    assert (tmp_path / "g.weights").stat().st_size == 20 + 4 * (a.n_params + b.n_params)
    net = Network(spec, params, "g")
    x = synthetic_frame(0, 0, spec.input_shape)
    want = ref.forward_alexeyab(spec, params, x)[0]
    assert np.allclose(net.forward(x), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    params[0].weights = params[0].weights[:, :1]
    with pytest.raises(WeightsError, match="do not fit"):
        write_weights(tmp_path / "bad.weights", spec, params)


def test_batchnorm_rule_is_the_models_darknets():
    """YOLOv2 keeps /(sqrt(var) + 1e-6); AlexeyAB models fold sqrt(var + 1e-5) like fuse_conv_batchnorm."""
    text = "[net]\nwidth=8\nheight=8\nchannels=2\n[convolutional]\nbatch_normalize=1\nfilters=3\nsize=1\nactivation=linear\n"
    p = random_weights(parse_cfg_text(text), 1)[0]
    p.rolling_variance[0] = 1e-8
    w17, b17 = p.folded("2017")
    wab, bab = p.folded("alexeyab")
    s, m, v = (a.astype(np.float64) for a in (p.scales, p.rolling_mean, p.rolling_variance))
    k = s / np.sqrt(v + 0.00001)
    assert np.array_equal(wab, (p.weights.astype(np.float64) * k[:, None, None, None]).astype(np.float32))
    assert np.array_equal(bab, (p.biases.astype(np.float64) - s * m / np.sqrt(v + 0.00001)).astype(np.float32))
    assert not np.isclose(w17[0], wab[0], rtol=0.1).all()  # tiny variance: the rules differ a lot
    assert Network(parse_cfg_text(text), {0: p}, "a").conv[0][0][0, 0, 0, 0] == w17[0, 0, 0, 0]
    spec_ab = parse_cfg_text(text.replace("channels=2\n", "channels=2\ndarknet=alexeyab\n"))
    assert Network(spec_ab, {0: p}, "b").conv[0][0][0, 0, 0, 0] == wab[0, 0, 0, 0]


def test_dag_forward_keeps_only_what_later_layers_read():
    net, _ = small_net("yolov4-tiny")
    assert net._readers[2] == [3, 8]  # the CSP split (route 3) and route 8 across the block read layer 2
    x = synthetic_frame(1, 0, net.input_shape)
    full = net.outputs(x)
    # from the last layer a runtime can fuse (3): the tail reads layer 2's output, which is x here
    mid = net.forward(x, 0, runnable_prefix(net.spec))
    assert output_digest(net.outputs(mid, runnable_prefix(net.spec))) == output_digest(full)
    with pytest.raises(ValueError, match="routes from layer"):
        net.forward(net.forward(x, 0, 5), 5)  # route 8 reads layer 2, which a start at 5 never saw


def test_dag_forward_frees_maps_no_later_layer_reads(monkeypatch):
    import stealer.network as netmod

    import gc
    import weakref

    net, _ = small_net("yolov3-tiny")
    x = synthetic_frame(0, 0, net.input_shape)
    refs: dict[int, weakref.ref] = {}
    orig = netmod.Network.run_layer

    alive_at: dict[int, set[int]] = {}

    def tracking(self, i, x, **kw):
        gc.collect()
        alive_at[i] = {j for j, r in refs.items() if r() is not None}
        y = orig(self, i, x, **kw)
        refs[i] = weakref.ref(y)
        return y

    monkeypatch.setattr(netmod.Network, "run_layer", tracking)
    outs = net.outputs(x)
    gc.collect()
    alive = {i for i, r in refs.items() if r() is not None}
    heads = {l.index for l in net.layers if isinstance(l, YoloSpec)}
    assert alive == heads, alive  # only the heads survive: layer 8 (read by route 20) was freed
    assert 8 in alive_at[12] and 13 in alive_at[16] and 5 not in alive_at[12]  # kept while a route will read it
    # and freed after its last reader: route 17 (one source) is a view of 13, read by layer 18
    assert 8 not in alive_at[21] and 13 not in alive_at[19]
    assert len(outs) == 2


# ----------------------------------------------------------------------------------------------
# Decode + NMS of several heads
# ----------------------------------------------------------------------------------------------


def _ref_detections(outs, heads, img, net_wh, thresh, nms_thresh, kind):
    dets = []
    for o, h in zip(outs, heads):
        dets += ref.get_yolo_detections(o, h, img[0], img[1], net_wh[0], net_wh[1], thresh)
    for i, d in enumerate(dets):
        d.idx = i
    if nms_thresh > 0:
        dets = ref.nms_alexeyab(dets, heads[0].classes, nms_thresh, kind)
    return sorted(dets, key=lambda d: d.idx)


def _fake_heads(seed: int, classes: int = 3, scale: float = 1.05, new_coords: bool = False):
    rng = np.random.default_rng(seed)
    anchors = tuple(float(np.float32(a)) for a in rng.uniform(5, 80, 12).round(1))
    specs = [YoloSpec(10, (3 * (5 + classes), 3, 4), (3 * (5 + classes), 3, 4), classes, (3, 4, 5), anchors, scale,
                      new_coords, "greedynms", 0.6),
             YoloSpec(20, (3 * (5 + classes), 6, 8), (3 * (5 + classes), 6, 8), classes, (1, 2, 3), anchors, scale,
                      new_coords, "greedynms", 0.6)]
    import kernels

    outs = [kernels.yolo_activate(rng.normal(0, 2, s.in_shape).astype(np.float32), num=3, classes=classes,
                                  scale_x_y=scale, new_coords=new_coords) for s in specs]
    if new_coords:
        outs = [np.abs(o) / 4 for o in outs]
    return specs, outs


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["default", "greedynms"]), st.floats(0.05, 0.6),
       st.sampled_from([0.3, 0.45, 0.7]), st.sampled_from([(96, 96), (640, 480), (300, 700)]), st.booleans())
def test_decode_and_nms_of_all_heads_match_darknet(seed, kind, thresh, nms_thresh, img, new_coords):
    specs, outs = _fake_heads(seed, new_coords=new_coords)
    boxes, obj, probs = (np.concatenate(p) for p in zip(*(yolo_boxes(o, s, img[0], img[1], 128, 96, thresh)
                                                           for o, s in zip(outs, specs))))
    want = _ref_detections(outs, specs, img, (128, 96), thresh, 0, kind)
    assert len(want) == len(boxes)
    assert np.array_equal(boxes, np.array([d.bbox for d in want], np.float32).reshape(-1, 4))
    assert np.array_equal(probs, np.array([d.prob for d in want], np.float32).reshape(-1, specs[0].classes))
    got = nms(boxes, obj, probs, nms_thresh, kind)
    want = _ref_detections(outs, specs, img, (128, 96), thresh, nms_thresh, kind)
    assert np.array_equal(got, np.array([d.prob for d in want], np.float32).reshape(got.shape))
    dets = detect_yolo(outs, specs, img_w=img[0], img_h=img[1], net_w=128, net_h=96, thresh=thresh,
                       nms_thresh=nms_thresh, nms_kind=kind)
    best = [(int(np.argmax(d.prob)), float(max(d.prob)), d.bbox) for d in want if max(d.prob) > thresh]
    assert sorted((d.cls, d.prob) for d in dets) == sorted((c, p) for c, p, _ in best)
    assert [d.prob for d in dets] == sorted((d.prob for d in dets), reverse=True)


def test_greedy_diou_suppresses_more_than_plain_iou_only_when_centres_are_close():
    from stealer.yolo import box_diou, box_iou

    a = np.array([0.5, 0.5, 0.2, 0.2], np.float32)
    b = np.array([[0.5, 0.5, 0.2, 0.2], [0.55, 0.5, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1]], np.float32)
    iou, diou = box_iou(a, b), box_diou(a, b)
    assert diou[0] == iou[0] and np.all(diou[1:] < iou[1:])
    for i in range(3):
        assert diou[i] == ref.box_diou32(list(a), list(b[i])) and iou[i] == ref.box_iou32(list(a), list(b[i]))


def test_network_detect_uses_all_heads_and_the_last_heads_nms_kind():
    net, _ = small_net("yolov4-tiny")
    x = synthetic_frame(3, 0, net.input_shape)
    outs = net.outputs(x)
    heads = [l for l in net.layers if isinstance(l, YoloSpec)]
    dets = net.detect(outs, img_w=200, img_h=150, thresh=0.2, nms=0.45)
    want = detect_yolo(outs, heads, img_w=200, img_h=150, net_w=96, net_h=96, thresh=0.2, nms_thresh=0.45,
                       nms_kind="greedynms")
    assert dets == want


# ----------------------------------------------------------------------------------------------
# FTP: the runnable prefix, tiled equals whole bit for bit
# ----------------------------------------------------------------------------------------------


def test_runnable_prefixes_of_the_shipped_models():
    from stealer.darknet import parse_cfg

    got = {m: (fusable_prefix(s), runnable_prefix(s)) for m in ("yolov2", "yolov2-tiny", "yolov3-tiny", "yolov4-tiny",
                                                                 "yolov3", "yolov4")
           for s in [parse_cfg(builtin_cfg(m))]}
    assert got == {"yolov2": (25, 17), "yolov2-tiny": (15, 15), "yolov3-tiny": (16, 9), "yolov4-tiny": (3, 3),
                   "yolov3": (4, 2), "yolov4": (3, 2)}


@pytest.mark.parametrize("name, size, grid, scheme", [
    ("yolov4-tiny", 96, (3, 3), "quad"),
    ("yolov4-tiny", 128, (5, 4), "checkerboard"),  # uneven tiles of the 32x32 map
    ("yolov3-tiny", 96, (2, 2), "quad"),  # 9 fused layers: 5 maxpools (AlexeyAB's rule), 4 convs
    ("yolov3-tiny", 160, (4, 3), "wave"),
    ("yolov3-tiny", 96, (1, 1), "none"),
    ("yolov3", 64, (3, 3), "quad"),
    ("yolov4", 64, (2, 3), "quad"),  # mish in the fused prefix
])
def test_tiled_prefix_then_dag_tail_equals_whole_network(name, size, grid, scheme):
    net, _ = small_net(name, size)
    x = synthetic_frame(5, 1, net.input_shape)
    n = runnable_prefix(net.spec)  # the chain prefix is still a block boundary, with one output
    plan = make_plan(net, grid, n, scheme=scheme)
    assert plan.outputs == (n - 1,)
    whole = net.forward(x, 0, n)
    for kw in (dict(reuse=False), dict(reuse=True)):
        res = run_frame(net, plan, x, **kw)
        assert np.array_equal(res.output, whole), kw
    assert output_digest(net.outputs(res.output, n)) == output_digest(net.outputs(x))


@settings(max_examples=25, deadline=None)
@given(st.integers(7, 30), st.integers(7, 30), st.sampled_from([1, 2]), st.sampled_from([1, 2, 3]),
       st.sampled_from([1, 2]), st.sampled_from([(2, 2), (2, 1), (3, 1), (5, 1)]), st.sampled_from(SCHEMES),
       st.integers(1, 4), st.integers(1, 4))
def test_grouped_dilated_convs_and_alexeyab_pools_tile_exactly(h, w, groups, dilation, stride, pool, scheme, gr, gc):
    size, pstride = pool
    text = (f"[net]\ndarknet=alexeyab\nwidth={w}\nheight={h}\nchannels=4\n"
            f"[convolutional]\nbatch_normalize=1\nfilters=4\nsize=3\nstride={stride}\npad=1\ndilation={dilation}\n"
            f"groups={groups}\nactivation=mish\n"
            f"[maxpool]\nsize={size}\nstride={pstride}\n"
            f"[convolutional]\nfilters=6\nsize=3\npad=1\ngroups=2\nactivation=leaky\n"
            f"[convolutional]\nfilters=3\nsize=1\nactivation=swish\n")
    try:
        spec = parse_cfg_text(text)
    except CfgError:  # a map too small for the dilated kernel: nothing to tile
        return
    _, oh, ow = spec.layers[-1].out_shape
    grid = (min(gr, oh), min(gc, ow))
    net = Network(spec, random_weights(spec, 2), "t")
    x = synthetic_frame(0, 0, spec.input_shape)
    plan = make_plan(net, grid, 4, scheme=scheme)
    whole = net.forward(x)
    for kw in (dict(reuse=False), dict(reuse=True)):
        assert np.array_equal(run_frame(net, plan, x, **kw).output, whole), (grid, scheme, kw)
