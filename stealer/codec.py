"""Frame codecs: how a stolen tile's camera pixels travel (``--frame-codec``).

A tile's input crosses the wire as the uint8 (C, H, W) camera pixels it is letterboxed from
(:func:`stealer.images.letterbox_region`). On a 20 Mbit/s link a 608x608 frame's pixels
(1.1 MB) take 0.44 s, so a source that serves whole frames is bounded by its uplink. The
codecs here shrink that payload; every one of them leaves the result bit-exact:

``raw``
    The pixels as they are (the default, and what older releases sent).
``zstd``
    The pixels compressed with Zstandard (lossless; fast, and it releases the GIL), after
    PNG's "Sub" filter: each pixel minus its left neighbour, mod 256, so that smooth image
    areas become runs of small numbers (a camera-like frame: 0.63 of its bytes, against 0.87
    without the filter; PNG 0.62 at 80 times the time).
``png``
    The pixels as a lossless PNG (Pillow): smaller than zstd on smooth images, much slower.
``jpeg``
    The *frame* is a JPEG: the source encodes each frame once (or takes a ``.jpg`` file's own
    bytes) and decodes it, and that decoded frame is what the cluster computes on, so the
    reference is single-device inference of the decoded frame (:func:`jpeg_frame`). A region
    covering at least :data:`JPEG_WHOLE_FRACTION` of the frame travels as the JPEG bytes
    (the thief decodes the same bytes with the same decoder and crops); a smaller one as its
    decoded pixels compressed with zstd, which is lossless and so just as exact.

Encoding and decoding are pure functions of their arguments (no I/O). Decoding takes untrusted
bytes from a peer: the size it may produce is known (from the tile's region) and bounded
(:data:`MAX_DECODED_BYTES`) before anything is allocated, the result's shape and dtype are
checked, and anything wrong is a :class:`~stealer.errors.ProtocolError`, never an exception
of the library underneath.
"""

from __future__ import annotations

import io
import math
from typing import Final

import numpy as np
import zstandard

from .errors import ConfigError, ProtocolError, StealerError

__all__ = [
    "DEFAULT_JPEG_QUALITY",
    "FRAME_CODECS",
    "JPEG_WHOLE_FRACTION",
    "MAX_DECODED_BYTES",
    "WIRE_CODECS",
    "check_frame_codec",
    "decode_jpeg",
    "decode_pixels",
    "encode_jpeg",
    "encode_pixels",
    "grant_codec",
    "jpeg_frame",
]

FRAME_CODECS: Final = ("raw", "zstd", "png", "jpeg")
"""What ``--frame-codec`` may name: how this node's frames travel to thieves."""

WIRE_CODECS: Final = frozenset(FRAME_CODECS)
"""What a grant's ``codec`` field may name (the same names: ``jpeg`` there means the payload
is the frame's JPEG bytes, ``zstd``/``png`` the region's pixels, ``raw`` uncompressed)."""

LOSSLESS: Final = frozenset({"zstd", "png"})
"""Codecs whose payload is the region's own pixels, losslessly."""

DEFAULT_JPEG_QUALITY: Final = 90
"""``--jpeg-quality``: Pillow's 1-95 scale; 90 keeps a camera frame close to the original
while a 608x608 frame still shrinks about tenfold."""

JPEG_WHOLE_FRACTION: Final = 0.5
"""A region whose pixels cover at least this share of the frame travels as the frame's whole
JPEG (smaller than its own pixels, even compressed, and encoded once per frame); a smaller
one as its pixels with zstd (a 5x5 tile would otherwise carry the whole frame's JPEG)."""

TYPICAL_RATIO: Final = {"raw": 1.0, "zstd": 0.63, "png": 0.62, "jpeg": 0.065}
"""Bytes on the wire over raw pixel bytes, per codec, measured on 608x608 synthetic camera-like
frames (``synthetic_pixels``; JPEG at quality 90): what ``--grid auto`` assumes until the
source has measured its own grants."""

MAX_DECODED_BYTES: Final = 64 * 1024 * 1024
"""Most bytes a payload from a peer may decode to (22 Mpx of RGB, above a 4K camera frame's
25 MB). A few kilobytes of zstd or JPEG can claim gigabytes; this stops a peer from making
us allocate them, whatever the image size it names."""

ZSTD_LEVEL: Final = 1
"""Zstandard's fastest regular level: a Pi's core compresses a frame's pixels at several
hundred MB/s with it, against a link of 2.5 MB/s; higher levels gain a few percent for
several times the source's CPU, and the source serves every frame."""


def check_frame_codec(codec: str, jpeg_quality: int) -> None:
    """Raise :class:`~stealer.errors.ConfigError` for an unknown codec or a quality out of range."""
    if codec not in FRAME_CODECS:
        raise ConfigError(f"unknown frame codec {codec!r} (one of {', '.join(FRAME_CODECS)})")
    if not 1 <= jpeg_quality <= 95:
        raise ConfigError(f"JPEG quality {jpeg_quality} out of range (1-95)")


