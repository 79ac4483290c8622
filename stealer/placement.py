"""Placement by memory: which node holds which weights, so that every node's peak fits its offer.

A pure planner (no I/O, no clocks): a model spec and the memory each node offers
(``--max-memory``) in, a :class:`Placement` out, or :class:`~stealer.errors.PlacementError`
naming the layer that fits nowhere and the memory it needs.

Modes, per layer:

* ``tiles``: the fused prefix (layers ``0 .. fused-1``), run as FTP tiles. Every node that
  computes tiles holds the prefix's weights and one task's working set (``tile_bytes``, from
  the FTP planner). Nodes with room left after the tail is placed compute tiles.
* ``whole``: the layer's weights on one node: the coordinator (the first node, which gathers
  the tail and runs the layers without weights) when they fit there, else the node with the most
  room, which then receives the layer's input and returns its output (a pipeline stage).
* ``shards``: the layer split by output channels into ``K`` shards (:func:`split_channels`) on
  ``K`` distinct nodes, each receiving the layer's whole input and returning its slice of the
  output; with ``coded``, a parity shard on a further node (see :mod:`stealer.shard`).
* ``-``: a layer without weights, run on the coordinator.

Memory model of a node (bytes): ``runtime + weights held + the largest activation working set
it handles``, where a layer's working set on the coordinator is its input, its output and the
earlier outputs kept for later routes; on a shard holder, the layer's input and its shard's
output; on a tile node, ``tile_bytes``. Weights count folded float32 (weights and bias):
:func:`stealer.shard.read_shards` folds batch norm in place, so reading costs no second copy.

Choice of ``K``: ``shards=K`` shards every layer above ``whole_below`` bytes of weights into
``min(K, channels)``; ``shards=None`` tries ``K = 1, 2, ...`` and keeps the first that fits.
Within a ``K``, a layer's shards go to the nodes with the most room, largest shard first.

Bytes moved per frame: tiles: the frame in and the fused output back (halos not counted);
whole on the coordinator: 0; whole elsewhere: input + output; shards: the input to every
holder other than the coordinator plus their outputs (the parity's too).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from .config import RUNTIME_BYTES
from .darknet import ModelSpec
from .errors import PlacementError, PlanError
from .layers import ConnectedSpec, ConvSpec, RouteSpec, ShortcutSpec

#: Layers with at most this many bytes of weights stay whole (sharding them would move the
#: layer's input to K nodes to save less memory than one activation map).
WHOLE_BELOW = 4 << 20

_MB = 1e6

#: A holding by what it is: (layer, start, stop, parity).
HoldKey = tuple[int, int, int, bool]


def split_channels(n: int, k: int) -> list[tuple[int, int]]:
    """``k`` contiguous ranges covering ``range(n)``, sizes differing by at most one (the first
    ``n % k`` ranges have the extra channel).

    Raises
    ------
    PlanError
        ``k < 1`` or ``k > n`` (a shard of no channels).
    """
    if k < 1 or k > n:
        raise PlanError(f"cannot split {n} channels into {k} shards (need 1 <= shards <= channels)")
    base, extra = divmod(n, k)
    out, a = [], 0
    for s in range(k):
        z = a + base + (1 if s < extra else 0)
        out.append((a, z))
        a = z
    return out


def channels_of(layer: ConvSpec | ConnectedSpec) -> int:
    """Output channels of a shardable layer."""
    return layer.filters if isinstance(layer, ConvSpec) else layer.outputs


def shardable(layer: object) -> bool:
    """Whether a layer can be split by output channels: conv with ``groups == 1``, or connected."""
    return isinstance(layer, ConnectedSpec) or (isinstance(layer, ConvSpec) and layer.groups == 1)


def layer_weight_bytes(layer: object) -> int:
    """Folded float32 bytes of a layer's weights and bias (batch norm folded in)."""
    if isinstance(layer, (ConvSpec, ConnectedSpec)):
        n = channels_of(layer)
        return 4 * (n * int(math.prod(layer.weight_shape[1:])) + n)
    return 0


def _row_bytes(layer: ConvSpec | ConnectedSpec) -> int:
    """Folded bytes of one output channel (its weights row and bias)."""
    return 4 * (int(math.prod(layer.weight_shape[1:])) + 1)


def _map_bytes(shape: tuple[int, ...]) -> int:
    return 4 * int(math.prod(shape))


@dataclass(frozen=True)
class NodeOffer:
    """A node and the memory it offers (bytes, ``--max-memory``)."""

    name: str
    memory: int


