"""The listening side of the wire: :class:`Server`, its admission control, :func:`serve`.

A :class:`Server` accepts TCP connections, wraps each in a :class:`~stealer.wire.comm.Comm`,
runs the server half of the handshake (:func:`~stealer.wire.handshake.server_handshake`;
rejections and failed proofs come back here to be counted and logged) and hands the comm
to a callback, each connection in its own tracked task. It lives apart from the comm
because it is the one place that decides whom to let in, and a comm (which both sides
use) needs none of that.

The server bounds what strangers can make it hold: ``max_connections`` in total and
``max_connections_per_ip`` per remote address (refused with a Reject), the handshake
deadline (slow-loris), the handshake frame cap (an unauthenticated 200 MB length prefix
is refused without reading), and big bodies grow only as their bytes arrive. Repeated
events from one address are logged at WARNING once, then at DEBUG; every one is counted
in :attr:`Server.stats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

from stealer.config import DEFAULT_LIMITS, Limits
from stealer.errors import CommClosedError, ProtocolError
from stealer.wire.auth import ClusterKey, warn_if_open
from stealer.wire.comm import Comm
from stealer.wire.handshake import CheckPeer, server_handshake
from stealer.wire.messages import Hello, Reject

__all__ = ["Server", "ServerStats", "serve"]

logger = logging.getLogger(__name__)

OnComm = Callable[[Comm], Awaitable[None]]
HelloFactory = Callable[[], Hello]

_MAX_LOG_KEYS: Final = 4096
"""Most (event, address) pairs remembered to log each only once; past it the memory is
cleared (so a flood from many addresses cannot grow it) and they may be logged again."""


@dataclass(slots=True)
class ServerStats:
    """What a :class:`Server` has turned away (and let in) since it started."""

    accepted: int = 0
    """Connections that passed the handshake."""
    refused_full: int = 0
    """Refused at ``max_connections``."""
    refused_per_ip: int = 0
    """Refused at ``max_connections_per_ip``."""
    handshake_timeouts: int = 0
    """Dropped at ``handshake_timeout`` (slow-loris, silent clients)."""
    handshake_errors: int = 0
    """Garbage, oversized or truncated handshake frames, or closed mid-handshake."""
    auth_failures: int = 0
    """Failed the secret challenge (dropped before any other message was read)."""
    rejected: int = 0
    """Refused on purpose: version, model hash, secret/frame-MAC settings, ``check_peer``."""
    protocol_errors: int = 0
    """Connections closed after the handshake because of an undecodable frame."""


class _LogOnce:
    """Log an event at WARNING the first time per (kind, address), later at DEBUG."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], int] = {}

    def __call__(self, kind: str, address: str, msg: str, *args: object) -> None:
        k = (kind, address)
        if k not in self._seen and len(self._seen) >= _MAX_LOG_KEYS:
            self._seen.clear()
        n = self._seen[k] = self._seen.get(k, 0) + 1
        if n == 1:
            logger.warning(msg, *args)
        else:
            logger.debug(msg + " (%d times from %s)", *args, n, address)


