"""ONNX import (stealer.onnx_import) against onnxruntime, the Ultralytics-style decode, the CLI.

The oracle is onnxruntime's CPU provider, single-threaded, on graphs built with ``onnx.helper``
and seeded random weights (tools/onnx_models.py; no torch).

Tolerance. Both sides compute in float32 but in different orders (onnxruntime's MLAS GEMMs and
its own batch-norm fold against stealer's exact kernels), so outputs differ by rounding only:
two orders of a K-term float32 dot product differ by about sqrt(K)*u of the terms' magnitude
(u = 2^-24 = 6e-8; a random walk of roundings; the worst case is K*u), and these differences
add roughly in quadrature over the L layers of the longest path. For the test graphs K <= 9*128
(sqrt 34) and L <= 40 (sqrt 6.3): 34 * 6.3 * 6e-8 = 1.3e-5 of a tensor's magnitude. So each
output channel (a map's channel, a row of the (4 + nc, N) YOLO output, a classifier's whole
vector) must satisfy max|ours - ort| <= TOL * max|ort| over the channel, with TOL = 1e-5, the
estimate rounded down (it is a typical-case bound, and the errors measured are 3e-8 .. 3.7e-6,
the largest the YOLOv8n-shaped graph's). The channel's largest value stands for the terms'
magnitude, so inputs are chosen that make no output a heavily cancelling sum (means are of
ReLU outputs, as in the models). The tests below check that the bound is not loose: a batch
norm folded with the wrong epsilon in one layer, swapped pads, or relu in place of relu6 are
each >= 10x over it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

import kernels  # noqa: E402
from stealer.errors import ModelError  # noqa: E402
from stealer.ftp.execute import run_frame  # noqa: E402
from stealer.images import synthetic_frame  # noqa: E402
from stealer.ftp.plan import fusable_prefix, make_plan, runnable_prefix  # noqa: E402
from stealer.layers import (ConvSpec, MaxPoolSpec, PadConvSpec, RouteSpec, ShortcutSpec, SliceSpec,  # noqa: E402
                            TensorOpSpec, UpsampleSpec)
from stealer.network import Network  # noqa: E402
from stealer.ultralytics import detect_ultralytics, nms_by_class  # noqa: E402

from . import naive  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import onnx_models as om  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # see the module docstring


def save(model, tmp_path: Path, name: str = "m.onnx") -> Path:
    path = tmp_path / name
    onnx.save_model(model, str(path))
    return path


def ort_outputs(path: Path, x: np.ndarray) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x[None]})


def rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """max over channels (the first axis without the batch: a map's channel, a row of a YOLO
    output; a vector is one) of max|ours - ref| / max|ref| over the channel."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    if ref.ndim <= 1:
        o, r = ours.reshape(1, -1), ref.reshape(1, -1)
    else:
        o, r = ours.reshape(ref.shape[0], -1), ref.reshape(ref.shape[0], -1)
    scale = np.maximum(np.abs(r).max(axis=1), np.float32(1e-6))
    return float((np.abs(o.astype(np.float64) - r) .max(axis=1) / scale).max())


def compare(path: Path, seed: int = 1, net: Network | None = None) -> float:
    """Worst :func:`rel_error` of the imported network's outputs against onnxruntime's."""
    net = net or Network.from_onnx(path)
    x = np.random.default_rng(seed).standard_normal(net.input_shape).astype(np.float32)
    ours = net.outputs(x)
    refs = ort_outputs(path, x)
    assert len(ours) == len(refs)
    return max(rel_error(o, r[0]) for o, r in zip(ours, refs))


# ------------------------------------------------------------------------------------------------
# whole models
# ------------------------------------------------------------------------------------------------

TINY = {
    "yolov8-bn": lambda: om.yolov8(width=0.5, imgsz=64, nc=3, bn=True),
    "yolo11": lambda: om.yolo11(width=0.5, imgsz=64, nc=3),
    "resnet18-bn": lambda: om.resnet18(width=0.25, imgsz=64, classes=10, bn=True),
    "mobilenetv2": lambda: om.mobilenetv2(width=0.35, depth=0.5, imgsz=64, classes=10),
}


