"""The tile executor: runs one task of a :class:`~stealer.ftp.plan.Plan` on its input region.

Pure compute, no I/O. For every fused layer the task allocates one buffer over the bounding box
of the region it needs, fills it from the rectangles the plan says to compute and the strips it
borrowed, checks that these pieces cover the needed region exactly once, cuts out the strips it
publishes, and frees the layer before. A computed rectangle is produced by calling the kernel on
the previous buffer with the window origin expressed relative to that buffer, so only the
requested outputs are computed, and zero padding (conv) or skipped positions (maxpool) arise only
where the window leaves the *map*: the planner guarantees the buffer holds every in-map pixel a
window reads. The conv kernel's accumulation order does not depend on the tile, so tiles are
bit-identical to :meth:`stealer.network.Network.forward`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

import numpy as np

import kernels

from ..errors import PlanError, ShapeError
from ..layers import ConvSpec, CropSpec, ShortcutSpec, UpsampleSpec, YoloSpec
from .geometry import Rect, Window, contains, height, intersect, is_empty, relative, width
from .plan import LayerStep, Plan, Strip, Task, Variant, band_rects, block_consumers

if TYPE_CHECKING:
    from ..network import Network

log = logging.getLogger(__name__)


@dataclass
class TileResult:
    """What one task yields: its output tile and the strips it publishes.

    ``peak_bytes`` is the most activation memory the executor held at once (input, layer
    buffers, scratch, published and borrowed strips), to compare with the plan's working set.
    """

    task: int
    variant: str
    output: np.ndarray  # see pack_tile
    published: dict[int, np.ndarray]
    peak_bytes: int
    outputs: list[np.ndarray] = field(default_factory=list)  # its tile of every fused output


@dataclass
class FrameResult:
    """A frame run tile by tile and stitched (see :func:`run_frame`)."""

    output: np.ndarray  # the single fused output's map; several: see fused_maps
    variants: dict[int, str] = field(default_factory=dict)
    maps: dict[int, np.ndarray] = field(default_factory=dict)  # every fused output's map, by layer
    peak_bytes: dict[int, int] = field(default_factory=dict)


def check_fits(net: Network, plan: Plan) -> None:
    """Raise :class:`PlanError` unless ``plan`` was made for ``net``'s fused layers."""
    layers = net.layers
    if tuple(net.input_shape) != tuple(plan.input_shape):
        raise PlanError(f"plan is for input {plan.input_shape}, the network takes {net.input_shape}")
    if len(layers) < plan.n_layers:
        raise PlanError(f"plan fuses {plan.n_layers} layers, the network has {len(layers)}")
    for w in plan.windows:
        if Window.of(layers[w.index], layers) != w:
            raise PlanError(f"plan layer {w.index} ({w}) differs from the network's {layers[w.index]}")


class _Tracker:
    """Adds up the bytes of the arrays the executor holds, remembering the peak."""

    def __init__(self, base: int) -> None:
        self.live = base
        self.peak = base

    def add(self, n: int) -> None:
        self.live += n
        self.peak = max(self.peak, self.live)

    def sub(self, n: int) -> None:
        self.live -= n


def _compute(net: Network, w: Window, inputs: Mapping[int, tuple[np.ndarray, Rect]], g: Rect,
             out: np.ndarray) -> None:
    """Compute output region ``g`` of layer ``w`` into ``out`` from its sources' buffers
    (``inputs``: layer -> (buffer, the region it covers)), by the kind's rule in :data:`COMPUTE_RULES`."""
    for src, need in w.input_regions(g):
        buf = inputs.get(src)
        if buf is None or not contains(buf[1], need):
            raise PlanError(f"layer {w.index}: the buffer of layer {src} "
                            f"({None if buf is None else buf[1]}) does not hold {need}, needed for {g}")
    COMPUTE_RULES[w.kind](net, w, inputs, g, out)


