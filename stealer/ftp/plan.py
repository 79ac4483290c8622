"""The fused-tile planner: tasks of one frame, their order, reuse dependencies and costs. Pure.

Model
-----
The output map of the last fused layer is cut into a ``rows x cols`` grid of tiles (sizes differ by
at most one). Each tile is one :class:`Task`. Walking backwards from its tile, a task needs, at
every fused layer, a region of that layer's output (its *needed* region) and, at the first layer,
a region of the frame (its *input region*). Every task has a ``full`` :class:`Variant` that
computes all of it from the frame alone.

With a reuse *scheme* the tasks are put in phases (``checkerboard``: two colours; ``quad``: 2x2
colours, three phases; ``wave``: anti-diagonals). A task of a later phase may take, at each fused
layer, whatever part of its needed region an earlier-phase task has already computed (``borrow =
"halo"``: anything the producer computed; ``"owned"``: only pixels of the producer's own share of
the map). What it borrows it does not compute, so the regions it needs at the layers before shrink
too; it computes only the remaining *gap* (a few disjoint rectangles, possibly none). This is its
``reuse`` variant. Every borrowed piece is a :class:`Strip` with one producer and one consumer; a
producer publishes each strip right after computing that layer. A task whose producers are not
done runs its ``full`` variant instead (the runtime ships enough frame input for that), and it
still publishes its strips: the full variant computes a superset of what the reuse variant does.

The fused block may be a DAG (routes, shortcuts, upsamples, yolo heads; the per-kind region
rules are in :mod:`stealer.ftp.geometry`). Its *outputs* are the maps the layers after the block
read (and any detection head inside it); there may be several, at different scales. The grid cuts
the coarsest output; every other output's tile is the same part of the image, its edges scaled to
that output (``e * H_o // H_coarse``, exact multiples when the scales are powers of two), so the
tiles of a grid partition every output. Walking backwards, a layer's needed region is the union of
what its readers inside the block need of it (and its own tile, if it is an output).

Everything here is integer arithmetic on :mod:`stealer.ftp.geometry` regions; a :class:`Plan` is
plain data with :meth:`Plan.to_dict` / :meth:`Plan.from_dict` (ints, strings, lists, dicts) so it
can travel as msgpack and be inspected.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from ..darknet import ModelSpec
from ..errors import PlanError
from ..layers import ConvSpec, LayerSpec, MaxPoolSpec, RouteSpec, ShortcutSpec, UpsampleSpec, YoloSpec, layer_sources
from .geometry import (Rect, Window, area, bbox, decompose, height, intersect, is_empty, owned_regions,
                       split_even)

log = logging.getLogger(__name__)

PLAN_VERSION = 2  # 2: DAG blocks (several outputs, route/shortcut/upsample/yolo windows)
#: Layers fused by default: DeepThings' choice for YOLOv2 (12 conv + 4 maxpool, 41% of the FLOPs),
#: cut to :func:`runnable_prefix` for networks that have fewer.
DEFAULT_FUSED_LAYERS = 16
SCHEMES = ("none", "checkerboard", "quad", "wave")
BORROW_MODES = ("halo", "owned")
#: The reuse scheme used when the caller asks for reuse without naming one. Chosen by numbers
#: (bench/ftp.py, YOLOv2-16 at 608, borrowing producers' halos): ``quad`` executes 1.000x the
#: frame's FLOPs up to 5x5 (``checkerboard`` 1.276x at 5x5, DeepThings 1.49x) and 1.11x at 8x8
#: (checkerboard 1.84x) in 3 phases, and has the best (6x6: tied) simulated 4-device makespan
#: from 3x3 to 6x6. ``wave`` reaches 1.000x at every grid but chains N+M-1 phases, moves up to twice the
#: overlap bytes and loses on 6 devices up to 6x6 (see :func:`simulate`); it is worth choosing
#: explicitly at 7x7 and 8x8 on few devices. Borrowing only a producer's own share (``owned``)
#: loses everywhere (1.67x at 5x5 quad).
DEFAULT_SCHEME = "quad"
#: For a block that holds routes, shortcuts or upsamples (the AlexeyAB models), ``quad``'s
#: first-phase tiles compute their whole halos, which a 13x13 coarsest output makes large:
#: yolov4-tiny at 416, 5x5, executes 2.21x its FLOPs with quad and 1.000x with ``wave``
#: (yolov3-tiny 1.75x / 1.000x), and wave's simulated makespan on 2-8 devices is 1.01-1.42x
#: the ideal against quad's 2.22-2.46x. So "auto", the default, is quad for chains and wave
#: for DAG blocks (:func:`default_scheme`).
AUTO_SCHEME = "auto"
DEFAULT_BORROW = "halo"
#: Pool output rows per band when a layer streams into a non-overlapping maxpool. Small enough
#: that the band of the (large) conv output is a fraction of the pool's output; large enough that
#: each kernel call still has a few thousand pixels to amortize its weight packing.
BAND_ROWS = 8
#: Kinds whose computed output a later-phase task may borrow: the ones that cost FLOPs or gather a
#: window (route, shortcut, upsample and yolo copy or map their inputs pixel for pixel, so lending
#: their output would only duplicate strips of the conv/maxpool maps they come from).
LENDING_KINDS = ("conv", "maxpool")
# The node and link every cost model of the planner assumes when nothing better is known: the
# depth model here (:func:`depth_candidates`) and ``--grid auto`` (:mod:`stealer.ftp.auto`, which
# also takes measured speeds) read these three, so both describe the same shelf.
DEFAULT_NODE_SPEED = 0.246 * 62.938e9
"""FLOP/s of a node running our kernels: an emulated Pi (0.2 core, the shelf the runtime's numbers
were measured on) ran YOLOv2-608 (62.94 GFLOP) whole at 0.246 frames/s, i.e. 15.5 GFLOP/s
(fitted in :mod:`stealer.ftp.auto`, whose tests keep the comparison with the recorded runs). The
depth model used a guessed 2 GFLOP/s before: a slower node than the one the links belong to,
which overstated the tail's cost against the links' by 7.7x."""
DEFAULT_LINK_RATE = 20e6 / 8
"""Bytes/s of a link each way: 20 Mbit/s, the emulated shelf's links and about what a Raspberry
Pi 3 gets over Wi-Fi."""
PIXEL_SHARE = 0.25
"""Tile inputs travel as the camera's uint8 pixels: a quarter of the plan's float32 input bytes."""
#: Depths the cost model weighs at most: each costs a plan (0.1-0.2 s for yolov4 at 608), and a
#: node resolves its default depth at start.
#: Relative difference of predicted frame times below which two depths tie (the deeper wins).
DEPTH_TIE = 1e-9
MAX_DEPTH_CANDIDATES = 32  # every candidate of the tiny models (yolov4-tiny: 26)


# ------------------------------------------------------------------------------------ data model
@dataclass(frozen=True, slots=True)
class Strip:
    """Overlap data one task computes and another takes instead of recomputing it.

    ``region`` is in the coordinates of fused layer ``layer``'s output map.
    """

    id: int
    producer: int
    consumer: int
    layer: int
    region: Rect
    nbytes: int


@dataclass(frozen=True, slots=True)
class LayerStep:
    """What one task variant does at one fused layer.

    ``needed`` is the union of regions of the layer's output the variant must hold (the later
    layers read them); ``buffer`` is their bounding box, the array the executor allocates;
    ``computed`` (disjoint rectangles) plus the regions of the ``borrowed`` strips cover ``needed``
    exactly, without overlap. ``published`` strips are cut from the buffer once it is complete.

    ``band > 0`` (only on a maxpool whose windows do not overlap) means the previous layer's
    buffer is never whole: both layers run together, ``band`` pool output rows at a time, so only
    a band of the previous layer's output is alive. This is what keeps the working set of
    YOLOv2's first conv + maxpool (the largest maps) small.
    """

    layer: int
    needed: tuple[Rect, ...]
    buffer: Rect
    computed: tuple[Rect, ...]
    borrowed: tuple[int, ...]
    published: tuple[int, ...]
    flops: int
    band: int = 0  # > 0: this maxpool runs fused with the layer before, this many output rows a band


@dataclass(frozen=True, slots=True)
class Variant:
    """One way of running a task: ``full`` (frame input only) or ``reuse`` (plus borrowed strips).

    ``working_set`` is the peak bytes of activations while this variant runs: the frame input and
    all borrowed strips (the caller holds them throughout), the input and output buffers of the
    layer being run, the scratch of a computed rectangle that is not the whole buffer, and the
    strips published so far. Weights and the kernels' own scratch are not included.
    """

    kind: str
    input_region: Rect
    steps: tuple[LayerStep, ...]
    flops: int
    input_bytes: int
    borrowed_bytes: int
    published_bytes: int
    working_set: int


@dataclass(frozen=True, slots=True)
class Task:
    """One tile of one frame. ``id`` is the row-major tile index; ``phase`` orders the tasks."""

    id: int
    tile: tuple[int, int]
    output: Rect
    phase: int
    full: Variant
    reuse: Variant | None  # None when nothing earlier overlaps this task (it always runs full)
    producers: tuple[int, ...]
    produces: tuple[int, ...]  # strip ids this task publishes
    consumes: tuple[int, ...]  # strip ids its reuse variant borrows
    #: its region of each fused output (``Plan.outputs`` order); ``output`` is the one in the
    #: grid's (coarsest) output. Empty = ``(output,)``, a single-output plan.
    outputs: tuple[Rect, ...] = ()

    def __post_init__(self) -> None:
        if not self.outputs:
            object.__setattr__(self, "outputs", (self.output,))

    def variant(self, reuse: bool) -> Variant:
        """The reuse variant if asked for and there is one, else the full one."""
        return self.reuse if reuse and self.reuse is not None else self.full


@dataclass(frozen=True, slots=True)
class Totals:
    """Per-frame figures of a plan run with or without reuse (bytes are float32 activations)."""

    flops: int
    flops_ratio: float  # executed FLOPs / full-frame FLOPs of the fused layers
    max_working_set: int  # largest per-task working set, activations only
    weight_bytes: int  # fused weights every device holds
    input_bytes: int  # frame input the executed variants read
    fallback_input_bytes: int  # frame input if every task is shipped with its full region
    overlap_bytes: int  # reuse strips, each moved once from producer to consumer
    output_bytes: int  # output tiles

    @property
    def bytes_per_frame(self) -> int:
        """Input tiles + overlap strips + output tiles."""
        return self.input_bytes + self.overlap_bytes + self.output_bytes


@dataclass(frozen=True)
class Plan:
    """The fused-tile partition of one frame: tasks in execution order plus their reuse strips."""

    source: str
    input_shape: tuple[int, int, int]
    windows: tuple[Window, ...]
    grid: tuple[int, int]
    scheme: str
    borrow: str
    tasks: tuple[Task, ...]  # in execution order
    strips: tuple[Strip, ...]  # indexed by id
    version: int = PLAN_VERSION
    #: the fused outputs, layer indices in increasing order (empty = the last fused layer's)
    outputs: tuple[int, ...] = ()
    _by_id: dict[int, Task] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_id.update({t.id: t for t in self.tasks})
        if not self.outputs:
            object.__setattr__(self, "outputs", (self.windows[-1].index,))

    # ------------------------------------------------------------ lookups
    @property
    def n_layers(self) -> int:
        """Number of fused layers."""
        return len(self.windows)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the fused output the grid cuts (the coarsest; a chain's last layer)."""
        return self.windows[self.grid_output].out_shape

    @property
    def grid_output(self) -> int:
        """Layer index of the output the grid cuts (see :func:`output_tiles`)."""
        return self.outputs[_coarsest([self.windows[o].out_shape for o in self.outputs])]

    @property
    def output_shapes(self) -> tuple[tuple[int, int, int], ...]:
        """(C, H, W) of every fused output, in :attr:`outputs` order."""
        return tuple(self.windows[o].out_shape for o in self.outputs)

    @property
    def fused_bytes(self) -> int:
        """float32 bytes of all fused outputs of a frame (what the tail starts from)."""
        return sum(4 * c * h * w for c, h, w in self.output_shapes)

    @property
    def is_chain(self) -> bool:
        """Only conv and maxpool layers and one output: the planner of DeepThings' kind."""
        return len(self.outputs) == 1 and all(w.kind in ("conv", "maxpool") for w in self.windows)

    @property
    def order(self) -> list[int]:
        """Task ids in execution order."""
        return [t.id for t in self.tasks]

    def task(self, task_id: int) -> Task:
        """The task with this id (:class:`PlanError` if there is none)."""
        try:
            return self._by_id[task_id]
        except KeyError:
            raise PlanError(f"no task {task_id} in a {self.grid[0]}x{self.grid[1]} plan") from None

    @property
    def frame_flops(self) -> int:
        """FLOPs of the fused layers over the whole frame on one device."""
        return sum(w.flops(w.out_map()) for w in self.windows)

    @property
    def weight_bytes(self) -> int:
        """float32 bytes of the fused layers' folded weights and biases."""
        return sum(w.weight_bytes for w in self.windows)

    @property
    def frame_working_set(self) -> int:
        """Peak activation bytes of the unpartitioned fused layers run layer by layer: the frame
        (held by the caller throughout) plus the input and output of the largest layer."""
        frame = self.windows[0].in_bytes(self.windows[0].in_map())
        return frame + max(w.out_bytes(w.out_map()) + (w.in_bytes(w.in_map()) if i else 0)
                           for i, w in enumerate(self.windows))

    def totals(self, reuse: bool = True) -> Totals:
        """Executed FLOPs, largest working set and bytes per frame with or without reuse."""
        variants = [t.variant(reuse) for t in self.tasks]
        flops = sum(v.flops for v in variants)
        return Totals(
            flops=flops,
            flops_ratio=flops / self.frame_flops if self.frame_flops else float("nan"),
            max_working_set=max(v.working_set for v in variants),
            weight_bytes=self.weight_bytes,
            input_bytes=sum(v.input_bytes for v in variants),
            fallback_input_bytes=sum(t.full.input_bytes for t in self.tasks),
            overlap_bytes=sum(v.borrowed_bytes for v in variants),
            output_bytes=sum(self.windows[o].out_bytes(r) for t in self.tasks for o, r in zip(self.outputs, t.outputs)),
        )

    # ------------------------------------------------------------ wire form
    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (ints, strings, lists, dicts only), for msgpack and JSON."""

        def variant(v: Variant | None) -> dict[str, Any] | None:
            if v is None:
                return None
            return {
                "kind": v.kind, "input_region": list(v.input_region), "flops": v.flops,
                "input_bytes": v.input_bytes, "borrowed_bytes": v.borrowed_bytes,
                "published_bytes": v.published_bytes, "working_set": v.working_set,
                "steps": [{"layer": s.layer, "needed": [list(r) for r in s.needed], "buffer": list(s.buffer),
                           "computed": [list(r) for r in s.computed], "borrowed": list(s.borrowed),
                           "published": list(s.published), "flops": s.flops, "band": s.band}
                          for s in v.steps],
            }

        return {
            "version": self.version, "source": self.source, "input_shape": list(self.input_shape),
            "grid": list(self.grid), "scheme": self.scheme, "borrow": self.borrow, "outputs": list(self.outputs),
            "layers": [{"index": w.index, "kind": w.kind, "size": w.size, "stride": w.stride, "pad": w.pad,
                        "in_shape": list(w.in_shape), "out_shape": list(w.out_shape), "dilation": w.dilation,
                        "groups": w.groups, "sources": list(w.sources), "group_id": w.group_id}
                       for w in self.windows],
            "tasks": [{"id": t.id, "tile": list(t.tile), "output": list(t.output), "phase": t.phase,
                       "outputs": [list(r) for r in t.outputs],
                       "producers": list(t.producers), "produces": list(t.produces),
                       "consumes": list(t.consumes), "full": variant(t.full), "reuse": variant(t.reuse)}
                      for t in self.tasks],
            "strips": [{"id": s.id, "producer": s.producer, "consumer": s.consumer, "layer": s.layer,
                        "region": list(s.region), "nbytes": s.nbytes} for s in self.strips],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        """Rebuild a plan from :meth:`to_dict` output (:class:`PlanError` if it does not fit)."""
        try:
            if d["version"] not in (1, PLAN_VERSION):  # 1: a chain plan, read with the defaults
                raise PlanError(f"plan version {d['version']!r}, this build reads {PLAN_VERSION}")

            def rect(v: Sequence[int]) -> Rect:
                y0, y1, x0, x1 = (int(a) for a in v)
                return (y0, y1, x0, x1)

            def ints(v: Sequence[int]) -> tuple[int, ...]:
                return tuple(int(a) for a in v)

            def variant(v: dict[str, Any] | None) -> Variant | None:
                if v is None:
                    return None
                steps = tuple(LayerStep(int(s["layer"]), tuple(rect(r) for r in s["needed"]), rect(s["buffer"]),
                                        tuple(rect(r) for r in s["computed"]), ints(s["borrowed"]),
                                        ints(s["published"]), int(s["flops"]), int(s["band"]))
                              for s in v["steps"])
                return Variant(str(v["kind"]), rect(v["input_region"]), steps, int(v["flops"]),
                               int(v["input_bytes"]), int(v["borrowed_bytes"]), int(v["published_bytes"]),
                               int(v["working_set"]))

            windows = tuple(Window(int(l["index"]), str(l["kind"]), int(l["size"]), int(l["stride"]),
                                   int(l["pad"]), ints(l["in_shape"]), ints(l["out_shape"]),  # type: ignore[arg-type]
                                   int(l.get("dilation", 1)), int(l.get("groups", 1)), ints(l.get("sources", ())),
                                   int(l.get("group_id", 0)))
                            for l in d["layers"])
            tasks = []
            for t in d["tasks"]:
                full = variant(t["full"])
                assert full is not None
                r, c = ints(t["tile"])
                tasks.append(Task(int(t["id"]), (r, c), rect(t["output"]), int(t["phase"]), full, variant(t["reuse"]),
                                  ints(t["producers"]), ints(t["produces"]), ints(t["consumes"]),
                                  tuple(rect(o) for o in t.get("outputs", ()))))
            strips = tuple(Strip(int(s["id"]), int(s["producer"]), int(s["consumer"]), int(s["layer"]),
                                 rect(s["region"]), int(s["nbytes"])) for s in d["strips"])
            gr, gc = ints(d["grid"])
            ch, h, w = ints(d["input_shape"])
            return cls(str(d["source"]), (ch, h, w), windows, (gr, gc), str(d["scheme"]), str(d["borrow"]),
                       tuple(tasks), strips, outputs=ints(d.get("outputs", ())))
        except (KeyError, TypeError, ValueError, AssertionError) as exc:
            raise PlanError(f"malformed plan: {exc!r}") from exc


# ------------------------------------------------------------------------------------ building
def fusable_prefix(spec: ModelSpec) -> int:
    """Number of leading layers the tiler can run: conv (grouped and dilated too, not with
    different row and column strides) and maxpool, up to the first layer of any other kind
    (route, shortcut, upsample, reorg, region, yolo). This is the most a *plan* can fuse; see
    :func:`runnable_prefix` for the most a runtime can fuse and still run the rest."""
    n = 0
    for layer in spec.layers:
        if not isinstance(layer, (ConvSpec, MaxPoolSpec)):
            break
        if isinstance(layer, ConvSpec) and layer.strides[0] != layer.strides[1]:
            break
        n += 1
    return n


def runnable_prefix(spec: ModelSpec) -> int:
    """The most leading layers that can be fused *and* leave a tail that runs from the last fused
    layer's output alone: :func:`fusable_prefix`, cut before any fused layer (other than the
    last) whose output a later route or shortcut reads, since the tiles keep only the last map.

    YOLOv2: 17 (its route 25 reads layer 16), YOLOv3-tiny: 9 (route 20 reads layer 8),
    YOLOv4-tiny: 3, YOLOv3 and YOLOv4: 2.
    """
    # an ONNX model's outputs are the tail's results: none of them may be fused
    n = min((fusable_prefix(spec), *spec.outputs))
    # every layer that names its sources (routes, shortcuts, and an ONNX model's slices and tensor ops)
    readers = [(l.index, layer_sources(l)) for l in spec.layers if layer_sources(l)]
    while True:  # a cut moves the end, which may put another reader's source inside: repeat
        cut = min([s + 1 for i, srcs in readers if i >= n for s in srcs if s < n - 1], default=n)
        if cut == n:
            return n
        n = cut


def fusable_depth(spec: ModelSpec) -> int:
    """Number of leading layers a DAG block can hold: every layer kind with a rule in
    :data:`stealer.ftp.geometry.WINDOW_BUILDERS` (conv, crop, maxpool, route, shortcut of equal
    shapes, upsample, yolo), up to the first layer of any other kind or one its builder refuses
    (reorg, region, a conv with unequal strides, a pool whose windows leave the map). Any depth
    from 1 to this is a block boundary: the block's outputs are whatever the rest reads."""
    n = 0
    for layer in spec.layers:
        try:
            Window.of(layer, spec.layers).check_windows()
        except PlanError:
            break
        n += 1
    return n