def grant_codec(frame_codec: str, region_size: int, frame_size: int, has_jpeg: bool) -> str:
    """How one grant's pixels travel, for a source whose frames use ``frame_codec``.

    Parameters
    ----------
    frame_codec
        The source's ``--frame-codec``.
    region_size, frame_size
        Bytes of the region's pixels the grant carries, and of the whole frame's.
    has_jpeg
        Whether the frame keeps its JPEG bytes (a frame that entered with ``jpeg``; it
        decoded within :data:`MAX_DECODED_BYTES` here, so it does at the thief).

    Returns
    -------
    str
        ``raw`` for an empty region (nothing to compress) or one too big for a peer to
        decode, ``jpeg`` for a region of a JPEG frame covering at least
        :data:`JPEG_WHOLE_FRACTION` of it, ``zstd`` for a smaller region of one, else
        ``frame_codec`` itself.
    """
    if region_size == 0 or region_size > MAX_DECODED_BYTES:
        return "raw"
    if frame_codec != "jpeg":
        return frame_codec
    if has_jpeg and region_size >= JPEG_WHOLE_FRACTION * frame_size:
        return "jpeg"
    return "zstd"


# ---------------------------------------------------------------------------------------
# lossless: a region's pixels
# ---------------------------------------------------------------------------------------


def encode_pixels(codec: str, pixels: np.ndarray) -> np.ndarray:
    """A region's uint8 (C, H, W) pixels, losslessly encoded, as a flat uint8 array.

    Parameters
    ----------
    codec
        ``zstd`` or ``png``.
    pixels
        uint8 (C, H, W), at least one pixel.

    Returns
    -------
    numpy.ndarray
        The encoded bytes (uint8, 1-D), ready to be a message's raw buffer.
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.size == 0:
        raise StealerError(f"encode: expected non-empty uint8 (C, H, W) pixels, got {pixels.dtype} {pixels.shape}")
    if codec == "zstd":
        diff = pixels.copy()  # C-contiguous, and ours to overwrite
        diff[:, :, 1:] -= pixels[:, :, :-1]  # uint8 arithmetic: mod 256, undone by a cumsum
        out = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(diff.data)
    elif codec == "png":
        from PIL import Image

        c, h, w = pixels.shape
        # the channels one below the other as one grey image: lossless for any channel count
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels).reshape(c * h, w), mode="L").save(buf, "PNG", compress_level=6)
        out = buf.getvalue()
    else:
        raise StealerError(f"encode: {codec!r} is not a lossless codec")
    return np.frombuffer(out, np.uint8)


def decode_pixels(codec: str, payload: np.ndarray | bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """Pixels from a peer's lossless payload, which must decode to exactly ``shape``.

    Parameters
    ----------
    codec
        ``zstd`` or ``png``.
    payload
        The encoded bytes as they arrived.
    shape
        (C, H, W) the tile's region needs, computed by the receiver (not taken from the peer).

    Returns
    -------
    numpy.ndarray
        uint8 pixels of ``shape``.

    Raises
    ------
    ProtocolError
        If ``shape`` is too big (:data:`MAX_DECODED_BYTES`), or the payload is not a valid
        encoding of exactly that many pixels.
    """
    nbytes = _bounded(shape)
    data = _as_bytes(payload)
    if codec == "zstd":
        diff = np.frombuffer(_zstd_exact(data, nbytes), np.uint8).reshape(shape)
        return np.cumsum(diff, axis=2, dtype=np.uint8)  # wraps mod 256: exactly the encoder's inverse
    if codec == "png":
        if not data.endswith(_PNG_END):
            # Pillow decodes a PNG cut anywhere after its last pixel row: refuse it as truncated
            raise ProtocolError("png payload is truncated (it does not end with its IEND chunk)")
        c, h, w = shape
        grey = _pillow_decode(data, "PNG", (w, c * h), "L")
        return np.ascontiguousarray(grey).reshape(shape)
    raise ProtocolError(f"{codec!r} is not a lossless codec")


_PNG_END: Final = b"IEND\xaeB`\x82"
"""The last 8 bytes of every PNG: its IEND chunk's type and CRC."""


def _zstd_exact(data: bytes, nbytes: int) -> bytes:
    """One zstd frame that says it holds exactly ``nbytes`` and does, with nothing after it."""
    try:
        claimed = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise ProtocolError(f"zstd payload has no valid frame header: {exc}") from None
    if claimed != nbytes:
        # also refuses CONTENTSIZE_UNKNOWN (-1): our encoder always writes the size
        raise ProtocolError(f"zstd payload holds {claimed} bytes, the region needs {nbytes}")
    dec = zstandard.ZstdDecompressor().decompressobj()
    try:
        # the stream decoder stops at the size its header declared (checked above): a lying
        # frame fails after at most one block, it cannot make the output grow
        raw = dec.decompress(data)
    except zstandard.ZstdError as exc:
        raise ProtocolError(f"zstd payload does not decode: {exc}") from None
    if len(raw) != nbytes or not dec.eof or dec.unused_data:
        raise ProtocolError(f"zstd payload decodes to {len(raw)} bytes (of {nbytes}), "
                            f"{'with' if dec.unused_data else 'without'} trailing bytes, "
                            f"{'complete' if dec.eof else 'truncated'}")
    return raw


