"""Every timeout and limit of stealer, in one frozen object.

All durations are in **seconds** (float) and all sizes in **bytes** (int), everywhere; a
library that wants milliseconds (python-zeroconf) gets them converted at its call site.

Each field of :class:`Limits` says what it prevents. The object is frozen and passed
explicitly (``limits=``) to everything that waits or allocates, so:

* tests build a small copy with :meth:`Limits.replace` (for example a 0.2 s handshake
  timeout) without touching any global state, so one test's patched values cannot leak
  into another test or into a concurrently running node;
* the CLI can raise values (slow Wi-Fi, big models) the same way: :func:`add_limit_args`
  adds ``--limit NAME=VALUE`` (repeatable) and :func:`limits_from_args` applies it.
  :func:`add_security_args` adds ``--secret-file`` and ``--authenticate-frames``.

Other modules add their own fields here, each with a default and a comment.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
from dataclasses import dataclass
from typing import Any

from stealer.errors import ConfigError

__all__ = [
    "DEFAULT_LIMITS",
    "Limits",
    "add_limit_args",
    "add_security_args",
    "limits_from_args",
    "parse_limit",
]

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
    """Most bytes taken from the stream per read of a frame body. Each read returns what
    has arrived (up to this), and every read that returns bytes counts as liveness, so a
    multi-megabyte tensor arriving slowly is never mistaken for a dead peer; the cap bounds
    one read's copy and how far the body buffer grows per step."""

    # ---- connections ---------------------------------------------------------------------
    connect_timeout: float = 10.0
    """One overall deadline for :func:`stealer.wire.connect`, across every retry; stops a
    node from hanging forever on a peer that mDNS still lists but that is gone."""

    connect_backoff_base: float = 0.05
    """First retry delay of connect; doubles each retry (with full jitter)."""

    connect_backoff_max: float = 1.0
    """Cap of one connect retry delay, so a peer that comes back is found quickly."""

    handshake_timeout: float = 3.0
    """Time a fresh connection has to complete its whole handshake (secret challenge, then
    Hello/Welcome); stops a slow-loris client that connects and sends nothing (or a byte
    at a time) from holding a connection slot."""

    max_handshake_frame_bytes: int = 64 * 1024
    """Largest frame accepted before the handshake is complete (a Hello is ~200 B). A peer
    that is not yet authenticated or checked cannot make us allocate or buffer more than
    this by announcing a huge frame and then stalling."""

    max_connections: int = 64
    """Most simultaneous connections (handshaking or live) a server accepts; stops fd and
    memory exhaustion by a connection flood. A cluster of Pis has a handful of peers."""

    max_connections_per_ip: int = 32
    """Most simultaneous connections from one remote IP address; stops a single host from
    taking every ``max_connections`` slot (a flood, or slow-loris handshakes) and locking
    the honest cluster out. A real peer holds one or two; several nodes emulated on one
    host (127.0.0.1) need about two per other node."""

    max_write_buffer_bytes: int = 64 * _MiB
    """Most bytes :meth:`Comm.post <stealer.wire.Comm.post>` may leave queued in the
    transport for one peer (posted frames, and those held while a big frame's MAC is
    computed), beyond the frame a ``send`` is writing. A peer that stops reading would
    otherwise make every post grow our memory without bound; past it the connection is
    aborted ("peer is not reading"). 64 MiB is over a minute of a 20 Mbit/s link's
    worth of control messages and tiles."""

    close_timeout: float = 1.0
    """How long a graceful close waits to flush its Goodbye and for the socket to close
    before aborting; a dead peer must not make shutdown hang."""

    # ---- liveness ------------------------------------------------------------------------
    heartbeat_interval: float = 0.2
    """Period between Pings on an idle connection. Four fit into ``peer_dead_after``, so
    one or two lost/late Pings on Wi-Fi do not kill a healthy link."""

    peer_dead_after: float = 0.9
    """A peer from which not one byte has arrived for this long while we are reading (and
    none is waiting in the kernel) is declared dead and its connection aborted; keeps
    failure detection on an idle link under 1 s so stolen work is re-run quickly. On a
    loaded or lossy link the deadline grows with the measured RTT and retransmission
    timeout, up to ``peer_dead_max`` (see :class:`stealer.wire.Comm`). Liveness comes from
    TCP traffic, not from mDNS (whose goodbyes are optional and whose TTLs are minutes)."""

    peer_dead_max: float = 10.0
    """Upper bound of the adaptive dead-peer deadline. The deadline grows with a link's
    smoothed Ping RTT and its TCP retransmission timeout (so a 20 Mbit/s link in RTO
    backoff in the middle of a 4 MB tile is not called dead); this cap keeps a peer that
    really froze in the middle of a transfer (or a link whose RTT estimate was inflated
    by queueing) from holding its work for longer than this before it is re-run. A
    ``peer_dead_after`` above it wins (the deadline never drops below that)."""

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

    # ---- runtime (used by the node; bounds what peers can make us hold) ------------------
    max_inflight_per_peer: int = 64
    """Most unanswered requests (steals, strip requests, leased tasks) one peer may have
    with us at a time; further requests are refused or wait. Stops a single peer from
    queueing unbounded work or replies on this node."""

    reuse_cache_bytes: int = 256 * _MiB
    """Byte cap of a node's cache of the reuse strips it produced (it serves them to the
    dependent tiles); whole frames are evicted oldest-first past it and entries are freed
    when the gateway has every tile of their frame. Stops a slow tail, a lost release or a
    flood of frames from a misbehaving source from filling memory with strips."""

    kept_output_bytes: int = 128 * _MiB
    """Byte cap of the tile outputs a node keeps for the node that runs their frame's tail (a
    direct data path). A tile whose output would pass it sends its output to the gateway
    instead, as without direct paths: nothing kept is ever evicted before it is fetched."""

    kept_output_seconds: float = 120.0
    """A node lets go of a frame's kept tile outputs this long after it kept the first, if no
    release came (the gateway that would have sent it died). Far above a frame's life on a
    shelf of Pis (a tail is ~10 s); the tiles run again if a tail still wants them."""

    result_buffer_bytes: int = 128 * _MiB
    """Byte cap of the fused maps the gateway holds for open frames (being assembled, or
    waiting for their tail to run). A frame whose map would pass it waits to be admitted (see
    ``max_queued_frames``); stops announced frames from filling memory."""

    max_queued_frames: int = 64
    """Most frames open at the gateway (announced, not yet released) across all sources. A
    frame announced past it (or past ``result_buffer_bytes``) waits its turn, first come first
    served: its source is told to hold its tasks (back-pressure, FrameWait) until a frame is
    released and it is admitted (FrameGo). Stops announced frames from growing the gateway's
    tables and maps without bound, without losing any."""

    max_waiting_frames: int = 4096
    """Most frames waiting to be admitted at the gateway (a FrameStart each, a few hundred
    bytes); a frame announced past it is released at once, in order, with an error in its
    result line. Stops a flood of announcements from growing the waiting line without bound."""

    early_tile_bytes: int = 32 * _MiB
    """Byte cap of tile results that reach the gateway before their frame's FrameStart (a
    thief's connection can overtake the source's, more so after a takeover). They wait to be
    placed when the frame is announced; past the cap they are dropped (their lease brings
    them back). The gateway never allocates a frame's fused map for a frame nobody announced,
    so a peer cannot make it allocate one per frame key of its choosing."""

    early_tile_seconds: float = 30.0
    """How long a tile that came before its frame's FrameStart waits for it. A FrameStart
    overtaken by its tiles follows within a round trip, or within a takeover's resend; a tile
    still waiting after this belongs to a frame this gateway will never see (a late copy of a
    frame an earlier gateway released) and is dropped, so the early buffer never fills with them."""

    max_task_attempts: int = 3
    """Times a task may be handed out and fail (its runner reported an error, its lease ran
    out, its holder was lost) before its frame is given up: the frame is released in order
    with the error in its result line. Stops a task that fails every time (a malformed frame)
    from being retried forever and holding up its source's ordered results."""

    max_plans: int = 16
    """Most tile plans a node keeps (its own, and those other sources' grids name). A peer
    that names a new plan past it is refused; stops plan keys chosen by a peer from filling
    memory (a plan holds every task's regions)."""

    max_unread_results: int = 1024
    """Released results kept for a reader of :attr:`Node.results` (tests, ``--expect``); past
    it the oldest unread ones go (they are also in ``--out`` and the result callback). Stops a
    long-running gateway whose results nobody reads in-process from growing without bound."""

    finished_frames_remembered: int = 1024
    """Finished frames a gateway remembers, to tell a late duplicate tile or tail of a frame
    it already released from a new frame (frames a lease brings back arrive within seconds,
    far fewer than this many frames later); keeps a long-running gateway's memory constant."""

    ended_shard_tasks_remembered: int = 1024
    """Shard tasks whose round is over (recovered, or re-run) that a coordinator remembers with
    the node they went to: a late answer to one shows that its holder, given up as lost (frozen,
    or a cold process still compiling its kernels), is back and may hold shards again. Keeps a
    long-running coordinator's memory constant."""

    max_sources_per_node: int = 64
    """Most sources (cameras) one node may announce frames for at the gateway; stops a peer
    from making the gateway keep ordering state for source names of its choosing."""

    # ---- operations ----------------------------------------------------------------------
    status_timeout: float = 5.0
    """How long ``stealer status`` waits for a node's /metrics (connect and answer): a scrape
    takes milliseconds, so a node that has not answered in this long is hung or unreachable,
    and the operator should hear so rather than wait."""

    status_interval: float = 1.0
    """``stealer status`` scrapes each node twice this far apart to show bytes in and out
    per second (``--interval``; 0 there shows totals): long enough for a busy link's rate to
    be more than one frame's burst, short enough to wait for at a terminal."""

    # ---- outputs: --mqtt (stealer.outputs.mqtt) ----------------------------------------
    mqtt_queue: int = 1000
    """Results waiting for the MQTT broker (unreachable, or slower than the cluster) at the
    gateway; past it the oldest waiting result is dropped, counted (``mqtt_dropped``) and
    logged. About an hour of YOLOv2 on a shelf of Pis, or a minute of a tiny model on a PC,
    at a few KiB each: a broker restart or a Wi-Fi outage is ridden out, a broker that is
    gone for good does not grow the gateway's memory without bound."""

    mqtt_inflight: int = 32
    """Results handed to the MQTT client and not yet confirmed (PUBACK at QoS 1/2, written at
    QoS 0): enough to keep a link with a few tens of milliseconds of round trip full at the
    frame rates of a cluster; the rest wait in ``mqtt_queue`` where they are counted."""

    mqtt_keepalive: float = 30.0
    """MQTT keepalive (PINGREQ) interval: a broker that went away without closing the TCP
    connection (power cut, Wi-Fi) is noticed within about 1.5x this."""

    mqtt_connect_timeout: float = 5.0
    """One attempt to reach the MQTT broker gives up after this long (a host that drops SYNs)."""

    mqtt_reconnect_min: float = 1.0
    """First wait before reconnecting to the MQTT broker; it doubles on each failure ..."""

    mqtt_reconnect_max: float = 30.0
    """... up to this, so a broker that is down for hours costs one attempt every 30 s, and
    one that restarts in seconds is back within seconds."""

    mqtt_flush_timeout: float = 5.0
    """At shutdown, results still waiting for the MQTT broker get this long to be confirmed
    before they are counted as dropped (and logged)."""
    # ---- dashboard (--http) and frame previews -------------------------------------------
    preview_max_bytes: int = 96 * 1024
    """Largest frame preview (a downscaled JPEG, :class:`~stealer.wire.messages.Preview`) a
    gateway accepts from a source; a 320-px JPEG at quality 75 is 10-30 KB. Bounds what a
    peer can make the gateway decode and keep per source."""

    preview_side: int = 320
    """Longest side (pixels) of a frame preview: big enough to see what the camera sees with
    its boxes, small enough that previews cost a 20 Mbit/s link nothing (< 1%)."""

    preview_interval: float = 0.5
    """A source sends the gateway at most one preview per source this often (2/s), and only
    while the gateway wants them (it serves a dashboard)."""

    preview_sources: int = 64
    """Most sources whose latest annotated frame the gateway keeps (one JPEG each); the
    least recently updated goes first. Stops source names of a peer's choosing from growing it."""

    mjpeg_side: int = 640
    """Longest side (pixels) of the previews a gateway asks for when it serves ``--mjpeg``: a
    live stream worth watching full screen on a laptop, a quarter of a 1280-px frame's bytes."""

    mjpeg_interval: float = 0.1
    """With ``--mjpeg``, sources send a preview per source at most this often (10/s): every
    frame of a Pi shelf (1-5 frames/s), and a cap on a fast PC's link and JPEG encoding."""

    mjpeg_clients: int = 8
    """Most ``--mjpeg`` streams open at once; one more is refused (503). Each holds at most
    two frames waiting; a client that reads slower than frames come loses frames, counted."""

    video_queue: int = 32
    """Annotated frames waiting for the ``--video-out`` writer thread (and previews waiting to
    be drawn per source); past it frames are dropped and counted (``video_dropped``), so a
    slow disk costs frames, never the gateway's memory."""

    video_files: int = 16
    """Most sources ``--video-out`` writes a file for; frames of further sources are dropped
    (a peer's choice of source names must not open files without bound)."""

    video_flush_timeout: float = 5.0
    """At drain, the frames whose results are out but whose previews are still on their way
    get this long to reach the ``--video-out`` file before it is finalized."""

    dashboard_report_interval: float = 1.0
    """While the gateway serves a dashboard, every node sends it a Status this often (its
    counters, busy share and bytes), so that idle nodes show as alive with current numbers;
    the dashboard's plots advance by the same step."""

    dashboard_history: int = 600
    """Per-second samples (frames/s, latency p50/p99) the dashboard keeps: the last ten
    minutes, in a ring, so the gateway's memory does not grow with uptime."""

    dashboard_events: int = 100
    """Recent events (peers lost, tasks queued again, takeovers, plans) the dashboard keeps."""

    dashboard_clients: int = 32
    """Most dashboard pages open at once (server-sent event streams); one more is refused
    (503). Each holds a small queue of updates, dropped oldest-first for a slow reader."""

    def preview_bytes(self, side: int) -> int:
        """Largest preview of longest side ``side`` accepted: ``preview_max_bytes`` per
        ``preview_side`` squared, scaled by area (a 1280-px preview may be 16 times bigger)."""
        return max(self.preview_max_bytes, self.preview_max_bytes * side * side // max(1, self.preview_side) ** 2)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"Limits.{f.name} must be a number, got {value!r}")
            if f.type == "int" and not isinstance(value, int):
                raise TypeError(f"Limits.{f.name} must be an int (bytes or a count), got {value!r}")
            if not math.isfinite(value) or value <= 0:
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


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------

_SIZE = re.compile(r"(?i)\s*([0-9]+(?:\.[0-9]*)?)\s*([kmgt]?)(?:i?b)?\s*")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _field_types() -> dict[str, str]:
    return {f.name: str(f.type) for f in dataclasses.fields(Limits)}


def parse_limit(text: str) -> tuple[str, int | float]:
    """Parse one ``NAME=VALUE`` setting of a :class:`Limits` field.

    Integer fields (bytes, counts) take an integer with an optional binary unit (``64K``,
    ``512M``, ``1GiB``); float fields (seconds) take a decimal number.

    Parameters
    ----------
    text
        For example ``max_frame_bytes=512M`` or ``handshake_timeout=10``.

    Returns
    -------
    name : str
    value : int or float

    Raises
    ------
    argparse.ArgumentTypeError
        Unknown name (with a suggestion) or a value of the wrong type.
    """
    name, sep, raw = text.partition("=")
    name = name.strip().replace("-", "_")
    types = _field_types()
    if not sep or name not in types:
        near = difflib.get_close_matches(name, types, n=1)
        hint = f" (did you mean {near[0]}?)" if near else f"; known: {', '.join(sorted(types))}"
        raise argparse.ArgumentTypeError(f"--limit {text!r}: expected NAME=VALUE with a known NAME{hint}")
    if types[name] == "int":
        m = _SIZE.fullmatch(raw)
        value = float(m.group(1)) * _UNITS[m.group(2).lower()] if m else math.nan
        if not m or value != int(value):
            raise argparse.ArgumentTypeError(
                f"--limit {name}: {raw!r} is not a whole number (bytes/count, e.g. 64, 512K, 1G)"
            )
        return name, int(value)
    try:
        return name, float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--limit {name}: {raw!r} is not a number of seconds") from None


def add_limit_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--limit NAME=VALUE`` (repeatable) to a parser; see :func:`limits_from_args`.

    Parameters
    ----------
    parser
        The (sub)parser of a command that runs a node.
    """
    parser.add_argument(
        "--limit", action="append", type=parse_limit, default=[], metavar="NAME=VALUE",
        dest="limits",
        help="raise (or lower) one transport/runtime limit of stealer.config.Limits, e.g. "
        "--limit max_frame_bytes=512M --limit handshake_timeout=10 (seconds); repeatable",
    )


def limits_from_args(args: argparse.Namespace, base: Limits = DEFAULT_LIMITS) -> Limits:
    """Apply the ``--limit`` settings parsed by :func:`add_limit_args` to ``base``.

    Parameters
    ----------
    args
        Parsed arguments (``args.limits`` is a list of ``(name, value)``; missing = none).
    base
        Limits to start from.

    Returns
    -------
    Limits
        ``base`` with the settings applied (the last one wins for a repeated name).

    Raises
    ------
    ConfigError
        If the combination is invalid (e.g. ``peer_dead_after`` not above
        ``heartbeat_interval``), with the reason.
    """
    changes = dict(getattr(args, "limits", None) or [])
    if not changes:
        return base
    try:
        return base.replace(**changes)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--limit: {e}") from None


def add_security_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--secret-file PATH`` and ``--authenticate-frames`` to a parser.

    Load the secret with :func:`stealer.wire.auth.load_secret` (``args.secret_file``; the
    ``STEALER_SECRET`` environment variable is used when the option is absent).

    Parameters
    ----------
    parser
        The (sub)parser of a command that runs a node.
    """
    parser.add_argument(
        "--secret-file", metavar="PATH", default=None,
        help="file holding the cluster secret (>= 16 bytes; make one with "
        "`python -c 'import secrets; print(secrets.token_hex(32))'`); default: the "
        "STEALER_SECRET environment variable; without either the cluster is open",
    )
    parser.add_argument(
        "--authenticate-frames", action="store_true",
        help="also put a MAC on every frame (needs a secret; every node must agree)",
    )


#: Peak resident memory (VmHWM) of an idle node runtime holding no weights and no activations:
#: Python, numpy, numba and ``stealer.network`` imported, every kernel variant of the built-in
#: models loaded from Numba's cache (the bare runtime: 146 MiB, the imports alone 98 MiB), plus
#: the node's own modules and state (connections, discovery, plans: 22 MiB). Measured
#: 2026-12-03 on x86-64 (CPython 3.11, numpy 2.4, numba 0.68.1), bench/shard_cluster.py
#: --memory: an idle ``stealer node --shards`` peaks at 181.6 MiB with its 13 MiB of fused-block
#: weights. The placement planner (:mod:`stealer.placement`) counts it on every node before
#: weights and activations; with the bare runtime's 147 MiB alone, placements it called fitting
#: peaked 35-50 MiB over their nodes' --max-memory.
RUNTIME_BYTES = 169 * _MiB


@dataclass(frozen=True)
class ShardTiming:
    """Timeouts (seconds) of sharded tail layers (``stealer node --shards K [--coded]``), see
    :mod:`stealer.roles.shards`.

    Coded mode waits for the last shard of a layer until ``deadline_factor`` times the median of
    the times the shards already in took (from the task going out to its result), plus
    ``deadline_floor``; past that it recovers the shard from the parity. The factor leaves room
    for the ordinary spread between equal shards on equal nodes (measured within 1.5x of each
    other on the emulator); the floor keeps sub-millisecond layers (a small connected layer) from
    declaring late a shard that is one scheduler hiccup behind.
    """

    deadline_factor: float = 2.0
    deadline_floor: float = 0.05
    lease: float = 30.0
    """A shard task not back after this long is lost (its holder hung, or is frozen): without a
    parity to recover from it is run again on another holder. Far above a shard's compute time
    on a Pi (a YOLOv2 tail layer's share, under 2 s)."""
    place_grace: float = 3.0
    """The coordinator places the tail once it knows ``K`` nodes (``K + 1`` coded), or this long
    after it started with whatever it knows: peers found in the first seconds then do not make
    it load layers that the next placement moves to them."""
    suspect_for: float = 60.0
    """A holder whose shard task was lost or late is left out of placements this long (or until
    it answers again): a frozen node keeps its connection, but must not keep its shards."""


DEFAULT_SHARD_TIMING = ShardTiming()
