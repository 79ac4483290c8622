"""Darknet model format: cfg parsing with shape inference, and the binary weights file.

Two darknets, two sets of semantics, chosen per model (``ModelSpec.flavour``, see ``_flavour``):

* ``2017``: the darknet DeepThings builds on, which trained YOLOv2 and YOLOv2-tiny. Plain
  conv/maxpool stacks and cfgs with ``[region]``/``[reorg]`` get it (or ``[net] darknet=2017``).
* ``alexeyab``: AlexeyAB's darknet (commit 59596d7), where today's YOLOv3/v4 weights come from.
  Cfgs with ``[shortcut]``, ``[upsample]``, ``[yolo]``, route or conv ``groups``, ``dilation`` or
  ``stride_x``/``stride_y`` get it (or ``[net] darknet=alexeyab``, a key of ours that darknet
  ignores). A cfg mixing both without declaring one is refused.

Common to both (``src/parser.c``):

* Every line is stripped of *all* whitespace (darknet's ``strip`` also removes inner spaces, so
  ``anchors = 1, 2`` reads as ``anchors=1,2``). Lines starting with ``#`` or ``;`` are comments.
* The first of duplicate keys wins (darknet's ``option_find`` returns the first match).
* ``[net]`` batch is divided by subdivisions.
* A convolution with no ``activation=`` line is **logistic**; ``pad=1`` means ``padding = size // 2``.
* Weights: int32 major, minor, revision; ``seen`` is a size_t (8 bytes) when
  ``major * 10 + minor >= 2`` and both are below 1000, else an int32; then per convolutional
  layer: biases, [scales, rolling mean, rolling variance if batch_normalize], weights in
  (filters, channels / groups, k, k) order. No other layer kind has weights here (AlexeyAB's
  weighted shortcuts are refused). Darknet never checks the file length; we do, both ways.

Where they differ:

* Batch norm at inference. 2017: ``(x - mean) / (sqrt(var) + 1e-6)``, the epsilon outside the
  root. AlexeyAB folds it into the conv at load (``fuse_conv_batchnorm``) with ``sqrt(var +
  1e-5)`` in double. Each model keeps the rule it was trained with: YOLOv2's numbers are the
  2017 darknet's, and YOLOv3/v4 weights are AlexeyAB's (see :meth:`ConvParams.folded`).
* ``[maxpool]``. 2017: stride defaults to 1, size to stride, padding to ``(size - 1) // 2``; the
  output is ``(H + 2 * padding) // stride`` and the window starts ``padding`` pixels before
  ``y * stride``. AlexeyAB: padding defaults to ``size - 1``, ``out = (H + padding - size) //
  stride + 1`` and the window starts ``padding // 2`` before. Both agree on even inputs and
  differ on odd inputs to stride-2 pools.
* Activations: AlexeyAB's are float32 formulas (``logistic`` is ``logistic_f32`` there) and add
  relu6, swish and mish (see :mod:`kernels.activations`).
* Convolution: AlexeyAB adds ``groups``, ``dilation`` (padding is multiplied by it, and a 1x1
  kernel ignores it) and ``stride_x``/``stride_y``.
"""

from __future__ import annotations

import logging
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import CfgError, WeightsError
from .layers import (
    ACTIVATIONS,
    ALEXEYAB_ACTIVATIONS,
    ConnectedSpec,
    ConvSpec,
    CostSpec,
    CropSpec,
    DropoutSpec,
    LayerSpec,
    MaxPoolSpec,
    RegionSpec,
    ReorgSpec,
    RouteSpec,
    Shape,
    ShortcutSpec,
    SoftmaxSpec,
    UpsampleSpec,
    YoloSpec,
)

log = logging.getLogger(__name__)

SECTION_ALIASES = {
    "net": "net",
    "network": "net",
    "convolutional": "conv",
    "conv": "conv",
    "maxpool": "maxpool",
    "max": "maxpool",
    "route": "route",
    "reorg": "reorg",
    "region": "region",
    "shortcut": "shortcut",
    "upsample": "upsample",
    "yolo": "yolo",
    "connected": "connected",
    "conn": "connected",
    "dropout": "dropout",
    "softmax": "softmax",
    "soft": "softmax",
    "crop": "crop",
    "cost": "cost",
}

# A cfg bigger than this is not a darknet model file; refuse it before reading it whole.
MAX_CFG_BYTES = 4 * 1024 * 1024


@dataclass
class Section:
    """One ``[section]`` of a cfg file with its options, remembering where each came from."""

    name: str
    line: int
    options: dict[str, str] = field(default_factory=dict)
    option_lines: dict[str, int] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class NetInfo:
    """The ``[net]`` section as inference needs it."""

    width: int
    height: int
    channels: int
    batch: int

    @property
    def input_shape(self) -> Shape:
        return (self.channels, self.height, self.width)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed cfg: the input description and every layer's spec, shapes inferred."""

    source: str
    net: NetInfo
    layers: tuple[LayerSpec, ...]
    flavour: str = "2017"  # whose darknet's semantics: "2017" or "alexeyab" (see the module docstring)
    #: The layers whose outputs are the model's outputs, in order, where the model says so (an
    #: ONNX graph's outputs, "onnx" flavour); empty: the yolo heads, else the last layer.
    outputs: tuple[int, ...] = ()

    @property
    def input_shape(self) -> Shape:
        return self.net.input_shape

    def conv_layers(self) -> list[ConvSpec]:
        return [l for l in self.layers if isinstance(l, ConvSpec)]

    def weighted_layers(self) -> list[ConvSpec | ConnectedSpec]:
        """The layers with parameters in the weights file, in file order (conv and connected)."""
        return [l for l in self.layers if isinstance(l, (ConvSpec, ConnectedSpec))]

    def n_params(self) -> int:
        return sum(l.n_params for l in self.layers)

    def weights_nbytes(self, major: int = 0, minor: int = 2) -> int:
        return header_nbytes(major, minor) + 4 * self.n_params()