def _reads(layer: LayerSpec) -> tuple[int, ...]:
    """Layers whose output ``layer`` reads (-1: the frame): a shortcut the previous layer and its
    sources; a layer that names its sources (a route, an ONNX slice or tensor op) those; any
    other the previous layer."""
    if isinstance(layer, ShortcutSpec):
        return (layer.index - 1,) + tuple(layer.sources)
    named = layer_sources(layer)
    return tuple(named) if named else (layer.index - 1,)


def block_outputs(spec: ModelSpec, layers: int) -> tuple[int, ...]:
    """The fused outputs of a block of the first ``layers`` layers: every layer inside it that a
    layer after it reads, and every network output (yolo head, or the last layer) inside it."""
    heads = ([l.index for l in spec.layers if isinstance(l, YoloSpec)] or list(spec.outputs)
             or [len(spec.layers) - 1])
    outs = {s for l in spec.layers[layers:] for s in _reads(l) if 0 <= s < layers}
    outs |= {h for h in heads if h < layers}
    return tuple(sorted(outs))


def _coarsest(shapes: Sequence[tuple[int, int, int]]) -> int:
    """Index of the output the grid cuts: the smallest map (first of equals)."""
    return min(range(len(shapes)), key=lambda i: (shapes[i][1] * shapes[i][2], i))