@dataclass(frozen=True)
class Holding:
    """Weights one node holds for one layer: channels ``[start, stop)``, or the parity of the
    layer's shards (``parity``; then ``stop - start`` is the parity's rows)."""

    node: str
    start: int
    stop: int
    nbytes: int
    parity: bool = False


@dataclass(frozen=True)
class LayerPlacement:
    index: int
    kind: str
    mode: str  # "tiles", "whole", "shards" or "-" (no weights)
    holders: tuple[Holding, ...]
    weight_bytes: int
    bytes_moved: int


@dataclass(frozen=True)
class NodeUse:
    name: str
    memory: int
    runtime: int
    weights: int
    activations: int
    tiles: bool

    @property
    def peak(self) -> int:
        return self.runtime + self.weights + self.activations


@dataclass(frozen=True)
class Placement:
    source: str
    layers: tuple[LayerPlacement, ...]
    nodes: tuple[NodeUse, ...]
    shards: int
    coded: bool
    fused: int

    @property
    def bytes_moved(self) -> int:
        return sum(l.bytes_moved for l in self.layers)

    def sharded(self) -> dict[int, int]:
        """Layer index -> K for every sharded layer (what :class:`stealer.shard.ShardedNetwork` takes)."""
        return {l.index: sum(not h.parity for h in l.holders) for l in self.layers if l.mode == "shards"}

    def held_by(self, node: str) -> list[tuple[int, Holding]]:
        """Every (layer, holding) of ``node``."""
        return [(l.index, h) for l in self.layers for h in l.holders if h.node == node]


@dataclass
class _Load:
    name: str
    memory: int
    runtime: int
    weights: int = 0
    act: int = 0
    tiles: bool = False

    def room(self, act: int) -> int:
        """Bytes of weights this node can still take if it also handles ``act`` bytes of activations."""
        return self.memory - self.runtime - self.weights - max(self.act, act)

    def take(self, weights: int, act: int) -> None:
        self.weights += weights
        self.act = max(self.act, act)


def _coordinator_acts(spec: ModelSpec, start: int) -> dict[int, int]:
    """Working set of each layer from ``start`` on, run on the coordinator: input, output and the
    outputs kept for later routes/shortcuts while it runs."""
    readers: dict[int, int] = {}
    for l in spec.layers:
        if isinstance(l, (RouteSpec, ShortcutSpec)):
            for s in l.sources:
                readers[s] = max(readers.get(s, -1), l.index)
    out = {}
    for l in spec.layers[start:]:
        kept = sum(_map_bytes(spec.layers[j].out_shape) for j, last in readers.items()
                   if max(start - 1, 0) <= j < l.index - 1 and last > l.index)
        out[l.index] = _map_bytes(l.in_shape) + _map_bytes(l.out_shape) + kept
    return out


def plan_placement(spec: ModelSpec, nodes: Sequence[NodeOffer], *, shards: int | None = None, coded: bool = False,
                   fused: int = 0, tile_bytes: int = 0, runtime: int = RUNTIME_BYTES,
                   whole_below: int = WHOLE_BELOW, prefer: Mapping[HoldKey, str] | None = None,
                   pipeline: int = 0) -> Placement:
    """Place ``spec``'s layers on ``nodes`` (the first is the coordinator) so that every node fits.

    Parameters
    ----------
    spec : ModelSpec
    nodes : sequence of NodeOffer
        At least one; with ``coded``, sharded layers need ``K + 1`` of them.
    shards : int, optional
        ``K`` for every layer above ``whole_below`` (1: none sharded); default: the smallest
        ``K`` that fits.
    coded : bool
        A parity shard per sharded layer, on a node holding none of its shards.
    fused : int
        Layers ``0 .. fused-1`` run as FTP tiles (0: none); ``tile_bytes`` is one task's working set.
    runtime : int
        An idle node runtime's peak (:data:`stealer.config.RUNTIME_BYTES`).
    prefer : mapping (layer, start, stop, parity) -> node, optional
        Where each holding is now (a re-placement): a holding stays on its node if that node is
        still there and has room, so that a node leaving moves only what it held.
    pipeline : int
        ``S >= 2``: pipeline stages instead of shards. The tail's weighted layers are cut into
        ``min(S, len(nodes))`` consecutive groups of about equal FLOPs, group ``s`` whole on
        ``nodes[s]`` (the coordinator runs the first), so that consecutive frames' tails run on
        different nodes at once (throughput; a frame's latency is not shortened).

    Raises
    ------
    PlacementError
        No placement fits: the message names the layer and the memory it needs per node.
    """
    if not nodes:
        raise PlacementError("no nodes to place the model on")
    if len({n.name for n in nodes}) != len(nodes):
        raise PlacementError("node names must be unique")
    if not 0 <= fused <= len(spec.layers):
        raise PlacementError(f"fused={fused} is not in 0..{len(spec.layers)}")
    if pipeline >= 2:
        if coded or (shards or 1) != 1:
            raise PlacementError("pipeline stages hold whole layers: no --shards K > 1, no --coded")
        return _place_pipeline(spec, nodes, min(pipeline, len(nodes)), fused, tile_bytes, runtime, prefer or {})
    if shards is not None:
        return _place(spec, nodes, shards, coded, fused, tile_bytes, runtime, whole_below, prefer or {})
    top = max(1, len(nodes) - (1 if coded else 0))
    last: PlacementError | None = None
    for k in range(1, top + 1):
        try:
            return _place(spec, nodes, k, coded, fused, tile_bytes, runtime, whole_below, prefer or {})
        except PlacementError as exc:
            last = exc
    assert last is not None
    raise last


