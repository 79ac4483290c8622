"""ONNX import: an ONNX graph (a PyTorch/Ultralytics export of a CNN) as stealer's layer list.

:func:`load_onnx` parses the file with the ``onnx`` package and maps the graph onto a
:class:`~stealer.darknet.ModelSpec`: a topologically sorted list in which each layer reads the
previous layer's output unless it names its sources, the same list the darknet parser produces,
so that the tile planner and the runtime see one kind of model.

How each operator maps (tensors of the spatial part are (1, C, H, W); the batch must be 1):

* ``Conv`` (square kernel; groups, dilation, strides; ``auto_pad``): a :class:`ConvSpec` when the
  four pads are equal, else a :class:`PadConvSpec` (top and left padding apart; the bottom and
  right ones follow from the output size). A ``BatchNormalization`` that alone reads a conv's
  output is folded into it at load (in float64, rounded once). A following activation that alone
  reads the conv's output is fused: ``Relu`` -> relu, ``LeakyRelu(alpha=0.1)`` -> leaky,
  ``Clip(0, 6)`` -> relu6, ``Sigmoid`` -> logistic_f32, ``HardSwish`` -> hardswish, and SiLU
  (``Mul(x, Sigmoid(x))``, either order) -> swish_f32. These are the kernels' float32 formulas,
  equal to onnxruntime's up to rounding (its Sigmoid is a polynomial approximation; leaky here
  multiplies by a double 0.1 as darknet does, onnxruntime by 0.1f).
* ``MaxPool`` (square, one stride, equal top/left pads, floor mode): a :class:`MaxPoolSpec` with
  ``pad`` = the top pad. ONNX pads a max pool with -inf, i.e. pixels outside the map never win,
  which is exactly MaxPoolSpec's "skipped"; the output size is ONNX's ``(H + pt + pb - k) // s + 1``.
* ``Resize``/``Upsample``, mode nearest, the same integer scale on H and W, a coordinate rule
  under which output pixel ``y`` reads input ``y // s`` (asymmetric + floor; half_pixel or
  pytorch_half_pixel with either round_prefer rule; see :func:`_resize_stride`): an
  :class:`UpsampleSpec` with scale 1.
* ``Concat`` on the channels of maps: a :class:`RouteSpec`. ``Split`` on channels: a RouteSpec
  with ``groups``/``group_id`` per output for equal parts, a :class:`SliceSpec` per output
  otherwise; ``Slice`` on channels with step 1: a SliceSpec.
* ``Add`` of two maps of one shape: a :class:`ShortcutSpec` (one addend is the previous layer),
  with a following ``Relu`` fused.
* Everything else (and the above where the conditions do not hold, e.g. Concat along another
  axis): a :class:`TensorOpSpec`, computed with numpy by :func:`run_tensor_op`. See
  :data:`TENSOR_OPS`.
* ``Identity`` and ``Dropout`` (inference) are aliases; ``Constant``, initializers and every node
  whose inputs are all constants (``Shape`` of a static tensor, ``Gather``, ``Concat``,
  ``Unsqueeze``, ``Cast``...) are evaluated at load.

A layer that reads a tensor other than the previous layer's output and has no ``sources`` (a
conv, pool or upsample) gets a one-source RouteSpec copy in front of it; the layer order is
chosen greedily to need few of them.

Anything else raises :class:`~stealer.errors.ModelError` naming the node and its op type.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .darknet import ConvParams, ModelSpec, NetInfo
from .errors import ModelError
from .layers import (ConvSpec, LayerSpec, MaxPoolSpec, PadConvSpec, RouteSpec, Shape, ShortcutSpec, SliceSpec,
                     TensorOpSpec, UpsampleSpec)

log = logging.getLogger(__name__)

#: An .onnx file bigger than this is refused before it is read (protobuf's own limit is 2 GiB;
#: the largest CNN a Pi-class device runs is well under 300 MB).
MAX_ONNX_BYTES = 1 << 30
#: Elements of a tensor a constant subgraph may produce at load (a ConstantOfShape or Expand
#: asking for more is a broken or hostile file, not a model).
MAX_CONST_ELEMENTS = 1 << 26
#: Elements of any activation tensor (1 GiB of float32): shapes come from the file, and the
#: importer allocates zeros of them to infer the next shapes, so a hostile file must not be able
#: to ask for more than a model can use.
MAX_TENSOR_ELEMENTS = 1 << 28
FLAVOUR_ONNX = "onnx"

f32 = np.float32


class _Unsupported(ModelError):
    """An operator or attribute value the importer does not cover (the message names the node)."""


# ------------------------------------------------------------------------------------------------
# numpy implementations (constant folding, shape inference and TensorOpSpec execution)
# ------------------------------------------------------------------------------------------------

def _f32(a: np.ndarray) -> np.ndarray:
    """Floating-point constants as float32 (what the graph computes in); others unchanged."""
    return a.astype(np.float32, copy=False) if np.issubdtype(a.dtype, np.floating) else a


def _binary(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Callable[..., np.ndarray]:
    def run(attrs: dict[str, Any], a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if a.dtype != b.dtype:
            raise ModelError(f"operands of types {a.dtype} and {b.dtype}")
        return np.asarray(fn(a, b)).astype(a.dtype, copy=False)
    return run


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if np.issubdtype(a.dtype, np.integer):
        return np.trunc(np.true_divide(a, b)).astype(a.dtype)  # C's integer division, as ONNX's
    return np.true_divide(a, b)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    one = f32(1)
    with np.errstate(over="ignore"):
        return one / (one + np.exp(-x))


def _softmax(attrs: dict[str, Any], x: np.ndarray) -> np.ndarray:
    axis = attrs.get("axis", -1 if attrs["_opset"] >= 13 else 1)
    if attrs["_opset"] < 13:  # the 2-D semantics of opsets 1-12: flatten from ``axis`` on
        shape = x.shape
        axis = axis % x.ndim
        x2 = x.reshape(math.prod(shape[:axis]), -1)
        e = np.exp(x2 - x2.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).reshape(shape)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _reshape(attrs: dict[str, Any], x: np.ndarray) -> np.ndarray:
    shape = list(attrs["shape"])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
    return x.reshape(shape)


def _slice(attrs: dict[str, Any], x: np.ndarray) -> np.ndarray:
    starts, ends = attrs["starts"], attrs["ends"]
    axes = attrs.get("axes") or tuple(range(len(starts)))
    steps = attrs.get("steps") or (1,) * len(starts)
    idx: list[slice] = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st == 0:
            raise ModelError("Slice step 0")
        dim = x.shape[a]
        # Python slicing clamps as ONNX does, except an end before the start of a reversed slice
        end = None if st < 0 and e < -dim else e
        idx[a] = slice(s, end, st)
    return x[tuple(idx)]


def _split_sizes(attrs: dict[str, Any], x: np.ndarray) -> list[int]:
    axis = attrs.get("axis", 0)
    dim = x.shape[axis]
    sizes = attrs.get("split")
    if sizes:
        if sum(sizes) != dim:
            raise ModelError(f"Split sizes {list(sizes)} do not add up to the axis' {dim}")
        return list(sizes)
    n = attrs["_outputs"]
    chunk = -(-dim // n)  # opset 18's num_outputs rule: equal parts, the last one smaller
    return [min(chunk, dim - i * chunk) for i in range(n)]


def _split(attrs: dict[str, Any], x: np.ndarray) -> list[np.ndarray]:
    cuts = np.cumsum(_split_sizes(attrs, x))[:-1]
    return np.split(x, cuts, axis=attrs.get("axis", 0))


def _gemm(attrs: dict[str, Any], a: np.ndarray, b: np.ndarray, c: np.ndarray | None = None) -> np.ndarray:
    a = a.T if attrs.get("transA", 0) else a
    b = b.T if attrs.get("transB", 0) else b
    y = np.matmul(a, b)
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if alpha != 1.0:
        y = y * f32(alpha)
    if c is not None:
        y = y + (c if beta == 1.0 else c * f32(beta))
    return y


def _flatten(attrs: dict[str, Any], x: np.ndarray) -> np.ndarray:
    axis = attrs.get("axis", 1) % (x.ndim + 1) if x.ndim else 0
    return x.reshape(math.prod(x.shape[:axis]), -1)


def _pool_windows(x: np.ndarray, attrs: dict[str, Any], fill: float) -> tuple[list[np.ndarray], np.ndarray]:
    """Every kernel tap of an ONNX 2-D pool as a strided view of the padded input, and a mask
    per tap of the positions inside the map (for count_include_pad=0)."""
    kh, kw = attrs["kernel_shape"]
    sh, sw = attrs.get("strides") or (1, 1)
    pt, pl, pb, pr = attrs.get("pads") or (0, 0, 0, 0)
    n, c, h, w = x.shape
    oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    xp = np.full((n, c, h + pt + pb, w + pl + pr), fill, x.dtype)
    xp[:, :, pt:pt + h, pl:pl + w] = x
    inside = np.zeros((h + pt + pb, w + pl + pr), np.float32)
    inside[pt:pt + h, pl:pl + w] = 1
    taps, masks = [], []
    for ky in range(kh):
        for kx in range(kw):
            taps.append(xp[:, :, ky:ky + sh * (oh - 1) + 1:sh, kx:kx + sw * (ow - 1) + 1:sw])
            masks.append(inside[ky:ky + sh * (oh - 1) + 1:sh, kx:kx + sw * (ow - 1) + 1:sw])
    return taps, np.sum(masks, axis=0)


def _check_pool(attrs: dict[str, Any]) -> None:
    if attrs.get("ceil_mode", 0):
        raise _Unsupported("ceil_mode=1")
    if any(d != 1 for d in attrs.get("dilations") or ()):
        raise _Unsupported(f"dilations={list(attrs['dilations'])}")
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise _Unsupported(f"auto_pad={attrs['auto_pad']}")
    if len(attrs["kernel_shape"]) != 2:
        raise _Unsupported(f"a {len(attrs['kernel_shape'])}-D pool")
    _positive("kernel_shape", attrs["kernel_shape"])
    _positive("strides", attrs.get("strides") or (1,))
    if any(p < 0 for p in attrs.get("pads") or ()):
        raise ModelError(f"pads={list(attrs['pads'])} must not be negative")


def _avgpool(attrs: dict[str, Any], x: np.ndarray) -> np.ndarray:
    _check_pool(attrs)
    taps, count = _pool_windows(x, attrs, 0.0)
    total = taps[0].copy()
    for t in taps[1:]:
        total += t  # float32, tap by tap in row-major kernel order
    div = f32(len(taps)) if attrs.get("count_include_pad", 0) else count.astype(np.float32)
    return total / div


def _maxpool(attrs: dict[str, Any], x: np.ndarray) -> np.ndarray:
    _check_pool(attrs)
    taps, _ = _pool_windows(x, attrs, -np.inf)
    out = taps[0].copy()
    for t in taps[1:]:
        np.maximum(out, t, out=out)
    return out


def _batchnorm(attrs: dict[str, Any], x: np.ndarray, scale: np.ndarray, b: np.ndarray, mean: np.ndarray,
               var: np.ndarray) -> np.ndarray:
    k, c = _bn_affine(scale, b, mean, var, attrs.get("epsilon", 1e-5))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return x * k.reshape(shape) + c.reshape(shape)


def _bn_affine(scale: np.ndarray, b: np.ndarray, mean: np.ndarray, var: np.ndarray,
               eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Batch norm as ``x * k + c``: ``k = scale / sqrt(var + eps)``, ``c = b - mean * k``, in
    float64, rounded once to float32."""
    k = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + float(eps))
    return k.astype(np.float32), (b.astype(np.float64) - mean.astype(np.float64) * k).astype(np.float32)


