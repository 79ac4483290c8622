"""Messages and framing, with no sockets: round trips, and hostile bytes of every kind."""

from __future__ import annotations

import asyncio
import dataclasses
import struct
import tracemalloc
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stealer.config import DEFAULT_LIMITS, Limits
from stealer.errors import ProtocolError
from stealer.wire import (
    DTYPES,
    PROTOCOL_VERSION,
    AuthChallenge,
    AuthInit,
    AuthProof,
    Goodbye,
    Hello,
    Message,
    Ping,
    Pong,
    Reject,
    TensorMsg,
    Welcome,
    decode,
    encode,
    message_types,
    register,
)
from stealer.wire.messages import (
    FrameDone,
    ShardAssign,
    ShardReady,
    ShardResult,
    ShardTask,
    FrameDrop,
    FrameFailed,
    FrameGo,
    FrameUnknown,
    FrameWait,
    TaskFailed,
    TaskStarted,
    GatewayClaim,
    FrameStart,
    StealReply,
    StealRequest,
    Preview,
    Status,
    RegionReply,
    RegionRequest,
    StripsFetch,
    StripsRelease,
    OutputsFetch,
    OutputsMissing,
    OutputsRelease,
    TilesRedo,
    StripsReply,
    StripsRequest,
    TailDone,
    TileAck,
    TilesIn,
    TileDone,
)
from stealer.wire.framing import frame_pieces, parse_body, read_frame, read_length

pytestmark = pytest.mark.timeout(120)

HELLO = Hello(PROTOCOL_VERSION, "a" * 32, "worker", 7000, 4, "f00d" * 16, 2**30)


def frame_bytes(msg: Message, limits: Limits = DEFAULT_LIMITS) -> bytes:
    header, buffers = encode(msg, limits)
    return b"".join(bytes(p) for p in frame_pieces(header, buffers, limits))


def raw_frame(header: Any, buffers: Sequence[bytes] = (), *, pack: bool = True) -> bytes:
    """A frame around an arbitrary (possibly wrong) header object."""
    hbytes = msgpack.packb(header, use_bin_type=True) if pack else header
    views = [memoryview(b) for b in buffers]
    return b"".join(bytes(p) for p in frame_pieces(hbytes, views))


def roundtrip(msg: Message, limits: Limits = DEFAULT_LIMITS) -> Message:
    data = frame_bytes(msg, limits)
    (n,) = struct.unpack(">I", data[:4])
    assert n == len(data) - 4
    header, buffers = parse_body(data[4:], limits)
    return decode(header, buffers, limits)


def assert_same(a: Message, b: Message) -> None:
    assert type(a) is type(b)
    for name in a.__struct_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            assert y.dtype == x.dtype.newbyteorder("<") and y.shape == x.shape
            np.testing.assert_array_equal(x, y)
        else:
            assert x == y, name


def body_of(data: bytes) -> bytes:
    return data[4:]