@pytest.mark.parametrize("name", list(TINY))
def test_model_matches_onnxruntime(name, tmp_path):
    path = save(TINY[name](), tmp_path)
    net = Network.from_onnx(path)
    assert compare(path, net=net) <= TOL
    kinds = {type(l) for l in net.layers}
    # batch norm folded at load, the activations fused into the convs: no numpy op runs them
    ops = {l.op for l in net.layers if isinstance(l, TensorOpSpec)}
    assert not ops & {"BatchNormalization", "Relu", "Clip", "HardSwish"}, ops
    assert ConvSpec in kinds
    if name.startswith("yolo"):
        assert {RouteSpec, ShortcutSpec, UpsampleSpec, MaxPoolSpec} <= kinds
        assert {"Softmax", "Reshape", "Transpose"} <= ops
        assert "Sigmoid" in ops and "Mul" in ops  # the class sigmoid and the strides: not SiLUs
        assert sum(isinstance(l, TensorOpSpec) and l.op == "MatMul" for l in net.layers) == \
            (2 if name == "yolo11" else 0)
        assert {l.activation for l in net.layers if isinstance(l, ConvSpec)} == {"swish_f32", "linear"}
    if name == "mobilenetv2":
        assert "relu6" in {l.activation for l in net.layers if isinstance(l, ConvSpec)}
        assert any(isinstance(l, ConvSpec) and l.groups == l.in_shape[0] > 1 for l in net.layers)


def test_tolerance_is_not_loose(tmp_path):
    """A deliberately wrong import must fail the bound: each mistake is >= 10x over it."""
    model = om.yolov8(width=0.5, imgsz=64, nc=3, bn=True)
    good = save(model, tmp_path, "good.onnx")
    # one batch norm folded with epsilon 1e-5 instead of 1e-3 (a 0.05-0.1% change of its scale)
    wrong = onnx.ModelProto()
    wrong.CopyFrom(model)
    bn = next(n for n in wrong.graph.node if n.op_type == "BatchNormalization")
    next(a for a in bn.attribute if a.name == "epsilon").f = 1e-5
    bad = save(wrong, tmp_path, "bad.onnx")
    assert compare(good, net=Network.from_onnx(bad)) > 10 * TOL
    # relu instead of relu6 somewhere in MobileNetV2
    mv = om.mobilenetv2(width=0.35, depth=0.5, imgsz=64, classes=10)
    good = save(mv, tmp_path, "mv.onnx")
    wrong = onnx.ModelProto()
    wrong.CopyFrom(mv)
    for n in wrong.graph.node:
        if n.op_type == "Clip":
            del n.input[2]  # no max: relu
    assert compare(good, net=Network.from_onnx(save(wrong, tmp_path, "mv_bad.onnx"))) > 10 * TOL


def test_tail_from_any_layer_equals_the_whole_run(tmp_path):
    """The runtime runs the tail from a fused prefix's output: that must give the same bits."""
    net = Network.from_onnx(save(om.yolo11(width=0.5, imgsz=64, nc=3), tmp_path))
    x = np.random.default_rng(3).standard_normal(net.input_shape).astype(np.float32)
    whole = net.outputs(x)
    for start in (1, runnable_prefix(net.spec)):
        mid = net.forward(x, 0, start)
        assert all(np.array_equal(a, b) for a, b in zip(net.outputs(mid, start=start), whole))


def test_planner_takes_onnx_models(tmp_path):
    """The current planner fuses the conv/maxpool prefix, and the new layer kinds end it."""
    net = Network.from_onnx(save(om.resnet18(width=0.25, imgsz=64, classes=10), tmp_path))
    n = runnable_prefix(net.spec)
    assert 1 <= n <= fusable_prefix(net.spec)
    plan = make_plan(net.spec, (2, 2), n)
    assert plan.n_layers == n
    for name in ("yolov8-bn", "yolo11", "mobilenetv2"):
        net = Network.from_onnx(save(TINY[name](), tmp_path, f"{name}.onnx"))
        n = runnable_prefix(net.spec)
        assert n >= 1
        # tiled equals whole, bit for bit, over the prefix the planner fuses
        x = np.random.default_rng(5).standard_normal(net.input_shape).astype(np.float32)
        for reuse in (False, True):
            plan = make_plan(net.spec, (2, 3), n, scheme="quad" if reuse else "none")
            assert np.array_equal(run_frame(net, plan, x, reuse=reuse).output, net.forward(x, 0, n))


