"""Every wire message of stealer, and how a message becomes a header plus raw buffers.

A message is a frozen, slotted dataclass with a fixed string tag ``op``, registered with
:func:`register`. Adding a message is a five-line change::

    @register
    @dataclass(frozen=True, slots=True)
    class StealRequest(Message):
        op: ClassVar[str] = "steal-request"
        request_id: int
        max_tiles: int = 1

Encoding (:func:`encode`) gives a small msgpack *header* and a list of raw *buffers*,
one per ndarray field, so tensors are never pickled or copied into the header::

    header = {"op": str,                       # the message tag
              "f": {field: value, ...},        # plain (non-array) fields
              "a": [[field, dtype, shape], ...],   # one entry per buffer, in order
              "n": [nbytes, ...]}              # byte length of each buffer

Decoding (:func:`decode`) trusts nothing: msgpack runs with ``raw=False``,
``strict_map_key=True`` and no extension types; every field is type-checked against the
dataclass annotation; every array's dtype is on a whitelist (:data:`DTYPES`), its rank
and every dimension are bounded, and ``prod(shape) * itemsize`` must equal the buffer
length *before* :func:`numpy.frombuffer` builds a zero-copy view. Any violation raises
:class:`~stealer.errors.ProtocolError`, never an ``AttributeError`` deeper in the runtime.

Schema evolution
----------------
* The protocol version (:data:`PROTOCOL_VERSION`) travels in :class:`Hello`; peers of
  different versions are rejected at the handshake, so the envelope itself is strict
  (unknown top-level keys are an error).
* A new field of an existing message gets a default. An old peer that receives the new
  field **ignores it** (unknown fields are skipped, logged at debug level); a new peer
  that receives a message without the field uses the default. A missing field without a
  default is a :class:`~stealer.errors.ProtocolError`.
* An unknown ``op`` is a :class:`~stealer.errors.ProtocolError`. Never reuse an ``op``.
* :class:`Hello`, :class:`Welcome` and :class:`Reject` must stay decodable by every
  version, since they carry the version check itself: only add defaulted fields to them.
  The same holds for the cluster-secret messages :class:`AuthInit`,
  :class:`AuthChallenge` and :class:`AuthProof`, which come before Hello (see
  :mod:`stealer.wire.auth`).

Arrays received are read-only views into the frame buffer (copy them to mutate); arrays
sent must not be mutated until :meth:`Comm.send` has returned.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    ClassVar,
    Final,
    TypeVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

import msgpack
import numpy as np

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
    "TensorMsg",
    "Welcome",
    "decode",
    "encode",
    "message_types",
    "register",
    "unpack_header",
]

logger = logging.getLogger(__name__)

PROTOCOL_VERSION: Final = 4
"""Version of the wire protocol, exchanged in :class:`Hello`; bump on any change that an
older peer cannot handle by ignoring unknown fields."""

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

_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1  # msgpack's integer range


class Message:
    """Base class of every wire message; subclasses are frozen slotted dataclasses."""

    __slots__ = ()
    op: ClassVar[str]


M = TypeVar("M", bound=type[Message])


class _Bad(Exception):
    """A value does not fit its field; turned into ProtocolError with the field's name."""


_Check = Callable[[Any, int], Any]
"""A field checker: (value, max_depth) -> normalized value, or raises _Bad."""


@dataclass(frozen=True, slots=True)
class _FieldSpec:
    name: str
    is_array: bool
    optional: bool
    required: bool
    check: _Check | None  # None for array fields


@dataclass(frozen=True, slots=True)
class _Schema:
    cls: type[Message]
    op: str
    fields: tuple[_FieldSpec, ...]
    by_name: dict[str, _FieldSpec]


_BY_OP: dict[str, _Schema] = {}
_BY_CLASS: dict[type[Message], _Schema] = {}


# ---------------------------------------------------------------------------------------
# field checkers, compiled once per field from its annotation
# ---------------------------------------------------------------------------------------


def _tname(v: object) -> str:
    return type(v).__name__


def _check_int(v: Any, depth: int) -> int:
    if type(v) is not int:  # bool is an int subclass: rejected on purpose
        raise _Bad(f"expected int, got {_tname(v)}")
    if not _INT_MIN <= v <= _INT_MAX:
        raise _Bad(f"integer {v} outside the msgpack range")
    return v