def stream(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


# ---- round trips ----------------------------------------------------------------------


SAMPLES = [
    pytest.param(HELLO, id="hello"),
    pytest.param(Welcome.of(HELLO), id="welcome"),
    pytest.param(Reject("model hash mismatch: ümlaut ok"), id="reject"),
    pytest.param(AuthInit("a" * 32, bytes(range(32)), True), id="auth-init"),
    pytest.param(AuthChallenge("b" * 32, b"\x01" * 32, b"\x02" * 32), id="auth-challenge"),
    pytest.param(AuthProof(b"\xff" * 32), id="auth-proof"),
    pytest.param(Ping(0), id="ping"),
    pytest.param(Pong(2**63), id="pong-big-seq"),
    pytest.param(Goodbye(), id="goodbye-default"),
    pytest.param(Goodbye("shutting down"), id="goodbye"),
    pytest.param(
        TensorMsg("t", np.arange(24, dtype=np.float32).reshape(2, 3, 4), {"tile": [1, 2]}),
        id="tensor",
    ),
    pytest.param(
        TensorMsg(
            "meta",
            np.zeros((0, 5), np.int64),
            {"a": None, "b": True, "c": 1.5, "d": b"\x00raw", "e": {"nested": [1, "x"]}},
        ),
        id="tensor-empty-meta-types",
    ),
    pytest.param(TensorMsg("scalar", np.array(3, dtype=np.int32)), id="tensor-0d"),
    pytest.param(Status(3, 1), id="status"),
    pytest.param(Status(3, 1, 2, 1e9, 0.25, 40, 7, 2**40, 12345, True), id="status-dashboard"),
    pytest.param(Status(3, 1, watching=True, preview_side=1280, preview_interval=0.0), id="status-previews"),
    pytest.param(Preview("n1/0", 7, 640, 480, np.frombuffer(b"\xff\xd8jpeg\xff\xd9", np.uint8)), id="preview"),
    pytest.param(StealRequest(7, accept_tail=False), id="steal"),
    pytest.param(StealReply(7, False), id="steal-reply-none"),
    pytest.param(
        StealReply(8, True, "n1/0", 12, 4, "5x5:16:quad", [0, 50, 10, 60], 640, 480,
                   np.ones((3, 50, 50), np.float32)),
        id="steal-reply",
    ),
    pytest.param(
        StealReply(8, True, "n1/0", 12, 4, "5x5:16:quad", [0, 50, 10, 60], 640, 480,
                   pixels=np.ones((3, 40, 42), np.uint8), pixel_origin=[0, 8]),
        id="steal-reply-pixels",
    ),
    pytest.param(
        StealReply(8, True, "n1/0", 12, 6, "5x5:16:quad", [0, 10, 10, 20], 640, 480,
                   pixels=np.ones((3, 8, 9), np.uint8), pixel_origin=[0, 8], holders={"n2": [3]},
                   strips_meta=[[1, 2, 3, 4]], strips=np.ones(24, np.float32)),
        id="steal-reply-with-strips",
    ),
    pytest.param(FrameStart("n1/0", 2**40, "2x3:16:none", 608, 608), id="frame-start"),
    pytest.param(StripsRequest(1, "n1/0", 3, 5, "5x5:16:quad"), id="strips-request"),
    pytest.param(StripsReply(1, True, [[4, 2, 1, 3]], np.arange(6, dtype=np.float32)), id="strips-reply"),
    pytest.param(StripsReply(1, True, holders={"a" * 32: [1, 4], "b" * 32: [2]}), id="strips-reply-holders"),
    pytest.param(StripsFetch(3, "n1/0", 3, [1, 4]), id="strips-fetch"),
    pytest.param(StripsRelease("n1/0", 3), id="strips-release"),
    pytest.param(OutputsFetch(9, "n1/0", 3, [0, 2, 5]), id="outputs-fetch"),
    pytest.param(OutputsRelease("n1/0", 3), id="outputs-release"),
    pytest.param(OutputsMissing("n1/0", 3, "n2"), id="outputs-missing"),
    pytest.param(TilesRedo("n1/0", 3, [1, 4]), id="tiles-redo"),
    pytest.param(TileDone("n1/0", 3, 2, "5x5:16:quad", "full", np.empty(0, np.float32), kept=True), id="tile-done-kept"),
    pytest.param(StealReply(4, True, "n1/0", 3, -1, "2x2:16:none", [], 608, 608, None,
                            holders={"n2": [0, 1], "n3": [2, 3]}), id="steal-reply-tail-kept"),
    pytest.param(RegionRequest(2, "n1/0", 3, 5), id="region-request"),
    pytest.param(RegionReply(2, True, [0, 4, 8, 12], np.ones((3, 4, 4), np.float32)), id="region-reply"),
    pytest.param(
        TileDone("n1/0", 3, 5, "5x5:16:quad", "reuse", np.zeros((4, 2, 2), np.float32),
                 [1, 4], 0.25),
        id="tile-done",
    ),
    pytest.param(TileAck("n1/0", 3, 5), id="tile-ack"),
    pytest.param(TileAck("n1/0", 3, 5, "n2", [1, 4]), id="tile-ack-holder"),
    pytest.param(TilesIn("n1/0", 3), id="tiles-in"),
    pytest.param(TailDone("n1/0", 3, "ab" * 32, [{"cls": 1, "prob": 0.5}], 1.5), id="tail-done"),
    pytest.param(FrameDone("n1/0", 3), id="frame-done"),
    pytest.param(GatewayClaim(2), id="gateway-claim"),
    pytest.param(FrameDrop("n1/0", 9), id="frame-drop"),
    pytest.param(TaskFailed("n1/0", 9, 2, "malformed grant"), id="task-failed"),
    pytest.param(FrameFailed("n1/0", 9, -1, "tail failed"), id="frame-failed"),
    pytest.param(FrameWait("n1/0", 9), id="frame-wait"),
    pytest.param(TaskStarted("n1/0", 9, 3), id="task-started"),
    pytest.param(FrameGo("n1/0", 9), id="frame-go"),
    pytest.param(FrameUnknown("n1/0", 9), id="frame-unknown"),
    pytest.param(TailDone("n1/0", 3, "ab" * 32, recovered=[[12, 1], [14, 0]]), id="tail-done-recovered"),
    pytest.param(ShardAssign(3, [[12, 0, 512, 0, 2], [14, 0, 512, 1, 2]]), id="shard-assign"),
    pytest.param(ShardReady(3, True, 4096), id="shard-ready"),
    pytest.param(ShardTask(7, 3, 12, 0, 512, False, True, np.ones((4, 3, 3), np.float32)), id="shard-task"),
    pytest.param(ShardResult(7, True, np.ones((5, 3, 3), np.float32), 0.25), id="shard-result"),
    pytest.param(ShardResult(7, False, error="not held here"), id="shard-result-failed"),
]


@pytest.mark.parametrize(
    "make, needle",
    [
        pytest.param(lambda: StealReply(1, True, "n/0", 1, 2), "exactly one", id="grant-without-data"),
        pytest.param(lambda: FrameStart("", 1, "p", 1, 1), "source", id="empty-source"),
        pytest.param(lambda: Status(1, 1, busy=1.5), "busy", id="busy-over-one"),
        pytest.param(lambda: Status(1, 1, bytes_in=-1), "out of range", id="negative-bytes"),
        pytest.param(lambda: Status(1, 1, preview_side=4097), "preview side", id="preview-side-too-big"),
        pytest.param(lambda: Status(1, 1, preview_side=-1), "preview side", id="preview-side-negative"),
        pytest.param(lambda: Status(1, 1, preview_interval=float("nan")), "preview interval", id="preview-interval-nan"),
        pytest.param(lambda: Status(1, 1, preview_interval=-0.5), "preview interval", id="preview-interval-negative"),
        pytest.param(lambda: Preview("n/0", 1, 0, 480, np.zeros(1, np.uint8)), "image size", id="preview-no-width"),
        pytest.param(lambda: TileDone("n/0", -1, 0, "p", "full", np.zeros(1, np.float32)),
                     "negative", id="negative-frame"),
        pytest.param(lambda: ShardAssign(1, [[3, 5, 5, 0, 2]]), "bad holding", id="shard-empty-range"),
        pytest.param(lambda: ShardAssign(1, [[3, 0, 5, 2, 2]]), "bad holding", id="shard-parity-flag"),
        pytest.param(lambda: ShardAssign(1, [[0, 0, 1, 0, 1]] * 4097), "holdings", id="shard-too-many"),
        pytest.param(lambda: ShardResult(1, True), "without data", id="shard-result-no-data"),
        pytest.param(lambda: TileDone("n/0", 1, 0, "p", "full", np.zeros(1, np.float32), kept=True),
                     "kept", id="kept-tile-with-output"),
        pytest.param(lambda: OutputsFetch(1, "n/0", 1, []), "1..4096", id="outputs-fetch-empty"),
        pytest.param(lambda: OutputsFetch(1, "n/0", 1, list(range(4097))), "1..4096", id="outputs-fetch-too-many"),
        pytest.param(lambda: TilesRedo("n/0", 1, [-2]), "negative", id="tiles-redo-negative"),
        pytest.param(lambda: OutputsMissing("n/0", 1, ""), "holder", id="outputs-missing-no-holder"),
        pytest.param(lambda: StealReply(1, True, "n/0", 1, 0, "p", [], 8, 8, None, holders={"n2": [0]}),
                     "exactly one", id="tile-grant-without-input"),
        pytest.param(lambda: ShardTask(1, 1, 2, 3, 3, False, False, np.zeros(1, np.float32)), "channels",
                     id="shard-task-empty"),
    ],
)
def test_runtime_messages_validate_fields(make, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        make()


@pytest.mark.parametrize("msg", SAMPLES)
def test_roundtrip_every_message(msg: Message) -> None:
    assert_same(msg, roundtrip(msg))


def test_every_registered_message_is_covered() -> None:
    sampled = {p.values[0].op for p in SAMPLES}  # type: ignore[union-attr]
    registered = {op for op in message_types() if not op.startswith("test-")}
    assert registered == sampled, "add a sample of each new message to SAMPLES"


_views = st.sampled_from(["as-is", "step", "transpose", "reverse"])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arr=hnp.arrays(
        dtype=st.sampled_from(sorted(DTYPES)),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=7),
    ),
    view=_views,
    big_endian=st.booleans(),
)
def test_roundtrip_arrays(arr: np.ndarray, view: str, big_endian: bool) -> None:
    if big_endian:
        arr = arr.astype(arr.dtype.newbyteorder(">"))
    if view == "step" and arr.ndim:
        arr = arr[::2]
    elif view == "transpose":
        arr = arr.T
    elif view == "reverse" and arr.ndim:
        arr = arr[::-1]
    out = roundtrip(TensorMsg("h", arr, {"k": 1}))
    assert isinstance(out, TensorMsg)
    assert out.array.shape == arr.shape
    assert out.array.dtype == DTYPES[arr.dtype.name]
    np.testing.assert_array_equal(out.array, arr)
    assert out.array.flags.aligned


