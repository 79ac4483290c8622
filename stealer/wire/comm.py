"""One persistent TCP connection per peer: :class:`Comm` (send/post/recv, heartbeat, close).

This is the edge where the outside world's failures become ours, exactly once:

* socket errors (``ConnectionError``, ``IncompleteReadError``, ``OSError``) become
  :class:`~stealer.errors.CommClosedError` (or :class:`~stealer.errors.PeerDeadError`
  when the heartbeat gave up on the peer);
* undecodable bytes become :class:`~stealer.errors.ProtocolError`, and the connection is
  aborted, because after a bad frame nobody knows where the next one starts;
* a ``recv`` cancelled in the middle of a frame aborts the connection for the same
  reason (cancelled while waiting for the *next* frame is harmless).

Liveness comes from TCP traffic: :meth:`Comm.start_heartbeat` pings an idle link every
``Limits.heartbeat_interval`` and aborts it when not one byte has arrived (read by us,
or waiting in the kernel for our loop) for the link's deadline while we were reading:
``Limits.peer_dead_after``, grown with the link's RTT and retransmission timeout up to
``Limits.peer_dead_max`` (see :class:`Comm`). ``Ping``/``Pong`` are answered and
consumed inside :meth:`Comm.recv`; callers never see them. Bytes posted to a peer that
does not read them are capped (``Limits.max_write_buffer_bytes``).

Every task created here is kept in a set until done; ``CancelledError`` is never caught
without being re-raised.

A comm is the same object on both sides, so only the connection lives here; the rest of
the wire layer has its own modules, each of which may import this one (never the other
way round):

* :mod:`stealer.wire.handshake`: both halves of the handshake every connection starts
  with (cluster secret, Hello/Welcome/Reject);
* :mod:`stealer.wire.client`: :func:`~stealer.wire.client.connect` (retries, then the
  client half of the handshake);
* :mod:`stealer.wire.server`: :class:`~stealer.wire.server.Server` with its admission
  control, and :func:`~stealer.wire.server.serve`;
* :mod:`stealer.wire.loop`: the event loop helpers (uvloop).

The public names that lived here before the split (``connect``, ``serve``, ``Server``,
``ServerStats``, ``run``, ``install_event_loop_policy``) are still importable from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Final, Self, TypeVar

from stealer.config import DEFAULT_LIMITS, Limits
from stealer.errors import CommClosedError, FrameAuthError, PeerDeadError, ProtocolError
from stealer.wire import framing, sockinfo
from stealer.wire.auth import TAG_BYTES, FrameMac
from stealer.wire.messages import Goodbye, Hello, Message, Ping, Pong, Welcome, decode, encode

__all__ = ["Comm", "MAC_OFFLOAD_BYTES", "POST_MAX_BYTES"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_U32 = struct.Struct(">I")

MAC_OFFLOAD_BYTES: Final = 1 << 20
"""Frames at least this big get their send-side MAC computed in a worker thread (hashlib
releases the GIL), so a 5 MB tile does not stall the event loop (and every peer's
heartbeat) for the ~10 ms a Pi needs to hash it. Received frames are hashed chunk by
chunk as they arrive instead."""

POST_MAX_BYTES: Final = 64 << 10
"""Frames up to this size are written at once by :meth:`Comm.post` (copied, so the caller
may reuse its arrays); bigger posted frames go out from a background task."""

_RTT_GAIN: Final = 1 / 8
"""Weight of a new Ping RTT sample in the smoothed RTT (RFC 6298's alpha): a few samples
move it, one outlier does not."""

_RTT_FACTOR: Final = 4.0
"""The dead deadline allows this many smoothed RTTs of silence. A Pong that waited behind
a peer's big frame measures that frame's transfer time, so on a link carrying tiles the
smoothed RTT (and with it the deadline) grows by about the time one tile takes."""

_MID_FRAME_RTOS: Final = 3.0
"""Retransmission timeouts of silence allowed while a frame is half received: the
peer's sender lost a segment and waits RTO, then 2 RTO if the retransmission is lost
too (exponential backoff), before the next byte can arrive. The peer's RTO is not
visible here; ours for the same path (same RTT, same Linux 200 ms floor) stands in."""

_RTO_FLOOR: Final = 0.2
"""Linux's TCP_RTO_MIN, in seconds; the RTO estimate (smoothed RTT plus this) where the
kernel cannot report one (non-Linux)."""

_MAX_PINGS: Final = 64
"""Most unanswered Pings remembered for RTT samples (a peer that never answers cannot
grow the table)."""

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
    established
        False (the default) while a handshake is still to be done: frames are then capped
        at ``limits.max_handshake_frame_bytes``. :func:`connect` and :func:`serve` lift
        the cap once the handshake succeeded.

    Attributes
    ----------
    local : Hello or None
        The identity we sent in the handshake (client side).
    peer : Hello or Welcome or None
        The identity the peer sent in the handshake.
    authenticated : bool
        The peer proved that it knows the cluster secret.
    rtt : float or None
        Last measured Ping round trip, in seconds.
    srtt : float or None
        Smoothed Ping round trip (EWMA, gain 1/8), in seconds.

    Notes
    -----
    **Liveness.** Any byte from the peer proves it alive: every read that returns bytes
    (also in the middle of a big frame), bytes waiting in the stream's buffer or in the
    kernel (``FIONREAD``) for this node's starved loop, and the kernel's time of the last
    arriving data segment (``TCP_INFO``, Linux). The peer is declared dead when none of
    these saw a byte for the link's deadline while a :meth:`recv` is pending::

        deadline = min(max(peer_dead_max, peer_dead_after),
                       max(peer_dead_after,
                           4 * srtt
                           + rto       if our socket is in retransmission backoff
                           + 3 * rto   if a frame is half received))

    where ``rto`` is the kernel's current retransmission timeout (backoff included) of
    this socket, standing in for the peer's on the same path. Why each term: a Pong
    queued behind the peer's big frame inflates ``srtt`` by that frame's transfer time,
    so a link busy with tiles gets a deadline of a few tile times; a lost tail segment of
    a frame stalls it for RTO and then 2 RTO; our own retransmissions delay our Pings.

    *Detection bound, idle link* (no frame in flight, no loss, ``srtt`` a few ms):
    ``peer_dead_after`` plus scheduling slack, under 1 s with the defaults, also for a
    SIGSTOPped peer (its kernel still ACKs, but sends no data). An ``srtt`` inflated by
    earlier load decays by 1/8 per answered Ping (one per ``heartbeat_interval``).

    *Detection bound, loaded link*: after a SIGSTOP the peer's kernel still transmits
    what is in its socket send buffer (up to a few MB: seconds at 20 Mbit/s), and those
    bytes count as alive; then the deadline above applies, at most ``peer_dead_max``. So
    the bound is: time to drain the peer's send buffer + ``peer_dead_max``.

    **RTT.** :attr:`rtt` is measured by Ping/Pong, which are posted (never wait for the
    send lock) but still leave after any frame already queued on the transport, on both
    sides. A sample taken while either side is sending a big frame therefore includes
    that frame's transfer time: an inflated RTT, on purpose a load signal (the scheduler
    prefers peers with low RTT), not the path's propagation delay.

    **No Ping is ever required.** Pings only make an idle peer send *something*; while
    the peer is sending us a big frame, its bytes are the proof, and our Pong to it,
    queued behind our own frame, is not needed because our frame's bytes reach it.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        limits: Limits = DEFAULT_LIMITS,
        name: str | None = None,
        established: bool = False,
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
        self.srtt: float | None = None
        self.authenticated = False
        self._max_frame = limits.max_frame_bytes if established else limits.max_handshake_frame_bytes
        self._send_mac: FrameMac | None = None
        self._recv_mac: FrameMac | None = None
        self._send_lock = asyncio.Lock()
        # a big frame's MAC is being computed in a thread: its frame number is taken, so posted
        # frames wait in _held until it is written (they must go out after it, in order)
        self._tagging = False
        self._held: list[bytes] = []
        self._held_bytes = 0
        # bytes of the frame send() has written and is draining, and of big posted frames
        # waiting in tasks: the write-buffer cap of post() applies on top of these
        self._sending_bytes = 0
        self._posting_bytes = 0
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
        # a frame's length prefix was read and its body (or MAC) is still arriving
        self._mid_frame = False
        # the stream buffer's size when we last looked: growth = bytes arrived unread
        self._seen_buffered = 0
        self._ping_seq = 0
        # bytes of whole frames written to / read from this connection (length prefix, body,
        # MAC), since it opened: the dashboard's bytes in/out per second per node
        self.bytes_sent = 0
        self.bytes_received = 0
        self._pings: dict[int, float] = {}  # unanswered Ping seq -> loop time sent
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

    @property
    def frame_mac(self) -> bool:
        """True when every frame of this comm carries a MAC (``authenticate_frames``)."""
        return self._send_mac is not None

    def _set_established(self) -> None:
        """The handshake succeeded: lift the handshake frame cap."""
        self._max_frame = self.limits.max_frame_bytes

    def _set_frame_macs(self, send: FrameMac, recv: FrameMac) -> None:
        """From the next frame on, MAC every frame sent and check every frame received."""
        self._send_mac, self._recv_mac = send, recv

    def silent_for(self, now: float | None = None) -> float:
        """Seconds the peer has been silent while we were waiting in :meth:`recv`.

        Zero when nobody is reading: data may be waiting in the socket then, so silence
        is only judged while a ``recv`` is pending. Every read that returned bytes
        counts as traffic, also in the middle of a big frame. This is the loop's view
        only; the heartbeat also asks the kernel (see the class notes).

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
        nbytes = sum(memoryview(p).nbytes for p in pieces)
        async with self._send_lock:
            try:
                await self._write_frame(pieces)
            finally:
                if self._tagging:  # sent, failed or cancelled: frames posted meanwhile go now
                    self._tagging = False
                    self._write_held()
            self._sending_bytes = nbytes  # in the transport now: not post()'s to account
            try:
                await self._writer.drain()
            except OSError as e:  # ConnectionResetError, BrokenPipeError, ...
                self._mark_closed(f"connection lost while sending: {e!r}", abort=True)
                raise self._closed_error() from e
            finally:
                self._sending_bytes = 0
            self._last_send = self._loop.time()

    async def _write_frame(self, pieces: list[bytes | memoryview]) -> None:
        """Tag (frame MACs) and queue one whole frame on the transport; under the send lock."""
        mac = self._send_mac
        if mac is not None and not self._closed:
            # The tag covers the frame number, so it is made under the send lock, and
            # the number only advances once the frame is queued (cancel-safe).
            if sum(memoryview(p).nbytes for p in pieces) >= MAC_OFFLOAD_BYTES:
                self._tagging = True  # the frame number is taken: posts wait (see post)
                tag = await asyncio.to_thread(mac.tag, pieces)
            else:
                tag = mac.tag(pieces)
            pieces.append(tag)
        if self._closed:
            raise self._closed_error()
        if self._writer.transport.is_closing():
            self._mark_closed("connection closed by peer", abort=True)
            raise self._closed_error()
        try:
            # writelines is synchronous: the whole frame is queued before any await,
            # so cancelling the drain in send cannot leave half a frame behind.
            self._writer.writelines(pieces)
        except OSError as e:
            self._mark_closed(f"connection lost while sending: {e!r}", abort=True)
            raise self._closed_error() from e
        if mac is not None:
            mac.advance()
        self.bytes_sent += sum(memoryview(p).nbytes for p in pieces)

    def post(self, msg: Message) -> None:
        """Send a small message now without waiting: for control messages (requests, acks,
        status) from code that must not wait for the peer to read, such as a connection's
        own read loop or a callback, and without the task and the drain of :meth:`send`.

        A frame up to :data:`POST_MAX_BYTES` is copied and written at once, in order with
        every other frame written on this comm; a bigger one goes out from a background task
        (so it may leave after frames posted later; errors then reach :meth:`recv`).

        Posted bytes that the peer has not taken yet (in the transport, held, or waiting
        in tasks; not counting the frame a :meth:`send` is writing) are capped at
        ``Limits.max_write_buffer_bytes``: past it the peer is not reading, and the
        connection is aborted rather than letting our memory grow without bound.

        Raises
        ------
        ProtocolError
            If the message cannot be encoded.
        CommClosedError
            If the connection is closed, or was just aborted because the peer is not
            reading (write buffer over ``max_write_buffer_bytes``).
        """
        header, buffers = encode(msg, self.limits)
        pieces = framing.frame_pieces(header, buffers, self.limits)
        if self._closed:
            raise self._closed_error()
        if self._writer.transport.is_closing():
            self._mark_closed("connection closed by peer", abort=True)
            raise self._closed_error()
        nbytes = sum(memoryview(p).nbytes for p in pieces)
        self._check_write_budget(nbytes)
        if nbytes > POST_MAX_BYTES:
            self._posting_bytes += nbytes
            self._spawn(self._send_posted(msg, nbytes), "post")
            return
        data = b"".join(pieces)
        if self._tagging:
            self._held.append(data)
            self._held_bytes += len(data)
            return
        self._write_posted(data)

    def _posted_backlog(self) -> int:
        """Bytes posted (or held) for the peer and not yet taken by the kernel, beyond the
        frame :meth:`send` is writing (which may itself be partly flushed: never < 0)."""
        queued = self._writer.transport.get_write_buffer_size() + self._held_bytes
        return max(0, queued + self._posting_bytes - self._sending_bytes)

    def _check_write_budget(self, nbytes: int) -> None:
        """Abort (peer not reading) if posting ``nbytes`` more would pass the cap."""
        backlog = self._posted_backlog()
        cap = self.limits.max_write_buffer_bytes
        if backlog + nbytes > cap:
            logger.warning(
                "%s: peer is not reading: %d B posted and not taken > max_write_buffer_bytes "
                "%d B, aborting", self, backlog + nbytes, cap,
            )
            self._mark_closed(
                f"peer is not reading ({backlog + nbytes} B queued > max_write_buffer_bytes "
                f"{cap} B)", abort=True,
            )
            raise self._closed_error()

    async def _send_posted(self, msg: Message, nbytes: int) -> None:
        try:
            await self._send_quietly(msg)
        finally:
            self._posting_bytes -= nbytes

    def _post_heartbeat(self, msg: Ping | Pong) -> bool:
        """Post a Ping or Pong unless posted bytes are already waiting for the peer.

        Posted, not sent: it must not wait for the send lock behind other senders' big
        frames (it still leaves after the frame already on the transport). Skipped when
        more than :data:`POST_MAX_BYTES` of posted bytes are waiting: the peer is not
        reading what we posted, and one more (a Ping flood answered Pong for Ping) would
        only grow the buffer. Errors are left for :meth:`recv` to report.

        Returns
        -------
        bool
            True if it was posted.
        """
        if self._closed or self._posted_backlog() > POST_MAX_BYTES:
            return False
        try:
            self.post(msg)
        except CommClosedError:
            return False
        return True

    def _write_posted(self, data: bytes) -> None:
        mac = self._send_mac
        try:
            if mac is not None:
                self._writer.writelines([data, mac.tag((data,))])
                mac.advance()
                self.bytes_sent += TAG_BYTES
            else:
                self._writer.write(data)
            self.bytes_sent += len(data)
        except OSError as e:
            self._mark_closed(f"connection lost while sending: {e!r}", abort=True)
            raise self._closed_error() from e
        self._last_send = self._loop.time()

    def _write_held(self) -> None:
        held, self._held = self._held, []
        self._held_bytes = 0
        for data in held:
            if self._closed:
                return
            with contextlib.suppress(CommClosedError):
                self._write_posted(data)

    def _touch(self) -> None:
        """Bytes from the peer were just read (or seen waiting): it is alive now."""
        self._last_recv = self._loop.time()
        self._seen_buffered = self._buffered()

    def _buffered(self) -> int:
        """Bytes in the StreamReader's buffer: received from the kernel, not yet read.

        ``_buffer`` is private to asyncio (and what uvloop's streams use too); a reader
        without it reports 0, and the kernel checks still apply.
        """
        buf = getattr(self._reader, "_buffer", None)
        return len(buf) if buf is not None else 0

    async def _recv_frame(self) -> Message:
        async with self._recv_lock:
            if self._closed:
                raise self._closed_error()
            self._reading_since = self._loop.time()
            mid_frame = self._mid_frame = False
            try:
                n = await framing.read_length(self._reader, self.limits, self._max_frame)
                mid_frame = self._mid_frame = True
                self._touch()
                mac = self._recv_mac
                h = mac.hasher() if mac is not None else None
                if h is not None:
                    h.update(_U32.pack(n))
                body = await framing.read_body(self._reader, n, self.limits, self._touch, h)
                if mac is not None and h is not None:
                    seq = mac.seq
                    if not mac.check(h, await self._reader.readexactly(TAG_BYTES)):
                        # Checked before parsing: forged bytes never reach msgpack.
                        raise FrameAuthError(
                            f"frame {seq} failed its MAC check (tampered, replayed, "
                            f"reordered or sent with another key)"
                        )
                mid_frame = self._mid_frame = False
                self._touch()
                self.bytes_received += 4 + n + (TAG_BYTES if mac is not None else 0)
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
                self._mid_frame = False

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
                # Posted: no task, no wait for the send lock. A peer that floods Pings
                # without reading gets no more Pongs once posted bytes wait for it (see
                # _post_heartbeat); its heartbeat only needs some answer.
                self._post_heartbeat(Pong(msg.seq))
            elif type(msg) is Pong:
                self._on_pong(msg.seq)
            elif type(msg) is Goodbye:
                reason = msg.reason or "no reason given"
                logger.debug("%s: peer said goodbye: %s", self, reason)
                self._mark_closed(f"peer said goodbye: {reason}", abort=False)
                raise self._closed_error()
            else:
                return msg

    # ---- heartbeat ------------------------------------------------------------------

    def _on_pong(self, seq: int) -> None:
        """Take an RTT sample from the Pong of Ping ``seq`` (unknown seqs are ignored)."""
        sent = self._pings.pop(seq, None)
        if sent is None:
            return
        # TCP keeps order and the peer answers in order: older Pings' Pongs were skipped
        for old in [s for s in self._pings if s < seq]:
            del self._pings[old]
        rtt = self.rtt = self._loop.time() - sent
        self.srtt = rtt if self.srtt is None else self.srtt + _RTT_GAIN * (rtt - self.srtt)

    def _send_ping(self, now: float) -> None:
        self._ping_seq += 1
        if self._post_heartbeat(Ping(self._ping_seq)):
            # Pings are not skipped while one is unanswered: the peer may be sending us a
            # big frame and see nothing else from us (its Pong waits behind that frame).
            self._pings[self._ping_seq] = now
            while len(self._pings) > _MAX_PINGS:
                del self._pings[min(self._pings)]

    def _socket_state(self) -> sockinfo.SocketState:
        transport = self._writer.transport
        if self._closed or transport.is_closing():  # the fd may be reused after close
            return sockinfo.UNKNOWN
        return sockinfo.probe(transport.get_extra_info("socket"))

    def dead_after(self, state: sockinfo.SocketState | None = None) -> float:
        """This link's current dead-peer deadline in seconds (see the class notes).

        Parameters
        ----------
        state
            The kernel's view of the socket; probed if omitted.

        Returns
        -------
        float
            Between ``peer_dead_after`` and ``max(peer_dead_max, peer_dead_after)``.
        """
        lim = self.limits
        if state is None:
            state = self._socket_state()
        srtt = self.srtt or 0.0
        rto = state.rto if state.rto is not None else srtt + _RTO_FLOOR
        grace = _RTT_FACTOR * srtt
        if state.backing_off:
            grace += rto  # our Pings/Pongs to the peer wait for our own retransmission
        if self._mid_frame:
            grace += _MID_FRAME_RTOS * rto  # the peer's sender may be in RTO backoff
        return min(max(lim.peer_dead_after, grace), max(lim.peer_dead_max, lim.peer_dead_after))

    def _judge_silence(self, now: float, silent: float) -> tuple[float, float]:
        """Recheck a silence of ``peer_dead_after`` or more against the kernel.

        Returns
        -------
        silent : float
            Seconds since the last byte from the peer reached us (kernel or loop).
        deadline : float
            The link's dead deadline (:meth:`dead_after`).
        """
        state = self._socket_state()
        buffered = self._buffered()
        if (state.unread or 0) > 0 or buffered != self._seen_buffered:
            # Bytes are waiting for our own (starved) loop: the peer sent them, it lives.
            self._touch()
            return 0.0, self.limits.peer_dead_after
        if state.since_data_recv is not None:
            silent = min(silent, state.since_data_recv)
        return silent, self.dead_after(state)

    def start_heartbeat(self) -> None:
        """Start pinging and watching the peer (idempotent; stops when the comm closes).

        While the link is idle a :class:`Ping` goes out every ``heartbeat_interval``. If
        not one byte arrives for the link's deadline (``peer_dead_after``, grown on a
        loaded link; see the class notes and :meth:`dead_after`) while a :meth:`recv` is
        pending, the comm is aborted and that ``recv`` raises
        :class:`~stealer.errors.PeerDeadError`. Someone must be calling :meth:`recv` for
        Pings to be answered.
        """
        if self._heartbeat_task is None and not self._closed:
            self._heartbeat_task = self._spawn(self._heartbeat(), "heartbeat")

    async def _heartbeat(self) -> None:
        lim = self.limits
        loop = self._loop
        next_ping = loop.time() + lim.heartbeat_interval
        while not self._closed:
            now = loop.time()
            silent = self.silent_for(now)
            deadline = lim.peer_dead_after
            if silent >= deadline:
                # Only now ask the kernel (two syscalls): most checks end above.
                silent, deadline = self._judge_silence(now, silent)
                if silent >= deadline:
                    logger.warning(
                        "%s: nothing received for %.2f s (deadline %.2f s: peer_dead_after "
                        "%.2f s, srtt %s, %s), peer is dead",
                        self, silent, deadline, lim.peer_dead_after,
                        "-" if self.srtt is None else f"{self.srtt:.3f} s",
                        "mid-frame" if self._mid_frame else "between frames",
                    )
                    self._mark_closed(
                        f"peer silent for {silent:.2f} s (deadline {deadline:.2f} s, "
                        f"peer_dead_after {lim.peer_dead_after} s)",
                        abort=True,
                        error=PeerDeadError,
                    )
                    return
            if now >= next_ping:
                if now - self._last_send >= lim.heartbeat_interval:
                    self._send_ping(now)
                next_ping = now + lim.heartbeat_interval
            wake = next_ping
            if self._reading_since is not None:
                # Re-judged at least each heartbeat_interval once past peer_dead_after, so
                # a grown deadline follows the kernel's view as it changes.
                wake = min(wake, now + max(deadline - silent, 0.0))
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
