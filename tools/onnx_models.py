"""Small-but-faithful ONNX graphs of today's CNNs, built with ``onnx.helper`` and seeded random
weights (no torch): the oracles of stealer's ONNX import (``tests/test_onnx_import.py``) and the
graphs of the benchmarks.

* :func:`yolov8` — YOLOv8n's layout (ultralytics/cfg/models/v8/yolov8.yaml): Conv-BN-SiLU, C2f
  with Split and Bottleneck adds, SPPF, nearest Resize x2, Concat, the decoupled head and its
  export-time decode: DFL (Reshape, Transpose, Softmax, 1x1 Conv), anchors and strides
  (Split, Sub, Add, Div, Mul, Concat), Sigmoid classes; output (1, 4 + nc, N).
* :func:`yolo11` — YOLO11n's (yolo11.yaml): C3k2 (with C3k), SPPF, C2PSA attention (Reshape,
  Split, Transpose, MatMul, Mul, Softmax, depthwise positional conv), the depthwise class head.
* :func:`resnet18` — torchvision ResNet-18: 7x7 conv, BN, ReLU, max pool, basic blocks with
  residual Add (1x1 stride-2 downsampling), GlobalAveragePool, Flatten, Gemm (transB).
* :func:`mobilenetv2` — torchvision MobileNetV2: inverted residuals, depthwise convs, Clip(0, 6).

``width`` scales channels (1.0 = the real model; YOLO's own width multiple is applied on top),
``depth`` repeats, ``imgsz`` the square input. ``bn=True`` exports BatchNormalization nodes
after every conv (torch.onnx's eval-mode export of an unfused model); ``bn=False`` gives convs
with biases, as Ultralytics' export (which fuses batch norm first) does.

    python tools/onnx_models.py yolov8 --imgsz 640 -o yolov8n.onnx
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8


class Builder:
    """Collects nodes and initializers; every conv gets seeded He-scaled weights (so that
    activations stay of order one through deep stacks) and, with ``bn``, a BatchNormalization
    with random statistics."""

    def __init__(self, seed: int, bn: bool) -> None:
        self.rng = np.random.default_rng(seed)
        self.bn = bn
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def const(self, value: np.ndarray, prefix: str = "c") -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs: object) -> list[str]:
        name = self.name(op.lower())
        outs = [f"{name}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs

    def op(self, op: str, *inputs: str, **attrs: object) -> str:
        return self.node(op, list(inputs), **attrs)[0]

    def conv(self, x: str, c1: int, c2: int, k: int = 1, s: int = 1, g: int = 1, d: int = 1,
             act: str | None = "silu", bias: bool | None = None, pads: list[int] | None = None,
             weight: np.ndarray | None = None) -> str:
        """Conv (+ BN) (+ activation): ``act`` in silu, relu, relu6, hardswish, leaky or None."""
        p = (k - 1) // 2 * d
        w = weight if weight is not None else \
            (self.rng.standard_normal((c2, c1 // g, k, k)) * math.sqrt(2.0 / (c1 // g * k * k))).astype(np.float32)
        ins = [x, self.const(w, "w")]
        with_bias = (not self.bn) if bias is None else bias
        if with_bias:
            ins.append(self.const((self.rng.standard_normal(c2) * 0.1).astype(np.float32), "b"))
        y = self.op("Conv", *ins, kernel_shape=[k, k], strides=[s, s], pads=pads or [p, p, p, p],
                    dilations=[d, d], group=g)
        if self.bn and bias is None:
            r = self.rng
            y = self.op("BatchNormalization", y, self.const(r.uniform(0.5, 1.5, c2).astype(np.float32), "bn_s"),
                        self.const((r.standard_normal(c2) * 0.1).astype(np.float32), "bn_b"),
                        self.const((r.standard_normal(c2) * 0.1).astype(np.float32), "bn_m"),
                        self.const(r.uniform(0.5, 1.5, c2).astype(np.float32), "bn_v"), epsilon=1e-3)
        return self.act(y, act)

    def act(self, y: str, act: str | None) -> str:
        if act == "silu":
            return self.op("Mul", y, self.op("Sigmoid", y))
        if act == "relu":
            return self.op("Relu", y)
        if act == "relu6":
            return self.op("Clip", y, self.const(np.float32(0), "min"), self.const(np.float32(6), "max"))
        if act == "hardswish":
            return self.op("HardSwish", y)
        if act == "leaky":
            return self.op("LeakyRelu", y, alpha=0.1)
        return y

    def model(self, x_shape: tuple[int, ...], outputs: list[tuple[str, list[int]]], name: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, [helper.make_tensor_value_info("images", TensorProto.FLOAT, x_shape)],
                                  [helper.make_tensor_value_info(o, TensorProto.FLOAT, s) for o, s in outputs],
                                  self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="stealer-tools")
        m.ir_version = IR_VERSION
        return m


def _ch(c: float, width: float) -> int:
    """Channels scaled by ``width``, a multiple of 8 as Ultralytics' make_divisible (at least 8)."""
    return max(8, int(math.ceil(c * width / 8) * 8))