def test_decoded_array_is_zero_copy_view_of_body() -> None:
    data = frame_bytes(TensorMsg("z", np.arange(16, dtype=np.int32)))
    body = bytearray(body_of(data))
    header, buffers = parse_body(body)
    msg = decode(header, buffers)
    assert isinstance(msg, TensorMsg)
    body[-4:] = struct.pack("<i", -1)  # last element, written in the frame buffer
    assert msg.array[-1] == -1


def test_encode_does_not_copy_contiguous_arrays() -> None:
    arr = np.arange(1000, dtype=np.float32)
    _, buffers = encode(TensorMsg("c", arr))
    assert np.shares_memory(np.frombuffer(buffers[0], np.uint8), arr)


async def test_read_frame_from_stream() -> None:
    msgs = [Ping(1), TensorMsg("a", np.ones((300, 300), np.float16)), Goodbye("x")]
    limits = DEFAULT_LIMITS.replace(read_chunk_bytes=4096)  # forces the chunked path
    reader = stream(b"".join(frame_bytes(m) for m in msgs))
    for m in msgs:
        header, buffers = await read_frame(reader, limits)
        assert_same(m, decode(header, buffers, limits))


# ---- extending the protocol -----------------------------------------------------------


@register
class _StealProbe(Message, tag="test-steal-probe"):
    request_id: int
    tiles: tuple[int, ...] = ()
    weights: np.ndarray | None = None