# ---------------------------------------------------------------------------------------
# jpeg: the frame itself
# ---------------------------------------------------------------------------------------


def encode_jpeg(pixels: np.ndarray, quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """A frame's uint8 (C, H, W) pixels (C = 1 or 3) as JPEG bytes (Pillow, ``quality`` 1-95)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[0] not in (1, 3) or pixels.size == 0:
        raise StealerError(f"JPEG frames need uint8 (1 or 3, H, W) pixels, got {pixels.dtype} {pixels.shape}")
    from PIL import Image

    im = Image.fromarray(pixels[0]) if pixels.shape[0] == 1 else Image.fromarray(pixels.transpose(1, 2, 0), "RGB")
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def decode_jpeg(payload: np.ndarray | bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """A JPEG frame's pixels, exactly as every node decodes them: Pillow, converted to RGB (or
    grey for one channel) as :func:`stealer.images.load_pixels` reads a ``.jpg`` file.

    Parameters
    ----------
    payload
        The JPEG bytes (from a peer, or this node's own frame).
    shape
        (C, H, W) the frame must have (C = 1 or 3), bounded by :data:`MAX_DECODED_BYTES`.

    Raises
    ------
    ProtocolError
        Not a JPEG, or not of ``shape``, or truncated, or ``shape`` too big; the image size
        is read from the header and checked before the pixels are decoded.
    """
    c, h, w = shape
    if c not in (1, 3):
        raise ProtocolError(f"a JPEG frame has 1 or 3 channels, not {c}")
    _bounded(shape)
    hwc = _pillow_decode(_as_bytes(payload), "JPEG", (w, h), "L" if c == 1 else "RGB")
    if c == 1:
        return np.ascontiguousarray(hwc[None])
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


def jpeg_frame(pixels: np.ndarray, quality: int = DEFAULT_JPEG_QUALITY,
               jpeg: bytes | None = None) -> tuple[np.ndarray, bytes]:
    """A frame as it enters a ``jpeg`` source: its JPEG bytes (``jpeg`` if given and it decodes
    to the frame's size, e.g. a ``.jpg`` file's; else ``pixels`` encoded at ``quality``) and
    those bytes decoded, which replace the frame's pixels (so every node computes on the same
    decoded frame).

    Returns
    -------
    pixels : numpy.ndarray
        The decoded uint8 (C, H, W) pixels, of ``pixels``' shape.
    jpeg : bytes
        The bytes they decode from.

    Raises
    ------
    StealerError
        If the frame cannot be a JPEG (not 1 or 3 channels, or too big for a peer to decode).
    """
    shape = (pixels.shape[0], pixels.shape[1], pixels.shape[2])
    if jpeg is not None:
        try:
            return decode_jpeg(jpeg, shape), jpeg
        except ProtocolError:
            pass  # not what its name says (or a size Pillow reads differently): encode it
    data = encode_jpeg(pixels, quality)
    try:
        return decode_jpeg(data, shape), data
    except ProtocolError as exc:
        raise StealerError(f"a {shape} frame cannot travel as JPEG: {exc}") from None


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def _bounded(shape: tuple[int, int, int]) -> int:
    if len(shape) != 3 or any(d < 0 for d in shape):
        raise ProtocolError(f"bad pixel shape {shape}")
    nbytes = math.prod(shape)
    if nbytes > MAX_DECODED_BYTES:
        raise ProtocolError(f"{shape} pixels ({nbytes} B) exceed the {MAX_DECODED_BYTES} B a payload may decode to")
    return nbytes


def _as_bytes(payload: np.ndarray | bytes) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if payload.dtype != np.uint8 or payload.ndim != 1:
        raise ProtocolError(f"an encoded payload is flat uint8, got {payload.dtype} {payload.shape}")
    return payload.tobytes()


def _pillow_decode(data: bytes, fmt: str, size: tuple[int, int], mode: str) -> np.ndarray:
    """Pillow's decode of untrusted bytes that must be a ``fmt`` image of ``size`` (w, h),
    as a ``mode`` array; the size is checked from the header, before the pixels are decoded."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            if im.size != size:
                raise ProtocolError(f"{fmt} payload is {im.size[0]}x{im.size[1]}, expected {size[0]}x{size[1]}")
            im.load()
            out = np.asarray(im if im.mode == mode else im.convert(mode), dtype=np.uint8)
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: Pillow's decoders raise OSError,
        # SyntaxError, ValueError, struct.error, DecompressionBombError... on malformed input
        raise ProtocolError(f"{fmt} payload does not decode: {type(exc).__name__}: {exc}") from None
    if out.shape[:2] != (size[1], size[0]):
        raise ProtocolError(f"{fmt} payload decodes to {out.shape}, expected {size[1]}x{size[0]}")
    return out