def _n(n: int, depth: float) -> int:
    return max(1, round(n * depth))


# --------------------------------------------------------------------------- YOLO blocks

def _bottleneck(b: Builder, x: str, c: int, shortcut: bool, e: float = 1.0) -> str:
    h = int(c * e)
    y = b.conv(b.conv(x, c, h, 3), h, c, 3)
    return b.op("Add", x, y) if shortcut else y


def _c2f(b: Builder, x: str, c1: int, c2: int, n: int, shortcut: bool, e: float = 0.5, c3k: bool | None = None) -> str:
    """C2f (``c3k=None``) or C3k2 (``c3k`` False: e=0.5 bottlenecks, True: C3k blocks)."""
    c = int(c2 * e)
    y = b.conv(x, c1, 2 * c, 1)
    parts = b.node("Split", [y, b.const(np.array([c, c], np.int64), "split")], 2, axis=1)
    for _ in range(n):
        if c3k is None:
            parts.append(_bottleneck(b, parts[-1], c, shortcut, 1.0))
        elif c3k:
            parts.append(_c3k(b, parts[-1], c, c, 2, shortcut))
        else:
            parts.append(_bottleneck(b, parts[-1], c, shortcut, 0.5))
    return b.conv(b.op("Concat", *parts, axis=1), (2 + n) * c, c2, 1)


def _c3k(b: Builder, x: str, c1: int, c2: int, n: int, shortcut: bool, e: float = 0.5) -> str:
    c_ = int(c2 * e)
    m = b.conv(x, c1, c_, 1)
    for _ in range(n):
        m = _bottleneck(b, m, c_, shortcut, 1.0)
    return b.conv(b.op("Concat", m, b.conv(x, c1, c_, 1), axis=1), 2 * c_, c2, 1)


