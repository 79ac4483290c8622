"""``--grid auto``: choose the tile grid, reuse scheme and frames in flight for a cluster. Pure.

The planner predicts, for every candidate, frames per second and the latency of a frame, from a
description of the cluster (:class:`Cluster`: per node its speed, the memory it offers and its
link rate; which node is the source and which the gateway) and the figures of each candidate's
plan (:class:`CandidatePlan`, from :func:`make_plan` and :meth:`Plan.totals`). It never reads a
clock or a socket: speeds and link rates are inputs, measured or assumed by the caller.

Candidates
----------
``1x1`` (whole-frame data parallelism: the node that runs the fused block keeps its output and
runs the tail too), and every grid from 2x2 to 6x6 with reuse scheme ``quad`` and ``none``; each
with 1 to ``2 x nodes + 2`` frames in flight (the runtime's own default is the largest).

Cost model
----------
Per frame a candidate executes ``W_f`` FLOPs in the fused block (its plan's executed FLOPs, so a
grid's redundant halo compute is in it; with reuse the reuse variants') and ``W_t`` in the tail
(every layer after the fused block; one node runs a frame's tail). Bytes that cross links per
frame: the tile inputs as the camera's uint8 pixels (a quarter of the plan's float32 input bytes:
``P``), the reuse strips (``S``), the tile outputs to the gateway (``O``), the assembled fused
map from the gateway to the node that runs the tail (``M = O``) and the result (small). At 1x1
a node that holds the tail runs it on the map it has, so ``O`` and ``M`` never travel.

*Node time.* A node ``i`` spends, per frame of fused work it does,
``a_i = W_f / speed_i + tasks * TASK_OVERHEAD + EXPOSED_TRANSFER * 2 * X_i / link_i``, where
``X_i`` are the bytes that work moves: ``P`` unless ``i`` is the source, ``O`` unless it is the
gateway, and ``S`` whenever two or more nodes share the tiles (a tile's producers mostly ran
elsewhere). Each byte occupies a sender's and a receiver's link, hence the 2; the runtime hides
part of every transfer behind compute (prefetching the next task), and ``EXPOSED_TRANSFER`` is
the part it does not. A tail costs ``b_i = W_t / speed_i + TASK_OVERHEAD + EXPOSED_TRANSFER * 2 *
Y_i / link_i``, ``Y_i`` = the map and the result unless ``i`` is the gateway.

*Throughput* is the fluid optimum of that time: tails only on nodes that hold them, fused work
on any node that holds a tile. With ``R_t = sum 1/b_i`` over tail nodes, ``R_a`` = ``sum 1/a_i``
over the same nodes and ``R_b`` over the nodes that hold tiles only,
``fps = min(R_t, R_t (R_a + R_b) / (R_a + R_t))``. It is then capped by the shared links: the
source's uplink carries the pixels of every frame it does not compute itself
(``fps <= 1/a_src + uplink / P``), the gateway's downlink the tile outputs of work done
elsewhere (``fps <= 1/a_gw + downlink / O``), its uplink the maps for tails run elsewhere
(``fps <= 1/b_gw + uplink_gw / M``). With ``k`` frames in flight no more than ``k`` frames can be
in the cluster at once (Little's law; these are the asymptotic bounds, optimistic near the
knee): ``fps(k) = min(fps, k / latency)`` and a frame's latency under that load is
``max(latency, k / fps(k))``.

*Single-frame latency* (an idle cluster). 1x1: the best node that holds a whole frame gets the
pixels (unless it is the source), runs the fused block and the tail, and sends the result.
Tiled: the fused block's makespan on the nodes that hold tiles (:func:`simulate`, at their mean
speed; the scheme's phases are in it) overlaps the transfers on the critical links (the source's
uplink for the pixels, the gateway's downlink for the outputs, the strips spread over every
node): ``max(c, x) + EXPOSED_TRANSFER * min(c, x)``; then the best tail node gets the map
(unless it is the gateway) and runs the tail.

*Memory.* A node that offers less than a task needs (:func:`tile_memory`; tails:
:func:`tail_memory` on top) cannot take it. A candidate no node can take tiles or tails of is
infeasible.

Calibration
-----------
``DEFAULT_NODE_SPEED``, ``EXPOSED_TRANSFER`` and ``TASK_OVERHEAD`` were fitted to the runs
recorded on emulated Pis (0.2 core, 20 Mbit/s; ``tests/test_auto_plan.py`` keeps the comparison):
one node 0.246 fps; 1x1 1.383 fps at 6 nodes and 1.758 at 8; 5x5 reuse 0.745 and 0.902.
Nothing was measured for latency: its predictions use the same constants, unchecked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from ..darknet import ModelSpec
from ..errors import PlanError
# the node, link and pixel constants are the depth model's too: defined once, in .plan
from .plan import DEFAULT_LINK_RATE as DEFAULT_LINK_RATE
from .plan import DEFAULT_NODE_SPEED as DEFAULT_NODE_SPEED
from .plan import PIXEL_SHARE as PIXEL_SHARE
from .plan import Plan, make_plan, simulate

# ------------------------------------------------------------------------------------ constants
EXPOSED_TRANSFER = 0.4
"""Share of a transfer's link time that a node waits for instead of computing (fitted; see the
module docstring). The rest is hidden behind compute by fetching the next task early."""
TASK_OVERHEAD = 0.07
"""Seconds of a node's time per task beyond its FLOPs and bytes: a steal round trip, messages,
the hand-over to a compute thread (fitted: it is what makes 25 small tasks cost more than one)."""
RESULT_BYTES = 4096
"""A frame's result on the wire: the output's digest and the detections."""
GRIDS = (2, 3, 4, 5, 6)
SCHEMES = ("quad", "none")
OBJECTIVES = ("throughput", "latency")


# ------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One node as the planner sees it. ``speed`` 0: it computes nothing (a camera only);
    ``memory`` 0: unlimited."""

    speed: float = DEFAULT_NODE_SPEED  # FLOP/s (or relative, if every node's is)
    memory: int = 0  # bytes offered for tasks
    link: float = DEFAULT_LINK_RATE  # bytes/s each way


