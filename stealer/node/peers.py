"""The connections to other nodes: dialling (from discovery, the command line, a redial),
one read loop per connection, a lost peer, the membership machine's actions (claims,
promotion, stepping down, following a gateway), and what goes out to peers: answers without
holding up a read loop, posted messages, queue status whenever it changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from ..errors import CommClosedError, ProtocolError
from ..roles import membership as mem_role
from ..roles.worker import speed_worth_telling, status_worth_sending
from ..scheduler import PeerLoad
from ..wire import Comm, connect
from ..wire.messages import (FrameDone, FrameGo, FrameUnknown, FrameWait, GatewayClaim, Goodbye, Message, Status, TileAck,
                             TilesIn, TilesRedo)
from .config import Peer
from .state import NodeState

log = logging.getLogger("stealer.node")  # one logger for the whole shell, as before the split


class Peers(NodeState):
    """Connections, membership actions and status.

    Uses of ``self`` (set in :class:`NodeState`): net, cfg, id, on_event, membership, peers,
    queue, stats, _work, _gateway_seen, _stopping, _status_dirty, _last_status, _connecting,
    gateway, _key, _out_file, _closed; offers _work_changed, _post, _notify, _respond,
    _to_gateway to the other parts.
    """

    def _on_discovery(self, event: Any) -> None:
        info = event.peer
        if event.kind == "removed" or info.node_id in self.peers:
            return
        if info.model_hash != self.net.model_hash:
            log.warning("ignoring node %s at %s:%d: it runs model %s, this node runs %s",
                        info.node_id[:8], info.host, info.port, info.model_hash, self.net.model_hash)
            return
        # both sides may dial at once (a new node need not wait to be found): _serve_peer keeps
        # the connection opened by the smaller node id and closes the other, on both sides alike
        if info.node_id not in self._connecting:
            self._spawn(self._connect(info.host, info.port, info.node_id), f"connect {info.node_id[:8]}")

    async def _connect(self, host: str, port: int, node_id: str | None) -> None:
        if node_id is not None:
            self._connecting.add(node_id)
        try:
            comm = await connect(host, port, self.hello(), limits=self.cfg.limits, secret=self._key,
                                 authenticate_frames=self.cfg.authenticate_frames)
        except (CommClosedError, ProtocolError) as exc:
            log.warning("cannot connect to %s:%d: %s", host, port, exc)
            return
        finally:
            if node_id is not None:
                self._connecting.discard(node_id)
        await self._serve_peer(comm, dialed=True)

    async def _on_comm(self, comm: Comm) -> None:
        await self._serve_peer(comm, dialed=False)

    async def _serve_peer(self, comm: Comm, *, dialed: bool) -> None:
        ident = comm.peer
        if ident is None:  # connect() and serve() hand over comms only after the handshake
            raise ProtocolError("a connection without a handshake")
        dialer = self.id if dialed else ident.node_id
        old = self.peers.get(ident.node_id)
        if old is not None:
            keeper = min(self.id, ident.node_id)
            if old.dialer == keeper or dialer != keeper:
                log.debug("already connected to %s; closing the second connection", ident.node_id[:8])
                await comm.close("duplicate connection")
                return
            # the new connection is the one both sides keep: move over to it
            del self.peers[ident.node_id]
            old.comm.abort("replaced by the connection both sides keep")
        peer = Peer(ident.node_id, comm, ident.role, ident.max_memory, dialer)
        if old is not None:
            peer.load = old.load
        self.peers[peer.node_id] = peer
        self._frame_freed.set()  # one more node to keep busy: a source with auto in-flight may start more
        self._replan()  # grid auto: the next frames are cut for the cluster as it is now
        log.info("peer %s (%s) connected", peer.node_id[:8], peer.role)
        self._event({"event": "peer-joined", "time": time.time(), "peer": peer.node_id, "role": peer.role})
        try:
            await comm.send(self._status_msg())
            self._carry_out_membership(self.membership.peer_joined(peer.node_id, peer.role))
            self._shards_changed()  # --shards: the gateway places the tail again (after its claim)
            while True:
                msg = await comm.recv()
                try:
                    pending = self._dispatch_now(peer, msg)
                    if pending is not None:
                        await pending
                except (CommClosedError, ProtocolError, asyncio.CancelledError):
                    raise
                except Exception:  # noqa: BLE001 - a bug in handling one message must not drop the peer
                    log.exception("handling %s from %s failed; the connection stays up", msg.op, peer.node_id[:8])
        except CommClosedError as exc:
            log.info("peer %s gone: %s", peer.node_id[:8], exc)
        except ProtocolError as exc:
            log.warning("peer %s sent a bad message, dropping it: %s", peer.node_id[:8], exc)
            comm.abort(str(exc))
        finally:
            self._link_bytes_closed[0] += comm.bytes_in
            self._link_bytes_closed[1] += comm.bytes_out
            if self.peers.get(peer.node_id) is peer:
                del self.peers[peer.node_id]
                self._peer_lost(peer)
                self._maybe_redial(peer, comm)

    def _maybe_redial(self, peer: Peer, comm: Comm) -> None:
        """A connection dropped but the peer may be alive (a transient error, a bad message):
        the node with the smaller id dials it again once. A dead peer's connect simply fails."""
        if self._closed or self._stopping.is_set() or self.id > peer.node_id:
            return
        if "goodbye" in (comm.close_reason or "").lower():
            return  # it left on purpose
        host = comm.peer_address[0] if comm.peer_address else None
        port = getattr(comm.peer, "port", 0)
        if host and port:
            self._spawn(self._connect(host, port, peer.node_id), f"redial {peer.node_id[:8]}")

    def _event(self, event: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(event)
        if self.dashboard is not None:
            self.dashboard.event(event)

    def _peer_lost(self, peer: Peer) -> None:
        self._event({"event": "peer-lost", "time": time.time(), "peer": peer.node_id, "role": peer.role})
        self.stats.peers_lost += 1
        if self.metrics is not None:
            self.metrics.peer_gone(peer)
        for rid in [r for r, nid in self._pending_from.items() if nid == peer.node_id]:
            fut = self._pending.pop(rid, None)
            if fut is not None and not fut.done():  # no answer will come: waiting out its timeout only stalls
                fut.set_exception(CommClosedError(f"{peer.node_id[:8]} is gone"))
        requeued = self.queue.peer_lost(peer.node_id)
        if requeued:
            self.stats.requeued += len(requeued)
            log.warning("peer %s left holding %d task(s); queued them again", peer.node_id[:8], len(requeued))
            self._event({"event": "requeued", "time": time.time(), "tasks": len(requeued), "peer": peer.node_id,
                         "why": "holder lost"})
            self._work_changed()
        self._give_up_failed("its holders were lost")
        if self.is_gateway:
            self._carry_out(self.gateway.source_lost(peer.node_id, time.monotonic()))
            self._carry_out(self.gateway.holder_lost(peer.node_id, time.monotonic()))
        if peer.node_id == self.gateway_id:
            self._gateway_seen.clear()
        self._carry_out_membership(self.membership.peer_lost(peer.node_id))
        self._replan()
        self._shards_peer_lost(peer.node_id)

    def _follow_gateway(self, peer: Peer, epoch: int) -> None:
        self._carry_out_membership(self.membership.claim(peer.node_id, epoch))

    def _carry_out_membership(self, actions: list[mem_role.MembershipAction]) -> None:
        for act in actions:
            if isinstance(act, mem_role.SendClaim):
                peer = self.peers.get(act.node)
                if peer is not None:
                    self._post(peer, GatewayClaim(act.epoch))
            elif isinstance(act, mem_role.Promote):
                self.stats.takeovers += 1
                if self.cfg.out and self._out_file is None:
                    self._out_file = open(self.cfg.out, "a", buffering=1)
                self._gateway_seen.set()
                self._work.set()  # a slot that would not steal without a gateway may now
                for peer in list(self.peers.values()):
                    self._post(peer, GatewayClaim(act.epoch))
                log.warning("this node is the gateway now (epoch %d)", act.epoch)
                self._event({"event": "takeover", "time": time.time(), "epoch": act.epoch})
                self._announce(self.source.gateway_changed(self.id))
            elif isinstance(act, mem_role.StepDown):
                # a node that is not the gateway never acts as one: its open frames are
                # forgotten (their sources start them again on the winner), its results file
                # closed, and gateway messages from now on go to the winner
                self._carry_out(self.gateway.reset())
                if self._out_file is not None:
                    self._out_file.close()
                    self._out_file = None
            elif isinstance(act, mem_role.Follow):
                peer = self.peers.get(act.node)
                if peer is not None:
                    peer.role = "gateway"
                self._gateway_seen.set()
                self._work.set()  # a slot that would not steal without a gateway may now
                self._announce(self.source.gateway_changed(act.node))

    def _on_gateway_claim(self, peer: Peer | None, msg: GatewayClaim) -> None:
        if peer is not None:
            self._follow_gateway(peer, msg.epoch)

    def _on_goodbye(self, peer: Peer | None, msg: Goodbye) -> None:
        raise CommClosedError(f"peer said goodbye: {msg.reason}")

    def _on_status(self, peer: Peer | None, msg: Status) -> None:
        if peer is not None:
            peer.status, peer.status_at = msg, time.time()
            speed_before = peer.load.speed
            peer.load = PeerLoad(msg.queued_tiles, msg.queued_tails, peer.comm.rtt or 0.0, True, msg.leased,
                                 msg.speed)
            if msg.queued_tiles or msg.queued_tails or msg.leased:
                self._work.set()
            if msg.speed != speed_before:
                self._replan()  # grid auto: a peer measured (or changed) its speed

    async def _to_gateway(self, msg: Message) -> None:
        if self.is_gateway:
            await self._dispatch(None, msg)
            return
        if not self._gateway_seen.is_set():
            await asyncio.wait_for(self._gateway_seen.wait(), self.cfg.runtime.gateway_wait)
        if self.is_gateway:  # this node took over while waiting
            await self._dispatch(None, msg)
            return
        gw = self._gateway()
        if gw is None:
            raise CommClosedError("no gateway")
        await gw.comm.send(msg)

    async def _respond(self, peer: Peer, reply: Message | None, what: str) -> None:
        """Answer a peer's request (often with megabytes) without holding up the loop that reads
        its connection. Answered inline, two nodes that ask each other for data at once would
        each wait in a send for the other to read, and neither would read again: a deadlock
        once both sockets' buffers fill, which a 20 Mbit/s link reaches in a fraction of a
        second. So a small answer is posted (written at once, never waits) and a big one is
        sent from a task; past ``max_inflight_per_peer`` of those in progress the loop waits
        (back-pressure)."""
        if reply is None:
            return
        if _array_bytes(reply) < _POST_DATA_BYTES:
            peer.comm.post(reply)
            return
        if peer.answering >= self.cfg.limits.max_inflight_per_peer:
            await peer.comm.send(reply)
            return
        peer.answering += 1

        async def run() -> None:
            try:
                await peer.comm.send(reply)
            except CommClosedError:
                pass  # the connection's own loop notices and cleans up
            finally:
                peer.answering -= 1

        self._spawn(run(), what)

    def _post(self, peer: Peer, msg: Message) -> None:
        """Post a small message; a closed connection is its read loop's business."""
        with contextlib.suppress(CommClosedError):
            peer.comm.post(msg)

    async def _send_quietly(self, peer: Peer, msg: Message) -> None:
        with contextlib.suppress(CommClosedError):
            await peer.comm.send(msg)

    def _notify(self, node_id: str,
                msg: TileAck | TilesIn | FrameDone | FrameWait | FrameGo | FrameUnknown | TilesRedo) -> None:
        """Tell a source (this node or a peer) how its tiles and frames stand, without waiting."""
        if node_id == self.id:
            self._handlers[type(msg)](None, msg)
            return
        peer = self.peers.get(node_id)
        if peer is None:
            log.info("cannot send %s to %s: not connected", msg.op, node_id[:8])
            return
        self._post(peer, msg)

    def _queued(self) -> tuple[int, int, int]:
        tails = self.queue.queued_tails
        return len(self.queue) - tails, tails, self.queue.outstanding(self.id)

    def _work_changed(self) -> None:
        if len(self.queue):
            self._work.set()
        if not self._status_dirty:
            self._status_dirty = True
            asyncio.get_running_loop().call_soon(self._send_status)
        self._leases_changed()

    def _send_status(self) -> None:
        self._status_dirty = False
        status = self._queued()
        speed = self._measured_speed()  # rides on the queue counts, or is news of its own
        if not status_worth_sending(self._last_status, status) and not speed_worth_telling(self._speed_told, speed):
            return
        self._last_status = status
        self._speed_told = speed
        msg = self._status_msg(status, speed)
        for peer in list(self.peers.values()):
            self._post(peer, msg)

    def _status_msg(self, queued: tuple[int, int, int] | None = None, speed: float | None = None) -> Status:
        """This node's Status: its queue, its speed, and what a dashboard shows of it."""
        b_in, b_out = self._link_bytes()
        st = self.stats
        frames = self.frames  # the previews this node wants as the gateway (none: side 0)
        return Status(*(queued or self._queued()), speed=self._measured_speed() if speed is None else speed,
                      busy=self._busy_share(), tasks_run=st.tiles_run + st.tails_run, stolen=st.stolen,
                      bytes_in=b_in, bytes_out=b_out, watching=self.dashboard is not None,
                      preview_side=frames.side if frames is not None else 0,
                      preview_interval=frames.interval if frames is not None else 0.0)

    def _link_bytes(self) -> tuple[int, int]:
        """Bytes received and sent over every connection this node has had."""
        b_in, b_out = self._link_bytes_closed
        for peer in self.peers.values():
            b_in += peer.comm.bytes_in
            b_out += peer.comm.bytes_out
        return b_in, b_out

    def _busy_share(self) -> float:
        """Share of the compute slots' time spent computing over the last few reports (since
        start before the first): a task's time counts when it ends, so a window of several
        seconds keeps the figure from jumping between 0 and 1 with each long task."""
        slots = self.cfg.slots
        if not slots:
            return 0.0
        now, busy = time.monotonic(), self.stats.busy_seconds
        t0, b0 = self._busy_marks[0] if self._busy_marks else (self._started_at, 0.0)
        return min(1.0, max(0.0, (busy - b0) / (slots * (now - t0)))) if now > t0 else 0.0

    async def _report_loop(self) -> None:
        """Every ``dashboard_report_interval``: mark the busy time (for :meth:`_busy_share`) and,
        while the gateway serves a dashboard, send it this node's Status (an idle node sends
        none otherwise). Nothing is sent to a gateway that does not watch."""
        interval = self.cfg.limits.dashboard_report_interval
        while not self._closed:
            await asyncio.sleep(interval)
            self._busy_marks.append((time.monotonic(), self.stats.busy_seconds))
            gw = self._gateway()
            if gw is not None and gw.status is not None and gw.status.watching:
                self._post(gw, self._status_msg())


_POST_DATA_BYTES = 48 << 10  # answers with less array data than this are posted (see Comm.post)


def _array_bytes(msg: Message) -> int:
    return sum(getattr(msg, f).nbytes for f in ("data", "pixels", "strips", "output")
               if getattr(msg, f, None) is not None)
