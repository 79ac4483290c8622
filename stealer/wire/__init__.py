"""Wire layer of stealer: messages, framing and persistent TCP comms.

Public API (the submodules are implementation, import from here):

* messages: :class:`Message`, :func:`register`, :func:`encode`, :func:`decode`,
  :data:`PROTOCOL_VERSION`, :data:`DTYPES` and the message classes;
* framing: :func:`read_frame`, :func:`write_frame` (used by :class:`Comm`);
* comms: :class:`Comm` (:mod:`~stealer.wire.comm`), :func:`connect`
  (:mod:`~stealer.wire.client`), :func:`serve`, :class:`Server`, :class:`ServerStats`
  (:mod:`~stealer.wire.server`; the handshake both sides run is in
  :mod:`~stealer.wire.handshake`), and the event loop helpers :func:`run` /
  :func:`install_event_loop_policy` (:mod:`~stealer.wire.loop`; uvloop when installed);
* cluster secret: :func:`load_secret`, :class:`ClusterKey` (see :mod:`stealer.wire.auth`).
"""

from __future__ import annotations

from stealer.wire.auth import ClusterKey, load_secret
from stealer.wire.client import connect
from stealer.wire.comm import Comm
from stealer.wire.framing import read_frame, write_frame
from stealer.wire.loop import install_event_loop_policy, run
from stealer.wire.messages import (
    DTYPES,
    PROTOCOL_VERSION,
    AuthChallenge,
    AuthInit,
    AuthProof,
    Goodbye,
    Header,
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
    unpack_header,
)
from stealer.wire.server import Server, ServerStats, serve

__all__ = [
    "DTYPES",
    "PROTOCOL_VERSION",
    "AuthChallenge",
    "AuthInit",
    "AuthProof",
    "ClusterKey",
    "Comm",
    "Goodbye",
    "Header",
    "Hello",
    "Message",
    "Ping",
    "Pong",
    "Reject",
    "Server",
    "ServerStats",
    "TensorMsg",
    "Welcome",
    "connect",
    "decode",
    "encode",
    "install_event_loop_policy",
    "load_secret",
    "message_types",
    "read_frame",
    "register",
    "run",
    "serve",
    "unpack_header",
    "write_frame",
]
