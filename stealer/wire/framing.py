"""Length-prefixed frames carrying one message: a msgpack header plus raw buffers.

Layout (all integers big-endian)::

    frame  = u32 body_len | body
    body   = u32 header_len | header | pad | buf0 | pad | buf1 | ... | bufN
    pad    = zero bytes so that each buffer starts at a multiple of ALIGN within body

The buffer lengths are listed in the header (see :mod:`stealer.wire.messages`), so the
reader knows where each buffer starts. Every length read from the peer is checked against
:class:`~stealer.config.Limits` *before* anything of that size is allocated, and the body
length must equal exactly what the header implies.

When frame authentication is on (:mod:`stealer.wire.auth`), a 32-byte MAC follows each
frame, outside ``body_len``; :mod:`stealer.wire.comm` writes and checks it, feeding the
MAC as the body arrives (the ``mac`` argument of :func:`read_body`).

Writing uses ``writer.writelines`` of the pieces (memoryviews of the caller's arrays,
never concatenated). Reading reads the body into one buffer (``read`` of whatever has
arrived, each read reported to a ``progress`` callback so liveness sees every byte; a body
that takes several reads goes into one growing ``bytearray``) and returns memoryview
slices of it, so each array costs at most one copy out of the stream. The
buffer grows with the bytes that actually arrived, never to the announced length up
front: a peer that announces 200 MB and then stalls costs what it sent, not 200 MB.

This module raises :class:`~stealer.errors.ProtocolError` for bad bytes and lets socket
errors (``IncompleteReadError``, ``OSError``) through: :mod:`stealer.wire.comm` converts
them, once.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Sequence
from typing import Any, Final

from stealer.config import DEFAULT_LIMITS, Limits
from stealer.errors import ProtocolError
from stealer.wire.messages import Header, unpack_header

__all__ = [
    "ALIGN",
    "frame_pieces",
    "parse_body",
    "read_body",
    "read_frame",
    "read_length",
    "write_frame",
]

ALIGN: Final = 8
"""Buffers start at multiples of 8 bytes in the body, so received float/int64 arrays are
aligned views (numpy and Numba are slower, or refuse, on misaligned data)."""

_U32 = struct.Struct(">I")
_ZEROS = bytes(ALIGN)


def _pad(offset: int) -> int:
    return -offset % ALIGN


def _layout(header_len: int, lens: Sequence[int]) -> tuple[list[int], int]:
    """Offsets of each buffer within the body, and the body's total length."""
    offset = 4 + header_len
    offsets = []
    for n in lens:
        offset += _pad(offset)
        offsets.append(offset)
        offset += n
    return offsets, offset


def frame_pieces(
    header: bytes, buffers: Sequence[memoryview], limits: Limits = DEFAULT_LIMITS
) -> list[bytes | memoryview]:
    """Return the pieces of one frame, ready for ``writer.writelines``.

    Parameters
    ----------
    header
        Msgpack header from :func:`stealer.wire.messages.encode`.
    buffers
        Flat byte views of the arrays, in header order (not copied).
    limits
        The frame is refused here if the peer (with equal limits) would refuse it.

    Returns
    -------
    list
        Length prefixes, header, padding and the buffers themselves.

    Raises
    ------
    ProtocolError
        If the header or the whole body exceeds the limits.
    """
    if len(header) > limits.max_header_bytes:
        raise ProtocolError(f"header of {len(header)} B > max_header_bytes")
    lens = [b.nbytes for b in buffers]
    offsets, total = _layout(len(header), lens)
    if total > limits.max_frame_bytes:
        raise ProtocolError(f"frame of {total} B > max_frame_bytes {limits.max_frame_bytes} B")
    pieces: list[bytes | memoryview] = [_U32.pack(total) + _U32.pack(len(header)) + header]
    pos = 4 + len(header)
    for off, buf in zip(offsets, buffers):
        if off > pos:
            pieces.append(_ZEROS[: off - pos])
        if buf.nbytes:
            pieces.append(buf)
        pos = off + buf.nbytes
    return pieces


def write_frame(
    writer: asyncio.StreamWriter,
    header: bytes,
    buffers: Sequence[memoryview],
    limits: Limits = DEFAULT_LIMITS,
) -> None:
    """Queue one whole frame on ``writer`` (synchronously, so frames never interleave).

    The caller awaits ``writer.drain()``.

    Parameters
    ----------
    writer
        The stream to write to.
    header, buffers
        Output of :func:`stealer.wire.messages.encode`.
    limits
        Size limits, see :func:`frame_pieces`.
    """
    writer.writelines(frame_pieces(header, buffers, limits))