def _crop(buf: tuple[np.ndarray, Rect], r: Rect) -> np.ndarray:
    arr, rect = buf
    return np.ascontiguousarray(arr[(slice(None),) + relative(r, rect)])


def _compute_window(net: Network, w: Window, inputs: Mapping[int, tuple[np.ndarray, Rect]], g: Rect,
                    out: np.ndarray) -> None:
    src, src_rect = inputs[w.index - 1]
    # Window origin relative to the buffer; negative = the first window starts inside it.
    pad_top = src_rect[0] - w.first(g[0])
    pad_left = src_rect[2] - w.first(g[2])
    if w.kind == "conv":
        weight, bias = net.conv[w.index]
        layer = net.layers[w.index]
        assert isinstance(layer, ConvSpec)
        kernels.conv2d(src, weight, bias, stride=w.stride, pad_top=pad_top, pad_left=pad_left,
                       out_h=height(g), out_w=width(g), activation=layer.activation, out=out,
                       dilation=w.dilation, groups=w.groups)
    else:
        kernels.maxpool2d(src, size=w.size, stride=w.stride, pad_top=pad_top, pad_left=pad_left,
                          out_h=height(g), out_w=width(g), out=out)


def _compute_upsample(net: Network, w: Window, inputs: Mapping[int, tuple[np.ndarray, Rect]], g: Rect,
                      out: np.ndarray) -> None:
    layer = net.layers[w.index]
    assert isinstance(layer, UpsampleSpec)
    (_, need), = w.input_regions(g)
    s = w.stride
    up = kernels.upsample2d(_crop(inputs[w.index - 1], need), s, layer.scale)
    out[...] = up[:, g[0] - need[0] * s:g[1] - need[0] * s, g[2] - need[2] * s:g[3] - need[2] * s]


def _compute_route(net: Network, w: Window, inputs: Mapping[int, tuple[np.ndarray, Rect]], g: Rect,
                   out: np.ndarray) -> None:
    c = 0
    for s in w.sources:
        arr, rect = inputs[s]
        n = arr.shape[0] // w.groups  # the channel chunk group_id of groups, as Network's route takes it
        out[c:c + n] = arr[(slice(n * w.group_id, n * (w.group_id + 1)),) + relative(g, rect)]
        c += n


def _compute_shortcut(net: Network, w: Window, inputs: Mapping[int, tuple[np.ndarray, Rect]], g: Rect,
                      out: np.ndarray) -> None:
    layer = net.layers[w.index]
    assert isinstance(layer, ShortcutSpec)
    # equal shapes (the builder checks): the flat-buffer sum is pixel-wise, in the same order
    out[...] = kernels.shortcut(_crop(inputs[w.index - 1], g), [_crop(inputs[s], g) for s in w.sources],
                                layer.activation)


def _compute_yolo(net: Network, w: Window, inputs: Mapping[int, tuple[np.ndarray, Rect]], g: Rect,
                  out: np.ndarray) -> None:
    layer = net.layers[w.index]
    assert isinstance(layer, YoloSpec)
    out[...] = kernels.yolo_activate(_crop(inputs[w.index - 1], g), num=layer.num, classes=layer.classes,
                                     scale_x_y=layer.scale_x_y, new_coords=layer.new_coords)


def _compute_crop(net: Network, w: Window, inputs: Mapping[int, tuple[np.ndarray, Rect]], g: Rect,
                  out: np.ndarray) -> None:
    layer = net.layers[w.index]
    assert isinstance(layer, CropSpec)
    # the same float32 ops as Network's crop, pixel by pixel: x * scale + trans
    out[...] = _crop(inputs[w.index - 1], w.back(g)) * np.float32(layer.scale) + np.float32(layer.trans)


