"""Prometheus metrics of a node (``stealer node --metrics :9100``) and ``stealer status``.

A node with ``--metrics`` serves ``GET /metrics`` in the Prometheus text format, from
:mod:`aiohttp` on the node's own event loop. What it serves is read at scrape time: a custom
collector turns the live counters (:class:`~stealer.node.Stats`, the gateway's and the
server's statistics) and a few gauges (queued tasks, peers, frames in flight, busy fraction)
into metric families, so the hot paths keep no extra bookkeeping. The one thing recorded as it
happens is the frame latency histogram, observed where the gateway releases a result (the
``latency`` of each result line: from the frame's FrameStart at the gateway to its tail
done). A scrape only reads a few dozen numbers and formats them, well under a millisecond,
so it never holds the loop for long.

Every node has its own :class:`~prometheus_client.CollectorRegistry` (never the global one):
tests run several nodes in one process, and each must serve only its own numbers.

Names: every numeric field ``F`` of :class:`~stealer.node.Stats` is ``stealer_F_total``, every
field of the gateway's statistics ``stealer_gateway_F_total`` and of the server's
``stealer_server_F_total``; fields added to those classes later are served with no change
here. ``stealer_node_info`` carries the node id, role, model hash and plan as labels.

Where it listens: ``--metrics HOST:PORT``, or ``--metrics :PORT`` for the node's own listen
address (``--host``), except that a node of a cluster with a secret binds ``:PORT`` to
127.0.0.1: such a cluster is closed to strangers, and /metrics has no authentication, so it is
not served to the network unless a host is named on purpose.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from .config import DEFAULT_LIMITS
from .errors import ConfigError, StealerError

if TYPE_CHECKING:
    from aiohttp import web
    from prometheus_client import Histogram
    from prometheus_client.core import Metric

    from .node.state import NodeState

__all__ = [
    "LATENCY_BUCKETS",
    "NodeMetrics",
    "add_metrics_arg",
    "add_status_parser",
    "cmd_status",
    "metrics_address_arg",
    "metrics_host",
    "start_metrics",
    "status_table",
]

TASK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Task compute time histogram bounds (seconds): a tiny model's 3x3 tile takes about a
millisecond on a PC, a YOLOv2-608 tail ten seconds and more on a Pi."""

_TASK_KINDS = {"_compute_tile": "tile", "_compute_tail": "tail", "_compute_whole": "whole"}

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0)
"""Frame latency histogram bounds (seconds): a tiny model on a PC finishes a frame in tens of
milliseconds, YOLOv2-608 on a few Pis in seconds to tens of seconds; p50/p99 are read from
these by interpolation, so they are spaced about 2-2.5x apart."""

log = logging.getLogger("stealer.metrics")

DEFAULT_STATUS_TARGET = "127.0.0.1:9100"

# HELP texts of the Stats fields; a field missing here is served with a generic text
_STATS_HELP = {
    "tiles_run": "Tiles (fused-block tasks) this node computed",
    "tails_run": "Tails (the layers after the fused block) this node computed",
    "stolen": "Tasks this node stole from other nodes' queues",
    "steal_failures": "Steal requests that brought no task",
    "busy_seconds": "Seconds the compute slots spent computing tasks",
    "reuse_fallbacks": "Reuse tiles run as their full variant (strips missing or late)",
    "requeued": "Tasks queued again: their holder was lost or their lease ran out",
    "frames_done": "Frames released by this node as the gateway (results in frame order)",
    "frames_dropped": "Frames dropped (deadline mode, overload)",
    "frames_partial": "Frames finished with missing tiles (deadline mode)",
    "task_errors": "Tasks whose computation failed",
    "takeovers": "Times this node took over as the gateway",
    "speculative": "Speculative copies of straggling tasks this node ran",
    "duplicates_dropped": "Repeated results of a task dropped by the gateway",
    "input_bytes_sent": "Bytes of tile inputs granted, as sent (encoded, or raw)",
    "input_bytes_raw": "Bytes of the same tile inputs as raw pixels (or float32) would be",
    "lease_expiries": "Leases of this node's queue that ran out (the tasks were queued again)",
    "peers_lost": "Connections to peers that ended (a peer left, died or was cut off)",
}

