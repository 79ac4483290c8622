"""Coverage-guided fuzz target for stealer's framing and message decoding (atheris).

    pip install atheris                      # the optional fuzz extra
    python tools/fuzz_wire.py -atheris_runs=200000 [CORPUS_DIR ...] [libFuzzer flags]

Without atheris the same entry point runs as a plain random/mutation fuzzer (not coverage
guided), so the target is never dead code::

    python tools/fuzz_wire.py --random 100000 [--seed 1]

Each input goes through both decoding paths a peer's bytes can take:

1. as one frame body: :func:`~stealer.wire.framing.parse_body` then
   :func:`~stealer.wire.messages.decode`;
2. as a byte stream of length-prefixed frames, read with
   :func:`~stealer.wire.framing.read_frame` until the stream ends.

Acceptable outcomes are a valid message (which must then survive ``encode``/``decode``
unchanged), :class:`~stealer.errors.ProtocolError`, or (path 2) a stream that ends in the
middle of a frame. Anything else is a crash. Allocation bombs show up as crashes through
libFuzzer's ``-rss_limit_mb`` (set to 1024 here unless given): a frame that claims 2 GiB
must not allocate it.

When no corpus directory is given, a temporary one is seeded with valid frames of every
registered message (so mutations start from deep inside the decoder: wrong types, shapes,
dtypes and byte counts are one or two mutations away).
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stealer.config import DEFAULT_LIMITS  # noqa: E402
from stealer.errors import ProtocolError  # noqa: E402
from stealer.wire.framing import ALIGN, frame_pieces, parse_body, read_frame  # noqa: E402
from stealer.wire.messages import (  # noqa: E402
    PROTOCOL_VERSION,
    AuthChallenge,
    AuthInit,
    AuthProof,
    Goodbye,
    Hello,
    Message,
    Ping,
    Reject,
    TensorMsg,
    Welcome,
    decode,
    encode,
)

LIMITS = DEFAULT_LIMITS
"""Production limits: the fuzzer must not find anything they let through."""

_LOOP: asyncio.AbstractEventLoop | None = None  # one loop for every input, made on first use


def seed_messages() -> list[Message]:
    """One or more valid messages of each kind the decoder treats differently."""
    from stealer.wire import messages as m

    hello = Hello(PROTOCOL_VERSION, "a" * 32, "worker", 7000, 4, "f00d" * 16, 2**30)
    return [
        hello,
        Welcome.of(hello),
        Reject("model hash mismatch"),
        AuthInit("a" * 32, bytes(range(32)), True),
        AuthChallenge("b" * 32, b"\x01" * 32, b"\x02" * 32),
        AuthProof(b"\x03" * 32),
        Ping(7),
        Goodbye("bye"),
        TensorMsg("t", np.arange(24, dtype=np.float32).reshape(2, 3, 4), {"tile": [1, 2], "x": 0.5}),
        TensorMsg("u8", np.arange(10, dtype=np.uint8), {"deep": {"a": [None, True, b"raw"]}}),
        TensorMsg("e", np.zeros((0, 3), np.int64)),
        m.StealReply(8, True, "n1/0", 12, 4, "5x5:16:quad", [0, 5, 1, 6], 64, 48, np.ones((3, 5, 5), np.float32)),
        m.StripsReply(1, True, [[4, 2, 1, 3]], np.arange(6, dtype=np.float32)),
        m.StripsReply(1, True, holders={"a" * 32: [1, 4]}),
        m.StripsFetch(3, "n1/0", 3, [1, 4]),
        m.StripsRelease("n1/0", 3),
        m.RegionRequest(2, "n1/0", 3, 5),
        m.RegionReply(2, True, [0, 4, 8, 12], np.ones((3, 4, 4), np.float32)),
        m.TileDone("n1/0", 3, 5, "5x5:16:quad", "reuse", np.zeros((4, 2, 2), np.float32),
                   [1, 4], 0.25),
        m.TailDone("n1/0", 3, "ab" * 32, [{"cls": 1, "prob": 0.5}], 1.5),
        m.FrameStart("n1/0", 9, "2x3:16:none", 608, 608, 0.5),
        m.Status(3, 1, 2),
    ]


def seed_frames() -> list[bytes]:
    """Valid frames (length prefix included) of :func:`seed_messages`."""
    return [b"".join(bytes(p) for p in frame_pieces(*encode(msg, LIMITS), LIMITS)) for msg in seed_messages()]


def _same(a: Message, b: Message) -> bool:
    if type(a) is not type(b):
        return False
    for name in a.__struct_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
                return False
            if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                return False
        elif msgpack.packb(x, use_bin_type=True) != msgpack.packb(y, use_bin_type=True):
            return False  # compared as wire bytes, so a NaN (even nested) equals itself
    return True


def _check_message(msg: Message) -> None:
    again = decode(*parse_body(b"".join(bytes(p) for p in frame_pieces(*encode(msg, LIMITS), LIMITS))[4:], LIMITS), LIMITS)
    if not _same(msg, again):
        raise AssertionError(f"re-encoding changed the message: {msg!r} -> {again!r}")


async def _read_all(data: bytes) -> int:
    reader = asyncio.StreamReader(limit=2**16)
    reader.feed_data(data)
    reader.feed_eof()
    n = 0
    try:
        while True:
            header, buffers = await read_frame(reader, LIMITS)
            _check_message(decode(header, buffers, LIMITS))
            n += 1
    except (ProtocolError, asyncio.IncompleteReadError):
        return n


def check_input(data: bytes) -> None:
    """Run one input through both decoding paths; raise only on a bug (see module doc)."""
    try:
        msg = decode(*parse_body(data, LIMITS), LIMITS)
    except ProtocolError:
        pass
    else:
        _check_message(msg)
    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
    _LOOP.run_until_complete(_read_all(data))


# ---------------------------------------------------------------------------------------
# fallback: random + mutation fuzzing without atheris
# ---------------------------------------------------------------------------------------


def mutate(data: bytes, rng: random.Random) -> bytes:
    """A few random byte-level mutations of the kinds libFuzzer makes."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        if op == 0 and b:  # flip a bit
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:  # set a byte to an interesting value
            b[rng.randrange(len(b))] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, 0xC0, 0xC1, 0xDD])
        elif op == 2:  # insert random bytes
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and b:  # delete a range
            i = rng.randrange(len(b))
            del b[i : i + rng.randint(1, 8)]
        elif op == 4 and b:  # truncate
            del b[rng.randrange(len(b)) :]
        elif op == 5 and len(b) >= 4:  # overwrite a u32 (lengths) with an interesting one
            i = rng.randrange(len(b) - 3)
            v = rng.choice([0, 3, 4, 2**31, 2**32 - 1, 200_000_000, len(b), len(b) + 1, rng.getrandbits(32)])
            b[i : i + 4] = v.to_bytes(4, "big")
        elif op == 6:  # splice with another seed
            other = rng.choice(_SEEDS)
            i, j = rng.randrange(len(b) + 1), rng.randrange(len(other) + 1)
            b = b[:i] + other[j:]
    return bytes(b)