#: window kind -> how a region of its output is computed from its sources' buffers (the
#: executor's half of a kind's rules; the planner's half is :data:`stealer.ftp.geometry.REGION_RULES`).
COMPUTE_RULES: dict[str, Callable[[Network, Window, Mapping[int, tuple[np.ndarray, Rect]], Rect, np.ndarray], None]] = {
    "conv": _compute_window, "maxpool": _compute_window, "upsample": _compute_upsample,
    "route": _compute_route, "shortcut": _compute_shortcut, "yolo": _compute_yolo, "crop": _compute_crop,
}


class _Cover:
    """Checks that the pieces written into a buffer cover its needed region exactly once."""

    def __init__(self, buffer: Rect, enabled: bool) -> None:
        self.buffer = buffer
        self.mask = np.zeros((height(buffer), width(buffer)), np.uint8) if enabled else None

    def mark(self, r: Rect, what: str) -> None:
        if self.mask is None:
            return
        if not contains(self.buffer, r):
            raise PlanError(f"{what} {r} lies outside the buffer {self.buffer}")
        view = self.mask[relative(r, self.buffer)]
        if view.any():
            raise PlanError(f"{what} {r} overlaps a piece already written")
        view[...] = 1

    def verify(self, needed: Iterable[Rect], layer: int, within: Rect | None = None) -> None:
        if self.mask is None:
            return
        for r in needed:
            if within is not None:
                r = intersect(r, within)
            if not is_empty(r) and not self.mask[relative(r, self.buffer)].all():
                raise PlanError(f"layer {layer}: the computed and borrowed pieces leave part of {r} empty")


def _variant_for(task: Task, borrowed: Mapping[int, np.ndarray] | None) -> Variant:
    if borrowed is None or task.reuse is None:
        return task.full
    missing = [s for s in task.consumes if s not in borrowed]
    if missing:
        raise PlanError(f"task {task.id}: borrowed strips {missing} are missing; run it without "
                        "borrowed data to fall back to its full input")
    return task.reuse


def run_task(net: Network, plan: Plan, task_id: int, frame_input: np.ndarray,
             borrowed: Mapping[int, np.ndarray] | None = None, *, check: bool = True) -> TileResult:
    """Run one task: all fused layers on its input region, computing only what the plan says.

    Parameters
    ----------
    net : Network
        Provides the folded conv weights; must match the plan (see :func:`check_fits`).
    plan : Plan
    task_id : int
        The task's id (row-major tile index).
    frame_input : ndarray, float32, (C, h, w)
        The frame pixels of the variant's input region, or of the full variant's (larger) input
        region, or the whole frame; the needed part is taken from it.
    borrowed : mapping of strip id to ndarray, optional
        The strips of the task's reuse variant (all of them). ``None`` runs the full variant
        (the fallback when its producers are not done).
    check : bool
        Check that the pieces of every layer's buffer cover the needed region exactly once.

    Returns
    -------
    TileResult
        The output tile (shape ``(C, tile h, tile w)`` of a single fused output; several outputs:
        see :func:`pack_tile`) and the published strips by id, which are produced in either variant.

    Raises
    ------
    ShapeError
        ``frame_input`` does not fit any of the accepted regions, or a borrowed strip has the
        wrong shape.
    PlanError
        Missing borrowed strips, or pieces that do not cover a layer's needed region.
    """
    task = plan.task(task_id)
    v = _variant_for(task, borrowed)
    windows = plan.windows
    frame_rect = windows[0].in_map()
    c_in = windows[0].in_shape[0]
    bufs: dict[int, tuple[np.ndarray, Rect]] = {}  # layer (-1: the frame) -> (buffer, region it covers)
    if not is_empty(v.input_region):
        src = _take_input(frame_input, c_in, v.input_region, (task.full.input_region, frame_rect), task_id)
        bufs[-1] = (src, v.input_region)
    held = sum(int(borrowed[s].nbytes) for s in task.consumes) if v.kind == "reuse" and borrowed else 0
    track = _Tracker(held + (bufs[-1][0].nbytes if -1 in bufs else 0))
    strips = plan.strips
    published: dict[int, np.ndarray] = {}
    consumers = block_consumers(windows)
    outputs = set(plan.outputs)
    # a buffer is freed once its last reader in the block has run (outputs are kept to the end)
    last = {l: (len(windows) if l in outputs or not cs else max(cs)) for l, cs in consumers.items()}
    steps = v.steps

    def release(upto: int) -> None:
        for k in [k for k in bufs if k >= 0 and last[k] <= upto]:  # the frame input stays with the caller
            track.sub(bufs.pop(k)[0].nbytes)

    l = 0
    while l < len(steps):
        st, w = steps[l], windows[l]
        if is_empty(st.buffer):  # nothing of this layer is needed (a dead branch for this tile)
            l += 1
            continue
        if l + 1 < len(steps) and steps[l + 1].band:
            bufs[l + 1] = (_run_banded(net, plan, v, l, bufs, borrowed, published, track, check), steps[l + 1].buffer)
            release(l + 1)
            l += 2
        else:
            bufs[l] = (_run_step(net, w, st, bufs, borrowed, published, strips, track, check), st.buffer)
            release(l)
            l += 1
    tiles = []
    for o, r in zip(plan.outputs, task.outputs):
        got = bufs.get(o)
        if got is None or not contains(got[1], r):
            raise PlanError(f"task {task_id}: the buffer of output layer {o} "
                            f"({None if got is None else got[1]}) does not hold its tile {r}")
        arr, rect = got
        tiles.append(arr if rect == r else np.ascontiguousarray(arr[(slice(None),) + relative(r, rect)]))
    log.debug("task %d (%s): %d strips published, peak %d bytes", task_id, v.kind, len(published), track.peak)
    return TileResult(task_id, v.kind, pack_tile(tiles), published, track.peak, tiles)