@dataclass(frozen=True, slots=True)
class Cluster:
    """The nodes, which one is the (only) source and which the gateway, and the source's uplink
    and the gateway's downlink when they differ from those nodes' links."""

    nodes: tuple[NodeSpec, ...]
    source: int = 0
    gateway: int = 0
    uplink: float | None = None
    downlink: float | None = None
    pixel_ratio: float = 1.0
    """Bytes a tile's pixels take on the wire over their raw size: the frame codec's ratio
    (``--frame-codec``; measured by the source from its grants, or the codec's typical figure)."""

    def __post_init__(self) -> None:
        if not self.nodes:
            raise PlanError("a cluster needs at least one node")
        if not 0 < self.pixel_ratio <= 1.5:
            raise PlanError(f"pixel ratio {self.pixel_ratio} out of range (0, 1.5]")
        for name, i in (("source", self.source), ("gateway", self.gateway)):
            if not 0 <= i < len(self.nodes):
                raise PlanError(f"{name} {i} is not one of the {len(self.nodes)} nodes")
        for n in self.nodes:
            if n.speed < 0 or n.memory < 0 or n.link <= 0:
                raise PlanError(f"bad node {n}: speed and memory must be >= 0, the link > 0")

    @classmethod
    def equal(cls, n: int, speed: float = DEFAULT_NODE_SPEED, link: float = DEFAULT_LINK_RATE,
              memory: int = 0, source: int = 0, gateway: int = 0, pixel_ratio: float = 1.0) -> "Cluster":
        """``n`` equal nodes."""
        return cls(tuple(NodeSpec(speed, memory, link) for _ in range(n)), source, gateway,
                   pixel_ratio=pixel_ratio)

    @property
    def computing(self) -> int:
        return sum(1 for n in self.nodes if n.speed > 0)


def tile_memory(plan: Plan) -> int:
    """Bytes a node needs to run the plan's tiles: the fused weights and the largest task's
    working set."""
    return plan.weight_bytes + plan.totals(reuse=True).max_working_set


def tail_memory(layers: Sequence[object], plan: Plan) -> int:
    """Bytes a node needs on top of :func:`tile_memory` to run tails too: the remaining layers'
    weights and a generous activation bound (a layer's input and output, a routed map, and the
    fused map the tail starts from). ``layers``: the model's layer specs."""
    rest = layers[plan.n_layers:]
    weights = 4 * sum(int(getattr(l, "n_params")) for l in rest)
    acts = [4 * math.prod(getattr(l, "out_shape")) for l in rest] or [0]
    return weights + 3 * max(acts) + plan.fused_bytes


