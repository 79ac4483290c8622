"""Comms over real TCP sockets on 127.0.0.1: handshake, data, hostile peers, liveness.

Timing constants are patched down through a :class:`~stealer.config.Limits` object that
each test passes explicitly to ``serve``/``connect``. That is safe because ``Limits`` is
frozen and never global: the patched copy reaches only the comms of the test that built
it, and the code paths are identical, only the numbers are smaller (so a timeout test
takes 0.5 s instead of 3 s). The values stay well above loopback latency (~0.1 ms) so a
loaded CI machine does not turn them into flakes.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import numpy as np
import pytest

from stealer.config import DEFAULT_LIMITS, Limits
from stealer.errors import CommClosedError, HandshakeRejected, PeerDeadError, ProtocolError
from stealer.wire import (
    PROTOCOL_VERSION,
    Comm,
    Hello,
    Ping,
    TensorMsg,
    Welcome,
    connect,
    decode,
    encode,
    read_frame,
    run,
    serve,
    write_frame,
)
from stealer.wire.framing import frame_pieces

pytestmark = pytest.mark.timeout(60)

MODEL = "ab" * 32

FAST = DEFAULT_LIMITS.replace(
    handshake_timeout=0.5,
    heartbeat_interval=0.1,
    peer_dead_after=0.5,
    connect_timeout=3.0,
    close_timeout=0.5,
)


@pytest.fixture
def limits() -> Limits:
    """Production limits with the timeouts shrunk (see the module docstring)."""
    return FAST


def hello(node: str, **changes: object) -> Hello:
    fields: dict[str, object] = dict(
        version=PROTOCOL_VERSION, node_id=node * 32 if len(node) == 1 else node, role="worker",
        port=0, cores=2, model_hash=MODEL, max_memory=2**28,
    )
    fields.update(changes)
    return Hello(**fields)  # type: ignore[arg-type]


async def echo(comm: Comm) -> None:
    while True:
        await comm.send(await comm.recv())


@asynccontextmanager
async def server(
    on_comm: Callable[[Comm], Awaitable[None]] = echo, limits: Limits = FAST, **kw: object
) -> AsyncIterator:
    async with serve("127.0.0.1", 0, on_comm, lambda: hello("s"), limits=limits, **kw) as srv:  # type: ignore[arg-type]
        yield srv


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    yield
    for _ in range(5):  # let closing transports run their callbacks
        await asyncio.sleep(0)
    me = asyncio.current_task()
    leaked = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    assert not leaked, leaked


@asynccontextmanager
async def raw_server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    """A hand-driven peer on 127.0.0.1; yields its port; its handler tasks never leak."""
    tasks: set[asyncio.Task[None]] = set()

    async def run_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.add(asyncio.get_running_loop().create_task(run_handler(reader, writer)))

    srv = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await srv.wait_closed()


async def raw_handshake(port: int, node: str = "r") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A hand-driven client: sends Hello, reads Welcome, then does whatever the test wants."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    write_frame(writer, *encode(hello(node)))
    await writer.drain()
    assert isinstance(decode(*await read_frame(reader)), Welcome)
    return reader, writer


async def wait_eof(reader: asyncio.StreamReader, timeout: float) -> float:
    """Read until the server closes the connection; return how long it took."""
    t0 = time.monotonic()
    async with asyncio.timeout(timeout):
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
    return time.monotonic() - t0


# ---- data -----------------------------------------------------------------------------


async def test_exchange_including_5mb_array() -> None:
    rng = np.random.default_rng(0)
    big = rng.standard_normal(5 * 2**20 // 4).astype(np.float32).reshape(-1, 1024)
    strided = rng.integers(0, 255, (64, 64), dtype=np.uint8)[::2, ::3]
    async with server() as srv, await connect("127.0.0.1", srv.port, hello("c"), limits=FAST) as comm:
        assert isinstance(comm.peer, Welcome) and comm.peer.node_id == "s" * 32
        await comm.send(TensorMsg("big", big, {"tile": [0, 1], "scale": 0.5}))
        out = await comm.recv()
        assert isinstance(out, TensorMsg) and out.tag == "big"
        assert out.meta == {"tile": [0, 1], "scale": 0.5}
        assert out.array.dtype == np.float32 and out.array.shape == big.shape
        assert np.array_equal(out.array, big)
        await comm.send(TensorMsg("strided", strided))
        out = await comm.recv()
        assert isinstance(out, TensorMsg) and np.array_equal(out.array, strided)
        (live,) = srv.comms
        assert isinstance(live.peer, Hello) and live.peer.node_id == "c" * 32


async def test_concurrent_senders_do_not_interleave() -> None:
    async with server() as srv, await connect("127.0.0.1", srv.port, hello("c"), limits=FAST) as comm:
        arrays = {f"t{i}": np.full(10_000 + 997 * i, i, np.int32) for i in range(20)}
        await asyncio.gather(*(comm.send(TensorMsg(tag, a)) for tag, a in arrays.items()))
        for _ in arrays:
            out = await comm.recv()
            assert isinstance(out, TensorMsg)
            assert np.array_equal(out.array, arrays[out.tag])


async def test_post_keeps_order_with_sends_and_copies_arrays() -> None:
    """Posted frames go out at once, in order with awaited sends; the sender may reuse a
    posted array at once (a copy left); a frame over POST_MAX_BYTES goes from a task."""
    from stealer.wire.comm import POST_MAX_BYTES

    async with server() as srv, await connect("127.0.0.1", srv.port, hello("c"), limits=FAST) as comm:
        reused = np.arange(100, dtype=np.int32)
        sent = []
        for i in range(30):
            if i % 3 == 0:
                await comm.send(TensorMsg(f"s{i}", np.full(5000, i, np.int32)))
                sent.append((f"s{i}", np.full(5000, i, np.int32)))
            else:
                reused[:] = i
                comm.post(TensorMsg(f"p{i}", reused))
                sent.append((f"p{i}", np.full(100, i, np.int32)))
        reused[:] = -1  # after the posts: must not change what they carry
        for tag, want in sent:
            out = await comm.recv()
            assert isinstance(out, TensorMsg) and out.tag == tag and np.array_equal(out.array, want)
        big = np.ones(POST_MAX_BYTES // 4 + 1000, np.float32)
        comm.post(TensorMsg("big", big))
        out = await comm.recv()
        assert isinstance(out, TensorMsg) and out.tag == "big" and np.array_equal(out.array, big)
    with pytest.raises(CommClosedError):
        comm.post(TensorMsg("late", reused))


async def test_unencodable_message_leaves_comm_usable() -> None:
    async with server() as srv, await connect("127.0.0.1", srv.port, hello("c"), limits=FAST) as comm:
        with pytest.raises(ProtocolError, match="dtype"):
            await comm.send(TensorMsg("bad", np.zeros(3, np.float64)))
        await comm.send(Ping(5))  # Ping is answered inside recv, so use a tensor to check
        await comm.send(TensorMsg("ok", np.ones(3, np.float32)))
        out = await comm.recv()
        assert isinstance(out, TensorMsg) and out.tag == "ok"


# ---- handshake ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, reason",
    [
        pytest.param({"version": PROTOCOL_VERSION + 1}, "protocol version mismatch", id="version"),
        pytest.param({"model_hash": "cd" * 32}, "model hash mismatch", id="model-hash"),
        pytest.param({"node_id": "s" * 32}, "own node_id", id="self-connect"),
    ],
)
async def test_handshake_rejects_with_reason(
    changes: dict[str, object], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with server() as srv:
        with pytest.raises(HandshakeRejected, match=reason):
            await connect("127.0.0.1", srv.port, hello("c", **changes), limits=FAST)
        # the server keeps serving
        async with await connect("127.0.0.1", srv.port, hello("d"), limits=FAST):
            pass
    assert any("rejecting" in r.getMessage() and reason in r.getMessage() for r in caplog.records)


async def test_max_connections(limits: Limits) -> None:
    one = limits.replace(max_connections=1)
    async with server(limits=one) as srv, await connect("127.0.0.1", srv.port, hello("c"), limits=one):
        with pytest.raises(HandshakeRejected, match="server full"):
            await connect("127.0.0.1", srv.port, hello("d"), limits=one)


async def test_silent_and_slow_clients_dropped_while_server_serves_others(limits: Limits) -> None:
    async with server() as srv:
        silent_r, silent_w = await asyncio.open_connection("127.0.0.1", srv.port)
        slow_r, slow_w = await asyncio.open_connection("127.0.0.1", srv.port)
        slow_w.write(struct.pack(">I", 100) + b"\x00\x00")  # a Hello that never finishes
        t0 = time.monotonic()
        async with await connect("127.0.0.1", srv.port, hello("c"), limits=limits) as comm:
            await comm.send(TensorMsg("x", np.arange(4, dtype=np.int64)))
            assert isinstance(await comm.recv(), TensorMsg)
            await wait_eof(silent_r, timeout=5 * limits.handshake_timeout)
            await wait_eof(slow_r, timeout=5 * limits.handshake_timeout)
            assert time.monotonic() - t0 >= 0.8 * limits.handshake_timeout
            await comm.send(TensorMsg("y", np.arange(4, dtype=np.int64)))  # still served
            assert isinstance(await comm.recv(), TensorMsg)
        for w in (silent_w, slow_w):
            w.close()


async def test_garbage_after_handshake_closes_only_that_connection() -> None:
    errors: list[BaseException] = []

    async def recording_echo(comm: Comm) -> None:
        try:
            await echo(comm)
        except ProtocolError as e:
            errors.append(e)
            raise

    async with server(recording_echo) as srv:
        async with await connect("127.0.0.1", srv.port, hello("c"), limits=FAST) as good:
            reader, writer = await raw_handshake(srv.port)
            writer.write(b"\x00\x00\x00\x10" + b"\xff" * 16)  # a frame whose header is junk
            await wait_eof(reader, timeout=2)
            assert len(errors) == 1 and "header" in str(errors[0])
            await good.send(TensorMsg("still", np.zeros(2, np.uint8)))
            assert isinstance(await good.recv(), TensorMsg)
            writer.close()


# ---- closing and failure --------------------------------------------------------------


async def test_close_twice_and_peer_sees_goodbye() -> None:
    seen: list[BaseException] = []
    done = asyncio.Event()

    async def handler(comm: Comm) -> None:
        try:
            await comm.recv()
        except CommClosedError as e:
            seen.append(e)
            done.set()

    async with server(handler) as srv:
        comm = await connect("127.0.0.1", srv.port, hello("c"), limits=FAST)
        await asyncio.gather(comm.close("bye now"), comm.close())
        await comm.close()
        assert comm.closed
        with pytest.raises(CommClosedError):
            await comm.send(Ping(1))
        with pytest.raises(CommClosedError):
            await comm.recv()
        await asyncio.wait_for(done.wait(), 2)
        assert "bye now" in str(seen[0])
        await srv.close()
    await srv.close()


async def test_connect_deadline_raises_from_last_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    t0 = time.monotonic()
    with pytest.raises(CommClosedError, match="could not connect") as info:
        await connect("127.0.0.1", port, hello("c"), limits=FAST.replace(connect_timeout=0.3))
    elapsed = time.monotonic() - t0
    assert 0.25 <= elapsed < 2.0
    assert isinstance(info.value.__cause__, OSError)


async def test_connect_retries_until_server_appears() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    attempt = asyncio.create_task(connect("127.0.0.1", port, hello("c"), limits=FAST))
    await asyncio.sleep(0.2)  # let a few attempts fail first: this is the point of the test
    async with serve("127.0.0.1", port, echo, lambda: hello("s"), limits=FAST):
        async with await attempt as comm:
            assert comm.peer is not None


async def test_peer_abort_gives_comm_closed() -> None:
    got: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    async def handler(comm: Comm) -> None:
        try:
            await comm.recv()
        except CommClosedError as e:
            got.set_result(e)

    async with server(handler) as srv:
        comm = await connect("127.0.0.1", srv.port, hello("c"), limits=FAST, heartbeat=False)
        comm.abort("simulated crash")
        err = await asyncio.wait_for(got, 2)
        assert not isinstance(err, PeerDeadError)
        await comm.close()


_KILLED_CLIENT = """
import asyncio, sys
from stealer.wire import Hello, connect
from stealer.config import DEFAULT_LIMITS
async def main():
    hello = Hello({v}, "k" * 32, "worker", 0, 1, {model!r}, 0)
    comm = await connect("127.0.0.1", {port}, hello, heartbeat=False)
    print("connected", flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


async def test_killed_peer_process_gives_comm_closed_on_recv() -> None:
    connected = asyncio.Event()
    got: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    async def handler(comm: Comm) -> None:
        connected.set()
        try:
            await comm.recv()
        except CommClosedError as e:
            got.set_result(e)

    async with server(handler, heartbeat=False) as srv:
        code = _KILLED_CLIENT.format(v=PROTOCOL_VERSION, model=MODEL, port=srv.port)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
        )
        try:
            await asyncio.wait_for(connected.wait(), 20)
            proc.kill()
            err = await asyncio.wait_for(got, 5)
            assert isinstance(err, CommClosedError)
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def test_cancel_between_frames_keeps_comm_but_mid_frame_aborts() -> None:
    async def half_frame_sender(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert isinstance(decode(*await read_frame(reader)), Hello)
        write_frame(writer, *encode(Welcome.of(hello("s"))))
        await reader.read(1)  # wait for the client's go
        writer.write(struct.pack(">I", 1000) + b"\x00" * 10)  # then half a frame
        await reader.read()

    async with raw_server(half_frame_sender) as port:
        comm = await connect("127.0.0.1", port, hello("c"), limits=FAST, heartbeat=False)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await comm.recv()  # nothing sent yet: cancelled at a frame boundary
        assert not comm.closed
        comm._writer.write(b"!")  # the go signal (not a frame; the raw peer reads 1 byte)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await comm.recv()  # cancelled mid-frame: the stream position is lost
        assert comm.closed and "middle of a frame" in comm.close_reason
        await comm.close()


# ---- liveness -------------------------------------------------------------------------


async def test_heartbeat_detects_silent_client(limits: Limits) -> None:
    result: asyncio.Future[tuple[BaseException, float]] = asyncio.get_running_loop().create_future()

    async def handler(comm: Comm) -> None:
        t0 = time.monotonic()
        try:
            await comm.recv()
        except CommClosedError as e:
            result.set_result((e, time.monotonic() - t0))

    async with server(handler) as srv:
        reader, writer = await raw_handshake(srv.port)  # then never answers a Ping
        err, elapsed = await asyncio.wait_for(result, 5)
        assert isinstance(err, PeerDeadError)
        assert limits.peer_dead_after * 0.9 <= elapsed <= limits.peer_dead_after + 0.4
        await wait_eof(reader, 2)
        writer.close()


async def test_heartbeat_detects_silent_server(limits: Limits) -> None:
    async def silent_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decode(*await read_frame(reader))
        write_frame(writer, *encode(Welcome.of(hello("s"))))
        await reader.read()  # reads our Pings, answers nothing
        writer.close()

    async with raw_server(silent_server) as port:
        comm = await connect("127.0.0.1", port, hello("c"), limits=limits)
        t0 = time.monotonic()
        with pytest.raises(PeerDeadError, match="silent"):
            await comm.recv()
        assert time.monotonic() - t0 <= limits.peer_dead_after + 0.4
        await comm.close()


async def test_heartbeat_keeps_idle_healthy_link_alive(limits: Limits) -> None:
    async with server() as srv, await connect("127.0.0.1", srv.port, hello("c"), limits=limits) as comm:
        reading = asyncio.create_task(comm.recv())
        # Passing time is what is tested: three dead-peer periods of pure idleness.
        await asyncio.sleep(3 * limits.peer_dead_after)
        assert not reading.done() and not comm.closed
        assert comm.rtt is not None and comm.rtt < limits.heartbeat_interval
        await comm.send(TensorMsg("alive", np.zeros(1, np.uint8)))
        assert isinstance(await reading, TensorMsg)


async def test_slow_big_frame_is_not_mistaken_for_death() -> None:
    """A frame that takes longer than peer_dead_after to arrive, but keeps arriving."""
    limits = FAST.replace(read_chunk_bytes=4096)
    payload = TensorMsg("slow", np.arange(64 * 1024, dtype=np.uint8))
    pieces = b"".join(bytes(p) for p in frame_pieces(*encode(payload)))

    async def trickle_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decode(*await read_frame(reader))
        write_frame(writer, *encode(Welcome.of(hello("s"))))
        step = len(pieces) // 8
        for i in range(0, len(pieces), step):  # ~8 chunks, 0.1 s apart: 0.8 s > 0.5 s
            writer.write(pieces[i : i + step])
            await asyncio.sleep(0.1)
        await reader.read()

    async with raw_server(trickle_server) as port:
        async with await connect("127.0.0.1", port, hello("c"), limits=limits) as comm:
            out = await comm.recv()
            assert isinstance(out, TensorMsg) and np.array_equal(out.array, payload.array)


# ---- event loops ----------------------------------------------------------------------


@pytest.mark.parametrize("use_uvloop", [True, False], ids=["uvloop", "asyncio"])
def test_run_helper_with_both_loops(use_uvloop: bool) -> None:
    uvloop = pytest.importorskip("uvloop") if use_uvloop else None

    async def main() -> type:
        big = np.random.default_rng(1).integers(0, 2**31, 5 * 2**20 // 8, dtype=np.int64)
        async with server() as srv, await connect("127.0.0.1", srv.port, hello("c"), limits=FAST) as comm:
            await comm.send(TensorMsg("b", big))
            out = await comm.recv()
            assert isinstance(out, TensorMsg) and np.array_equal(out.array, big)
        return type(asyncio.get_running_loop())

    loop_type = run(main(), use_uvloop=use_uvloop)
    if uvloop is not None:
        assert issubclass(loop_type, uvloop.Loop)
    else:
        assert loop_type.__module__.startswith("asyncio")


# ---- module layout -----------------------------------------------------------------------


def test_the_wire_package_exports_each_name_from_its_home() -> None:
    """connect/serve/Server/... left comm.py for modules named after them; ``stealer.wire``
    gives the same objects."""
    import stealer.wire as wire
    from stealer.wire import client, loop, server

    for name, home in [
        ("connect", client), ("serve", server), ("Server", server), ("ServerStats", server),
        ("run", loop), ("install_event_loop_policy", loop),
    ]:
        assert getattr(wire, name) is getattr(home, name), name


def test_comm_imports_none_of_its_dependants() -> None:
    """comm.py is the bottom of the wire layer: handshake, client and server import it,
    never the other way round (the moved names resolve lazily, see comm.__getattr__)."""
    import ast

    import stealer.wire.comm as comm_module

    tree = ast.parse(open(comm_module.__file__, encoding="utf-8").read())
    runtime = [n for n in tree.body if isinstance(n, ast.ImportFrom)]  # module level only
    imported = {n.module for n in runtime} | {
        f"{n.module}.{a.name}" for n in runtime for a in n.names
    }
    for dependant in ("handshake", "client", "server"):
        assert f"stealer.wire.{dependant}" not in imported


@pytest.mark.parametrize("macs", [False, True], ids=["plain", "frame-macs"])
async def test_byte_counters_count_every_whole_frame_both_ways(macs: bool) -> None:
    """``bytes_in``/``bytes_out`` (served per peer on /metrics) count whole frames: what one
    side wrote is what the other read, and it is the frames' length as encoded, with their
    MAC tags, for sent and posted frames alike."""
    from stealer.wire.auth import TAG_BYTES

    quiet = FAST.replace(heartbeat_interval=30.0, peer_dead_after=60.0)  # no Pings meanwhile
    kw: dict[str, object] = dict(secret=b"correct horse battery staple 1234", authenticate_frames=True) if macs else {}
    async with server(limits=quiet, **kw) as srv, \
            await connect("127.0.0.1", srv.port, hello("c"), limits=quiet, **kw) as comm:
        await comm.send(TensorMsg("first", np.zeros(3, np.uint8)))
        await comm.recv()
        (far,) = srv.comms
        assert comm.bytes_out > 0 and far.bytes_in > 0  # the handshake and the first frame
        before = (comm.bytes_out, comm.bytes_in, far.bytes_in, far.bytes_out)
        msgs = [TensorMsg(f"m{i}", np.arange(10 + 1000 * i, dtype=np.float32)) for i in range(6)]
        want = 0
        for i, msg in enumerate(msgs):
            header, buffers = encode(msg, quiet)
            want += sum(memoryview(p).nbytes for p in frame_pieces(header, buffers, quiet)) + (TAG_BYTES if macs else 0)
            if i % 2:
                comm.post(msg)
            else:
                await comm.send(msg)
        for _ in msgs:
            await comm.recv()  # every echo read: the server read and wrote every frame
        sent, got, far_in, far_out = (comm.bytes_out - before[0], comm.bytes_in - before[1],
                                      far.bytes_in - before[2], far.bytes_out - before[3])
        assert sent == want == far_in
        assert far_out == want == got  # the echoes are the same frames