_MQTT_HELP = {
    "published": "Results confirmed by the MQTT broker (PUBACK at QoS 1/2, written at QoS 0)",
    "dropped": "Results not delivered to the MQTT broker: queue overflow, QoS-0 in transit at a disconnect, "
               "unconfirmed at shutdown",
    "connects": "Connections to the MQTT broker (the first and every reconnect)",
    "disconnects": "Connections to the MQTT broker lost",
    "refused": "Connection attempts the MQTT broker refused (credentials, authorization)",
}


# ------------------------------------------------------------------------ serving

def metrics_address_arg(text: str) -> tuple[str | None, int]:
    """``--metrics HOST:PORT``, ``:PORT`` or ``PORT`` for argparse: (host or None, port)."""
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        host, port = "", text.strip()
    if not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT or :PORT, got {text!r}")
    host = host.strip("[]")  # [::1]:9100
    return (host or None), int(port)


def add_metrics_arg(parser: argparse.ArgumentParser) -> None:
    """Add ``--metrics [HOST]:PORT`` (off by default)."""
    parser.add_argument(
        "--metrics", type=metrics_address_arg, default=None, metavar="[HOST]:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (:PORT: the --host address, or "
             "127.0.0.1 when the cluster has a secret; port 0: any free port) [off]")


def metrics_host(host: str | None, listen_host: str, has_secret: bool) -> str:
    """Where ``--metrics`` binds: the host it names, else 127.0.0.1 in a cluster with a secret
    (see the module docstring), else the node's own listen address."""
    if host:
        return host
    return "127.0.0.1" if has_secret else listen_host