def test_new_message_is_a_four_line_change() -> None:
    msg = _StealProbe(7, (1, 2, 3), np.ones(3, np.uint8))
    assert_same(msg, roundtrip(msg))
    assert_same(_StealProbe(8), roundtrip(_StealProbe(8)))


def test_register_rejects_duplicate_op() -> None:
    with pytest.raises(ValueError, match="already registered"):

        @register
        class Again(Message, tag="ping"):
            seq: int


def test_unknown_fields_are_ignored_and_defaults_fill_in() -> None:
    # A newer peer adds a field; an older peer omits a defaulted one. Stable messages, in
    # protocol 3's map envelope (fields by name):
    newer = raw_frame({"op": "goodbye", "f": {"reason": "r", "added_in_v2": [1]}, "a": [], "n": []})
    assert decode(*parse_body(body_of(newer))) == Goodbye("r")
    older = raw_frame({"op": "goodbye", "f": {}, "a": [], "n": []})
    assert decode(*parse_body(body_of(older))) == Goodbye("")
    # ... and array-form messages (new fields go last):
    newer = raw_frame(_msg("status", 3, 1, 2, 1.5e10, 0.5, 4, 1, 10, 20, True, 320, 0.5, [1], "added"))
    assert decode(*parse_body(body_of(newer))) == Status(3, 1, 2, 1.5e10, 0.5, 4, 1, 10, 20, True, 320, 0.5)
    older = raw_frame(_msg("status", 3, 1))
    assert decode(*parse_body(body_of(older))) == Status(3, 1)
    # a newer peer's new array field: its buffer is skipped
    newer = raw_frame(_msg("tile-ack", "n/0", 1, 2, "", [], 0, arrays=[["uint8", [2]]]), [b"xy"])
    assert decode(*parse_body(body_of(newer))) == TileAck("n/0", 1, 2)