def _loads(nodes: Sequence[NodeOffer], runtime: int) -> list[_Load]:
    """The nodes that take part, the coordinator first (it must hold the runtime). A node that
    cannot hold even the runtime takes no part: it holds nothing and runs no tiles (listed, it
    would be a node whose placement exceeds what it offers)."""
    loads = [_Load(n.name, n.memory, runtime) for n in nodes]
    coord = loads[0]
    if coord.room(0) < 0:
        raise PlacementError(f"node {coord.name} offers {coord.memory / _MB:.1f} MB, less than the bare runtime's "
                             f"{runtime / _MB:.1f} MB")
    return [coord] + [n for n in loads[1:] if n.room(0) >= 0]


def pipeline_stages(spec: ModelSpec, start: int, stages: int) -> list[list[int]]:
    """The tail's weighted layers from ``start`` on, cut into at most ``stages`` consecutive groups
    of about equal FLOPs: a layer goes to the stage its FLOPs' midpoint falls in (of ``stages``
    equal shares of the total), so no stage is over its share by more than half a layer."""
    weighted = [l for l in spec.layers[start:] if layer_weight_bytes(l)]
    total = sum(int(l.flops) for l in weighted) or 1
    groups: list[list[int]] = [[] for _ in range(stages)]
    done = 0
    for l in weighted:
        mid = done + int(l.flops) / 2
        groups[min(stages - 1, int(mid * stages / total))].append(l.index)
        done += int(l.flops)
    return [g for g in groups if g]


def _place_pipeline(spec: ModelSpec, nodes: Sequence[NodeOffer], stages: int, fused: int, tile_bytes: int,
                    runtime: int, prefer: Mapping[HoldKey, str]) -> Placement:
    loads = _loads(nodes, runtime)
    coord = loads[0]
    groups = pipeline_stages(spec, fused, min(stages, len(loads)))
    # the coordinator runs the first stage; a later stage stays on the node that holds its first
    # layer now (a re-placement: a node joining moves nothing), else it takes the next free node
    by_name = {n.name: n for n in loads}
    stage_load = [coord]
    for g in groups[1:]:
        first = spec.layers[g[0]]
        assert isinstance(first, (ConvSpec, ConnectedSpec))
        was = by_name.get(prefer.get((first.index, 0, channels_of(first), False), ""))
        if was is None or was in stage_load:
            was = next(n for n in loads if n not in stage_load)
        stage_load.append(was)
    stage_of = {i: s for s, g in enumerate(groups) for i in g}
    acts = _coordinator_acts(spec, fused)
    out: list[LayerPlacement] = []
    for layer in spec.layers[fused:]:
        i = layer.index
        if coord.room(acts[i]) < 0:
            raise PlacementError(f"layer {i} ({layer.kind}): the coordinator {coord.name} needs "
                                 f"{(runtime + coord.weights + acts[i]) / _MB:.1f} MB to run it (offers "
                                 f"{coord.memory / _MB:.1f} MB)")
        wb = layer_weight_bytes(layer)
        if wb == 0:
            coord.take(0, acts[i])
            out.append(LayerPlacement(i, layer.kind, "-", (), 0, 0))
            continue
        assert isinstance(layer, (ConvSpec, ConnectedSpec))
        node = stage_load[stage_of[i]]
        need = acts[i] if node is coord else _map_bytes(layer.in_shape) + _map_bytes(layer.out_shape)
        if node.room(need) < wb:
            raise PlacementError(f"layer {i} ({layer.kind}): pipeline stage {stage_of[i]} on {node.name} needs "
                                 f"{(runtime + node.weights + wb + max(node.act, need)) / _MB:.1f} MB "
                                 f"({wb / _MB:.1f} MB of weights for this layer); it offers {node.memory / _MB:.1f} MB")
        node.take(wb, need)
        if node is not coord:
            coord.take(0, acts[i])
        moved = 0 if node is coord else need
        out.append(LayerPlacement(i, layer.kind, "whole", (Holding(node.name, 0, channels_of(layer), wb),), wb, moved))
    if fused:
        out = _tile_layers(spec, loads, fused, tile_bytes) + out
    return Placement(spec.source, tuple(out),
                     tuple(NodeUse(n.name, n.memory, n.runtime, n.weights, n.act, n.tiles) for n in loads),
                     1, False, fused)


