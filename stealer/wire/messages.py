"""Every wire message of stealer, and how a message becomes a header plus raw buffers.

A message is a frozen :class:`msgspec.Struct` with a fixed string tag, its ``op``,
registered with :func:`register`. Adding a message is a four-line change::

    @register
    class StealRequest(Message, tag="steal-request", frozen=True):
        request_id: int
        max_tiles: int = 1

(``frozen`` is inherited from :class:`Message`; it is repeated only so that mypy knows.)

Encoding (:func:`encode`) gives a small msgpack *header* and a list of raw *buffers*,
one per ndarray field, so tensors are never pickled or copied into the header. The header
is msgpack made by msgspec from the message's typed Struct, in array form (field names
are not sent)::

    header = [[[dtype, shape], ...],           # one entry per buffer, in order
              [op, field0, field1, ...]]       # the message; an array field holds the
                                               # index of its buffer (or nil)

Decoding (:func:`unpack_header`, then :func:`decode`) trusts nothing: msgspec decodes
the header straight into the message's Struct, checking every field's type (no bool for
an int, no float for an int, no str for bytes, no extension types), calling the message's
own ``__post_init__`` checks, and bounding every declared length by the bytes actually
there before allocating. Then every array's dtype is on a whitelist (:data:`DTYPES`), its
rank and every dimension are bounded, free-form (``Any``) fields hold plain data no deeper
than ``max_meta_depth``, and ``prod(shape) * itemsize`` must equal the buffer length
*before* :func:`numpy.frombuffer` builds a zero-copy view. Any violation raises
:class:`~stealer.errors.ProtocolError` (never a msgspec exception, nor an
``AttributeError`` deeper in the runtime). :func:`encode` runs the same checks on its own
header, so a message that leaves is one a peer with the same limits accepts.

Schema evolution
----------------
* The protocol version (:data:`PROTOCOL_VERSION`) travels in :class:`Hello`; peers of
  different versions are rejected at the handshake.
* A new field of an existing message gets a default and goes *last*. An old peer that
  receives the new field **ignores it** (msgspec skips trailing extra fields of an
  array-form struct); a new peer that receives a message without it uses the default.
  A missing field without a default is a :class:`~stealer.errors.ProtocolError`.
* An unknown ``op`` is a :class:`~stealer.errors.ProtocolError`. Never reuse an ``op``.
* :class:`Hello`, :class:`Welcome` and :class:`Reject` must stay decodable by every
  version, since they carry the version check itself: they are :class:`StableMessage`,
  sent in the envelope of protocol 3 (``{"op": op, "f": {field: value}, "a": [], "n": []}``,
  fields by name), and only defaulted fields may be added to them. The same holds for the
  cluster-secret messages :class:`AuthInit`, :class:`AuthChallenge` and :class:`AuthProof`,
  which come before Hello (see :mod:`stealer.wire.auth`), and for :class:`Goodbye`.

Arrays received are read-only views into the frame buffer (copy them to mutate); arrays
sent must not be mutated until :meth:`Comm.send` has returned. A message's
``__post_init__`` runs when it is decoded too; it may check whether an array field is
None, but must not look into the array (while the header is decoded, before the buffers
are attached, an array field holds a placeholder).
"""

from __future__ import annotations

import logging
import math
import re
import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, TypeVar, Union, get_args, get_origin, get_type_hints

import msgspec
import numpy as np
from msgspec import field

from stealer.codec import WIRE_CODECS
from stealer.config import DEFAULT_LIMITS, Limits
from stealer.errors import ProtocolError

__all__ = [
    "AUTH_NONCE_BYTES",
    "AUTH_PROOF_BYTES",
    "DTYPES",
    "PROTOCOL_VERSION",
    "AuthChallenge",
    "AuthInit",
    "AuthProof",
    "Goodbye",
    "Header",
    "Hello",
    "Message",
    "Ping",
    "Pong",
    "Reject",
    "StableMessage",
    "TensorMsg",
    "Welcome",
    "decode",
    "encode",
    "message_types",
    "register",
    "unpack_header",
]

logger = logging.getLogger(__name__)

PROTOCOL_VERSION: Final = 6
"""Version of the wire protocol, exchanged in :class:`Hello`; bump on any change that an
older peer cannot handle by ignoring unknown fields. 4: msgspec array-form headers
(protocol 3 sent every message in the map envelope that only stable messages keep). 5: a
tile's input may travel encoded (``codec``, ``encoded`` of :class:`StealReply` and
:class:`RegionReply`), which an older thief would take for a grant without data. 6:
:class:`FrameUnknown` (a result came before its frame's announcement: announce it again),
the :class:`Preview` message (frame previews for the gateway's dashboard) and dashboard fields
of :class:`Status`, and a fused block may be a DAG with several outputs (:class:`TileDone`
``output`` and a tail grant's ``data`` are then those maps raveled and concatenated, 1-D;
``stealer.ftp.execute.pack_tile``; a plan key's depth may end past a route), and sharded tail
layers (``--shards K [--coded]``): :class:`ShardAssign`, :class:`ShardReady`,
:class:`ShardTask`, :class:`ShardResult`, and :class:`TailDone` ``recovered``: an older peer
would drop the connection, refuse or misread."""

DTYPES: Final[dict[str, np.dtype[Any]]] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "uint8": np.dtype("u1"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
}
"""The only array dtypes that cross the wire, always little-endian, by wire name."""

_WIRE_NAME: Final[dict[np.dtype[Any], str]] = {dt: name for name, dt in DTYPES.items()}
"""Wire name of each native-order wire dtype (a dict lookup: ``dtype.name`` runs Python code
in numpy and showed in the runtime's profile)."""

_MAX_ARRAY_FIELDS: Final = 64
"""Most ndarray fields one message class may have (one placeholder each, below)."""


class Message(msgspec.Struct, frozen=True, array_like=True, tag_field="op"):
    """Base class of every wire message: a frozen msgspec Struct, sent in array form.

    Subclasses give their ``op`` as the struct tag (``class Ping(Message, tag="ping")``)
    and are registered with :func:`register`, which also sets the ``op`` class attribute.
    """

    op: ClassVar[str]


class StableMessage(Message, frozen=True, array_like=False, omit_defaults=True):
    """A message every protocol version must decode (the handshake, :class:`Goodbye`):
    sent in protocol 3's map envelope, fields by name, and never with arrays."""


M = TypeVar("M", bound=type[Message])