def _check_float(v: Any, depth: int) -> float:
    if type(v) is float:
        return v
    if type(v) is int:
        return float(v)
    raise _Bad(f"expected float, got {_tname(v)}")


def _exact(tp: type) -> _Check:
    def check(v: Any, depth: int) -> Any:
        if type(v) is not tp:
            raise _Bad(f"expected {tp.__name__}, got {_tname(v)}")
        return v

    return check


def _check_plain(v: Any, depth: int) -> Any:
    """Plain msgpack data only: None, bool, int, float, str, bytes, list, str-keyed dict."""
    if v is None or type(v) in (bool, float, str, bytes):
        return v
    if type(v) is int:
        return _check_int(v, depth)
    if depth <= 0:
        raise _Bad("nesting too deep")
    if type(v) in (list, tuple):
        return [_check_plain(x, depth - 1) for x in v]
    if type(v) is dict:
        out = {}
        for k, x in v.items():
            if type(k) is not str:
                raise _Bad(f"dict key must be str, got {_tname(k)}")
            out[k] = _check_plain(x, depth - 1)
        return out
    raise _Bad(f"{_tname(v)} is not plain data (None/bool/int/float/str/bytes/list/dict)")


def _compile(tp: Any) -> tuple[bool, bool, _Check | None]:
    """Return (is_array, optional, check) for one field annotation."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"unsupported union {tp!r}: only `X | None`")
        is_array, _, chk = _compile(inner[0])
        if chk is None:
            return is_array, True, None

        def check_opt(v: Any, depth: int, chk: _Check = chk) -> Any:
            return None if v is None else chk(v, depth)

        return is_array, True, check_opt
    if tp is np.ndarray or origin is np.ndarray:
        return True, False, None
    if tp is int:
        return False, False, _check_int
    if tp is float:
        return False, False, _check_float
    if tp in (str, bytes, bool):
        return False, False, _exact(tp)
    if tp is Any:
        return False, False, _check_plain
    if tp is dict or origin is dict:
        if args and args[0] is not str:
            raise TypeError(f"dict fields need str keys: {tp!r}")
        vchk = _compile(args[1])[2] if args else _check_plain
        if vchk is None:
            raise TypeError(f"arrays inside containers are not supported: {tp!r}")

        def check_dict(v: Any, depth: int, vchk: _Check = vchk) -> dict[str, Any]:
            if type(v) is not dict:
                raise _Bad(f"expected dict, got {_tname(v)}")
            if depth <= 0:
                raise _Bad("nesting too deep")
            out = {}
            for k, x in v.items():
                if type(k) is not str:
                    raise _Bad(f"dict key must be str, got {_tname(k)}")
                out[k] = vchk(x, depth - 1)
            return out

        return False, False, check_dict
    if tp in (list, tuple) or origin in (list, tuple):
        container = origin or tp
        if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            raise TypeError(f"only tuple[X, ...] is supported: {tp!r}")
        echk = _compile(args[0])[2] if args else _check_plain
        if echk is None:
            raise TypeError(f"arrays inside containers are not supported: {tp!r}")

        if echk is _check_int:
            # lists of ints (regions, strip and task ids) are in most runtime messages: one
            # pass of C-level checks instead of a call per element
            def check_ints(v: Any, depth: int, container: type = container) -> Any:
                if type(v) not in (list, tuple):
                    raise _Bad(f"expected {container.__name__}, got {_tname(v)}")
                if depth <= 0:
                    raise _Bad("nesting too deep")
                if v:
                    if not all(type(x) is int for x in v):  # bool is an int subclass: rejected
                        bad = next(x for x in v if type(x) is not int)
                        raise _Bad(f"expected int, got {_tname(bad)}")
                    if min(v) < _INT_MIN or max(v) > _INT_MAX:
                        raise _Bad("integer outside the msgpack range")
                return v if type(v) is container else container(v)

            return False, False, check_ints

        def check_seq(v: Any, depth: int, echk: _Check = echk, container: type = container) -> Any:
            if type(v) not in (list, tuple):
                raise _Bad(f"expected {container.__name__}, got {_tname(v)}")
            if depth <= 0:
                raise _Bad("nesting too deep")
            out = [echk(x, depth - 1) for x in v]
            return out if container is list else container(out)

        return False, False, check_seq
    raise TypeError(f"unsupported field type {tp!r}")


# ---------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------


def register(cls: M) -> M:
    """Register a message class under its ``op`` tag (use as a class decorator).

    Parameters
    ----------
    cls
        A dataclass subclass of :class:`Message` defining ``op: ClassVar[str]`` in its own
        body. Field annotations must be ``int``, ``float``, ``str``, ``bytes``, ``bool``,
        ``numpy.ndarray``, ``dict[str, X]``, ``list[X]``, ``tuple[X, ...]``, ``Any``
        (plain data) or ``X | None``.

    Returns
    -------
    type
        ``cls`` itself.

    Raises
    ------
    TypeError
        If the class is not a Message dataclass or a field type is unsupported.
    ValueError
        If the ``op`` is missing or already registered.
    """
    if not (isinstance(cls, type) and issubclass(cls, Message) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} must be a dataclass subclass of Message")
    op = cls.__dict__.get("op")
    if not isinstance(op, str) or not op:
        raise ValueError(f"{cls.__name__} must define its own `op: ClassVar[str]`")
    if op in _BY_OP:
        raise ValueError(f"op {op!r} already registered by {_BY_OP[op].cls.__name__}")
    hints = get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        is_array, optional, check = _compile(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        specs.append(_FieldSpec(f.name, is_array, optional, required, check))
    schema = _Schema(cls, op, tuple(specs), {s.name: s for s in specs})
    _BY_OP[op] = schema
    _BY_CLASS[cls] = schema
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


@dataclass(frozen=True, slots=True)
class _Identity(Message):
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
@dataclass(frozen=True, slots=True)
class Hello(_Identity):
    """First message of a connection, client to server: version, identity, capacity.

    ``port`` is the sender's own listening port (0 if it does not listen), ``max_memory``
    the bytes it is willing to spend on stolen work, ``model_hash`` identifies the exact
    cfg+weights so that peers never exchange tiles of different models.
    """

    op: ClassVar[str] = "hello"


@register
@dataclass(frozen=True, slots=True)
class Welcome(_Identity):
    """Server's positive answer to :class:`Hello`, carrying the server's identity."""

    op: ClassVar[str] = "welcome"

    @classmethod
    def of(cls, ident: _Identity) -> Welcome:
        """Build a Welcome with the same identity fields as ``ident`` (usually a Hello)."""
        return cls(*(getattr(ident, f.name) for f in dataclasses.fields(_Identity)))


@register
@dataclass(frozen=True, slots=True)
class Reject(Message):
    """Server's negative answer to :class:`Hello`; the connection is closed after it."""

    op: ClassVar[str] = "reject"
    reason: str