def _clip(attrs: dict[str, Any], x: np.ndarray) -> np.ndarray:
    lo, hi = attrs.get("min"), attrs.get("max")
    y = x
    if lo is not None:
        y = np.maximum(y, np.asarray(lo, x.dtype))
    if hi is not None:
        y = np.minimum(y, np.asarray(hi, x.dtype))
    return y


def _hardsigmoid(x: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    return np.minimum(np.maximum(x * f32(alpha) + f32(beta), f32(0)), f32(1))


def _squeeze(attrs: dict[str, Any], x: np.ndarray) -> np.ndarray:
    axes = attrs.get("axes")
    return np.squeeze(x, axis=tuple(axes)) if axes else np.squeeze(x)


def _unsqueeze(attrs: dict[str, Any], x: np.ndarray) -> np.ndarray:
    axes = sorted(a % (x.ndim + len(attrs["axes"])) for a in attrs["axes"])
    for a in axes:
        x = np.expand_dims(x, a)
    return x


def _cast(attrs: dict[str, Any], x: np.ndarray) -> np.ndarray:
    from onnx import helper

    return x.astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))


def _constant_of_shape(attrs: dict[str, Any], shape: np.ndarray) -> np.ndarray:
    dims = [int(v) for v in shape]
    if math.prod(dims) > MAX_CONST_ELEMENTS or any(d < 0 for d in dims):
        raise ModelError(f"ConstantOfShape of shape {dims}")
    value = attrs.get("value")
    value = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    return np.full(dims, value[0], value.dtype)


