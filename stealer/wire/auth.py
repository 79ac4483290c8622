"""Cluster secret: a mutual challenge-response when a connection opens, and an optional
MAC on every later frame.

Threat model
------------
The Pis share a LAN with hosts we do not control. With a secret, a host that does not
know it cannot join the cluster, send it work or read its results: it is dropped after
the first two (bounded, tiny) frames, before any Hello, tensor or runtime message of it is
read. With ``authenticate_frames`` an on-path attacker can also not inject, alter, replay,
reorder or drop frames of an authenticated connection without the connection failing.
Frames are **not encrypted** (tiles of camera images are visible on the wire), and without
``authenticate_frames`` an on-path attacker could take over a connection after its
handshake: use frame MACs on a LAN you do not trust.

Handshake
---------
With a secret, before the Hello/Welcome exchange of :mod:`stealer.wire.handshake`::

    client C                                          server S
    AuthInit(id_C, n_C, f_C)             ------>
                                         <------      AuthChallenge(id_S, n_S, f_S, P_S)
    check P_S, else drop
    AuthProof(P_C), Hello (pipelined)    ------>      check P_C, else drop (Hello unread)
                                         <------      Welcome / Reject

    T   = (n_C, n_S, id_C, id_S, f_C, f_S), length-prefixed   the transcript
    P_S = MAC(K, "server", T)     P_C = MAC(K, "client", T)

``n_C``/``n_S`` are fresh 256-bit random nonces, ``f`` the wish for frame MACs (both
must agree), ``K`` the key derived from the secret (scrypt, once per process) and MAC
keyed BLAKE2b-256 with a distinct personalization per role. Because the proofs cover
both nonces, a recorded proof never verifies again (replay); because they name the role,
a server's proof cannot be reflected back as a client's; because they name both node ids,
which must equal the ids of the Hello/Welcome that follow, a proof cannot be reused for
another identity; because they cover ``f``, an attacker cannot switch frame MACs off.
Proofs are compared in constant time. The server proves first, so a client never hands a
proof to a server that does not know the secret.

Frame MACs
----------
With ``authenticate_frames``, every frame after the :class:`AuthProof` (both directions,
Hello/Welcome included) is followed by a 32-byte tag ``MAC(K_dir, seq || frame)`` where
``K_dir = MAC(K, "c2s" or "s2c", T)`` is fresh per connection and direction and ``seq``
counts the frames of that direction from 0 (implicit, never sent). The tag is checked
before the body is parsed, so unauthenticated bytes never reach msgpack.

The secret and every derived key are held in objects whose ``repr`` hides them; they are
never logged, advertised over mDNS or written to results.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
import secrets
import stat
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from stealer.errors import SecretError
from stealer.wire.messages import AUTH_NONCE_BYTES, AUTH_PROOF_BYTES

__all__ = [
    "MIN_SECRET_BYTES",
    "SECRET_ENV",
    "TAG_BYTES",
    "ClusterKey",
    "FrameMac",
    "Secret",
    "Transcript",
    "load_secret",
    "new_nonce",
    "warn_if_open",
]

logger = logging.getLogger(__name__)

SECRET_ENV: Final = "STEALER_SECRET"
"""Environment variable read by :func:`load_secret` when no file is given."""

MIN_SECRET_BYTES: Final = 16
"""Shortest secret accepted; a random 16-byte secret cannot be guessed online or offline.
(Make one with ``python -c 'import secrets; print(secrets.token_hex(32))'``.)"""

MAX_SECRET_BYTES: Final = 4096
"""Longest secret accepted; a secret file pointed at a big file by mistake is an error,
not a slow read."""

TAG_BYTES: Final = 32
"""Length of the MAC after each frame when frame authentication is on."""

_SCRYPT_SALT: Final = b"stealer cluster secret v1"
_SCRYPT_N: Final = 1 << 14
"""scrypt cost (16 MiB, ~50 ms on a PC, a few hundred on a Pi, once per process): makes
offline guessing of a weak human-chosen secret from a sniffed handshake expensive."""

_P_SERVER: Final = b"stealer1/srv-prf"
_P_CLIENT: Final = b"stealer1/cli-prf"
_P_C2S: Final = b"stealer1/key-c2s"
_P_S2C: Final = b"stealer1/key-s2c"
_U16 = struct.Struct(">H")


class Secret(bytes):
    """The cluster secret: plain ``bytes`` whose ``repr``/``str`` never show the value."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<Secret: {len(self)} bytes, hidden>"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)