class _Bad(Exception):
    """A value does not fit its field; turned into ProtocolError with the field's name."""


@dataclass(frozen=True, slots=True)
class _Spec:
    """What encode/decode need to know about one registered class, computed once."""

    cls: type[Message]
    op: str
    fields: tuple[str, ...]  # in wire order
    arrays: tuple[str, ...]  # the ndarray fields
    plain: tuple[str, ...]  # fields holding free-form data (Any somewhere in the type)
    stable: bool
    decoder: msgspec.msgpack.Decoder[Any] | None  # the map decoder of a stable message


_BY_OP: dict[str, _Spec] = {}
_BY_CLASS: dict[type[Message], _Spec] = {}

# While a header is decoded, an array field holds one of these placeholders: msgspec checks
# what the decode hook returns against the field's type, so it must be an ndarray, and the
# buffers are not at hand yet (the frame layout is read from the header). Distinct objects,
# so the placeholder itself says which buffer it stands for.
_SLOTS: Final = tuple(np.zeros(0, np.uint8) for _ in range(_MAX_ARRAY_FIELDS))
for _s in _SLOTS:
    _s.flags.writeable = False
_SLOT_INDEX: Final = {id(s): i for i, s in enumerate(_SLOTS)}


def _dec_hook(tp: type, obj: Any) -> Any:
    """msgspec's hook for ndarray fields: the wire value is a buffer index."""
    if tp is np.ndarray:
        if type(obj) is not int or not 0 <= obj < _MAX_ARRAY_FIELDS:
            raise ValueError(f"an array field must hold a buffer index, got {obj!r}")
        return _SLOTS[obj]
    raise TypeError(f"unsupported field type {tp!r}")  # pragma: no cover - register refuses it


def _enc_hook(obj: Any) -> Any:
    """msgspec's hook for values it cannot encode: only array placeholders are allowed."""
    i = _SLOT_INDEX.get(id(obj))
    if i is None or _SLOTS[i] is not obj:
        raise TypeError(
            f"{type(obj).__name__} is not plain data (None/bool/int/float/str/bytes/list/dict)"
        )
    return i


class _Legacy(msgspec.Struct, forbid_unknown_fields=True):
    """Protocol 3's envelope, kept for :class:`StableMessage` (never with arrays)."""

    op: str
    f: msgspec.Raw
    a: tuple[()]
    n: tuple[()]


_ENCODER: Final = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_PEEK: Final = msgspec.msgpack.Decoder(tuple[msgspec.Raw, list[msgspec.Raw]])
_OP: Final = msgspec.msgpack.Decoder(str)
_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(_Legacy)
"""Decodes a whole header: rebuilt by :func:`register` to know every array-form class."""


# ---------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------


def _kind(tp: Any, top: bool = True) -> str:
    """'array', 'plain' (holds Any), or 'typed', for one field annotation."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is np.ndarray or origin is np.ndarray:
        if not top:
            raise TypeError(f"arrays inside containers are not supported: {tp!r}")
        return "array"
    if tp is Any:
        return "plain"
    if origin in (Union, types.UnionType) and top and type(None) in args and len(args) == 2:
        inner = next(a for a in args if a is not type(None))
        return _kind(inner, top=True)
    kinds = {_kind(a, top=False) for a in args if a is not Ellipsis}
    return "plain" if "plain" in kinds else "typed"


def _rebuild_decoder() -> None:
    global _decoder
    compact = [s.cls for s in _BY_OP.values() if not s.stable]
    body: Any = Union[tuple(compact)] if compact else None  # noqa: UP007 (runtime union)
    _decoder = msgspec.msgpack.Decoder(
        Union[tuple[list[tuple[str, list[int]]], body], _Legacy],  # noqa: UP007
        dec_hook=_dec_hook,
    )


def register(cls: M) -> M:
    """Register a message class under its ``op`` tag (use as a class decorator).

    Parameters
    ----------
    cls
        A subclass of :class:`Message` (or :class:`StableMessage`) with its own string
        ``tag``. Field types are what msgspec decodes (``int``, ``float``, ``str``,
        ``bytes``, ``bool``, ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]``,
        ``X | None``, ...), plus ``numpy.ndarray`` (or ``numpy.ndarray | None``) for
        arrays sent as raw buffers, and ``Any`` for free-form plain data.

    Returns
    -------
    type
        ``cls`` itself, with ``cls.op`` set to its tag.

    Raises
    ------
    TypeError
        If the class is not a Message struct or a field type is unsupported.
    ValueError
        If the tag is missing or already registered.
    """
    if not (isinstance(cls, type) and issubclass(cls, Message)):
        raise TypeError(f"{cls!r} must be a subclass of Message")
    op = cls.__struct_config__.tag
    if not isinstance(op, str) or not op:
        raise ValueError(f"{cls.__name__} must give its op as a string tag: class X(Message, tag=...)")
    if op in _BY_OP:
        raise ValueError(f"op {op!r} already registered by {_BY_OP[op].cls.__name__}")
    hints = get_type_hints(cls)
    names = cls.__struct_fields__
    kinds = {name: _kind(hints[name]) for name in names}
    arrays = tuple(n for n in names if kinds[n] == "array")
    stable = issubclass(cls, StableMessage)
    if stable and arrays:
        raise TypeError(f"{cls.__name__}: a StableMessage cannot carry arrays")
    if len(arrays) > _MAX_ARRAY_FIELDS:
        raise TypeError(f"{cls.__name__}: more than {_MAX_ARRAY_FIELDS} array fields")
    # Build the decoder before touching the registry, so an unsupported type leaves it as is.
    decoder = msgspec.msgpack.Decoder(cls) if stable else None
    spec = _Spec(
        cls, op, names, arrays, tuple(n for n in names if kinds[n] == "plain"), stable, decoder
    )
    cls.op = op
    _BY_OP[op] = spec
    _BY_CLASS[cls] = spec
    try:
        _rebuild_decoder()
    except TypeError:
        del _BY_OP[op], _BY_CLASS[cls]
        _rebuild_decoder()
        raise
    return cls


def message_types() -> dict[str, type[Message]]:
    """Return every registered message class by ``op``.

    Returns
    -------
    dict
        ``{op: class}``, a fresh copy.
    """
    return {op: s.cls for op, s in _BY_OP.items()}


# ---------------------------------------------------------------------------------------
# the messages
# ---------------------------------------------------------------------------------------


class _Identity(StableMessage, frozen=True):
    """Who a node is: sent by the client in Hello, answered by the server in Welcome."""

    version: int
    node_id: str
    role: str
    port: int
    cores: int
    model_hash: str
    max_memory: int

    def __post_init__(self) -> None:
        if not 0 <= self.version < 2**16:
            raise ValueError(f"version {self.version} out of range")
        if not 1 <= len(self.node_id) <= 64:
            raise ValueError("node_id must have 1..64 characters")
        if not 1 <= len(self.role) <= 32:
            raise ValueError("role must have 1..32 characters")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} out of range")
        if not 1 <= self.cores <= 4096:
            raise ValueError(f"cores {self.cores} out of range")
        if len(self.model_hash) > 128:
            raise ValueError("model_hash longer than 128 characters")
        if self.max_memory < 0:
            raise ValueError("max_memory must be >= 0")


@register
class Hello(_Identity, tag="hello", frozen=True):
    """First message of a connection, client to server: version, identity, capacity.

    ``port`` is the sender's own listening port (0 if it does not listen), ``max_memory``
    the bytes it is willing to spend on stolen work, ``model_hash`` identifies the exact
    cfg+weights so that peers never exchange tiles of different models.
    """


@register
class Welcome(_Identity, tag="welcome", frozen=True):
    """Server's positive answer to :class:`Hello`, carrying the server's identity."""

    @classmethod
    def of(cls, ident: _Identity) -> Welcome:
        """Build a Welcome with the same identity fields as ``ident`` (usually a Hello)."""
        return cls(*(getattr(ident, name) for name in _Identity.__struct_fields__))


@register
class Reject(StableMessage, tag="reject", frozen=True):
    """Server's negative answer to :class:`Hello`; the connection is closed after it."""

    reason: str