class NodeMetrics:
    """One node's registry (its collector, the frame latency histogram) and its /metrics server.

    Made and started by :func:`start_metrics`; :meth:`close` is safe twice.
    """

    def __init__(self, node: NodeState) -> None:
        from prometheus_client import CollectorRegistry, Histogram, ProcessCollector

        self.registry = CollectorRegistry(auto_describe=False)
        self.started = time.monotonic()
        self.latency: Histogram = Histogram(
            "stealer_frame_latency_seconds",
            "Frame latency at the gateway, FrameStart to tail done (the latency of each result line)",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.task_seconds: Histogram = Histogram(
            "stealer_task_seconds", "Compute time of the tasks this node ran, in its compute threads",
            labelnames=["kind"], buckets=TASK_BUCKETS, registry=self.registry)
        # bytes of connections to peers that have ended, so the node's totals never go back
        self.gone_bytes_in = 0
        self.gone_bytes_out = 0
        self.registry.register(_NodeCollector(node, self))
        ProcessCollector(registry=self.registry)  # memory and CPU of the process (Linux /proc)
        self.host = ""
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._close_timeout = node.cfg.limits.close_timeout

    def frame_released(self, result: dict[str, Any]) -> None:
        """The gateway released a result line: observe its latency (dropped and failed frames
        have none; they are counted in ``frames_dropped`` and the gateway's statistics)."""
        latency = result.get("latency")
        if isinstance(latency, (int, float)) and math.isfinite(latency):
            self.latency.observe(latency)

    def task_ran(self, fn: object, seconds: float) -> None:
        """A compute thread ran ``fn`` (a tile, a tail, or both of a 1x1 frame) in ``seconds``."""
        kind = _TASK_KINDS.get(getattr(fn, "__name__", ""))
        if kind is not None:  # benchmarks' null tasks and warm-ups are not tasks
            self.task_seconds.labels(kind).observe(seconds)

    def peer_gone(self, peer: Any) -> None:
        """A peer's connection ended: its bytes stay in the node's totals."""
        self.gone_bytes_in += peer.comm.bytes_in
        self.gone_bytes_out += peer.comm.bytes_out

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    async def start(self, host: str, port: int) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/metrics", self._serve)
        self._runner, self.host, self.port = await serve_app(app, host, port, "--metrics", self._close_timeout)
        log.info("serving metrics at http://%s:%d/metrics", self.host, self.port)

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _serve(self, request: web.Request) -> web.Response:
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST

        return web.Response(body=self.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def start_metrics(node: NodeState) -> NodeMetrics:
    """Start ``node``'s /metrics server where ``node.cfg.metrics`` says.

    Raises
    ------
    ConfigError
        The address cannot be bound (in use, not this host's).
    """
    assert node.cfg.metrics is not None
    want_host, port = node.cfg.metrics
    metrics = NodeMetrics(node)
    await metrics.start(metrics_host(want_host, node.cfg.host, node.cfg.secret is not None), port)
    return metrics


class _NodeCollector:
    """The node's live numbers, read at scrape time (on the event loop, so consistent)."""

    def __init__(self, node: NodeState, metrics: NodeMetrics) -> None:
        self.node = node
        self.metrics = metrics
        self.started = metrics.started

    def describe(self) -> list[Metric]:
        return []  # names are read at scrape time (fields added to Stats later appear by themselves)

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

        node = self.node
        yield InfoMetricFamily("stealer_node", "This node: id, role, model and tile plan", value={
            "node_id": node.id, "role": node.role, "model_hash": node.net.model_hash,
            "plan": node._own_plan_key, "gateway": node.gateway_id or ""})
        for name, value in _numbers(node.stats):
            yield CounterMetricFamily(f"stealer_{name}", _STATS_HELP.get(name, f"Stats.{name} of this node"),
                                      value=value)
        for name, value in _numbers(node.gateway.stats):
            yield CounterMetricFamily(f"stealer_gateway_{name}", f"Gateway statistics: {name} (while this node "
                                      "was the gateway)", value=value)
        server = node._server
        if server is not None:
            for name, value in _numbers(server.stats):
                yield CounterMetricFamily(f"stealer_server_{name}", f"Connections: {name}", value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"stealer_{name}", doc, value=value)

        queue = node.queue
        queued = GaugeMetricFamily("stealer_queued_tasks", "Tasks waiting in this node's queue", labels=["kind"])
        queued.add_metric(["tile"], queue.queued_tiles)
        queued.add_metric(["tail"], queue.queued_tails)
        yield queued
        yield gauge("leased_tasks", "Tasks of this node's queue out under a lease", len(queue.leases))
        # _running and _source are the node's own state, read here without copying: the
        # scrape runs on the node's loop, between its callbacks
        yield gauge("tasks_in_hand", "Tasks this node is computing or delivering", node._running)
        yield gauge("peers", "Peers connected", len(node.peers))
        source = node._source  # made at first use: a node with no sources has none
        yield gauge("frames_in_flight", "Frames of this node's sources started and not yet finished",
                    len(source.frames) if source is not None else 0)
        yield gauge("gateway_open_frames", "Frames open at this node as the gateway", len(node.gateway.frames))
        yield gauge("gateway_waiting_frames", "Frames waiting to be admitted at the gateway", len(node.gateway.waiting))
        yield gauge("strip_cache_bytes", "Bytes of reuse strips this node holds for others", node._held.nbytes)
        uptime = time.monotonic() - self.started
        slots = node.cfg.slots
        yield gauge("uptime_seconds", "Seconds since the node started", uptime)
        yield gauge("slots", "Tasks this node computes at once", slots)
        busy = node.stats.busy_seconds / (slots * uptime) if slots and uptime > 0 else 0.0
        yield gauge("busy_fraction", "Share of the compute slots' time spent computing, since start",
                    min(1.0, busy))
        rtt = GaugeMetricFamily("stealer_peer_rtt_seconds", "Smoothed Ping round trip to each peer",
                                labels=["peer"])
        for peer_id, peer in node.peers.items():
            if peer.comm.srtt is not None:
                rtt.add_metric([peer_id[:8]], peer.comm.srtt)
        yield rtt
        # bytes per peer (bounded: Limits.max_connections peers at most), and the node's totals
        # (peers gone included); a peer that reconnects starts its series again from 0,
        # which rate() reads as a counter reset
        received = CounterMetricFamily("stealer_peer_bytes_received", "Bytes of whole frames read from each "
                                       "peer's connection, since it was made", labels=["peer"])
        sent = CounterMetricFamily("stealer_peer_bytes_sent", "Bytes of whole frames written to each peer's "
                                   "connection, since it was made", labels=["peer"])
        total_in, total_out = self.metrics.gone_bytes_in, self.metrics.gone_bytes_out
        for peer_id, peer in node.peers.items():
            received.add_metric([peer_id[:8]], peer.comm.bytes_in)
            sent.add_metric([peer_id[:8]], peer.comm.bytes_out)
            total_in += peer.comm.bytes_in
            total_out += peer.comm.bytes_out
        yield received
        yield sent
        yield CounterMetricFamily("stealer_bytes_received", "Bytes read from peers' connections (frames, "
                                  "handshakes included)", value=total_in)
        yield CounterMetricFamily("stealer_bytes_sent", "Bytes written to peers' connections", value=total_out)
        mqtt = node.mqtt
        if mqtt is not None:
            for name, value in _numbers(mqtt.stats):
                yield CounterMetricFamily(f"stealer_mqtt_{name}", _MQTT_HELP.get(name, f"MQTT: {name}"), value=value)
            yield gauge("mqtt_queued", "Results waiting for the MQTT broker or not yet confirmed by it", mqtt.queued)
            yield gauge("mqtt_connected", "1 while the MQTT broker is connected", 1.0 if mqtt.connected else 0.0)


def _numbers(stats: object) -> Iterable[tuple[str, float]]:
    for f in dataclasses.fields(stats):  # type: ignore[arg-type]
        value = getattr(stats, f.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f.name, value


# ------------------------------------------------------------------------ stealer status

async def serve_app(app: web.Application, host: str, port: int, option: str,
                    close_timeout: float) -> tuple[web.AppRunner, str, int]:
    """Serve an aiohttp ``app`` on the node's event loop (/metrics, the dashboard, the MJPEG
    streams): (its runner, the host and port it listens on; port 0 picks a free one). No access
    log (a scrape every 15 s would be a log line every 15 s) and no signal handling (the node's
    own handlers drain it). A port that cannot be bound is one ConfigError naming ``option``."""
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=close_timeout)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as e:
        await runner.cleanup()
        raise ConfigError(f"{option} {host}:{port}: cannot listen: {e.strerror or e}") from None
    sockname = runner.addresses[0]
    return runner, str(sockname[0]), int(sockname[1])


def add_status_parser(sub: Any) -> None:
    """``stealer status [HOST:PORT ...]``: a table of nodes' /metrics."""
    p = sub.add_parser("status", help="a table of running nodes, read from their --metrics endpoints")
    p.add_argument("targets", nargs="*", metavar="HOST:PORT", default=[DEFAULT_STATUS_TARGET],
                   help=f"nodes' --metrics addresses [{DEFAULT_STATUS_TARGET}]")
    p.add_argument("--interval", type=float, default=DEFAULT_LIMITS.status_interval, metavar="SECONDS",
                   help="scrape twice this far apart for bytes in/out per second; 0: one scrape, byte totals "
                        f"[{DEFAULT_LIMITS.status_interval:g}]")
    p.set_defaults(func=cmd_status)


def fetch_metrics(target: str, timeout: float = DEFAULT_LIMITS.status_timeout) -> str:
    """GET ``http://HOST:PORT/metrics`` (a bare ``:PORT`` is 127.0.0.1).

    Raises
    ------
    StealerError
        Nothing listens, it did not answer in ``timeout`` seconds, or it is not a node's
        /metrics endpoint.
    """
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise StealerError(f"{target}: expected HOST:PORT")
    host = host or "127.0.0.1"
    url = f"http://{host}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body: bytes = resp.read()
    except urllib.error.HTTPError as e:
        raise StealerError(f"{target}: {url} answered {e.code} {e.reason}: is this a stealer node's --metrics?") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        reason = getattr(reason, "strerror", None) or reason
        raise StealerError(f"{target}: cannot read {url} ({reason}): is a node running with --metrics there?") from None
    return body.decode("utf-8", errors="replace")


def parse_metrics(text: str) -> dict[str, Any]:
    """The numbers ``stealer status`` shows, from a node's /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    info: dict[str, str] = {}
    buckets: list[tuple[float, float]] = []
    latency_count = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "stealer_node_info":
                info = dict(s.labels)
            elif s.name == "stealer_frame_latency_seconds_bucket":
                buckets.append((float(s.labels["le"]), s.value))
            elif s.name == "stealer_frame_latency_seconds_count":
                latency_count = s.value
            elif s.name == "stealer_queued_tasks":
                values[f"queued_{s.labels.get('kind', '')}"] = s.value
            elif not s.labels:
                values[s.name] = s.value
    if not info:
        raise StealerError("not a stealer node's metrics (no stealer_node_info)")
    buckets.sort()
    return {"info": info, "values": values, "latency_count": latency_count,
            "p50": histogram_quantile(0.5, buckets), "p99": histogram_quantile(0.99, buckets)}


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """The ``q`` quantile from cumulative (upper bound, count) buckets, interpolated linearly
    within the bucket, as Prometheus' ``histogram_quantile`` does; nan with no observations."""
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):  # in the +Inf bucket: the largest finite bound is all we know
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def status_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """The compact table of ``stealer status``: one row per (target, parsed metrics).

    Columns: the node's id and role, peers connected, tasks queued, tiles and tails computed,
    tasks stolen and steal requests that brought none (misses), frames released (at the
    gateway), dropped and partial, busy share of the compute slots, frame latency p50/p99 (at
    the gateway, from the histogram), uptime, and bytes from and to peers: per second when
    the parsed metrics carry ``rate_in``/``rate_out`` (two scrapes, :func:`with_rates`),
    else the totals (columns ``in``/``out``).
    """
    rates = bool(rows) and all("rate_in" in m for _, m in rows)
    head = (f"{'target':<21} {'node':<8} {'role':<8} {'peers':>5} {'queued':>6} {'tiles':>6} {'tails':>6} "
            f"{'stolen':>6} {'misses':>6} {'frames':>6} {'dropped':>7} {'partial':>7} {'busy':>5} "
            f"{'p50 s':>7} {'p99 s':>7} {'up':>6} {'in/s' if rates else 'in':>7} {'out/s' if rates else 'out':>7}")
    lines = [head]
    for target, m in rows:
        v, info = m["values"], m["info"]

        def n(name: str) -> str:
            value = v.get(name)
            return "-" if value is None else f"{value:.0f}"

        def secs(x: float) -> str:
            return "-" if math.isnan(x) else f"{x:.3f}"

        queued = v.get("queued_tile", 0) + v.get("queued_tail", 0)
        busy = v.get("stealer_busy_fraction")
        lines.append(
            f"{target:<21} {info.get('node_id', '?')[:8]:<8} {info.get('role', '?'):<8} {n('stealer_peers'):>5} "
            f"{queued:>6.0f} {n('stealer_tiles_run_total'):>6} {n('stealer_tails_run_total'):>6} "
            f"{n('stealer_stolen_total'):>6} {n('stealer_steal_failures_total'):>6} "
            f"{n('stealer_frames_done_total'):>6} {n('stealer_frames_dropped_total'):>7} "
            f"{n('stealer_frames_partial_total'):>7} {'-' if busy is None else f'{100 * busy:.0f}%':>5} "
            f"{secs(m['p50']):>7} {secs(m['p99']):>7} {_duration(v.get('stealer_uptime_seconds')):>6} "
            f"{_size(m.get('rate_in') if rates else v.get('stealer_bytes_received_total')):>7} "
            f"{_size(m.get('rate_out') if rates else v.get('stealer_bytes_sent_total')):>7}")
    return "\n".join(lines)


def _size(n: float | None) -> str:
    """Bytes (or bytes per second) in 4 significant characters: 812, 12.3k, 4.5M, 1.2G."""
    if n is None or math.isnan(n):
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def with_rates(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """``second`` with ``rate_in``/``rate_out``: bytes per second from peers and to them
    between two scrapes of one node, over the node's own uptime between them (so the time
    the scrapes took does not count). Nothing is added if the node restarted in between."""
    a, b = first["values"], second["values"]
    dt = b.get("stealer_uptime_seconds", 0.0) - a.get("stealer_uptime_seconds", 0.0)
    if dt <= 0 or first["info"].get("node_id") != second["info"].get("node_id"):
        return second
    out = dict(second)
    for key, name in (("rate_in", "stealer_bytes_received_total"), ("rate_out", "stealer_bytes_sent_total")):
        if name in a and name in b:
            out[key] = max(0.0, b[name] - a[name]) / dt
    return out


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def cmd_status(args: argparse.Namespace) -> int:
    """Print the table; a target that cannot be read is one line on stderr, exit status 1.

    With ``--interval`` above 0 each target is read twice, that far apart, for its byte rates
    (all targets' first reads, one wait, all second reads)."""
    interval = getattr(args, "interval", 0.0)
    first: dict[str, dict[str, Any]] = {}
    if interval > 0:
        for target in args.targets:
            try:
                first[target] = parse_metrics(fetch_metrics(target))
            except (StealerError, ValueError):
                pass  # reported by the second read below
        if first:
            time.sleep(interval)
    rows: list[tuple[str, dict[str, Any]]] = []
    failed = 0
    for target in args.targets:
        try:
            m = parse_metrics(fetch_metrics(target))
            rows.append((target, with_rates(first[target], m) if target in first else m))
        except StealerError as exc:
            print(f"stealer status: {exc}", file=sys.stderr)
            failed += 1
        except ValueError as exc:  # prometheus_client's parser on a body that is not metrics
            print(f"stealer status: {target}: not Prometheus metrics ({exc})", file=sys.stderr)
            failed += 1
    if rows:
        print(status_table(rows))
    return 1 if failed else 0
