"""Sharded tail layers at the coordinator: where the weights go, and when a layer is done.

Two pure machines (events in, actions or decisions out; no I/O, no clock: every event carries
its time), carried out by :mod:`stealer.node.shards`.

:class:`ShardPlacer` keeps the placement of the tail (``stealer.placement.plan_placement``
over the nodes the coordinator knows and the memory each offers). Nodes joining or leaving, or a
holder falling under suspicion (a lost or late shard task), give a new placement under a new
*epoch*: every node concerned is told what to hold (:class:`Assign`), and once each has read
its weights and said so (:meth:`ShardPlacer.ready`) that placement becomes the active one
(:class:`Activated`). Until then frames go on with the previous active placement; a shard task
sent to a node that dropped its shard meanwhile comes back failed and is recovered or re-run
like any lost task, so no frame is lost to a re-placement. Only the nodes that hold something
under the new placement are waited for: a node told only to drop its holdings (it left the
placement, maybe because it is frozen) holds up nothing.

Suspicion has two kinds. A holder that seemed *lost* (a shard task out past the lease, or no
:class:`ShardReady` within the lease: frozen, hung, or in a cold process still compiling its
kernels) comes back as soon as it shows it is alive: any answer, a shard result that came too
late for its round (:meth:`ShardPlacer.answered` with ``late``) or a late ready for an older
placement, re-places with it, so shards moved to the coordinator while it was away spread out
again. A holder that was merely *slow* (its shard recovered from the parity past the deadline)
stays out for ``suspect_for`` unless it answers a task in time: a late answer would only bring
back a node that is late again (flapping re-placements, each re-reading weights).

:class:`LayerRound` is one sharded layer of one frame: the shard tasks out (and the parity's),
what came back, and the decision (:meth:`LayerRound.decide`):

* every shard in: :class:`Exact` (the gathered output is bit-identical to the unsplit layer);
* coded, the parity and all shards but one in: if the missing one failed (its holder left, it
  is not held there), :class:`Recover` it at once; if it is only late, wait until the
  **deadline** ``issued + median(times of the tasks in) * deadline_factor + deadline_floor``
  (:class:`stealer.config.ShardTiming`), then :class:`Recover`;
* a shard that failed and cannot be recovered (no parity, or the parity failed too), or any task
  out past ``lease``: :class:`Rerun` those shards under the next placement (the shell suspects
  their holders, so that placement leaves them out); outputs in hand are kept when the next
  placement splits the layer the same way.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Sequence, Union

from ..config import DEFAULT_SHARD_TIMING, ShardTiming
from ..darknet import ModelSpec
from ..errors import PlacementError
from ..placement import NodeOffer, Placement, plan_placement

__all__ = ["Activated", "Assign", "Exact", "LayerRound", "PlaceFailed", "Recover", "Rerun", "ShardJob",
           "ShardPlacer", "Wait", "holdings_of"]


# --------------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class Assign:
    """Tell ``node`` to hold exactly ``holdings`` ([layer, start, stop, parity, k]) from ``epoch`` on."""

    node: str
    epoch: int
    holdings: tuple[tuple[int, int, int, int, int], ...]


@dataclass(frozen=True)
class Activated:
    """Placement ``epoch`` is read everywhere: frames use it from now on."""

    epoch: int
    placement: Placement


@dataclass(frozen=True)
class PlaceFailed:
    """No placement fits the nodes known (the message names the layer and the memory it needs):
    frames wait for more nodes, or for more memory."""

    message: str


PlaceAction = Union[Assign, Activated, PlaceFailed]


def holdings_of(placement: Placement, node: str) -> tuple[tuple[int, int, int, int, int], ...]:
    """What ``node`` holds in ``placement``, as :class:`Assign` lists it (layer order)."""
    out = []
    for layer in placement.layers:
        if layer.mode not in ("whole", "shards"):
            continue
        k = sum(not h.parity for h in layer.holders)
        for h in layer.holders:
            if h.node == node:
                out.append((layer.index, h.start, h.stop, int(h.parity), k))
    return tuple(out)


class ShardPlacer:
    """The coordinator's placement of the tail layers ``start ..`` of ``spec``.

    Parameters
    ----------
    spec : ModelSpec
    coordinator : str
        This node's name (it gathers every layer and runs the layers without weights).
    start : int
        The first tail layer (the fused block's depth); earlier layers run as tiles.
    shards, coded : int, bool
        ``--shards K`` and ``--coded``. With fewer nodes than ``K`` (``K + 1`` coded) known, the
        placement uses as many shards as there are nodes (coded only from 2 shards on).
    pipeline : int
        ``--pipeline S``: the tail's weighted layers whole, in ``S`` stages on as many nodes
        (:func:`stealer.placement.plan_placement`); fewer while fewer nodes are known.
    started : float
        When the coordinator started (the placement grace counts from it).
    """

    def __init__(self, spec: ModelSpec, coordinator: str, start: int, shards: int, coded: bool, started: float,
                 timing: ShardTiming = DEFAULT_SHARD_TIMING, pipeline: int = 0) -> None:
        self.spec = spec
        self.coordinator = coordinator
        self.start = start
        self.shards = shards
        self.coded = coded
        self.pipeline = pipeline  # S >= 2: whole layers in S pipeline stages, not shards
        self.started = started
        self.timing = timing
        self.offers: dict[str, int] = {}  # node -> bytes it offers for shards (the coordinator included)
        self.suspects: dict[str, float] = {}  # node -> until when it is left out
        self.lost: set[str] = set()  # suspects that seemed lost (not merely slow): any answer clears them
        self.epoch = 0
        self.active: Placement | None = None
        self.active_epoch = 0
        self.proposed: Placement | None = None
        self.proposed_at = 0.0
        self.waiting: set[str] = set()  # nodes that have not read the proposed placement yet
        self.failed: str | None = None  # why the last attempt found no placement
        self._assigned: set[str] = set()  # nodes told to hold something under the latest epoch

    # ---------------------------------------------------------------- events
    def nodes_changed(self, offers: dict[str, int], now: float) -> list[PlaceAction]:
        """The nodes known and what each offers (bytes; the coordinator's own included)."""
        self.offers = dict(offers)
        return self._replace(now)

    def suspect(self, node: str, now: float, *, degrade: bool = True) -> list[PlaceAction]:
        """A shard task of ``node`` was lost or late: place without it for a while. With
        ``degrade`` False (its shard was recovered from the parity, nothing waits), only if the
        others still give ``K`` shards (and the parity): else recovering is the cheaper way."""
        if node == self.coordinator or node in self.suspects and self.suspects[node] > now:
            return []
        if not degrade and len(self.eligible(now)) - 1 < self.shards + (1 if self.coded else 0):
            return []
        self._suspect(node, now, lost=degrade)
        return self._replace(now)

    def answered(self, node: str, now: float, *, late: bool = False) -> list[PlaceAction]:
        """``node`` answered a shard task: in time for its round, or ``late`` (the round was
        over: recovered, or re-run elsewhere). In time, it may hold shards again; late, only if it
        seemed lost (a frozen or compiling node that is back), not if it was merely slow."""
        if node not in self.suspects or late and node not in self.lost:
            return []
        self._clear(node)
        return self._replace(now)

    def _suspect(self, node: str, now: float, *, lost: bool) -> None:
        self.suspects[node] = now + self.timing.suspect_for
        if lost:
            self.lost.add(node)
        else:
            self.lost.discard(node)

    def _clear(self, node: str) -> None:
        self.suspects.pop(node, None)
        self.lost.discard(node)

    def tick(self, now: float) -> list[PlaceAction]:
        """Time passed: the grace may be over, suspicions may have run out."""
        expired = [n for n, t in self.suspects.items() if t <= now]
        for n in expired:
            self._clear(n)
        if self.proposed is not None and now >= self.proposed_at + self.timing.lease:
            # nodes that never said they read their shards (frozen, hung reading, or compiling in
            # a cold process): without them, until they answer
            for n in self.waiting - {self.coordinator}:
                self._suspect(n, now, lost=True)
            self.proposed = None
            return self._replace(now)
        if expired or (self.active is None and self.proposed is None):
            return self._replace(now)
        return []

    def ready(self, node: str, epoch: int, ok: bool, now: float) -> list[PlaceAction]:
        """``node`` read its holdings of ``epoch`` (``ok``), or could not."""
        if epoch != self.epoch or self.proposed is None:
            # an older placement's answer: superseded; but a node given up as lost is back
            if ok and node in self.lost:
                self._clear(node)
                return self._replace(now)
            return []
        if not ok:
            self._suspect(node, now, lost=False)
            return self._replace(now)
        self.waiting.discard(node)
        if self.waiting:
            return []
        self.active, self.active_epoch, self.proposed = self.proposed, self.epoch, None
        return [Activated(self.epoch, self.active)]

    # ---------------------------------------------------------------- deciding
    def eligible(self, now: float) -> list[NodeOffer]:
        """The coordinator first, then every other node not under suspicion, by name."""
        names = [self.coordinator] + sorted(n for n in self.offers
                                            if n != self.coordinator and self.suspects.get(n, 0.0) <= now)
        return [NodeOffer(n, self.offers.get(n, 0)) for n in names]

    def next_check(self) -> float | None:
        """When :meth:`tick` may have something to do (None: only events will)."""
        times = list(self.suspects.values())
        if self.proposed is not None:
            times.append(self.proposed_at + self.timing.lease)
        if self.active is None and self.proposed is None and self.failed is None:
            # the grace's end (once a placement was tried and failed, only events can change
            # that: a node joining, a suspicion running out; a time in the past here had the
            # shell call tick() again at once, forever, spinning a core while no placement fit)
            times.append(self.started + self.timing.place_grace)
        return min(times) if times else None

    def _replace(self, now: float) -> list[PlaceAction]:
        nodes = self.eligible(now)
        want = self.pipeline if self.pipeline >= 2 else self.shards + (1 if self.coded else 0)
        if len(nodes) < want and now < self.started + self.timing.place_grace and self.active is None:
            # peers are still being found: do not load what the next placement moves; a first
            # placement proposed meanwhile on nodes of which one has left is given up
            self.proposed, self.waiting = None, set()
            return []
        k = max(1, min(self.shards, len(nodes) - (1 if self.coded else 0)))
        coded = self.coded and k >= 2
        try:
            current = self.proposed if self.proposed is not None else self.active
            prefer = {} if current is None else {(l.index, h.start, h.stop, h.parity): h.node
                                                  for l in current.layers for h in l.holders if l.mode != "tiles"}
            if self.pipeline >= 2:
                placement = plan_placement(self.spec, nodes, shards=1, fused=self.start, pipeline=self.pipeline,
                                           prefer=prefer)
            else:
                placement = plan_placement(self.spec, nodes, shards=k, coded=coded, fused=self.start, prefer=prefer)
        except PlacementError as exc:
            self.failed = str(exc)
            return [PlaceFailed(str(exc))]
        self.failed = None
        current = self.proposed if self.proposed is not None else self.active
        if current is not None and _same(current, placement):
            return []
        self.epoch += 1
        self.proposed, self.proposed_at = placement, now
        everyone = {n.name for n in nodes}
        out: list[PlaceAction] = []
        # every node of the new placement, and every node told to hold something before that is
        # still connected (it drops what it holds)
        told = everyone | (self._assigned & set(self.offers))
        self._assigned = set()
        for name in sorted(told):
            held = holdings_of(placement, name) if name in everyone else ()
            if held:
                self._assigned.add(name)
            out.append(Assign(name, self.epoch, held))
        # only nodes that hold something under it must have read it: one told to drop all it
        # holds (frozen, maybe) must not keep the placement from becoming active
        self.waiting = {a.node for a in out if isinstance(a, Assign) and a.holdings}
        if not self.waiting:  # nothing to read anywhere (cannot happen with weighted layers)
            self.active, self.active_epoch, self.proposed = placement, self.epoch, None
            out.append(Activated(self.epoch, placement))
        return out

    def validate(self) -> None:
        """Invariants (tests call this after every step)."""
        assert self.active is None or self.active_epoch <= self.epoch
        assert self.proposed is None or self.waiting or self.active is self.proposed
        assert self.lost <= set(self.suspects)
        assert self.proposed is None or self.waiting <= {n for n in self.offers} | {self.coordinator}
        if self.active is not None:
            for layer in self.active.layers:
                nodes = [h.node for h in layer.holders]
                assert len(nodes) == len(set(nodes)) or layer.mode == "tiles"


def _same(a: Placement, b: Placement) -> bool:
    return [(l.index, l.mode, l.holders) for l in a.layers] == [(l.index, l.mode, l.holders) for l in b.layers]


# --------------------------------------------------------------------------------- one layer of one frame


@dataclass(frozen=True)
class ShardJob:
    """One task of a round: channels ``[start, stop)`` (shard ``number``) or the parity, on ``node``."""

    node: str
    number: int  # shard number; -1 for the parity
    start: int
    stop: int

    @property
    def parity(self) -> bool:
        return self.number < 0


@dataclass(frozen=True)
class Wait:
    """Nothing to do until a result comes, or until ``until`` (None: only a result)."""

    until: float | None


@dataclass(frozen=True)
class Exact:
    """Every shard is in: gather them."""


@dataclass(frozen=True)
class Recover:
    """Shard ``shard`` is gone or late and the parity is in: recover it by subtraction."""

    shard: int


@dataclass(frozen=True)
class Rerun:
    """These shards cannot be had in this round: run them again under the next placement,
    without ``nodes`` (their holders)."""

    shards: tuple[int, ...]
    nodes: tuple[str, ...]


Decision = Union[Wait, Exact, Recover, Rerun]


@dataclass
class LayerRound:
    """The shard tasks of one sharded layer of one frame (see the module docstring).

    ``jobs``: the tasks issued at ``issued`` (shards not in ``have`` and the parity, if any);
    ``have``: shard numbers whose outputs were in hand before (from an earlier round).
    """

    shards: int
    jobs: Sequence[ShardJob]
    issued: float
    timing: ShardTiming = DEFAULT_SHARD_TIMING
    have: frozenset[int] = frozenset()
    layer: int = -1
    arrived: dict[int, float] = field(default_factory=dict)  # job index -> seconds it took
    failed: set[int] = field(default_factory=set)  # job indices

    def result(self, job: int, now: float) -> None:
        if job not in self.failed:
            self.arrived.setdefault(job, now - self.issued)

    def fail(self, job: int) -> None:
        if job not in self.arrived:
            self.failed.add(job)

    def fail_node(self, node: str) -> None:
        """``node`` left: its tasks of this round are lost."""
        for j, job in enumerate(self.jobs):
            if job.node == node:
                self.fail(j)

    def _in(self) -> set[int]:
        return set(self.have) | {self.jobs[j].number for j in self.arrived if not self.jobs[j].parity}

    def deadline(self) -> float | None:
        """When a late shard is recovered (coded, parity in, one shard missing)."""
        if not self.arrived:
            return None
        times = sorted(self.arrived.values())
        return self.issued + statistics.median(times) * self.timing.deadline_factor + self.timing.deadline_floor

    def decide(self, now: float) -> Decision:
        got = self._in()
        missing = [s for s in range(self.shards) if s not in got]
        if not missing:
            return Exact()
        lease_at = self.issued + self.timing.lease
        if now >= lease_at:  # every task still out is lost
            for j in range(len(self.jobs)):
                if j not in self.arrived:
                    self.failed.add(j)
        parity = [j for j, job in enumerate(self.jobs) if job.parity]
        parity_in = any(j in self.arrived for j in parity)
        parity_lost = not parity or all(j in self.failed for j in parity)
        failed_shards = {self.jobs[j].number for j in self.failed if not self.jobs[j].parity}
        if parity_in and len(missing) == 1:
            if missing[0] in failed_shards:
                return Recover(missing[0])
            at = self.deadline()
            assert at is not None  # the parity is in
            if now >= at:
                return Recover(missing[0])
            return Wait(min(at, lease_at))
        lost = sorted(s for s in missing if s in failed_shards)
        if lost:
            # the parity may still recover the one shard missing; else re-run, once no other
            # shard is still on its way (the frame waits for them either way)
            recoverable = not parity_lost and len(missing) == 1
            out = [j for j, job in enumerate(self.jobs)
                   if not job.parity and j not in self.arrived and j not in self.failed]
            if not recoverable and not out:
                nodes = sorted({self.jobs[j].node for j in self.failed})
                return Rerun(tuple(lost), tuple(nodes))
        return Wait(lease_at)