_SEEDS = seed_frames()
def _op_of(header: object) -> str:
    """The op of a seed header: ``{"op": ...}`` (stable messages) or ``[arrays, [op, ...]]``."""
    return header["op"] if isinstance(header, dict) else header[1][0]  # type: ignore[index]


_SEED_PARTS = [(msgpack.unpackb(h), [bytes(b) for b in bufs]) for h, bufs in (encode(m, LIMITS) for m in seed_messages())]
_OPS = sorted({_op_of(h) for h, _ in _SEED_PARTS} | {"steal", "tile-ack", "frame-done", "no-such-op"})
_WEIRD: list[object] = [
    None, True, False, 0, 1, -1, 2**31, 2**63, 2**64 - 1, -(2**63), 0.5, float("nan"), float("inf"),
    "", "x" * 65, "float32", "float64", "<f4", "object", "uint8", b"", b"\x00" * 32, [], {}, [1] * 9,
    [2**24, 2**24], [-1], [0], [1.0], {"a": [[[[[[[[[1]]]]]]]]]}, [["array", "uint8", [1]]],
    [["uint8", [1]]], ["float32", [2, 2]], 63, 64,
]


def _nodes(obj: object, out: list[tuple[object, object]]) -> list[tuple[object, object]]:
    """Every (container, key) slot in a msgpack object."""
    if isinstance(obj, dict):
        for k in list(obj):
            out.append((obj, k))
            _nodes(obj[k], out)
    elif isinstance(obj, list):
        for i in range(len(obj)):
            out.append((obj, i))
            _nodes(obj[i], out)
    return out


def build_frame(header: object, buffers: list[bytes], rng: random.Random | None = None) -> bytes:
    """A frame around any header object, with consistent lengths unless ``rng`` lies."""
    h = msgpack.packb(header, use_bin_type=True)
    body = bytearray(len(h).to_bytes(4, "big") + h)
    for b in buffers:
        body += bytes(-len(body) % ALIGN) + b
    n = len(body)
    if rng is not None and rng.random() < 0.1:
        n = rng.choice([0, 3, n - 1, n + 1, 2**31, 2**32 - 1, 200_000_000])
    return n.to_bytes(4, "big") + bytes(body)


