"""Both halves of the handshake that opens every connection, as functions of a :class:`Comm`.

A connection starts with a handshake, all of it within ``Limits.handshake_timeout`` and
with frames capped at ``Limits.max_handshake_frame_bytes``: with a cluster secret, first
the mutual challenge-response of :mod:`stealer.wire.auth` (a peer that fails it is dropped
before any other message of it is read, and logged once); then the client sends
:class:`Hello`, the server checks the protocol version and model hash and answers
:class:`Welcome` or :class:`Reject` (with a reason, also logged). Without a secret the
first step is skipped and a warning that the cluster is open is logged once per process.
With ``authenticate_frames`` every later frame carries a MAC, checked before it is parsed.

The two halves sit side by side so the exchange reads in one place. The callers own the
deadline and what follows: :func:`stealer.wire.client.connect` (client half,
:func:`client_handshake`) and :class:`stealer.wire.server.Server` (server half,
:func:`server_handshake`, which reports rejections and failed proofs back to the server's
admission control, where they are counted and logged once per address).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

from stealer.errors import AuthError, CommClosedError, HandshakeRejected, ProtocolError
from stealer.wire.auth import ClusterKey, Transcript, new_nonce
from stealer.wire.comm import Comm
from stealer.wire.messages import AuthChallenge, AuthInit, AuthProof, Hello, Reject, Welcome

__all__ = ["AuthFailed", "CheckPeer", "RejectPeer", "client_handshake", "server_handshake"]

logger = logging.getLogger(__name__)

CheckPeer = Callable[[Hello], "str | None"]

_MAX_REASON_CHARS: Final = 200
"""A peer's Reject reason is cut to this length before it is logged or raised: it is
untrusted text."""


def _reason(text: str) -> str:
    return repr(text[:_MAX_REASON_CHARS])


class RejectPeer(Protocol):
    """``reject(comm, ip, reason, who)``: count and log a rejection, send the Reject, return
    False (the server's ``_reject``)."""

    def __call__(self, comm: Comm, ip: str, reason: str, who: str = "") -> Awaitable[bool]: ...


AuthFailed = Callable[[Comm, str, str], None]
"""``auth_failed(comm, ip, why)``: count and log a peer that failed the secret challenge."""


# ---------------------------------------------------------------------------------------
# client half
# ---------------------------------------------------------------------------------------


async def client_handshake(
    comm: Comm, hello: Hello, key: ClusterKey | None, frame_mac: bool
) -> Welcome:
    """Client side: prove the secret (if any), send ``hello``, check the server's answer.

    Sets ``comm.local`` and ``comm.peer``. The caller bounds it with the handshake
    deadline and aborts the comm if it raises.

    Returns
    -------
    Welcome
        The server's identity.

    Raises
    ------
    HandshakeRejected
        The peer answered :class:`Reject`, or its Welcome does not match us.
        :class:`~stealer.errors.AuthError` if the peer could not prove the secret.
    ProtocolError
        The peer answered something that is not a handshake message.
    CommClosedError
        The connection dropped.
    """
    server_id = None
    if key is not None:
        server_id = await _client_auth(comm, key, hello.node_id, frame_mac)
    await comm.send(hello)
    comm.local = hello
    reply = await comm.recv()
    match reply:
        case Welcome():
            if reply.version != hello.version or reply.model_hash != hello.model_hash:
                raise HandshakeRejected(
                    f"{comm.name} is incompatible: version {reply.version} / model "
                    f"{reply.model_hash!r}, we have {hello.version} / {hello.model_hash!r}"
                )
            if server_id is not None and reply.node_id != server_id:
                raise AuthError(
                    f"{comm.name} authenticated as node {server_id!r} but welcomed us "
                    f"as node {reply.node_id!r}"
                )
            comm.peer = reply
            return reply
        case Reject(reason=reason):
            logger.warning("%s rejected us: %s", comm.name, _reason(reason))
            raise HandshakeRejected(f"{comm.name} rejected us: {_reason(reason)}")
        case _:
            raise ProtocolError(f"{comm.name} answered {reply.op!r} to hello")


async def _client_auth(comm: Comm, key: ClusterKey, node_id: str, frame_mac: bool) -> str:
    """Client side of the secret challenge (see :mod:`stealer.wire.auth`).

    Returns the server's authenticated node id. After it returns, the AuthProof is on its
    way and (with ``frame_mac``) every later frame is MAC'd both ways.
    """
    nonce = new_nonce()
    await comm.send(AuthInit(node_id, nonce, frame_mac))
    reply = await comm.recv()
    match reply:
        case AuthChallenge():
            pass
        case Reject(reason=reason):
            logger.warning("%s rejected us: %s", comm.name, _reason(reason))
            raise HandshakeRejected(f"{comm.name} rejected us: {_reason(reason)}")
        case Hello() | Welcome():
            raise AuthError(f"{comm.name} answered without a challenge: it has no cluster secret")
        case _:
            raise ProtocolError(f"{comm.name} answered {reply.op!r} to auth-init")
    t = Transcript(nonce, reply.nonce, node_id, reply.node_id, frame_mac, reply.frame_mac)
    if not key.check_server_proof(t, reply.proof):
        # Dropped before anything else of this peer is read; the caller aborts and logs.
        raise AuthError(f"{comm.name} failed to prove the cluster secret (another secret?)")
    if reply.frame_mac != frame_mac:
        raise HandshakeRejected(
            f"{comm.name}: frame authentication mismatch (we {'use' if frame_mac else 'do not use'}"
            f" --authenticate-frames, the peer {'does' if reply.frame_mac else 'does not'})"
        )
    await comm.send(AuthProof(key.client_proof(t)))
    if frame_mac:
        comm._set_frame_macs(*key.frame_macs(t, server=False))
    comm.authenticated = True
    return reply.node_id


# ---------------------------------------------------------------------------------------
# server half
# ---------------------------------------------------------------------------------------


async def server_handshake(
    comm: Comm,
    ip: str,
    ours: Hello,
    *,
    key: ClusterKey | None,
    frame_mac: bool,
    check_peer: CheckPeer | None,
    reject: RejectPeer,
    auth_failed: AuthFailed,
) -> bool:
    """Server side: check the secret (if any) and the peer's Hello, answer Welcome or Reject.

    Parameters
    ----------
    comm
        The new connection (``comm.local``, ``comm.peer`` are set when it is accepted).
    ip
        The peer's address, for the once-per-address logs.
    ours
        This node's identity.
    key, frame_mac
        The cluster key (None for an open cluster) and whether frames carry MACs.
    check_peer
        The server's extra check of a peer's Hello (only for peers that proved the secret).
    reject, auth_failed
        The server's admission control: count and log the outcome.

    Returns
    -------
    bool
        True if the peer was welcomed; False if it was rejected or dropped.

    Raises
    ------
    CommClosedError, ProtocolError
        The peer went away or sent something that is not a handshake message.
    """
    first = await comm.recv()
    auth_id: str | None = None
    if key is not None:
        if type(first) is AuthInit:
            auth_id = await _server_auth(comm, ip, first, ours, key, frame_mac, reject, auth_failed)
            if auth_id is None:
                return False
            first = await comm.recv()
        elif type(first) is Hello:
            return await reject(
                comm, ip, "this cluster needs a secret (--secret-file or STEALER_SECRET), "
                "the peer has none",
            )
        else:
            raise ProtocolError(f"expected auth-init, got {first.op!r}")
    elif type(first) is AuthInit:
        return await reject(
            comm, ip, "this node has no cluster secret, the peer has one "
            "(give every node the same --secret-file)",
        )
    if type(first) is not Hello:
        raise ProtocolError(f"expected hello, got {first.op!r}")
    reason: str | None = None
    if auth_id is not None and first.node_id != auth_id:
        reason = f"hello names node {first.node_id!r}, the secret was proven by {auth_id!r}"
    elif first.version != ours.version:
        reason = (
            f"protocol version mismatch: peer speaks {first.version}, "
            f"this node speaks {ours.version}"
        )
    elif first.model_hash != ours.model_hash:
        reason = (
            f"model hash mismatch: peer has {first.model_hash!r}, "
            f"this node has {ours.model_hash!r}"
        )
    elif first.node_id == ours.node_id:
        reason = "peer has this node's own node_id (connected to itself?)"
    elif check_peer is not None:
        reason = check_peer(first)
    if reason is not None:
        return await reject(
            comm, ip, reason, f" (node {first.node_id}, role {first.role})"
        )
    comm.local = ours
    comm.peer = first
    await comm.send(Welcome.of(ours))
    logger.info(
        "accepted %s (node %s, role %s%s)", comm.name, first.node_id, first.role,
        ", authenticated" if comm.authenticated else "",
    )
    return True


async def _server_auth(
    comm: Comm,
    ip: str,
    init: AuthInit,
    ours: Hello,
    key: ClusterKey,
    frame_mac: bool,
    reject: RejectPeer,
    auth_failed: AuthFailed,
) -> str | None:
    """Server side of the secret challenge; the client's node id, or None if dropped."""
    if init.frame_mac != frame_mac:
        await reject(
            comm, ip, f"frame authentication mismatch: this node "
            f"{'uses' if frame_mac else 'does not use'} --authenticate-frames, "
            f"the peer {'does' if init.frame_mac else 'does not'}",
        )
        return None
    nonce = new_nonce()
    t = Transcript(init.nonce, nonce, init.node_id, ours.node_id, init.frame_mac, frame_mac)
    await comm.send(AuthChallenge(ours.node_id, nonce, key.server_proof(t), frame_mac))
    why = "sent a wrong proof (another secret?)"
    try:
        proof = await comm.recv()
    except CommClosedError:
        proof, why = None, "closed the connection instead of proving the secret (another secret?)"
    except ProtocolError as e:
        proof, why = None, f"sent an undecodable proof ({e})"
    if frame_mac and not comm.closed:
        # Every frame after the AuthProof is MAC'd, the Reject below included.
        comm._set_frame_macs(*key.frame_macs(t, server=True))
    if type(proof) is AuthProof and key.check_client_proof(t, proof.proof):
        comm.authenticated = True
        return init.node_id
    if proof is not None and type(proof) is not AuthProof:
        why = f"sent {proof.op!r} instead of a proof"
    # Dropped here: nothing after the proof (its Hello, ...) is read.
    auth_failed(comm, ip, why)
    if not comm.closed:
        with contextlib.suppress(CommClosedError):
            await comm.send(Reject("authentication failed (wrong cluster secret?)"))
    return None
