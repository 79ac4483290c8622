"""Single-device inference: a darknet model with folded parameters, run layer by layer.

``Network`` holds the layer specs and each conv layer's folded (weights, bias); it knows nothing
about how kernels work inside. Kernels are ``nogil`` and single-threaded per call; a network
given an executor splits each conv's output channels across it (each thread writes its own
channel slice, so the result is bit-identical to the single-threaded run).

The layers form a DAG (routes and shortcuts read earlier outputs): the forward pass keeps a
layer's output only while a later layer in the range still reads it. A model's *outputs* are its
``[yolo]`` heads' outputs in layer order (YOLOv3/v4), else its last layer's (YOLOv2); an ONNX
model's are its graph outputs in the graph's order (see :mod:`stealer.onnx_import`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence, cast

import numpy as np

import kernels

from .darknet import ConvParams, ModelSpec, parse_cfg, parse_cfg_text, random_weights, read_weights
from .errors import ShapeError
from .layers import (ConnectedSpec, ConvSpec, CostSpec, CropSpec, DropoutSpec, LayerSpec, MaxPoolSpec, PadConvSpec,
                     RegionSpec, ReorgSpec, RouteSpec, Shape, ShortcutSpec, SliceSpec, SoftmaxSpec, TensorOpSpec,
                     UpsampleSpec, YoloSpec, layer_sources)

if TYPE_CHECKING:
    from .region import Detection

log = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).with_name("models")
#: Built-in models: YOLOv2 (608) and YOLOv2-tiny (416) in 2017 darknet's semantics; YOLOv3 and
#: YOLOv4 (608), YOLOv3-tiny and YOLOv4-tiny (416) in AlexeyAB darknet's; the classifiers
#: ``alexnet`` (227) and ``vgg-16`` (256, cropped to 224) as 2017 darknet's ``cfg/`` has them.
BUILTIN_MODELS = {name: MODELS_DIR / f"{name}.cfg"
                  for name in ("yolov2", "yolov2-tiny", "yolov3", "yolov3-tiny", "yolov4", "yolov4-tiny",
                               "alexnet", "vgg-16")}


def builtin_cfg(name: str) -> Path:
    """Path of a cfg shipped inside the package (see :data:`BUILTIN_MODELS`)."""
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown built-in model {name!r} (have: {', '.join(BUILTIN_MODELS)})") from None


def resolve_cfg(name_or_path: str | os.PathLike[str]) -> Path:
    """A built-in model name or a cfg path."""
    text = str(name_or_path)
    return BUILTIN_MODELS[text] if text in BUILTIN_MODELS else Path(text)


@dataclass(frozen=True)
class LayerRow:
    """One row of the per-layer FLOP and memory table."""

    index: int
    kind: str
    description: str
    in_shape: tuple[int, ...]  # (C, H, W) maps; an ONNX tensor op's may have any rank
    out_shape: tuple[int, ...]
    gflop: float
    params: int
    out_mb: float


def describe(layer: LayerSpec) -> str:
    if isinstance(layer, ConvSpec):
        act = "" if layer.activation == "linear" else f" {layer.activation}"
        bn = " bn" if layer.batch_normalize else ""
        sy, sx = layer.strides
        stride = f"{sy}" if sy == sx else f"{sy}x{sx}"
        extra = (f" g{layer.groups}" if layer.groups > 1 else "") + (f" d{layer.dilation}" if layer.dilation > 1 else "")
        return f"conv {layer.size}x{layer.size}/{stride} p{layer.pad}{extra} {layer.filters}{bn}{act}"
    if isinstance(layer, MaxPoolSpec):
        return f"max {layer.size}x{layer.size}/{layer.stride} p{layer.pad}"
    if isinstance(layer, RouteSpec):
        part = f" [{layer.group_id}/{layer.groups}]" if layer.groups > 1 else ""
        return "route " + ",".join(str(s) for s in layer.sources) + part
    if isinstance(layer, ShortcutSpec):
        act = "" if layer.activation == "linear" else f" {layer.activation}"
        return "shortcut " + ",".join(str(s) for s in layer.sources) + act
    if isinstance(layer, UpsampleSpec):
        return f"upsample x{layer.stride}" + (f" *{layer.scale:g}" if layer.scale != 1 else "")
    if isinstance(layer, YoloSpec):
        return f"yolo {layer.num}x(4+1+{layer.classes})"
    if isinstance(layer, ReorgSpec):
        return f"reorg /{layer.stride}"
    if isinstance(layer, RegionSpec):
        return f"region {layer.num}x({layer.coords}+1+{layer.classes})"
    if isinstance(layer, ConnectedSpec):
        act = "" if layer.activation == "linear" else f" {layer.activation}"
        return f"connected {layer.outputs}{' bn' if layer.batch_normalize else ''}{act}"
    if isinstance(layer, DropoutSpec):
        return f"dropout {layer.probability:g}"
    if isinstance(layer, CostSpec):
        return "cost (training only)"
    if isinstance(layer, SoftmaxSpec):
        return "softmax" + (f" g{layer.groups}" if layer.groups > 1 else "")
    if isinstance(layer, CropSpec):
        return f"crop {layer.out_shape[1]}x{layer.out_shape[2]}"
    if isinstance(layer, PadConvSpec):
        act = "" if layer.activation == "linear" else f" {layer.activation}"
        sy, sx = layer.strides
        extra = (f" g{layer.groups}" if layer.groups > 1 else "") \
            + (f" d{layer.dilation}" if layer.dilation > 1 else "")
        return f"conv {layer.size}x{layer.size}/{sy}x{sx} p{layer.pad_top},{layer.pad_left}{extra} {layer.filters}{act}"
    if isinstance(layer, SliceSpec):
        return f"slice {layer.source} [{layer.start}:{layer.stop}]"
    if isinstance(layer, TensorOpSpec):
        return f"{layer.op} " + ",".join("c" if s is None else str(s) for s in layer.inputs)
    return layer.kind  # pragma: no cover


def layer_table(spec: ModelSpec) -> list[LayerRow]:
    """Per-layer FLOPs (2 per multiply-accumulate), parameters and float32 output size."""
    rows = []
    for l in spec.layers:
        rows.append(LayerRow(l.index, l.kind, describe(l), l.in_shape, l.out_shape, l.flops / 1e9,
                             l.n_params, 4 * math.prod(l.out_shape) / 1e6))
    return rows


def format_table(rows: Sequence[LayerRow]) -> str:
    def shp(s: tuple[int, ...]) -> str:
        return "x".join(str(v) for v in s)

    lines = [f"{'#':>3} {'layer':<28} {'in':>14} {'out':>14} {'GFLOP':>7} {'params':>10} {'out MB':>7}"]
    for r in rows:
        lines.append(f"{r.index:>3} {r.description:<28} {shp(r.in_shape):>14} {shp(r.out_shape):>14} "
                     f"{r.gflop:>7.3f} {r.params:>10} {r.out_mb:>7.2f}")
    lines.append(f"{'':>3} {'total':<28} {'':>14} {'':>14} {sum(r.gflop for r in rows):>7.3f} "
                 f"{sum(r.params for r in rows):>10} {'':>7}")
    return "\n".join(lines)


class Network:
    """A darknet network ready for inference.

    Parameters
    ----------
    spec : ModelSpec
        Parsed cfg with inferred shapes.
    params : dict
        Raw parameters per conv layer index (batch norm is folded here, once).
    model_hash : str
        Identifies cfg + weights, so that peers with different models refuse to work together.
    partial : bool
        ``params`` may leave weighted layers out (a node that holds only some layers' weights,
        see :mod:`stealer.shard`); running a layer without them raises a clear error.
    consts : dict, optional
        An ONNX model's constant inputs of its tensor ops, by layer index and input position.
    """

    def __init__(self, spec: ModelSpec, params: dict[int, ConvParams], model_hash: str,
                 consts: dict[int, dict[int, np.ndarray]] | None = None, *, partial: bool = False) -> None:
        self.spec = spec
        self.model_hash = model_hash
        self.conv: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        convs: list[ConvSpec | PadConvSpec] = [l for l in spec.layers if isinstance(l, (ConvSpec, PadConvSpec))]
        for conv in convs:
            if partial and conv.index not in params:
                continue
            # batch norm by the rule of the darknet that trained the model (see ConvParams.folded;
            # an ONNX model's is folded at import)
            w, b = params[conv.index].folded(spec.flavour)
            self.conv[conv.index] = (np.ascontiguousarray(w), np.ascontiguousarray(b))
        #: [connected] layers' folded (weights (outputs, inputs), bias), as ``conv`` for conv layers.
        self.fc: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for fc in (l for l in spec.layers if isinstance(l, ConnectedSpec)):
            if partial and fc.index not in params:
                continue
            w, b = params[fc.index].folded(spec.flavour)
            self.fc[fc.index] = (np.ascontiguousarray(w), np.ascontiguousarray(b))
        self.consts = consts or {}
        # Which later layers read each layer's output other than through the chain (routes,
        # shortcuts, ONNX slices and tensor ops), so forward() keeps an output only while a layer
        # in its range needs it.
        self._readers: dict[int, list[int]] = {}
        for layer in spec.layers:
            for s in layer_sources(layer):
                self._readers.setdefault(s, []).append(layer.index)
        #: Indices of the layers whose outputs are the network's outputs (see outputs()).
        self.heads: tuple[int, ...] = spec.outputs or tuple(l.index for l in spec.layers if isinstance(l, YoloSpec)) \
            or (len(spec.layers) - 1,)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_darknet(cls, cfg_path: str | os.PathLike[str], weights_path: str | os.PathLike[str]) -> "Network":
        """Load a darknet cfg and weights file (errors name the file and what is wrong)."""
        spec = parse_cfg(resolve_cfg(cfg_path))
        params = read_weights(weights_path, spec)
        digest = hashlib.sha256()
        digest.update(Path(spec.source).read_bytes())
        with open(weights_path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return cls(spec, params, digest.hexdigest()[:16])

    @classmethod
    def from_onnx(cls, path: str | os.PathLike[str]) -> "Network":
        """Load an ONNX model (see :mod:`stealer.onnx_import`; errors name the file, and the node
        and op type where one is not supported). The hash is the file's bytes'."""
        from .onnx_import import load_onnx

        m = load_onnx(path)
        return cls(m.spec, m.params, m.model_hash, m.consts)

    @classmethod
    def from_random(cls, cfg: str | os.PathLike[str] | ModelSpec, seed: int = 0) -> "Network":
        """A network with deterministic random weights (same as ``stealer weights --seed``)."""
        spec = cfg if isinstance(cfg, ModelSpec) else parse_cfg(resolve_cfg(cfg))
        digest = hashlib.sha256()
        digest.update(Path(spec.source).read_bytes() if Path(spec.source).is_file() else spec.source.encode())
        digest.update(f"random-weights:{seed}".encode())
        return cls(spec, random_weights(spec, seed), digest.hexdigest()[:16])

    @classmethod
    def from_cfg_text(cls, text: str, seed: int = 0) -> "Network":
        """Random-weights network from cfg text (tests build small stacks this way)."""
        spec = parse_cfg_text(text, "<text>")
        digest = hashlib.sha256(text.encode() + f"random-weights:{seed}".encode())
        return cls(spec, random_weights(spec, seed), digest.hexdigest()[:16])

    # ---------------------------------------------------------------- properties
    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        return self.spec.layers

    @property
    def input_shape(self) -> Shape:
        return self.spec.input_shape

    def input_shape_of(self, index: int) -> Shape:
        """Shape of the tensor layer ``index`` consumes (the previous layer's output; an ONNX
        tensor op's may have another rank than 3)."""
        return self.input_shape if index == 0 else cast(Shape, self.layers[index - 1].out_shape)

    def table(self) -> list[LayerRow]:
        return layer_table(self.spec)

    def drop_weights(self, start: int) -> int:
        """Free the parameters of layers ``start`` and later (a node that only runs fused tiles
        does not need the tail's 190 MB of YOLOv2 weights). Returns the bytes released; running
        those layers afterwards raises a clear error."""
        freed = 0
        for table in (self.conv, self.fc):
            for i in [i for i in table if i >= start]:
                w, b = table.pop(i)
                freed += w.nbytes + b.nbytes
        self._dropped_from = min(getattr(self, "_dropped_from", start), start)
        return freed

    def warm_up(self) -> None:
        """Run every kernel variant this network uses once on tiny inputs.

        Numba compiles (or loads from its cache) on first call, holding the GIL meanwhile; a
        node calls this before it joins a cluster, so that no compilation stalls its event loop
        (and its heartbeats) later.
        """
        # keys are ("conv", size, stride, activation, groups, in channels: which kernel path)
        # and ("max", size, stride)
        seen: set[str | tuple[str | int, ...]] = set()
        for layer in self.layers:
            if isinstance(layer, PadConvSpec):
                if ("padconv", layer.activation) not in seen:
                    seen.add(("padconv", layer.activation))
                    kernels.conv2d(np.zeros((2, 4, 4), np.float32), np.zeros((3, 2, 1, 1), np.float32),
                                   np.zeros(3, np.float32), pad_top=1, pad_left=0, activation=layer.activation)
            elif isinstance(layer, ConvSpec):
                c_in = layer.in_shape[0]
                key = ("conv", layer.size, layer.stride, layer.activation, layer.groups, c_in)
                if key not in seen:
                    seen.add(key)
                    # the layer's own channel counts, so the path its shape takes (the direct
                    # paths for depthwise and few-channel layers, else the GEMM) is the one compiled
                    k = layer.size
                    x = np.zeros((c_in, k + 2 * layer.stride, k + 2 * layer.stride), np.float32)
                    co = layer.groups if layer.groups > 1 else 3
                    w = np.zeros((co, c_in // layer.groups, k, k), np.float32)
                    kernels.conv2d(x, w, np.zeros(co, np.float32), stride=layer.stride, pad_top=layer.pad,
                                   pad_left=layer.pad, activation=layer.activation, groups=layer.groups)
            elif isinstance(layer, MaxPoolSpec):
                if ("max", layer.size, layer.stride) not in seen:
                    seen.add(("max", layer.size, layer.stride))
                    kernels.maxpool2d(np.zeros((2, 4, 4), np.float32), size=layer.size, stride=layer.stride,
                                      pad_top=layer.pad, pad_left=layer.pad)
            elif isinstance(layer, ReorgSpec):
                s = layer.stride
                kernels.reorg(np.zeros((s * s, 2 * s, 2 * s), np.float32), s)
            elif isinstance(layer, RegionSpec):
                kernels.region_activate(np.zeros(layer.in_shape, np.float32), num=layer.num, coords=layer.coords,
                                        classes=layer.classes, softmax=layer.softmax)
            elif isinstance(layer, UpsampleSpec) and "up" not in seen:
                seen.add("up")
                kernels.upsample2d(np.zeros((1, 2, 2), np.float32), layer.stride, layer.scale)
            elif isinstance(layer, ShortcutSpec) and ("shortcut", layer.activation) not in seen:
                seen.add(("shortcut", layer.activation))
                kernels.shortcut(np.zeros((1, 2, 2), np.float32), [np.zeros((1, 2, 2), np.float32)], layer.activation)
            elif isinstance(layer, ConnectedSpec) and ("fc", layer.activation) not in seen:
                seen.add(("fc", layer.activation))
                kernels.connected(np.zeros(2, np.float32), np.zeros((9, 2), np.float32), np.zeros(9, np.float32),
                                  activation=layer.activation)
            elif isinstance(layer, SoftmaxSpec) and "softmax" not in seen:
                seen.add("softmax")
                kernels.softmax(np.zeros(2, np.float32))
            if isinstance(layer, (ConvSpec, ConnectedSpec)) and ("act", layer.activation) not in seen:
                # a coded shard's gather applies the activation after its layer (stealer.shard)
                seen.add(("act", layer.activation))
                kernels.activate(np.zeros(8, np.float32), layer.activation)
            if isinstance(layer, YoloSpec) and "yolo" not in seen:
                seen.add("yolo")
                kernels.yolo_activate(np.zeros((layer.num * (5 + layer.classes), 2, 2), np.float32), num=layer.num,
                                      classes=layer.classes, scale_x_y=layer.scale_x_y, new_coords=layer.new_coords)

    # ---------------------------------------------------------------- inference
    def check_input(self, x: np.ndarray, start: int = 0) -> np.ndarray:
        """Validate a (C,H,W) float32 input for layer ``start`` (of any shape for an ONNX tensor
        op's); returns it C-contiguous."""
        expected = self.input_shape_of(start)
        if not isinstance(x, np.ndarray):
            raise ShapeError(f"input to layer {start} must be a numpy array, got {type(x).__name__}")
        if x.dtype != np.float32:
            raise ShapeError(f"input to layer {start} must be float32, got {x.dtype}")
        if tuple(x.shape) != tuple(expected):
            raise ShapeError(f"input to layer {start} must have shape (C,H,W)={expected}, got {tuple(x.shape)}")
        return np.ascontiguousarray(x)

    def forward(self, x: np.ndarray, start: int = 0, stop: int | None = None, *,
                executor: Executor | None = None, threads: int = 1) -> np.ndarray:
        """Run layers ``start .. stop-1`` on ``x`` (the output of layer ``start-1``).

        Parameters
        ----------
        x : ndarray
            float32 (C, H, W), the input of layer ``start``.
        start, stop : int
            Layer range; ``stop`` defaults to the number of layers. Routes and shortcuts in the
            range may read layer ``start - 1`` (that is ``x``) and layers inside the range.
        executor, threads : optional
            Split each conv's output channels over ``threads`` workers of ``executor``.

        Returns
        -------
        ndarray
            float32 (C, H, W) output of layer ``stop - 1`` (see :meth:`outputs` for all heads).
        """
        return self._run(x, start, stop, executor, threads, False)[0]

    def outputs(self, x: np.ndarray, start: int = 0, *, executor: Executor | None = None,
                threads: int = 1) -> list[np.ndarray]:
        """The network's outputs from layer ``start`` on: every ``[yolo]`` head's output in layer
        order (YOLOv3/v4), else the last layer's (a list of one)."""
        if start > min(self.heads):
            raise ValueError(f"start={start} is past output layer {min(self.heads)}")
        return self._run(x, start, None, executor, threads, True)[1]

    def outputs_of(self, x: np.ndarray, layers: Sequence[int], start: int = 0, *,
                   executor: Executor | None = None, threads: int = 1) -> list[np.ndarray]:
        """The outputs of ``layers`` (indices in increasing order, each >= ``start``), computed in
        one forward pass from layer ``start`` to the last of them (so a graph with several heads
        runs its shared backbone once)."""
        want = list(layers)
        if not want or want != sorted(set(want)) or want[0] < start:
            raise ValueError(f"layers must be increasing indices >= start={start}, got {want}")
        at = self._run(x, start, want[-1] + 1, executor, threads, False, collect_at=set(want))[2]
        return [at[i] for i in want]

    def outputs_from(self, maps: Mapping[int, np.ndarray], start: int, *, executor: Executor | None = None,
                     threads: int = 1) -> list[np.ndarray]:
        """The network's outputs from layer ``start`` on, given the outputs ``maps`` (layer index ->
        map) of earlier layers that the rest reads: a fused DAG block's outputs (see
        :func:`stealer.ftp.plan.block_outputs`). With ``start`` past every layer, the outputs are
        taken from ``maps`` alone."""
        missing = [h for h in self.heads if h < start and h not in maps]
        if missing:
            raise ValueError(f"the outputs of layers {missing} are not among the maps given")
        if start >= len(self.layers):
            return [maps[h] for h in self.heads]
        # maps off the wire are read-only views, another array type to Numba: its kernels would
        # compile (and cache) a second variant for them, seconds to tens of seconds at a node's
        # first tail in a cold process; one copy of the block's outputs is cheap against the tail
        maps = {k: v if v.flags.writeable else v.copy() for k, v in maps.items()}
        rest = iter(self._run(maps.get(start - 1), start, None, executor, threads, True, given=maps)[1])
        # in the heads' order (an ONNX model's graph outputs need not be in layer order)
        return [maps[h] if h < start else next(rest) for h in self.heads]

    def maps(self, x: np.ndarray, layers: Sequence[int]) -> dict[int, np.ndarray]:
        """The outputs of ``layers`` (indices) of a whole forward pass of ``x`` (tests compare
        fused blocks with them)."""
        want = set(layers)
        if not want:
            return {}
        return self._run(x, 0, max(want) + 1, None, 1, False, collect_at=want)[2]

    def _run(self, x: np.ndarray | None, start: int, stop: int | None, executor: Executor | None, threads: int,
             collect: bool, *, given: Mapping[int, np.ndarray] | None = None,
             collect_at: set[int] | None = None) -> tuple[np.ndarray, list[np.ndarray], dict[int, np.ndarray]]:
        n = len(self.layers)
        stop = n if stop is None else stop
        if not 0 <= start < stop <= n:
            raise ValueError(f"need 0 <= start < stop <= {n}, got start={start} stop={stop}")
        if x is not None or given is None:
            x = self.check_input(x, start)  # type: ignore[arg-type]
        # keep[i]: the last layer in this range that reads output i other than as its input
        keep = {i: max(j for j in js if j < stop) for i, js in self._readers.items()
                if (i >= start - 1 or (given is not None and i in given)) and any(i < j < stop for j in js)}
        kept: dict[int, np.ndarray] = {start - 1: x} if start - 1 in keep and x is not None else {}
        for i, m in (given or {}).items():
            if i in keep and i < start:
                if tuple(m.shape) != tuple(self.layers[i].out_shape) or m.dtype != np.float32:
                    raise ShapeError(f"the map of layer {i} must be float32 {self.layers[i].out_shape}, "
                                     f"got {m.dtype} {tuple(m.shape)}")
                kept[i] = m
        heads: dict[int, np.ndarray] = {}
        at: dict[int, np.ndarray] = {}
        for i in range(start, stop):
            layer = self.layers[i]
            sources = layer_sources(layer)
            if sources:
                missing = [s for s in sources if s not in kept]
                if missing:
                    verb = "routes from" if isinstance(layer, RouteSpec) else "adds" \
                        if isinstance(layer, ShortcutSpec) else "reads"
                    raise ValueError(f"layer {i} {verb} layer(s) {missing}, before start={start}")
                if isinstance(layer, RouteSpec):
                    # a route of one source is a channel slice of it: a view (no layer writes
                    # into its input) unless it leaves this call, which must not alias x
                    view = (len(layer.sources) == 1 and i < stop - 1 and not (collect and i in self.heads)
                            and not (collect_at is not None and i in collect_at))
                    y = _route([kept[s] for s in layer.sources], layer.groups, layer.group_id, view)
                elif isinstance(layer, ShortcutSpec):
                    if x is None:
                        raise ValueError(f"layer {i} adds to layer {i - 1}, whose map was not given")
                    y = kernels.shortcut(x, [kept[s] for s in layer.sources], layer.activation)
                elif isinstance(layer, SliceSpec):
                    y = kept[layer.source][layer.start:layer.stop].copy()
                else:
                    assert isinstance(layer, TensorOpSpec)
                    y = self._tensor_op(layer, kept)
            elif isinstance(layer, TensorOpSpec):  # only constant inputs: folded at import, but legal
                y = self._tensor_op(layer, kept)
            else:
                if x is None:
                    raise ValueError(f"layer {i} reads layer {i - 1}, whose map was not given")
                y = self.run_layer(i, x, executor=executor, threads=threads)
            if collect and i in self.heads:
                heads[i] = y
            if collect_at is not None and i in collect_at:
                at[i] = y
            if i in keep:
                kept[i] = y
            # forget what no later layer of the range reads, so memory stays at a few activations
            for s in [s for s in kept if keep[s] <= i]:
                del kept[s]
            x = y
        assert x is not None
        return x, [heads[h] for h in self.heads if h in heads], at

    def _tensor_op(self, layer: TensorOpSpec, kept: dict[int, np.ndarray]) -> np.ndarray:
        from .onnx_import import run_tensor_op

        consts = self.consts.get(layer.index, {})
        return run_tensor_op(layer, [consts[p] if s is None else kept[s] for p, s in enumerate(layer.inputs)])

    def run_layer(self, i: int, x: np.ndarray, *, executor: Executor | None = None,
                  threads: int = 1) -> np.ndarray:
        """Run one non-route layer on its full input map."""
        layer = self.layers[i]
        if isinstance(layer, ConvSpec):
            if i not in self.conv:
                raise ValueError(f"layer {i}'s weights were dropped on this node (--max-memory); "
                                 "it runs fused tiles only")
            w, b = self.conv[i]
            co, ho, wo = layer.out_shape
            out = np.empty((co, ho, wo), np.float32)
            # a grouped conv is one call (its groups are the kernel's loop), except a depthwise one,
            # whose channels are independent; others split output channels
            depthwise = layer.groups == layer.in_shape[0] == co
            parts = _split(co, threads if executor is not None and (layer.groups == 1 or depthwise) else 1)
            if len(parts) == 1:
                kernels.conv2d(x, w, b, stride=layer.strides, pad_top=layer.pad, pad_left=layer.pad,
                               out_h=ho, out_w=wo, activation=layer.activation, out=out,
                               dilation=layer.dilation, groups=layer.groups)
            else:
                assert executor is not None
                futures = [executor.submit(kernels.conv2d, x[a:z] if depthwise else x, w[a:z], b[a:z],
                                           stride=layer.strides, pad_top=layer.pad, pad_left=layer.pad, out_h=ho,
                                           out_w=wo, activation=layer.activation, out=out[a:z],
                                           dilation=layer.dilation, groups=z - a if depthwise else 1)
                           for a, z in parts]
                for f in futures:
                    f.result()
            return out
        if isinstance(layer, PadConvSpec):
            w, b = self.conv[i]
            _, ho, wo = layer.out_shape
            return kernels.conv2d(x, w, b, stride=layer.strides, pad_top=layer.pad_top, pad_left=layer.pad_left,
                                  out_h=ho, out_w=wo, activation=layer.activation, dilation=layer.dilation,
                                  groups=layer.groups)
        if isinstance(layer, MaxPoolSpec):
            _, ho, wo = layer.out_shape
            return kernels.maxpool2d(x, size=layer.size, stride=layer.stride, pad_top=layer.pad,
                                     pad_left=layer.pad, out_h=ho, out_w=wo)
        if isinstance(layer, ReorgSpec):
            return kernels.reorg(x, layer.stride)
        if isinstance(layer, RegionSpec):
            return kernels.region_activate(x, num=layer.num, coords=layer.coords,
                                           classes=layer.classes, softmax=layer.softmax)
        if isinstance(layer, UpsampleSpec):
            return kernels.upsample2d(x, layer.stride, layer.scale)
        if isinstance(layer, ConnectedSpec):
            if i not in self.fc:
                raise ValueError(f"layer {i}'s weights were dropped on this node (--max-memory)")
            w, b = self.fc[i]
            return kernels.connected(x, w, b, activation=layer.activation).reshape(layer.out_shape)
        if isinstance(layer, (DropoutSpec, CostSpec)):
            return x  # the identity at inference (darknet's dropout output is its input buffer)
        if isinstance(layer, SoftmaxSpec):
            return kernels.softmax(x, groups=layer.groups, temperature=layer.temperature)
        if isinstance(layer, CropSpec):
            return crop(x, layer)
        if isinstance(layer, YoloSpec):
            return kernels.yolo_activate(x, num=layer.num, classes=layer.classes, scale_x_y=layer.scale_x_y,
                                         new_coords=layer.new_coords)
        raise ValueError(f"layer {i} ({layer.kind}) cannot run on its own")

    def detect(self, outs: Sequence[np.ndarray], *, img_w: int, img_h: int, thresh: float = 0.24,
               nms: float = 0.45) -> list[Detection]:
        """Detections from :meth:`outputs`: the region layer's (YOLOv2) or all yolo heads'
        together (YOLOv3/v4), or an ONNX YOLOv8/YOLO11-style output's (see
        :mod:`stealer.ultralytics`); none for a network without a detection layer."""
        from .region import detect as region_detect
        from .yolo import detect_yolo

        _, net_h, net_w = self.input_shape
        if self.spec.flavour == "onnx":
            from .ultralytics import detect_ultralytics, is_ultralytics_output

            if len(outs) == 1 and is_ultralytics_output(outs[0]):
                return detect_ultralytics(outs[0], img_w=img_w, img_h=img_h, net_w=net_w, net_h=net_h,
                                          thresh=thresh, nms=nms)
            return []
        last = self.layers[-1]
        if isinstance(last, RegionSpec):
            return region_detect(outs[-1], last, img_w=img_w, img_h=img_h, net_w=net_w, net_h=net_h,
                                 thresh=thresh, nms=nms)
        heads = [l for l in self.layers if isinstance(l, YoloSpec)]
        if not heads:
            return []
        # AlexeyAB's test_detector takes nms_kind from the network's last layer
        kind = last.nms_kind if isinstance(last, YoloSpec) else "default"
        return detect_yolo(outs, heads, img_w=img_w, img_h=img_h, net_w=net_w, net_h=net_h, thresh=thresh,
                           nms_thresh=nms, nms_kind=kind)


def output_digest(outs: np.ndarray | Sequence[np.ndarray]) -> str:
    """SHA-256 (hex) of a network's outputs: the bytes of each output in order (for one output,
    the digest of its bytes, as YOLOv2's runs have always reported)."""
    digest = hashlib.sha256()
    for o in [outs] if isinstance(outs, np.ndarray) else outs:
        digest.update(np.ascontiguousarray(o).tobytes())
    return digest.hexdigest()


def crop(x: np.ndarray, layer: CropSpec) -> np.ndarray:
    """2017 ``forward_crop_layer`` at inference: the centred window, ``x*scale + trans`` in float32
    (``x*2`` is exact, so the one rounding is the add's, with or without FMA contraction in C)."""
    _, h, w = layer.out_shape
    window = x[:, layer.top:layer.top + h, layer.left:layer.left + w]
    return window * np.float32(layer.scale) + np.float32(layer.trans)


def _route(parts: Sequence[np.ndarray], groups: int, group_id: int, view: bool = False) -> np.ndarray:
    """Concatenate the channel chunk ``group_id`` of ``groups`` of every part (a copy; with
    ``view`` and one part, the chunk itself: a C-contiguous view, since the parts are CHW)."""
    if groups > 1:
        parts = [p[p.shape[0] // groups * group_id:p.shape[0] // groups * (group_id + 1)] for p in parts]
    if len(parts) == 1:
        return parts[0] if view else parts[0].copy()
    return np.concatenate(parts, axis=0)


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` into ``parts`` contiguous chunks of near-equal size (multiples of 8)."""
    parts = max(1, min(parts, n // 8 or 1))
    if parts == 1:
        return [(0, n)]
    step = -(-n // parts)
    step = -(-step // 8) * 8
    return [(a, min(n, a + step)) for a in range(0, n, step)]