def _tile_layers(spec: ModelSpec, loads: list[_Load], fused: int, tile_bytes: int) -> list[LayerPlacement]:
    """Layers ``0 .. fused-1`` as FTP tiles on every node with room for their weights and one
    task's working set on top of what it holds."""
    prefix_w = sum(layer_weight_bytes(l) for l in spec.layers[:fused])
    tile_nodes = [n for n in loads if n.room(tile_bytes) >= prefix_w]
    if not tile_nodes:
        best = max(loads, key=lambda n: n.room(tile_bytes))
        raise PlacementError(f"layers 0-{fused - 1} (fused tiles): a tile node needs "
                             f"{(prefix_w + tile_bytes) / _MB:.1f} MB of weights and working set on top of what "
                             f"it holds; the roomiest, {best.name}, has {max(best.room(tile_bytes) + tile_bytes, 0) / _MB:.1f} MB")
    for n in tile_nodes:
        n.take(prefix_w, tile_bytes)
        n.tiles = True
    moved = _map_bytes(spec.input_shape) + _map_bytes(spec.layers[fused - 1].out_shape)
    return [LayerPlacement(l.index, l.kind, "tiles",
                           tuple(Holding(n.name, 0, l.out_shape[0], layer_weight_bytes(l)) for n in tile_nodes)
                           if layer_weight_bytes(l) else (),
                           layer_weight_bytes(l), moved if l.index == fused - 1 else 0)
            for l in spec.layers[:fused]]


def _place(spec: ModelSpec, nodes: Sequence[NodeOffer], k: int, coded: bool, fused: int, tile_bytes: int,
           runtime: int, whole_below: int, prefer: Mapping[HoldKey, str]) -> Placement:
    if k < 1:
        raise PlacementError(f"shards must be >= 1, got {k}")
    loads = _loads(nodes, runtime)
    coord = loads[0]
    acts = _coordinator_acts(spec, fused)
    out: list[LayerPlacement] = []
    for layer in spec.layers[fused:]:
        i = layer.index
        act = acts[i]
        if coord.room(act) < 0:
            raise PlacementError(f"layer {i} ({layer.kind}): the coordinator {coord.name} needs "
                                 f"{(runtime + coord.weights + act) / _MB:.1f} MB to run it (offers "
                                 f"{coord.memory / _MB:.1f} MB)")
        wb = layer_weight_bytes(layer)
        if wb == 0:
            coord.take(0, act)
            out.append(LayerPlacement(i, layer.kind, "-", (), 0, 0))
            continue
        assert isinstance(layer, (ConvSpec, ConnectedSpec))
        in_b, out_b = _map_bytes(layer.in_shape), _map_bytes(layer.out_shape)
        kk = min(k, channels_of(layer))
        if kk == 1 or wb <= whole_below or not shardable(layer):
            out.append(_place_whole(layer, loads, act, in_b, out_b, wb, runtime, prefer))
            continue
        out.append(_place_shards(layer, loads, kk, coded, act, in_b, out_b, runtime, prefer))
    if fused:
        out = _tile_layers(spec, loads, fused, tile_bytes) + out
    return Placement(spec.source, tuple(out),
                     tuple(NodeUse(n.name, n.memory, n.runtime, n.weights, n.act, n.tiles) for n in loads),
                     k, coded, fused)


