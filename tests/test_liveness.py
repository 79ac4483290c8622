"""Liveness that slow bulk transfers and a starved loop cannot fool, and the post() cap.

Real sockets on 127.0.0.1. The hand-driven peer runs in a thread with blocking sockets
(test code: its ``time.sleep`` paces what it sends), so it keeps sending while a test
blocks this node's event loop. Every test runs on uvloop and on the asyncio loop: they
order timers and socket reads differently, which is exactly what starvation exposes.
Timing constants come from ``FAST`` (peer_dead_after 0.5 s); no test asserts a speed,
only that something is or is not declared dead within generous bounds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import numpy as np
import pytest

from stealer.config import Limits
from stealer.errors import CommClosedError, PeerDeadError
from stealer.wire import PROTOCOL_VERSION, Comm, TensorMsg, Welcome, connect, encode, run, serve
from stealer.wire.comm import POST_MAX_BYTES
from stealer.wire.framing import frame_pieces, read_body
from tests.test_comm import FAST, MODEL, hello

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")

LOOPS = pytest.mark.parametrize("use_uvloop", [True, False], ids=["uvloop", "asyncio"])


def on_loop(use_uvloop: bool, coro: Coroutine[Any, Any, T]) -> T:
    """Run a test coroutine on a fresh loop; fail if it leaves tasks behind."""
    if use_uvloop:
        pytest.importorskip("uvloop")

    async def main() -> T:
        try:
            return await coro
        finally:
            for _ in range(5):
                await asyncio.sleep(0)
            me = asyncio.current_task()
            leaked = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
            assert not leaked, leaked

    return run(main(), use_uvloop=use_uvloop)


def frame_bytes(msg: Any) -> bytes:
    return b"".join(bytes(p) for p in frame_pieces(*encode(msg)))


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        part = sock.recv(n - len(out))
        if not part:
            raise ConnectionError("eof")
        out += part
    return bytes(out)


class ThreadPeer:
    """A hand-driven server in its own thread: answers the Hello with a Welcome, then
    sends ``script`` (pairs of bytes and a pause after them), then reads (or, with
    ``read=False``, ignores) whatever comes until the test ends."""

    def __init__(
        self, script: list[tuple[bytes, float]], *, read: bool = True, rcvbuf: int | None = None
    ) -> None:
        self._script = script
        self._read = read
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        if rcvbuf is not None:  # inherited by the accepted socket: fills up quickly
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.port: int = self._listener.getsockname()[1]
        self.sent_all = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self._listener.settimeout(20)
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        with conn:
            try:
                n = int.from_bytes(_recv_exactly(conn, 4), "big")
                _recv_exactly(conn, n)  # the Hello
                conn.sendall(frame_bytes(Welcome.of(hello("s"))))
                for data, pause in self._script:
                    conn.sendall(data)
                    if self._stop.wait(pause):
                        return
                self.sent_all.set()
                conn.settimeout(0.05)
                while not self._stop.is_set():
                    if not self._read:
                        self._stop.wait(0.05)
                        continue
                    try:
                        if not conn.recv(65536):
                            return
                    except TimeoutError:
                        pass
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(5)


# ---- framing: every read that returns bytes is progress -------------------------------


async def test_read_body_reports_progress_per_read_not_per_chunk() -> None:
    """Pieces far smaller than read_chunk_bytes each count, and the MAC sees every byte."""
    import hashlib

    limits = FAST  # 256 KiB chunks
    reader = asyncio.StreamReader()
    payload = bytes(range(256)) * 1200  # 300 KiB: more than one chunk
    calls: list[int] = []
    h = hashlib.sha256()
    task = asyncio.create_task(read_body(reader, len(payload), limits, lambda: calls.append(1), h))
    for i in range(0, len(payload), 10_000):
        reader.feed_data(payload[i : i + 10_000])
        await asyncio.sleep(0)  # let the reader take this piece before the next arrives
    body = await task
    assert bytes(body) == payload
    assert h.digest() == hashlib.sha256(payload).digest()
    assert len(calls) >= len(payload) // 10_000  # one per piece, not one per 256 KiB


async def test_read_body_eof_mid_body_is_incomplete_read() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"x" * 1000)
    reader.feed_eof()
    with pytest.raises(asyncio.IncompleteReadError) as info:
        await read_body(reader, 5000, FAST)
    assert info.value.partial == b"x" * 1000


# ---- slow but alive ----------------------------------------------------------------------


@LOOPS
def test_trickled_big_frame_is_not_dead(use_uvloop: bool) -> None:
    """16 KiB every 50 ms: each 256 KiB chunk takes 0.8 s > peer_dead_after (0.5 s), but
    no gap is near it. Declared dead before any byte counted, not just whole chunks."""
    payload = TensorMsg("slow", np.arange(300_000, dtype=np.uint8))
    data = frame_bytes(payload)
    step = 16 * 1024
    peer = ThreadPeer([(data[i : i + step], 0.05) for i in range(0, len(data), step)])

    async def main() -> None:
        async with await connect("127.0.0.1", peer.port, hello("c"), limits=FAST) as comm:
            out = await comm.recv()
            assert isinstance(out, TensorMsg) and np.array_equal(out.array, payload.array)
            assert not comm.closed

    try:
        on_loop(use_uvloop, main())
    finally:
        peer.close()


@LOOPS
def test_bytes_waiting_while_our_loop_is_blocked_keep_the_link(use_uvloop: bool) -> None:
    """The peer keeps sending while this node's loop is blocked for 2 x peer_dead_after
    (a CPU quota, a thread holding the GIL): the bytes waiting in the kernel prove it
    alive, even if the heartbeat runs before the read that would take them."""
    frames = [frame_bytes(TensorMsg(f"f{i}", np.full(100, i, np.int32))) for i in range(30)]
    peer = ThreadPeer([(f, 0.05) for f in frames])

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with await connect("127.0.0.1", peer.port, hello("c"), limits=FAST) as comm:
            got = []
            for i in range(len(frames)):
                out = await comm.recv()
                assert isinstance(out, TensorMsg) and out.tag == f"f{i}"
                got.append(out.tag)
                if i == 2:
                    # test-only stall of the whole loop; library code never sleeps
                    loop.call_soon(time.sleep, 2 * FAST.peer_dead_after)
            assert len(got) == len(frames) and not comm.closed

    try:
        on_loop(use_uvloop, main())
    finally:
        peer.close()


# ---- dead is still dead ------------------------------------------------------------------


@LOOPS
def test_silent_peer_on_idle_link_found_within_peer_dead_after(use_uvloop: bool) -> None:
    """The peer sends a few frames, then nothing (it still reads our Pings)."""
    frames = [frame_bytes(TensorMsg(f"f{i}", np.zeros(10, np.uint8))) for i in range(3)]
    peer = ThreadPeer([(f, 0.02) for f in frames])

    async def main() -> None:
        async with await connect("127.0.0.1", peer.port, hello("c"), limits=FAST) as comm:
            for _ in frames:
                await comm.recv()
            t0 = time.monotonic()
            with pytest.raises(PeerDeadError, match="silent"):
                await comm.recv()
            elapsed = time.monotonic() - t0
            assert elapsed <= FAST.peer_dead_after + 0.4, elapsed

    try:
        on_loop(use_uvloop, main())
    finally:
        peer.close()


_STOPPED_CLIENT = """
import asyncio, sys
import numpy as np
from stealer.wire import Hello, TensorMsg, connect
async def main():
    hello = Hello({v}, "k" * 32, "worker", 0, 1, {model!r}, 0)
    comm = await connect("127.0.0.1", {port}, hello)
    print("connected", flush=True)
    if {loaded}:
        tile = np.ones(2 << 20, np.uint8)
        while True:
            await comm.send(TensorMsg("tile", tile))
    while True:
        await comm.recv()