def test_stable_messages_keep_the_protocol_3_envelope() -> None:
    # what a protocol 3 peer decodes: the version check (Hello, Reject) must reach it
    header, buffers = encode(HELLO)
    assert buffers == []
    obj = msgpack.unpackb(header)
    assert obj.keys() == {"op", "f", "a", "n"} and obj["op"] == "hello" and obj["a"] == obj["n"] == []
    assert obj["f"]["version"] == PROTOCOL_VERSION and obj["f"]["node_id"] == HELLO.node_id
    old_hello = raw_frame(_hdr("hello", {**_HELLO_FIELDS, "version": 3}))
    assert decode(*parse_body(body_of(old_hello))).version == 3  # type: ignore[attr-defined]


# ---- hostile input --------------------------------------------------------------------


def _hdr(op: str, fields: dict[str, Any], arrays: Sequence[Any] = (), lens: Sequence[Any] = ()) -> dict[str, Any]:
    """A header in protocol 3's map envelope, that stable messages keep."""
    return {"op": op, "f": fields, "a": list(arrays), "n": list(lens)}


def _msg(op: str, *values: Any, arrays: Sequence[Any] = ()) -> list[Any]:
    """An array-form header: ``[[[dtype, shape], ...], [op, field0, ...]]``."""
    return [list(arrays), [op, *values]]


_HELLO_FIELDS = {name: getattr(HELLO, name) for name in HELLO.__struct_fields__}
_DEEP = {"deep": [[[[[[[[[[1]]]]]]]]]]}