def _place_whole(layer: ConvSpec | ConnectedSpec, loads: list[_Load], act: int, in_b: int, out_b: int, wb: int,
                 runtime: int, prefer: Mapping[HoldKey, str]) -> LayerPlacement:
    coord = loads[0]
    need = in_b + out_b
    was = next((n for n in loads[1:] if n.name == prefer.get((layer.index, 0, channels_of(layer), False))), None)
    if was is not None and was.room(need) >= wb:  # it stays where it is
        was.take(wb, need)
        coord.take(0, act)
        return LayerPlacement(layer.index, layer.kind, "whole", (Holding(was.name, 0, channels_of(layer), wb),), wb,
                              need)
    if coord.room(act) >= wb:
        coord.take(wb, act)
        return LayerPlacement(layer.index, layer.kind, "whole", (Holding(coord.name, 0, channels_of(layer), wb),),
                              wb, 0)
    best = max(loads[1:], key=lambda n: n.room(need), default=None)
    if best is None or best.room(need) < wb:
        raise PlacementError(f"layer {layer.index} ({layer.kind}): kept whole it needs {(runtime + wb + need) / _MB:.1f} "
                             f"MB on one node ({wb / _MB:.1f} MB of weights); no node has room (shard it: --shards)")
    best.take(wb, need)
    coord.take(0, act)
    return LayerPlacement(layer.index, layer.kind, "whole", (Holding(best.name, 0, channels_of(layer), wb),), wb,
                          need)


def _place_shards(layer: ConvSpec | ConnectedSpec, loads: list[_Load], k: int, coded: bool, act: int, in_b: int,
                  out_b: int, runtime: int, prefer: Mapping[HoldKey, str]) -> LayerPlacement:
    coord = loads[0]
    ranges = split_channels(channels_of(layer), k)
    row = _row_bytes(layer)
    pix = out_b // (4 * channels_of(layer))  # output pixels per channel
    need_nodes = k + (1 if coded else 0)
    if len(loads) < need_nodes:
        raise PlacementError(f"layer {layer.index} ({layer.kind}): {k} shards{' and a parity' if coded else ''} need "
                             f"{need_nodes} nodes, there are {len(loads)}")
    used: set[str] = set()
    holders: list[Holding] = []
    moved = 0
    # largest shard first, each to the node with the most room for it
    jobs = [(z - a, a, z, False) for a, z in ranges]
    if coded:
        jobs.append((max(z - a for a, z in ranges), 0, max(z - a for a, z in ranges), True))
    names = {n.name for n in loads}
    # holdings that stay on their node first (a re-placement), then largest shard first
    for rows, a, z, parity in sorted(jobs, key=lambda j: (prefer.get((layer.index, j[1], j[2], j[3])) not in names,
                                                          -j[0])):
        need = in_b + 4 * rows * pix
        cands = [n for n in loads if n.name not in used]
        best = max(cands, key=lambda n: n.room(act if n is coord else need))
        was = next((n for n in cands if n.name == prefer.get((layer.index, a, z, parity))), None)
        if was is not None and was.room(act if was is coord else need) >= rows * row:
            best = was  # a re-placement: the shard stays where it is
        room = best.room(act if best is coord else need)
        if room < rows * row:
            what = "the parity shard" if parity else f"a shard of {rows} channels"
            raise PlacementError(f"layer {layer.index} ({layer.kind}): {what} needs {(runtime + rows * row + need) / _MB:.1f} "
                                 f"MB on a node ({rows * row / _MB:.1f} MB of weights) with {k} shards; the roomiest "
                                 f"node left, {best.name}, has {max(room, 0) / _MB:.1f} MB for weights")
        best.take(rows * row, act if best is coord else need)
        used.add(best.name)
        holders.append(Holding(best.name, a, z, rows * row, parity))
        if best is not coord:
            moved += need
    coord.take(0, act)
    holders.sort(key=lambda h: (h.parity, h.start))
    return LayerPlacement(layer.index, layer.kind, "shards", tuple(holders), layer_weight_bytes(layer), moved)


