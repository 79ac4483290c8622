"""Write a darknet network, with stealer's own (folded) weights, as an ONNX graph.

So that onnxruntime can run *the same model with the same weights* as stealer, side by side in
one benchmark run (``bench/models.py``): single-device speed, and the distance between the two
float32 implementations. Nothing here is used by the runtime.

The graph takes a (1, C, H, W) float32 ``input`` and returns every output of
:meth:`Network.outputs` *before* its detection layer's activations: the ``[region]`` or
``[yolo]`` layers' inputs (those layers only apply logistic/softmax per element, and their
decoding is compared elsewhere). ``stop`` cuts the graph after a layer instead.

Semantics, layer by layer (each one the formula stealer's kernels run; the batch norm is
already folded into the conv's weights and bias at load, by the model's own darknet rule):

* conv: ONNX ``Conv`` (groups, dilations, strides, symmetric pads ``pad``), then the
  activation: leaky -> ``LeakyRelu(0.1)``, logistic -> ``Sigmoid``, relu, relu6 -> ``Clip(0,
  6)``, swish -> ``x * Sigmoid(x)``, mish -> ``x * Tanh(Softplus(x))``.
* maxpool: darknet's window starts at ``-pad`` and cells outside the map never win: ONNX
  ``MaxPool`` pads with -inf, so begin pads are ``pad`` and end pads whatever makes the output
  as large as darknet's (YOLOv2-tiny's size-2 stride-1 pool keeps the map size with an end pad
  of 1).
* route: ``Concat`` on channels, each source first cut to its ``group_id`` chunk (``Slice``).
* shortcut: ``Add`` (the models here add maps of equal shape), then the activation.
* upsample: ``Resize`` nearest by the stride, times ``scale`` when it is not 1.
* reorg: darknet 2017's own permutation (not space-to-depth, see :func:`kernels.reorg`):
  ``x.reshape(C/s^2, H, s, W, s).transpose(2, 4, 0, 1, 3).reshape(C*s^2, H/s, W/s)``, with the
  input's H and W; ``tests/test_export_onnx.py`` checks it against the kernel.

Usage: ``python tools/export_onnx.py --cfg yolov2 --random-weights 0 --out yolov2.onnx``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stealer.layers import (ConvSpec, MaxPoolSpec, RegionSpec, ReorgSpec, RouteSpec,  # noqa: E402
                            ShortcutSpec, UpsampleSpec, YoloSpec)
from stealer.network import Network  # noqa: E402

OPSET = 17


def network_to_onnx(net: Network, stop: int | None = None) -> Any:
    """The ONNX ``ModelProto`` of ``net`` (see the module docstring); ``stop``: the last layer
    (exclusive) of the graph, whose output is then the only graph output."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[Any] = []
    inits: list[Any] = []
    counter = iter(range(1 << 30))

    def name(prefix: str) -> str:
        return f"{prefix}_{next(counter)}"

    def const(arr: np.ndarray, prefix: str = "c") -> str:
        n = name(prefix)
        inits.append(numpy_helper.from_array(arr, n))
        return n

    def node(op: str, inputs: list[str], **attrs: Any) -> str:
        out = name(op.lower())
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def activate(x: str, act: str) -> str:
        kind = act.removesuffix("_f32")
        if kind == "linear":
            return x
        if kind == "leaky":
            return node("LeakyRelu", [x], alpha=0.1)
        if kind == "logistic":
            return node("Sigmoid", [x])
        if kind == "relu":
            return node("Relu", [x])
        if kind == "relu6":
            return node("Clip", [x, const(np.array(0, np.float32)), const(np.array(6, np.float32))])
        if kind == "swish":
            return node("Mul", [x, node("Sigmoid", [x])])
        if kind == "mish":
            return node("Mul", [x, node("Tanh", [node("Softplus", [x])])])
        raise ValueError(f"activation {act!r} has no ONNX form here")

    layers = net.layers
    n = len(layers) if stop is None else stop
    heads = [i for i in range(n) if isinstance(layers[i], (RegionSpec, YoloSpec))]
    outputs_of: dict[int, str] = {}
    x = "input"
    for i in range(n):
        layer = layers[i]
        if isinstance(layer, ConvSpec):
            w, b = net.conv[i]
            sy, sx = layer.strides
            x = node("Conv", [x, const(w, "w"), const(b, "b")], kernel_shape=[layer.size, layer.size],
                     strides=[sy, sx], pads=[layer.pad] * 4, dilations=[layer.dilation] * 2, group=layer.groups)
            x = activate(x, layer.activation)
        elif isinstance(layer, MaxPoolSpec):
            _, h, w_ = layer.in_shape
            _, ho, wo = layer.out_shape
            end_h = (ho - 1) * layer.stride + layer.size - h - layer.pad
            end_w = (wo - 1) * layer.stride + layer.size - w_ - layer.pad
            x = node("MaxPool", [x], kernel_shape=[layer.size] * 2, strides=[layer.stride] * 2,
                     pads=[layer.pad, layer.pad, max(0, end_h), max(0, end_w)])
        elif isinstance(layer, RouteSpec):
            parts = []
            for s in layer.sources:
                src = outputs_of[s]
                if layer.groups > 1:
                    c = layers[s].out_shape[0] // layer.groups
                    src = node("Slice", [src, const(np.array([c * layer.group_id], np.int64)),
                                         const(np.array([c * (layer.group_id + 1)], np.int64)),
                                         const(np.array([1], np.int64))])
                parts.append(src)
            x = parts[0] if len(parts) == 1 else node("Concat", parts, axis=1)
        elif isinstance(layer, ShortcutSpec):
            for s in layer.sources:
                if layers[s].out_shape != layer.out_shape:
                    raise ValueError(f"layer {i}: a shortcut of unequal shapes has no plain ONNX Add")
                x = node("Add", [x, outputs_of[s]])
            x = activate(x, layer.activation)
        elif isinstance(layer, UpsampleSpec):
            s = float(layer.stride)
            x = node("Resize", [x, "", const(np.array([1, 1, s, s], np.float32))], mode="nearest",
                     coordinate_transformation_mode="asymmetric", nearest_mode="floor")
            if layer.scale != 1:
                x = node("Mul", [x, const(np.array(layer.scale, np.float32))])
        elif isinstance(layer, ReorgSpec):
            c, h, w_ = layer.in_shape
            s = layer.stride
            x = node("Reshape", [x, const(np.array([1, c // (s * s), h, s, w_, s], np.int64))])
            x = node("Transpose", [x], perm=[0, 3, 5, 1, 2, 4])
            x = node("Reshape", [x, const(np.array([1, c * s * s, h // s, w_ // s], np.int64))])
        elif isinstance(layer, (RegionSpec, YoloSpec)):
            pass  # a head: its input is a graph output (see the docstring)
        else:
            raise ValueError(f"layer {i} ({layer.kind}) has no ONNX form here")
        outputs_of[i] = x
    if stop is not None or not heads:
        out_names = [x]
        out_shapes = [layers[n - 1].out_shape]
    else:
        out_names = [outputs_of[i - 1] if i else "input" for i in heads]
        out_shapes = [layers[i].in_shape for i in heads]
    # graph outputs need their own names: an Identity per output
    final = []
    for k, (o, shp) in enumerate(zip(out_names, out_shapes)):
        nodes.append(helper.make_node("Identity", [o], [f"output{k}"], name=f"output{k}"))
        final.append(helper.make_tensor_value_info(f"output{k}", TensorProto.FLOAT, [1, *shp]))
    graph = helper.make_graph(nodes, "stealer-export", [
        helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, *net.input_shape])], final, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="stealer tools/export_onnx.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def reference_outputs(net: Network, x: np.ndarray, stop: int | None = None) -> list[np.ndarray]:
    """What the exported graph computes, by stealer: the heads' inputs (or layer ``stop - 1``'s
    output), in the graph's output order."""
    if stop is not None:
        return [net.forward(x, 0, stop)]
    heads = [l.index for l in net.layers if isinstance(l, (RegionSpec, YoloSpec))]
    if not heads:
        return [net.forward(x)]
    # one pass for all heads (a forward per head would run the shared backbone once per head);
    # a head at layer 0 reads the input itself
    inputs = [h - 1 for h in heads if h > 0]
    got = iter(net.outputs_of(x, inputs) if inputs else [])
    return [next(got) if h > 0 else x for h in heads]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cfg", default="yolov2", help="built-in model name or cfg path")
    p.add_argument("--weights", help="darknet weights file (else --random-weights)")
    p.add_argument("--random-weights", type=int, default=0, metavar="SEED")
    p.add_argument("--stop", type=int, help="cut the graph after this many layers")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    net = (Network.from_darknet(args.cfg, args.weights) if args.weights
           else Network.from_random(args.cfg, args.random_weights))
    import onnx

    onnx.save(network_to_onnx(net, args.stop), str(args.out))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
