"""Cluster secret, frame MACs and bounds, over real TCP sockets on 127.0.0.1.

The rogue-peer tests attack a plain :func:`stealer.wire.serve` server (an echo handler) with
garbage, lying length prefixes, a connection flood, slow-loris handshakes and wrong secrets
while an honest client keeps exchanging arrays with it. Rogues connect from other loopback
addresses (127.0.0.2-7, all routed to ``lo`` on Linux) so the per-address limit is what
stops them, as it would stop one hostile host on the LAN.

Timing constants are patched down through an explicit :class:`~stealer.config.Limits`
(as in ``test_comm.py``): frozen and never global, so the patched copy reaches only the
comms of the test that built it; the code paths are the production ones.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import struct
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import stealer.wire.auth as auth_mod
import stealer.wire.comm as comm_mod
from stealer.config import (
    DEFAULT_LIMITS,
    Limits,
    add_limit_args,
    add_security_args,
    limits_from_args,
    parse_limit,
)
from stealer.errors import (
    AuthError,
    CommClosedError,
    ConfigError,
    FrameAuthError,
    HandshakeRejected,
    ProtocolError,
    SecretError,
)
from stealer.wire import (
    AuthChallenge,
    AuthInit,
    AuthProof,
    ClusterKey,
    Comm,
    Hello,
    Message,
    Reject,
    Server,
    TensorMsg,
    Welcome,
    connect,
    decode,
    encode,
    load_secret,
    read_frame,
    serve,
)
from stealer.wire.auth import MIN_SECRET_BYTES, TAG_BYTES, FrameMac, Secret, Transcript, new_nonce
from stealer.wire.framing import frame_pieces

pytestmark = pytest.mark.timeout(120)

MODEL = "ab" * 32
SECRET = b"correct horse battery staple 1234"
WRONG = b"incorrect horse battery staple 99"

FAST = DEFAULT_LIMITS.replace(
    handshake_timeout=0.5,
    heartbeat_interval=0.1,
    peer_dead_after=0.5,
    connect_timeout=3.0,
    close_timeout=0.5,
)


from .test_comm import MODEL as _COMM_MODEL, echo, hello  # noqa: E402  (shared helpers)

assert _COMM_MODEL == MODEL


@asynccontextmanager
async def server(
    on_comm: Callable[[Comm], Awaitable[None]] = echo, limits: Limits = FAST, **kw: Any
) -> AsyncIterator[Server]:
    async with serve("127.0.0.1", 0, on_comm, lambda: hello("s"), limits=limits, **kw) as srv:
        yield srv


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    yield
    for _ in range(5):
        await asyncio.sleep(0)
    me = asyncio.current_task()
    leaked = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    assert not leaked, leaked


# ---- raw (hand-driven) peers -----------------------------------------------------------


def frame(msg: Message, mac: FrameMac | None = None) -> bytes:
    pieces = frame_pieces(*encode(msg))
    if mac is not None:
        pieces.append(mac.tag(pieces))
        mac.advance()
    return b"".join(bytes(p) for p in pieces)


async def read_msg(reader: asyncio.StreamReader, mac: FrameMac | None = None) -> Message:
    if mac is None:
        return decode(*await read_frame(reader))
    (n,) = struct.unpack(">I", await reader.readexactly(4))
    body = await reader.readexactly(n)
    tag = await reader.readexactly(TAG_BYTES)
    h = mac.hasher()
    h.update(struct.pack(">I", n) + body)
    assert mac.check(h, tag)
    from stealer.wire.framing import parse_body

    return decode(*parse_body(body))


async def open_from(port: int, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def wait_eof(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Read until the server closes the connection; return what it sent."""
    got = bytearray()
    async with asyncio.timeout(timeout):
        try:
            while data := await reader.read(65536):
                got += data
        except ConnectionError:
            pass
    return bytes(got)