@pytest.mark.parametrize(
    "header, buffers",
    [
        pytest.param(_hdr("no-such-op", {}), [], id="unknown-op-stable"),
        pytest.param(_msg("no-such-op"), [], id="unknown-op"),
        pytest.param(_hdr("ping", {"seq": 1}), [], id="array-form-op-in-map-envelope"),
        pytest.param(_msg("goodbye", "r"), [], id="stable-op-in-array-form"),
        pytest.param(_hdr("goodbye", {"reason": "r"}, [["x", "uint8", [1]]], [1]), [b"x"], id="stable-with-array"),
        pytest.param(_msg("ping", "1"), [], id="str-for-int"),
        pytest.param(_msg("ping", True), [], id="bool-for-int"),
        pytest.param(_msg("ping", 1.0), [], id="float-for-int"),
        pytest.param(_msg("ping"), [], id="missing-field"),
        pytest.param(_hdr("reject", {"reason": b"bytes"}), [], id="bytes-for-str"),
        pytest.param(_hdr("reject", {}), [], id="missing-field-stable"),
        pytest.param(_hdr("hello", {**_HELLO_FIELDS, "port": 70000}), [], id="port-range"),
        pytest.param(_hdr("hello", {**_HELLO_FIELDS, "node_id": ""}), [], id="empty-node-id"),
        pytest.param(_hdr("hello", {**_HELLO_FIELDS, "op": "welcome"}), [], id="hello-tagged-welcome"),
        pytest.param(_hdr("auth-init", {"node_id": "a", "nonce": b"short"}), [], id="short-nonce"),
        pytest.param(_hdr("auth-init", {"node_id": "a", "nonce": "x" * 32}), [], id="str-nonce"),
        pytest.param(_hdr("auth-proof", {"proof": b"\x00" * 33}), [], id="long-proof"),
        pytest.param(
            _hdr("auth-challenge", {"node_id": "", "nonce": bytes(32), "proof": bytes(32)}), [],
            id="challenge-empty-node-id",
        ),
        pytest.param(_msg("tensor", "t", 0, [], arrays=[["uint8", [1]]]), [b"x"], id="list-for-dict"),
        pytest.param(_msg("tensor", "t"), [], id="missing-array"),
        pytest.param(_msg("tensor", "t", None, {}), [], id="nil-for-array"),
        pytest.param(_msg("tensor", "t", [1, 2]), [], id="array-as-plain-value"),
        pytest.param(_msg("tensor", "t", -1, arrays=[["uint8", [1]]]), [b"x"], id="negative-buffer-index"),
        pytest.param(_msg("tensor", "t", True, arrays=[["uint8", [1]]]), [b"x"], id="bool-buffer-index"),
        pytest.param(_msg("tensor", "t", 1, arrays=[["uint8", [1]]]), [b"x"], id="buffer-index-out-of-range"),
        pytest.param(_msg("tensor", "t", 2**40, arrays=[["uint8", [1]]]), [b"x"], id="huge-buffer-index"),
        pytest.param(_msg("ping", ["int64", []], arrays=[["int64", []]]), [bytes(8)], id="plain-field-as-array"),
        pytest.param(_msg("tensor", "t", 0, arrays=[["float64", [1]]]), [bytes(8)], id="dtype-float64"),
        pytest.param(_msg("tensor", "t", 0, arrays=[["object", [1]]]), [bytes(8)], id="dtype-object"),
        pytest.param(_msg("tensor", "t", 0, arrays=[["<f4", [1]]]), [bytes(4)], id="dtype-numpy-str"),
        pytest.param(_msg("tensor", "t", 0, arrays=[[1, [1]]]), [bytes(1)], id="dtype-not-str"),
        pytest.param(_msg("tensor", "t", 0, arrays=[["float32", [3]]]), [bytes(8)], id="bytes-vs-shape"),
        pytest.param(_msg("tensor", "t", 0, arrays=[["uint8", [-1]]]), [b""], id="negative-dim"),
        pytest.param(_msg("tensor", "t", 0, arrays=[["uint8", [2**40, 0]]]), [b""], id="huge-dim"),
        pytest.param(_msg("tensor", "t", 0, arrays=[["uint8", [1] * 9]]), [b"x"], id="too-many-dims"),
        pytest.param(_msg("tensor", "t", 0, arrays=[["uint8", [1.0]]]), [b"x"], id="float-dim"),
        pytest.param(_msg("tensor", "t", 0, arrays=[["uint8", 1]]), [b"x"], id="shape-not-list"),
        pytest.param(_msg("tensor", "t", 0, arrays=[["uint8", [1], 1]]), [b"x"], id="array-entry-too-long"),
        pytest.param(_msg("tensor", "t", 0, arrays=[["uint8", [1]]]), [], id="missing-buffer"),
        pytest.param(_msg("tensor", "t", 0), [b"x"], id="buffer-count"),
        pytest.param(
            _msg("steal-reply", 1, True, "n/0", 1, 2, "p", [], 0, 0, 0, 0, arrays=[["uint8", [1]]]),
            [b"x"],
            id="duplicate-array",
        ),
        pytest.param(_msg("tensor", "t", 0, _DEEP, arrays=[["uint8", [0]]]), [b""], id="meta-too-deep"),
        pytest.param(
            _msg("tail-done", "n/0", 1, "ab", [_DEEP]), [], id="detections-too-deep",
        ),
        pytest.param(_msg("tensor", "t", 0, {1: "x"}, arrays=[["uint8", [0]]]), [b""], id="int-meta-key"),
        pytest.param(
            _msg("tensor", "t", 0, {"a": {1: "x"}}, arrays=[["uint8", [0]]]), [b""], id="nested-int-meta-key",
        ),
        pytest.param(_msg("steal-reply", 1, False, "", 0, 0, "", [True]), [], id="bool-in-int-list"),
        pytest.param(_msg("steal-reply", 1, True, "n/0", 1, 2, "p"), [], id="grant-without-data"),
        pytest.param(_msg("frame-start", "", 1, "p", 1, 1), [], id="empty-source"),
        pytest.param({"op": "goodbye", "f": {}, "a": [], "n": [], "x": 1}, [], id="extra-envelope-key"),
        pytest.param({"op": "goodbye", "f": {}}, [], id="missing-envelope-key"),
        pytest.param([[], ["ping", 1], "x"], [], id="extra-envelope-item"),
        pytest.param([[]], [], id="missing-envelope-item"),
        pytest.param([1, 2, 3], [], id="envelope-not-map"),
        pytest.param("ping", [], id="envelope-a-str"),
        pytest.param(_msg("ping", msgpack.ExtType(3, b"x")), [], id="ext-type"),
        pytest.param(_msg("ping", msgpack.Timestamp(1)), [], id="timestamp-ext"),
        pytest.param(
            _msg("tensor", "t", 0, {"x": msgpack.ExtType(3, b"x")}, arrays=[["uint8", [0]]]), [b""], id="ext-in-meta",
        ),
        pytest.param(
            _msg("tensor", "t", 0, {"x": msgpack.Timestamp(1)}, arrays=[["uint8", [0]]]), [b""], id="timestamp-in-meta",
        ),
    ],
)
def test_bad_headers_raise_protocol_error(header: Any, buffers: list[bytes]) -> None:
    hbytes = msgpack.packb(header, use_bin_type=True)
    with pytest.raises(ProtocolError):
        decode(hbytes, [memoryview(b) for b in buffers])


