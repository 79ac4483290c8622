"""Property-based fuzzing of framing and decoding, and a fuzzed server over real sockets.

The oracle is the atheris target's own :func:`tools.fuzz_wire.check_input`: any input
decodes to a valid message that survives re-encoding, or raises
:class:`~stealer.errors.ProtocolError` (or, read as a stream, ends mid-frame), and nothing
else. Hypothesis generates inputs that reach deep into the decoder: well-formed frames
whose headers carry the wrong op, wrong field types, shapes, dtypes and byte counts.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import struct
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stealer.config import DEFAULT_LIMITS
from stealer.errors import CommClosedError, ProtocolError
from stealer.wire import (
    DTYPES,
    PROTOCOL_VERSION,
    AuthInit,
    Comm,
    Hello,
    TensorMsg,
    Welcome,
    connect,
    decode,
    encode,
    message_types,
    read_frame,
    serve,
)
from stealer.wire.auth import ClusterKey, Transcript
from stealer.wire.framing import frame_pieces
from stealer.wire.messages import _BY_OP
from tools.fuzz_wire import build_frame, check_input, mutate, mutate_structured, seed_frames

pytestmark = pytest.mark.timeout(120)

SEEDS = seed_frames()
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- strategies ------------------------------------------------------------------------

_plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=8) | st.binary(max_size=40),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=8,
)
_ops = st.sampled_from(sorted(message_types())) | st.text(max_size=6)
_dtype_names = st.sampled_from(sorted(DTYPES)) | st.sampled_from(["float64", "<f4", "object", "V8", "", "S4"])
_dims = st.integers(-2, 6) | st.sampled_from([2**24, 2**24 + 1, 2**31, 2**40]) | st.floats(0, 4)


@st.composite
def hostile_frames(draw: st.DrawFn) -> bytes:
    """A well-formed frame whose header may say anything about its fields and arrays:
    array form (``[[[dtype, shape], ...], [op, field...]]``) or, now and then, the map
    envelope of stable messages."""
    op = draw(_ops)
    schema = _BY_OP.get(op)
    names = list(schema.fields) if schema else []
    name_st = st.sampled_from(names) | st.text(max_size=4) if names else st.text(max_size=4)
    descs, buffers = [], []
    for _ in range(draw(st.integers(0, 3))):
        dtype = draw(_dtype_names)
        shape = draw(st.lists(_dims, max_size=4) | st.sampled_from([None, 3, "x", [[1]]]))
        true_len = (
            math.prod(shape) * DTYPES[dtype].itemsize
            if dtype in DTYPES and isinstance(shape, list) and all(type(d) is int and 0 <= d < 64 for d in shape)
            else None
        )
        actual = draw(st.sampled_from([true_len, 0, 3, 16]) if true_len is not None and true_len < 4096 else st.sampled_from([0, 3, 16]))
        descs.append([dtype, shape])
        buffers.append(draw(st.binary(min_size=actual, max_size=actual)))
    # field values: plain data, or buffer indices (what an array field holds)
    value = _plain | st.integers(-1, 4)
    if draw(st.integers(0, 4)) == 0:
        fields = draw(st.dictionaries(name_st, _plain, max_size=6))
        header: Any = {"op": op, "f": fields, "a": descs, "n": [len(b) for b in buffers]}
        if draw(st.booleans()):  # occasionally break the envelope itself
            header[draw(st.sampled_from(["op", "f", "a", "n", "extra"]))] = draw(_plain)
        return build_frame(header, buffers)
    header = [descs, [op, *draw(st.lists(value, max_size=len(names) + 2))]]
    if draw(st.booleans()):  # occasionally break the envelope itself
        k = draw(st.integers(0, 2))
        if k < 2:
            header[k] = draw(_plain)
        else:
            header.append(draw(_plain))
    return build_frame(header, buffers)


def check_both_paths(data: bytes) -> None:
    check_input(data)
    check_input(data[4:])


# ---- properties ------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=1024))
def test_random_bytes_give_a_message_or_protocol_error(data: bytes) -> None:
    check_both_paths(data)


@FUZZ
@given(hostile_frames())
def test_hostile_headers_give_a_message_or_protocol_error(data: bytes) -> None:
    check_both_paths(data)


@FUZZ
@given(st.randoms(use_true_random=False))
def test_mutated_valid_frames_give_a_message_or_protocol_error(rng: random.Random) -> None:
    check_both_paths(mutate(rng.choice(SEEDS), rng))
    check_both_paths(mutate_structured(rng))


def test_every_truncation_of_a_stream_ends_mid_frame_never_in_error() -> None:
    stream = b"".join(SEEDS[:6])
    ends = np.cumsum([len(s) for s in SEEDS[:6]])

    async def count(data: bytes) -> tuple[int, str]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        n = 0
        while True:
            try:
                decode(*await read_frame(reader))
            except asyncio.IncompleteReadError:
                return n, "incomplete"
            except ProtocolError as e:  # pragma: no cover - the assertion below reports it
                return n, f"protocol error: {e}"
            n += 1

    loop = asyncio.new_event_loop()
    try:
        for k in range(len(stream)):
            n, how = loop.run_until_complete(count(stream[:k]))
            assert (n, how) == (int(np.searchsorted(ends, k, side="right")), "incomplete"), k
    finally:
        loop.close()


@pytest.mark.parametrize("claimed", [2**31, 2**32 - 1, 200_000_000])
async def test_frame_claiming_gigabytes_allocates_under_1_mib(claimed: int) -> None:
    """Even with limits that allow it, a frame that claims 2 GiB and sends 64 KiB costs
    what it sent (the body buffer grows as bytes arrive)."""
    limits = DEFAULT_LIMITS.replace(max_frame_bytes=2**32 - 1)
    reader = asyncio.StreamReader()
    reader.feed_data(struct.pack(">I", claimed) + bytes(64 * 1024))
    reader.feed_eof()
    tracemalloc.start()
    try:
        with pytest.raises(asyncio.IncompleteReadError):
            await read_frame(reader, limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20, peak


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_change_to_a_maced_frame_fails_its_check(data: st.DataObject) -> None:
    key = ClusterKey(b"0123456789abcdef0123")
    t = Transcript(bytes(32), b"\x01" * 32, "c" * 32, "s" * 32, True, True)
    send, _ = key.frame_macs(t, server=False)
    _, recv = key.frame_macs(t, server=True)
    frame = data.draw(st.sampled_from(SEEDS))
    wire = bytearray(frame + send.tag([frame]))
    i = data.draw(st.integers(0, len(wire) - 1))
    wire[i] ^= 1 << data.draw(st.integers(0, 7))
    h = recv.hasher()
    h.update(wire[: len(frame)])
    assert not recv.check(h, bytes(wire[len(frame) :]))


# ---- over real sockets -----------------------------------------------------------------

MODEL = "ab" * 32
FAST = DEFAULT_LIMITS.replace(handshake_timeout=0.5, heartbeat_interval=0.1, peer_dead_after=0.5, close_timeout=0.5)


def hello(node: str) -> Hello:
    return Hello(PROTOCOL_VERSION, node * 32, "worker", 0, 2, MODEL, 2**28)


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    yield
    for _ in range(5):
        await asyncio.sleep(0)
    me = asyncio.current_task()
    leaked = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    assert not leaked, leaked


def _frame(msg: Any) -> bytes:
    return b"".join(bytes(p) for p in frame_pieces(*encode(msg)))


async def _send_fuzz(port: int, data: bytes, handshake: bool) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if handshake:
            writer.write(_frame(hello("f")))
            assert isinstance(decode(*await read_frame(reader)), Welcome)
        writer.write(data)
        writer.write_eof()
        async with asyncio.timeout(5):
            while await reader.read(65536):
                pass
    except ConnectionError:
        pass
    finally:
        writer.transport.abort()


@pytest.mark.parametrize("secret", [None, b"fuzzing-secret-0123456789"], ids=["open", "secret"])
async def test_fuzzed_peers_close_their_own_connection_only(
    secret: bytes | None, caplog: pytest.LogCaptureFixture
) -> None:
    """N connections each send one random or mutated frame (after a real handshake in
    the open cluster, as the handshake itself with a secret); each is closed, none
    disturbs the server, which then serves an honest client."""
    outcomes: list[str] = []

    async def record(comm: Comm) -> None:
        try:
            while True:
                await comm.send(await comm.recv())
        except ProtocolError:
            outcomes.append("protocol-error")
            raise
        except CommClosedError:
            outcomes.append("closed")
            raise

    rng = random.Random(7)
    handshake_seeds = [_frame(hello("z")), _frame(AuthInit("z" * 32, bytes(32)))]
    n = 120
    async with serve("127.0.0.1", 0, record, lambda: hello("s"), limits=FAST, secret=secret) as srv:
        inputs = []
        for _ in range(n):
            if secret is None:
                inputs.append(mutate_structured(rng) if rng.random() < 0.6 else mutate(rng.choice(SEEDS), rng))
            else:
                inputs.append(mutate(rng.choice(handshake_seeds), rng))
        for i in range(0, n, 12):
            await asyncio.gather(*(_send_fuzz(srv.port, d, handshake=secret is None) for d in inputs[i : i + 12]))
        async with await connect("127.0.0.1", srv.port, hello("h"), limits=FAST, secret=secret) as honest:
            await honest.send(TensorMsg("after", np.arange(5, dtype=np.int64)))
            out = await honest.recv()
            assert isinstance(out, TensorMsg) and out.array.tolist() == list(range(5))
        for _ in range(50):
            if srv.connections == 0:
                break
            await asyncio.sleep(0.02)
        assert srv.connections == 0
    st_ = srv.stats
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a handler or task failed"
    if secret is None:
        assert st_.accepted == n + 1 and len(outcomes) == n + 1
        assert outcomes.count("protocol-error") == st_.protocol_errors >= n // 2
    else:
        assert st_.accepted == 1  # no mutated handshake got in
        assert st_.handshake_errors + st_.handshake_timeouts + st_.rejected + st_.auth_failures == n