async def read_length(
    reader: asyncio.StreamReader, limits: Limits = DEFAULT_LIMITS, max_bytes: int | None = None
) -> int:
    """Read and check a frame's 4-byte length prefix.

    ``readexactly`` consumes nothing until all 4 bytes are there, so cancelling this call
    leaves the stream at a frame boundary.

    Parameters
    ----------
    reader
        The stream to read from.
    limits
        ``max_frame_bytes`` bounds the length.
    max_bytes
        A tighter bound for this frame (e.g. ``max_handshake_frame_bytes`` before the
        handshake is complete).

    Returns
    -------
    int
        The body length, at most ``limits.max_frame_bytes`` (and ``max_bytes``).

    Raises
    ------
    ProtocolError
        If the length is below the minimum or above the maximum (nothing allocated).
    asyncio.IncompleteReadError
        If the stream ends first.
    """
    cap = limits.max_frame_bytes if max_bytes is None else min(max_bytes, limits.max_frame_bytes)
    n: int = _U32.unpack(await reader.readexactly(4))[0]
    if n < 4 or n > cap:
        raise ProtocolError(f"frame length {n} outside [4, {cap}]")
    return n


async def read_body(
    reader: asyncio.StreamReader,
    n: int,
    limits: Limits = DEFAULT_LIMITS,
    progress: Callable[[], None] | None = None,
    mac: Any = None,
) -> bytes | bytearray:
    """Read a frame body of ``n`` bytes (already checked by :func:`read_length`).

    The body is read with ``reader.read(k)``, which returns whatever has arrived (up to
    ``k = min(limits.read_chunk_bytes, bytes still missing)``), and ``progress()`` is
    called after *every* read that returned bytes: on a slow or congested link the bytes
    of a big frame trickle in, and each of them proves the peer alive (waiting for a whole
    chunk would not, if a chunk takes longer than ``peer_dead_after`` to arrive). A body
    that arrives in one read is returned as it came (no copy); otherwise the pieces go
    into one ``bytearray`` that grows as the bytes arrive (never allocated to ``n`` up
    front, which the peer may be lying about).

    Parameters
    ----------
    reader
        The stream to read from.
    n
        Body length.
    limits
        ``read_chunk_bytes`` caps one read.
    progress
        Called after each read that returned bytes.
    mac
        A hash object (``update(bytes)``), fed each piece as it arrives (frame MACs).

    Returns
    -------
    bytes or bytearray
        The body.

    Raises
    ------
    asyncio.IncompleteReadError
        If the stream ends before ``n`` bytes (``partial`` holds what arrived).
    """
    chunk = limits.read_chunk_bytes
    if n <= chunk:
        # one chunk at most: wait for all of it in one call (no pieces to join). Liveness
        # meanwhile comes from the reader's own buffer and the kernel's counters (see
        # Comm._judge_silence), not from this function's progress calls.
        data = await reader.readexactly(n)
        if mac is not None:
            mac.update(data)
        if progress is not None:
            progress()
        return data
    first = await reader.read(chunk)
    if not first:
        raise asyncio.IncompleteReadError(b"", n)
    if mac is not None:
        mac.update(first)
    if progress is not None:
        progress()
    if len(first) == n:
        return first
    body = bytearray(first)
    while len(body) < n:
        part = await reader.read(min(chunk, n - len(body)))
        if not part:  # EOF: same error (and partial) as readexactly would give
            raise asyncio.IncompleteReadError(bytes(body), n)
        if mac is not None:
            mac.update(part)
        body += part  # realloc grows in place or by mremap: cheaper than a zeroed prealloc
        if progress is not None:
            progress()
    return body


def parse_body(
    body: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS
) -> tuple[Header, list[memoryview]]:
    """Split a frame body into its validated header and zero-copy buffer views.

    Parameters
    ----------
    body
        The body bytes (untrusted).
    limits
        Size limits.

    Returns
    -------
    header : Header
        Validated envelope (see :func:`stealer.wire.messages.unpack_header`).
    buffers : list of memoryview
        Slices of ``body``, one per array, lengths matching the header.

    Raises
    ------
    ProtocolError
        If any length is inconsistent.
    """
    view = memoryview(body)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    if len(view) < 4:
        raise ProtocolError(f"frame body of {len(view)} B has no header length")
    (hlen,) = _U32.unpack(view[:4])
    if hlen > limits.max_header_bytes or 4 + hlen > len(view):
        raise ProtocolError(f"header length {hlen} does not fit a body of {len(view)} B")
    header = unpack_header(view[4 : 4 + hlen], limits)
    offsets, total = _layout(hlen, header.lens)
    if total != len(view):
        raise ProtocolError(f"{header.op}: body is {len(view)} B, header implies {total} B")
    return header, [view[off : off + n] for off, n in zip(offsets, header.lens)]


async def read_frame(
    reader: asyncio.StreamReader, limits: Limits = DEFAULT_LIMITS
) -> tuple[Header, list[memoryview]]:
    """Read one whole frame: :func:`read_length`, :func:`read_body`, :func:`parse_body`.

    Parameters
    ----------
    reader
        The stream to read from.
    limits
        Size limits.

    Returns
    -------
    header : Header
    buffers : list of memoryview
    """
    n = await read_length(reader, limits)
    return parse_body(await read_body(reader, n, limits), limits)
