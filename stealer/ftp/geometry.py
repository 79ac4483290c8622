"""Region arithmetic for fused tile partitioning: pure integer math, no arrays.

A *region* is a half-open rectangle ``(y0, y1, x0, x1)`` in the coordinates of one feature map
(rows ``y0 .. y1-1``, columns ``x0 .. x1-1``). Empty regions have ``y1 <= y0`` or ``x1 <= x0``;
:data:`EMPTY` is the canonical one. A *region set* is a list of regions whose union is meant;
the functions here keep the ones they return disjoint.

Rows and columns are independent (every fused layer is separable in its geometry), so the layer
mapping is written once per axis (:meth:`Window.back`) and applied to both.

A fused block may be a DAG. Each fusable layer kind has two small rules here: a *builder*
(:data:`WINDOW_BUILDERS`, spec type -> :class:`Window`) and a *region rule* (:data:`REGION_RULES`,
kind -> ``input_regions(window, out_region) -> [(source layer, region)]``: what each source must
hold so that ``out_region`` of the layer can be computed). A spec type without a builder is a
block boundary. Adding a spatially local layer kind (say, an ONNX elementwise op) takes one entry
in each table and one compute rule in :mod:`stealer.ftp.execute`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from ..errors import PlanError
from ..layers import ConvSpec, CropSpec, LayerSpec, MaxPoolSpec, RouteSpec, ShortcutSpec, UpsampleSpec, YoloSpec

log = logging.getLogger(__name__)

Rect = tuple[int, int, int, int]
"""Half-open region ``(y0, y1, x0, x1)`` in map coordinates."""

EMPTY: Rect = (0, 0, 0, 0)


# ------------------------------------------------------------------------------------ rectangles
def is_empty(r: Rect) -> bool:
    """True if ``r`` holds no pixel."""
    return r[1] <= r[0] or r[3] <= r[2]


def area(r: Rect) -> int:
    """Number of pixels of ``r`` (0 if empty)."""
    return 0 if is_empty(r) else (r[1] - r[0]) * (r[3] - r[2])


def height(r: Rect) -> int:
    """Rows of ``r`` (0 if empty)."""
    return max(0, r[1] - r[0])


def width(r: Rect) -> int:
    """Columns of ``r`` (0 if empty)."""
    return max(0, r[3] - r[2])


def intersect(a: Rect, b: Rect) -> Rect:
    """The intersection of two regions (:data:`EMPTY` if they do not meet)."""
    r = (max(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), min(a[3], b[3]))
    return EMPTY if is_empty(r) else r


def contains(outer: Rect, inner: Rect) -> bool:
    """True if every pixel of ``inner`` lies in ``outer`` (an empty ``inner`` always does)."""
    if is_empty(inner):
        return True
    return outer[0] <= inner[0] and inner[1] <= outer[1] and outer[2] <= inner[2] and inner[3] <= outer[3]


def bbox(rects: Iterable[Rect]) -> Rect:
    """Smallest region containing every non-empty region of ``rects`` (:data:`EMPTY` if none)."""
    rs = [r for r in rects if not is_empty(r)]
    if not rs:
        return EMPTY
    return (min(r[0] for r in rs), max(r[1] for r in rs), min(r[2] for r in rs), max(r[3] for r in rs))


def relative(r: Rect, origin: Rect) -> tuple[slice, slice]:
    """Row and column slices that select ``r`` inside an array covering ``origin``."""
    return slice(r[0] - origin[0], r[1] - origin[0]), slice(r[2] - origin[2], r[3] - origin[2])


def union_area(rects: Sequence[Rect]) -> int:
    """Pixels covered by the union of ``rects`` (overlaps counted once)."""
    return sum(area(c) for c, _ in decompose(rects, ()))


# ------------------------------------------------------------------------------------ partitions
def split_even(n: int, parts: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` into ``parts`` contiguous half-open ranges whose sizes differ by at most 1.

    The larger ranges are spread out (``i*n // parts``) rather than bunched at one end, so no
    side of the map gets all the big tiles.
    """
    if parts < 1 or parts > n:
        raise PlanError(f"cannot split {n} rows/columns into {parts} non-empty parts")
    return [(i * n // parts, (i + 1) * n // parts) for i in range(parts)]


def grid_tiles(h: int, w: int, rows: int, cols: int) -> list[Rect]:
    """The ``rows x cols`` output tiles of an ``h x w`` map, row-major; they partition the map."""
    ys = split_even(h, rows)
    xs = split_even(w, cols)
    return [(y0, y1, x0, x1) for y0, y1 in ys for x0, x1 in xs]


def decompose(targets: Sequence[Rect], sources: Sequence[Rect]) -> list[tuple[Rect, int]]:
    """Cut the union of ``targets`` into disjoint rectangles, each labelled with the first source
    that covers it (its index in ``sources``) or -1 where no source does.

    The cut uses the elementary cells between all rectangle edges, so any arrangement (L shapes,
    holes, sources covering everything) works; cells with the same label are then merged into
    row runs and the runs into rectangles, which keeps the piece count small for the few, mostly
    aligned rectangles fused tiles produce.

    Parameters
    ----------
    targets : sequence of Rect
        Regions whose union is to be covered (they may overlap each other).
    sources : sequence of Rect
        Candidate suppliers in priority order.

    Returns
    -------
    list of (Rect, int)
        Disjoint pieces whose union is the union of ``targets``.
    """
    targets = [t for t in targets if not is_empty(t)]
    if not targets:
        return []
    box = bbox(targets)
    clipped = [intersect(s, box) for s in sources]
    ys = sorted({v for t in targets for v in (t[0], t[1])}
                | {v for s in clipped if not is_empty(s) for v in (s[0], s[1])})
    xs = sorted({v for t in targets for v in (t[2], t[3])}
                | {v for s in clipped if not is_empty(s) for v in (s[2], s[3])})

    def label(y: int, x: int) -> int | None:
        if not any(t[0] <= y < t[1] and t[2] <= x < t[3] for t in targets):
            return None
        for i, s in enumerate(clipped):
            if s[0] <= y < s[1] and s[2] <= x < s[3]:
                return i
        return -1

    # Row bands: horizontal runs of equal label; then merge vertically identical runs.
    open_runs: dict[tuple[int, int, int], int] = {}  # (x0, x1, label) -> y0 of the growing piece
    pieces: list[tuple[Rect, int]] = []
    for bi in range(len(ys) - 1):
        y = ys[bi]
        runs: list[tuple[int, int, int]] = []
        for xi in range(len(xs) - 1):
            lab = label(y, xs[xi])
            if lab is None:
                continue
            if runs and runs[-1][1] == xs[xi] and runs[-1][2] == lab:
                runs[-1] = (runs[-1][0], xs[xi + 1], lab)
            else:
                runs.append((xs[xi], xs[xi + 1], lab))
        current = set(runs)
        for key in list(open_runs):
            if key not in current:
                pieces.append(((open_runs.pop(key), y, key[0], key[1]), key[2]))
        for key in runs:
            open_runs.setdefault(key, y)
    for key, y0 in open_runs.items():
        pieces.append(((y0, ys[-1], key[0], key[1]), key[2]))
    pieces.sort()
    return pieces


def subtract(targets: Sequence[Rect], remove: Sequence[Rect]) -> list[Rect]:
    """Disjoint rectangles covering ``union(targets) - union(remove)``."""
    return [r for r, lab in decompose(targets, list(remove)) if lab == -1]


# ------------------------------------------------------------------------------------ layer windows
@dataclass(frozen=True, slots=True)
class Window:
    """The sliding window of one fused layer, as region math needs it.

    Output row ``y`` reads input rows ``y*stride - pad .. y*stride - pad + size - 1``; rows
    outside ``0 .. in_h-1`` are zeros (conv) or skipped (darknet maxpool). Columns likewise.
    """

    index: int
    kind: str  # "conv" | "maxpool"
    size: int
    stride: int
    pad: int
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    dilation: int = 1  # conv: taps ``dilation`` pixels apart, so a window spans (size-1)*dilation+1
    groups: int = 1  # conv: grouped (same window; only the FLOPs and weights shrink); route: channel chunks
    sources: tuple[int, ...] = ()  # layers read other than the previous one (route: all it reads; shortcut: its ``from``)
    group_id: int = 0  # route: the channel chunk of each source it takes

    @classmethod
    def of(cls, layer: LayerSpec, layers: Sequence[LayerSpec] | None = None) -> "Window":
        """The window of a fusable layer (:class:`PlanError` for a kind without a builder in
        :data:`WINDOW_BUILDERS`, and for a layer its builder refuses, such as a conv whose row
        and column strides differ). ``layers``: the model's layers (a shortcut's builder checks
        that its sources have its shape)."""
        build = WINDOW_BUILDERS.get(type(layer))
        if build is None:
            raise PlanError(f"layer {layer.index} is a {layer.kind}; it cannot be fused "
                            f"(fusable kinds: {', '.join(sorted(REGION_RULES))})")
        return build(layer, layers)

    @property
    def inputs(self) -> tuple[int, ...]:
        """Layers this one reads (-1: the frame), in the order its rule lists them."""
        if self.kind == "route":
            return self.sources
        return (self.index - 1,) + self.sources

    def input_regions(self, r: Rect) -> list[tuple[int, Rect]]:
        """(source layer, region of its output) needed to compute output region ``r`` (its
        kind's rule in :data:`REGION_RULES`); nothing for an empty ``r``."""
        if is_empty(r):
            return []
        return REGION_RULES[self.kind](self, r)

    @property
    def span(self) -> int:
        """Input rows (or columns) one output row's window covers, first tap to last."""
        return (self.size - 1) * self.dilation + 1

    def first(self, y: int) -> int:
        """First input row (unclipped, may be negative) that output row ``y`` reads."""
        return y * self.stride - self.pad

    def receptive(self, r: Rect) -> Rect:
        """Unclipped input rows/columns the output region ``r`` reads (padding included).

        For a dilated conv this is the span from the first tap to the last: the rows between taps
        are not read but are included, so the region is one rectangle; every in-map pixel a tap
        reads is inside it, which is all the executor needs."""
        if is_empty(r):
            return EMPTY
        k = self.span
        return (self.first(r[0]), self.first(r[1] - 1) + k, self.first(r[2]), self.first(r[3] - 1) + k)

    def back(self, r: Rect) -> Rect:
        """Input region needed to compute output region ``r``: its receptive field clipped to the map
        (conv and maxpool; other kinds: see :meth:`input_regions`)."""
        if is_empty(r):
            return EMPTY
        _, h, w = self.in_shape
        return intersect(self.receptive(r), (0, h, 0, w))

    @property
    def flops_per_pixel(self) -> int:
        """FLOPs (2 per multiply-accumulate) of one output pixel, all channels; 0 for maxpool
        (comparisons are not counted, as in darknet's and DeepThings' figures)."""
        if self.kind != "conv":
            return 0
        return 2 * (self.in_shape[0] // self.groups) * self.size * self.size * self.out_shape[0]

    def flops(self, r: Rect) -> int:
        """FLOPs of computing output region ``r``."""
        return self.flops_per_pixel * area(r)

    def out_bytes(self, r: Rect) -> int:
        """float32 bytes of output region ``r``, all channels."""
        return 4 * self.out_shape[0] * area(r)

    def in_bytes(self, r: Rect) -> int:
        """float32 bytes of input region ``r``, all channels."""
        return 4 * self.in_shape[0] * area(r)

    @property
    def weight_bytes(self) -> int:
        """float32 bytes of the folded weights and bias (0 for maxpool)."""
        if self.kind != "conv":
            return 0
        co, ci = self.out_shape[0], self.in_shape[0] // self.groups
        return 4 * (co * ci * self.size * self.size + co)

    def in_map(self) -> Rect:
        """The whole input map as a region."""
        return (0, self.in_shape[1], 0, self.in_shape[2])

    def out_map(self) -> Rect:
        """The whole output map as a region."""
        return (0, self.out_shape[1], 0, self.out_shape[2])

    def check_windows(self) -> None:
        """Raise :class:`PlanError` if some output position's window lies wholly in the padding
        (conv and maxpool; nothing to check for other kinds).

        Such positions (a maxpool of size 3 and stride 1 under the 2017 rule, or a conv with
        ``pad >= size``) read no input pixel at all, so no input region can stand for them.
        """
        if self.kind not in ("conv", "maxpool"):
            return
        for axis, (n_in, n_out) in (("row", (self.in_shape[1], self.out_shape[1])),
                                    ("column", (self.in_shape[2], self.out_shape[2]))):
            if self.first(0) + self.span <= 0 or self.first(n_out - 1) >= n_in:
                raise PlanError(
                    f"layer {self.index} ({self.kind} {self.size}/{self.stride} pad {self.pad}) has "
                    f"output {axis}s whose window lies wholly in the padding of its {n_in}-wide input; "
                    "such a layer cannot be fused")


# ------------------------------------------------------------------------------------ per-kind rules
def _build_conv(layer: LayerSpec, layers: Sequence[LayerSpec] | None) -> Window:
    assert isinstance(layer, ConvSpec)
    if layer.strides[0] != layer.strides[1]:
        raise PlanError(f"layer {layer.index} is a conv with stride_y {layer.strides[0]} and stride_x "
                        f"{layer.strides[1]}; only equal strides can be fused")
    return Window(layer.index, layer.kind, layer.size, layer.stride, layer.pad, tuple(layer.in_shape),  # type: ignore[arg-type]
                  tuple(layer.out_shape), layer.dilation, layer.groups)  # type: ignore[arg-type]


def _build_maxpool(layer: LayerSpec, layers: Sequence[LayerSpec] | None) -> Window:
    assert isinstance(layer, MaxPoolSpec)
    return Window(layer.index, layer.kind, layer.size, layer.stride, layer.pad,
                  tuple(layer.in_shape), tuple(layer.out_shape))  # type: ignore[arg-type]


def _build_upsample(layer: LayerSpec, layers: Sequence[LayerSpec] | None) -> Window:
    assert isinstance(layer, UpsampleSpec)
    return Window(layer.index, layer.kind, 1, layer.stride, 0, tuple(layer.in_shape), tuple(layer.out_shape))  # type: ignore[arg-type]


def _build_route(layer: LayerSpec, layers: Sequence[LayerSpec] | None) -> Window:
    assert isinstance(layer, RouteSpec)
    if layers is not None:
        for s in layer.sources:
            if tuple(layers[s].out_shape[1:]) != tuple(layer.out_shape[1:]):
                raise PlanError(f"layer {layer.index} routes layer {s} of another height/width; it cannot be fused")
    return Window(layer.index, layer.kind, 1, 1, 0, tuple(layer.in_shape), tuple(layer.out_shape),  # type: ignore[arg-type]
                  groups=layer.groups, sources=tuple(layer.sources), group_id=layer.group_id)


def _build_shortcut(layer: LayerSpec, layers: Sequence[LayerSpec] | None) -> Window:
    assert isinstance(layer, ShortcutSpec)
    # darknet adds over the flat buffers: only equal shapes make that a pixel-wise sum
    if layers is None or any(tuple(layers[s].out_shape) != tuple(layer.out_shape) for s in layer.sources):
        raise PlanError(f"layer {layer.index} is a shortcut whose sources differ in shape from its "
                        "output (a flat-buffer sum, not a pixel-wise one); it cannot be fused")
    return Window(layer.index, layer.kind, 1, 1, 0, tuple(layer.in_shape), tuple(layer.out_shape),  # type: ignore[arg-type]
                  sources=tuple(layer.sources))


def _build_crop(layer: LayerSpec, layers: Sequence[LayerSpec] | None) -> Window:
    """2017 ``[crop]`` at inference: output pixel (y, x) is input pixel (y + top, x + left), scaled.
    That is a 1x1 window of stride 1 with a negative pad (``first(y) = y + top``), so the window
    rule carries regions back; it needs ``top == left`` (one pad for both axes), as every centred
    crop of a square input has (VGG-16's 256 -> 224)."""
    assert isinstance(layer, CropSpec)
    if layer.top != layer.left:
        raise PlanError(f"layer {layer.index} is a crop offset by {layer.top} rows and {layer.left} columns; "
                        "only equal offsets can be fused")
    return Window(layer.index, layer.kind, 1, 1, -layer.top, tuple(layer.in_shape), tuple(layer.out_shape))  # type: ignore[arg-type]


def _build_yolo(layer: LayerSpec, layers: Sequence[LayerSpec] | None) -> Window:
    assert isinstance(layer, YoloSpec)  # per-pixel activations: the same region in and out
    return Window(layer.index, layer.kind, 1, 1, 0, tuple(layer.in_shape), tuple(layer.out_shape))  # type: ignore[arg-type]


def _window_rule(w: Window, r: Rect) -> list[tuple[int, Rect]]:
    """conv, maxpool, crop: the receptive field, clipped (see :meth:`Window.back`)."""
    return [(w.index - 1, w.back(r))]


def _upsample_rule(w: Window, r: Rect) -> list[tuple[int, Rect]]:
    """Nearest upsampling by ``s``: output row y reads input row y // s, so rows [a, b) need
    [a // s, ceil(b / s))."""
    s = w.stride
    _, h, wd = w.in_shape
    return [(w.index - 1, intersect((r[0] // s, -(-r[1] // s), r[2] // s, -(-r[3] // s)), (0, h, 0, wd)))]


def _same_region_rule(w: Window, r: Rect) -> list[tuple[int, Rect]]:
    """route (concat, channel chunks), shortcut (add), yolo (per pixel): every source the same region."""
    return [(s, r) for s in w.inputs]


#: spec type -> builder of its :class:`Window`; a type missing here is a block boundary.
WINDOW_BUILDERS: dict[type, Callable[[LayerSpec, Sequence[LayerSpec] | None], Window]] = {
    ConvSpec: _build_conv, MaxPoolSpec: _build_maxpool, UpsampleSpec: _build_upsample,
    RouteSpec: _build_route, ShortcutSpec: _build_shortcut, YoloSpec: _build_yolo, CropSpec: _build_crop,
}
#: window kind -> its region rule: the source regions an output region needs.
REGION_RULES: dict[str, Callable[[Window, Rect], list[tuple[int, Rect]]]] = {
    "conv": _window_rule, "maxpool": _window_rule, "upsample": _upsample_rule,
    "route": _same_region_rule, "shortcut": _same_region_rule, "yolo": _same_region_rule, "crop": _window_rule,
}


def owned_regions(windows: Sequence[Window], tile: Rect) -> list[Rect]:
    """The part of each fused layer's output map that a tile *owns* (a partition per layer).

    Tile edges of the last output map are carried back through the strides (edge ``e`` at a
    layer's output becomes ``e*stride`` at its input), clipped, with the map's last edge pinned
    to the map's size, so that the owned regions of the tiles of a grid partition every map.
    Used only by the ``owned`` borrowing mode, which lends data a producer owns and nothing of
    its halo.
    """
    out: list[Rect] = [EMPTY] * len(windows)
    y0, y1, x0, x1 = tile
    last_h, last_w = windows[-1].out_shape[1], windows[-1].out_shape[2]
    at_bottom, at_right = y1 == last_h, x1 == last_w
    for i in range(len(windows) - 1, -1, -1):
        w = windows[i]
        h, wd = w.out_shape[1], w.out_shape[2]
        out[i] = (min(y0, h), h if at_bottom else min(y1, h), min(x0, wd), wd if at_right else min(x1, wd))
        y0, y1, x0, x1 = y0 * w.stride, y1 * w.stride, x0 * w.stride, x1 * w.stride
    return out