def _expand(attrs: dict[str, Any], x: np.ndarray) -> np.ndarray:
    shape = np.broadcast_shapes(x.shape, tuple(int(v) for v in attrs["shape"]))
    if math.prod(shape) > MAX_CONST_ELEMENTS:
        raise ModelError(f"Expand to shape {list(shape)}")
    return np.broadcast_to(x, shape).copy()


def _range(attrs: dict[str, Any], start: np.ndarray, limit: np.ndarray, delta: np.ndarray) -> np.ndarray:
    n = max(int(math.ceil((float(limit) - float(start)) / float(delta))), 0)
    if n > MAX_CONST_ELEMENTS:
        raise ModelError(f"Range of {n} elements")
    return (start + np.arange(n, dtype=start.dtype) * delta).astype(start.dtype)


def _gather(attrs: dict[str, Any], x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.take(x, idx.astype(np.int64), axis=attrs.get("axis", 0))


def _shape(attrs: dict[str, Any], x: np.ndarray) -> np.ndarray:
    return np.array(x.shape[attrs.get("start", 0):attrs.get("end", None)], np.int64)


def _reduce_mean(attrs: dict[str, Any], x: np.ndarray) -> np.ndarray:
    axes = attrs.get("axes")
    if not axes and attrs.get("noop_with_empty_axes", 0):
        return x
    axes = tuple(range(x.ndim)) if not axes else tuple(axes)
    return x.mean(axis=axes, keepdims=bool(attrs.get("keepdims", 1)), dtype=np.float32)


def _one(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[..., np.ndarray]:
    return lambda attrs, x: fn(x)


#: The operators :func:`run_tensor_op` computes with numpy, each with ONNX's semantics for float32
#: (the elementwise ones with numpy broadcasting, which is ONNX's multidirectional broadcasting).
TENSOR_OPS: dict[str, Callable[..., np.ndarray | list[np.ndarray]]] = {
    "Add": _binary(np.add), "Sub": _binary(np.subtract), "Mul": _binary(np.multiply), "Div": _binary(_div),
    "Relu": _one(lambda x: np.maximum(x, x.dtype.type(0))),
    "LeakyRelu": lambda a, x: np.where(x > 0, x, x * f32(a.get("alpha", 0.01))),
    "Sigmoid": _one(_sigmoid),
    "HardSigmoid": lambda a, x: _hardsigmoid(x, a.get("alpha", 0.2), a.get("beta", 0.5)),
    "HardSwish": _one(lambda x: x * _hardsigmoid(x, 1.0 / 6.0, 0.5)),
    "Clip": _clip,
    "Softmax": _softmax, "Reshape": _reshape, "Flatten": _flatten,
    "Transpose": lambda a, x: np.transpose(x, a.get("perm") or None),
    "MatMul": lambda a, x, y: np.matmul(x, y), "Gemm": _gemm,
    "Concat": lambda a, *xs: np.concatenate(xs, axis=a["axis"]),
    "Split": _split, "Slice": _slice,
    "GlobalAveragePool": _one(lambda x: x.mean(axis=tuple(range(2, x.ndim)), keepdims=True, dtype=np.float32)),
    "AveragePool": _avgpool, "MaxPool": _maxpool, "BatchNormalization": _batchnorm, "ReduceMean": _reduce_mean,
    "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "Cast": _cast, "Gather": _gather, "Shape": _shape,
    "ConstantOfShape": _constant_of_shape, "Expand": _expand, "Range": _range,
}

#: Inputs of an op that are parameters, not data: they must be constants and become attributes.
PARAM_INPUTS: dict[str, dict[int, str]] = {
    "Reshape": {1: "shape"}, "Slice": {1: "starts", 2: "ends", 3: "axes", 4: "steps"}, "Split": {1: "split"},
    "Clip": {1: "min", 2: "max"}, "Squeeze": {1: "axes"}, "Unsqueeze": {1: "axes"}, "Expand": {1: "shape"},
    "Resize": {1: "roi", 2: "scales", 3: "sizes"}, "Upsample": {1: "scales"}, "ReduceMean": {1: "axes"},
}
#: Ops that need an attribute the runtime must not guess (the rest have ONNX defaults).
_REQUIRED = {"Concat": "axis", "Cast": "to", "Reshape": "shape", "Unsqueeze": "axes", "MaxPool": "kernel_shape",
             "AveragePool": "kernel_shape", "Slice": "starts"}
#: Spatial ops with their own layer types (never numpy at run time).
_SPATIAL = ("Conv", "Resize", "Upsample")
_ALIASES = ("Identity", "Dropout")
SUPPORTED_OPS = tuple(sorted(set(TENSOR_OPS) | set(_SPATIAL) | set(_ALIASES) | {"Constant"}))


def run_tensor_op(spec: TensorOpSpec, args: Sequence[np.ndarray]) -> np.ndarray:
    """Run a :class:`TensorOpSpec` on its inputs (layer outputs without the batch dimension, and
    constants in their ONNX shape); returns the output without the batch dimension, float32
    C-contiguous."""
    attrs = dict(spec.attrs)
    data = [a if i is None else a[None] for a, i in zip(args, spec.inputs)]
    with np.errstate(all="ignore"):  # inf and nan propagate, as in onnxruntime
        out = TENSOR_OPS[spec.op](attrs, *data)
    if isinstance(out, list):
        out = out[attrs["_output"]]
    return np.ascontiguousarray(out[0], dtype=np.float32)


# ------------------------------------------------------------------------------------------------
# the graph
# ------------------------------------------------------------------------------------------------

@dataclass
class _Node:
    """One ONNX node that computes on activations (constant nodes are folded away)."""

    name: str
    op: str
    data: list[str]  # data inputs ("" = absent optional input)
    outputs: list[str]
    attrs: dict[str, Any]
    pos: int
    act: str = "linear"  # an activation fused into a Conv or an Add
    conv: ConvParams | None = None
    dead: bool = field(default=False)

    def where(self) -> str:
        return f"node {self.name!r} ({self.op})"


def _attr_value(a: Any) -> Any:
    from onnx import helper, numpy_helper

    v = helper.get_attribute_value(a)
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, list):
        return tuple(x.decode("utf-8", "replace") if isinstance(x, bytes) else x for x in v)
    if hasattr(v, "dims") and hasattr(v, "data_type"):  # a TensorProto
        return numpy_helper.to_array(v)
    return v


def _text(v: str | bytes) -> str:
    """A protobuf string field (bytes when the file's are not valid UTF-8)."""
    return v if isinstance(v, str) else v.decode("utf-8", "replace")


def _positive(key: str, values: Sequence[int]) -> None:
    if any(int(v) < 1 for v in values):
        raise ModelError(f"{key}={list(values)} must be at least 1")


def _param_value(v: np.ndarray) -> Any:
    """A constant parameter input as an attribute: a tuple of Python numbers, or one number."""
    flat = v.reshape(-1).tolist()
    return flat[0] if v.ndim == 0 else tuple(flat)


@dataclass
class _Graph:
    path: str
    consts: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, ...]]  # activation tensors, full ONNX shape (batch included)
    input_name: str
    outputs: list[str]
    nodes: list[_Node]
    opset: int