def _read_sections(text: str, source: str) -> list[Section]:
    sections: list[Section] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        # darknet's strip() removes every whitespace character, not just the ends.
        line = "".join(raw.split())
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            if not line.endswith("]") or len(line) < 3:
                raise CfgError(f"{source}:{lineno}: malformed section header {raw.strip()!r}")
            name = line[1:-1].lower()
            if name not in SECTION_ALIASES:
                raise CfgError(
                    f"{source}:{lineno}: unknown section [{name}] "
                    f"(supported: {', '.join(sorted(set(SECTION_ALIASES)))})"
                )
            sections.append(Section(SECTION_ALIASES[name], lineno))
            continue
        if "=" not in line:
            raise CfgError(f"{source}:{lineno}: expected key=value, got {raw.strip()!r}")
        if not sections:
            raise CfgError(f"{source}:{lineno}: option {raw.strip()!r} before any [section]")
        key, value = line.split("=", 1)
        sec = sections[-1]
        if key in sec.options:  # the first of duplicate keys wins, as in darknet
            log.debug("%s:%d: duplicate key %r ignored (first wins)", source, lineno, key)
            continue
        sec.options[key] = value
        sec.option_lines[key] = lineno
    if not sections:
        raise CfgError(f"{source}: no sections found")
    if sections[0].name != "net":
        raise CfgError(f"{source}:{sections[0].line}: the first section must be [net]")
    return sections


class _Opts:
    """Typed option lookup on one section, with errors that name file, line and key.

    The lookups are ``integer`` and ``string``, not ``int`` and ``str``: methods of those names
    would shadow the builtins in the class body, where the annotations are resolved.
    """

    def __init__(self, sec: Section, source: str) -> None:
        self.sec = sec
        self.source = source

    def where(self, key: str | None = None) -> str:
        line = self.sec.option_lines.get(key, self.sec.line) if key else self.sec.line
        return f"{self.source}:{line}: [{self.sec.name}]"

    def _raw(self, key: str, default: object, required: bool) -> str | None:
        self.sec.used.add(key)
        if key in self.sec.options:
            return self.sec.options[key]
        if required:
            raise CfgError(f"{self.where()} (line {self.sec.line}) is missing required key {key!r}")
        return None if default is None else str(default)

    def integer(self, key: str, default: int | None = None, *, required: bool = False,
            minimum: int | None = None) -> int:
        raw = self._raw(key, default, required)
        if raw is None:
            raise CfgError(f"{self.where()} is missing required key {key!r}")
        try:
            value = int(raw)
        except ValueError:
            raise CfgError(f"{self.where(key)} {key}={raw!r} is not an integer") from None
        if minimum is not None and value < minimum:
            raise CfgError(f"{self.where(key)} {key}={value} must be >= {minimum}")
        return value

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str:
        raw = self._raw(key, default, required)
        if raw is None:
            raise CfgError(f"{self.where()} is missing required key {key!r}")
        return raw

    def floats(self, key: str) -> tuple[float, ...]:
        raw = self._raw(key, None, False)
        if raw is None or raw == "":
            return ()
        try:
            values = tuple(float(v) for v in raw.split(",") if v != "")
        except ValueError:
            raise CfgError(f"{self.where(key)} {key}={raw!r} is not a list of numbers") from None
        if not all(math.isfinite(v) for v in values):
            raise CfgError(f"{self.where(key)} {key}={raw!r} has a non-finite number")
        return values

    def ints(self, key: str, *, required: bool = False) -> tuple[int, ...]:
        raw = self._raw(key, None, required)
        if raw is None:
            raise CfgError(f"{self.where()} is missing required key {key!r}")
        try:
            return tuple(int(v) for v in raw.split(",") if v != "")
        except ValueError:
            raise CfgError(f"{self.where(key)} {key}={raw!r} is not a list of integers") from None

    def unsupported_if_set(self, key: str, what: str) -> None:
        if self.integer(key, 0) != 0:
            raise CfgError(f"{self.where(key)} {key}= is set; {what} is not supported")


FLAVOUR_2017 = "2017"
FLAVOUR_ALEXEYAB = "alexeyab"
FLAVOURS = (FLAVOUR_2017, FLAVOUR_ALEXEYAB)
#: Sections only AlexeyAB darknet (of the two we follow) has; their presence picks its semantics.
_ALEXEYAB_SECTIONS = ("shortcut", "upsample", "yolo")
#: Sections only the 2017 darknet of YOLOv2 is followed for here.
_2017_SECTIONS = ("region", "reorg", "connected", "dropout", "softmax", "crop", "cost")
_NMS_KINDS = ("default", "greedynms")