def close_quietly(writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()


# ---- the secret --------------------------------------------------------------------------


def test_load_secret_file_env_and_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "secret"
    f.write_bytes(SECRET + b"\n")
    f.chmod(0o600)
    assert load_secret(f, environ={}) == SECRET  # trailing newline stripped
    assert load_secret(f, environ={"STEALER_SECRET": WRONG.decode()}) == SECRET  # file wins
    assert load_secret(None, environ={"STEALER_SECRET": WRONG.decode() + "\r\n"}) == WRONG
    assert load_secret(None, environ={}) is None  # open cluster
    short = tmp_path / "short"
    short.write_bytes(b"hunter2\n")
    for bad in (lambda: load_secret(short), lambda: load_secret(None, environ={"STEALER_SECRET": ""})):
        with pytest.raises(SecretError, match=f"at least {MIN_SECRET_BYTES}") as info:
            bad()
        assert "hunter2" not in str(info.value)
    with pytest.raises(SecretError, match="cannot read"):
        load_secret(tmp_path / "missing")
    f.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        load_secret(f)
    assert any("chmod 600" in r.getMessage() for r in caplog.records)
    s = load_secret(f)
    assert isinstance(s, Secret) and SECRET.decode() not in f"{s} {s!r} {[s]} %s" % (s,)
    assert "hidden" in repr(ClusterKey(SECRET)) and SECRET.decode() not in repr(ClusterKey(SECRET))
    with pytest.raises(ValueError):
        ClusterKey(b"too short")


async def test_secret_handshake_authenticates_both_sides() -> None:
    seen: list[Comm] = []

    async def handler(comm: Comm) -> None:
        seen.append(comm)
        await echo(comm)

    async with server(handler, secret=SECRET) as srv:
        async with await connect("127.0.0.1", srv.port, hello("c"), limits=FAST, secret=SECRET) as c:
            assert c.authenticated and not c.frame_mac
            assert isinstance(c.peer, Welcome) and c.peer.node_id == "s" * 32
            await c.send(TensorMsg("x", np.arange(6, dtype=np.int32)))
            out = await c.recv()
            assert isinstance(out, TensorMsg) and out.array.tolist() == list(range(6))
            assert seen[0].authenticated and seen[0].peer is not None and seen[0].peer.node_id == "c" * 32
    assert srv.stats.accepted == 1 and srv.stats.auth_failures == 0


@pytest.mark.parametrize(
    "server_kw, client_kw, error, match",
    [
        pytest.param({"secret": SECRET}, {"secret": WRONG}, AuthError, "failed to prove", id="wrong-secret"),
        pytest.param({"secret": SECRET}, {}, HandshakeRejected, "needs a secret", id="client-has-none"),
        pytest.param({}, {"secret": SECRET}, HandshakeRejected, "no cluster secret", id="server-has-none"),
        pytest.param(
            {"secret": SECRET, "authenticate_frames": True}, {"secret": SECRET}, HandshakeRejected,
            "frame authentication mismatch", id="frame-mac-server-only",
        ),
        pytest.param(
            {"secret": SECRET}, {"secret": SECRET, "authenticate_frames": True}, HandshakeRejected,
            "frame authentication mismatch", id="frame-mac-client-only",
        ),
    ],
)
async def test_mismatched_security_settings_are_rejected_clearly(
    server_kw: dict[str, Any], client_kw: dict[str, Any], error: type[Exception], match: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with server(**server_kw) as srv:
        with pytest.raises(error, match=match):
            await connect("127.0.0.1", srv.port, hello("c"), limits=FAST, **client_kw)
        # the server keeps serving peers with the right settings
        async with await connect("127.0.0.1", srv.port, hello("d"), limits=FAST, **server_kw):
            pass
    assert srv.stats.accepted == 1
    if match == "failed to prove":
        assert srv.stats.auth_failures == 1  # the client hung up instead of proving
    text = "\n".join(r.getMessage() for r in caplog.records)
    for s in (SECRET, WRONG):  # never logged, in any form
        assert s.decode() not in text and s.hex() not in text


def test_authenticate_frames_needs_a_secret() -> None:
    with pytest.raises(ValueError, match="needs a cluster secret"):
        serve("127.0.0.1", 0, echo, lambda: hello("s"), authenticate_frames=True)


async def test_open_cluster_warns_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(auth_mod, "_open_warned", False)
    async with server() as a, server() as b:
        async with await connect("127.0.0.1", a.port, hello("c"), limits=FAST):
            pass
        async with await connect("127.0.0.1", b.port, hello("c"), limits=FAST):
            pass
    open_warnings = [r for r in caplog.records if "cluster is OPEN" in r.getMessage()]
    assert len(open_warnings) == 1 and open_warnings[0].levelno == logging.WARNING


async def test_bad_proof_is_dropped_before_anything_else_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rogue pipelines a bogus proof, a Hello and a tensor: only its first two frames are read."""
    decoded: list[str] = []
    real_decode = comm_mod.decode

    def recording_decode(*args: Any, **kw: Any) -> Message:
        msg = real_decode(*args, **kw)
        decoded.append(msg.op)
        return msg

    monkeypatch.setattr(comm_mod, "decode", recording_decode)
    checked: list[str] = []

    def check_peer(h: Hello) -> None:
        checked.append(h.node_id)

    async with server(secret=SECRET, check_peer=check_peer) as srv:
        reader, writer = await open_from(srv.port)
        writer.write(frame(AuthInit("r" * 32, new_nonce())))
        challenge = await read_msg(reader)
        assert isinstance(challenge, AuthChallenge)
        writer.write(frame(AuthProof(challenge.proof)))  # reflect the server's own proof
        writer.write(frame(hello("r")) + frame(TensorMsg("t", np.zeros(1000, np.float32))))
        reply = await read_msg(reader)
        assert isinstance(reply, Reject) and "authentication failed" in reply.reason
        await wait_eof(reader, 2)
        close_quietly(writer)
    assert decoded == ["auth-init", "auth-proof"]
    assert checked == [] and srv.stats.auth_failures == 1 and srv.stats.accepted == 0


async def test_replayed_and_misbound_proofs_fail() -> None:
    """A proof is bound to both nonces and both node ids: replaying it, or using it for
    another identity, fails even for a client that once knew the secret."""
    key = ClusterKey(SECRET)

    async def start(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, nonce: bytes) -> Transcript:
        writer.write(frame(AuthInit("r" * 32, nonce)))
        ch = await read_msg(reader)
        assert isinstance(ch, AuthChallenge)
        return Transcript(nonce, ch.nonce, "r" * 32, ch.node_id, False, False)

    async with server(secret=SECRET) as srv:
        # a genuine session, recorded
        r1, w1 = await open_from(srv.port)
        nonce = new_nonce()
        t1 = await start(r1, w1, nonce)
        assert key.check_server_proof(t1, key.server_proof(t1))
        recorded = AuthProof(key.client_proof(t1))
        w1.write(frame(recorded) + frame(hello("r")))
        assert isinstance(await read_msg(r1), Welcome)
        close_quietly(w1)
        # replay the recorded AuthInit + AuthProof on a new connection: new server nonce
        r2, w2 = await open_from(srv.port)
        await start(r2, w2, nonce)
        w2.write(frame(recorded) + frame(hello("r")))
        reply = await read_msg(r2)
        assert isinstance(reply, Reject) and "authentication failed" in reply.reason
        close_quietly(w2)
        # a valid proof for id "r...", followed by a Hello claiming another node id
        r3, w3 = await open_from(srv.port)
        t3 = await start(r3, w3, new_nonce())
        w3.write(frame(AuthProof(key.client_proof(t3))) + frame(hello("m")))
        reply = await read_msg(r3)
        assert isinstance(reply, Reject) and "secret was proven by" in reply.reason
        close_quietly(w3)
    assert srv.stats.auth_failures == 1 and srv.stats.accepted == 1 and srv.stats.rejected == 1


def test_proofs_and_frame_keys_are_separated_by_role_and_session() -> None:
    key = ClusterKey(SECRET)
    t = Transcript(bytes(32), b"\x01" * 32, "c" * 32, "s" * 32, True, True)
    t2 = Transcript(bytes(32), b"\x02" * 32, "c" * 32, "s" * 32, True, True)
    assert key.server_proof(t) != key.client_proof(t)  # no reflection
    assert not key.check_client_proof(t, key.server_proof(t))
    assert key.server_proof(t) != key.server_proof(t2)  # no replay across sessions
    assert not ClusterKey(WRONG).check_server_proof(t, key.server_proof(t))
    c_send, c_recv = key.frame_macs(t, server=False)
    s_send, s_recv = key.frame_macs(t, server=True)
    body = [b"\x00\x00\x00\x05hello"]
    assert c_send.tag(body) == s_recv.tag(body)  # c2s agrees
    assert c_send.tag(body) != c_recv.tag(body)  # a frame reflected back fails
    first = c_send.tag(body)
    c_send.advance()
    assert c_send.tag(body) != first  # a frame replayed later in the stream fails


# ---- frame MACs --------------------------------------------------------------------------


async def test_frame_macs_roundtrip_big_arrays() -> None:
    big = np.random.default_rng(0).standard_normal((5 * 2**20) // 4).astype(np.float32)
    kw = dict(secret=SECRET, authenticate_frames=True)
    async with server(**kw) as srv, await connect("127.0.0.1", srv.port, hello("c"), limits=FAST, **kw) as c:
        assert c.frame_mac
        for i in range(3):
            await c.send(TensorMsg(f"t{i}", big, {"i": i}))
            out = await c.recv()
            assert isinstance(out, TensorMsg) and out.meta == {"i": i} and np.array_equal(out.array, big)
        await asyncio.sleep(0.3)  # a few Ping/Pong frames, MAC'd too
        await c.send(TensorMsg("after-pings", big[:10]))
        assert isinstance(await c.recv(), TensorMsg)


async def test_frames_posted_while_a_big_frame_is_tagged_follow_it() -> None:
    """A big frame's MAC is computed in a thread with its frame number taken: frames posted
    meanwhile must wait and go out after it, numbered after it, or the peer drops the link."""
    from stealer.wire.comm import MAC_OFFLOAD_BYTES

    big = np.ones(MAC_OFFLOAD_BYTES // 4 + 10, np.float32)
    kw = dict(secret=SECRET, authenticate_frames=True)
    async with server(**kw) as srv, await connect("127.0.0.1", srv.port, hello("c"), limits=FAST, **kw) as c:
        sending = asyncio.ensure_future(c.send(TensorMsg("big", big)))
        await asyncio.sleep(0)  # the big send is now in its MAC thread
        assert c._tagging
        for i in range(5):
            c.post(TensorMsg(f"small{i}", np.full(4, i, np.int32)))
        await sending
        tags = []
        for _ in range(6):
            out = await c.recv()
            assert isinstance(out, TensorMsg)
            tags.append(out.tag)
        assert tags == ["big"] + [f"small{i}" for i in range(5)]
        assert not c.closed


@asynccontextmanager
async def proxy(port: int, mangle: Callable[[bytes], list[bytes]]) -> AsyncIterator[tuple[int, asyncio.Event]]:
    """A man in the middle: client->server chunks pass through ``mangle`` once armed."""
    armed = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()

    async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, tamper: bool) -> None:
        try:
            while data := await r.read(1 << 20):
                for part in mangle(data) if tamper and armed.is_set() else [data]:
                    w.write(part)
                    await w.drain()
        except ConnectionError:
            pass
        finally:
            w.transport.abort()

    def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        async def run() -> None:
            ur, uw = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.gather(pump(r, uw, True), pump(ur, w, False))

        t = asyncio.get_running_loop().create_task(run())
        tasks.add(t)
        t.add_done_callback(tasks.discard)

    srv = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1], armed
    finally:
        srv.close()
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await srv.wait_closed()


def flip_last_byte(data: bytes) -> list[bytes]:
    return [data[:-1] + bytes([data[-1] ^ 1])]


def duplicate(data: bytes) -> list[bytes]:
    return [data, data]


@pytest.mark.parametrize("mangle", [flip_last_byte, duplicate], ids=["tamper", "replay"])
async def test_tampered_or_replayed_frame_closes_only_that_connection(
    mangle: Callable[[bytes], list[bytes]],
) -> None:
    errors: list[BaseException] = []

    async def handler(comm: Comm) -> None:
        try:
            await echo(comm)
        except ProtocolError as e:
            errors.append(e)
            raise

    kw = dict(secret=SECRET, authenticate_frames=True)
    limits = FAST.replace(heartbeat_interval=5.0, peer_dead_after=10.0)  # no Pings in the way
    async with server(handler, limits=limits, **kw) as srv, proxy(srv.port, mangle) as (pport, armed):
        async with await connect("127.0.0.1", srv.port, hello("h"), limits=limits, **kw) as honest:
            c = await connect("127.0.0.1", pport, hello("c"), limits=limits, **kw)
            await c.send(TensorMsg("ok", np.ones(4, np.float32)))
            assert isinstance(await c.recv(), TensorMsg)
            armed.set()
            await c.send(TensorMsg("bad", np.ones(4, np.float32)))
            with pytest.raises(CommClosedError):
                while True:  # a replayed frame: the first copy is echoed, the second kills it
                    await c.recv()
            await c.close()
            assert len(errors) == 1 and isinstance(errors[0], FrameAuthError)
            await honest.send(TensorMsg("still", np.zeros(2, np.uint8)))
            assert isinstance(await honest.recv(), TensorMsg)
    assert srv.stats.protocol_errors == 1


# ---- bounds ------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def test_liar_after_handshake_costs_what_it_sent_not_what_it_claimed() -> None:
    """An open cluster: a peer with a valid Hello announces a 200 MB frame, sends 1 MiB and
    stalls. It is dropped by the heartbeat; the server held ~1 MiB for it, not 200 MB."""
    errors: list[BaseException] = []

    async def handler(comm: Comm) -> None:
        try:
            await echo(comm)
        except CommClosedError as e:
            errors.append(e)
            raise

    async with server(handler) as srv:
        reader, writer = await open_from(srv.port)
        writer.write(frame(hello("r")))
        assert isinstance(await read_msg(reader), Welcome)
        tracemalloc.start()
        try:
            writer.write(struct.pack(">I", 200_000_000) + bytes(1 << 20))
            await wait_eof(reader, 5)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        close_quietly(writer)
    assert peak < 8 * 2**20, peak
    assert len(errors) == 1 and "silent" in str(errors[0])


async def test_per_ip_limit_leaves_room_for_others() -> None:
    limits = FAST.replace(max_connections=10, max_connections_per_ip=3)
    async with server(limits=limits) as srv:
        held = [await open_from(srv.port, "127.0.0.2") for _ in range(3)]
        await asyncio.sleep(0.05)
        r, w = await open_from(srv.port, "127.0.0.2")
        reply = await read_msg(r)
        assert isinstance(reply, Reject) and "too many connections from 127.0.0.2" in reply.reason
        close_quietly(w)
        async with await connect("127.0.0.1", srv.port, hello("c"), limits=limits):
            pass
        for _, w in held:
            close_quietly(w)
    assert srv.stats.refused_per_ip == 1 and srv.stats.accepted == 1


async def test_ping_flood_does_not_pile_up_pongs() -> None:
    """A peer that floods Pings and never reads: Pongs are posted (no task each), and none
    once posted bytes are waiting for it, so what it makes us hold stays small."""
    from stealer.wire import Ping
    from stealer.wire.comm import POST_MAX_BYTES

    peak_tasks = peak_backlog = 0

    async def handler(comm: Comm) -> None:
        async def watch() -> None:
            nonlocal peak_tasks, peak_backlog
            while True:
                peak_tasks = max(peak_tasks, len(comm._tasks))
                peak_backlog = max(peak_backlog, comm._posted_backlog())
                await asyncio.sleep(0.005)

        w = asyncio.create_task(watch())
        try:
            await echo(comm)
        finally:
            w.cancel()
            await asyncio.gather(w, return_exceptions=True)

    async with server(handler, heartbeat=False) as srv:
        reader, writer = await open_from(srv.port)
        writer.transport.pause_reading()  # never read: Pongs cannot be delivered
        writer.write(frame(hello("r")))
        await asyncio.sleep(0.05)
        ping = frame(Ping(1))
        for _ in range(20):
            writer.write(ping * 2000)
            await writer.drain()
        await asyncio.sleep(0.1)
        close_quietly(writer)
    assert peak_tasks == 0, peak_tasks
    assert peak_backlog <= POST_MAX_BYTES + 1024, peak_backlog


# ---- the rogue-peer test -----------------------------------------------------------------


async def _garbage(port: int, rng: random.Random) -> None:
    r, w = await open_from(port, "127.0.0.3")
    w.write(rng.randbytes(rng.randrange(1, 4096)))
    await wait_eof(r, 5)
    close_quietly(w)


async def _liar(port: int, stall: bool) -> None:
    r, w = await open_from(port, "127.0.0.4")
    w.write(struct.pack(">I", 200_000_000) + bytes(1000))  # claims 200 MB
    if stall:
        await wait_eof(r, 5)
    close_quietly(w)


async def _flood(port: int, n: int, batch: int = 50) -> int:
    """Open ``n`` connections from one address, hold them until the server drops each."""
    dropped = 0
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for i in range(0, n, batch):
        conns += await asyncio.gather(*(open_from(port, "127.0.0.2") for _ in range(min(batch, n - i))))
    for r, _ in conns:
        await wait_eof(r, 5)
        dropped += 1
    for _, w in conns:
        close_quietly(w)
    return dropped


async def _slow_loris(port: int) -> None:
    r, w = await open_from(port, "127.0.0.5")
    dropped = asyncio.ensure_future(wait_eof(r, 5))
    for b in frame(AuthInit("l" * 32, new_nonce())):
        if dropped.done():
            break
        w.write(bytes([b]))  # one byte every 50 ms: the frame would take seconds
        await asyncio.sleep(0.05)
    await dropped
    close_quietly(w)


async def _bogus_proof(port: int) -> None:
    r, w = await open_from(port, "127.0.0.6")
    w.write(frame(AuthInit("b" * 32, new_nonce())))
    try:
        ch = await read_msg(r)
        assert isinstance(ch, AuthChallenge)
        w.write(frame(AuthProof(os.urandom(32))) + frame(hello("b")))
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    await wait_eof(r, 5)
    close_quietly(w)


async def _liar_after_hello(port: int) -> None:
    r, w = await open_from(port, "127.0.0.7")
    w.write(frame(hello("q")))
    assert isinstance(await read_msg(r), Welcome)
    w.write(struct.pack(">I", 200_000_000) + bytes(64 * 1024))
    await wait_eof(r, 5)
    close_quietly(w)


async def _wrong_secret(port: int) -> None:
    with pytest.raises(AuthError):
        await connect("127.0.0.1", port, hello("w"), limits=FAST, secret=WRONG)


@pytest.mark.parametrize("secured", [True, False], ids=["secret", "open"])
async def test_rogue_peers_do_not_disturb_the_honest_cluster(
    secured: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="stealer.wire")  # comm, server, handshake
    limits = FAST.replace(max_connections=64, max_connections_per_ip=8)
    kw: dict[str, Any] = {"secret": SECRET} if secured else {}
    checked: list[str] = []

    def check_peer(h: Hello) -> None:
        checked.append(h.node_id)

    rng = random.Random(1)
    arrays = [np.random.default_rng(i).standard_normal(64 * 1024).astype(np.float32) for i in range(4)]
    async with server(limits=limits, check_peer=check_peer, **kw) as srv:
        async with await connect("127.0.0.1", srv.port, hello("h"), limits=limits, **kw) as honest:
            await asyncio.sleep(0.1)
            idle = rss_bytes()
            peak = idle
            done = asyncio.Event()

            async def sample() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, rss_bytes())
                    await asyncio.sleep(0.01)

            completed = 0

            async def honest_traffic() -> None:
                nonlocal completed
                while not done.is_set():
                    a = arrays[completed % len(arrays)]
                    await honest.send(TensorMsg(f"h{completed}", a))
                    out = await honest.recv()
                    assert isinstance(out, TensorMsg) and out.tag == f"h{completed}"
                    assert np.array_equal(out.array, a)
                    completed += 1
                    await asyncio.sleep(0.002)  # a steady stream, not a busy loop

            async def newcomer() -> None:
                await asyncio.sleep(0.2)  # in the middle of the attack
                async with await connect("127.0.0.1", srv.port, hello("n"), limits=limits, **kw) as c:
                    await c.send(TensorMsg("n", arrays[0]))
                    assert isinstance(await c.recv(), TensorMsg)

            sampler = asyncio.create_task(sample())
            traffic = asyncio.create_task(honest_traffic())
            t0 = time.monotonic()
            rogues = [
                *(_garbage(srv.port, rng) for _ in range(20)),
                *(_liar(srv.port, stall=i % 2 == 0) for i in range(20)),
                _flood(srv.port, 300),
                *(_slow_loris(srv.port) for _ in range(10)),
                *(
                    [*(_bogus_proof(srv.port) for _ in range(5)), *(_wrong_secret(srv.port) for _ in range(5))]
                    if secured else [_liar_after_hello(srv.port) for _ in range(5)]
                ),
                newcomer(),
            ]
            results = await asyncio.gather(*rogues)
            attack = time.monotonic() - t0
            await asyncio.sleep(0.1)
            done.set()
            await asyncio.gather(sampler, traffic)
            assert srv.connections == 1 and len(srv.comms) == 1  # every rogue dropped
            await honest.send(TensorMsg("last", arrays[0]))
            assert isinstance(await honest.recv(), TensorMsg)

    st = srv.stats
    print(
        f"\n[{'secret' if secured else 'open'}] attack {attack:.2f} s, honest exchanges "
        f"{completed}, RSS idle {idle / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB "
        f"(+{(peak - idle) / 2**20:.1f}), stats {st}"
    )
    assert completed >= 10
    assert results[40] == 300  # the flood was dropped connection by connection
    assert peak - idle < 48 * 2**20, (idle, peak)
    assert st.refused_per_ip >= 200 and st.handshake_timeouts >= 10 and st.handshake_errors >= 10
    if secured:
        assert st.auth_failures >= 10 and st.accepted == 2
        assert sorted(checked) == ["h" * 32, "n" * 32]  # no rogue Hello was ever looked at
    else:
        assert st.accepted == 7
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("stealer")]
    assert len(warnings) <= 20, [r.getMessage() for r in warnings]  # once per (event, address)


# ---- --limit and security flags ----------------------------------------------------------


def test_limit_args() -> None:
    p = argparse.ArgumentParser()
    add_limit_args(p)
    add_security_args(p)
    args = p.parse_args(
        ["--limit", "max_frame_bytes=512M", "--limit", "handshake-timeout=10", "--limit",
         "max_connections_per_ip=4", "--secret-file", "/x", "--authenticate-frames"]
    )
    lim = limits_from_args(args)
    assert lim.max_frame_bytes == 512 * 2**20 and lim.handshake_timeout == 10.0
    assert lim.max_connections_per_ip == 4 and args.secret_file == "/x" and args.authenticate_frames
    assert limits_from_args(p.parse_args([])) is DEFAULT_LIMITS
    assert parse_limit("reuse_cache_bytes=1GiB") == ("reuse_cache_bytes", 2**30)
    assert parse_limit("max_queued_frames=128") == ("max_queued_frames", 128)
    for bad, match in [
        ("max_frame_byte=1", "did you mean max_frame_bytes"),
        ("max_frame_bytes", "NAME=VALUE"),
        ("max_frame_bytes=1.5", "whole number"),
        ("max_frame_bytes=lots", "whole number"),
        ("handshake_timeout=soon", "seconds"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=match):
            parse_limit(bad)
    with pytest.raises(ConfigError, match="peer_dead_after"):
        limits_from_args(argparse.Namespace(limits=[("peer_dead_after", 0.1)]))
    with pytest.raises(ConfigError, match="> 0"):
        limits_from_args(argparse.Namespace(limits=[("max_inflight_per_peer", 0)]))
    with pytest.raises(TypeError, match="must be an int"):
        DEFAULT_LIMITS.replace(max_connections=2.5)