def pack_tile(tiles: Sequence[np.ndarray]) -> np.ndarray:
    """One task's result as one array: its tile of a single fused output as is, (C, h, w); the
    tiles of several outputs raveled and concatenated (float32, 1-D), in ``Plan.outputs`` order."""
    if len(tiles) == 1:
        return tiles[0]
    return np.concatenate([np.ascontiguousarray(t, np.float32).ravel() for t in tiles])


def tile_shapes(plan: Plan, task_id: int) -> list[tuple[int, int, int]]:
    """(C, h, w) of a task's tile of every fused output."""
    task = plan.task(task_id)
    return [(plan.windows[o].out_shape[0], height(r), width(r)) for o, r in zip(plan.outputs, task.outputs)]


def fused_maps(plan: Plan, data: np.ndarray) -> dict[int, np.ndarray]:
    """The fused outputs of a frame by layer index, from the one array the gateway assembles
    (see :class:`stealer.assembly.FrameAssembly`): a single output's (C, H, W) map, or several
    outputs' maps raveled and concatenated in ``Plan.outputs`` order.

    Raises
    ------
    ShapeError
        ``data`` has another shape, size or dtype.
    """
    shapes = plan.output_shapes
    if len(shapes) == 1:
        if data.shape != shapes[0] or data.dtype != np.float32:
            raise ShapeError(f"fused map must be float32 {shapes[0]}, got {data.dtype} {data.shape}")
        return {plan.outputs[0]: data}
    total = sum(math.prod(s) for s in shapes)
    if data.ndim != 1 or data.size != total or data.dtype != np.float32:
        raise ShapeError(f"fused maps must be float32 ({total},), got {data.dtype} {data.shape}")
    out: dict[int, np.ndarray] = {}
    at = 0
    for o, s in zip(plan.outputs, shapes):
        n = math.prod(s)
        out[o] = data[at:at + n].reshape(s)
        at += n
    return out