AUTH_NONCE_BYTES: Final = 32
"""Length of each side's fresh random challenge nonce (256 bits: never repeats)."""

AUTH_PROOF_BYTES: Final = 32
"""Length of a handshake proof (keyed BLAKE2b-256 over the transcript)."""


def _check_node_id(node_id: str) -> None:
    if not 1 <= len(node_id) <= 64:
        raise ValueError("node_id must have 1..64 characters")


@register
@dataclass(frozen=True, slots=True)
class AuthInit(Message):
    """Cluster-secret handshake, client to server, first message: who I claim to be and
    my fresh nonce. Nothing in it is trusted until the exchange completes."""

    op: ClassVar[str] = "auth-init"
    node_id: str
    nonce: bytes
    frame_mac: bool = False  # the client wants a MAC on every later frame

    def __post_init__(self) -> None:
        _check_node_id(self.node_id)
        if len(self.nonce) != AUTH_NONCE_BYTES:
            raise ValueError(f"nonce must have {AUTH_NONCE_BYTES} bytes")


@register
@dataclass(frozen=True, slots=True)
class AuthChallenge(Message):
    """Server's answer to :class:`AuthInit`: its identity, its fresh nonce and its proof
    that it knows the secret (the server proves first, so a client never reveals a proof
    to a server that cannot make one)."""

    op: ClassVar[str] = "auth-challenge"
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
@dataclass(frozen=True, slots=True)
class AuthProof(Message):
    """Client's proof that it knows the secret; the client's Hello follows it at once."""

    op: ClassVar[str] = "auth-proof"
    proof: bytes

    def __post_init__(self) -> None:
        if len(self.proof) != AUTH_PROOF_BYTES:
            raise ValueError(f"proof must have {AUTH_PROOF_BYTES} bytes")