@dataclass(frozen=True)
class CandidatePlan:
    """A grid and scheme with the figures of its plan the cost model reads."""

    grid: tuple[int, int]
    scheme: str
    plan: Plan = field(repr=False, compare=False)
    fused_flops: int  # executed per frame
    tail_flops: int
    pixel_bytes: float  # the tile inputs as camera pixels
    strip_bytes: int
    output_bytes: int
    tile_memory: int
    tail_memory: int

    @property
    def tasks(self) -> int:
        return len(self.plan.tasks)

    @property
    def name(self) -> str:
        return "1x1" if self.tasks == 1 else f"{self.grid[0]}x{self.grid[1]} {self.scheme}"

    @classmethod
    def of(cls, spec: ModelSpec, plan: Plan) -> "CandidatePlan":
        t = plan.totals(reuse=plan.scheme != "none")
        total = sum(int(l.flops) for l in spec.layers)
        return cls(plan.grid, plan.scheme, plan, t.flops, total - plan.frame_flops, PIXEL_SHARE * t.input_bytes,
                   t.overlap_bytes, t.output_bytes, tile_memory(plan), tail_memory(spec.layers, plan))


def candidate_plans(spec: ModelSpec, layers: int | None = None, grids: Iterable[int] = GRIDS,
                    schemes: Iterable[str] = SCHEMES) -> list[CandidatePlan]:
    """Every candidate's plan: 1x1, and each ``g x g`` in ``grids`` with each scheme that fits
    the fused output (a grid larger than the map is left out)."""
    out = [CandidatePlan.of(spec, make_plan(spec, (1, 1), layers, scheme="none"))]
    for g in grids:
        for scheme in schemes:
            try:
                plan = make_plan(spec, (g, g), layers, scheme=scheme)
            except PlanError:
                continue  # the fused output is smaller than the grid
            out.append(CandidatePlan.of(spec, plan))
    return out


# ------------------------------------------------------------------------------------ outputs
@dataclass(frozen=True, slots=True)
class Prediction:
    """What the model predicts for one candidate. Infeasible: ``fps`` 0, latencies infinite and
    ``why`` says which memory was short."""

    grid: tuple[int, int]
    scheme: str
    inflight: int
    fps: float
    latency: float  # seconds per frame with ``inflight`` frames in flight
    single_latency: float  # seconds for a frame alone in an idle cluster
    bound: str  # what limits fps: compute, tails, source uplink, gateway downlink/uplink, in flight
    why: str = ""

    @property
    def feasible(self) -> bool:
        return self.fps > 0

    @property
    def name(self) -> str:
        return "1x1" if self.grid == (1, 1) else f"{self.grid[0]}x{self.grid[1]} {self.scheme}"


@dataclass(frozen=True)
class Choice:
    """The chosen candidate and the predictions of all of them."""

    best: Prediction
    predictions: tuple[Prediction, ...]
    objective: str
    latency_budget: float | None
    within_budget: bool  # False: no candidate met the budget, ``best`` has the lowest latency
    note: str


# ------------------------------------------------------------------------------------ the model
def _overlap(a: float, b: float) -> float:
    """Two things that run at the same time, with the exposed share of the shorter one."""
    return max(a, b) + EXPOSED_TRANSFER * min(a, b)


@dataclass(frozen=True, slots=True)
class _Base:
    fps: float
    bound: str
    single_latency: float
    why: str = ""


