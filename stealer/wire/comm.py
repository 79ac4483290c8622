"""One persistent TCP connection per peer: :class:`Comm`, :func:`connect`, :func:`serve`.

This is the edge where the outside world's failures become ours, exactly once:

* socket errors (``ConnectionError``, ``IncompleteReadError``, ``OSError``) become
  :class:`~stealer.errors.CommClosedError` (or :class:`~stealer.errors.PeerDeadError`
  when the heartbeat gave up on the peer);
* undecodable bytes become :class:`~stealer.errors.ProtocolError`, and the connection is
  aborted, because after a bad frame nobody knows where the next one starts;
* a ``recv`` cancelled in the middle of a frame aborts the connection for the same
  reason (cancelled while waiting for the *next* frame is harmless).

A connection starts with a handshake: the client sends :class:`Hello`; the server checks
the protocol version and model hash and answers :class:`Welcome` or :class:`Reject` (with
a reason, also logged) within ``Limits.handshake_timeout``. Liveness comes from TCP
traffic: :meth:`Comm.start_heartbeat` pings an idle link every
``Limits.heartbeat_interval`` and aborts it when nothing has arrived for
``Limits.peer_dead_after`` while we were reading. ``Ping``/``Pong`` are answered and
consumed inside :meth:`Comm.recv`; callers never see them.

Every task created here is kept in a set until done; ``CancelledError`` is never caught
without being re-raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

from stealer.config import DEFAULT_LIMITS, Limits
from stealer.errors import CommClosedError, HandshakeRejected, PeerDeadError, ProtocolError
from stealer.wire import framing
from stealer.wire.messages import (
    Goodbye,
    Hello,
    Message,
    Ping,
    Pong,
    Reject,
    Welcome,
    decode,
    encode,
)

__all__ = ["Comm", "Server", "connect", "install_event_loop_policy", "run", "serve"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

OnComm = Callable[["Comm"], Awaitable[None]]
HelloFactory = Callable[[], Hello]
CheckPeer = Callable[[Hello], "str | None"]


class Comm:
    """One framed, persistent connection to a peer.

    Normally made by :func:`connect` (client side) or handed to the callback of
    :func:`serve` (server side), with the handshake already done.

    Parameters
    ----------
    reader, writer
        The asyncio stream pair of an open TCP connection.
    limits
        Timeouts and sizes; see :class:`~stealer.config.Limits`.
    name
        Label for logs (defaults to the peer address).

    Attributes
    ----------
    local : Hello or None
        The identity we sent in the handshake (client side).
    peer : Hello or Welcome or None
        The identity the peer sent in the handshake.
    rtt : float or None
        Last measured Ping round trip, in seconds.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        limits: Limits = DEFAULT_LIMITS,
        name: str | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.limits = limits
        self._loop = asyncio.get_running_loop()
        peername = writer.get_extra_info("peername")
        self.peer_address: tuple[str, int] | None = (
            (str(peername[0]), int(peername[1])) if peername else None
        )
        self.name = name or (
            f"{self.peer_address[0]}:{self.peer_address[1]}" if self.peer_address else "?"
        )
        self.local: Hello | None = None
        self.peer: Hello | Welcome | None = None
        self.rtt: float | None = None
        self._send_lock = asyncio.Lock()
        self._recv_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._closed = False
        self._close_started = False
        self._close_reason = ""
        self._close_error: type[CommClosedError] = CommClosedError
        self._finished = asyncio.Event()
        now = self._loop.time()
        self._last_recv = now
        self._last_send = now
        self._reading_since: float | None = None
        self._ping_seq = 0
        self._ping_sent: tuple[int, float] | None = None
        # drain() then waits until the kernel has taken every byte, so a caller may
        # reuse (mutate) the arrays it sent as soon as send() returns: transports
        # (uvloop, asyncio >= 3.12 writelines) keep references to our memoryviews.
        writer.transport.set_write_buffer_limits(high=0)

    def __repr__(self) -> str:
        node = self.peer.node_id[:8] if self.peer is not None else "?"
        state = "closed" if self._closed else "open"
        return f"<Comm {self.name} node={node} {state}>"

    # ---- state ----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the comm was closed or aborted (by us, the peer or the heartbeat)."""
        return self._closed

    @property
    def close_reason(self) -> str:
        """Why the comm closed ("" while open)."""
        return self._close_reason

    def silent_for(self, now: float | None = None) -> float:
        """Seconds the peer has been silent while we were waiting in :meth:`recv`.

        Zero when nobody is reading: data may be waiting in the socket then, so silence
        is only judged while a ``recv`` is pending. Each received chunk of a big frame
        counts as traffic.

        Parameters
        ----------
        now
            Current ``loop.time()``; read from the loop if omitted.

        Returns
        -------
        float
            Seconds, >= 0.
        """
        if self._reading_since is None:
            return 0.0
        if now is None:
            now = self._loop.time()
        return max(0.0, now - max(self._last_recv, self._reading_since))

    def _closed_error(self) -> CommClosedError:
        return self._close_error(f"{self.name}: {self._close_reason or 'closed'}")

    def _mark_closed(
        self, reason: str, *, abort: bool, error: type[CommClosedError] = CommClosedError
    ) -> None:
        """Enter the closed state (idempotent) and close or abort the transport."""
        if not self._closed:
            self._closed = True
            self._close_reason = reason
            self._close_error = error
            current = asyncio.current_task()
            for task in list(self._tasks):
                if task is not current:
                    task.cancel()
        transport = self._writer.transport
        if abort:
            transport.abort()
            if not self._close_started:
                self._finished.set()
        elif not transport.is_closing():
            transport.close()

    def abort(self, reason: str = "aborted") -> None:
        """Close immediately without flushing (RST); safe to call any number of times.

        Pending ``send``/``recv`` calls raise :class:`~stealer.errors.CommClosedError`.

        Parameters
        ----------
        reason
            Recorded in the error raised by later ``send``/``recv`` calls.
        """
        self._mark_closed(reason, abort=True)

    # ---- tasks ----------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, T], what: str) -> asyncio.Task[T]:
        task = self._loop.create_task(coro, name=f"{self.name} {what}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s: task %s failed", self, task.get_name(), exc_info=task.exception())

    async def _send_quietly(self, msg: Message) -> None:
        """Send from a background task; a closed comm is reported by recv, not here."""
        with contextlib.suppress(CommClosedError):
            await self.send(msg)

    # ---- I/O ------------------------------------------------------------------------

    async def send(self, msg: Message) -> None:
        """Send one message; concurrent senders are serialized, frames never interleave.

        Returns once the kernel has accepted the whole frame, so the caller may then
        reuse the arrays it sent.

        Parameters
        ----------
        msg
            A registered message.

        Raises
        ------
        ProtocolError
            If the message cannot be encoded (nothing was written; the comm stays open).
        CommClosedError
            If the connection is or becomes closed.
        """
        header, buffers = encode(msg, self.limits)
        pieces = framing.frame_pieces(header, buffers, self.limits)
        async with self._send_lock:
            if self._closed:
                raise self._closed_error()
            if self._writer.transport.is_closing():
                self._mark_closed("connection closed by peer", abort=True)
                raise self._closed_error()
            try:
                # writelines is synchronous: the whole frame is queued before any await,
                # so cancelling the drain below cannot leave half a frame behind.
                self._writer.writelines(pieces)
                await self._writer.drain()
            except OSError as e:  # ConnectionResetError, BrokenPipeError, ...
                self._mark_closed(f"connection lost while sending: {e!r}", abort=True)
                raise self._closed_error() from e
            self._last_send = self._loop.time()

    def _touch(self) -> None:
        self._last_recv = self._loop.time()

    async def _recv_frame(self) -> Message:
        async with self._recv_lock:
            if self._closed:
                raise self._closed_error()
            self._reading_since = self._loop.time()
            mid_frame = False
            try:
                n = await framing.read_length(self._reader, self.limits)
                mid_frame = True
                self._touch()
                body = await framing.read_body(self._reader, n, self.limits, self._touch)
                mid_frame = False
                self._touch()
                header, buffers = framing.parse_body(body, self.limits)
                return decode(header, buffers, self.limits)
            except ProtocolError as e:
                # Logged by whoever handles the exception (Server logs a warning).
                logger.debug("%s: protocol error, aborting: %s", self, e)
                self._mark_closed(f"protocol error: {e}", abort=True)
                raise
            except asyncio.IncompleteReadError as e:
                why = "connection closed by peer" if not e.partial and not mid_frame else (
                    "connection closed by peer in the middle of a frame"
                )
                self._mark_closed(why, abort=True)
                raise self._closed_error() from e
            except OSError as e:
                self._mark_closed(f"connection lost while receiving: {e!r}", abort=True)
                raise self._closed_error() from e
            except asyncio.CancelledError:
                if mid_frame:
                    self._mark_closed("recv cancelled in the middle of a frame", abort=True)
                raise
            finally:
                self._reading_since = None

    async def recv(self) -> Message:
        """Receive the next message (Ping/Pong are handled here and never returned).

        Returns
        -------
        Message
            The next application message (including Hello/Welcome/Reject during a
            handshake).

        Raises
        ------
        CommClosedError
            The connection closed (the peer said :class:`Goodbye`, the socket failed, or
            we closed it). :class:`~stealer.errors.PeerDeadError` if the heartbeat
            declared the peer dead.
        ProtocolError
            The peer sent bytes that are not a valid message; the comm is aborted.
        """
        while True:
            msg = await self._recv_frame()
            if type(msg) is Ping:
                self._spawn(self._send_quietly(Pong(msg.seq)), "pong")
            elif type(msg) is Pong:
                if self._ping_sent is not None and self._ping_sent[0] == msg.seq:
                    self.rtt = self._loop.time() - self._ping_sent[1]
            elif type(msg) is Goodbye:
                reason = msg.reason or "no reason given"
                logger.debug("%s: peer said goodbye: %s", self, reason)
                self._mark_closed(f"peer said goodbye: {reason}", abort=False)
                raise self._closed_error()
            else:
                return msg

    # ---- heartbeat ------------------------------------------------------------------

    def start_heartbeat(self) -> None:
        """Start pinging and watching the peer (idempotent; stops when the comm closes).

        While the link is idle a :class:`Ping` goes out every ``heartbeat_interval``. If
        nothing arrives for ``peer_dead_after`` while a :meth:`recv` is pending, the comm
        is aborted and that ``recv`` raises :class:`~stealer.errors.PeerDeadError`.
        Someone must be calling :meth:`recv` for Pings to be answered.
        """
        if self._heartbeat_task is None and not self._closed:
            self._heartbeat_task = self._spawn(self._heartbeat(), "heartbeat")

    async def _heartbeat(self) -> None:
        lim = self.limits
        loop = self._loop
        next_ping = loop.time() + lim.heartbeat_interval
        ping_task: asyncio.Task[None] | None = None
        while not self._closed:
            now = loop.time()
            silent = self.silent_for(now)
            if silent >= lim.peer_dead_after:
                logger.warning(
                    "%s: nothing received for %.2f s (peer_dead_after %.2f s), peer is dead",
                    self, silent, lim.peer_dead_after,
                )
                self._mark_closed(
                    f"peer silent for {silent:.2f} s (peer_dead_after {lim.peer_dead_after} s)",
                    abort=True,
                    error=PeerDeadError,
                )
                return
            if now >= next_ping:
                idle = now - self._last_send >= lim.heartbeat_interval
                if idle and (ping_task is None or ping_task.done()):
                    self._ping_seq += 1
                    self._ping_sent = (self._ping_seq, now)
                    ping_task = self._spawn(self._send_quietly(Ping(self._ping_seq)), "ping")
                next_ping = now + lim.heartbeat_interval
            wake = next_ping
            if self._reading_since is not None:
                wake = min(wake, now + lim.peer_dead_after - silent)
            await asyncio.sleep(max(wake - now, 0.0))

    # ---- closing --------------------------------------------------------------------

    async def close(self, reason: str = "closed") -> None:
        """Close gracefully: send :class:`Goodbye`, flush, close; safe to call twice.

        Every step is bounded by ``Limits.close_timeout``; past it the connection is
        aborted. A second call waits for the first to finish.

        Parameters
        ----------
        reason
            Sent to the peer in the Goodbye and recorded locally.
        """
        if self._close_started:
            await self._finished.wait()
            return
        self._close_started = True
        timeout = self.limits.close_timeout
        flushed = False
        try:
            if not self._closed:
                with contextlib.suppress(CommClosedError, TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self.send(Goodbye(reason))
            self._mark_closed(reason, abort=False)
            with contextlib.suppress(OSError):  # TimeoutError is an OSError
                async with asyncio.timeout(timeout):
                    await self._writer.wait_closed()
                flushed = True
            current = asyncio.current_task()
            pending = [t for t in self._tasks if t is not current]
            if pending:
                await asyncio.wait(pending, timeout=timeout)
        finally:
            if not flushed:
                self._mark_closed(reason, abort=True)
            self._finished.set()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


# ---------------------------------------------------------------------------------------
# client
# ---------------------------------------------------------------------------------------


def _backoff(attempt: int, limits: Limits) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(max, base * 2**attempt)]."""
    cap = min(limits.connect_backoff_max, limits.connect_backoff_base * 2.0**attempt)
    return random.uniform(0.0, cap)


async def connect(
    host: str,
    port: int,
    hello: Hello,
    *,
    limits: Limits = DEFAULT_LIMITS,
    heartbeat: bool = True,
) -> Comm:
    """Open a connection to a peer and perform the handshake.

    TCP connection attempts are retried with jittered exponential backoff until one
    overall deadline (``limits.connect_timeout``); the handshake that follows has its own
    ``limits.handshake_timeout`` and is never retried (a rejection is definitive).

    Parameters
    ----------
    host, port
        The peer's listening address.
    hello
        Our identity; its ``version`` and ``model_hash`` must match the peer's.
    limits
        Timeouts and sizes.
    heartbeat
        Start :meth:`Comm.start_heartbeat` once connected.

    Returns
    -------
    Comm
        An open comm whose ``peer`` is the server's :class:`Welcome`.

    Raises
    ------
    CommClosedError
        No connection within the deadline (chained ``from`` the last socket error), or
        the connection dropped or timed out during the handshake.
    HandshakeRejected
        The peer answered :class:`Reject`, or its Welcome does not match us.
    ProtocolError
        The peer answered something that is not a handshake message.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.connect_timeout
    attempt = 0
    last_exc: OSError | None = None
    streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    while streams is None:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise CommClosedError(
                f"could not connect to {host}:{port} within {limits.connect_timeout} s "
                f"({attempt} attempts): {last_exc!r}"
            ) from last_exc
        try:
            async with asyncio.timeout(remaining):
                streams = await asyncio.open_connection(host, port)
        except OSError as e:  # refused, unreachable, DNS failure, TimeoutError
            last_exc = e
            logger.debug("connect to %s:%s attempt %d failed: %r", host, port, attempt + 1, e)
            delay = min(_backoff(attempt, limits), deadline - loop.time())
            attempt += 1
            if delay > 0:
                await asyncio.sleep(delay)

    comm = Comm(*streams, limits=limits, name=f"{host}:{port}")
    try:
        async with asyncio.timeout(limits.handshake_timeout):
            await comm.send(hello)
            comm.local = hello
            reply = await comm.recv()
        match reply:
            case Welcome():
                if reply.version != hello.version or reply.model_hash != hello.model_hash:
                    raise HandshakeRejected(
                        f"{host}:{port} is incompatible: version {reply.version} / model "
                        f"{reply.model_hash!r}, we have {hello.version} / {hello.model_hash!r}"
                    )
                comm.peer = reply
            case Reject(reason=reason):
                logger.warning("%s:%s rejected us: %s", host, port, reason)
                raise HandshakeRejected(f"{host}:{port} rejected us: {reason}")
            case _:
                raise ProtocolError(f"{host}:{port} answered {reply.op!r} to hello")
    except TimeoutError as e:
        comm.abort("handshake timed out")
        raise CommClosedError(
            f"{host}:{port}: no handshake answer within {limits.handshake_timeout} s"
        ) from e
    except BaseException:
        comm.abort("handshake failed")
        raise
    logger.debug("connected to %s (node %s)", comm.name, reply.node_id)
    if heartbeat:
        comm.start_heartbeat()
    return comm