@register
@dataclass(frozen=True, slots=True)
class Ping(Message):
    """Liveness probe; answered with :class:`Pong` of the same ``seq`` by the Comm itself."""

    op: ClassVar[str] = "ping"
    seq: int


@register
@dataclass(frozen=True, slots=True)
class Pong(Message):
    """Answer to :class:`Ping`."""

    op: ClassVar[str] = "pong"
    seq: int


@register
@dataclass(frozen=True, slots=True)
class Goodbye(Message):
    """Clean close: the sender will send nothing more on this connection."""

    op: ClassVar[str] = "goodbye"
    reason: str = ""


@register
@dataclass(frozen=True, slots=True)
class TensorMsg(Message):
    """Generic tensor carrier: a tag, one array (raw buffer) and free-form plain metadata."""

    op: ClassVar[str] = "tensor"
    tag: str
    array: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# encode / decode
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    """A validated frame header (what :func:`unpack_header` returns).

    Attributes
    ----------
    op
        The message tag (not yet looked up).
    fields
        Plain field values by name (types not yet checked against a schema).
    arrays
        ``(field, dtype, shape)`` for each raw buffer, in order.
    lens
        Byte length of each raw buffer, equal to ``prod(shape) * dtype.itemsize``.
    """

    op: str
    fields: dict[str, Any]
    arrays: tuple[tuple[str, np.dtype[Any], tuple[int, ...]], ...]
    lens: tuple[int, ...]


def _check_shape(shape: Any, limits: Limits) -> tuple[int, ...]:
    if type(shape) not in (list, tuple) or len(shape) > limits.max_array_ndim:
        raise ProtocolError(f"array shape must be a list of at most {limits.max_array_ndim} ints")
    for d in shape:
        if type(d) is not int or not 0 <= d <= limits.max_array_dim:
            raise ProtocolError(f"array dimension {d!r} not an int in [0, {limits.max_array_dim}]")
    return tuple(shape)


def _array_out(
    op: str, name: str, value: Any, limits: Limits
) -> tuple[str, list[int], memoryview]:
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
    buf = arr.reshape(-1).view(np.uint8).data
    return wire_name, list(shape), buf


