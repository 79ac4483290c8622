"""The node daemon: discovery, peer connections, work stealing, the gateway's assembly.

One asyncio loop per node carries messages; kernels run in a thread pool (they release the GIL).
The decisions live in pure state machines (:mod:`stealer.scheduler`, :mod:`stealer.assembly`);
this module only moves data between them, the network and the compute threads.

Roles
-----
* every node computes: its own queue first (if it is a source, or the gateway with tail tasks),
  then it steals from the peer with the most queued work (peers announce their queue length
  with :class:`Status` whenever it changes, so idle nodes wait on an event, never poll);
* a *source* partitions each frame (FTP plan, reuse-aware order) into its queue and tells the
  gateway (:class:`FrameStart`); stolen tiles carry their frame region straight from the source;
* the *gateway* caches reuse strips, stitches tiles, queues each stitched frame's tail (the
  layers after the fused block) as a stealable task, and emits results in frame order.

Every task leaves a queue under a lease; the gateway's acknowledgement ends it, and a lost
holder's tasks are queued again (the gateway keeps the first result of a task, drops repeats).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar

import numpy as np

from ..compute import ComputePool
from ..config import DEFAULT_LIMITS, Limits
from ..errors import CommClosedError, PlanError, ProtocolError, StealerError
from ..ftp.execute import run_task
from ..ftp.geometry import height, width
from ..ftp.plan import Plan, make_plan
from ..layers import RegionSpec
from ..network import Network
from ..images import letterbox_region, pixel_rect
from ..region import detect
from ..roles import gateway as gw_role
from ..roles import membership as mem_role
from ..roles.gateway import GatewayState
from ..roles.membership import MembershipState
from ..roles.source import SourceState, ToGateway
from ..roles.strips import StripCache, pack_strips, unpack_strips
from ..roles.worker import WorkerPolicy, status_worth_sending
from ..scheduler import TAIL, PeerLoad, TaskRef, WorkQueue, choose_victim
from ..sources import Frame, FrameSource
from ..wire import ClusterKey, Comm, Hello, connect, serve
from ..wire.comm import Server
from ..wire.messages import (
    PROTOCOL_VERSION,
    FrameDone,
    FrameDrop,
    FrameFailed,
    FrameStart,
    GatewayClaim,
    Goodbye,
    Message,
    RegionReply,
    RegionRequest,
    StealReply,
    StealRequest,
    Status,
    StripsFetch,
    StripsRelease,
    StripsReply,
    StripsRequest,
    TailDone,
    TaskFailed,
    TileAck,
    TilesIn,
    TileDone,
)

if TYPE_CHECKING:  # imported where it starts: zeroconf is not loaded by nodes without discovery
    from ..discovery import Discovery

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_IMAGE_SIDE = 1 << 14
"""Largest camera image side a peer may name for a tile's pixels (16384 px, past any camera):
the pixel rectangle is computed from it before the pixels are checked."""


@dataclass(frozen=True)
class RuntimeLimits:
    """Timeouts (seconds) of the runtime itself; transport limits live in :class:`Limits`."""

    lease: float = 30.0
    """A holder may keep a task this long before it is handed out again (a hung thief). Far
    above a tile's compute time on a Pi (~1 s) and a tail's (~10 s)."""
    steal_timeout: float = 2.0
    """Wait this long for a victim's answer before trying another victim."""
    strips_timeout: float = 2.0
    """Wait this long for reuse strips before running the tile's full variant instead."""
    gateway_wait: float = 60.0
    """A source waiting for a gateway says so this often (it waits as long as it takes)."""
    pending_results: int = 2
    """Results a node may have computed but not yet delivered to the gateway. The compute slot
    goes on with its next task while a result uploads (over Wi-Fi a tile's output and strips
    take about as long to send as to compute), and this bounds the memory that can pile up
    behind a slow link."""
    steal_batch: int = 2
    """Tiles a thief gets for one steal request when tasks are short and the victim's queue is
    deep (at least this many per node it knows): the extra ones follow the answer unasked, so
    a busy thief asks half as often, while every other node still finds work to steal."""
    short_task: float = 0.005
    """Tasks that compute in less than this (seconds, on average) are short: for them the
    hand-offs around a task (a steal round trip, the hand-over to the compute thread and back,
    0.2-0.8 ms) are a visible share, so nodes take them two at a time (``steal_batch``, and a
    second task queued behind the first). Longer tasks go one at a time: a second one would
    only wait, its lease ageing into a straggler's, while another node could run it (measured
    on 0.2-core emulated Pis: more speculative copies, fewer frames/s at 3 and 4 nodes)."""
    straggler_min: float = 0.25
    """An idle node copies a task only once its lease is this old (and twice the typical task
    time): below that, a copy would mostly duplicate work that is about to arrive."""


@dataclass
class NodeConfig:
    """Everything a node is told on its command line."""

    node_id: str
    host: str = "0.0.0.0"
    port: int = 0
    gateway: bool = False
    standby: bool = False  # may take over as gateway when the gateway dies
    sources: list[FrameSource] = field(default_factory=list)
    grid: tuple[int, int] = (5, 5)
    layers: int | None = None
    scheme: str = "quad"  # "none" = no reuse
    frames: int | None = None  # per source; None = unbounded
    fps: float | None = None
    max_inflight: int = 4  # frames per source in flight (back-pressure)
    deadline: float | None = None  # seconds per frame; None: never drop anything
    slots: int = 1  # tasks computed at once; 0: this node computes nothing (a camera-only source)
    null_compute: bool = False  # benchmarks only: tasks "run" without kernels (runtime overhead)
    max_memory: int = 0  # bytes offered for tasks; 0 = unlimited
    policy: str = "steal"
    speculate: bool = True  # idle nodes run copies of stragglers (first result wins)
    out: str | None = None
    discovery: bool = True
    loopback: bool = False
    interfaces: list[str] | None = None
    peers: list[tuple[str, int]] = field(default_factory=list)
    thresh: float = 0.24
    nms: float = 0.45
    limits: Limits = DEFAULT_LIMITS
    runtime: RuntimeLimits = field(default_factory=RuntimeLimits)
    secret: bytes | None = field(default=None, repr=False)  # never in repr or logs
    authenticate_frames: bool = False


@dataclass
class Peer:
    node_id: str
    comm: Comm
    role: str
    max_memory: int
    dialer: str = ""  # node id of the side that opened the connection
    answering: int = 0  # its requests being answered in the background
    load: PeerLoad = field(default_factory=lambda: PeerLoad(0, 0))

    @property
    def is_gateway(self) -> bool:
        return self.role == "gateway"


@dataclass
class Job:
    """A task in hand: where its data is and who must hear of its lease."""

    ref: TaskRef
    plan_key: str
    data: np.ndarray | None  # frame (or frame region) for a tile, fused output for a tail
    img_w: int
    img_h: int
    victim: str  # node id whose queue leased it (ourselves for local work)
    partial: bool = False  # the input is only the reuse variant's region: no full fallback in hand
    # or, instead of ``data``, the camera pixels that network-input rectangle ``region`` is
    # letterboxed from, their top-left pixel at ``pixel_origin`` (y, x) of the image
    pixels: np.ndarray | None = None
    pixel_origin: tuple[int, int] = (0, 0)
    region: tuple[int, int, int, int] = (0, 0, 0, 0)
    holders: dict[str, list[int]] | None = None  # who holds the strips it consumes, when known
    strips: dict[int, np.ndarray] | None = None  # strips it consumes that came with its grant


