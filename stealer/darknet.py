"""Darknet model format: cfg parsing with shape inference, and the binary weights file.

Semantics follow the 2017 darknet that DeepThings builds on (``src/parser.c``):

* Every line is stripped of *all* whitespace (darknet's ``strip`` also removes inner spaces, so
  ``anchors = 1, 2`` reads as ``anchors=1,2``). Lines starting with ``#`` or ``;`` are comments.
* The first of duplicate keys wins (darknet's ``option_find`` returns the first match).
* ``[net]`` batch is divided by subdivisions.
* A convolution with no ``activation=`` line is **logistic**; ``pad=1`` means ``padding = size // 2``.
* ``[maxpool]``: stride defaults to 1, size to stride, padding to ``(size - 1) // 2``; the output is
  ``(H + 2 * padding) // stride`` and the window starts ``padding`` pixels before ``y * stride``
  (newer darknet forks use ``padding = size - 1``, ``out = (H + padding - size) // stride + 1``;
  both agree on even inputs and differ on odd inputs to stride-2 pools; we follow 2017 darknet).
* Weights: int32 major, minor, revision; ``seen`` is a size_t (8 bytes) when
  ``major * 10 + minor >= 2`` and both are below 1000, else an int32; then per convolutional
  layer: biases, [scales, rolling mean, rolling variance if batch_normalize], weights in
  (filters, channels, k, k) order. Darknet never checks the file length; we do, both ways.
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
    ConvSpec,
    LayerSpec,
    MaxPoolSpec,
    RegionSpec,
    ReorgSpec,
    RouteSpec,
    Shape,
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

    @property
    def input_shape(self) -> Shape:
        return self.net.input_shape

    def conv_layers(self) -> list[ConvSpec]:
        return [l for l in self.layers if isinstance(l, ConvSpec)]

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


def parse_cfg_text(text: str, source: str = "<cfg>") -> ModelSpec:
    """Parse darknet cfg text into a :class:`ModelSpec`, inferring every layer's shapes.

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
        or shapes that do not work out (a layer whose output would be empty, a route of mismatched
        maps, a region whose input channels do not fit its anchors and classes).
    """
    sections = _read_sections(text, source)
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
        if sec.name == "conv":
            filters = o.integer("filters", required=True, minimum=1)
            size = o.integer("size", required=True, minimum=1)
            stride = o.integer("stride", 1, minimum=1)
            pad_flag = o.integer("pad", 0)
            padding = o.integer("padding", 0, minimum=0)
            if pad_flag:
                padding = size // 2
            activation = o.string("activation", "logistic")
            if activation not in ACTIVATIONS:
                raise CfgError(
                    f"{o.where('activation')} activation={activation!r} is not supported "
                    f"(supported: {', '.join(ACTIVATIONS)})"
                )
            bn = bool(o.integer("batch_normalize", 0))
            for key, what in (("binary", "binary weights"), ("xnor", "XNOR convolution")):
                o.unsupported_if_set(key, what)
            if o.integer("groups", 1) != 1:
                raise CfgError(f"{o.where('groups')} grouped convolution is not supported")
            ho = (h + 2 * padding - size) // stride + 1
            wo = (w + 2 * padding - size) // stride + 1
            if h + 2 * padding < size or w + 2 * padding < size:
                raise CfgError(
                    f"{o.where()} conv {size}x{size} with padding {padding} does not fit its "
                    f"{h}x{w} input"
                )
            spec = ConvSpec(index, shape, (filters, ho, wo), filters, size, stride, padding,
                            activation, bn)
        elif sec.name == "maxpool":
            stride = o.integer("stride", 1, minimum=1)
            size = o.integer("size", stride, minimum=1)
            padding = o.integer("padding", (size - 1) // 2, minimum=0)
            ho = (h + 2 * padding) // stride
            wo = (w + 2 * padding) // stride
            if ho < 1 or wo < 1:
                raise CfgError(f"{o.where()} maxpool output of a {h}x{w} input would be empty")
            spec = MaxPoolSpec(index, shape, (c, ho, wo), size, stride, padding)
        elif sec.name == "route":
            refs = o.ints("layers", required=True)
            if not refs:
                raise CfgError(f"{o.where('layers')} route needs at least one layer")
            sources = tuple(r + index if r < 0 else r for r in refs)
            for r, s in zip(refs, sources):
                if not 0 <= s < index:
                    raise CfgError(f"{o.where('layers')} route to layer {r} (= {s}) is out of range")
            src_shapes = [layers[s].out_shape for s in sources]
            hw = {(sh[1], sh[2]) for sh in src_shapes}
            if len(hw) != 1:
                raise CfgError(f"{o.where('layers')} route joins maps of different sizes {src_shapes}")
            (rh, rw), = hw
            spec = RouteSpec(index, src_shapes[0], (sum(sh[0] for sh in src_shapes), rh, rw), sources)
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
    return ModelSpec(source, net, tuple(layers))


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
    """Raw parameters of one convolutional layer, as stored in the weights file."""

    biases: np.ndarray
    weights: np.ndarray  # (filters, channels, k, k)
    scales: np.ndarray | None = None
    rolling_mean: np.ndarray | None = None
    rolling_variance: np.ndarray | None = None

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """Weights and bias with batch norm folded in, as darknet's inference computes it.

        darknet: ``y = (conv - mean) / (sqrt(var) + 1e-6) * scale + bias`` (the epsilon is added
        to the square root, in double precision since C's ``sqrt`` is double). Folding gives
        ``w' = w * k`` and ``b' = bias - mean * k`` with ``k = scale / (sqrt(var) + 1e-6)``,
        computed in float64 and rounded once to float32.
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
        k = self.scales.astype(np.float64) / (np.sqrt(var) + 1e-6)
        # The per-channel factor is computed in double, as darknet does; the weights are scaled
        # in float32 (one rounding of a float32 product) rather than through a float64 copy of
        # all 51 M YOLOv2 weights, which would cost 400 MB and a second of a Pi's start-up.
        w = self.weights.astype(np.float32) * k.astype(np.float32)[:, None, None, None]
        b = (self.biases.astype(np.float64) - self.rolling_mean.astype(np.float64) * k).astype(np.float32)
        return w, b


def _expected_layout(spec: ModelSpec) -> list[tuple[ConvSpec, int]]:
    return [(l, l.n_params) for l in spec.conv_layers()]


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
        n = layer.filters
        c = layer.in_shape[0]
        biases = take(n)
        scales = mean = var = None
        if layer.batch_normalize:
            scales, mean, var = take(n), take(n), take(n)
        weights = take(n * c * layer.size * layer.size).reshape(n, c, layer.size, layer.size)
        params[layer.index] = ConvParams(biases, weights, scales, mean, var)
    return params


def random_weights(spec: ModelSpec, seed: int) -> dict[int, ConvParams]:
    """Deterministic random parameters for ``spec`` (real weights cannot be downloaded here).

    He-scaled (uniform) weights and batch-norm statistics near identity keep activations O(1) through
    deep stacks, so tiled-vs-full comparisons exercise realistic magnitudes rather than
    overflowing or collapsing to zero.
    """
    rng = np.random.default_rng(seed)
    params: dict[int, ConvParams] = {}
    for layer in spec.conv_layers():
        n, c, k = layer.filters, layer.in_shape[0], layer.size
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


def write_weights(path: str | os.PathLike[str], spec: ModelSpec, params: dict[int, ConvParams],
                  *, version: tuple[int, int, int] = (0, 2, 0), seen: int = 0) -> int:
    """Write ``params`` in darknet's binary format; returns the number of bytes written."""
    major, minor, revision = version
    chunks: list[bytes] = [struct.pack("<3i", major, minor, revision)]
    chunks.append(struct.pack("<Q" if _seen_is_size_t(major, minor) else "<i", seen))
    for layer in spec.conv_layers():
        p = params[layer.index]
        parts: Iterable[np.ndarray] = [p.biases]
        if layer.batch_normalize:
            # A real check, not an assert: under python -O a None here would be written as one NaN.
            if p.scales is None or p.rolling_mean is None or p.rolling_variance is None:
                raise WeightsError(f"layer {layer.index} has batch_normalize=1 but its parameters "
                                   "lack scales, rolling mean or rolling variance")
            parts = [p.biases, p.scales, p.rolling_mean, p.rolling_variance]
        for a in (*parts, p.weights):
            chunks.append(np.ascontiguousarray(a, dtype="<f4").tobytes())
    blob = b"".join(chunks)
    Path(path).write_bytes(blob)
    return len(blob)