def test_model_hash_is_the_files_digest(tmp_path):
    a = save(om.resnet18(width=0.25, imgsz=64, classes=10, seed=0), tmp_path, "a.onnx")
    b = save(om.resnet18(width=0.25, imgsz=64, classes=10, seed=1), tmp_path, "b.onnx")
    assert Network.from_onnx(a).model_hash == Network.from_onnx(a).model_hash
    assert Network.from_onnx(a).model_hash != Network.from_onnx(b).model_hash


# ------------------------------------------------------------------------------------------------
# operators one at a time
# ------------------------------------------------------------------------------------------------

def unit(build, in_shape=(1, 4, 9, 11), seed=0, opset=17):
    """A graph of the nodes ``build(b, x)`` adds (returns the output names) on one input."""
    b = om.Builder(seed, bn=False)
    outs = build(b, "images")
    outs = [outs] if isinstance(outs, str) else outs
    graph = helper.make_graph(b.nodes, "unit", [helper.make_tensor_value_info("images", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], b.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = om.IR_VERSION
    return m


def cst(b, v, dtype=np.int64):
    return b.const(np.asarray(v, dtype))


def w(b, *shape):
    return b.const(b.rng.standard_normal(shape).astype(np.float32))


UNITS = {
    # Conv: asymmetric pads (top/left differ: PadConvSpec), bottom/right only, groups, dilation, strides
    "conv-asym-pads": (lambda b, x: b.conv(x, 4, 6, 3, pads=[1, 0, 0, 2], act=None), PadConvSpec),
    "conv-pads-bottom-right": (lambda b, x: b.conv(x, 4, 6, 3, pads=[0, 0, 2, 2], act=None), PadConvSpec),
    "conv-groups": (lambda b, x: b.conv(x, 4, 6, 3, g=2, act="relu"), ConvSpec),
    "conv-depthwise-dilated": (lambda b, x: b.conv(x, 4, 4, 3, g=4, d=2, act="relu6"), ConvSpec),
    "conv-stride-xy": (lambda b, x: b.op("Conv", x, w(b, 5, 4, 3, 3), kernel_shape=[3, 3], strides=[2, 1],
                                         pads=[1, 1, 1, 1]), ConvSpec),
    "conv-same-upper": (lambda b, x: b.op("Conv", x, w(b, 5, 4, 2, 2), strides=[2, 2], auto_pad="SAME_UPPER"),
                        PadConvSpec),
    "conv-hardswish": (lambda b, x: b.conv(x, 4, 6, 3, act="hardswish"), ConvSpec),
    "conv-leaky": (lambda b, x: b.conv(x, 4, 6, 1, act="leaky"), ConvSpec),
    "conv-sigmoid": (lambda b, x: b.op("Sigmoid", b.conv(x, 4, 6, 1, act=None)), ConvSpec),
    "conv-silu-swapped": (lambda b, x: (lambda y: b.op("Mul", b.op("Sigmoid", y), y))(b.conv(x, 4, 6, 3, act=None)),
                          ConvSpec),
    "batchnorm-alone": (lambda b, x: b.op("BatchNormalization", x, *(b.const(np.linspace(0.5, 1.5, 4, dtype=np.float32))
                                                                   for _ in range(4)), epsilon=1e-3), TensorOpSpec),
    "hardswish": (lambda b, x: b.op("HardSwish", x), TensorOpSpec),
    "hardsigmoid": (lambda b, x: b.op("HardSigmoid", x, alpha=0.25, beta=0.4), TensorOpSpec),
    "leakyrelu-0.2": (lambda b, x: b.op("LeakyRelu", x, alpha=0.2), TensorOpSpec),
    "relu-sigmoid": (lambda b, x: b.op("Sigmoid", b.op("Relu", x)), TensorOpSpec),
    "clip-only-max": (lambda b, x: b.op("Clip", x, "", b.const(np.float32(0.5))), TensorOpSpec),
    "clip-opset10": (lambda b, x: b.node("Clip", [x], min=-0.3, max=0.4), TensorOpSpec, 10),
    "add-sub-mul-div-broadcast": (lambda b, x: b.op("Div", b.op("Sub", b.op("Mul", x, w(b, 1, 4, 1, 1)),
                                                                w(b, 11)), b.const(np.float32(3))), TensorOpSpec),
    "mul-two-maps": (lambda b, x: b.op("Mul", x, b.op("Sigmoid", b.op("Relu", x))), TensorOpSpec),
    "add-maps-shortcut": (lambda b, x: b.op("Relu", b.op("Add", b.conv(x, 4, 4, 3, act=None), x)), ShortcutSpec),
    "concat-channels": (lambda b, x: b.op("Concat", b.conv(x, 4, 3, 1, act=None), x, axis=1), RouteSpec),
    "concat-width": (lambda b, x: b.op("Concat", x, b.conv(x, 4, 4, 1, act=None), axis=3), TensorOpSpec),
    "split-equal": (lambda b, x: b.node("Split", [x, cst(b, [2, 2])], 2, axis=1), RouteSpec),
    "split-unequal": (lambda b, x: b.node("Split", [x, cst(b, [1, 3])], 2, axis=1), SliceSpec),
    "split-num-outputs": (lambda b, x: b.node("Split", [x], 3, axis=3, num_outputs=3), TensorOpSpec, 18),
    "slice-channels": (lambda b, x: b.op("Slice", x, cst(b, [1]), cst(b, [3]), cst(b, [1])), SliceSpec),
    "slice-steps": (lambda b, x: b.op("Slice", x, cst(b, [-1, 1]), cst(b, [-100, 100]), cst(b, [2, 3]),
                                      cst(b, [-2, 3])), TensorOpSpec),
    "maxpool-spp": (lambda b, x: b.op("MaxPool", x, kernel_shape=[5, 5], pads=[2, 2, 2, 2]), MaxPoolSpec),
    "maxpool-s2": (lambda b, x: b.op("MaxPool", x, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
                   MaxPoolSpec),
    "maxpool-asym": (lambda b, x: b.op("MaxPool", x, kernel_shape=[2, 3], strides=[1, 2], pads=[0, 1, 1, 0]),
                     TensorOpSpec),
    "averagepool": (lambda b, x: b.op("AveragePool", x, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
                    TensorOpSpec),
    "averagepool-include-pad": (lambda b, x: b.op("AveragePool", x, kernel_shape=[2, 2], pads=[1, 0, 0, 1],
                                                  count_include_pad=1), TensorOpSpec),
    # means of non-negative maps (after a ReLU, as in the models): the bound is relative to the
    # terms' magnitude, which a mean of zero-mean noise would not show
    "globalaveragepool": (lambda b, x: b.op("GlobalAveragePool", b.op("Relu", x)), TensorOpSpec),
    "reducemean": (lambda b, x: b.op("ReduceMean", b.op("Relu", x), axes=[2, 3], keepdims=0), TensorOpSpec),
    "resize-axes-opset18": (lambda b, x: b.op("Resize", x, "", cst(b, [2, 2], np.float32), axes=[2, 3], mode="nearest",
                                              coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
                            UpsampleSpec, 18),
    "resize-asymmetric": (lambda b, x: b.op("Resize", x, "", cst(b, [1, 1, 3, 3], np.float32), mode="nearest",
                                            coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
                          UpsampleSpec),
    "resize-half-pixel-sizes": (lambda b, x: b.op("Resize", x, "", "", cst(b, [1, 4, 18, 22]), mode="nearest"),
                                UpsampleSpec),
    "reshape-transpose-softmax": (lambda b, x: b.op("Softmax", b.op("Transpose", b.op("Reshape", x, cst(b, [1, 2, 0, -1])),
                                                                    perm=[0, 3, 1, 2]), axis=1), TensorOpSpec),
    "softmax-opset11-2d": (lambda b, x: b.op("Softmax", x, axis=2), TensorOpSpec, 11),
    "flatten-gemm-transB": (lambda b, x: b.op("Gemm", b.op("Flatten", x, axis=1), w(b, 7, 4 * 9 * 11), w(b, 7),
                                              transB=1, alpha=0.5, beta=2.0), TensorOpSpec),
    "gemm-no-bias": (lambda b, x: b.op("Gemm", b.op("Reshape", x, cst(b, [1, 4 * 9 * 11])), w(b, 4 * 9 * 11, 5)),
                     TensorOpSpec),
    "matmul-batched": (lambda b, x: b.op("MatMul", b.op("Transpose", x, perm=[0, 1, 3, 2]), x), TensorOpSpec),
    "matmul-const": (lambda b, x: b.op("MatMul", x, w(b, 11, 3)), TensorOpSpec),
    "identity-constant": (lambda b, x: b.op("Add", b.op("Identity", x),
                                            b.node("Constant", [], value=helper.make_tensor(
                                                "v", TensorProto.FLOAT, [1], [0.25]))[0]), TensorOpSpec),
    # a Shape -> Gather -> Unsqueeze -> Concat -> Reshape chain (dynamic-style export), folded at load
    "shape-chain": (lambda b, x: b.op("Reshape", x, b.op("Concat", *(b.op("Unsqueeze", b.op("Gather", b.op("Shape", x),
                                                                                              cst(b, i)), cst(b, [0]))
                                                                      for i in (0, 1)), cst(b, [-1]), axis=0)),
                    TensorOpSpec),
}


@pytest.mark.parametrize("name", list(UNITS))
def test_operator_matches_onnxruntime(name, tmp_path):
    build, kind, *opset = UNITS[name]
    path = save(unit(build, opset=opset[0] if opset else 17), tmp_path)
    net = Network.from_onnx(path)
    assert kind in {type(l) for l in net.layers}, [l.kind for l in net.layers]
    # shapes are static: Shape and what computes on its result are folded at load
    assert not {l.op for l in net.layers if isinstance(l, TensorOpSpec)} & {"Shape", "Gather", "Unsqueeze"}
    assert compare(path, net=net) <= TOL


def test_swapped_pads_fail_the_bound(tmp_path):
    good = save(unit(lambda b, x: b.conv(x, 4, 6, 3, pads=[1, 0, 0, 1], act=None)), tmp_path, "good.onnx")
    bad = save(unit(lambda b, x: b.conv(x, 4, 6, 3, pads=[0, 1, 1, 0], act=None)), tmp_path, "bad.onnx")
    assert compare(good) <= TOL
    assert compare(good, net=Network.from_onnx(bad)) > 10 * TOL


def test_hardswish_kernel_is_the_reference_bit_for_bit():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(3000).astype(np.float32) * 5,
                        np.array([-3, 3, 0, -0.0, 1e30, -1e30, np.inf, -np.inf, 2.9999998], np.float32)])
    got = kernels.activate(x.copy(), "hardswish")
    want = naive.activate_f32(x, "hardswish")
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), (x[~same][:4], got[~same][:4], want[~same][:4])
    # fused into a conv: the same function of the same sums
    xc = rng.standard_normal((3, 6, 7)).astype(np.float32)
    wc = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    bc = rng.standard_normal(4).astype(np.float32)
    lin = kernels.conv2d(xc, wc, bc, pad_top=1, pad_left=1)
    assert np.array_equal(kernels.conv2d(xc, wc, bc, pad_top=1, pad_left=1, activation="hardswish"),
                          naive.activate_f32(lin, "hardswish"))


# ------------------------------------------------------------------------------------------------
# errors: clear, naming the node and the op
# ------------------------------------------------------------------------------------------------

def test_unsupported_operator_names_the_node(tmp_path):
    path = save(unit(lambda b, x: b.op("LRN", b.op("Relu", x), size=3)), tmp_path)
    with pytest.raises(ModelError, match=r"node 'lrn_\d+' \(LRN\).*not supported"):
        Network.from_onnx(path)


@pytest.mark.parametrize("build, match", [
    (lambda b, x: b.op("Resize", x, "", cst(b, [1, 1, 2, 2], np.float32), mode="linear"), r"\(Resize\).*mode='linear'"),
    (lambda b, x: b.op("Resize", x, "", cst(b, [1, 1, 1.5, 1.5], np.float32), mode="nearest"), r"integer scale"),
    (lambda b, x: b.op("Conv", x, w(b, 2, 4, 1, 3)), r"\(Conv\).*kernel 1x3"),
    (lambda b, x: b.op("MaxPool", x, kernel_shape=[2, 2], ceil_mode=1), r"\(MaxPool\).*ceil_mode"),
    (lambda b, x: b.op("Reshape", x, b.op("Cast", b.op("Relu", x), to=TensorProto.INT64)), r"must be a constant"),
])
def test_unsupported_attribute_names_the_node(build, match, tmp_path):
    with pytest.raises(ModelError, match=match):
        Network.from_onnx(save(unit(build), tmp_path))


def test_truncated_and_foreign_files(tmp_path):
    data = save(TINY["resnet18-bn"](), tmp_path).read_bytes()
    for cut in (len(data) // 3, 100, 1):
        p = tmp_path / f"cut{cut}.onnx"
        p.write_bytes(data[:cut])
        with pytest.raises(ModelError, match=str(p)):
            Network.from_onnx(p)
    (tmp_path / "cfg.onnx").write_text("[net]\nwidth=416\n")
    with pytest.raises(ModelError, match="not a valid ONNX file"):
        Network.from_onnx(tmp_path / "cfg.onnx")
    with pytest.raises(ModelError, match="cannot read"):
        Network.from_onnx(tmp_path / "missing.onnx")


def test_missing_initializer_and_bad_input(tmp_path):
    m = unit(lambda b, x: b.conv(x, 4, 6, 3, act="relu"))
    del m.graph.initializer[0]
    with pytest.raises(ModelError, match=r"\(Conv\) reads 'w_\d+'.*missing initializer"):
        Network.from_onnx(save(m, tmp_path))
    m = unit(lambda b, x: b.op("Relu", x), in_shape=["batch", 3, 8, 8])
    with pytest.raises(ModelError, match="static"):
        Network.from_onnx(save(m, tmp_path, "dyn.onnx"))
    m = unit(lambda b, x: b.op("Relu", x), in_shape=[2, 3, 8, 8])
    with pytest.raises(ModelError, match="batch 2"):
        Network.from_onnx(save(m, tmp_path, "b2.onnx"))


# ------------------------------------------------------------------------------------------------
# Ultralytics-style decode and NMS
# ------------------------------------------------------------------------------------------------

def test_decode_letterbox_and_class_nms():
    nc = 3
    # candidates: (cx, cy, w, h) in input pixels of a 64x64 input, and class scores
    cands = [((20, 20, 10, 10), (0.9, 0.1, 0.0)),    # kept
             ((21, 20, 10, 10), (0.8, 0.0, 0.0)),    # IoU 0.82 with the first, same class: suppressed
             ((21, 20, 10, 10), (0.0, 0.0, 0.7)),    # same box, other class: kept
             ((40, 40, 8, 8), (0.2, 0.24, 0.1)),     # below the threshold
             ((40, 30, 8, 8), (0.3, 0.3, 0.0))]      # tie: the first class
    out = np.zeros((4 + nc, len(cands)), np.float32)
    for i, (box, sc) in enumerate(cands):
        out[:4, i], out[4:, i] = box, sc
    # a 128x64 image letterboxed into 64x64: scaled by 1/2, 16 rows of padding on top
    dets = detect_ultralytics(out, img_w=128, img_h=64, net_w=64, net_h=64, thresh=0.25, nms=0.7)
    assert [(d.cls, round(d.prob, 3)) for d in dets] == [(0, 0.9), (2, 0.7), (0, 0.3)]
    d = dets[0]
    assert (d.left, d.top, d.right, d.bottom) == (30, 0, 50, 18)  # x 15..25 -> 30..50; y 15..25 -> -2..18 clipped
    assert d.x == pytest.approx(40 / 128) and d.w == pytest.approx(20 / 128)


def _iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30), st.integers(1, 12), st.integers(1, 12),
                          st.integers(0, 2), st.integers(1, 50)), min_size=1, max_size=25),
       st.sampled_from([0.3, 0.5, 0.7]))
