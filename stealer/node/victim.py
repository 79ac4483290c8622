"""This node's queue handing out tasks: grants to thieves (a task leased with its input and the
strips held here), the full region of a tile whose strips are gone, strips this node
produced served to dependent tiles, the job of a task taken from the queue, failed tasks and
leases that run out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Final, NamedTuple

import numpy as np

from ..codec import encode_pixels, grant_codec
from ..errors import PlanError, ProtocolError
from ..images import pixel_rect
from ..roles.strips import pack_strips
from ..scheduler import TaskRef
from ..sources import Frame
from ..wire.messages import (
    RegionReply,
    RegionRequest,
    StealReply,
    StealRequest,
    StripsFetch,
    StripsReply,
    TaskFailed,
    TaskStarted,
)
from .config import Job, Peer
from .state import NodeState

log = logging.getLogger("stealer.node")  # one logger for the whole shell, as before the split

_INLINE_ENCODE_BYTES: Final = 64 * 1024
"""Pixels up to this size are zstd-encoded on the event loop (well under a millisecond on a
Pi); bigger regions, and PNG always, in a worker thread, so that the loop keeps serving
every other peer meanwhile."""


class TileInput(NamedTuple):
    """A network-input rectangle of a frame as it travels: exactly one of ``data`` (float32),
    ``pixels`` (raw uint8) and ``encoded`` (in ``codec``); ``raw_bytes`` is what raw pixels
    (or the float32 data) would have taken."""

    data: np.ndarray | None
    pixels: np.ndarray | None
    origin: list[int]
    codec: str
    encoded: np.ndarray | None
    raw_bytes: int

    @property
    def sent_bytes(self) -> int:
        arr = self.data if self.data is not None else self.pixels if self.pixels is not None else self.encoded
        return 0 if arr is None else arr.nbytes


class Victim(NodeState):
    """Grants, regions, strips served, leases of this node's queue.

    Uses of ``self`` (set in :class:`NodeState`): net, cfg, id, peers, queue,
    stats, _lease_timer, gateway, _held, _closed, worker.
    """

    async def _on_steal_request(self, peer: Peer | None, msg: StealRequest) -> None:
        assert peer is not None
        reply = await self._grant(peer, msg)
        await self._respond(peer, reply, msg.op)
        if reply is not None and reply.granted and not msg.speculative:
            for _ in range(self.cfg.runtime.steal_batch - 1):
                await self._respond(peer, await self._extra_grant(peer), msg.op)

    async def _grant(self, peer: Peer, req: StealRequest) -> StealReply | None:
        """A thief asks: lease it the first task it can run, with that task's input data."""
        if self.peers.get(peer.node_id) is not peer:
            return None  # it left while the request waited: no lease
        if self.cfg.policy != "steal":
            return StealReply(req.request_id, False)
        accept_tail = req.accept_tail
        now = time.monotonic()
        ref = self.queue.take(peer.node_id, now, accept_tail=accept_tail, ready=self.source.ready,
                              prefer=self._near(peer.node_id))
        if ref is None and req.speculative and self.cfg.speculate:
            ref = self.queue.speculate(peer.node_id, now, min_age=self.cfg.runtime.straggler_min,
                                       accept_tail=accept_tail)
        if ref is None:
            return StealReply(req.request_id, False)
        self._work_changed()
        # if it is not delivered, the lease brings it back
        return await self._grant_for(ref, req.request_id) or StealReply(req.request_id, False)

    async def _extra_grant(self, peer: Peer) -> StealReply | None:
        """Another tile for a thief that just got one, if the queue is deep enough that every
        other node still finds work here (``steal_batch`` per node)."""
        if not self._short_tasks() or not self.worker.deep_queue(self.queue.queued_tiles, len(self.peers)):
            return None
        ref = self.queue.take(peer.node_id, time.monotonic(), accept_tail=False, ready=self.source.ready,
                              prefer=self._near(peer.node_id))
        if ref is None:
            return None
        self._work_changed()
        self.stats.batch_grants += 1
        return await self._grant_for(ref, 0)

    async def _grant_for(self, ref: TaskRef, request_id: int) -> StealReply | None:
        """A task leased to a peer, with the data it needs: for a tile, the input region the
        source machine chooses (:meth:`SourceState.grant_input`), in this node's frame codec,
        and the strips this node holds of those it consumes; for a tail, the fused output."""
        job = self._local_job(ref)
        if job is None:
            return None
        if ref.is_tail:
            return StealReply(request_id, True, ref.source, ref.frame, ref.task, job.plan_key, [],
                              job.img_w, job.img_h, job.data, holders=job.holders or {})
        region, holders = self.source.grant_input(ref)
        self.stats.small_grants += region != self.source.plan_of((ref.source, ref.frame)).task(ref.task).full.input_region
        sent = await self._input_payload(self.source.frames[(ref.source, ref.frame)].frame, region)
        meta: list[list[int]] = []
        packed = None
        if holders.get(self.id):
            # strips this node holds go with the grant: a StripsFetch round trip less
            mine = self._held.get((ref.source, ref.frame), holders[self.id])
            if mine is not None:
                meta, packed = pack_strips(mine)
                self.stats.strips_granted += 1
                holders = {n: ids for n, ids in holders.items() if n != self.id}
        return StealReply(request_id, True, ref.source, ref.frame, ref.task, job.plan_key,
                          list(region), job.img_w, job.img_h, sent.data, sent.pixels, sent.origin, holders, meta,
                          packed, sent.codec, sent.encoded, self.source.keep_outputs())

    async def _on_region_request(self, peer: Peer | None, req: RegionRequest) -> None:
        if peer is not None:
            await self._respond(peer, await self._grant_region(req), req.op)

    async def _grant_region(self, req: RegionRequest) -> RegionReply:
        """A thief's reuse strips are gone: send it the task's full region after all."""
        sf = self.source.frames.get((req.source, req.frame))
        if sf is None:
            return RegionReply(req.request_id, False)
        try:
            task = sf.plan.task(req.task)  # the plan this frame was cut with
        except (KeyError, IndexError, PlanError):
            raise ProtocolError(f"region of unknown task {req.task}") from None
        sent = await self._input_payload(sf.frame, task.full.input_region)
        return RegionReply(req.request_id, True, list(task.full.input_region), sent.data, sent.pixels, sent.origin,
                           sent.codec, sent.encoded)

    async def _input_payload(self, frame: Frame, rect: tuple[int, int, int, int]) -> TileInput:
        """A network-input rectangle of one of this node's frames as it travels: the camera
        pixels it is made from when the frame has them (a quarter of the bytes), in this node's
        frame codec (:func:`stealer.codec.grant_codec` decides), else float32. Counted in the
        stats (bytes as raw pixels, bytes sent)."""
        if frame.pixels is None:
            y0, y1, x0, x1 = rect
            data = np.ascontiguousarray(frame.data[:, y0:y1, x0:x1])
            sent = TileInput(data, None, [], "raw", None, data.nbytes)
        else:
            _, h, w = self.net.input_shape
            py0, py1, px0, px1 = pixel_rect(rect, frame.img_w, frame.img_h, w, h)
            pixels = frame.pixels[:, py0:py1, px0:px1]
            origin = [py0, px0]
            codec = grant_codec(self.cfg.frame_codec, pixels.nbytes, frame.pixels.nbytes, frame.jpeg is not None)
            if codec == "raw":
                sent = TileInput(None, np.ascontiguousarray(pixels), origin, "raw", None, pixels.nbytes)
            elif codec == "jpeg":
                assert frame.jpeg is not None  # grant_codec chooses jpeg only then
                sent = TileInput(None, None, origin, "jpeg", np.frombuffer(frame.jpeg, np.uint8), pixels.nbytes)
            elif codec == "zstd" and pixels.nbytes <= _INLINE_ENCODE_BYTES:
                sent = TileInput(None, None, origin, codec, encode_pixels(codec, pixels), pixels.nbytes)
            else:
                encoded = await asyncio.get_running_loop().run_in_executor(None, encode_pixels, codec, pixels)
                sent = TileInput(None, None, origin, codec, encoded, pixels.nbytes)
            self.stats.pixel_grants += 1
            self.stats.encoded_grants += codec != "raw"
        self.stats.input_bytes_raw += sent.raw_bytes
        self.stats.input_bytes_sent += sent.sent_bytes
        return sent

    def _local_job(self, ref: TaskRef) -> Job | None:
        """The job of a task taken from this node's queue; None if its frame is gone meanwhile
        (the task is then forgotten)."""
        key = (ref.source, ref.frame)
        if ref.is_tail:
            tail = self.gateway.tail_input(key) if self.is_gateway else None
            if tail is None:
                self.queue.done(ref)
                return None
            plan, data, img_w, img_h, holders = tail
            return Job(ref, plan, data, img_w, img_h, self.id, holders=holders or None)
        sf = self.source.frames.get(key)
        if sf is None:
            self.queue.done(ref)
            return None
        return Job(ref, sf.plan_key, sf.frame.data, sf.frame.img_w, sf.frame.img_h, self.id,
                   holders=self.source.holders_of(key, ref.task), keep_output=self.source.keep_outputs())

    def _ready(self, ref: TaskRef) -> bool:
        return self.source.ready(ref)

    def _near(self, node_id: str) -> Callable[[TaskRef], bool]:
        return self.source.near(node_id, self.id)

    def _serve_strips(self, msg: StripsFetch) -> StripsReply:
        got = self._held.get((msg.source, msg.frame), msg.strips)
        if got is None:
            return StripsReply(msg.request_id, False)
        meta, data = pack_strips(got)
        self.stats.strips_served += 1
        return StripsReply(msg.request_id, True, meta, data)

    def _on_task_started(self, peer: Peer | None, msg: TaskStarted) -> None:
        """A thief starts a task it fetched ahead: its lease counts from now."""
        if peer is not None and self.queue.restart(TaskRef(msg.source, msg.frame, msg.task), peer.node_id,
                                                   time.monotonic()):
            self._leases_changed()

    def _on_task_failed(self, peer: Peer | None, msg: TaskFailed) -> None:
        """A node could not run a task it took from this node's queue."""
        sender = peer.node_id if peer is not None else self.id
        ref = TaskRef(msg.source, msg.frame, msg.task)
        if self.queue.holder(ref) != sender:
            return  # not its lease (a late report, a speculative copy): the lease decides
        log.warning("%s failed at %s: %s", ref, sender[:8], msg.reason)
        self.stats.requeued += len(self.queue.fail(ref))
        self._give_up_failed(msg.reason)
        self._work_changed()

    def _give_up_failed(self, reason: str) -> None:
        """Tasks of this node's queue that failed every attempt: their frames are given up
        (a tail's here, as the gateway; a tile's at its source, which is this node)."""
        for ref in self.queue.pop_given_up():
            if ref.is_tail:
                if self.is_gateway:
                    self._carry_out(self.gateway.give_up((ref.source, ref.frame), ref.task, reason, time.monotonic()))
            else:
                self._announce(self.source.give_up(ref, reason))

    def _leases_changed(self) -> None:
        """Arm one timer for the earliest lease deadline (no periodic polling). An armed timer
        stays: every lease runs for the same ``lease_seconds`` from when it was given, so a new
        lease never ends before the earliest one did, and an early firing only re-arms."""
        if self._lease_timer is not None:
            return
        deadline = self.queue.next_deadline()
        if deadline is not None and not self._closed:
            loop = asyncio.get_running_loop()
            self._lease_timer = loop.call_at(loop.time() + max(0.0, deadline - time.monotonic()),
                                             self._expire_leases)

    def _expire_leases(self) -> None:
        self._lease_timer = None
        late = self.queue.expire(time.monotonic())
        if late:
            self.stats.requeued += len(late)
            self.stats.lease_expiries += len(late)
            log.warning("%d lease(s) ran out; queued again", len(late))
            self._event({"event": "requeued", "time": time.time(), "tasks": len(late), "why": "lease ran out"})
        self._give_up_failed("its lease ran out")
        self._work_changed()