@dataclass
class Stats:
    tiles_run: int = 0
    tails_run: int = 0
    stolen: int = 0
    steal_failures: int = 0
    busy_seconds: float = 0.0
    reuse_fallbacks: int = 0
    small_grants: int = 0  # reuse tiles granted with only their reuse variant's frame region
    pixel_grants: int = 0  # tiles granted as camera pixels (uint8) rather than float32 input
    region_refetches: int = 0  # reuse tiles shipped small whose strips were gone (full region fetched)
    strips_served: int = 0  # strip fetches this node answered from the strips it produced
    strips_granted: int = 0  # grants that carried reuse strips this node holds (no fetch needed)
    batch_grants: int = 0  # tiles sent unasked after a steal's answer (a deep queue, steal_batch)
    paired: int = 0  # tasks queued to the compute thread right behind another one
    speculative: int = 0
    duplicates_dropped: int = 0
    frames_done: int = 0
    requeued: int = 0
    takeovers: int = 0
    frames_resent: int = 0
    frames_dropped: int = 0
    frames_partial: int = 0
    task_errors: int = 0


def plan_key(grid: tuple[int, int], layers: int, scheme: str) -> str:
    return f"{grid[0]}x{grid[1]}:{layers}:{scheme}"


def parse_plan_key(key: str) -> tuple[tuple[int, int], int, str]:
    try:
        grid, layers, scheme = key.split(":")
        rows, cols = grid.split("x")
        return (int(rows), int(cols)), int(layers), scheme
    except ValueError:
        raise ProtocolError(f"bad plan key {key!r}") from None