def _base(cp: CandidatePlan, cluster: Cluster) -> _Base:
    """fps with unlimited frames in flight, and single-frame latency."""
    nodes = cluster.nodes
    tiles = [i for i, n in enumerate(nodes) if n.speed > 0 and (n.memory == 0 or n.memory >= cp.tile_memory)]
    tails = [i for i in tiles if nodes[i].memory == 0 or nodes[i].memory >= cp.tile_memory + cp.tail_memory]
    if not tiles:
        return _Base(0.0, "memory", math.inf, f"no node offers the {cp.tile_memory / 1e6:.1f} MB a tile needs")
    if not tails:
        return _Base(0.0, "memory", math.inf,
                     f"no node offers the {(cp.tile_memory + cp.tail_memory) / 1e6:.1f} MB tiles and tails need")
    src, gw = cluster.source, cluster.gateway
    uplink = cluster.uplink or nodes[src].link
    downlink = cluster.downlink or nodes[gw].link
    gw_uplink = nodes[gw].link
    pixel_bytes = cp.pixel_bytes * cluster.pixel_ratio  # as they travel, in the frame codec
    whole = cp.tasks == 1  # the map stays where the fused block ran (on a node that holds tails)
    strips = cp.strip_bytes if len(tiles) > 1 else 0
    map_bytes = 0 if whole else cp.output_bytes

    def a(i: int, holds_tail: bool) -> float:
        moved = (pixel_bytes if i != src else 0) + strips
        if i != gw and not (whole and holds_tail):
            moved += cp.output_bytes
        n = nodes[i]
        return cp.fused_flops / n.speed + cp.tasks * TASK_OVERHEAD + EXPOSED_TRANSFER * 2 * moved / n.link

    def b(i: int) -> float:
        n = nodes[i]
        moved = 0 if i == gw else map_bytes + RESULT_BYTES
        return cp.tail_flops / n.speed + TASK_OVERHEAD + EXPOSED_TRANSFER * 2 * moved / n.link

    r_t = sum(1 / b(i) for i in tails)
    r_a = sum(1 / a(i, True) for i in tails)
    r_b = sum(1 / a(i, False) for i in tiles if i not in tails)
    limits = [(min(r_t, r_t * (r_a + r_b) / (r_a + r_t)), "compute" if r_b == 0 else "tails")]
    if pixel_bytes:
        own = 1 / a(src, src in tails) if src in tiles else 0.0
        limits.append((own + uplink / pixel_bytes, "source uplink"))
    if map_bytes or (cp.output_bytes and not whole):
        own = 1 / a(gw, gw in tails) if gw in tiles else 0.0
        limits.append((own + downlink / cp.output_bytes, "gateway downlink"))
        own_tails = 1 / b(gw) if gw in tails else 0.0
        limits.append((own_tails + gw_uplink / cp.output_bytes, "gateway uplink"))
    fps, bound = min(limits)

    def tail_on(i: int) -> float:
        n = nodes[i]
        if i == gw:
            return cp.tail_flops / n.speed
        return (map_bytes / min(gw_uplink, n.link) + cp.tail_flops / n.speed
                + RESULT_BYTES / min(n.link, downlink))

    if whole:
        def whole_on(i: int) -> float:
            n = nodes[i]
            pixels = pixel_bytes / min(uplink, n.link) if i != src else 0.0
            result = RESULT_BYTES / min(n.link, downlink) if i != gw else 0.0
            return pixels + (cp.fused_flops + cp.tail_flops) / n.speed + result
        latency = min(whole_on(i) for i in tails)
    else:
        speeds = sorted((nodes[i].speed for i in tiles), reverse=True)[:cp.tasks]
        devices = len(speeds)
        ratio = simulate(cp.plan, devices, reuse=cp.scheme != "none", frames=1)
        compute = ratio * cp.plan.frame_flops / devices / (sum(speeds) / devices)
        mean_link = sum(nodes[i].link for i in tiles) / len(tiles)
        away = (len(tiles) - 1) / len(tiles)
        moves = (pixel_bytes * (away if src in tiles else 1.0) / uplink + strips / (len(tiles) * mean_link)
                 + cp.output_bytes * (away if gw in tiles else 1.0) / downlink)
        latency = _overlap(compute, moves) + min(tail_on(i) for i in tails)
    return _Base(fps, bound, latency)


def predict(cp: CandidatePlan, cluster: Cluster, inflight: int) -> Prediction:
    """The model's figures for one candidate with ``inflight`` frames in flight."""
    return _with_inflight(cp, _base(cp, cluster), inflight)


def _with_inflight(cp: CandidatePlan, base: _Base, inflight: int) -> Prediction:
    if base.fps <= 0:
        return Prediction(cp.grid, cp.scheme, inflight, 0.0, math.inf, math.inf, base.bound, base.why)
    fps, bound = base.fps, base.bound
    if inflight / base.single_latency < fps:
        fps, bound = inflight / base.single_latency, "frames in flight"
    return Prediction(cp.grid, cp.scheme, inflight, fps, max(base.single_latency, inflight / fps),
                      base.single_latency, bound)


def predictions(candidates: Sequence[CandidatePlan], cluster: Cluster,
                inflights: Iterable[int] | None = None) -> list[Prediction]:
    """Every candidate at every frames-in-flight count (default 1 .. 2 x computing nodes + 2)."""
    ks = list(inflights) if inflights is not None else list(range(1, 2 * max(1, cluster.computing) + 3))
    out: list[Prediction] = []
    for cp in candidates:
        base = _base(cp, cluster)
        out.extend(_with_inflight(cp, base, k) for k in ks)
    return out