def _read_model(path: str | os.PathLike[str]) -> tuple[Any, bytes]:
    import onnx

    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise ModelError(f"{p}: cannot read the ONNX file: {exc.strerror or exc}") from None
    if size > MAX_ONNX_BYTES:
        raise ModelError(f"{p}: {size} bytes is more than the {MAX_ONNX_BYTES}-byte limit of an ONNX model")
    data = p.read_bytes()
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf's DecodeError and friends: the bytes are not a model
        raise ModelError(f"{p}: not a valid ONNX file (truncated or not ONNX?): {exc}") from None
    if not model.HasField("graph") or not model.graph.node:
        raise ModelError(f"{p}: the ONNX file holds no graph (truncated or not ONNX?)")
    if any(t.data_location == 1 for t in model.graph.initializer):  # TensorProto.EXTERNAL
        raise ModelError(f"{p}: the model keeps its weights in external data files; save it as one .onnx "
                         "file (onnx.save_model(model, path, save_as_external_data=False))")
    return model, data


def _parse_graph(model: Any, path: str) -> _Graph:
    from onnx import numpy_helper

    g = model.graph
    opset = max([o.version for o in model.opset_import if o.domain in ("", "ai.onnx")], default=0)
    if opset < 7:
        raise ModelError(f"{path}: ONNX opset {opset} is too old (need 7 or newer)")
    consts: dict[str, np.ndarray] = {}
    for t in g.initializer:
        try:
            consts[t.name] = numpy_helper.to_array(t)
        except Exception as exc:  # a malformed tensor (e.g. raw data of the wrong length)
            raise ModelError(f"{path}: initializer {t.name!r} is malformed: {exc}") from None
    inputs = [i for i in g.input if i.name not in consts]
    if len(inputs) != 1:
        raise ModelError(f"{path}: the graph has {len(inputs)} inputs {[i.name for i in inputs]}; "
                         "stealer runs models with one image input")
    inp = inputs[0]
    tt = inp.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    if len(dims) != 4 or any(d is None or d < 1 for d in dims):
        raise ModelError(f"{path}: input {inp.name!r} has shape {dims}; stealer needs a static (1, C, H, W) "
                         "input (export with fixed image size and batch 1, e.g. dynamic=False)")
    if dims[0] != 1:
        raise ModelError(f"{path}: input {inp.name!r} has batch {dims[0]}; stealer runs batch 1")
    if tt.elem_type != 1:  # TensorProto.FLOAT
        raise ModelError(f"{path}: input {inp.name!r} is not float32 (element type {tt.elem_type})")
    shapes: dict[str, tuple[int, ...]] = {inp.name: tuple(int(d) for d in dims if d is not None)}
    if math.prod(shapes[inp.name]) > MAX_TENSOR_ELEMENTS:
        raise ModelError(f"{path}: input {inp.name!r} of shape {dims} is larger than {MAX_TENSOR_ELEMENTS} elements")
    alias: dict[str, str] = {}
    nodes: list[_Node] = []
    for pos, n in enumerate(g.node):
        name = n.name or f"#{pos}"
        where = f"node {name!r} ({n.op_type})"
        if n.domain not in ("", "ai.onnx"):
            raise _Unsupported(f"{path}: {where} is from operator domain {n.domain!r}; "
                               "only standard ONNX operators are supported")
        attrs = {_text(a.name): _attr_value(a) for a in n.attribute}
        ins = [alias.get(i, i) for i in n.input]
        for i in ins:
            if i and i not in consts and i not in shapes:
                raise ModelError(f"{path}: {where} reads {i!r}, which no earlier node, initializer or graph "
                                 "input defines (a missing initializer, or nodes out of order?)")
        op = n.op_type
        if op == "Constant":
            consts[n.output[0]] = _constant_value(attrs, f"{path}: {where}")
            continue
        if op in _ALIASES:
            alias[n.output[0]] = ins[0]
            for extra in n.output[1:]:  # Dropout's mask output
                if extra:
                    consts[extra] = np.ones(1, np.bool_)
            continue
        if op not in SUPPORTED_OPS:
            raise _Unsupported(f"{path}: {where}: operator {op} is not supported (supported: "
                               f"{', '.join(SUPPORTED_OPS)})")
        missing = _REQUIRED.get(op)
        try:
            attrs["_opset"] = opset
            attrs["_outputs"] = len(n.output)
            data = _take_params(op, ins, attrs, consts)
            if missing and missing not in attrs:
                raise ModelError(f"attribute or input {missing!r} is missing")
            if op == "Shape" and data[0] in shapes:
                consts[n.output[0]] = _shape(attrs, np.empty(shapes[data[0]], np.float32))
                continue
            if all(d == "" or d in consts for d in data):
                if op in _SPATIAL:
                    raise _Unsupported("computing on constants only")
                outs = TENSOR_OPS[op](attrs, *[consts[d] for d in data if d])
                for o, v in zip(n.output, outs if isinstance(outs, list) else [outs]):
                    consts[o] = _f32(np.asarray(v))
                continue
            node = _Node(name, op, data, list(n.output), attrs, pos)
            for o, s in zip(n.output, _infer_shapes(node, shapes, consts)):
                if math.prod(s) > MAX_TENSOR_ELEMENTS:
                    raise ModelError(f"output {o!r} of shape {list(s)} is larger than {MAX_TENSOR_ELEMENTS} elements")
                shapes[o] = s
        except ModelError as exc:
            raise type(exc)(f"{path}: {where}: {exc}") from None
        except (ValueError, TypeError, IndexError, KeyError) as exc:  # numpy's, on shapes that do not fit
            raise ModelError(f"{path}: {where}: cannot compute it on inputs of shapes "
                             f"{[shapes.get(d, consts[d].shape if d in consts else None) for d in data]}: {exc}") \
                from None
        nodes.append(node)
    outputs = [alias.get(o.name, o.name) for o in g.output]
    for o in outputs:
        if o in consts:
            raise ModelError(f"{path}: graph output {o!r} is a constant; nothing to compute")
        if o not in shapes:
            raise ModelError(f"{path}: graph output {o!r} is produced by no node")
    return _Graph(path, consts, shapes, inp.name, outputs, nodes, opset)