AUTH_NONCE_BYTES: Final = 32
"""Length of each side's fresh random challenge nonce (256 bits: never repeats)."""

AUTH_PROOF_BYTES: Final = 32
"""Length of a handshake proof (keyed BLAKE2b-256 over the transcript)."""


def _check_node_id(node_id: str) -> None:
    if not 1 <= len(node_id) <= 64:
        raise ValueError("node_id must have 1..64 characters")


@register
class AuthInit(StableMessage, tag="auth-init", frozen=True):
    """Cluster-secret handshake, client to server, first message: who I claim to be and
    my fresh nonce. Nothing in it is trusted until the exchange completes."""

    node_id: str
    nonce: bytes
    frame_mac: bool = False  # the client wants a MAC on every later frame

    def __post_init__(self) -> None:
        _check_node_id(self.node_id)
        if len(self.nonce) != AUTH_NONCE_BYTES:
            raise ValueError(f"nonce must have {AUTH_NONCE_BYTES} bytes")


@register
class AuthChallenge(StableMessage, tag="auth-challenge", frozen=True):
    """Server's answer to :class:`AuthInit`: its identity, its fresh nonce and its proof
    that it knows the secret (the server proves first, so a client never reveals a proof
    to a server that cannot make one)."""

    node_id: str
    nonce: bytes
    proof: bytes
    frame_mac: bool = False

    def __post_init__(self) -> None:
        _check_node_id(self.node_id)
        if len(self.nonce) != AUTH_NONCE_BYTES:
            raise ValueError(f"nonce must have {AUTH_NONCE_BYTES} bytes")
        if len(self.proof) != AUTH_PROOF_BYTES:
            raise ValueError(f"proof must have {AUTH_PROOF_BYTES} bytes")


@register
class AuthProof(StableMessage, tag="auth-proof", frozen=True):
    """Client's proof that it knows the secret; the client's Hello follows it at once."""

    proof: bytes

    def __post_init__(self) -> None:
        if len(self.proof) != AUTH_PROOF_BYTES:
            raise ValueError(f"proof must have {AUTH_PROOF_BYTES} bytes")


@register
class Ping(Message, tag="ping", frozen=True):
    """Liveness probe; answered with :class:`Pong` of the same ``seq`` by the Comm itself."""

    seq: int


@register
class Pong(Message, tag="pong", frozen=True):
    """Answer to :class:`Ping`."""

    seq: int


@register
class Goodbye(StableMessage, tag="goodbye", frozen=True):
    """Clean close: the sender will send nothing more on this connection."""

    reason: str = ""


@register
class TensorMsg(Message, tag="tensor", frozen=True):
    """Generic tensor carrier: a tag, one array (raw buffer) and free-form plain metadata."""

    tag: str
    array: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)



# ---------------------------------------------------------------------------------------
# encode / decode
# ---------------------------------------------------------------------------------------


class Header(msgspec.Struct, frozen=True, gc=False):
    """A validated frame header (what :func:`unpack_header` returns).

    A msgspec Struct rather than a frozen dataclass: it is made for every frame, and a
    frozen dataclass's ``__init__`` (``object.__setattr__`` per field) cost more than
    decoding a small header.

    Attributes
    ----------
    op
        The message tag.
    message
        The decoded and type-checked message, except that its array fields still hold
        placeholders: :func:`decode` attaches the buffers.
    arrays
        ``(dtype, shape)`` for each raw buffer, in order.
    lens
        Byte length of each raw buffer, ``prod(shape) * dtype.itemsize``.
    """

    op: str
    message: Message
    arrays: tuple[tuple[np.dtype[Any], tuple[int, ...]], ...]
    lens: tuple[int, ...]


def _tname(v: object) -> str:
    return type(v).__name__


def _check_plain(v: Any, depth: int) -> None:
    """Plain msgpack data only: None, bool, int, float, str, bytes, list, str-keyed dict."""
    if v is None or type(v) in (bool, int, float, str, bytes):
        return
    if type(v) is list:
        if depth <= 0:
            raise _Bad("nesting too deep")
        for x in v:
            _check_plain(x, depth - 1)
        return
    if type(v) is dict:
        if depth <= 0:
            raise _Bad("nesting too deep")
        for k, x in v.items():
            if type(k) is not str:
                raise _Bad(f"dict key must be str, got {_tname(k)}")
            _check_plain(x, depth - 1)
        return
    # what msgspec makes of extension types (Ext, timestamps as datetime) ends up here
    raise _Bad(f"{_tname(v)} is not plain data (None/bool/int/float/str/bytes/list/dict)")


