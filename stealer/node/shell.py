""":class:`Node`: the node's lifecycle (start, close, drain), its tasks, and the one table of
message handlers every message is dispatched through. The handlers and the actions they carry
out live in the parts it combines (see :mod:`stealer.node`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import Any, Awaitable, Callable

from ..errors import CommClosedError, PlanError, ProtocolError
from ..ftp.auto import candidate_plans
from ..wire import Hello, serve
from ..wire.messages import (
    PROTOCOL_VERSION,
    FrameDone,
    FrameDrop,
    FrameFailed,
    FrameGo,
    FrameStart,
    FrameUnknown,
    FrameWait,
    GatewayClaim,
    Goodbye,
    Message,
    Preview,
    RegionReply,
    RegionRequest,
    ShardAssign,
    ShardReady,
    ShardResult,
    ShardTask,
    StealReply,
    StealRequest,
    Status,
    StripsFetch,
    StripsRelease,
    OutputsFetch,
    OutputsMissing,
    OutputsRelease,
    TilesRedo,
    StripsReply,
    StripsRequest,
    TailDone,
    TaskFailed,
    TaskStarted,
    TileAck,
    TilesIn,
    TileDone,
)
from .config import Peer
from .peers import Peers
from .source import Source
from .victim import Victim
from .thief import Thief
from .gateway import GatewayShell
from .kernels import Kernels
from .shards import ShardShell

log = logging.getLogger("stealer.node")  # one logger for the whole shell, as before the split


class Node(Peers, Source, Victim, Thief, GatewayShell, Kernels, ShardShell):
    """One stealer node. Use ``async with Node(...)`` or :meth:`start` / :meth:`close`.

    Parameters
    ----------
    net : Network
        The model (every node of a cluster holds the same one; checked by hash at the handshake).
    config : NodeConfig
    on_result : callable, optional
        Gateway only: called with each released result dict, in frame order per source.

    Its attributes are set in :class:`NodeState`; its methods come from the parts it combines
    (mixins, one per file of :mod:`stealer.node`), with lifecycle and dispatch here.
    """

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
        if self.cfg.grid_auto:
            self._auto_candidates = await self._pool.run(candidate_plans, self.net.spec, self.layers)
            self._replan()
        await self._pool.run(self._plan, self._own_plan_key)
        try:
            await self._start_outputs()
        except BaseException:
            await self._close_outputs()
            raise
        self._server = serve(self.cfg.host, self.cfg.port, self._on_comm, self.hello,
                             limits=self.cfg.limits, secret=self._key,
                             authenticate_frames=self.cfg.authenticate_frames)
        await self._server.start()
        self._event({"event": "starting", "time": time.time(), "node_id": self.id, "port": self.port})
        log.info("node %s (%s) listening on port %d, model %s, plan %s", self.id[:8], self.role,
                 self.port, self.net.model_hash, self._own_plan_key)
        if self.is_gateway:
            self._gateway_seen.set()
            self._shards_changed()  # --shards: the placement grace starts
        # compute and sources first: peers found while our own mDNS announcement is still being
        # probed (about 1.5 s) can already be dialled and stolen from
        for slot in range(self.cfg.slots):
            self._spawn(self._compute_loop(slot), f"compute {slot}")
        self._spawn(self._report_loop(), "report")
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

    async def _start_outputs(self) -> None:
        """--metrics, --http, --mjpeg, --video-out, --mqtt (a port in use fails the start)."""
        cfg = self.cfg
        shared = cfg.http is not None and cfg.http == cfg.metrics and cfg.http[1] != 0
        if cfg.metrics is not None and not shared:  # first: a port in use fails the start with nothing else open
            from ..metrics import start_metrics

            self.metrics = await start_metrics(self)
        from ..dashboard.frames import frame_store_for

        self.frames = frame_store_for(cfg, self.net)
        outputs = cfg.gateway or cfg.standby  # as --mqtt: only a (future) gateway has results
        if cfg.video is not None and outputs and self.frames is not None:
            from ..outputs.video import VideoOut

            self.video = VideoOut(cfg.video, cfg.limits)  # ConfigError without OpenCV
            self.video.start()
            self.frames.listen(self.video.add)
        mjpeg = None
        if cfg.mjpeg is not None and outputs and self.frames is not None:
            from ..dashboard import dashboard_token
            from ..outputs.mjpeg import MjpegServer

            mjpeg = MjpegServer(self.frames, cfg.limits, dashboard_token(self._key) if self._key is not None else None)
            self.mjpeg = mjpeg
        mjpeg_shared = mjpeg is not None and cfg.mjpeg == cfg.http and cfg.mjpeg is not None and cfg.mjpeg[1] != 0
        if cfg.http is not None:
            from ..dashboard.server import start_dashboard

            if shared:  # one port for both: the dashboard's server serves /metrics
                from ..metrics import NodeMetrics

                self.metrics = NodeMetrics(self)
            routes = (lambda router: mjpeg.add_routes(router, "/mjpeg")) if mjpeg is not None and mjpeg_shared else None
            self.dashboard = await start_dashboard(self, self.metrics if shared else None, routes)
        if mjpeg is not None and not mjpeg_shared:
            from ..metrics import metrics_host

            assert cfg.mjpeg is not None
            await mjpeg.start(metrics_host(cfg.mjpeg[0], cfg.host, cfg.secret is not None), cfg.mjpeg[1])
        if cfg.mqtt is not None and outputs:
            from ..outputs.mqtt import MqttPublisher

            self.mqtt = MqttPublisher(cfg.mqtt, self.id, cfg.limits)
            self.mqtt.start()  # a broker that is down is retried in the background, never fatal

    async def _close_outputs(self) -> None:
        """Close what :meth:`_start_outputs` opened (safe twice): the streams, the dashboard,
        the frames (their drawings in progress), then the video files, finalized."""
        for out in (self.mjpeg, self.dashboard, self.frames, self.video, self.metrics):
            if out is not None:
                await out.close()
        if self.mqtt is not None:  # after the tasks: every result released by now is accounted for
            await self.mqtt.close()

    async def close(self) -> None:
        """Stop: finish the task in hand, say goodbye, release everything (safe twice)."""
        if self._closed:
            return
        self._closed = True
        # every connection's teardown below reports its peer lost: a node that is leaving must
        # not take over as gateway from the one it is leaving
        self.membership.close()
        self._stopping.set()
        self._work.set()
        if self._lease_timer is not None:
            self._lease_timer.cancel()
        # taken before the tasks go: a connection this node dialed is served by one of them,
        # whose end removes its peer, and a comm nobody closes stays up (its peer would go on
        # seeing this node alive)
        peers = list(self.peers.values())
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for peer in peers:
            with contextlib.suppress(CommClosedError):
                await peer.comm.close("node stopping")
        if self._discovery is not None:
            await self._discovery.close()
        if self._server is not None:
            await self._server.close()
        await self._close_outputs()
        self._close_shards()
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
        except asyncio.TimeoutError:
            log.warning("drain: %d frame(s) and %d task(s) still open after %.1f s",
                        len(self.source.frames), self._running, timeout)
            return False
        if self.video is not None and self.frames is not None:  # the last previews, into the files
            wait = min(timeout, self.cfg.limits.video_flush_timeout)
            if not await self.frames.settle(wait):
                log.warning("drain: --video-out: no preview of the last results of %s after %.1f s",
                            ", ".join(self.frames.behind()), wait)
        return True

    async def _drained(self) -> None:
        while self.source.frames or self._running or self._preview_out:
            self._idle_changed.clear()
            await self._idle_changed.wait()

    async def wait_sources_done(self) -> None:
        """Until every source has produced its frames and seen all of them finished."""
        await self._sources_done.wait()

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
            OutputsFetch: lambda peer, msg: self._answer(peer, self._serve_outputs(msg), msg.op),
            OutputsRelease: lambda peer, msg: self._kept.drop((msg.source, msg.frame)),
            OutputsMissing: self._on_outputs_missing,
            TilesRedo: lambda peer, msg: self._from_gateway(peer, msg, self._on_tiles_redo),
            RegionRequest: self._on_region_request,
            FrameStart: lambda peer, msg: self._as_gateway(peer, msg, gw.frame_start),
            TileDone: lambda peer, msg: self._as_gateway(peer, msg, gw.tile_done),
            TailDone: self._on_tail_done,
            FrameDrop: lambda peer, msg: self._as_gateway(peer, msg, gw.frame_drop),
            FrameFailed: lambda peer, msg: self._as_gateway(peer, msg, gw.frame_failed),
            TileAck: lambda peer, msg: self._from_gateway(peer, msg, self._on_tile_ack),
            TilesIn: lambda peer, msg: self._from_gateway(peer, msg, self._on_tiles_in),
            FrameDone: lambda peer, msg: self._from_gateway(peer, msg, self._source_frame_done),
            FrameWait: lambda peer, msg: self._from_gateway(peer, msg, self._on_frame_wait),
            FrameGo: lambda peer, msg: self._from_gateway(peer, msg, self._on_frame_go),
            FrameUnknown: lambda peer, msg: self._from_gateway(peer, msg, self._on_frame_unknown),
            TaskFailed: self._on_task_failed,
            TaskStarted: self._on_task_started,
            GatewayClaim: self._on_gateway_claim,
            Goodbye: self._on_goodbye,
            Preview: self._on_preview,
            ShardAssign: lambda peer, msg: self._from_gateway(peer, msg, lambda m: self._on_shard_assign(peer, m)),
            ShardReady: self._on_shard_ready,
            ShardTask: self._on_shard_task,
            ShardResult: self._on_shard_result,
        }

    async def _dispatch(self, peer: Peer | None, msg: Message) -> None:
        """Handle one message; ``peer`` is None for messages a node sends itself."""
        pending = self._dispatch_now(peer, msg)
        if pending is not None:
            await pending

    def _dispatch_now(self, peer: Peer | None, msg: Message) -> Awaitable[None] | None:
        """Handle one message as far as it goes without waiting; returns what is left to await
        (None for most messages: a receive loop then makes no coroutine per message)."""
        key = getattr(msg, "plan", None)
        if key and key not in self._plans:
            return self._dispatch_new_plan(peer, msg, key)
        handler = self._handlers.get(type(msg))
        if handler is None:
            raise ProtocolError(f"unexpected message {msg.op!r}")
        return handler(peer, msg)

    async def _dispatch_new_plan(self, peer: Peer | None, msg: Message, key: str) -> None:
        """A message naming a plan this node has not built yet (another source's grid): build it
        off the loop, then handle the message."""
        if len(self._plans) >= self.cfg.limits.max_plans:
            raise ProtocolError(f"{msg.op} names plan {key!r}: this node keeps {len(self._plans)} "
                                "plans already (max_plans)")
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._plan, key)
        except PlanError as exc:
            raise ProtocolError(f"{msg.op} names plan {key!r} that this model cannot make: {exc}") from None
        pending = self._dispatch_now(peer, msg)
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


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