# ---------------------------------------------------------------------------------------
# server
# ---------------------------------------------------------------------------------------


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
    ) -> None:
        self.host = host
        self.port = port
        self.limits = limits
        self._on_comm = on_comm
        self._hello_factory = hello_factory
        self._heartbeat = heartbeat
        self._check_peer = check_peer
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._conns: set[Comm] = set()
        self._live: set[Comm] = set()
        self._closing = False
        self._closed = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Server {self.host}:{self.port} conns={len(self._conns)}>"

    @property
    def comms(self) -> frozenset[Comm]:
        """Connections that passed the handshake and are being handled now."""
        return frozenset(self._live)

    async def start(self) -> Self:
        """Bind and start accepting.

        Returns
        -------
        Server
            ``self``, with ``port`` set to the bound port.
        """
        if self._server is not None:
            return self
        self._server = await asyncio.start_server(self._on_connect, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("listening on %s:%s", self.host, self.port)
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

    async def _handle(self, comm: Comm) -> None:
        if self._closing:
            comm.abort("server closing")
            return
        if len(self._conns) >= self.limits.max_connections:
            logger.warning(
                "refusing %s: %d connections (max_connections)", comm.name, len(self._conns)
            )
            with contextlib.suppress(CommClosedError, TimeoutError):
                async with asyncio.timeout(self.limits.close_timeout):
                    await comm.send(Reject(f"server full ({len(self._conns)} connections)"))
            await comm.close("server full")
            return
        self._conns.add(comm)
        try:
            try:
                async with asyncio.timeout(self.limits.handshake_timeout):
                    accepted = await self._handshake(comm)
            except TimeoutError:
                logger.warning(
                    "%s: no handshake within %.2f s, dropping", comm.name,
                    self.limits.handshake_timeout,
                )
                return
            except (CommClosedError, ProtocolError) as e:
                logger.info("%s: handshake failed: %s", comm.name, e)
                return
            if not accepted:
                return
            if self._heartbeat:
                comm.start_heartbeat()
            self._live.add(comm)
            try:
                await self._on_comm(comm)
            except CommClosedError as e:
                logger.info("%s: connection closed: %s", comm, e)
            except ProtocolError as e:
                logger.warning("%s: protocol error: %s", comm, e)
            except Exception:
                # Task boundary: a bug in one handler must not stop the server.
                logger.exception("%s: connection handler failed", comm)
        finally:
            self._live.discard(comm)
            self._conns.discard(comm)
            await comm.close("server done with connection")

    async def _handshake(self, comm: Comm) -> bool:
        first = await comm.recv()
        if type(first) is not Hello:
            raise ProtocolError(f"expected hello, got {first.op!r}")
        ours = self._hello_factory()
        reason: str | None = None
        if first.version != ours.version:
            reason = (
                f"protocol version mismatch: peer speaks {first.version}, "
                f"this node speaks {ours.version}"
            )
        elif first.model_hash != ours.model_hash:
            reason = (
                f"model hash mismatch: peer has {first.model_hash!r}, "
                f"this node has {ours.model_hash!r}"
            )
        elif first.node_id == ours.node_id:
            reason = "peer has this node's own node_id (connected to itself?)"
        elif self._check_peer is not None:
            reason = self._check_peer(first)
        if reason is not None:
            logger.warning(
                "rejecting %s (node %s, role %s): %s", comm.name, first.node_id, first.role, reason
            )
            await comm.send(Reject(reason))
            return False
        comm.local = ours
        comm.peer = first
        await comm.send(Welcome.of(ours))
        logger.info("accepted %s (node %s, role %s)", comm.name, first.node_id, first.role)
        return True

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
        Timeouts and sizes (handshake timeout, max connections, ...).
    heartbeat
        Start :meth:`Comm.start_heartbeat` on each accepted comm.
    check_peer
        Optional extra check of a peer's Hello; returns a rejection reason or None.

    Returns
    -------
    Server
        Not yet listening.
    """
    return Server(
        host, port, on_comm, hello_factory, limits=limits, heartbeat=heartbeat,
        check_peer=check_peer,
    )


# ---------------------------------------------------------------------------------------
# event loop
# ---------------------------------------------------------------------------------------


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def install_event_loop_policy() -> bool:
    """Make uvloop the default event loop if it is installed.

    Returns
    -------
    bool
        True if uvloop was installed, False if the stdlib loop stays.
    """
    try:
        import uvloop
    except ImportError:
        logger.debug("uvloop not installed; using the asyncio event loop")
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True, debug: bool | None = None) -> T:
    """Run a coroutine to completion on a fresh loop (uvloop when available).

    Parameters
    ----------
    main
        The coroutine to run.
    use_uvloop
        Set False to force the stdlib event loop.
    debug
        asyncio debug mode.

    Returns
    -------
    object
        What ``main`` returned.
    """
    factory = _uvloop_factory() if use_uvloop else None
    with asyncio.Runner(debug=debug, loop_factory=factory) as runner:
        return runner.run(main)
