"""Every timeout and limit of stealer, in one frozen object.

All durations are in **seconds** (float) and all sizes in **bytes** (int), everywhere; a
library that wants milliseconds (python-zeroconf) gets them converted at its call site.

Each field of :class:`Limits` says what it prevents. The object is frozen and passed
explicitly (``limits=``) to everything that waits or allocates, so:

* tests build a small copy with :meth:`Limits.replace` (for example a 0.2 s handshake
  timeout) without touching any global state, so one test's patched values cannot leak
  into another test or into a concurrently running node;
* the CLI can raise values (slow Wi-Fi, big models) the same way.

Other modules add their own fields here, each with a default and a comment.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_LIMITS", "Limits"]

_MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """Timeouts (seconds) and size limits (bytes) for one node.

    Build a variant with :meth:`replace`; the instance itself never changes.
    """

    # ---- framing / messages ------------------------------------------------------------
    max_frame_bytes: int = 256 * _MiB
    """Largest frame body accepted. Checked against the peer's 4-byte length prefix
    *before* any buffer is allocated, so a hostile or corrupt prefix (up to 4 GiB)
    cannot make us allocate it. 256 MiB is above the biggest YOLOv2 feature map tile."""

    max_header_bytes: int = 1 * _MiB
    """Largest msgpack header inside a frame; bounds the work of the msgpack decoder
    (nesting, long lists) independently of the large raw array buffers."""

    max_buffers: int = 64
    """Most raw buffers (arrays) in one frame; stops a header listing millions of
    zero-length buffers, each of which costs a Python object."""

    max_array_ndim: int = 8
    """Most dimensions of a received array; a CNN tensor has at most 4."""

    max_array_dim: int = 1 << 24
    """Largest single dimension of a received array (16 Mi elements); with the byte-count
    check it stops absurd shapes whose product overflows or is rejected by numpy."""

    max_meta_depth: int = 8
    """Deepest nesting of free-form ``meta`` dicts/lists in a message; stops recursion
    bombs in our validator (msgpack itself is bounded by ``max_header_bytes``)."""

    read_chunk_bytes: int = 256 * 1024
    """Large frame bodies are read in chunks of this size so that liveness (heartbeat)
    sees progress while a multi-megabyte tensor is still arriving over slow Wi-Fi."""

    # ---- connections ---------------------------------------------------------------------
    connect_timeout: float = 10.0
    """One overall deadline for :func:`stealer.wire.connect`, across every retry; stops a
    node from hanging forever on a peer that mDNS still lists but that is gone."""

    connect_backoff_base: float = 0.05
    """First retry delay of connect; doubles each retry (with full jitter)."""

    connect_backoff_max: float = 1.0
    """Cap of one connect retry delay, so a peer that comes back is found quickly."""

    handshake_timeout: float = 3.0
    """Time a fresh connection has to complete the Hello/Welcome exchange; stops a
    slow-loris client that connects and sends nothing from holding a connection slot."""

    max_connections: int = 64
    """Most simultaneous connections (handshaking or live) a server accepts; stops fd and
    memory exhaustion by a connection flood. A cluster of Pis has a handful of peers."""

    close_timeout: float = 1.0
    """How long a graceful close waits to flush its Goodbye and for the socket to close
    before aborting; a dead peer must not make shutdown hang."""

    # ---- liveness ------------------------------------------------------------------------
    heartbeat_interval: float = 0.2
    """Period between Pings on an idle connection. Four fit into ``peer_dead_after``, so
    one or two lost/late Pings on Wi-Fi do not kill a healthy link."""

    peer_dead_after: float = 0.9
    """A peer from which nothing (no frame, no chunk of a frame) has arrived for this long
    while we are reading is declared dead and its connection aborted; keeps total
    failure detection under 1 s so stolen work is re-run quickly. Liveness comes from
    TCP traffic, not from mDNS (whose goodbyes are optional and whose TTLs are minutes)."""

    # ---- discovery -----------------------------------------------------------------------
    mdns_resolve_timeout: float = 2.0
    """How long to wait for a browsed service's SRV/TXT/A records before giving up on it
    (it will be retried on its next announcement)."""

    max_peers: int = 256
    """Most peers kept by discovery; stops a flood of fake mDNS services on the LAN from
    growing our peer table (and the resolve work) without bound."""

    max_txt_value_bytes: int = 128
    """Longest TXT value we parse; our own values are short (a 64-hex model hash is the
    longest), so anything longer is a malformed or hostile record."""

    max_discovery_events: int = 1024
    """Capacity of each :meth:`Discovery.events` subscriber queue; a consumer that stops
    reading loses events (logged) instead of growing memory without bound."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"Limits.{f.name} must be a number, got {value!r}")
            if value <= 0:
                raise ValueError(f"Limits.{f.name} must be > 0, got {value!r}")
        if self.peer_dead_after <= self.heartbeat_interval:
            raise ValueError(
                f"peer_dead_after ({self.peer_dead_after} s) must exceed "
                f"heartbeat_interval ({self.heartbeat_interval} s)"
            )
        if self.max_header_bytes > self.max_frame_bytes:
            raise ValueError("max_header_bytes must not exceed max_frame_bytes")

    def replace(self, **changes: Any) -> Limits:
        """Return a copy with some fields changed (validated like the original).

        Parameters
        ----------
        **changes
            Field names and their new values, e.g. ``handshake_timeout=0.2``.

        Returns
        -------
        Limits
            A new frozen instance.
        """
        return dataclasses.replace(self, **changes)


DEFAULT_LIMITS = Limits()
"""The limits a node uses unless told otherwise."""