def encode(msg: Message, limits: Limits = DEFAULT_LIMITS) -> tuple[bytes, list[memoryview]]:
    """Encode a registered message into a msgpack header and raw array buffers.

    Parameters
    ----------
    msg
        An instance of a registered message class.
    limits
        Bounds the receiver will enforce; checked here too so a too-big message fails
        before anything is written.

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
    schema = _BY_CLASS.get(type(msg))
    if schema is None:
        raise ProtocolError(f"{type(msg).__name__} is not a registered message")
    fields: dict[str, Any] = {}
    arrays: list[list[Any]] = []
    buffers: list[memoryview] = []
    for spec in schema.fields:
        value = getattr(msg, spec.name)
        if spec.is_array:
            if value is None and spec.optional:
                fields[spec.name] = None
                continue
            wire_name, shape, buf = _array_out(schema.op, spec.name, value, limits)
            arrays.append([spec.name, wire_name, shape])
            buffers.append(buf)
            continue
        assert spec.check is not None
        try:
            fields[spec.name] = spec.check(value, limits.max_meta_depth)
        except _Bad as e:
            raise ProtocolError(f"cannot encode {schema.op}.{spec.name}: {e}") from None
    if len(buffers) > limits.max_buffers:
        raise ProtocolError(f"cannot encode {schema.op}: {len(buffers)} arrays > max_buffers")
    header = msgpack.packb(
        {"op": schema.op, "f": fields, "a": arrays, "n": [b.nbytes for b in buffers]},
        use_bin_type=True,
    )
    if len(header) > limits.max_header_bytes:
        raise ProtocolError(
            f"cannot encode {schema.op}: header {len(header)} B > max_header_bytes "
            f"{limits.max_header_bytes} B (put big data in arrays)"
        )
    return header, buffers


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} not allowed")


def unpack_header(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Header:
    """Parse and validate a frame header from untrusted bytes.

    Parameters
    ----------
    data
        The msgpack header bytes.
    limits
        Size bounds (header size, number of buffers, array rank and dimensions).

    Returns
    -------
    Header
        The validated envelope; field types are checked later by :func:`decode`.

    Raises
    ------
    ProtocolError
        On any malformed, oversized or inconsistent header.
    """
    if len(data) > limits.max_header_bytes:
        raise ProtocolError(f"header of {len(data)} B > max_header_bytes {limits.max_header_bytes}")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_no_ext,
        )  # container/str lengths are bounded by len(data), itself bounded above
    except (ValueError, msgpack.UnpackException) as e:
        # ValueError covers ExtraData, FormatError, StackError, bad UTF-8, bad map keys.
        raise ProtocolError(f"undecodable header: {e}") from e
    if type(obj) is not dict or obj.keys() != {"op", "f", "a", "n"}:
        raise ProtocolError("header must be a map with exactly the keys op, f, a, n")
    op, fields, arrays, lens = obj["op"], obj["f"], obj["a"], obj["n"]
    if type(op) is not str:
        raise ProtocolError(f"op must be str, got {_tname(op)}")
    if type(fields) is not dict:
        raise ProtocolError(f"{op}: fields must be a map")
    if type(arrays) is not list or type(lens) is not list or len(arrays) != len(lens):
        raise ProtocolError(f"{op}: array list and length list must be lists of equal length")
    if len(arrays) > limits.max_buffers:
        raise ProtocolError(f"{op}: {len(arrays)} buffers > max_buffers {limits.max_buffers}")
    out_arrays = []
    seen: set[str] = set()
    for entry, nbytes in zip(arrays, lens):
        if type(entry) is not list or len(entry) != 3:
            raise ProtocolError(f"{op}: array entry must be [field, dtype, shape]")
        name, dtype_name, shape = entry
        if type(name) is not str or name in seen or name in fields:
            raise ProtocolError(f"{op}: bad or duplicate array field {name!r}")
        seen.add(name)
        if type(dtype_name) is not str or dtype_name not in DTYPES:
            raise ProtocolError(f"{op}.{name}: dtype {dtype_name!r} not in {sorted(DTYPES)}")
        dt = DTYPES[dtype_name]
        shp = _check_shape(shape, limits)
        if type(nbytes) is not int or nbytes != math.prod(shp) * dt.itemsize:
            raise ProtocolError(
                f"{op}.{name}: buffer length {nbytes!r} != prod{shp} * {dt.itemsize}"
            )
        out_arrays.append((name, dt, shp))
    return Header(op, fields, tuple(out_arrays), tuple(lens))


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
    if not isinstance(header, Header):
        header = unpack_header(header, limits)
    schema = _BY_OP.get(header.op)
    if schema is None:
        raise ProtocolError(f"unknown op {header.op!r}")
    op = schema.op
    if len(buffers) != len(header.lens):
        raise ProtocolError(f"{op}: {len(buffers)} buffers, header lists {len(header.lens)}")
    kwargs: dict[str, Any] = {}
    for name, value in header.fields.items():
        spec = schema.by_name.get(name)
        if spec is None:
            logger.debug("ignoring unknown field %s.%s", op, name)
            continue
        if spec.is_array:
            if value is None and spec.optional:
                kwargs[name] = None
                continue
            raise ProtocolError(f"{op}.{name}: array field sent as a plain value")
        assert spec.check is not None
        try:
            kwargs[name] = spec.check(value, limits.max_meta_depth)
        except _Bad as e:
            raise ProtocolError(f"{op}.{name}: {e}") from None
    for (name, dt, shape), nbytes, buf in zip(header.arrays, header.lens, buffers):
        view = memoryview(buf)
        if view.nbytes != nbytes:
            raise ProtocolError(f"{op}.{name}: buffer has {view.nbytes} B, header says {nbytes}")
        spec = schema.by_name.get(name)
        if spec is None:
            logger.debug("ignoring unknown array field %s.%s", op, name)
            continue
        if not spec.is_array:
            raise ProtocolError(f"{op}.{name}: plain field sent as an array")
        if view.format != "B" or not view.c_contiguous:
            view = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
        # Sizes were checked above, so frombuffer/reshape cannot fail or over-read.
        kwargs[name] = np.frombuffer(view, dtype=dt).reshape(shape)
    missing = [s.name for s in schema.fields if s.required and s.name not in kwargs]
    if missing:
        raise ProtocolError(f"{op}: missing required field(s) {', '.join(missing)}")
    try:
        return schema.cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"invalid {op}: {e}") from e


# ---------------------------------------------------------------------------------------
# runtime messages (work stealing, reuse strips, results)
# ---------------------------------------------------------------------------------------
# Tasks are named by (source, frame, task): ``source`` is "<node id>/<k>" for the k-th feed of
# a node, ``task`` the tile id in the frame's plan or -1 for the frame's tail (the layers after
# the fused block). ``plan`` is a plan key "RxC:L:scheme" from which every node builds the
# same plan (same model, checked at the handshake).


def _check_task_name(source: str, frame: int, task: int) -> None:
    if not 1 <= len(source) <= 128:
        raise ValueError("source must have 1..128 characters")
    if frame < 0:
        raise ValueError(f"frame {frame} is negative")
    if task < -1:
        raise ValueError(f"task {task} is invalid")


@register
@dataclass(frozen=True, slots=True)
class Status(Message):
    """How much work the sender has queued (sent whenever it changes); idle nodes pick
    victims by it, so nobody polls."""

    op: ClassVar[str] = "status"
    queued_tiles: int
    queued_tails: int
    leased: int = 0  # tasks out with other nodes (candidates for speculative copies)


@register
@dataclass(frozen=True, slots=True)
class StealRequest(Message):
    """An idle node asks for one task; ``accept_tail`` is false on nodes too small for tails."""

    op: ClassVar[str] = "steal"
    request_id: int
    accept_tail: bool = True
    speculative: bool = False  # nothing is queued anywhere: a copy of a straggler will do


@register
@dataclass(frozen=True, slots=True)
class StealReply(Message):
    """The victim's answer: a task with its input data (``granted``), or nothing.

    For a tile, ``region`` (y0, y1, x0, x1) is the part of the network input it gets: the one
    the task's full variant needs, or, when the victim knows every producer of a reuse task is
    done, the reuse variant's smaller one (the thief asks for the rest with
    :class:`RegionRequest` if the strips turn out to be gone). It comes as ``data`` (float32),
    or as ``pixels``: the camera's uint8 pixels it is letterboxed from, whose top-left pixel is
    ``pixel_origin`` (y, x) of the ``img_w`` x ``img_h`` image (a quarter of the bytes; see
    :func:`stealer.images.letterbox_region`). For a tail, ``data`` is the fused block's output."""

    op: ClassVar[str] = "steal-reply"
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

    def __post_init__(self) -> None:
        if self.granted:
            _check_task_name(self.source, self.frame, self.task)
            if self.data is None and self.pixels is None:
                raise ValueError("a granted steal carries data or pixels")