def load_secret(
    path: str | os.PathLike[str] | None = None, *, environ: Mapping[str, str] | None = None
) -> bytes | None:
    """Load the cluster secret from a file, or else from ``STEALER_SECRET``.

    Trailing newlines are stripped (``echo secret > file`` works). The value is never
    logged or put in an error message.

    Parameters
    ----------
    path
        The ``--secret-file``; when None the environment variable is used.
    environ
        Environment to read (defaults to ``os.environ``; for tests).

    Returns
    -------
    bytes or None
        The secret (a :class:`Secret`, whose repr is hidden), or None when neither a file
        nor the variable is given: the cluster is open.

    Raises
    ------
    SecretError
        The file cannot be read, or the secret is shorter than
        :data:`MIN_SECRET_BYTES` (an empty variable included) or longer than
        :data:`MAX_SECRET_BYTES`.
    """
    if path is not None:
        where = f"secret file {os.fspath(path)!r}"
        try:
            with open(path, "rb") as fh:
                mode = os.fstat(fh.fileno()).st_mode
                data = fh.read(MAX_SECRET_BYTES + 3)
        except OSError as e:
            raise SecretError(f"cannot read {where}: {e.strerror or e}") from None
        if stat.S_ISREG(mode) and mode & 0o077:
            logger.warning("%s is readable by other users; chmod 600 it", where)
    else:
        env = os.environ if environ is None else environ
        raw = env.get(SECRET_ENV)
        if raw is None:
            return None
        where = SECRET_ENV
        data = raw.encode("utf-8", "surrogateescape")
    data = data.rstrip(b"\r\n")
    if len(data) < MIN_SECRET_BYTES:
        raise SecretError(
            f"{where}: the secret has {len(data)} bytes, at least {MIN_SECRET_BYTES} are needed "
            f"(make one with: python -c 'import secrets; print(secrets.token_hex(32))')"
        )
    if len(data) > MAX_SECRET_BYTES:
        raise SecretError(f"{where}: the secret is longer than {MAX_SECRET_BYTES} bytes")
    return Secret(data)


_open_warned = False


def warn_if_open(key: ClusterKey | None) -> None:
    """Log, once per process, that a node without a secret runs an open cluster.

    Parameters
    ----------
    key
        The node's key, or None when it has no secret (then the warning is given).
    """
    global _open_warned
    if key is None and not _open_warned:
        _open_warned = True
        logger.warning(
            "no cluster secret (--secret-file or %s): this cluster is OPEN, any host that "
            "can reach this node can join it, send it work and read its results",
            SECRET_ENV,
        )


@functools.lru_cache(maxsize=4)
def _derive(secret: bytes) -> bytes:
    return hashlib.scrypt(bytes(secret), salt=_SCRYPT_SALT, n=_SCRYPT_N, r=8, p=1, dklen=32)


def _mac(key: bytes, person: bytes, data: bytes) -> bytes:
    return hashlib.blake2b(data, key=key, person=person, digest_size=AUTH_PROOF_BYTES).digest()


def new_nonce() -> bytes:
    """Return a fresh random nonce for one handshake (never reused)."""
    return secrets.token_bytes(AUTH_NONCE_BYTES)


@dataclass(frozen=True, slots=True)
class Transcript:
    """Everything both proofs of one handshake are bound to (see the module docstring)."""

    client_nonce: bytes
    server_nonce: bytes
    client_id: str
    server_id: str
    client_frame_mac: bool
    server_frame_mac: bool

    def encode(self) -> bytes:
        """Unambiguous byte encoding: each item length-prefixed, in a fixed order."""
        items = (
            self.client_nonce,
            self.server_nonce,
            self.client_id.encode("utf-8", "surrogatepass"),
            self.server_id.encode("utf-8", "surrogatepass"),
            bytes((self.client_frame_mac, self.server_frame_mac)),
        )
        return b"".join(_U16.pack(len(x)) + x for x in items)