def _check_shape(shape: Sequence[Any], limits: Limits) -> tuple[int, ...]:
    if len(shape) > limits.max_array_ndim:
        raise ProtocolError(f"array shape must be a list of at most {limits.max_array_ndim} ints")
    for d in shape:
        if not 0 <= d <= limits.max_array_dim:
            raise ProtocolError(f"array dimension {d!r} not an int in [0, {limits.max_array_dim}]")
    return tuple(shape)


def _array_out(op: str, name: str, value: Any, limits: Limits) -> tuple[str, list[int], memoryview]:
    if not isinstance(value, np.ndarray):
        raise ProtocolError(f"cannot encode {op}.{name}: expected ndarray, got {_tname(value)}")
    wire_name = _WIRE_NAME.get(value.dtype)
    if wire_name is not None and value.flags.c_contiguous and len(value.shape) <= limits.max_array_ndim:
        # the common case (a native wire dtype, C-contiguous): a flat view, no conversion
        _check_shape(value.shape, limits)
        return wire_name, list(value.shape), value.reshape(-1).view(np.uint8).data
    wire_name = value.dtype.name
    dt = DTYPES.get(wire_name)
    if dt is None or value.dtype.fields is not None:
        raise ProtocolError(
            f"cannot encode {op}.{name}: dtype {value.dtype} not in {sorted(DTYPES)}"
        )
    shape = _check_shape(value.shape, limits)
    # Copies only if the input is non-contiguous or big-endian; otherwise a view.
    arr = np.ascontiguousarray(value, dtype=dt)
    return wire_name, list(shape), arr.reshape(-1).view(np.uint8).data


def encode(msg: Message, limits: Limits = DEFAULT_LIMITS) -> tuple[bytes, list[memoryview]]:
    """Encode a registered message into a msgpack header and raw array buffers.

    Parameters
    ----------
    msg
        An instance of a registered message class.
    limits
        Bounds the receiver will enforce; the header is checked against them here, with
        the receiver's own checks, so a bad or too-big message fails before anything is
        written.

    Returns
    -------
    header : bytes
        The msgpack header.
    buffers : list of memoryview
        One flat byte view per ndarray field, in header order; views of the caller's
        arrays when they are C-contiguous little-endian (no copy).

    Raises
    ------
    ProtocolError
        If the message is not registered, a field has the wrong type, an array has a
        dtype outside :data:`DTYPES` or the header is too large.
    """
    spec = _BY_CLASS.get(type(msg))
    if spec is None:
        raise ProtocolError(f"{type(msg).__name__} is not a registered message")
    buffers: list[memoryview] = []
    try:
        if spec.stable:
            header = _ENCODER.encode({"op": spec.op, "f": msg, "a": (), "n": ()})
        else:
            descs: list[tuple[str, list[int]]] = []
            wire = msg
            if spec.arrays:
                slots = {}
                for name in spec.arrays:
                    value = getattr(msg, name)
                    if value is None:
                        continue
                    wire_name, shape, buf = _array_out(spec.op, name, value, limits)
                    slots[name] = _SLOTS[len(buffers)]
                    descs.append((wire_name, shape))
                    buffers.append(buf)
                if len(buffers) > limits.max_buffers:
                    raise ProtocolError(
                        f"cannot encode {spec.op}: {len(buffers)} arrays > max_buffers"
                    )
                if slots:
                    wire = msgspec.structs.replace(msg, **slots)
            header = _ENCODER.encode((descs, wire))
    except OverflowError as e:  # msgspec: an int beyond msgpack's range
        raise ProtocolError(f"cannot encode {spec.op}: integer out of the msgpack range ({e})") from None
    except (TypeError, ValueError) as e:  # the enc hook: not plain data
        raise ProtocolError(f"cannot encode {spec.op}: {e}") from None
    if len(header) > limits.max_header_bytes:
        raise ProtocolError(
            f"cannot encode {spec.op}: header {len(header)} B > max_header_bytes "
            f"{limits.max_header_bytes} B (put big data in arrays)"
        )
    # msgspec encodes whatever the fields hold (Structs check no types when built): the
    # receiver's checks, run on our own header, refuse a str in an int field here.
    try:
        _parse(header, limits)
    except ProtocolError as e:
        raise ProtocolError(f"cannot encode {spec.op}: {e}") from None
    return header, buffers


_MESSAGE_PATH: Final = re.compile(r"`\$\[1\](?:\[(\d+)\])?")
"""Where a msgspec error in an array-form header is: in the message ($[1]), field k-1."""


def _invalid(data: bytes | bytearray | memoryview, err: msgspec.ValidationError) -> ProtocolError:
    """A ProtocolError naming the message and field a msgspec validation error is about."""
    text = str(err)
    m = _MESSAGE_PATH.search(text)
    if m is None:
        return ProtocolError(f"invalid header: {text}")
    try:  # on the error path only: the op, without decoding anything else
        _, body = _PEEK.decode(data)
        op = _OP.decode(body[0]) if body else ""
    except msgspec.DecodeError:
        op = ""
    spec = _BY_OP.get(op)
    k = None if m.group(1) is None else int(m.group(1))
    if k == 0:
        if spec is None:
            return ProtocolError(f"unknown op {op!r}")
        return ProtocolError(f"{op} must come in the map envelope (it is a StableMessage)")
    if spec is not None and k is not None and k <= len(spec.fields):
        return ProtocolError(f"{op}.{spec.fields[k - 1]}: {text}")
    return ProtocolError(f"invalid {op or 'message'}: {text}")


def _unpack_stable(
    env: _Legacy,
) -> tuple[str, Message, tuple[tuple[np.dtype[Any], tuple[int, ...]], ...], tuple[int, ...]]:
    spec = _BY_OP.get(env.op)
    if spec is None:
        raise ProtocolError(f"unknown op {env.op!r}")
    if spec.decoder is None:
        raise ProtocolError(f"{env.op} must come in the array-form header of protocol {PROTOCOL_VERSION}")
    try:
        msg = spec.decoder.decode(env.f)
    except msgspec.ValidationError as e:
        raise ProtocolError(f"invalid {env.op}: {e}") from None
    except (msgspec.DecodeError, RecursionError) as e:
        raise ProtocolError(f"undecodable {env.op}: {e}") from None
    return spec.op, msg, (), ()