def test_nms_is_greedy_by_class(rows, iou):
    """Greedy NMS's definition: in descending score (stable), a box is kept iff no kept box of its
    class overlaps it by IoU > iou."""
    boxes = np.array([(x, y, x + bw, y + bh) for x, y, bw, bh, _, _ in rows], np.float64)
    cls = np.array([r[4] for r in rows])
    scores = np.array([r[5] for r in rows], np.float64)
    kept: list[int] = []
    for i in sorted(range(len(rows)), key=lambda i: -scores[i]):
        if all(cls[k] != cls[i] or _iou(boxes[k], boxes[i]) <= iou for k in kept):
            kept.append(i)
    assert nms_by_class(boxes, scores, cls, iou).tolist() == kept


# ------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "stealer", *args], capture_output=True, text=True, env=env,
                          timeout=240, cwd=ROOT)


def test_cli_infer_info_plan(tmp_path):
    path = save(om.yolov8(width=0.25, depth=0.5, imgsz=64, nc=2), tmp_path, "det.onnx")
    r = _cli("infer", "--model", str(path), "--thresh", "0.3", "--threads", "1", "--out", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert "detections (thresh 0.3" in r.stdout
    assert result["model"] == str(path) and result["output_shape"] == [6, 84]
    net = Network.from_onnx(path)
    assert result["model_hash"] == net.model_hash
    assert len(result["detections"]) == int(r.stdout.split(" detections")[0].rsplit("\n", 1)[-1])
    assert result["detections"] and all(d["prob"] > 0.3 for d in result["detections"])
    cls = save(om.mobilenetv2(width=0.35, depth=0.5, imgsz=64, classes=10), tmp_path, "cls.onnx")
    r = _cli("infer", "--model", str(cls), "--threads", "1", "--out", str(tmp_path / "c.json"))
    assert r.returncode == 0, r.stderr
    x = synthetic_frame(0, 0, (3, 64, 64))
    scores = ort_outputs(cls, x)[0][0]
    top = json.loads((tmp_path / "c.json").read_text())["top5"]
    assert [t[0] for t in top] == list(np.argsort(-scores, kind="stable")[:5])
    assert "top-5 classes" in r.stdout
    r = _cli("info", "--model", str(path))
    assert r.returncode == 0, r.stderr
    assert "Softmax" in r.stdout and "total" in r.stdout
    r = _cli("plan", "--model", str(path), "--grid", "2x2")
    assert r.returncode == 0, r.stderr
    assert "fused layers 0-" in r.stdout
    bad = save(unit(lambda b, x: b.op("LRN", x, size=3)), tmp_path, "bad.onnx")
    r = _cli("infer", "--model", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "(LRN)" in r.stderr and "not supported" in r.stderr
    r = _cli("info", "--model", str(tmp_path / "r.json"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "not a valid ONNX file" in r.stderr


def test_corrupted_files_give_model_errors(tmp_path):
    """Random byte changes to a small graph: the import (and a run of what imports) either
    works or raises a ModelError; never another exception (which the CLI would show as a trace)."""
    def build(b, x):
        y = b.conv(x, 4, 4, 3, act="silu", pads=[1, 0, 1, 2])
        y = b.op("Concat", y, b.node("Split", [x, cst(b, [1, 3])], 2, axis=1)[1], axis=1)
        y = b.op("MaxPool", b.op("Resize", y, "", cst(b, [1, 1, 2, 2], np.float32), mode="nearest"),
                 kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
        y = b.op("BatchNormalization", y, *(b.const(np.linspace(0.5, 1.5, 7, dtype=np.float32)) for _ in range(4)))
        return b.op("Softmax", b.op("MatMul", b.op("Reshape", y, cst(b, [1, 7, -1])), w(b, 36, 5)), axis=-1)

    data = unit(build, in_shape=(1, 4, 6, 6)).SerializeToString()
    rng = np.random.default_rng(0)
    path = tmp_path / "f.onnx"
    imported = 0
    for _ in range(400):
        d = bytearray(data)
        for _ in range(rng.integers(1, 4)):
            d[rng.integers(len(d))] = rng.integers(256)
        path.write_bytes(bytes(d))
        try:
            net = Network.from_onnx(path)
            net.outputs(np.zeros(net.input_shape, np.float32))
            imported += 1
        except ModelError:
            pass
    assert 0 < imported < 400  # both outcomes occurred: the mutations hit weights and structure


def test_no_graph_output_is_fused(tmp_path):
    """An output that is a conv of the prefix stays in the tail (which yields every output)."""
    path = save(unit(lambda b, x: (lambda y: [y, b.conv(b.conv(y, 4, 4, 3, act="relu"), 4, 4, 3, act="relu")])(
        b.conv(x, 4, 4, 3, act="relu"))), tmp_path)
    net = Network.from_onnx(path)
    assert fusable_prefix(net.spec) == 3 and runnable_prefix(net.spec) == 0
    assert compare(path, net=net) <= TOL


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 5), st.sampled_from([1, 2, 3, 5]), st.integers(1, 3), st.integers(1, 2), st.integers(1, 2),
       st.integers(1, 12), st.integers(1, 20), st.integers(-2, 3), st.integers(-2, 3), st.integers(0, 3),
       st.integers(0, 3), st.sampled_from(list(kernels.ALL_ACT_NAMES)), st.integers(0, 2**31))
def test_depthwise_conv_is_the_grouped_gemm_bit_for_bit(c, k, d, sy, sx, h, w, pt, pl, eh, ew, act, seed):
    """The direct depthwise path (groups = C = Co) gives the per-channel exact GEMM's bits, for
    any pads (negative ones start inside the map, as a tile's do), output size and activation."""
    span = (k - 1) * d + 1
    oh, ow = (h + 2 * max(pt, 0) - span) // sy + 1 - eh, (w + 2 * max(pl, 0) - span) // sx + 1 - ew
    if oh < 1 or ow < 1:
        return
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((c, h, w)).astype(np.float32) * 3
    wt = rng.standard_normal((c, 1, k, k)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    kw = dict(stride=(sy, sx), pad_top=pt, pad_left=pl, out_h=oh, out_w=ow, activation=act, dilation=d)
    got = kernels.conv2d(x, wt, b, groups=c, **kw)
    want = np.concatenate([kernels.conv2d(x[i:i + 1], wt[i:i + 1], b[i:i + 1], **kw) for i in range(c)])
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_threads_give_the_single_threaded_bits(tmp_path):
    """Output channels split over threads (dilated, column-strided and depthwise convs too)."""
    from concurrent.futures import ThreadPoolExecutor

    def build(b, x):
        y = b.conv(x, 4, 24, 3, d=2, act="relu")
        y = b.op("Conv", y, w(b, 16, 24, 3, 3), kernel_shape=[3, 3], strides=[1, 2], pads=[1, 1, 1, 1])
        return b.conv(y, 16, 16, 3, g=16, act="relu6")

    net = Network.from_onnx(save(unit(build, in_shape=(1, 4, 12, 13)), tmp_path))
    x = np.random.default_rng(0).standard_normal(net.input_shape).astype(np.float32)
    one = net.outputs(x)[0]
    with ThreadPoolExecutor(2) as pool:
        assert np.array_equal(net.outputs(x, executor=pool, threads=2)[0], one)
    assert compare(tmp_path / "m.onnx", net=net) <= TOL