class ClusterKey:
    """The key derived from a cluster secret; makes and checks proofs, derives frame keys.

    Build it once per server or client process (derivation runs scrypt, cached).

    Parameters
    ----------
    secret
        At least :data:`MIN_SECRET_BYTES` bytes.

    Raises
    ------
    ValueError
        If the secret is too short.
    """

    __slots__ = ("_key",)

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, (bytes, bytearray)) or len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"a cluster secret must be bytes of length >= {MIN_SECRET_BYTES}")
        self._key = _derive(bytes(secret))

    def __repr__(self) -> str:
        return "<ClusterKey hidden>"

    @classmethod
    def of(cls, secret: bytes | ClusterKey | None) -> ClusterKey | None:
        """Accept a secret, an existing key or None (no secret)."""
        if secret is None or isinstance(secret, ClusterKey):
            return secret
        return cls(secret)

    def label_mac(self, label: bytes, person: bytes, digest_size: int = 16) -> bytes:
        """A keyed BLAKE2b of a fixed ``label`` (``person``: its purpose, at most 16 bytes),
        for tokens derived from the secret (the dashboard's): it reveals nothing about the
        key, and with its own ``person`` it can never equal a handshake proof."""
        return hashlib.blake2b(label, key=self._key, person=person, digest_size=digest_size).digest()

    def server_proof(self, t: Transcript) -> bytes:
        """The server's proof over transcript ``t``."""
        return _mac(self._key, _P_SERVER, t.encode())

    def client_proof(self, t: Transcript) -> bytes:
        """The client's proof over transcript ``t``."""
        return _mac(self._key, _P_CLIENT, t.encode())

    def check_server_proof(self, t: Transcript, proof: bytes) -> bool:
        """Constant-time check of a server's proof."""
        return hmac.compare_digest(self.server_proof(t), proof)

    def check_client_proof(self, t: Transcript, proof: bytes) -> bool:
        """Constant-time check of a client's proof."""
        return hmac.compare_digest(self.client_proof(t), proof)

    def frame_macs(self, t: Transcript, *, server: bool) -> tuple[FrameMac, FrameMac]:
        """Per-connection frame MAC states ``(send, recv)`` for one side of ``t``.

        Parameters
        ----------
        t
            The handshake transcript (fresh nonces, so fresh keys per connection).
        server
            True on the server side (it sends with the s2c key).

        Returns
        -------
        send, recv : FrameMac
        """
        blob = t.encode()
        c2s = FrameMac(_mac(self._key, _P_C2S, blob))
        s2c = FrameMac(_mac(self._key, _P_S2C, blob))
        return (s2c, c2s) if server else (c2s, s2c)


class FrameMac:
    """MAC state of one direction of one connection: its key and next frame number.

    The caller (the comm) serializes use: the send side under its send lock, the receive
    side under its receive lock.
    """

    __slots__ = ("_key", "seq")

    def __init__(self, key: bytes) -> None:
        self._key = key
        self.seq = 0

    def __repr__(self) -> str:
        return f"<FrameMac seq={self.seq}>"

    def hasher(self) -> hashlib.blake2b:
        """A MAC of the next frame, already fed with its sequence number."""
        h = hashlib.blake2b(key=self._key, digest_size=TAG_BYTES)
        h.update(self.seq.to_bytes(8, "big"))
        return h

    def tag(self, pieces: Iterable[bytes | bytearray | memoryview]) -> bytes:
        """The tag of the next frame made of ``pieces`` (does not advance)."""
        h = self.hasher()
        for p in pieces:
            h.update(p)
        return h.digest()

    def check(self, h: hashlib.blake2b, tag: bytes) -> bool:
        """Constant-time check of a received tag against ``h``; advances on success."""
        ok = hmac.compare_digest(h.digest(), tag)
        if ok:
            self.seq += 1
        return ok

    def advance(self) -> None:
        """Count one sent frame."""
        self.seq += 1