def _sppf(b: Builder, x: str, c1: int, c2: int, k: int = 5) -> str:
    c_ = c1 // 2
    y = [b.conv(x, c1, c_, 1)]
    for _ in range(3):
        y.append(b.op("MaxPool", y[-1], kernel_shape=[k, k], strides=[1, 1], pads=[k // 2] * 4))
    return b.conv(b.op("Concat", *y, axis=1), 4 * c_, c2, 1)


def _up(b: Builder, x: str) -> str:
    # torch.onnx's export of nn.Upsample(scale_factor=2, mode="nearest")
    return b.op("Resize", x, "", b.const(np.array([1, 1, 2, 2], np.float32), "scales"), mode="nearest",
                coordinate_transformation_mode="asymmetric", nearest_mode="floor")


def _attention(b: Builder, x: str, dim: int, hw: tuple[int, int], heads: int, ratio: float = 0.5) -> str:
    hd = dim // heads
    kd = int(hd * ratio)
    n = hw[0] * hw[1]
    qkv = b.conv(x, dim, dim + 2 * kd * heads, 1, act=None)
    r = b.op("Reshape", qkv, b.const(np.array([1, heads, 2 * kd + hd, n], np.int64), "shape"))
    q, k, v = b.node("Split", [r, b.const(np.array([kd, kd, hd], np.int64), "split")], 3, axis=2)
    att = b.op("MatMul", b.op("Transpose", q, perm=[0, 1, 3, 2]), k)
    att = b.op("Softmax", b.op("Mul", att, b.const(np.array(kd ** -0.5, np.float32), "scale")), axis=-1)
    y = b.op("MatMul", v, b.op("Transpose", att, perm=[0, 1, 3, 2]))
    shape4 = b.const(np.array([1, dim, hw[0], hw[1]], np.int64), "shape")
    y = b.op("Reshape", y, shape4)
    pe = b.conv(b.op("Reshape", v, shape4), dim, dim, 3, g=dim, act=None)
    return b.conv(b.op("Add", y, pe), dim, dim, 1, act=None)


def _c2psa(b: Builder, x: str, c1: int, hw: tuple[int, int], n: int) -> str:
    c = c1 // 2
    y = b.conv(x, c1, 2 * c, 1)
    a, m = b.node("Split", [y, b.const(np.array([c, c], np.int64), "split")], 2, axis=1)
    for _ in range(n):
        m = b.op("Add", m, _attention(b, m, c, hw, max(1, c // 64)))
        m = b.op("Add", m, b.conv(b.conv(m, c, 2 * c, 1), 2 * c, c, 1, act=None))
    return b.conv(b.op("Concat", a, m, axis=1), 2 * c, c1, 1)


def _detect(b: Builder, feats: list[tuple[str, int, int, int]], nc: int, imgsz: int, dw_cls: bool) -> str:
    """Ultralytics Detect with its export-time decode; ``feats``: (tensor, channels, h, w)."""
    reg = 16
    c2 = max(16, feats[0][1] // 4, reg * 4)
    c3 = max(feats[0][1], min(nc, 100))
    flat, anchors, strides = [], [], []
    for x, ch, h, w in feats:
        box = b.conv(b.conv(b.conv(x, ch, c2, 3), c2, c2, 3), c2, 4 * reg, 1, act=None, bias=True)
        if dw_cls:  # YOLO11: (DWConv, Conv) twice
            cls = b.conv(b.conv(x, ch, ch, 3, g=ch), ch, c3, 1)
            cls = b.conv(b.conv(cls, c3, c3, 3, g=c3), c3, c3, 1)
        else:
            cls = b.conv(b.conv(x, ch, c3, 3), c3, c3, 3)
        cls = b.conv(cls, c3, nc, 1, act=None, bias=True)
        cat = b.op("Concat", box, cls, axis=1)
        flat.append(b.op("Reshape", cat, b.const(np.array([1, 4 * reg + nc, -1], np.int64), "shape")))
        s = imgsz // h
        gy, gx = np.meshgrid(np.arange(h, dtype=np.float32) + 0.5, np.arange(w, dtype=np.float32) + 0.5, indexing="ij")
        anchors.append(np.stack([gx.ravel(), gy.ravel()]))
        strides.append(np.full(h * w, s, np.float32))
    x_cat = b.op("Concat", *flat, axis=2)
    box, cls = b.node("Split", [x_cat, b.const(np.array([4 * reg, nc], np.int64), "split")], 2, axis=1)
    n = sum(h * w for _, _, h, w in feats)
    # DFL: softmax over the 16 bins of each side, then the expectation as a fixed 1x1 conv
    d = b.op("Reshape", box, b.const(np.array([1, 4, reg, n], np.int64), "shape"))
    d = b.op("Softmax", b.op("Transpose", d, perm=[0, 2, 1, 3]), axis=1)
    d = b.conv(d, reg, 1, 1, act=None, bias=False, weight=np.arange(reg, dtype=np.float32).reshape(1, reg, 1, 1))
    d = b.op("Reshape", d, b.const(np.array([1, 4, n], np.int64), "shape"))
    lt, rb = b.node("Split", [d, b.const(np.array([2, 2], np.int64), "split")], 2, axis=1)
    anc = b.const(np.concatenate(anchors, axis=1)[None], "anchors")
    x1y1 = b.op("Sub", anc, lt)
    x2y2 = b.op("Add", anc, rb)
    cxy = b.op("Div", b.op("Add", x1y1, x2y2), b.const(np.array(2, np.float32), "two"))
    wh = b.op("Sub", x2y2, x1y1)
    dbox = b.op("Mul", b.op("Concat", cxy, wh, axis=1), b.const(np.concatenate(strides)[None], "strides"))
    return b.op("Concat", dbox, b.op("Sigmoid", cls), axis=1)


def yolov8(width: float = 1.0, depth: float = 1.0, imgsz: int = 640, nc: int = 80, seed: int = 0,
           bn: bool = False) -> onnx.ModelProto:
    """YOLOv8n (width multiple 0.25, depth 0.33 on top of ``width``/``depth``)."""
    b = Builder(seed, bn)
    w, dm = 0.25 * width, 0.33 * depth
    c = {k: _ch(v, w) for k, v in {"p1": 64, "p2": 128, "p3": 256, "p4": 512, "p5": 1024}.items()}
    x = b.conv("images", 3, c["p1"], 3, 2)
    x = b.conv(x, c["p1"], c["p2"], 3, 2)
    x = _c2f(b, x, c["p2"], c["p2"], _n(3, dm), True)
    x = b.conv(x, c["p2"], c["p3"], 3, 2)
    p3 = _c2f(b, x, c["p3"], c["p3"], _n(6, dm), True)
    x = b.conv(p3, c["p3"], c["p4"], 3, 2)
    p4 = _c2f(b, x, c["p4"], c["p4"], _n(6, dm), True)
    x = b.conv(p4, c["p4"], c["p5"], 3, 2)
    x = _c2f(b, x, c["p5"], c["p5"], _n(3, dm), True)
    p5 = _sppf(b, x, c["p5"], c["p5"])
    h12 = _c2f(b, b.op("Concat", _up(b, p5), p4, axis=1), c["p5"] + c["p4"], c["p4"], _n(3, dm), False)
    h15 = _c2f(b, b.op("Concat", _up(b, h12), p3, axis=1), c["p4"] + c["p3"], c["p3"], _n(3, dm), False)
    h18 = _c2f(b, b.op("Concat", b.conv(h15, c["p3"], c["p3"], 3, 2), h12, axis=1), c["p3"] + c["p4"], c["p4"],
               _n(3, dm), False)
    h21 = _c2f(b, b.op("Concat", b.conv(h18, c["p4"], c["p4"], 3, 2), p5, axis=1), c["p4"] + c["p5"], c["p5"],
               _n(3, dm), False)
    s = imgsz // 8
    out = _detect(b, [(h15, c["p3"], s, s), (h18, c["p4"], s // 2, s // 2), (h21, c["p5"], s // 4, s // 4)], nc,
                  imgsz, dw_cls=False)
    n = s * s + (s // 2) ** 2 + (s // 4) ** 2
    return b.model((1, 3, imgsz, imgsz), [(out, [1, 4 + nc, n])], "yolov8")


def yolo11(width: float = 1.0, depth: float = 1.0, imgsz: int = 640, nc: int = 80, seed: int = 0,
           bn: bool = False) -> onnx.ModelProto:
    """YOLO11n (width multiple 0.25, depth 0.5 on top of ``width``/``depth``)."""
    b = Builder(seed, bn)
    w, dm = 0.25 * width, 0.5 * depth
    ch = {k: _ch(v, w) for k, v in {64: 64, 128: 128, 256: 256, 512: 512, 1024: 1024}.items()}
    x = b.conv("images", 3, ch[64], 3, 2)
    x = b.conv(x, ch[64], ch[128], 3, 2)
    x = _c2f(b, x, ch[128], ch[256], _n(2, dm), True, 0.25, c3k=False)
    x = b.conv(x, ch[256], ch[256], 3, 2)
    p3 = _c2f(b, x, ch[256], ch[512], _n(2, dm), True, 0.25, c3k=False)
    x = b.conv(p3, ch[512], ch[512], 3, 2)
    p4 = _c2f(b, x, ch[512], ch[512], _n(2, dm), True, c3k=True)
    x = b.conv(p4, ch[512], ch[1024], 3, 2)
    x = _c2f(b, x, ch[1024], ch[1024], _n(2, dm), True, c3k=True)
    x = _sppf(b, x, ch[1024], ch[1024])
    s = imgsz // 8
    p5 = _c2psa(b, x, ch[1024], (s // 4, s // 4), _n(2, dm))
    h13 = _c2f(b, b.op("Concat", _up(b, p5), p4, axis=1), ch[1024] + ch[512], ch[512], _n(2, dm), False, c3k=False)
    h16 = _c2f(b, b.op("Concat", _up(b, h13), p3, axis=1), ch[512] + ch[512], ch[256], _n(2, dm), False, c3k=False)
    h19 = _c2f(b, b.op("Concat", b.conv(h16, ch[256], ch[256], 3, 2), h13, axis=1), ch[256] + ch[512], ch[512],
               _n(2, dm), False, c3k=False)
    h22 = _c2f(b, b.op("Concat", b.conv(h19, ch[512], ch[512], 3, 2), p5, axis=1), ch[512] + ch[1024], ch[1024],
               _n(2, dm), True, c3k=True)
    out = _detect(b, [(h16, ch[256], s, s), (h19, ch[512], s // 2, s // 2), (h22, ch[1024], s // 4, s // 4)], nc,
                  imgsz, dw_cls=True)
    n = s * s + (s // 2) ** 2 + (s // 4) ** 2
    return b.model((1, 3, imgsz, imgsz), [(out, [1, 4 + nc, n])], "yolo11")


def resnet18(width: float = 1.0, depth: float = 1.0, imgsz: int = 224, classes: int = 1000, seed: int = 0,
             bn: bool = True) -> onnx.ModelProto:
    """torchvision ResNet-18 (``depth`` scales the 2 blocks per stage)."""
    b = Builder(seed, bn)
    c = _ch(64, width)
    x = b.conv("images", 3, c, 7, 2, act="relu")
    x = b.op("MaxPool", x, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = c
    for stage, cout in enumerate([c, 2 * c, 4 * c, 8 * c]):
        for blk in range(_n(2, depth)):
            s = 2 if stage > 0 and blk == 0 else 1
            y = b.conv(b.conv(x, cin, cout, 3, s, act="relu"), cout, cout, 3, act=None)
            idt = b.conv(x, cin, cout, 1, s, act=None) if s != 1 or cin != cout else x
            x = b.op("Relu", b.op("Add", y, idt))
            cin = cout
    x = b.op("Flatten", b.op("GlobalAveragePool", x), axis=1)
    wfc = (b.rng.standard_normal((classes, cin)) / math.sqrt(cin)).astype(np.float32)
    y = b.op("Gemm", x, b.const(wfc, "fc_w"), b.const((b.rng.standard_normal(classes) * 0.1).astype(np.float32),
                                                      "fc_b"), transB=1)
    return b.model((1, 3, imgsz, imgsz), [(y, [1, classes])], "resnet18")


def mobilenetv2(width: float = 1.0, depth: float = 1.0, imgsz: int = 224, classes: int = 1000, seed: int = 0,
                bn: bool = False) -> onnx.ModelProto:
    """torchvision MobileNetV2 (``depth`` scales each stage's repeats)."""
    b = Builder(seed, bn)
    cin = _ch(32, width)
    x = b.conv("images", 3, cin, 3, 2, act="relu6")
    for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                       (6, 320, 1, 1)]:
        cout = _ch(c, width)
        for i in range(_n(n, depth)):
            stride = s if i == 0 else 1
            hid = cin * t
            y = b.conv(x, cin, hid, 1, act="relu6") if t != 1 else x
            y = b.conv(y, hid, hid, 3, stride, g=hid, act="relu6")
            y = b.conv(y, hid, cout, 1, act=None)
            x = b.op("Add", x, y) if stride == 1 and cin == cout else y
            cin = cout
    last = _ch(1280, max(1.0, width))
    x = b.conv(x, cin, last, 1, act="relu6")
    x = b.op("Flatten", b.op("GlobalAveragePool", x), axis=1)
    wfc = (b.rng.standard_normal((classes, last)) / math.sqrt(last)).astype(np.float32)
    y = b.op("Gemm", x, b.const(wfc, "fc_w"), b.const(np.zeros(classes, np.float32), "fc_b"), transB=1)
    return b.model((1, 3, imgsz, imgsz), [(y, [1, classes])], "mobilenetv2")


MODELS = {"yolov8": yolov8, "yolo11": yolo11, "resnet18": resnet18, "mobilenetv2": mobilenetv2}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", choices=sorted(MODELS))
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--depth", type=float, default=1.0)
    p.add_argument("--imgsz", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bn", action=argparse.BooleanOptionalAction, default=None,
                   help="export BatchNormalization nodes unfused [the model's default]")
    a = p.parse_args()
    kw: dict[str, object] = {"width": a.width, "depth": a.depth, "seed": a.seed}
    if a.imgsz:
        kw["imgsz"] = a.imgsz
    if a.bn is not None:
        kw["bn"] = a.bn
    onnx.save_model(MODELS[a.model](**kw), a.out)  # type: ignore[operator]


if __name__ == "__main__":
    main()