@pytest.mark.parametrize(
    "hbytes",
    [
        pytest.param(b"\x81\x01\x02", id="int-map-key"),
        pytest.param(b"\xa2\xff\xfe", id="bad-utf8"),
        pytest.param(b"\xc1", id="reserved-byte"),
        pytest.param(b"\x91" * 100_000, id="nesting-bomb"),
        pytest.param(msgpack.packb(_msg("ping", 1)) + b"\x00", id="trailing-bytes"),
        pytest.param(msgpack.packb(_hdr("goodbye", {})) + b"\x00", id="trailing-bytes-stable"),
        pytest.param(b"\x92\x90\x92\xa6tensor\xa1t" + b"\x91" * 100_000, id="nesting-bomb-in-field"),
        pytest.param(b"\x92\xdd\xff\xff\xff\xff", id="buffer-list-of-4g-declared"),
        pytest.param(b"\xdd\xff\xff\xff\xff", id="array-of-4g-declared"),
        pytest.param(b"", id="empty"),
    ],
)
def test_bad_msgpack_raises_protocol_error(hbytes: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(hbytes, [])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_random_body_raises_only_protocol_error(data: bytes) -> None:
    try:
        decode(*parse_body(data))
    except ProtocolError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=4, max_size=64), st.binary(max_size=64))
def test_random_header_in_valid_frame_raises_only_protocol_error(prefix: bytes, rest: bytes) -> None:
    # Random bytes behind a plausible header length, to reach deeper into the parser.
    body = struct.pack(">I", len(prefix)) + prefix + rest
    try:
        decode(*parse_body(body))
    except ProtocolError:
        pass