def format_placement(p: Placement) -> str:
    """The plan as text: per layer its mode, bytes moved and holders; per node its peak."""
    lines = [f"{p.source}: {len(p.nodes)} nodes, shards K={p.shards}{' + parity' if p.coded else ''}, "
             f"fused layers 0-{p.fused - 1} as tiles" if p.fused else
             f"{p.source}: {len(p.nodes)} nodes, shards K={p.shards}{' + parity' if p.coded else ''}, no tiles",
             f"{'#':>3} {'layer':<10} {'mode':<7} {'weights MB':>10} {'moved MB':>9}  holders (node[channels] MB)"]
    for l in p.layers:
        if l.mode == "tiles":
            who = f"every tile node ({sum(n.tiles for n in p.nodes)})" if l.holders else ""
        else:
            who = ", ".join(f"{h.node}[{'parity ' if h.parity else ''}{h.start}:{h.stop}] {h.nbytes / _MB:.1f}"
                            for h in l.holders) or "coordinator"
        lines.append(f"{l.index:>3} {l.kind:<10} {l.mode:<7} {l.weight_bytes / _MB:>10.2f} {l.bytes_moved / _MB:>9.2f}  "
                     f"{who}")
    lines.append(f"bytes moved per frame: {p.bytes_moved / _MB:.2f} MB")
    lines.append(f"{'node':<12} {'offers MB':>9} {'runtime':>8} {'weights':>8} {'activ.':>7} {'peak MB':>8}  tiles")
    for n in p.nodes:
        lines.append(f"{n.name:<12} {n.memory / _MB:>9.1f} {n.runtime / _MB:>8.1f} {n.weights / _MB:>8.1f} "
                     f"{n.activations / _MB:>7.1f} {n.peak / _MB:>8.1f}  {'yes' if n.tiles else 'no'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- command line


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("b").rstrip("i")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256M, 1G)") from None


def add_place_parser(sub: argparse._SubParsersAction) -> None:
    """``stealer place``: where every layer's weights go for a fleet of nodes."""
    p = sub.add_parser("place", help="place a model's layers, shards and tiles on nodes by memory")
    p.add_argument("--cfg", default="yolov2", help="cfg path or built-in model name [yolov2]")
    p.add_argument("--nodes", type=int, default=None, help="number of nodes, each offering --max-memory")
    p.add_argument("--max-memory", type=_size, default=None, help="memory every node offers, e.g. 256M")
    p.add_argument("--node-memory", default=None, metavar="SIZE,SIZE,...",
                   help="memory of each node instead (the first is the coordinator)")
    p.add_argument("--shards", type=int, default=None, help="K shards per large tail layer [smallest that fits]")
    p.add_argument("--coded", action="store_true", help="a parity shard per sharded layer")
    p.add_argument("--fused", default="auto",
                   help="layers run as FTP tiles: a count, 0, or auto (the FTP planner's prefix) [auto]")
    p.add_argument("--grid", default="5x5", help="FTP grid of the tiles [5x5]")
    p.add_argument("--runtime", type=_size, default=RUNTIME_BYTES, help="an idle node runtime's peak [measured 169M]")
    p.add_argument("--pipeline", type=int, default=0, metavar="S",
                   help="pipeline stages instead of shards: the tail's weighted layers in S consecutive groups of "
                        "about equal FLOPs, one whole group per node (throughput: frames' tails overlap) [0: off]")
    p.set_defaults(func=cmd_place)


def cmd_place(args: argparse.Namespace) -> int:
    from .darknet import parse_cfg
    from .errors import ConfigError
    from .network import resolve_cfg

    spec = parse_cfg(resolve_cfg(args.cfg))
    if args.node_memory:
        try:
            sizes = [_size(s) for s in args.node_memory.split(",")]
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"--node-memory: {exc}") from None
    elif args.nodes and args.max_memory:
        sizes = [args.max_memory] * args.nodes
    else:
        raise ConfigError("give --nodes N and --max-memory SIZE, or --node-memory SIZE,SIZE,...")
    nodes = [NodeOffer(f"node{i}", m) for i, m in enumerate(sizes)]
    fused, tile_bytes = _fused_prefix(spec, args.fused, args.grid)
    placement = plan_placement(spec, nodes, shards=args.shards, coded=args.coded, fused=fused,
                               tile_bytes=tile_bytes, runtime=args.runtime, pipeline=args.pipeline)
    print(format_placement(placement))
    return 0


def _fused_prefix(spec: ModelSpec, fused: str, grid: str) -> tuple[int, int]:
    """(fused layers, one task's working set) from the FTP planner; (0, 0) when nothing fuses."""
    from .errors import ConfigError
    from .ftp.plan import make_plan

    if fused == "0":
        return 0, 0
    layers = None
    if fused != "auto":
        try:
            layers = int(fused)
        except ValueError:
            raise ConfigError(f"--fused must be a count or auto, got {fused!r}") from None
    try:
        plan = make_plan(spec, grid, layers)
    except PlanError:
        if fused == "auto":
            return 0, 0  # e.g. VGG-16's [crop] at layer 0: no fused prefix, every layer in the tail
        raise
    return plan.n_layers, plan.totals(reuse=True).max_working_set