def mutate_structured(rng: random.Random) -> bytes:
    """A well-formed frame whose header says the wrong thing: wrong op for its fields,
    wrong field types, shapes, dtypes, byte counts, buffer sizes."""
    import copy

    header, buffers = rng.choice(_SEED_PARTS)
    header = copy.deepcopy(header)
    buffers = list(buffers)
    for _ in range(rng.randint(1, 3)):
        r = rng.random()
        # the message's fields: a map (stable messages) or the list after the op
        fields = header.get("f") if isinstance(header, dict) else header[1]
        if r < 0.2:
            if isinstance(header, dict):
                header["op"] = rng.choice(_OPS)
            elif isinstance(fields, list) and fields:
                fields[0] = rng.choice(_OPS)
        elif r < 0.3 and buffers:  # a buffer whose size disagrees with its shape
            i = rng.randrange(len(buffers))
            buffers[i] = buffers[i][: rng.randrange(len(buffers[i]) + 1)] + rng.randbytes(rng.choice([0, 0, 1, 4, 8]))
        elif r < 0.4 and isinstance(fields, dict) and fields:
            del fields[rng.choice(list(fields))]
        elif r < 0.4 and isinstance(fields, list) and len(fields) > 1:
            del fields[rng.randrange(1, len(fields)) :]  # drop trailing fields
        else:
            slots = _nodes(header, [])
            container, key = rng.choice(slots)
            container[key] = copy.deepcopy(rng.choice(_WEIRD))  # type: ignore[index]
    return build_frame(header, buffers, rng)


def random_inputs(n: int, seed: int = 0):  # type: ignore[no-untyped-def]
    """Yield ``n`` inputs: random bytes, structured header mutations, byte-level mutations
    of valid frames and of their bodies."""
    rng = random.Random(seed)
    pool = list(_SEEDS) + [s[4:] for s in _SEEDS]
    for _ in range(n):
        r = rng.random()
        if r < 0.1:
            yield rng.randbytes(rng.randrange(0, 512))
        elif r < 0.55:
            data = mutate_structured(rng)
            yield data if rng.random() < 0.7 else data[4:]
        else:
            yield mutate(rng.choice(pool), rng)


def run_random(n: int, seed: int) -> int:
    """Fuzz without coverage guidance; returns the number of crashes (printed)."""
    crashes = 0
    t0 = time.monotonic()
    for i, data in enumerate(random_inputs(n, seed)):
        try:
            check_input(data)
        except Exception as e:  # the fuzz loop's task boundary: record and go on
            crashes += 1
            print(f"CRASH on input {i}: {type(e).__name__}: {e}\n  input: {data!r}", file=sys.stderr)
    print(f"random fuzz: {n} inputs, {crashes} crashes, {time.monotonic() - t0:.1f} s")
    return crashes


def write_seed_corpus(corpus: Path) -> None:
    """Valid frames, their bodies, and structured mutations, one file each."""
    for k, f in enumerate(_SEEDS):
        (corpus / f"seed-{k}").write_bytes(f)
        (corpus / f"body-{k}").write_bytes(f[4:])
    rng = random.Random(0)
    for k in range(200):
        (corpus / f"structured-{k}").write_bytes(mutate_structured(rng))


def main(argv: list[str]) -> int:
    if "--random" in argv:
        i = argv.index("--random")
        n = int(argv[i + 1])
        seed = int(argv[argv.index("--seed") + 1]) if "--seed" in argv else 0
        return 1 if run_random(n, seed) else 0
    try:
        import atheris
    except ImportError:
        print(
            "atheris is not installed (pip install atheris); run the non-guided fallback with "
            "`python tools/fuzz_wire.py --random 100000`",
            file=sys.stderr,
        )
        return 2
    args = list(argv)
    if not any(a.startswith("-rss_limit_mb") for a in args):
        args.insert(1, "-rss_limit_mb=1024")
    dirs = [Path(a) for a in args[1:] if not a.startswith("-")]
    if not dirs:
        dirs = [Path(tempfile.mkdtemp(prefix="stealer-fuzz-"))]
        args.append(str(dirs[0]))
    if dirs[0].is_dir() and not any(dirs[0].iterdir()):
        write_seed_corpus(dirs[0])
        print(f"seed corpus written to {dirs[0]}", file=sys.stderr)
    atheris.instrument_all()
    atheris.Setup(args, check_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
