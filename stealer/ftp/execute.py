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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Mapping

import numpy as np

import kernels

from ..errors import PlanError, ShapeError
from ..layers import ConvSpec
from .geometry import Rect, Window, contains, height, intersect, is_empty, relative, width
from .plan import LayerStep, Plan, Strip, Task, Variant, band_rects

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
    output: np.ndarray
    published: dict[int, np.ndarray]
    peak_bytes: int


@dataclass
class FrameResult:
    """A frame run tile by tile and stitched (see :func:`run_frame`)."""

    output: np.ndarray
    variants: dict[int, str] = field(default_factory=dict)
    peak_bytes: dict[int, int] = field(default_factory=dict)


def check_fits(net: Network, plan: Plan) -> None:
    """Raise :class:`PlanError` unless ``plan`` was made for ``net``'s fused layers."""
    layers = net.layers
    if tuple(net.input_shape) != tuple(plan.input_shape):
        raise PlanError(f"plan is for input {plan.input_shape}, the network takes {net.input_shape}")
    if len(layers) < plan.n_layers:
        raise PlanError(f"plan fuses {plan.n_layers} layers, the network has {len(layers)}")
    for w in plan.windows:
        if Window.of(layers[w.index]) != w:
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


def _compute(net: Network, w: Window, src: np.ndarray, src_rect: Rect, g: Rect, out: np.ndarray) -> None:
    """Compute output region ``g`` of layer ``w`` into ``out`` from ``src`` covering ``src_rect``."""
    if not contains(src_rect, w.back(g)):
        raise PlanError(f"layer {w.index}: input {src_rect} does not hold {w.back(g)}, needed for {g}")
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
        The output tile (shape ``(C, tile h, tile w)`` of the last fused layer) and the published
        strips by id, which are produced in either variant.

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
    src: np.ndarray | None = None
    src_rect = v.input_region
    if not is_empty(src_rect):
        src = _take_input(frame_input, c_in, src_rect, (task.full.input_region, frame_rect), task_id)
    held = sum(int(borrowed[s].nbytes) for s in task.consumes) if v.kind == "reuse" and borrowed else 0
    track = _Tracker(held + (src.nbytes if src is not None else 0))
    strips = plan.strips
    published: dict[int, np.ndarray] = {}
    steps = v.steps
    first = True  # src is still the caller's frame input
    l = 0
    while l < len(steps):
        st, w = steps[l], windows[l]
        if is_empty(st.buffer):
            if src is not None:  # nothing needed here means nothing was needed before either
                raise PlanError(f"task {task_id} layer {l}: an input buffer without a needed region")
            l += 1
            continue
        if l + 1 < len(steps) and steps[l + 1].band:
            out = _run_banded(net, plan, v, l, src, src_rect, borrowed, published, track, check)
            st = steps[l + 1]
            l += 2
        else:
            out = _run_step(net, w, st, src, src_rect, borrowed, published, strips, track, check)
            l += 1
        if src is not None and not first:  # the frame input stays with the caller: not freed
            track.sub(src.nbytes)
        src, src_rect, first = out, st.buffer, False
    if src is None or src_rect != task.output:
        raise PlanError(f"task {task_id}: the last buffer {src_rect} is not the tile {task.output}")
    log.debug("task %d (%s): %d strips published, peak %d bytes", task_id, v.kind, len(published), track.peak)
    return TileResult(task_id, v.kind, src, published, track.peak)


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


def _compute_into(net: Network, w: Window, src: np.ndarray | None, src_rect: Rect, g: Rect,
                  out: np.ndarray, rect: Rect, cover: _Cover, track: _Tracker) -> None:
    """Compute region ``g`` of layer ``w`` into buffer ``out`` (covering ``rect``)."""
    if src is None:
        raise PlanError(f"layer {w.index}: asked to compute {g} with no input buffer")
    cover.mark(g, "computed region")
    if g == rect:
        _compute(net, w, src, src_rect, g, out)
        return
    # The kernel writes C-contiguous arrays only; a sub-rectangle of the buffer is not one.
    scratch = np.empty((w.out_shape[0], height(g), width(g)), np.float32)
    track.add(scratch.nbytes)
    _compute(net, w, src, src_rect, g, scratch)
    out[(slice(None),) + relative(g, rect)] = scratch
    track.sub(scratch.nbytes)


def _run_step(net: Network, w: Window, st: LayerStep, src: np.ndarray | None, src_rect: Rect,
              borrowed: Mapping[int, np.ndarray] | None, published: dict[int, np.ndarray],
              strips: tuple[Strip, ...], track: _Tracker, check: bool) -> np.ndarray:
    out = np.empty((w.out_shape[0], height(st.buffer), width(st.buffer)), np.float32)
    track.add(out.nbytes)
    cover = _Cover(st.buffer, check)
    for g in st.computed:
        _compute_into(net, w, src, src_rect, g, out, st.buffer, cover, track)
    _fill_borrowed(st, w, out, st.buffer, st.buffer, borrowed, strips, cover)
    cover.verify(st.needed, st.layer)
    for sid in st.published:
        region = strips[sid].region
        published[sid] = np.ascontiguousarray(out[(slice(None),) + relative(region, st.buffer)])
        track.add(published[sid].nbytes)
    return out


def _run_banded(net: Network, plan: Plan, v: Variant, l: int, src: np.ndarray | None, src_rect: Rect,
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
                _compute_into(net, wa, src, src_rect, gb, band, prev_rows, cover, track)
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
                _compute_into(net, wp, band, prev_rows, gb, out, p.buffer, pool_cover, track)
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
    out = np.empty(plan.output_shape, np.float32)
    result = FrameResult(out)
    store: dict[int, np.ndarray] = {}
    for task in plan.tasks:
        borrowed = None
        if reuse and task.reuse is not None and task.id not in forced:
            borrowed = {s: store.pop(s) for s in task.consumes}
        v = task.variant(borrowed is not None)
        region = v.input_region
        tile_input = frame[(slice(None),) + relative(region, plan.windows[0].in_map())]
        res = run_task(net, plan, task.id, tile_input, borrowed, check=check)
        out[(slice(None),) + relative(task.output, plan.windows[-1].out_map())] = res.output
        if reuse:
            store.update(res.published)
        result.variants[task.id] = res.variant
        result.peak_bytes[task.id] = res.peak_bytes
    return result
