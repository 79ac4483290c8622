"""The gateway's shell: messages fed to the gateway machine (:class:`GatewayState` decides)
while this node is the gateway, its actions carried out (acks, tails queued, strips
released, deadlines armed), where strips are, and results emitted in frame order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Callable

from ..errors import PlanError, ProtocolError
from ..roles import gateway as gw_role
from ..scheduler import TAIL, TaskRef
from ..roles.strips import pack_outputs
from ..wire.messages import (Message, OutputsFetch, OutputsMissing, OutputsRelease, Preview, StripsRelease, StripsReply,
                             StripsRequest, TailDone)
from .config import Peer
from .state import NodeState

log = logging.getLogger("stealer.node")  # one logger for the whole shell, as before the split


class GatewayShell(NodeState):
    """Gateway actions, deadlines and results.

    Uses of ``self`` (set in :class:`NodeState`): id, on_result, peers, queue, stats, results,
    gateway, _deadline_timers, _held, _out_file, metrics, mqtt, dashboard, frames.
    """

    def _as_gateway(self, peer: Peer | None, msg: Message,
                    event: Callable[[str, Any, float], list[gw_role.Action]]) -> None:
        """Feed a gateway message to the gateway machine, if this node is the gateway. A node
        that is not (it stepped down, or the sender has not heard of the new gateway yet)
        never acts as one: it passes the message on to the gateway it follows, or drops it
        (the task's lease brings the work back)."""
        sender = peer.node_id if peer is not None else self.id
        if not self.is_gateway:
            gw = self._gateway()
            if gw is not None and gw.node_id != sender:
                log.info("%s from %s: this node is not the gateway; passed on to %s", msg.op, sender[:8],
                         gw.node_id[:8])
                self._spawn(self._send_quietly(gw, msg), "pass on")
            else:
                log.info("%s from %s dropped: this node is not the gateway", msg.op, sender[:8])
            return
        self._carry_out(event(sender, msg, time.monotonic()))

    def _carry_out(self, actions: list[gw_role.Action]) -> None:
        """Carry out the gateway machine's actions."""
        work = False
        for act in actions:
            if isinstance(act, gw_role.Notify):
                self._notify(act.node, act.msg)
            elif isinstance(act, gw_role.QueueTail):
                if self.sharding is not None:  # --shards: this node runs it, its layers as shard tasks
                    self._start_sharded_tail(act.ref)
                    continue
                self.queue.add([act.ref], front=True)
                work = True
            elif isinstance(act, gw_role.DropTail):
                work |= self.queue.done(act.ref)
            elif isinstance(act, gw_role.ReleaseStrips):
                if act.node == self.id:
                    self._held.drop(act.key)
                elif act.node in self.peers:
                    self._post(self.peers[act.node], StripsRelease(*act.key))
            elif isinstance(act, gw_role.ReleaseOutputs):
                if act.node == self.id:
                    self._kept.drop(act.key)
                elif act.node in self.peers:
                    self._post(self.peers[act.node], OutputsRelease(*act.key))
            elif isinstance(act, gw_role.ArmDeadline):
                loop = asyncio.get_running_loop()
                delay = max(0.0, act.at - time.monotonic())
                self._deadline_timers[act.key] = loop.call_later(delay, self._deadline_passed, act.key)
            elif isinstance(act, gw_role.CancelDeadline):
                timer = self._deadline_timers.pop(act.key, None)
                if timer is not None:
                    timer.cancel()
            elif isinstance(act, gw_role.Released):
                self._emit_result(act.result)
        gs = self.gateway.stats
        self.stats.duplicates_dropped, self.stats.frames_partial = gs.duplicates_dropped, gs.frames_partial
        if work:
            self._work_changed()

    def _deadline_passed(self, key: tuple[str, int]) -> None:
        self._deadline_timers.pop(key, None)
        if self.is_gateway:
            self._carry_out(self.gateway.deadline_passed(key, time.monotonic()))

    def _on_tail_done(self, peer: Peer | None, msg: TailDone) -> None:
        if self.is_gateway:
            self.queue.done(TaskRef(msg.source, msg.frame, TAIL))
            self._leases_changed()
        self._as_gateway(peer, msg, self.gateway.tail_done)

    async def _on_strips_request(self, peer: Peer | None, msg: StripsRequest) -> None:
        assert peer is not None
        if self.is_gateway:
            await self._respond(peer, self._gw_strips(msg), msg.op)
        else:  # not the gateway (any more): nothing known here, the tile falls back to full
            await self._respond(peer, StripsReply(msg.request_id, False), msg.op)

    def _gw_strips(self, msg: StripsRequest) -> StripsReply:
        plan = self._plan(msg.plan)
        try:
            task = plan.task(msg.task)
        except (KeyError, IndexError, PlanError):
            raise ProtocolError(f"strips for unknown task {msg.task}") from None
        holders = self.gateway.strip_locations((msg.source, msg.frame), task.consumes)
        return StripsReply(msg.request_id, holders is not None, holders=holders or {})

    def _serve_outputs(self, msg: OutputsFetch) -> StripsReply:
        """Tile outputs of a frame for the node that runs its tail: those this node kept, or, as
        the gateway, those that came to it."""
        key = (msg.source, msg.frame)
        got = self._kept.get(key, msg.tasks)
        if got is None and self.is_gateway:
            got = self.gateway.tiles_here(key, msg.tasks)
        if got is None:
            return StripsReply(msg.request_id, False)
        meta, data = pack_outputs(got)
        self.stats.outputs_served += 1
        return StripsReply(msg.request_id, True, meta, data)

    def _on_outputs_missing(self, peer: Peer | None, msg: OutputsMissing) -> None:
        """The node running a frame's tail could not fetch some of its tiles' outputs: if it
        holds the tail's lease, those tiles run again."""
        sender = peer.node_id if peer is not None else self.id
        if not self.is_gateway or self.queue.holder(TaskRef(msg.source, msg.frame, TAIL)) != sender:
            return  # not its lease (a late report): the lease decides
        self._carry_out(self.gateway.outputs_lost((msg.source, msg.frame), msg.holder, time.monotonic()))

    def _on_preview(self, peer: Peer | None, msg: Preview) -> None:
        """A source's frame preview, for the dashboard, --mjpeg, --video-out: only of the
        sender's own sources, only as big as ``Limits.preview_bytes`` of the side asked for,
        only while this node is the gateway with one of those."""
        sender = peer.node_id if peer is not None else self.id
        if self.frames is None or not self.is_gateway:
            return
        if gw_role.owner_of(msg.source) != sender:
            log.warning("preview of %s from %s refused: not its source", msg.source, sender[:8])
            return
        limit = self.cfg.limits.preview_bytes(self.frames.side)
        if msg.jpeg.nbytes > limit:
            log.warning("preview of %s from %s refused: %d B > %d B (preview_max_bytes for %d px)", msg.source,
                        sender[:8], msg.jpeg.nbytes, limit, self.frames.side)
            return
        self.frames.preview(msg.source, msg.frame, msg.img_w, msg.img_h, msg.jpeg.tobytes())

    def _emit_result(self, res: dict[str, Any]) -> None:
        self.stats.frames_done += 1
        if self._out_file is not None:
            self._out_file.write(json.dumps(res) + "\n")
        if self.results.full():  # nobody reads them in-process: the oldest unread go
            self.results.get_nowait()
        self.results.put_nowait(res)
        if self.metrics is not None:
            self.metrics.frame_released(res)
        if self.mqtt is not None:
            self.mqtt.publish(res)
        if self.dashboard is not None:
            self.dashboard.frame_released(res)
        if self.frames is not None:
            self.frames.result(res)
        if self.on_result is not None:
            self.on_result(res)