def unpack_header(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Header:
    """Parse and validate a frame header from untrusted bytes.

    Parameters
    ----------
    data
        The msgpack header bytes.
    limits
        Size bounds (header size, number of buffers, array rank and dimensions, depth of
        free-form data).

    Returns
    -------
    Header
        The validated header, with the message decoded except for its arrays.

    Raises
    ------
    ProtocolError
        On any malformed, oversized or inconsistent header.
    """
    return Header(*_parse(data, limits))


def _parse(
    data: bytes | bytearray | memoryview, limits: Limits
) -> tuple[str, Message, tuple[tuple[np.dtype[Any], tuple[int, ...]], ...], tuple[int, ...]]:
    """:func:`unpack_header`, returning the Header's fields (encode's check needs no Header)."""
    if len(data) > limits.max_header_bytes:
        raise ProtocolError(f"header of {len(data)} B > max_header_bytes {limits.max_header_bytes}")
    try:
        obj = _decoder.decode(data)  # declared lengths are checked against len(data) first
    except msgspec.ValidationError as e:
        raise _invalid(data, e) from None
    except (msgspec.DecodeError, RecursionError) as e:
        # DecodeError: truncated, trailing or malformed bytes; RecursionError: nesting bombs
        raise ProtocolError(f"undecodable header: {e}") from None
    if type(obj) is _Legacy:
        return _unpack_stable(obj)
    descs, msg = obj
    spec = _BY_CLASS[type(msg)]
    op = spec.op
    if not descs and not spec.plain:
        return op, msg, (), ()  # most control messages: nothing more to check
    if len(descs) > limits.max_buffers:
        raise ProtocolError(f"{op}: {len(descs)} buffers > max_buffers {limits.max_buffers}")
    arrays = []
    lens = []
    for dtype_name, shape in descs:
        dt = DTYPES.get(dtype_name)
        if dt is None:
            raise ProtocolError(f"{op}: dtype {dtype_name!r} not in {sorted(DTYPES)}")
        shp = _check_shape(shape, limits)
        arrays.append((dt, shp))
        lens.append(math.prod(shp) * dt.itemsize)
    for name in spec.plain:
        try:
            _check_plain(getattr(msg, name), limits.max_meta_depth)
        except _Bad as e:
            raise ProtocolError(f"{op}.{name}: {e}") from None
    return op, msg, tuple(arrays), tuple(lens)


def decode(
    header: Header | bytes | bytearray | memoryview,
    buffers: Sequence[bytes | bytearray | memoryview],
    limits: Limits = DEFAULT_LIMITS,
) -> Message:
    """Build a message from a header and its raw buffers, validating everything.

    Parameters
    ----------
    header
        Header bytes, or a :class:`Header` already returned by :func:`unpack_header`.
    buffers
        The raw buffers that followed the header, in order.
    limits
        Size bounds.

    Returns
    -------
    Message
        The decoded message. Its arrays are zero-copy views of ``buffers`` (read-only
        when the buffers are).

    Raises
    ------
    ProtocolError
        Unknown op, wrong field type, missing required field, buffer count or size
        mismatch, or a value rejected by the message's own validation.
    """
    if isinstance(header, Header):
        op, msg, arrays, lens = header.op, header.message, header.arrays, header.lens
    else:
        op, msg, arrays, lens = _parse(header, limits)
    if len(buffers) != len(lens):
        raise ProtocolError(f"{op}: {len(buffers)} buffers, header lists {len(lens)}")
    spec = _BY_CLASS[type(msg)]
    if not spec.arrays:
        if buffers:
            logger.debug("ignoring %d buffers of %s", len(buffers), op)
        return msg
    views: dict[str, np.ndarray] = {}
    used: set[int] = set()
    for name in spec.arrays:
        slot = getattr(msg, name)
        if slot is None:
            continue
        i = _SLOT_INDEX[id(slot)]
        if i >= len(buffers) or i in used:
            raise ProtocolError(f"{op}.{name}: buffer {i} missing or taken by another field")
        used.add(i)
        (dt, shape), nbytes = arrays[i], lens[i]
        view = memoryview(buffers[i])
        if view.nbytes != nbytes:
            raise ProtocolError(f"{op}.{name}: buffer has {view.nbytes} B, header says {nbytes}")
        if view.format != "B" or not view.c_contiguous:
            view = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
        # Sizes were checked above, so frombuffer/reshape cannot fail or over-read.
        views[name] = np.frombuffer(view, dtype=dt).reshape(shape)
    if len(used) < len(buffers):
        logger.debug("ignoring %d unclaimed buffers of %s", len(buffers) - len(used), op)
    if not views:
        return msg
    try:
        # a new message rather than filling in header.message, so a Header decodes twice
        return msgspec.structs.replace(msg, **views)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"invalid {op}: {e}") from None


# ---------------------------------------------------------------------------------------
# runtime messages (work stealing, reuse strips, results)
# ---------------------------------------------------------------------------------------
# Tasks are named by (source, frame, task): ``source`` is "<node id>/<k>" for the k-th feed of
# a node, ``task`` the tile id in the frame's plan or -1 for the frame's tail (the layers after
# the fused block). ``plan`` is a plan key "RxC:L:scheme" from which every node builds the
# same plan (same model, checked at the handshake).


def _check_tile_input(data: np.ndarray | None, pixels: np.ndarray | None, origin: list[int], codec: str,
                      encoded: np.ndarray | None) -> None:
    """A tile's (or tail's) input comes one way: ``data``, ``pixels``, or ``encoded`` in a
    known ``codec`` other than raw (the arrays themselves are checked by the thief, which
    knows the shapes the task needs)."""
    if (data is not None) + (pixels is not None) + (encoded is not None) != 1:
        raise ValueError("a tile's input comes as exactly one of data, pixels and encoded")
    if codec not in WIRE_CODECS:
        raise ValueError(f"unknown frame codec {codec[:16]!r}")
    if (codec != "raw") != (encoded is not None):
        raise ValueError(f"codec {codec!r} with{'' if encoded is not None else 'out'} encoded input")
    if len(origin) not in (0, 2):
        raise ValueError(f"pixel_origin has {len(origin)} values, not 2")


def _check_task_name(source: str, frame: int, task: int) -> None:
    if not 1 <= len(source) <= 128:
        raise ValueError("source must have 1..128 characters")
    if frame < 0:
        raise ValueError(f"frame {frame} is negative")
    if task < -1:
        raise ValueError(f"task {task} is invalid")


MAX_TILES: Final = 4096
"""Tiles a frame's plan may have (a 64x64 grid): bounds every list of task ids a peer sends."""

MAX_NODE_SPEED: Final = 1e15
"""FLOP/s a peer may claim (a petaflop: far beyond any edge device, finite for the planner)."""

