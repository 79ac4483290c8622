"""Layer specifications: the geometry of a darknet network, with no parameters and no kernels.

These frozen dataclasses are what the cfg parser produces after shape inference. The planner (FTP)
works on them alone, so a plan can be built and tested without weights.

Shapes are (C, H, W). Indices are the darknet layer index (0 = first layer after ``[net]``).

Models imported from ONNX (:mod:`stealer.onnx_import`) use the same list: a layer reads the
previous layer's output unless it names its ``sources`` (routes, shortcuts and the three ONNX-only
kinds at the end of this module, :class:`SliceSpec`, :class:`PadConvSpec` and
:class:`TensorOpSpec`). Source ``-1`` is the network input.

``ConvSpec.activation`` is the *kernel's* activation name (see :mod:`kernels.activations`): the
parser maps a cfg's name to the formula of the darknet that trained the model, so an AlexeyAB
``logistic`` is ``logistic_f32`` here and a 2017 ``logistic`` stays ``logistic``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

Shape = tuple[int, int, int]

#: cfg activation names 2017 darknet models may use (the kernel names are the same).
ACTIVATIONS = ("linear", "leaky", "logistic", "relu")
#: cfg activation names of AlexeyAB darknet models, and the kernel formula each one runs.
ALEXEYAB_ACTIVATIONS = {"linear": "linear", "leaky": "leaky", "logistic": "logistic_f32", "relu": "relu",
                        "relu6": "relu6", "swish": "swish_f32", "mish": "mish_f32"}


@dataclass(frozen=True, slots=True)
class ConvSpec:
    """``[convolutional]``: out[co, y, x] = act(b[co] + sum w[co, c, ky, kx] * in[c, y*s - pad + ky, x*s - pad + kx])."""

    index: int
    in_shape: Shape
    out_shape: Shape
    filters: int
    size: int
    stride: int
    pad: int  # zero padding on every side, in input pixels (darknet: pad=1 means size//2; times dilation)
    activation: str  # the kernel's name (see the module docstring)
    batch_normalize: bool
    groups: int = 1  # AlexeyAB: filters and input channels split into this many independent groups
    dilation: int = 1  # AlexeyAB: distance between kernel taps
    stride_x: int = 0  # AlexeyAB stride_x when it differs from ``stride`` (then the row stride); 0 = same

    kind = "conv"

    @property
    def strides(self) -> tuple[int, int]:
        """(row stride, column stride)."""
        return self.stride, self.stride_x or self.stride

    @property
    def span(self) -> int:
        """Input pixels one window covers along an axis: ``(size - 1) * dilation + 1``."""
        return (self.size - 1) * self.dilation + 1

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        """(filters, input channels per group, size, size): the order of the weights file."""
        return (self.filters, self.in_shape[0] // self.groups, self.size, self.size)

    @property
    def n_params(self) -> int:
        c = self.in_shape[0] // self.groups
        extra = 3 * self.filters if self.batch_normalize else 0
        return self.filters * c * self.size * self.size + self.filters + extra

    @property
    def flops(self) -> int:
        """Floating-point operations (2 per multiply-accumulate) of the whole layer."""
        co, ho, wo = self.out_shape
        return 2 * co * ho * wo * (self.in_shape[0] // self.groups) * self.size * self.size


@dataclass(frozen=True, slots=True)
class MaxPoolSpec:
    """``[maxpool]``: out[c, y, x] = max over the in-map part of the window at
    ``(y*stride - pad, x*stride - pad)``; positions outside the map are skipped, never zeros.

    ``pad`` is the window origin offset, ``out_shape`` the output size, of whichever rule the
    model's darknet uses: 2017 ``pad = padding`` (default (size-1)//2), out = (H + 2*padding) //
    stride; AlexeyAB ``pad = padding // 2`` (padding default size-1), out = (H + padding - size)
    // stride + 1 (see :mod:`stealer.darknet`)."""

    index: int
    in_shape: Shape
    out_shape: Shape
    size: int
    stride: int
    pad: int

    kind = "maxpool"
    n_params = 0
    flops = 0


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """``[route]``: channel concatenation of earlier layers' outputs, in the listed order.

    With AlexeyAB's ``groups``/``group_id`` each source contributes the flat chunk ``group_id``
    of ``groups`` equal chunks of its buffer, i.e. its channels ``[group_id*C/groups,
    (group_id+1)*C/groups)`` (the parser requires ``groups`` to divide every source's channels).
    """

    index: int
    in_shape: Shape  # shape of the first source (informational)
    out_shape: Shape
    sources: tuple[int, ...]  # absolute layer indices
    groups: int = 1
    group_id: int = 0

    kind = "route"
    n_params = 0
    flops = 0