@register
@dataclass(frozen=True, slots=True)
class FrameStart(Message):
    """A source tells the gateway about a frame before queueing its tasks."""

    op: ClassVar[str] = "frame-start"
    source: str
    frame: int
    plan: str
    img_w: int
    img_h: int
    deadline: float = 0.0  # seconds from now to finish the frame's tiles; 0: no deadline

    def __post_init__(self) -> None:
        _check_task_name(self.source, self.frame, 0)


@register
@dataclass(frozen=True, slots=True)
class StripsRequest(Message):
    """A dependent tile asks the gateway where the reuse strips it consumes are."""

    op: ClassVar[str] = "strips-request"
    request_id: int
    source: str
    frame: int
    task: int
    plan: str


@register
@dataclass(frozen=True, slots=True)
class StripsReply(Message):
    """``found`` false if any asked-for strip is missing (the tile then runs full). Else, from
    the gateway to a :class:`StripsRequest`: ``holders``, the node that holds each strip (node
    id -> strip ids); from a holder to a :class:`StripsFetch`: the strips, concatenated in
    ``data`` (float32, flat) as listed in ``meta`` ([strip id, C, H, W] each)."""

    op: ClassVar[str] = "strips-reply"
    request_id: int
    found: bool
    meta: list[list[int]] = field(default_factory=list)
    data: np.ndarray | None = None
    holders: dict[str, list[int]] = field(default_factory=dict)


@register
@dataclass(frozen=True, slots=True)
class StripsFetch(Message):
    """A dependent tile asks the node that produced them for reuse strips (peer to peer: strips
    never pass through the gateway, whose link every frame's tiles and tails already cross)."""

    op: ClassVar[str] = "strips-fetch"
    request_id: int
    source: str
    frame: int
    strips: list[int]


@register
@dataclass(frozen=True, slots=True)
class StripsRelease(Message):
    """Gateway to the holders of a frame's strips: every tile is in, the strips can go."""

    op: ClassVar[str] = "strips-release"
    source: str
    frame: int