MAX_PREVIEW_SIDE: Final = 4096
"""Longest preview side a gateway may ask sources for (a 4K frame): bounds what it makes
every source encode and send per frame."""

MAX_PREVIEW_INTERVAL: Final = 3600.0
"""Longest preview interval a Status may carry (seconds)."""


@register
class Status(Message, tag="status", frozen=True):
    """How much work the sender has queued (sent whenever it changes); idle nodes pick
    victims by it, so nobody polls."""

    queued_tiles: int
    queued_tails: int
    leased: int = 0  # tasks out with other nodes (candidates for speculative copies)
    speed: float = 0.0  # FLOP/s the sender measured over its own compute; 0: not measured yet
    # what a dashboard shows of the sender (protocol 6): its counters since it started, the
    # share of its compute slots' time spent computing, and the bytes of every connection it
    # has had (the receiver turns those into rates)
    busy: float = 0.0
    tasks_run: int = 0
    stolen: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    # the sender serves a dashboard: as the gateway it wants a Status from every node each
    # dashboard_report_interval
    watching: bool = False
    # as the gateway, the sender wants frame previews (Preview) from sources, their longest
    # side at most preview_side pixels (0: no previews), at most one per source every
    # preview_interval seconds (0: of every frame): what its most demanding consumer needs
    # (the dashboard, --mjpeg, --video-out)
    preview_side: int = 0
    preview_interval: float = 0.0

    def __post_init__(self) -> None:
        counts = (self.queued_tiles, self.queued_tails, self.leased, self.tasks_run, self.stolen,
                  self.bytes_in, self.bytes_out)
        if min(counts) < 0 or max(counts) >= 2**63:
            raise ValueError("counts in a status out of range")
        if not (math.isfinite(self.speed) and 0.0 <= self.speed <= MAX_NODE_SPEED):
            raise ValueError(f"speed {self.speed} out of range")
        if not (math.isfinite(self.busy) and 0.0 <= self.busy <= 1.0):
            raise ValueError(f"busy {self.busy} out of range")
        if not 0 <= self.preview_side <= MAX_PREVIEW_SIDE:
            raise ValueError(f"preview side {self.preview_side} out of range")
        if not (math.isfinite(self.preview_interval) and 0.0 <= self.preview_interval <= MAX_PREVIEW_INTERVAL):
            raise ValueError(f"preview interval {self.preview_interval} out of range")


@register
class Preview(Message, tag="preview", frozen=True):
    """Source to gateway, only while the gateway's Status asks for previews: a downscaled JPEG
    of one frame of the sender's own source (at most one per the Status' ``preview_interval``,
    its longest side the Status' ``preview_side``, at most ``Limits.preview_bytes`` of that
    side), sent once the frame's result is out, in frame order; the gateway draws the frame's
    detections on it for its dashboard, ``--mjpeg`` and ``--video-out``.
    ``img_w`` x ``img_h`` is the camera image the detections' pixel boxes refer to."""

    source: str
    frame: int
    img_w: int
    img_h: int
    jpeg: np.ndarray  # uint8, flat: the JPEG file's bytes

    def __post_init__(self) -> None:
        _check_task_name(self.source, self.frame, 0)
        if not (1 <= self.img_w <= 1 << 16 and 1 <= self.img_h <= 1 << 16):
            raise ValueError(f"image size {self.img_w}x{self.img_h} out of range")


@register
class StealRequest(Message, tag="steal", frozen=True):
    """An idle node asks for one task; ``accept_tail`` is false on nodes too small for tails."""

    request_id: int
    accept_tail: bool = True
    speculative: bool = False  # nothing is queued anywhere: a copy of a straggler will do


@register
class StealReply(Message, tag="steal-reply", frozen=True):
    """The victim's answer: a task with its input data (``granted``), or nothing.

    For a tile, ``region`` (y0, y1, x0, x1) is the part of the network input it gets: the one
    the task's full variant needs, or, when the victim knows every producer of a reuse task is
    done, the reuse variant's smaller one (the thief asks for the rest with
    :class:`RegionRequest` if the strips turn out to be gone). It comes as ``data`` (float32),
    or as ``pixels``: the camera's uint8 pixels it is letterboxed from, whose top-left pixel is
    ``pixel_origin`` (y, x) of the ``img_w`` x ``img_h`` image (a quarter of the bytes; see
    :func:`stealer.images.letterbox_region`), or as ``encoded`` (flat uint8) in the frame
    codec ``codec`` (:mod:`stealer.codec`): ``zstd``/``png``, those pixels losslessly;
    ``jpeg``, the whole image's JPEG, which the thief decodes and crops to the pixels at
    ``pixel_origin``. Exactly one of ``data``, ``pixels``, ``encoded``. For a tail, ``data`` is
    the fused block's output, or, when tile outputs were kept by the nodes that made them,
    nothing: ``holders`` then says which node keeps which tiles' outputs (node id -> task
    ids; the gateway lists itself for those that came to it), fetched with
    :class:`OutputsFetch`."""

    request_id: int
    granted: bool
    source: str = ""
    frame: int = 0
    task: int = 0
    plan: str = ""
    region: list[int] = field(default_factory=list)
    img_w: int = 0
    img_h: int = 0
    data: np.ndarray | None = None
    pixels: np.ndarray | None = None
    pixel_origin: list[int] = field(default_factory=list)
    # a reuse tile granted small: who holds the strips it consumes (node id -> strip ids), as
    # the victim learnt from the gateway's acks, and the strips the victim holds itself, packed
    # like a StripsReply's (``strips_meta`` [strip id, C, H, W] each, ``strips`` flat float32);
    # both empty when unknown (ask the gateway)
    holders: dict[str, list[int]] = field(default_factory=dict)
    strips_meta: list[list[int]] = field(default_factory=list)
    strips: np.ndarray | None = None
    codec: str = "raw"
    encoded: np.ndarray | None = None
    # a tile: its source advises its runner to keep the output for the tail's runner to fetch
    # (several of its frames are in flight, so the tail rarely runs on the gateway)
    keep_output: bool = False

    def __post_init__(self) -> None:
        if self.granted:
            _check_task_name(self.source, self.frame, self.task)
            if self.task == -1 and self.data is None and self.holders:
                return  # a tail whose tiles' outputs are kept by their nodes: fetched from them
            _check_tile_input(self.data, self.pixels, self.pixel_origin, self.codec, self.encoded)