@dataclass(frozen=True, slots=True)
class ReorgSpec:
    """``[reorg]`` as darknet's 2017 forward pass runs it (its reorg routine in the backward direction)."""

    index: int
    in_shape: Shape
    out_shape: Shape
    stride: int

    kind = "reorg"
    n_params = 0
    flops = 0


@dataclass(frozen=True, slots=True)
class RegionSpec:
    """``[region]``: logistic on x, y, objectness; per-anchor softmax on the classes."""

    index: int
    in_shape: Shape
    out_shape: Shape
    anchors: tuple[float, ...]
    classes: int
    coords: int
    num: int
    softmax: bool

    kind = "region"
    n_params = 0
    flops = 0


@dataclass(frozen=True, slots=True)
class UpsampleSpec:
    """AlexeyAB ``[upsample]``: nearest neighbour by ``stride``, values times ``scale``."""

    index: int
    in_shape: Shape
    out_shape: Shape
    stride: int
    scale: float

    kind = "upsample"
    n_params = 0
    flops = 0


@dataclass(frozen=True, slots=True)
class ShortcutSpec:
    """AlexeyAB ``[shortcut]`` without weights: the previous layer's output plus each ``sources``
    layer's over the flat buffer (up to the shorter length), then ``activation`` (kernel name).
    The output has the previous layer's shape."""

    index: int
    in_shape: Shape
    out_shape: Shape
    sources: tuple[int, ...]  # absolute layer indices of the ``from`` layers
    activation: str

    kind = "shortcut"
    n_params = 0
    flops = 0


@dataclass(frozen=True, slots=True)
class YoloSpec:
    """AlexeyAB ``[yolo]``: one detection head (see :func:`kernels.yolo_activate` and
    :mod:`stealer.yolo`). ``anchors`` holds all ``total`` anchor pairs; ``mask`` picks this
    head's ``len(mask)`` of them."""

    index: int
    in_shape: Shape
    out_shape: Shape
    classes: int
    mask: tuple[int, ...]
    anchors: tuple[float, ...]
    scale_x_y: float
    new_coords: bool
    nms_kind: str  # "default" (do_nms_sort) or "greedynms" (DIoU)
    beta_nms: float

    kind = "yolo"
    n_params = 0
    flops = 0

    @property
    def num(self) -> int:
        """Anchors of this head (the mask's length)."""
        return len(self.mask)


@dataclass(frozen=True, slots=True)
class ConnectedSpec:
    """2017 darknet ``[connected]``: ``out[o] = act(b[o] + sum_i w[o, i] * in[i])`` over the previous
    layer's output flattened in C order (C, H, W): ``inputs = C*H*W``. The output is (outputs, 1, 1).

    Weights file order (``load_connected_weights``): biases, weights (outputs x inputs, row-major:
    output by output), then scales, rolling mean, rolling variance if ``batch_normalize``."""

    index: int
    in_shape: Shape
    out_shape: Shape
    outputs: int
    activation: str  # the kernel's name
    batch_normalize: bool

    kind = "connected"

    @property
    def inputs(self) -> int:
        c, h, w = self.in_shape
        return c * h * w

    @property
    def weight_shape(self) -> tuple[int, int]:
        """(outputs, inputs): the order of the weights file."""
        return (self.outputs, self.inputs)

    @property
    def n_params(self) -> int:
        return self.outputs * self.inputs + self.outputs + (3 * self.outputs if self.batch_normalize else 0)

    @property
    def flops(self) -> int:
        return 2 * self.outputs * self.inputs


@dataclass(frozen=True, slots=True)
class DropoutSpec:
    """2017 darknet ``[dropout]``: the identity at inference (``forward_dropout_layer`` returns when
    not training, and its output buffer is its input's)."""

    index: int
    in_shape: Shape
    out_shape: Shape
    probability: float

    kind = "dropout"
    n_params = 0
    flops = 0


@dataclass(frozen=True, slots=True)
class SoftmaxSpec:
    """2017 darknet ``[softmax]``: darknet's ``softmax`` (float32 sum, exp in double) over each of
    ``groups`` consecutive chunks of the flat input, with ``temperature``."""

    index: int
    in_shape: Shape
    out_shape: Shape
    groups: int
    temperature: float

    kind = "softmax"
    n_params = 0
    flops = 0