@register
@dataclass(frozen=True, slots=True)
class RegionRequest(Message):
    """A thief holding a reuse task's small input region, whose strips are gone (a new gateway,
    an evicted cache), asks the task's owner for the full variant's region instead."""

    op: ClassVar[str] = "region-request"
    request_id: int
    source: str
    frame: int
    task: int

    def __post_init__(self) -> None:
        _check_task_name(self.source, self.frame, self.task)


@register
@dataclass(frozen=True, slots=True)
class RegionReply(Message):
    """The full variant's input region of the task (``region`` y0, y1, x0, x1, as ``data`` or
    ``pixels`` like a :class:`StealReply`), or ``found`` false if the owner no longer holds the
    frame (it finished, or was dropped)."""

    op: ClassVar[str] = "region-reply"
    request_id: int
    found: bool
    region: list[int] = field(default_factory=list)
    data: np.ndarray | None = None
    pixels: np.ndarray | None = None
    pixel_origin: list[int] = field(default_factory=list)


@register
@dataclass(frozen=True, slots=True)
class TileDone(Message):
    """A tile's output, and the ids of the reuse strips it published: the sender keeps those
    and serves them to dependent tiles (:class:`StripsFetch`)."""

    op: ClassVar[str] = "tile-done"
    source: str
    frame: int
    task: int
    plan: str
    variant: str
    output: np.ndarray
    strips_held: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        _check_task_name(self.source, self.frame, self.task)


@register
@dataclass(frozen=True, slots=True)
class TileAck(Message):
    """Gateway to source: a reuse producer's result is in (or a late copy of any tile); its
    lease ends. ``holder`` (node id, or empty) keeps the reuse ``strips`` the tile published,
    so that the source can tell the tiles that consume them where to fetch them without
    asking the gateway. Other tiles end with their frame's :class:`TilesIn`."""

    op: ClassVar[str] = "tile-ack"
    source: str
    frame: int
    task: int
    holder: str = ""
    strips: list[int] = field(default_factory=list)


@register
@dataclass(frozen=True, slots=True)
class TilesIn(Message):
    """Gateway to source: every tile of the frame is in (or its deadline passed); the leases
    of its tiles end. One message instead of an ack per tile that nothing depends on."""

    op: ClassVar[str] = "tiles-in"
    source: str
    frame: int

    def __post_init__(self) -> None:
        _check_task_name(self.source, self.frame, 0)


@register
@dataclass(frozen=True, slots=True)
class TailDone(Message):
    """A frame's final result: the digest of the network's output, and the detections."""

    op: ClassVar[str] = "tail-done"
    source: str
    frame: int
    output_sha256: str
    detections: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        _check_task_name(self.source, self.frame, -1)


@register
@dataclass(frozen=True, slots=True)
class FrameDone(Message):
    """Gateway to source: the frame's result is out; the source may forget the frame."""

    op: ClassVar[str] = "frame-done"
    source: str
    frame: int


@register
@dataclass(frozen=True, slots=True)
class GatewayClaim(Message):
    """The sender is the gateway from ``epoch`` on. A node follows the claim with the highest
    epoch; a standby that takes over after the gateway died claims the old epoch + 1."""

    op: ClassVar[str] = "gateway-claim"
    epoch: int


@register
@dataclass(frozen=True, slots=True)
class FrameDrop(Message):
    """Deadline mode: a source gave up on a frame before any of its tasks started (overload);
    the gateway releases it as dropped, in order, instead of waiting for it."""

    op: ClassVar[str] = "frame-drop"
    source: str
    frame: int


@register
@dataclass(frozen=True, slots=True)
class TaskFailed(Message):
    """A node could not run a task it was granted (its input is malformed, a kernel raised):
    the task's owner counts the attempt at once instead of waiting for the lease to run out."""

    op: ClassVar[str] = "task-failed"
    source: str
    frame: int
    task: int
    reason: str = ""

    def __post_init__(self) -> None:
        _check_task_name(self.source, self.frame, self.task)


@register
@dataclass(frozen=True, slots=True)
class FrameFailed(Message):
    """Source to gateway: a task of the frame failed ``max_task_attempts`` times. The gateway
    releases the frame in order with the error in its result line instead of waiting for it."""

    op: ClassVar[str] = "frame-failed"
    source: str
    frame: int
    task: int
    reason: str = ""

    def __post_init__(self) -> None:
        _check_task_name(self.source, self.frame, self.task)