@register
class FrameStart(Message, tag="frame-start", frozen=True):
    """A source tells the gateway about a frame before queueing its tasks."""

    source: str
    frame: int
    plan: str
    img_w: int
    img_h: int
    deadline: float = 0.0  # seconds from now to finish the frame's tiles; 0: no deadline

    def __post_init__(self) -> None:
        _check_task_name(self.source, self.frame, 0)


@register
class StripsRequest(Message, tag="strips-request", frozen=True):
    """A dependent tile asks the gateway where the reuse strips it consumes are."""

    request_id: int
    source: str
    frame: int
    task: int
    plan: str


@register
class StripsReply(Message, tag="strips-reply", frozen=True):
    """``found`` false if any asked-for strip is missing (the tile then runs full). Else, from
    the gateway to a :class:`StripsRequest`: ``holders``, the node that holds each strip (node
    id -> strip ids); from a holder to a :class:`StripsFetch`: the strips, concatenated in
    ``data`` (float32, flat) as listed in ``meta`` ([strip id, C, H, W] each)."""

    request_id: int
    found: bool
    meta: list[list[int]] = field(default_factory=list)
    data: np.ndarray | None = None
    holders: dict[str, list[int]] = field(default_factory=dict)


@register
class StripsFetch(Message, tag="strips-fetch", frozen=True):
    """A dependent tile asks the node that produced them for reuse strips (peer to peer: strips
    never pass through the gateway, whose link every frame's tiles and tails already cross)."""

    request_id: int
    source: str
    frame: int
    strips: list[int]


@register
class StripsRelease(Message, tag="strips-release", frozen=True):
    """Gateway to the holders of a frame's strips: every tile is in, the strips can go."""

    source: str
    frame: int


@register
class OutputsFetch(Message, tag="outputs-fetch", frozen=True):
    """The node that runs a frame's tail asks a node that kept tile outputs of it (or the
    gateway, for those that came to it) for them. The answer is a :class:`StripsReply`:
    ``found`` false if any is missing; else ``meta`` [task, size] each and ``data`` their
    outputs, flat float32, concatenated in that order."""

    request_id: int
    source: str
    frame: int
    tasks: list[int]

    def __post_init__(self) -> None:
        _check_task_name(self.source, self.frame, 0)
        if not 0 < len(self.tasks) <= MAX_TILES or min(self.tasks) < 0:
            raise ValueError(f"outputs-fetch: 1..{MAX_TILES} task ids, none negative")


@register
class OutputsRelease(Message, tag="outputs-release", frozen=True):
    """Gateway to a node that kept tile outputs of a frame: the frame is over, they can go."""

    source: str
    frame: int


@register
class OutputsMissing(Message, tag="outputs-missing", frozen=True):
    """The node that runs a frame's tail (it holds the tail's lease) could not fetch the tile
    outputs ``holder`` kept (it left, restarted, or let them go): the gateway has those tiles
    run again."""

    source: str
    frame: int
    holder: str

    def __post_init__(self) -> None:
        _check_task_name(self.source, self.frame, -1)
        if not 1 <= len(self.holder) <= 128:
            raise ValueError("holder must have 1..128 characters")


@register
class TilesRedo(Message, tag="tiles-redo", frozen=True):
    """Gateway to source: the outputs of these tiles of the frame were lost with the node that
    kept them before the tail fetched them: queue them again (their full variants)."""

    source: str
    frame: int
    tasks: list[int]

    def __post_init__(self) -> None:
        _check_task_name(self.source, self.frame, 0)
        if not 0 < len(self.tasks) <= MAX_TILES or min(self.tasks) < 0:
            raise ValueError(f"tiles-redo: 1..{MAX_TILES} task ids, none negative")


@register
class RegionRequest(Message, tag="region-request", frozen=True):
    """A thief holding a reuse task's small input region, whose strips are gone (a new gateway,
    an evicted cache), asks the task's owner for the full variant's region instead."""

    request_id: int
    source: str
    frame: int
    task: int

    def __post_init__(self) -> None:
        _check_task_name(self.source, self.frame, self.task)


@register
class RegionReply(Message, tag="region-reply", frozen=True):
    """The full variant's input region of the task (``region`` y0, y1, x0, x1, as ``data``,
    ``pixels`` or ``encoded`` like a :class:`StealReply`), or ``found`` false if the owner no
    longer holds the frame (it finished, or was dropped)."""

    request_id: int
    found: bool
    region: list[int] = field(default_factory=list)
    data: np.ndarray | None = None
    pixels: np.ndarray | None = None
    pixel_origin: list[int] = field(default_factory=list)
    codec: str = "raw"
    encoded: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.found:
            _check_tile_input(self.data, self.pixels, self.pixel_origin, self.codec, self.encoded)


@register
class TileDone(Message, tag="tile-done", frozen=True):
    """A tile's output, and the ids of the reuse strips it published: the sender keeps those
    and serves them to dependent tiles (:class:`StripsFetch`).

    ``kept``: the sender keeps the output itself (``output`` is then empty) and serves it to
    whichever node runs the frame's tail (:class:`OutputsFetch`): a direct data path, so that
    a fused map crosses one link (holder to tail) instead of two (to the gateway, and on)."""

    source: str
    frame: int
    task: int
    plan: str
    variant: str
    output: np.ndarray
    strips_held: list[int] = field(default_factory=list)
    seconds: float = 0.0
    kept: bool = False

    def __post_init__(self) -> None:
        _check_task_name(self.source, self.frame, self.task)
        if self.kept and self.output.size:
            raise ValueError("a kept tile's output stays with its sender: none may come along")


@register
class TileAck(Message, tag="tile-ack", frozen=True):
    """Gateway to source: a reuse producer's result is in (or a late copy of any tile); its
    lease ends. ``holder`` (node id, or empty) keeps the reuse ``strips`` the tile published,
    so that the source can tell the tiles that consume them where to fetch them without
    asking the gateway. Other tiles end with their frame's :class:`TilesIn`."""

    source: str
    frame: int
    task: int
    holder: str = ""
    strips: list[int] = field(default_factory=list)


@register
class TilesIn(Message, tag="tiles-in", frozen=True):
    """Gateway to source: every tile of the frame is in (or its deadline passed); the leases
    of its tiles end. One message instead of an ack per tile that nothing depends on."""

    source: str
    frame: int

    def __post_init__(self) -> None:
        _check_task_name(self.source, self.frame, 0)