@dataclass(frozen=True, slots=True)
class CropSpec:
    """2017 darknet ``[crop]`` at inference: the centred ``out_shape`` window starting at
    (``top``, ``left``), each value ``x * scale + trans`` (2, -1; or 1, 0 with ``noadjust=1``)."""

    index: int
    in_shape: Shape
    out_shape: Shape
    top: int
    left: int
    scale: float
    trans: float

    kind = "crop"
    n_params = 0
    flops = 0


@dataclass(frozen=True, slots=True)
class CostSpec:
    """2017 darknet ``[cost]``: a training loss. At inference it passes its input on: darknet's
    ``get_network_output_layer`` skips trailing cost layers, so the network's output is its input."""

    index: int
    in_shape: Shape
    out_shape: Shape

    kind = "cost"
    n_params = 0
    flops = 0


@dataclass(frozen=True, slots=True)
class SliceSpec:
    """ONNX ``Split``/``Slice`` along the channels of a (C, H, W) map, where the parts are not the
    equal chunks a :class:`RouteSpec` with ``groups`` takes: channels ``[start, stop)`` of layer
    ``source``'s output (a copy), ``out_shape = (stop - start, H, W)``."""

    index: int
    in_shape: Shape
    out_shape: Shape
    source: int
    start: int
    stop: int

    kind = "slice"
    n_params = 0
    flops = 0

    @property
    def sources(self) -> tuple[int, ...]:
        return (self.source,)


@dataclass(frozen=True, slots=True)
class PadConvSpec:
    """ONNX ``Conv`` whose top and left zero padding differ (which :class:`ConvSpec`, one ``pad``
    for both, cannot say): ``out[co, y, x] = act(b[co] + sum w[co, c, ky, kx] * in[g*Cg + c,
    y*sy - pad_top + ky*dilation, x*sx - pad_left + kx*dilation])``, zeros outside the map (the
    bottom and right padding are what ``out_shape`` implies); reads the previous layer's output.
    Weights are held like a ConvSpec's (batch norm already folded)."""

    index: int
    in_shape: Shape
    out_shape: Shape
    filters: int
    size: int
    strides: tuple[int, int]  # (row, column)
    pad_top: int
    pad_left: int
    activation: str  # the kernel's name
    groups: int = 1
    dilation: int = 1

    kind = "padconv"
    batch_normalize = False

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.filters, self.in_shape[0] // self.groups, self.size, self.size)

    @property
    def n_params(self) -> int:
        return self.filters * (self.in_shape[0] // self.groups) * self.size * self.size + self.filters

    @property
    def flops(self) -> int:
        co, ho, wo = self.out_shape
        return 2 * co * ho * wo * (self.in_shape[0] // self.groups) * self.size * self.size


@dataclass(frozen=True, slots=True)
class TensorOpSpec:
    """An ONNX operator with no darknet counterpart, run with numpy after (or between) the
    spatial layers: elementwise arithmetic with broadcasting, standalone activations, pooling
    other than max, reshapes and transposes, softmax, matrix products (see
    :data:`stealer.onnx_import.TENSOR_OPS` for the list and each one's exact rule).

    ``inputs`` are the ONNX node's inputs in order: a layer index (``-1``: the network input)
    or ``None`` for a constant, whose value the network holds (``Network.consts[index][position]``).
    Every tensor is stored without the ONNX leading batch dimension (which the importer requires
    to be 1); the op adds it back before it computes, so ``attrs`` (the ONNX attributes, and axes
    read from constant inputs) mean exactly what they mean in the ONNX graph. ``in_shape`` is the
    first input's shape, ``out_shape`` the output's, of any rank; ``name`` is the ONNX node's."""

    index: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    op: str
    inputs: tuple[int | None, ...]
    attrs: tuple[tuple[str, Any], ...] = ()
    name: str = ""
    flops: int = 0
    n_params: int = 0

    kind = "tensor"

    @property
    def sources(self) -> tuple[int, ...]:
        """The layers (not constants) this op reads, in input order (repeats kept)."""
        return tuple(i for i in self.inputs if i is not None)

    def attr(self, key: str, default: Any = None) -> Any:
        for k, v in self.attrs:
            if k == key:
                return v
        return default


LayerSpec = Union[ConvSpec, MaxPoolSpec, RouteSpec, ReorgSpec, RegionSpec, UpsampleSpec, ShortcutSpec, YoloSpec,
                  ConnectedSpec, DropoutSpec, SoftmaxSpec, CropSpec, CostSpec, SliceSpec, PadConvSpec, TensorOpSpec]


def layer_sources(layer: LayerSpec) -> tuple[int, ...]:
    """The layers ``layer`` reads other than through the chain (its named ``sources``; empty for a
    layer that reads only the previous layer's output)."""
    return tuple(getattr(layer, "sources", ()))
