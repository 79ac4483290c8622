"""The data-source role, pure: a source's frames, their tasks in the queue, readiness, and what
to tell the gateway.

Events in (a new frame, the gateway's acks and frame ends, a new gateway, a task given up),
actions out (:class:`ToGateway` messages); the queue it fills is the node's
:class:`~stealer.scheduler.WorkQueue`, a pure structure too. No I/O, no awaits, no clock.

Each frame keeps the plan it was cut with (:meth:`SourceState.set_plan` changes the plan of the
frames that come after, never of one already started): every task, grant and announcement of a
frame reads its own plan, so a frame is never cut with one plan and assembled with another.

A frame stays here from the moment the camera hands it over until the gateway's
:class:`FrameDone` (its result was released), whatever happens between: a gateway that dies
takes nothing with it, because on every new gateway each unfinished frame is announced again
and its tasks are queued again, in one synchronous step (so nothing can run between the two
and queue the same tasks twice). A frame whose task was given up (it failed every attempt) is
reported with :class:`FrameFailed` instead, and released by the gateway with the error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Union

from ..ftp.plan import Plan
from ..scheduler import TAIL, TaskRef, WorkQueue
from ..sources import Frame
from ..wire.messages import (FrameDone, FrameDrop, FrameFailed, FrameGo, FrameStart, FrameUnknown, FrameWait, TileAck,
                             TilesIn, TilesRedo)

log = logging.getLogger(__name__)

FrameKey = tuple[str, int]


@dataclass(frozen=True, slots=True)
class ToGateway:
    """Post ``msg`` to the gateway (now, or, with no gateway, never: every unfinished frame is
    announced again to the next one)."""

    msg: FrameStart | FrameFailed | FrameDrop


SourceAction = Union[ToGateway]


@dataclass
class SourceFrame:
    frame: Frame
    started: float
    plan_key: str
    plan: Plan
    acked: set[int] = field(default_factory=set)  # tiles the gateway has (their strips with it)
    strip_holders: dict[int, str] = field(default_factory=dict)  # strip id -> node that keeps it
    failed: tuple[int, str] | None = None  # (task, why): given up, waiting for the gateway's FrameDone
    announced_to: str | None = None  # the gateway that last heard of it (None: none yet)
    held: bool = False  # the gateway is full: its tasks wait until it is admitted (FrameGo)
    admitted: bool = False  # FrameGo came (a FrameWait that comes after it is stale)


class SourceState:
    """Every frame of this node's sources until the gateway has released it.

    Parameters
    ----------
    queue : WorkQueue
        The node's queue: this role adds its frames' tile tasks and takes them out again.
    plan_key : str
        The plan this node's frames are cut with (until :meth:`set_plan`).
    plan : Plan
    deadline : float
        Seconds per frame for the gateway's deadline mode (0: none).
    """

    def __init__(self, queue: WorkQueue, plan_key: str, plan: Plan, deadline: float = 0.0) -> None:
        self.queue = queue
        self.deadline = deadline
        self.frames: dict[FrameKey, SourceFrame] = {}
        self.inflight: dict[str, int] = {}
        self.resent = 0
        # per plan key: each reuse task's producers and the strips it consumes, looked up on
        # every take of a queue scan, so kept here once per plan
        self._deps: dict[str, tuple[dict[int, frozenset[int]], dict[int, tuple[int, ...]]]] = {}
        self.plan_key = plan_key
        self.plan = plan
        self.set_plan(plan_key, plan)

    def set_plan(self, plan_key: str, plan: Plan) -> bool:
        """Cut the frames that come from now on with ``plan``; the frames already here keep
        theirs. False if it is the plan in use already."""
        changed = plan_key != self.plan_key
        self.plan_key, self.plan = plan_key, plan
        if plan_key not in self._deps:
            reuse = [t for t in plan.tasks if t.reuse is not None and t.consumes]
            self._deps[plan_key] = ({t.id: frozenset(t.producers) for t in reuse},
                                    {t.id: t.consumes for t in reuse})
        in_use = {sf.plan_key for sf in self.frames.values()} | {plan_key}
        for key in [k for k in self._deps if k not in in_use]:
            del self._deps[key]
        return changed

    def plan_of(self, key: FrameKey) -> Plan:
        """The plan frame ``key`` was cut with (KeyError: not a frame of this node)."""
        return self.frames[key].plan

    def _producers(self, sf: SourceFrame) -> dict[int, frozenset[int]]:
        return self._deps[sf.plan_key][0]

    def _consumes(self, sf: SourceFrame) -> dict[int, tuple[int, ...]]:
        return self._deps[sf.plan_key][1]

    # -------------------------------------------------------------------- frames
    def _start_msg(self, key: FrameKey, sf: SourceFrame) -> FrameStart | FrameFailed:
        if sf.failed is not None:
            return FrameFailed(key[0], key[1], sf.failed[0], sf.failed[1])
        return FrameStart(key[0], key[1], sf.plan_key, sf.frame.img_w, sf.frame.img_h, self.deadline)

    def new_frame(self, source_id: str, frame: Frame, now: float) -> list[SourceAction]:
        """A camera frame: keep it, queue its tasks, announce it to the gateway."""
        key = (source_id, frame.number)
        if key in self.frames:
            return []
        sf = self.frames[key] = SourceFrame(frame, now, self.plan_key, self.plan)
        self.inflight[source_id] = self.inflight.get(source_id, 0) + 1
        self.queue.add(TaskRef(source_id, frame.number, t.id) for t in sf.plan.tasks)
        return [ToGateway(self._start_msg(key, sf))]

    def announced(self, key: FrameKey, gateway: str) -> None:
        sf = self.frames.get(key)
        if sf is not None:
            sf.announced_to = gateway

    def gateway_changed(self, gateway: str) -> list[SourceAction]:
        """This node follows ``gateway`` now (a new one, or the same one after its connection
        dropped: either way it has forgotten this node's frames). Announce each unfinished
        frame to it, and queue the tasks of each frame that an earlier gateway heard of again
        (the tiles it had are gone with it); a frame no gateway heard of yet is only announced.
        Synchronous, so no task of a frame can be queued twice."""
        out: list[SourceAction] = []
        for key in sorted(self.frames):
            sf = self.frames[key]
            if sf.announced_to is None:
                out.append(ToGateway(self._start_msg(key, sf)))
                continue
            self.queue.drop_frame(*key)
            sf.held = sf.admitted = False
            sf.acked.clear()  # the new gateway holds none of the frame's tiles or strips
            sf.strip_holders.clear()
            if sf.failed is None:
                self.queue.add(TaskRef(key[0], key[1], t.id) for t in sf.plan.tasks)
            out.append(ToGateway(self._start_msg(key, sf)))
            self.resent += 1
        return out

    def give_up(self, ref: TaskRef, reason: str) -> list[SourceAction]:
        """A task of one of this node's frames failed every attempt: stop the frame's work and
        have the gateway release it with the error."""
        key = (ref.source, ref.frame)
        sf = self.frames.get(key)
        if sf is None or sf.failed is not None:
            return []
        sf.failed = (ref.task, reason)
        self.queue.drop_frame(*key)
        log.error("frame %d of %s: %s failed %d times (%s); the frame is released with the error",
                  ref.frame, ref.source, ref, self.queue.max_attempts, reason)
        return [ToGateway(self._start_msg(key, sf))]

    def drop_oldest_unstarted(self, source_id: str) -> FrameKey | None:
        """Deadline mode, overloaded: forget the oldest frame of the source nothing has started
        on, and return it (the gateway is told with :class:`FrameDrop`)."""
        for key in sorted(k for k in self.frames if k[0] == source_id):
            sf = self.frames[key]
            if sf.failed is None and self.queue.untouched(key[0], key[1], len(sf.plan.tasks)):
                self.queue.drop_frame(*key)
                self._forget(key)
                return key
        return None

    def _forget(self, key: FrameKey) -> None:
        del self.frames[key]
        self.inflight[key[0]] -= 1

    # -------------------------------------------------------------------- from the gateway
    def hold(self, msg: FrameWait) -> bool:
        """The gateway is full and the frame waits its turn there: take its tasks out of the
        queue (nobody computes a frame the gateway cannot take yet). False if not ours."""
        sf = self.frames.get((msg.source, msg.frame))
        if sf is None or sf.failed is not None or sf.held or sf.admitted:
            return False
        sf.held = True
        self.queue.drop_frame(msg.source, msg.frame)
        sf.acked.clear()
        sf.strip_holders.clear()
        return True

    def admitted(self, msg: FrameGo) -> bool:
        """The frame's turn came: queue its tasks."""
        sf = self.frames.get((msg.source, msg.frame))
        if sf is None or sf.admitted:
            return False
        sf.admitted = True
        if not sf.held:  # came before its FrameWait (or none was needed): nothing to queue
            return False
        sf.held = False
        self.queue.add(TaskRef(msg.source, msg.frame, t.id) for t in sf.plan.tasks)
        return True

    def frame_unknown(self, msg: FrameUnknown) -> list[SourceAction]:
        """The gateway has a result of the frame but no FrameStart (it was lost with a
        connection this node did not see replaced or cut): announce it again, and nothing
        else (its tasks and leases stand; the gateway kept the result). Nothing for a frame
        this node no longer has."""
        key = (msg.source, msg.frame)
        sf = self.frames.get(key)
        if sf is None:
            return []
        self.resent += 1
        return [ToGateway(self._start_msg(key, sf))]

    def tile_ack(self, msg: TileAck, now: float) -> None:
        self.queue.done(TaskRef(msg.source, msg.frame, msg.task), now)
        sf = self.frames.get((msg.source, msg.frame))
        if sf is not None:
            sf.acked.add(msg.task)
            if msg.holder:
                for sid in msg.strips:
                    sf.strip_holders.setdefault(sid, msg.holder)

    def tiles_redo(self, msg: TilesRedo) -> bool:
        """The node that kept some tiles' outputs left before the tail fetched them: queue those
        tiles again. Their full variants: the frame's reuse strips went with its TilesIn, so
        what the gateway said of its producers no longer holds. False if nothing was queued
        (not a frame of this node, or one given up or waiting to be admitted)."""
        sf = self.frames.get((msg.source, msg.frame))
        if sf is None or sf.failed is not None or sf.held:
            return False
        n_tasks = len(sf.plan.tasks)
        tasks = sorted({t for t in msg.tasks if 0 <= t < n_tasks})
        sf.acked.clear()
        sf.strip_holders.clear()
        self.queue.add(TaskRef(msg.source, msg.frame, t) for t in tasks)
        return bool(tasks)

    def keep_outputs(self) -> bool:
        """Whether this node's tiles should keep their outputs for the tail's runner to fetch
        (a direct data path) rather than send them to the gateway: when several of its frames
        are in flight the gateway is busy too and a frame's tail mostly runs elsewhere, so a
        map sent to the gateway would cross a second link to it. With one frame in flight the
        gateway is idle when the last tile is in and runs the tail itself on the maps that
        streamed in while the other tiles computed."""
        return len(self.frames) > 1

    def tiles_in(self, msg: TilesIn, now: float | None = None) -> bool:
        return self.queue.end_tiles(msg.source, msg.frame, now) > 0

    def frame_done(self, msg: FrameDone) -> bool:
        """The frame's result is out: forget it. False if it was not a frame of this node."""
        key = (msg.source, msg.frame)
        if key not in self.frames:
            return False
        self.queue.drop_frame(msg.source, msg.frame)
        self._forget(key)
        return True

    # -------------------------------------------------------------------- queue decisions
    def ready(self, ref: TaskRef) -> bool:
        """A task that can run its cheapest variant now: a tail, a tile without producers, or
        a reuse tile whose producers' tiles (and so their strips) are at the gateway."""
        if ref.task == TAIL:
            return True
        sf = self.frames.get((ref.source, ref.frame))
        if sf is None:
            return True
        producers = self._deps[sf.plan_key][0].get(ref.task)  # inlined: asked per task of a queue scan
        return producers is None or sf.acked.issuperset(producers)

    def near(self, node_id: str, me: str) -> Callable[[TaskRef], bool]:
        """Whether a task finds every reuse strip it consumes at ``node_id`` (which will run it)
        or at ``me`` (they go with its grant): no strip fetch from a third node."""
        frames, deps, near_nodes = self.frames, self._deps, (node_id, me)

        def near(ref: TaskRef) -> bool:
            if ref.task == TAIL:
                return True
            sf = frames.get((ref.source, ref.frame))
            if sf is None:
                return True
            consumes = deps[sf.plan_key][1].get(ref.task)
            if not consumes:
                return True
            holders = sf.strip_holders
            for s in consumes:
                if holders.get(s) not in near_nodes:
                    return False
            return True
        return near

    def holders_of(self, key: FrameKey, task_id: int) -> dict[str, list[int]] | None:
        """Where the strips a reuse tile of this node's frame consumes are (node id -> strip
        ids), as the gateway's acks said; None if any is unknown (then the gateway is asked)."""
        sf = self.frames.get(key)
        consumes = self._consumes(sf).get(task_id) if sf is not None else None
        if sf is None or not consumes:
            return None
        by_node: dict[str, list[int]] = {}
        for sid in consumes:
            node = sf.strip_holders.get(sid)
            if node is None:
                return None
            by_node.setdefault(node, []).append(sid)
        return by_node

    def grant_input(self, ref: TaskRef) -> tuple[tuple[int, int, int, int], dict[str, list[int]]]:
        """What a tile's grant carries: the network-input region of the reuse variant when every
        producer's tile is at the gateway (so its strips are too), with where those strips are;
        else the full variant's region (the thief can always fall back to it) and no holders.

        Shipping the small region when it will do cuts a camera's upload several times over
        (at 5x5 on YOLOv2 a reuse tile reads 3-40 KB of frame instead of 350-630 KB), which is
        what a Wi-Fi link is short of."""
        task = self.plan_of((ref.source, ref.frame)).task(ref.task)
        if task.reuse is None or not task.consumes or not self.ready(ref):
            return task.full.input_region, {}
        return task.reuse.input_region, self.holders_of((ref.source, ref.frame), ref.task) or {}

    def validate(self) -> None:
        """Invariants (tests call this after every step)."""
        counts: dict[str, int] = {}
        for key in self.frames:
            counts[key[0]] = counts.get(key[0], 0) + 1
        for src, n in self.inflight.items():
            assert n == counts.get(src, 0), f"{src}: {n} in flight, {counts.get(src, 0)} frames kept"
        queued = {(r.source, r.frame) for r in self.queue.queue if not r.is_tail}
        for key in queued:
            assert key in self.frames or key[0] not in self.inflight, f"tasks of unknown frame {key}"
        for key, sf in self.frames.items():
            if sf.failed is not None or sf.held:
                assert key not in queued
            assert sf.plan_key in self._deps, f"{key}: no dependencies kept for its plan {sf.plan_key}"
        for ref in self.queue.queue:
            kept = self.frames.get((ref.source, ref.frame))
            if kept is not None and not ref.is_tail:
                assert 0 <= ref.task < len(kept.plan.tasks), f"{ref} is not a task of its frame's plan {kept.plan_key}"
