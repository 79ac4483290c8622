"""What the kernel knows about a TCP socket that the event loop does not: for liveness.

The event loop only sees bytes when it runs. A node whose loop is starved (a 0.2-core
cgroup quota, compute threads holding the GIL) may leave bytes unread in the kernel for
longer than ``Limits.peer_dead_after``; those bytes still prove the peer alive. And the
kernel knows whether our own segments are in retransmission backoff, which makes a link
slow, not dead.

:func:`probe` reads, on Linux, ``ioctl(FIONREAD)`` (bytes received, not yet read) and
``getsockopt(TCP_INFO)`` (``tcpi_last_data_recv``: time since the last data segment
arrived, and ``tcpi_rto`` / ``tcpi_backoff`` / ``tcpi_retransmits``). Elsewhere, or when a
call fails, the fields it could not read are None and callers fall back to what the loop
saw; nothing here raises.
"""

from __future__ import annotations

import logging
import socket
import struct
import sys
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["SocketState", "probe"]

logger = logging.getLogger(__name__)

try:  # POSIX only; Windows has neither module
    import fcntl
    import termios

    _FIONREAD: int | None = termios.FIONREAD
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]
    _FIONREAD = None

_TCP_INFO: Final[int | None] = getattr(socket, "TCP_INFO", None) if sys.platform == "linux" else None

# struct tcp_info (linux/tcp.h), the stable prefix we read: 8 u8 (state, ca_state,
# retransmits, probes, backoff, options, wscales, flags), then u32 rto, ato, snd_mss,
# rcv_mss, unacked, sacked, lost, retrans, fackets, last_data_sent, last_ack_sent,
# last_data_recv, ... Every Linux since 2.6 has at least these 56 bytes.
_TCP_INFO_PREFIX: Final = struct.Struct("=8B12I")
_US: Final = 1e-6
_MS: Final = 1e-3


@dataclass(frozen=True, slots=True)
class SocketState:
    """One look at a TCP socket's kernel state; None where the platform cannot tell.

    Attributes
    ----------
    unread : int or None
        Bytes received by the kernel that the process has not read yet (FIONREAD).
    since_data_recv : float or None
        Seconds since the kernel last received a data segment on this socket
        (``tcpi_last_data_recv``; pure ACKs and keepalives do not count).
    rto : float or None
        The socket's current retransmission timeout in seconds (``tcpi_rto``; it already
        includes the doubling of exponential backoff).
    backing_off : bool
        Our own segments are being retransmitted (``tcpi_retransmits`` or ``tcpi_backoff``
        non-zero): the path is losing packets now.
    """

    unread: int | None = None
    since_data_recv: float | None = None
    rto: float | None = None
    backing_off: bool = False


UNKNOWN: Final = SocketState()


def probe(sock: Any) -> SocketState:
    """Read the kernel's view of ``sock``; never raises.

    Parameters
    ----------
    sock
        A socket-like object with ``fileno()`` and ``getsockopt()`` (what
        ``transport.get_extra_info("socket")`` returns on asyncio and uvloop), or None.

    Returns
    -------
    SocketState
        Fields the platform (or a closed socket) could not provide are None.
    """
    if sock is None:
        return UNKNOWN
    try:
        fd = sock.fileno()
    except (OSError, ValueError, AttributeError):
        return UNKNOWN
    if fd < 0:  # closed: the number may already belong to another socket
        return UNKNOWN
    unread: int | None = None
    if fcntl is not None and _FIONREAD is not None:
        try:
            buf = fcntl.ioctl(fd, _FIONREAD, b"\0\0\0\0")
            unread = struct.unpack("i", buf)[0]
        except OSError as e:
            logger.debug("FIONREAD on fd %d failed: %r", fd, e)
    if _TCP_INFO is None:
        return SocketState(unread=unread)
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_PREFIX.size)
    except (OSError, AttributeError, TypeError) as e:
        logger.debug("TCP_INFO on fd %d failed: %r", fd, e)
        return SocketState(unread=unread)
    if len(raw) < _TCP_INFO_PREFIX.size:
        return SocketState(unread=unread)
    f = _TCP_INFO_PREFIX.unpack(raw)
    retransmits, backoff = f[2], f[4]
    rto_us, last_data_recv_ms = f[8], f[19]
    return SocketState(
        unread=unread,
        since_data_recv=last_data_recv_ms * _MS,
        rto=rto_us * _US if rto_us else None,
        backing_off=bool(retransmits or backoff),
    )