class Node:
    """One stealer node. Use ``async with Node(...)`` or :meth:`start` / :meth:`close`.

    Parameters
    ----------
    net : Network
        The model (every node of a cluster holds the same one; checked by hash at the handshake).
    config : NodeConfig
    on_result : callable, optional
        Gateway only: called with each released result dict, in frame order per source.
    """

    def __init__(self, net: Network, config: NodeConfig,
                 on_result: Callable[[dict[str, Any]], None] | None = None,
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.net = net
        self.cfg = config
        self.id = config.node_id
        self.on_result = on_result
        self.on_event = on_event  # milestones for operators and benchmarks (first task, takeover)
        self.first_task_at: float | None = None
        self.layers = config.layers or min(16, _fusable(net))
        self._own_plan_key = plan_key(config.grid, self.layers, config.scheme)  # this node's frames' plan
        # who is the gateway, elections and takeovers: decided by the pure membership machine
        self.membership = MembershipState(
            self.id, "gateway" if config.gateway else ("standby" if config.standby else "worker"))
        self.peers: dict[str, Peer] = {}
        self.queue = WorkQueue(self.id, config.runtime.lease, max_attempts=config.limits.max_task_attempts)
        self._source: SourceState | None = None  # made with this node's plan (see source)
        self.stats = Stats()
        # released results for an in-process reader, bounded: the oldest unread go first
        self.results: asyncio.Queue[dict[str, Any]] = asyncio.Queue(config.limits.max_unread_results)
        self._plans: dict[str, Plan] = {}
        self._pool = ComputePool(config.slots, name=f"compute-{self.id[:6]}")
        self._tasks: set[asyncio.Task[Any]] = set()
        self._work = asyncio.Event()
        self._gateway_seen = asyncio.Event()
        self._stopping = asyncio.Event()
        self._request_ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._assigned: list[Job] = []  # tasks pushed to this node (policy "share")
        self._status_dirty = False
        self._last_status: tuple[int, int, int] | None = None
        self._server: Server | None = None
        self._discovery: Discovery | None = None
        self._connecting: set[str] = set()
        self._lease_timer: asyncio.TimerHandle | None = None
        self._null_cache: dict[tuple[str, int], tuple[np.ndarray, dict[int, np.ndarray]]] = {}
        self._frame_freed = asyncio.Event()
        self._sources_done = asyncio.Event()
        # gateway state: decisions in the pure role machine, timers here
        self.gateway = GatewayState(self.id, self._plan, limits=config.limits, max_image_side=MAX_IMAGE_SIDE)
        self._deadline_timers: dict[tuple[str, int], asyncio.TimerHandle] = {}
        # reuse strips this node produced, served to dependent tiles peer to peer; the gateway
        # keeps only where each frame's strips are
        self._held = StripCache(max_bytes=config.limits.reuse_cache_bytes)
        self._key = ClusterKey.of(config.secret)  # derived once (scrypt), not per connection
        self._out_file = open(config.out, "a", buffering=1) if (config.out and config.gateway) else None
        self._closed = False
        self._tail_ok: bool | None = None
        self._draining = False
        self._running = 0  # tasks in hand: computing, or computed and not yet delivered
        self._idle_changed = asyncio.Event()
        self._delivery_slots = asyncio.Semaphore(config.runtime.pending_results)
        self._handlers = self._handler_table()
        self.worker = WorkerPolicy(config.policy, config.speculate, config.runtime.short_task,
                                   config.runtime.steal_batch)

    # ------------------------------------------------------------------ lifecycle
    @property
    def port(self) -> int:
        return self._server.port if self._server is not None else self.cfg.port

    def hello(self) -> Hello:
        return Hello(PROTOCOL_VERSION, self.id, self.role, self.port, max(1, self.cfg.slots),
                     self.net.model_hash, self.cfg.max_memory)

    async def start(self) -> "Node":
        # compile or load every kernel and build this node's own plan before joining: both hold
        # the GIL for a while, which would otherwise stall heartbeats once peers are connected
        await self._pool.run(self.net.warm_up)
        await self._pool.run(self._plan, self._own_plan_key)
        self._server = serve(self.cfg.host, self.cfg.port, self._on_comm, self.hello,
                             limits=self.cfg.limits, secret=self._key,
                             authenticate_frames=self.cfg.authenticate_frames)
        await self._server.start()
        self._event({"event": "starting", "time": time.time(), "node_id": self.id, "port": self.port})
        log.info("node %s (%s) listening on port %d, model %s, plan %s", self.id[:8], self.role,
                 self.port, self.net.model_hash, self._own_plan_key)
        if self.is_gateway:
            self._gateway_seen.set()
        # compute and sources first: peers found while our own mDNS announcement is still being
        # probed (about 1.5 s) can already be dialled and stolen from
        for slot in range(self.cfg.slots):
            self._spawn(self._compute_loop(slot), f"compute {slot}")
        if self.cfg.sources:
            self._spawn(self._run_sources(), "sources")
        else:
            self._sources_done.set()
        for host, port in self.cfg.peers:
            self._spawn(self._connect(host, port, None), f"connect {host}:{port}")
        if self.cfg.discovery:
            from ..discovery import Discovery

            self._discovery = Discovery(self.id, self.port, role=self.role, cores=max(1, self.cfg.slots),
                                        model_hash=self.net.model_hash, on_event=self._on_discovery,
                                        interfaces=self.cfg.interfaces, loopback=self.cfg.loopback,
                                        limits=self.cfg.limits)
            await self._discovery.start()
        return self

    async def close(self) -> None:
        """Stop: finish the task in hand, say goodbye, release everything (safe twice)."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        self._work.set()
        if self._lease_timer is not None:
            self._lease_timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for peer in list(self.peers.values()):
            with contextlib.suppress(CommClosedError):
                await peer.comm.close("node stopping")
        if self._discovery is not None:
            await self._discovery.close()
        if self._server is not None:
            await self._server.close()
        self._pool.shutdown(wait=True)
        if self._out_file is not None:
            self._out_file.close()

    async def __aenter__(self) -> "Node":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _spawn(self, coro: Any, what: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=what)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    async def drain(self, timeout: float) -> bool:
        """Stop taking new frames and new steals, and wait (at most ``timeout`` seconds) until
        every frame this node started is finished and no task is in hand. Tasks still leased to
        this node when it closes come back to their owners when the connection drops."""
        self._draining = True
        self._work.set()
        try:
            await asyncio.wait_for(self._drained(), timeout)
            return True
        except asyncio.TimeoutError:
            log.warning("drain: %d frame(s) and %d task(s) still open after %.1f s",
                        len(self.source.frames), self._running, timeout)
            return False

    async def _drained(self) -> None:
        while self.source.frames or self._running:
            self._idle_changed.clear()
            await self._idle_changed.wait()

    async def wait_sources_done(self) -> None:
        """Until every source has produced its frames and seen all of them finished."""
        await self._sources_done.wait()

    # ------------------------------------------------------------------ peers
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
        log.info("peer %s (%s) connected", peer.node_id[:8], peer.role)
        self._event({"event": "peer-joined", "time": time.time(), "peer": peer.node_id, "role": peer.role})
        try:
            await comm.send(Status(*self._queued()))
            self._carry_out_membership(self.membership.peer_joined(peer.node_id, peer.role))
            while True:
                msg = await comm.recv()
                try:
                    await self._dispatch(peer, msg)
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

    def _peer_lost(self, peer: Peer) -> None:
        self._event({"event": "peer-lost", "time": time.time(), "peer": peer.node_id, "role": peer.role})
        requeued = self.queue.peer_lost(peer.node_id)
        if requeued:
            self.stats.requeued += len(requeued)
            log.warning("peer %s left holding %d task(s); queued them again", peer.node_id[:8], len(requeued))
            self._work_changed()
        self._give_up_failed("its holders were lost")
        if self.is_gateway:
            self._carry_out(self.gateway.source_lost(peer.node_id))
        if peer.node_id == self.gateway_id:
            self._gateway_seen.clear()
        self._carry_out_membership(self.membership.peer_lost(peer.node_id))

    # ------------------------------------------------------------------ gateway takeover
    @property
    def role(self) -> str:
        return self.membership.role

    @property
    def gateway_id(self) -> str | None:
        return self.membership.gateway_id

    @property
    def epoch(self) -> int:
        return self.membership.epoch

    @property
    def is_gateway(self) -> bool:
        return self.membership.is_gateway

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
                self._announce(self.source.gateway_changed(act.node))

    @property
    def source(self) -> SourceState:
        """This node's data-source machine (made at first use: it needs this node's plan)."""
        if self._source is None:
            self._source = SourceState(self.queue, self._own_plan_key, self._plan(self._own_plan_key),
                                       self.cfg.deadline or 0.0)
        return self._source

    def _announce(self, actions: list[ToGateway]) -> None:
        """Carry out the source machine's messages to the gateway, now (small messages, never
        waited for): with no gateway they are dropped, and every unfinished frame is announced
        again to the next gateway."""
        for act in actions:
            msg = act.msg
            if self.is_gateway:
                self._handlers[type(msg)](None, msg)
                gateway = self.id
            else:
                gw = self._gateway()
                if gw is None:
                    log.info("%s of frame %d of %s waits for a gateway", msg.op, msg.frame, msg.source)
                    continue
                self._post(gw, msg)
                gateway = gw.node_id
            if not isinstance(msg, FrameDrop):
                self.source.announced((msg.source, msg.frame), gateway)
        self.stats.frames_resent = self.source.resent
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

    def _gateway(self) -> Peer | None:
        return self.peers.get(self.gateway_id) if self.gateway_id else None

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

    # ------------------------------------------------------------------ dispatch
    def _handler_table(self) -> dict[type[Message], Callable[[Peer | None, Any], Awaitable[None] | None]]:
        """Every message a peer may send after the handshake, and the method that handles it
        (``peer`` None: a message this node sends itself)."""
        gw = self.gateway
        return {
            Status: self._on_status,
            StealRequest: self._on_steal_request,
            StealReply: self._on_reply,
            StripsReply: self._on_reply,
            RegionReply: self._on_reply,
            StripsRequest: self._on_strips_request,
            StripsFetch: lambda peer, msg: self._answer(peer, self._serve_strips(msg), msg.op),
            StripsRelease: lambda peer, msg: self._held.drop((msg.source, msg.frame)),
            RegionRequest: lambda peer, msg: self._answer(peer, self._grant_region(msg), msg.op),
            FrameStart: lambda peer, msg: self._as_gateway(peer, msg, gw.frame_start),
            TileDone: lambda peer, msg: self._as_gateway(peer, msg, gw.tile_done),
            TailDone: self._on_tail_done,
            FrameDrop: lambda peer, msg: self._as_gateway(peer, msg, gw.frame_drop),
            FrameFailed: lambda peer, msg: self._as_gateway(peer, msg, gw.frame_failed),
            TileAck: lambda peer, msg: self._from_gateway(peer, msg, self._on_tile_ack),
            TilesIn: lambda peer, msg: self._from_gateway(peer, msg, self._on_tiles_in),
            FrameDone: lambda peer, msg: self._from_gateway(peer, msg, self._source_frame_done),
            TaskFailed: self._on_task_failed,
            GatewayClaim: self._on_gateway_claim,
            Goodbye: self._on_goodbye,
        }

    async def _dispatch(self, peer: Peer | None, msg: Message) -> None:
        """Handle one message; ``peer`` is None for messages a node sends itself."""
        key = getattr(msg, "plan", None)
        if key and key not in self._plans:
            # a plan this node has not built yet (another source's grid): build it off the loop
            if len(self._plans) >= self.cfg.limits.max_plans:
                raise ProtocolError(f"{msg.op} names plan {key!r}: this node keeps {len(self._plans)} "
                                    "plans already (max_plans)")
            try:
                await asyncio.get_running_loop().run_in_executor(None, self._plan, key)
            except PlanError as exc:
                raise ProtocolError(f"{msg.op} names plan {key!r} that this model cannot make: {exc}") from None
        handler = self._handlers.get(type(msg))
        if handler is None:
            raise ProtocolError(f"unexpected message {msg.op!r}")
        pending = handler(peer, msg)
        if pending is not None:
            await pending

    def _answer(self, peer: Peer | None, reply: Message | None, what: str) -> Awaitable[None] | None:
        """Answer a request; a request this node sent itself (no peer) needs no answer."""
        return None if peer is None else self._respond(peer, reply, what)

    def _from_gateway(self, peer: Peer | None, msg: Message, handle: Callable[[Any], None]) -> None:
        """Acks and frame ends count only from the gateway this node follows (or itself)."""
        sender = peer.node_id if peer is not None else self.id
        if sender != self.gateway_id:
            log.warning("%s from %s ignored: it is not the gateway (%s)", msg.op, sender[:8],
                        (self.gateway_id or "none")[:8])
            return
        handle(msg)

    def _on_status(self, peer: Peer | None, msg: Status) -> None:
        if peer is not None:
            peer.load = PeerLoad(msg.queued_tiles, msg.queued_tails, peer.comm.rtt or 0.0, True, msg.leased)
            if msg.queued_tiles or msg.queued_tails or msg.leased:
                self._work.set()

    async def _on_steal_request(self, peer: Peer | None, msg: StealRequest) -> None:
        assert peer is not None
        reply = self._grant(peer, msg)
        await self._respond(peer, reply, msg.op)
        if reply is not None and reply.granted and not msg.speculative:
            for _ in range(self.cfg.runtime.steal_batch - 1):
                await self._respond(peer, self._extra_grant(peer), msg.op)

    def _on_reply(self, peer: Peer | None, msg: StealReply | StripsReply | RegionReply) -> None:
        if isinstance(msg, StealReply) and msg.request_id == 0 and msg.granted and peer is not None:
            # a task sent without being asked: pushed by a source (policy "share"), or the
            # extra tiles of a steal from a deep queue
            job = self._job_or_report(msg, peer)
            if job is not None:
                self._assigned.append(job)
                self.stats.stolen += self.cfg.policy == "steal"
                self._work.set()
            return
        fut = self._pending.pop(msg.request_id, None)
        if fut is not None and not fut.done():
            fut.set_result(msg)
        elif isinstance(msg, StealReply) and msg.granted and peer is not None:
            # A grant that arrived after we gave up: hand it back by letting its lease lapse
            # would delay the frame; run it instead (the steal is still valid).
            job = self._job_or_report(msg, peer)
            if job is not None:
                self._spawn(self._run_job(job), "late grant")

    async def _on_strips_request(self, peer: Peer | None, msg: StripsRequest) -> None:
        assert peer is not None
        if self.is_gateway:
            await self._respond(peer, self._gw_strips(msg), msg.op)
        else:  # not the gateway (any more): nothing known here, the tile falls back to full
            await self._respond(peer, StripsReply(msg.request_id, False), msg.op)

    def _on_tail_done(self, peer: Peer | None, msg: TailDone) -> None:
        if self.is_gateway:
            self.queue.done(TaskRef(msg.source, msg.frame, TAIL))
            self._leases_changed()
        self._as_gateway(peer, msg, self.gateway.tail_done)

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

    def _job_or_report(self, reply: StealReply, peer: Peer) -> Job | None:
        """The job of a grant, or None if the grant is malformed: the victim hears of it (the
        task's attempt counts at once) and this slot goes on."""
        try:
            return self._job_from_grant(reply, peer.node_id)
        except ProtocolError as exc:
            log.warning("grant of %s/%d/%d from %s is malformed: %s", reply.source[:8], reply.frame, reply.task,
                        peer.node_id[:8], exc)
            self.stats.task_errors += 1
            with contextlib.suppress(ValueError):
                self._post(peer, TaskFailed(reply.source, reply.frame, reply.task, f"malformed grant: {exc}"))
            return None

    def _report_failure(self, job: Job, reason: str) -> None:
        """A task in hand failed: its owner counts the attempt now (not when the lease ends)."""
        if job.victim == self.id:
            self.stats.requeued += len(self.queue.fail(job.ref))
            self._give_up_failed(reason)
            self._work_changed()
            return
        peer = self.peers.get(job.victim)
        if peer is not None:
            with contextlib.suppress(ValueError):
                self._post(peer, TaskFailed(job.ref.source, job.ref.frame, job.ref.task, reason[:500]))

    def _on_gateway_claim(self, peer: Peer | None, msg: GatewayClaim) -> None:
        if peer is not None:
            self._follow_gateway(peer, msg.epoch)

    def _on_goodbye(self, peer: Peer | None, msg: Goodbye) -> None:
        raise CommClosedError(f"peer said goodbye: {msg.reason}")

    def _on_tiles_in(self, msg: TilesIn) -> None:
        if self.source.tiles_in(msg):
            self._work_changed()

    def _on_tile_ack(self, msg: TileAck) -> None:
        self.source.tile_ack(msg, time.monotonic())
        self._work_changed()

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

    # ------------------------------------------------------------------ queue status
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
        if not status_worth_sending(self._last_status, status):
            return
        self._last_status = status
        for peer in list(self.peers.values()):
            self._post(peer, Status(*status))

    def _post(self, peer: Peer, msg: Message) -> None:
        """Post a small message; a closed connection is its read loop's business."""
        with contextlib.suppress(CommClosedError):
            peer.comm.post(msg)

    def _notify(self, node_id: str, msg: TileAck | TilesIn | FrameDone) -> None:
        """Tell a source (this node or a peer) that a tile or a frame is done, without waiting."""
        if node_id == self.id:
            if isinstance(msg, TileAck):
                self._on_tile_ack(msg)
            elif isinstance(msg, TilesIn):
                self._on_tiles_in(msg)
            else:
                self._source_frame_done(msg)
            return
        peer = self.peers.get(node_id)
        if peer is None:
            log.info("cannot send %s to %s: not connected", msg.op, node_id[:8])
            return
        self._post(peer, msg)

    async def _send_quietly(self, peer: Peer, msg: Message) -> None:
        with contextlib.suppress(CommClosedError):
            await peer.comm.send(msg)

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
            log.warning("%d lease(s) ran out; queued again", len(late))
        self._give_up_failed("its lease ran out")
        self._work_changed()

    # ------------------------------------------------------------------ compute
    def _accepts_tails(self) -> bool:
        if self._tail_ok is None:  # computed once: the plan's accounting is not free
            tile, tail = memory_needs(self.net, self._plan(self._own_plan_key))
            self._tail_ok = self.cfg.max_memory == 0 or self.cfg.max_memory >= tile + tail
        return self._tail_ok

    async def _compute_loop(self, slot: int) -> None:
        prefetch: asyncio.Task[Job | None] | None = None
        try:
            while not self._stopping.is_set():
                job = None
                if prefetch is not None:
                    job = await prefetch
                    prefetch = None
                if job is None:
                    job = self._take_local()
                if job is None and self._may_steal():
                    job = await self._steal()
                if job is None:
                    self._work.clear()
                    if self._take_possible():
                        # try again, but let the loop run first: a stale peer status must never
                        # turn this into a busy loop that starves the connections
                        await asyncio.sleep(0)
                        continue
                    await self._work.wait()
                    continue
                second = self._take_second()
                if second is None and self._should_prefetch():
                    # overlap communication with compute: fetch the next task's data while this
                    # one runs (on Wi-Fi a tile's input takes a good fraction of its compute time)
                    prefetch = asyncio.get_running_loop().create_task(self._steal(), name="prefetch")
                if second is None:
                    await self._run_job(job)
                else:
                    self.stats.paired += 1
                    await asyncio.gather(self._run_job(job), self._run_job(second))
        finally:
            if prefetch is not None:
                prefetch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    job = await prefetch
                    if job is not None:  # stolen but never run: its lease brings it back
                        log.info("dropping prefetched %s at stop", job.ref)

    def _take_second(self) -> Job | None:
        """A task to run right behind the one in hand, when there is plenty of work: a tile a
        victim sent with the last steal, or one of this node's own from a deep queue. Its input
        is ready and it waits in the compute thread's queue, so the thread goes on to it at once
        instead of waiting for the event loop to hand it over (each hand-over costs the loop a
        wake-up and the thread the GIL: 0.8 ms measured with three busy nodes in one process)."""
        if not self._short_tasks():
            return None
        if self._assigned:
            return self._assigned.pop(0)
        if not self.worker.deep_queue(self.queue.queued_tiles, len(self.peers)):
            return None
        return self._take_local()

    def _loads(self) -> dict[str, PeerLoad]:
        return {pid: p.load for pid, p in self.peers.items()}

    def _short_tasks(self) -> bool:
        return self.worker.short_tasks(self.stats.tiles_run + self.stats.tails_run, self.stats.busy_seconds,
                                       self.queue.typical.get(False))

    def _may_steal(self) -> bool:
        return self.worker.may_steal(self._draining)

    def _should_prefetch(self) -> bool:
        return self.worker.should_prefetch(draining=self._draining, queued_here=len(self.queue),
                                           assigned=len(self._assigned), loads=self._loads())

    def _take_possible(self) -> bool:
        return self.worker.take_possible(draining=self._draining, assigned=len(self._assigned),
                                         queued=len(self.queue), queued_tails=self.queue.queued_tails,
                                         accepts_tails=self._accepts_tails(), loads=self._loads())

    def _take_local(self) -> Job | None:
        if self._assigned:
            return self._assigned.pop(0)
        now = time.monotonic()
        ref = self.queue.take(self.id, now, accept_tail=self._accepts_tails(), ready=self._ready,
                              prefer=self._near(self.id))
        if ref is None and self.cfg.speculate and not self._draining and self.queue.outstanding(self.id):
            # own queue empty but tasks are out with others: copy a straggler, if one is late
            ref = self.queue.speculate(self.id, now, min_age=self.cfg.runtime.straggler_min,
                                       accept_tail=self._accepts_tails())
            if ref is None:
                asyncio.get_running_loop().call_later(self.cfg.runtime.straggler_min, self._work.set)
                return None
            self.stats.speculative += 1
        if ref is None:
            return None
        self._work_changed()
        return self._local_job(ref)

    def _ready(self, ref: TaskRef) -> bool:
        return self.source.ready(ref)

    def _near(self, node_id: str) -> Callable[[TaskRef], bool]:
        return self.source.near(node_id, self.id)

    def _local_job(self, ref: TaskRef) -> Job | None:
        """The job of a task taken from this node's queue; None if its frame is gone meanwhile
        (the task is then forgotten)."""
        key = (ref.source, ref.frame)
        if ref.is_tail:
            tail = self.gateway.tail_input(key) if self.is_gateway else None
            if tail is None:
                self.queue.done(ref)
                return None
            plan, data, img_w, img_h = tail
            return Job(ref, plan, data, img_w, img_h, self.id)
        sf = self.source.frames.get(key)
        if sf is None:
            self.queue.done(ref)
            return None
        return Job(ref, self._own_plan_key, sf.frame.data, sf.frame.img_w, sf.frame.img_h, self.id,
                   holders=self.source.holders_of(key, ref.task))

    async def _steal(self) -> Job | None:
        tried: set[str] = set()
        while not self._stopping.is_set():
            loads = {pid: p.load for pid, p in self.peers.items()}
            victim = choose_victim(loads, want_tails=self._accepts_tails(), tile_seconds=1.0,
                                   tail_seconds=12.0, exclude=tried)
            speculative = False
            if victim is None:
                victim = self.worker.straggler_victim(loads, tried)
                speculative = victim is not None
            if victim is None:
                return None
            tried.add(victim)
            peer = self.peers.get(victim)
            if peer is None:
                continue
            rid = next(self._request_ids)
            fut: asyncio.Future[StealReply] = asyncio.get_running_loop().create_future()
            self._pending[rid] = fut
            try:
                peer.comm.post(StealRequest(rid, self._accepts_tails(), speculative))
                reply = await _reply_within(fut, self.cfg.runtime.steal_timeout)
            except (CommClosedError, asyncio.TimeoutError):
                self._pending.pop(rid, None)
                self.stats.steal_failures += 1
                continue
            if reply.granted:
                job = self._job_or_report(reply, peer)
                if job is None:
                    continue
                self.stats.stolen += 1
                self.stats.speculative += int(speculative)
                return job
            self.stats.steal_failures += 1
            peer.load = PeerLoad(0, 0, peer.load.rtt, True, 0 if speculative else peer.load.leased)
            if speculative:
                # nothing old enough yet: look again once a lease could have become a straggler
                asyncio.get_running_loop().call_later(self.cfg.runtime.straggler_min, self._work.set)
        return None

    def _job_from_grant(self, reply: StealReply, victim: str) -> Job:
        job = Job(TaskRef(reply.source, reply.frame, reply.task), reply.plan, reply.data,
                  reply.img_w, reply.img_h, victim)
        if reply.task != TAIL:
            try:
                full = self._plan(reply.plan).task(reply.task).full.input_region
            except (KeyError, IndexError, PlanError):
                raise ProtocolError(f"grant of unknown task {reply.task} of plan {reply.plan!r}") from None
            self._take_tile_input(job, reply)
            job.partial = job.region != tuple(full)
            if reply.holders or reply.strips_meta:
                job.holders = reply.holders
                job.strips = unpack_strips(reply.strips_meta, reply.strips) if reply.strips_meta else None
        return job

    def _take_tile_input(self, job: Job, msg: StealReply | RegionReply) -> None:
        """Put a tile's input from a grant (or region reply) into the job, checking that pixels
        are exactly the rectangle the network-input region is made from before any use."""
        _, h, w = self.net.input_shape
        if len(msg.region) != 4 or not (0 <= msg.region[0] <= msg.region[1] <= h
                                        and 0 <= msg.region[2] <= msg.region[3] <= w):
            raise ProtocolError(f"tile region {msg.region!r} outside the {h}x{w} input")
        region = (msg.region[0], msg.region[1], msg.region[2], msg.region[3])
        job.region, job.data, job.pixels = region, msg.data, None
        if msg.pixels is None:
            return
        if not (0 < job.img_w <= MAX_IMAGE_SIDE and 0 < job.img_h <= MAX_IMAGE_SIDE):
            raise ProtocolError(f"image size {job.img_w}x{job.img_h} out of range")
        py0, py1, px0, px1 = pixel_rect(region, job.img_w, job.img_h, w, h)
        want = (self.net.input_shape[0], py1 - py0, px1 - px0)
        if (msg.pixels.dtype != np.uint8 or msg.pixels.shape != want
                or list(msg.pixel_origin) != [py0, px0]):
            raise ProtocolError(f"pixels {msg.pixels.dtype} {msg.pixels.shape} at {msg.pixel_origin} "
                                f"are not the {want} uint8 at {[py0, px0]} that region {list(region)} needs")
        job.pixels, job.pixel_origin = msg.pixels, (py0, px0)

    def _input_payload(self, frame: Frame, rect: tuple[int, int, int, int]
                       ) -> tuple[np.ndarray | None, np.ndarray | None, list[int]]:
        """A network-input rectangle of one of this node's frames as it travels: the camera
        pixels it is made from when the frame has them (a quarter of the bytes), else float32."""
        if frame.pixels is None:
            y0, y1, x0, x1 = rect
            return np.ascontiguousarray(frame.data[:, y0:y1, x0:x1]), None, []
        _, h, w = self.net.input_shape
        py0, py1, px0, px1 = pixel_rect(rect, frame.img_w, frame.img_h, w, h)
        return None, np.ascontiguousarray(frame.pixels[:, py0:py1, px0:px1]), [py0, px0]

    def _grant(self, peer: Peer, req: StealRequest) -> StealReply | None:
        """A thief asks: lease it the first task it can run, with that task's input data."""
        if self.peers.get(peer.node_id) is not peer:
            return None  # it left while the request waited: no lease
        if self.cfg.policy != "steal":
            return StealReply(req.request_id, False)
        accept_tail = req.accept_tail
        now = time.monotonic()
        ref = self.queue.take(peer.node_id, now, accept_tail=accept_tail, ready=self._ready,
                              prefer=self._near(peer.node_id))
        if ref is None and req.speculative and self.cfg.speculate:
            ref = self.queue.speculate(peer.node_id, now, min_age=self.cfg.runtime.straggler_min,
                                       accept_tail=accept_tail)
        if ref is None:
            return StealReply(req.request_id, False)
        self._work_changed()
        # if it is not delivered, the lease brings it back
        return self._grant_for(ref, req.request_id) or StealReply(req.request_id, False)

    def _extra_grant(self, peer: Peer) -> StealReply | None:
        """Another tile for a thief that just got one, if the queue is deep enough that every
        other node still finds work here (``steal_batch`` per node)."""
        if not self._short_tasks() or not self.worker.deep_queue(self.queue.queued_tiles, len(self.peers)):
            return None
        ref = self.queue.take(peer.node_id, time.monotonic(), accept_tail=False, ready=self._ready,
                              prefer=self._near(peer.node_id))
        if ref is None:
            return None
        self._work_changed()
        self.stats.batch_grants += 1
        return self._grant_for(ref, 0)

    def _grant_for(self, ref: TaskRef, request_id: int) -> StealReply | None:
        """A task leased to a peer, with the data it needs: for a tile, the input region the
        source machine chooses (:meth:`SourceState.grant_input`) and the strips this node holds
        of those it consumes; for a tail, the fused output."""
        job = self._local_job(ref)
        if job is None:
            return None
        if ref.is_tail:
            return StealReply(request_id, True, ref.source, ref.frame, ref.task, job.plan_key, [],
                              job.img_w, job.img_h, job.data)
        region, holders = self.source.grant_input(ref)
        self.stats.small_grants += region != self.source.plan.task(ref.task).full.input_region
        data, pixels, origin = self._input_payload(self.source.frames[(ref.source, ref.frame)].frame, region)
        self.stats.pixel_grants += pixels is not None
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
                          list(region), job.img_w, job.img_h, data, pixels, origin, holders, meta, packed)

    def _grant_region(self, req: RegionRequest) -> RegionReply:
        """A thief's reuse strips are gone: send it the task's full region after all."""
        sf = self.source.frames.get((req.source, req.frame))
        if sf is None:
            return RegionReply(req.request_id, False)
        try:
            task = self._plan(self._own_plan_key).task(req.task)
        except (KeyError, IndexError, PlanError):
            raise ProtocolError(f"region of unknown task {req.task}") from None
        data, pixels, origin = self._input_payload(sf.frame, task.full.input_region)
        return RegionReply(req.request_id, True, list(task.full.input_region), data, pixels, origin)

    async def _share(self, refs: list[TaskRef]) -> None:
        """Policy "share" (the baseline of MoDNN and DeepThings' comparison): hand a frame's tiles
        out round-robin over every known node, idle or not, when the frame arrives."""
        members = [self.id, *sorted(self.peers)]
        for i, ref in enumerate(refs):
            target = members[i % len(members)]
            if target == self.id or target not in self.peers:
                continue
            if not self.queue.take_ref(ref, target, time.monotonic()):
                continue  # this node's own slot took it already
            grant = self._grant_for(ref, 0)
            if grant is None:
                continue
            try:
                await self.peers[target].comm.send(grant)
            except CommClosedError:
                pass  # requeued when the connection is declared lost
        self._work_changed()

    def _plan(self, key: str) -> Plan:
        plan = self._plans.get(key)
        if plan is None:
            grid, layers, scheme = parse_plan_key(key)
            plan = make_plan(self.net, grid, layers, scheme=scheme)
            self._plans[key] = plan
        return plan

    async def _run_job(self, job: Job) -> None:
        if self.first_task_at is None:
            self.first_task_at = time.time()
            self._event({"event": "first-task", "time": self.first_task_at, "stolen": job.victim != self.id})
        self._running += 1
        try:
            await self._run_job_inner(job)
        finally:
            self._running -= 1
            self._idle_changed.set()

    async def _run_job_inner(self, job: Job) -> None:
        try:
            msg: TileDone | TailDone
            if job.ref.is_tail:
                msg = await self._compute(self._compute_tail, job)
                self.stats.tails_run += 1
            else:
                borrowed = await self._fetch_strips(job)
                if borrowed is None and job.partial and not await self._fetch_full_region(job):
                    return
                msg, published = await self._compute(self._compute_tile, job, borrowed)
                for sid, arr in published.items():  # kept here, on the loop: the cache is not thread-safe
                    # a copy if it is a view, so a held strip never pins a whole layer buffer
                    self._held.put((job.ref.source, job.ref.frame), sid, arr if arr.base is None else arr.copy())
                self.stats.tiles_run += 1
        except StealerError as exc:
            log.error("task %s failed: %s", job.ref, exc)
            self.stats.task_errors += 1
            self._report_failure(job, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - a task boundary: one bad task must not stop this slot
            log.exception("task %s failed; its owner queues it again", job.ref)
            self.stats.task_errors += 1
            self._report_failure(job, f"{type(exc).__name__}: {exc}")
            return
        gw = None if self.is_gateway else self._gateway()
        if gw is not None and _array_bytes(msg) < _POST_DATA_BYTES:
            try:  # a small result is written at once: no task, no wait
                gw.comm.post(msg)
                return
            except CommClosedError:
                pass  # the slow path below waits for the next gateway
        # deliver in the background so that this slot computes its next task meanwhile; the
        # slot waits only when pending_results are already on their way
        await self._delivery_slots.acquire()
        self._running += 1
        self._spawn(self._deliver(job.ref, msg), "deliver")

    async def _compute(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a compute thread; its time there counts as this node's busy seconds
        (not the time it waited in the thread's queue behind the task before it)."""
        value, seconds = await self._pool.run(_timed, fn, *args)
        self.stats.busy_seconds += seconds
        return value

    async def _deliver(self, ref: TaskRef, msg: Message) -> None:
        try:
            await self._to_gateway(msg)
        except (CommClosedError, asyncio.TimeoutError) as exc:
            log.warning("result of %s not delivered (%s); its lease will bring it back", ref, exc)
        finally:
            self._delivery_slots.release()
            self._running -= 1
            self._idle_changed.set()

    async def _fetch_strips(self, job: Job) -> dict[int, np.ndarray] | None:
        plan = self._plan(job.plan_key)
        task = plan.task(job.ref.task)
        if task.reuse is None or not task.consumes:
            return None
        key = (job.ref.source, job.ref.frame)
        holders: dict[str, list[int]] | None = job.holders
        if holders is not None:
            # from the source's acks; checked, since they came over the wire: asking a node
            # for strips the tile does not consume would fill the tile with wrong data
            listed = [s for ids in holders.values() for s in ids] + list(job.strips or ())
            if sorted(listed) != sorted(task.consumes):
                raise ProtocolError(f"{job.ref}: holders {holders} and strips {sorted(job.strips or ())} "
                                    f"do not list strips {list(task.consumes)}")
        elif self.is_gateway:
            holders = self.gateway.strip_locations(key, task.consumes)
        else:
            gw = self._gateway()
            if gw is not None:
                reply = await self._request(gw, lambda rid: StripsRequest(rid, job.ref.source, job.ref.frame,
                                                                          job.ref.task, job.plan_key))
                if isinstance(reply, StripsReply) and reply.found:
                    holders = reply.holders
        got = await self._collect_strips(key, task.consumes, holders, job.strips) if holders is not None else None
        if got is None:
            self.stats.reuse_fallbacks += 1
        return got

    async def _request(self, peer: Peer, make: Any, timeout: float | None = None) -> Message | None:
        """Send ``make(request_id)`` to ``peer`` and wait for the reply with that id (None if the
        peer is gone or slower than ``timeout``, by default ``strips_timeout``)."""
        rid = next(self._request_ids)
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            peer.comm.post(make(rid))
            return await _reply_within(fut, self.cfg.runtime.strips_timeout if timeout is None else timeout)
        except (CommClosedError, asyncio.TimeoutError):
            self._pending.pop(rid, None)
            return None

    async def _collect_strips(self, key: tuple[str, int], wanted: tuple[int, ...], holders: dict[str, list[int]],
                              given: dict[int, np.ndarray] | None = None) -> dict[int, np.ndarray] | None:
        """Fetch a dependent tile's strips from the nodes that produced them, all at once (those
        ``given`` with its grant and those this node holds need no message); None if any is
        missing (a holder left, or evicted them), and the tile runs its full variant."""
        async def from_node(node_id: str, ids: list[int]) -> dict[int, np.ndarray] | None:
            if node_id == self.id:
                return self._held.get(key, ids)
            peer = self.peers.get(node_id)
            if peer is None:
                return None
            reply = await self._request(peer, lambda rid: StripsFetch(rid, key[0], key[1], ids))
            if not isinstance(reply, StripsReply) or not reply.found:
                log.info("strips %s of frame %d of %s: %s", ids, key[1], key[0][:8],
                         "not held by " + node_id[:8] if reply is not None else "no answer from " + node_id[:8])
                return None
            return unpack_strips(reply.meta, reply.data)

        got: dict[int, np.ndarray] = dict(given or {})
        remote = []
        for node_id, ids in holders.items():
            if node_id == self.id:
                mine = self._held.get(key, ids)
                if mine is None:
                    return None
                got.update(mine)
            else:
                remote.append((node_id, ids))
        if len(remote) == 1:
            parts = [await from_node(*remote[0])]
        else:
            parts = await asyncio.gather(*(from_node(n, ids) for n, ids in remote))
        for part in parts:
            if part is None:
                return None
            got.update(part)
        return got if all(s in got for s in wanted) else None

    def _serve_strips(self, msg: StripsFetch) -> StripsReply:
        got = self._held.get((msg.source, msg.frame), msg.strips)
        if got is None:
            return StripsReply(msg.request_id, False)
        meta, data = pack_strips(got)
        self.stats.strips_served += 1
        return StripsReply(msg.request_id, True, meta, data)

    async def _fetch_full_region(self, job: Job) -> bool:
        """The strips of a task shipped with only its reuse region are gone: ask its owner for
        the full region. False if that fails (the owner left, or finished the frame: either way
        nothing waits for this task any more, or its lease brings it back)."""
        peer = self.peers.get(job.victim)
        reply = None
        if peer is not None:
            reply = await self._request(peer, lambda rid: RegionRequest(rid, job.ref.source, job.ref.frame,
                                                                        job.ref.task), self.cfg.runtime.steal_timeout)
        if not isinstance(reply, RegionReply) or not reply.found or (reply.data is None and reply.pixels is None):
            log.warning("%s: reuse strips gone and no full region from its owner; dropped here", job.ref)
            return False
        self._take_tile_input(job, reply)
        job.partial = False
        self.stats.region_refetches += 1
        return True

    def _compute_tile(self, job: Job, borrowed: dict[int, np.ndarray] | None
                      ) -> tuple[TileDone, dict[int, np.ndarray]]:
        """The tile's result for the gateway, and the strips it published (kept by this node)."""
        plan = self._plan(job.plan_key)
        t0 = time.perf_counter()
        if self.cfg.null_compute:  # zeros of the right shapes, so that data moves as in a real run
            zeros, published = self._null_outputs(plan, job.plan_key, job.ref.task)
            return TileDone(job.ref.source, job.ref.frame, job.ref.task, job.plan_key, "null", zeros,
                            sorted(published)), published
        data = job.data
        if job.pixels is not None:  # back to the network input, bit for bit (in this worker thread)
            _, h, w = self.net.input_shape
            data = letterbox_region(job.pixels, job.pixel_origin, job.img_w, job.img_h, w, h, job.region)
        if data is None:
            raise ProtocolError(f"{job.ref}: a tile without input data")
        res = run_task(self.net, plan, job.ref.task, data, borrowed, check=False)
        return TileDone(job.ref.source, job.ref.frame, job.ref.task, job.plan_key, res.variant, res.output,
                        sorted(res.published), time.perf_counter() - t0), res.published

    def _null_outputs(self, plan: Plan, key: str, task_id: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """Null compute's result of a tile: read-only zeros, made once per task (the benchmark
        measures the runtime, so its stand-in for the kernels should cost next to nothing)."""
        got = self._null_cache.get((key, task_id))
        if got is None:
            task = plan.task(task_id)
            y0, y1, x0, x1 = task.output
            zeros = np.zeros((plan.output_shape[0], y1 - y0, x1 - x0), np.float32)
            published = {sid: np.zeros((plan.windows[plan.strips[sid].layer].out_shape[0],
                                        height(plan.strips[sid].region), width(plan.strips[sid].region)), np.float32)
                         for sid in task.produces}
            for arr in (zeros, *published.values()):
                arr.flags.writeable = False
            got = self._null_cache[(key, task_id)] = (zeros, published)
        return got[0], dict(got[1])

    def _compute_tail(self, job: Job) -> TailDone:
        t0 = time.perf_counter()
        if self.cfg.null_compute:
            return TailDone(job.ref.source, job.ref.frame, "0" * 64)
        _, layers, _ = parse_plan_key(job.plan_key)
        out = self.net.forward(np.asarray(job.data, np.float32), start=layers)
        digest = hashlib.sha256(np.ascontiguousarray(out).tobytes()).hexdigest()
        dets: list[dict[str, Any]] = []
        last = self.net.layers[-1]
        if isinstance(last, RegionSpec):
            shape = self.net.input_shape
            dets = [d.to_dict() for d in detect(out, last, img_w=job.img_w, img_h=job.img_h,
                                                net_w=shape[2], net_h=shape[1],
                                                thresh=self.cfg.thresh, nms=self.cfg.nms)]
        return TailDone(job.ref.source, job.ref.frame, digest, dets, time.perf_counter() - t0)

    # ------------------------------------------------------------------ source
    async def _run_sources(self) -> None:
        try:
            await asyncio.gather(*(self._run_source(i, src) for i, src in enumerate(self.cfg.sources)))
        finally:
            self._sources_done.set()

    async def _run_source(self, index: int, src: FrameSource) -> None:
        source_id = f"{self.id}/{index}"
        loop = asyncio.get_running_loop()
        frames = src.frames(self.net.input_shape)
        source = self.source
        source.inflight[source_id] = 0
        period = 1.0 / self.cfg.fps if self.cfg.fps else 0.0
        next_at = loop.time()
        count = 0
        try:
            while (self.cfg.frames is None or count < self.cfg.frames) and not self._draining:
                while self.cfg.deadline is None and source.inflight[source_id] >= self.cfg.max_inflight:
                    self._frame_freed.clear()
                    await self._frame_freed.wait()
                frame = await loop.run_in_executor(None, next, frames, None)
                if frame is None:
                    break
                count += 1
                if self.cfg.deadline is not None and source.inflight[source_id] >= self.cfg.max_inflight:
                    # overload in deadline mode: drop the oldest frame nothing has started on (or
                    # this new one), rather than queueing without bound
                    dropped = source.drop_oldest_unstarted(source_id)
                    self.stats.frames_dropped += 1
                    number = dropped[1] if dropped is not None else frame.number
                    log.info("deadline mode: dropped frame %d of %s (overload)", number, source_id)
                    self._announce([ToGateway(FrameDrop(source_id, number))])
                    if dropped is None:
                        continue
                refs = [TaskRef(source_id, frame.number, t.id) for t in source.plan.tasks]
                self._announce(source.new_frame(source_id, frame, time.monotonic()))
                # kept and queued already: it is announced to the first gateway that appears
                await self._wait_for_gateway()
                if self.cfg.policy == "share":
                    await self._share(refs)
                if period:
                    next_at += period
                    await asyncio.sleep(max(0.0, next_at - loop.time()))
            while source.inflight[source_id] > 0:
                self._frame_freed.clear()
                await self._frame_freed.wait()
        finally:
            src.close()

    async def _wait_for_gateway(self) -> None:
        """Sources wait for a gateway as long as it takes, saying so now and then."""
        while not self._gateway_seen.is_set():
            try:
                await asyncio.wait_for(self._gateway_seen.wait(), self.cfg.runtime.gateway_wait)
            except asyncio.TimeoutError:
                log.warning("no gateway for %.0f s; frames wait", self.cfg.runtime.gateway_wait)

    def _source_frame_done(self, msg: FrameDone) -> None:
        if not self.source.frame_done(msg):
            return
        self._frame_freed.set()
        self._idle_changed.set()
        self._work_changed()

    # ------------------------------------------------------------------ gateway
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
                self.queue.add([act.ref], front=True)
                work = True
            elif isinstance(act, gw_role.DropTail):
                work |= self.queue.done(act.ref)
            elif isinstance(act, gw_role.ReleaseStrips):
                if act.node == self.id:
                    self._held.drop(act.key)
                elif act.node in self.peers:
                    self._post(self.peers[act.node], StripsRelease(*act.key))
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

    def _gw_strips(self, msg: StripsRequest) -> StripsReply:
        plan = self._plan(msg.plan)
        try:
            task = plan.task(msg.task)
        except (KeyError, IndexError, PlanError):
            raise ProtocolError(f"strips for unknown task {msg.task}") from None
        holders = self.gateway.strip_locations((msg.source, msg.frame), task.consumes)
        return StripsReply(msg.request_id, holders is not None, holders=holders or {})

    def _emit_result(self, res: dict[str, Any]) -> None:
        self.stats.frames_done += 1
        if self._out_file is not None:
            self._out_file.write(json.dumps(res) + "\n")
        if self.results.full():  # nobody reads them in-process: the oldest unread go
            self.results.get_nowait()
        self.results.put_nowait(res)
        if self.on_result is not None:
            self.on_result(res)


_POST_DATA_BYTES = 48 << 10  # answers with less array data than this are posted (see Comm.post)


def _array_bytes(msg: Message) -> int:
    return sum(getattr(msg, f).nbytes for f in ("data", "pixels", "strips", "output")
               if getattr(msg, f, None) is not None)


def _timed(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    t0 = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - t0


def _expire_reply(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(asyncio.TimeoutError())


async def _reply_within(fut: asyncio.Future[T], timeout: float) -> T:
    """``await asyncio.wait_for(fut, timeout)`` for a reply future that only the receive loop
    sets, without wait_for's extra future and callbacks (this runs for every steal and strip
    fetch)."""
    handle = asyncio.get_running_loop().call_later(timeout, _expire_reply, fut)
    try:
        return await fut
    finally:
        handle.cancel()


def memory_needs(net: Network, plan: Plan) -> tuple[int, int]:
    """Bytes a node needs to run tiles (fused weights + the largest task's working set) and, on
    top of that, to run tails too (the remaining layers' weights + a generous activation bound:
    a layer's input and output, a routed map, and the fused map the tail starts from)."""
    tile = plan.weight_bytes + plan.totals(reuse=True).max_working_set
    rest = net.layers[plan.n_layers:]
    weights = 4 * sum(l.n_params for l in rest)
    acts = [4 * int(np.prod(l.out_shape)) for l in rest] or [0]
    fused_out = 4 * int(np.prod(plan.output_shape))
    return tile, weights + 3 * max(acts) + fused_out


def _fusable(net: Network) -> int:
    from ..ftp.plan import fusable_prefix

    return fusable_prefix(net.spec)


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


def default_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 0