def _take_input(frame_input: np.ndarray, c_in: int, need: Rect, others: tuple[Rect, ...],
                task_id: int) -> np.ndarray:
    if not isinstance(frame_input, np.ndarray) or frame_input.dtype != np.float32 or frame_input.ndim != 3:
        raise ShapeError(f"task {task_id}: frame input must be a float32 (C,H,W) array")
    shape = (c_in, height(need), width(need))
    if frame_input.shape == shape:
        return frame_input
    for r in others:
        if frame_input.shape == (c_in, height(r), width(r)) and contains(r, need):
            return frame_input[(slice(None),) + relative(need, r)]
    raise ShapeError(f"task {task_id}: frame input of shape {frame_input.shape} covers neither the input "
                     f"region {need} nor the full region {others[0]} nor the frame {others[1]}")


def _fill_borrowed(st: LayerStep, w: Window, out: np.ndarray, rect: Rect, within: Rect,
                   borrowed: Mapping[int, np.ndarray] | None, strips: tuple[Strip, ...], cover: _Cover) -> None:
    """Copy the part inside ``within`` of each borrowed strip of step ``st`` into ``out``."""
    for sid in st.borrowed:
        strip = strips[sid]
        assert borrowed is not None
        arr = borrowed[sid]
        expect = (w.out_shape[0], height(strip.region), width(strip.region))
        if arr.shape != expect or arr.dtype != np.float32:
            raise ShapeError(f"borrowed strip {sid} has shape {arr.shape} {arr.dtype}, expected {expect} float32")
        piece = intersect(strip.region, within)
        if is_empty(piece):
            continue
        cover.mark(piece, f"borrowed strip {sid}")
        out[(slice(None),) + relative(piece, rect)] = arr[(slice(None),) + relative(piece, strip.region)]


def _compute_into(net: Network, w: Window, inputs: Mapping[int, tuple[np.ndarray, Rect]], g: Rect,
                  out: np.ndarray, rect: Rect, cover: _Cover, track: _Tracker) -> None:
    """Compute region ``g`` of layer ``w`` into buffer ``out`` (covering ``rect``)."""
    cover.mark(g, "computed region")
    if g == rect:
        _compute(net, w, inputs, g, out)
        return
    # The kernel writes C-contiguous arrays only; a sub-rectangle of the buffer is not one.
    scratch = np.empty((w.out_shape[0], height(g), width(g)), np.float32)
    track.add(scratch.nbytes)
    _compute(net, w, inputs, g, scratch)
    out[(slice(None),) + relative(g, rect)] = scratch
    track.sub(scratch.nbytes)


def _run_step(net: Network, w: Window, st: LayerStep, inputs: Mapping[int, tuple[np.ndarray, Rect]],
              borrowed: Mapping[int, np.ndarray] | None, published: dict[int, np.ndarray],
              strips: tuple[Strip, ...], track: _Tracker, check: bool) -> np.ndarray:
    out = np.empty((w.out_shape[0], height(st.buffer), width(st.buffer)), np.float32)
    track.add(out.nbytes)
    cover = _Cover(st.buffer, check)
    for g in st.computed:
        _compute_into(net, w, inputs, g, out, st.buffer, cover, track)
    _fill_borrowed(st, w, out, st.buffer, st.buffer, borrowed, strips, cover)
    cover.verify(st.needed, st.layer)
    for sid in st.published:
        region = strips[sid].region
        published[sid] = np.ascontiguousarray(out[(slice(None),) + relative(region, st.buffer)])
        track.add(published[sid].nbytes)
    return out