def _pick(preds: Sequence[Prediction], objective: str, latency_budget: float | None
          ) -> tuple[Prediction, bool, str]:
    """The objective's choice among feasible predictions, whether it met the budget, and why."""

    def most_fps(ps: list[Prediction]) -> Prediction:
        top = max(p.fps for p in ps)
        near = [p for p in ps if p.fps >= top * (1 - 1e-9)]
        return min(near, key=lambda p: (p.single_latency, -p.inflight))

    def least_latency(ps: list[Prediction]) -> Prediction:
        low = min(p.latency for p in ps)
        near = [p for p in ps if p.latency <= low * (1 + 1e-9)]
        # fewest frames in flight first: below the knee the bound says latency stays flat, but
        # each extra frame does share the nodes with the others
        return min(near, key=lambda p: (p.inflight, -p.fps))

    feasible = [p for p in preds if p.feasible]
    if latency_budget is not None:
        fits = [p for p in feasible if p.latency <= latency_budget]
        if fits:
            return most_fps(fits), True, f"the most frames/s within {latency_budget * 1e3:.0f} ms"
        best = least_latency(feasible)
        return best, False, (f"no candidate meets {latency_budget * 1e3:.0f} ms; the lowest latency is "
                             f"{best.latency * 1e3:.0f} ms")
    if objective == "throughput":
        return most_fps(feasible), True, "the most frames/s"
    return least_latency(feasible), True, "the lowest latency"


def choose(candidates: Sequence[CandidatePlan], cluster: Cluster, objective: str = "throughput",
           latency_budget: float | None = None, inflights: Iterable[int] | None = None) -> Choice:
    """The candidate the objective prefers, with the predictions of all of them.

    Parameters
    ----------
    candidates : CandidatePlan
        From :func:`candidate_plans`.
    cluster : Cluster
    objective : {"throughput", "latency"}
        Most frames/s (ties: the lower single-frame latency, then the most frames in flight,
        which keeps every node fed where the fluid model is optimistic), or the lowest latency
        (ties: the fewest frames in flight, then the higher fps).
    latency_budget : float, optional
        Seconds. Under either objective: the most frames/s among the candidates whose latency
        (at their frames in flight) is within it; if none is, the lowest latency, said in
        ``note`` and ``within_budget``.
    inflights : int, optional
        Frames-in-flight counts to try (default 1 .. 2 x computing nodes + 2).

    Raises
    ------
    PlanError
        An unknown objective, or no feasible candidate at all.
    """
    if objective not in OBJECTIVES:
        raise PlanError(f"unknown objective {objective!r} (have: {', '.join(OBJECTIVES)})")
    preds = predictions(candidates, cluster, inflights)
    if not any(p.feasible for p in preds):
        whys = sorted({p.why for p in preds if p.why})
        raise PlanError("no candidate fits this cluster: " + ("; ".join(whys) or "no candidates"))
    best, within, note = _pick(preds, objective, latency_budget)
    return Choice(best, tuple(preds), objective, latency_budget, within, note)


def format_choice(choice: Choice) -> str:
    """A table: one row per grid and scheme, at the frames in flight the objective would pick for
    it alone, then the choice."""
    rows: dict[tuple[tuple[int, int], str], list[Prediction]] = {}
    for p in choice.predictions:
        rows.setdefault((p.grid, p.scheme), []).append(p)
    lines = [f"{'candidate':<10} {'in flight':>9} {'fps':>7} {'latency s':>9} {'alone s':>8}  limit"]
    for ps in rows.values():
        if not any(p.feasible for p in ps):
            lines.append(f"{ps[0].name:<10} {'-':>9} {'-':>7} {'-':>9} {'-':>8}  {ps[0].why}")
            continue
        p = choice.best if choice.best in ps else _pick(ps, choice.objective, choice.latency_budget)[0]
        mark = "  <- chosen" if p == choice.best else ""
        lines.append(f"{p.name:<10} {p.inflight:>9} {p.fps:>7.3f} {p.latency:>9.2f} {p.single_latency:>8.2f}  "
                     f"{p.bound}{mark}")
    b = choice.best
    lines.append(f"choice ({choice.objective}: {choice.note}): {b.name}, {b.inflight} frames in flight, "
                 f"predicted {b.fps:.3f} fps, latency {b.latency:.2f} s ({b.single_latency:.2f} s alone)")
    return "\n".join(lines)