asyncio.run(main())
"""


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")
@pytest.mark.parametrize("loaded", [False, True], ids=["idle", "sending-tiles"])
@LOOPS
def test_sigstopped_peer_is_declared_dead(use_uvloop: bool, loaded: bool) -> None:
    """A frozen peer process (its kernel still ACKs): idle link within peer_dead_after,
    a link carrying its tiles within draining its send buffer + peer_dead_max."""
    limits = FAST.replace(peer_dead_max=1.5)

    async def main() -> float:
        connected = asyncio.Event()
        got: asyncio.Future[tuple[BaseException, float]] = asyncio.get_running_loop().create_future()
        stopped_at: list[float] = []

        async def handler(comm: Comm) -> None:
            connected.set()
            try:
                while True:
                    await comm.recv()
            except CommClosedError as e:
                got.set_result((e, time.monotonic()))

        async with serve("127.0.0.1", 0, handler, lambda: hello("s"), limits=limits) as srv:
            code = _STOPPED_CLIENT.format(
                v=PROTOCOL_VERSION, model=MODEL, port=srv.port, loaded=loaded
            )
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
            )
            try:
                await asyncio.wait_for(connected.wait(), 20)
                await asyncio.sleep(0.3)  # some tiles under way
                os.kill(proc.pid, signal.SIGSTOP)
                stopped_at.append(time.monotonic())
                err, when = await asyncio.wait_for(got, 10)
                assert isinstance(err, PeerDeadError), err
                return when - stopped_at[0]
            finally:
                if proc.returncode is None:
                    proc.kill()
                    os.kill(proc.pid, signal.SIGCONT)
                await proc.wait()

    elapsed = on_loop(use_uvloop, main())
    bound = limits.peer_dead_max + 1.0 if loaded else limits.peer_dead_after + 0.4
    assert elapsed <= bound, elapsed


# ---- post() cannot grow the write buffer without bound ----------------------------------


@pytest.mark.parametrize("size", [16 * 1024, 2 * POST_MAX_BYTES], ids=["small", "big-post"])
@LOOPS
def test_post_to_a_peer_that_never_reads_is_capped(use_uvloop: bool, size: int) -> None:
    limits = FAST.replace(max_write_buffer_bytes=1 << 20)
    peer = ThreadPeer([], read=False, rcvbuf=64 * 1024)

    async def main() -> int:
        comm = await connect("127.0.0.1", peer.port, hello("c"), limits=limits, heartbeat=False)
        array = np.zeros(size, np.uint8)
        posted = 0
        try:
            with pytest.raises(CommClosedError, match="not reading"):
                for _ in range(10_000):  # 160 MB or more: far past any kernel buffering
                    comm.post(TensorMsg("x", array))
                    posted += size
                    await asyncio.sleep(0)  # let the transport hand what it can to the kernel
            assert comm.closed and "max_write_buffer_bytes" in comm.close_reason
            with pytest.raises(CommClosedError):
                comm.post(TensorMsg("late", array))
        finally:
            await comm.close()
        return posted

    try:
        posted = on_loop(use_uvloop, main())
    finally:
        peer.close()
    assert posted < 10_000 * size


def test_limits_liveness_fields_validated() -> None:
    with pytest.raises(ValueError):
        Limits(max_write_buffer_bytes=0)
    with pytest.raises(ValueError):
        Limits(peer_dead_max=-1.0)
    # a peer_dead_after above peer_dead_max is allowed and wins (see Comm.dead_after)
    assert Limits(peer_dead_after=20.0).peer_dead_max == 10.0