def _run_banded(net: Network, plan: Plan, v: Variant, l: int, inputs: Mapping[int, tuple[np.ndarray, Rect]],
                borrowed: Mapping[int, np.ndarray] | None, published: dict[int, np.ndarray],
                track: _Tracker, check: bool) -> np.ndarray:
    """Run step ``l`` and the maxpool step ``l + 1`` together, a band of pool rows at a time.

    Only one band of layer ``l``'s output exists at once; strips of layer ``l`` are assembled in
    their own arrays band by band.
    """
    strips = plan.strips
    wa, wp = plan.windows[l], plan.windows[l + 1]
    a, p = v.steps[l], v.steps[l + 1]
    out = np.empty((wp.out_shape[0], height(p.buffer), width(p.buffer)), np.float32)
    track.add(out.nbytes)
    pool_cover = _Cover(p.buffer, check)
    for sid in a.published:
        r = strips[sid].region
        published[sid] = np.empty((wa.out_shape[0], height(r), width(r)), np.float32)
        track.add(published[sid].nbytes)
    for pool_rows, prev_rows in band_rects(plan.windows, a, p, l + 1):
        if is_empty(prev_rows):
            continue
        band = np.empty((wa.out_shape[0], height(prev_rows), width(prev_rows)), np.float32)
        track.add(band.nbytes)
        cover = _Cover(prev_rows, check)
        for g in a.computed:
            gb = intersect(g, prev_rows)
            if not is_empty(gb):
                _compute_into(net, wa, inputs, gb, band, prev_rows, cover, track)
        _fill_borrowed(a, wa, band, prev_rows, prev_rows, borrowed, strips, cover)
        cover.verify(a.needed, a.layer, within=prev_rows)
        for sid in a.published:
            r = strips[sid].region
            piece = intersect(r, prev_rows)
            if not is_empty(piece):
                published[sid][(slice(None),) + relative(piece, r)] = band[(slice(None),) + relative(piece, prev_rows)]
        for g in p.computed:
            gb = intersect(g, pool_rows)
            if not is_empty(gb):
                _compute_into(net, wp, {l: (band, prev_rows)}, gb, out, p.buffer, pool_cover, track)
        track.sub(band.nbytes)
        del band
    _fill_borrowed(p, wp, out, p.buffer, p.buffer, borrowed, strips, pool_cover)
    pool_cover.verify(p.needed, p.layer)
    for sid in p.published:
        region = strips[sid].region
        published[sid] = np.ascontiguousarray(out[(slice(None),) + relative(region, p.buffer)])
        track.add(published[sid].nbytes)
    return out


def run_frame(net: Network, plan: Plan, frame: np.ndarray, *, reuse: bool = True,
              fallback: Iterable[int] = (), check: bool = True) -> FrameResult:
    """Run every task of ``plan`` in order on one device and stitch the output tiles.

    Parameters
    ----------
    net : Network
    plan : Plan
    frame : ndarray, float32, the network's input shape
    reuse : bool
        Pass each dependent task the strips its producers published (else every task runs full).
    fallback : iterable of int
        Task ids to run full even with ``reuse`` (as if their producers were not done); they
        still publish their strips.
    check : bool
        See :func:`run_task`.

    Returns
    -------
    FrameResult
        The stitched output of the last fused layer, equal to ``net.forward(frame, 0, L)``.
    """
    check_fits(net, plan)
    frame = net.check_input(frame)
    forced = set(fallback)
    maps = {o: np.empty(plan.windows[o].out_shape, np.float32) for o in plan.outputs}
    result = FrameResult(maps[plan.outputs[0]], maps=maps)
    store: dict[int, np.ndarray] = {}
    for task in plan.tasks:
        borrowed = None
        if reuse and task.reuse is not None and task.id not in forced:
            borrowed = {s: store.pop(s) for s in task.consumes}
        v = task.variant(borrowed is not None)
        region = v.input_region
        tile_input = frame[(slice(None),) + relative(region, plan.windows[0].in_map())]
        res = run_task(net, plan, task.id, tile_input, borrowed, check=check)
        for o, r, tile in zip(plan.outputs, task.outputs, res.outputs):
            maps[o][(slice(None),) + relative(r, plan.windows[o].out_map())] = tile
        if reuse:
            store.update(res.published)
        result.variants[task.id] = res.variant
        result.peak_bytes[task.id] = res.peak_bytes
    if len(maps) > 1:
        result.output = np.concatenate([m.ravel() for m in maps.values()])
    return result