def test_truncated_body_raises_protocol_error() -> None:
    body = body_of(frame_bytes(TensorMsg("t", np.arange(10, dtype=np.int64), {"m": 1})))
    for k in range(len(body)):
        with pytest.raises(ProtocolError):
            decode(*parse_body(body[:k]))
    with pytest.raises(ProtocolError):
        decode(*parse_body(body + b"\x00"))  # one byte too many


async def test_truncated_stream_raises_incomplete_read() -> None:
    data = frame_bytes(TensorMsg("t", np.arange(10, dtype=np.int64)))
    for k in (0, 3, 4, 10, len(data) - 1):
        with pytest.raises(asyncio.IncompleteReadError):
            await read_frame(stream(data[:k]))


@pytest.mark.parametrize("declared", [2**31, 2**32 - 1, DEFAULT_LIMITS.max_frame_bytes + 1, 0, 3])
async def test_bad_frame_length_rejected_before_allocating(declared: int) -> None:
    reader = stream(struct.pack(">I", declared) + b"\x00" * 16)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            await read_length(reader)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_huge_header_length_and_buffer_lengths_rejected_without_allocating() -> None:
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            parse_body(struct.pack(">I", 2**31) + b"\x00" * 16)
        # Header declares one 2 GiB buffer that is not in the body.
        big = raw_frame(_msg("tensor", "t", 0, arrays=[["uint8", [2**31]]]))
        with pytest.raises(ProtocolError):
            parse_body(body_of(big), DEFAULT_LIMITS.replace(max_array_dim=2**32))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


async def test_frame_limit_enforced_on_both_ends() -> None:
    small = DEFAULT_LIMITS.replace(max_frame_bytes=1000, max_header_bytes=500)
    msg = TensorMsg("big", np.zeros(2000, np.uint8))
    with pytest.raises(ProtocolError, match="max_frame_bytes"):
        frame_bytes(msg, small)
    data = frame_bytes(msg)  # made with default limits, read with small ones
    with pytest.raises(ProtocolError):
        await read_length(stream(data), small)


@pytest.mark.parametrize(
    "msg, match",
    [
        pytest.param(TensorMsg("t", np.zeros(3)), "dtype", id="float64"),
        pytest.param(TensorMsg("t", np.zeros(3, np.float32), {"x": np.float32(1)}), "plain data", id="numpy-scalar-meta"),
        pytest.param(TensorMsg("t", np.zeros(3, np.float32), {1: "x"}), "key", id="int-meta-key"),  # type: ignore[dict-item]
        pytest.param(TensorMsg("t", [1, 2, 3]), "ndarray", id="list-not-array"),  # type: ignore[arg-type]
        pytest.param(Ping("1"), "int", id="str-seq"),  # type: ignore[arg-type]
        pytest.param(Ping(2**64), "range", id="int-too-big"),
    ],
)
def test_encode_rejects_bad_values(msg: Message, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        encode(msg)


def test_encode_rejects_unregistered_class() -> None:
    class Stray(Message, tag="stray"):
        pass

    with pytest.raises(ProtocolError, match="not a registered"):
        encode(Stray())


def test_limits_validation_and_replace() -> None:
    fast = DEFAULT_LIMITS.replace(handshake_timeout=0.1)
    assert fast.handshake_timeout == 0.1 and DEFAULT_LIMITS.handshake_timeout != 0.1
    with pytest.raises(ValueError):
        DEFAULT_LIMITS.replace(peer_dead_after=0.1, heartbeat_interval=0.2)
    with pytest.raises(ValueError):
        DEFAULT_LIMITS.replace(max_frame_bytes=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.handshake_timeout = 5  # type: ignore[misc]


@pytest.mark.parametrize("fields", [(3, 1, 2, -1.0), (3, 1, 2, float("inf")), (3, 1, 2, float("nan")),
                                    (3, 1, 2, 1e16), (-1, 0), (0, 0, -2)])
def test_a_status_with_a_speed_or_count_out_of_range_is_refused(fields) -> None:
    """A peer's speed feeds the planner (grid auto) and its counts the victim choice: bounded."""
    with pytest.raises(ProtocolError):
        decode(*parse_body(body_of(raw_frame(_msg("status", *fields)))))