def _constant_value(attrs: dict[str, Any], where: str) -> np.ndarray:
    if "value" in attrs:
        return _f32(np.asarray(attrs["value"]))
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                       ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype)
    raise _Unsupported(f"{where}: a Constant with attributes {sorted(attrs)}")


def _take_params(op: str, ins: list[str], attrs: dict[str, Any], consts: dict[str, np.ndarray]) -> list[str]:
    """Move the constant parameter inputs of ``op`` into ``attrs``; returns the data inputs."""
    params = PARAM_INPUTS.get(op, {})
    if op == "Resize" and attrs["_opset"] < 11:  # opset 10: (X, scales)
        params = {1: "scales"}
    data = []
    for i, name in enumerate(ins):
        if i in params:
            if not name:
                continue
            if name not in consts:
                raise _Unsupported(f"input {i} ({params[i]}) must be a constant, not computed at run time")
            attrs[params[i]] = _param_value(consts[name])
        else:
            data.append(name)
    if op == "Clip":
        for k in ("min", "max"):
            if isinstance(attrs.get(k), tuple):
                attrs[k] = attrs[k][0] if attrs[k] else None
    return data


def _conv_geometry(node: _Node, in_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> dict[str, Any]:
    a = node.attrs
    if len(in_shape) != 4 or len(w_shape) != 4:
        raise _Unsupported(f"a convolution of a {len(in_shape)}-D tensor (only 2-D convolutions)")
    kh, kw = w_shape[2], w_shape[3]
    if kh != kw:
        raise _Unsupported(f"kernel {kh}x{kw} (only square kernels)")
    if a.get("kernel_shape") and tuple(a["kernel_shape"]) != (kh, kw):
        raise ModelError(f"kernel_shape {a['kernel_shape']} does not fit weights of shape {list(w_shape)}")
    _positive("dilations", a.get("dilations") or (1,))
    _positive("strides", a.get("strides") or (1,))
    _positive("group", (a.get("group", 1),))
    _positive("kernel", (kh, kw))
    dh, dw = a.get("dilations") or (1, 1)
    if dh != dw:
        raise _Unsupported(f"dilations={[dh, dw]} (only equal dilations)")
    sy, sx = a.get("strides") or (1, 1)
    groups = int(a.get("group", 1))
    c, h, w = in_shape[1:]
    if c % groups or w_shape[0] % groups or w_shape[1] * groups != c:
        raise ModelError(f"weights of shape {list(w_shape)} do not fit {c} input channels in {groups} groups")
    span = (kh - 1) * dh + 1
    auto = a.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, s in ((h, sy), (w, sx)):
            total = max((-(-size // s) - 1) * s + span - size, 0)
            pads.append(total // 2 if auto == "SAME_UPPER" else total - total // 2)
            pads.append(total - pads[-1])
        pt, pb, pl, pr = pads
    elif auto == "VALID":
        pt = pl = pb = pr = 0
    elif auto == "NOTSET":
        pt, pl, pb, pr = a.get("pads") or (0, 0, 0, 0)
    else:
        raise _Unsupported(f"auto_pad={auto}")
    oh, ow = (h + pt + pb - span) // sy + 1, (w + pl + pr - span) // sx + 1
    if oh < 1 or ow < 1 or min(pt, pl, pb, pr) < 0:
        raise ModelError(f"pads {[pt, pl, pb, pr]} give an empty or negative output on a {h}x{w} input")
    return dict(k=kh, d=dh, sy=sy, sx=sx, g=groups, pads=(pt, pl, pb, pr), out=(1, w_shape[0], oh, ow))


def _resize_stride(node: _Node, in_shape: tuple[int, ...]) -> int:
    """The integer stride of a nearest Resize/Upsample that equals :class:`UpsampleSpec` (output
    pixel ``y`` reads input ``y // s``), else :class:`_Unsupported`.

    With scale ``s``, ``asymmetric`` maps ``y`` to ``y / s`` (floor: ``y // s``);
    ``half_pixel`` maps it to ``(y + 0.5) / s - 0.5 = y // s + (j + 0.5) / s - 0.5`` for
    ``j = y % s``, a fraction strictly inside (-0.5, 0.5), so either round_prefer rule gives
    ``y // s`` (and the clamp at 0 keeps the first row). floor/ceil under half_pixel do not."""
    a = node.attrs
    mode = a.get("mode", "nearest")
    if mode != "nearest":
        raise _Unsupported(f"mode={mode!r} (only nearest)")
    if len(in_shape) != 4:
        raise _Unsupported(f"resizing a {len(in_shape)}-D tensor")
    if a.get("antialias", 0) or a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise _Unsupported("antialias or keep_aspect_ratio_policy")
    axes = tuple(v % 4 for v in a.get("axes") or (0, 1, 2, 3))  # opset 18: scales/sizes of these axes only
    for key in ("sizes", "scales"):
        if a.get(key) and axes != (0, 1, 2, 3):
            if len(a[key]) != len(axes):
                raise ModelError(f"{key} has {len(a[key])} values for axes {list(axes)}")
            full = list(in_shape) if key == "sizes" else [1.0] * 4
            for ax, v in zip(axes, a[key]):
                full[ax] = v
            a = {**a, key: tuple(full)}
    if a.get("sizes"):
        sizes = tuple(int(v) for v in a["sizes"])
        if len(sizes) != 4 or sizes[:2] != in_shape[:2] or sizes[2] % in_shape[2] or sizes[3] % in_shape[3]:
            raise _Unsupported(f"sizes={list(sizes)} from {list(in_shape)} (only integer scales of H and W)")
        scales: tuple[float, ...] = (1.0, 1.0, sizes[2] / in_shape[2], sizes[3] / in_shape[3])
    elif a.get("scales"):
        scales = tuple(float(v) for v in a["scales"])
    else:
        raise ModelError("neither scales nor sizes given")
    if len(scales) != 4 or scales[:2] != (1.0, 1.0) or scales[2] != scales[3] or scales[2] != int(scales[2]) \
            or scales[2] < 1:
        raise _Unsupported(f"scales={list(scales)} (only the same integer scale of H and W)")
    if node.op == "Resize" and node.attrs["_opset"] >= 11:
        ctm = a.get("coordinate_transformation_mode", "half_pixel")
        nearest = a.get("nearest_mode", "round_prefer_floor")
        ok = (ctm == "asymmetric" and nearest == "floor") or \
             (ctm in ("half_pixel", "pytorch_half_pixel") and nearest in ("round_prefer_floor", "round_prefer_ceil"))
        if not ok and int(scales[2]) > 1:
            raise _Unsupported(f"coordinate_transformation_mode={ctm!r} with nearest_mode={nearest!r}")
    return int(scales[2])


def _infer_shapes(node: _Node, shapes: dict[str, tuple[int, ...]],
                  consts: dict[str, np.ndarray]) -> list[tuple[int, ...]]:
    """Output shapes (batch included) of an activation node: formulas for the spatial ops,
    numpy on zeros for the rest (so that the run and the shapes can never disagree)."""
    def shape(name: str) -> tuple[int, ...]:
        return shapes[name] if name in shapes else tuple(consts[name].shape)

    op = node.op
    if op == "Conv":
        if len(node.data) < 2 or node.data[1] not in consts or (len(node.data) > 2 and node.data[2]
                                                                 and node.data[2] not in consts):
            raise _Unsupported("weights or bias computed at run time (they must be initializers)")
        geo = _conv_geometry(node, shape(node.data[0]), tuple(consts[node.data[1]].shape))
        node.attrs["_geo"] = geo
        return [geo["out"]]
    if op in ("Resize", "Upsample"):
        s = shape(node.data[0])
        st = _resize_stride(node, s)
        return [(s[0], s[1], s[2] * st, s[3] * st)]
    args = [np.zeros(shapes[d], np.float32) if d in shapes else consts[d] for d in node.data if d]
    with np.errstate(all="ignore"):  # zeros divided by zeros: only the shape matters here
        outs = TENSOR_OPS[op](node.attrs, *args)
    out_list = outs if isinstance(outs, list) else [outs]
    return [tuple(int(v) for v in o.shape) for o in out_list]


# ------------------------------------------------------------------------------------------------
# fusion and lowering
# ------------------------------------------------------------------------------------------------

def _consumers(g: _Graph) -> dict[str, list[_Node]]:
    use: dict[str, list[_Node]] = {}
    for n in g.nodes:
        if not n.dead:
            for d in n.data:
                use.setdefault(d, []).append(n)
    return use


def _fuse(g: _Graph) -> None:
    """Fold batch norms into convs, and activations into convs and adds (see the module
    docstring); a fused node is marked dead and its consumer reads the producer's output."""
    outs = set(g.outputs)
    for n in g.nodes:
        if n.op == "Conv" and not n.dead:
            w = g.consts[n.data[1]].astype(np.float32)
            b = g.consts[n.data[2]].astype(np.float32) if len(n.data) > 2 and n.data[2] else \
                np.zeros(w.shape[0], np.float32)
            n.conv = ConvParams(biases=b, weights=w)
    use = _consumers(g)

    def sole(n: _Node) -> _Node | None:
        t = n.outputs[0]
        u = use.get(t, [])
        return u[0] if len(u) == 1 and t not in outs else None

    def absorb(n: _Node, m: _Node) -> None:
        # n now makes m's output tensor, so m's consumers read n's result under the same name
        n.outputs = m.outputs
        m.dead = True

    for n in g.nodes:
        if n.dead or n.op != "Conv" or len(g.shapes[n.outputs[0]]) != 4:
            continue
        m = sole(n)
        if m is not None and m.op == "BatchNormalization" and len(m.data) == 5 \
                and all(d in g.consts for d in m.data[1:]):
            assert n.conv is not None
            scale, beta, mean, var = (g.consts[d] for d in m.data[1:])
            eps = float(m.attrs.get("epsilon", 1e-5))
            k = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
            w = (n.conv.weights.astype(np.float64) * k[:, None, None, None]).astype(np.float32)
            b64 = (n.conv.biases.astype(np.float64) - mean.astype(np.float64)) * k + beta.astype(np.float64)
            n.conv = ConvParams(biases=b64.astype(np.float32), weights=w)
            absorb(n, m)
            use = _consumers(g)
        act = _fusable_act(n, g, use, outs)
        if act is not None:
            name, absorbed = act
            n.act = name
            for m in absorbed[:-1]:
                m.dead = True
            absorb(n, absorbed[-1])
            use = _consumers(g)
    for n in g.nodes:
        if n.dead or n.op != "Add" or len(n.data) != 2 or any(d not in g.shapes for d in n.data):
            continue
        sa, sb = (g.shapes[d] for d in n.data)
        if sa != sb or len(sa) != 4:
            continue
        m = sole(n)
        if m is not None and m.op == "Relu":
            n.act = "relu"
            absorb(n, m)
            use = _consumers(g)


def _fusable_act(n: _Node, g: _Graph, use: dict[str, list[_Node]], outs: set[str]) -> tuple[str, list[_Node]] | None:
    t = n.outputs[0]
    if t in outs:
        return None
    u = use.get(t, [])
    if len(u) == 1:
        m = u[0]
        if m.op == "Relu":
            return "relu", [m]
        if m.op == "Sigmoid":
            return "logistic_f32", [m]
        if m.op == "HardSwish":
            return "hardswish", [m]
        if m.op == "LeakyRelu" and f32(m.attrs.get("alpha", 0.01)) == f32(0.1):
            return "leaky", [m]
        if m.op == "Clip":
            lo, hi = m.attrs.get("min"), m.attrs.get("max")
            if lo == 0 and hi == 6:
                return "relu6", [m]
            if lo == 0 and hi is None:
                return "relu", [m]
        return None
    if len(u) == 2:
        sig = [m for m in u if m.op == "Sigmoid"]
        mul = [m for m in u if m.op == "Mul"]
        if len(sig) == 1 and len(mul) == 1:
            s, m = sig[0], mul[0]
            st = s.outputs[0]
            if st not in outs and use.get(st, []) == [m] and sorted(m.data) == sorted([t, st]):
                return "swish_f32", [s, m]
    return None


def _order(g: _Graph) -> list[_Node]:
    """Live nodes in a topological order that makes every 4-D map it can before any other tensor
    and, where it can, runs next a node reading the tensor just made (each layer then reads its
    predecessor, and few route copies are needed)."""
    producer = {o: n for n in g.nodes if not n.dead for o in n.outputs}
    live: set[int] = set()
    stack = [producer[o] for o in g.outputs]
    while stack:
        n = stack.pop()
        if n.pos in live:
            continue
        live.add(n.pos)
        stack.extend(producer[d] for d in n.data if d in producer)
    nodes = [n for n in g.nodes if not n.dead and n.pos in live]
    done: set[str] = {g.input_name} | set(g.consts)
    order: list[_Node] = []
    last: str | None = g.input_name
    pending = list(nodes)
    while pending:
        ready = [n for n in pending if all(d == "" or d in done for d in n.data)]
        if not ready:  # pragma: no cover - the parser checked every input is defined earlier
            raise ModelError(f"{g.path}: the graph has a cycle")
        # nodes that make (N, C, H, W) maps first: a tensor op (a detector's Reshape/Concat of its
        # head maps) waits until no map is left to make, so every tileable branch (YOLOv8's three
        # detection scales) comes before the first of them and a fused block, a prefix of the
        # layers, can hold them all
        ready = [n for n in ready if all(len(g.shapes.get(o, ())) == 4 for o in n.outputs)] or ready
        pick = next((n for n in ready if n.data and n.data[0] == last), None) or \
            next((n for n in ready if last in n.data), None) or ready[0]
        pending.remove(pick)
        order.append(pick)
        done.update(pick.outputs)
        last = pick.outputs[-1]
    return order


class _Lowering:
    def __init__(self, g: _Graph) -> None:
        self.g = g
        self.layers: list[LayerSpec] = []
        self.params: dict[int, ConvParams] = {}
        self.consts: dict[int, dict[int, np.ndarray]] = {}
        self.producer: dict[str, int] = {g.input_name: -1}

    def chw(self, t: str) -> Shape:
        s = self.g.shapes[t]
        return (s[1], s[2], s[3])

    def nobatch(self, t: str) -> tuple[int, ...]:
        return self.g.shapes[t][1:]

    @property
    def next(self) -> int:
        return len(self.layers)

    def emit(self, spec: LayerSpec, out: str | None) -> int:
        self.layers.append(spec)
        if out is not None:
            self.producer[out] = spec.index
        return spec.index

    def ensure_prev(self, t: str) -> None:
        """Put a copy of tensor ``t`` in front if it is not the previous layer's output."""
        src = self.producer[t]
        if src != self.next - 1:
            shp = self.chw(t)
            self.emit(RouteSpec(self.next, shp, shp, (src,)), None)

    def is_map(self, t: str) -> bool:
        return t in self.g.shapes and len(self.g.shapes[t]) == 4

    def lower(self, n: _Node) -> None:
        g = self.g
        for o in n.outputs:
            if o and o in g.shapes and g.shapes[o][:1] != (1,):
                raise ModelError(f"output {o!r} has shape {list(g.shapes[o])}; stealer "
                                 "needs every tensor's first dimension to be the batch of 1")
        op = n.op
        x = n.data[0] if n.data else ""
        if op == "Conv":
            self.conv(n)
        elif op in ("Resize", "Upsample"):
            self.ensure_prev(x)
            st = _resize_stride(n, g.shapes[x])
            self.emit(UpsampleSpec(self.next, self.chw(x), self.chw(n.outputs[0]), st, 1.0), n.outputs[0])
        elif op == "MaxPool" and self.is_map(x) and self.maxpool_fits(n):
            self.ensure_prev(x)
            pads = n.attrs.get("pads") or (0, 0, 0, 0)
            self.emit(MaxPoolSpec(self.next, self.chw(x), self.chw(n.outputs[0]), n.attrs["kernel_shape"][0],
                                  (n.attrs.get("strides") or (1, 1))[0], pads[0]), n.outputs[0])
        elif op == "Concat" and all(self.is_map(d) for d in n.data) and n.attrs["axis"] in (1, -3):
            self.emit(RouteSpec(self.next, self.chw(x), self.chw(n.outputs[0]),
                                tuple(self.producer[d] for d in n.data)), n.outputs[0])
        elif op == "Split" and self.is_map(x) and n.attrs.get("axis", 0) in (1, -3):
            sizes = _split_sizes(n.attrs, np.empty(g.shapes[x], np.bool_))
            start = 0
            for k, (o, size) in enumerate(zip(n.outputs, sizes)):
                if len(set(sizes)) == 1:
                    spec: LayerSpec = RouteSpec(self.next, self.chw(x), self.chw(o), (self.producer[x],), len(sizes), k)
                else:
                    spec = SliceSpec(self.next, self.chw(x), self.chw(o), self.producer[x], start, start + size)
                self.emit(spec, o)
                start += size
        elif op == "Slice" and self.is_map(x) and self.channel_slice(n) is not None:
            a, z = self.channel_slice(n)  # type: ignore[misc]
            self.emit(SliceSpec(self.next, self.chw(x), self.chw(n.outputs[0]), self.producer[x], a, z), n.outputs[0])
        elif op == "Add" and len(n.data) == 2 and all(self.is_map(d) for d in n.data) \
                and g.shapes[n.data[0]] == g.shapes[n.data[1]]:
            a, b = n.data
            if self.producer[a] != self.next - 1 and self.producer[b] == self.next - 1:
                a, b = b, a
            self.ensure_prev(a)
            self.emit(ShortcutSpec(self.next, self.chw(a), self.chw(a), (self.producer[b],), n.act), n.outputs[0])
        else:
            self.tensor_op(n)

    def maxpool_fits(self, n: _Node) -> bool:
        a = n.attrs
        _check_pool(a)
        k = tuple(a["kernel_shape"])
        s = tuple(a.get("strides") or (1, 1))
        pt, pl, pb, pr = a.get("pads") or (0, 0, 0, 0)
        return k[0] == k[1] and s[0] == s[1] and pt == pl and max(pb, pr) < k[0] and pt < k[0]

    def channel_slice(self, n: _Node) -> tuple[int, int] | None:
        a = n.attrs
        axes = a.get("axes") or tuple(range(len(a["starts"])))
        steps = a.get("steps") or (1,) * len(axes)
        if len(axes) != 1 or axes[0] not in (1, -3) or steps[0] != 1:
            return None
        c = self.g.shapes[n.data[0]][1]
        start, stop, _ = slice(a["starts"][0], a["ends"][0]).indices(c)
        return (start, stop) if stop > start else None

    def conv(self, n: _Node) -> None:
        x, out = n.data[0], n.outputs[0]
        geo = n.attrs["_geo"]
        assert n.conv is not None
        self.ensure_prev(x)
        pt, pl, pb, pr = geo["pads"]
        co = geo["out"][1]
        cin, oshape = self.chw(x), self.chw(out)
        if pt == pl == pb == pr:
            spec: LayerSpec = ConvSpec(self.next, cin, oshape, co, geo["k"], geo["sy"], pt, n.act, False, geo["g"],
                                       geo["d"], 0 if geo["sx"] == geo["sy"] else geo["sx"])
        else:
            spec = PadConvSpec(self.next, cin, oshape, co, geo["k"], (geo["sy"], geo["sx"]), pt, pl, n.act,
                               geo["g"], geo["d"])
        self.params[spec.index] = n.conv
        self.emit(spec, out)

    def tensor_op(self, n: _Node) -> None:
        g = self.g
        if n.op in _SPATIAL:  # pragma: no cover - lowered above
            raise _Unsupported("a spatial op on tensors that are not maps")
        inputs: list[int | None] = []
        consts: dict[int, np.ndarray] = {}
        for pos, d in enumerate(n.data):
            if d in g.consts:
                inputs.append(None)
                consts[pos] = np.ascontiguousarray(_f32(g.consts[d]))
            else:
                inputs.append(self.producer[d])
        attrs = tuple(sorted((k, v) for k, v in n.attrs.items() if not k.startswith("_geo")))
        first = n.data[0]
        in_shape = self.nobatch(first) if first in g.shapes else tuple(g.consts[first].shape)
        flops = 0
        if n.op in ("MatMul", "Gemm"):
            shp = [g.shapes[d] if d in g.shapes else g.consts[d].shape for d in n.data[:2]]
            kdim = shp[0][-2] if n.op == "Gemm" and n.attrs.get("transA", 0) else shp[0][-1]
            flops = 2 * kdim * math.prod(g.shapes[n.outputs[0]])
        n_params = sum(v.size for v in consts.values())
        for k, o in enumerate(n.outputs):
            spec = TensorOpSpec(self.next, in_shape, self.nobatch(o), n.op, tuple(inputs),
                                attrs + ((("_output", k),) if len(n.outputs) > 1 else ()), n.name,
                                flops if k == 0 else 0, n_params if k == 0 else 0)
            if consts:
                self.consts[spec.index] = consts
            self.emit(spec, o)


@dataclass
class OnnxModel:
    """What :func:`load_onnx` returns: the spec, the conv layers' parameters (batch norm folded),
    the tensor ops' constant inputs by layer and input position, and the model's hash."""

    spec: ModelSpec
    params: dict[int, ConvParams]
    consts: dict[int, dict[int, np.ndarray]]
    model_hash: str


def load_onnx(path: str | os.PathLike[str]) -> OnnxModel:
    """Parse an .onnx file into stealer's layers (see the module docstring).

    Raises
    ------
    ModelError
        The file cannot be read or parsed, a tensor it needs is missing, or a node's operator
        or attribute is not supported (the message names the node and its op type).
    """
    model, data = _read_model(path)
    g = _parse_graph(model, str(path))
    _fuse(g)
    low = _Lowering(g)
    for n in _order(g):
        try:
            low.lower(n)
        except ModelError as exc:
            raise type(exc)(f"{path}: {n.where()}: {exc}") from None
    c, h, w = g.shapes[g.input_name][1:]
    outputs = tuple(low.producer[o] for o in g.outputs)
    if any(o < 0 for o in outputs):
        raise ModelError(f"{path}: a graph output is the graph input itself; nothing to compute")
    spec = ModelSpec(str(path), NetInfo(width=w, height=h, channels=c, batch=1), tuple(low.layers),
                     FLAVOUR_ONNX, outputs)
    # The file's bytes are the model: the graph and every weight (external data is refused above).
    digest = hashlib.sha256(data).hexdigest()[:16]
    log.info("%s: %d ONNX nodes -> %d layers", path, len(g.nodes), len(spec.layers))
    return OnnxModel(spec, low.params, low.consts, digest)


def is_onnx_path(path: str | os.PathLike[str]) -> bool:
    """Whether a model path names an ONNX file (by its suffix)."""
    return str(path).lower().endswith(".onnx")