def output_tiles(shapes: Sequence[tuple[int, int, int]], rows: int, cols: int) -> list[tuple[Rect, ...]]:
    """Each tile's region of every output (row-major tiles): the grid cuts the coarsest output
    into ``rows x cols`` (sizes differ by at most one), and its edge ``e`` is edge
    ``e * H_o // H_coarse`` of output ``o`` (``W`` likewise), so a tile is the same part of the
    image in every output and the tiles partition each output.

    Raises
    ------
    PlanError
        A tile would be empty, or an output is smaller than the coarsest one on some axis.
    """
    base = shapes[_coarsest(shapes)]
    bh, bw = base[1], base[2]
    if rows < 1 or cols < 1 or rows > bh or cols > bw:
        raise PlanError(f"grid {rows}x{cols} does not fit the {bh}x{bw} fused output (each tile needs at least "
                        "one pixel)")
    for c, h, w in shapes:
        if h < bh or w < bw:
            raise PlanError(f"fused outputs {bh}x{bw} and {h}x{w} cannot share a grid")
    ys, xs = split_even(bh, rows), split_even(bw, cols)
    return [tuple((y0 * h // bh, y1 * h // bh, x0 * w // bw, x1 * w // bw) for _, h, w in shapes)
            for y0, y1 in ys for x0, x1 in xs]


def max_fused_layers(spec: ModelSpec) -> int:
    """The most layers ``--layers`` may fuse: :func:`fusable_depth` (the runtime runs a block with
    several outputs and a tail that reads them all)."""
    return fusable_depth(spec)


@dataclass(frozen=True)
class DepthCandidate:
    """One fused depth with the figures the depth cost model weighs (see :func:`depth_candidates`)."""

    layers: int
    outputs: tuple[int, ...]
    block_flops: int  # FLOPs of the block on the whole frame
    executed_flops: int  # FLOPs the tiles execute, halos included
    tail_flops: int  # FLOPs after the block, on one node
    transfer_bytes: int  # fused outputs + reuse strips + the tiles' input (camera bytes, a quarter of float32)
    seconds: float  # predicted frame time: block_seconds + tail_seconds
    block_seconds: float = 0.0  # the tiles' makespan, their phases and bytes on the links included
    link_seconds: float = 0.0  # the part of block_seconds the links add (makespan with free links subtracted)
    tail_seconds: float = 0.0  # the tail on the gateway, which holds the assembled map


def frame_seconds(plan: Plan, devices: int, reuse: bool = True, flop_rate: float = DEFAULT_NODE_SPEED,
                  link_rate: float = DEFAULT_LINK_RATE) -> float:
    """Seconds from a frame's start until the gateway holds all of its fused outputs, on ``devices``
    equal nodes, each with a full-duplex link of ``link_rate`` bytes/s each way. Pure.

    Node 0 is the source and the gateway (``Cluster``'s default in :mod:`stealer.ftp.auto`); it
    computes tiles too. The tasks run by :func:`simulate`'s policy (a free node takes the first
    task in plan order that is ready for its reuse variant, else waits or runs the full variant,
    whichever ends sooner, its bytes included), and the bytes take the links they take in the
    runtime:

    * a task's pixels (:data:`PIXEL_SHARE` of its input bytes; a full variant's region is
      large) leave the source's uplink, one task after another in the order they are taken; the
      source sends ahead (nodes fetch their next task while computing), so only a backlog on that
      link delays a task; node 0's own tasks read the frame where it is;
    * every task's fused outputs enter the gateway's downlink, one after another as tasks end
      (node 0's own stay where they are);
    * a reuse variant is granted once its producers' tiles are *at the gateway* (the source
      machine's ``ready``: their outputs have crossed the gateway's downlink), and then fetches
      the strips it borrows from the nodes that computed them, on its own downlink (strips of
      different consumers move on different links at once); strips its own node computed are in
      hand.

    The phases of the reuse scheme are in it: a wave over a deep block chains its tiles, and
    every link of that chain waits for outputs to reach the gateway and strips to reach the next
    node, which "executed FLOPs / devices" does not see.
    """
    if devices < 1:
        raise PlanError(f"need at least one device, got {devices}")
    pending = list(plan.tasks)
    finish: dict[int, float] = {}  # task -> when its node is done with it
    at_gw: dict[int, float] = {}  # task -> when its outputs are at the gateway
    ran_on: dict[int, int] = {}
    free = [0.0] * min(devices, len(pending))
    src = gw = 0.0
    inf = float("inf")
    strips = plan.strips

    def ready(t: Task, d: int) -> float:  # when node d could start t's reuse variant
        assert t.reuse is not None
        fetched = sum(strips[s].nbytes for s in t.consumes if ran_on.get(strips[s].producer) != d)
        return max((at_gw.get(p, inf) for p in t.producers), default=0.0) + fetched / link_rate

    def pixels_in(v: Variant, d: int) -> float:  # when the source's uplink has sent v's pixels
        return src + (PIXEL_SHARE * v.input_bytes / link_rate if d else 0.0)

    while pending:
        d = min(range(len(free)), key=free.__getitem__)
        now = free[d]
        pick = next((i for i, t in enumerate(pending) if not reuse or t.reuse is None or ready(t, d) <= now), None)
        if pick is None:
            t = pending[0]
            assert t.reuse is not None
            r = ready(t, d)
            if r + t.reuse.flops / flop_rate < max(now, pixels_in(t.full, d)) + t.full.flops / flop_rate:
                # wait for the next task to end or reach the gateway, or this one's strips, then look again
                free[d] = min([x for x in (*finish.values(), *at_gw.values()) if x > now] + [r])
                continue
            pick, v = 0, t.full
        else:
            t = pending[pick]
            v = t.variant(reuse)
        pending.pop(pick)
        if d:
            src = pixels_in(v, d)
        start = max(now, src) if d else now
        end = start + v.flops / flop_rate
        finish[t.id] = free[d] = end
        ran_on[t.id] = d
        if d:
            gw = max(gw, end) + sum(plan.windows[o].out_bytes(r) for o, r in zip(plan.outputs, t.outputs)) / link_rate
            at_gw[t.id] = gw
        else:
            at_gw[t.id] = end
    return max(at_gw.values())


def depth_candidates(spec: ModelSpec, grid: tuple[int, int], scheme: str = "none",
                     devices: int | None = None) -> list[DepthCandidate]:
    """Every block boundary worth weighing, with its predicted frame time, best first.

    The model: the tiles run on ``devices`` Pi-class nodes (default: one per tile) at
    :data:`DEFAULT_NODE_SPEED`, their bytes on 20 Mbit/s links (:data:`DEFAULT_LINK_RATE`), as
    :func:`frame_seconds` plays them out; then the gateway, which holds the assembled map, runs
    the tail::

        seconds = frame_seconds(plan, devices) + tail / DEFAULT_NODE_SPEED

    Fusing deeper moves the tail's FLOPs into parallel tiles, but grows what the tiles move: the
    fused outputs the gateway's one downlink receives (a detector's head maps are larger than its
    backbone's), the strips each consumer waits for, and the chain of reuse phases. A tiled grid
    is there for a frame's latency (whole-frame data parallelism, 1x1, is the throughput choice
    on slow links; :mod:`stealer.ftp.auto`), so its depth is chosen for a frame's time too.

    An earlier model summed every byte on one link (``(outputs + strips + pixels) / link``) and
    ran the tiles ``devices``-fold parallel (``executed / (rate * devices)``): it charged a deep
    block's strips, which cross many links at once, as if they crossed one, and missed that a
    wave's phases chain its tiles; both errors are on the same side for a deep DAG block. The
    next one (stop 19) ran the nodes at a guessed 2 GFLOP/s against the emulated shelf's links,
    which made the tail 7.7x dearer against the bytes than on the shelf the links belong to, put
    every task's pixels and outputs on a link although node 0 (source and gateway) computes tiles
    too, fetched strips a node had computed itself, and let a reuse tile start when its
    producers ended rather than when their outputs reached the gateway (the runtime grants it
    then). With those fixed, on 20 Mbit/s, a 5x5 frame of a detector is rarely faster than node 0
    running the whole model: the depth then only decides how little the other nodes slow it.

    Candidates are the depths where the block ends on a conv, a maxpool or a yolo head (cutting
    right after a route or upsample only moves a copy), at most :data:`MAX_DEPTH_CANDIDATES` of
    them spread evenly, and the deepest one. Ties (within :data:`DEPTH_TIE`) go to the deeper
    block, which comes first; the rest follow by time.
    """
    rows, cols = grid
    tiles = rows * cols
    par = min(devices or tiles, tiles)
    most = fusable_depth(spec)
    total = sum(l.flops for l in spec.layers)
    ends = [n for n in range(1, most) if spec.layers[n - 1].kind in ("conv", "maxpool", "yolo")]
    if tiles == 1:
        ends = []  # one tile: every depth costs the same FLOPs and moves nothing; the deepest wins the tie
    elif len(ends) > MAX_DEPTH_CANDIDATES - 1:  # a deep model (yolov4: 116 ends): an even spread of them
        step = len(ends) / (MAX_DEPTH_CANDIDATES - 1)
        ends = sorted({ends[int(i * step)] for i in range(MAX_DEPTH_CANDIDATES - 1)})
    reuse = scheme != "none"
    out: list[DepthCandidate] = []
    for n in ends + [most]:
        try:
            plan = make_plan(spec, grid, n, scheme=scheme)
        except PlanError:
            continue
        t = plan.totals(reuse=reuse)
        block = plan.frame_flops
        tail_s = (total - block) / DEFAULT_NODE_SPEED
        if tiles == 1:  # the block and the tail on one node: nothing crosses a link
            transfer, block_s, link_s = 0, t.flops / DEFAULT_NODE_SPEED, 0.0
        else:
            transfer = t.output_bytes + t.overlap_bytes + int(PIXEL_SHARE * t.input_bytes)
            block_s = frame_seconds(plan, par, reuse)
            link_s = block_s - frame_seconds(plan, par, reuse, link_rate=math.inf)
        out.append(DepthCandidate(n, plan.outputs, block, t.flops, total - block, transfer, block_s + tail_s,
                                  block_s, link_s, tail_s))
    if not out:
        raise PlanError(f"{spec.source}: no block boundary fits a {rows}x{cols} grid")
    out.sort(key=lambda c: (c.seconds, -c.layers))
    # Ties go to the deeper block. Blocks whose frame time is the same sum of FLOPs over one
    # node's speed (the node holding the frame runs the whole chain itself, see frame_seconds)
    # differ only in rounding, so "the same" is within DEPTH_TIE of the best.
    tied = [c for c in out if c.seconds <= out[0].seconds * (1 + DEPTH_TIE)]
    best = max(tied, key=lambda c: c.layers)
    return [best] + [c for c in out if c is not best]


_DEFAULT_DEPTH: dict[tuple[ModelSpec, tuple[int, int], str], int] = {}


def default_scheme(spec: ModelSpec, layers: int | None = None) -> str:
    """The reuse scheme "auto" stands for: :data:`DEFAULT_SCHEME` when the fused block (its
    first ``layers`` layers; unset: DeepThings' 16 for 2017 models, whose default block is a
    chain, else every layer that can be fused) is a chain, ``wave`` when it holds a route,
    shortcut or upsample (see :data:`AUTO_SCHEME`)."""
    if layers is None:
        layers = min(DEFAULT_FUSED_LAYERS, runnable_prefix(spec)) if spec.flavour == "2017" else fusable_depth(spec)
    dag = any(isinstance(l, (RouteSpec, ShortcutSpec, UpsampleSpec)) for l in spec.layers[:layers])
    return "wave" if dag else DEFAULT_SCHEME


def resolve_scheme(scheme: str, spec: ModelSpec, layers: int | None = None) -> str:
    """``scheme``, with "auto" replaced by the model's :func:`default_scheme` for a block of
    ``layers`` layers (unset: its default block)."""
    return default_scheme(spec, layers) if scheme == AUTO_SCHEME else scheme


def default_layers(spec: ModelSpec, grid: tuple[int, int] = (5, 5), scheme: str = "none") -> int:
    """Fused layers when ``--layers`` is not given: DeepThings' 16 (or the runnable chain prefix if
    shorter) for 2017 darknet models, whose figures are DeepThings'; the cheapest block boundary
    by :func:`depth_candidates` for the others."""
    if spec.flavour == "2017":
        return min(DEFAULT_FUSED_LAYERS, runnable_prefix(spec))
    scheme = resolve_scheme(scheme, spec)
    key = (spec, (int(grid[0]), int(grid[1])), scheme)
    got = _DEFAULT_DEPTH.get(key)
    if got is None:
        if len(_DEFAULT_DEPTH) > 64:  # a few models and grids per process; never grows without bound
            _DEFAULT_DEPTH.clear()
        got = _DEFAULT_DEPTH[key] = depth_candidates(spec, grid, scheme)[0].layers
    return got


def fused_windows(spec: ModelSpec, layers: int | None = None) -> tuple[Window, ...]:
    """Windows of the first ``layers`` layers (default: :func:`default_layers` for a 5x5 grid).

    Raises
    ------
    PlanError
        If the range is empty, reaches past the fusable layers, or holds a layer with output
        positions whose window reads no input pixel.
    """
    prefix = fusable_depth(spec)
    if layers is None:
        layers = default_layers(spec)
    if layers < 1:
        if prefix == 0:
            raise PlanError(f"{spec.source}: layer 0 is a {spec.layers[0].kind}; nothing can be fused")
        raise PlanError(f"fused range must hold at least one layer, got {layers}")
    if layers > prefix:
        if prefix == len(spec.layers):
            raise PlanError(f"{spec.source} has only {prefix} layers, cannot fuse {layers}")
        bad = spec.layers[prefix]
        raise PlanError(f"cannot fuse {layers} layers of {spec.source}: layer {bad.index} is a {bad.kind} that "
                        f"cannot be fused (at most {prefix} here; fusable kinds: conv, crop, maxpool, route, "
                        "shortcut, upsample, yolo)")
    windows = tuple(Window.of(l, spec.layers) for l in spec.layers[:layers])
    for w in windows:
        w.check_windows()
    return windows


def phases(scheme: str, rows: int, cols: int) -> list[int]:
    """Phase of every tile (row-major) under a reuse scheme; a task borrows only from lower phases."""
    if scheme == "none":
        return [0] * (rows * cols)
    if scheme == "checkerboard":
        return [(r + c) % 2 for r in range(rows) for c in range(cols)]
    if scheme == "quad":
        return [r % 2 + c % 2 for r in range(rows) for c in range(cols)]
    if scheme == "wave":
        return [r + c for r in range(rows) for c in range(cols)]
    raise PlanError(f"unknown reuse scheme {scheme!r} (have: {', '.join(SCHEMES)})")


@dataclass
class _Built:
    steps: list[LayerStep]
    input_region: Rect
    borrowed: list[tuple[int, int, Rect]]  # (producer, layer, region) in step order


def _walk(windows: Sequence[Window], outputs: Sequence[tuple[int, Rect]],
          lenders: Sequence[list[tuple[int, Rect]]] | None) -> _Built:
    """Walk one tile back through the fused DAG, borrowing from ``lenders[l]`` if given.

    ``outputs``: (layer, the tile's region of that output). Layers are visited in decreasing
    index order (every reader of a layer comes after it), so when layer ``l`` is reached every
    region its readers need of it is known. ``lenders[l]`` lists (task id, region of layer
    ``l``'s output that task computes and may lend). Each needed pixel is taken from the first
    lender (largest overlap first) that has it, otherwise computed; only the computed part is
    carried back, through the layer's region rule, to its sources.
    """
    n = len(windows)
    need: dict[int, list[Rect]] = {l: [] for l in range(-1, n)}
    for o, r in outputs:
        need[o].append(r)
    steps: list[LayerStep] = []
    borrowed: list[tuple[int, int, Rect]] = []
    for l in range(n - 1, -1, -1):
        w = windows[l]
        nd = [r for r in need[l] if not is_empty(r)]
        box = bbox(nd)
        cands: list[tuple[int, Rect]] = []
        if lenders is not None and nd and w.kind in LENDING_KINDS:
            cands = [(tid, r) for tid, r in lenders[l] if not is_empty(intersect(r, box))]
            cands.sort(key=lambda c: (-area(intersect(c[1], box)), c[0]))
        pieces = decompose(nd, [r for _, r in cands])
        computed = tuple(p for p, lab in pieces if lab < 0)
        borrowed.extend((cands[lab][0], l, p) for p, lab in pieces if lab >= 0)
        steps.append(LayerStep(l, tuple(nd), box, computed, (), (), sum(w.flops(g) for g in computed)))
        for g in computed:
            for src, reg in w.input_regions(g):
                need[src].append(reg)
    steps.reverse()
    return _Built(steps, bbox([r for r in need[-1] if not is_empty(r)]), borrowed)


def block_consumers(windows: Sequence[Window]) -> dict[int, list[int]]:
    """For every fused layer (and -1, the frame), the fused layers that read it, in order."""
    out: dict[int, list[int]] = {l: [] for l in range(-1, len(windows))}
    for w in windows:
        for s in w.inputs:
            out[s].append(w.index)
    return out


def _can_band(windows: Sequence[Window], steps: Sequence[LayerStep], l: int,
              consumers: dict[int, list[int]] | None = None, outputs: Sequence[int] = ()) -> bool:
    """Whether step ``l`` (a maxpool) can run fused with step ``l - 1`` in row bands."""
    if l == 0 or steps[l - 1].band or is_empty(steps[l].buffer) or is_empty(steps[l - 1].buffer):
        return False
    # in a DAG the previous layer's map must be read by this pool alone, and be no output
    if windows[l - 1].kind not in ("conv", "maxpool") or (l - 1) in outputs:
        return False
    if consumers is not None and consumers[l - 1] != [l]:
        return False
    w = windows[l]
    # Non-overlapping windows (size == stride, no padding): every input row feeds exactly one
    # output row, so bands of input rows aligned to the stride are independent of each other.
    return w.kind == "maxpool" and w.size == w.stride and w.pad == 0 and height(steps[l].buffer) > BAND_ROWS


def band_rects(windows: Sequence[Window], prev: LayerStep, pool: LayerStep, l: int) -> list[tuple[Rect, Rect]]:
    """The bands of a fused (layer ``l - 1``, maxpool ``l``) pair: (pool rows, previous-layer rows).

    Each pair is (a band of the pool's buffer, the part of the previous layer's buffer its windows
    read); a band whose previous-layer part is empty is fully borrowed.
    """
    s = windows[l].stride
    py0, py1, px0, px1 = pool.buffer
    ax0, ax1 = prev.buffer[2], prev.buffer[3]
    out = []
    for q in range(py0, py1, pool.band):
        q1 = min(py1, q + pool.band)
        prev_rows = intersect((q * s, q1 * s, ax0, ax1), prev.buffer)
        out.append(((q, q1, px0, px1), prev_rows))
    return out


def _working_set(windows: Sequence[Window], v: Variant, strip_bytes: Sequence[int],
                 outputs: Sequence[int] = (), consumers: dict[int, list[int]] | None = None) -> int:
    """Peak activation bytes the executor holds while running variant ``v`` (see :class:`Variant`).

    An upper bound by construction: at each step it adds the largest of each kind of scratch
    buffer, though the executor never holds two of them at once. A layer's buffer lives from its
    step until its last reader inside the block has run (an output's until the end).
    """
    # The frame input and the borrowed strips belong to the caller, who holds them for the
    # whole task; the first layer's input is therefore counted once, in ``held``.
    held = windows[0].in_bytes(v.input_region) + sum(strip_bytes[s] for st in v.steps for s in st.borrowed)
    if consumers is None:
        consumers = block_consumers(windows)
    last = {l: (len(windows) if l in outputs or not cs else max(cs)) for l, cs in consumers.items()}
    alive: dict[int, int] = {}

    def done(l: int, nbytes: int) -> None:
        alive[l] = nbytes
        for k in [k for k in alive if last[k] <= l]:
            del alive[k]

    published = 0
    peak = 0
    steps = v.steps
    l = 0
    while l < len(steps):
        w, st = windows[l], steps[l]
        if l + 1 < len(steps) and steps[l + 1].band:
            wp, pool = windows[l + 1], steps[l + 1]
            band = prev_scratch = pool_scratch = 0
            for pool_rows, prev_rows in band_rects(windows, st, pool, l + 1):
                band = max(band, w.out_bytes(prev_rows))
                prev_scratch = max([prev_scratch] + [w.out_bytes(intersect(g, prev_rows)) for g in st.computed
                                                     if intersect(g, prev_rows) != prev_rows])
                pool_scratch = max([pool_scratch] + [wp.out_bytes(intersect(g, pool_rows)) for g in pool.computed])
            published += sum(strip_bytes[s] for s in st.published + pool.published)
            out_bytes = wp.out_bytes(pool.buffer)
            peak = max(peak, sum(alive.values()) + out_bytes + band + prev_scratch + pool_scratch + published)
            done(l + 1, out_bytes)
            l += 2
            continue
        out_bytes = w.out_bytes(st.buffer)
        # a computed rectangle smaller than the buffer is written to scratch, then copied in
        scratch = max((w.out_bytes(g) for g in st.computed if g != st.buffer), default=0)
        published += sum(strip_bytes[s] for s in st.published)
        peak = max(peak, sum(alive.values()) + out_bytes + scratch + published)
        done(l, out_bytes)
        l += 1
    return peak + held


def _scaled_owned(windows: Sequence[Window], tile: Rect, base: tuple[int, int]) -> list[Rect]:
    """A DAG block's ``owned`` regions: the tile's part of every map, its edges scaled from the
    grid's output like the outputs' (see :func:`output_tiles`), so they partition every map."""
    bh, bw = base
    y0, y1, x0, x1 = tile
    return [(y0 * w.out_shape[1] // bh, y1 * w.out_shape[1] // bh, x0 * w.out_shape[2] // bw,
             x1 * w.out_shape[2] // bw) for w in windows]


def make_plan(model: Any, grid: tuple[int, int] | str = (5, 5), layers: int | None = None, *,
              scheme: str = "none", borrow: str = DEFAULT_BORROW, band: bool = True) -> Plan:
    """Partition one frame of ``model``'s fused block into tasks.

    Parameters
    ----------
    model : Network or ModelSpec
        Only the layer geometry is used (a ``Network``'s ``spec``).
    grid : (rows, cols) or "RxC"
        Tiles of the coarsest fused output; each tile must hold at least one pixel.
    layers : int, optional
        Number of fused layers from layer 0; default :func:`default_layers` for this grid and
        scheme (16 for YOLOv2, chosen by cost for DAG models).
    scheme : {"none", "checkerboard", "quad", "wave", "auto"}
        Task phases for data reuse; "none" gives independent full tasks only.
    borrow : {"halo", "owned"}
        What a producer lends: anything it computed, or only its own share of each map.
    band : bool
        Run a layer and a following non-overlapping maxpool together in row bands (smaller
        working set, same FLOPs and bits).

    Returns
    -------
    Plan

    Raises
    ------
    PlanError
        Bad grid, a fused range with a layer that cannot be fused, an unknown scheme or mode.
    """
    spec: ModelSpec = model if isinstance(model, ModelSpec) else model.spec
    rows, cols = parse_grid(grid) if isinstance(grid, str) else (int(grid[0]), int(grid[1]))
    scheme = resolve_scheme(scheme, spec, layers)
    if scheme not in SCHEMES:
        raise PlanError(f"unknown reuse scheme {scheme!r} (have: {', '.join(SCHEMES)})")
    if borrow not in BORROW_MODES:
        raise PlanError(f"unknown borrow mode {borrow!r} (have: {', '.join(BORROW_MODES)})")
    if layers is None:
        layers = default_layers(spec, (rows, cols), scheme)
    windows = fused_windows(spec, layers)
    outs = block_outputs(spec, len(windows))
    shapes = [windows[o].out_shape for o in outs]
    base = shapes[_coarsest(shapes)]
    try:
        tile_outs = output_tiles(shapes, rows, cols)
    except PlanError as exc:
        raise PlanError(f"layers 0-{len(windows) - 1}: {exc}") from None
    grid_at = _coarsest(shapes)
    tiles = [to[grid_at] for to in tile_outs]
    chain = len(outs) == 1 and outs[0] == len(windows) - 1 and all(w.kind in ("conv", "maxpool") for w in windows)
    consumers = block_consumers(windows)
    phase = phases(scheme, rows, cols)
    order = sorted(range(len(tiles)), key=lambda t: (phase[t], t))
    n_layers = len(windows)

    lenders: list[list[tuple[int, Rect]]] = [[] for _ in range(n_layers)]
    pending: list[tuple[int, int, Rect]] = []  # lenders of the current phase, added when it ends
    built_full: dict[int, _Built] = {}
    built_reuse: dict[int, _Built] = {}
    current_phase = None
    for t in order:
        if phase[t] != current_phase:
            for tid, l, r in pending:
                lenders[l].append((tid, r))
            pending.clear()
            current_phase = phase[t]
        targets = list(zip(outs, tile_outs[t]))
        full = _walk(windows, targets, None)
        built_full[t] = full
        chosen = full
        if scheme != "none" and any(lenders):
            reuse = _walk(windows, targets, lenders)
            if reuse.borrowed:
                built_reuse[t] = chosen = reuse
        owned = None
        if borrow == "owned":
            owned = owned_regions(windows, tiles[t]) if chain else _scaled_owned(windows, tiles[t], base[1:])
        for st in chosen.steps:
            if windows[st.layer].kind not in LENDING_KINDS:
                continue
            for g in st.computed:
                lend = g if owned is None else intersect(g, owned[st.layer])
                if not is_empty(lend):
                    pending.append((t, st.layer, lend))

    # Strips, numbered in execution order of their consumers.
    strips: list[Strip] = []
    consumes: dict[int, list[int]] = {t: [] for t in order}
    produces: dict[int, list[int]] = {t: [] for t in order}
    borrowed_at: dict[tuple[int, int], list[int]] = {}
    published_at: dict[tuple[int, int], list[int]] = {}
    for t in order:
        if t not in built_reuse:
            continue
        for producer, l, region in built_reuse[t].borrowed:
            s = Strip(len(strips), producer, t, l, region, windows[l].out_bytes(region))
            strips.append(s)
            consumes[t].append(s.id)
            produces[producer].append(s.id)
            borrowed_at.setdefault((t, l), []).append(s.id)
            published_at.setdefault((producer, l), []).append(s.id)
    strip_bytes = [s.nbytes for s in strips]

    def finish(t: int, b: _Built, kind: str) -> Variant:
        steps: list[LayerStep] = []
        for st in b.steps:
            steps.append(LayerStep(st.layer, st.needed, st.buffer, st.computed,
                                   tuple(borrowed_at.get((t, st.layer), ())) if kind == "reuse" else (),
                                   tuple(published_at.get((t, st.layer), ())), st.flops))
            if band and _can_band(windows, steps, st.layer, consumers, outs):
                steps[-1] = replace(steps[-1], band=BAND_ROWS)
        v = Variant(kind, b.input_region, tuple(steps), sum(st.flops for st in steps),
                    windows[0].in_bytes(b.input_region),
                    sum(strip_bytes[s] for st in steps for s in st.borrowed),
                    sum(strip_bytes[s] for st in steps for s in st.published), 0)
        return Variant(v.kind, v.input_region, v.steps, v.flops, v.input_bytes, v.borrowed_bytes,
                       v.published_bytes, _working_set(windows, v, strip_bytes, outs, consumers))

    tasks = []
    for t in order:
        reuse_v = finish(t, built_reuse[t], "reuse") if t in built_reuse else None
        tasks.append(Task(t, (t // cols, t % cols), tiles[t], phase[t], finish(t, built_full[t], "full"), reuse_v,
                          tuple(sorted({strips[s].producer for s in consumes[t]})),
                          tuple(produces[t]), tuple(consumes[t]), tuple(tile_outs[t])))
    plan = Plan(spec.source, tuple(spec.input_shape), windows, (rows, cols), scheme, borrow,  # type: ignore[arg-type]
                tuple(tasks), tuple(strips), outputs=outs)
    log.debug("plan %dx%d, %d layers (outputs %s), scheme %s/%s: %d tasks, %d strips", rows, cols, n_layers,
              outs, scheme, borrow, len(tasks), len(strips))
    return plan


def parse_grid(text: str) -> tuple[int, int]:
    """``"5x5"`` or ``"4x6"`` (rows x cols) to a tuple; :class:`PlanError` otherwise."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        if len(parts) != 2:
            raise ValueError
        rows, cols = int(parts[0]), int(parts[1])
    except ValueError:
        raise PlanError(f"grid must look like 5x5 (rows x cols), got {text!r}") from None
    if rows < 1 or cols < 1:
        raise PlanError(f"grid must be at least 1x1, got {text!r}")
    return rows, cols


# ------------------------------------------------------------------------------------ analysis
def simulate(plan: Plan, devices: int, reuse: bool = True, frames: int = 1) -> float:
    """Makespan of ``frames`` frames on ``devices`` equal devices, relative to the ideal
    ``frames * frame / devices`` (time counted in FLOPs, transfers free).

    The policy is the runtime's: a free device takes the first task, in plan order and frame after
    frame, whose producers are all done and runs its reuse variant; if no task is ready it either
    waits for the producers of the first waiting task or runs that task's full variant at once,
    whichever finishes it sooner. This is what tells a scheme that saves FLOPs by chaining phases
    from one that keeps devices busy.
    """
    if devices < 1 or frames < 1:
        raise PlanError(f"need at least one device and one frame, got {devices} and {frames}")
    pending = [(f, t) for f in range(frames) for t in plan.tasks]
    finish: dict[tuple[int, int], float] = {}
    free = [0.0] * devices
    inf = float("inf")

    def done_at(f: int, t: Task) -> float:
        return max((finish.get((f, p), inf) for p in t.producers), default=0.0)

    while pending:
        d = min(range(devices), key=free.__getitem__)
        now = free[d]
        pick = None
        for i, (f, t) in enumerate(pending):
            if not reuse or t.reuse is None or done_at(f, t) <= now:
                pick = i
                break
        if pick is not None:
            f, t = pending.pop(pick)
            cost = t.reuse.flops if reuse and t.reuse is not None else t.full.flops
        else:
            f, t = pending[0]
            assert t.reuse is not None
            later = [x for x in finish.values() if x > now]
            if later and done_at(f, t) + t.reuse.flops < now + t.full.flops:
                free[d] = min(later)  # wait for the next task to finish, then look again
                continue
            pending.pop(0)
            cost = t.full.flops
        finish[(f, t.id)] = now + cost
        free[d] = now + cost
    return max(finish.values()) / (frames * plan.frame_flops / devices)
