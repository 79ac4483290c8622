"""The dialling side of the wire: :func:`connect` opens a :class:`Comm` to a peer.

TCP connection attempts are retried with jittered exponential backoff until one overall
deadline; then the client half of the handshake (:func:`~stealer.wire.handshake.client_handshake`)
runs once, under its own deadline, and the comm starts its heartbeat. It lives apart from
the comm, which both sides use, as :mod:`stealer.wire.server` does for the listening side.
"""

from __future__ import annotations

import asyncio
import logging
import random

from stealer.config import DEFAULT_LIMITS, Limits
from stealer.errors import CommClosedError
from stealer.wire.auth import ClusterKey, warn_if_open
from stealer.wire.comm import Comm
from stealer.wire.handshake import client_handshake
from stealer.wire.messages import Hello

__all__ = ["connect"]

logger = logging.getLogger(__name__)


def _backoff(attempt: int, limits: Limits) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(max, base * 2**attempt)]."""
    cap = min(limits.connect_backoff_max, limits.connect_backoff_base * 2.0**attempt)
    return random.uniform(0.0, cap)


async def connect(
    host: str,
    port: int,
    hello: Hello,
    *,
    limits: Limits = DEFAULT_LIMITS,
    heartbeat: bool = True,
    secret: bytes | ClusterKey | None = None,
    authenticate_frames: bool = False,
) -> Comm:
    """Open a connection to a peer and perform the handshake.

    TCP connection attempts are retried with jittered exponential backoff until one
    overall deadline (``limits.connect_timeout``); the handshake that follows has its own
    ``limits.handshake_timeout`` and is never retried (a rejection is definitive).

    Parameters
    ----------
    host, port
        The peer's listening address.
    hello
        Our identity; its ``version`` and ``model_hash`` must match the peer's.
    limits
        Timeouts and sizes.
    heartbeat
        Start :meth:`Comm.start_heartbeat` once connected.
    secret
        The cluster secret (or a :class:`~stealer.wire.auth.ClusterKey` made from it, to
        derive the key once); None for an open cluster. Must match the server's.
    authenticate_frames
        Put a MAC on every frame; needs ``secret``; must match the server's setting.

    Returns
    -------
    Comm
        An open comm whose ``peer`` is the server's :class:`Welcome`.

    Raises
    ------
    CommClosedError
        No connection within the deadline (chained ``from`` the last socket error), or
        the connection dropped or timed out during the handshake.
    HandshakeRejected
        The peer answered :class:`Reject`, or its Welcome does not match us.
        :class:`~stealer.errors.AuthError` if the peer could not prove the secret.
    ProtocolError
        The peer answered something that is not a handshake message.
    ValueError
        ``authenticate_frames`` without a secret, or a secret that is too short.
    """
    key = ClusterKey.of(secret)
    if authenticate_frames and key is None:
        raise ValueError("authenticate_frames needs a cluster secret")
    warn_if_open(key)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.connect_timeout
    attempt = 0
    last_exc: OSError | None = None
    streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    while streams is None:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise CommClosedError(
                f"could not connect to {host}:{port} within {limits.connect_timeout} s "
                f"({attempt} attempts): {last_exc!r}"
            ) from last_exc
        try:
            async with asyncio.timeout(remaining):
                streams = await asyncio.open_connection(host, port)
        except OSError as e:  # refused, unreachable, DNS failure, TimeoutError
            last_exc = e
            logger.debug("connect to %s:%s attempt %d failed: %r", host, port, attempt + 1, e)
            delay = min(_backoff(attempt, limits), deadline - loop.time())
            attempt += 1
            if delay > 0:
                await asyncio.sleep(delay)

    comm = Comm(*streams, limits=limits, name=f"{host}:{port}")
    try:
        async with asyncio.timeout(limits.handshake_timeout):
            reply = await client_handshake(comm, hello, key, authenticate_frames)
    except TimeoutError as e:
        comm.abort("handshake timed out")
        raise CommClosedError(
            f"{host}:{port}: no handshake answer within {limits.handshake_timeout} s"
        ) from e
    except BaseException:
        comm.abort("handshake failed")
        raise
    comm._set_established()
    logger.debug("connected to %s (node %s)", comm.name, reply.node_id)
    if heartbeat:
        comm.start_heartbeat()
    return comm
