"""The gateway role, pure: frame lifecycle, assembly, strip locations, ordered results.

Events in (a message from a peer, named by its authenticated node id; a deadline that passed),
actions out (:class:`Notify` a source, :class:`QueueTail`, :class:`ReleaseStrips`,
:class:`ArmDeadline`, :class:`Released`); no I/O, no awaits, no clock: every event carries
``now``. The node shell (:mod:`stealer.node`) feeds it only while its node is the gateway.

A frame's life here::

    FrameStart (from the node that owns the source)   -> open: tiles are placed as they come
    every tile in (or its deadline passed)             -> its tail is queued (QueueTail)
    TailDone                                           -> finished: released in frame order
    FrameDrop / FrameFailed / refused at the door      -> released in order, marked so

What it enforces:

* **identity**: a node announces, drops and fails frames only of its own sources (a source id
  is ``<node id>/<index>``); tile and tail results may come from anyone (thieves), but only
  for frames their source announced, and a tile's claim about the strips it holds is checked
  against the plan;
* **bounds** (:class:`~stealer.config.Limits`): frames open (``max_queued_frames``), bytes of
  fused maps held (``result_buffer_bytes``), tiles that overtook their FrameStart
  (``early_tile_bytes``), sources per node, finished frames remembered; a frame refused at the
  door is released with an error, never silently lost;
* **order**: each source's results leave in frame order; a frame that can never finish
  (failed, dropped, refused) is released as such so that later frames are not held up.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import numpy as np

from ..assembly import FrameAssembly, RecentKeys, ResultOrder
from ..config import DEFAULT_LIMITS, Limits
from ..errors import PlanError, ProtocolError
from ..ftp.plan import Plan
from ..scheduler import TAIL, TaskRef
from ..wire.messages import (FrameDone, FrameDrop, FrameFailed, FrameGo, FrameStart, FrameUnknown, FrameWait, TailDone,
                             TileAck, TileDone, TilesIn, TilesRedo)

log = logging.getLogger(__name__)

FrameKey = tuple[str, int]


def owner_of(source: str) -> str:
    """The node id a source id belongs to (``<node id>/<index>``)."""
    return source.split("/", 1)[0]


# ---------------------------------------------------------------------------------- actions
@dataclass(frozen=True, slots=True)
class Notify:
    """Post ``msg`` to the node ``node`` (the owner of a frame's source)."""

    node: str
    msg: TileAck | TilesIn | FrameDone | FrameWait | FrameGo | FrameUnknown | TilesRedo


@dataclass(frozen=True, slots=True)
class QueueTail:
    """Queue the frame's tail task at the front of this node's queue (its input:
    :meth:`GatewayState.tail_input`)."""

    ref: TaskRef


@dataclass(frozen=True, slots=True)
class DropTail:
    """Forget the frame's tail task, queued or leased (the frame is over)."""

    ref: TaskRef


@dataclass(frozen=True, slots=True)
class ReleaseStrips:
    """Tell ``node`` that it may forget the reuse strips it holds of frame ``key``."""

    node: str
    key: FrameKey


@dataclass(frozen=True, slots=True)
class ReleaseOutputs:
    """Tell ``node`` that it may forget the tile outputs it kept of frame ``key`` (the frame is
    over, or its tail went with this gateway)."""

    node: str
    key: FrameKey


@dataclass(frozen=True, slots=True)
class ArmDeadline:
    """Call :meth:`GatewayState.deadline_passed` for ``key`` at time ``at`` (same clock as
    ``now``); a later :class:`CancelDeadline` or the frame's end makes the call a no-op."""

    key: FrameKey
    at: float


@dataclass(frozen=True, slots=True)
class CancelDeadline:
    key: FrameKey


@dataclass(frozen=True, slots=True)
class Released:
    """A result line, in frame order per source: write it out, hand it to readers."""

    result: dict[str, Any]


Action = Union[Notify, QueueTail, DropTail, ReleaseStrips, ReleaseOutputs, ArmDeadline, CancelDeadline, Released]


# ------------------------------------------------------------------------------------ state
@dataclass
class OpenFrame:
    """A frame announced to this gateway and not yet released."""

    plan: str
    img_w: int
    img_h: int
    started: float
    nbytes: int  # its fused map: held while it is assembled and until its tail is done
    assembly: FrameAssembly | None = None  # made at the first tile, kept until the frame is over
    tail_input: np.ndarray | None = None  # set once every tile is in: the tail is queued
    # direct data paths: task -> the node that kept its output (it never came here); the
    # tail's runner fetches them from there
    kept: dict[int, str] = field(default_factory=dict)
    tail_queued: bool = False  # its tail was queued once (a tail result is good from then on)
    redos: int = 0  # times tiles were run again because the node keeping them was lost
    strip_holders: dict[int, str] = field(default_factory=dict)  # strip id -> node keeping it
    # nodes that keep copies of its strips nobody fetches from (a second run of a producer):
    # told to let them go with the others, or they would hold them until their cache's cap
    spare_holders: set[str] = field(default_factory=set)
    partial: dict[str, Any] = field(default_factory=dict)  # deadline mode: what was missing
    deadline: bool = False
    result: dict[str, Any] | None = None  # done: waits here to be released in order


@dataclass
class GatewayStats:
    frames_done: int = 0
    frames_partial: int = 0
    frames_failed: int = 0
    frames_refused: int = 0
    frames_waited: int = 0  # announced while the gateway was full: admitted later (back-pressure)
    duplicates_dropped: int = 0
    early_tiles: int = 0  # tiles that came before their FrameStart and waited for it
    early_dropped: int = 0  # ... and those dropped because the early buffer was full
    frames_unknown: int = 0  # frames whose results came first: their sources were asked to announce them again
    foreign_refused: int = 0  # messages about another node's sources, refused
    tiles_redone: int = 0  # tiles run again because the node that kept their outputs was lost


class GatewayState:
    """The gateway's decisions. See the module docstring.

    Parameters
    ----------
    node_id : str
        This node's id (strips this node holds are released with a local action too).
    plan_of : callable
        Plan key -> :class:`~stealer.ftp.plan.Plan`. The shell builds a plan (off the event
        loop) before it hands the gateway a message that names it.
    input_shape : (C, H, W)
        The network input's shape (image sizes are checked against sane bounds only).
    limits : Limits
    """

    def __init__(self, node_id: str, plan_of: Callable[[str], Plan], *,
                 limits: Limits = DEFAULT_LIMITS, max_image_side: int = 1 << 14) -> None:
        self.node_id = node_id
        self.plan_of = plan_of
        self.limits = limits
        self.max_image_side = max_image_side
        self.frames: dict[FrameKey, OpenFrame] = {}
        # frames announced while the gateway was full, first come first served: (sender, its
        # FrameStart, when it came); admitted as released frames make room
        self.waiting: OrderedDict[FrameKey, tuple[str, FrameStart, float]] = OrderedDict()
        self.order = ResultOrder()
        self.finished = RecentKeys(limits.finished_frames_remembered)
        # results (tiles, whole-frame tails) of frames not announced (yet), oldest frame
        # first, and when the first came
        self.early: OrderedDict[FrameKey, list[tuple[str, TileDone | TailDone]]] = OrderedDict()
        self.early_since: dict[FrameKey, float] = {}
        self.early_bytes = 0
        self.held_bytes = 0  # fused maps of open frames
        self.sources: dict[str, set[str]] = {}  # node id -> its sources with frames open here
        self.stats = GatewayStats()

    # -------------------------------------------------------------------- lookups
    def tail_input(self, key: FrameKey) -> tuple[str, np.ndarray | None, int, int, dict[str, list[int]]] | None:
        """(plan key, fused map, img_w, img_h, holders) of a frame whose tail is queued, or None.

        With tile outputs kept by the nodes that made them, the map is None and ``holders``
        names where each tile's output is (node id -> task ids; this node for those that came
        here); else ``holders`` is empty and the map is whole."""
        f = self.frames.get(key)
        if f is None or f.tail_input is None:
            return None
        if not f.kept:
            return f.plan, f.tail_input, f.img_w, f.img_h, {}
        holders: dict[str, list[int]] = {}
        for task in range(len(self.plan_of(f.plan).tasks)):
            holders.setdefault(f.kept.get(task, self.node_id), []).append(task)
        return f.plan, None, f.img_w, f.img_h, holders

    def tiles_here(self, key: FrameKey, tasks: list[int]) -> dict[int, np.ndarray] | None:
        """The outputs (raveled) of tiles of a frame that came to this gateway, for the node
        that runs its tail; None if any of them is not here."""
        f = self.frames.get(key)
        if f is None or f.assembly is None or f.result is not None:
            return None
        if any(t in f.kept or t not in f.assembly.received for t in tasks):
            return None
        return {t: f.assembly.tile(t) for t in tasks}

    def strip_locations(self, key: FrameKey, wanted: tuple[int, ...]) -> dict[str, list[int]] | None:
        """Which node holds each wanted strip of a frame (node id -> strip ids), or None if the
        producer of any of them has not delivered its tile yet."""
        f = self.frames.get(key)
        if f is None or any(s not in f.strip_holders for s in wanted):
            return None
        by_node: dict[str, list[int]] = {}
        for s in wanted:
            by_node.setdefault(f.strip_holders[s], []).append(s)
        return by_node

    # -------------------------------------------------------------------- events
    def frame_start(self, sender: str, msg: FrameStart, now: float) -> list[Action]:
        key = (msg.source, msg.frame)
        if not self._own(sender, msg.source, msg.op):
            return []
        if key in self.finished:
            # the source missed the FrameDone (it reconnected, or announced again to be safe)
            return [Notify(sender, FrameDone(*key))]
        if key in self.frames or key in self.waiting or self.order.waiting(*key):
            # announced again (a resend, a duplicate): keep what is in, and a frame that is
            # over (refused, say) and waits to be released in order stays over
            return []
        self.order.expect(msg.source, msg.frame)
        refusal = self._refusal(sender, msg)
        if refusal is None and (self.waiting or not self._room(msg)):
            if len(self.waiting) < self.limits.max_waiting_frames:
                # back-pressure: the frame waits its turn, announced and in order; its source
                # holds its tasks until it is admitted
                self.waiting[key] = (sender, msg, now)
                self.sources.setdefault(sender, set()).add(msg.source)
                self.stats.frames_waited += 1
                return [Notify(sender, FrameWait(*key))]
            refusal = f"{len(self.waiting)} frames wait to be admitted already (max_waiting_frames)"
        if refusal is not None:
            self.stats.frames_refused += 1
            log.warning("frame %d of %s refused: %s", msg.frame, msg.source, refusal)
            return self._finish(key, {"source": msg.source, "frame": msg.frame, "error": refusal}, now)
        return self._admit(sender, msg, now)

    def _nbytes(self, msg: FrameStart) -> int:
        return self.plan_of(msg.plan).fused_bytes

    @property
    def active(self) -> int:
        """Frames open and not yet done. A done frame that waits to be released in order holds
        only its result line, and must not hold a place: the frame it waits for may be the one
        waiting for the place (measured: a deadlock in the stateful test)."""
        return sum(1 for f in self.frames.values() if f.result is None)

    def _room(self, msg: FrameStart) -> bool:
        """Whether the gateway can open one more frame now."""
        return (self.active < self.limits.max_queued_frames
                and self.held_bytes + self._nbytes(msg) <= self.limits.result_buffer_bytes)

    def _admit(self, sender: str, msg: FrameStart, started: float, now: float | None = None) -> list[Action]:
        """Open a frame: from now on its tiles are placed."""
        key = (msg.source, msg.frame)
        now = started if now is None else now
        out: list[Action] = []
        nbytes = self._nbytes(msg)
        self.frames[key] = OpenFrame(msg.plan, msg.img_w, msg.img_h, started, nbytes, deadline=msg.deadline > 0)
        self.held_bytes += nbytes
        self.sources.setdefault(sender, set()).add(msg.source)
        if msg.deadline > 0:
            out.append(ArmDeadline(key, now + msg.deadline))
        for tile_sender, tile in self._pop_early(key):  # results that overtook this FrameStart
            try:
                if isinstance(tile, TailDone):
                    out += self.tail_done(tile_sender, tile, now)
                else:
                    out += self.tile_done(tile_sender, tile, now)
            except ProtocolError as exc:  # its sender's fault, not the source's: only the tile goes
                log.warning("%s of frame %d of %s from %s dropped: %s", tile.op, tile.frame,
                            tile.source[:8], tile_sender[:8], exc)
        return out

    def tile_done(self, sender: str, msg: TileDone, now: float) -> list[Action]:
        key = (msg.source, msg.frame)
        owner = owner_of(msg.source)
        f = self.frames.get(key)
        if self._over(key, f):
            self.stats.duplicates_dropped += 1
            late: list[Action] = [Notify(owner, TileAck(msg.source, msg.frame, msg.task))]
            if msg.strips_held:  # a late copy kept strips the frame no longer needs: let them go
                late.append(ReleaseStrips(sender, key))
            if msg.kept and (f is None or f.result is not None or sender not in f.kept.values()):
                late.append(ReleaseOutputs(sender, key))  # ... or an output nobody will fetch
            return late
        if f is None:
            return self._keep_early(sender, msg, now)
        if msg.plan != f.plan:
            raise ProtocolError(f"tile of frame {msg.frame} of {msg.source} names plan {msg.plan!r}, "
                                f"the frame was announced with {f.plan!r}")
        plan = self.plan_of(f.plan)
        try:
            task = plan.task(msg.task)
        except PlanError:
            raise ProtocolError(f"tile {msg.task} is not a task of plan {f.plan!r}") from None
        if not set(msg.strips_held) <= set(task.produces):
            raise ProtocolError(f"tile {msg.task} claims strips {msg.strips_held} it does not produce "
                                f"({list(task.produces)})")
        if f.assembly is None:
            f.assembly = FrameAssembly.for_plan(plan)
        try:
            if msg.kept:  # its sender keeps the output, for the tail's runner to fetch
                fresh = f.assembly.mark(msg.task)
                if fresh:
                    f.kept[msg.task] = sender
            else:
                fresh = f.assembly.add(msg.task, np.asarray(msg.output))
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
        if not fresh:
            self.stats.duplicates_dropped += 1
        for sid in msg.strips_held if fresh else ():
            f.strip_holders.setdefault(sid, sender)
        if msg.strips_held and any(f.strip_holders.get(sid) != sender for sid in msg.strips_held):
            f.spare_holders.add(sender)
        if fresh and f.assembly.complete:
            # decided with no await since the tile was placed, so that of two tiles of a frame
            # arriving on two connections exactly one finishes the frame
            return self._tiles_in(key, f)
        if task.produces:
            # a reuse producer (or a second copy of one): its dependents become cheap now, and
            # the source learns where its strips are. Every other lease ends with the frame's
            # TilesIn: one message per frame instead of one per tile.
            strips = [s for s in task.produces if f.strip_holders.get(s) == sender] if fresh else []
            holder = sender if strips else ""
            if not fresh:  # the source may have forgotten (a resend): tell it where they are
                strips = [s for s in task.produces if s in f.strip_holders]
                holders = {f.strip_holders[s] for s in strips}
                holder = holders.pop() if len(holders) == 1 else ""
                strips = strips if holder else []
            return [Notify(owner, TileAck(msg.source, msg.frame, msg.task, holder, strips))]
        return []

    def _over(self, key: FrameKey, f: OpenFrame | None) -> bool:
        """Whether the frame's tiles are all in, or it is over (released, or done and waiting
        to be released in order): a tile of it is a late copy."""
        if f is not None:
            return f.tail_input is not None or f.result is not None
        return key in self.finished or self.order.waiting(*key)

    def tail_done(self, sender: str, msg: TailDone, now: float) -> list[Action]:
        key = (msg.source, msg.frame)
        f = self.frames.get(key)
        out: list[Action] = []
        if msg.whole and f is None and not self._over(key, f) and key not in self.waiting:
            # the frame's result overtook its FrameStart, or the FrameStart was lost with a
            # connection (its source never saw the gateway change): keep the result and have
            # the source announce the frame again, or its lease would only bring it back to
            # be dropped here again (measured: a frame given up after three 30 s leases)
            return self._keep_early(sender, msg, now)
        if (msg.whole and f is not None and f.tail_input is None and f.result is None
                and len(self.plan_of(f.plan).tasks) == 1):
            # the frame's only tile and its tail ran on one node: the tile's lease ends here
            # too, and its map never came (no tail was queued)
            out.append(Notify(owner_of(key[0]), TilesIn(*key)))
        elif f is None or not f.tail_queued or f.result is not None:
            # (a tail's result is good even while some of its tiles run again: the node that
            # kept them was lost after the tail's runner had fetched them)
            self.stats.duplicates_dropped += 1
            return [DropTail(TaskRef(msg.source, msg.frame, TAIL))]
        result: dict[str, Any] = {"source": msg.source, "frame": msg.frame, "latency": round(now - f.started, 4),
                                  "output_sha256": msg.output_sha256, "detections": msg.detections,
                                  "tail_seconds": round(msg.seconds, 4)}
        if msg.recovered:  # coded shards: which came from their parity (the digest is then not exact)
            result["recovered"] = [{"layer": layer, "shard": shard} for layer, shard in msg.recovered]
        result.update(f.partial)
        return out + self._finish(key, result, now)

    def frame_drop(self, sender: str, msg: FrameDrop, now: float) -> list[Action]:
        """Deadline mode: the source gave up on a frame before any of its tasks started."""
        if not self._own(sender, msg.source, msg.op) or (msg.source, msg.frame) in self.finished:
            return []
        self.order.expect(msg.source, msg.frame)
        return self._finish((msg.source, msg.frame), {"source": msg.source, "frame": msg.frame, "dropped": True}, now)

    def frame_failed(self, sender: str, msg: FrameFailed, now: float) -> list[Action]:
        """A task of the frame failed every attempt (at its source, or a tail here)."""
        key = (msg.source, msg.frame)
        if not self._own(sender, msg.source, msg.op):
            return []
        return self.give_up(key, msg.task, msg.reason, now)

    def give_up(self, key: FrameKey, task: int, reason: str, now: float) -> list[Action]:
        """Release a frame whose ``task`` failed every attempt, with the error."""
        f = self.frames.get(key)
        if key in self.finished or (f is not None and f.result is not None):
            return []
        self.order.expect(*key)
        self.stats.frames_failed += 1
        what = "tail" if task == TAIL else f"tile {task}"
        return self._finish(key, {"source": key[0], "frame": key[1],
                                  "error": f"{what} failed: {reason}", "failed_task": task}, now)

    def source_lost(self, node_id: str, now: float = 0.0) -> list[Action]:
        """The node that owns some sources left: forget their open frames. When it comes back
        (a Wi-Fi blip) it announces them again and queues their tasks again; if it never does,
        nothing of it stays here, and nothing of another source waits for it."""
        out: list[Action] = []
        for key in [k for k in self.frames if owner_of(k[0]) == node_id]:
            f = self.frames.pop(key)
            self.held_bytes -= f.nbytes
            out += self._strips_gone(key, f) + self._outputs_gone(key, f)
            if f.deadline:
                out.append(CancelDeadline(key))
            out.append(DropTail(TaskRef(key[0], key[1], TAIL)))
        for key in [k for k in self.early if owner_of(k[0]) == node_id]:
            self._pop_early(key)
        for key in [k for k in self.waiting if owner_of(k[0]) == node_id]:
            del self.waiting[key]
        for source in self.sources.pop(node_id, set()):
            self.order.forget(source)
        return out + self._admit_waiting(now)

    def holder_lost(self, node_id: str, now: float) -> list[Action]:
        """A node that kept tile outputs left: the open frames' tiles it kept run again."""
        out: list[Action] = []
        for key, f in list(self.frames.items()):
            lost = sorted(t for t, n in f.kept.items() if n == node_id)
            if lost and f.result is None:
                out += self._redo(key, f, lost, f"node {node_id[:8]}, which kept their outputs, left", now)
        return out

    def outputs_lost(self, key: FrameKey, holder: str, now: float) -> list[Action]:
        """The node running a frame's tail could not fetch the outputs ``holder`` kept (the
        shell checked that it holds the tail's lease): those tiles run again."""
        f = self.frames.get(key)
        if f is None or f.result is not None or not f.tail_queued:
            return []
        lost = sorted(t for t, n in f.kept.items() if n == holder)
        if not lost:
            return []
        return self._redo(key, f, lost, f"their outputs could not be fetched from {holder[:8]}", now)

    def _redo(self, key: FrameKey, f: OpenFrame, tasks: list[int], why: str, now: float) -> list[Action]:
        """Tiles whose outputs were lost run again: the frame is open for them (its queued or
        leased tail goes; a result of it that comes anyway still counts), and the source
        queues them again. Bounded: a frame whose outputs keep getting lost fails."""
        f.redos += 1
        if f.redos > self.limits.max_task_attempts:
            return self.give_up(key, tasks[0], f"tile outputs lost {f.redos} times; last: {why}", now)
        log.warning("frame %d of %s: tiles %s run again: %s", key[1], key[0][:8], tasks, why)
        self.stats.tiles_redone += len(tasks)
        assert f.assembly is not None  # kept until the frame is over
        f.assembly.unmark(tasks)
        for t in tasks:
            f.kept.pop(t, None)
        out: list[Action] = []
        if f.tail_input is not None:
            f.tail_input = None
            out.append(DropTail(TaskRef(key[0], key[1], TAIL)))
        out.append(Notify(owner_of(key[0]), TilesRedo(key[0], key[1], tasks)))
        return out

    def deadline_passed(self, key: FrameKey, now: float) -> list[Action]:
        """The frame's tiles are late: finish with the missing ones zeroed, and say so."""
        f = self.frames.get(key)
        if f is None or f.tail_input is not None or f.result is not None:
            return []
        plan = self.plan_of(f.plan)
        if f.assembly is None:
            f.assembly = FrameAssembly.for_plan(plan)
        missing = f.assembly.fill_missing()
        fraction = f.assembly.missing_fraction(missing)
        # Without the missing tiles' true values the distance to the exact output can only be
        # estimated: assume they carry the frame's average energy (SNR = 10 log10(1 / fraction)).
        snr = float("inf") if fraction == 0 else 10 * math.log10(1 / fraction)
        f.partial = {"missing_tiles": missing, "missing_fraction": round(fraction, 4),
                     "snr_db_estimate": round(snr, 2)}
        self.stats.frames_partial += 1
        log.warning("frame %d of %s missed its deadline: finishing without %d tile(s)", key[1], key[0][:8],
                    len(missing))
        return self._tiles_in(key, f)

    def peer_sources(self, node_id: str) -> set[str]:
        return set(self.sources.get(node_id, ()))

    def reset(self) -> list[Action]:
        """This node is no longer the gateway: forget every open frame (their sources start
        them again on the gateway that won) and release nothing more."""
        out: list[Action] = []
        for key, f in self.frames.items():
            out += self._strips_gone(key, f) + self._outputs_gone(key, f)
            if f.deadline:
                out.append(CancelDeadline(key))
            if f.tail_input is not None:
                out.append(DropTail(TaskRef(key[0], key[1], TAIL)))
        self.frames.clear()
        self.waiting.clear()
        self.early.clear()
        self.early_since.clear()
        self.early_bytes = self.held_bytes = 0
        self.sources.clear()
        self.order = ResultOrder()
        return out

    # -------------------------------------------------------------------- internals
    def _own(self, sender: str, source: str, what: str) -> bool:
        if owner_of(source) == sender:
            return True
        self.stats.foreign_refused += 1
        log.warning("node %s sent %s for source %s, which is not its own: refused", sender[:8], what, source)
        return False

    def _refusal(self, sender: str, msg: FrameStart) -> str | None:
        """Why a frame can never be admitted, or None."""
        lim = self.limits
        if not (0 < msg.img_w <= self.max_image_side and 0 < msg.img_h <= self.max_image_side):
            return f"image size {msg.img_w}x{msg.img_h} out of range"
        if self._nbytes(msg) > lim.result_buffer_bytes:
            return f"its fused map ({self._nbytes(msg)} bytes) is over result_buffer_bytes"
        mine = self.sources.get(sender, set())
        if msg.source not in mine and len(mine) >= lim.max_sources_per_node:
            return f"node {sender[:8]} has {len(mine)} sources open (max_sources_per_node)"
        return None

    def _pop_early(self, key: FrameKey) -> list[tuple[str, TileDone | TailDone]]:
        tiles = self.early.pop(key, [])
        self.early_since.pop(key, None)
        self.early_bytes -= sum(_early_nbytes(t) for _, t in tiles)
        return tiles

    def expire_early(self, now: float) -> None:
        """Forget tiles that waited ``early_tile_seconds`` for a FrameStart that never came (a
        late copy of a frame an earlier gateway released, say): a FrameStart overtaken by its
        tiles follows within a round trip, or within a takeover's resend."""
        limit = now - self.limits.early_tile_seconds
        while self.early and self.early_since[next(iter(self.early))] < limit:
            key = next(iter(self.early))
            self.stats.early_dropped += len(self._pop_early(key))

    def _keep_early(self, sender: str, msg: TileDone | TailDone, now: float) -> list[Action]:
        """A result of a frame not announced (yet): its FrameStart may be behind it on another
        connection, or lost with a connection its source did not see go. Keep it, within
        ``early_tile_bytes`` (the oldest frames' results go first) and ``early_tile_seconds``,
        until the frame is announced, and ask the frame's source, once per frame, to announce
        it again (:class:`FrameUnknown`; a duplicate announcement is ignored)."""
        self.expire_early(now)
        key = (msg.source, msg.frame)
        nbytes = _early_nbytes(msg)
        while self.early_bytes + nbytes > self.limits.early_tile_bytes and self.early:
            oldest = next(iter(self.early))
            self.stats.early_dropped += len(self._pop_early(oldest))
            log.warning("early tiles over %d bytes: dropped those of frame %d of %s (their leases bring "
                        "them back)", self.limits.early_tile_bytes, oldest[1], oldest[0][:8])
        if nbytes > self.limits.early_tile_bytes:
            self.stats.early_dropped += 1
            return []
        first = key not in self.early
        self.early.setdefault(key, []).append((sender, msg))
        self.early_since.setdefault(key, now)
        self.early_bytes += nbytes
        self.stats.early_tiles += 1
        if not first:
            return []
        self.stats.frames_unknown += 1
        return [Notify(owner_of(key[0]), FrameUnknown(*key))]

    def _tiles_in(self, key: FrameKey, f: OpenFrame) -> list[Action]:
        """Every tile is in (or the deadline passed): the tail becomes a task, and the source
        hears that the leases of its tiles end."""
        assert f.assembly is not None
        f.tail_input = f.assembly.output
        f.tail_queued = True
        out: list[Action] = [Notify(owner_of(key[0]), TilesIn(*key))]
        if f.deadline:
            out.append(CancelDeadline(key))
        out += self._strips_gone(key, f)
        out.append(QueueTail(TaskRef(key[0], key[1], TAIL)))
        return out

    def _outputs_gone(self, key: FrameKey, f: OpenFrame) -> list[Action]:
        holders = sorted(set(f.kept.values()))
        f.kept = {}
        return [ReleaseOutputs(node, key) for node in holders]

    def _strips_gone(self, key: FrameKey, f: OpenFrame) -> list[Action]:
        holders = sorted(set(f.strip_holders.values()) | f.spare_holders)
        f.strip_holders, f.spare_holders = {}, set()
        return [ReleaseStrips(node, key) for node in holders]

    def _finish(self, key: FrameKey, result: dict[str, Any], now: float) -> list[Action]:
        """The frame is over (done, dropped, failed or refused): free what it holds, and
        release every result of its source that is now next in order. A frame stays open (as
        done) until it is released: until then its source keeps it too."""
        out: list[Action] = []
        self.waiting.pop(key, None)
        f = self.frames.get(key)
        if f is not None:
            self.held_bytes -= f.nbytes
            f.nbytes = 0
            f.tail_input = f.assembly = None
            f.result = result
            out += self._strips_gone(key, f) + self._outputs_gone(key, f)
            if f.deadline:
                out.append(CancelDeadline(key))
        self._pop_early(key)
        out.append(DropTail(TaskRef(key[0], key[1], TAIL)))
        for number, res in self.order.finish(key[0], key[1], result):
            done = (key[0], number)
            gone = self.frames.pop(done, None)
            if gone is not None:  # its bytes were freed when it finished (nbytes is 0 then)
                self.held_bytes -= gone.nbytes
            self._pop_early(done)
            self.finished.add(done)
            self.stats.frames_done += 1
            res["released_at"] = round(now, 4)  # gateway clock: for frames/s
            out.append(Released(res))
            # Only now may the source forget the frame: a result waiting in order behind an
            # earlier frame dies with this gateway, and the source must still hold the frame
            # to start it again on the next one (frames were lost that way in a chaos run).
            out.append(Notify(owner_of(key[0]), FrameDone(*done)))
        owner = owner_of(key[0])
        if not self.order.has_source(key[0]) and owner in self.sources:
            self.sources[owner].discard(key[0])
            if not self.sources[owner]:
                del self.sources[owner]
        return out + self._admit_waiting(now)

    def _admit_waiting(self, now: float) -> list[Action]:
        """Frames that waited, admitted in the order they came while there is room."""
        out: list[Action] = []
        while self.waiting:
            key, (sender, msg, started) = next(iter(self.waiting.items()))
            if not self._room(msg):
                break
            del self.waiting[key]
            out.append(Notify(sender, FrameGo(*key)))
            out += self._admit(sender, msg, started, now)
        return out

    def validate(self) -> None:
        """Check the invariants (tests call this after every step)."""
        assert self.held_bytes == sum(f.nbytes for f in self.frames.values())
        assert self.early_bytes == sum(_early_nbytes(t) for ts in self.early.values() for _, t in ts)
        assert self.early_since.keys() == self.early.keys()
        assert self.early_bytes <= self.limits.early_tile_bytes
        assert self.active <= self.limits.max_queued_frames
        for key in self.early:
            assert key not in self.frames and not self._over(key, None), f"early tiles of {key} wait forever"
        assert len(self.waiting) <= self.limits.max_waiting_frames
        for key in self.waiting:
            assert key not in self.frames and key[1] in self.order.pending(key[0])
        if self.waiting:  # a frame waits only while there is no room for the first in line
            assert not self._room(next(iter(self.waiting.values()))[1])
        for key, f in self.frames.items():
            assert key[1] in self.order.pending(key[0]), f"open frame {key} not expected in order"
            assert key not in self.finished
            assert f.result is None or (f.tail_input is None and f.nbytes == 0 and not f.kept)
            if f.kept:
                assert f.assembly is not None and set(f.kept) <= f.assembly.received


def _early_nbytes(msg: TileDone | TailDone) -> int:
    """Bytes an early result holds: a tile's fused map; a whole frame's result is a digest and
    its detections (counted at a nominal size, so the byte cap still bounds how many)."""
    return max(msg.output.nbytes, 1024) if isinstance(msg, TileDone) else 1024