def _flavour(sections: list[Section], source: str) -> str:
    """Which darknet's semantics a cfg gets: declared by ``[net] darknet=2017|alexeyab`` (a key
    of ours; darknet ignores unknown keys), else chosen from what the cfg uses.

    AlexeyAB's layer kinds ([shortcut], [upsample], [yolo]) or keys (route ``groups``, conv
    ``groups``/``dilation``/``stride_x``/``stride_y``) pick AlexeyAB; [region]/[reorg] pick 2017, as
    does a plain conv/maxpool stack (the existing YOLOv2 behaviour). Both kinds in one cfg without
    a declaration is an error rather than a guess.
    """
    net = sections[0]
    declared = net.options.get("darknet")
    net.used.add("darknet")
    if declared is not None:
        if declared not in FLAVOURS:
            raise CfgError(f"{source}:{net.option_lines['darknet']}: [net] darknet={declared!r} is not one of "
                           f"{', '.join(FLAVOURS)}")
        return declared
    new = old = None
    for sec in sections[1:]:
        opts = sec.options
        marked = sec.name in _ALEXEYAB_SECTIONS
        if sec.name in ("route", "conv"):  # keys 2017 darknet does not have, at a value that matters
            marked = marked or opts.get("groups", "1") != "1"
        if sec.name == "conv":
            marked = marked or opts.get("dilation", "1") != "1" or "stride_x" in opts or "stride_y" in opts
        if new is None and marked:
            new = sec
        if old is None and sec.name in _2017_SECTIONS:
            old = sec
    if new is not None and old is not None:
        raise CfgError(f"{source}: mixes AlexeyAB darknet's [{new.name}] (line {new.line}) with 2017 darknet's "
                       f"[{old.name}] (line {old.line}); declare darknet=2017 or darknet=alexeyab in [net]")
    return FLAVOUR_ALEXEYAB if new is not None else FLAVOUR_2017


def _layer_refs(o: _Opts, key: str, index: int, what: str) -> tuple[int, ...]:
    """Absolute indices of a route's ``layers`` or a shortcut's ``from`` (negative = relative),
    each an earlier layer."""
    refs = o.ints(key, required=True)
    if not refs:
        raise CfgError(f"{o.where(key)} {what} needs at least one layer")
    sources = tuple(r + index if r < 0 else r for r in refs)
    for r, s in zip(refs, sources):
        if not 0 <= s < index:
            later = " (a later layer or itself)" if s >= index else ""
            raise CfgError(f"{o.where(key)} layer {index}: {what} to layer {r} (= {s}) is out of range{later}; "
                           f"it must name one of the layers 0..{index - 1} before it")
    return sources


def _activation(o: _Opts, default: str, flavour: str) -> str:
    """The kernel activation name for a cfg ``activation=`` under ``flavour``."""
    name = o.string("activation", default)
    if flavour == FLAVOUR_ALEXEYAB:
        if name not in ALEXEYAB_ACTIVATIONS:
            raise CfgError(f"{o.where('activation')} activation={name!r} is not supported "
                           f"(supported: {', '.join(ALEXEYAB_ACTIVATIONS)})")
        return ALEXEYAB_ACTIVATIONS[name]
    if name not in ACTIVATIONS:
        hint = " in a 2017 darknet model (add darknet=alexeyab to [net] for AlexeyAB's activations)" \
            if name in ALEXEYAB_ACTIVATIONS else ""
        raise CfgError(f"{o.where('activation')} activation={name!r} is not supported{hint} "
                       f"(supported: {', '.join(ACTIVATIONS)})")
    return name