class Server:
    """A listening socket that handshakes each connection and hands it to a callback.

    Made by :func:`serve`; use as ``async with serve(...) as server:``. Each accepted
    connection runs in its own tracked task: handshake (within
    ``limits.handshake_timeout``), then ``await on_comm(comm)``, then ``comm.close()``.
    A failing handler is logged and never stops the server.

    Attributes
    ----------
    host : str
    port : int
        The bound port (useful with port 0), valid after start.
    stats : ServerStats
        Counters of accepted and turned-away connections.
    """

    def __init__(
        self,
        host: str,
        port: int,
        on_comm: OnComm,
        hello_factory: HelloFactory,
        *,
        limits: Limits = DEFAULT_LIMITS,
        heartbeat: bool = True,
        check_peer: CheckPeer | None = None,
        secret: bytes | ClusterKey | None = None,
        authenticate_frames: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.limits = limits
        self._on_comm = on_comm
        self._hello_factory = hello_factory
        self._heartbeat = heartbeat
        self._check_peer = check_peer
        self._key = ClusterKey.of(secret)
        if authenticate_frames and self._key is None:
            raise ValueError("authenticate_frames needs a cluster secret")
        self._frame_mac = authenticate_frames
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._conns: set[Comm] = set()
        self._live: set[Comm] = set()
        self._per_ip: dict[str, int] = {}
        self._log_once = _LogOnce()
        self.stats = ServerStats()
        self._closing = False
        self._closed = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Server {self.host}:{self.port} conns={len(self._conns)}>"

    @property
    def comms(self) -> frozenset[Comm]:
        """Connections that passed the handshake and are being handled now."""
        return frozenset(self._live)

    @property
    def connections(self) -> int:
        """Connections held now, handshaking or live."""
        return len(self._conns)

    async def start(self) -> Self:
        """Bind and start accepting.

        Returns
        -------
        Server
            ``self``, with ``port`` set to the bound port.
        """
        if self._server is not None:
            return self
        warn_if_open(self._key)
        self._server = await asyncio.start_server(self._on_connect, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info(
            "listening on %s:%s (%s)", self.host, self.port,
            "open cluster" if self._key is None else
            "cluster secret, frame MACs" if self._frame_mac else "cluster secret",
        )
        return self

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback: the connection's task is ours, tracked until done (asyncio's
        # own task for a coroutine callback is untracked before 3.12 and logs an error
        # when cancelled).
        comm = Comm(reader, writer, limits=self.limits)
        task = asyncio.get_running_loop().create_task(self._handle(comm), name=f"serve {comm.name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s: connection task failed", self, exc_info=task.exception())

    async def _refuse(self, comm: Comm, reason: str) -> None:
        with contextlib.suppress(CommClosedError, TimeoutError):
            async with asyncio.timeout(self.limits.close_timeout):
                await comm.send(Reject(reason))
        await comm.close(reason)

    async def _handle(self, comm: Comm) -> None:
        if self._closing:
            comm.abort("server closing")
            return
        ip = comm.peer_address[0] if comm.peer_address else "?"
        if len(self._conns) >= self.limits.max_connections:
            self.stats.refused_full += 1
            self._log_once(
                "full", ip, "refusing %s: %d connections (max_connections)", comm.name,
                len(self._conns),
            )
            await self._refuse(comm, f"server full ({len(self._conns)} connections)")
            return
        if self._per_ip.get(ip, 0) >= self.limits.max_connections_per_ip:
            self.stats.refused_per_ip += 1
            self._log_once(
                "per-ip", ip, "refusing %s: %d connections from %s (max_connections_per_ip)",
                comm.name, self._per_ip[ip], ip,
            )
            await self._refuse(comm, f"too many connections from {ip}")
            return
        self._conns.add(comm)
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        try:
            try:
                async with asyncio.timeout(self.limits.handshake_timeout):
                    accepted = await self._handshake(comm, ip)
            except TimeoutError:
                self.stats.handshake_timeouts += 1
                self._log_once(
                    "timeout", ip, "%s: no handshake within %.2f s, dropping", comm.name,
                    self.limits.handshake_timeout,
                )
                return
            except (CommClosedError, ProtocolError) as e:
                self.stats.handshake_errors += 1
                self._log_once("handshake", ip, "%s: handshake failed: %s", comm.name, e)
                return
            if not accepted:
                return
            comm._set_established()
            self.stats.accepted += 1
            if self._heartbeat:
                comm.start_heartbeat()
            self._live.add(comm)
            try:
                await self._on_comm(comm)
            except CommClosedError as e:
                logger.info("%s: connection closed: %s", comm, e)
            except ProtocolError as e:
                self.stats.protocol_errors += 1
                logger.warning("%s: protocol error: %s", comm, e)
            except Exception:
                # Task boundary: a bug in one handler must not stop the server.
                logger.exception("%s: connection handler failed", comm)
        finally:
            self._live.discard(comm)
            self._conns.discard(comm)
            left = self._per_ip.get(ip, 1) - 1
            if left > 0:
                self._per_ip[ip] = left
            else:
                self._per_ip.pop(ip, None)
            await comm.close("server done with connection")

    async def _reject(self, comm: Comm, ip: str, reason: str, who: str = "") -> bool:
        self.stats.rejected += 1
        self._log_once("reject", ip, "rejecting %s%s: %s", comm.name, who, reason)
        await comm.send(Reject(reason))
        return False

    async def _handshake(self, comm: Comm, ip: str) -> bool:
        return await server_handshake(
            comm, ip, self._hello_factory(), key=self._key, frame_mac=self._frame_mac,
            check_peer=self._check_peer, reject=self._reject, auth_failed=self._auth_failed,
        )

    def _auth_failed(self, comm: Comm, ip: str, why: str) -> None:
        self.stats.auth_failures += 1
        self._log_once("auth", ip, "%s: authentication failed: %s", comm.name, why)

    async def close(self) -> None:
        """Stop listening, close every connection, wait for handlers; safe twice."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            if self._server is not None:
                self._server.close()
            # gather cancels these close() calls if our own close() is cancelled.
            await asyncio.gather(*(c.close("server shutting down") for c in list(self._conns)))
            tasks = [t for t in self._tasks if t is not asyncio.current_task()]
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=self.limits.close_timeout)
                for t in pending:
                    t.cancel()
                if pending:
                    await asyncio.wait(pending)
            if self._server is not None:
                await self._server.wait_closed()
        finally:
            self._closed.set()
            logger.info("stopped listening on %s:%s", self.host, self.port)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def serve(
    host: str,
    port: int,
    on_comm: OnComm,
    hello_factory: HelloFactory,
    *,
    limits: Limits = DEFAULT_LIMITS,
    heartbeat: bool = True,
    check_peer: CheckPeer | None = None,
    secret: bytes | ClusterKey | None = None,
    authenticate_frames: bool = False,
) -> Server:
    """Create a server; start it with ``async with`` (or ``await server.start()``).

    Parameters
    ----------
    host, port
        Where to listen (port 0 picks a free port, see ``Server.port``).
    on_comm
        ``async def on_comm(comm)``, called for each connection that passed the
        handshake; the comm is closed when it returns.
    hello_factory
        Returns this node's identity; called per connection (so it may read
        ``server.port``). Its ``version`` and ``model_hash`` are what peers must match.
    limits
        Timeouts and sizes (handshake timeout, max connections, per-IP connections, ...).
    heartbeat
        Start :meth:`Comm.start_heartbeat` on each accepted comm.
    check_peer
        Optional extra check of a peer's Hello; returns a rejection reason or None.
        Called only for peers that proved the secret (when there is one).
    secret
        The cluster secret (or a :class:`~stealer.wire.auth.ClusterKey`); None for an open
        cluster (a warning is logged once per process).
    authenticate_frames
        Put a MAC on every frame; needs ``secret``; peers must use the same setting.

    Returns
    -------
    Server
        Not yet listening.

    Raises
    ------
    ValueError
        ``authenticate_frames`` without a secret, or a secret that is too short.
    """
    return Server(
        host, port, on_comm, hello_factory, limits=limits, heartbeat=heartbeat,
        check_peer=check_peer, secret=secret, authenticate_frames=authenticate_frames,
    )