@register
class TailDone(Message, tag="tail-done", frozen=True):
    """A frame's final result: the digest of the network's output, and the detections.
    ``whole``: the sender ran the frame's only tile (a 1x1 grid) and then its tail on the
    fused map it had in hand, so the map never crossed a link (the gateway gets the result
    instead of a feature map it would only send on again)."""

    source: str
    frame: int
    output_sha256: str
    detections: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    whole: bool = False
    recovered: list[list[int]] = field(default_factory=list)
    """Coded sharded layers: ``[layer, shard]`` of every shard recovered from its parity."""

    def __post_init__(self) -> None:
        _check_task_name(self.source, self.frame, -1)
        if len(self.recovered) > MAX_SHARD_HOLDINGS or any(len(r) != 2 for r in self.recovered):
            raise ValueError("recovered: at most MAX_SHARD_HOLDINGS [layer, shard] pairs")


@register
class FrameDone(Message, tag="frame-done", frozen=True):
    """Gateway to source: the frame's result is out; the source may forget the frame."""

    source: str
    frame: int


@register
class GatewayClaim(Message, tag="gateway-claim", frozen=True):
    """The sender is the gateway from ``epoch`` on. A node follows the claim with the highest
    epoch; a standby that takes over after the gateway died claims the old epoch + 1."""

    epoch: int


@register
class FrameDrop(Message, tag="frame-drop", frozen=True):
    """Deadline mode: a source gave up on a frame before any of its tasks started (overload);
    the gateway releases it as dropped, in order, instead of waiting for it."""

    source: str
    frame: int


@register
class TaskFailed(Message, tag="task-failed", frozen=True):
    """A node could not run a task it was granted (its input is malformed, a kernel raised):
    the task's owner counts the attempt at once instead of waiting for the lease to run out."""

    source: str
    frame: int
    task: int
    reason: str = ""

    def __post_init__(self) -> None:
        _check_task_name(self.source, self.frame, self.task)


@register
class FrameFailed(Message, tag="frame-failed", frozen=True):
    """Source to gateway: a task of the frame failed ``max_task_attempts`` times. The gateway
    releases the frame in order with the error in its result line instead of waiting for it."""

    source: str
    frame: int
    task: int
    reason: str = ""

    def __post_init__(self) -> None:
        _check_task_name(self.source, self.frame, self.task)


@register
class TaskStarted(Message, tag="task-started", frozen=True):
    """A thief starts a task it fetched ahead (while computing the one before): its lease and
    the straggler clock start now, not when it was granted (a prefetched task is not a
    straggler)."""

    source: str
    frame: int
    task: int

    def __post_init__(self) -> None:
        _check_task_name(self.source, self.frame, self.task)


@register
class FrameWait(Message, tag="frame-wait", frozen=True):
    """Gateway to source: the gateway is full (``max_queued_frames``, ``result_buffer_bytes``);
    the frame waits its turn there, announced and in order, and its tasks are not to run yet
    (back-pressure: nothing is lost and no map is allocated for it). :class:`FrameGo` follows."""

    source: str
    frame: int


@register
class FrameGo(Message, tag="frame-go", frozen=True):
    """Gateway to source: a frame that waited is admitted; queue its tasks."""

    source: str
    frame: int


@register
class FrameUnknown(Message, tag="frame-unknown", frozen=True):
    """Gateway to source: a result of this frame came and the gateway holds no FrameStart for
    it (the announcement was lost with a connection that was replaced or cut, or is still
    behind the result): announce it again. The gateway keeps the result meanwhile, so a
    whole-frame result is not computed twice; a duplicate announcement is ignored."""

    source: str
    frame: int


# --------------------------------------------------------------------------------- sharded layers

MAX_SHARD_HOLDINGS: Final = 4096
"""Most shards one node may be told to hold (or a frame may name as recovered): far past the
weighted layers of any model here (YOLOv4 has 110), so that a peer cannot make a node loop."""


@register
class ShardAssign(Message, tag="shard-assign", frozen=True):
    """Coordinator (the gateway) to a node: from placement ``epoch`` on, hold exactly these
    weights, read from the node's own weights file, and drop any other shard held. Each holding
    is ``[layer, start, stop, parity, k]``: output channels ``[start, stop)`` of ``layer``, or
    (``parity`` 1) the parity of ``layer`` split into ``k`` shards (see :mod:`stealer.shard`).
    Answered with :class:`ShardReady`."""

    epoch: int
    holdings: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.epoch < 0 or len(self.holdings) > MAX_SHARD_HOLDINGS:
            raise ValueError(f"shard-assign: epoch {self.epoch}, {len(self.holdings)} holdings")
        for h in self.holdings:
            if len(h) != 5 or not (0 <= h[0] and 0 <= h[1] < h[2] and h[3] in (0, 1) and h[4] >= 1):
                raise ValueError(f"shard-assign: bad holding {h!r} (want [layer, start, stop, parity, k])")


@register
class ShardReady(Message, tag="shard-ready", frozen=True):
    """Node to coordinator: the holdings of placement ``epoch`` are read (``ok``; ``nbytes`` of
    weights held now), or could not be (``error``)."""

    epoch: int
    ok: bool
    nbytes: int = 0
    error: str = ""


@register
class ShardTask(Message, tag="shard-task", frozen=True):
    """Coordinator to a holder: compute output channels ``[start, stop)`` of ``layer`` (or, with
    ``parity``, the layer's parity rows) from ``data``, the layer's whole input map (float32,
    bounded by ``max_frame_bytes`` like every frame; its shape is checked against the layer's
    before any use). ``pre_activation``: return the linear output (coded layers). Answered with
    :class:`ShardResult` of the same ``task_id``."""

    task_id: int
    epoch: int
    layer: int
    start: int
    stop: int
    parity: bool
    pre_activation: bool
    data: np.ndarray

    def __post_init__(self) -> None:
        if self.layer < 0 or not 0 <= self.start < self.stop:
            raise ValueError(f"shard-task: layer {self.layer}, channels [{self.start}, {self.stop})")


@register
class ShardResult(Message, tag="shard-result", frozen=True):
    """Holder to coordinator: the output of :class:`ShardTask` ``task_id`` ((rows, H, W)
    float32), or why there is none (``error``: the shard is not held here, the input is bad)."""

    task_id: int
    ok: bool
    data: np.ndarray | None = None
    seconds: float = 0.0
    error: str = ""

    def __post_init__(self) -> None:
        if self.ok and self.data is None:
            raise ValueError("shard-result: ok without data")