def _parse_conv(o: _Opts, index: int, shape: Shape, flavour: str) -> ConvSpec:
    c, h, w = shape
    filters = o.integer("filters", required=True, minimum=1)
    size = o.integer("size", required=True, minimum=1)
    pad_flag = o.integer("pad", 0)
    padding = o.integer("padding", 0, minimum=0)
    if pad_flag:
        padding = size // 2
    activation = _activation(o, "logistic", flavour)
    bn = bool(o.integer("batch_normalize", 0))
    for key, what in (("binary", "binary weights"), ("xnor", "XNOR convolution")):
        o.unsupported_if_set(key, what)
    if flavour == FLAVOUR_2017:
        sy = sx = o.integer("stride", 1, minimum=1)
        groups = dilation = 1
        if o.integer("groups", 1) != 1:
            raise CfgError(f"{o.where('groups')} grouped convolution is not supported in a 2017 darknet model")
    else:
        for key, what in (("antialiasing", "antialiasing"), ("share_index", "shared weights"),
                          ("deform", "deformable convolution"), ("sway", "sway"), ("rotate", "rotate"),
                          ("stretch", "stretch"), ("stretch_sway", "stretch_sway"), ("coordconv", "coordconv"),
                          ("cbn", "cross-iteration batch norm")):
            if key == "share_index":
                if key in o.sec.options:
                    raise CfgError(f"{o.where(key)} share_index= is set; shared weights are not supported")
                continue
            o.unsupported_if_set(key, what)
        # parse_convolutional: stride_x/stride_y default to stride unless both are given
        sx = o.integer("stride_x", -1)
        sy = o.integer("stride_y", -1)
        stride = o.integer("stride", 1, minimum=1)
        sx = stride if sx < 1 else sx
        sy = stride if sy < 1 else sy
        groups = o.integer("groups", 1, minimum=1)
        dilation = o.integer("dilation", 1, minimum=1)
        if size == 1:
            dilation = 1  # as darknet: a 1x1 kernel has no taps to spread
        if c % groups or filters % groups:
            raise CfgError(f"{o.where('groups')} layer {index}: groups={groups} must divide the {c} input channels "
                           f"and the {filters} filters")
    span = (size - 1) * dilation + 1
    pad = padding * dilation  # AlexeyAB passes l.pad * l.dilation to im2col
    if h + 2 * pad < span or w + 2 * pad < span:
        raise CfgError(f"{o.where()} conv {size}x{size} (dilation {dilation}) with padding {pad} does not fit its "
                       f"{h}x{w} input")
    ho = (h + 2 * pad - span) // sy + 1
    wo = (w + 2 * pad - span) // sx + 1
    if dilation > 1 and (ho, wo) != ((h + 2 * padding - size) // sy + 1, (w + 2 * padding - size) // sx + 1):
        # darknet sizes the output with the undilated kernel but im2col with the dilated one; where
        # the two disagree its layer reads past its buffers, so there is no darknet result to match
        raise CfgError(f"{o.where('dilation')} layer {index}: dilation {dilation} with size {size} and padding "
                       f"{padding} gives an output size darknet computes inconsistently; not supported")
    return ConvSpec(index, shape, (filters, ho, wo), filters, size, sy, pad, activation, bn, groups, dilation,
                    0 if sx == sy else sx)


def _parse_connected(o: _Opts, index: int, shape: Shape) -> ConnectedSpec:
    """2017 ``parse_connected``: ``output`` (default 1), ``activation`` (default logistic),
    ``batch_normalize``; the input is the previous layer's output flattened."""
    outputs = o.integer("output", 1, minimum=1)
    activation = _activation(o, "logistic", FLAVOUR_2017)
    bn = bool(o.integer("batch_normalize", 0))
    return ConnectedSpec(index, shape, (outputs, 1, 1), outputs, activation, bn)


def _parse_softmax(o: _Opts, index: int, shape: Shape) -> SoftmaxSpec:
    """2017 ``parse_softmax``: ``groups`` (default 1, dividing the inputs), ``temperature`` (1).
    ``spatial`` is read by darknet but its CPU forward pass ignores it; ``tree`` is refused."""
    c, h, w = shape
    groups = o.integer("groups", 1, minimum=1)
    if (c * h * w) % groups:
        raise CfgError(f"{o.where('groups')} layer {index}: softmax groups={groups} does not divide its "
                       f"{c * h * w} inputs")
    temp = o.floats("temperature")
    if len(temp) > 1 or (temp and temp[0] == 0):
        raise CfgError(f"{o.where('temperature')} layer {index}: temperature must be one non-zero number")
    if o.string("tree", "") != "":
        raise CfgError(f"{o.where('tree')} hierarchical softmax (tree=) is not supported")
    o.string("spatial", "0")
    return SoftmaxSpec(index, shape, shape, groups, float(np.float32(temp[0])) if temp else 1.0)


def _parse_crop(o: _Opts, index: int, shape: Shape) -> CropSpec:
    """2017 ``parse_crop`` and ``forward_crop_layer`` when not training: no flip, the centred
    window ``((H - crop_height)/2, (W - crop_width)/2)``, values ``x*2 - 1`` (``x`` with
    ``noadjust=1``). The training-only keys (flip, angle, saturation, exposure, shift) are ignored."""
    c, h, w = shape
    ch = o.integer("crop_height", 1, minimum=1)
    cw = o.integer("crop_width", 1, minimum=1)
    if ch > h or cw > w:
        raise CfgError(f"{o.where()} layer {index}: a {ch}x{cw} crop of a {h}x{w} input")
    for key in ("flip", "angle", "saturation", "exposure", "shift"):
        o.string(key, "0")
    noadjust = bool(o.integer("noadjust", 0))
    return CropSpec(index, shape, (c, ch, cw), (h - ch) // 2, (w - cw) // 2,
                    1.0 if noadjust else 2.0, 0.0 if noadjust else -1.0)


def _parse_maxpool(o: _Opts, index: int, shape: Shape, flavour: str) -> MaxPoolSpec:
    c, h, w = shape
    stride = o.integer("stride", 1, minimum=1)
    size = o.integer("size", stride, minimum=1)
    if flavour == FLAVOUR_2017:
        padding = o.integer("padding", (size - 1) // 2, minimum=0)
        ho = (h + 2 * padding) // stride
        wo = (w + 2 * padding) // stride
        origin = padding
    else:
        for key, what in (("maxpool_depth", "maxpool over channels"), ("antialiasing", "antialiasing")):
            o.unsupported_if_set(key, what)
        if o.integer("stride_x", stride) != stride or o.integer("stride_y", stride) != stride:
            raise CfgError(f"{o.where()} layer {index}: a maxpool with stride_x/stride_y other than stride is "
                           "not supported")
        padding = o.integer("padding", size - 1, minimum=0)
        ho = (h + padding - size) // stride + 1
        wo = (w + padding - size) // stride + 1
        origin = padding // 2  # C's -l.pad / 2 truncates toward zero: -(padding // 2) for padding >= 0
        if h + padding < size or w + padding < size:
            ho = wo = 0
    if ho < 1 or wo < 1:
        raise CfgError(f"{o.where()} maxpool output of a {h}x{w} input would be empty")
    return MaxPoolSpec(index, shape, (c, ho, wo), size, stride, origin)


def _parse_route(o: _Opts, index: int, layers: list[LayerSpec], flavour: str) -> RouteSpec:
    sources = _layer_refs(o, "layers", index, "route")
    # a cfg's layers are all (C, H, W) maps (only ONNX imports have tensors of other ranks)
    src_shapes: list[Shape] = [layers[s].out_shape for s in sources]  # type: ignore[misc]
    hw = {(sh[1], sh[2]) for sh in src_shapes}
    if len(hw) != 1:
        raise CfgError(f"{o.where('layers')} route joins maps of different sizes {src_shapes}")
    (rh, rw), = hw
    groups, group_id = 1, 0
    if flavour == FLAVOUR_ALEXEYAB:
        groups = o.integer("groups", 1, minimum=1)
        group_id = o.integer("group_id", 0, minimum=0)
        if group_id >= groups:
            raise CfgError(f"{o.where('group_id')} layer {index}: group_id={group_id} must be below groups={groups}")
        for s, sh in zip(sources, src_shapes):
            if sh[0] % groups:
                raise CfgError(f"{o.where('groups')} layer {index}: route groups={groups} does not divide layer "
                               f"{s}'s {sh[0]} channels")
    channels = sum(sh[0] // groups for sh in src_shapes)
    return RouteSpec(index, src_shapes[0], (channels, rh, rw), sources, groups, group_id)


def _parse_shortcut(o: _Opts, index: int, shape: Shape, layers: list[LayerSpec]) -> ShortcutSpec:
    for key in ("weights_type", "weights_normalization"):
        value = o.string(key, "none")
        if value != "none":
            raise CfgError(f"{o.where(key)} layer {index}: shortcut {key}={value} is not supported "
                           "(only none: a plain sum)")
    if index == 0:
        raise CfgError(f"{o.where()} a shortcut cannot be the first layer (it adds to the previous one)")
    sources = _layer_refs(o, "from", index, "shortcut")
    for s in sources:
        sh = layers[s].out_shape
        if sh[1:] != shape[1:]:
            raise CfgError(f"{o.where('from')} layer {index}: shortcut from layer {s} ({sh[1]}x{sh[2]}) to a "
                           f"{shape[1]}x{shape[2]} map; the sizes must match")
    activation = _activation(o, "linear", FLAVOUR_ALEXEYAB)
    return ShortcutSpec(index, shape, shape, sources, activation)


def _parse_upsample(o: _Opts, index: int, shape: Shape) -> UpsampleSpec:
    c, h, w = shape
    stride = o.integer("stride", 2)
    if stride < 1:
        raise CfgError(f"{o.where('stride')} layer {index}: upsample stride={stride} (a negative stride is "
                       "darknet's downsampling) is not supported; it must be >= 1")
    scale = o.floats("scale")
    if len(scale) > 1:
        raise CfgError(f"{o.where('scale')} layer {index}: scale must be one number")
    return UpsampleSpec(index, shape, (c, h * stride, w * stride), stride, scale[0] if scale else 1.0)


def _parse_yolo(o: _Opts, index: int, shape: Shape) -> YoloSpec:
    c = shape[0]
    classes = o.integer("classes", 20, minimum=1)
    total = o.integer("num", 1, minimum=1)
    mask = o.ints("mask") if "mask" in o.sec.options else tuple(range(total))
    if not mask or any(not 0 <= m < total for m in mask):
        raise CfgError(f"{o.where('mask')} layer {index}: mask={','.join(map(str, mask))} must name anchors "
                       f"0..{total - 1} (num={total})")
    anchors = o.floats("anchors")
    if anchors and len(anchors) != 2 * total:
        raise CfgError(f"{o.where('anchors')} has {len(anchors)} numbers, num={total} needs {2 * total}")
    if not anchors:
        anchors = (0.5,) * (2 * total)  # darknet's default biases
    if c != len(mask) * (classes + 5):
        raise CfgError(f"{o.where()} layer {index}: yolo expects {len(mask)}*(4+1+{classes}) = "
                       f"{len(mask) * (classes + 5)} input channels, the previous layer gives {c}")
    scale = o.floats("scale_x_y")
    nms_kind = o.string("nms_kind", "default")
    if nms_kind not in _NMS_KINDS:
        raise CfgError(f"{o.where('nms_kind')} layer {index}: nms_kind={nms_kind} is not supported "
                       f"(supported: {', '.join(_NMS_KINDS)})")
    beta = o.floats("beta_nms")
    # anchors are darknet floats (atof into float biases)
    anchors = tuple(float(np.float32(a)) for a in anchors)
    return YoloSpec(index, shape, shape, classes, mask, anchors, scale[0] if scale else 1.0,
                    bool(o.integer("new_coords", 0)), nms_kind, beta[0] if beta else 0.6)


def parse_cfg_text(text: str, source: str = "<cfg>") -> ModelSpec:
    """Parse darknet cfg text into a :class:`ModelSpec`, inferring every layer's shapes.

    The semantics are those of the darknet the model comes from (:func:`_flavour` picks it):
    ``2017`` for YOLOv2 and plain conv/maxpool stacks, ``alexeyab`` for YOLOv3/v4 (see the
    module docstring for what differs).

    Parameters
    ----------
    text : str
        The cfg file's contents.
    source : str
        Name used in error messages (normally the file path).

    Raises
    ------
    CfgError
        With ``file:line`` for unknown sections, missing or malformed keys, unsupported options,
        references to layers that do not exist yet, or shapes that do not work out (a layer whose
        output would be empty, a route of mismatched maps, a head whose input channels do not fit
        its anchors and classes, groups that do not divide the channels).
    """
    sections = _read_sections(text, source)
    flavour = _flavour(sections, source)
    o = _Opts(sections[0], source)
    batch = o.integer("batch", 1, minimum=1)
    subdivisions = o.integer("subdivisions", 1, minimum=1)
    net = NetInfo(
        width=o.integer("width", required=True, minimum=1),
        height=o.integer("height", required=True, minimum=1),
        channels=o.integer("channels", required=True, minimum=1),
        batch=max(1, batch // subdivisions),
    )
    shape: Shape = net.input_shape
    layers: list[LayerSpec] = []
    for index, sec in enumerate(sections[1:]):
        o = _Opts(sec, source)
        c, h, w = shape
        spec: LayerSpec
        if sec.name == "net":
            raise CfgError(f"{source}:{sec.line}: a second [net] section")
        if flavour == FLAVOUR_2017 and sec.name in _ALEXEYAB_SECTIONS:
            raise CfgError(f"{source}:{sec.line}: [{sec.name}] is AlexeyAB darknet's; this cfg declares darknet=2017")
        if flavour == FLAVOUR_ALEXEYAB and sec.name in _2017_SECTIONS:
            raise CfgError(f"{source}:{sec.line}: [{sec.name}] is supported in 2017 darknet models only "
                           "(this cfg is read as AlexeyAB darknet's)")
        if sec.name == "conv":
            spec = _parse_conv(o, index, shape, flavour)
        elif sec.name == "maxpool":
            spec = _parse_maxpool(o, index, shape, flavour)
        elif sec.name == "route":
            spec = _parse_route(o, index, layers, flavour)
        elif sec.name == "shortcut":
            spec = _parse_shortcut(o, index, shape, layers)
        elif sec.name == "upsample":
            spec = _parse_upsample(o, index, shape)
        elif sec.name == "yolo":
            spec = _parse_yolo(o, index, shape)
        elif sec.name == "connected":
            spec = _parse_connected(o, index, shape)
        elif sec.name == "dropout":
            prob = o.floats("probability")
            spec = DropoutSpec(index, shape, shape, prob[0] if prob else 0.5)
        elif sec.name == "softmax":
            spec = _parse_softmax(o, index, shape)
        elif sec.name == "crop":
            spec = _parse_crop(o, index, shape)
        elif sec.name == "cost":
            o.string("type", "sse")  # training only (see CostSpec)
            spec = CostSpec(index, shape, shape)
        elif sec.name == "reorg":
            stride = o.integer("stride", 1, minimum=1)
            for key in ("reverse", "flatten", "extra"):
                o.unsupported_if_set(key, f"reorg {key}")
            if h % stride or w % stride:
                raise CfgError(f"{o.where()} reorg stride {stride} does not divide the {h}x{w} map")
            spec = ReorgSpec(index, shape, (c * stride * stride, h // stride, w // stride), stride)
        elif sec.name == "region":
            coords = o.integer("coords", 4, minimum=1)
            classes = o.integer("classes", 20, minimum=1)
            num = o.integer("num", 1, minimum=1)
            softmax = bool(o.integer("softmax", 0))
            if o.string("tree", "") != "":
                raise CfgError(f"{o.where('tree')} hierarchical softmax (tree=) is not supported")
            anchors = o.floats("anchors")
            if anchors and len(anchors) != 2 * num:
                raise CfgError(f"{o.where('anchors')} has {len(anchors)} numbers, num={num} needs {2 * num}")
            if not anchors:
                anchors = (0.5,) * (2 * num)  # darknet's default biases
            if c != num * (coords + 1 + classes):
                raise CfgError(
                    f"{o.where()} region expects {num}*({coords}+1+{classes}) = "
                    f"{num * (coords + 1 + classes)} input channels, the previous layer gives {c}"
                )
            spec = RegionSpec(index, shape, shape, anchors, classes, coords, num, softmax)
        else:  # pragma: no cover - SECTION_ALIASES and this chain list the same kinds
            raise CfgError(f"{source}:{sec.line}: unhandled section [{sec.name}]")
        unused = set(sec.options) - sec.used
        if unused:
            log.debug("%s:%d: [%s] ignores %s", source, sec.line, sec.name, ", ".join(sorted(unused)))
        layers.append(spec)
        shape = spec.out_shape
    if not layers:
        raise CfgError(f"{source}: no layers after [net]")
    heads = [l for l in layers if isinstance(l, YoloSpec)]
    if len({h.classes for h in heads}) > 1:
        raise CfgError(f"{source}: the [yolo] layers have different classes= "
                       f"({', '.join(f'layer {h.index}: {h.classes}' for h in heads)})")
    return ModelSpec(source, net, tuple(layers), flavour)


def parse_cfg(path: str | os.PathLike[str]) -> ModelSpec:
    """Read and parse a darknet cfg file (see :func:`parse_cfg_text`)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_CFG_BYTES:
            raise CfgError(f"{p}: {size} bytes is too large for a cfg file (limit {MAX_CFG_BYTES})")
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CfgError(f"{p}: not a text file ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise CfgError(f"{p}: cannot read cfg: {exc.strerror or exc}") from None
    return parse_cfg_text(text, str(p))


# --------------------------------------------------------------------------- weights


def header_nbytes(major: int, minor: int) -> int:
    """Bytes of a weights file header: three int32, then ``seen`` as 8 or 4 bytes."""
    return 12 + (8 if _seen_is_size_t(major, minor) else 4)


def _seen_is_size_t(major: int, minor: int) -> bool:
    return (major * 10 + minor) >= 2 and major < 1000 and minor < 1000


@dataclass
class ConvParams:
    """Raw parameters of one convolutional (or connected) layer, as stored in the weights file."""

    biases: np.ndarray
    weights: np.ndarray  # (filters, channels, k, k); a [connected] layer's: (outputs, inputs)
    scales: np.ndarray | None = None
    rolling_mean: np.ndarray | None = None
    rolling_variance: np.ndarray | None = None

    def folded(self, flavour: str = "2017") -> tuple[np.ndarray, np.ndarray]:
        """Weights and bias with batch norm folded in, by the rule of the model's darknet.

        ``"2017"`` (YOLOv2): ``y = (conv - mean) / (sqrt(var) + 1e-6) * scale + bias`` (the
        epsilon is added to the square root, in double precision since C's ``sqrt`` is double).
        Folding gives ``w' = w * k`` and ``b' = bias - mean * k`` with ``k = scale / (sqrt(var) +
        1e-6)``, computed in float64 and rounded once to float32; the weights are scaled in
        float32 (one rounding of a float32 product).

        ``"alexeyab"`` (YOLOv3/v4): AlexeyAB's ``fuse_conv_batchnorm`` exactly: ``k = scale /
        sqrt(double(var) + .00001)``, ``w' = float(double(w) * k)``, ``b' = float(bias -
        double(scale) * mean / sqrt(double(var) + .00001))``.
        """
        if self.scales is None:
            return self.weights.astype(np.float32, copy=True), self.biases.astype(np.float32, copy=True)
        # read_weights always sets all three batch-norm arrays together, but ConvParams is public:
        # scales without mean and variance cannot be folded, so say so rather than fail on None.
        if self.rolling_mean is None or self.rolling_variance is None:
            raise WeightsError("batch-norm scales given without rolling mean and variance")
        var = self.rolling_variance.astype(np.float64)
        if np.any(var < 0):
            raise WeightsError("batch-norm variance is negative")
        if flavour == "alexeyab":
            root = np.sqrt(var + 0.00001)
            k = self.scales.astype(np.float64) / root
            b = (self.biases.astype(np.float64)
                 - self.scales.astype(np.float64) * self.rolling_mean.astype(np.float64) / root).astype(np.float32)
            w = np.empty(self.weights.shape, np.float32)
            # filter by filter: a float64 copy of a whole YOLOv4 layer would be 38 MB more on a Pi
            for f in range(len(w)):
                w[f] = self.weights[f].astype(np.float64) * k[f]
            return w, b
        k = self.scales.astype(np.float64) / (np.sqrt(var) + 1e-6)
        # The per-channel factor is computed in double, as darknet does; the weights are scaled
        # in float32 (one rounding of a float32 product) rather than through a float64 copy of
        # all 51 M YOLOv2 weights, which would cost 400 MB and a second of a Pi's start-up.
        w = self.weights.astype(np.float32) * k.astype(np.float32).reshape((-1,) + (1,) * (self.weights.ndim - 1))
        b = (self.biases.astype(np.float64) - self.rolling_mean.astype(np.float64) * k).astype(np.float32)
        return w, b


def _expected_layout(spec: ModelSpec) -> list[tuple[ConvSpec | ConnectedSpec, int]]:
    return [(l, l.n_params) for l in spec.weighted_layers()]


@dataclass(frozen=True)
class ParamOffsets:
    """Where one layer's arrays start in a weights file, in bytes from the file's start (``-1``
    for batch-norm arrays of a layer without batch norm). Each per-channel array holds
    ``filters`` float32; ``weights`` holds ``filters`` rows of ``row`` float32, output by output."""

    biases: int
    scales: int
    mean: int
    variance: int
    weights: int
    filters: int
    row: int  # float32 per output channel of the weights (C/groups*k*k, or a connected layer's inputs)


def param_offsets(spec: ModelSpec, header: int) -> dict[int, ParamOffsets]:
    """Byte offsets of every weighted layer's arrays, for a file whose header is ``header`` bytes.

    Conv (``load_convolutional_weights``): biases, [scales, rolling mean, rolling variance],
    weights. Connected (``load_connected_weights``): biases, weights, [scales, rolling mean,
    rolling variance]. Both darknets, 2017 ``src/parser.c``.
    """
    out: dict[int, ParamOffsets] = {}
    pos = header
    for layer in spec.weighted_layers():
        n = layer.filters if isinstance(layer, ConvSpec) else layer.outputs
        row = int(np.prod(layer.weight_shape[1:]))
        bn = layer.batch_normalize
        biases = pos
        if isinstance(layer, ConvSpec):
            scales, mean, var = ((pos + 4 * n, pos + 8 * n, pos + 12 * n) if bn else (-1, -1, -1))
            weights = pos + (16 if bn else 4) * n
        else:
            weights = pos + 4 * n
            end = weights + 4 * n * row
            scales, mean, var = ((end, end + 4 * n, end + 8 * n) if bn else (-1, -1, -1))
        out[layer.index] = ParamOffsets(biases, scales, mean, var, weights, n, row)
        pos += 4 * layer.n_params
    return out


def read_weights(path: str | os.PathLike[str], spec: ModelSpec) -> dict[int, ConvParams]:
    """Read a darknet weights file for ``spec``.

    Returns a dict from conv layer index to its raw parameters.

    Raises
    ------
    WeightsError
        If the file cannot be read, its header is short, or its length is not exactly what the
        cfg needs (the message gives the expected and actual byte counts), or it holds NaN/inf.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise WeightsError(f"{p}: cannot read weights: {exc.strerror or exc}") from None
    if len(data) < 16:
        raise WeightsError(f"{p}: {len(data)} bytes is too short for a darknet weights header")
    major, minor, revision = struct.unpack_from("<3i", data, 0)
    hdr = header_nbytes(major, minor)
    expected = hdr + 4 * sum(n for _, n in _expected_layout(spec))
    if len(data) != expected:
        raise WeightsError(
            f"{p}: expected {expected} bytes for {spec.source} "
            f"({len(spec.conv_layers())} conv layers, {spec.n_params()} parameters, "
            f"{hdr}-byte header for version {major}.{minor}.{revision}), file has {len(data)} bytes"
        )
    if _is_transposed(major, minor) and any(isinstance(l, ConnectedSpec) for l in spec.layers):
        log.info("%s: version %d.%d stores connected weights transposed (inputs x outputs)", p, major, minor)
    floats = np.frombuffer(data, dtype="<f4", offset=hdr)
    if not np.all(np.isfinite(floats)):
        bad = int(np.flatnonzero(~np.isfinite(floats))[0])
        raise WeightsError(f"{p}: non-finite parameter at byte {hdr + 4 * bad}")
    params: dict[int, ConvParams] = {}
    pos = 0

    def take(n: int) -> np.ndarray:
        nonlocal pos
        out = floats[pos:pos + n].astype(np.float32)
        pos += n
        return out

    for layer, _ in _expected_layout(spec):
        scales = mean = var = None
        if isinstance(layer, ConnectedSpec):
            # load_connected_weights: biases, weights, then batch norm; transposed files (major or
            # minor above 1000) hold the matrix as inputs x outputs
            n = layer.outputs
            biases = take(n)
            if _is_transposed(major, minor):
                weights = np.ascontiguousarray(take(n * layer.inputs).reshape(layer.inputs, n).T)
            else:
                weights = take(n * layer.inputs).reshape(layer.weight_shape)
            if layer.batch_normalize:
                scales, mean, var = take(n), take(n), take(n)
            params[layer.index] = ConvParams(biases, weights, scales, mean, var)
            continue
        n = layer.filters
        biases = take(n)
        if layer.batch_normalize:
            scales, mean, var = take(n), take(n), take(n)
        shape = layer.weight_shape
        weights = take(int(np.prod(shape))).reshape(shape)
        params[layer.index] = ConvParams(biases, weights, scales, mean, var)
    return params


def _is_transposed(major: int, minor: int) -> bool:
    """2017 ``load_weights_upto``: ``transpose = (major > 1000) || (minor > 1000)``."""
    return major > 1000 or minor > 1000


def random_weights(spec: ModelSpec, seed: int) -> dict[int, ConvParams]:
    """Deterministic random parameters for ``spec`` (real weights cannot be downloaded here).

    He-scaled (uniform) weights and batch-norm statistics near identity keep activations O(1) through
    deep stacks, so tiled-vs-full comparisons exercise realistic magnitudes rather than
    overflowing or collapsing to zero.
    """
    rng = np.random.default_rng(seed)
    params: dict[int, ConvParams] = {}
    for fc in (l for l in spec.layers if isinstance(l, ConnectedSpec)):
        # drawn from a generator of its own so that adding [connected] support left the random
        # weights of every conv-only model exactly as they were
        params[fc.index] = _random_connected(fc, np.random.default_rng([seed, fc.index]))
    for layer in spec.conv_layers():
        n, c, k = layer.filters, layer.in_shape[0] // layer.groups, layer.size
        fan_in = c * k * k
        # He-uniform weights, U(-a, a) with a = sqrt(6 / fan_in) (the variance of He-normal),
        # drawn as float32 in place: 4x faster than normal draws for YOLOv2's 51 M parameters,
        # which is most of a node's start-up when it runs on random weights
        weights = rng.random((n, c, k, k), dtype=np.float32)
        weights -= np.float32(0.5)
        weights *= np.float32(2.0 * math.sqrt(6.0 / fan_in))
        biases = rng.standard_normal(n, dtype=np.float32) * np.float32(0.1)
        if layer.batch_normalize:
            scales = rng.uniform(0.5, 1.5, n).astype(np.float32)
            mean = rng.standard_normal(n, dtype=np.float32) * np.float32(0.1)
            var = rng.uniform(0.5, 1.5, n).astype(np.float32)
            params[layer.index] = ConvParams(biases, weights, scales, mean, var)
        else:
            params[layer.index] = ConvParams(biases, weights)
    return params


def _random_connected(layer: ConnectedSpec, rng: np.random.Generator) -> ConvParams:
    """He-uniform weights (outputs, inputs) and near-identity batch norm, as for conv layers."""
    n, c = layer.outputs, layer.inputs
    weights = rng.random((n, c), dtype=np.float32)
    weights -= np.float32(0.5)
    weights *= np.float32(2.0 * math.sqrt(6.0 / c))
    biases = rng.standard_normal(n, dtype=np.float32) * np.float32(0.1)
    if not layer.batch_normalize:
        return ConvParams(biases, weights)
    scales = rng.uniform(0.5, 1.5, n).astype(np.float32)
    mean = rng.standard_normal(n, dtype=np.float32) * np.float32(0.1)
    var = rng.uniform(0.5, 1.5, n).astype(np.float32)
    return ConvParams(biases, weights, scales, mean, var)


def write_weights(path: str | os.PathLike[str], spec: ModelSpec, params: dict[int, ConvParams],
                  *, version: tuple[int, int, int] = (0, 2, 0), seen: int = 0) -> int:
    """Write ``params`` in darknet's binary format; returns the number of bytes written."""
    major, minor, revision = version
    chunks: list[bytes] = [struct.pack("<3i", major, minor, revision)]
    chunks.append(struct.pack("<Q" if _seen_is_size_t(major, minor) else "<i", seen))
    if _is_transposed(major, minor) and any(isinstance(l, ConnectedSpec) for l in spec.layers):
        raise WeightsError(f"version {major}.{minor} would mean transposed connected weights; not written")
    for layer in spec.weighted_layers():
        p = params[layer.index]
        n = layer.filters if isinstance(layer, ConvSpec) else layer.outputs
        parts: Iterable[np.ndarray] = [p.biases]
        if layer.batch_normalize:
            # A real check, not an assert: under python -O a None here would be written as one NaN.
            if p.scales is None or p.rolling_mean is None or p.rolling_variance is None:
                raise WeightsError(f"layer {layer.index} has batch_normalize=1 but its parameters "
                                   "lack scales, rolling mean or rolling variance")
            parts = [p.biases, p.scales, p.rolling_mean, p.rolling_variance]
        if tuple(p.weights.shape) != layer.weight_shape or any(a.shape != (n,) for a in parts):
            raise WeightsError(f"layer {layer.index}: parameters of shapes {p.weights.shape} and "
                               f"{[a.shape for a in parts]} do not fit the cfg's {layer.weight_shape}")
        parts = list(parts)
        # conv: biases, [bn], weights; connected: biases, weights, [bn] (see param_offsets)
        order = [*parts, p.weights] if isinstance(layer, ConvSpec) else [parts[0], p.weights, *parts[1:]]
        for a in order:
            chunks.append(np.ascontiguousarray(a, dtype="<f4").tobytes())
    blob = b"".join(chunks)
    Path(path).write_bytes(blob)
    return len(blob)
